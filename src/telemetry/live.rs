//! The metered calls in flight, for the admin page's live view: who, which model, whether it
//! streams, and the response's chunks and bytes so far. A call is listed from its budget
//! decision until its record is handed to the sinks (or it is dropped).
//!
//! On the byte path a chunk costs two relaxed atomic adds; listing a call, one insert and one
//! remove in a sharded map.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

/// A call in flight.
pub struct LiveCall {
    pub request_id: String,
    pub user: Option<String>,
    pub model: Option<String>,
    pub api: Option<&'static str>,
    pub started: Instant,
    pub stream: bool,
    pub chunks: AtomicU64,
    pub bytes: AtomicU64,
}

/// What the live view shows of a call.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveView {
    pub request_id: String,
    pub user: Option<String>,
    pub model: Option<String>,
    pub api: Option<&'static str>,
    pub stream: bool,
    pub elapsed_ms: u64,
    pub chunks: u64,
    pub bytes: u64,
}

#[derive(Default)]
pub struct LiveCalls {
    calls: dashmap::DashMap<u64, Arc<LiveCall>>,
    next: AtomicU64,
}

impl LiveCalls {
    /// Lists a call until the guard is dropped.
    pub fn open(self: &Arc<Self>, call: LiveCall) -> LiveGuard {
        let id = self.next.fetch_add(1, Relaxed);
        let call = Arc::new(call);
        self.calls.insert(id, Arc::clone(&call));
        LiveGuard {
            id,
            call,
            calls: Arc::clone(self),
        }
    }

    /// The calls in flight, the longest-running first.
    pub fn snapshot(&self) -> Vec<LiveView> {
        let now = Instant::now();
        let mut v: Vec<LiveView> = self
            .calls
            .iter()
            .map(|e| {
                let c = e.value();
                LiveView {
                    request_id: c.request_id.clone(),
                    user: c.user.clone(),
                    model: c.model.clone(),
                    api: c.api,
                    stream: c.stream,
                    elapsed_ms: now.saturating_duration_since(c.started).as_millis() as u64,
                    chunks: c.chunks.load(Relaxed),
                    bytes: c.bytes.load(Relaxed),
                }
            })
            .collect();
        v.sort_by(|a, b| {
            b.elapsed_ms
                .cmp(&a.elapsed_ms)
                .then_with(|| a.request_id.cmp(&b.request_id))
        });
        v
    }

    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }
}

/// A listed call; dropping it takes the call off the list.
pub struct LiveGuard {
    id: u64,
    call: Arc<LiveCall>,
    calls: Arc<LiveCalls>,
}

impl LiveGuard {
    /// A piece of the response went to the client.
    pub fn chunk(&self, bytes: usize) {
        self.call.chunks.fetch_add(1, Relaxed);
        self.call.bytes.fetch_add(bytes as u64, Relaxed);
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.calls.calls.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_listed_with_its_progress_until_its_guard_drops() {
        let live = Arc::new(LiveCalls::default());
        let g = live.open(LiveCall {
            request_id: "r1".into(),
            user: Some("<b>u</b>".into()),
            model: Some("m".into()),
            api: Some("chat_completions"),
            started: Instant::now(),
            stream: true,
            chunks: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
        g.chunk(10);
        g.chunk(5);
        let s = live.snapshot();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].stream, s[0].chunks, s[0].bytes), (true, 2, 15));
        assert_eq!(s[0].user.as_deref(), Some("<b>u</b>"));
        drop(g);
        assert!(live.snapshot().is_empty());
    }
}
