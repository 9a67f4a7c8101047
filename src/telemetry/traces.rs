//! Traces: one OTLP span per call, built from its [`UsageRecord`] after the call ended.
//!
//! The proxy decides at the request head whether a call is traced (continuing an incoming W3C
//! `traceparent`, otherwise sampling by trace-id ratio) and gives it its span id, so that the
//! upstream request can carry the span as parent when the operator asks for it. The record
//! goes to a bounded queue (a full queue drops it and counts the drop); tokentap's own
//! exporter thread, with its own Tokio runtime, builds the spans and exports them in batches
//! over OTLP gRPC or HTTP/protobuf. A collector that is down or slow never slows a call: its
//! batches fail after the export timeout, and their spans are counted as dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SpanData, SpanExporter};
use serde::Deserialize;

use super::semconv as sc;
use super::wake::LazyWake;
use crate::meter::{Outcome, UsageRecord, UsageSource};

/// `[traces]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTraces {
    /// The collector: `http://host:4317` (gRPC) or `http://host:4318` (HTTP; `/v1/traces` is
    /// added). Unset: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`;
    /// none of them: traces are off.
    pub endpoint: Option<String>,
    /// "grpc" or "http/protobuf" (else `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`, "grpc").
    pub protocol: Option<String>,
    /// Sent with every export (added to `OTEL_EXPORTER_OTLP_HEADERS`).
    pub headers: BTreeMap<String, String>,
    /// Else `OTEL_SERVICE_NAME`, else "tokentap".
    pub service_name: Option<String>,
    /// Share of new traces recorded, 0 to 1 (else `OTEL_TRACES_SAMPLER_ARG`, else 1). A call
    /// that arrives with a `traceparent` follows its sampled flag.
    pub sampling_ratio: Option<f64>,
    /// Send `traceparent` (tokentap's span as parent) to the upstream. Off: the request goes
    /// as the client sent it.
    pub inject_traceparent: bool,
    /// Record prompt and completion text (`gen_ai.input.messages`, `gen_ai.output.messages`).
    pub capture_content: bool,
    /// At most this many bytes of text per message list.
    pub max_content_bytes: usize,
    /// Calls waiting for export at most; beyond, spans are dropped (and counted).
    pub queue_size: usize,
    pub batch_size: usize,
    pub batch_delay_ms: u64,
    pub export_timeout_ms: u64,
    /// `gen_ai.provider.name` per model prefix (the part before `/`), over the built-in map.
    pub providers: BTreeMap<String, String>,
    /// For models without a prefix.
    pub default_provider: String,
}

impl Default for RawTraces {
    fn default() -> Self {
        RawTraces {
            endpoint: None,
            protocol: None,
            headers: BTreeMap::new(),
            service_name: None,
            sampling_ratio: None,
            inject_traceparent: false,
            capture_content: false,
            max_content_bytes: 4096,
            queue_size: 4096,
            batch_size: 512,
            batch_delay_ms: 1000,
            export_timeout_ms: 5000,
            providers: BTreeMap::new(),
            default_provider: "openai".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// Where and how spans go: fixed for the life of the process (a change needs a restart).
#[derive(Debug, Clone, PartialEq)]
pub struct ExportConfig {
    pub endpoint: String,
    pub protocol: Protocol,
    pub headers: BTreeMap<String, String>,
    pub service_name: String,
    pub queue_size: usize,
    pub batch_size: usize,
    pub batch_delay: Duration,
    pub timeout: Duration,
}

/// `[traces]`, checked. Everything but `export` applies on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct TracesConfig {
    /// `None`: traces are off.
    pub export: Option<ExportConfig>,
    pub sampling_ratio: f64,
    pub inject_traceparent: bool,
    pub capture_content: bool,
    pub max_content_bytes: usize,
    pub providers: BTreeMap<String, String>,
    pub default_provider: String,
}

impl Default for TracesConfig {
    fn default() -> Self {
        TracesConfig {
            export: None,
            sampling_ratio: 1.0,
            inject_traceparent: false,
            capture_content: false,
            max_content_bytes: 4096,
            providers: builtin_providers(),
            default_provider: "openai".into(),
        }
    }
}

/// Model prefixes of OpenAI-compatible routers, as `gen_ai.provider.name` well-known values.
fn builtin_providers() -> BTreeMap<String, String> {
    [
        ("openai", "openai"),
        ("anthropic", "anthropic"),
        ("google", "gcp.gemini"),
        ("x-ai", "x_ai"),
        ("xai", "x_ai"),
        ("deepseek", "deepseek"),
        ("mistralai", "mistral_ai"),
        ("mistral", "mistral_ai"),
        ("cohere", "cohere"),
        ("perplexity", "perplexity"),
        ("groq", "groq"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect()
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Checks `[traces]`, filling what is unset from the standard `OTEL_*` variables. Traces are
/// off without an endpoint, with `endpoint = ""`, or with `OTEL_SDK_DISABLED=true` or
/// `OTEL_TRACES_EXPORTER=none`. An endpoint from the environment that cannot be used turns
/// traces off with a warning (the environment is not the operator's config); one in the
/// config file is an error.
pub fn compile(raw: &RawTraces) -> Result<TracesConfig, String> {
    let mut providers = builtin_providers();
    providers.extend(raw.providers.clone());
    let mut cfg = TracesConfig {
        export: None,
        sampling_ratio: 1.0,
        inject_traceparent: raw.inject_traceparent,
        capture_content: raw.capture_content,
        max_content_bytes: raw.max_content_bytes,
        providers,
        default_provider: raw.default_provider.clone(),
    };
    if let Some(r) = raw.sampling_ratio {
        if !(0.0..=1.0).contains(&r) {
            return Err(format!(
                "traces.sampling_ratio: {r} is out of range: use 0 to 1"
            ));
        }
        cfg.sampling_ratio = r;
    }
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    // (value, from the config file, a base URL that gets the signal's path)
    let endpoint = match (&raw.endpoint, env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) {
        (Some(e), _) if e.is_empty() => return Ok(cfg),
        (Some(e), _) => (e.clone(), true, true),
        (None, _) if disabled => return Ok(cfg),
        (None, Some(e)) => (e, false, false),
        (None, None) => match env("OTEL_EXPORTER_OTLP_ENDPOINT") {
            Some(e) => (e, false, true),
            None => return Ok(cfg),
        },
    };
    match export_config(raw, endpoint) {
        Ok(export) => cfg.export = Some(export),
        Err((true, e)) => return Err(e),
        Err((false, e)) => {
            log::warn!("traces are off: {e}");
            return Ok(cfg);
        }
    }
    if raw.sampling_ratio.is_none() {
        // OTEL_TRACES_SAMPLER: the ratio samplers take OTEL_TRACES_SAMPLER_ARG; always_off
        // records nothing new (a sampled caller's trace is still followed).
        match env("OTEL_TRACES_SAMPLER").as_deref() {
            Some("always_off" | "parentbased_always_off") => cfg.sampling_ratio = 0.0,
            Some("traceidratio" | "parentbased_traceidratio") => {
                if let Some(a) = env("OTEL_TRACES_SAMPLER_ARG") {
                    match a.trim().parse::<f64>() {
                        Ok(r) if (0.0..=1.0).contains(&r) => cfg.sampling_ratio = r,
                        _ => log::warn!(
                            "OTEL_TRACES_SAMPLER_ARG: {a:?} is not a number from 0 to 1; \
                             sampling every trace"
                        ),
                    }
                }
            }
            _ => {}
        }
    }
    Ok(cfg)
}

/// Where spans go. Errors say whether the endpoint came from the config file.
fn export_config(
    raw: &RawTraces,
    (e, from_file, base): (String, bool, bool),
) -> Result<ExportConfig, (bool, String)> {
    let err = |m: String| (from_file, m);
    let what = if from_file {
        "traces.endpoint"
    } else {
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    };
    let protocol = match raw.protocol.clone().or_else(|| {
        env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
    }) {
        None => Protocol::Grpc,
        Some(p) if p == "grpc" => Protocol::Grpc,
        Some(p) if p == "http/protobuf" => Protocol::HttpProtobuf,
        Some(other) => {
            let key = if raw.protocol.is_some() {
                "traces.protocol"
            } else {
                "OTEL_EXPORTER_OTLP_PROTOCOL"
            };
            return Err((
                raw.protocol.is_some(),
                format!("{key}: {other:?}: use \"grpc\" or \"http/protobuf\""),
            ));
        }
    };
    if !(e.starts_with("http://") || e.starts_with("https://")) {
        return Err(err(format!(
            "{what}: {e:?} is not an http:// or https:// URL"
        )));
    }
    if e.starts_with("https://") && protocol == Protocol::HttpProtobuf {
        return Err(err(format!(
            "{what}: {e:?}: TLS is supported over gRPC (protocol = \"grpc\"), not \
             http/protobuf; or send to a collector reachable over plain http://"
        )));
    }
    let endpoint = if protocol == Protocol::HttpProtobuf && base && !e.ends_with("/v1/traces") {
        format!("{}/v1/traces", e.trim_end_matches('/'))
    } else {
        e
    };
    if raw.queue_size == 0 || raw.batch_size == 0 {
        return Err((
            true,
            "traces.queue_size and traces.batch_size: must be at least 1".into(),
        ));
    }
    // Headers: [traces].headers. The exporter itself adds OTEL_EXPORTER_OTLP_(TRACES_)HEADERS,
    // which win over the file's for the same name.
    let mut headers = BTreeMap::new();
    for (k, v) in &raw.headers {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err()
            || http::HeaderValue::from_str(v).is_err()
        {
            return Err((true, format!("traces.headers: {k:?} is not a valid header")));
        }
        headers.insert(k.clone(), v.clone());
    }
    // Hours at most: an absurd value would only overflow timers.
    const MAX_MS: u64 = 3_600_000;
    Ok(ExportConfig {
        endpoint,
        protocol,
        headers,
        service_name: raw
            .service_name
            .clone()
            .or_else(|| env("OTEL_SERVICE_NAME"))
            .unwrap_or_else(|| "tokentap".into()),
        queue_size: raw.queue_size,
        batch_size: raw.batch_size.min(raw.queue_size),
        batch_delay: Duration::from_millis(raw.batch_delay_ms.clamp(1, MAX_MS)),
        timeout: Duration::from_millis(raw.export_timeout_ms.clamp(1, MAX_MS)),
    })
}

impl TracesConfig {
    pub fn enabled(&self) -> bool {
        self.export.is_some()
    }

    /// `gen_ai.provider.name` of a model: from its prefix (`anthropic/claude-…`), else the
    /// default.
    pub fn provider(&self, model: Option<&str>) -> String {
        match model.and_then(|m| m.split_once('/')) {
            Some((prefix, _)) => self
                .providers
                .get(prefix)
                .cloned()
                .unwrap_or_else(|| prefix.to_string()),
            None => self.default_provider.clone(),
        }
    }
}

/// A call's place in a trace, decided at its request head.
#[derive(Debug, Clone)]
pub struct CallTrace {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The caller's span, from its `traceparent`.
    pub parent: Option<SpanId>,
    pub sampled: bool,
    pub tracestate: Option<String>,
    /// Filled when the record is built.
    pub detail: CallDetail,
}

/// What a span needs beyond the record.
#[derive(Debug, Clone, Default)]
pub struct CallDetail {
    pub provider: String,
    pub server_address: String,
    pub server_port: u16,
    /// `scheme://host[:port][/base]` of the upstream.
    pub url_base: String,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// "allowed", "refused", "fail_open" or "not_capped"; `None` when no decision ran.
    pub budget: Option<&'static str>,
    /// As the metrics' label policy shows it (hashed when it hashes users).
    pub user_id: Option<String>,
    /// The request body, kept (a refcounted handle) only when content is captured: the
    /// input messages are made from it on the exporter thread.
    pub input_body: Option<bytes::Bytes>,
    pub max_content_bytes: usize,
    pub output_messages: Option<String>,
    /// The upstream error's type or code, if it sent one.
    pub upstream_error_type: Option<String>,
    /// From sending the request to the first chunk of a streamed response.
    pub time_to_first_chunk: Option<std::time::Duration>,
}

impl CallTrace {
    /// The trace of a call whose head carried `traceparent` (and `tracestate`), or a new one.
    pub fn start(traceparent: Option<&str>, tracestate: Option<&str>, ratio: f64) -> CallTrace {
        let ids = RandomIdGenerator::default();
        let span_id = ids.new_span_id();
        if let Some((trace_id, parent, sampled)) = traceparent.and_then(parse_traceparent) {
            return CallTrace {
                trace_id,
                span_id,
                parent: Some(parent),
                sampled,
                tracestate: tracestate.map(str::to_string),
                detail: CallDetail::default(),
            };
        }
        let trace_id = ids.new_trace_id();
        CallTrace {
            trace_id,
            span_id,
            parent: None,
            sampled: ratio_samples(trace_id, ratio),
            tracestate: None,
            detail: CallDetail::default(),
        }
    }

    /// This call's span as a `traceparent` (for the upstream, when injecting).
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

/// The trace-id ratio rule of the OpenTelemetry spec: the low 63 bits of the trace id
/// against the ratio, so every tokentap replica decides a trace the same way.
fn ratio_samples(id: TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    let bytes = id.to_bytes();
    let low = u64::from_be_bytes(bytes[8..16].try_into().unwrap_or_default()) >> 1;
    (low as f64) < ratio * (1u64 << 63) as f64
}

/// `version-traceid-spanid-flags` (W3C Trace Context); `None` for anything malformed.
pub fn parse_traceparent(s: &str) -> Option<(TraceId, SpanId, bool)> {
    let s = s.trim();
    let mut parts = s.split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    // Version 00 has exactly four fields; later versions may add more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace_id, span_id, flags & 1 == 1))
}

/// The caller's messages as `gen_ai.input.messages` (JSON), text cut to `limit` bytes in all.
pub fn input_messages(body: &[u8], limit: usize) -> Option<String> {
    #[derive(Deserialize)]
    struct Req {
        #[serde(default)]
        messages: Vec<serde_json::Value>,
    }
    let req: Req = serde_json::from_slice(body).ok()?;
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

fn text_part(t: &str, left: &mut usize) -> serde_json::Value {
    let mut end = (*left).min(t.len());
    while !t.is_char_boundary(end) {
        end -= 1;
    }
    *left -= end;
    serde_json::json!({ "type": "text", "content": &t[..end] })
}

/// The span of a call.
pub fn span_of(rec: &UsageRecord, scope: &InstrumentationScope) -> Option<SpanData> {
    let t = rec.trace.as_ref()?;
    let d = &t.detail;
    let mut a: Vec<KeyValue> = Vec::with_capacity(32);
    let error_type = error_type(rec);
    let name = if rec.chat {
        a.push(KeyValue::new(sc::GEN_AI_OPERATION_NAME, sc::OPERATION_CHAT));
        a.push(KeyValue::new(sc::GEN_AI_PROVIDER_NAME, d.provider.clone()));
        if let Some(m) = &rec.model {
            a.push(KeyValue::new(sc::GEN_AI_REQUEST_MODEL, m.clone()));
        }
        if let Some(m) = &rec.response_model {
            a.push(KeyValue::new(sc::GEN_AI_RESPONSE_MODEL, m.clone()));
        }
        if let Some(n) = rec.max_tokens {
            a.push(KeyValue::new(sc::GEN_AI_REQUEST_MAX_TOKENS, n as i64));
        }
        if let Some(v) = d.temperature {
            a.push(KeyValue::new(sc::GEN_AI_REQUEST_TEMPERATURE, v));
        }
        if let Some(v) = d.top_p {
            a.push(KeyValue::new(sc::GEN_AI_REQUEST_TOP_P, v));
        }
        a.push(KeyValue::new(sc::GEN_AI_REQUEST_STREAM, rec.stream));
        if let Some(id) = &rec.response_id {
            a.push(KeyValue::new(sc::GEN_AI_RESPONSE_ID, id.clone()));
        }
        if !rec.finish_reasons.is_empty() {
            let v: Vec<opentelemetry::StringValue> = rec
                .finish_reasons
                .iter()
                .map(|r| r.clone().into())
                .collect();
            a.push(KeyValue::new(
                sc::GEN_AI_RESPONSE_FINISH_REASONS,
                Value::Array(v.into()),
            ));
        }
        if rec.usage_source != UsageSource::None {
            let u = &rec.usage;
            a.push(KeyValue::new(
                sc::GEN_AI_USAGE_INPUT_TOKENS,
                u.prompt as i64,
            ));
            a.push(KeyValue::new(
                sc::GEN_AI_USAGE_OUTPUT_TOKENS,
                u.completion as i64,
            ));
            // An estimate knows nothing of cached or reasoning tokens: no false zeros.
            if rec.usage_source == UsageSource::Reported {
                a.push(KeyValue::new(
                    sc::GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
                    u.cached as i64,
                ));
                a.push(KeyValue::new(
                    sc::GEN_AI_USAGE_REASONING_OUTPUT_TOKENS,
                    u.reasoning as i64,
                ));
            }
        }
        if let Some(t) = d.time_to_first_chunk {
            a.push(KeyValue::new(
                sc::GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK,
                t.as_secs_f64(),
            ));
        }
        if let Some(c) = rec.cost {
            a.push(KeyValue::new(sc::TOKENTAP_COST_USD, c.0 as f64 / 1e12));
        }
        a.push(KeyValue::new(
            sc::TOKENTAP_USAGE_ESTIMATED,
            rec.usage_source == UsageSource::Estimated,
        ));
        a.push(KeyValue::new(
            sc::TOKENTAP_WEB_SEARCHES,
            rec.usage.web_searches as i64,
        ));
        if let Some(b) = d.budget {
            a.push(KeyValue::new(sc::TOKENTAP_BUDGET_DECISION, b));
        }
        if let Some(u) = &d.user_id {
            a.push(KeyValue::new(sc::USER_ID, u.clone()));
        }
        if let Some(m) = d
            .input_body
            .as_ref()
            .and_then(|b| input_messages(b, d.max_content_bytes))
        {
            a.push(KeyValue::new(sc::GEN_AI_INPUT_MESSAGES, m));
        }
        if let Some(m) = &d.output_messages {
            a.push(KeyValue::new(sc::GEN_AI_OUTPUT_MESSAGES, m.clone()));
        }
        match &rec.model {
            Some(m) => format!("{} {m}", sc::OPERATION_CHAT),
            None => sc::OPERATION_CHAT.to_string(),
        }
    } else {
        // HTTP semantic conventions: known methods by name, the rest as _OTHER.
        const KNOWN: [&str; 9] = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ];
        let method = if KNOWN.contains(&rec.method.as_str()) {
            rec.method.clone()
        } else {
            "_OTHER".to_string()
        };
        a.push(KeyValue::new(sc::HTTP_REQUEST_METHOD, method.clone()));
        a.push(KeyValue::new(sc::URL_PATH, rec.path.clone()));
        // The upstream URL without its query (which may hold secrets).
        a.push(KeyValue::new(
            sc::URL_FULL,
            format!("{}{}", d.url_base, rec.path),
        ));
        if method == "_OTHER" {
            "HTTP".to_string()
        } else {
            method
        }
    };
    a.push(KeyValue::new(sc::SERVER_ADDRESS, d.server_address.clone()));
    a.push(KeyValue::new(sc::SERVER_PORT, i64::from(d.server_port)));
    // The CLIENT span is the call to the upstream: its status, when the upstream answered.
    if let Some(st) = rec.upstream_status {
        a.push(KeyValue::new(sc::HTTP_RESPONSE_STATUS_CODE, i64::from(st)));
    }
    a.push(KeyValue::new(sc::TOKENTAP_OUTCOME, rec.outcome.as_str()));
    a.push(KeyValue::new(
        sc::TOKENTAP_REQUEST_ID,
        rec.request_id.clone(),
    ));
    let status = match &error_type {
        Some(e) => {
            a.push(KeyValue::new(sc::ERROR_TYPE, e.clone()));
            Status::error(e.clone())
        }
        None => Status::Unset,
    };
    let flags = if t.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let state = t
        .tracestate
        .as_deref()
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(SpanData {
        span_context: SpanContext::new(t.trace_id, t.span_id, flags, false, state),
        parent_span_id: t.parent.unwrap_or(SpanId::INVALID),
        parent_span_is_remote: t.parent.is_some(),
        span_kind: SpanKind::Client,
        name: name.into(),
        start_time: rec.started_at,
        end_time: rec.started_at + rec.duration,
        attributes: a,
        dropped_attributes_count: 0,
        events: Default::default(),
        links: Default::default(),
        status,
        instrumentation_scope: scope.clone(),
    })
}

/// `error.type` of a call that did not complete: the upstream's error type (or code), else
/// its HTTP status, else how the call ended (tokentap refused it, the upstream could not be
/// reached or timed out, a side hung up).
fn error_type(rec: &UsageRecord) -> Option<String> {
    let upstream_failed = rec.upstream_status.is_some_and(|s| s >= 400);
    if rec.outcome == Outcome::Complete && !upstream_failed {
        return None;
    }
    if let Some(t) = rec
        .trace
        .as_ref()
        .and_then(|t| t.detail.upstream_error_type.clone())
    {
        return Some(t);
    }
    if let Some(s) = rec.upstream_status.filter(|s| *s >= 400) {
        return Some(s.to_string());
    }
    if rec.outcome == Outcome::Rejected && rec.status == 429 && rec.chat {
        return Some("budget_exceeded".into());
    }
    Some(rec.outcome.as_str().to_string())
}

enum Msg {
    Record(Arc<UsageRecord>),
    /// Export what is queued, then answer.
    Flush(mpsc::Sender<()>),
}

/// The trace sink: queues sampled records for the exporter thread.
pub struct TraceSink {
    tx: Option<SyncSender<Msg>>,
    /// Wakes the exporter thread when a batch waits (else it sleeps until the batch is due).
    wake: Arc<LazyWake>,
    pub counters: TraceCounters,
    stopped: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// `tokentap_spans_dropped_total{reason}` and `tokentap_spans_exported_total`.
#[derive(Clone)]
pub struct TraceCounters {
    pub dropped: prometheus::IntCounterVec,
    pub exported: prometheus::IntCounter,
}

impl TraceCounters {
    fn new() -> Self {
        TraceCounters {
            dropped: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "tokentap_spans_dropped_total",
                    "Spans not exported: the queue was full, or the collector failed or timed out.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            exported: prometheus::IntCounter::new(
                "tokentap_spans_exported_total",
                "Spans the collector accepted.",
            )
            .expect("valid metric"),
        }
    }

    pub fn register(&self, r: &prometheus::Registry) -> prometheus::Result<()> {
        r.register(Box::new(self.dropped.clone()))?;
        r.register(Box::new(self.exported.clone()))
    }
}

impl TraceSink {
    /// Starts the exporter thread when `cfg` has an endpoint; otherwise a sink that does
    /// nothing.
    pub fn new(cfg: &TracesConfig) -> Result<TraceSink, String> {
        let counters = TraceCounters::new();
        for r in ["queue_full", "export_failed", "stopped"] {
            counters.dropped.with_label_values(&[r]);
        }
        let Some(export) = cfg.export.clone() else {
            return Ok(TraceSink {
                tx: None,
                wake: Arc::new(LazyWake::new(1)),
                counters,
                stopped: AtomicBool::new(false),
                thread: Mutex::new(None),
            });
        };
        let (tx, rx) = mpsc::sync_channel(export.queue_size);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let exporter = rt.block_on(async { build_exporter(&export) })?;
        let c = counters.clone();
        let wake = Arc::new(LazyWake::new(export.batch_size.min(export.queue_size / 2)));
        let w = Arc::clone(&wake);
        let thread = std::thread::Builder::new()
            .name("tokentap-traces".into())
            .spawn(move || {
                super::wake::lower_priority();
                export_loop(rt, exporter, rx, &w, export, c)
            })
            .map_err(|e| e.to_string())?;
        wake.set_worker(thread.thread().clone());
        Ok(TraceSink {
            tx: Some(tx),
            wake,
            counters,
            stopped: AtomicBool::new(false),
            thread: Mutex::new(Some(thread)),
        })
    }
}

fn build_exporter(cfg: &ExportConfig) -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
    let built = match cfg.protocol {
        Protocol::Grpc => {
            let mut md = tonic::metadata::MetadataMap::new();
            for (k, v) in &cfg.headers {
                let key =
                    tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                        .map_err(|_| format!("traces.headers: {k:?} is not a valid header name"))?;
                let val = v
                    .parse()
                    .map_err(|_| format!("traces.headers: the value of {k:?} is not valid"))?;
                md.insert(key, val);
            }
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(cfg.endpoint.clone())
                .with_timeout(cfg.timeout)
                .with_metadata(md);
            if cfg.endpoint.starts_with("https://") {
                b = b
                    .with_tls_config(tonic::transport::ClientTlsConfig::new().with_enabled_roots());
            }
            b.build()
        }
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(cfg.endpoint.clone())
            .with_timeout(cfg.timeout)
            .with_headers(cfg.headers.clone().into_iter().collect())
            .build(),
    };
    let mut exporter = built.map_err(|e| format!("traces: cannot build the OTLP exporter: {e}"))?;
    exporter.set_resource(
        &opentelemetry_sdk::Resource::builder_empty()
            .with_attribute(KeyValue::new(sc::SERVICE_NAME, cfg.service_name.clone()))
            .build(),
    );
    Ok(exporter)
}

fn export_loop(
    rt: tokio::runtime::Runtime,
    exporter: opentelemetry_otlp::SpanExporter,
    rx: Receiver<Msg>,
    wake: &LazyWake,
    cfg: ExportConfig,
    counters: TraceCounters,
) {
    let scope = InstrumentationScope::builder("tokentap")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let mut batch: Vec<SpanData> = Vec::with_capacity(cfg.batch_size);
    let mut due = Instant::now() + cfg.batch_delay;
    // One warning per run of failures (a dead collector would otherwise fill the log).
    let failing = std::cell::Cell::new(false);
    let export = |batch: &mut Vec<SpanData>| {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let spans = std::mem::take(batch);
        let r =
            rt.block_on(async { tokio::time::timeout(cfg.timeout, exporter.export(spans)).await });
        match r {
            Ok(Ok(())) => {
                counters.exported.inc_by(n);
                if failing.replace(false) {
                    log::info!("traces: the collector takes spans again");
                }
            }
            Ok(Err(e)) => {
                counters
                    .dropped
                    .with_label_values(&["export_failed"])
                    .inc_by(n);
                if !failing.replace(true) {
                    log::warn!(
                        "traces: spans not exported (counted in \
                         tokentap_spans_dropped_total): {e}"
                    );
                }
            }
            Err(_) => {
                counters
                    .dropped
                    .with_label_values(&["export_failed"])
                    .inc_by(n);
                if !failing.replace(true) {
                    log::warn!(
                        "traces: spans not exported (counted in \
                         tokentap_spans_dropped_total): the collector timed out"
                    );
                }
            }
        }
    };
    loop {
        // Asleep until the batch is due, or a full batch or a flush wakes it.
        wake.wait(due.saturating_duration_since(Instant::now()));
        loop {
            match rx.try_recv() {
                Ok(Msg::Record(rec)) => {
                    if let Some(s) = span_of(&rec, &scope) {
                        batch.push(s);
                    }
                    if batch.len() >= cfg.batch_size {
                        export(&mut batch);
                        due = Instant::now() + cfg.batch_delay;
                    }
                }
                Ok(Msg::Flush(done)) => {
                    // Everything queued before the flush, then answer.
                    while let Ok(m) = rx.try_recv() {
                        if let Msg::Record(rec) = m {
                            if let Some(s) = span_of(&rec, &scope) {
                                batch.push(s);
                            }
                            if batch.len() >= cfg.batch_size {
                                export(&mut batch);
                            }
                        }
                    }
                    export(&mut batch);
                    // The flush is the shutdown's: the exporter is done.
                    let _ = rt.block_on(async { exporter.shutdown() });
                    let _ = done.send(());
                    return;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    export(&mut batch);
                    let _ = rt.block_on(async { exporter.shutdown() });
                    return;
                }
            }
        }
        if Instant::now() >= due {
            export(&mut batch);
            due = Instant::now() + cfg.batch_delay;
        }
    }
}

impl super::Sink for TraceSink {
    fn record(&self, rec: &Arc<UsageRecord>) {
        let Some(tx) = &self.tx else { return };
        if !rec.trace.as_ref().is_some_and(|t| t.sampled) {
            return;
        }
        match tx.try_send(Msg::Record(Arc::clone(rec))) {
            Ok(()) => self.wake.queued(),
            Err(TrySendError::Full(_)) => self
                .counters
                .dropped
                .with_label_values(&["queue_full"])
                .inc(),
            // After the shutdown's flush (or if the exporter thread died).
            Err(TrySendError::Disconnected(_)) => {
                self.counters.dropped.with_label_values(&["stopped"]).inc()
            }
        }
    }

    fn shutdown(&self) {
        let Some(tx) = &self.tx else { return };
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        // Export what is queued, waiting a bounded time (a dead collector must not hold up
        // the exit for long).
        let (done_tx, done_rx) = mpsc::channel();
        let sent = std::time::Instant::now();
        let mut msg = Msg::Flush(done_tx);
        loop {
            self.wake.now();
            match tx.try_send(msg) {
                Ok(()) => {
                    self.wake.now();
                    break;
                }
                Err(TrySendError::Full(m)) if sent.elapsed() < Duration::from_secs(5) => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
        // Long enough for the queue's batches to be tried once each, bounded.
        if done_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            log::warn!("traces: the collector did not take the last spans in time; they are lost");
            return;
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_strictly() {
        let ok = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let (t, s, sampled) = parse_traceparent(ok).unwrap();
        assert_eq!(t.to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(s.to_string(), "b7ad6b7169203331");
        assert!(sampled);
        assert!(!parse_traceparent(&ok.replace("-01", "-00")).unwrap().2);
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
        // A later version may carry more fields.
        assert!(parse_traceparent(&format!("01{}-more", &ok[2..])).is_some());
    }

    #[test]
    fn a_continued_trace_keeps_the_callers_trace_and_sampling() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let t = CallTrace::start(Some(tp), Some("vendor=x"), 0.0);
        assert_eq!(t.trace_id.to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(t.parent.unwrap().to_string(), "b7ad6b7169203331");
        assert!(t.sampled, "the parent's decision wins over the ratio");
        assert_ne!(t.span_id.to_string(), "b7ad6b7169203331");
        assert!(t
            .traceparent()
            .starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
        assert!(t.traceparent().ends_with("-01"));
        // New traces follow the ratio.
        assert!(CallTrace::start(None, None, 1.0).sampled);
        assert!(!CallTrace::start(None, None, 0.0).sampled);
        let half = (0..2000)
            .filter(|_| CallTrace::start(None, None, 0.5).sampled)
            .count();
        assert!((800..1200).contains(&half), "{half}");
    }

    #[test]
    fn input_messages_are_cut_to_the_limit_and_stay_json() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"h\u00e9llo world"},
            {"type":"image_url","image_url":{"url":"data:..."}}]}]}"#;
        let all: serde_json::Value =
            serde_json::from_str(&input_messages(body, 1000).unwrap()).unwrap();
        assert_eq!(all[0]["role"], "system");
        assert_eq!(all[0]["parts"][0]["content"], "Be brief.");
        assert_eq!(all[1]["parts"][0]["content"], "héllo world");
        assert_eq!(all[1]["parts"][1]["type"], "image_url");
        let cut: serde_json::Value =
            serde_json::from_str(&input_messages(body, 11).unwrap()).unwrap();
        assert_eq!(cut[0]["parts"][0]["content"], "Be brief.");
        // 2 bytes left: "h" and not half of "é".
        assert_eq!(cut[1]["parts"][0]["content"], "h");
    }

    #[test]
    fn endpoints_are_checked_and_http_gets_the_signal_path() {
        let raw = |e: &str, p: &str| RawTraces {
            endpoint: Some(e.into()),
            protocol: Some(p.into()),
            ..RawTraces::default()
        };
        let c = compile(&raw("http://c:4318/", "http/protobuf")).unwrap();
        assert_eq!(c.export.unwrap().endpoint, "http://c:4318/v1/traces");
        let c = compile(&raw("http://c:4317", "grpc")).unwrap();
        assert_eq!(c.export.unwrap().endpoint, "http://c:4317");
        assert!(compile(&raw("https://c:4317", "grpc")).is_ok());
        assert!(compile(&raw("https://c:4318", "http/protobuf"))
            .unwrap_err()
            .contains("TLS"));
        let c = compile(&raw("http://c:4318/v1/traces", "http/protobuf")).unwrap();
        assert_eq!(c.export.unwrap().endpoint, "http://c:4318/v1/traces");
        let off = RawTraces {
            endpoint: Some(String::new()),
            ..RawTraces::default()
        };
        assert!(compile(&off).unwrap().export.is_none());
        assert!(compile(&raw("c:4317", "grpc")).is_err());
        assert!(compile(&raw("http://c:4317", "thrift"))
            .unwrap_err()
            .contains("traces.protocol"));
        let bad = RawTraces {
            sampling_ratio: Some(1.5),
            ..RawTraces::default()
        };
        assert!(compile(&bad).unwrap_err().contains("sampling_ratio"));
    }

    #[test]
    fn providers_come_from_the_model_prefix() {
        let c = TracesConfig::default();
        assert_eq!(c.provider(Some("anthropic/claude-opus-4.6")), "anthropic");
        assert_eq!(c.provider(Some("google/gemini-2.5-pro")), "gcp.gemini");
        assert_eq!(c.provider(Some("acme/model")), "acme");
        assert_eq!(c.provider(Some("gpt-4o")), "openai");
        assert_eq!(c.provider(None), "openai");
    }
}
