//! Keel's test kit (not published): what the reliability tests share.
//!
//! - [`faults`]: a seeded fault-injecting wrapper around any `keel_store::Store`
//!   (errors before and after writes, delays, leases cut short, a process killed at a
//!   chosen call), with counts of what it injected;
//! - [`clock`]: a simulated clock on tokio's paused clock, which a simulation jumps;
//! - [`sim`]: the simulation `keel-sim` runs: random workloads of every pattern on a
//!   real SQLite task hub, with crashes, faults and clock jumps, and the checks of
//!   Keel's promises;
//! - [`rng`]: the seeded randomness all of it draws from;
//! - [`process`]: child processes for the crash tests (a test binary runs one of its
//!   own ignored tests as a worker, kills it with SIGKILL, reaps it).

#![deny(missing_docs)]

pub mod clock;
pub mod faults;
pub mod process;
pub mod rng;
pub mod sim;
