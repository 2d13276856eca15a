//! The hand-off to remote workers: orchestrators and activities that the local worker
//! does not host are offered to a `RemoteWorkers`, which replays the episode elsewhere
//! and commits its decisions with `RemoteEpisode::complete`. Here the "remote worker"
//! is keel-core's replay engine driven by the test, standing where a gRPC worker would;
//! unhosted entities likewise run their batches there.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{temp_store, wait_for_state, worker, WAIT};
use keel::entity_episode::EntityEpisode;
use keel::episode::{RemoteEpisode, RemoteOutcome};
use keel::{
    Activity, Event, EventKind, HistoryEvent, Orchestration, OrchestrationContext, OrchestrationError, RemoteWorkers,
    RuntimeStatus,
};
use keel_core::replay::{typed_orchestrator, Execution, Orchestrator};
use keel_store::{ActivityCompletion, ActivityItem, Message, Store};

/// Hosted by the "remote worker" only: the local worker registers none of these.
const COUNTDOWN: Orchestration<u32, String> = Orchestration::new("Countdown");
const DECREMENT: Activity<u32, u32> = Activity::new("Decrement");
const WORD: Event<String> = Event::new("Word");

/// Counts down from its input with an activity, a timer and continue-as-new, then
/// waits for an event.
async fn countdown(ctx: OrchestrationContext, n: u32) -> Result<String, OrchestrationError> {
    if n > 0 {
        let next = ctx.call(DECREMENT, &n).await?;
        ctx.sleep(Duration::from_millis(20)).await;
        return ctx.continue_as_new(&next);
    }
    let word = ctx.wait(WORD).await?;
    Ok(format!("liftoff: {word}"))
}

struct FakeRemote {
    store: Arc<dyn Store>,
    orchestrator: Orchestrator,
    episodes: AtomicU32,
    activities: AtomicU32,
    entity_batches: AtomicU32,
}

impl RemoteWorkers for FakeRemote {
    fn offer_orchestration(&self, episode: Box<RemoteEpisode>) -> Result<(), Box<RemoteEpisode>> {
        self.episodes.fetch_add(1, Ordering::SeqCst);
        let store = self.store.clone();
        let orchestrator = self.orchestrator.clone();
        tokio::spawn(async move {
            let mut execution = Execution::new(&episode.instance.instance_id, orchestrator);
            let result = execution.run_episode(&episode.past_events, &episode.new_events);
            let outcome = RemoteOutcome {
                actions: result.actions,
                completion: result.completion,
                custom_status: result.custom_status,
                traces: Default::default(),
            };
            let commit = episode.complete(outcome, chrono::Utc::now());
            let results = store.commit_episodes(vec![commit], chrono::Utc::now()).await.expect("commit");
            results.into_iter().for_each(|result| drop(result.expect("the episode commits")));
        });
        Ok(())
    }

    fn offer_activity(&self, item: Box<ActivityItem>) -> Result<(), Box<ActivityItem>> {
        self.activities.fetch_add(1, Ordering::SeqCst);
        let store = self.store.clone();
        tokio::spawn(async move {
            let n: u32 = serde_json::from_str(item.input.as_deref().unwrap()).unwrap();
            let now = chrono::Utc::now();
            let result = Message {
                instance_id: item.instance_id.clone(),
                execution_id: Some(item.execution_id.clone()),
                event: HistoryEvent::new(
                    now,
                    EventKind::TaskCompleted { task_scheduled_id: item.task_id, result: Some((n - 1).to_string()) },
                ),
                visible_at: now,
            };
            let completion = ActivityCompletion { lock: item.lock.clone(), result };
            store.complete_activities(vec![completion]).await.expect("complete").pop().unwrap().unwrap();
        });
        Ok(())
    }

    fn offer_entity(&self, episode: Box<EntityEpisode>) -> Result<(), Box<EntityEpisode>> {
        self.entity_batches.fetch_add(1, Ordering::SeqCst);
        let store = self.store.clone();
        tokio::spawn(async move {
            let entity = keel::entity::entity(keel_samples::counter::counter);
            let now = chrono::Utc::now();
            let outcome =
                keel::entity::run_batch(&entity, &episode.id, episode.state.clone(), &episode.operations, now);
            let commit = episode.complete(outcome, now);
            let results = store.commit_episodes(vec![commit], now).await.expect("commit");
            results.into_iter().for_each(|result| drop(result.expect("the batch commits")));
        });
        Ok(())
    }
}

#[tokio::test]
async fn unhosted_orchestrators_and_activities_run_on_remote_workers() {
    let (store, _dir) = temp_store().await;
    let remote = Arc::new(FakeRemote {
        store: store.clone(),
        orchestrator: typed_orchestrator(countdown),
        episodes: AtomicU32::new(0),
        activities: AtomicU32::new(0),
        entity_batches: AtomicU32::new(0),
    });
    let worker = worker(&store).remote_workers(remote.clone()).build().start();
    let client = keel::Client::new(store.clone());
    let id = client.start(COUNTDOWN, &3).await.unwrap().id().to_string();
    wait_for_state(&client, &id, "its last execution", |state| {
        state.input.as_deref() == Some("0") && state.status == RuntimeStatus::Running
    })
    .await;
    client.raise(&id, WORD, &"go".to_string()).await.unwrap();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.status, RuntimeStatus::Completed, "{done:?}");
    assert_eq!(done.output.as_deref(), Some("\"liftoff: go\""));
    assert_eq!(remote.activities.load(Ordering::SeqCst), 3, "three decrements ran remotely");
    assert!(remote.episodes.load(Ordering::SeqCst) >= 8, "every episode ran remotely");

    // An entity no local code hosts runs remotely too.
    let counter = keel::EntityId::new("Tally", "t").unwrap();
    client.signal_entity(&counter, "add", &4).await.unwrap();
    client.signal_entity(&counter, "add", &5).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.get_entity(&counter).await.unwrap().and_then(|entity| entity.state).as_deref() != Some("9") {
        assert!(tokio::time::Instant::now() < deadline, "the remote entity never got both signals");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(remote.entity_batches.load(Ordering::SeqCst) >= 1);
    worker.shutdown(WAIT).await;
}

/// Remote workers that are never connected: they take nothing.
struct NoRemote;

impl RemoteWorkers for NoRemote {
    fn offer_orchestration(&self, episode: Box<RemoteEpisode>) -> Result<(), Box<RemoteEpisode>> {
        Err(episode)
    }

    fn offer_activity(&self, item: Box<ActivityItem>) -> Result<(), Box<ActivityItem>> {
        Err(item)
    }

    fn offer_entity(&self, episode: Box<EntityEpisode>) -> Result<(), Box<EntityEpisode>> {
        Err(episode)
    }
}

#[tokio::test]
async fn terminate_ends_an_instance_whose_worker_never_came() {
    let (store, _dir) = temp_store().await;
    let worker = worker(&store).remote_workers(Arc::new(NoRemote)).build().start();
    let client = keel::Client::new(store.clone());
    let id = client.start_new("HostedElsewhere", &()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(client.get_status(&id).await.unwrap().unwrap().status, RuntimeStatus::Pending);
    client.terminate(&id, Some("nobody runs it")).await.unwrap();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.status, RuntimeStatus::Terminated);
    assert_eq!(done.output.as_deref(), Some("\"nobody runs it\""));
    worker.shutdown(WAIT).await;
}
