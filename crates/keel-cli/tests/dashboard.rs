//! The dashboard in a real browser: headless Chromium, driven over the DevTools
//! protocol, loads the page of a real `keel serve`, sees an instance started over
//! HTTP listed as Completed (and its version in its details), starts another one with
//! the page's own form (typing and clicking like a user) and sees it complete, with its
//! history on the page; in the entities view it sees an entity signalled over HTTP with
//! its state, and signals it with the page's form.
//!
//! Skipped, with a message, when Chromium is not installed (`apt-get install -y chromium`);
//! under `CI=true` that is a failure instead.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{entity_state, http, wait_for_entity, wait_until_finished, Server, WAIT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// The Chromium binary: `$KEEL_CHROMIUM`, else the first of the usual names on PATH.
/// Under `CI=true` a missing Chromium fails the test instead of skipping it.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KEEL_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let names = ["chromium", "chromium-browser", "google-chrome"];
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
            .find(|path| path.is_file())
    });
    assert!(
        found.is_some() || std::env::var("CI").map_or(true, |ci| ci != "true"),
        "CI must run the dashboard test, but Chromium is not installed"
    );
    found
}

/// A headless Chromium, killed when dropped.
struct Browser {
    child: Child,
    profile: tempfile::TempDir,
}

impl Browser {
    fn launch(binary: &PathBuf) -> Browser {
        let profile = tempfile::tempdir().expect("a profile dir");
        let child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,1000",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium starts");
        Browser { child, profile }
    }

    /// The DevTools port, from the file Chromium writes once it listens.
    async fn devtools_port(&self) -> u16 {
        let file = self.profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(port) = std::fs::read_to_string(&file).ok().and_then(|text| text.lines().next()?.parse().ok()) {
                return port;
            }
            assert!(Instant::now() < deadline, "chromium did not open its DevTools port");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A DevTools protocol session with one page.
struct Page {
    socket: Socket,
    next_id: u64,
}

impl Page {
    async fn attach(port: u16) -> Page {
        let targets: Vec<Value> =
            http().get(format!("http://127.0.0.1:{port}/json/list")).send().await.unwrap().json().await.unwrap();
        let page = targets.iter().find(|target| target["type"] == "page").expect("a page target");
        let url = page["webSocketDebuggerUrl"].as_str().expect("a websocket URL");
        let (socket, _) = tokio_tungstenite::connect_async(url).await.expect("the DevTools socket opens");
        Page { socket, next_id: 1 }
    }

    /// Calls a protocol method and returns its result (events in between are skipped).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({ "id": id, "method": method, "params": params });
        self.socket.send(Message::Text(request.to_string().into())).await.expect("send");
        loop {
            let message = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("chromium answers")
                .expect("the socket stays open")
                .expect("a message");
            let Message::Text(text) = message else { continue };
            let reply: Value = serde_json::from_str(&text).expect("JSON from chromium");
            if reply["id"] == id {
                assert!(reply.get("error").is_none(), "{method} failed: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// Evaluates a JS expression in the page; returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self.call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true })).await;
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until it yields `expected`.
    async fn wait_for(&mut self, expression: &str, expected: Value) {
        let deadline = Instant::now() + WAIT;
        loop {
            let value = self.eval(expression).await;
            if value == expected {
                return;
            }
            assert!(Instant::now() < deadline, "`{expression}` is {value}, not {expected}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the middle of an element with the mouse.
    async fn click(&mut self, selector: &str) {
        let rect = self
            .eval(&format!(
                "(() => {{ const r = document.querySelector({selector:?}).getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
            ))
            .await;
        let (x, y) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            let event = json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 });
            self.call("Input.dispatchMouseEvent", event).await;
        }
    }

    /// Focuses a field and types text into it.
    async fn type_into(&mut self, selector: &str, text: &str) {
        self.eval(&format!("document.querySelector({selector:?}).focus()")).await;
        self.call("Input.insertText", json!({ "text": text })).await;
    }
}

#[tokio::test]
async fn the_dashboard_lists_starts_and_shows_instances_in_chromium() {
    let Some(binary) = chromium() else {
        eprintln!("SKIPPED: the dashboard test needs Chromium (apt-get install -y chromium) or KEEL_CHROMIUM");
        return;
    };
    let server = Server::start(&[]);
    let response =
        http().post(server.url("/api/orchestrators/HelloCities/before-page?version=2.4")).send().await.unwrap();
    assert_eq!(response.status(), 202);
    wait_until_finished(&server, "before-page").await;

    let browser = Browser::launch(&binary);
    let mut page = Page::attach(browser.devtools_port().await).await;
    page.call("Page.navigate", json!({ "url": server.url("/") })).await;
    page.wait_for("document.body && document.body.dataset.ready === 'true'", json!(true)).await;
    page.wait_for("document.querySelector('tr[data-instance-id=\"before-page\"]')?.dataset.status", json!("Completed"))
        .await;

    // Its details show the version it was started with.
    page.click("tr[data-instance-id=\"before-page\"] a").await;
    page.wait_for("document.querySelector('#detail-id').textContent", json!("before-page")).await;
    assert_eq!(page.eval("document.querySelector('#detail-version').textContent").await, json!("2.4"));

    // Start an instance with the page's form, as a user would.
    page.eval("(() => { const s = document.querySelector('#start-name'); s.value = 'HelloCities'; s.dispatchEvent(new Event('change')); })()")
        .await;
    page.type_into("#start-id", "from-dashboard").await;
    page.click("#start-button").await;
    page.wait_for(
        "document.querySelector('tr[data-instance-id=\"from-dashboard\"]')?.dataset.status",
        json!("Completed"),
    )
    .await;

    // The page opened the new instance: status, output and history timeline.
    page.wait_for("document.querySelector('#detail-id').textContent", json!("from-dashboard")).await;
    page.wait_for("document.querySelector('#detail-panel').dataset.status", json!("Completed")).await;
    let output = page.eval("document.querySelector('#detail-output').textContent").await;
    assert!(output.as_str().unwrap().contains("Hello London!"), "{output}");
    assert_eq!(page.eval("document.querySelector('#detail-version').textContent").await, json!("-"));
    let events = page.eval("[...document.querySelectorAll('#timeline li strong')].map(e => e.textContent)").await;
    assert_eq!(
        events,
        json!(["ExecutionStarted", "TaskCompleted", "TaskCompleted", "TaskCompleted", "ExecutionCompleted"])
    );

    let done = wait_until_finished(&server, "from-dashboard").await;
    assert_eq!(done["name"], "HelloCities");
    assert_eq!(done["runtimeStatus"], "Completed");
    drop(browser);
}

#[tokio::test]
async fn the_dashboard_lists_and_signals_entities_in_chromium() {
    let Some(binary) = chromium() else {
        eprintln!("SKIPPED: the dashboard test needs Chromium (apt-get install -y chromium) or KEEL_CHROMIUM");
        return;
    };
    let server = Server::start(&[]);
    let response = http().post(server.api("/entities/Counter/dash-1?op=add")).json(&5).send().await.unwrap();
    assert_eq!(response.status(), 202);
    wait_for_entity(&server, "Counter", "dash-1", Some(json!(5))).await;

    let browser = Browser::launch(&binary);
    let mut page = Page::attach(browser.devtools_port().await).await;
    page.call("Page.navigate", json!({ "url": server.url("/") })).await;
    page.wait_for("document.body && document.body.dataset.ready === 'true'", json!(true)).await;
    page.click("#view-entities").await;
    let row = "document.querySelector('tr[data-entity-id=\"@counter@dash-1\"]')";
    page.wait_for(&format!("{row}?.dataset.state"), json!("5")).await;
    let time = page.eval(&format!("{row}.children[2].textContent")).await;
    assert!(time.as_str().unwrap().ends_with('Z'), "the last operation time: {time}");
    assert_eq!(page.eval("location.hash").await, json!("#entities"));
    assert_eq!(page.eval("getComputedStyle(document.querySelector('#list-panel')).display").await, json!("none"));

    // Clicking the row fills in the entity; type the operation and its input, signal.
    page.click("tr[data-entity-id=\"@counter@dash-1\"]").await;
    assert_eq!(page.eval("document.querySelector('#entity-name').value").await, json!("counter"));
    assert_eq!(page.eval("document.querySelector('#entity-key').value").await, json!("dash-1"));
    page.type_into("#entity-op", "add").await;
    page.type_into("#entity-input", "2").await;
    page.click("#entity-signal-button").await;
    page.wait_for(&format!("{row}?.dataset.state"), json!("7")).await;
    assert_eq!(entity_state(&server, "Counter", "dash-1").await, Some(json!(7)));

    // A new entity from the form shows up in the list.
    page.eval("(() => { for (const id of ['#entity-name', '#entity-key', '#entity-op', '#entity-input']) document.querySelector(id).value = ''; })()").await;
    page.type_into("#entity-name", "Account").await;
    page.type_into("#entity-key", "dash-acct").await;
    page.type_into("#entity-op", "deposit").await;
    page.type_into("#entity-input", "40").await;
    page.click("#entity-signal-button").await;
    page.wait_for("document.querySelector('tr[data-entity-id=\"@account@dash-acct\"]')?.dataset.state", json!("40"))
        .await;

    // Back to the instances view.
    page.click("#view-instances").await;
    assert_eq!(page.eval("getComputedStyle(document.querySelector('#list-panel')).display").await, json!("block"));
    drop(browser);
}
