//! The raw TOML schema. Every table denies unknown keys so a typo is an error, not a silent
//! default. Defaults live here, next to the field they fill.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::meter::pricing::RawPricing;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub upstream: RawUpstream,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub access_log: RawAccessLog,
    #[serde(default)]
    pub pricing: RawPricing,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub budgets: crate::budget::policy::RawBudgets,
    #[serde(default)]
    pub traces: crate::telemetry::traces::RawTraces,
    #[serde(default)]
    pub auth: crate::auth::RawAuth,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    pub user_label: UserLabel,
    pub max_users: usize,
    pub users: Vec<String>,
    pub max_models: usize,
    /// At most this many (model, user) pairs get their own series; beyond, `__other__`.
    pub max_series: usize,
    /// Mixed into hashed users, so that labels cannot be reversed from a list of ids.
    pub hash_salt: String,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics {
            user_label: UserLabel::All,
            max_users: 1000,
            users: Vec::new(),
            max_models: 200,
            max_series: 20_000,
            hash_salt: String::new(),
        }
    }
}

/// How the `user` label of metrics is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserLabel {
    /// Each user, up to `max_users`; later ones are counted as `__other__`.
    All,
    /// Only the users listed in `users`; the rest as `__other__`.
    Allowlist,
    /// A short SHA-256 of the user (pseudonymous), up to `max_users`.
    Hash,
    /// No per-user series (the label is empty).
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    pub admin_listen: String,
    pub threads: usize,
    /// After SIGTERM: stop accepting, then wait up to this long for in-flight calls to finish.
    pub drain_timeout_ms: u64,
    /// error, warn, info, debug or trace (`RUST_LOG`, when set, wins).
    pub log_level: String,
    /// The environment variable holding the bearer token `/admin/*` requires (unset: the
    /// admin API is open to whoever reaches the admin listener).
    pub admin_token_env: Option<String>,
    /// `/metrics` needs the admin token too (per-user spend is in it).
    pub protect_metrics: bool,
    /// `/healthz` and `/readyz` need the admin token too (probes must then send it).
    pub protect_health: bool,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9464".into(),
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            drain_timeout_ms: 30_000,
            log_level: "info".into(),
            admin_token_env: None,
            protect_metrics: false,
            protect_health: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: String,
    #[serde(default = "d_connect")]
    pub connect_timeout_ms: u64,
    #[serde(default = "d_read")]
    pub read_timeout_ms: u64,
    #[serde(default = "d_write")]
    pub write_timeout_ms: u64,
    #[serde(default = "d_idle")]
    pub idle_timeout_ms: u64,
    #[serde(default = "d_dns")]
    pub dns_refresh_ms: u64,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Ask for the usage of streamed chat calls whose clients did not
    /// (`stream_options.include_usage`), and take the usage chunk out of what they receive.
    #[serde(default = "d_true")]
    pub inject_stream_usage: bool,
    /// Models whose streams are left as the client sent them (exact names, or prefixes
    /// ending in `*`).
    #[serde(default)]
    pub inject_stream_usage_except: Vec<String>,
}

fn d_true() -> bool {
    true
}

fn d_connect() -> u64 {
    5_000
}
fn d_read() -> u64 {
    // Reasoning models can think for minutes before the first byte.
    600_000
}
fn d_write() -> u64 {
    60_000
}
fn d_idle() -> u64 {
    60_000
}
fn d_dns() -> u64 {
    30_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_request_body_bytes: usize,
    pub max_response_tap_bytes: usize,
    /// All request header lines together (431 beyond).
    pub max_header_bytes: usize,
    /// A `user` id longer than this is refused (400).
    pub max_user_bytes: usize,
    /// Streamed calls one user may have open at once (429 beyond); 0: no limit.
    pub max_streams_per_user: usize,
    /// A whole call, from its request head to its last response byte; 0: none. Before the
    /// response starts, passing it answers 504; after, the stream is cut.
    pub request_deadline_ms: u64,
    /// A client that sends nothing for this long (between requests, or mid-body) is dropped.
    pub client_idle_timeout_ms: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_request_body_bytes: 32 * 1024 * 1024,
            max_response_tap_bytes: 64 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            max_user_bytes: 256,
            max_streams_per_user: 0,
            request_deadline_ms: 0,
            client_idle_timeout_ms: 60_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAccessLog {
    pub enabled: bool,
    /// `"-"` for stdout, otherwise a file path (relative to the config file's directory).
    pub path: AccessLogTarget,
}

impl Default for RawAccessLog {
    fn default() -> Self {
        RawAccessLog {
            enabled: true,
            path: AccessLogTarget::Stdout,
        }
    }
}

/// Where JSON-lines access records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    File(PathBuf),
}

impl AccessLogTarget {
    pub(super) fn resolve(self, dir: &Path) -> Self {
        match self {
            AccessLogTarget::File(p) => AccessLogTarget::File(dir.join(p)),
            t => t,
        }
    }
}

impl<'de> Deserialize<'de> for AccessLogTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "-" | "stdout" => AccessLogTarget::Stdout,
            "" => return Err(serde::de::Error::custom("empty path: use \"-\" for stdout")),
            p => AccessLogTarget::File(PathBuf::from(p)),
        })
    }
}
