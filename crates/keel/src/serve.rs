//! What Keel's servers (the HTTP API and the Durable Task gRPC protocol) share about
//! taking connections: a bounded number at once, and none once they are shutting down.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Waits for a free connection slot, then for a connection, until `shutdown` resolves
/// (then `None`). The slot goes with the connection: drop it when the connection is
/// gone. A failed accept (out of file descriptors, most likely) is logged, naming the
/// server as `server`, and tried again after a short pause, with the slot kept.
pub async fn next_connection<S: Future + Unpin>(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    shutdown: &mut S,
    server: &str,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let slot = tokio::select! {
        slot = slots.clone().acquire_owned() => slot.expect("the connection slots are never closed"),
        _ = &mut *shutdown => return None,
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => return Some((stream, peer, slot)),
                Err(error) => {
                    tracing::warn!(%error, "accepting a {server} connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut *shutdown => return None,
        }
    }
}
