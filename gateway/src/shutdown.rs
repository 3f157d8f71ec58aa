//! The process-wide shutdown flag: set once (from the signal thread), read
//! and awaited by every worker and background thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Process-wide shutdown flag, set once from the signal thread.
pub struct Shutdown {
    flag: AtomicBool,
    event: event_listener::Event,
}

impl Shutdown {
    pub fn new() -> Arc<Shutdown> {
        Arc::new(Shutdown {
            flag: AtomicBool::new(false),
            event: event_listener::Event::new(),
        })
    }

    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.event.notify(usize::MAX);
    }

    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub async fn wait(&self) {
        loop {
            if self.is_triggered() {
                return;
            }
            let l = self.event.listen();
            if self.is_triggered() {
                return;
            }
            l.await;
        }
    }
}
