//! `[traces]`: the schema, the `OTEL_*` environment it is read with, and the exporter's
//! settings.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

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
pub(super) struct Env<'a>(pub(super) &'a dyn Fn(&str) -> Option<String>);

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

pub(super) fn compile_in(raw: &RawTraces, env: &Env) -> Result<TracesConfig, String> {
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
            crate::telemetry::warn_once(format!("traces are off: {e}"));
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
                        _ => {
                            crate::telemetry::warn_once(format!(
                                "OTEL_TRACES_SAMPLER_ARG: {a:?} is not a number from 0 to 1; \
                                 sampling every trace"
                            ));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(cfg)
}

/// Where spans go. Errors say whether the endpoint came from the config file.
pub(super) fn export_config(
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
            crate::telemetry::warn_once(format!(
                "{var}: {v:?} is not supported: spans are sent uncompressed"
            ));
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
pub(super) fn protocol(raw: &RawTraces, env: &Env) -> Result<Protocol, (bool, String)> {
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
pub(super) fn header_problem(name: &str, value: &str, protocol: Protocol) -> Option<&'static str> {
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
pub(super) fn file_headers(
    raw: &RawTraces,
    protocol: Protocol,
) -> Result<BTreeMap<String, String>, String> {
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
pub(super) fn env_headers(env: &Env, protocol: Protocol) -> Vec<(String, String)> {
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
                crate::telemetry::warn_once(format!(
                    "{var}: entry {} is not name=value; it is not sent",
                    i + 1
                ));
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
                crate::telemetry::warn_once(format!(
                    "{var}: entry {} ({k:?}) {why}; it is not sent",
                    i + 1
                ));
            }
            Some(why) => {
                crate::telemetry::warn_once(format!(
                    "{var}: entry {} {why}; it is not sent",
                    i + 1
                ));
            }
            None => headers.push((k.to_ascii_lowercase(), v)),
        }
    }
    headers
}

/// `%XX` escapes decoded (OTLP's header variables percent-encode their values); a value
/// with a broken escape, or one that does not decode to UTF-8, is taken as written.
pub(super) fn percent_decoded(v: &str) -> String {
    crate::openai::percent_decode_strict(v).unwrap_or_else(|| v.to_string())
}

impl TracesConfig {
    pub fn enabled(&self) -> bool {
        self.export.is_some()
    }
}
