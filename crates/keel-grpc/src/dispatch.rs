//! Work for remote workers: [`GrpcRemoteWorkers`] takes the episodes, activity items and
//! entity batches that the in-process worker does not host (it is a
//! [`keel::RemoteWorkers`]) and hands each to exactly one connected `GetWorkItems`
//! stream, round-robin, within the concurrency each worker asked for and the work-item
//! filters it set.
//!
//! A handed-out item is *in flight* under a completion token of its own: 128 random
//! bits (32 hex digits), new for every dispatch, so that no worker can guess the token
//! of an item handed to another, and tokens of a previous server process never match.
//! It stays in flight until the worker completes or abandons it; when its
//! stream drops, it goes back to the task hub at once. Items that no stream can take
//! wait here in order (they stay locked in the store; their leases are renewed by the
//! server), so that an orchestration started before any worker connects simply waits
//! for one. An entity has at most one batch here at a time: the batch holds the
//! entity's instance lock until it is completed or given back.
//!
//! Nothing here touches the store: what must be written (give-backs, poisoned
//! activities) becomes a [`Job`] that the server carries out.
//!
//! Each stream also remembers its peer address, when it connected and the names of
//! the orchestrators, activities and entities it was given work of (the protocol has a
//! worker announce none of its functions): [`keel::RemoteWorkers::workers`], for the
//! hub overview.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use keel::entity_episode::EntityEpisode;
use keel::episode::RemoteEpisode;
use keel::RemoteWorkers;
use keel_store::{ActivityItem, ActivityLock, OrchestrationLock};
use tokio::sync::mpsc;

use crate::convert;
use crate::proto;
use crate::proto::work_item::Request;

/// Most items waiting for a worker; beyond that, offers are refused (the in-process
/// worker gives them back to the store and offers them again later).
pub const MAX_WAITING_ITEMS: usize = 10_000;

/// Most names of each kind (orchestrators, activities, entities) a stream remembers
/// having been given work of; later names are not listed.
pub const MAX_NAMES_PER_WORKER: usize = 1_000;

/// Orchestrator work items larger than this go without their past events to workers
/// that stream histories (the gRPC default message limit is 4 MiB).
pub const STREAMED_HISTORY_ABOVE_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;

/// A unit of work for a remote worker.
#[derive(Debug)]
pub enum Work {
    Orchestration(Box<RemoteEpisode>),
    Activity(Box<ActivityItem>),
    Entity(Box<EntityEpisode>),
}

impl Work {
    /// The work item for a stream; `streams_history`: the worker fetches a history too
    /// large for one message with `StreamInstanceHistory` (it advertised the capability).
    fn to_work_item(&self, token: String, streams_history: bool) -> proto::WorkItem {
        let request = match self {
            Work::Orchestration(episode) => {
                let mut request = convert::orchestrator_request(episode);
                if prost::Message::encoded_len(&request) > STREAMED_HISTORY_ABOVE_BYTES {
                    if streams_history {
                        request.past_events.clear();
                        request.requires_history_streaming = true;
                    } else {
                        tracing::warn!(
                            instance_id = %episode.instance.instance_id,
                            bytes = prost::Message::encoded_len(&request),
                            "an orchestrator work item exceeds the SDKs' default 4 MiB message limit and the worker \
                             does not stream histories: it must raise its receive limit"
                        );
                    }
                }
                Request::OrchestratorRequest(request)
            }
            Work::Activity(item) => Request::ActivityRequest(convert::activity_request(item)),
            Work::Entity(episode) => Request::EntityRequestV2(convert::entity_request(episode)),
        };
        proto::WorkItem { request: Some(request), completion_token: token }
    }

    /// The name of the function the work is for.
    fn name(&self) -> &str {
        match self {
            Work::Orchestration(episode) => &episode.instance.name,
            Work::Activity(item) => &item.name,
            Work::Entity(episode) => &episode.id.name,
        }
    }

    /// True if `other` is a newer delivery of the same work (the store handed it out
    /// again after a lease expired).
    fn same_work(&self, other: &Work) -> bool {
        match (self, other) {
            (Work::Orchestration(a), Work::Orchestration(b)) => a.instance.instance_id == b.instance.instance_id,
            (Work::Activity(a), Work::Activity(b)) => a.lock.id == b.lock.id,
            (Work::Entity(a), Work::Entity(b)) => a.instance.instance_id == b.instance.instance_id,
            _ => false,
        }
    }
}

/// A store write the server must make on the dispatcher's behalf.
#[derive(Debug)]
pub enum Job {
    /// Give the item back to the task hub, to be delivered again after `retry_after`.
    GiveBack { work: Work, retry_after: Duration },
    /// An activity that kept failing to finish: record it as failed without running it.
    Poison(Box<ActivityItem>),
    /// Commit this episode, decided without a worker (see [`settled_without_worker`]).
    Commit(Box<keel_store::EpisodeCommit>),
}

/// The commit of an episode that no connected worker can take now, when it needs no
/// worker: its events leave the execution suspended, and a suspended orchestration takes
/// no step (the SDKs hold back every event but the resume and the termination), so it is
/// recorded as the worker would answer it, with no actions. The instance is Suspended at
/// once; the resume goes to a worker, which replays these events and carries on.
fn settled_without_worker(episode: Box<RemoteEpisode>) -> Result<keel_store::EpisodeCommit, Box<RemoteEpisode>> {
    let suspended =
        episode.past_events.iter().chain(&episode.new_events).fold(false, |suspended, event| match event.kind {
            keel::EventKind::ExecutionSuspended { .. } => true,
            keel::EventKind::ExecutionResumed { .. } => false,
            _ => suspended,
        });
    if !suspended {
        return Err(episode);
    }
    let outcome =
        keel::episode::RemoteOutcome { custom_status: episode.instance.custom_status.clone(), ..Default::default() };
    let now = episode.new_events.first().map(|started| started.timestamp).unwrap_or_else(crate::now);
    Ok(episode.complete(outcome, now))
}

/// Which work a stream takes: everything, or what its filters name.
#[derive(Debug, Default)]
struct Filters {
    filters: Option<proto::WorkItemFilters>,
}

impl Filters {
    fn accepts(&self, work: &Work) -> bool {
        let Some(filters) = &self.filters else { return true };
        match work {
            Work::Orchestration(episode) => filters.orchestrations.iter().any(|filter| {
                filter.name == episode.instance.name
                    && (filter.versions.is_empty()
                        || filter.versions.iter().any(|v| *v == episode.instance.version.clone().unwrap_or_default()))
            }),
            // Keel keeps no activity versions: an activity filter matches by name.
            Work::Activity(item) => filters.activities.iter().any(|filter| filter.name == item.name),
            // Entity names are case-insensitive (the SDKs send them in lower case).
            Work::Entity(episode) => {
                filters.entities.iter().any(|filter| filter.name.eq_ignore_ascii_case(&episode.id.name))
            }
        }
    }
}

struct Stream {
    id: u64,
    peer: Option<SocketAddr>,
    connected_at: keel::Timestamp,
    /// The names of the functions it was given work of, by kind.
    orchestrators_given: BTreeSet<String>,
    activities_given: BTreeSet<String>,
    entities_given: BTreeSet<String>,
    sender: mpsc::UnboundedSender<proto::WorkItem>,
    filters: Filters,
    /// The worker fetches large histories itself (`WORKER_CAPABILITY_HISTORY_STREAMING`).
    streams_history: bool,
    max_orchestrations: usize,
    max_activities: usize,
    max_entities: usize,
    orchestrations: usize,
    activities: usize,
    entities: usize,
}

impl Stream {
    fn has_room_for(&self, work: &Work) -> bool {
        match work {
            Work::Orchestration(_) => self.orchestrations < self.max_orchestrations,
            Work::Activity(_) => self.activities < self.max_activities,
            Work::Entity(_) => self.entities < self.max_entities,
        }
    }

    fn has_room(&self) -> bool {
        self.orchestrations < self.max_orchestrations
            || self.activities < self.max_activities
            || self.entities < self.max_entities
    }

    /// Remembers that it was given work of `work`'s function.
    fn given(&mut self, work: &Work) {
        let names = match work {
            Work::Orchestration(_) => &mut self.orchestrators_given,
            Work::Activity(_) => &mut self.activities_given,
            Work::Entity(_) => &mut self.entities_given,
        };
        if names.len() < MAX_NAMES_PER_WORKER && !names.contains(work.name()) {
            names.insert(work.name().to_string());
        }
    }

    fn describe(&self) -> keel::metrics::RemoteWorker {
        keel::metrics::RemoteWorker {
            id: self.id.to_string(),
            peer: self.peer,
            connected_at: self.connected_at,
            orchestrators: self.orchestrators_given.iter().cloned().collect(),
            activities: self.activities_given.iter().cloned().collect(),
            entities: self.entities_given.iter().cloned().collect(),
        }
    }

    fn count(&mut self, work: &Work, delta: isize) {
        let counter = match work {
            Work::Orchestration(_) => &mut self.orchestrations,
            Work::Activity(_) => &mut self.activities,
            Work::Entity(_) => &mut self.entities,
        };
        *counter = counter.saturating_add_signed(delta);
    }
}

struct InFlight {
    stream: u64,
    work: Work,
}

#[derive(Default)]
struct State {
    streams: Vec<Stream>,
    cursor: usize,
    next_stream_id: u64,
    waiting: VecDeque<Work>,
    in_flight: HashMap<String, InFlight>,
}

/// The remote workers connected over gRPC, as the in-process worker sees them. Create
/// one, give it to the worker (`WorkerBuilder::remote_workers`) and to [`crate::serve`].
pub struct GrpcRemoteWorkers {
    state: Mutex<State>,
    closed: AtomicBool,
    jobs: mpsc::UnboundedSender<Job>,
    job_receiver: Mutex<Option<mpsc::UnboundedReceiver<Job>>>,
    histories: Mutex<Histories>,
}

/// Most events of all the histories kept ([`GrpcRemoteWorkers::keep_history`]), and
/// the longest history kept.
const KEPT_EVENTS: usize = 200_000;
pub(crate) const LONGEST_KEPT_HISTORY: usize = 10_000;

/// The histories of the instances SDK workers committed last, so that their next
/// episode need not read and decode them from the store: by instance id, the execution
/// id and the events; the oldest go first.
#[derive(Default)]
struct Histories {
    by_instance: HashMap<String, (String, Vec<keel::HistoryEvent>)>,
    /// Instance ids in the order they were kept (some gone already).
    order: VecDeque<String>,
    /// The events of `by_instance`.
    events: usize,
}

impl std::fmt::Debug for GrpcRemoteWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("GrpcRemoteWorkers")
            .field("streams", &state.streams.len())
            .field("waiting", &state.waiting.len())
            .field("in_flight", &state.in_flight.len())
            .finish()
    }
}

/// A new completion token: 128 bits from the operating system's random source, as 32
/// lowercase hex digits.
pub(crate) fn new_token() -> String {
    let mut bits = [0u8; 16];
    getrandom::fill(&mut bits).expect("the operating system's random source is readable");
    bits.iter().map(|byte| format!("{byte:02x}")).collect()
}

impl GrpcRemoteWorkers {
    pub fn new() -> Arc<GrpcRemoteWorkers> {
        let (jobs, job_receiver) = mpsc::unbounded_channel();
        Arc::new(GrpcRemoteWorkers {
            state: Mutex::new(State::default()),
            closed: AtomicBool::new(false),
            jobs,
            job_receiver: Mutex::new(Some(job_receiver)),
            histories: Mutex::new(Histories::default()),
        })
    }

    /// Keeps the history an SDK worker's episode of `instance_id` left (committed),
    /// for the instance's next episode; a long one is not kept.
    pub(crate) fn keep_history(&self, instance_id: &str, execution_id: &str, history: Vec<keel::HistoryEvent>) {
        if history.len() > LONGEST_KEPT_HISTORY {
            return;
        }
        let mut histories = self.histories.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Histories { by_instance, order, events } = &mut *histories;
        *events += history.len();
        match by_instance.insert(instance_id.to_owned(), (execution_id.to_owned(), history)) {
            Some((_, replaced)) => *events -= replaced.len(),
            None => order.push_back(instance_id.to_owned()),
        }
        while *events > KEPT_EVENTS {
            let Some(oldest) = order.pop_front() else { break };
            if let Some((_, dropped)) = by_instance.remove(&oldest) {
                *events -= dropped.len();
            }
        }
        if order.len() > 2 * by_instance.len() + 16 {
            order.retain(|id| by_instance.contains_key(id));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many `GetWorkItems` streams are connected.
    pub fn connected_workers(&self) -> usize {
        self.lock().streams.len()
    }

    /// How many items are with workers, and how many wait for one.
    pub fn load(&self) -> (usize, usize) {
        let state = self.lock();
        (state.in_flight.len(), state.waiting.len())
    }

    /// Registers a `GetWorkItems` stream from `peer`; the receiver gets its work items.
    pub(crate) fn connect(
        self: &Arc<Self>,
        request: &proto::GetWorkItemsRequest,
        peer: Option<SocketAddr>,
    ) -> (u64, mpsc::UnboundedReceiver<proto::WorkItem>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        // 0 (or less) is "no limit": the Python SDK never sets the entity limit.
        let limit = |max: i32| usize::try_from(max).ok().filter(|max| *max > 0).unwrap_or(usize::MAX);
        let mut state = self.lock();
        let id = state.next_stream_id;
        state.next_stream_id += 1;
        if !self.closed.load(Ordering::SeqCst) {
            state.streams.push(Stream {
                id,
                peer,
                connected_at: crate::now(),
                orchestrators_given: BTreeSet::new(),
                activities_given: BTreeSet::new(),
                entities_given: BTreeSet::new(),
                sender,
                filters: Filters { filters: request.work_item_filters.clone() },
                streams_history: request.capabilities.contains(&(proto::WorkerCapability::HistoryStreaming as i32)),
                max_orchestrations: limit(request.max_concurrent_orchestration_work_items),
                max_activities: limit(request.max_concurrent_activity_work_items),
                max_entities: limit(request.max_concurrent_entity_work_items),
                orchestrations: 0,
                activities: 0,
                entities: 0,
            });
            self.pump(&mut state);
        }
        tracing::info!(stream = id, ?peer, workers = state.streams.len(), "a remote worker connected");
        (id, receiver)
    }

    /// Forgets a stream that ended; the work in flight on it goes back to the task hub.
    pub(crate) fn disconnect(&self, id: u64) {
        let mut state = self.lock();
        state.streams.retain(|stream| stream.id != id);
        let tokens: Vec<String> =
            state.in_flight.iter().filter(|(_, flight)| flight.stream == id).map(|(token, _)| token.clone()).collect();
        for token in &tokens {
            if let Some(flight) = state.in_flight.remove(token) {
                let _ = self.jobs.send(Job::GiveBack { work: flight.work, retry_after: Duration::ZERO });
            }
        }
        tracing::info!(
            stream = id,
            returned = tokens.len(),
            workers = state.streams.len(),
            "a remote worker disconnected"
        );
    }

    /// Takes the item in flight under `token` (for its completion or abandonment).
    pub(crate) fn settle(&self, token: &str) -> Option<Work> {
        let mut state = self.lock();
        let flight = state.in_flight.remove(token)?;
        if let Some(stream) = state.streams.iter_mut().find(|stream| stream.id == flight.stream) {
            stream.count(&flight.work, -1);
        }
        self.pump(&mut state);
        Some(flight.work)
    }

    /// Has the server give `work` back to the task hub.
    pub(crate) fn give_back(&self, work: Work, retry_after: Duration) {
        let _ = self.jobs.send(Job::GiveBack { work, retry_after });
    }

    /// The leases of the work held here (waiting or in flight), to renew: activity
    /// items, and the instances whose episodes or entity batches wait for a worker.
    pub(crate) fn held_locks(&self) -> (Vec<ActivityLock>, Vec<OrchestrationLock>) {
        let state = self.lock();
        let waiting = state.waiting.iter();
        let flying = state.in_flight.values().map(|flight| &flight.work);
        let mut activities = Vec::new();
        let mut orchestrations = Vec::new();
        for work in waiting.chain(flying) {
            match work {
                Work::Activity(item) => activities.push(item.lock.clone()),
                Work::Orchestration(episode) => orchestrations.push(episode.lock.clone()),
                Work::Entity(episode) => orchestrations.push(episode.lock.clone()),
            }
        }
        (activities, orchestrations)
    }

    /// Gives the episode of `instance_id` that waits for a worker (none is in flight)
    /// back to the task hub at once, so that a termination or a suspension sent to the
    /// instance is processed now rather than when a worker connects. False when there is
    /// no such episode.
    pub(crate) fn release_waiting(&self, instance_id: &str) -> bool {
        let mut state = self.lock();
        let position = state.waiting.iter().position(
            |work| matches!(work, Work::Orchestration(episode) if episode.instance.instance_id == instance_id),
        );
        let Some(work) = position.and_then(|position| state.waiting.remove(position)) else { return false };
        drop(state);
        self.give_back(work, Duration::ZERO);
        true
    }

    /// The past events of the episode of `instance_id` that is with a worker (for the
    /// worker to stream them), if there is one.
    pub(crate) fn past_events_in_flight(
        &self,
        instance_id: &str,
    ) -> Option<(keel_store::InstanceRecord, Vec<keel::HistoryEvent>)> {
        let state = self.lock();
        state.in_flight.values().find_map(|flight| match &flight.work {
            Work::Orchestration(episode) if episode.instance.instance_id == instance_id => {
                Some((episode.instance.clone(), episode.past_events.clone()))
            }
            _ => None,
        })
    }

    /// Gives everything that waits for a worker back to the task hub at once.
    pub(crate) fn release_all_waiting(&self) {
        let waiting: Vec<Work> = self.lock().waiting.drain(..).collect();
        for work in waiting {
            self.give_back(work, Duration::ZERO);
        }
    }

    /// Drops an activity item whose lease went to someone else.
    pub(crate) fn forget_activity(&self, lock: &ActivityLock) {
        let mut state = self.lock();
        let is_it = |work: &Work| matches!(work, Work::Activity(item) if item.lock == *lock);
        state.waiting.retain(|work| !is_it(work));
        let token = state.in_flight.iter().find(|(_, flight)| is_it(&flight.work)).map(|(token, _)| token.clone());
        if let Some(token) = token {
            drop(state);
            self.settle(&token);
        }
    }

    /// Stops taking work: the streams end (gracefully, so workers reconnect), later
    /// offers are refused, and everything held is returned for giving back.
    pub(crate) fn close(&self) -> Vec<Work> {
        self.closed.store(true, Ordering::SeqCst);
        let mut state = self.lock();
        state.streams.clear();
        let mut held: Vec<Work> = state.waiting.drain(..).collect();
        held.extend(state.in_flight.drain().map(|(_, flight)| flight.work));
        held
    }

    /// The store jobs; only the first caller (the server) gets them.
    pub(crate) fn take_jobs(&self) -> Option<mpsc::UnboundedReceiver<Job>> {
        self.job_receiver.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }

    /// Hands `work` to a stream that takes it and has room, round-robin.
    fn try_dispatch(&self, state: &mut State, work: Work) -> Result<(), Work> {
        let count = state.streams.len();
        for offset in 0..count {
            let index = (state.cursor + offset) % count;
            let stream = &state.streams[index];
            if !stream.filters.accepts(&work) || !stream.has_room_for(&work) {
                continue;
            }
            let token = new_token();
            if stream.sender.send(work.to_work_item(token.clone(), stream.streams_history)).is_err() {
                continue; // the stream is going away; its guard forgets it
            }
            let stream = &mut state.streams[index];
            stream.count(&work, 1);
            stream.given(&work);
            let stream = stream.id;
            state.cursor = index + 1;
            state.in_flight.insert(token, InFlight { stream, work });
            return Ok(());
        }
        Err(work)
    }

    /// Hands waiting work to streams with room, oldest first.
    fn pump(&self, state: &mut State) {
        let mut still_waiting = VecDeque::with_capacity(state.waiting.len());
        while let Some(work) = state.waiting.pop_front() {
            if let Err(work) = self.try_dispatch(state, work) {
                still_waiting.push_back(work);
            }
            if !state.streams.iter().any(Stream::has_room) {
                break;
            }
        }
        still_waiting.append(&mut state.waiting);
        state.waiting = still_waiting;
    }

    fn offer(&self, work: Work) -> Result<(), Work> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(work);
        }
        let mut state = self.lock();
        if let Some(older) = state.waiting.iter_mut().find(|waiting| waiting.same_work(&work)) {
            *older = work; // a newer delivery of the same work: its lease is the valid one
            return Ok(());
        }
        let work = match self.try_dispatch(&mut state, work) {
            Ok(()) => return Ok(()),
            Err(Work::Orchestration(episode)) => match settled_without_worker(episode) {
                Ok(commit) => {
                    let _ = self.jobs.send(Job::Commit(Box::new(commit)));
                    return Ok(());
                }
                Err(episode) => Work::Orchestration(episode),
            },
            Err(work) => work,
        };
        match work {
            work if state.waiting.len() >= MAX_WAITING_ITEMS => Err(work),
            work => {
                state.waiting.push_back(work);
                Ok(())
            }
        }
    }
}

impl RemoteWorkers for GrpcRemoteWorkers {
    fn offer_orchestration(&self, episode: Box<RemoteEpisode>) -> Result<(), Box<RemoteEpisode>> {
        self.offer(Work::Orchestration(episode)).map_err(|work| match work {
            Work::Orchestration(episode) => episode,
            _ => unreachable!("an offered episode comes back as itself"),
        })
    }

    fn offer_activity(&self, item: Box<ActivityItem>) -> Result<(), Box<ActivityItem>> {
        if item.delivery_attempts > keel_core::limits::MAX_DELIVERY_ATTEMPTS {
            let _ = self.jobs.send(Job::Poison(item));
            return Ok(());
        }
        self.offer(Work::Activity(item)).map_err(|work| match work {
            Work::Activity(item) => item,
            _ => unreachable!("an offered activity comes back as itself"),
        })
    }

    fn offer_entity(&self, episode: Box<EntityEpisode>) -> Result<(), Box<EntityEpisode>> {
        self.offer(Work::Entity(episode)).map_err(|work| match work {
            Work::Entity(episode) => episode,
            _ => unreachable!("an offered entity batch comes back as itself"),
        })
    }

    fn connected_workers(&self) -> Option<usize> {
        Some(GrpcRemoteWorkers::connected_workers(self))
    }

    fn workers(&self) -> Vec<keel::metrics::RemoteWorker> {
        self.lock().streams.iter().map(Stream::describe).collect()
    }

    fn take_history(&self, instance_id: &str, execution_id: &str, history_len: u64) -> Option<Vec<keel::HistoryEvent>> {
        let mut histories = self.histories.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (kept_execution, history) = histories.by_instance.remove(instance_id)?;
        histories.events -= history.len();
        (kept_execution == execution_id && history.len() as u64 == history_len).then_some(history)
    }
}

/// The response stream of one `GetWorkItems` call: the items dispatched to it, and a
/// `HealthPing` every `ping_interval` so that the worker knows the stream is alive.
/// Dropping it (the worker went away) gives its in-flight work back.
pub(crate) struct WorkItemStream {
    items: mpsc::UnboundedReceiver<proto::WorkItem>,
    ping: tokio::time::Interval,
    remote: Arc<GrpcRemoteWorkers>,
    id: u64,
}

impl WorkItemStream {
    pub(crate) fn open(
        remote: Arc<GrpcRemoteWorkers>,
        request: &proto::GetWorkItemsRequest,
        peer: Option<SocketAddr>,
        ping_interval: Duration,
    ) -> WorkItemStream {
        let (id, items) = remote.connect(request, peer);
        let mut ping = tokio::time::interval(ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        WorkItemStream { items, ping, remote, id }
    }
}

impl futures_util::Stream for WorkItemStream {
    type Item = Result<proto::WorkItem, tonic::Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.items.poll_recv(cx) {
            Poll::Ready(Some(item)) => return Poll::Ready(Some(Ok(item))),
            // The server closed the dispatcher: end the stream with OK, so that the
            // worker reconnects (to this server's successor).
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        match self.ping.poll_tick(cx) {
            Poll::Ready(_) => Poll::Ready(Some(Ok(proto::WorkItem {
                request: Some(Request::HealthPing(proto::HealthPing {})),
                completion_token: String::new(),
            }))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for WorkItemStream {
    fn drop(&mut self) {
        self.remote.disconnect(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel::episode::{prepare_remote, RemoteIntake};
    use keel::{EventKind, HistoryEvent, RuntimeStatus};
    use keel_store::{InstanceRecord, Message, OrchestrationItem, StoredMessage};

    fn now() -> keel::Timestamp {
        chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap()
    }

    fn events(count: usize) -> Vec<HistoryEvent> {
        (0..count).map(|_| HistoryEvent::new(now(), EventKind::OrchestratorStarted)).collect()
    }

    #[test]
    fn a_kept_history_is_given_once_and_only_for_the_length_it_has() {
        let remote = GrpcRemoteWorkers::new();
        remote.keep_history("a", "e1", events(3));
        assert_eq!(remote.take_history("a", "e1", 4), None, "another length");
        assert_eq!(remote.take_history("a", "e1", 3), None, "a mismatch forgets it");
        remote.keep_history("a", "e1", events(3));
        assert_eq!(remote.take_history("a", "e2", 3), None, "another execution");
        remote.keep_history("a", "e1", events(3));
        assert_eq!(remote.take_history("a", "e1", 3).map(|history| history.len()), Some(3));
        assert_eq!(remote.take_history("a", "e1", 3), None, "taken, not copied");
    }

    #[test]
    fn kept_histories_stay_within_their_event_budget() {
        let remote = GrpcRemoteWorkers::new();
        remote.keep_history("too-long", "e", events(LONGEST_KEPT_HISTORY + 1));
        assert_eq!(remote.take_history("too-long", "e", LONGEST_KEPT_HISTORY as u64 + 1), None);
        let each = LONGEST_KEPT_HISTORY;
        let count = KEPT_EVENTS / each + 3;
        for n in 0..count {
            remote.keep_history(&format!("i{n}"), "e", events(each));
        }
        let histories = remote.histories.lock().unwrap();
        assert!(histories.events <= KEPT_EVENTS, "{} events kept", histories.events);
        assert!(!histories.by_instance.contains_key("i0"), "the oldest went first");
        assert!(histories.by_instance.contains_key(&format!("i{}", count - 1)), "the newest stays");
        assert_eq!(histories.events, histories.by_instance.values().map(|(_, history)| history.len()).sum::<usize>());
    }

    fn item(instance_id: &str, name: &str, token: &str) -> OrchestrationItem {
        let instance = InstanceRecord {
            instance_id: instance_id.into(),
            name: name.into(),
            version: None,
            execution_id: "e".into(),
            status: RuntimeStatus::Pending,
            input: None,
            output: None,
            custom_status: None,
            failure: None,
            parent: None,
            scheduled_start: None,
            created_at: now(),
            last_updated_at: now(),
            completed_at: None,
            history_len: 0,
            tags: Default::default(),
        };
        let start = HistoryEvent::new(
            now(),
            EventKind::ExecutionStarted {
                trace: None,
                name: name.into(),
                version: None,
                input: None,
                execution_id: "e".into(),
                parent: None,
                scheduled_start: None,
            },
        );
        OrchestrationItem {
            lock: OrchestrationLock { instance_id: instance_id.into(), token: token.into() },
            instance,
            messages: vec![StoredMessage {
                id: 1,
                message: Message {
                    instance_id: instance_id.into(),
                    execution_id: Some("e".into()),
                    event: start,
                    visible_at: now(),
                },
            }],
            delivery_attempts: 1,
        }
    }

    fn episode(instance_id: &str, name: &str, token: &str) -> Box<RemoteEpisode> {
        match prepare_remote(&item(instance_id, name, token), Vec::new(), now()) {
            RemoteIntake::Run(episode) => episode,
            other => panic!("{other:?}"),
        }
    }

    fn activity(id: i64, name: &str, attempts: u32) -> Box<ActivityItem> {
        Box::new(ActivityItem {
            trace: None,
            lock: ActivityLock { id, token: format!("t{id}") },
            instance_id: "i".into(),
            execution_id: "e".into(),
            task_id: 1,
            name: name.into(),
            input: None,
            delivery_attempts: attempts,
        })
    }

    fn entity(instance_id: &str, token: &str) -> Box<EntityEpisode> {
        let mut item = item(instance_id, "", token);
        item.messages[0].message.event = HistoryEvent::new(
            now(),
            EventKind::EntityOperationSignaled {
                trace: None,
                request_id: "r".into(),
                operation: "add".into(),
                input: Some("1".into()),
                scheduled_time: None,
                target_instance_id: instance_id.into(),
            },
        );
        match keel::entity_episode::prepare_entity(&item, now()) {
            keel::entity_episode::EntityIntake::Run(episode) => episode,
            other => panic!("{other:?}"),
        }
    }

    fn request(max: i32) -> proto::GetWorkItemsRequest {
        proto::GetWorkItemsRequest {
            max_concurrent_orchestration_work_items: max,
            max_concurrent_activity_work_items: max,
            ..Default::default()
        }
    }

    fn tokens(receiver: &mut mpsc::UnboundedReceiver<proto::WorkItem>) -> Vec<String> {
        std::iter::from_fn(|| receiver.try_recv().ok()).map(|item| item.completion_token).collect()
    }

    #[test]
    fn work_waits_for_a_worker_and_goes_to_exactly_one_stream_round_robin() {
        let remote = GrpcRemoteWorkers::new();
        remote.offer_orchestration(episode("a", "Orch", "l1")).unwrap();
        assert_eq!(remote.load(), (0, 1), "no worker yet: the episode waits");
        let (_, mut first) = remote.connect(&request(0), None);
        let (_, mut second) = remote.connect(&request(0), None);
        assert_eq!(tokens(&mut first).len(), 1, "the waiting episode goes to the first worker");
        for i in 0..4 {
            remote.offer_activity(activity(i, "Act", 1)).unwrap();
        }
        let (a, b) = (tokens(&mut first), tokens(&mut second));
        assert_eq!((a.len(), b.len()), (2, 2), "round-robin");
        let mut all: Vec<&String> = a.iter().chain(&b).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 4, "every token is unique");
        assert_eq!(remote.load(), (5, 0));
    }

    #[test]
    fn each_worker_lists_its_peer_and_the_functions_it_was_given() {
        let remote = GrpcRemoteWorkers::new();
        assert!(remote.workers().is_empty(), "no worker yet");
        let peer: SocketAddr = "127.0.0.1:50123".parse().unwrap();
        let (first, _first_items) = remote.connect(&request(0), Some(peer));
        let (_, _second_items) = remote.connect(&request(0), None);
        remote.offer_orchestration(episode("a", "Orch", "l1")).unwrap();
        remote.offer_activity(activity(1, "Act", 1)).unwrap();
        remote.offer_orchestration(episode("b", "Orch", "l2")).unwrap();
        remote.offer_entity(entity("@counter@a", "l3")).unwrap();
        let workers = remote.workers();
        assert_eq!(workers.len(), 2);
        // Round-robin: the first worker got both episodes, the second the activity and the batch.
        let (listed, other) = (&workers[0], &workers[1]);
        assert_eq!((listed.id.clone(), listed.peer), (first.to_string(), Some(peer)));
        assert_eq!(listed.orchestrators, ["Orch"], "each name once");
        assert!(listed.activities.is_empty() && listed.entities.is_empty());
        assert_eq!(other.peer, None);
        assert!(other.orchestrators.is_empty());
        assert_eq!(
            (other.activities.as_slice(), other.entities.as_slice()),
            (&["Act".to_string()][..], &["counter".to_string()][..])
        );
        assert!(other.connected_at >= listed.connected_at);
        remote.disconnect(first);
        assert_eq!(remote.workers().len(), 1, "a stream that ended is not listed");
    }

    #[test]
    fn a_stream_gets_no_more_than_it_asked_for() {
        let remote = GrpcRemoteWorkers::new();
        let (_, mut stream) = remote.connect(&request(1), None);
        remote.offer_activity(activity(1, "Act", 1)).unwrap();
        remote.offer_activity(activity(2, "Act", 1)).unwrap();
        let sent = tokens(&mut stream);
        assert_eq!(sent.len(), 1);
        assert_eq!(remote.load(), (1, 1));
        let Some(Work::Activity(done)) = remote.settle(&sent[0]) else { panic!() };
        assert_eq!(done.lock.id, 1);
        assert_eq!(tokens(&mut stream).len(), 1, "the waiting item follows once there is room");
        assert!(remote.settle(&sent[0]).is_none(), "a token settles once");
    }

    #[test]
    fn filters_route_work_to_the_workers_that_host_it() {
        let remote = GrpcRemoteWorkers::new();
        let mut only_b = request(0);
        only_b.work_item_filters = Some(proto::WorkItemFilters {
            orchestrations: vec![proto::OrchestrationFilter { name: "B".into(), versions: vec![] }],
            activities: vec![],
            entities: vec![],
        });
        let (_, mut stream) = remote.connect(&only_b, None);
        remote.offer_orchestration(episode("1", "A", "l")).unwrap();
        remote.offer_activity(activity(1, "Act", 1)).unwrap();
        assert!(tokens(&mut stream).is_empty());
        remote.offer_orchestration(episode("2", "B", "l")).unwrap();
        assert_eq!(tokens(&mut stream).len(), 1);
        assert_eq!(remote.load(), (1, 2));
    }

    #[tokio::test]
    async fn a_dropped_stream_gives_its_work_back_and_a_newer_delivery_replaces_a_waiting_one() {
        let remote = GrpcRemoteWorkers::new();
        let mut jobs = remote.take_jobs().unwrap();
        assert!(remote.take_jobs().is_none());
        remote.offer_orchestration(episode("x", "Orch", "old-lease")).unwrap();
        remote.offer_orchestration(episode("x", "Orch", "new-lease")).unwrap();
        assert_eq!(remote.load(), (0, 1));
        let stream = WorkItemStream::open(remote.clone(), &request(0), None, Duration::from_secs(30));
        assert_eq!(remote.load(), (1, 0));
        drop(stream);
        assert_eq!(remote.connected_workers(), 0);
        let Some(Job::GiveBack { work: Work::Orchestration(episode), retry_after }) = jobs.recv().await else {
            panic!()
        };
        assert_eq!(episode.lock.token, "new-lease");
        assert_eq!(retry_after, Duration::ZERO);
        remote.offer_activity(activity(9, "Act", keel_core::limits::MAX_DELIVERY_ATTEMPTS + 1)).unwrap();
        assert!(matches!(jobs.recv().await, Some(Job::Poison(item)) if item.lock.id == 9));
    }

    #[tokio::test]
    async fn entity_batches_go_to_streams_that_host_the_entity_and_hold_their_instance_lock() {
        let remote = GrpcRemoteWorkers::new();
        let mut jobs = remote.take_jobs().unwrap();
        let mut counters_only = request(0);
        counters_only.work_item_filters = Some(proto::WorkItemFilters {
            orchestrations: vec![],
            activities: vec![],
            entities: vec![proto::EntityFilter { name: "counter".into() }],
        });
        let (_, mut orchestrations_only) = remote.connect(
            &proto::GetWorkItemsRequest { work_item_filters: Some(proto::WorkItemFilters::default()), ..request(0) },
            None,
        );
        remote.offer_entity(entity("@account@a", "l1")).unwrap();
        assert_eq!(remote.load(), (0, 1), "nobody hosts accounts: the batch waits");
        assert_eq!(remote.held_locks().1.len(), 1, "its instance lease is renewed meanwhile");
        // maxConcurrentEntityWorkItems = 0 (the Python SDK's) is no limit.
        let stream = WorkItemStream::open(remote.clone(), &counters_only, None, Duration::from_secs(30));
        remote.offer_entity(entity("@counter@a", "l2")).unwrap();
        remote.offer_entity(entity("@counter@b", "l3")).unwrap();
        assert!(tokens(&mut orchestrations_only).is_empty());
        assert_eq!(remote.load(), (2, 1));
        drop(stream);
        for _ in 0..2 {
            let Some(Job::GiveBack { work: Work::Entity(episode), .. }) = jobs.recv().await else { panic!() };
            assert!(episode.id.name == "counter");
        }
        let (_, mut any) = remote.connect(&request(0), None);
        let sent: Vec<proto::WorkItem> = std::iter::from_fn(|| any.try_recv().ok()).collect();
        let Some(Request::EntityRequestV2(batch)) = &sent[0].request else { panic!("{sent:?}") };
        assert_eq!(batch.instance_id, "@account@a");
        let Some(Work::Entity(episode)) = remote.settle(&sent[0].completion_token) else { panic!() };
        assert_eq!(episode.lock.token, "l1");
    }

    #[tokio::test]
    async fn streams_ping_and_end_when_the_dispatcher_closes() {
        use futures_util::StreamExt;
        let remote = GrpcRemoteWorkers::new();
        let mut stream = WorkItemStream::open(remote.clone(), &request(0), None, Duration::from_millis(10));
        for _ in 0..2 {
            let item = stream.next().await.unwrap().unwrap();
            assert!(matches!(item.request, Some(Request::HealthPing(_))));
        }
        remote.offer_activity(activity(1, "Act", 1)).unwrap();
        let held = remote.close();
        assert_eq!(held.len(), 1, "in-flight work is returned at close");
        let mut rest = Vec::new();
        while let Some(item) = stream.next().await {
            rest.push(item.unwrap());
        }
        assert!(rest.iter().any(|item| matches!(item.request, Some(Request::ActivityRequest(_)))));
        assert!(remote.offer_activity(activity(2, "Act", 1)).is_err(), "a closed dispatcher takes nothing");
    }
}
