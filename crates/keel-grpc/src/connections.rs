//! The gRPC server's connections. Keel runs its own accept loop (as the HTTP host does)
//! rather than tonic's, for what tonic's lacks against slow and idle clients:
//!
//! - a connection limit, a semaphore taken before `accept`: beyond it connections wait
//!   in the listen backlog, none is refused;
//! - an idle timeout: a connection with no call in progress for that long (counted from
//!   its start, so one that never speaks HTTP/2 or TLS too, or from the end of its last
//!   call) is closed with a GOAWAY, which clients answer by reconnecting for their next
//!   call; a call in progress (a `GetWorkItems` stream, a long poll) keeps its
//!   connection for as long as it lasts;
//! - a deadline on each call's request message: a client that opens a call and trickles
//!   its message gets DEADLINE_EXCEEDED;
//! - HTTP/2 keep-alive pings, so that a peer that went away without closing (a
//!   half-open connection holding a stream) is found and its connection closed;
//! - bounds on concurrent streams and on header lists per connection.
//!
//! Each request carries tonic's `TcpConnectInfo`, so `Request::remote_addr` works.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{watch, Semaphore};
use tonic::transport::server::TcpConnectInfo;

/// The most streams (calls) one connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 1000;

/// The largest header list a call may send (gRPC clients send a few hundred bytes).
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// How long a closing connection (idle, or the server stopping) is kept once it has no
/// call in progress, for its client to answer the GOAWAY; then it is dropped. (A client
/// that never finished its HTTP/2 or TLS handshake is dropped so.)
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The connection settings of the accept loop (from [`crate::Options`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) idle_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) message_timeout: Duration,
    pub(crate) keepalive_interval: Duration,
    pub(crate) keepalive_timeout: Duration,
}

/// What accepts TLS connections for the server (`Options::tls`): a rustls acceptor that
/// offers `h2`, e.g. `keel_http::tls_acceptor(&identity, &[b"h2"])`.
#[cfg(feature = "tls")]
pub type TlsAcceptor = tokio_rustls::TlsAcceptor;
/// Without the `tls` feature there is no acceptor: an `Option` of it is always `None`.
#[cfg(not(feature = "tls"))]
#[derive(Clone)]
pub enum TlsAcceptor {}

/// Serves `routes` on the connections `listener` accepts (after the TLS handshake with
/// `tls`) until `shutdown` resolves; then stops accepting, closes every connection
/// gracefully and returns once all are gone.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    routes: tonic::service::Routes,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_BYTES);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let Some((stream, peer, permit)) =
            keel::serve::next_connection(&listener, &permits, &mut shutdown, "gRPC").await
        else {
            break;
        };
        let _ = stream.set_nodelay(true);
        let info = TcpConnectInfo { local_addr: stream.local_addr().ok(), remote_addr: Some(peer) };
        let connection =
            Connection { builder: builder.clone(), routes: routes.clone(), limits, info, stopping: stopping.clone() };
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Some(acceptor) = tls else { return connection.serve(stream).await };
            #[cfg(feature = "tls")]
            match tokio::time::timeout(limits.idle_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => connection.serve(stream).await,
                Ok(Err(error)) => tracing::debug!(%peer, %error, "a TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "a TLS handshake timed out"),
            }
            #[cfg(not(feature = "tls"))]
            match acceptor {}
        });
    }
    drop(listener);
    drop(stopping);
    let _ = stop.send(true);
    // Every connection holds a receiver until it is gone.
    stop.closed().await;
}

/// One accepted connection, before it is served.
struct Connection {
    builder: hyper::server::conn::http2::Builder<TokioExecutor>,
    routes: tonic::service::Routes,
    limits: Limits,
    info: TcpConnectInfo,
    stopping: watch::Receiver<bool>,
}

impl Connection {
    /// Serves the connection's calls until the client closes it, it has been idle for
    /// the idle timeout, or the server stops.
    async fn serve<IO>(mut self, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (calls, mut idle_calls) = watch::channel(0usize);
        let calls = Arc::new(calls);
        let peer = self.info.remote_addr;
        let (routes, info, message_timeout) = (self.routes, self.info, self.limits.message_timeout);
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let call = Call::start(calls.clone());
            let mut request = request.map(|body| tonic::body::Body::new(Deadline::new(body, message_timeout)));
            request.extensions_mut().insert(info.clone());
            let mut routes = routes.clone();
            async move {
                let response = tonic::codegen::Service::call(&mut routes, request).await?;
                Ok::<_, Infallible>(response.map(|body| Held { body, _call: call }))
            }
        });
        let connection = self.builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        let mut closing = false;
        loop {
            let wait = if closing { CLOSE_GRACE } else { self.limits.idle_timeout };
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(error) = served {
                        tracing::debug!(?peer, %error, "a gRPC connection ended with an error");
                    }
                    return;
                }
                _ = idle(&mut idle_calls, wait) => {
                    if closing {
                        tracing::debug!(?peer, "dropping a closing gRPC connection");
                        return;
                    }
                    tracing::debug!(?peer, "closing an idle gRPC connection");
                }
                _ = crate::stopped(&mut self.stopping), if !closing => {}
            }
            // Idle, or the server is stopping: no new calls (GOAWAY); those in progress
            // may finish.
            closing = true;
            connection.as_mut().graceful_shutdown();
        }
    }
}

/// Resolves once no call has been in progress for `timeout`.
async fn idle(calls: &mut watch::Receiver<usize>, timeout: Duration) {
    loop {
        if calls.wait_for(|calls| *calls == 0).await.is_err() {
            return std::future::pending().await; // the service is gone: so is the connection
        }
        tokio::select! {
            _ = tokio::time::sleep(timeout) => return,
            _ = calls.changed() => {} // a call started: wait for it to end
        }
    }
}

/// A call in progress on a connection, from its request until its response body is
/// done (for a stream, until the stream ends).
struct Call(Arc<watch::Sender<usize>>);

impl Call {
    fn start(calls: Arc<watch::Sender<usize>>) -> Call {
        calls.send_modify(|calls| *calls += 1);
        Call(calls)
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.0.send_modify(|calls| *calls -= 1);
    }
}

/// A response body that keeps its call in progress until it is dropped.
struct Held<B> {
    body: B,
    _call: Call,
}

impl<B: Body + Unpin> Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that must arrive whole within a deadline, else it fails with
/// DEADLINE_EXCEEDED (which tonic answers the call with).
struct Deadline {
    body: Incoming,
    timeout: Duration,
    expiry: Pin<Box<tokio::time::Sleep>>,
}

impl Deadline {
    fn new(body: Incoming, timeout: Duration) -> Deadline {
        Deadline { body, timeout, expiry: Box::pin(tokio::time::sleep(timeout)) }
    }
}

impl Body for Deadline {
    type Data = hyper::body::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<hyper::body::Bytes>, tonic::Status>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(|error| tonic::Status::from_error(Box::new(error)))));
        }
        match self.expiry.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(tonic::Status::deadline_exceeded(format!(
                "the request message did not arrive within {} ms",
                self.timeout.as_millis()
            ))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
