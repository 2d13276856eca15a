//! `HelloCities`: three activities in sequence (Durable Functions' `E1_HelloSequence`).
//! No input; output `["Hello Tokyo!","Hello Seattle!","Hello London!"]`.

use keel::{ActivityContext, ActivityError, OrchestrationContext, OrchestrationError, WorkerBuilder};

/// Registers `HelloCities` and `SayHello`.
pub fn register(worker: WorkerBuilder) -> WorkerBuilder {
    worker.orchestrator("HelloCities", hello_cities).activity("SayHello", say_hello)
}

/// The orchestrator: greets Tokyo, Seattle and London, one after the other.
pub async fn hello_cities(ctx: OrchestrationContext) -> Result<Vec<String>, OrchestrationError> {
    let mut greetings = Vec::new();
    for city in ["Tokyo", "Seattle", "London"] {
        greetings.push(ctx.call_activity::<String>("SayHello", &city).await?);
    }
    Ok(greetings)
}

async fn say_hello(ctx: ActivityContext, city: String) -> Result<String, ActivityError> {
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, %city, "saying hello");
    Ok(format!("Hello {city}!"))
}
