//! The host against slow, idle and hostile clients (issue 14, defects 6, 7 and 8), on
//! the real `keel serve`: over HTTP, slow request heads and idle kept-alive connections
//! are cut after the header timeout, slow bodies after the body timeout, connections
//! beyond the limit wait, cross-site state-changing requests and foreign `Host` headers
//! are refused; over gRPC, idle connections are closed while calls in progress keep
//! theirs, slow request messages are cut and connections beyond the limit wait; the host
//! stays responsive under 2,000 idle connections with 1,024 open files; JSON nested too
//! deep and instance ids with `/` or control characters are refused before anything is
//! written.

mod common;

use std::time::{Duration, Instant};

use common::{http, Server, WAIT};
use keel_grpc::proto;
use keel_grpc::proto::task_hub_sidecar_service_client::TaskHubSidecarServiceClient;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `127.0.0.1:PORT` of a server.
fn authority(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_string()
}

/// `127.0.0.1:PORT` of a server's gRPC endpoint.
fn grpc_authority(server: &Server) -> String {
    server.grpc.trim_start_matches("http://").to_string()
}

/// Reads until the host closes the connection; what it sent, and how long that took.
async fn read_until_closed(stream: &mut (impl AsyncReadExt + Unpin), within: Duration) -> (String, Duration) {
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
async fn a_connection_that_never_sends_a_byte_is_closed() {
    let server = Server::start(&["--header-timeout-ms", "800"]);
    let mut silent = TcpStream::connect(authority(&server)).await.expect("connect");
    let (_, elapsed) = read_until_closed(&mut silent, Duration::from_secs(10)).await;
    assert!(elapsed < Duration::from_secs(5), "closed after {elapsed:?}");
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
    for flag in [
        "--max-connections",
        "--header-timeout-ms",
        "--body-timeout-ms",
        "--grpc-idle-timeout-ms",
        "--grpc-max-connections",
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["serve", flag, "0"])
            .output()
            .expect("keel runs");
        assert!(!output.status.success(), "{flag} 0 was accepted");
    }
}

#[tokio::test]
async fn a_slow_request_body_is_cut_while_others_are_served() {
    let server = Server::start(&["--body-timeout-ms", "800"]);
    let slow = TcpStream::connect(authority(&server)).await.expect("connect");
    let (mut reader, mut writer) = slow.into_split();
    let head = format!(
        "POST /api/orchestrators/HelloCities HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n[",
        authority(&server)
    );
    writer.write_all(head.as_bytes()).await.expect("the head and a byte of the body");
    let started = Instant::now();
    // The rest trickles in, a byte at a time, far slower than the timeout allows, until
    // the host closes the connection.
    let trickle = tokio::spawn(async move {
        while started.elapsed() < Duration::from_secs(10) && writer.write_all(b" ").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    // Meanwhile the host answers.
    let response = http().get(server.api("/instances")).send().await.expect("a normal request");
    assert_eq!(response.status(), 200);

    let (response, _) = read_until_closed(&mut reader, Duration::from_secs(10)).await;
    assert!(started.elapsed() < Duration::from_secs(5), "cut after {:?}", started.elapsed());
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    trickle.abort();
    assert_eq!(instance_count(&server).await, 0, "a cut request started an instance");
}

/// The HTTP/2 connection preface and an empty SETTINGS frame: a client that speaks
/// HTTP/2 and then opens no call.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test]
async fn an_idle_grpc_connection_is_closed_and_a_call_in_progress_keeps_its_own() {
    let server = Server::start_without_samples(&["--grpc-idle-timeout-ms", "800"]);
    let mut silent = TcpStream::connect(grpc_authority(&server)).await.expect("connect");
    let mut quiet = TcpStream::connect(grpc_authority(&server)).await.expect("connect");
    quiet.write_all(HTTP2_PREFACE).await.expect("the preface");
    // A worker's stream, open for longer than the idle timeout.
    let mut worker = TaskHubSidecarServiceClient::connect(server.grpc.clone()).await.expect("a gRPC connection");
    let request = proto::GetWorkItemsRequest {
        max_concurrent_orchestration_work_items: 1,
        max_concurrent_activity_work_items: 1,
        ..Default::default()
    };
    let mut stream = worker.get_work_items(request).await.expect("a work item stream").into_inner();

    let started = Instant::now();
    read_until_closed(&mut silent, Duration::from_secs(10)).await;
    read_until_closed(&mut quiet, Duration::from_secs(10)).await;
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());

    // Well past the idle timeout, the stream still gets its work.
    let response = http().post(server.url("/api/orchestrators/Remote")).json(&1).send().await.expect("a start");
    assert_eq!(response.status(), 202);
    let item = loop {
        let item = tokio::time::timeout(WAIT, stream.message()).await.expect("a work item in time");
        let item = item.expect("the stream is still open").expect("the stream did not end");
        if !matches!(item.request, Some(proto::work_item::Request::HealthPing(_))) {
            break item;
        }
    };
    assert!(matches!(item.request, Some(proto::work_item::Request::OrchestratorRequest(_))), "{item:?}");
    assert!(started.elapsed() > Duration::from_millis(800));
}

#[tokio::test]
async fn grpc_connections_beyond_the_limit_wait_for_one_to_close() {
    let server = Server::start_without_samples(&["--grpc-max-connections", "2", "--grpc-idle-timeout-ms", "60000"]);
    let mut first = TcpStream::connect(grpc_authority(&server)).await.expect("connect");
    first.write_all(HTTP2_PREFACE).await.expect("the preface");
    let mut second = TcpStream::connect(grpc_authority(&server)).await.expect("connect");
    second.write_all(HTTP2_PREFACE).await.expect("the preface");
    // Both are served: the host sends its SETTINGS on each.
    for stream in [&mut first, &mut second] {
        let mut settings = [0u8; 9];
        tokio::time::timeout(WAIT, stream.read_exact(&mut settings)).await.expect("SETTINGS in time").unwrap();
        assert_eq!(settings[3], 4, "a SETTINGS frame: {settings:?}");
    }
    let endpoint = server.grpc.clone();
    let mut third = tokio::spawn(async move {
        let mut client = TaskHubSidecarServiceClient::connect(endpoint).await?;
        client.hello(()).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut third).await.is_err(),
        "a third connection was served beyond the limit of 2"
    );
    drop(first);
    tokio::time::timeout(WAIT, third).await.expect("served once one closed").unwrap().expect("a reply");
}

#[tokio::test]
async fn a_slow_grpc_request_message_is_cut() {
    use http_body_util::channel::Channel;
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let server = Server::start_without_samples(&["--body-timeout-ms", "800"]);
    let stream = TcpStream::connect(grpc_authority(&server)).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("HTTP/2");
    tokio::spawn(connection);
    let (mut body, channel) = Channel::<Bytes>::new(1);
    // A start whose message never arrives: it is cut, and nothing is written.
    let request = hyper::Request::post(format!("{}/TaskHubSidecarService/StartInstance", server.grpc))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(channel)
        .expect("a request");
    let started = Instant::now();
    let response = tokio::spawn(async move { sender.send_request(request).await });
    // Two bytes of the five of a gRPC message header, then nothing.
    body.send_data(Bytes::from_static(&[0, 0])).await.expect("a first piece");
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("the host answers a call whose message never arrives")
        .unwrap()
        .expect("a response");
    let status = match response.headers().get("grpc-status") {
        Some(status) => status.to_str().unwrap().to_string(),
        None => {
            let trailers = http_body_util::BodyExt::collect(response.into_body()).await.expect("a body");
            let trailers = trailers.trailers().expect("trailers with the status").clone();
            trailers["grpc-status"].to_str().unwrap().to_string()
        }
    };
    assert_eq!(status, (tonic::Code::DeadlineExceeded as i32).to_string());
    assert!(started.elapsed() < Duration::from_secs(5), "cut after {:?}", started.elapsed());
    drop(body);
    assert_eq!(instance_count(&server).await, 0, "a cut start wrote an instance");
}

/// Raises this process's soft open-file limit to at least `wanted`, within its hard
/// limit.
#[cfg(unix)]
fn raise_open_file_limit(wanted: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        assert!(limit.rlim_max >= wanted, "this test needs {wanted} open files; the hard limit is {}", limit.rlim_max);
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_stays_responsive_under_2000_idle_connections_at_a_1024_file_limit() {
    const IDLE: usize = 2000;
    raise_open_file_limit(IDLE as u64 + 256);
    let server =
        Server::start_with_open_file_limit(1024, &["--header-timeout-ms", "1000", "--grpc-idle-timeout-ms", "1000"]);
    let (http_address, grpc_address) = (authority(&server), grpc_authority(&server));
    let mut idle = Vec::with_capacity(IDLE);
    for index in 0..IDLE {
        let address = if index % 2 == 0 { &http_address } else { &grpc_address };
        idle.push(TcpStream::connect(address).await.expect("an idle connection"));
    }

    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(10), http().get(server.api("/instances")).send())
        .await
        .expect("an HTTP request is answered while 2,000 connections are idle")
        .expect("a reply");
    assert_eq!(response.status(), 200);
    let hello = tokio::time::timeout(Duration::from_secs(10), async {
        let mut client = TaskHubSidecarServiceClient::connect(server.grpc.clone()).await?;
        client.hello(()).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    });
    hello.await.expect("a gRPC call is answered while 2,000 connections are idle").expect("a reply");
    assert!(started.elapsed() < Duration::from_secs(10), "answered after {:?}", started.elapsed());

    // Every idle connection is closed by the host in turn, and it never ran out of files.
    let closed = futures_util::future::join_all(idle.into_iter().map(|mut stream| async move {
        let mut received = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut received)).await.is_ok()
    }))
    .await;
    assert_eq!(closed.iter().filter(|closed| !**closed).count(), 0, "idle connections the host kept open");
    let log = server.log();
    assert!(log.contains("the open-file limit cannot hold the connection limits"), "{log}");
    for failure in ["accepting a connection failed", "accepting a gRPC connection failed"] {
        assert!(!log.contains(failure), "the host ran out of open files:\n{log}");
    }
}

/// JSON text of `depth` nested arrays around a number.
fn nested_json(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn json_nested_deeper_than_the_limit_is_a_400_and_writes_nothing() {
    let server = Server::start(&[]);
    let limit = keel_core::limits::MAX_JSON_DEPTH;
    let too_deep = nested_json(limit + 1);
    // Also far beyond what a recursive parser takes, and twice encoded (a JSON string
    // holding JSON, as the Durable Functions Python client sends).
    let inputs = [too_deep.clone(), nested_json(100_000), serde_json::to_string(&too_deep).unwrap()];
    for (index, input) in inputs.iter().enumerate() {
        for url in [
            server.url(&format!("/api/orchestrators/HelloCities/deep{index}")),
            server.api(&format!("/orchestrators/HelloCities/deep{index}")),
        ] {
            let response = http()
                .post(&url)
                .header("Content-Type", "application/json")
                .body(input.clone())
                .send()
                .await
                .expect("a reply");
            assert_eq!(response.status(), 400, "{url}");
            let body: Value = response.json().await.expect("a JSON error");
            let message = body["message"].as_str().unwrap_or_default();
            assert!(message.contains(&format!("the limit is {limit} levels")), "{body}");
        }
    }
    assert_eq!(instance_count(&server).await, 0, "a refused start wrote an instance");

    // At the limit: accepted.
    let response = http()
        .post(server.url("/api/orchestrators/HelloCities/at-limit"))
        .header("Content-Type", "application/json")
        .body(nested_json(limit))
        .send()
        .await
        .expect("a reply");
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap_or_default());
    // Event data and an entity operation's input beyond it are refused, and not recorded.
    let response = http()
        .post(server.url("/api/orchestrators/ApprovalWorkflow/approval"))
        .json(&serde_json::json!({"request": "a deep event"}))
        .send()
        .await
        .expect("a reply");
    assert_eq!(response.status(), 202);
    let raise = |data: String| {
        http()
            .post(server.api("/instances/approval/raiseEvent/Approval"))
            .header("Content-Type", "application/json")
            .body(data)
            .send()
    };
    assert_eq!(raise(too_deep.clone()).await.expect("a reply").status(), 400);
    let response = http()
        .post(server.api("/entities/Counter/deep?op=add"))
        .header("Content-Type", "application/json")
        .body(too_deep)
        .send()
        .await
        .expect("a reply");
    assert_eq!(response.status(), 400);
    assert_eq!(raise("true".into()).await.expect("a reply").status(), 202);
    let status = common::wait_until_finished(&server, "approval").await;
    assert_eq!(status["runtimeStatus"], "Completed", "{status}");
    let history: Value = http()
        .get(server.api("/instances/approval?showHistory=true"))
        .send()
        .await
        .expect("a status")
        .json()
        .await
        .expect("JSON");
    let events = history["historyEvents"].as_array().expect("a history");
    let raised = events.iter().filter(|event| event["EventType"] == "EventRaised").count();
    assert_eq!(raised, 1, "only the accepted event is recorded: {history}");
}

#[tokio::test]
async fn instance_ids_with_slashes_or_control_characters_are_refused() {
    let server = Server::start(&[]);
    // `/`, `\`, a newline, NUL, DEL and U+0085 (a C1 control), percent-encoded.
    for id in ["a%2Fb", "%2F", "a%5Cb", "a%0Ab", "a%00b", "a%7Fb", "a%C2%85b"] {
        for url in [
            server.url(&format!("/api/orchestrators/HelloCities/{id}")),
            server.api(&format!("/orchestrators/HelloCities/{id}")),
        ] {
            let response = http()
                .post(&url)
                .header("Content-Type", "application/json")
                .body("null")
                .send()
                .await
                .expect("a reply");
            let status = response.status();
            let body: Value = response.json().await.expect("a JSON error");
            assert_eq!(status, 400, "{url}: {body}");
            assert!(body["message"].as_str().unwrap_or_default().contains("instance id"), "{url}: {body}");
        }
    }
    assert_eq!(instance_count(&server).await, 0, "a refused id was written");
}
