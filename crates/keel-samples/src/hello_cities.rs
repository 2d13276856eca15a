//! `HelloCities`: three activities in sequence (Durable Functions' `E1_HelloSequence`).
//! No input; output `["Hello Tokyo!","Hello Seattle!","Hello London!"]`.

use keel::{Activity, ActivityContext, Never, Orchestration, OrchestrationContext, OrchestrationError, WorkerBuilder};

pub const HELLO_CITIES: Orchestration<(), Vec<String>> = Orchestration::new("HelloCities");
pub const SAY_HELLO: Activity<String, String, Never> = Activity::new("SayHello");

/// Registers `HelloCities` and `SayHello`.
pub fn register(worker: WorkerBuilder) -> WorkerBuilder {
    worker.orchestration(HELLO_CITIES, hello_cities).activity(SAY_HELLO, say_hello)
}

/// The orchestrator: greets Tokyo, Seattle and London, one after the other.
pub async fn hello_cities(ctx: OrchestrationContext, _: ()) -> Result<Vec<String>, OrchestrationError> {
    let mut greetings = Vec::new();
    for city in ["Tokyo", "Seattle", "London"] {
        greetings.push(ctx.call(SAY_HELLO, &city.to_string()).await?);
    }
    Ok(greetings)
}

async fn say_hello(ctx: ActivityContext, city: String) -> Result<String, Never> {
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, %city, "saying hello");
    Ok(format!("Hello {city}!"))
}
