//! Durable entities in Rust: the context an operation runs with, the typed wrapper that
//! turns an operation handler into an erased one, and the batch runner.
//!
//! An entity is registered with a typed state `S` and a handler
//! `Fn(&mut EntityContext<S>) -> Result<R, EntityError>` that runs one operation. The
//! operations of a batch run one after the other on the state the previous one left; an
//! operation that fails (an error or a panic) leaves no trace: its state change and the
//! signals and starts it made are dropped, the other operations of the batch stand, and
//! its caller gets the failure.
//!
//! ```
//! use std::time::Duration;
//! use keel::{EntityContext, EntityError, EntityId, Worker};
//!
//! fn counter(ctx: &mut EntityContext<i64>) -> Result<i64, EntityError> {
//!     match ctx.operation() {
//!         "add" => *ctx.state_mut() += ctx.input::<i64>()?,
//!         "reset" => ctx.set_state(0),
//!         "get" => {}
//!         _ => return Err(ctx.unknown_operation()),
//!     }
//!     Ok(ctx.state().copied().unwrap_or_default())
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> anyhow::Result<()> {
//! # let dir = tempfile::tempdir()?;
//! # let url = format!("sqlite://{}", dir.path().join("keel.db").display());
//! let store = keel::store::open(&url).await?;
//! let worker = Worker::builder(store).entity("Counter", counter).build().start();
//! let client = worker.client();
//! let counter = EntityId::new("Counter", "c1").map_err(anyhow::Error::msg)?;
//! client.signal_entity(&counter, "add", &5).await?;
//!
//! // A signal is one-way: the entity runs it in its turn.
//! let state = loop {
//!     match client.get_entity(&counter).await? {
//!         Some(entity) if entity.exists() => break entity.state_as::<i64>()?,
//!         _ => tokio::time::sleep(Duration::from_millis(10)).await,
//!     }
//! };
//! assert_eq!(state, 5);
//! worker.shutdown(Duration::from_secs(5)).await;
//! # Ok(())
//! # }
//! ```

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use keel_core::entity::{EntityId, OperationRequest};
use keel_core::history::{FailureDetails, Timestamp};
use keel_core::limits;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Error type of an operation the entity does not have.
pub const UNKNOWN_OPERATION_ERROR_TYPE: &str = "UnknownOperation";

/// Error type of an operation on an entity no worker hosts.
pub const ENTITY_NOT_REGISTERED_ERROR_TYPE: &str = "EntityNotRegistered";

/// The operation every entity has unless its handler implements one of that name: it
/// deletes the state.
pub const DELETE_OPERATION: &str = "delete";

/// Why an operation failed. Any `std::error::Error` converts into it (keeping its type
/// name), so handlers can use `?`.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityError(pub FailureDetails);

impl EntityError {
    /// A failure with this error type and message.
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> EntityError {
        EntityError(FailureDetails::new(error_type, message))
    }

    /// A failure with error type `EntityError`.
    pub fn msg(message: impl Into<String>) -> EntityError {
        EntityError::new("EntityError", message)
    }
}

impl std::fmt::Display for EntityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: std::error::Error> From<E> for EntityError {
    fn from(error: E) -> EntityError {
        let type_name = std::any::type_name::<E>();
        EntityError::new(type_name.rsplit("::").next().unwrap_or(type_name), error.to_string())
    }
}

/// Something an operation asks for besides its state and result.
#[derive(Clone, Debug, PartialEq)]
pub enum EntityAction {
    /// A one-way operation on the entity with instance id `target`, at `scheduled_time`
    /// or at once.
    Signal {
        /// The entity's instance id, `@{name}@{key}`.
        target: String,
        /// The operation the entity runs.
        operation: String,
        /// The operation's input, JSON text.
        input: Option<String>,
        /// When the entity receives the signal; `None` for at once.
        scheduled_time: Option<Timestamp>,
    },
    /// A new orchestration instance.
    StartOrchestration {
        /// The new instance's id; an id a running instance holds is left alone.
        instance_id: String,
        /// The orchestrator to run, as registered.
        name: String,
        /// The orchestrator's input, JSON text.
        input: Option<String>,
        /// The instance does not start before this time; `None` for at once.
        scheduled_start: Option<Timestamp>,
    },
}

/// What a batch of operations did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchOutcome {
    /// The state after the batch (JSON; `None`: the entity has no state).
    pub state: Option<String>,
    /// One result per operation, in order: the operation's JSON result or its failure.
    pub results: Vec<Result<Option<String>, FailureDetails>>,
    /// The actions of the operations that succeeded, in order.
    pub actions: Vec<EntityAction>,
}

/// The context of one entity operation: its id, the operation and its input, the state,
/// and the signals and orchestration starts it makes.
pub struct EntityContext<S> {
    id: EntityId,
    operation: String,
    input: Option<String>,
    state: Option<S>,
    actions: Vec<EntityAction>,
    now: Timestamp,
}

impl<S> std::fmt::Debug for EntityContext<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntityContext").field("id", &self.id).field("operation", &self.operation).finish()
    }
}

impl<S: Default> EntityContext<S> {
    /// The entity the operation runs on.
    pub fn id(&self) -> &EntityId {
        &self.id
    }

    /// The operation's name, as the caller gave it.
    pub fn operation(&self) -> &str {
        &self.operation
    }

    /// The operation's input, deserialized (a missing input reads as JSON `null`).
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, EntityError> {
        keel_core::history::decode_payload(self.input.as_deref().unwrap_or("null")).map_err(|error| {
            EntityError::new(
                "InvalidInput",
                format!("the input of operation '{}' on {} does not fit: {error}", self.operation, self.id),
            )
        })
    }

    /// The operation's input as raw JSON text.
    pub fn input_json(&self) -> Option<&str> {
        self.input.as_deref()
    }

    /// The state; `None` before the first operation that sets one, and after a delete.
    pub fn state(&self) -> Option<&S> {
        self.state.as_ref()
    }

    /// The state, created with `S::default()` if there is none.
    pub fn state_mut(&mut self) -> &mut S {
        self.state.get_or_insert_with(S::default)
    }

    /// Replaces the state.
    pub fn set_state(&mut self, state: S) {
        self.state = Some(state);
    }

    /// Deletes the state: the entity no longer exists once the batch is committed.
    pub fn delete_state(&mut self) {
        self.state = None;
    }

    /// The time the batch started.
    pub fn current_utc_datetime(&self) -> Timestamp {
        self.now
    }

    /// Signals an operation on an entity (this one included), after the batch commits.
    pub fn signal_entity(
        &mut self,
        entity: &EntityId,
        operation: &str,
        input: &impl Serialize,
    ) -> Result<(), EntityError> {
        self.signal(entity, operation, input, None)
    }

    /// Like [`EntityContext::signal_entity`], delivered at `at`.
    pub fn signal_entity_at(
        &mut self,
        entity: &EntityId,
        operation: &str,
        input: &impl Serialize,
        at: Timestamp,
    ) -> Result<(), EntityError> {
        self.signal(entity, operation, input, Some(at))
    }

    fn signal(
        &mut self,
        entity: &EntityId,
        operation: &str,
        input: &impl Serialize,
        scheduled_time: Option<Timestamp>,
    ) -> Result<(), EntityError> {
        limits::check_name("operation", operation).map_err(|message| EntityError::new("InvalidInput", message))?;
        let input = serialize(input)?;
        self.actions.push(EntityAction::Signal {
            target: entity.instance_id(),
            operation: operation.to_string(),
            input,
            scheduled_time,
        });
        Ok(())
    }

    /// Starts an orchestration after the batch commits; returns its new instance id.
    pub fn start_orchestration(&mut self, name: &str, input: &impl Serialize) -> Result<String, EntityError> {
        let instance_id = uuid::Uuid::new_v4().simple().to_string();
        self.start_orchestration_with_id(name, &instance_id, input)?;
        Ok(instance_id)
    }

    /// Starts an orchestration with the given instance id after the batch commits (an id
    /// that a running instance holds is left alone).
    pub fn start_orchestration_with_id(
        &mut self,
        name: &str,
        instance_id: &str,
        input: &impl Serialize,
    ) -> Result<(), EntityError> {
        limits::check_name("orchestrator", name).map_err(|message| EntityError::new("InvalidInput", message))?;
        limits::check_instance_id(instance_id).map_err(|message| EntityError::new("InvalidInput", message))?;
        if keel_core::entity::is_entity_instance_id(instance_id) {
            return Err(EntityError::new("InvalidInput", "orchestration instance ids must not start with '@'"));
        }
        let input = serialize(input)?;
        self.actions.push(EntityAction::StartOrchestration {
            instance_id: instance_id.to_string(),
            name: name.to_string(),
            input,
            scheduled_start: None,
        });
        Ok(())
    }

    /// The error for an operation this entity does not have. For `delete`, it makes
    /// Keel delete the state (the implicit `delete` operation).
    pub fn unknown_operation(&self) -> EntityError {
        EntityError::new(
            UNKNOWN_OPERATION_ERROR_TYPE,
            format!("entity '{}' has no operation '{}'", self.id.name, self.operation),
        )
    }
}

fn serialize(value: &impl Serialize) -> Result<Option<String>, EntityError> {
    let json =
        serde_json::to_string(value).map_err(|error| EntityError::new("SerializationError", error.to_string()))?;
    limits::check_payload("input", Some(&json)).map_err(|message| EntityError::new("PayloadTooLarge", message))?;
    Ok(Some(json))
}

/// One operation in erased form: the state as JSON in and out.
pub struct ErasedOperation {
    /// The entity the operation runs on.
    pub id: EntityId,
    /// The operation to run.
    pub operation: String,
    /// The operation's input, JSON text.
    pub input: Option<String>,
    /// The state before (JSON); the handler leaves the state after in it.
    pub state: Option<String>,
    /// The signals and starts the operation asks for; the handler appends to it.
    pub actions: Vec<EntityAction>,
    /// The time the batch started.
    pub now: Timestamp,
}

/// An entity's operation handler with its types erased.
pub type Entity = Arc<dyn Fn(&mut ErasedOperation) -> Result<Option<String>, FailureDetails> + Send + Sync>;

/// Wraps a typed handler (`Fn(&mut EntityContext<S>) -> Result<R, EntityError>`).
pub fn entity<S, R, F>(handler: F) -> Entity
where
    S: Serialize + DeserializeOwned + Default + 'static,
    R: Serialize,
    F: Fn(&mut EntityContext<S>) -> Result<R, EntityError> + Send + Sync + 'static,
{
    Arc::new(move |operation: &mut ErasedOperation| {
        let state = match operation.state.as_deref() {
            None => None,
            Some(text) => Some(serde_json::from_str::<S>(text).map_err(|error| {
                FailureDetails::new(
                    "InvalidState",
                    format!("the state of entity {} does not fit its type: {error}", operation.id),
                )
            })?),
        };
        let mut context = EntityContext {
            id: operation.id.clone(),
            operation: operation.operation.clone(),
            input: operation.input.take(),
            state,
            actions: Vec::new(),
            now: operation.now,
        };
        let result = handler(&mut context).map_err(|error| error.0)?;
        let result = serde_json::to_string(&result)
            .map_err(|error| FailureDetails::new("SerializationError", error.to_string()))?;
        operation.state = context
            .state
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|error| FailureDetails::new("SerializationError", error.to_string()))?;
        operation.actions = context.actions;
        Ok(Some(result))
    })
}

/// Runs a batch of operations on `state`, one at a time. Never panics: a panic in the
/// handler fails its operation.
pub fn run_batch(
    entity: &Entity,
    id: &EntityId,
    state: Option<String>,
    operations: &[OperationRequest],
    now: Timestamp,
) -> BatchOutcome {
    let mut outcome = BatchOutcome { state, results: Vec::with_capacity(operations.len()), actions: Vec::new() };
    for request in operations {
        let mut operation = ErasedOperation {
            id: id.clone(),
            operation: request.operation.clone(),
            input: request.input.clone(),
            state: outcome.state.clone(),
            actions: Vec::new(),
            now,
        };
        let result = match std::panic::catch_unwind(AssertUnwindSafe(|| entity(&mut operation))) {
            Ok(Err(failure))
                if failure.error_type == UNKNOWN_OPERATION_ERROR_TYPE && request.operation == DELETE_OPERATION =>
            {
                operation.state = None;
                operation.actions.clear();
                Ok(None)
            }
            Ok(result) => result,
            Err(panic) => Err(FailureDetails::new(
                keel_core::replay::PANIC_ERROR_TYPE,
                format!("operation '{}' on {id} panicked: {}", request.operation, panic_message(panic.as_ref())),
            )),
        };
        let result = result.and_then(|output| {
            limits::check_payload("the entity state", operation.state.as_deref())
                .and_then(|()| limits::check_payload("the operation result", output.as_deref()))
                .map_err(|message| FailureDetails::new("PayloadTooLarge", message))?;
            Ok(output)
        });
        if result.is_ok() {
            outcome.state = operation.state;
            outcome.actions.append(&mut operation.actions);
        }
        outcome.results.push(result);
    }
    outcome
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|message| message.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::history::{EventKind, HistoryEvent};

    fn request(operation: &str, input: Option<&str>) -> OperationRequest {
        OperationRequest {
            request_id: operation.into(),
            operation: operation.into(),
            input: input.map(str::to_string),
            reply_to: None,
            event: HistoryEvent::new(now(), EventKind::OrchestratorStarted),
        }
    }

    fn now() -> Timestamp {
        chrono::DateTime::from_timestamp_millis(0).unwrap()
    }

    fn counter(ctx: &mut EntityContext<i64>) -> Result<i64, EntityError> {
        match ctx.operation() {
            "add" => *ctx.state_mut() += ctx.input::<i64>()?,
            "boom" => {
                *ctx.state_mut() = 999;
                ctx.signal_entity(&EntityId::new("counter", "other").unwrap(), "add", &1)?;
                return Err(EntityError::msg("boom"));
            }
            "panic" => {
                *ctx.state_mut() = 999;
                panic!("no");
            }
            "tell" => ctx.signal_entity(&EntityId::new("counter", "other").unwrap(), "add", &1)?,
            _ => return Err(ctx.unknown_operation()),
        }
        Ok(ctx.state().copied().unwrap_or_default())
    }

    #[test]
    fn a_failed_operation_rolls_back_only_itself() {
        let entity = entity(counter);
        let id = EntityId::new("counter", "a").unwrap();
        let operations = [
            request("add", Some("2")),
            request("boom", None),
            request("panic", None),
            request("add", Some("x")),
            request("tell", None),
            request("add", Some("3")),
        ];
        let outcome = run_batch(&entity, &id, None, &operations, now());
        assert_eq!(outcome.state.as_deref(), Some("5"));
        let results: Vec<Result<Option<&str>, &str>> = outcome
            .results
            .iter()
            .map(|result| result.as_ref().map(Option::as_deref).map_err(|failure| failure.error_type.as_str()))
            .collect();
        assert_eq!(
            results,
            [Ok(Some("2")), Err("EntityError"), Err("Panic"), Err("InvalidInput"), Ok(Some("2")), Ok(Some("5"))]
        );
        assert_eq!(outcome.actions.len(), 1, "only the signal of the operation that succeeded");
    }

    #[test]
    fn delete_is_implicit_unless_the_entity_has_it() {
        let entity = entity(counter);
        let id = EntityId::new("counter", "a").unwrap();
        let outcome = run_batch(&entity, &id, Some("4".into()), &[request("delete", None)], now());
        assert_eq!((outcome.state, outcome.results), (None, vec![Ok(None)]));
        let unknown = run_batch(&entity, &id, Some("4".into()), &[request("nope", None)], now());
        assert_eq!(unknown.state.as_deref(), Some("4"));
        assert_eq!(unknown.results[0].as_ref().unwrap_err().error_type, UNKNOWN_OPERATION_ERROR_TYPE);
    }
}
