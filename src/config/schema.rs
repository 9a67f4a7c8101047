//! The raw TOML schema. Every table denies unknown keys so a typo is an error, not a silent
//! default. Defaults live here, next to the field they fill.

use std::path::PathBuf;

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
    pub access_log: crate::telemetry::access_log::RawAccessLog,
    #[serde(default)]
    pub pricing: RawPricing,
    #[serde(default)]
    pub metrics: crate::telemetry::calls::RawMetrics,
    #[serde(default)]
    pub budgets: crate::budget::policy::RawBudgets,
    #[serde(default)]
    pub traces: crate::telemetry::traces::RawTraces,
    #[serde(default)]
    pub auth: crate::auth::RawAuth,
    /// More upstreams, chosen by path prefix (`[[routes]]`); everything else goes to
    /// `[upstream]`.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

/// One `[[routes]]` entry: requests whose path starts with `prefix` go to `url`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// A path prefix, matched on whole segments as leniently as dialects are (`/v1/messages`,
    /// `/anthropic`).
    pub prefix: String,
    /// Take the prefix off the path before it goes upstream (and before the dialect is
    /// read): `/anthropic/v1/messages` becomes `/v1/messages`.
    #[serde(default)]
    pub strip_prefix: bool,
    /// The upstream's base URL, as `upstream.url`.
    pub url: String,
    /// With virtual keys: the environment variable holding this upstream's real key.
    pub key_env: Option<String>,
    /// The header that key goes in (`authorization`, `x-api-key`, `api-key`).
    #[serde(default = "d_key_header")]
    pub key_header: crate::auth::KeyHeader,
}

fn d_key_header() -> crate::auth::KeyHeader {
    crate::auth::KeyHeader::Authorization
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
    /// Requests to paths no metered dialect serves: `"forward"` them (counted in
    /// `tokentap_unmetered_requests_total`), or `"refuse"` them with 404.
    pub unmetered: super::Unmetered,
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
            unmetered: super::Unmetered::Forward,
        }
    }
}
