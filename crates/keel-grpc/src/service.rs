//! The `TaskHubSidecarService` implementation: the client RPCs are calls on a
//! [`keel::Client`] (and the store for what the client does not offer), the worker RPCs
//! go through the [`GrpcRemoteWorkers`] dispatcher and commit what workers decided
//! (orchestrator responses through `RemoteEpisode::complete`, entity batch results
//! through `EntityEpisode::complete`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use keel::episode::RemoteEpisode;
use keel::{
    Client, ClientError, EntityId, EntityQuery, EventKind, HistoryEvent, InstanceQuery, PurgeFilter, RuntimeStatus,
    StartOptions,
};
use keel_core::limits;
use keel_store::{ActivityCompletion, ActivityItem, EpisodeCommit, Message, Store};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::convert::{self, payload, timestamp_from_proto};
use crate::dispatch::{GrpcRemoteWorkers, Work, WorkItemStream};
use crate::error::{Error, Result};
use crate::proto;
use crate::proto::task_hub_sidecar_service_server::TaskHubSidecarService;

type BoxStream<T> = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How long a worker's abandoned item waits before it is delivered again (so that a
/// worker that refuses an item does not get it back in a hot loop).
const ABANDON_RETRY_DELAY: Duration = Duration::from_secs(1);

/// The longest a `WaitFor*` call waits when the client sets no deadline.
const MAX_LONG_POLL: Duration = Duration::from_secs(24 * 60 * 60);

/// Most events per `HistoryChunk` of `StreamInstanceHistory`.
const HISTORY_CHUNK_EVENTS: usize = 200;

/// A `HistoryChunk` ends once its events reach this size.
const HISTORY_CHUNK_BYTES: usize = 1024 * 1024;

/// Deepest tree of sub-orchestrations a recursive terminate or purge follows.
const MAX_RECURSION_DEPTH: usize = 64;

/// Page size when `ListInstanceIds` scans the task hub, and the largest page
/// `QueryInstances` returns (the SDKs follow the continuation token for the rest).
const SCAN_PAGE: usize = 1000;

/// The service: one per server.
pub(crate) struct Sidecar {
    pub(crate) client: Client,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) remote: Arc<GrpcRemoteWorkers>,
    pub(crate) ping_interval: Duration,
    /// Becomes true when the server shuts down: long polls end.
    pub(crate) stopping: watch::Receiver<bool>,
    /// Set when the activities an SDK worker's orchestration schedules are created
    /// leased to this server and handed out at once (see
    /// [`crate::Options::hosted_activities`]): the ones the in-process worker hosts,
    /// which are left to it, lower-cased.
    pub(crate) hosted_activities: Option<Arc<std::collections::HashSet<String>>>,
}

/// How long an activity item that no SDK worker could take at its creation waits in
/// the task hub before the dispatcher offers it again.
const HAND_OUT_RETRY: Duration = Duration::from_millis(250);

fn reply<T>(result: Result<T>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

fn now() -> keel::Timestamp {
    use keel::clock::Clock;
    keel::clock::SystemClock.now()
}

fn required_id(instance_id: &str) -> Result<()> {
    if instance_id.is_empty() {
        return Err(Error::InvalidArgument("instanceId is required".into()));
    }
    Ok(())
}

/// An entity id from a request (`@name@key`).
fn entity_id(instance_id: &str) -> Result<EntityId> {
    EntityId::parse(instance_id).map_err(|message| Error::InvalidArgument(format!("instanceId: {message}")))
}

/// Which kind of work item a completion or abandon is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Orchestration,
    Activity,
    Entity,
}

impl Kind {
    fn of(work: &Work) -> Kind {
        match work {
            Work::Orchestration(_) => Kind::Orchestration,
            Work::Activity(_) => Kind::Activity,
            Work::Entity(_) => Kind::Entity,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Orchestration => "an orchestration",
            Kind::Activity => "an activity",
            Kind::Entity => "an entity",
        }
    }
}

/// The statuses an `orchestrationIdReusePolicy` lets a start replace. A running status
/// (Pending, Running, Suspended) without Terminated cannot be honoured: the running
/// instance is terminated to be replaced, and Terminated is not replaceable.
fn reuse_policy(policy: Option<&proto::OrchestrationIdReusePolicy>) -> Result<Vec<RuntimeStatus>> {
    let replaceable = match policy {
        Some(policy) => statuses(&policy.replaceable_status)?,
        None => return Ok(Vec::new()),
    };
    let running: Vec<&str> = replaceable
        .iter()
        .filter(|status| matches!(status, RuntimeStatus::Pending | RuntimeStatus::Running | RuntimeStatus::Suspended))
        .map(|status| status.as_str())
        .collect();
    if !running.is_empty() && !replaceable.contains(&RuntimeStatus::Terminated) {
        return Err(Error::InvalidArgument(format!(
            "the orchestrationIdReusePolicy replaces {} instances but not Terminated ones: a running instance is \
             terminated to be replaced, so the policy must list TERMINATED too",
            running.join(" and ")
        )));
    }
    Ok(replaceable)
}

fn statuses(codes: &[i32]) -> Result<Vec<RuntimeStatus>> {
    codes.iter().map(|code| convert::status_from_proto(*code)).collect()
}

/// The deadline a gRPC client set (`grpc-timeout`), if any.
fn deadline<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

impl Sidecar {
    /// Runs `work` unless the server stops first.
    async fn until_stopping<T>(&self, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let mut stopping = self.stopping.clone();
        tokio::select! {
            result = work => result,
            _ = crate::stopped(&mut stopping) => Err(Error::ShuttingDown),
        }
    }

    async fn start_instance(&self, request: proto::CreateInstanceRequest) -> Result<proto::CreateInstanceResponse> {
        let instance_id =
            if request.instance_id.is_empty() { keel::client::new_instance_id() } else { request.instance_id.clone() };
        let options = StartOptions {
            instance_id: Some(instance_id),
            scheduled_start: request
                .scheduled_start_timestamp
                .as_ref()
                .map(|at| timestamp_from_proto(at, "scheduledStartTimestamp"))
                .transpose()?,
            version: payload(request.version),
            tags: request.tags.into_iter().collect(),
            // Without a policy, any existing instance is refused (as the SDKs' own test
            // backend does).
            replaceable: Some(reuse_policy(request.orchestration_id_reuse_policy.as_ref())?),
            trace: request.parent_trace_context.as_ref().and_then(convert::trace_from_proto),
        };
        let instance_id = self.client.start_raw(&request.name, payload(request.input), options).await?;
        Ok(proto::CreateInstanceResponse { instance_id })
    }

    async fn get_instance(&self, request: proto::GetInstanceRequest) -> Result<proto::GetInstanceResponse> {
        required_id(&request.instance_id)?;
        let status = self.client.get_status(&request.instance_id).await?;
        Ok(proto::GetInstanceResponse {
            exists: status.is_some(),
            orchestration_state: status
                .map(|status| convert::orchestration_state(&status, request.get_inputs_and_outputs)),
        })
    }

    async fn wait_for_instance(
        &self,
        request: proto::GetInstanceRequest,
        timeout: Option<Duration>,
        completion: bool,
    ) -> Result<proto::GetInstanceResponse> {
        required_id(&request.instance_id)?;
        let timeout = timeout.unwrap_or(MAX_LONG_POLL).min(MAX_LONG_POLL);
        let waited = self
            .until_stopping(async {
                let status = if completion {
                    self.client.wait_for_completion(&request.instance_id, timeout).await
                } else {
                    self.client.wait_for_start(&request.instance_id, timeout).await
                };
                Ok(status)
            })
            .await?;
        match waited {
            Ok(status) => Ok(proto::GetInstanceResponse {
                exists: true,
                orchestration_state: Some(convert::orchestration_state(&status, request.get_inputs_and_outputs)),
            }),
            Err(ClientError::NotFound(_)) => {
                Ok(proto::GetInstanceResponse { exists: false, orchestration_state: None })
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn raise_event(&self, request: proto::RaiseEventRequest) -> Result<proto::RaiseEventResponse> {
        required_id(&request.instance_id)?;
        self.client.raise_event_raw(&request.instance_id, &request.name, payload(request.input)).await?;
        Ok(proto::RaiseEventResponse {})
    }

    /// The sub-orchestrations an instance's current execution created.
    async fn children(&self, instance_id: &str) -> Result<Vec<String>> {
        let mut children = Vec::new();
        for event in self.store.read_history(instance_id).await? {
            if let EventKind::SubOrchestrationInstanceCreated { instance_id, .. } = event.kind {
                if !children.contains(&instance_id) {
                    children.push(instance_id);
                }
            }
        }
        Ok(children)
    }

    async fn terminate(&self, request: proto::TerminateRequest) -> Result<proto::TerminateResponse> {
        required_id(&request.instance_id)?;
        let reason = payload(request.output);
        let status = self
            .client
            .get_status(&request.instance_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no orchestration with id '{}'", request.instance_id)))?;
        if !status.status.is_terminal() {
            self.terminate_one(&request.instance_id, reason.as_deref()).await?;
        }
        if request.recursive {
            // The parent first, so that its end is not decided by its children's.
            let mut seen = HashSet::from([request.instance_id.clone()]);
            let mut level = vec![request.instance_id.clone()];
            for _ in 0..MAX_RECURSION_DEPTH {
                let mut next = Vec::new();
                for parent in &level {
                    for child in self.children(parent).await? {
                        if seen.insert(child.clone()) {
                            self.terminate_one(&child, reason.as_deref()).await?;
                            next.push(child);
                        }
                    }
                }
                if next.is_empty() {
                    break;
                }
                level = next;
            }
        }
        Ok(proto::TerminateResponse {})
    }

    /// Terminates one instance; finished or missing ones are left as they are. An
    /// episode of it that waits for a worker goes back to the task hub, so that the
    /// termination takes effect now, worker or not.
    async fn terminate_one(&self, instance_id: &str, output: Option<&str>) -> Result<()> {
        match self.client.terminate_raw(instance_id, output.map(str::to_string)).await {
            Ok(()) => {
                self.remote.release_waiting(instance_id);
                Ok(())
            }
            Err(ClientError::NotFound(_) | ClientError::InvalidState { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    async fn restart(&self, request: proto::RestartInstanceRequest) -> Result<proto::RestartInstanceResponse> {
        required_id(&request.instance_id)?;
        let status = self
            .client
            .get_status(&request.instance_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no orchestration with id '{}'", request.instance_id)))?;
        // Under a new id the old instance is left alone, running or not; under its own
        // id only a finished one can start again.
        if !status.status.is_terminal() && !request.restart_with_new_instance_id {
            return Err(Error::FailedPrecondition(format!(
                "orchestration '{}' is {}; only finished orchestrations can be restarted under the same id",
                request.instance_id, status.status
            )));
        }
        let instance_id = self.client.restart(&request.instance_id, request.restart_with_new_instance_id).await?;
        Ok(proto::RestartInstanceResponse { instance_id })
    }

    async fn query(&self, request: proto::QueryInstancesRequest) -> Result<proto::QueryInstancesResponse> {
        let query = request.query.unwrap_or_default();
        let page_size = usize::try_from(query.max_instance_count)
            .map_err(|_| Error::InvalidArgument("maxInstanceCount must not be negative".into()))?
            .min(SCAN_PAGE);
        let page = self
            .client
            .query(&InstanceQuery {
                statuses: statuses(&query.runtime_status)?,
                instance_id_prefix: payload(query.instance_id_prefix),
                name_prefix: None,
                created_from: query
                    .created_time_from
                    .as_ref()
                    .map(|at| timestamp_from_proto(at, "createdTimeFrom"))
                    .transpose()?,
                created_to: query
                    .created_time_to
                    .as_ref()
                    .map(|at| timestamp_from_proto(at, "createdTimeTo"))
                    .transpose()?,
                page_size,
                continuation: payload(query.continuation_token),
            })
            .await?;
        Ok(proto::QueryInstancesResponse {
            orchestration_state: page
                .instances
                .iter()
                .map(|status| convert::orchestration_state(status, query.fetch_inputs_and_outputs))
                .collect(),
            continuation_token: page.continuation,
        })
    }

    /// Finished instances ordered by completion time (then id); the page token is
    /// `<completed millis>:<instance id>` of the last one returned.
    async fn list_instance_ids(
        &self,
        request: proto::ListInstanceIdsRequest,
    ) -> Result<proto::ListInstanceIdsResponse> {
        let wanted = statuses(&request.runtime_status)?;
        let terminal: Vec<RuntimeStatus> = RuntimeStatus::ALL
            .into_iter()
            .filter(|status| status.is_terminal() && (wanted.is_empty() || wanted.contains(status)))
            .collect();
        if terminal.is_empty() {
            return Ok(proto::ListInstanceIdsResponse::default());
        }
        let from =
            request.completed_time_from.as_ref().map(|at| timestamp_from_proto(at, "completedTimeFrom")).transpose()?;
        let to =
            request.completed_time_to.as_ref().map(|at| timestamp_from_proto(at, "completedTimeTo")).transpose()?;
        let after = match payload(request.last_instance_key) {
            None => None,
            Some(key) => {
                let (millis, instance_id) = key
                    .split_once(':')
                    .and_then(|(millis, id)| Some((millis.parse::<i64>().ok()?, id.to_string())))
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!("'{key}' is not a lastInstanceKey this server made"))
                    })?;
                Some((millis, instance_id))
            }
        };
        let mut found = Vec::new();
        let mut continuation = None;
        loop {
            let page = self
                .client
                .query(&InstanceQuery {
                    statuses: terminal.clone(),
                    page_size: SCAN_PAGE,
                    continuation,
                    ..InstanceQuery::default()
                })
                .await?;
            for status in page.instances {
                let Some(completed) = status.completed_at else { continue };
                let key = (completed.timestamp_millis(), status.instance_id);
                let in_range = from.is_none_or(|from| completed >= from) && to.is_none_or(|to| completed <= to);
                if in_range && after.as_ref().is_none_or(|after| key > *after) {
                    found.push(key);
                }
            }
            continuation = page.continuation;
            if continuation.is_none() {
                break;
            }
        }
        found.sort();
        let page_size = usize::try_from(request.page_size).ok().filter(|size| *size > 0).unwrap_or(usize::MAX);
        let more = found.len() > page_size;
        found.truncate(page_size);
        let last_instance_key =
            if more { found.last().map(|(millis, instance_id)| format!("{millis}:{instance_id}")) } else { None };
        Ok(proto::ListInstanceIdsResponse {
            instance_ids: found.into_iter().map(|(_, instance_id)| instance_id).collect(),
            last_instance_key,
        })
    }

    async fn purge(&self, request: proto::PurgeInstancesRequest) -> Result<proto::PurgeInstancesResponse> {
        use proto::purge_instances_request::Request as Which;
        let deleted = match request.request {
            None => {
                return Err(Error::InvalidArgument(
                    "name an instanceId, a purgeInstanceFilter or an instanceBatch".into(),
                ))
            }
            Some(Which::InstanceId(instance_id)) => {
                required_id(&instance_id)?;
                self.purge_ids(vec![instance_id], request.recursive).await?
            }
            Some(Which::InstanceBatch(batch)) => self.purge_ids(batch.instance_ids, request.recursive).await?,
            Some(Which::PurgeInstanceFilter(filter)) => {
                let filter = PurgeFilter {
                    created_from: filter
                        .created_time_from
                        .as_ref()
                        .map(|at| timestamp_from_proto(at, "createdTimeFrom"))
                        .transpose()?,
                    created_to: filter
                        .created_time_to
                        .as_ref()
                        .map(|at| timestamp_from_proto(at, "createdTimeTo"))
                        .transpose()?,
                    statuses: statuses(&filter.runtime_status)?,
                };
                self.client.purge_where(&filter).await?
            }
        };
        Ok(proto::PurgeInstancesResponse {
            deleted_instance_count: i32::try_from(deleted).unwrap_or(i32::MAX),
            is_complete: Some(true),
        })
    }

    /// Purges finished instances (and, when `recursive`, the sub-orchestrations they
    /// created); unfinished and unknown ones are skipped. Returns how many went.
    async fn purge_ids(&self, instance_ids: Vec<String>, recursive: bool) -> Result<u64> {
        let mut deleted = 0;
        let mut seen = HashSet::new();
        let mut level = instance_ids;
        for _ in 0..MAX_RECURSION_DEPTH {
            let mut next = Vec::new();
            for instance_id in level {
                if !seen.insert(instance_id.clone()) {
                    continue;
                }
                let children = if recursive { self.children(&instance_id).await? } else { Vec::new() };
                match self.client.purge(&instance_id).await {
                    Ok(true) => {
                        deleted += 1;
                        next.extend(children);
                    }
                    Ok(false) | Err(ClientError::InvalidState { .. } | ClientError::NotFound(_)) => {}
                    Err(error) => return Err(error.into()),
                }
            }
            if next.is_empty() {
                break;
            }
            level = next;
        }
        Ok(deleted)
    }

    async fn history(&self, request: proto::StreamInstanceHistoryRequest) -> Result<BoxStream<proto::HistoryChunk>> {
        required_id(&request.instance_id)?;
        let execution_id = payload(request.execution_id);
        // A worker that streams the history of its work item gets exactly the past
        // events of that episode.
        let in_flight = if request.for_work_item_processing {
            self.remote.past_events_in_flight(&request.instance_id)
        } else {
            None
        };
        let (status, history) = match in_flight {
            Some((instance, past_events)) => {
                let past_events = past_events.into_iter().filter(convert::is_for_workers).collect();
                (instance, past_events)
            }
            None => {
                let status =
                    self.client.get_status(&request.instance_id).await?.ok_or_else(|| {
                        Error::NotFound(format!("no orchestration with id '{}'", request.instance_id))
                    })?;
                let history = self.client.get_history(&request.instance_id).await?;
                (status, history)
            }
        };
        if let Some(execution_id) = execution_id {
            if execution_id != status.execution_id {
                return Err(Error::NotFound(format!(
                    "execution '{execution_id}' of '{}' is not its current one; only the current execution's history is kept",
                    request.instance_id
                )));
            }
        }
        let instance_id = request.instance_id;
        let mut events: Vec<proto::HistoryEvent> =
            history.iter().map(|event| convert::event_to_proto(&instance_id, event)).collect();
        convert::tag_execution_started(&mut events, &status.tags);
        // Chunks of at most HISTORY_CHUNK_EVENTS events and about HISTORY_CHUNK_BYTES
        // (an event is at most a payload's size), well under any message limit.
        let mut chunks: Vec<Result<proto::HistoryChunk, Status>> = Vec::new();
        let mut chunk = proto::HistoryChunk::default();
        let mut bytes = 0;
        for event in events {
            bytes += prost::Message::encoded_len(&event);
            chunk.events.push(event);
            if chunk.events.len() >= HISTORY_CHUNK_EVENTS || bytes >= HISTORY_CHUNK_BYTES {
                chunks.push(Ok(std::mem::take(&mut chunk)));
                bytes = 0;
            }
        }
        if !chunk.events.is_empty() {
            chunks.push(Ok(chunk));
        }
        Ok(Box::pin(futures_util::stream::iter(chunks)))
    }

    /// Deletes every instance and entity of the task hub, running ones included (the
    /// API key guards it); work waiting for a worker goes back, to find its instance gone.
    async fn delete_task_hub(&self) -> Result<()> {
        let deleted = self.store.purge_all().await?;
        self.remote.release_all_waiting();
        tracing::info!(deleted, "the task hub was emptied (DeleteTaskHub)");
        Ok(())
    }

    async fn complete_orchestration(&self, response: proto::OrchestratorResponse) -> Result<()> {
        let token = response.completion_token.clone();
        let Some(work) = self.remote.settle(&token) else { return Err(Error::UnknownToken(token)) };
        let episode = match work {
            Work::Orchestration(episode) => episode,
            other => return Err(self.wrong_kind(other, &token)),
        };
        let now = now();
        let decided = if !response.instance_id.is_empty() && response.instance_id != episode.instance.instance_id {
            Err(Error::InvalidArgument(format!(
                "the response is for '{}' but token '{token}' was given for '{}'",
                response.instance_id, episode.instance.instance_id
            )))
        } else {
            convert::outcome_from_response(
                &response,
                &episode.instance.instance_id,
                &episode.instance.execution_id,
                now,
            )
        };
        let (outcome, terminations) = match decided {
            Ok(decided) => decided,
            Err(error) => {
                self.remote.give_back(Work::Orchestration(episode), ABANDON_RETRY_DELAY);
                return Err(error);
            }
        };
        let instance_id = episode.instance.instance_id.clone();
        let execution_id = episode.instance.execution_id.clone();
        let (mut commit, past) = RemoteEpisode::complete_keeping_past(*episode, outcome, now);
        keep_tags(&mut commit, &response.actions);
        for termination in terminations {
            commit.messages.push(Message {
                instance_id: termination.instance_id,
                execution_id: None,
                event: HistoryEvent::new(now, EventKind::ExecutionTerminated { reason: termination.reason }),
                visible_at: now,
            });
        }
        let leased = self.lease_remote_activities(&mut commit, now);
        // The history once this commits, for the instance's next episode.
        let history = match &commit.replace_history {
            Some(new_execution_id) => Some((new_execution_id.clone(), commit.history.clone())),
            None if past.len() + commit.history.len() <= crate::dispatch::LONGEST_KEPT_HISTORY => {
                let mut history = past;
                history.extend(commit.history.iter().cloned());
                Some((execution_id, history))
            }
            None => None,
        };
        let committed = self.commit(commit, now).await?;
        if let Some((execution_id, history)) = history {
            self.remote.keep_history(&instance_id, &execution_id, history);
        }
        self.hand_out(leased, committed, now);
        Ok(())
    }

    /// Creates the activities of `commit` that the in-process worker does not host
    /// leased to this server (when [`Sidecar::hosted_activities`] is set); returns
    /// their items, without their ids yet.
    fn lease_remote_activities(&self, commit: &mut EpisodeCommit, now: keel::Timestamp) -> Vec<ActivityItem> {
        let Some(hosted) = &self.hosted_activities else { return Vec::new() };
        let until = now + chrono::Duration::from_std(crate::HELD_WORK_LEASE).expect("a small duration");
        let mut leased = Vec::new();
        for activity in commit.activities.iter_mut().filter(|activity| !hosted.contains(&activity.name.to_lowercase()))
        {
            leased.push(activity.lease_to_committer(crate::dispatch::new_token(), until));
        }
        leased
    }

    /// Hands the items a commit created leased to SDK workers; one none can take now
    /// goes back to the task hub, for the dispatcher to offer again.
    fn hand_out(&self, leased: Vec<ActivityItem>, committed: keel_store::Committed, now: keel::Timestamp) {
        assert_eq!(leased.len(), committed.leased_activity_ids.len(), "the store returns an id per leased activity");
        for (mut item, id) in leased.into_iter().zip(committed.leased_activity_ids) {
            item.lock.id = id;
            if let Err(item) = keel::RemoteWorkers::offer_activity(self.remote.as_ref(), Box::new(item)) {
                let retry_at = now + chrono::Duration::from_std(HAND_OUT_RETRY).expect("a small duration");
                let store = self.store.clone();
                tokio::spawn(async move {
                    if let Err(error) = store.abandon_activity_item(&item.lock, retry_at).await {
                        tracing::warn!(%error, "giving back an activity item no SDK worker could take failed");
                    }
                });
            }
        }
    }

    /// Commits one episode (or entity batch) and wakes this process's dispatchers when
    /// what it wrote is due later (timers, delayed signals, scheduled starts).
    async fn commit(&self, commit: EpisodeCommit, now: keel::Timestamp) -> Result<keel_store::Committed> {
        // The due times are known before the commit wakes the dispatchers, and the
        // dispatchers are woken after: an idle one sleeps until the earliest of them (a
        // timer fires on time), not until its fallback poll.
        let due: Vec<keel::Timestamp> = commit.due_times(now).collect();
        let notifications = self.store.notifications();
        for at in &due {
            notifications.orchestration_work_due(*at);
        }
        let mut results = self.store.commit_episodes(vec![commit], now).await?;
        let committed = results.pop().unwrap_or(Ok(keel_store::Committed::default()))?;
        if !due.is_empty() {
            notifications.orchestration_work_added();
        }
        Ok(committed)
    }

    /// A completion came for another kind of work item than its token's: the item goes
    /// back to the task hub at once.
    fn wrong_kind(&self, work: Work, token: &str) -> Error {
        let kind = Kind::of(&work);
        self.remote.give_back(work, Duration::ZERO);
        Error::InvalidArgument(format!("'{token}' is the token of {} work item", kind.name()))
    }

    async fn complete_entity(&self, result: proto::EntityBatchResult) -> Result<()> {
        let token = result.completion_token.clone();
        let Some(work) = self.remote.settle(&token) else { return Err(Error::UnknownToken(token)) };
        let episode = match work {
            Work::Entity(episode) => episode,
            other => return Err(self.wrong_kind(other, &token)),
        };
        let outcome = match convert::batch_outcome(&result, &episode) {
            Ok(outcome) => outcome,
            Err(error) => {
                self.remote.give_back(Work::Entity(episode), ABANDON_RETRY_DELAY);
                return Err(error);
            }
        };
        let now = now();
        self.commit((*episode).complete(outcome, now), now).await.map(drop)
    }

    async fn complete_activity(&self, response: proto::ActivityResponse) -> Result<()> {
        let token = response.completion_token.clone();
        let Some(work) = self.remote.settle(&token) else { return Err(Error::UnknownToken(token)) };
        let item = match work {
            Work::Activity(item) => item,
            other => return Err(self.wrong_kind(other, &token)),
        };
        let mismatch = (!response.instance_id.is_empty() && response.instance_id != item.instance_id)
            || response.task_id != item.task_id;
        if mismatch {
            let message = format!(
                "the response is for '{}' task {} but token '{token}' was given for '{}' task {}",
                response.instance_id, response.task_id, item.instance_id, item.task_id
            );
            self.remote.give_back(Work::Activity(item), ABANDON_RETRY_DELAY);
            return Err(Error::InvalidArgument(message));
        }
        let kind = match response.failure_details {
            Some(failure) => EventKind::TaskFailed {
                task_scheduled_id: item.task_id,
                failure: convert::failure_from_proto(&failure),
            },
            None => {
                let result = payload(response.result);
                match limits::check_payload("the activity result", result.as_deref()) {
                    Ok(()) => EventKind::TaskCompleted { task_scheduled_id: item.task_id, result },
                    Err(message) => EventKind::TaskFailed {
                        task_scheduled_id: item.task_id,
                        failure: keel::FailureDetails::new("PayloadTooLarge", message),
                    },
                }
            }
        };
        record_activity_result(self.store.as_ref(), &item, kind).await
    }

    async fn abandon(&self, token: String, kind: Kind) -> Result<()> {
        let Some(work) = self.remote.settle(&token) else { return Err(Error::UnknownToken(token)) };
        let actual = Kind::of(&work);
        self.remote.give_back(work, ABANDON_RETRY_DELAY);
        if actual != kind {
            return Err(Error::InvalidArgument(format!("'{token}' is the token of {} work item", actual.name())));
        }
        Ok(())
    }

    async fn signal_entity(&self, request: proto::SignalEntityRequest) -> Result<proto::SignalEntityResponse> {
        let id = entity_id(&request.instance_id)?;
        let scheduled_time =
            request.scheduled_time.as_ref().map(|at| timestamp_from_proto(at, "scheduledTime")).transpose()?;
        // Keel makes its own request id: a signal answers nobody, so the SDK's is not needed.
        let trace = request.parent_trace_context.as_ref().and_then(convert::trace_from_proto);
        self.client.signal_entity_traced(&id, &request.name, payload(request.input), scheduled_time, trace).await?;
        Ok(proto::SignalEntityResponse {})
    }

    async fn get_entity(&self, request: proto::GetEntityRequest) -> Result<proto::GetEntityResponse> {
        let id = entity_id(&request.instance_id)?;
        // An entity exists while it has a state.
        let entity = self.client.get_entity(&id).await?.filter(|entity| entity.exists());
        Ok(proto::GetEntityResponse {
            exists: entity.is_some(),
            entity: entity.map(|entity| convert::entity_metadata(&entity, request.include_state)),
        })
    }

    async fn query_entities(&self, request: proto::QueryEntitiesRequest) -> Result<proto::QueryEntitiesResponse> {
        let query = request.query.unwrap_or_default();
        let time =
            |at: Option<&prost_types::Timestamp>, what: &str| at.map(|at| timestamp_from_proto(at, what)).transpose();
        let page_size = query.page_size.and_then(|size| usize::try_from(size).ok()).unwrap_or(0).min(SCAN_PAGE);
        let page = self
            .client
            .query_entities(&EntityQuery {
                instance_id_prefix: payload(query.instance_id_starts_with),
                last_modified_from: time(query.last_modified_from.as_ref(), "lastModifiedFrom")?,
                last_modified_to: time(query.last_modified_to.as_ref(), "lastModifiedTo")?,
                include_transient: query.include_transient,
                page_size,
                continuation: payload(query.continuation_token),
            })
            .await?;
        Ok(proto::QueryEntitiesResponse {
            entities: page
                .entities
                .iter()
                .map(|entity| convert::entity_metadata(entity, query.include_state))
                .collect(),
            continuation_token: page.continuation,
        })
    }

    async fn clean_entity_storage(
        &self,
        request: proto::CleanEntityStorageRequest,
    ) -> Result<proto::CleanEntityStorageResponse> {
        // One pass over every entity: no continuation token.
        let cleaned =
            self.client.clean_entity_storage(request.remove_empty_entities, request.release_orphaned_locks).await?;
        let count = |n: u64| i32::try_from(n).unwrap_or(i32::MAX);
        Ok(proto::CleanEntityStorageResponse {
            continuation_token: None,
            empty_entities_removed: count(cleaned.empty_entities_removed),
            orphaned_locks_released: count(cleaned.orphaned_locks_released),
        })
    }
}

/// Keeps the tags of a worker's actions in the commit of its episode: a task's on its
/// `TaskScheduled` event, a sub-orchestration's on the child instance.
fn keep_tags(commit: &mut EpisodeCommit, actions: &[proto::OrchestratorAction]) {
    use proto::orchestrator_action::OrchestratorActionType;
    for action in actions {
        match &action.orchestrator_action_type {
            Some(OrchestratorActionType::ScheduleTask(task)) if !task.tags.is_empty() => {
                let scheduled =
                    commit.history.iter_mut().rev().find(|event| {
                        event.event_id == action.id && matches!(event.kind, EventKind::TaskScheduled { .. })
                    });
                if let Some(HistoryEvent { kind: EventKind::TaskScheduled { tags, .. }, .. }) = scheduled {
                    *tags = task.tags.clone().into_iter().collect();
                }
            }
            Some(OrchestratorActionType::CreateSubOrchestration(sub)) if !sub.tags.is_empty() => {
                let created = commit
                    .new_instances
                    .iter_mut()
                    .filter(|child| child.parent.as_ref().is_some_and(|parent| parent.task_scheduled_id == action.id));
                for child in created {
                    child.tags = sub.tags.clone().into_iter().collect();
                }
            }
            _ => {}
        }
    }
}

/// Commits an activity's result message (and deletes its item) in one step.
pub(crate) async fn record_activity_result(store: &dyn Store, item: &ActivityItem, kind: EventKind) -> Result<()> {
    let now = now();
    let completion = ActivityCompletion {
        lock: item.lock.clone(),
        result: Message {
            instance_id: item.instance_id.clone(),
            execution_id: Some(item.execution_id.clone()),
            event: HistoryEvent::new(now, kind),
            visible_at: now,
        },
    };
    let mut results = store.complete_activities(vec![completion]).await?;
    results.pop().unwrap_or(Ok(()))?;
    Ok(())
}

#[tonic::async_trait]
impl TaskHubSidecarService for Sidecar {
    async fn hello(&self, _request: Request<()>) -> Result<Response<()>, Status> {
        Ok(Response::new(()))
    }

    async fn start_instance(
        &self,
        request: Request<proto::CreateInstanceRequest>,
    ) -> Result<Response<proto::CreateInstanceResponse>, Status> {
        reply(Sidecar::start_instance(self, request.into_inner()).await)
    }

    async fn get_instance(
        &self,
        request: Request<proto::GetInstanceRequest>,
    ) -> Result<Response<proto::GetInstanceResponse>, Status> {
        reply(Sidecar::get_instance(self, request.into_inner()).await)
    }

    async fn rewind_instance(
        &self,
        request: Request<proto::RewindInstanceRequest>,
    ) -> Result<Response<proto::RewindInstanceResponse>, Status> {
        let request = request.into_inner();
        let result = async {
            required_id(&request.instance_id)?;
            self.client.rewind(&request.instance_id, payload(request.reason).as_deref()).await?;
            Ok(proto::RewindInstanceResponse {})
        };
        reply(result.await)
    }

    async fn restart_instance(
        &self,
        request: Request<proto::RestartInstanceRequest>,
    ) -> Result<Response<proto::RestartInstanceResponse>, Status> {
        reply(self.restart(request.into_inner()).await)
    }

    async fn wait_for_instance_start(
        &self,
        request: Request<proto::GetInstanceRequest>,
    ) -> Result<Response<proto::GetInstanceResponse>, Status> {
        let timeout = deadline(&request);
        reply(self.wait_for_instance(request.into_inner(), timeout, false).await)
    }

    async fn wait_for_instance_completion(
        &self,
        request: Request<proto::GetInstanceRequest>,
    ) -> Result<Response<proto::GetInstanceResponse>, Status> {
        let timeout = deadline(&request);
        reply(self.wait_for_instance(request.into_inner(), timeout, true).await)
    }

    async fn raise_event(
        &self,
        request: Request<proto::RaiseEventRequest>,
    ) -> Result<Response<proto::RaiseEventResponse>, Status> {
        reply(Sidecar::raise_event(self, request.into_inner()).await)
    }

    async fn terminate_instance(
        &self,
        request: Request<proto::TerminateRequest>,
    ) -> Result<Response<proto::TerminateResponse>, Status> {
        reply(self.terminate(request.into_inner()).await)
    }

    async fn suspend_instance(
        &self,
        request: Request<proto::SuspendRequest>,
    ) -> Result<Response<proto::SuspendResponse>, Status> {
        let request = request.into_inner();
        let result = async {
            required_id(&request.instance_id)?;
            self.client.suspend(&request.instance_id, payload(request.reason).as_deref()).await?;
            // An episode waiting for a worker is given back: the suspension is recorded
            // now (see `dispatch`), worker or not.
            self.remote.release_waiting(&request.instance_id);
            Ok(proto::SuspendResponse {})
        };
        reply(result.await)
    }

    async fn resume_instance(
        &self,
        request: Request<proto::ResumeRequest>,
    ) -> Result<Response<proto::ResumeResponse>, Status> {
        let request = request.into_inner();
        let result = async {
            required_id(&request.instance_id)?;
            // A no-op unless the instance is suspended: a stray ExecutionResumed would
            // fail a Python orchestration.
            self.client.resume(&request.instance_id, payload(request.reason).as_deref()).await?;
            Ok(proto::ResumeResponse {})
        };
        reply(result.await)
    }

    async fn query_instances(
        &self,
        request: Request<proto::QueryInstancesRequest>,
    ) -> Result<Response<proto::QueryInstancesResponse>, Status> {
        reply(self.query(request.into_inner()).await)
    }

    async fn list_instance_ids(
        &self,
        request: Request<proto::ListInstanceIdsRequest>,
    ) -> Result<Response<proto::ListInstanceIdsResponse>, Status> {
        reply(Sidecar::list_instance_ids(self, request.into_inner()).await)
    }

    async fn purge_instances(
        &self,
        request: Request<proto::PurgeInstancesRequest>,
    ) -> Result<Response<proto::PurgeInstancesResponse>, Status> {
        reply(self.purge(request.into_inner()).await)
    }

    async fn get_work_items(
        &self,
        request: Request<proto::GetWorkItemsRequest>,
    ) -> Result<Response<BoxStream<proto::WorkItem>>, Status> {
        let stream =
            WorkItemStream::open(self.remote.clone(), request.get_ref(), request.remote_addr(), self.ping_interval);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn complete_activity_task(
        &self,
        request: Request<proto::ActivityResponse>,
    ) -> Result<Response<proto::CompleteTaskResponse>, Status> {
        reply(self.complete_activity(request.into_inner()).await.map(|()| proto::CompleteTaskResponse {}))
    }

    async fn complete_orchestrator_task(
        &self,
        request: Request<proto::OrchestratorResponse>,
    ) -> Result<Response<proto::CompleteTaskResponse>, Status> {
        reply(self.complete_orchestration(request.into_inner()).await.map(|()| proto::CompleteTaskResponse {}))
    }

    async fn stream_instance_history(
        &self,
        request: Request<proto::StreamInstanceHistoryRequest>,
    ) -> Result<Response<BoxStream<proto::HistoryChunk>>, Status> {
        reply(self.history(request.into_inner()).await)
    }

    async fn create_task_hub(
        &self,
        request: Request<proto::CreateTaskHubRequest>,
    ) -> Result<Response<proto::CreateTaskHubResponse>, Status> {
        // The task hub exists as soon as the store is open; recreating it empties it.
        let result = async {
            if request.into_inner().recreate_if_exists {
                self.delete_task_hub().await?;
            }
            Ok(proto::CreateTaskHubResponse {})
        };
        reply(result.await)
    }

    async fn delete_task_hub(
        &self,
        _request: Request<proto::DeleteTaskHubRequest>,
    ) -> Result<Response<proto::DeleteTaskHubResponse>, Status> {
        reply(Sidecar::delete_task_hub(self).await.map(|()| proto::DeleteTaskHubResponse {}))
    }

    async fn abandon_task_activity_work_item(
        &self,
        request: Request<proto::AbandonActivityTaskRequest>,
    ) -> Result<Response<proto::AbandonActivityTaskResponse>, Status> {
        reply(
            self.abandon(request.into_inner().completion_token, Kind::Activity)
                .await
                .map(|()| proto::AbandonActivityTaskResponse {}),
        )
    }

    async fn abandon_task_entity_work_item(
        &self,
        request: Request<proto::AbandonEntityTaskRequest>,
    ) -> Result<Response<proto::AbandonEntityTaskResponse>, Status> {
        reply(
            self.abandon(request.into_inner().completion_token, Kind::Entity)
                .await
                .map(|()| proto::AbandonEntityTaskResponse {}),
        )
    }

    async fn complete_entity_task(
        &self,
        request: Request<proto::EntityBatchResult>,
    ) -> Result<Response<proto::CompleteTaskResponse>, Status> {
        reply(self.complete_entity(request.into_inner()).await.map(|()| proto::CompleteTaskResponse {}))
    }

    async fn signal_entity(
        &self,
        request: Request<proto::SignalEntityRequest>,
    ) -> Result<Response<proto::SignalEntityResponse>, Status> {
        reply(Sidecar::signal_entity(self, request.into_inner()).await)
    }

    async fn get_entity(
        &self,
        request: Request<proto::GetEntityRequest>,
    ) -> Result<Response<proto::GetEntityResponse>, Status> {
        reply(Sidecar::get_entity(self, request.into_inner()).await)
    }

    async fn query_entities(
        &self,
        request: Request<proto::QueryEntitiesRequest>,
    ) -> Result<Response<proto::QueryEntitiesResponse>, Status> {
        reply(Sidecar::query_entities(self, request.into_inner()).await)
    }

    async fn clean_entity_storage(
        &self,
        request: Request<proto::CleanEntityStorageRequest>,
    ) -> Result<Response<proto::CleanEntityStorageResponse>, Status> {
        reply(Sidecar::clean_entity_storage(self, request.into_inner()).await)
    }

    async fn abandon_task_orchestrator_work_item(
        &self,
        request: Request<proto::AbandonOrchestrationTaskRequest>,
    ) -> Result<Response<proto::AbandonOrchestrationTaskResponse>, Status> {
        reply(
            self.abandon(request.into_inner().completion_token, Kind::Orchestration)
                .await
                .map(|()| proto::AbandonOrchestrationTaskResponse {}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_deadlines_are_read_from_grpc_timeout() {
        let with = |value: &str| {
            let mut request = Request::new(());
            request.metadata_mut().insert("grpc-timeout", value.parse().unwrap());
            deadline(&request)
        };
        assert_eq!(with("5S"), Some(Duration::from_secs(5)));
        assert_eq!(with("2500m"), Some(Duration::from_millis(2500)));
        assert_eq!(with("1M"), Some(Duration::from_secs(60)));
        assert_eq!(with("7x"), None);
        assert_eq!(deadline(&Request::new(())), None);
    }
}
