//! `example/greeter`: the hello world of stateful functions.

use statemesh_sdk::{FnFunction, FunctionError, TypedValue, ValueSpec};

/// The function type.
pub const TYPE: &str = "example/greeter";

/// The greeter. Message: any `string` (ignored; the id is the name). State: `visits`.
pub fn function() -> FnFunction {
    let visits = ValueSpec::<i64>::new("visits");
    FnFunction::new(vec![visits.descriptor().clone()], move |ctx, _msg| {
        let n = ctx.get(&visits)?.unwrap_or(0) + 1;
        ctx.set(&visits, &n)?;
        let greeting = format!("Hello {}, you are visitor #{n}", ctx.self_address().id);
        ctx.reply(TypedValue::of(&greeting));
        Ok::<(), FunctionError>(())
    })
}
