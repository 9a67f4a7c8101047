//! Wake-ups for a sink's worker thread: at most one per tick, or one when a batch is waiting,
//! never one per record.
//!
//! A worker blocked in `recv` is woken by every record queued: a futex call on the request's
//! thread and a context switch into the worker, which together cost more than the record's
//! whole bookkeeping (measured in `docs/benchmarks.md`). A worker that sleeps between ticks
//! and drains the queue with `try_recv` is never waiting in the channel, so queueing a record
//! is a few atomics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::thread::Thread;
use std::time::Duration;

/// How much less a background thread weighs than a proxy worker (nice +10: about a tenth of
/// the CPU share when both want the core).
const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority. Called by the threads that do tokentap's
/// work off the byte path (encoding and exporting spans, writing the access log, flushing the
/// ledger): their work comes in bursts (a batch of 512 spans is milliseconds of CPU), and at
/// equal priority a burst on a busy core delays the proxy's workers, which shows as tail
/// latency. At a lower priority they take the time the workers leave; they still get it all
/// on an idle core, and their queues are bounded (full queues drop and count, never block).
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority takes plain integers and touches no memory of ours. On Linux,
        // PRIO_PROCESS with who = 0 applies to the calling thread only (threads are tasks).
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, BACKGROUND_NICE) };
        if r != 0 {
            log::debug!(
                "cannot lower a background thread's priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

pub struct LazyWake {
    worker: OnceLock<Thread>,
    pending: AtomicUsize,
    /// Records that make waking the worker worth it before its tick.
    batch: usize,
}

impl LazyWake {
    pub fn new(batch: usize) -> Self {
        LazyWake {
            worker: OnceLock::new(),
            pending: AtomicUsize::new(0),
            batch: batch.max(1),
        }
    }

    /// The worker thread to wake (set once, right after it is spawned).
    pub fn set_worker(&self, t: Thread) {
        let _ = self.worker.set(t);
    }

    /// A record was queued: wake the worker only when a batch is waiting.
    pub fn queued(&self) {
        if self.pending.fetch_add(1, Ordering::Relaxed) + 1 == self.batch {
            self.now();
        }
    }

    /// A control message (stop, flush, new output) was queued: wake the worker now.
    pub fn now(&self) {
        if let Some(t) = self.worker.get() {
            t.unpark();
        }
    }

    /// In the worker: sleep until woken or `tick` has passed. The caller then drains the
    /// queue (everything queued before this returns is in it).
    pub fn wait(&self, tick: Duration) {
        std::thread::park_timeout(tick);
        self.pending.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_full_batch_or_a_control_message_wakes_the_worker_before_its_tick() {
        for control in [false, true] {
            let w = Arc::new(LazyWake::new(3));
            let w2 = Arc::clone(&w);
            let (tx, rx) = std::sync::mpsc::channel();
            let h = std::thread::spawn(move || {
                // A tick far longer than the suite: only a wake-up ends this wait (a missing one
                // hangs the test, and CI's time limit fails it).
                w2.wait(Duration::from_secs(3600));
                tx.send(()).unwrap();
            });
            w.set_worker(h.thread().clone());
            if control {
                w.now();
            } else {
                w.queued();
                w.queued();
                w.queued();
            }
            rx.recv().unwrap();
            h.join().unwrap();
        }
    }
}
