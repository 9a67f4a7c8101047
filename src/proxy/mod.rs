//! The Pingora `ProxyHttp` implementation: each phase reads like one step of a request's story
//! and delegates the work to `openai`, `meter` and `telemetry`.
//!
//! 1. `request_filter`: take the config snapshot; refuse a declared body over the limit.
//! 2. `upstream_peer`: resolve the upstream asynchronously (see `dns`).
//! 3. `request_body_filter`: for chat calls, hold the body until it is complete, inspect it, and
//!    only then release it in one piece, so the decision about a call is made before the
//!    upstream has seen a byte of its body. Other paths stream through.
//! 4. `response_filter` / `response_body_filter`: the client gets the upstream's bytes untouched;
//!    a copy feeds the usage tap.
//! 5. `logging`: exactly one `UsageRecord` per call, handed to the sinks.

pub mod dns;
mod record;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::{HttpPeer, ProxyHttp, Session};
use pingora::proxy::FailToProxy;
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::budget::{Decision, Ledger, OpenCall, OpenCalls, OpenGuard, Refusal, Reservation};
use crate::config::Config;
use crate::openai::request::{self, RequestMeta};
use crate::openai::response::{BodyKind, ResponseTap};
use crate::openai::{is_chat_path, ApiError};
use crate::telemetry::calls::CallMetrics;
use crate::telemetry::traces::CallTrace;
use crate::telemetry::Sinks;

/// Largest error body (4xx/5xx) the tap reads to learn the upstream's error message.
const ERROR_TAP_LIMIT: usize = 64 * 1024;

/// How long a refused request's remaining body is read and dropped before the connection
/// closes.
const DRAIN_REJECTED_BODY: Duration = Duration::from_secs(2);

/// What the proxy's requests share; outlives config reloads. Assembled in `server.rs`, which
/// hands reload, the watcher and admin only the handles they need.
pub struct Shared {
    pub config: crate::config::Live,
    pub resolver: Arc<dns::Resolver>,
    pub sinks: Arc<Sinks>,
    pub calls: Arc<CallMetrics>,
    pub ledger: Arc<dyn Ledger>,
    /// Calls holding a budget reservation not settled yet.
    pub open_calls: Arc<OpenCalls>,
    /// Open streams per user (`limits.max_streams_per_user`).
    pub user_streams: Arc<dashmap::DashMap<String, usize>>,
    /// Calls between their request head and their record.
    pub in_flight: Arc<AtomicI64>,
    ids: RequestIds,
}

impl Shared {
    /// The shared state; `calls` should also be among the `sinks` to see records, and
    /// `open_calls` the ledger sink's.
    pub fn new(
        config: crate::config::Live,
        sinks: Arc<Sinks>,
        calls: Arc<CallMetrics>,
        ledger: Arc<dyn Ledger>,
        open_calls: Arc<OpenCalls>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            config,
            resolver: dns::Resolver::new(),
            sinks,
            in_flight: Arc::clone(&calls.in_flight),
            calls,
            ledger,
            open_calls,
            user_streams: Arc::default(),
            ids: RequestIds::new(),
        })
    }
}

/// Counts a call (or a stream) as active for as long as it lives, whatever path it ends on.
struct InFlight(Arc<AtomicI64>);

impl InFlight {
    fn new(c: &Arc<AtomicI64>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(c))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// Request ids unique across restarts: the process start time and a counter.
struct RequestIds {
    prefix: String,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        RequestIds {
            prefix: format!("{:x}{:05x}", t.as_secs(), t.subsec_micros()),
            next: AtomicU64::new(1),
        }
    }

    /// `tt-<prefix>-<n>`, without the formatting machinery (one allocation per request).
    fn next(&self) -> String {
        let mut n = itoa::Buffer::new();
        let n = n.format(self.next.fetch_add(1, Ordering::Relaxed));
        let mut id = String::with_capacity(4 + self.prefix.len() + n.len());
        id.push_str("tt-");
        id.push_str(&self.prefix);
        id.push('-');
        id.push_str(n);
        id
    }
}

pub struct TokenTap {
    pub shared: Arc<Shared>,
}

/// 403 for a body whose `user` names someone other than the virtual key's user.
fn user_mismatch() -> ApiError {
    ApiError::new(
        403,
        "invalid_request_error",
        "The request's `user` is not the user of this API key.",
    )
    .param("user")
    .code("user_mismatch")
}

/// Per-request state.
pub struct Ctx {
    cfg: Arc<Config>,
    start: Instant,
    started_at: SystemTime,
    request_id: String,
    /// `POST` to the Chat Completions endpoint.
    chat: bool,
    /// Chat request body held back until complete.
    held: Vec<Bytes>,
    /// The request's `Content-Encoding`, if any.
    request_encoding: Option<String>,
    request_bytes: u64,
    /// The held body went to the upstream.
    body_released: bool,
    meta: Option<RequestMeta>,
    meta_error: Option<String>,
    /// The upstream's addresses for this request, and how many connections were tried.
    addrs: Option<dns::Resolved>,
    attempts: usize,
    upstream_addr: Option<SocketAddr>,
    /// The upstream's status (the last non-1xx head).
    upstream_status: Option<u16>,
    ttfb: Option<Duration>,
    /// Time from when the upstream had the whole request to the first content token.
    ttft: Option<Duration>,
    /// When the request's body went to the upstream (chat calls hold it until then).
    sent_at: Option<Instant>,
    first_token_at: Option<Instant>,
    tap: Option<ResponseTap>,
    response_bytes: u64,
    /// tokentap refused the call itself (the upstream did not process it).
    rejection: Option<ApiError>,
    /// Why tokentap could not complete the call with the upstream.
    failure: Option<ApiError>,
    /// Time spent in tokentap's own phases.
    overhead: Duration,
    _in_flight: InFlight,
    /// Set while a streamed response is relayed.
    stream_active: Option<InFlight>,
    /// Settles the reservation at the estimate should the call never get its record.
    open: Option<OpenGuard>,
    /// The body is complete: decide about the call before it goes.
    decide: bool,
    /// The call's place in a trace (traces on).
    trace: Option<CallTrace>,
    /// allowed, refused, fail_open, not_capped (for the span); `None` before a decision.
    budget_decision: Option<&'static str>,
    /// The request body, for the span's messages, when content capture is on.
    input_body: Option<Bytes>,
    /// When the first chunk of the response body arrived.
    first_chunk_at: Option<Instant>,
    /// Counts this call among its user's open streams.
    user_stream: Option<UserStream>,
    /// The caller, from its virtual key.
    pub(crate) identity: Option<crate::auth::Identity>,
    /// The body's `user` is to be replaced by the key's (auth.user_mismatch = "overwrite").
    rewrite_user: bool,
    /// The whole body was read before the upstream was contacted (see `request_filter`).
    read_ahead: bool,
    /// The request head went upstream framed so that the body may still change (chunked).
    may_edit: bool,
    /// The body that goes upstream: the client's, or it with tokentap's edits.
    forward: Option<Bytes>,
    /// tokentap asked for this stream's usage; `strip` takes the answer back out.
    usage_injected: bool,
    strip: Option<crate::openai::strip::UsageStrip>,
}

/// One open stream of a user, for `limits.max_streams_per_user`; released when dropped.
struct UserStream {
    map: Arc<dashmap::DashMap<String, usize>>,
    user: String,
}

impl UserStream {
    fn open(map: &Arc<dashmap::DashMap<String, usize>>, user: &str, max: usize) -> Option<Self> {
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
    fn capture_content(&self) -> bool {
        self.chat
            && self.cfg.traces.capture_content
            && self.trace.as_ref().is_some_and(|t| t.sampled)
    }
}

impl TokenTap {
    /// Picks the upstream address for this attempt (resolving the name on the first).
    async fn upstream_peer_inner(&self, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let u = &ctx.cfg.upstream;

        let addrs = match ctx.addrs.take() {
            Some(a) => a,
            None => match self
                .shared
                .resolver
                .resolve(&u.url.host, u.url.port, u.dns_refresh, u.connect_timeout)
                .await
            {
                Ok(a) => a,
                Err(msg) => {
                    ctx.failure = Some(
                        ApiError::new(
                            502,
                            "upstream_error",
                            format!("tokentap could not resolve the upstream: {msg}"),
                        )
                        .code("upstream_unresolvable"),
                    );
                    return Err(Error::explain(ErrorType::ConnectNoRoute, msg).into_up());
                }
            },
        };
        // A retry after a failed connection moves on to the name's next address.
        let addr = addrs.pick(ctx.attempts);
        ctx.addrs = Some(addrs);
        ctx.attempts += 1;
        ctx.upstream_addr = Some(addr);
        let mut peer = HttpPeer::new(addr, u.url.tls, u.url.host.to_string());
        let o = &mut peer.options;
        // The call's deadline bounds every wait on the upstream.
        let left = ctx.cfg.limits.request_deadline.map(|d| {
            d.saturating_sub(ctx.start.elapsed())
                .max(Duration::from_millis(1))
        });
        let bound = |t: Duration| left.map_or(t, |l| t.min(l));
        o.connection_timeout = Some(bound(u.connect_timeout));
        o.total_connection_timeout = Some(bound(u.connect_timeout * 2));
        o.read_timeout = Some(bound(u.read_timeout));
        // (Per read: a stream that stalls just before the deadline is cut at most one
        // read_timeout later.)
        o.write_timeout = Some(bound(u.write_timeout));
        o.idle_timeout = Some(u.idle_timeout);
        o.verify_cert = true;
        o.verify_hostname = true;
        Ok(Box::new(peer))
    }

    /// The request head arrived (Pingora made the context then: config snapshot, start time).
    fn on_request(&self, session: &Session, ctx: &mut Ctx) -> Result<bool> {
        let req = session.req_header();
        ctx.chat = req.method.as_str().eq_ignore_ascii_case("POST") && is_chat_path(req.uri.path());
        if ctx.cfg.traces.enabled() {
            let h = |n: &str| req.headers.get(n).and_then(|v| v.to_str().ok());
            // Several tracestate lines are one list (W3C Trace Context).
            let state: Vec<&str> = req
                .headers
                .get_all("tracestate")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let state = (!state.is_empty()).then(|| state.join(","));
            ctx.trace = Some(CallTrace::start(
                h("traceparent"),
                state.as_deref(),
                ctx.cfg.traces.sampling_ratio,
            ));
        }
        let limit = ctx.cfg.limits.max_request_body_bytes;
        let declared = req
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(self.reject(ctx, too_large(limit)));
        }
        let max_head = ctx.cfg.limits.max_header_bytes;
        // The request line and every header line.
        let target = req.uri.path_and_query().map_or(1, |p| p.as_str().len())
            + req.uri.authority().map_or(0, |a| a.as_str().len());
        let head: usize = req.method.as_str().len()
            + target
            + 12
            + req
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>();
        if head > max_head {
            let e = ApiError::new(
                431,
                "invalid_request_error",
                format!("The request's headers are larger than {max_head} bytes."),
            )
            .code("request_header_too_large");
            return Err(self.reject(ctx, e));
        }
        if ctx.cfg.auth.mode == crate::auth::Mode::VirtualKeys {
            use crate::auth::Presented;
            let presented = crate::auth::presented(&req.headers);
            let found = match presented {
                Presented::Key(k) => ctx.cfg.auth.keys.lookup(k).cloned(),
                Presented::None | Presented::Conflicting => None,
            };
            let Some(id) = found else {
                // Unknown and revoked keys get the same answer (and nothing of the key).
                let message = if presented == Presented::Conflicting {
                    "Two different API keys were sent: send one tokentap key, as \
                     `Authorization: Bearer <key>`, `x-api-key: <key>` or `api-key: <key>`."
                } else {
                    "Invalid or missing API key: send a tokentap key as \
                     `Authorization: Bearer <key>`, `x-api-key: <key>` or `api-key: <key>`."
                };
                let e =
                    ApiError::new(401, "invalid_request_error", message).code("invalid_api_key");
                return Err(self.reject(ctx, e));
            };
            ctx.identity = Some(id);
            let allowed = ctx.chat
                || ctx.cfg.auth.allow.iter().any(|(m, p)| {
                    *m == req.method && crate::openai::normalized_path(req.uri.path()) == *p
                });
            if !allowed {
                let e = ApiError::new(
                    403,
                    "invalid_request_error",
                    "This API key may not call this endpoint through tokentap.",
                )
                .code("endpoint_not_allowed");
                return Err(self.reject(ctx, e));
            }
        }
        if ctx.chat {
            ctx.request_encoding = req
                .headers
                .get(header::CONTENT_ENCODING)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
        }
        Ok(false)
    }

    /// A piece of the request body: held (chat) or passed on, and inspected at its end.
    fn on_request_body(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(b) = body.as_ref() {
            ctx.request_bytes += b.len() as u64;
            let limit = ctx.cfg.limits.max_request_body_bytes;
            if ctx.request_bytes > limit as u64 {
                ctx.held = Vec::new();
                return Err(self.reject(ctx, too_large(limit)));
            }
        }
        if !ctx.chat || ctx.body_released {
            return Ok(());
        }
        if let Some(b) = body.take() {
            if !b.is_empty() {
                ctx.held.push(b);
            }
            // An empty chunk is not written upstream; the body goes out in one piece below.
            *body = Some(Bytes::new());
        }
        if end_of_stream {
            let whole = match ctx.held.len() {
                0 => Bytes::new(),
                1 => ctx.held.pop().unwrap_or_default(),
                _ => Bytes::from(std::mem::take(&mut ctx.held).concat()),
            };
            let limit = ctx.cfg.limits.max_request_body_bytes;
            match request::inspect_encoded(&whole, ctx.request_encoding.as_deref(), limit) {
                Ok(m) => ctx.meta = Some(m),
                Err(e) => ctx.meta_error = Some(e.0),
            }
            // Content goes into the span only when the operator opted in (and is readable
            // as sent: compressed bodies are not captured).
            if ctx.capture_content() && ctx.request_encoding.is_none() {
                ctx.input_body = Some(whole.clone());
            }
            // The decision point: everything about the call is known, nothing reached the
            // upstream yet. The decision follows (`decide_call`), then the body is made ready
            // (`prepare_forward`) and released.
            ctx.decide = true;
            ctx.forward = Some(whole);
        }
        Ok(())
    }

    /// The body that goes upstream: the client's bytes, with the splices tokentap makes
    /// (`openai::edit`) where it may: the key's user in place of another (user_mismatch =
    /// "overwrite"), and `stream_options.include_usage` for a stream whose client did not ask
    /// for its usage. Only a body read as sent (not compressed) is edited, and only when the
    /// request head went upstream framed for it (its length known, or chunked).
    fn prepare_forward(&self, ctx: &mut Ctx) -> std::result::Result<(), Box<Error>> {
        use crate::openai::edit;
        let (Some(whole), Some(meta)) = (ctx.forward.as_ref(), ctx.meta.as_ref()) else {
            return Ok(());
        };
        let plain = ctx
            .request_encoding
            .as_deref()
            .is_none_or(|e| e.trim().is_empty() || e.eq_ignore_ascii_case("identity"));
        let editable = plain && (ctx.read_ahead || ctx.may_edit);
        let mut edits = Vec::new();
        if std::mem::take(&mut ctx.rewrite_user) {
            match ctx.identity.as_ref().filter(|_| editable) {
                Some(id) => edits.extend(edit::set_user(meta, &id.user)),
                // Never send the body naming someone else.
                None => return Err(self.reject(ctx, user_mismatch())),
            }
        }
        let cfg = &ctx.cfg;
        if editable
            && meta.stream
            && meta.include_usage != Some(true)
            && cfg.upstream.stream_usage.injects(meta.model.as_deref())
        {
            if let edit::UsageAsk::Edit(e) = edit::ask_for_usage(whole, meta) {
                edits.push(e);
                ctx.usage_injected = true;
            }
        }
        if !edits.is_empty() {
            ctx.forward = Some(Bytes::from(edit::apply(whole, edits)));
        }
        Ok(())
    }

    /// The upstream's response head: status, timing, and the tap for the body.
    fn on_response(&self, resp: &mut ResponseHeader, ctx: &mut Ctx) -> Result<()> {
        let status = resp.status.as_u16();
        if (100..200).contains(&status) {
            return Ok(());
        }
        ctx.upstream_status = Some(status);
        ctx.ttfb = Some(ctx.start.elapsed());
        // The upstream answered: no attempt sends the body again, and a stream does not keep it.
        ctx.forward = None;
        if ctx.chat {
            let header = |name| resp.headers.get(name).and_then(|v| v.to_str().ok());
            let ctype = header(header::CONTENT_TYPE).unwrap_or("");
            let kind = if ctype.starts_with("text/event-stream") {
                if status < 400 {
                    ctx.stream_active = Some(InFlight::new(&self.shared.calls.streams_active));
                }
                BodyKind::Sse
            } else {
                BodyKind::Json
            };
            let limit = if status >= 400 {
                ERROR_TAP_LIMIT
            } else {
                ctx.cfg.limits.max_response_tap_bytes
            };
            let encoding = header(header::CONTENT_ENCODING);
            let mut tap = ResponseTap::new(kind, encoding, limit);
            if ctx.capture_content() {
                tap.capture_content(ctx.cfg.traces.max_content_bytes);
            }
            if ctx.usage_injected && kind == BodyKind::Sse && status < 400 {
                // The client did not ask for usage: what asking added comes out again.
                ctx.strip = crate::openai::strip::UsageStrip::new(encoding);
                if ctx.strip.is_some() {
                    // Its length changes: chunked (as Pingora frames a body of unknown
                    // length, before this filter runs), so the connection stays reusable.
                    if resp.remove_header(&header::CONTENT_LENGTH).is_some() {
                        resp.set_version(http::Version::HTTP_11);
                        resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
                    }
                } else {
                    log::warn!(
                        "{}: the stream's content-encoding {:?} cannot be read; its usage chunk \
                         reaches the client",
                        ctx.request_id,
                        encoding.unwrap_or_default()
                    );
                }
            }
            ctx.tap = Some(tap);
        }
        Ok(())
    }

    /// How a chat body is framed upstream. Read ahead: its final length is known (and set,
    /// when an edit changed it). Held: the head goes before the body is read, so while
    /// tokentap may still edit the body (usage injection, user overwrite) it goes chunked.
    /// A stream whose usage tokentap asks for must come back in a coding tokentap can read.
    fn frame_body(&self, req: &mut RequestHeader, ctx: &mut Ctx) -> Result<()> {
        let readable = |req: &mut RequestHeader| -> Result<()> {
            let accepted = req
                .headers
                .get(header::ACCEPT_ENCODING)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::openai::readable_accept_encoding);
            if let Some(v) = accepted {
                req.insert_header(header::ACCEPT_ENCODING, v)?;
            }
            Ok(())
        };
        if ctx.read_ahead {
            if let Some(b) = ctx
                .forward
                .as_ref()
                .filter(|b| b.len() as u64 != ctx.request_bytes)
            {
                req.insert_header(header::CONTENT_LENGTH, b.len().to_string())?;
            }
            if ctx.usage_injected {
                readable(req)?;
            }
            return Ok(());
        }
        let cfg = &ctx.cfg;
        let plain = ctx
            .request_encoding
            .as_deref()
            .is_none_or(|e| e.trim().is_empty() || e.eq_ignore_ascii_case("identity"));
        let may_inject = cfg.upstream.stream_usage.inject;
        let may_rewrite = cfg.auth.mode == crate::auth::Mode::VirtualKeys
            && cfg.auth.mismatch == crate::auth::Mismatch::Overwrite;
        if plain && (may_inject || may_rewrite) {
            ctx.may_edit = true;
            req.remove_header(&header::CONTENT_LENGTH);
            req.insert_header(header::TRANSFER_ENCODING, "chunked")?;
            if may_inject {
                readable(req)?;
            }
        }
        Ok(())
    }

    /// Reads the whole (small) body before the upstream is contacted: it is inspected and
    /// decided on first, and Pingora's replay buffer, which holds it, makes sure it is sent.
    /// Also returns how long it waited for the client.
    async fn read_body(&self, session: &mut Session, ctx: &mut Ctx) -> (Result<bool>, Duration) {
        session.as_mut().enable_retry_buffering();
        let mut waited = Duration::ZERO;
        loop {
            let t = Instant::now();
            let read = session.read_request_body().await;
            waited += t.elapsed();
            let mut piece = match read {
                Ok(p) => p,
                Err(e) => return (Err(e.into_down()), waited),
            };
            let end = piece.is_none();
            if let Err(e) = self.on_request_body(&mut piece, end, ctx) {
                return (Err(e), waited);
            }
            if end {
                return (Ok(false), waited);
            }
        }
    }

    /// Counts a streamed call against its user's `limits.max_streams_per_user`.
    fn open_stream(&self, ctx: &mut Ctx) -> std::result::Result<(), ApiError> {
        let max = ctx.cfg.limits.max_streams_per_user;
        let Some(meta) = ctx.meta.as_ref().filter(|m| m.stream && max > 0) else {
            return Ok(());
        };
        // Calls without a user share one count (omitting `user` is no way around the limit).
        let user = meta.user.as_deref().unwrap_or_default();
        match UserStream::open(&self.shared.user_streams, user, max) {
            Some(g) => {
                ctx.user_stream = Some(g);
                Ok(())
            }
            None => Err(ApiError::new(
                429,
                "rate_limit_exceeded",
                format!(
                    "Too many concurrent streams for this user (at most {max}). Retry when one \
                     has finished."
                ),
            )
            .code("too_many_streams")),
        }
    }

    /// The decision point: everything about the call is known and nothing of its body reached
    /// the upstream yet (it goes when this returns Ok).
    async fn decide_call(&self, ctx: &mut Ctx) -> std::result::Result<(), Box<Error>> {
        let cfg = Arc::clone(&ctx.cfg);
        if let Some(id) = ctx.identity.clone() {
            // The key says who calls; a body naming someone else is refused or corrected.
            if let Some(meta) = ctx.meta.as_mut() {
                // The caller is the key's user, whatever the body claims (also in the record
                // of a refused call).
                let claimed = meta.user.replace(id.user.clone());
                if claimed.is_some_and(|u| !u.is_empty() && u != id.user) {
                    let can_rewrite = ctx
                        .request_encoding
                        .as_deref()
                        .is_none_or(|e| e.trim().is_empty() || e.eq_ignore_ascii_case("identity"));
                    if cfg.auth.mismatch == crate::auth::Mismatch::Reject || !can_rewrite {
                        return Err(self.reject(ctx, user_mismatch()));
                    }
                    ctx.rewrite_user = true;
                }
            }
        }
        if let Some(e) = ctx
            .meta
            .as_ref()
            .and_then(|m| m.check(cfg.limits.max_user_bytes).err())
        {
            return Err(self.reject(ctx, e));
        }
        // A body tokentap cannot read cannot be checked against the key or counted as a
        // stream: refused where either applies (budgets refuse it on their own).
        if ctx.meta.is_none() && (ctx.identity.is_some() || cfg.limits.max_streams_per_user > 0) {
            let e = ApiError::new(
                400,
                "invalid_request_error",
                "tokentap could not read the request body: send a JSON object (UTF-8, not \
                 compressed with an unsupported encoding).",
            )
            .code("invalid_body");
            return Err(self.reject(ctx, e));
        }
        if let Err(e) = self.open_stream(ctx) {
            return Err(self.reject(ctx, e));
        }
        match crate::budget::decide(&*self.shared.ledger, &cfg, ctx.meta.as_ref()).await {
            Decision::Allow(res) => {
                ctx.budget_decision = Some(if res.is_some() {
                    "allowed"
                } else {
                    "not_capped"
                });
                self.hold(ctx, res);
            }
            Decision::Unchecked(res) => {
                ctx.budget_decision = Some("fail_open");
                self.shared.calls.budget_fail_open();
                self.hold(ctx, res);
            }
            Decision::Refuse(e, why) => {
                ctx.budget_decision = Some("refused");
                let (user, team) = match &why {
                    Refusal::OverBudget { user, team, .. } => (Some(user.as_str()), team.as_str()),
                    _ => (None, ""),
                };
                self.shared.calls.budget_rejected(user, team, why.reason());
                return Err(self.reject(ctx, e));
            }
        }
        // The body goes now: time to first token counts from here, not from before the
        // budget decision (a Redis round trip is tokentap's, not the upstream's).
        ctx.sent_at = Some(Instant::now());
        Ok(())
    }

    /// Keeps the call's reservation until its record settles it (or its guard does).
    fn hold(&self, ctx: &mut Ctx, res: Option<Arc<Reservation>>) {
        let Some(res) = res else { return };
        let meta = ctx.meta.as_ref();
        let model = meta.and_then(|m| m.model.clone());
        let call = OpenCall {
            reservation: res,
            request_id: ctx.request_id.clone(),
            price: ctx.cfg.pricing.lookup(None, model.as_deref()).copied(),
            model,
            prompt_text_bytes: meta.map_or(0, |m| m.prompt_text_bytes),
            started: ctx
                .started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            completion_bytes: Default::default(),
            web_searches: Default::default(),
            reported: Default::default(),
        };
        ctx.open = Some(
            self.shared
                .open_calls
                .open(call, Arc::clone(&self.shared.ledger)),
        );
    }

    fn reject(&self, ctx: &mut Ctx, e: ApiError) -> Box<Error> {
        let err = Error::explain(ErrorType::HTTPStatus(e.status), e.message.clone());
        ctx.rejection = Some(e);
        err
    }
}

#[async_trait]
impl ProxyHttp for TokenTap {
    /// Boxed: Pingora keeps the context in its per-request future, in more than one place
    /// across awaits, so an inline `Ctx` (~2 KB) made every open call's future ~6 KB larger
    /// and was copied with it.
    type CTX = Box<Ctx>;

    fn new_ctx(&self) -> Box<Ctx> {
        Box::new(Ctx {
            cfg: self.shared.config.load_full(),
            start: Instant::now(),
            started_at: SystemTime::now(),
            request_id: self.shared.ids.next(),
            chat: false,
            held: Vec::new(),
            request_encoding: None,
            request_bytes: 0,
            body_released: false,
            meta: None,
            meta_error: None,
            addrs: None,
            attempts: 0,
            upstream_addr: None,
            upstream_status: None,
            ttfb: None,
            ttft: None,
            sent_at: None,
            first_token_at: None,
            tap: None,
            response_bytes: 0,
            rejection: None,
            failure: None,
            overhead: Duration::ZERO,
            _in_flight: InFlight::new(&self.shared.in_flight),
            stream_active: None,
            open: None,
            trace: None,
            budget_decision: None,
            input_body: None,
            first_chunk_at: None,
            user_stream: None,
            identity: None,
            rewrite_user: false,
            decide: false,
            read_ahead: false,
            may_edit: false,
            forward: None,
            usage_injected: false,
            strip: None,
        })
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let t = Instant::now();
        // A client that goes quiet (mid-body, or between requests) cannot hold its
        // connection for ever.
        let idle = ctx.cfg.limits.client_idle_timeout;
        session.set_read_timeout(Some(idle));
        // Only shortens keep-alive where Pingora kept it (it turns it off, e.g., for requests
        // with both Transfer-Encoding and Content-Length).
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(idle.as_secs().max(1)));
        }
        let mut r = self.on_request(session, ctx);
        if matches!(r, Ok(false)) && ctx.chat {
            if session.is_body_empty() {
                // A chat call without a body: decided here, before anything goes upstream (the
                // body filter, called for its end, then has nothing left to do).
                r = self.on_request_body(&mut None, true, ctx).map(|_| false);
                ctx.read_ahead = true;
            } else if read_ahead(session) {
                ctx.read_ahead = true;
                let waited;
                (r, waited) = self.read_body(session, ctx).await;
                // Waiting for the client's bytes is not tokentap's time.
                ctx.overhead = ctx.overhead.saturating_sub(waited);
            }
            if r.is_ok() && std::mem::take(&mut ctx.decide) {
                r = match self.decide_call(ctx).await {
                    Ok(()) => self.prepare_forward(ctx).map(|_| false),
                    Err(e) => Err(e),
                };
            }
        }
        ctx.overhead += t.elapsed();
        r
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let t = Instant::now();
        let r = self.upstream_peer_inner(ctx).await;
        ctx.overhead += t.elapsed();
        r
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let cfg = Arc::clone(&ctx.cfg);
        let url = &cfg.upstream.url;
        req.insert_header(header::HOST, url.host_header.as_str())?;
        let auth = &cfg.auth;
        if auth.mode == crate::auth::Mode::VirtualKeys {
            // The client's key stays here, whichever header it came in; the upstream gets the
            // real one (if configured) in the header the upstream reads.
            for h in crate::auth::CREDENTIAL_HEADERS {
                req.remove_header(h);
            }
            // The client may not choose which organisation or project the real key bills.
            req.remove_header("openai-organization");
            req.remove_header("openai-project");
            if let Some(s) = &auth.upstream_auth {
                // Sensitive: its Debug print (Pingora's debug log) shows no value.
                let mut v = http::HeaderValue::from_str(&s.0)
                    .map_err(|e| Error::because(ErrorType::InternalError, "upstream key", e))?;
                v.set_sensitive(true);
                req.insert_header(auth.upstream_key_header.name(), v)?
            }
        }
        if ctx.chat {
            self.frame_body(req, ctx)?;
        }
        // Only when the operator asked: otherwise the request goes as the client sent it.
        if let Some(t) = ctx
            .trace
            .as_ref()
            .filter(|_| ctx.cfg.traces.inject_traceparent)
        {
            req.insert_header("traceparent", t.traceparent())?;
        }
        if !url.base_path.is_empty() {
            let pq = req
                .uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_string();
            let uri = format!("{}{}", url.base_path, pq)
                .parse::<http::Uri>()
                .map_err(|e| Error::because(ErrorType::InternalError, "rewriting path", e))?;
            req.set_uri(uri);
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if ctx.read_ahead {
            // The body was read and decided on before the upstream was contacted; Pingora
            // hands over its copy (the replay buffer) once for each attempt: what goes is
            // tokentap's, edits included.
            if end_of_stream || body.is_some() {
                *body = ctx.forward.clone().filter(|b| !b.is_empty());
                ctx.body_released = true;
                ctx.sent_at = Some(Instant::now());
            }
            return Ok(());
        }
        let t = Instant::now();
        let mut r = self.on_request_body(body, end_of_stream, ctx);
        if r.is_ok() && std::mem::take(&mut ctx.decide) {
            r = match self.decide_call(ctx).await {
                Ok(()) => self.prepare_forward(ctx),
                Err(e) => Err(e),
            };
            if r.is_ok() {
                // (Taken: no attempt sends it again, and a long stream does not keep it.)
                *body = ctx.forward.take().filter(|b| !b.is_empty());
                ctx.body_released = true;
                ctx.sent_at = Some(Instant::now());
            }
        }
        ctx.overhead += t.elapsed();
        r
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let t = Instant::now();
        let r = self.on_response(resp, ctx);
        ctx.overhead += t.elapsed();
        r
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<Duration>> {
        let t = Instant::now();
        if let Some(b) = body.as_mut() {
            if ctx.first_chunk_at.is_none() && !b.is_empty() {
                ctx.first_chunk_at = Some(Instant::now());
            }
            ctx.response_bytes += b.len() as u64;
            if let Some(tap) = ctx.tap.as_mut() {
                if tap.feed(b) {
                    let now = Instant::now();
                    ctx.first_token_at = Some(now);
                    ctx.ttft = Some(now - ctx.sent_at.unwrap_or(ctx.start));
                }
                // What the call used so far, should it never get its record.
                if let Some(open) = &ctx.open {
                    open.call.observe(tap);
                }
            }
            if let Some(strip) = ctx.strip.as_mut() {
                *b = Bytes::from(strip.feed(b));
            }
        }
        if let Some(strip) = ctx.strip.as_mut().filter(|_| end_of_stream) {
            let rest = strip.finish();
            if !rest.is_empty() {
                let mut all = body.take().map(Vec::from).unwrap_or_default();
                all.extend(rest);
                *body = Some(Bytes::from(all));
            }
            ctx.strip = None;
        }
        ctx.overhead += t.elapsed();
        // Past the deadline, the stream is cut (after the tap saw this chunk: it may carry
        // the usage).
        if let Some(d) = ctx.cfg.limits.request_deadline {
            if ctx.start.elapsed() > d {
                ctx.failure = Some(deadline_passed(d));
                return Err(Error::explain(
                    ErrorType::ReadTimedout,
                    "limits.request_deadline_ms passed",
                )
                .into_up());
            }
        }
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing was sent on a connection that never opened: try the name's next address, if
        // there is one this request has not tried.
        if ctx.addrs.as_ref().is_some_and(|a| ctx.attempts < a.len()) {
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("peer: {peer}"));
        // A request is never sent twice. Pingora's rule (retry an idempotent request whose
        // reused connection turned out stale) stands, with two more conditions: nothing of a
        // body was read from the client (a body consumed here cannot be replayed beyond
        // Pingora's 64 KiB buffer), and the upstream did not simply take too long.
        let replayable = session.req_header().method.is_idempotent()
            && ctx.request_bytes == 0
            && !ctx.body_released
            && ctx.upstream_status.is_none()
            && !matches!(
                e.etype(),
                ErrorType::ReadTimedout | ErrorType::WriteTimedout
            );
        if replayable {
            e.retry.decide_reuse(client_reused);
        } else {
            e.set_retry(false);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let deadline = ctx
            .cfg
            .limits
            .request_deadline
            .filter(|d| ctx.start.elapsed() >= *d && e.esource() == &ErrorSource::Upstream);
        let api = ctx
            .rejection
            .clone()
            .or_else(|| ctx.failure.clone())
            .or_else(|| deadline.map(deadline_passed))
            .or_else(|| failure_for(e));
        let code = match (&api, session.response_written()) {
            (_, Some(resp)) => resp.status.as_u16(),
            (None, None) => 0,
            (Some(api), None) => {
                if ctx.failure.is_none() && ctx.rejection.is_none() {
                    ctx.failure = Some(api.clone());
                }
                match write_error(session, api).await {
                    Ok(()) => {
                        if ctx.rejection.is_some() {
                            // Read (and drop) what the client is still sending, for a while,
                            // so it sees the answer rather than a reset connection.
                            let drain = session.downstream_session.drain_request_body();
                            let _ = tokio::time::timeout(DRAIN_REJECTED_BODY, drain).await;
                        }
                        api.status
                    }
                    Err(_) => 0,
                }
            }
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        let t = Instant::now();
        ctx.stream_active = None;
        let rec = record::build(session, e, ctx);
        self.shared.sinks.record(Arc::new(rec));
        let total = ctx.overhead + t.elapsed();
        self.shared.calls.observe_overhead(total.as_secs_f64());
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Self::CTX, e: &Error) -> bool {
        // Refusals and clients hanging up are outcomes, recorded in the access log.
        ctx.rejection.is_some() || *e.esource() == ErrorSource::Downstream
    }
}

/// The most of a request body Pingora replays to the upstream (its retry buffer,
/// `BODY_BUF_LIMIT` in pingora-core 0.9): the most tokentap reads before contacting it.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// Whether a chat body is read whole before the upstream is contacted: one of a declared
/// length Pingora can replay, from a client that does not wait for `100 Continue`. (Others
/// are held in the body filter, after the head went upstream.)
fn read_ahead(session: &Session) -> bool {
    let h = &session.req_header().headers;
    let declared = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    declared.is_some_and(|n| n > 0 && n <= REPLAY_LIMIT)
        && !h.contains_key(header::TRANSFER_ENCODING)
        && !h.contains_key(header::EXPECT)
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        413,
        "invalid_request_error",
        format!(
            "Request body is larger than this proxy accepts ({limit} bytes). Send a smaller \
             request, or ask the operator to raise limits.max_request_body_bytes."
        ),
    )
    .code("request_too_large")
}

/// The answer for a Pingora error tokentap did not raise itself.
fn deadline_passed(d: Duration) -> ApiError {
    ApiError::new(
        504,
        "upstream_error",
        format!(
            "The call did not complete within tokentap's deadline ({} ms).",
            d.as_millis()
        ),
    )
    .code("deadline_exceeded")
}

fn failure_for(e: &Error) -> Option<ApiError> {
    use ErrorType::*;
    let timeout = |what: &str| {
        ApiError::new(
            504,
            "upstream_error",
            format!("The upstream did not {what} in time. Retry later."),
        )
        .code("upstream_timeout")
    };
    match (e.esource(), e.etype()) {
        (_, HTTPStatus(code)) => Some(ApiError::new(*code, "api_error", e.to_string())),
        (ErrorSource::Downstream, WriteError | ReadError | ConnectionClosed) => None,
        // The client stopped sending its request (limits.client_idle_timeout_ms).
        (ErrorSource::Downstream, ReadTimedout) => Some(
            ApiError::new(
                408,
                "invalid_request_error",
                "The request did not arrive in time (the client went quiet).",
            )
            .code("client_timeout"),
        ),
        (ErrorSource::Downstream, WriteTimedout) => None,
        (ErrorSource::Downstream, _) => Some(ApiError::new(
            400,
            "invalid_request_error",
            format!(
                "tokentap could not read the request: {}",
                e.etype().as_str()
            ),
        )),
        (ErrorSource::Upstream, ConnectTimedout) => Some(timeout("accept the connection")),
        (ErrorSource::Upstream, ReadTimedout) => Some(timeout("answer")),
        (ErrorSource::Upstream, WriteTimedout) => Some(timeout("read the request")),
        (ErrorSource::Upstream, _) => Some(
            ApiError::new(
                502,
                "upstream_error",
                format!(
                    "tokentap could not get a complete answer from the upstream ({}). Retry later.",
                    e.etype().as_str()
                ),
            )
            .code("upstream_unavailable"),
        ),
        _ => Some(ApiError::new(
            500,
            "api_error",
            "tokentap failed internally while proxying this request.",
        )),
    }
}

async fn write_error(session: &mut Session, e: &ApiError) -> Result<()> {
    let body = e.body();
    let mut resp = ResponseHeader::build(e.status, Some(4))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(header::CONNECTION, "close")?;
    if let Some(s) = e.retry_after {
        resp.insert_header(header::RETRY_AFTER, s.to_string())?;
    }
    session.set_keepalive(None);
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}
