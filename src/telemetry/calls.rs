//! Per-call metrics: the metrics sink of the `UsageRecord`, and the live gauges.
//!
//! Label values come from clients (`model`, `user`), so two rules hold here:
//! - Series are bounded: at most `metrics.max_models` models and `metrics.max_users` users get
//!   their own label value (the rest are `__other__`), users can be hashed, allow-listed or
//!   left out (`metrics.user_label`).
//! - Children are keyed by the exact label values. The `prometheus` crate's `MetricVec` hashes
//!   label values concatenated without a separator, so `("a", "bc")` and `("ab", "c")` would
//!   share one counter: one caller could book spend under another's name. This collector keeps
//!   its own maps and builds the exposition itself.
//!
//! Recording a call takes no lock shared by all requests: concurrent maps (sharded) hold the
//! children, whose values are atomics; a child is created once per label set.
//!
//! Names follow the OpenTelemetry GenAI semantic conventions (gen-ai-metrics, semconv 1.37,
//! development status), translated to Prometheus: `gen_ai.client.token.usage` becomes
//! `gen_ai_client_token_usage`, and so on.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use prometheus::{Histogram, HistogramOpts};
use serde::Deserialize;

use super::Sink;
use crate::config::Config;
use crate::meter::{Api, Outcome, UsageRecord, UsageSource};

/// `gen_ai.client.operation.duration` buckets (seconds), from the semantic conventions.
const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// `gen_ai.client.token.usage` buckets (tokens).
const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
/// `gen_ai.server.time_to_first_token` buckets (seconds).
const TTFT_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// `gen_ai.server.time_per_output_token` buckets (seconds).
const TPOT_BUCKETS: [f64; 13] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
/// tokentap's own time per call: microseconds to tens of milliseconds.
const OVERHEAD_BUCKETS: [f64; 14] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25,
];

pub const OTHER: &str = "__other__";
/// The `user` label of a chat call whose request named no user.
pub const UNATTRIBUTED: &str = "__unattributed__";

/// Token types of `tokentap_tokens_total`: disjoint, so their sum is the calls' total tokens.
const TOKEN_TYPES: [&str; 5] = [
    "input",
    "cached_input",
    "cache_write_input",
    "output",
    "reasoning",
];

/// (model label, user label or provider, API or operation name): a series' key.
type SeriesKey = (Arc<str>, Arc<str>, &'static str);

/// The `api` label of a call (empty for unmetered ones).
fn api_label(api: Option<Api>) -> &'static str {
    api.map_or("", Api::as_str)
}

/// The `method` label of an unmetered request: the standard methods, else `other`.
fn method_label(m: &str) -> &'static str {
    const METHODS: [&str; 8] = [
        "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT",
    ];
    METHODS
        .into_iter()
        .find(|x| x.eq_ignore_ascii_case(m))
        .unwrap_or("other")
}

/// Kinds of `tokentap_upstream_errors_total`.
const UPSTREAM_ERROR_KINDS: [&str; 5] = [
    "status_4xx",
    "status_5xx",
    "unreachable",
    "reset",
    "timeout",
];

/// Maps client-supplied values to bounded label values.
struct Labels {
    cfg: MetricsConfig,
    allow: HashSet<String>,
    priced: HashSet<String>,
    users: DashMap<String, Arc<str>>,
    user_count: AtomicUsize,
    models: DashMap<String, Arc<str>>,
    model_count: AtomicUsize,
    other: Arc<str>,
    empty: Arc<str>,
    unattributed: Arc<str>,
}

impl Labels {
    fn new(cfg: &MetricsConfig) -> Self {
        Labels {
            allow: cfg.users.iter().cloned().collect(),
            priced: cfg.priced_models.iter().cloned().collect(),
            cfg: cfg.clone(),
            users: DashMap::new(),
            user_count: AtomicUsize::new(0),
            models: DashMap::new(),
            model_count: AtomicUsize::new(0),
            other: Arc::from(OTHER),
            empty: Arc::from(""),
            unattributed: Arc::from(UNATTRIBUTED),
        }
    }

    fn bounded(
        &self,
        map: &DashMap<String, Arc<str>>,
        count: &AtomicUsize,
        max: usize,
        key: &str,
        value: impl FnOnce() -> String,
    ) -> Arc<str> {
        if let Some(v) = map.get(key) {
            return Arc::clone(v.value());
        }
        if count.fetch_add(1, Ordering::Relaxed) >= max {
            count.fetch_sub(1, Ordering::Relaxed);
            return Arc::clone(&self.other);
        }
        let v: Arc<str> = Arc::from(value());
        Arc::clone(map.entry(key.to_string()).or_insert(v).value())
    }

    fn user(&self, user: Option<&str>, chat: bool) -> Arc<str> {
        let Some(u) = user else {
            return if chat {
                Arc::clone(&self.unattributed)
            } else {
                Arc::clone(&self.empty)
            };
        };
        let max = self.cfg.max_users;
        match self.cfg.user_label {
            UserLabel::None => Arc::clone(&self.empty),
            UserLabel::All => self.bounded(&self.users, &self.user_count, max, u, || escape(u)),
            UserLabel::Hash => self.bounded(&self.users, &self.user_count, max, u, || {
                hash_user(&self.cfg.hash_salt, u)
            }),
            UserLabel::Allowlist => {
                if self.allow.contains(u) {
                    self.bounded(&self.users, &self.user_count, usize::MAX, u, || escape(u))
                } else {
                    Arc::clone(&self.other)
                }
            }
        }
    }

    /// Models of the price table always get their own label; other names (clients can send
    /// anything) share `max_models`.
    fn model(&self, model: Option<&str>) -> Arc<str> {
        match model {
            None => Arc::clone(&self.empty),
            Some(m) if self.priced.contains(m) => {
                // Not counted against the cap (a throwaway counter).
                self.bounded(&self.models, &AtomicUsize::new(0), usize::MAX, m, || {
                    escape(m)
                })
            }
            Some(m) => self.bounded(
                &self.models,
                &self.model_count,
                self.cfg.max_models,
                m,
                || escape(m),
            ),
        }
    }
}

/// A user id as labels show it under `user_label = "hash"`: salted, not reversible from a
/// list of ids.
pub fn hash_user(salt: &str, u: &str) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(salt.as_bytes());
    h.update([0]);
    h.update(u.as_bytes());
    h.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The caller as traces show it (`user.id`): hashed when the label policy hashes users.
pub fn user_id(cfg: &MetricsConfig, u: &str) -> String {
    match cfg.user_label {
        UserLabel::Hash => hash_user(&cfg.hash_salt, u),
        _ => u.to_string(),
    }
}

/// A client-supplied label value, made unable to pose as a reserved one (`__other__`,
/// `__unattributed__`) or as the empty value: values starting with `__` get one more `_`,
/// and the empty string becomes `__empty__`. The mapping is one-to-one.
pub fn escape(v: &str) -> String {
    if v.is_empty() {
        "__empty__".to_string()
    } else if v.starts_with("__") {
        format!("_{v}")
    } else {
        v.to_string()
    }
}

/// Children per (model, user).
#[derive(Default)]
struct ByUser {
    /// (status code, outcome) -> count
    requests: DashMap<(u16, Outcome), AtomicU64>,
    tokens: [AtomicU64; 5],
    cost_pico: AtomicU64,
    web_searches: AtomicU64,
}

/// Children per model.
struct ByModel {
    provider: String,
    /// error type ("" for success) -> histogram
    duration: DashMap<String, Histogram>,
    /// input, output
    token_usage: [Histogram; 2],
    ttft: Histogram,
    tpot: Histogram,
    estimated: AtomicU64,
}

fn histogram(buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new("h", "h").buckets(buckets.to_vec()))
        .expect("valid buckets")
}

impl ByModel {
    fn new(provider: &str) -> Self {
        ByModel {
            provider: provider.to_string(),
            duration: DashMap::new(),
            token_usage: [histogram(&TOKEN_BUCKETS), histogram(&TOKEN_BUCKETS)],
            ttft: histogram(&TTFT_BUCKETS),
            tpot: histogram(&TPOT_BUCKETS),
            estimated: AtomicU64::new(0),
        }
    }
}

pub struct CallMetrics {
    labels: ArcSwap<Labels>,
    by_user: DashMap<SeriesKey, Arc<ByUser>>,
    /// (method, path class) -> requests no dialect meters.
    unmetered: DashMap<(&'static str, &'static str), AtomicU64>,
    /// By (model label, provider): each series' provider is its records' (a reload that
    /// renames a provider starts new series; models counted as `__other__` keep theirs apart).
    by_model: DashMap<SeriesKey, Arc<ByModel>>,
    upstream_errors: [AtomicU64; 5],
    overhead: Histogram,
    /// (user label, team, reason) -> budget refusals
    rejections: DashMap<(Arc<str>, String, &'static str), AtomicU64>,
    /// (user label, limit) -> calls refused by a rate limit
    rate_limited: DashMap<(Arc<str>, &'static str), AtomicU64>,
    /// Calls let through unchecked because the budget store was down (fail_open).
    fail_open: AtomicU64,
    /// (user label, team, window) -> soft thresholds passed
    soft: DashMap<(Arc<str>, String, String), AtomicU64>,
    /// Calls between their request head and their record (`tokentap_requests_in_flight`).
    pub in_flight: Arc<AtomicI64>,
    /// Streams whose response is being relayed (`tokentap_streams_active`).
    pub streams_active: Arc<AtomicI64>,
    /// The metered calls in flight, for the admin page.
    pub live: Arc<super::live::LiveCalls>,
    descs: Vec<Desc>,
}

/// (name, help, type, label names) of every family this collector exposes.
const FAMILIES: [(&str, &str, MetricType, &[&str]); 18] = [
    ("gen_ai_client_operation_duration_seconds", "Duration of metered calls as the client saw them, by operation, model and error type.", MetricType::HISTOGRAM, &["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "error_type"]),
    ("gen_ai_client_token_usage", "Tokens per metered call (input includes cached and cache-write tokens; output includes reasoning tokens).", MetricType::HISTOGRAM, &["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_token_type"]),
    ("gen_ai_server_time_to_first_token_seconds", "Time to the first content token of streamed chat calls.", MetricType::HISTOGRAM, &["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]),
    ("gen_ai_server_time_per_output_token_seconds", "Time per output token after the first, of streamed chat calls.", MetricType::HISTOGRAM, &["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]),
    ("tokentap_requests_total", "Calls through tokentap by model, user, API (empty: unmetered), status code and outcome.", MetricType::COUNTER, &["model", "user", "api", "status_code", "outcome"]),
    ("tokentap_tokens_total", "Tokens by model, user, API and type (disjoint types: input excludes cached_input and cache_write_input, output excludes reasoning).", MetricType::COUNTER, &["model", "user", "api", "type"]),
    ("tokentap_cost_usd_total", "Cost in USD from the price table, by model, user and API.", MetricType::COUNTER, &["model", "user", "api"]),
    ("tokentap_web_searches_total", "Web searches the upstream ran, by model, user and API.", MetricType::COUNTER, &["model", "user", "api"]),
    ("tokentap_usage_estimated_total", "Chat calls whose usage was estimated (cut off before the upstream reported it).", MetricType::COUNTER, &["model"]),
    ("tokentap_upstream_errors_total", "Calls the upstream failed, by kind.", MetricType::COUNTER, &["kind"]),
    ("tokentap_overhead_seconds", "Time spent inside tokentap per call (its own request, response and recording work), excluding the upstream and the client.", MetricType::HISTOGRAM, &[]),
    ("tokentap_requests_in_flight", "Calls in progress.", MetricType::GAUGE, &[]),
    ("tokentap_streams_active", "Streamed responses being relayed.", MetricType::GAUGE, &[]),
    ("tokentap_budget_rejections_total", "Calls refused by the budgets, by user, team (empty for a user cap) and reason (usd, tokens, user_required, invalid_body, store_unavailable).", MetricType::COUNTER, &["user", "team", "reason"]),
    ("tokentap_budget_fail_open_total", "Calls let through without a budget check because the budget store was unreachable (on_error = fail_open).", MetricType::COUNTER, &[]),
    ("tokentap_budget_soft_threshold_crossed_total", "Times settled spend passed a soft threshold, by user (or team, for a team cap) and window.", MetricType::COUNTER, &["user", "team", "window"]),
    ("tokentap_unmetered_requests_total", "Requests forwarded unmetered (no metered API serves their path), by method and path class.", MetricType::COUNTER, &["method", "path_class"]),
    ("tokentap_rate_limited_total", "Calls refused by a rate limit, by user and limit (requests_per_minute, tokens_per_minute, concurrent).", MetricType::COUNTER, &["user", "limit"]),
];

impl CallMetrics {
    pub fn new(cfg: &MetricsConfig) -> Arc<Self> {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _, labels)| {
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    labels.iter().map(|l| l.to_string()).collect(),
                    Default::default(),
                )
                .expect("valid metric description")
            })
            .collect();
        Arc::new(CallMetrics {
            labels: ArcSwap::from_pointee(Labels::new(cfg)),
            by_user: DashMap::new(),
            unmetered: DashMap::new(),
            by_model: DashMap::new(),
            upstream_errors: Default::default(),
            overhead: histogram(&OVERHEAD_BUCKETS),
            rejections: DashMap::new(),
            rate_limited: DashMap::new(),
            fail_open: AtomicU64::new(0),
            soft: DashMap::new(),
            in_flight: Arc::new(AtomicI64::new(0)),
            streams_active: Arc::new(AtomicI64::new(0)),
            live: Arc::default(),
            descs,
        })
    }

    fn observe(&self, r: &UsageRecord) {
        let labels = self.labels.load();
        let model = labels.model(r.model.as_deref());
        let mut user = labels.user(r.user.as_deref(), r.metered());
        let api = api_label(r.api);
        let max_series = labels.cfg.max_series;
        let other = Arc::clone(&labels.other);
        drop(labels);

        let by_user = match self
            .by_user
            .get(&(Arc::clone(&model), Arc::clone(&user), api))
        {
            Some(e) => Arc::clone(e.value()),
            None => {
                // Each label is capped, and so is their product.
                if self.by_user.len() >= max_series {
                    user = other;
                }
                Arc::clone(
                    self.by_user
                        .entry((Arc::clone(&model), Arc::clone(&user), api))
                        .or_default()
                        .value(),
                )
            }
        };
        match by_user.requests.get(&(r.status, r.outcome)) {
            Some(c) => c.fetch_add(1, Ordering::Relaxed),
            None => by_user
                .requests
                .entry((r.status, r.outcome))
                .or_default()
                .fetch_add(1, Ordering::Relaxed),
        };
        let u = &r.usage;
        let cached = u.cached.min(u.prompt);
        let written = u.cache_write.min(u.prompt - cached);
        let reasoning = u.reasoning.min(u.completion);
        for (c, v) in by_user.tokens.iter().zip([
            u.prompt - cached - written,
            cached,
            written,
            u.completion - reasoning,
            reasoning,
        ]) {
            c.fetch_add(v, Ordering::Relaxed);
        }
        if let Some(cost) = r.cost {
            by_user.cost_pico.fetch_add(cost.0, Ordering::Relaxed);
        }
        by_user
            .web_searches
            .fetch_add(u.web_searches, Ordering::Relaxed);

        if let Some(kind) = upstream_error_kind(r) {
            self.upstream_errors[kind].fetch_add(1, Ordering::Relaxed);
        }

        let Some(call_api) = r.api else {
            let key = (method_label(&r.method), r.path_class);
            match self.unmetered.get(&key) {
                Some(c) => c.fetch_add(1, Ordering::Relaxed),
                None => self
                    .unmetered
                    .entry(key)
                    .or_default()
                    .fetch_add(1, Ordering::Relaxed),
            };
            return;
        };
        let provider: Arc<str> = r.provider.clone().unwrap_or_else(|| Arc::from(""));
        let key = (model, provider, call_api.operation());
        let by_model = match self.by_model.get(&key) {
            Some(e) => Arc::clone(e.value()),
            None => Arc::clone(
                self.by_model
                    .entry(key.clone())
                    .or_insert_with(|| Arc::new(ByModel::new(&key.1)))
                    .value(),
            ),
        };
        let error_type = error_type(r);
        match by_model.duration.get(error_type.as_str()) {
            Some(h) => h.observe(r.duration.as_secs_f64()),
            None => by_model
                .duration
                .entry(error_type)
                .or_insert_with(|| histogram(&DURATION_BUCKETS))
                .observe(r.duration.as_secs_f64()),
        }
        if r.usage_source != UsageSource::None {
            by_model.token_usage[0].observe(u.prompt as f64);
            by_model.token_usage[1].observe(u.completion as f64);
        }
        if r.usage_source == UsageSource::Estimated {
            by_model.estimated.fetch_add(1, Ordering::Relaxed);
        }
        if r.stream && r.outcome == Outcome::Complete {
            if let Some(ttft) = r.ttft {
                by_model.ttft.observe(ttft.as_secs_f64());
            }
            if let (Some(generation), true) = (r.generation, u.completion > 1) {
                by_model
                    .tpot
                    .observe(generation.as_secs_f64() / (u.completion - 1) as f64);
            }
        }
    }

    /// Counts a refusal by the budgets: `reason` is [`crate::budget::Refusal::reason`].
    pub fn budget_rejected(&self, user: Option<&str>, team: &str, reason: &'static str) {
        let user = self.labels.load().user(user, true);
        self.rejections
            .entry((user, team.to_string(), reason))
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a call refused by a rate limit (`limit`: requests_per_minute, ...).
    pub fn rate_limited(&self, user: Option<&str>, limit: &'static str) {
        let user = self.labels.load().user(user, true);
        self.rate_limited
            .entry((user, limit))
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a call let through unchecked because the budget store was down.
    pub fn budget_fail_open(&self) {
        self.fail_open.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a soft threshold passed by a ledger key (`user:…` or `team:…`).
    pub fn soft_threshold_crossed(&self, key: &str, window: &str) {
        let (user, team) = match key.split_once(':') {
            Some(("team", t)) => (self.labels.load().user(None, false), t.to_string()),
            Some((_, u)) => (self.labels.load().user(Some(u), true), String::new()),
            None => return,
        };
        self.soft
            .entry((user, team, window.to_string()))
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Records tokentap's own time for one call.
    pub fn observe_overhead(&self, seconds: f64) {
        self.overhead.observe(seconds);
    }
}

/// `error_type`: empty for a successful call, else the upstream's status code or how the call
/// ended (a small, fixed set).
fn error_type(r: &UsageRecord) -> String {
    match r.outcome {
        Outcome::Complete => String::new(),
        Outcome::UpstreamError | Outcome::Rejected if r.status > 0 => r.status.to_string(),
        o => o.as_str().to_string(),
    }
}

/// Index into `UPSTREAM_ERROR_KINDS`: an error status the upstream answered with, an
/// upstream tokentap could not reach, a broken connection, or a timeout.
fn upstream_error_kind(r: &UsageRecord) -> Option<usize> {
    match (r.outcome, r.upstream_status) {
        (Outcome::UpstreamError, Some(s)) if (400..500).contains(&s) => Some(0),
        (Outcome::UpstreamError, Some(_)) => Some(1),
        (Outcome::UpstreamError, None) => Some(2),
        (Outcome::UpstreamReset, _) => Some(3),
        (Outcome::Timeout, _) => Some(4),
        _ => None,
    }
}

impl Sink for Arc<CallMetrics> {
    fn record(&self, rec: &Arc<UsageRecord>) {
        self.observe(rec);
    }

    fn reconfigure(&self, cfg: &Config) {
        let current = self.labels.load();
        if current.cfg == cfg.metrics {
            return;
        }
        let only_prices = MetricsConfig {
            priced_models: cfg.metrics.priced_models.clone(),
            ..current.cfg.clone()
        } == cfg.metrics;
        if only_prices {
            // Only the price table changed: newly priced models get their labels from now on.
            let mut l = Labels::new(&cfg.metrics);
            l.users = current.users.clone();
            l.user_count = AtomicUsize::new(current.user_count.load(Ordering::Relaxed));
            l.models = current.models.clone();
            l.model_count = AtomicUsize::new(current.model_count.load(Ordering::Relaxed));
            self.labels.store(Arc::new(l));
            return;
        }
        // A new labelling policy: the series labelled under the old one go (Prometheus reads
        // the restart of their counters as a reset), so that, say, raw user names do not stay
        // exported after switching to hashed ones.
        self.labels.store(Arc::new(Labels::new(&cfg.metrics)));
        self.by_user.clear();
        self.by_model.clear();
    }
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

fn counter(labels: Vec<LabelPair>, v: f64) -> proto::Metric {
    let mut c = proto::Counter::default();
    c.set_value(v);
    let mut m = proto::Metric::default();
    m.set_label(labels);
    m.set_counter(c);
    m
}

fn gauge(labels: Vec<LabelPair>, v: f64) -> proto::Metric {
    let mut g = proto::Gauge::default();
    g.set_value(v);
    let mut m = proto::Metric::default();
    m.set_label(labels);
    m.set_gauge(g);
    m
}

fn hist(labels: Vec<LabelPair>, h: &Histogram) -> proto::Metric {
    let mut m = prometheus::core::Metric::metric(h);
    m.set_label(labels);
    m
}

/// The registry's handle on the call metrics.
pub struct CallCollector(pub Arc<CallMetrics>);

impl Collector for CallCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

impl Collector for CallMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut fams: Vec<MetricFamily> = FAMILIES
            .iter()
            .map(|(name, help, kind, _)| {
                let mut f = MetricFamily::default();
                f.set_name(name.to_string());
                f.set_help(help.to_string());
                f.set_field_type(*kind);
                f
            })
            .collect();
        for e in self.by_model.iter() {
            let ((model, _, operation), m) = (e.key(), e.value());
            let base = || {
                vec![
                    label("gen_ai_operation_name", operation),
                    label("gen_ai_provider_name", &m.provider),
                    label("gen_ai_request_model", model),
                ]
            };
            for d in m.duration.iter() {
                let mut l = base();
                l.push(label("error_type", d.key()));
                fams[0].mut_metric().push(hist(l, d.value()));
            }
            for (h, t) in m.token_usage.iter().zip(["input", "output"]) {
                if h.get_sample_count() > 0 {
                    let mut l = base();
                    l.push(label("gen_ai_token_type", t));
                    fams[1].mut_metric().push(hist(l, h));
                }
            }
            if m.ttft.get_sample_count() > 0 {
                fams[2].mut_metric().push(hist(base(), &m.ttft));
            }
            if m.tpot.get_sample_count() > 0 {
                fams[3].mut_metric().push(hist(base(), &m.tpot));
            }
            fams[8].mut_metric().push(counter(
                vec![label("model", model)],
                m.estimated.load(Ordering::Relaxed) as f64,
            ));
        }
        for e in self.by_user.iter() {
            let ((model, user, api), u) = (e.key(), e.value());
            let mu = || {
                vec![
                    label("model", model),
                    label("user", user),
                    label("api", api),
                ]
            };
            for r in u.requests.iter() {
                let (status, outcome) = r.key();
                let mut l = mu();
                l.push(label("status_code", &status.to_string()));
                l.push(label("outcome", outcome.as_str()));
                fams[4]
                    .mut_metric()
                    .push(counter(l, r.value().load(Ordering::Relaxed) as f64));
            }
            for (c, t) in u.tokens.iter().zip(TOKEN_TYPES) {
                let mut l = mu();
                l.push(label("type", t));
                fams[5]
                    .mut_metric()
                    .push(counter(l, c.load(Ordering::Relaxed) as f64));
            }
            // Exact: an integer sum of pico-USD, divided once here.
            let pico = u.cost_pico.load(Ordering::Relaxed);
            fams[6].mut_metric().push(counter(mu(), pico as f64 / 1e12));
            fams[7]
                .mut_metric()
                .push(counter(mu(), u.web_searches.load(Ordering::Relaxed) as f64));
        }
        for (c, kind) in self.upstream_errors.iter().zip(UPSTREAM_ERROR_KINDS) {
            fams[9].mut_metric().push(counter(
                vec![label("kind", kind)],
                c.load(Ordering::Relaxed) as f64,
            ));
        }
        fams[10].mut_metric().push(hist(Vec::new(), &self.overhead));
        fams[11].mut_metric().push(gauge(
            Vec::new(),
            self.in_flight.load(Ordering::Relaxed) as f64,
        ));
        fams[12].mut_metric().push(gauge(
            Vec::new(),
            self.streams_active.load(Ordering::Relaxed) as f64,
        ));
        for r in self.rejections.iter() {
            let (user, team, reason) = r.key();
            fams[13].mut_metric().push(counter(
                vec![
                    label("user", user),
                    label("team", team),
                    label("reason", reason),
                ],
                r.value().load(Ordering::Relaxed) as f64,
            ));
        }
        fams[14].mut_metric().push(counter(
            Vec::new(),
            self.fail_open.load(Ordering::Relaxed) as f64,
        ));
        for r in self.soft.iter() {
            let (user, team, window) = r.key();
            fams[15].mut_metric().push(counter(
                vec![
                    label("user", user),
                    label("team", team),
                    label("window", window),
                ],
                r.value().load(Ordering::Relaxed) as f64,
            ));
        }
        for r in self.unmetered.iter() {
            let (method, class) = r.key();
            fams[16].mut_metric().push(counter(
                vec![label("method", method), label("path_class", class)],
                r.value().load(Ordering::Relaxed) as f64,
            ));
        }
        for r in self.rate_limited.iter() {
            let (user, limit) = r.key();
            fams[17].mut_metric().push(counter(
                vec![label("user", user), label("limit", limit)],
                r.value().load(Ordering::Relaxed) as f64,
            ));
        }
        fams.retain(|f| !f.get_metric().is_empty());
        fams
    }
}

// ---- `[metrics]`: this sink's section of the config ----

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

/// How metrics label calls; bounds the number of series whatever clients send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub user_label: UserLabel,
    pub max_users: usize,
    pub users: Vec<String>,
    pub max_models: usize,
    pub max_series: usize,
    pub hash_salt: String,
    /// Models of the price table: always labelled, never counted against `max_models`.
    pub priced_models: Vec<String>,
}

/// Checks `[metrics]`; the price table's models are always labelled. An error names its key.
pub fn compile(
    raw: RawMetrics,
    pricing: &crate::meter::pricing::PriceTable,
) -> Result<MetricsConfig, (&'static str, String)> {
    if raw.user_label == UserLabel::Allowlist && raw.users.is_empty() {
        return Err((
            "metrics.users",
            "user_label = \"allowlist\" needs the list of users to label".into(),
        ));
    }
    let mut priced_models: Vec<String> = pricing.model_names().map(str::to_string).collect();
    priced_models.sort();
    Ok(MetricsConfig {
        user_label: raw.user_label,
        max_users: raw.max_users,
        users: raw.users,
        max_models: raw.max_models,
        max_series: raw.max_series,
        hash_salt: raw.hash_salt,
        priced_models,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(user_label: UserLabel, max_users: usize, users: &[&str]) -> MetricsConfig {
        MetricsConfig {
            user_label,
            max_users,
            users: users.iter().map(|u| u.to_string()).collect(),
            max_models: 2,
            max_series: 1000,
            hash_salt: String::new(),
            priced_models: vec!["priced/x".into()],
        }
    }

    #[test]
    fn clients_cannot_pose_as_reserved_label_values() {
        let l = Labels::new(&cfg(UserLabel::All, 100, &[]));
        assert_eq!(&*l.user(Some("__other__"), true), "___other__");
        assert_eq!(
            &*l.user(Some("__unattributed__"), true),
            "___unattributed__"
        );
        assert_eq!(&*l.user(Some(""), true), "__empty__");
        assert_eq!(&*l.user(Some("_x"), true), "_x");
    }

    #[test]
    fn priced_models_are_never_folded() {
        let l = Labels::new(&cfg(UserLabel::All, 100, &[]));
        for junk in ["a", "b", "c", "d"] {
            l.model(Some(junk));
        }
        assert_eq!(&*l.model(Some("e")), OTHER);
        assert_eq!(&*l.model(Some("priced/x")), "priced/x");
    }

    #[test]
    fn users_beyond_the_cap_fold_into_other() {
        let l = Labels::new(&cfg(UserLabel::All, 2, &[]));
        assert_eq!(&*l.user(Some("a"), true), "a");
        assert_eq!(&*l.user(Some("b"), true), "b");
        assert_eq!(&*l.user(Some("c"), true), OTHER);
        assert_eq!(
            &*l.user(Some("a"), true),
            "a",
            "known users keep their label"
        );
        assert_eq!(&*l.user(None, true), UNATTRIBUTED);
        assert_eq!(&*l.user(None, false), "");
        assert_eq!(&*l.model(Some("m1")), "m1");
        assert_eq!(&*l.model(Some("m2")), "m2");
        assert_eq!(&*l.model(Some("m3")), OTHER);
    }

    #[test]
    fn hashed_allowlisted_and_absent_users() {
        let l = Labels::new(&cfg(UserLabel::Hash, 10, &[]));
        let h = l.user(Some("alice@example.com"), true);
        assert_eq!(h.len(), 12);
        assert!(!h.contains("alice"));
        assert_eq!(l.user(Some("alice@example.com"), true), h);
        let l = Labels::new(&cfg(UserLabel::Allowlist, 1, &["vip", "ops"]));
        assert_eq!(&*l.user(Some("vip"), true), "vip");
        assert_eq!(&*l.user(Some("ops"), true), "ops", "the list is not capped");
        assert_eq!(&*l.user(Some("mallory"), true), OTHER);
        let l = Labels::new(&cfg(UserLabel::None, 10, &[]));
        assert_eq!(&*l.user(Some("alice"), true), "");
    }

    fn record(model: &str, user: &str, cost: u64) -> UsageRecord {
        UsageRecord {
            model: Some(model.into()),
            user: Some(user.into()),
            cost: Some(crate::meter::Pico(cost)),
            ..UsageRecord::test_chat()
        }
    }

    #[test]
    fn label_sets_that_concatenate_alike_stay_apart() {
        let m = CallMetrics::new(&cfg(UserLabel::All, 100, &[]));
        m.observe(&record("a", "bc", 1));
        m.observe(&record("ab", "c", 2));
        let cost = m
            .collect()
            .into_iter()
            .find(|f| f.name() == "tokentap_cost_usd_total")
            .unwrap();
        assert_eq!(cost.get_metric().len(), 2, "two label sets, two series");
    }

    #[test]
    fn token_types_are_disjoint_and_sum_to_the_total() {
        let m = CallMetrics::new(&cfg(UserLabel::All, 100, &[]));
        m.observe(&record("a", "u", 1));
        let toks = m
            .collect()
            .into_iter()
            .find(|f| f.name() == "tokentap_tokens_total")
            .unwrap();
        let sum: f64 = toks
            .get_metric()
            .iter()
            .map(|x| x.get_counter().get_value())
            .sum();
        assert_eq!(sum, 15.0);
    }
}
