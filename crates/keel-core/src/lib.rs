//! Keel's core: the history model and the replay state machine.
//!
//! Pure code: no I/O, no async runtime, no wall clock, no randomness (`clippy.toml`
//! fences these off). An orchestrator is an async function; [`replay::Execution`]
//! drives it from history events and reports the actions it takes, which the runtime
//! then executes and records.

#![deny(missing_docs)]
// Failures carry their whole details by value (type, message, stack, cause, properties):
// they are the cold path, and boxing them would make every caller's code noisier.
#![allow(clippy::result_large_err)]

pub mod action;
pub mod context;
pub mod entity;
pub mod failure;
pub mod handle;
pub mod history;
pub mod limits;
pub mod replay;
pub mod retry;
pub mod trace;

pub use action::{Action, Completion};
pub use context::{OrchestrationContext, OrchestrationError, TaskError};
pub use history::{EventKind, FailureDetails, HistoryEvent, RuntimeStatus, Timestamp};
pub use replay::{orchestrator, EpisodeResult, Execution, Orchestrator};
pub use retry::RetryPolicy;
