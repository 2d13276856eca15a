//! The task-hub persistence contract.
//!
//! A task hub holds, for every instance, one row of state ([`InstanceRecord`]), the
//! history of its current execution, an inbox of [`Message`]s (events that have not
//! been processed yet, timers included: a timer is a `TimerFired` message that becomes
//! visible at its fire time) and the activity work items it scheduled.
//!
//! Workers take work with a lease: [`Store::fetch_orchestration_items`] locks whole
//! instances (one worker at a time per instance), [`Store::fetch_activity_items`]
//! leases single activity items. Everything one episode decides is committed by
//! [`Store::commit_episodes`] in one transaction: new history, consumed messages,
//! instance state, new activity items, outgoing messages and new sub-orchestration
//! instances. A commit whose lease was taken over by another worker fails with
//! [`Error::LeaseLost`] and changes nothing.
//!
//! Durable entities live in the same tables: an entity is an instance whose id is
//! `@{name}@{key}` ([`keel_core::entity::EntityId`]). A message to an entity that has no
//! row creates it (status `Running`, the entity's name, an empty execution id, no
//! history), so entities come into being with their first operation. An entity row
//! keeps the entity's state in `output` and its scheduler (lock holder, waiting
//! messages) in `input`; its `last_updated_at` is the time of its last batch. Instance
//! queries leave entities out; [`Store::query_entities`] lists them.
//!
//! Every backend must pass the suite in the module `conformance` (feature
//! `conformance`).

#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::history::{FailureDetails, HistoryEvent, ParentInstance, RuntimeStatus, Timestamp};

#[cfg(feature = "conformance")]
pub mod conformance;
mod notifications;
pub mod stored;

pub use notifications::Notifications;

/// What can go wrong in a store operation.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// No instance has this id.
    #[error("no instance with id '{0}'")]
    NotFound(String),
    /// The id is taken by an instance that is not terminal; nothing was written.
    #[error("an instance with id '{instance_id}' already exists and is {status}")]
    AlreadyExists {
        /// The id asked for.
        instance_id: String,
        /// The existing instance's status.
        status: RuntimeStatus,
    },
    /// The instance's status (or, for a replacement, its state as read) does not allow
    /// the operation; nothing was written.
    #[error("instance '{instance_id}' is {status}; {action} is not possible")]
    InvalidState {
        /// The instance concerned.
        instance_id: String,
        /// Its status now.
        status: RuntimeStatus,
        /// What was refused, as a phrase for the message (`"delivering an event"`).
        action: &'static str,
    },
    /// The lease was taken over by another worker (or the lock's token is unknown);
    /// nothing was changed.
    #[error("the lease was lost: another worker took over the work item")]
    LeaseLost,
    /// The request breaks one of Keel's rules or limits; the message says which.
    /// Nothing was written.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The database failed, or holds data this code cannot decode.
    #[error("store error: {message}")]
    Backend {
        /// What the backend reported.
        message: String,
        /// Whether the same operation may succeed if tried again ([`Error::is_retryable`]).
        retryable: bool,
    },
}

impl Error {
    /// True when the same operation may succeed if tried again (a busy database, a
    /// dropped connection).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Backend { retryable: true, .. })
    }
}

/// The result of a store operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A new instance: its row (status `Pending`) and the `ExecutionStarted` message that
/// starts it, visible at `scheduled_start` (or at once).
#[derive(Clone, Debug, PartialEq)]
pub struct NewInstance {
    /// The instance's id (see [`keel_core::limits::check_instance_id`]).
    pub instance_id: String,
    /// The id of its first execution.
    pub execution_id: String,
    /// The orchestrator to run, as registered.
    pub name: String,
    /// The orchestration version it runs; `None` when unversioned.
    pub version: Option<String>,
    /// The orchestrator's input, JSON text.
    pub input: Option<String>,
    /// The parent orchestration, for a sub-orchestration.
    pub parent: Option<ParentInstance>,
    /// The instance does not start before this time; `None` for at once.
    pub scheduled_start: Option<Timestamp>,
    /// When it was created: the row's creation time and the start message's timestamp.
    pub created_at: Timestamp,
    /// The instance's tags (the Durable Task protocol's orchestration tags), kept as
    /// given for its whole life, continue-as-new included.
    pub tags: BTreeMap<String, String>,
    /// The trace context its execution's span hangs under (kept in its `ExecutionStarted`).
    pub trace: Option<keel_core::trace::TraceContext>,
}

impl NewInstance {
    /// Checks the id, the name, the input and the tags against Keel's limits; every
    /// backend calls this before it writes anything.
    pub fn check(&self) -> Result<()> {
        keel_core::limits::check_instance_id(&self.instance_id)
            .and_then(|()| keel_core::limits::check_name("orchestrator", &self.name))
            .and_then(|()| {
                self.version.as_deref().map_or(Ok(()), |version| keel_core::limits::check_name("version", version))
            })
            .and_then(|()| keel_core::limits::check_payload("input", self.input.as_deref()))
            .and_then(|()| keel_core::limits::check_payload("tags", stored::tags_to_json(&self.tags).as_deref()))
            .map_err(Error::Invalid)
    }

    /// The `ExecutionStarted` event that starts this instance.
    pub fn execution_started_event(&self) -> HistoryEvent {
        HistoryEvent::new(
            self.created_at,
            keel_core::history::EventKind::ExecutionStarted {
                name: self.name.clone(),
                version: self.version.clone(),
                input: self.input.clone(),
                execution_id: self.execution_id.clone(),
                parent: self.parent.clone(),
                scheduled_start: self.scheduled_start,
                trace: self.trace.clone(),
            },
        )
    }
}

/// An event on its way to an instance's inbox.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// The instance whose inbox receives it.
    pub instance_id: String,
    /// When set, the message belongs to that execution only (activity results, timers);
    /// the runtime drops it if the instance has moved on to another execution.
    pub execution_id: Option<String>,
    /// The event to deliver.
    pub event: HistoryEvent,
    /// The message is not delivered before this time (timers, scheduled starts).
    pub visible_at: Timestamp,
}

impl Message {
    /// Checks the event's payload against Keel's limits; every backend calls this
    /// before it writes anything.
    pub fn check(&self) -> Result<()> {
        keel_core::limits::check_payload("event data", self.event.kind.payload()).map_err(Error::Invalid)
    }
}

/// A message in an inbox, with the id the store gave it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredMessage {
    /// Unique in the task hub; [`EpisodeCommit::consumed`] names messages by it.
    pub id: i64,
    /// The message as it was written.
    pub message: Message,
}

/// The state row of an instance.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceRecord {
    /// The instance's id (`@{name}@{key}` for an entity).
    pub instance_id: String,
    /// The orchestrator it runs (for an entity: the entity's name).
    pub name: String,
    /// The orchestration version it runs; `None` when unversioned.
    pub version: Option<String>,
    /// The current execution (a new one starts with every continue-as-new).
    pub execution_id: String,
    /// Where the instance stands.
    pub status: RuntimeStatus,
    /// The current execution's input, JSON text (for an entity: its scheduler).
    pub input: Option<String>,
    /// The output, JSON text: the orchestrator's once completed, the termination's
    /// once terminated (for an entity: its state).
    pub output: Option<String>,
    /// The custom status the orchestrator last set, JSON text.
    pub custom_status: Option<String>,
    /// Why it failed: set while the status is `Failed`, and kept while a rewind is
    /// pending.
    pub failure: Option<FailureDetails>,
    /// The parent orchestration, for a sub-orchestration.
    pub parent: Option<ParentInstance>,
    /// The instance does not start before this time.
    pub scheduled_start: Option<Timestamp>,
    /// When the instance was created.
    pub created_at: Timestamp,
    /// When the row last changed (for an entity: its last batch).
    pub last_updated_at: Timestamp,
    /// When it reached a terminal status; `None` while it is not terminal.
    pub completed_at: Option<Timestamp>,
    /// Number of events in the current execution's history.
    pub history_len: u64,
    /// The tags it was created with.
    pub tags: BTreeMap<String, String>,
}

impl InstanceRecord {
    /// The output, deserialized (`null` when there is none).
    pub fn output_as<T: serde::de::DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(self.output.as_deref().unwrap_or("null"))
    }

    /// The input, deserialized (`null` when there is none).
    pub fn input_as<T: serde::de::DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(self.input.as_deref().unwrap_or("null"))
    }
}

/// Proof that a worker holds an instance; needed to commit or abandon its episode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrchestrationLock {
    /// The locked instance.
    pub instance_id: String,
    /// Unique per fetch: a commit with a stale token fails with [`Error::LeaseLost`].
    pub token: String,
}

/// An instance locked for one episode, with the messages to process.
#[derive(Clone, Debug)]
pub struct OrchestrationItem {
    /// The lock; needed to commit, abandon or renew.
    pub lock: OrchestrationLock,
    /// The instance's row as it was when locked.
    pub instance: InstanceRecord,
    /// Visible messages in the order they arrived.
    pub messages: Vec<StoredMessage>,
    /// How many times the instance was locked since its last commit, this time included.
    pub delivery_attempts: u32,
}

/// New values of an instance's state row after an episode.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceUpdate {
    /// The instance's new status.
    pub status: RuntimeStatus,
    /// The orchestration version from now on (a continue-as-new may change it).
    pub version: Option<String>,
    /// The current execution's input, JSON text (for an entity: its scheduler).
    pub input: Option<String>,
    /// The output, JSON text (for an entity: its state).
    pub output: Option<String>,
    /// Why it failed; set when the status is `Failed`.
    pub failure: Option<FailureDetails>,
    /// The custom status, JSON text.
    pub custom_status: Option<String>,
}

/// An activity to run.
#[derive(Clone, Debug, PartialEq)]
pub struct NewActivity {
    /// The orchestration that scheduled it; the result goes to its inbox.
    pub instance_id: String,
    /// The execution that scheduled it; its result is for that execution only.
    pub execution_id: String,
    /// Sequence number of the `TaskScheduled` event; the result names it.
    pub task_id: i32,
    /// The activity to run, as registered.
    pub name: String,
    /// The activity's input, JSON text.
    pub input: Option<String>,
    /// The trace context the activity's span hangs under.
    pub trace: Option<keel_core::trace::TraceContext>,
    /// Set when the committing worker runs the item itself at once: the item is created
    /// leased to it (delivery attempt 1) instead of waiting to be fetched. Only for a
    /// store whose [`Store::direct_episodes`] is true.
    pub lease: Option<ActivityLease>,
}

impl NewActivity {
    /// Leases the item to its committing worker under `token` until `until`
    /// ([`NewActivity::lease`]); returns the item the worker runs once the commit is
    /// durable, its id still 0 (the store's answer, [`Committed::leased_activity_ids`],
    /// gives it).
    pub fn lease_to_committer(&mut self, token: String, until: Timestamp) -> ActivityItem {
        self.lease = Some(ActivityLease { token: token.clone(), until });
        ActivityItem {
            lock: ActivityLock { id: 0, token },
            instance_id: self.instance_id.clone(),
            execution_id: self.execution_id.clone(),
            task_id: self.task_id,
            name: self.name.clone(),
            input: self.input.clone(),
            delivery_attempts: 1,
            trace: self.trace.clone(),
        }
    }
}

/// The lease an activity item is created with ([`NewActivity::lease`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivityLease {
    /// The lease's token, chosen by the worker (unique: 128 random bits).
    pub token: String,
    /// When the lease runs out unless renewed.
    pub until: Timestamp,
}

/// How an episode that was not fetched claims its instance: a worker that ran an
/// activity of an instance whose execution it holds in memory plays the next episode
/// at once with the result, and commits it here in place of delivering the result to
/// the inbox. The commit takes effect only if the instance is as the worker last left
/// it: not locked (or its lease ran out), at `execution_id` with `history_len` events and
/// `status`, with no visible message in its inbox, and each of `completed` still leased
/// with that lock. Otherwise it fails with [`Error::LeaseLost`] and writes nothing (the
/// worker then delivers the results as usual).
#[derive(Clone, Debug, PartialEq)]
pub struct DirectClaim {
    /// The execution the worker holds.
    pub execution_id: String,
    /// The history's length the worker holds.
    pub history_len: u64,
    /// The instance's status the worker holds.
    pub status: RuntimeStatus,
    /// The activity items whose results this episode's history records (instead of
    /// inbox messages): deleted by the commit.
    pub completed: Vec<ActivityLock>,
}

/// What a committed episode gives its worker back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// The store ids of the activity items the commit created leased
    /// ([`NewActivity::lease`]), in the order of [`EpisodeCommit::activities`].
    pub leased_activity_ids: Vec<i64>,
}

/// Everything one episode of one instance decided, committed atomically.
#[derive(Clone, Debug)]
pub struct EpisodeCommit {
    /// The instance's lock, from its [`OrchestrationItem`]; for a direct episode only its
    /// instance id counts (see `direct`).
    pub lock: OrchestrationLock,
    /// Set for an episode run without fetching the instance: what the commit checks
    /// instead of the lock's token. Only for a store whose [`Store::direct_episodes`] is
    /// true.
    pub direct: Option<DirectClaim>,
    /// Ids of the inbox messages this episode processed (they are deleted).
    pub consumed: Vec<i64>,
    /// When set, the current history is dropped and `history` is the whole history of
    /// this (new) execution id: continue-as-new, rewind.
    pub replace_history: Option<String>,
    /// Events appended to the history (or the whole history, see `replace_history`).
    pub history: Vec<HistoryEvent>,
    /// New state of the instance row; `None` leaves it as it is.
    pub state: Option<InstanceUpdate>,
    /// Activity items to create.
    pub activities: Vec<NewActivity>,
    /// Messages to any instance, this one included (timers). Messages to orchestration
    /// instances that do not exist are dropped; messages to entities create them.
    pub messages: Vec<Message>,
    /// Sub-orchestrations to create. If an instance with that id exists and is not
    /// terminal, it is left alone and the parent receives a
    /// `SubOrchestrationInstanceFailed` message instead.
    pub new_instances: Vec<NewInstance>,
}

impl EpisodeCommit {
    /// The times later than `now` at which what this commit writes becomes visible
    /// (timers, delayed signals, scheduled starts): when the dispatchers of the writing
    /// process must look again.
    pub fn due_times(&self, now: Timestamp) -> impl Iterator<Item = Timestamp> + '_ {
        let messages = self.messages.iter().map(|message| message.visible_at);
        let starts = self.new_instances.iter().filter_map(|instance| instance.scheduled_start);
        messages.chain(starts).filter(move |at| *at > now)
    }
}

/// Proof that a worker holds an activity item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivityLock {
    /// The item's id in the store.
    pub id: i64,
    /// Unique per lease: a completion or renewal with a stale token fails with
    /// [`Error::LeaseLost`].
    pub token: String,
}

/// A leased activity item.
#[derive(Clone, Debug)]
pub struct ActivityItem {
    /// The lease; needed to complete, renew or abandon the item.
    pub lock: ActivityLock,
    /// The orchestration that scheduled it.
    pub instance_id: String,
    /// The execution that scheduled it.
    pub execution_id: String,
    /// Sequence number of the `TaskScheduled` event; the result names it.
    pub task_id: i32,
    /// The activity to run, as registered.
    pub name: String,
    /// The activity's input, JSON text.
    pub input: Option<String>,
    /// How many times the item was leased, this time included.
    pub delivery_attempts: u32,
    /// The trace context the activity's span hangs under.
    pub trace: Option<keel_core::trace::TraceContext>,
}

/// The outcome of an activity: the item is deleted and `result` (a `TaskCompleted` or
/// `TaskFailed` message) is put in the orchestration's inbox, atomically.
#[derive(Clone, Debug)]
pub struct ActivityCompletion {
    /// The item's lease.
    pub lock: ActivityLock,
    /// The `TaskCompleted` or `TaskFailed` message for the orchestration's inbox.
    pub result: Message,
}

/// A filter over instances, with paging. Results are ordered by instance id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InstanceQuery {
    /// Empty means any status.
    pub statuses: Vec<RuntimeStatus>,
    /// Only instance ids that start with this, compared as is.
    pub instance_id_prefix: Option<String>,
    /// Only orchestrator names that start with this, compared as is.
    pub name_prefix: Option<String>,
    /// Only instances created at or after this.
    pub created_from: Option<Timestamp>,
    /// Exclusive.
    pub created_to: Option<Timestamp>,
    /// 0 means the store's default (100).
    pub page_size: usize,
    /// Opaque token from the previous page.
    pub continuation: Option<String>,
}

/// One page of a query.
#[derive(Clone, Debug, PartialEq)]
pub struct InstancePage {
    /// The matches, ordered by instance id.
    pub instances: Vec<InstanceRecord>,
    /// Present when there may be more results.
    pub continuation: Option<String>,
}

/// Which instances a bulk purge deletes. Only terminal instances are ever purged.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PurgeFilter {
    /// Only instances created at or after this.
    pub created_from: Option<Timestamp>,
    /// Exclusive.
    pub created_to: Option<Timestamp>,
    /// Empty means every terminal status.
    pub statuses: Vec<RuntimeStatus>,
}

/// A filter over entities, with paging. Results are ordered by instance id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EntityQuery {
    /// Instance ids starting with this (`@counter@` for every `counter`), compared as is.
    pub instance_id_prefix: Option<String>,
    /// Only entities whose last batch ran at or after this.
    pub last_modified_from: Option<Timestamp>,
    /// Exclusive.
    pub last_modified_to: Option<Timestamp>,
    /// Also list entities without state (locked, or with waiting messages, or deleted).
    pub include_transient: bool,
    /// 0 means the store's default (100).
    pub page_size: usize,
    /// Opaque token from the previous page.
    pub continuation: Option<String>,
}

/// How many orchestration instances a task hub holds in each status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceCounts {
    /// Indexed like [`RuntimeStatus::ALL`].
    counts: [u64; RuntimeStatus::ALL.len()],
}

impl InstanceCounts {
    fn index(status: RuntimeStatus) -> usize {
        RuntimeStatus::ALL.iter().position(|each| *each == status).expect("ALL holds every status")
    }

    /// How many instances are in `status`.
    pub fn get(&self, status: RuntimeStatus) -> u64 {
        self.counts[Self::index(status)]
    }

    /// Counts `count` more instances in `status`.
    pub fn add(&mut self, status: RuntimeStatus, count: u64) {
        self.counts[Self::index(status)] += count;
    }

    /// Counts `count` fewer instances in `status` (never below zero).
    pub(crate) fn subtract(&mut self, status: RuntimeStatus, count: u64) {
        let counted = &mut self.counts[Self::index(status)];
        *counted = counted.saturating_sub(count);
    }

    /// Every status with its count, in the order of [`RuntimeStatus::ALL`].
    pub fn iter(&self) -> impl Iterator<Item = (RuntimeStatus, u64)> + '_ {
        RuntimeStatus::ALL.into_iter().zip(self.counts.iter().copied())
    }

    /// All instances, whatever their status.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// The work waiting in a task hub at one moment ([`Store::hub_stats`]). Work that a
/// worker holds (a live lease, including work the gRPC server holds for an SDK worker)
/// is in none of these numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Instances, entities included, that [`Store::fetch_orchestration_items`] would
    /// lock at `now`: at least one inbox message visible (`visible_at <= now`) and not
    /// locked past `now` (by a live lease, or by a give-back until a retry time).
    /// Counted once per instance, however many messages wait.
    pub ready_orchestrations: u64,
    /// Activity items that [`Store::fetch_activity_items`] would lease at `now`: new or
    /// given back and due, or whose lease ran out.
    pub ready_activities: u64,
    /// Inbox messages that become visible after `now`: durable timers, scheduled
    /// starts, delayed entity signals. Counted per message, timers that nobody waits
    /// for any more included (of an instance that finished, or a timeout that was
    /// beaten): they are delivered and dropped when due. (Work given back until a
    /// later time, an instance or an activity item, is in none of the three numbers
    /// until then.)
    pub pending_timers: u64,
}

/// A task hub's numbers at one moment ([`Store::hub_stats`]): one consistent snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Orchestration instances by status; entities are not counted here.
    pub instances: InstanceCounts,
    /// Entities: rows with an entity id (`@name@key`), whatever they hold.
    pub entities: u64,
    /// The work waiting for a worker.
    pub backlog: Backlog,
}

/// Every orchestration instance `query` matches, reading page after page from its
/// `continuation` on.
pub async fn query_all_instances(store: &dyn Store, mut query: InstanceQuery) -> Result<Vec<InstanceRecord>> {
    let mut all = Vec::new();
    loop {
        let page = store.query_instances(&query).await?;
        all.extend(page.instances);
        match page.continuation {
            Some(token) => query.continuation = Some(token),
            None => return Ok(all),
        }
    }
}

/// The name of the entity an instance id names, if it is an entity id.
pub fn entity_name(instance_id: &str) -> Option<String> {
    keel_core::entity::EntityId::parse(instance_id).ok().map(|id| id.name)
}

/// The default page size of [`Store::query_instances`].
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// The most messages one orchestration item carries; the rest wait for the next episode.
pub const MAX_MESSAGES_PER_ITEM: usize = 10_000;

/// A task hub's persistence: the contract every backend implements and the
/// conformance suite checks.
///
/// The client side writes instances and inbox messages and reads them back; the worker
/// side leases work (instances with visible messages, activity items), and commits what
/// each piece of work decided atomically. A lease is a token: a commit, renewal or
/// abandon with a stale one fails with [`Error::LeaseLost`] and changes nothing. Times
/// are passed in (`now`), never read from the clock, so that tests control them; a
/// failure says whether trying again may help ([`Error::is_retryable`]). Every write
/// checks its input against Keel's limits first ([`NewInstance::check`],
/// [`Message::check`]).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Wake-ups for dispatchers and waiters in this process.
    fn notifications(&self) -> &Notifications;

    // ---- client side ----

    /// Creates an instance. An existing instance with the same id is replaced if it is
    /// terminal (its history, inbox and activities are deleted); otherwise
    /// [`Error::AlreadyExists`].
    async fn create_instance(&self, instance: NewInstance) -> Result<()>;

    /// Creates `instance` in place of `replaced`, the instance with the same id as the
    /// caller read it, whatever its status, in one transaction: the replaced instance is
    /// deleted with all it holds (history, inbox, activity items; a lease on it is lost)
    /// and `messages` (what its end means to others: its parent's notice, unlocks of the
    /// entities it holds) are written with the new instance. When the instance is no
    /// longer as read (another execution, a longer history) or gone,
    /// [`Error::InvalidState`] and nothing is written; the caller reads it again.
    async fn replace_instance(
        &self,
        instance: NewInstance,
        replaced: &InstanceRecord,
        messages: Vec<Message>,
    ) -> Result<()>;

    /// Puts a message into an existing instance's inbox and returns the instance's
    /// status; a message to an entity creates the entity if needed. [`Error::NotFound`]
    /// for an unknown orchestration instance; [`Error::InvalidState`] (and
    /// nothing written) when the instance is terminal unless `accept_terminal`. An
    /// `ExecutionRewound` message for a `Failed` instance also sets its status to
    /// `Pending` (its failure details stay until the rewind runs).
    async fn enqueue_message(&self, message: Message, accept_terminal: bool) -> Result<RuntimeStatus>;

    /// The instance's state row (an entity's too); `None` for an unknown id.
    async fn get_instance(&self, instance_id: &str) -> Result<Option<InstanceRecord>>;

    /// The history of the instance's current execution (empty for an unknown instance).
    async fn read_history(&self, instance_id: &str) -> Result<Vec<HistoryEvent>>;

    /// Orchestration instances that match (entities are never listed here).
    async fn query_instances(&self, query: &InstanceQuery) -> Result<InstancePage>;

    /// Entities that match.
    async fn query_entities(&self, query: &EntityQuery) -> Result<InstancePage>;

    /// Deletes an entity row that holds nothing: no state, no scheduler (lock or
    /// waiting messages), no inbox message and no live lease. `Ok(false)` (nothing
    /// deleted) otherwise.
    async fn remove_empty_entity(&self, instance_id: &str, now: Timestamp) -> Result<bool>;

    /// Deletes a terminal instance with all it holds. `Ok(false)` if there is no such
    /// instance; [`Error::InvalidState`] if it is not terminal.
    async fn purge_instance(&self, instance_id: &str) -> Result<bool>;

    /// Deletes the terminal instances that match; returns how many.
    async fn purge_instances(&self, filter: &PurgeFilter) -> Result<u64>;

    /// Deletes every instance and entity, whatever its state, with all it holds (leases
    /// on them are lost): the task hub is left empty. Returns how many went.
    async fn purge_all(&self) -> Result<u64>;

    // ---- worker side ----

    /// Locks up to `max` instances that have visible messages and are not locked (or
    /// whose lock expired), for `lease`.
    async fn fetch_orchestration_items(
        &self,
        max: usize,
        lease: Duration,
        now: Timestamp,
    ) -> Result<Vec<OrchestrationItem>>;

    /// Commits episodes, each atomically; one result per commit, in order. A commit
    /// whose lock is stale (or whose [`DirectClaim`] does not hold) fails with
    /// [`Error::LeaseLost`] without affecting the others.
    async fn commit_episodes(&self, commits: Vec<EpisodeCommit>, now: Timestamp) -> Result<Vec<Result<Committed>>>;

    /// Whether [`Store::commit_episodes`] takes direct episodes ([`EpisodeCommit::direct`])
    /// and activity items created leased ([`NewActivity::lease`]): then a worker that runs
    /// an instance's activities in its own process commits each step of the instance
    /// once (the result with the next episode) instead of four times (the item's lease,
    /// its result, the instance's lock, the episode).
    fn direct_episodes(&self) -> bool {
        false
    }

    /// Gives an instance back without committing: no worker fetches it before
    /// `retry_at`, when it comes back with its messages and any that arrived meanwhile,
    /// in arrival order (the instance waits, not its messages, so a later message never
    /// overtakes an earlier one). The delivery is given back too: it does not count toward
    /// [`OrchestrationItem::delivery_attempts`] (only deliveries whose lease ran out do,
    /// since only those can mean the item killed its worker).
    async fn abandon_orchestration_item(&self, lock: &OrchestrationLock, retry_at: Timestamp) -> Result<()>;

    /// Extends an instance's lock (work held for a remote worker that has not taken it
    /// yet); [`Error::LeaseLost`] if another worker took the instance.
    async fn renew_orchestration_lease(&self, lock: &OrchestrationLock, lease: Duration, now: Timestamp) -> Result<()>;

    /// Leases up to `max` visible activity items that are not leased (or whose lease
    /// expired), for `lease`.
    async fn fetch_activity_items(&self, max: usize, lease: Duration, now: Timestamp) -> Result<Vec<ActivityItem>>;

    /// Completes activities, each atomically; one result per completion, in order.
    async fn complete_activities(&self, completions: Vec<ActivityCompletion>) -> Result<Vec<Result<()>>>;

    /// Extends an activity lease; [`Error::LeaseLost`] if another worker took the item.
    async fn renew_activity_lease(&self, lock: &ActivityLock, lease: Duration, now: Timestamp) -> Result<()>;

    /// Gives an activity item back; it becomes visible again at `retry_at`.
    async fn abandon_activity_item(&self, lock: &ActivityLock, retry_at: Timestamp) -> Result<()>;

    /// The earliest time after `now` at which an inbox message or activity item becomes
    /// visible or a lease expires: when idle dispatchers should look again.
    async fn next_wakeup(&self, now: Timestamp) -> Result<Option<Timestamp>>;

    // ---- observability ----

    /// The task hub's numbers at `now` ([`HubStats`]: instances by status, entities, the
    /// backlog as [`Backlog`] defines it), read in one snapshot. Meant for dashboards
    /// and metric scrapes every few seconds: it counts over indexes and reads no
    /// history.
    async fn hub_stats(&self, now: Timestamp) -> Result<HubStats>;
}
