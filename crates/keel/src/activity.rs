//! Activities: the functions orchestrators call to do real work (I/O, side effects).
//!
//! An activity runs at least once per scheduling: after a crash it may run again, so
//! activities should be idempotent. Its result or failure goes back to the
//! orchestration as a `TaskCompleted` / `TaskFailed` event.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use keel_core::FailureDetails;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// What an activity knows about the call it serves.
#[derive(Clone, Debug)]
pub struct ActivityContext {
    pub instance_id: String,
    pub execution_id: String,
    /// The sequence number of the `TaskScheduled` event this call answers.
    pub task_id: i32,
    pub name: String,
    /// How many times this call was handed to a worker, this time included (more than
    /// one after a crash or lease expiry).
    pub delivery_attempt: u32,
}

/// Why an activity failed. Any `std::error::Error` converts into it (keeping its type
/// name), so activities can use `?` freely.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivityError(pub FailureDetails);

impl ActivityError {
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> ActivityError {
        ActivityError(FailureDetails::new(error_type, message))
    }

    /// A failure with error type `ActivityError`.
    pub fn msg(message: impl Into<String>) -> ActivityError {
        ActivityError::new("ActivityError", message)
    }

    /// Marks the failure as one that retry policies must not retry.
    pub fn non_retriable(mut self) -> ActivityError {
        self.0.is_non_retriable = true;
        self
    }
}

impl std::fmt::Display for ActivityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: std::error::Error> From<E> for ActivityError {
    fn from(error: E) -> ActivityError {
        let type_name = std::any::type_name::<E>();
        let short = type_name.rsplit("::").next().unwrap_or(type_name);
        let mut details = FailureDetails::new(short, error.to_string());
        if let Some(source) = error.source() {
            details.inner_failure = Some(Box::new(FailureDetails::new("Source", source.to_string())));
        }
        ActivityError(details)
    }
}

/// The boxed future of a running activity: JSON output text or a failure.
pub type ActivityFuture = Pin<Box<dyn Future<Output = Result<Option<String>, FailureDetails>> + Send>>;

/// An activity function with its types erased: context and JSON input text in.
pub type Activity = Arc<dyn Fn(ActivityContext, Option<String>) -> ActivityFuture + Send + Sync>;

/// Wraps a typed activity function (`async fn(ActivityContext, I) -> Result<O, E>`).
pub fn activity<F, Fut, I, O, E>(function: F) -> Activity
where
    F: Fn(ActivityContext, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, E>> + Send + 'static,
    I: DeserializeOwned + Send + 'static,
    O: Serialize,
    E: Into<ActivityError>,
{
    let function = Arc::new(function);
    Arc::new(move |context, input| {
        let function = function.clone();
        Box::pin(async move {
            let input: I = serde_json::from_str(input.as_deref().unwrap_or("null")).map_err(|error| {
                FailureDetails::new(
                    "InvalidInput",
                    format!("the input of activity '{}' does not fit: {error}", context.name),
                )
            })?;
            let output = function(context, input).await.map_err(|error| error.into().0)?;
            let json = serde_json::to_string(&output)
                .map_err(|error| FailureDetails::new("SerializationError", error.to_string()))?;
            Ok(Some(json))
        })
    })
}
