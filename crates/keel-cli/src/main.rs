//! `keel`: `keel serve` runs the function host (on a task hub: the Durable Functions
//! HTTP API, the dashboard, the gRPC endpoint for the Durable Task SDKs, and with
//! `--samples` the sample app); `keel verify` checks a task hub's running instances
//! (or an exported history) against the sample app's code; the other subcommands drive
//! a running host over that API (`keel entity …` its entities).

mod commands;
mod output;
mod remote;
mod serve;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "keel", version, about = "Keel: durable functions for Rust — the function host and its client")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the function host: the HTTP API, the dashboard, gRPC for the SDKs (and the sample app with --samples).
    Serve(serve::ServeArgs),
    /// Start an orchestration.
    Start {
        /// The orchestrator's name, e.g. PlaceOrder.
        name: String,
        /// The instance id (a new random one by default).
        #[arg(long)]
        id: Option<String>,
        /// The input: JSON text, or @FILE to read it from a file.
        #[arg(long)]
        input: Option<String>,
        /// The orchestration version the instance runs (the host's default when omitted).
        #[arg(long)]
        version: Option<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Show an instance's status.
    Status {
        instance_id: String,
        /// Include the history.
        #[arg(long)]
        history: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Wait until an instance has finished.
    Wait {
        instance_id: String,
        /// Give up after this many seconds (exit code 1).
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// List instances.
    List {
        /// Only these statuses (repeat or separate with commas).
        #[arg(long, value_delimiter = ',')]
        status: Vec<String>,
        /// Only instance ids that start with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Only orchestrator names that start with this.
        #[arg(long)]
        name: Option<String>,
        /// Only instances created at or after this time (ISO 8601).
        #[arg(long)]
        from: Option<String>,
        /// Only instances created before this time (ISO 8601).
        #[arg(long)]
        to: Option<String>,
        /// Page size.
        #[arg(long, default_value_t = 100)]
        top: usize,
        /// Follow continuation tokens and list every page.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Raise an external event.
    Raise {
        instance_id: String,
        event: String,
        /// The event data as JSON (null when omitted).
        data: Option<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Terminate an instance.
    Terminate(ReasonArgs),
    /// Suspend an instance.
    Suspend(ReasonArgs),
    /// Resume a suspended instance.
    Resume(ReasonArgs),
    /// Rewind a failed instance.
    Rewind(ReasonArgs),
    /// Start a finished instance again with its input.
    Restart {
        instance_id: String,
        /// Reuse the instance id instead of taking a new one.
        #[arg(long)]
        same_id: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Delete a finished instance, or the finished instances that match a filter.
    Purge {
        /// The instance to purge (or use --from).
        #[arg(required_unless_present = "from", conflicts_with_all = ["from", "to", "status"])]
        instance_id: Option<String>,
        /// Purge instances created at or after this time (ISO 8601).
        #[arg(long)]
        from: Option<String>,
        /// ... and before this time (default: now).
        #[arg(long)]
        to: Option<String>,
        /// ... with these statuses (default: every finished status).
        #[arg(long, value_delimiter = ',')]
        status: Vec<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Show an instance's history; with --json, export it (`keel history ID --json > h.json`)
    /// for `keel verify --history`.
    History {
        instance_id: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Replay a task hub's running instances (or an exported history) against the code of
    /// this build's sample app, writing nothing; exit code 1 when any does not replay.
    Verify(verify::VerifyArgs),
    /// Signal, read, list, delete and clean up durable entities.
    Entity {
        #[command(subcommand)]
        command: EntityCommand,
    },
}

#[derive(Subcommand)]
enum EntityCommand {
    /// Signal an operation on an entity (its first operation creates it).
    Signal {
        /// The entity's name, e.g. Counter.
        name: String,
        /// The entity's key, e.g. c1.
        key: String,
        /// The operation, e.g. add.
        operation: String,
        /// The operation's input: JSON text, or @FILE to read it from a file (none when omitted).
        #[arg(allow_negative_numbers = true)]
        input: Option<String>,
        /// Deliver the signal at this time (ISO 8601) instead of at once.
        #[arg(long)]
        at: Option<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Show an entity's state (fails when it has none).
    Get {
        name: String,
        key: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Delete an entity's state (signals its `delete` operation).
    Delete {
        name: String,
        key: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// List entities.
    List {
        /// Only entities with this name.
        #[arg(long, conflicts_with = "prefix")]
        name: Option<String>,
        /// Only entities whose name starts with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Show each entity's state.
        #[arg(long)]
        state: bool,
        /// Also list entities without state (deleted, or only locked or waiting).
        #[arg(long)]
        transient: bool,
        /// Only entities whose last operation was at or after this time (ISO 8601).
        #[arg(long)]
        from: Option<String>,
        /// Only entities whose last operation was before this time (ISO 8601).
        #[arg(long)]
        to: Option<String>,
        /// Page size.
        #[arg(long, default_value_t = 100)]
        top: usize,
        /// Follow continuation tokens and list every page.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Remove entities without state and release locks held for orchestrations that are gone or finished.
    Clean {
        /// Keep the entities without state.
        #[arg(long)]
        keep_empty: bool,
        /// Leave orphaned locks held.
        #[arg(long)]
        keep_locks: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

/// How to reach a running host.
#[derive(Args, Clone, Debug)]
struct RemoteArgs {
    /// The host's URL.
    #[arg(long, env = "KEEL_URL", default_value = "http://127.0.0.1:7071")]
    url: String,
    /// The host's API key, when it has one.
    #[arg(long, env = "KEEL_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print the host's JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ReasonArgs {
    instance_id: String,
    /// Why (recorded in the history).
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    remote: RemoteArgs,
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(cli.command))
}

/// Runs a subcommand; the exit code is a failure when it failed (the error is printed)
/// or, for `keel verify`, when an instance does not replay.
async fn run(command: Command) -> anyhow::Result<ExitCode> {
    use commands::Session;
    let session = |remote: RemoteArgs| Session::new(&remote.url, remote.api_key, remote.json);
    match command {
        Command::Verify(args) => return verify::run(args).await,
        Command::Serve(args) => serve::run(args).await,
        Command::Start { name, id, input, version, remote } => {
            let input = input.map(read_input).transpose()?;
            session(remote)?.start(&name, id.as_deref(), version.as_deref(), input).await
        }
        Command::Status { instance_id, history, remote } => session(remote)?.status(&instance_id, history).await,
        Command::Wait { instance_id, timeout, remote } => session(remote)?.wait(&instance_id, timeout).await,
        Command::List { status, prefix, name, from, to, top, all, remote } => {
            let filter = commands::ListFilter { statuses: status, prefix, name, from, to, top, all };
            session(remote)?.list(&filter).await
        }
        Command::Raise { instance_id, event, data, remote } => session(remote)?.raise(&instance_id, &event, data).await,
        Command::Terminate(args) => session(args.remote)?.control(&args.instance_id, "terminate", args.reason).await,
        Command::Suspend(args) => session(args.remote)?.control(&args.instance_id, "suspend", args.reason).await,
        Command::Resume(args) => session(args.remote)?.control(&args.instance_id, "resume", args.reason).await,
        Command::Rewind(args) => session(args.remote)?.control(&args.instance_id, "rewind", args.reason).await,
        Command::Restart { instance_id, same_id, remote } => session(remote)?.restart(&instance_id, same_id).await,
        Command::Purge { instance_id, from, to, status, remote } => match instance_id {
            Some(instance_id) => session(remote)?.purge_one(&instance_id).await,
            None => session(remote)?.purge_where(from.as_deref().unwrap_or_default(), to.as_deref(), &status).await,
        },
        Command::History { instance_id, remote } => session(remote)?.history(&instance_id).await,
        Command::Entity { command } => run_entity(command).await,
    }?;
    Ok(ExitCode::SUCCESS)
}

async fn run_entity(command: EntityCommand) -> anyhow::Result<()> {
    use commands::Session;
    let session = |remote: RemoteArgs| Session::new(&remote.url, remote.api_key, remote.json);
    match command {
        EntityCommand::Signal { name, key, operation, input, at, remote } => {
            let input = input.map(read_input).transpose()?;
            session(remote)?.signal_entity(&name, &key, &operation, input, at.as_deref()).await
        }
        EntityCommand::Get { name, key, remote } => session(remote)?.get_entity(&name, &key).await,
        EntityCommand::Delete { name, key, remote } => session(remote)?.delete_entity(&name, &key).await,
        EntityCommand::List { name, prefix, state, transient, from, to, top, all, remote } => {
            let filter = commands::EntityFilter { name, prefix, state, transient, from, to, top, all };
            session(remote)?.list_entities(&filter).await
        }
        EntityCommand::Clean { keep_empty, keep_locks, remote } => {
            session(remote)?.clean_entities(!keep_empty, !keep_locks).await
        }
    }
}

/// `--input`: JSON text, or `@FILE`.
fn read_input(input: String) -> anyhow::Result<String> {
    match input.strip_prefix('@') {
        Some(path) => {
            let path = PathBuf::from(path);
            std::fs::read_to_string(&path).map_err(|error| anyhow::anyhow!("cannot read {}: {error}", path.display()))
        }
        None => Ok(input),
    }
}
