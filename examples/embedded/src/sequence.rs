//! `example/sequence`: checks that messages arrive in the order they were sent.
//!
//! Message: a `long` sequence number n. State: `last` (the last number seen) and `gaps` (how
//! often n was not `last + 1`). Replies `last`. A sender numbering its messages 1, 2, 3, …
//! per address finds `gaps = 0` if and only if the mesh kept per-address FIFO order.

use statemesh_sdk::{FnFunction, TypedValue, ValueSpec};

/// The function type.
pub const TYPE: &str = "example/sequence";

/// The sequence checker.
pub fn function() -> FnFunction {
    let last = ValueSpec::<i64>::new("last");
    let gaps = ValueSpec::<i64>::new("gaps");
    FnFunction::new(
        vec![last.descriptor().clone(), gaps.descriptor().clone()],
        move |ctx, msg| {
            let n: i64 = msg.get()?;
            let prev = ctx.get(&last)?.unwrap_or(0);
            if n != prev + 1 {
                let g = ctx.get(&gaps)?.unwrap_or(0) + 1;
                ctx.set(&gaps, &g)?;
            }
            ctx.set(&last, &n)?;
            ctx.reply(TypedValue::of(&n));
            Ok(())
        },
    )
}
