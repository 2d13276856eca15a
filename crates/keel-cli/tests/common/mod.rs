//! Shared helpers of the end-to-end tests: run the real `keel serve` binary on port 0
//! with a task hub in a temporary directory (and the sample app, unless a test asks for
//! a host without it), find its address, and poll instances and entities.

#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The management API's path.
pub const API: &str = "/runtime/webhooks/durabletask";

/// Long enough for anything a test waits for; a hang fails instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(30);

/// A `keel serve` process, killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// The gRPC endpoint for the Durable Task SDKs: `http://127.0.0.1:PORT`.
    pub grpc: String,
    /// The task hub's URL (`sqlite://…/hub.db` in the temp dir unless a test gave one).
    pub store: String,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts `keel serve --samples --port 0` on a SQLite task hub in a temp dir, with
    /// extra arguments.
    pub fn start(extra_args: &[&str]) -> Server {
        Server::start_on(None, extra_args)
    }

    /// Starts `keel serve --samples --port 0` on the task hub `store` (a SQLite file in a
    /// temp dir when `None`), with extra arguments.
    pub fn start_on(store: Option<&str>, extra_args: &[&str]) -> Server {
        Server::spawn(store, &[&["--samples"], extra_args].concat())
    }

    /// Starts `keel serve --port 0` without the sample app: a host with no functions of
    /// its own.
    pub fn start_without_samples(extra_args: &[&str]) -> Server {
        Server::spawn(None, extra_args)
    }

    /// Starts `keel serve --samples --port 0` on the task hub `store` (a SQLite file in a
    /// temp dir when `None`) with these environment variables set.
    pub fn start_with_env(store: Option<&str>, extra_args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::spawn_with(store, &[&["--samples"], extra_args].concat(), env)
    }

    fn spawn(store: Option<&str>, extra_args: &[&str]) -> Server {
        Server::spawn_with(store, extra_args, &[])
    }

    /// Starts `keel serve --samples --port 0` with `open_files` as its open-file limit,
    /// soft and hard (so the host cannot raise it), with extra arguments.
    #[cfg(unix)]
    pub fn start_with_open_file_limit(open_files: u64, extra_args: &[&str]) -> Server {
        Server::spawn_limited(None, &[&["--samples"], extra_args].concat(), &[], Some(open_files))
    }

    fn spawn_with(store: Option<&str>, extra_args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::spawn_limited(store, extra_args, env, None)
    }

    fn spawn_limited(
        store: Option<&str>,
        extra_args: &[&str],
        env: &[(&str, &str)],
        open_files: Option<u64>,
    ) -> Server {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = match store {
            Some(store) => store.to_string(),
            None => format!("sqlite://{}", dir.path().join("hub.db").display()),
        };
        let log = std::fs::File::create(dir.path().join("host.log")).expect("a log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        command
            .args(["serve", "--port", "0", "--grpc-port", "0", "--store", &store])
            .args(extra_args)
            .env_remove("KEEL_API_KEY")
            .env_remove("KEEL_STORE")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        #[cfg(unix)]
        if let Some(open_files) = open_files {
            limit_open_files(&mut command, open_files);
        }
        #[cfg(not(unix))]
        assert!(open_files.is_none(), "open-file limits are set on Unix only");
        let mut child = command.spawn().expect("keel serve starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut stdout = BufReader::new(stdout);
        let mut first_line = String::new();
        stdout.read_line(&mut first_line).expect("keel serve prints its address");
        fn no_address(dir: &Path, printed: &str) -> ! {
            let log = std::fs::read_to_string(dir.join("host.log")).unwrap_or_default();
            panic!("no address in {printed:?}; log:\n{log}")
        }
        let base = first_line
            .split_whitespace()
            .find(|word| word.starts_with("http://"))
            .unwrap_or_else(|| no_address(dir.path(), &first_line))
            .to_string();
        // The gRPC address follows on a line of its own.
        let mut grpc = None;
        let mut line = String::new();
        while grpc.is_none() {
            line.clear();
            if stdout.read_line(&mut line).expect("keel serve prints its addresses") == 0 {
                no_address(dir.path(), "the gRPC line");
            }
            grpc =
                line.strip_prefix("  gRPC (Durable Task SDKs): ").map(|address| format!("http://{}", address.trim()));
        }
        // Keep reading what the host prints, so that its writes never fail.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        Server { child, base, grpc: grpc.expect("the loop ends with an address"), store, dir }
    }

    /// Kills the host and waits for it to exit; its temp dir (and task hub) stays until
    /// the `Server` is dropped.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The management API URL of a path under it.
    pub fn api(&self, path: &str) -> String {
        format!("{}{API}{path}", self.base)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("host.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes `command`'s process start with `open_files` as its open-file limit, soft and hard.
#[cfg(unix)]
fn limit_open_files(command: &mut Command, open_files: u64) {
    use std::os::unix::process::CommandExt;
    let limit = libc::rlimit { rlim_cur: open_files, rlim_max: open_files };
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // setrlimit, which is async-signal-safe.
    unsafe {
        command.pre_exec(move || match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        });
    }
}

/// An HTTP client for the tests (no proxy, short timeouts).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(WAIT).build().expect("a client")
}

/// Starts orchestration `name` as instance `id` over the HTTP API with the API key
/// `key` (and `input` as its body); expects 202.
pub async fn start_with_key(server: &Server, key: &str, name: &str, id: &str, input: Option<Value>) {
    let mut request = http().post(server.api(&format!("/orchestrators/{name}/{id}"))).header("x-functions-key", key);
    if let Some(input) = input {
        request = request.json(&input);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
}

/// Polls an instance's status until it is finished; returns the status object.
pub async fn wait_until_finished(server: &Server, instance_id: &str) -> Value {
    wait_for_status(server, instance_id, &["Completed", "Failed", "Terminated", "Canceled"]).await
}

/// Polls an instance's status until it is one of `statuses`.
pub async fn wait_for_status(server: &Server, instance_id: &str, statuses: &[&str]) -> Value {
    let deadline = Instant::now() + WAIT;
    let url = server.api(&format!("/instances/{instance_id}"));
    loop {
        let response = http().get(&url).send().await.expect("status request");
        if response.status() != 404 {
            let status: Value = response.json().await.expect("a JSON status");
            if statuses.contains(&status["runtimeStatus"].as_str().unwrap_or_default()) {
                return status;
            }
            assert!(Instant::now() < deadline, "{instance_id} is still {} after {WAIT:?}", status["runtimeStatus"]);
        }
        assert!(Instant::now() < deadline, "{instance_id} never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The state of an entity (`GET /entities/{name}/{key}`), or `None` while it has none.
pub async fn entity_state(server: &Server, name: &str, key: &str) -> Option<Value> {
    let response = http().get(server.api(&format!("/entities/{name}/{key}"))).send().await.expect("entity request");
    match response.status().as_u16() {
        200 => Some(response.json().await.expect("a JSON state")),
        404 => None,
        other => panic!("GET entity {name}/{key} answered {other}: {}", response.text().await.unwrap_or_default()),
    }
}

/// Polls an entity until its state is `expected` (`None`: until it has none).
pub async fn wait_for_entity(server: &Server, name: &str, key: &str, expected: Option<Value>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let state = entity_state(server, name, key).await;
        if state == expected {
            return;
        }
        assert!(Instant::now() < deadline, "entity {name}/{key} is {state:?}, not {expected:?}, after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
