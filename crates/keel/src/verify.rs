//! Checking a deploy before it happens: replay the histories of a task hub's running
//! instances against the code of this build, commit nothing, and report for each
//! instance whether the code still matches its history or where it first diverges.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let store = keel::store::open("sqlite://keel.db").await?;
//! let worker = keel::Worker::builder(store) /* .orchestration(…) as the new build has them */ .build();
//! let report = worker.verify(&keel::verify::VerifyFilter::default()).await?;
//! for instance in report.diverged() {
//!     eprintln!("{}: {}", instance.instance_id, instance.verdict);
//! }
//! std::process::exit(if report.is_clean() { 0 } else { 1 });
//! # }
//! ```

use std::sync::Arc;

use keel_core::history::{HistoryEvent, RuntimeStatus};
use keel_store::{InstanceQuery, InstanceRecord, Store};
use serde::Serialize;

use crate::registry::Registry;
use crate::testing::{replay, HistoryExport};

/// Which instances [`crate::Worker::verify`] replays.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyFilter {
    /// Statuses to check; the default is every status that may still run
    /// (Pending, Running, Suspended).
    pub statuses: Vec<RuntimeStatus>,
    /// Only orchestrations whose name starts with this.
    pub name_prefix: Option<String>,
    /// Only instances of this version.
    pub version: Option<String>,
}

impl Default for VerifyFilter {
    fn default() -> VerifyFilter {
        VerifyFilter {
            statuses: vec![RuntimeStatus::Pending, RuntimeStatus::Running, RuntimeStatus::Suspended],
            name_prefix: None,
            version: None,
        }
    }
}

/// The verdict on one instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "camelCase")]
pub enum Verdict {
    /// The code replays the history exactly.
    Ok,
    /// The code does not match the history; `divergence` names the sequence number,
    /// what the history has and what the code did.
    Diverged {
        /// Where the replay left the history.
        divergence: String,
    },
    /// This build has no code for the orchestration (or for its version).
    NotHosted,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Ok => f.write_str("ok"),
            Verdict::Diverged { divergence } => write!(f, "diverged: {divergence}"),
            Verdict::NotHosted => f.write_str("not hosted: this build has no code for it"),
        }
    }
}

/// One instance's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceVerdict {
    /// The instance replayed.
    pub instance_id: String,
    /// The orchestration's name.
    pub name: String,
    /// The orchestration version the instance runs; `None` when unversioned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Events replayed.
    pub history_len: usize,
    /// Whether the code matches the instance's history.
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// What a verification found, one verdict per instance, ordered by instance id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// One verdict per instance checked, ordered by instance id.
    pub instances: Vec<InstanceVerdict>,
}

impl VerifyReport {
    /// True when every instance replays cleanly.
    pub fn is_clean(&self) -> bool {
        self.instances.iter().all(|instance| instance.verdict == Verdict::Ok)
    }

    /// The instances whose verdict is not [`Verdict::Ok`].
    pub fn diverged(&self) -> impl Iterator<Item = &InstanceVerdict> {
        self.instances.iter().filter(|instance| instance.verdict != Verdict::Ok)
    }
}

/// Replays one history against the code `registry` has for it.
pub(crate) fn verify_history(
    registry: &Registry,
    instance_id: &str,
    name: &str,
    version: Option<&str>,
    history: &[HistoryEvent],
) -> InstanceVerdict {
    let verdict = match registry.orchestrator(name, version) {
        None => Verdict::NotHosted,
        Some(orchestrator) => match replay(orchestrator, instance_id, history) {
            Ok(_) => Verdict::Ok,
            Err(divergence) => Verdict::Diverged { divergence: divergence.message },
        },
    };
    InstanceVerdict {
        instance_id: instance_id.to_string(),
        name: name.to_string(),
        version: version.map(str::to_string),
        history_len: history.len(),
        verdict,
    }
}

/// Replays an exported history against the code `registry` has for it.
pub(crate) fn verify_export(registry: &Registry, export: &HistoryExport) -> InstanceVerdict {
    verify_history(registry, &export.instance_id, &export.name, export.version.as_deref(), &export.events)
}

/// How many histories are read and replayed at once.
const CONCURRENCY: usize = 16;

/// Replays every instance of the hub that `filter` selects.
pub(crate) async fn verify_hub(
    store: &Arc<dyn Store>,
    registry: &Arc<Registry>,
    filter: &VerifyFilter,
) -> keel_store::Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut query = InstanceQuery {
        statuses: filter.statuses.clone(),
        name_prefix: filter.name_prefix.clone(),
        page_size: 1000,
        ..InstanceQuery::default()
    };
    loop {
        let page = store.query_instances(&query).await?;
        let selected: Vec<InstanceRecord> = page
            .instances
            .into_iter()
            .filter(|instance| filter.version.is_none() || instance.version == filter.version)
            .collect();
        for chunk in selected.chunks(CONCURRENCY) {
            let mut running = tokio::task::JoinSet::new();
            for (position, instance) in chunk.iter().cloned().enumerate() {
                let store = store.clone();
                let registry = registry.clone();
                running.spawn(async move {
                    let history = if instance.history_len == 0 {
                        Vec::new()
                    } else {
                        store.read_history(&instance.instance_id).await?
                    };
                    let verdict = verify_history(
                        &registry,
                        &instance.instance_id,
                        &instance.name,
                        instance.version.as_deref(),
                        &history,
                    );
                    Ok::<_, keel_store::Error>((position, verdict))
                });
            }
            let mut verdicts = Vec::with_capacity(chunk.len());
            while let Some(joined) = running.join_next().await {
                verdicts.push(joined.expect("a verification task never panics")?);
            }
            verdicts.sort_by_key(|(position, _)| *position);
            report.instances.extend(verdicts.into_iter().map(|(_, verdict)| verdict));
        }
        match page.continuation {
            Some(token) => query.continuation = Some(token),
            None => return Ok(report),
        }
    }
}
