//! A request's state from its head to its record.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;

/// Per-request state.
pub struct Ctx {
    pub(super) cfg: Arc<Config>,
    pub(super) start: Instant,
    pub(super) started_at: SystemTime,
    pub(super) request_id: String,
    /// `POST` to the Chat Completions endpoint.
    pub(super) chat: bool,
    /// Chat request body held back until complete.
    pub(super) held: Vec<Bytes>,
    /// The request's `Content-Encoding`, if any.
    pub(super) request_encoding: Option<String>,
    pub(super) request_bytes: u64,
    /// The held body went to the upstream.
    pub(super) body_released: bool,
    pub(super) meta: Option<RequestMeta>,
    pub(super) meta_error: Option<String>,
    /// The upstream's addresses for this request, and how many connections were tried.
    pub(super) addrs: Option<dns::Resolved>,
    pub(super) attempts: usize,
    pub(super) upstream_addr: Option<SocketAddr>,
    /// The upstream's status (the last non-1xx head).
    pub(super) upstream_status: Option<u16>,
    pub(super) ttfb: Option<Duration>,
    /// Time from when the upstream had the whole request to the first content token.
    pub(super) ttft: Option<Duration>,
    /// When the request's body went to the upstream (chat calls hold it until then).
    pub(super) sent_at: Option<Instant>,
    pub(super) first_token_at: Option<Instant>,
    pub(super) tap: Option<ResponseTap>,
    pub(super) response_bytes: u64,
    /// tokentap refused the call itself (the upstream did not process it).
    pub(super) rejection: Option<ApiError>,
    /// Why tokentap could not complete the call with the upstream.
    pub(super) failure: Option<ApiError>,
    /// Time spent in tokentap's own phases.
    pub(super) overhead: Duration,
    pub(super) _in_flight: InFlight,
    /// Set while a streamed response is relayed.
    pub(super) stream_active: Option<InFlight>,
    /// Settles the reservation at the estimate should the call never get its record.
    pub(super) open: Option<OpenGuard>,
    /// The body is complete: decide about the call before it goes.
    pub(super) decide: bool,
    /// The call's place in a trace (traces on).
    pub(super) trace: Option<CallTrace>,
    /// allowed, refused, fail_open, not_capped (for the span); `None` before a decision.
    pub(super) budget_decision: Option<&'static str>,
    /// The request body, for the span's messages, when content capture is on.
    pub(super) input_body: Option<Bytes>,
    /// When the first chunk of the response body arrived.
    pub(super) first_chunk_at: Option<Instant>,
    /// Counts this call among its user's open streams.
    pub(super) user_stream: Option<UserStream>,
    /// The caller, from its virtual key.
    pub(crate) identity: Option<crate::auth::Identity>,
    /// The body's `user` is to be replaced by the key's (auth.user_mismatch = "overwrite").
    pub(super) rewrite_user: bool,
    /// The whole body was read before the upstream was contacted (see `request_filter`).
    pub(super) read_ahead: bool,
    /// The request head went upstream framed so that the body may still change (chunked).
    pub(super) may_edit: bool,
    /// The body that goes upstream: the client's, or it with tokentap's edits.
    pub(super) forward: Option<Bytes>,
    /// tokentap asked for this stream's usage; `strip` takes the answer back out.
    pub(super) usage_injected: bool,
    pub(super) strip: Option<crate::openai::strip::UsageStrip>,
}

/// Counts a call (or a stream) as active for as long as it lives, whatever path it ends on.
pub(super) struct InFlight(Arc<AtomicI64>);

impl InFlight {
    pub(super) fn new(c: &Arc<AtomicI64>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(c))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// One open stream of a user, for `limits.max_streams_per_user`; released when dropped.
pub(super) struct UserStream {
    map: Arc<dashmap::DashMap<String, usize>>,
    user: String,
}

impl UserStream {
    pub(super) fn open(
        map: &Arc<dashmap::DashMap<String, usize>>,
        user: &str,
        max: usize,
    ) -> Option<Self> {
        let mut n = map.entry(user.to_string()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(UserStream {
            map: Arc::clone(map),
            user: user.to_string(),
        })
    }
}

impl Drop for UserStream {
    fn drop(&mut self) {
        // The last stream of a user removes its entry: the map holds only open streams.
        self.map.remove_if_mut(&self.user, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

impl Ctx {
    /// Prompt and completion text are kept for this call's span (opted in, and sampled).
    pub(super) fn capture_content(&self) -> bool {
        self.chat
            && self.cfg.traces.capture_content
            && self.trace.as_ref().is_some_and(|t| t.sampled)
    }
}
