//! Keel: durable functions for Rust.
//!
//! Orchestrators are async functions replayed from a durable history; activities do
//! the real work; a [`Worker`] runs both against a task hub ([`store`]); a [`Client`]
//! starts and manages instances.
//!
//! ```
//! use std::time::Duration;
//! use keel::{Activity, ActivityContext, Never, Orchestration, OrchestrationContext, OrchestrationError, Outcome, Worker};
//!
//! const GREET: Orchestration<String, String> = Orchestration::new("Greet");
//! const SAY_HELLO: Activity<String, String, Never> = Activity::new("SayHello");
//!
//! async fn greet(ctx: OrchestrationContext, name: String) -> Result<String, OrchestrationError> {
//!     Ok(ctx.call(SAY_HELLO, &name).await?)
//! }
//!
//! async fn say_hello(_ctx: ActivityContext, name: String) -> Result<String, Never> {
//!     Ok(format!("Hello {name}!"))
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> anyhow::Result<()> {
//! # let dir = tempfile::tempdir()?;
//! # let url = format!("sqlite://{}", dir.path().join("keel.db").display());
//! let store = keel::store::open(&url).await?; // e.g. "sqlite://keel.db"
//! let worker = Worker::builder(store)
//!     .orchestration(GREET, greet)
//!     .activity(SAY_HELLO, say_hello)
//!     .build()
//!     .start();
//! let client = worker.client();
//! let instance = client.start(GREET, &"Tokyo".to_string()).await?;
//! let outcome = instance.wait(Duration::from_secs(30)).await?;
//! assert_eq!(outcome, Outcome::Completed("Hello Tokyo!".to_string()));
//! worker.shutdown(Duration::from_secs(5)).await;
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

pub mod activity;
pub mod client;
pub mod clock;
pub mod entity;
pub mod entity_episode;
pub mod episode;
pub mod metrics;
pub mod registry;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod testing;
pub mod verify;
pub mod versioning;
pub mod worker;

pub use activity::{ActivityContext, ActivityError};
pub use client::{
    Client, ClientError, EntityMetadata, EntityPage, EntityStorageCleaned, Instance, InstanceState, InstanceStatus,
    Outcome, StartOptions,
};
pub use entity::{EntityContext, EntityError};
pub use episode::{NOT_REGISTERED_ERROR_TYPE, POISON_ERROR_TYPE};
pub use keel_core::context::{Call, Either, EventTimeout, Race, Retrying};
pub use keel_core::context::{CriticalSection, LockFuture};
pub use keel_core::context::{EventFuture, TaskFuture, TimerFuture, WhenAny};
pub use keel_core::entity::EntityId;
pub use keel_core::failure::{Failure, Never, TaskFailure};
pub use keel_core::handle::{Activity, Event, Orchestration};
pub use keel_core::history::{EventKind, FailureDetails, HistoryEvent, RuntimeStatus, Timestamp};
pub use keel_core::impl_failure;
pub use keel_core::{OrchestrationContext, OrchestrationError, RetryPolicy, TaskError};
pub use keel_store::{EntityQuery, InstancePage, InstanceQuery, PurgeFilter};
pub use metrics::Metrics;
pub use versioning::{VersionFailure, VersionMatch, Versioning};
pub use worker::{RemoteWorkers, Worker, WorkerBuilder, WorkerHandle, WorkerOptions};
