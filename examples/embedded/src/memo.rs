//! `example/memo`: a value that forgets itself (shows state TTL).
//!
//! Message: a `string`. Replies the previous value (empty if none or expired), stores the new
//! one with a TTL of 1 second after write, and counts invocations in `calls`, which expires
//! 1 second after the last invocation.

use std::time::Duration;

use statemesh_sdk::{FnFunction, TypedValue, ValueSpec};

/// The function type.
pub const TYPE: &str = "example/memo";

/// The memo function.
pub fn function() -> FnFunction {
    let value = ValueSpec::<String>::new("value").expire_after_write(Duration::from_secs(1));
    let calls = ValueSpec::<i64>::new("calls").expire_after_invoke(Duration::from_secs(1));
    FnFunction::new(
        vec![value.descriptor().clone(), calls.descriptor().clone()],
        move |ctx, msg| {
            let new: String = msg.get()?;
            let previous = ctx.get(&value)?.unwrap_or_default();
            ctx.set(&value, &new)?;
            let n = ctx.get(&calls)?.unwrap_or(0) + 1;
            ctx.set(&calls, &n)?;
            ctx.reply(TypedValue::of(&previous));
            Ok(())
        },
    )
}
