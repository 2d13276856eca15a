//! `Counter`: the entity of the Durable Functions docs. Its state is a number;
//! operations `add` (input: a number), `reset` and `get` (returns the number). Like every
//! entity it also has `delete`.
//!
//! Signal it with `POST /runtime/webhooks/durabletask/entities/Counter/{key}?op=add`
//! and body `5`; read it with `GET /runtime/webhooks/durabletask/entities/Counter/{key}`.

use keel::{EntityContext, EntityError, WorkerBuilder};

/// The entity's name.
pub const COUNTER: &str = "Counter";

/// Registers the `Counter` entity.
pub fn register(worker: WorkerBuilder) -> WorkerBuilder {
    worker.entity(COUNTER, counter)
}

/// One operation on a counter; returns the value after it.
pub fn counter(ctx: &mut EntityContext<i64>) -> Result<i64, EntityError> {
    match ctx.operation() {
        "add" => {
            let amount: i64 = ctx.input()?;
            let value = ctx.state_mut();
            *value = value
                .checked_add(amount)
                .ok_or_else(|| EntityError::new("Overflow", format!("{value} + {amount} does not fit in 64 bits")))?;
        }
        "reset" => ctx.set_state(0),
        "get" => {}
        _ => return Err(ctx.unknown_operation()),
    }
    Ok(ctx.state().copied().unwrap_or_default())
}
