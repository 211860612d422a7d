//! Activity of a VM, for the idle reaper: requests in flight, streaming
//! responses until their last byte, upgraded connections. Each is an
//! [`ActivityGuard`]; while one lives the VM is busy, and when the last drops the
//! idle clock starts. Before a VM is put to sleep its guards are asked to close
//! cleanly through their [`Closer`].

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Tells one connection or stream to finish cleanly.
#[derive(Default)]
pub struct Closer {
    closing: AtomicBool,
    waker: AtomicWaker,
}

impl Closer {
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Ready once the VM is going to sleep.
    pub fn poll_closing(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_closing() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.is_closing() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    pub async fn closing(&self) {
        poll_fn(|cx| self.poll_closing(cx)).await
    }

    fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.waker.wake();
    }
}

/// Per-VM activity counters.
#[derive(Default)]
pub(crate) struct Activity {
    /// Guards alive.
    pub(crate) active: AtomicUsize,
    /// Last time a guard was taken or dropped, or an API operation touched the VM.
    pub(crate) last_ms: AtomicU64,
    /// What the store last recorded.
    pub(crate) persisted_ms: AtomicU64,
    closers: Mutex<HashMap<u64, Arc<Closer>>>,
    next_id: AtomicU64,
}

impl Activity {
    pub(crate) fn touch(&self) {
        self.last_ms.fetch_max(now_ms(), Ordering::SeqCst);
    }

    pub(crate) fn busy(&self) -> bool {
        self.active.load(Ordering::SeqCst) > 0
    }

    /// Asks every open connection and stream to close.
    pub(crate) fn close_all(&self) -> usize {
        let closers = self.closers.lock().unwrap_or_else(|e| e.into_inner());
        for c in closers.values() {
            c.close();
        }
        closers.len()
    }
}

/// Holds a VM busy while alive.
pub struct ActivityGuard {
    activity: Arc<Activity>,
    closer: Arc<Closer>,
    id: u64,
}

impl ActivityGuard {
    pub(crate) fn new(activity: Arc<Activity>) -> ActivityGuard {
        activity.active.fetch_add(1, Ordering::SeqCst);
        activity.touch();
        let id = activity.next_id.fetch_add(1, Ordering::Relaxed);
        let closer = Arc::new(Closer::default());
        activity
            .closers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, closer.clone());
        ActivityGuard {
            activity,
            closer,
            id,
        }
    }

    /// Signals when this connection or stream should finish (the VM goes to sleep).
    pub fn closer(&self) -> &Closer {
        &self.closer
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.activity
            .closers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        self.activity.touch();
        self.activity.active.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn guards_count_and_close() {
        let a = Arc::new(Activity::default());
        let g1 = ActivityGuard::new(a.clone());
        let g2 = ActivityGuard::new(a.clone());
        assert!(a.busy());
        assert_eq!(a.close_all(), 2);
        g1.closer().closing().await; // ready at once
        assert!(g2.closer().is_closing());
        drop(g1);
        drop(g2);
        assert!(!a.busy());
        assert!(a.last_ms.load(Ordering::SeqCst) > 0);
    }
}
