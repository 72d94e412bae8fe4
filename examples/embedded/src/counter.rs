//! `example/counter`: the benchmark workload.

use statemesh_sdk::{FnFunction, TypedValue, ValueSpec};

/// The function type.
pub const TYPE: &str = "example/counter";

/// Message: a `long` delta. State: `total`. Replies the new total as a `long`.
pub fn function() -> FnFunction {
    let total = ValueSpec::<i64>::new("total");
    FnFunction::new(vec![total.descriptor().clone()], move |ctx, msg| {
        let delta: i64 = msg.get()?;
        let t = ctx.get(&total)?.unwrap_or(0).wrapping_add(delta);
        ctx.set(&total, &t)?;
        ctx.reply(TypedValue::of(&t));
        Ok(())
    })
}
