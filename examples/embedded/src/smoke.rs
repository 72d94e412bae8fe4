//! `statemesh.smoke/fn`: interprets command trees, for the exactly-once crash test (modelled
//! on StateFun's end-to-end smoke test). `tests/py/statefun3_functions.py` serves the same
//! function as `statemesh.smoke/py` through the StateFun Python SDK.
//!
//! Message (typename `statemesh.smoke/Commands`, JSON): `{"cmds": [command, …]}`, run in order:
//!
//! | command | effect |
//! | --- | --- |
//! | `{"inc": n}` | adds n to the state `count` |
//! | `{"send": {"to": "ns/type/id", "cmds": […]}}` | sends a command list to another address |
//! | `{"delay": {"ms": n, "to": …, "token": "t" or null, "cmds": […]}}` | the same after n ms |
//! | `{"cancel": "t"}` | cancels this address's delayed message with token t |
//! | `{"egress": "record"}` | appends the string to egress topic `smoke` |
//! | `{"reply": "value"}` | replies the string to the caller |

use std::time::Duration;

use serde_json::Value;
use statemesh_sdk::{Address, FnFunction, FunctionError, TypedValue, ValueSpec};

/// The function type.
pub const TYPE: &str = "statemesh.smoke/fn";
/// The typename of command lists.
pub const COMMANDS: &str = "statemesh.smoke/Commands";
/// The egress topic.
pub const TOPIC: &str = "smoke";

fn bad(what: &str, v: &Value) -> FunctionError {
    FunctionError::msg(format!("smoke command: {what}, found {v}"))
}

fn commands(cmds: &Value) -> TypedValue {
    TypedValue::new(
        COMMANDS,
        serde_json::to_vec(&serde_json::json!({ "cmds": cmds })).expect("JSON serializes"),
    )
}

/// The command interpreter.
pub fn function() -> FnFunction {
    let count = ValueSpec::<i64>::new("count");
    FnFunction::new(vec![count.descriptor().clone()], move |ctx, msg| {
        let doc: Value = serde_json::from_slice(msg.value())
            .map_err(|e| FunctionError::msg(format!("smoke message: invalid JSON: {e}")))?;
        let cmds = doc
            .get("cmds")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("expected {\"cmds\": [...]}", &doc))?;
        for c in cmds {
            let obj = c.as_object().ok_or_else(|| bad("expected an object", c))?;
            let (op, arg) = obj.iter().next().ok_or_else(|| bad("empty command", c))?;
            match op.as_str() {
                "inc" => {
                    let n = arg
                        .as_i64()
                        .ok_or_else(|| bad("inc: expected a number", c))?;
                    let total = ctx.get(&count)?.unwrap_or(0) + n;
                    ctx.set(&count, &total)?;
                }
                "send" | "delay" => {
                    let to = arg
                        .get("to")
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad("expected \"to\"", c))?;
                    let to = Address::parse(to).map_err(|e| FunctionError::msg(e.to_string()))?;
                    let msg = commands(arg.get("cmds").unwrap_or(&Value::Null));
                    if op == "send" {
                        ctx.send(to, msg);
                    } else {
                        let ms = arg.get("ms").and_then(Value::as_u64).unwrap_or(0);
                        let token = arg.get("token").and_then(Value::as_str).map(String::from);
                        ctx.send_after(Duration::from_millis(ms), to, msg, token);
                    }
                }
                "cancel" => {
                    let t = arg
                        .as_str()
                        .ok_or_else(|| bad("cancel: expected a token", c))?;
                    ctx.cancel_delayed(t);
                }
                "egress" => {
                    let r = arg
                        .as_str()
                        .ok_or_else(|| bad("egress: expected a string", c))?;
                    ctx.send_egress(TOPIC, TypedValue::of(&r.to_string()));
                }
                "reply" => {
                    let r = arg
                        .as_str()
                        .ok_or_else(|| bad("reply: expected a string", c))?;
                    ctx.reply(TypedValue::of(&r.to_string()));
                }
                other => return Err(bad(&format!("unknown command {other:?}"), c)),
            }
        }
        Ok(())
    })
}
