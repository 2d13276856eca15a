//! In-process wake-ups: a store signals new work and changed instances here, so that
//! idle dispatchers and waiting clients react at once instead of polling.
//!
//! These only reach the process that made the change. Work written by other processes
//! (another worker on the same database) is found by the dispatchers' slow fallback
//! poll, or by a backend's own cross-process notification.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;

use keel_core::history::Timestamp;
use tokio::sync::{watch, Notify};

/// The wake-up signals of one store.
#[derive(Debug)]
pub struct Notifications {
    orchestration_work: Notify,
    activity_work: Notify,
    instance_changed: watch::Sender<u64>,
    /// Times at which inbox messages written in this process become visible (timers,
    /// scheduled starts), earliest first.
    orchestration_due: Mutex<BinaryHeap<Reverse<Timestamp>>>,
}

impl Default for Notifications {
    fn default() -> Notifications {
        Notifications {
            orchestration_work: Notify::new(),
            activity_work: Notify::new(),
            instance_changed: watch::Sender::new(0),
            orchestration_due: Mutex::new(BinaryHeap::new()),
        }
    }
}

impl Notifications {
    /// Records that an inbox message becomes visible at `at` (a timer, a scheduled
    /// start), so that idle dispatchers wake up then.
    pub fn orchestration_work_due(&self, at: Timestamp) {
        self.orchestration_due.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(Reverse(at));
    }

    /// The earliest recorded due time after `now`; earlier ones are forgotten.
    pub fn next_orchestration_due(&self, now: Timestamp) -> Option<Timestamp> {
        let mut due = self.orchestration_due.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        while let Some(Reverse(at)) = due.peek() {
            if *at > now {
                return Some(*at);
            }
            due.pop();
        }
        None
    }

    /// Whether a recorded due time has come by `now` (without forgetting it).
    pub fn orchestration_due_by(&self, now: Timestamp) -> bool {
        let due = self.orchestration_due.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        due.peek().is_some_and(|Reverse(at)| *at <= now)
    }

    /// Wakes the orchestration dispatchers: an inbox got a visible message.
    pub fn orchestration_work_added(&self) {
        self.orchestration_work.notify_waiters();
        self.orchestration_work.notify_one();
    }

    /// Wakes the activity dispatchers: an activity item was added.
    pub fn activity_work_added(&self) {
        self.activity_work.notify_waiters();
        self.activity_work.notify_one();
    }

    /// Wakes clients waiting on instance state: some instance's row changed.
    pub fn instance_changed(&self) {
        self.instance_changed.send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// What idle orchestration dispatchers wait on; notified by
    /// [`Notifications::orchestration_work_added`].
    pub fn orchestration_work(&self) -> &Notify {
        &self.orchestration_work
    }

    /// What idle activity dispatchers wait on; notified by
    /// [`Notifications::activity_work_added`].
    pub fn activity_work(&self) -> &Notify {
        &self.activity_work
    }

    /// A receiver that sees every later [`Notifications::instance_changed`].
    pub fn subscribe_instance_changes(&self) -> watch::Receiver<u64> {
        self.instance_changed.subscribe()
    }
}
