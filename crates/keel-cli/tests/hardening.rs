//! The HTTP host against slow, idle and hostile clients (issue 14, defects 6 and 7):
//! slow request heads and idle kept-alive connections are cut after the header
//! timeout, connections beyond the limit wait, cross-site state-changing requests and
//! foreign `Host` headers are refused — all on the real `keel serve`.

mod common;

use std::time::{Duration, Instant};

use common::{http, Server, WAIT};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `127.0.0.1:PORT` of a server.
fn authority(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_string()
}

/// Reads until the host closes the connection; what it sent, and how long that took.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut received = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut received)).await;
    let text = String::from_utf8_lossy(&received).into_owned();
    match read {
        Ok(_) => (text, started.elapsed()), // EOF, or a reset: closed either way
        Err(_) => panic!("the host kept the connection open for {within:?}; it sent {text:?}"),
    }
}

/// Sends `request` (a whole HTTP/1.1 request, `Connection: close`) on a new connection
/// and returns the status code and the JSON body.
async fn raw(server: &Server, request: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(authority(server)).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let (response, _) = read_until_closed(&mut stream, WAIT).await;
    let status = response.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default();
    // The body may be chunked: take the JSON object in it.
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(start), Some(end)) => serde_json::from_str(&body[start..=end]).unwrap_or(Value::Null),
        _ => Value::Null,
    };
    (status, json)
}

async fn instance_count(server: &Server) -> usize {
    let response = http().get(server.api("/instances")).send().await.expect("list");
    assert_eq!(response.status(), 200);
    let list: Value = response.json().await.expect("a JSON list");
    list.as_array().expect("an array").len()
}

#[tokio::test]
async fn a_slow_request_head_is_cut_while_others_are_served() {
    let server = Server::start(&["--header-timeout-ms", "800"]);
    let mut slow = TcpStream::connect(authority(&server)).await.expect("connect");
    slow.write_all(b"GET /runtime/webhooks/durabletask/instan").await.expect("half a request line");

    // Meanwhile the host answers.
    let response = http().get(server.api("/instances")).send().await.expect("a normal request");
    assert_eq!(response.status(), 200);

    let (_, elapsed) = read_until_closed(&mut slow, Duration::from_secs(10)).await;
    assert!(elapsed < Duration::from_secs(5), "cut after {elapsed:?}");
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed() {
    let server = Server::start(&["--header-timeout-ms", "800"]);
    let mut stream = TcpStream::connect(authority(&server)).await.expect("connect");
    let request =
        format!("GET /runtime/webhooks/durabletask/instances HTTP/1.1\r\nHost: {}\r\n\r\n", authority(&server));
    stream.write_all(request.as_bytes()).await.expect("send");
    let started = Instant::now();
    let (response, _) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_one_to_close() {
    let server = Server::start(&["--max-connections", "2", "--header-timeout-ms", "60000"]);
    let first = TcpStream::connect(authority(&server)).await.expect("connect");
    let _second = TcpStream::connect(authority(&server)).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await; // both accepted
    let url = server.api("/instances");
    let mut third = tokio::spawn(async move { http().get(url).send().await.map(|response| response.status()) });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut third).await.is_err(),
        "a third connection was served beyond the limit of 2"
    );
    drop(first);
    let status = tokio::time::timeout(WAIT, third).await.expect("served once one closed").unwrap().expect("a reply");
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_cross_origin_post_is_refused_and_starts_nothing() {
    let server = Server::start(&[]);
    let response = http()
        .post(server.url("/api/orchestrators/HelloCities"))
        .header("Origin", "http://evil.example")
        .header("Content-Type", "text/plain")
        .body("\"x\"")
        .send()
        .await
        .expect("a reply");
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.expect("a JSON error");
    assert_eq!(body["error"], "Forbidden", "{body}");
    // Management writes too.
    let response = http()
        .post(server.api("/instances/any/terminate?reason=x"))
        .header("Origin", "http://evil.example")
        .send()
        .await
        .expect("a reply");
    assert_eq!(response.status(), 403);
    assert_eq!(instance_count(&server).await, 0, "a refused request started an instance");

    // Reads from another origin are not writes; the same origin may write.
    let response = http().get(server.api("/instances")).header("Origin", "http://evil.example").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let response = http()
        .post(server.url("/api/orchestrators/HelloCities"))
        .header("Origin", &server.base)
        .header("Content-Type", "application/json")
        .body("null")
        .send()
        .await
        .expect("a reply");
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap_or_default());
    assert_eq!(instance_count(&server).await, 1);
}

#[tokio::test]
async fn foreign_host_headers_are_refused_and_only_accepted_hosts_are_echoed() {
    let server = Server::start(&["--allowed-host", "keel.internal"]);
    let port = authority(&server).rsplit(':').next().unwrap().to_string();
    let start = |host: &str| {
        format!(
            "POST /api/orchestrators/HelloCities HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: 4\r\nConnection: close\r\n\r\nnull"
        )
    };
    for host in ["evil.example".to_string(), format!("evil.example:{port}"), "localhost:1".to_string()] {
        let (status, body) = raw(&server, &start(&host)).await;
        assert_eq!(status, 421, "Host {host}: {body}");
        assert_eq!(body["error"], "MisdirectedRequest", "{body}");
    }
    let (status, _) =
        raw(&server, &format!("GET / HTTP/1.1\r\nHost: evil.example:{port}\r\nConnection: close\r\n\r\n")).await;
    assert_eq!(status, 421, "the dashboard is behind the Host check too");
    assert_eq!(instance_count(&server).await, 0, "a refused request started an instance");

    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("keel.internal:{port}")] {
        let (status, body) = raw(&server, &start(&host)).await;
        assert_eq!(status, 202, "Host {host}: {body}");
        let uri = body["statusQueryGetUri"].as_str().expect("a status URL");
        assert!(uri.starts_with(&format!("http://{host}/")), "{uri}");
    }
}

#[test]
fn zero_limits_are_refused() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["serve", "--max-connections", "0"])
        .output()
        .expect("keel runs");
    assert!(!output.status.success());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["serve", "--header-timeout-ms", "0"])
        .output()
        .expect("keel runs");
    assert!(!output.status.success());
}
