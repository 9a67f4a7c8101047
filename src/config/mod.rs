//! Configuration: the TOML schema, loading and validation.
//!
//! A config file is parsed into the raw `schema` structs (serde, `deny_unknown_fields`), then
//! validated and compiled into a [`Config`]: an immutable snapshot the proxy holds in an
//! `ArcSwap` and every request reads from start to end. `tokentap check-config` and `serve` go
//! through the same [`load`] function, so a file that checks also runs.
//!
//! Every error names the file, the key and what to change.

pub mod reload;
mod schema;
pub mod watch;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::meter::pricing::{PriceTable, PricingError};

pub use crate::telemetry::access_log::{AccessLogConfig, AccessLogTarget};
pub use crate::telemetry::calls::{MetricsConfig, UserLabel};

/// The running config: the snapshot every new call reads, swapped whole by a reload. The
/// handle that reload, the file watcher, admin and the proxy share.
pub type Live = std::sync::Arc<arc_swap::ArcSwap<Config>>;

/// A validated, compiled configuration snapshot.
#[derive(Debug, Clone)]
pub struct Config {
    /// The main config file this snapshot was loaded from.
    pub source: PathBuf,
    /// Every file it was built from (the main file first, then included ones).
    pub files: Vec<PathBuf>,
    /// A digest of those files' contents: which config is running.
    pub hash: String,
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub limits: LimitsConfig,
    pub access_log: AccessLogConfig,
    pub pricing: PriceTable,
    pub metrics: MetricsConfig,
    pub budgets: crate::budget::policy::BudgetPolicy,
    pub traces: crate::telemetry::traces::TracesConfig,
    pub auth: crate::auth::AuthConfig,
    /// More upstreams by path prefix (`[[routes]]`), longest prefix first.
    pub routes: Vec<Route>,
}

/// An upstream chosen by path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Normalized (`/anthropic`), no trailing slash.
    pub prefix: String,
    pub strip_prefix: bool,
    pub url: UpstreamUrl,
    /// The real key with virtual keys (`key_env`), ready as the header's value.
    pub key: Option<crate::auth::Secret>,
    pub key_header: crate::auth::KeyHeader,
}

impl Route {
    /// The rest of `normalized` (a [`crate::openai::normalized_path`]) after this route's
    /// prefix, when the prefix matches it on whole segments.
    pub fn rest<'a>(&self, normalized: &'a str) -> Option<&'a str> {
        let rest = normalized.strip_prefix(self.prefix.as_str())?;
        (rest.is_empty() || rest.starts_with('/')).then_some(rest)
    }
}

impl Config {
    /// The route a request path goes by (`None`: `[upstream]`).
    pub fn route_for(&self, normalized: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|r| r.rest(normalized).is_some())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub threads: usize,
    /// After SIGTERM, how long in-flight calls get to finish once the listeners are closed.
    pub drain_timeout: Duration,
    pub log_level: log::LevelFilter,
    /// The bearer token `/admin/*` requires, read from `server.admin_token_env`.
    pub admin_token: Option<Secret>,
    pub protect_metrics: bool,
    pub protect_health: bool,
}

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub url: UpstreamUrl,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    pub dns_refresh: Duration,
    /// A PEM bundle of trusted roots used instead of the system store, e.g. a private CA.
    pub ca_file: Option<PathBuf>,
    pub stream_usage: StreamUsage,
}

/// Whether tokentap asks the upstream for the usage of streams whose clients did not ask
/// (`upstream.inject_stream_usage`, `upstream.inject_stream_usage_except`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamUsage {
    pub inject: bool,
    /// Model names, or prefixes ending in `*`, left alone.
    pub except: Vec<String>,
}

impl StreamUsage {
    /// Streams of `model` get their usage asked for.
    pub fn injects(&self, model: Option<&str>) -> bool {
        self.inject
            && !model.is_some_and(|m| {
                self.except.iter().any(|p| match p.strip_suffix('*') {
                    Some(prefix) => m.starts_with(prefix),
                    None => m == p,
                })
            })
    }
}

/// The upstream base URL, split into what the connector needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: std::sync::Arc<str>,
    pub port: u16,
    /// Path prefix prepended to every proxied path ("" when the URL has no path).
    pub base_path: String,
    /// The value of the `Host` header sent upstream (`host` or `host:port` for a non-default port).
    pub host_header: String,
    /// `scheme://host_header` and the base path: what a span's `url.full` starts with (made
    /// once here, shared by every span).
    pub url_base: std::sync::Arc<str>,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub max_request_body_bytes: usize,
    /// Largest non-streaming response body the usage tap reads (the client always gets all bytes).
    pub max_response_tap_bytes: usize,
    pub max_header_bytes: usize,
    pub max_user_bytes: usize,
    /// 0: no limit.
    pub max_streams_per_user: usize,
    pub request_deadline: Option<Duration>,
    pub client_idle_timeout: Duration,
    pub unmetered: Unmetered,
}

/// What happens to requests no metered dialect serves (`limits.unmetered`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmetered {
    /// Forwarded as sent, counted and logged (the default: nothing a client relies on breaks).
    #[default]
    Forward,
    /// Refused with 404 (listing models and counting tokens excepted): caps with no way
    /// around them.
    Refuse,
}

/// A configuration error: which file, where, and what to do about it.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn new(file: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            message: message.into(),
        }
    }
}

/// Reads, parses and validates the config file at `path` (and the files it includes).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, format!("cannot read the config file: {e}")))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    parse(&text, path, dir)
}

/// Parses and validates config text; `dir` resolves relative paths (included files, CA file).
pub fn parse(text: &str, file: &Path, dir: &Path) -> Result<Config, ConfigError> {
    let raw: schema::RawConfig =
        toml::from_str(text).map_err(|e| ConfigError::new(file, toml_error(&e, text)))?;
    compile(raw, text, file, dir).map_err(|mut e| {
        // Name the line of the key a value error is about.
        if e.file == file && !e.message.starts_with("line ") {
            if let Some(n) = e.message.split(": ").next().and_then(|k| line_of(text, k)) {
                e.message = format!("line {n}, {}", e.message);
            }
        }
        e
    })
}

/// The line (1-based) where a dotted key like `upstream.url` or `budgets.users."a".daily` is
/// set: its `key =` line inside its table, or the table's header, or failing that its closest
/// enclosing key.
fn line_of(text: &str, key: &str) -> Option<usize> {
    // Segments of a dotted key, split outside quotes, quotes and spaces around them removed.
    fn segments(k: &str) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut quoted = false;
        for c in k.chars() {
            match c {
                '"' => quoted = !quoted,
                '.' if !quoted => out.push(String::new()),
                c => out.last_mut().expect("one segment").push(c),
            }
        }
        out.into_iter().map(|s| s.trim().to_string()).collect()
    }
    let mut parts = segments(key);
    if parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    while !parts.is_empty() {
        let table = &parts[..parts.len() - 1];
        let leaf = &parts[parts.len() - 1];
        let mut current: Vec<String> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            if t.starts_with('[') {
                current = segments(t.trim_matches(|c| c == '[' || c == ']'));
                if current == parts {
                    return Some(i + 1);
                }
            } else if current == table {
                if let Some((k, _)) = t.split_once('=') {
                    if segments(k) == [leaf.clone()] {
                        return Some(i + 1);
                    }
                }
            }
        }
        parts.pop();
    }
    None
}

/// Formats a TOML error as "line L, column C: message" plus the offending line, so the operator
/// sees the key in context.
pub(crate) fn toml_error(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            let src = text.lines().nth(line - 1).unwrap_or("").trim_end();
            format!("line {line}, column {col}: {msg}\n    | {src}")
        }
        None => msg.to_string(),
    }
}

fn compile(
    raw: schema::RawConfig,
    text: &str,
    file: &Path,
    dir: &Path,
) -> Result<Config, ConfigError> {
    use sha2::Digest;
    let err = |key: &str, msg: String| ConfigError::new(file, format!("{key}: {msg}"));

    let server = server(raw.server, &err)?;

    let upstream = upstream(raw.upstream, dir, &err)?;

    let limits = limits(raw.limits, &err)?;

    let budgets =
        crate::budget::policy::compile(&raw.budgets, dir).map_err(|m| ConfigError::new(file, m))?;

    let access_log = crate::telemetry::access_log::compile(raw.access_log, dir)
        .map_err(|(key, m)| err(key, m))?;

    let (pricing, included) =
        crate::meter::pricing::compile(&raw.pricing, dir).map_err(|e| match e {
            PricingError::InFile { file, message } => ConfigError { file, message },
            PricingError::Here(message) => ConfigError::new(file, message),
        })?;

    let metrics =
        crate::telemetry::calls::compile(raw.metrics, &pricing).map_err(|(key, m)| err(key, m))?;

    let traces =
        crate::telemetry::traces::compile(&raw.traces).map_err(|m| ConfigError::new(file, m))?;
    let auth = crate::auth::compile(&raw.auth, dir).map_err(|m| ConfigError::new(file, m))?;
    let routes = routes(&raw.routes, auth.mode, &err)?;
    // A key issued for a team makes its user a member of that team (for the team's caps).
    let mut budgets = budgets;
    for (user, team) in &auth.keys.teams {
        if budgets.teams.contains_key(team) {
            let m = budgets.membership.entry(user.clone()).or_default();
            if !m.contains(team) {
                m.push(team.clone());
            }
        }
    }

    let mut files = vec![file.to_path_buf()];
    let mut digest = sha2::Sha256::new();
    digest.update(text.as_bytes());
    if let Some((path, content)) = included {
        digest.update([0u8]);
        digest.update(path.to_string_lossy().as_bytes());
        digest.update([0u8]);
        digest.update(content.as_bytes());
        files.push(path);
    }
    // The keys file is config too: a change to it (a revocation) is a reload.
    if auth.mode == crate::auth::Mode::VirtualKeys {
        digest.update([0u8]);
        digest.update(std::fs::read(&auth.keys_file).unwrap_or_default());
        files.push(auth.keys_file.clone());
    }
    let hash = digest.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    Ok(Config {
        source: file.to_path_buf(),
        files,
        hash,
        server,
        upstream,
        limits,
        access_log,
        pricing,
        metrics,
        budgets,
        traces,
        auth,
        routes,
    })
}

/// What a value error becomes: the file, the key and what to change.
type ErrAt<'a> = dyn Fn(&str, String) -> ConfigError + 'a;

/// `[server]`.
fn server(s: schema::RawServer, err: &ErrAt) -> Result<ServerConfig, ConfigError> {
    let listen = parse_addr(&s.listen).map_err(|m| err("server.listen", m))?;
    let admin_listen = parse_addr(&s.admin_listen).map_err(|m| err("server.admin_listen", m))?;
    if listen == admin_listen {
        return Err(err(
            "server.admin_listen",
            "must differ from server.listen".into(),
        ));
    }
    if s.threads == 0 || s.threads > 1024 {
        return Err(err(
            "server.threads",
            format!("{} is out of range: use 1 to 1024", s.threads),
        ));
    }
    if (s.protect_metrics || s.protect_health) && s.admin_token_env.is_none() {
        return Err(err(
            if s.protect_metrics {
                "server.protect_metrics"
            } else {
                "server.protect_health"
            },
            "needs server.admin_token_env (the token that protects it)".into(),
        ));
    }
    Ok(ServerConfig {
        listen,
        admin_listen,
        threads: s.threads,
        drain_timeout: Duration::from_millis(s.drain_timeout_ms),
        admin_token: match &s.admin_token_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(t) if t.len() >= 16 => Some(Secret(t)),
                Ok(_) => {
                    return Err(err(
                        "server.admin_token_env",
                        format!("the token in ${var} is shorter than 16 characters"),
                    ))
                }
                Err(_) => {
                    return Err(err(
                        "server.admin_token_env",
                        format!("${var} is not set: export the admin token in it"),
                    ))
                }
            },
        },
        protect_metrics: s.protect_metrics,
        protect_health: s.protect_health,
        log_level: s.log_level.parse().map_err(|_| {
            err(
                "server.log_level",
                format!(
                    "{:?} is not a level: use error, warn, info, debug or trace",
                    s.log_level
                ),
            )
        })?,
    })
}

/// `[upstream]` (`dir` resolves the CA file).
fn routes(
    raw: &[schema::RawRoute],
    mode: crate::auth::Mode,
    err: &ErrAt,
) -> Result<Vec<Route>, ConfigError> {
    let mut routes = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let at = |field: &str| format!("routes[{i}].{field}");
        // As the proxy compares it with normalized paths: lower case, no empty segments.
        let prefix: String = r
            .prefix
            .split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .map(|s| format!("/{}", s.to_ascii_lowercase()))
            .collect();
        let prefix = if prefix.is_empty() {
            "/".to_string()
        } else {
            prefix
        };
        if !r.prefix.starts_with('/') || prefix == "/" {
            return Err(err(
                &at("prefix"),
                format!("{:?}: write a path prefix like \"/v1/messages\"", r.prefix),
            ));
        }
        if routes.iter().any(|o: &Route| o.prefix == prefix) {
            return Err(err(&at("prefix"), format!("{prefix:?} is routed twice")));
        }
        let url = parse_upstream_url(&r.url).map_err(|m| err(&at("url"), m))?;
        let key = match (&r.key_env, mode) {
            (Some(var), crate::auth::Mode::VirtualKeys) => {
                let v = std::env::var(var).map_err(|_| {
                    err(
                        &at("key_env"),
                        format!("the environment variable {var} is not set"),
                    )
                })?;
                let value = r.key_header.value(v.trim());
                if http::HeaderValue::from_str(&value).is_err() {
                    return Err(err(
                        &at("key_env"),
                        format!("the key in {var} is not a valid header value"),
                    ));
                }
                Some(crate::auth::Secret(value))
            }
            _ => None,
        };
        routes.push(Route {
            prefix,
            strip_prefix: r.strip_prefix,
            url,
            key,
            key_header: r.key_header,
        });
    }
    // The longest prefix wins.
    routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
    Ok(routes)
}

fn upstream(
    u: schema::RawUpstream,
    dir: &Path,
    err: &ErrAt,
) -> Result<UpstreamConfig, ConfigError> {
    let url = parse_upstream_url(&u.url).map_err(|m| err("upstream.url", m))?;
    let ms = |key: &str, v: u64| -> Result<Duration, ConfigError> {
        if v == 0 {
            Err(err(key, "must be greater than 0".into()))
        } else {
            Ok(Duration::from_millis(v))
        }
    };
    let ca_file = match u.ca_file {
        Some(p) => {
            let p = dir.join(p);
            if !p.is_file() {
                return Err(err(
                    "upstream.ca_file",
                    format!("{} is not a readable file", p.display()),
                ));
            }
            Some(p)
        }
        None => None,
    };
    for p in &u.inject_stream_usage_except {
        if p.is_empty() || p.trim_end_matches('*').contains('*') {
            return Err(err(
                "upstream.inject_stream_usage_except",
                format!("{p:?}: write a model name, or a prefix ending in one `*`"),
            ));
        }
    }
    Ok(UpstreamConfig {
        stream_usage: StreamUsage {
            inject: u.inject_stream_usage,
            except: u.inject_stream_usage_except,
        },
        url,
        connect_timeout: ms("upstream.connect_timeout_ms", u.connect_timeout_ms)?,
        read_timeout: ms("upstream.read_timeout_ms", u.read_timeout_ms)?,
        write_timeout: ms("upstream.write_timeout_ms", u.write_timeout_ms)?,
        idle_timeout: ms("upstream.idle_timeout_ms", u.idle_timeout_ms)?,
        dns_refresh: ms("upstream.dns_refresh_ms", u.dns_refresh_ms)?,
        ca_file,
    })
}

/// `[limits]`.
fn limits(l: schema::RawLimits, err: &ErrAt) -> Result<LimitsConfig, ConfigError> {
    if l.max_request_body_bytes == 0 {
        return Err(err(
            "limits.max_request_body_bytes",
            "must be greater than 0".into(),
        ));
    }
    if l.client_idle_timeout_ms == 0 {
        return Err(err(
            "limits.client_idle_timeout_ms",
            "must be greater than 0".into(),
        ));
    }
    Ok(LimitsConfig {
        max_request_body_bytes: l.max_request_body_bytes,
        max_response_tap_bytes: l.max_response_tap_bytes,
        max_header_bytes: l.max_header_bytes,
        max_user_bytes: l.max_user_bytes,
        max_streams_per_user: l.max_streams_per_user,
        request_deadline: (l.request_deadline_ms > 0)
            .then(|| Duration::from_millis(l.request_deadline_ms)),
        client_idle_timeout: Duration::from_millis(l.client_idle_timeout_ms),
        unmetered: l.unmetered,
    })
}

impl Config {
    /// The settings that differ from `running` but only take effect after a restart (the
    /// listeners, the worker threads, the TLS roots).
    pub fn needs_restart_against(&self, running: &Config) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.server.listen != running.server.listen {
            v.push("server.listen");
        }
        if self.server.admin_listen != running.server.admin_listen {
            v.push("server.admin_listen");
        }
        if self.server.threads != running.server.threads {
            v.push("server.threads");
        }
        if self.upstream.ca_file != running.upstream.ca_file {
            v.push("upstream.ca_file");
        }
        if self.budgets.ledger != running.budgets.ledger {
            v.push("budgets.ledger");
        }
        if self.budgets.offset != running.budgets.offset {
            v.push("budgets.time_zone");
        }
        if self.traces.export != running.traces.export {
            v.push("traces (endpoint, protocol, headers, service name, queue)");
        }
        v
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>().map_err(|_| {
        format!("{s:?} is not an IP address and port: write it like \"127.0.0.1:8080\" or \"[::1]:8080\"")
    })
}

/// Parses `http[s]://host[:port][/base/path]`.
pub fn parse_upstream_url(s: &str) -> Result<UpstreamUrl, String> {
    let uri: http::Uri = s.parse().map_err(|e| {
        format!("{s:?} is not a URL ({e}): write it like \"https://api.example.com\"")
    })?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{s:?} must start with https:// or http://")),
    };
    let auth = uri
        .authority()
        .ok_or_else(|| format!("{s:?} has no host"))?;
    if auth.as_str().contains('@') {
        // Not echoed: the part before @ is a secret.
        return Err(
            "upstream.url contains credentials (user:key@): put API keys in headers, not in \
             the URL"
                .into(),
        );
    }
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    let default_port = if tls { 443 } else { 80 };
    let port = auth.port_u16().unwrap_or(default_port);
    if uri.query().is_some() {
        // The query is not echoed: it may hold a key.
        return Err(format!(
            "{:?} has a query string; the base URL takes none",
            s.split('?').next().unwrap_or_default()
        ));
    }
    let base_path = uri.path().trim_end_matches('/').to_string();
    let host_header = if port == default_port {
        auth.host().to_string()
    } else {
        format!("{}:{}", auth.host(), port)
    };
    let url_base = format!(
        "{}://{host_header}{base_path}",
        if tls { "https" } else { "http" }
    )
    .into();
    Ok(UpstreamUrl {
        tls,
        host: host.into(),
        port,
        base_path,
        host_header,
        url_base,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(text, Path::new("t.toml"), Path::new("."))
    }

    const MIN: &str = r#"
[upstream]
url = "http://127.0.0.1:9000"
"#;

    #[test]
    fn routes_are_matched_on_whole_segments_longest_first() {
        let c = parse_str(&format!(
            "{MIN}[[routes]]\nprefix = \"/Anthropic/\"\nstrip_prefix = true\nurl = \"https://a.example\"\n\
             [[routes]]\nprefix = \"/anthropic/v1/messages\"\nurl = \"https://b.example\"\n"
        ))
        .unwrap();
        assert_eq!(c.routes[0].prefix, "/anthropic/v1/messages");
        assert_eq!(c.route_for("/anthropic/v1/messages"), Some(0));
        assert_eq!(c.route_for("/anthropic/v1/models"), Some(1));
        assert_eq!(c.routes[1].rest("/anthropic/v1/models"), Some("/v1/models"));
        assert_eq!(c.route_for("/anthropics/v1/messages"), None);
        assert_eq!(c.route_for("/v1/chat/completions"), None);
        for bad in ["prefix = \"/\"", "prefix = \"v1\""] {
            let e = parse_str(&format!(
                "{MIN}[[routes]]\n{bad}\nurl = \"https://a.example\"\n"
            ))
            .unwrap_err();
            assert!(e.message.contains("routes[0].prefix"), "{}", e.message);
        }
        let e = parse_str(&format!(
            "{MIN}[[routes]]\nprefix = \"/x\"\nurl = \"https://a.example\"\n\
             [[routes]]\nprefix = \"/X/\"\nurl = \"https://b.example\"\n"
        ))
        .unwrap_err();
        assert!(e.message.contains("routed twice"), "{}", e.message);
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse_str(MIN).unwrap();
        assert_eq!(c.limits.max_request_body_bytes, 32 * 1024 * 1024);
        assert_eq!(c.upstream.url.port, 9000);
        assert!(!c.upstream.url.tls);
        assert_eq!(c.upstream.url.host_header, "127.0.0.1:9000");
        assert!(c.access_log.enabled);
        assert!(c.upstream.stream_usage.injects(Some("openai/gpt-5.5")));
    }

    #[test]
    fn usage_injection_is_opted_out_of_per_upstream_and_per_model() {
        let c = parse_str(
            "[upstream]\nurl = \"http://a\"\ninject_stream_usage_except = [\"deepseek/*\", \"x/y\"]\n",
        )
        .unwrap();
        let s = &c.upstream.stream_usage;
        assert!(!s.injects(Some("deepseek/chat")));
        assert!(!s.injects(Some("x/y")));
        assert!(s.injects(Some("x/yz")));
        assert!(s.injects(None));
        let c = parse_str("[upstream]\nurl = \"http://a\"\ninject_stream_usage = false\n").unwrap();
        assert!(!c.upstream.stream_usage.injects(Some("m")));
        let e =
            parse_str("[upstream]\nurl = \"http://a\"\ninject_stream_usage_except = [\"a*b\"]\n")
                .unwrap_err();
        assert!(
            e.to_string()
                .contains("line 3, upstream.inject_stream_usage_except"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = parse_str("[upstream]\nurl = \"http://a\"\nconect_timeout_ms = 5\n").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("t.toml: line 3"), "{s}");
        assert!(s.contains("conect_timeout_ms"), "{s}");
    }

    #[test]
    fn value_errors_name_the_line_too() {
        let e = parse_str("[server]\nthreads = 2\n\n[upstream]\nurl = \"ftp://a\"\n").unwrap_err();
        assert!(
            e.to_string().starts_with("t.toml: line 5, upstream.url: "),
            "{e}"
        );
        let e = parse_str(
            "[upstream]\nurl = \"http://a\"\n[budgets.users.\"al ice\"]\ndaily = { usd = \"x\" }\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("line 4, budgets.users"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = parse_str("[upstream]\nurl = \"ftp://a\"\n").unwrap_err();
        assert!(e.to_string().contains("upstream.url"), "{e}");
        let e =
            parse_str("[server]\nlisten = \"nope\"\n[upstream]\nurl = \"http://a\"\n").unwrap_err();
        assert!(e.to_string().contains("server.listen"), "{e}");
        let e = parse_str("[upstream]\nurl = \"http://a\"\nread_timeout_ms = 0\n").unwrap_err();
        assert!(e.to_string().contains("upstream.read_timeout_ms"), "{e}");
    }

    #[test]
    fn upstream_url_forms() {
        let u = parse_upstream_url("https://api.example.com/api/v1/").unwrap();
        assert!(u.tls);
        assert_eq!(u.port, 443);
        assert_eq!(u.base_path, "/api/v1");
        assert_eq!(u.host_header, "api.example.com");
        let u = parse_upstream_url("http://[::1]:8081").unwrap();
        assert_eq!(&*u.host, "::1");
        assert_eq!(u.host_header, "[::1]:8081");
        assert!(parse_upstream_url("https://user:pw@x").is_err());
        assert!(parse_upstream_url("api.example.com").is_err());
    }
}
