//! Keel: durable functions for Rust.
//!
//! Orchestrators are async functions replayed from a durable history; activities do
//! the real work; a [`Worker`] runs both against a task hub ([`store`]); a [`Client`]
//! starts and manages instances.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use keel::{ActivityContext, ActivityError, OrchestrationContext, OrchestrationError, Worker};
//!
//! async fn greet(ctx: OrchestrationContext) -> Result<String, OrchestrationError> {
//!     let name: String = ctx.input()?;
//!     Ok(ctx.call_activity("SayHello", &name).await?)
//! }
//!
//! async fn say_hello(_ctx: ActivityContext, name: String) -> Result<String, ActivityError> {
//!     Ok(format!("Hello {name}!"))
//! }
//!
//! # async fn run() -> anyhow::Result<()> {
//! let store = keel::store::open("sqlite://keel.db").await?;
//! let worker = Worker::builder(store)
//!     .orchestrator("Greet", greet)
//!     .activity("SayHello", say_hello)
//!     .build()
//!     .start();
//! let client = worker.client();
//! let id = client.start_new("Greet", &"Tokyo").await?;
//! let done = client.wait_for_completion(&id, Duration::from_secs(30)).await?;
//! assert_eq!(done.output.as_deref(), Some("\"Hello Tokyo!\""));
//! worker.shutdown(Duration::from_secs(5)).await;
//! # Ok(())
//! # }
//! ```

pub mod activity;
pub mod client;
pub mod clock;
pub mod entity;
pub mod entity_episode;
pub mod episode;
pub mod registry;
pub mod store;
pub mod testing;
pub mod worker;

pub use activity::{ActivityContext, ActivityError};
pub use client::{
    Client, ClientError, EntityMetadata, EntityPage, EntityStorageCleaned, Instance, InstanceState, InstanceStatus,
    Outcome, StartOptions,
};
pub use keel_core::context::{Call, Either, EventTimeout, Race, Retrying};
pub use keel_core::failure::{Failure, Never, TaskFailure};
pub use keel_core::handle::{Activity, Event, Orchestration};
pub use keel_core::impl_failure;
pub use entity::{EntityContext, EntityError};
pub use episode::{NOT_REGISTERED_ERROR_TYPE, POISON_ERROR_TYPE};
pub use keel_core::context::{CriticalSection, LockFuture};
pub use keel_core::context::{EventFuture, TaskFuture, TimerFuture, WhenAny};
pub use keel_core::entity::EntityId;
pub use keel_core::history::{EventKind, FailureDetails, HistoryEvent, RuntimeStatus, Timestamp};
pub use keel_core::{OrchestrationContext, OrchestrationError, RetryPolicy, TaskError};
pub use keel_store::{EntityQuery, InstancePage, InstanceQuery, PurgeFilter};
pub use worker::{RemoteWorkers, Worker, WorkerBuilder, WorkerHandle, WorkerOptions};
