//! The dashboard in a real browser: headless Chromium, driven over the DevTools
//! protocol, loads the page of a real `keel serve`, sees an instance started over
//! HTTP listed as Completed (and its version in its details), starts another one with
//! the page's own form (typing and clicking like a user) and sees it complete, with its
//! history on the page; in the entities view it sees an entity signalled over HTTP with
//! its state, and signals it with the page's form. On a fan-out over sub-orchestrations
//! (`BackupSites`) it checks the overview's counts against the API, one timeline bar
//! per scheduled activity and sub-orchestration of the exported histories, and the
//! structure tree from parent to child and back; it saves a screenshot of each view
//! under `$CARGO_TARGET_DIR` (else `target/`) `/dashboard-screenshots/`.
//!
//! Skipped, with a message, when Chromium is not installed (`apt-get install -y chromium`);
//! under `CI=true` that is a failure instead.

mod common;

use std::path::{Path, PathBuf};
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

    /// Clicks the middle of an element with the mouse (scrolled into view first).
    async fn click(&mut self, selector: &str) {
        let rect = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({selector:?}); e.scrollIntoView({{ block: 'center' }}); const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
            ))
            .await;
        let (x, y) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            let event = json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 });
            self.call("Input.dispatchMouseEvent", event).await;
        }
    }

    /// Saves a PNG of the element `selector` (the whole page when `None`) as
    /// `dashboard-screenshots/{name}.png` under the target directory; returns its path.
    async fn screenshot(&mut self, name: &str, selector: Option<&str>) -> PathBuf {
        let area = match selector {
            Some(selector) => format!(
                "(() => {{ const r = document.querySelector({selector:?}).getBoundingClientRect(); return [r.x + scrollX, r.y + scrollY, r.width, r.height]; }})()"
            ),
            None => "[0, 0, document.documentElement.scrollWidth, document.documentElement.scrollHeight]".to_string(),
        };
        let area = self.eval(&area).await;
        let [x, y, width, height] = [0, 1, 2, 3].map(|index| area[index].as_f64().expect("a number"));
        let clip = json!({ "x": x, "y": y, "width": width.max(1.0), "height": height.max(1.0), "scale": 1 });
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png", "clip": clip, "captureBeyondViewport": true }))
            .await;
        let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("the screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("the screenshot is written");
        path
    }

    /// Focuses a field and types text into it.
    async fn type_into(&mut self, selector: &str, text: &str) {
        self.eval(&format!("document.querySelector({selector:?}).focus()")).await;
        self.call("Input.insertText", json!({ "text": text })).await;
    }
}

/// `$CARGO_TARGET_DIR/dashboard-screenshots`, else the workspace's `target/dashboard-screenshots`.
fn screenshot_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let workspace = workspace.canonicalize().unwrap_or(workspace);
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), |dir| workspace.join(dir));
    target.join("dashboard-screenshots")
}

/// Standard base64 (what `Page.captureScreenshot` returns) to bytes.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |byte: u8| match byte {
        b'A'..=b'Z' => byte - b'A',
        b'a'..=b'z' => byte - b'a' + 26,
        b'0'..=b'9' => byte - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {byte}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|byte| *byte != b'=' && !byte.is_ascii_whitespace()).map(value).collect();
    let mut bytes = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let bits =
            chunk.iter().enumerate().fold(0u32, |bits, (index, digit)| bits | (u32::from(*digit) << (18 - 6 * index)));
        bytes.extend_from_slice(&bits.to_be_bytes()[1..chunk.len()]);
    }
    bytes
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
    assert_eq!(page.eval("document.body.dataset.view").await, json!("overview"), "the overview is the landing view");
    page.click("#view-instances").await;
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
    let events = page.eval("[...document.querySelectorAll('#history-list li strong')].map(e => e.textContent)").await;
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

/// `GET …/instances/{id}/history`: the exported history's events.
async fn exported_events(server: &Server, instance_id: &str) -> Vec<Value> {
    let url = server.api(&format!("/instances/{}/history", instance_id.replace(':', "%3A")));
    let export: Value = http().get(url).send().await.unwrap().json().await.unwrap();
    export["events"].as_array().expect("events").clone()
}

fn events_of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|event| event["kind"]["type"] == kind).collect()
}

/// How many instances `GET /instances` lists with this status (every page).
async fn listed(server: &Server, status: &str) -> usize {
    let mut count = 0;
    let mut token: Option<String> = None;
    loop {
        let mut request =
            http().get(server.api(&format!("/instances?runtimeStatus={status}&top=1000&showInput=false")));
        if let Some(token) = &token {
            request = request.header("x-ms-continuation-token", token);
        }
        let response = request.send().await.unwrap();
        token = response.headers().get("x-ms-continuation-token").map(|value| value.to_str().unwrap().to_string());
        count += response.json::<Vec<Value>>().await.unwrap().len();
        if token.is_none() {
            return count;
        }
    }
}

#[tokio::test]
async fn the_dashboard_shows_the_overview_a_timeline_and_the_structure_in_chromium() {
    let Some(binary) = chromium() else {
        eprintln!("SKIPPED: the dashboard test needs Chromium (apt-get install -y chromium) or KEEL_CHROMIUM");
        return;
    };
    let server = Server::start(&[]);
    // Two sites to back up, three files and two: a parent with two sub-orchestrations,
    // each fanning out one copy activity per file.
    let mut roots = Vec::new();
    for (site, files) in [("site-a", 3), ("site-b", 2)] {
        let root = server.dir().join(site);
        std::fs::create_dir_all(&root).unwrap();
        for file in 0..files {
            std::fs::write(root.join(format!("page-{file}.html")), "x".repeat(100 * (file + 1))).unwrap();
        }
        roots.push(root.display().to_string());
    }
    let response =
        http().post(server.url("/api/orchestrators/BackupSites/backup-parent")).json(&roots).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let done = wait_until_finished(&server, "backup-parent").await;
    assert_eq!(done["runtimeStatus"], "Completed", "{done}");
    assert_eq!(done["output"], json!(600 + 300));
    let response = http().post(server.api("/entities/Counter/overview-1?op=add")).json(&3).send().await.unwrap();
    assert_eq!(response.status(), 202);
    wait_for_entity(&server, "Counter", "overview-1", Some(json!(3))).await;

    // What the histories say, over HTTP.
    let parent_events = exported_events(&server, "backup-parent").await;
    let created = events_of_type(&parent_events, "SubOrchestrationInstanceCreated");
    let children: Vec<String> =
        created.iter().map(|event| event["kind"]["instance_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(children.len(), 2);
    let child = children[0].clone();
    let child_events = exported_events(&server, &child).await;
    let child_scheduled = events_of_type(&child_events, "TaskScheduled").len();
    assert_eq!(child_scheduled, 1 + 3, "GetFileList and one CopyFileToBlob per file");
    let started = events_of_type(&child_events, "ExecutionStarted");
    assert_eq!(started[0]["kind"]["parent"]["instance_id"], "backup-parent", "the export names the parent");

    let browser = Browser::launch(&binary);
    let mut page = Page::attach(browser.devtools_port().await).await;
    let mut shots = Vec::new();

    // The overview (the landing view): its counts are the API's.
    page.call("Page.navigate", json!({ "url": server.url("/") })).await;
    page.wait_for("document.body && document.body.dataset.ready === 'true'", json!(true)).await;
    assert_eq!(page.eval("document.body.dataset.view").await, json!("overview"));
    let overview: Value = http().get(server.api("/overview")).send().await.unwrap().json().await.unwrap();
    let statuses = ["Pending", "Running", "Completed", "ContinuedAsNew", "Failed", "Terminated", "Suspended"];
    let mut expected = serde_json::Map::new();
    for status in statuses {
        let count = overview["instances"][status].as_u64().unwrap_or_else(|| panic!("{status} in {overview}"));
        assert_eq!(count as usize, listed(&server, status).await, "{status}: the overview and the instance list");
        expected.insert(status.to_string(), json!(count.to_string()));
    }
    assert_eq!(overview["instances"]["Completed"], 3, "the parent and its two children");
    let entities: Vec<Value> = http().get(server.api("/entities")).send().await.unwrap().json().await.unwrap();
    assert_eq!(overview["entities"], json!(entities.len()), "the overview and the entity list");
    expected.insert("entities".into(), json!(entities.len().to_string()));
    let shown = format!(
        "(() => {{ const value = (selector) => document.querySelector(selector)?.querySelector('.card-value')?.textContent; \
         const counts = {{}}; for (const status of {statuses:?}) counts[status] = value(`[data-status-count=\"${{status}}\"]`); \
         counts.entities = value('[data-count=\"entities\"]'); return counts; }})()"
    );
    page.wait_for(&shown, Value::Object(expected)).await;
    // Four throughput series and three backlog series.
    page.wait_for(
        "document.querySelectorAll('#chart-throughput svg polyline, #chart-backlog svg polyline').length",
        json!(4 + 3),
    )
    .await;
    shots.push(("overview", page.screenshot("overview", None).await));

    // The parent's page: a sub-orchestration bar per SubOrchestrationInstanceCreated, no
    // activity of its own.
    page.eval("location.hash = '#instance=backup-parent'").await;
    page.wait_for("document.querySelector('#detail-id').textContent", json!("backup-parent")).await;
    page.wait_for(
        "document.querySelectorAll('#timeline .timeline-bar[data-kind=\"suborchestration\"]').length",
        json!(created.len()),
    )
    .await;
    let parent_scheduled = events_of_type(&parent_events, "TaskScheduled").len();
    assert_eq!(
        page.eval("document.querySelectorAll('#timeline .timeline-bar[data-kind=\"activity\"]').length").await,
        json!(parent_scheduled)
    );

    // Structure: parent → child.
    page.click("#tab-structure").await;
    page.wait_for("document.querySelector('#structure')?.dataset.instanceId", json!("backup-parent")).await;
    let linked = page
        .eval("[...document.querySelectorAll('#structure a[data-role=\"child\"]')].map(a => a.dataset.instanceId)")
        .await;
    assert_eq!(linked, json!(children));
    shots.push(("structure", page.screenshot("structure", Some("#detail-panel")).await));
    page.click(&format!("#structure a[data-role=\"child\"][data-instance-id=\"{child}\"]")).await;
    page.wait_for("document.querySelector('#detail-id').textContent", json!(child)).await;
    page.wait_for("document.querySelector('#structure')?.dataset.instanceId", json!(child)).await;
    assert_eq!(
        page.eval("document.querySelector('#detail-parent a')?.dataset.instanceId").await,
        json!("backup-parent")
    );

    // The child's timeline: one bar per TaskScheduled of its history, all completed.
    page.click("#tab-timeline").await;
    let bars = "document.querySelectorAll('#timeline .timeline-bar[data-kind=\"activity\"]')";
    page.wait_for(&format!("{bars}.length"), json!(child_scheduled)).await;
    assert_eq!(
        page.eval(&format!("[...{bars}].every(bar => bar.dataset.outcome === 'completed' && !bar.dataset.retry)"))
            .await,
        json!(true)
    );
    let names = page.eval(&format!("[...{bars}].map(bar => bar.dataset.name)")).await;
    assert_eq!(names, json!(["GetFileList", "CopyFileToBlob", "CopyFileToBlob", "CopyFileToBlob"]));
    assert_eq!(
        page.eval("getComputedStyle(document.querySelector('#pane-structure')).display").await,
        json!("none"),
        "one pane at a time"
    );
    shots.push(("timeline", page.screenshot("timeline", Some("#detail-panel")).await));

    // Structure: child → parent.
    page.click("#tab-structure").await;
    page.click("#structure a[data-role=\"parent\"]").await;
    page.wait_for("document.querySelector('#detail-id').textContent", json!("backup-parent")).await;
    page.wait_for("document.querySelector('#structure')?.dataset.instanceId", json!("backup-parent")).await;

    // The history tab pages the Durable Functions view of the history.
    page.click("#tab-history").await;
    let info = page.eval("document.querySelector('#history-page-info').textContent").await;
    assert!(info.as_str().unwrap().starts_with("events 1–"), "{info}");

    // The status as a JSON tree: the history's nodes are closed (and not built) until
    // "Expand all" opens everything.
    page.click("#tab-json").await;
    let tree = "document.querySelector('#detail-json .json-tree').textContent";
    assert_eq!(page.eval(&format!("{tree}.includes('SubOrchestrationInstanceCompleted')")).await, json!(false));
    page.click("#detail-json .json-tools button:nth-child(2)").await;
    assert_eq!(page.eval(&format!("{tree}.includes('SubOrchestrationInstanceCompleted')")).await, json!(true));
    assert_eq!(page.eval("document.querySelectorAll('#detail-json details:not([open])').length").await, json!(0));

    // Entities: the state as a JSON tree with a copy button.
    page.click("#view-entities").await;
    let row = "document.querySelector('tr[data-entity-id=\"@counter@overview-1\"]')";
    page.wait_for(&format!("{row}?.dataset.state"), json!("3")).await;
    assert_eq!(page.eval(&format!("{row}.querySelector('.json-tools button').textContent")).await, json!("Copy"));
    shots.push(("entities", page.screenshot("entities", None).await));

    for (view, path) in &shots {
        let size = std::fs::metadata(path).unwrap().len();
        assert!(size > 1000, "{} is {size} bytes", path.display());
        println!("screenshot of the {view} view: {}", path.display());
    }
    drop(browser);
}
