//! Child processes for the crash tests: a test binary runs one of its own ignored tests
//! in a child process (a worker to kill), kills it with SIGKILL mid-flight and reaps
//! it. A child still running when its handle drops is killed too, so a failing test
//! leaves no worker behind.
//!
//! ```no_run
//! use keel_testkit::process::ChildTest;
//!
//! /// The child: does its work only when started by the test below.
//! #[test]
//! #[ignore = "run by the_parent as its child process"]
//! fn the_child() {
//!     let Ok(_hub) = std::env::var("MY_TEST_HUB") else { return };
//!     // … run a worker on the hub until killed …
//! }
//!
//! #[test]
//! fn the_parent() {
//!     let mut child = ChildTest::start("the_child", &[("MY_TEST_HUB", "/tmp/hub.db")]);
//!     assert!(child.is_running());
//!     child.kill(); // SIGKILL: no chance to clean up
//! }
//! ```

use std::ffi::OsStr;
use std::process::{Child, Command, ExitStatus, Stdio};

/// A child process running one ignored test of the current test binary.
#[derive(Debug)]
pub struct ChildTest {
    child: Child,
}

impl ChildTest {
    /// The command that runs only the ignored test `test` of this test binary, on one
    /// test thread, output shown, no standard input: add environment variables (how
    /// the child knows it is the child and what to work on), then
    /// [`ChildTest::spawn`] it.
    pub fn command(test: &str) -> Command {
        let mut command = Command::new(std::env::current_exe().expect("the test binary's path"));
        command.args(["--exact", test, "--ignored", "--nocapture", "--test-threads", "1"]).stdin(Stdio::null());
        command
    }

    /// Starts `command` (from [`ChildTest::command`]).
    pub fn spawn(mut command: Command) -> ChildTest {
        ChildTest { child: command.spawn().expect("the child process starts") }
    }

    /// Runs the ignored test `test` in a child process with `env` set.
    pub fn start<V: AsRef<OsStr>>(test: &str, env: &[(&str, V)]) -> ChildTest {
        let mut command = ChildTest::command(test);
        for (name, value) in env {
            command.env(name, value);
        }
        ChildTest::spawn(command)
    }

    /// How the child exited, or `None` while it runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("the child's status can be read")
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Kills the child with SIGKILL (no chance to give anything back) and reaps it.
    pub fn kill(&mut self) {
        if self.is_running() {
            self.child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix
        }
        self.child.wait().expect("the killed child is reaped");
    }
}

impl Drop for ChildTest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
