//! Activities: the functions orchestrators call to do real work (I/O, side effects).
//!
//! An activity runs at least once per scheduling: after a crash it may run again, so
//! activities should be idempotent. Its result or failure goes back to the
//! orchestration as a `TaskCompleted` / `TaskFailed` event. An activity is declared by
//! its handle ([`keel_core::handle::Activity`]) and registered with
//! [`crate::WorkerBuilder::activity`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use keel_core::failure::ActivityError;
use keel_core::failure::Failure;
use keel_core::FailureDetails;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// What an activity knows about the call it serves.
#[derive(Clone, Debug)]
pub struct ActivityContext {
    /// The orchestration instance that scheduled the call.
    pub instance_id: String,
    /// The execution that scheduled it.
    pub execution_id: String,
    /// The sequence number of the `TaskScheduled` event this call answers.
    pub task_id: i32,
    /// The activity's name, as the call gave it.
    pub name: String,
    /// How many times this call was handed to a worker, this time included (more than
    /// one after a crash or lease expiry).
    pub delivery_attempt: u32,
}

/// The boxed future of a running activity: JSON output text or a failure.
pub type ActivityFuture = Pin<Box<dyn Future<Output = Result<Option<String>, FailureDetails>> + Send>>;

/// An activity function with its types erased: context and JSON input text in.
pub type ErasedActivity = Arc<dyn Fn(ActivityContext, Option<String>) -> ActivityFuture + Send + Sync>;

/// Wraps a typed activity function (`async fn(ActivityContext, I) -> Result<O, E>`):
/// its failure becomes the details the caller's [`keel_core::failure::TaskFailure`] is
/// made from.
pub fn activity<F, Fut, I, O, E>(function: F) -> ErasedActivity
where
    F: Fn(ActivityContext, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, E>> + Send + 'static,
    I: DeserializeOwned + Send + 'static,
    O: Serialize,
    E: Failure,
{
    let function = Arc::new(function);
    Arc::new(move |context, input| {
        let function = function.clone();
        Box::pin(async move {
            let input: I = keel_core::history::decode_payload(input.as_deref().unwrap_or("null")).map_err(|error| {
                FailureDetails::new(
                    "InvalidInput",
                    format!("the input of activity '{}' does not fit: {error}", context.name),
                )
            })?;
            let output = function(context, input).await.map_err(|failure| failure.to_details())?;
            let json = serde_json::to_string(&output)
                .map_err(|error| FailureDetails::new("SerializationError", error.to_string()))?;
            Ok(Some(json))
        })
    })
}
