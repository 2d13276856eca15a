//! The client: start instances, query them, raise events, and suspend, resume,
//! terminate, restart, rewind and purge them.
//!
//! Every operation is a store write or read; the worker does the rest. Bad requests
//! (unknown orchestrator, bad id, oversized payload, events for finished instances)
//! are refused before anything is written.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use std::marker::PhantomData;

use keel_core::entity::{EntityId, EntityScheduler};
use keel_core::handle::{Event, Orchestration};
use keel_core::history::FailureDetails;
use keel_core::history::{EventKind, HistoryEvent, RuntimeStatus, Timestamp};
use keel_core::limits;
use keel_store::{EntityQuery, InstancePage, InstanceQuery, InstanceRecord, Message, NewInstance, PurgeFilter, Store};
use serde::Serialize;

use crate::clock::{Clock, SystemClock};
use crate::registry::Registry;

/// The state of an instance as the client reports it.
pub type InstanceStatus = InstanceRecord;

/// What can go wrong in a client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No instance has this id.
    #[error("no instance with id '{0}'")]
    NotFound(String),
    /// The id is taken by an instance this start may not replace; nothing was written.
    #[error("an instance with id '{instance_id}' already exists and is {status}")]
    AlreadyExists {
        /// The id asked for.
        instance_id: String,
        /// The existing instance's status.
        status: RuntimeStatus,
    },
    /// The instance's status does not allow the operation (an event for a finished
    /// instance, a rewind of one that did not fail); nothing was written.
    #[error("instance '{instance_id}' is {status}; {action} is not possible")]
    InvalidState {
        /// The instance concerned.
        instance_id: String,
        /// Its status now.
        status: RuntimeStatus,
        /// What was refused, as a phrase for the message (`"terminating"`).
        action: &'static str,
    },
    /// The worker this client belongs to registers no orchestrator of this name.
    #[error("no orchestrator named '{0}' is registered")]
    UnknownOrchestrator(String),
    /// No worker can host an entity of this name: the client's worker registers none
    /// and hands no work to remote workers.
    #[error("no entity named '{0}' is registered")]
    UnknownEntity(String),
    /// The request breaks one of Keel's rules or limits (a bad id or name, a payload
    /// that is not JSON or too large); the message says which. Nothing was written.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A wait ran out of time; the instance carries on.
    #[error("instance '{instance_id}' did not {what} within {timeout:?}")]
    Timeout {
        /// The instance waited for.
        instance_id: String,
        /// What it did not do in time (`"start"`, `"complete"`).
        what: &'static str,
        /// How long the client waited.
        timeout: Duration,
    },
    /// The store failed; [`keel_store::Error::is_retryable`] says whether trying again
    /// may help.
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

/// The result of a client call.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Options of [`Client::start_with`].
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// The instance id; a new random one when `None`. An id in use by a running
    /// instance is refused; a finished instance with that id is replaced.
    pub instance_id: Option<String>,
    /// Do not start before this time.
    pub scheduled_start: Option<Timestamp>,
    /// The orchestration version the instance runs; `None`: the default version of the
    /// worker the client belongs to ([`crate::Versioning::default_version`]).
    pub version: Option<String>,
    /// Tags kept with the instance (the Durable Task protocol's orchestration tags).
    pub tags: BTreeMap<String, String>,
    /// Which statuses of an existing instance with the same id this start replaces.
    /// `None`: any finished one (Keel's default). A listed Pending, Running or Suspended
    /// instance is terminated and replaced in one store transaction (its parent hears
    /// that it was terminated, the entity locks it holds are released); an existing
    /// instance whose status is not listed is refused (`AlreadyExists`).
    pub replaceable: Option<Vec<RuntimeStatus>>,
    /// The trace context of the request that starts the instance (W3C `traceparent`):
    /// the instance's spans join that trace (see [`crate::telemetry`]).
    pub trace: Option<keel_core::trace::TraceContext>,
}

/// How often a replacing start reads an instance that keeps changing under it again.
const REPLACE_ATTEMPTS: usize = 5;

/// How often a waiting client looks at the store even without a notification (changes
/// made by other processes).
const WAIT_FALLBACK_POLL: Duration = Duration::from_millis(500);

/// Drives instances on a task hub. Cheap to clone.
///
/// [`Client::start`] takes an orchestration's handle and its input type and gives an
/// [`Instance`] that knows the output type; [`Instance::wait`] gives the
/// [`Outcome`]. Events are raised through their handles too ([`Client::raise`]).
///
/// ```
/// use std::time::Duration;
/// use keel::{Event, OrchestrationContext, OrchestrationError, Orchestration, Outcome, Worker};
///
/// const APPROVAL_WORKFLOW: Orchestration<String, String> = Orchestration::new("ApprovalWorkflow");
/// const APPROVAL: Event<bool> = Event::new("Approval");
///
/// async fn approval(ctx: OrchestrationContext, request: String) -> Result<String, OrchestrationError> {
///     Ok(match ctx.wait(APPROVAL).timeout(Duration::from_secs(3600)).await? {
///         Some(true) => format!("{request}: approved"),
///         Some(false) => format!("{request}: rejected"),
///         None => format!("{request}: nobody answered"),
///     })
/// }
///
/// # #[tokio::main]
/// # async fn main() -> anyhow::Result<()> {
/// let dir = tempfile::tempdir()?;
/// let store = keel::store::open(&format!("sqlite://{}", dir.path().join("hub.db").display())).await?;
/// let worker = Worker::builder(store).orchestration(APPROVAL_WORKFLOW, approval).build().start();
/// let client = worker.client();
///
/// let instance = client.start(APPROVAL_WORKFLOW, &"new laptop".to_string()).await?;
/// client.raise(instance.id(), APPROVAL, &true).await?;
/// let outcome = instance.wait(Duration::from_secs(30)).await?;
/// assert_eq!(outcome, Outcome::Completed("new laptop: approved".to_string()));
///
/// worker.shutdown(Duration::from_secs(5)).await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    store: Arc<dyn Store>,
    registry: Option<Arc<Registry>>,
    /// Entities the registry does not have may be hosted by remote workers.
    remote_workers: bool,
    /// The version of instances started without one.
    default_version: Option<String>,
    clock: Arc<dyn Clock>,
    /// The metrics of the worker this client came from.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// An entity as the client sees it: its last committed state and its scheduler.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityMetadata {
    /// The entity's name and key.
    pub id: EntityId,
    /// The state as JSON; `None` when the entity has none (never set, or deleted).
    pub state: Option<String>,
    /// The time of its last batch.
    pub last_modified: Timestamp,
    /// The orchestration whose critical section holds the entity's lock.
    pub locked_by: Option<String>,
    /// Messages waiting for the lock.
    pub backlog: usize,
}

impl EntityMetadata {
    /// An entity exists while it has a state.
    pub fn exists(&self) -> bool {
        self.state.is_some()
    }

    /// The state, deserialized (`null` when there is none).
    pub fn state_as<T: serde::de::DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(self.state.as_deref().unwrap_or("null"))
    }

    fn from_record(record: InstanceRecord) -> Result<EntityMetadata> {
        let id = EntityId::parse(&record.instance_id)
            .map_err(|message| ClientError::Store(keel_store::stored::corrupt(message)))?;
        let scheduler = EntityScheduler::from_json(record.input.as_deref())
            .map_err(|message| ClientError::Store(keel_store::stored::corrupt(message)))?;
        Ok(EntityMetadata {
            id,
            state: record.output,
            last_modified: record.last_updated_at,
            locked_by: scheduler.lock.map(|holder| holder.owner_instance_id),
            backlog: scheduler.queue.len(),
        })
    }
}

/// How an instance ended, with its output typed.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome<O> {
    /// The orchestrator returned this output.
    Completed(O),
    /// The orchestration failed; the details say why.
    Failed(FailureDetails),
    /// A client terminated the instance; the reason, when it was given as text.
    Terminated(Option<String>),
    /// A DTFx status Keel never sets; kept so that every status has an outcome.
    Canceled,
}

/// A typed handle of an orchestration instance: its id and what its output is.
#[derive(Clone, Debug)]
pub struct Instance<O> {
    client: Client,
    instance_id: String,
    _output: PhantomData<fn() -> O>,
}

impl<O: serde::de::DeserializeOwned> Instance<O> {
    /// The instance's id.
    pub fn id(&self) -> &str {
        &self.instance_id
    }

    /// Waits at most `timeout` for the instance to end; its outcome.
    pub async fn wait(&self, timeout: Duration) -> Result<Outcome<O>> {
        let status = self.client.wait_for_completion(&self.instance_id, timeout).await?;
        self.outcome_of(status).map(|outcome| outcome.expect("a finished instance has an outcome"))
    }

    /// The instance's status now, with its outcome once it ended.
    pub async fn status(&self) -> Result<InstanceState<O>> {
        let record = self.client.existing(&self.instance_id).await?;
        let custom_status = record
            .custom_status
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|error| ClientError::Invalid(format!("the custom status is not JSON: {error}")))?;
        Ok(InstanceState {
            runtime_status: record.status,
            name: record.name.clone(),
            created_at: record.created_at,
            last_updated_at: record.last_updated_at,
            custom_status,
            outcome: self.outcome_of(record)?,
        })
    }

    fn outcome_of(&self, record: InstanceRecord) -> Result<Option<Outcome<O>>> {
        Ok(Some(match record.status {
            RuntimeStatus::Completed => Outcome::Completed(record.output_as().map_err(|error| {
                ClientError::Invalid(format!("the output of '{}' does not fit its type: {error}", self.instance_id))
            })?),
            RuntimeStatus::Failed => Outcome::Failed(
                record
                    .failure
                    .unwrap_or_else(|| FailureDetails::new("Unknown", "the instance failed without failure details")),
            ),
            RuntimeStatus::Terminated => Outcome::Terminated(record.output_as::<Option<String>>().ok().flatten()),
            RuntimeStatus::Canceled => Outcome::Canceled,
            _ => return Ok(None),
        }))
    }
}

/// An instance's state as [`Instance::status`] reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceState<O> {
    /// Where the instance stands.
    pub runtime_status: RuntimeStatus,
    /// The orchestration's name.
    pub name: String,
    /// When the instance was created.
    pub created_at: Timestamp,
    /// When its state last changed.
    pub last_updated_at: Timestamp,
    /// The custom status the orchestrator last set.
    pub custom_status: Option<serde_json::Value>,
    /// Set once the instance ended.
    pub outcome: Option<Outcome<O>>,
}

/// One page of an entity query.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityPage {
    /// The matches, ordered by instance id.
    pub entities: Vec<EntityMetadata>,
    /// Present when there may be more results.
    pub continuation: Option<String>,
}

/// What [`Client::clean_entity_storage`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntityStorageCleaned {
    /// Entity rows deleted because they held nothing (no state, no lock, no waiting
    /// message).
    pub empty_entities_removed: u64,
    /// Locks released because the orchestration holding them is gone or finished.
    pub orphaned_locks_released: u64,
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
        Client {
            store,
            registry: None,
            remote_workers: false,
            default_version: None,
            clock: Arc::new(SystemClock),
            metrics: None,
        }
    }

    pub(crate) fn with_registry(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        remote_workers: bool,
        default_version: Option<String>,
        clock: Arc<dyn Clock>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Client {
        Client { store, registry: Some(registry), remote_workers, default_version, clock, metrics: Some(metrics) }
    }

    /// The metrics of the worker this client came from ([`crate::Worker::client`]);
    /// `None` for a client made with [`Client::new`].
    pub fn metrics(&self) -> Option<&Arc<crate::metrics::Metrics>> {
        self.metrics.as_ref()
    }

    /// The task hub this client works on.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The activities of the worker this client came from (none for a client made with
    /// [`Client::new`]).
    pub fn activity_names(&self) -> Vec<String> {
        self.registry
            .as_ref()
            .map(|registry| registry.activity_names().into_iter().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// The orchestrators this client knows about (empty when it does not know).
    pub fn orchestrator_names(&self) -> Vec<String> {
        self.registry
            .as_ref()
            .map(|registry| registry.orchestrator_names().into_iter().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Starts the orchestration of `handle` with a new random instance id; returns the
    /// typed handle of the instance.
    pub async fn start<I: Serialize, O>(&self, handle: Orchestration<I, O>, input: &I) -> Result<Instance<O>> {
        self.start_with_options(handle, input, StartOptions::default()).await
    }

    /// Starts the orchestration of `handle` with options (instance id, scheduled start).
    pub async fn start_with_options<I: Serialize, O>(
        &self,
        handle: Orchestration<I, O>,
        input: &I,
        options: StartOptions,
    ) -> Result<Instance<O>> {
        let instance_id = self.start_with(handle.name(), input, options).await?;
        Ok(self.instance(handle, &instance_id))
    }

    /// The typed handle of an existing instance of the orchestration `handle`.
    pub fn instance<I, O>(&self, _handle: Orchestration<I, O>, instance_id: &str) -> Instance<O> {
        Instance { client: self.clone(), instance_id: instance_id.to_string(), _output: PhantomData }
    }

    /// Raises the event `event` on an instance; its data type is the handle's.
    pub async fn raise<T: Serialize>(&self, instance_id: &str, event: Event<T>, data: &T) -> Result<()> {
        self.raise_event(instance_id, event.name(), data).await
    }

    /// Starts an orchestration by name (the escape hatch for orchestrations hosted by
    /// SDK workers) with a new random instance id; returns the id.
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
            if !registry.hosts_orchestrator(name) {
                return Err(ClientError::UnknownOrchestrator(name.to_string()));
            }
        }
        if let Some(input) = &input {
            check_json("input", input)?;
        }
        limits::check_payload("input", input.as_deref()).map_err(ClientError::Invalid)?;
        let instance_id = options.instance_id.unwrap_or_else(new_instance_id);
        limits::check_instance_id(&instance_id).map_err(ClientError::Invalid)?;
        if let Some(version) = options.version.as_deref().or(self.default_version.as_deref()) {
            limits::check_name("version", version).map_err(ClientError::Invalid)?;
        }
        refuse_entity_id(&instance_id)?;
        let created_at = self.clock.now();
        let version = options.version.or_else(|| self.default_version.clone());
        let start_trace = crate::telemetry::StartTrace::plan(options.trace);
        let traced_version = version.clone();
        let instance = NewInstance {
            instance_id: instance_id.clone(),
            execution_id: uuid::Uuid::new_v4().simple().to_string(),
            name: name.to_string(),
            version,
            input,
            parent: None,
            scheduled_start: options.scheduled_start,
            created_at,
            tags: options.tags,
            trace: start_trace.context(),
        };
        match &options.replaceable {
            None => self.store.create_instance(instance).await?,
            Some(replaceable) => self.create_replacing(instance, replaceable).await?,
        }
        start_trace.emit(name, &instance_id, traced_version.as_deref());
        if let Some(at) = options.scheduled_start {
            self.store.notifications().orchestration_work_due(at);
        }
        tracing::debug!(%instance_id, function = name, "started");
        Ok(instance_id)
    }

    /// Creates `instance`, replacing an existing instance with its id whose status is
    /// one of `replaceable` (terminating it if it has not finished), atomically.
    async fn create_replacing(&self, instance: NewInstance, replaceable: &[RuntimeStatus]) -> Result<()> {
        for _ in 0..REPLACE_ATTEMPTS {
            let Some(existing) = self.store.get_instance(&instance.instance_id).await? else {
                match self.store.create_instance(instance.clone()).await {
                    Err(keel_store::Error::AlreadyExists { .. }) => continue, // created meanwhile
                    created => return Ok(created?),
                }
            };
            if !replaceable.contains(&existing.status) {
                return Err(ClientError::AlreadyExists { instance_id: existing.instance_id, status: existing.status });
            }
            let notices = if existing.status.is_terminal() {
                Vec::new()
            } else {
                let history = self.store.read_history(&existing.instance_id).await?;
                crate::episode::termination_notices(&existing, &history, self.clock.now())
            };
            match self.store.replace_instance(instance.clone(), &existing, notices).await {
                Err(keel_store::Error::InvalidState { .. }) => continue, // it changed meanwhile
                replaced => return Ok(replaced?),
            }
        }
        Err(ClientError::Store(keel_store::Error::Backend {
            message: format!("instance '{}' kept changing while it was being replaced", instance.instance_id),
            retryable: true,
        }))
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
        // A timeout too long to add to the clock waits without a deadline.
        let deadline = tokio::time::Instant::now().checked_add(timeout);
        let mut changes = self.store.notifications().subscribe_instance_changes();
        loop {
            changes.borrow_and_update();
            let status = self.existing(instance_id).await?;
            if done(status.status) {
                return Ok(status);
            }
            let next_poll = tokio::time::Instant::now() + WAIT_FALLBACK_POLL;
            let wait = tokio::time::sleep_until(deadline.map_or(next_poll, |deadline| deadline.min(next_poll)));
            tokio::select! {
                _ = changes.changed() => {}
                _ = wait => {
                    if deadline.is_some_and(|deadline| tokio::time::Instant::now() >= deadline) {
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

    /// Terminates a running, pending or suspended instance; its output is `reason` (a
    /// JSON string).
    pub async fn terminate(&self, instance_id: &str, reason: Option<&str>) -> Result<()> {
        let output = reason.map(|reason| serde_json::to_string(reason).expect("a string always serializes"));
        self.terminate_raw(instance_id, output).await
    }

    /// Terminates an instance with an output given as JSON text (checked to be JSON),
    /// which becomes its output unchanged.
    pub async fn terminate_raw(&self, instance_id: &str, output: Option<String>) -> Result<()> {
        if let Some(output) = &output {
            check_json("termination output", output)?;
        }
        limits::check_payload("termination output", output.as_deref()).map_err(ClientError::Invalid)?;
        let status = self.existing(instance_id).await?;
        refuse_if_terminal(&status, "terminating")?;
        self.send(instance_id, EventKind::ExecutionTerminated { reason: output }, false).await?;
        Ok(())
    }

    /// Suspends an instance: it takes no steps until resumed. Suspending a suspended
    /// instance changes nothing. Like every accepted command, it takes effect in the
    /// order it was accepted, whatever state the instance is in until then.
    pub async fn suspend(&self, instance_id: &str, reason: Option<&str>) -> Result<()> {
        let status = self.existing(instance_id).await?;
        refuse_if_terminal(&status, "suspending")?;
        self.send(instance_id, EventKind::ExecutionSuspended { reason: reason.map(str::to_string) }, false).await?;
        Ok(())
    }

    /// Resumes a suspended instance. Resuming an instance that is not suspended (once
    /// the commands before it took effect) changes nothing.
    pub async fn resume(&self, instance_id: &str, reason: Option<&str>) -> Result<()> {
        let status = self.existing(instance_id).await?;
        refuse_if_terminal(&status, "resuming")?;
        self.send(instance_id, EventKind::ExecutionResumed { reason: reason.map(str::to_string) }, false).await?;
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

    /// Starts an instance again with its original input (and tags): with
    /// `new_instance_id` under a new id (returned), leaving the old one alone, else under
    /// the same id, which only a finished instance allows.
    pub async fn restart(&self, instance_id: &str, new_instance_id: bool) -> Result<String> {
        let status = self.existing(instance_id).await?;
        let options = StartOptions {
            instance_id: (!new_instance_id).then(|| instance_id.to_string()),
            version: status.version.clone(),
            tags: status.tags.clone(),
            ..StartOptions::default()
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

    /// The entities this client knows about (empty when it does not know).
    pub fn entity_names(&self) -> Vec<String> {
        self.registry
            .as_ref()
            .map(|registry| registry.entity_names().into_iter().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Signals an operation on an entity (created by its first operation). Refused for
    /// an entity this client knows nobody hosts.
    pub async fn signal_entity(&self, entity: &EntityId, operation: &str, input: &impl Serialize) -> Result<()> {
        let input = serde_json::to_string(input).map_err(|error| ClientError::Invalid(error.to_string()))?;
        self.signal_entity_raw(entity, operation, Some(input), None).await
    }

    /// Like [`Client::signal_entity`], delivered at `at`.
    pub async fn signal_entity_at(
        &self,
        entity: &EntityId,
        operation: &str,
        input: &impl Serialize,
        at: Timestamp,
    ) -> Result<()> {
        let input = serde_json::to_string(input).map_err(|error| ClientError::Invalid(error.to_string()))?;
        self.signal_entity_raw(entity, operation, Some(input), Some(at)).await
    }

    /// Signals an operation with input given as JSON text (checked to be JSON),
    /// delivered at `scheduled_time` or at once.
    pub async fn signal_entity_raw(
        &self,
        entity: &EntityId,
        operation: &str,
        input: Option<String>,
        scheduled_time: Option<Timestamp>,
    ) -> Result<()> {
        self.signal_entity_traced(entity, operation, input, scheduled_time, None).await
    }

    /// [`Client::signal_entity_raw`] from a request that carried the W3C trace context
    /// `trace`: the operation's span joins that trace.
    pub async fn signal_entity_traced(
        &self,
        entity: &EntityId,
        operation: &str,
        input: Option<String>,
        scheduled_time: Option<Timestamp>,
        trace: Option<keel_core::trace::TraceContext>,
    ) -> Result<()> {
        self.check_entity_name(&entity.name)?;
        limits::check_name("operation", operation).map_err(ClientError::Invalid)?;
        if let Some(input) = &input {
            check_json("operation input", input)?;
        }
        limits::check_payload("operation input", input.as_deref()).map_err(ClientError::Invalid)?;
        let now = self.clock.now();
        let target = entity.instance_id();
        let kind = EventKind::EntityOperationSignaled {
            request_id: uuid::Uuid::new_v4().to_string(),
            operation: operation.to_string(),
            input,
            scheduled_time,
            target_instance_id: target.clone(),
            trace,
        };
        let visible_at = scheduled_time.unwrap_or(now).max(now);
        let message =
            Message { instance_id: target, execution_id: None, event: HistoryEvent::new(now, kind), visible_at };
        self.store.enqueue_message(message, false).await?;
        if visible_at > now {
            self.store.notifications().orchestration_work_due(visible_at);
        }
        Ok(())
    }

    /// An entity's last committed state and scheduler; `None` if it was never
    /// signalled (or was removed by [`Client::clean_entity_storage`]).
    pub async fn get_entity(&self, entity: &EntityId) -> Result<Option<EntityMetadata>> {
        self.store.get_instance(&entity.instance_id()).await?.map(EntityMetadata::from_record).transpose()
    }

    /// One page of entities that match.
    pub async fn query_entities(&self, query: &EntityQuery) -> Result<EntityPage> {
        let page = self.store.query_entities(query).await?;
        let entities = page.instances.into_iter().map(EntityMetadata::from_record).collect::<Result<Vec<_>>>()?;
        Ok(EntityPage { entities, continuation: page.continuation })
    }

    /// Removes entities that hold nothing (no state, no lock, nothing waiting) and
    /// releases locks whose owner orchestration is gone or finished.
    pub async fn clean_entity_storage(
        &self,
        remove_empty_entities: bool,
        release_orphaned_locks: bool,
    ) -> Result<EntityStorageCleaned> {
        let mut cleaned = EntityStorageCleaned::default();
        let mut query = EntityQuery { include_transient: true, ..EntityQuery::default() };
        loop {
            let page = self.store.query_entities(&query).await?;
            for record in &page.instances {
                let scheduler = EntityScheduler::from_json(record.input.as_deref())
                    .map_err(|message| ClientError::Store(keel_store::stored::corrupt(message)))?;
                match scheduler.lock {
                    Some(holder) if release_orphaned_locks => {
                        let owner = self.store.get_instance(&holder.owner_instance_id).await?;
                        if owner.is_none_or(|owner| owner.status.is_terminal()) {
                            let kind = EventKind::EntityUnlockSent {
                                critical_section_id: holder.critical_section_id,
                                parent_instance_id: holder.owner_instance_id,
                                target_instance_id: record.instance_id.clone(),
                            };
                            self.send(&record.instance_id, kind, false).await?;
                            cleaned.orphaned_locks_released += 1;
                        }
                    }
                    None if remove_empty_entities && record.output.is_none() && scheduler.queue.is_empty() => {
                        let removed = self.store.remove_empty_entity(&record.instance_id, self.clock.now()).await?;
                        cleaned.empty_entities_removed += u64::from(removed);
                    }
                    _ => {}
                }
            }
            match page.continuation {
                Some(token) => query.continuation = Some(token),
                None => return Ok(cleaned),
            }
        }
    }

    fn check_entity_name(&self, name: &str) -> Result<()> {
        match &self.registry {
            Some(registry) if !self.remote_workers && registry.entity(name).is_none() => {
                Err(ClientError::UnknownEntity(name.to_string()))
            }
            _ => Ok(()),
        }
    }

    async fn send(&self, instance_id: &str, kind: EventKind, accept_terminal: bool) -> Result<RuntimeStatus> {
        let is_entity_message =
            matches!(kind, EventKind::EntityOperationSignaled { .. } | EventKind::EntityUnlockSent { .. });
        if !is_entity_message {
            refuse_entity_id(instance_id)?;
        }
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

/// Orchestration management is not for entities (their ids start with `@`).
fn refuse_entity_id(instance_id: &str) -> Result<()> {
    if keel_core::entity::is_entity_instance_id(instance_id) {
        return Err(ClientError::Invalid(format!(
            "'{instance_id}' names an entity (ids starting with '@' are reserved for entities)"
        )));
    }
    Ok(())
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

/// Checks that a payload from a client is JSON within [`limits::MAX_JSON_DEPTH`].
fn check_json(what: &str, text: &str) -> Result<()> {
    limits::check_json_depth(&format!("the {what}"), text).map_err(ClientError::Invalid)?;
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(|_| ())
        .map_err(|error| ClientError::Invalid(format!("the {what} is not valid JSON: {error}")))
}

/// A new random instance id: 32 hex digits, as Durable Functions makes them.
pub fn new_instance_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
