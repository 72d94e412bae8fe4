//! `statemesh.smoke/fn`: interprets command trees, for the exactly-once crash test (modelled
//! on StateFun's end-to-end smoke test). `tests/py/statefun3_functions.py` serves the same
//! function as `statemesh.smoke/py` through the StateFun Python SDK.
//!
//! Message (typename `statemesh.smoke/Commands`, JSON): `{"id": "m17", "cmds": [command, …]}`,
//! run in order. A message with an `id` appends it and a space to the state `log` first, so the
//! crash test sees which messages were applied, how often, and in which order (an over-count
//! and a lost message cannot cancel out in `log` as they could in `count`).
//!
//! | command | effect |
//! | --- | --- |
//! | `{"inc": n}` | adds n to the state `count` |
//! | `{"send": {"to": "ns/type/id", "cmds": […]}}` | sends a command list to another address |
//! | `{"delay": {"ms": n, "to": …, "token": "t" or null, "cmds": […]}}` | the same after n ms |
//! | `{"cancel": "t"}` | cancels this address's delayed message with token t |
//! | `{"egress": "record"}` | appends the string to egress topic `smoke` |
//! | `{"reply": "value"}` | replies the string to the caller |
//! | `{"pad": n}` | sets the state `pad` to n bytes (large epochs in the crash test) |

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

fn commands(id: Option<&Value>, cmds: &Value) -> TypedValue {
    let doc = match id {
        Some(id) => serde_json::json!({ "id": id, "cmds": cmds }),
        None => serde_json::json!({ "cmds": cmds }),
    };
    TypedValue::new(COMMANDS, serde_json::to_vec(&doc).expect("JSON serializes"))
}

/// The command interpreter.
pub fn function() -> FnFunction {
    let count = ValueSpec::<i64>::new("count");
    let log = ValueSpec::<String>::new("log");
    let pad = ValueSpec::<String>::new("pad");
    let specs = vec![
        count.descriptor().clone(),
        log.descriptor().clone(),
        pad.descriptor().clone(),
    ];
    FnFunction::new(specs, move |ctx, msg| {
        let doc: Value = serde_json::from_slice(msg.value())
            .map_err(|e| FunctionError::msg(format!("smoke message: invalid JSON: {e}")))?;
        let cmds = doc
            .get("cmds")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("expected {\"cmds\": [...]}", &doc))?;
        if let Some(id) = doc.get("id").and_then(Value::as_str) {
            let mut l = ctx.get(&log)?.unwrap_or_default();
            l.push_str(id);
            l.push(' ');
            ctx.set(&log, &l)?;
        }
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
                    let msg = commands(arg.get("id"), arg.get("cmds").unwrap_or(&Value::Null));
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
                "pad" => {
                    let n = arg
                        .as_u64()
                        .ok_or_else(|| bad("pad: expected a number", c))?;
                    ctx.set(&pad, &"p".repeat(n as usize))?;
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
