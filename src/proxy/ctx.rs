//! A request's state from its head to its record.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::meter::Api;

/// Per-request state.
pub struct Ctx {
    pub(super) cfg: Arc<Config>,
    pub(super) request_id: String,
    /// The dialect of a metered call (a `POST` to a path one serves); `None`: the request
    /// passes through unmetered.
    pub(super) api: Option<Api>,
    pub(super) meta: Option<RequestMeta>,
    pub(super) meta_error: Option<String>,
    /// The request body's way to the upstream.
    pub(super) body: Body,
    /// When things happened, and tokentap's own time.
    pub(super) times: Times,
    /// Where the call went and how it answered.
    pub(super) upstream: Upstream,
    /// The response on its way to the client.
    pub(super) response: Response,
    /// tokentap refused the call itself (the upstream did not process it).
    pub(super) rejection: Option<ApiError>,
    /// Why tokentap could not complete the call with the upstream.
    pub(super) failure: Option<ApiError>,
    pub(super) _in_flight: InFlight,
    /// Settles the reservation at the estimate should the call never get its record.
    pub(super) open: Option<OpenGuard>,
    /// The call's place in a trace (traces on).
    pub(super) trace: Option<CallTrace>,
    /// allowed, refused, fail_open, not_capped; `None` before a decision.
    pub(super) budget_decision: Option<&'static str>,
    /// Counts this call among its user's open streams.
    pub(super) user_stream: Option<UserStream>,
    /// The caller, from its virtual key.
    pub(crate) identity: Option<crate::auth::Identity>,
    /// Lists the call on the admin page's live view while it runs.
    pub(super) live: Option<crate::telemetry::live::LiveGuard>,
    /// What the call holds of its rate limits, until it ends.
    pub(super) limit: Option<crate::budget::limits::Held>,
}

/// A chat request body's way to the upstream.
#[derive(Default)]
pub(super) struct Body {
    /// Pieces held back until the body is complete.
    pub(super) held: Vec<Bytes>,
    /// The request's `Content-Encoding`, if any.
    pub(super) encoding: Option<String>,
    pub(super) bytes: u64,
    /// The whole body was read before the upstream was contacted (see `request_filter`).
    pub(super) read_ahead: bool,
    /// The body is complete: decide about the call before it goes.
    pub(super) decide: bool,
    /// The body's `user` is to be replaced by the key's (auth.user_mismatch = "overwrite").
    pub(super) rewrite_user: bool,
    /// The request head went upstream framed so that the body may still change (chunked).
    pub(super) may_edit: bool,
    /// The body that goes upstream: the client's, or it with tokentap's edits.
    pub(super) forward: Option<Bytes>,
    /// tokentap asked for this stream's usage; the response's `strip` takes it back out.
    pub(super) usage_injected: bool,
    /// The body went to the upstream.
    pub(super) released: bool,
    /// The body as sent, for the span, when content capture is on.
    pub(super) captured: Option<Bytes>,
}

impl Body {
    /// The body is read as sent: no content coding (or `identity`), so it can be inspected
    /// as it stands, captured and edited.
    pub(super) fn plain(&self) -> bool {
        self.encoding
            .as_deref()
            .is_none_or(|e| e.trim().is_empty() || e.eq_ignore_ascii_case("identity"))
    }
}

/// When a call's moments happened.
pub(super) struct Times {
    pub(super) start: Instant,
    pub(super) started_at: SystemTime,
    /// To the upstream's response head.
    pub(super) ttfb: Option<Duration>,
    /// From when the upstream had the whole request to the first content token.
    pub(super) ttft: Option<Duration>,
    /// When the request's body went to the upstream.
    pub(super) sent_at: Option<Instant>,
    pub(super) first_token: Option<Instant>,
    /// When the first chunk of the response body arrived.
    pub(super) first_chunk: Option<Instant>,
    /// Time spent in tokentap's own phases.
    pub(super) overhead: Duration,
}

impl Times {
    pub(super) fn now() -> Self {
        Times {
            start: Instant::now(),
            started_at: SystemTime::now(),
            ttfb: None,
            ttft: None,
            sent_at: None,
            first_token: None,
            first_chunk: None,
            overhead: Duration::ZERO,
        }
    }
}

/// The upstream side of a call.
#[derive(Default)]
pub(super) struct Upstream {
    /// The upstream's addresses for this request, and how many connections were tried.
    pub(super) addrs: Option<dns::Resolved>,
    pub(super) attempts: usize,
    pub(super) addr: Option<SocketAddr>,
    /// The upstream's status (the last non-1xx head).
    pub(super) status: Option<u16>,
    /// The `[[routes]]` entry the request goes by (`None`: `[upstream]`).
    pub(super) route: Option<usize>,
    /// The path after a stripped route prefix (normalized): what the dialect is read from.
    pub(super) stripped: Option<String>,
}

/// The response on its way to the client.
#[derive(Default)]
pub(super) struct Response {
    /// Reads a copy for metering.
    pub(super) tap: Option<ResponseTap>,
    pub(super) bytes: u64,
    /// Takes out what asking for usage added (when tokentap asked).
    pub(super) strip: Option<crate::openai::strip::UsageStrip>,
    /// Set while a streamed response is relayed.
    pub(super) stream_active: Option<InFlight>,
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
    /// Where the call goes: its route's upstream, or `[upstream]`'s.
    pub(super) fn upstream_url(&self) -> &crate::config::UpstreamUrl {
        match self.upstream.route {
            Some(i) => &self.cfg.routes[i].url,
            None => &self.cfg.upstream.url,
        }
    }

    /// The path the dialect is read from: after a stripped route prefix, else as sent.
    pub(super) fn dialect_path<'a>(&'a self, sent: &'a str) -> &'a str {
        self.upstream.stripped.as_deref().unwrap_or(sent)
    }

    /// Prompt and completion text are kept for this call's span (opted in, and sampled).
    pub(super) fn capture_content(&self) -> bool {
        self.api.is_some()
            && self.cfg.traces.capture_content
            && self.trace.as_ref().is_some_and(|t| t.sampled)
    }
}
