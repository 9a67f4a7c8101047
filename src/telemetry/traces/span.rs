//! A record as an OTLP span: the GenAI (or HTTP) attributes, status and ids, and captured
//! content made into `gen_ai.*.messages`.

use opentelemetry::trace::TraceState;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{Span, SpanFlags, Status};
use serde::Deserialize;

use super::super::otlp::{Attrs, Batch};
use super::super::semconv as sc;
use crate::meter::{Outcome, UsageRecord, UsageSource};

/// What spans need besides their records: the settings of the running config that say how a
/// record shows (updated on reload).
#[derive(Debug, Clone)]
pub struct SpanSettings {
    /// `user.id` is the user as the metrics' label policy shows it (hashed when it hashes).
    pub metrics: crate::config::MetricsConfig,
    /// Captured content is cut to this many bytes of text.
    pub max_content_bytes: usize,
}

impl SpanSettings {
    pub fn of(cfg: &crate::config::Config) -> Self {
        SpanSettings {
            metrics: cfg.metrics.clone(),
            max_content_bytes: cfg.traces.max_content_bytes,
        }
    }
}

/// The caller's messages as `gen_ai.input.messages` (JSON), text cut to `limit` bytes in all.
pub fn input_messages(body: &[u8], limit: usize) -> Option<String> {
    #[derive(Deserialize)]
    struct Req {
        #[serde(default)]
        messages: Vec<serde_json::Value>,
    }
    // The `messages` array request inspection found, or else the whole body.
    let messages: Vec<serde_json::Value> = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => serde_json::from_slice(body).ok()?,
        _ => serde_json::from_slice::<Req>(body).ok()?.messages,
    };
    let req = Req { messages };
    let mut left = limit;
    let mut out = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        if left == 0 {
            break;
        }
        let role = m.get("role").and_then(|r| r.as_str()).unwrap_or("user");
        let mut parts = Vec::new();
        match m.get("content") {
            Some(serde_json::Value::String(t)) => parts.push(text_part(t, &mut left)),
            Some(serde_json::Value::Array(items)) => {
                for it in items {
                    match it.get("text").and_then(|t| t.as_str()) {
                        Some(t) => parts.push(text_part(t, &mut left)),
                        None => parts.push(serde_json::json!({
                            "type": it.get("type").and_then(|t| t.as_str()).unwrap_or("unknown")
                        })),
                    }
                }
            }
            _ => {}
        }
        out.push(serde_json::json!({ "role": role, "parts": parts }));
    }
    serde_json::to_string(&out).ok()
}

/// The completion as `gen_ai.output.messages` (JSON).
pub fn output_messages(text: &str, finish: Option<&str>) -> String {
    let mut m = serde_json::json!({
        "role": "assistant",
        "parts": [{ "type": "text", "content": text }],
    });
    if let Some(f) = finish {
        m["finish_reason"] = f.into();
    }
    serde_json::Value::Array(vec![m]).to_string()
}

pub(super) fn text_part(t: &str, left: &mut usize) -> serde_json::Value {
    let mut end = (*left).min(t.len());
    while !t.is_char_boundary(end) {
        end -= 1;
    }
    *left -= end;
    serde_json::json!({ "type": "text", "content": &t[..end] })
}

/// The span of a call, as the OTLP message, its attributes written into `a` (cleared first).
pub fn span_of(rec: &UsageRecord, settings: &SpanSettings, a: &mut Attrs) -> Option<Span> {
    let t = rec.trace.as_ref()?;
    a.clear();
    let name = if rec.metered() {
        chat_attrs(rec, settings, a)
    } else {
        http_attrs(rec, a)
    };
    a.str(sc::SERVER_ADDRESS, &rec.upstream_host);
    a.int(sc::SERVER_PORT, i64::from(rec.upstream_port));
    // The CLIENT span is the call to the upstream: its status, when the upstream answered.
    if let Some(st) = rec.upstream_status {
        a.int(sc::HTTP_RESPONSE_STATUS_CODE, i64::from(st));
    }
    a.str(sc::TOKENTAP_OUTCOME, rec.outcome.as_str());
    a.str(sc::TOKENTAP_REQUEST_ID, rec.request_id.as_str());
    let status = match error_type(rec) {
        Some(e) => {
            a.str(sc::ERROR_TYPE, e.as_str());
            Status {
                code: StatusCode::Error as i32,
                message: e,
            }
        }
        None => Status::default(),
    };
    // W3C trace flags (sampled: only sampled calls are traced), and that the parent, if any,
    // came from another process.
    let mut flags = 1 | SpanFlags::ContextHasIsRemoteMask as u32;
    if t.parent.is_some() {
        flags |= SpanFlags::ContextIsRemoteMask as u32;
    }
    Some(Span {
        trace_id: t.trace_id.to_vec(),
        span_id: t.span_id.to_vec(),
        // As received when valid; an invalid list is dropped, not passed on.
        trace_state: t
            .tracestate
            .as_deref()
            .and_then(|s| s.parse::<TraceState>().ok())
            .map(|s| s.header())
            .unwrap_or_default(),
        parent_span_id: t.parent.map(|p| p.to_vec()).unwrap_or_default(),
        flags,
        name,
        kind: SpanKind::Client as i32,
        start_time_unix_nano: unix_nanos(rec.started_at),
        end_time_unix_nano: unix_nanos(rec.started_at + rec.duration),
        status: Some(status),
        ..Span::default()
    })
}

/// The GenAI attributes of a metered call; its span name (`{operation} {model}`).
pub(super) fn chat_attrs(rec: &UsageRecord, settings: &SpanSettings, a: &mut Attrs) -> String {
    let api = rec.api.unwrap_or_default();
    let operation = api.operation();
    a.str(sc::GEN_AI_OPERATION_NAME, operation);
    a.str(sc::TOKENTAP_API, api.as_str());
    if let Some(p) = &rec.provider {
        a.str(sc::GEN_AI_PROVIDER_NAME, p);
    }
    if let Some(m) = &rec.model {
        a.str(sc::GEN_AI_REQUEST_MODEL, m.as_str());
    }
    if let Some(m) = &rec.response_model {
        a.str(sc::GEN_AI_RESPONSE_MODEL, m.as_str());
    }
    if let Some(n) = rec.max_tokens {
        a.int(sc::GEN_AI_REQUEST_MAX_TOKENS, n as i64);
    }
    if let Some(v) = rec.temperature {
        a.f64(sc::GEN_AI_REQUEST_TEMPERATURE, v);
    }
    if let Some(v) = rec.top_p {
        a.f64(sc::GEN_AI_REQUEST_TOP_P, v);
    }
    a.bool(sc::GEN_AI_REQUEST_STREAM, rec.stream);
    if let Some(id) = &rec.response_id {
        a.str(sc::GEN_AI_RESPONSE_ID, id.as_str());
    }
    if !rec.finish_reasons.is_empty() {
        a.strs(sc::GEN_AI_RESPONSE_FINISH_REASONS, &rec.finish_reasons);
    }
    usage_attrs(rec, a);
    if let Some(t) = rec.time_to_first_chunk {
        a.f64(sc::GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, t.as_secs_f64());
    }
    if let Some(c) = rec.cost {
        a.f64(sc::TOKENTAP_COST_USD, c.0 as f64 / 1e12);
    }
    a.bool(
        sc::TOKENTAP_USAGE_ESTIMATED,
        rec.usage_source == UsageSource::Estimated,
    );
    a.int(sc::TOKENTAP_WEB_SEARCHES, rec.usage.web_searches as i64);
    if let Some(s) = rec.web_searches_source {
        a.str(sc::TOKENTAP_WEB_SEARCHES_SOURCE, s.as_str());
    }
    if rec.usage_injected {
        a.bool(sc::TOKENTAP_USAGE_INJECTED, true);
    }
    if let Some(b) = rec.budget_decision {
        a.str(sc::TOKENTAP_BUDGET_DECISION, b);
    }
    if let Some(u) = &rec.user {
        let id = super::super::calls::user_id(&settings.metrics, u);
        a.str(sc::USER_ID, id.as_str());
    }
    if let Some(m) = rec
        .captured_input
        .as_ref()
        .and_then(|b| input_messages(b, settings.max_content_bytes))
    {
        a.str(sc::GEN_AI_INPUT_MESSAGES, &m);
    }
    if let Some(text) = &rec.captured_output {
        let m = output_messages(text, rec.finish_reasons.first().map(String::as_str));
        a.str(sc::GEN_AI_OUTPUT_MESSAGES, m.as_str());
    }
    // `chat {model}`, put together by hand: `format!` costs several times as much, per span.
    let mut name =
        String::with_capacity(operation.len() + 1 + rec.model.as_ref().map_or(0, String::len));
    name.push_str(operation);
    if let Some(m) = &rec.model {
        name.push(' ');
        name.push_str(m);
    }
    name
}

/// Token counts, when there are any.
pub(super) fn usage_attrs(rec: &UsageRecord, a: &mut Attrs) {
    if rec.usage_source == UsageSource::None {
        return;
    }
    let u = &rec.usage;
    a.int(sc::GEN_AI_USAGE_INPUT_TOKENS, u.prompt as i64);
    a.int(sc::GEN_AI_USAGE_OUTPUT_TOKENS, u.completion as i64);
    // An estimate knows nothing of cached or reasoning tokens: no false zeros.
    if rec.usage_source == UsageSource::Reported {
        a.int(sc::GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, u.cached as i64);
        if u.cache_write > 0 {
            a.int(
                sc::GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
                u.cache_write as i64,
            );
        }
        a.int(sc::GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, u.reasoning as i64);
    }
}

/// The HTTP attributes of any other call; its span name.
pub(super) fn http_attrs(rec: &UsageRecord, a: &mut Attrs) -> String {
    // HTTP semantic conventions: known methods by name, the rest as _OTHER.
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    let method = if KNOWN.contains(&rec.method.as_str()) {
        rec.method.as_str()
    } else {
        "_OTHER"
    };
    a.str(sc::HTTP_REQUEST_METHOD, method);
    a.str(sc::URL_PATH, rec.path.as_str());
    // The upstream URL without its query (which may hold secrets).
    a.str(sc::URL_FULL, &format!("{}{}", rec.url_base, rec.path));
    if method == "_OTHER" {
        "HTTP".to_string()
    } else {
        method.to_string()
    }
}

/// A record's span, into the batch.
pub(super) fn add(
    batch: &mut Batch,
    attrs: &mut Attrs,
    rec: &UsageRecord,
    settings: &SpanSettings,
) {
    if let Some(s) = span_of(rec, settings, attrs) {
        batch.push(s, attrs);
    }
}

/// Nanoseconds since the Unix epoch (0 before it).
pub(super) fn unix_nanos(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `error.type` of a call that did not complete: the upstream's error type (or code), else
/// its HTTP status, else how the call ended (tokentap refused it, the upstream could not be
/// reached or timed out, a side hung up).
pub(super) fn error_type(rec: &UsageRecord) -> Option<String> {
    let upstream_failed = rec.upstream_status.is_some_and(|s| s >= 400);
    if rec.outcome == Outcome::Complete && !upstream_failed {
        return None;
    }
    if let Some(t) = &rec.upstream_error_type {
        return Some(t.clone());
    }
    if let Some(s) = rec.upstream_status.filter(|s| *s >= 400) {
        return Some(s.to_string());
    }
    if rec.outcome == Outcome::Rejected && rec.status == 429 && rec.metered() {
        return Some("budget_exceeded".into());
    }
    Some(rec.outcome.as_str().to_string())
}
