//! The client: start instances, query them, raise events, and suspend, resume,
//! terminate, restart, rewind and purge them.
//!
//! Every operation is a store write or read; the worker does the rest. Bad requests
//! (unknown orchestrator, bad id, oversized payload, events for finished instances)
//! are refused before anything is written.

use std::sync::Arc;
use std::time::Duration;

use keel_core::history::{EventKind, HistoryEvent, RuntimeStatus, Timestamp};
use keel_core::limits;
use keel_store::{InstancePage, InstanceQuery, InstanceRecord, Message, NewInstance, PurgeFilter, Store};
use serde::Serialize;

use crate::clock::{Clock, SystemClock};
use crate::registry::Registry;

/// The state of an instance as the client reports it.
pub type InstanceStatus = InstanceRecord;

/// What can go wrong in a client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no instance with id '{0}'")]
    NotFound(String),
    #[error("an instance with id '{instance_id}' already exists and is {status}")]
    AlreadyExists { instance_id: String, status: RuntimeStatus },
    #[error("instance '{instance_id}' is {status}; {action} is not possible")]
    InvalidState { instance_id: String, status: RuntimeStatus, action: &'static str },
    #[error("no orchestrator named '{0}' is registered")]
    UnknownOrchestrator(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("instance '{instance_id}' did not {what} within {timeout:?}")]
    Timeout { instance_id: String, what: &'static str, timeout: Duration },
    #[error(transparent)]
    Store(keel_store::Error),
}

impl From<keel_store::Error> for ClientError {
    fn from(error: keel_store::Error) -> ClientError {
        match error {
            keel_store::Error::NotFound(id) => ClientError::NotFound(id),
            keel_store::Error::AlreadyExists { instance_id, status } => {
                ClientError::AlreadyExists { instance_id, status }
            }
            keel_store::Error::InvalidState { instance_id, status, action } => {
                ClientError::InvalidState { instance_id, status, action }
            }
            keel_store::Error::Invalid(message) => ClientError::Invalid(message),
            other => ClientError::Store(other),
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Options of [`Client::start_with`].
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// The instance id; a new random one when `None`. An id in use by a running
    /// instance is refused; a finished instance with that id is replaced.
    pub instance_id: Option<String>,
    /// Do not start before this time.
    pub scheduled_start: Option<Timestamp>,
    pub version: Option<String>,
}

/// How often a waiting client looks at the store even without a notification (changes
/// made by other processes).
const WAIT_FALLBACK_POLL: Duration = Duration::from_millis(500);

/// Drives instances on a task hub. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    store: Arc<dyn Store>,
    registry: Option<Arc<Registry>>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("registry", &self.registry).finish_non_exhaustive()
    }
}

impl Client {
    /// A client for any orchestrator name (it cannot check names: the functions live
    /// in workers elsewhere).
    pub fn new(store: Arc<dyn Store>) -> Client {
        Client { store, registry: None, clock: Arc::new(SystemClock) }
    }

    pub(crate) fn with_registry(store: Arc<dyn Store>, registry: Arc<Registry>, clock: Arc<dyn Clock>) -> Client {
        Client { store, registry: Some(registry), clock }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The orchestrators this client knows about (empty when it does not know).
    pub fn orchestrator_names(&self) -> Vec<String> {
        self.registry
            .as_ref()
            .map(|registry| registry.orchestrator_names().into_iter().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Starts an orchestration with a new random instance id; returns the id.
    pub async fn start_new(&self, name: &str, input: &impl Serialize) -> Result<String> {
        self.start_with(name, input, StartOptions::default()).await
    }

    /// Starts an orchestration; returns the instance id.
    pub async fn start_with(&self, name: &str, input: &impl Serialize, options: StartOptions) -> Result<String> {
        let input = serde_json::to_string(input).map_err(|error| ClientError::Invalid(error.to_string()))?;
        self.start_raw(name, Some(input), options).await
    }

    /// Starts an orchestration with input given as JSON text (checked to be JSON).
    pub async fn start_raw(&self, name: &str, input: Option<String>, options: StartOptions) -> Result<String> {
        limits::check_name("orchestrator", name).map_err(ClientError::Invalid)?;
        if let Some(registry) = &self.registry {
            if registry.orchestrator(name).is_none() {
                return Err(ClientError::UnknownOrchestrator(name.to_string()));
            }
        }
        if let Some(input) = &input {
            check_json("input", input)?;
        }
        limits::check_payload("input", input.as_deref()).map_err(ClientError::Invalid)?;
        let instance_id = options.instance_id.unwrap_or_else(new_instance_id);
        limits::check_instance_id(&instance_id).map_err(ClientError::Invalid)?;
        let created_at = self.clock.now();
        self.store
            .create_instance(NewInstance {
                instance_id: instance_id.clone(),
                execution_id: uuid::Uuid::new_v4().to_string(),
                name: name.to_string(),
                version: options.version,
                input,
                parent: None,
                scheduled_start: options.scheduled_start,
                created_at,
            })
            .await?;
        if let Some(at) = options.scheduled_start {
            self.store.notifications().orchestration_work_due(at);
        }
        tracing::debug!(%instance_id, function = name, "started");
        Ok(instance_id)
    }

    /// The instance's state, or `None` if there is no such instance.
    pub async fn get_status(&self, instance_id: &str) -> Result<Option<InstanceStatus>> {
        Ok(self.store.get_instance(instance_id).await?)
    }

    /// The history of the instance's current execution.
    pub async fn get_history(&self, instance_id: &str) -> Result<Vec<HistoryEvent>> {
        self.existing(instance_id).await?;
        Ok(self.store.read_history(instance_id).await?)
    }

    /// Waits until the instance has started (is no longer Pending).
    pub async fn wait_for_start(&self, instance_id: &str, timeout: Duration) -> Result<InstanceStatus> {
        self.wait_until(instance_id, timeout, "start", |status| status != RuntimeStatus::Pending).await
    }

    /// Waits until the instance is Completed, Failed, Terminated or Canceled.
    pub async fn wait_for_completion(&self, instance_id: &str, timeout: Duration) -> Result<InstanceStatus> {
        self.wait_until(instance_id, timeout, "complete", RuntimeStatus::is_terminal).await
    }

    async fn wait_until(
        &self,
        instance_id: &str,
        timeout: Duration,
        what: &'static str,
        done: impl Fn(RuntimeStatus) -> bool,
    ) -> Result<InstanceStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.store.notifications().subscribe_instance_changes();
        loop {
            changes.borrow_and_update();
            let status = self.existing(instance_id).await?;
            if done(status.status) {
                return Ok(status);
            }
            let wait = tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + WAIT_FALLBACK_POLL));
            tokio::select! {
                _ = changes.changed() => {}
                _ = wait => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ClientError::Timeout { instance_id: instance_id.to_string(), what, timeout });
                    }
                }
            }
        }
    }

    async fn existing(&self, instance_id: &str) -> Result<InstanceStatus> {
        self.store.get_instance(instance_id).await?.ok_or_else(|| ClientError::NotFound(instance_id.to_string()))
    }

    /// Raises an external event. Refused for unknown and finished instances.
    pub async fn raise_event(&self, instance_id: &str, event_name: &str, data: &impl Serialize) -> Result<()> {
        let data = serde_json::to_string(data).map_err(|error| ClientError::Invalid(error.to_string()))?;
        self.raise_event_raw(instance_id, event_name, Some(data)).await
    }

    /// Raises an external event with data given as JSON text (checked to be JSON).
    pub async fn raise_event_raw(&self, instance_id: &str, event_name: &str, data: Option<String>) -> Result<()> {
        limits::check_name("event", event_name).map_err(ClientError::Invalid)?;
        if let Some(data) = &data {
            check_json("event data", data)?;
        }
        limits::check_payload("event data", data.as_deref()).map_err(ClientError::Invalid)?;
        self.send(instance_id, EventKind::EventRaised { name: event_name.to_string(), input: data }, false).await?;
        Ok(())
    }

    /// Terminates a running, pending or suspended instance.
    pub async fn terminate(&self, instance_id: &str, reason: Option<&str>) -> Result<()> {
        let status = self.existing(instance_id).await?;
        refuse_if_terminal(&status, "terminating")?;
        self.send(instance_id, EventKind::ExecutionTerminated { reason: reason.map(str::to_string) }, false).await?;
        Ok(())
    }

    /// Suspends an instance: it takes no steps until resumed. A no-op if suspended.
    pub async fn suspend(&self, instance_id: &str, reason: Option<&str>) -> Result<()> {
        let status = self.existing(instance_id).await?;
        refuse_if_terminal(&status, "suspending")?;
        if status.status != RuntimeStatus::Suspended {
            self.send(instance_id, EventKind::ExecutionSuspended { reason: reason.map(str::to_string) }, false).await?;
        }
        Ok(())
    }

    /// Resumes a suspended instance. A no-op unless it is suspended.
    pub async fn resume(&self, instance_id: &str, reason: Option<&str>) -> Result<()> {
        let status = self.existing(instance_id).await?;
        refuse_if_terminal(&status, "resuming")?;
        if status.status == RuntimeStatus::Suspended {
            self.send(instance_id, EventKind::ExecutionResumed { reason: reason.map(str::to_string) }, false).await?;
        }
        Ok(())
    }

    /// Rewinds a failed instance: its failed activities and sub-orchestrations run
    /// again and it carries on from there.
    pub async fn rewind(&self, instance_id: &str, reason: Option<&str>) -> Result<()> {
        let status = self.existing(instance_id).await?;
        if status.status != RuntimeStatus::Failed {
            return Err(ClientError::InvalidState {
                instance_id: instance_id.to_string(),
                status: status.status,
                action: "rewinding (only failed instances can be rewound)",
            });
        }
        self.send(instance_id, EventKind::ExecutionRewound { reason: reason.map(str::to_string) }, true).await?;
        Ok(())
    }

    /// Starts a finished instance again with its original input; with
    /// `new_instance_id` under a new id (returned), else under the same id.
    pub async fn restart(&self, instance_id: &str, new_instance_id: bool) -> Result<String> {
        let status = self.existing(instance_id).await?;
        let options = StartOptions {
            instance_id: (!new_instance_id).then(|| instance_id.to_string()),
            scheduled_start: None,
            version: status.version.clone(),
        };
        self.start_raw(&status.name, status.input.clone(), options).await
    }

    /// Deletes a finished instance and its history. `false` if there was none.
    pub async fn purge(&self, instance_id: &str) -> Result<bool> {
        Ok(self.store.purge_instance(instance_id).await?)
    }

    /// Deletes the finished instances that match; returns how many.
    pub async fn purge_where(&self, filter: &PurgeFilter) -> Result<u64> {
        Ok(self.store.purge_instances(filter).await?)
    }

    /// One page of instances that match.
    pub async fn query(&self, query: &InstanceQuery) -> Result<InstancePage> {
        Ok(self.store.query_instances(query).await?)
    }

    async fn send(&self, instance_id: &str, kind: EventKind, accept_terminal: bool) -> Result<RuntimeStatus> {
        let now = self.clock.now();
        let message = Message {
            instance_id: instance_id.to_string(),
            execution_id: None,
            event: HistoryEvent::new(now, kind),
            visible_at: now,
        };
        Ok(self.store.enqueue_message(message, accept_terminal).await?)
    }
}

fn refuse_if_terminal(status: &InstanceStatus, action: &'static str) -> Result<()> {
    if status.status.is_terminal() {
        return Err(ClientError::InvalidState {
            instance_id: status.instance_id.clone(),
            status: status.status,
            action,
        });
    }
    Ok(())
}

fn check_json(what: &str, text: &str) -> Result<()> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(|_| ())
        .map_err(|error| ClientError::Invalid(format!("the {what} is not valid JSON: {error}")))
}

/// A new random instance id: 32 hex digits, as Durable Functions makes them.
pub fn new_instance_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
