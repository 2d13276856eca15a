//! Wake-ups across processes: what a write announces, how it travels on the task hub's
//! notification channel, and the task that listens for it.
//!
//! A write that adds work or changes an instance signals this process's
//! [`Notifications`] at once and sends a `NOTIFY` on the hub's channel (its schema
//! name) in the same transaction, so PostgreSQL delivers it to every listening process
//! when, and only if, the write commits. Each store keeps one listening connection of
//! its own; when it drops (a server restart), the listener reconnects with a growing
//! pause and, once back, wakes everything, since notifications sent while it was away
//! are lost. The dispatchers' slow fallback poll covers the time in between.

use std::sync::Arc;
use std::time::Duration;

use keel_store::Notifications;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use crate::pool::Endpoint;

/// The first pause before reconnecting the listener; it doubles up to [`MAX_RECONNECT_PAUSE`].
const FIRST_RECONNECT_PAUSE: Duration = Duration::from_millis(50);
const MAX_RECONNECT_PAUSE: Duration = Duration::from_secs(2);

/// Which wake-ups a write calls for (see [`Notifications`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Wakeups {
    /// An inbox got a visible message, or an instance with messages was unlocked.
    pub(crate) orchestration_work: bool,
    /// An activity item was added or given back.
    pub(crate) activity_work: bool,
    /// An instance row was created, changed or deleted.
    pub(crate) instance_changed: bool,
}

impl Wakeups {
    pub(crate) const ORCHESTRATION_WORK: Wakeups =
        Wakeups { orchestration_work: true, activity_work: false, instance_changed: false };
    pub(crate) const ACTIVITY_WORK: Wakeups =
        Wakeups { orchestration_work: false, activity_work: true, instance_changed: false };
    pub(crate) const INSTANCE_CHANGED: Wakeups =
        Wakeups { orchestration_work: false, activity_work: false, instance_changed: true };
    /// A new message for an instance: work, and a changed instance for waiting clients.
    pub(crate) const NEW_MESSAGE: Wakeups =
        Wakeups { orchestration_work: true, activity_work: false, instance_changed: true };

    pub(crate) fn merge(&mut self, other: Wakeups) {
        self.orchestration_work |= other.orchestration_work;
        self.activity_work |= other.activity_work;
        self.instance_changed |= other.instance_changed;
    }

    /// The `NOTIFY` payload: one letter per wake-up (`o`, `a`, `i`); `None` when there
    /// is nothing to announce.
    pub(crate) fn payload(self) -> Option<&'static str> {
        match (self.orchestration_work, self.activity_work, self.instance_changed) {
            (false, false, false) => None,
            (true, false, false) => Some("o"),
            (false, true, false) => Some("a"),
            (false, false, true) => Some("i"),
            (true, true, false) => Some("oa"),
            (true, false, true) => Some("oi"),
            (false, true, true) => Some("ai"),
            (true, true, true) => Some("oai"),
        }
    }

    /// Reads a payload; unknown letters are ignored.
    pub(crate) fn from_payload(payload: &str) -> Wakeups {
        Wakeups {
            orchestration_work: payload.contains('o'),
            activity_work: payload.contains('a'),
            instance_changed: payload.contains('i'),
        }
    }

    /// Wakes this process's dispatchers and waiters.
    pub(crate) fn signal(self, notifications: &Notifications) {
        if self.orchestration_work {
            notifications.orchestration_work_added();
        }
        if self.activity_work {
            notifications.activity_work_added();
        }
        if self.instance_changed {
            notifications.instance_changed();
        }
    }
}

const EVERYTHING: Wakeups = Wakeups { orchestration_work: true, activity_work: true, instance_changed: true };

/// Listens on `channel` until aborted, signalling `notifications` for every
/// notification, reconnecting when the connection drops. It connects as the store's pool
/// does (`endpoint`: the same configuration and TLS).
pub(crate) async fn listen(endpoint: Endpoint, channel: String, notifications: Arc<Notifications>) {
    let mut pause = FIRST_RECONNECT_PAUSE;
    loop {
        match listen_once(&endpoint, &channel, &notifications).await {
            Ok(()) => {
                tracing::warn!(%channel, "the task hub's notification connection closed; reconnecting");
                pause = FIRST_RECONNECT_PAUSE;
            }
            Err(error) => tracing::debug!(%channel, %error, "listening for task hub notifications failed"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_RECONNECT_PAUSE);
    }
}

/// One connection's worth of listening: returns when the connection ends.
async fn listen_once(
    endpoint: &Endpoint,
    channel: &str,
    notifications: &Notifications,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = endpoint.connect().await?;
    let (sender, mut received) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(notification)) => {
                    if sender.send(Wakeups::from_payload(notification.payload())).is_err() {
                        break;
                    }
                }
                Ok(_notice) => {}
                Err(error) => {
                    tracing::debug!(%error, "the task hub's notification connection failed");
                    break;
                }
            }
        }
    });
    // `channel` is the schema name, a plain lowercase identifier (see `config`).
    let listening = client.batch_execute(&format!("LISTEN {channel}")).await;
    if let Err(error) = listening {
        driver.abort();
        return Err(error);
    }
    // Whatever was announced while no connection listened is found by looking again.
    EVERYTHING.signal(notifications);
    while let Some(wakeups) = received.recv().await {
        wakeups.signal(notifications);
    }
    drop(client);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        for orchestration_work in [false, true] {
            for activity_work in [false, true] {
                for instance_changed in [false, true] {
                    let wakeups = Wakeups { orchestration_work, activity_work, instance_changed };
                    match wakeups.payload() {
                        None => assert_eq!(wakeups, Wakeups::default()),
                        Some(payload) => assert_eq!(Wakeups::from_payload(payload), wakeups),
                    }
                }
            }
        }
        let mut merged = Wakeups::ACTIVITY_WORK;
        merged.merge(Wakeups::NEW_MESSAGE);
        assert_eq!(merged.payload(), Some("oai"));
    }
}
