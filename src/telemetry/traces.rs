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

use opentelemetry::trace::{SpanId, TraceId, TraceState};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{Span, SpanFlags, Status};
use rand::Rng;
use serde::Deserialize;

use super::otlp::transport::Exporter;
use super::otlp::{Attrs, Batch};
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
    /// Sent with every export, with those of `OTEL_EXPORTER_OTLP_TRACES_HEADERS` (else
    /// `OTEL_EXPORTER_OTLP_HEADERS`), which win for the same name.
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
    /// `[traces].headers` and the environment's, names lowercase.
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
    /// `gen_ai.provider.name` by model prefix (the one rule records, metrics and spans use).
    pub providers: crate::meter::provider::Providers,
}

impl Default for TracesConfig {
    fn default() -> Self {
        TracesConfig {
            export: None,
            sampling_ratio: 1.0,
            inject_traceparent: false,
            capture_content: false,
            max_content_bytes: 4096,
            providers: Default::default(),
        }
    }
}

/// The environment `compile` reads its `OTEL_*` variables from: the process's, or a test's.
struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    /// A variable that is set and not blank.
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|v| !v.trim().is_empty())
    }
}

/// Checks `[traces]`, filling what is unset from the standard `OTEL_*` variables. Traces are
/// off without an endpoint, with `endpoint = ""`, or with `OTEL_SDK_DISABLED=true` or
/// `OTEL_TRACES_EXPORTER=none`. An endpoint from the environment that cannot be used turns
/// traces off with a warning (the environment is not the operator's config); one in the
/// config file is an error.
pub fn compile(raw: &RawTraces) -> Result<TracesConfig, String> {
    compile_in(raw, &Env(&|name| std::env::var(name).ok()))
}

fn compile_in(raw: &RawTraces, env: &Env) -> Result<TracesConfig, String> {
    let providers =
        crate::meter::provider::Providers::new(raw.providers.clone(), raw.default_provider.clone());
    let mut cfg = TracesConfig {
        export: None,
        sampling_ratio: 1.0,
        inject_traceparent: raw.inject_traceparent,
        capture_content: raw.capture_content,
        max_content_bytes: raw.max_content_bytes,
        providers,
    };
    if let Some(r) = raw.sampling_ratio {
        if !(0.0..=1.0).contains(&r) {
            return Err(format!(
                "traces.sampling_ratio: {r} is out of range: use 0 to 1"
            ));
        }
        cfg.sampling_ratio = r;
    }
    let disabled = env
        .get("OTEL_SDK_DISABLED")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env
            .get("OTEL_TRACES_EXPORTER")
            .is_some_and(|v| v.eq_ignore_ascii_case("none"));
    // (value, from the config file, a base URL that gets the signal's path)
    let endpoint = match (&raw.endpoint, env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) {
        (Some(e), _) if e.is_empty() => return Ok(cfg),
        (Some(e), _) => (e.clone(), true, true),
        (None, _) if disabled => return Ok(cfg),
        (None, Some(e)) => (e, false, false),
        (None, None) => match env.get("OTEL_EXPORTER_OTLP_ENDPOINT") {
            Some(e) => (e, false, true),
            None => return Ok(cfg),
        },
    };
    match export_config(raw, endpoint, env) {
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
        match env.get("OTEL_TRACES_SAMPLER").as_deref() {
            Some("always_off" | "parentbased_always_off") => cfg.sampling_ratio = 0.0,
            Some("traceidratio" | "parentbased_traceidratio") => {
                if let Some(a) = env.get("OTEL_TRACES_SAMPLER_ARG") {
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
    env: &Env,
) -> Result<ExportConfig, (bool, String)> {
    let err = |m: String| (from_file, m);
    let what = if from_file {
        "traces.endpoint"
    } else {
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    };
    let protocol = protocol(raw, env)?;
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
    let mut headers = file_headers(raw, protocol).map_err(|e| (true, e))?;
    // The environment's win over the file's for the same name (as the OTLP exporter has it).
    headers.extend(env_headers(env, protocol));
    // The OTLP exporter, built without compression, ignored these as well: say so.
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
    ] {
        if let Some(v) = env.get(var).filter(|v| !v.eq_ignore_ascii_case("none")) {
            log::warn!("{var}: {v:?} is not supported: spans are sent uncompressed");
        }
    }
    // Hours at most: an absurd value would only overflow timers. (The OTLP exporter's
    // OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT never applied: tokentap always sets the timeout.)
    const MAX_MS: u64 = 3_600_000;
    Ok(ExportConfig {
        endpoint,
        protocol,
        headers,
        service_name: raw
            .service_name
            .clone()
            .or_else(|| env.get("OTEL_SERVICE_NAME"))
            .unwrap_or_else(|| "tokentap".into()),
        queue_size: raw.queue_size,
        batch_size: raw.batch_size.min(raw.queue_size),
        batch_delay: Duration::from_millis(raw.batch_delay_ms.clamp(1, MAX_MS)),
        timeout: Duration::from_millis(raw.export_timeout_ms.clamp(1, MAX_MS)),
    })
}

/// `traces.protocol`, else the `OTEL_*` variables, else gRPC.
fn protocol(raw: &RawTraces, env: &Env) -> Result<Protocol, (bool, String)> {
    let chosen = raw.protocol.clone().or_else(|| {
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| env.get("OTEL_EXPORTER_OTLP_PROTOCOL"))
    });
    match chosen.as_deref() {
        None | Some("grpc") => Ok(Protocol::Grpc),
        Some("http/protobuf") => Ok(Protocol::HttpProtobuf),
        Some(other) => {
            let key = if raw.protocol.is_some() {
                "traces.protocol"
            } else {
                "OTEL_EXPORTER_OTLP_PROTOCOL"
            };
            Err((
                raw.protocol.is_some(),
                format!("{key}: {other:?}: use \"grpc\" or \"http/protobuf\""),
            ))
        }
    }
}

/// Why a header cannot be sent, if it cannot: names are compared lowercase, and gRPC's
/// binary metadata (`-bin` names) would need base64 values tokentap cannot vouch for.
fn header_problem(name: &str, value: &str, protocol: Protocol) -> Option<&'static str> {
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Some("is not a valid header name");
    }
    if protocol == Protocol::Grpc && name.to_ascii_lowercase().ends_with("-bin") {
        return Some("is binary gRPC metadata (a -bin name), which is not supported");
    }
    if http::HeaderValue::from_str(value).is_err() {
        return Some("has a value that is not a valid header value");
    }
    None
}

/// `[traces].headers`, names lowercase. A header that cannot be sent is a config error.
fn file_headers(raw: &RawTraces, protocol: Protocol) -> Result<BTreeMap<String, String>, String> {
    let mut headers = BTreeMap::new();
    for (k, v) in &raw.headers {
        if let Some(why) = header_problem(k, v, protocol) {
            return Err(format!("traces.headers: {k:?} {why}"));
        }
        headers.insert(k.to_ascii_lowercase(), v.clone());
    }
    Ok(headers)
}

/// `OTEL_EXPORTER_OTLP_TRACES_HEADERS`, else `OTEL_EXPORTER_OTLP_HEADERS`, as the OTLP
/// exporter reads them: the signal's variable, when set (even empty), replaces the generic
/// one; comma-separated `name=value` entries, values percent-decoded. An entry that cannot
/// be a header is skipped with a warning (the environment is not the operator's config);
/// the warning never shows a value, which may be a secret.
fn env_headers(env: &Env, protocol: Protocol) -> Vec<(String, String)> {
    let var = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
    let (var, list) = match (env.0)(var) {
        Some(l) => (var, l),
        None => match (env.0)("OTEL_EXPORTER_OTLP_HEADERS") {
            Some(l) => ("OTEL_EXPORTER_OTLP_HEADERS", l),
            None => return Vec::new(),
        },
    };
    let mut headers = Vec::new();
    for (i, entry) in list.split_terminator(',').map(str::trim).enumerate() {
        let Some((k, v)) = entry.split_once('=') else {
            if !entry.is_empty() {
                log::warn!("{var}: entry {} is not name=value; it is not sent", i + 1);
            }
            continue;
        };
        let (k, v) = (k.trim(), percent_decoded(v.trim()));
        let why = if k.is_empty() || v.is_empty() {
            Some("has an empty name or value")
        } else {
            header_problem(k, &v, protocol)
        };
        match why {
            // The name only when it is one: a mistyped entry ("Authorization: Basic …", with
            // `:` for `=`) would otherwise print the secret as the "name".
            Some(why) if http::HeaderName::from_bytes(k.as_bytes()).is_ok() => {
                log::warn!("{var}: entry {} ({k:?}) {why}; it is not sent", i + 1)
            }
            Some(why) => log::warn!("{var}: entry {} {why}; it is not sent", i + 1),
            None => headers.push((k.to_ascii_lowercase(), v)),
        }
    }
    headers
}

/// `%XX` escapes decoded (OTLP's header variables percent-encode their values); a value
/// with a broken escape, or one that does not decode to UTF-8, is taken as written.
fn percent_decoded(v: &str) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut rest = v.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b != b'%' {
            out.push(b);
            rest = tail;
            continue;
        }
        let hex = tail.get(..2).and_then(|h| std::str::from_utf8(h).ok());
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(byte) => out.push(byte),
            None => return v.to_string(),
        }
        rest = &tail[2..];
    }
    String::from_utf8(out).unwrap_or_else(|_| v.to_string())
}

impl TracesConfig {
    pub fn enabled(&self) -> bool {
        self.export.is_some()
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
}

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

impl CallTrace {
    /// The trace of a call whose head carried `traceparent` (and `tracestate`), or a new one.
    pub fn start(traceparent: Option<&str>, tracestate: Option<&str>, ratio: f64) -> CallTrace {
        let mut rng = rand::thread_rng();
        let span_id = SpanId::from(rng.gen::<u64>());
        if let Some((trace_id, parent, sampled)) = traceparent.and_then(parse_traceparent) {
            return CallTrace {
                trace_id,
                span_id,
                parent: Some(parent),
                sampled,
                tracestate: tracestate.map(str::to_string),
            };
        }
        let trace_id = TraceId::from(rng.gen::<u128>());
        CallTrace {
            trace_id,
            span_id,
            parent: None,
            sampled: ratio_samples(trace_id, ratio),
            tracestate: None,
        }
    }

    /// The call's place in its trace, as the record keeps it.
    pub fn context(&self) -> crate::meter::TraceContext {
        crate::meter::TraceContext {
            trace_id: self.trace_id.to_bytes(),
            span_id: self.span_id.to_bytes(),
            parent: self.parent.map(|p| p.to_bytes()),
            tracestate: self.tracestate.clone(),
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

/// The span of a call, as the OTLP message, its attributes written into `a` (cleared first).
pub fn span_of(rec: &UsageRecord, settings: &SpanSettings, a: &mut Attrs) -> Option<Span> {
    let t = rec.trace.as_ref()?;
    a.clear();
    let name = if rec.chat {
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

/// The GenAI attributes of a chat call; its span name.
fn chat_attrs(rec: &UsageRecord, settings: &SpanSettings, a: &mut Attrs) -> String {
    a.str(sc::GEN_AI_OPERATION_NAME, sc::OPERATION_CHAT);
    a.str(sc::GEN_AI_PROVIDER_NAME, rec.provider.as_str());
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
        let id = super::calls::user_id(&settings.metrics, u);
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
    let mut name = String::with_capacity(
        sc::OPERATION_CHAT.len() + 1 + rec.model.as_ref().map_or(0, String::len),
    );
    name.push_str(sc::OPERATION_CHAT);
    if let Some(m) = &rec.model {
        name.push(' ');
        name.push_str(m);
    }
    name
}

/// Token counts, when there are any.
fn usage_attrs(rec: &UsageRecord, a: &mut Attrs) {
    if rec.usage_source == UsageSource::None {
        return;
    }
    let u = &rec.usage;
    a.int(sc::GEN_AI_USAGE_INPUT_TOKENS, u.prompt as i64);
    a.int(sc::GEN_AI_USAGE_OUTPUT_TOKENS, u.completion as i64);
    // An estimate knows nothing of cached or reasoning tokens: no false zeros.
    if rec.usage_source == UsageSource::Reported {
        a.int(sc::GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, u.cached as i64);
        a.int(sc::GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, u.reasoning as i64);
    }
}

/// The HTTP attributes of any other call; its span name.
fn http_attrs(rec: &UsageRecord, a: &mut Attrs) -> String {
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
fn add(batch: &mut Batch, attrs: &mut Attrs, rec: &UsageRecord, settings: &SpanSettings) {
    if let Some(s) = span_of(rec, settings, attrs) {
        batch.push(s, attrs);
    }
}

/// Nanoseconds since the Unix epoch (0 before it).
fn unix_nanos(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `error.type` of a call that did not complete: the upstream's error type (or code), else
/// its HTTP status, else how the call ended (tokentap refused it, the upstream could not be
/// reached or timed out, a side hung up).
fn error_type(rec: &UsageRecord) -> Option<String> {
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
    /// How records show as spans, from the running config.
    settings: Arc<arc_swap::ArcSwap<SpanSettings>>,
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
    pub fn new(config: &crate::config::Config) -> Result<TraceSink, String> {
        let cfg = &config.traces;
        let settings = Arc::new(arc_swap::ArcSwap::from_pointee(SpanSettings::of(config)));
        let counters = TraceCounters::new();
        for r in ["queue_full", "export_failed", "stopped"] {
            counters.dropped.with_label_values(&[r]);
        }
        let Some(export) = cfg.export.clone() else {
            return Ok(TraceSink {
                tx: None,
                settings,
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
        // Inside the runtime: the gRPC channel starts its worker there.
        let exporter = rt.block_on(async { Exporter::new(&export) })?;
        let c = counters.clone();
        let wake = Arc::new(LazyWake::new(export.batch_size.min(export.queue_size / 2)));
        let w = Arc::clone(&wake);
        let s = Arc::clone(&settings);
        let thread = std::thread::Builder::new()
            .name("tokentap-traces".into())
            .spawn(move || {
                super::wake::lower_priority();
                export_loop(rt, exporter, rx, &w, export, c, &s)
            })
            .map_err(|e| e.to_string())?;
        wake.set_worker(thread.thread().clone());
        Ok(TraceSink {
            tx: Some(tx),
            settings,
            wake,
            counters,
            stopped: AtomicBool::new(false),
            thread: Mutex::new(Some(thread)),
        })
    }
}

fn export_loop(
    rt: tokio::runtime::Runtime,
    exporter: Exporter,
    rx: Receiver<Msg>,
    wake: &LazyWake,
    cfg: ExportConfig,
    counters: TraceCounters,
    settings: &arc_swap::ArcSwap<SpanSettings>,
) {
    let mut batch = Batch::new(&cfg.service_name);
    let mut attrs = Attrs::default();
    let mut due = Instant::now() + cfg.batch_delay;
    // One warning per run of failures (a dead collector would otherwise fill the log).
    let failing = std::cell::Cell::new(false);
    let export = |batch: &mut Batch| {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let body = batch.request();
        batch.clear();
        let r =
            rt.block_on(async { tokio::time::timeout(cfg.timeout, exporter.export(body)).await });
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
                    add(&mut batch, &mut attrs, &rec, &settings.load());
                    if batch.len() >= cfg.batch_size {
                        export(&mut batch);
                        due = Instant::now() + cfg.batch_delay;
                    }
                }
                Ok(Msg::Flush(done)) => {
                    // Everything queued before the flush, then answer.
                    while let Ok(m) = rx.try_recv() {
                        if let Msg::Record(rec) = m {
                            add(&mut batch, &mut attrs, &rec, &settings.load());
                            if batch.len() >= cfg.batch_size {
                                export(&mut batch);
                            }
                        }
                    }
                    export(&mut batch);
                    // The flush is the shutdown's: the exporter is done.
                    let _ = done.send(());
                    return;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    export(&mut batch);
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
    fn reconfigure(&self, cfg: &crate::config::Config) {
        self.settings.store(Arc::new(SpanSettings::of(cfg)));
    }

    fn record(&self, rec: &Arc<UsageRecord>) {
        let Some(tx) = &self.tx else { return };
        if rec.trace.is_none() {
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
    use opentelemetry_proto::tonic::common::v1::any_value;

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

    /// `compile` in an environment of these variables only.
    fn compile_env(raw: &RawTraces, vars: &[(&str, &str)]) -> Result<TracesConfig, String> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        compile_in(raw, &Env(&|name| vars.get(name).cloned()))
    }

    fn grpc_to(headers: &[(&str, &str)]) -> RawTraces {
        RawTraces {
            endpoint: Some("http://c:4317".into()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..RawTraces::default()
        }
    }

    fn headers_of(c: Result<TracesConfig, String>) -> Vec<(String, String)> {
        c.unwrap().export.unwrap().headers.into_iter().collect()
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn otlp_header_variables_add_to_the_files_and_win_for_the_same_name() {
        let raw = grpc_to(&[("X-Team", "file"), ("Authorization", "file")]);
        let vars = [
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Authorization=Bearer%20abc , x-extra = 1,",
            ),
            // Never applied: the config always sets the timeout (as the exporter had it).
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "1"),
        ];
        let c = compile_env(&raw, &vars);
        assert_eq!(
            c.as_ref()
                .unwrap()
                .export
                .as_ref()
                .unwrap()
                .timeout
                .as_millis(),
            5000
        );
        assert_eq!(
            headers_of(c),
            pairs(&[
                ("authorization", "Bearer abc"),
                ("x-extra", "1"),
                ("x-team", "file")
            ])
        );
        assert_eq!(
            headers_of(compile_env(&raw, &[])),
            pairs(&[("authorization", "file"), ("x-team", "file")])
        );
    }

    #[test]
    fn the_traces_header_variable_replaces_the_generic_one() {
        let raw = grpc_to(&[]);
        let generic = ("OTEL_EXPORTER_OTLP_HEADERS", "a=1,b=2");
        let c = compile_env(
            &raw,
            &[generic, ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "b=3")],
        );
        assert_eq!(headers_of(c), pairs(&[("b", "3")]));
        // Set but empty, it still hides the generic one.
        let c = compile_env(&raw, &[generic, ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "")]);
        assert_eq!(headers_of(c), pairs(&[]));
        let c = compile_env(&raw, &[generic]);
        assert_eq!(headers_of(c), pairs(&[("a", "1"), ("b", "2")]));
    }

    #[test]
    fn header_variable_entries_that_cannot_be_sent_are_skipped() {
        let list = "novalue,=x,k=,bad name=1,ok=1,v=%zz,x-bin=AAEC,ctl=%0A";
        let vars = [("OTEL_EXPORTER_OTLP_HEADERS", list)];
        let c = compile_env(&grpc_to(&[]), &vars);
        assert_eq!(headers_of(c), pairs(&[("ok", "1"), ("v", "%zz")]));
        // Binary metadata is a gRPC notion: over HTTP it is a header like any other.
        let http = RawTraces {
            protocol: Some("http/protobuf".into()),
            ..grpc_to(&[])
        };
        let c = compile_env(&http, &vars);
        assert_eq!(
            headers_of(c),
            pairs(&[("ok", "1"), ("v", "%zz"), ("x-bin", "AAEC")])
        );
    }

    #[test]
    fn file_headers_that_cannot_be_sent_are_config_errors() {
        for bad in [
            ("bad name", "v"),
            ("x-key", "line\nbreak"),
            ("x-bin", "AAEC"),
        ] {
            let e = compile_env(&grpc_to(&[bad]), &[]).unwrap_err();
            assert!(e.starts_with("traces.headers: "), "{e}");
        }
    }

    #[test]
    fn header_values_are_percent_decoded_unless_broken() {
        for (v, want) in [
            ("a%20b", "a b"),
            ("%C3%A9t%C3%A9", "été"),
            ("100%", "100%"),
            ("%4", "%4"),
            ("%zz1", "%zz1"),
            ("%FF", "%FF"),
            ("plain", "plain"),
        ] {
            assert_eq!(percent_decoded(v), want, "{v}");
        }
    }

    /// A traced call: a chat call with every optional field set, or with none; or another
    /// call.
    fn record(kind: &str) -> UsageRecord {
        let full = kind == "full";
        let some = |v: &str| full.then(|| v.to_string());
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let trace = CallTrace::start(full.then_some(tp), Some("vendor=abc"), 1.0);
        UsageRecord {
            provider: "anthropic".into(),
            method: if kind == "other" { "PROPFIND" } else { "POST" }.into(),
            chat: kind != "other",
            model: some("anthropic/claude"),
            response_model: some("anthropic/claude-1"),
            response_id: some("gen-1"),
            user: some("alice"),
            stream: full,
            max_tokens: full.then_some(50),
            status: if full { 529 } else { 200 },
            upstream_status: full.then_some(529),
            usage: crate::meter::Usage {
                web_searches: 1,
                ..UsageRecord::test_chat().usage
            },
            usage_source: if full {
                UsageSource::Reported
            } else {
                UsageSource::None
            },
            cost: full.then_some(crate::meter::Pico(1_500_000)),
            finish_reasons: if full { vec!["stop".into()] } else { vec![] },
            duration: Duration::from_millis(1500),
            trace: Some(trace.context()),
            upstream_host: "api.example".into(),
            upstream_port: 443,
            url_base: "https://api.example/api".into(),
            temperature: full.then_some(0.5),
            top_p: full.then_some(0.9),
            budget_decision: full.then_some("allowed"),
            captured_input: full.then(|| {
                bytes::Bytes::from_static(br#"{"messages":[{"role":"user","content":"hi"}]}"#)
            }),
            captured_output: some("hello"),
            upstream_error_type: some("overloaded"),
            time_to_first_chunk: full.then_some(Duration::from_millis(30)),
            ..UsageRecord::test_chat()
        }
    }

    fn settings() -> SpanSettings {
        SpanSettings {
            metrics: crate::config::MetricsConfig {
                user_label: crate::config::UserLabel::All,
                max_users: 10,
                users: Vec::new(),
                max_models: 10,
                max_series: 100,
                hash_salt: String::new(),
                priced_models: Vec::new(),
            },
            max_content_bytes: 100,
        }
    }

    /// A record's span as a collector gets it.
    fn encoded(rec: &UsageRecord) -> Span {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message;
        let mut batch = Batch::new("svc");
        add(&mut batch, &mut Attrs::default(), rec, &settings());
        let mut req = ExportTraceServiceRequest::decode(batch.request()).unwrap();
        req.resource_spans[0].scope_spans[0].spans.remove(0)
    }

    fn attr<'a>(s: &'a Span, k: &str) -> &'a any_value::Value {
        let kv = s.attributes.iter().find(|a| a.key == k);
        let v = kv
            .and_then(|a| a.value.as_ref())
            .and_then(|v| v.value.as_ref());
        v.unwrap_or_else(|| panic!("no {k}"))
    }

    #[test]
    fn a_span_carries_the_calls_context_and_attributes() {
        use any_value::Value as V;
        let full = encoded(&record("full"));
        assert_eq!(full.name, "chat anthropic/claude");
        assert_eq!(full.kind, SpanKind::Client as i32);
        assert_eq!(
            full.parent_span_id,
            [0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31]
        );
        assert_eq!(full.trace_state, "vendor=abc");
        assert_eq!(full.flags, 0x301, "sampled, with a remote parent");
        assert_eq!(full.start_time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(full.end_time_unix_nano, 1_700_000_001_500_000_000);
        let status = full.status.as_ref().unwrap();
        assert_eq!(
            (status.code, status.message.as_str()),
            (StatusCode::Error as i32, "overloaded")
        );
        assert_eq!(
            *attr(&full, "error.type"),
            V::StringValue("overloaded".into())
        );
        assert_eq!(*attr(&full, "gen_ai.request.max_tokens"), V::IntValue(50));
        assert_eq!(*attr(&full, "gen_ai.request.top_p"), V::DoubleValue(0.9));
        assert_eq!(*attr(&full, "gen_ai.request.stream"), V::BoolValue(true));
        assert_eq!(*attr(&full, "tokentap.cost_usd"), V::DoubleValue(1.5e-6));
        assert_eq!(*attr(&full, "http.response.status_code"), V::IntValue(529));
        let V::ArrayValue(reasons) = attr(&full, "gen_ai.response.finish_reasons") else {
            panic!("not an array")
        };
        assert_eq!(reasons.values[0].value, Some(V::StringValue("stop".into())));
        assert!(
            matches!(attr(&full, "gen_ai.input.messages"), V::StringValue(m) if m.contains("hi"))
        );

        let bare = encoded(&record("bare"));
        assert_eq!(bare.name, "chat");
        assert!(bare.parent_span_id.is_empty());
        assert_eq!(bare.trace_state, "", "a new trace has no tracestate");
        assert_eq!(bare.flags, 0x101, "sampled, no remote parent");
        assert_eq!(bare.status, Some(Status::default()));
        let keys: Vec<&str> = bare.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "gen_ai.operation.name",
                "gen_ai.provider.name",
                "gen_ai.request.stream",
                "tokentap.usage.estimated",
                "tokentap.web_searches",
                "server.address",
                "server.port",
                "tokentap.outcome",
                "tokentap.request_id",
            ]
        );

        let other = encoded(&record("other"));
        assert_eq!(other.name, "HTTP");
        assert_eq!(
            *attr(&other, "http.request.method"),
            V::StringValue("_OTHER".into())
        );
        assert_eq!(
            *attr(&other, "url.full"),
            V::StringValue("https://api.example/api/v1/chat/completions".into())
        );
    }

    #[test]
    fn an_invalid_tracestate_is_dropped() {
        let mut rec = record("full");
        if let Some(t) = rec.trace.as_mut() {
            t.tracestate = Some("vendor=abc,no equals sign".into());
        }
        assert_eq!(encoded(&rec).trace_state, "");
    }

    #[test]
    fn batches_of_real_spans_decode_to_what_prost_encodes() {
        let kinds = ["full", "bare", "other"];
        for n in [0, 1, 2, 3, 50] {
            let recs: Vec<UsageRecord> = (0..n).map(|i| record(kinds[i % 3])).collect();
            let spans: Vec<Span> = recs.iter().map(encoded).collect();
            let mut batch = Batch::new("svc");
            let mut attrs = Attrs::default();
            for r in &recs {
                add(&mut batch, &mut attrs, r, &settings());
            }
            use crate::telemetry::otlp::tests::{assert_encodes_as, expected};
            assert_encodes_as(batch.request(), &expected("svc", spans), n);
        }
    }
}
