//! The Pingora `ProxyHttp` implementation: each phase reads like one step of a request's story
//! and delegates the work to `openai`, `meter` and `telemetry`.
//!
//! 1. `request_filter`: take the config snapshot; refuse a declared body over the limit; read a
//!    chat body Pingora can replay (up to 64 KiB) whole, inspect it and decide about the call
//!    before the upstream is contacted (`body`).
//! 2. `upstream_peer`: resolve the upstream asynchronously (see `dns`).
//! 3. `upstream_request_filter`: credentials, and how the chat body is framed (`body`).
//! 4. `request_body_filter`: hand over the body read ahead; or hold a longer one until it is
//!    complete, inspect it, decide, and release it in one piece, so that the upstream has seen
//!    no byte of it before the decision. Other paths stream through.
//! 5. `response_filter` / `response_body_filter`: the client gets the upstream's bytes (with
//!    the usage tokentap asked for taken out again); a copy feeds the usage tap.
//! 6. `logging`: exactly one `UsageRecord` per call, handed to the sinks (`record`).

mod answer;
mod body;
mod ctx;
pub mod dns;
mod record;

use answer::*;
use body::*;
pub use ctx::Ctx;
use ctx::{Body, InFlight, Response, Times, Upstream, UserStream};

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
use crate::meter::Api;
use crate::openai::request::{self, RequestMeta};
use crate::openai::response::{BodyKind, ResponseTap};
use crate::openai::{api_of, ApiError};
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

impl TokenTap {
    /// Picks the upstream address for this attempt (resolving the name on the first).
    async fn upstream_peer_inner(&self, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let cfg = Arc::clone(&ctx.cfg);
        let u = &cfg.upstream;
        let url = match ctx.upstream.route {
            Some(i) => &cfg.routes[i].url,
            None => &u.url,
        };

        let addrs = match ctx.upstream.addrs.take() {
            Some(a) => a,
            None => match self
                .shared
                .resolver
                .resolve(&url.host, url.port, u.dns_refresh, u.connect_timeout)
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
        let addr = addrs.pick(ctx.upstream.attempts);
        ctx.upstream.addrs = Some(addrs);
        ctx.upstream.attempts += 1;
        ctx.upstream.addr = Some(addr);
        let mut peer = HttpPeer::new(addr, url.tls, url.host.to_string());
        let o = &mut peer.options;
        // The call's deadline bounds every wait on the upstream.
        let left = ctx.cfg.limits.request_deadline.map(|d| {
            d.saturating_sub(ctx.times.start.elapsed())
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
        if !ctx.cfg.routes.is_empty() {
            let normalized = crate::openai::normalized_path(req.uri.path());
            ctx.upstream.route = ctx.cfg.route_for(&normalized);
            if let Some(r) = ctx
                .upstream
                .route
                .map(|i| &ctx.cfg.routes[i])
                .filter(|r| r.strip_prefix)
            {
                let rest = r.rest(&normalized).unwrap_or_default();
                let rest = if rest.is_empty() { "/" } else { rest };
                // What goes upstream (the path as sent, less the prefix's segments) must read
                // as what the API was picked from: `/anthropic%2Fx/v1/messages` must not pass
                // as `/x/v1/messages`.
                let segments = r.prefix.matches('/').count();
                let sent = strip_segments(req.uri.path(), segments);
                if crate::openai::normalized_path(&sent) != rest {
                    let e = ApiError::new(
                        400,
                        "invalid_request_error",
                        "The request path does not name one endpoint: write it without \
                         escaped slashes or dot segments.",
                    )
                    .code("ambiguous_path");
                    return Err(self.reject(ctx, e));
                }
                ctx.upstream.stripped = Some(rest.to_string());
            }
        }
        let path = ctx.dialect_path(req.uri.path());
        let api = api_of(req.method.as_str(), path);
        if api.is_none()
            && req.headers.contains_key(header::UPGRADE)
            && api_of("POST", path).is_some()
        {
            // A metered API over a WebSocket (Responses' WebSocket mode): its frames would
            // pass unmetered and uncapped. Clients fall back to HTTP.
            let e = ApiError::new(
                400,
                "invalid_request_error",
                "tokentap meters this API over HTTP only: send it as a POST, without a \
                 connection upgrade.",
            )
            .code("websocket_not_metered");
            return Err(self.reject(ctx, e));
        }
        // (Only unmetered requests pay for the path's class.)
        let free = api.is_none() && crate::openai::is_free_path(req.method.as_str(), path);
        ctx.api = api;
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
            let allowed = ctx.api.is_some()
                || free
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
        if ctx.api.is_none()
            && ctx.cfg.limits.unmetered == crate::config::Unmetered::Refuse
            && !free
        {
            let e = ApiError::new(
                404,
                "invalid_request_error",
                "tokentap meters Chat Completions, Responses, Messages, embeddings and \
                 completions calls only; this endpoint is not served here \
                 (limits.unmetered = \"refuse\").",
            )
            .code("unmetered_endpoint");
            return Err(self.reject(ctx, e));
        }
        if ctx.api.is_some() {
            ctx.body.encoding = req
                .headers
                .get(header::CONTENT_ENCODING)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
        }
        Ok(false)
    }

    /// The upstream's response head: status, timing, and the tap for the body.
    fn on_response(&self, resp: &mut ResponseHeader, ctx: &mut Ctx) -> Result<()> {
        let status = resp.status.as_u16();
        if (100..200).contains(&status) {
            return Ok(());
        }
        ctx.upstream.status = Some(status);
        ctx.times.ttfb = Some(ctx.times.start.elapsed());
        // A rate-limited caller learns where it stands on every answer: tokentap's limit, or
        // the upstream's own where that one leaves less.
        if let Some(h) = &ctx.limit {
            let headers = crate::budget::ratelimit_headers(&h.grant.standing);
            for triple in headers.chunks(3) {
                let left = |name: &str| -> Option<u64> {
                    resp.headers.get(name)?.to_str().ok()?.trim().parse().ok()
                };
                let (ours, theirs) = (triple[1].1.parse().ok(), left(triple[1].0));
                if theirs.is_some_and(|t| ours.is_none_or(|o: u64| t < o)) {
                    continue;
                }
                for (k, v) in triple {
                    resp.insert_header(*k, v)?;
                }
            }
        }
        // The upstream answered: no attempt sends the body again, and a stream does not keep it.
        ctx.body.forward = None;
        if let Some(api) = ctx.api {
            let header = |name| resp.headers.get(name).and_then(|v| v.to_str().ok());
            let ctype = header(header::CONTENT_TYPE).unwrap_or("");
            let kind = if ctype.starts_with("text/event-stream") {
                if status < 400 {
                    ctx.response.stream_active =
                        Some(InFlight::new(&self.shared.calls.streams_active));
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
            let mut tap = ResponseTap::for_api(api, kind, encoding, limit);
            if ctx.capture_content() {
                tap.capture_content(ctx.cfg.traces.max_content_bytes);
            }
            if ctx.body.usage_injected && kind == BodyKind::Sse && status < 400 {
                // The client did not ask for usage: what asking added comes out again.
                ctx.response.strip = crate::openai::strip::UsageStrip::new(encoding);
                if ctx.response.strip.is_some() {
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
            ctx.response.tap = Some(tap);
        }
        Ok(())
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
                // (Messages' `metadata.user_id` is the client's own session or device id,
                // not a claim: the key's user stands, and the body goes as sent.)
                let claim = meta.user_claim;
                let other = meta.other_user.take();
                let names_other =
                    |u: &Option<String>| u.as_ref().is_some_and(|u| !u.is_empty() && *u != id.user);
                if claim && (names_other(&claimed) || names_other(&other)) {
                    let can_rewrite = ctx.body.plain();
                    if cfg.auth.mismatch == crate::auth::Mismatch::Reject || !can_rewrite {
                        return Err(self.reject(ctx, user_mismatch()));
                    }
                    ctx.body.rewrite_user = true;
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
        if ctx.meta.as_ref().is_some_and(|m| m.background) && cfg.budgets.enforcing() {
            // Its usage is billed after the answer tokentap sees: it could not be capped.
            let e = ApiError::new(
                400,
                "invalid_request_error",
                "Background responses cannot be capped: their usage is billed after the answer \
                 tokentap sees. Send the request without `background`.",
            )
            .param("background")
            .code("background_not_capped");
            return Err(self.reject(ctx, e));
        }
        if let Err(e) = self.open_stream(ctx) {
            return Err(self.reject(ctx, e));
        }
        // Rate limits first: a call they refuse reserves nothing.
        let key = ctx.identity.as_ref().map(|i| i.key_id.clone());
        match crate::budget::limit(
            &*self.shared.ledger,
            &cfg,
            ctx.meta.as_ref(),
            key.as_deref(),
        )
        .await
        {
            Ok(grant) => {
                ctx.limit = grant
                    .map(|g| crate::budget::limits::Held::new(Arc::clone(&self.shared.ledger), g))
            }
            Err((e, why)) => {
                ctx.budget_decision = Some("refused");
                match &why {
                    Refusal::RateLimited { user, limit } => {
                        self.shared.calls.rate_limited(Some(user.as_str()), limit)
                    }
                    _ => self.shared.calls.budget_rejected(None, "", why.reason()),
                }
                return Err(self.reject(ctx, e));
            }
        }
        let decision = crate::budget::decide(&*self.shared.ledger, &cfg, ctx.meta.as_ref()).await;
        if matches!(decision, Decision::Refuse(..)) {
            // Refused by its budget: it never went, and counts nothing against its limits.
            if let Some(h) = ctx.limit.take() {
                h.undo();
            }
        }
        match decision {
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
        ctx.times.sent_at = Some(Instant::now());
        let meta = ctx.meta.as_ref();
        ctx.live = Some(
            self.shared
                .calls
                .live
                .open(crate::telemetry::live::LiveCall {
                    request_id: ctx.request_id.clone(),
                    user: meta.and_then(|m| m.user.clone()),
                    model: meta.and_then(|m| m.model.clone()),
                    api: ctx.api.map(crate::meter::Api::as_str),
                    started: ctx.times.start,
                    stream: meta.is_some_and(|m| m.stream),
                    chunks: Default::default(),
                    bytes: Default::default(),
                }),
        );
        Ok(())
    }

    /// The body as it goes; a call refused while preparing it never went, and counts nothing
    /// against its rate limits.
    fn forward_or_undo(&self, ctx: &mut Ctx) -> Result<()> {
        let r = self.prepare_forward(ctx);
        if r.is_err() {
            if let Some(h) = ctx.limit.take() {
                h.undo();
            }
        }
        r
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
            api: ctx.api,
            model,
            prompt_text_bytes: meta.map_or(0, |m| m.prompt_text_bytes),
            started: ctx
                .times
                .started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            completion_bytes: Default::default(),
            web_searches: Default::default(),
            reported: Default::default(),
            opening: Default::default(),
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
            request_id: self.shared.ids.next(),
            api: None,
            meta: None,
            meta_error: None,
            body: Body::default(),
            times: Times::now(),
            upstream: Upstream::default(),
            response: Response::default(),
            rejection: None,
            failure: None,
            _in_flight: InFlight::new(&self.shared.in_flight),
            open: None,
            trace: None,
            budget_decision: None,
            user_stream: None,
            identity: None,
            live: None,
            limit: None,
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
        if matches!(r, Ok(false)) && ctx.api.is_some() {
            if session.is_body_empty() {
                // A chat call without a body: decided here, before anything goes upstream (the
                // body filter, called for its end, then has nothing left to do).
                r = self.on_request_body(&mut None, true, ctx).map(|_| false);
                ctx.body.read_ahead = true;
            } else if read_ahead(session) {
                ctx.body.read_ahead = true;
                let waited;
                (r, waited) = self.read_body(session, ctx).await;
                // Waiting for the client's bytes is not tokentap's time.
                ctx.times.overhead = ctx.times.overhead.saturating_sub(waited);
            }
            if r.is_ok() && std::mem::take(&mut ctx.body.decide) {
                r = match self.decide_call(ctx).await {
                    Ok(()) => self.forward_or_undo(ctx).map(|_| false),
                    Err(e) => Err(e),
                };
            }
        }
        ctx.times.overhead += t.elapsed();
        r
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let t = Instant::now();
        let r = self.upstream_peer_inner(ctx).await;
        ctx.times.overhead += t.elapsed();
        r
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let cfg = Arc::clone(&ctx.cfg);
        let route = ctx.upstream.route.map(|i| &cfg.routes[i]);
        let url = route.map_or(&cfg.upstream.url, |r| &r.url);
        req.insert_header(header::HOST, url.host_header.as_str())?;
        let auth = &cfg.auth;
        // The real key: the route's, or `[auth]`'s for `[upstream]`.
        let (real_key, key_header) = match route {
            Some(r) => (r.key.as_ref(), r.key_header),
            None => (auth.upstream_auth.as_ref(), auth.upstream_key_header),
        };
        if auth.mode == crate::auth::Mode::VirtualKeys {
            // The client's key stays here, whichever header it came in; the upstream gets the
            // real one (if configured) in the header the upstream reads.
            for h in crate::auth::CREDENTIAL_HEADERS {
                req.remove_header(h);
            }
            // The client may not choose which organisation or project the real key bills.
            req.remove_header("openai-organization");
            req.remove_header("openai-project");
            if let Some(s) = real_key {
                // Sensitive: its Debug print (Pingora's debug log) shows no value.
                let mut v = http::HeaderValue::from_str(&s.0)
                    .map_err(|e| Error::because(ErrorType::InternalError, "upstream key", e))?;
                v.set_sensitive(true);
                req.insert_header(key_header.name(), v)?
            }
        }
        if ctx.api.is_some() {
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
        let strip = route
            .filter(|r| r.strip_prefix)
            .map(|r| r.prefix.matches('/').count());
        if !url.base_path.is_empty() || strip.is_some() {
            let pq = req
                .uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_string();
            let pq = match strip {
                Some(n) => strip_segments(&pq, n),
                None => pq,
            };
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
        if ctx.body.read_ahead {
            // The body was read and decided on before the upstream was contacted; Pingora
            // hands over its copy (the replay buffer) once for each attempt: what goes is
            // tokentap's, edits included.
            if end_of_stream || body.is_some() {
                *body = ctx.body.forward.clone().filter(|b| !b.is_empty());
                ctx.body.released = true;
                ctx.times.sent_at = Some(Instant::now());
            }
            return Ok(());
        }
        let t = Instant::now();
        let mut r = self.on_request_body(body, end_of_stream, ctx);
        if r.is_ok() && std::mem::take(&mut ctx.body.decide) {
            r = match self.decide_call(ctx).await {
                Ok(()) => self.forward_or_undo(ctx),
                Err(e) => Err(e),
            };
            if r.is_ok() {
                // (Taken: no attempt sends it again, and a long stream does not keep it.)
                *body = ctx.body.forward.take().filter(|b| !b.is_empty());
                ctx.body.released = true;
                ctx.times.sent_at = Some(Instant::now());
            }
        }
        ctx.times.overhead += t.elapsed();
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
        ctx.times.overhead += t.elapsed();
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
            if ctx.times.first_chunk.is_none() && !b.is_empty() {
                ctx.times.first_chunk = Some(Instant::now());
            }
            ctx.response.bytes += b.len() as u64;
            if let Some(live) = ctx.live.as_ref().filter(|_| !b.is_empty()) {
                live.chunk(b.len());
            }
            if let Some(tap) = ctx.response.tap.as_mut() {
                if tap.feed(b) {
                    let now = Instant::now();
                    ctx.times.first_token = Some(now);
                    ctx.times.ttft = Some(now - ctx.times.sent_at.unwrap_or(ctx.times.start));
                }
                // What the call used so far, should it never get its record (an error answer
                // used nothing, as its record says).
                if let Some(open) = ctx
                    .open
                    .as_ref()
                    .filter(|_| ctx.upstream.status.is_some_and(|s| s < 400))
                {
                    open.call.observe(tap);
                }
            }
            if let Some(strip) = ctx.response.strip.as_mut() {
                *b = Bytes::from(strip.feed(b));
            }
        }
        if let Some(strip) = ctx.response.strip.as_mut().filter(|_| end_of_stream) {
            let rest = strip.finish();
            if !rest.is_empty() {
                let mut all = body.take().map(Vec::from).unwrap_or_default();
                all.extend(rest);
                *body = Some(Bytes::from(all));
            }
            ctx.response.strip = None;
        }
        ctx.times.overhead += t.elapsed();
        // Past the deadline, the stream is cut (after the tap saw this chunk: it may carry
        // the usage).
        if let Some(d) = ctx.cfg.limits.request_deadline {
            if ctx.times.start.elapsed() > d {
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
        if ctx
            .upstream
            .addrs
            .as_ref()
            .is_some_and(|a| ctx.upstream.attempts < a.len())
        {
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
            && ctx.body.bytes == 0
            && !ctx.body.released
            && ctx.upstream.status.is_none()
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
        let deadline =
            ctx.cfg.limits.request_deadline.filter(|d| {
                ctx.times.start.elapsed() >= *d && e.esource() == &ErrorSource::Upstream
            });
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
                match write_error(session, api, ctx.api).await {
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
        ctx.response.stream_active = None;
        let rec = record::build(session, e, ctx);
        if let Some(h) = ctx.limit.take() {
            h.settle(crate::budget::actual(&rec).tokens);
        }
        self.shared.sinks.record(Arc::new(rec));
        ctx.live = None;
        let total = ctx.times.overhead + t.elapsed();
        self.shared.calls.observe_overhead(total.as_secs_f64());
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Self::CTX, e: &Error) -> bool {
        // Refusals and clients hanging up are outcomes, recorded in the access log.
        ctx.rejection.is_some() || *e.esource() == ErrorSource::Downstream
    }
}

/// `path_and_query` without its first `n` path segments (a stripped route prefix), as sent
/// otherwise: `/anthropic/v1/messages?x` less one segment is `/v1/messages?x`.
fn strip_segments(path_and_query: &str, n: usize) -> String {
    let (path, query) = match path_and_query.find('?') {
        Some(i) => path_and_query.split_at(i),
        None => (path_and_query, ""),
    };
    let mut rest = path;
    for _ in 0..n {
        rest = rest.trim_start_matches('/');
        rest = rest.find('/').map_or("", |i| &rest[i..]);
    }
    let rest = if rest.is_empty() { "/" } else { rest };
    format!("{rest}{query}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_stripped_prefix_leaves_the_rest_as_sent() {
        use super::strip_segments as s;
        assert_eq!(
            s("/anthropic/v1/messages?beta=true", 1),
            "/v1/messages?beta=true"
        );
        assert_eq!(s("/a/b/v1/Files/file-AbC", 2), "/v1/Files/file-AbC");
        assert_eq!(s("//anthropic//v1/messages", 1), "//v1/messages");
        assert_eq!(s("/anthropic", 1), "/");
        assert_eq!(s("/anthropic?x=1", 1), "/?x=1");
    }
}
