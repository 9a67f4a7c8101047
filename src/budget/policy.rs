//! Budget policy: who may spend how much, per which window. Part of the config snapshot, so
//! it reloads with it; spend so far lives in the ledger and survives reloads.
//!
//! ```toml
//! [budgets]
//! missing_user = "reject"          # or "default_user" (charged to default_user), "allow"
//! [budgets.default]                # caps of any user without caps of their own
//! daily = { usd = 5.00, soft_usd = 4.00 }
//! monthly = { usd = 50.00, tokens = 20000000 }
//! [budgets.users.alice]
//! monthly = { usd = 200.00 }
//! [budgets.teams.research]
//! members = ["alice", "bob"]
//! caps = { monthly = { usd = 500.00 } }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;

use chrono::{
    Datelike, Duration as ChronoDuration, FixedOffset, LocalResult, NaiveDate, Offset, TimeZone,
};
use serde::Deserialize;

use crate::meter::Pico;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudgets {
    #[serde(default)]
    pub missing_user: MissingUser,
    /// Who is charged when `missing_user = "default_user"`.
    #[serde(default = "default_user")]
    pub default_user: String,
    /// Calendar windows start at midnight in this UTC offset, e.g. "+02:00" (default UTC).
    #[serde(default)]
    pub utc_offset: Option<String>,
    /// ... or in this IANA time zone, e.g. "Europe/Berlin" (midnights follow DST).
    #[serde(default)]
    pub time_zone: Option<String>,
    /// The output a request is assumed to produce when it sets no max_tokens and its model
    /// has no `max_output_tokens` price entry.
    #[serde(default = "default_max_output")]
    pub default_max_output_tokens: u64,
    /// Searches assumed for a request offering the web search tool, when its
    /// `max_searches` is not given.
    #[serde(default = "default_max_searches")]
    pub default_max_searches: u64,
    #[serde(default)]
    pub default: Option<BTreeMap<String, RawCap>>,
    #[serde(default)]
    pub users: BTreeMap<String, BTreeMap<String, RawCap>>,
    #[serde(default)]
    pub teams: BTreeMap<String, RawTeam>,
    #[serde(default)]
    pub ledger: RawLedger,
    /// Rate limits (requests and tokens per minute, calls in flight).
    #[serde(default)]
    pub limits: super::limits::RawLimits,
    /// Budget alerts: thresholds and webhooks.
    #[serde(default)]
    pub alerts: super::alerts::RawAlerts,
}

fn default_user() -> String {
    "anonymous".into()
}
fn default_max_output() -> u64 {
    4096
}
fn default_max_searches() -> u64 {
    5
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingUser {
    /// 400: the request must name its user.
    #[default]
    Reject,
    /// Charged to `default_user`.
    DefaultUser,
    /// Let through, unattributed and uncapped.
    Allow,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTeam {
    pub members: Vec<String>,
    #[serde(default)]
    pub caps: BTreeMap<String, RawCap>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCap {
    /// Hard cap in USD: a call that could pass it is refused.
    pub usd: Option<UsdValue>,
    /// Hard cap in tokens (prompt + completion).
    pub tokens: Option<u64>,
    /// Soft threshold in USD: passing it is signalled (log, metric), not refused.
    pub soft_usd: Option<UsdValue>,
    pub soft_tokens: Option<u64>,
    /// Fractions of the cap that raise an alert when spend passes them (default:
    /// `budgets.alerts.thresholds`).
    pub alerts: Option<Vec<f64>>,
}

/// A USD amount: a TOML number or a decimal string (the price table's type).
pub use crate::meter::pricing::Usd as UsdValue;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLedger {
    pub backend: Backend,
    /// The embedded ledger's file (relative to the config file).
    pub path: PathBuf,
    /// Settled spend reaches the file at least this often (what a crash can lose).
    pub flush_interval_ms: u64,
    /// Per-call rows older than this are deleted (aggregates are kept).
    pub retention_days: u64,
    /// The Redis server of the "redis" backend, e.g. "redis://127.0.0.1:6379/0".
    pub redis_url: Option<String>,
    /// Prefix of the ledger's Redis keys (several deployments can share one Redis).
    pub redis_prefix: String,
    /// When the store cannot be reached.
    pub on_error: OnError,
    /// The Redis backend's reservations are leases of this length, renewed every third of it
    /// while their call runs: a replica that dies (or loses a reply) mid-call cannot keep its
    /// callers' budget blocked for longer.
    pub reservation_ttl_s: u64,
    /// A Redis round trip longer than this counts as Redis being down (`on_error` applies).
    pub redis_timeout_ms: u64,
    /// standalone (`redis_url`), sentinel or cluster (`redis_nodes`).
    pub redis_mode: crate::budget::redis::Mode,
    /// Sentinel: the Sentinels' addresses; cluster: seed nodes ("host:port", or
    /// "rediss://host:port" for TLS).
    pub redis_nodes: Vec<String>,
    /// Sentinel: the name the Sentinels monitor the master under.
    pub redis_sentinel_master: Option<String>,
    /// Environment variables holding the ACL user and password (over the URL's).
    pub redis_username_env: Option<String>,
    pub redis_password_env: Option<String>,
    /// Environment variable holding the Sentinels' own password.
    pub redis_sentinel_password_env: Option<String>,
    /// TLS: trust this CA (PEM) instead of the system's roots; a client certificate and key
    /// (PEM) for mutual TLS. Relative to the config file.
    pub redis_ca_file: Option<PathBuf>,
    pub redis_client_cert_file: Option<PathBuf>,
    pub redis_client_key_file: Option<PathBuf>,
}

/// `budgets.ledger.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// A SQLite file: no service; spend survives restarts.
    Embedded,
    /// Redis: caps shared by every replica using it.
    Redis,
}

/// `budgets.ledger.on_error`: what calls get while the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Let through uncapped (and counted).
    FailOpen,
    /// Refused with 503.
    FailClosed,
}

impl Default for RawLedger {
    fn default() -> Self {
        RawLedger {
            backend: Backend::Embedded,
            path: PathBuf::from("tokentap-ledger.db"),
            flush_interval_ms: 500,
            retention_days: 90,
            redis_url: None,
            redis_prefix: "tokentap".into(),
            on_error: OnError::FailClosed,
            reservation_ttl_s: 900,
            redis_timeout_ms: 500,
            redis_mode: Default::default(),
            redis_nodes: Vec::new(),
            redis_sentinel_master: None,
            redis_username_env: None,
            redis_password_env: None,
            redis_sentinel_password_env: None,
            redis_ca_file: None,
            redis_client_cert_file: None,
            redis_client_key_file: None,
        }
    }
}

/// A budget window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Window {
    Hourly,
    Daily,
    /// ISO weeks, starting on Monday.
    Weekly,
    Monthly,
    /// Never resets.
    Total,
    /// Fixed-length windows aligned to the Unix epoch, e.g. `"30s"`, `"15m"`.
    Every(u64),
}

impl Window {
    pub fn parse(s: &str) -> Result<Window, String> {
        Ok(match s {
            "hourly" => Window::Hourly,
            "daily" => Window::Daily,
            "weekly" => Window::Weekly,
            "monthly" => Window::Monthly,
            "total" => Window::Total,
            other => {
                // Split off the last character (not byte: the input may be any text).
                let Some(unit_char) = other.chars().last() else {
                    return Err(window_error(other));
                };
                let (num, unit) = other.split_at(other.len() - unit_char.len_utf8());
                let n: u64 = num.parse().map_err(|_| window_error(other))?;
                let secs = match unit {
                    "s" => n,
                    "m" => n * 60,
                    "h" => n * 3600,
                    _ => return Err(window_error(other)),
                };
                if secs == 0 {
                    return Err(window_error(other));
                }
                Window::Every(secs)
            }
        })
    }

    /// The longest a window of this kind lasts (a DST day is 25 hours), `None` for `total`.
    pub fn max_len(&self) -> Option<i64> {
        const H: i64 = 3600;
        match self {
            Window::Hourly => Some(H),
            Window::Daily => Some(25 * H),
            Window::Weekly => Some(7 * 24 * H + H),
            Window::Monthly => Some(31 * 24 * H + H),
            Window::Total => None,
            Window::Every(s) => Some(i64::try_from(*s).unwrap_or(i64::MAX)),
        }
    }

    /// The window's name as configured (and as used in metrics and the ledger).
    pub fn name(&self) -> String {
        match self {
            Window::Hourly => "hourly".into(),
            Window::Daily => "daily".into(),
            Window::Weekly => "weekly".into(),
            Window::Monthly => "monthly".into(),
            Window::Total => "total".into(),
            Window::Every(s) => format!("{s}s"),
        }
    }

    /// Start and end (Unix seconds) of the window containing `now` in `zone`; `end` is
    /// `i64::MAX` for `Total`.
    ///
    /// A call asks for the same few windows several times (reserve, settle, the spend
    /// report), each a calendar computation of ~500 instructions, and in a fixed-offset zone
    /// the answer only changes when a window ends; so the last answers are kept per thread and
    /// reused while `now` is inside them (`bounds_uncached` is the computation). Not in a
    /// named zone: where its offset changes by a fraction of an hour (Lord Howe's 30 minutes),
    /// the hours before and after the change overlap, and which one `now` falls in depends on
    /// the offset at `now`, not on a window already found. Nor `total` and fixed lengths
    /// (plain arithmetic), nor moments outside ±2⁴⁰ s (chrono's range ends near ±2⁴² s,
    /// where the computation falls back to answers that depend on `now`).
    pub fn bounds(&self, now: i64, zone: Zone) -> (i64, i64) {
        let calendar = matches!(
            self,
            Window::Hourly | Window::Daily | Window::Weekly | Window::Monthly
        );
        if !calendar || matches!(zone, Zone::Named(_)) || now.unsigned_abs() >= 1 << 40 {
            return self.bounds_uncached(now, zone);
        }
        thread_local! {
            static LAST: std::cell::Cell<[Option<KeptBounds>; BOUNDS_KEPT]> =
                const { std::cell::Cell::new([None; BOUNDS_KEPT]) };
        }
        LAST.with(|last| {
            let mut kept = last.get();
            for (w, z, start, end) in kept.iter().flatten() {
                if w == self && *z == zone && *start <= now && now < *end {
                    return (*start, *end);
                }
            }
            let (start, end) = self.bounds_uncached(now, zone);
            // Only a window that contains `now` can answer for other moments.
            if start <= now && now < end {
                kept.rotate_right(1);
                kept[0] = Some((*self, zone, start, end));
                last.set(kept);
            }
            (start, end)
        })
    }

    fn bounds_uncached(&self, now: i64, zone: Zone) -> (i64, i64) {
        match zone {
            Zone::Fixed(z) => self.bounds_in(now, &z),
            Zone::Named(z) => self.bounds_in(now, &z),
        }
    }

    fn bounds_in<Z: TimeZone>(&self, now: i64, zone: &Z) -> (i64, i64) {
        let Some(local) = zone.timestamp_opt(now, 0).single() else {
            return (now, now + 1);
        };
        // Local midnight (or the hour) as a timestamp. Where a DST change skips it, the first
        // moment after the gap (on the half hour); where it repeats, the first of the two.
        let at = |d: NaiveDate, hour: u32| -> i64 {
            let naive = d.and_hms_opt(hour, 0, 0).unwrap_or_default();
            match zone.from_local_datetime(&naive) {
                LocalResult::Single(t) => t.timestamp(),
                LocalResult::Ambiguous(t, _) => t.timestamp(),
                // The gap is 30 minutes (Lord Howe) or an hour: the first half hour after it.
                LocalResult::None => (1..=4)
                    .find_map(|k| {
                        zone.from_local_datetime(&(naive + ChronoDuration::minutes(30 * k)))
                            .earliest()
                    })
                    .map_or(now, |t| t.timestamp()),
            }
        };
        match self {
            Window::Total => (0, i64::MAX),
            Window::Every(s) => {
                let s = *s as i64;
                let start = now.div_euclid(s) * s;
                (start, start + s)
            }
            Window::Hourly => {
                let start = now.div_euclid(3600) * 3600
                    + i64::from(local.offset().fix().local_minus_utc()).rem_euclid(3600);
                let start = if start > now { start - 3600 } else { start };
                (start, start + 3600)
            }
            Window::Daily => {
                let d = local.date_naive();
                (at(d, 0), at(d + ChronoDuration::days(1), 0))
            }
            Window::Weekly => {
                let d = local.date_naive()
                    - ChronoDuration::days(i64::from(local.weekday().num_days_from_monday()));
                (at(d, 0), at(d + ChronoDuration::days(7), 0))
            }
            Window::Monthly => {
                let d = NaiveDate::from_ymd_opt(local.year(), local.month(), 1).unwrap_or_default();
                let next = if local.month() == 12 {
                    NaiveDate::from_ymd_opt(local.year() + 1, 1, 1)
                } else {
                    NaiveDate::from_ymd_opt(local.year(), local.month() + 1, 1)
                }
                .unwrap_or_default();
                (at(d, 0), at(next, 0))
            }
        }
    }
}

/// How many recent windows [`Window::bounds`] keeps per thread: a call with a daily and a
/// monthly cap asks for two.
const BOUNDS_KEPT: usize = 4;
/// A window kept by [`Window::bounds`]: its kind, its zone, its start and end.
type KeptBounds = (Window, Zone, i64, i64);

/// Where calendar windows are computed: a fixed UTC offset, or an IANA time zone (whose
/// midnights follow daylight saving time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    Fixed(FixedOffset),
    Named(chrono_tz::Tz),
}

impl Zone {
    pub fn utc() -> Zone {
        Zone::Fixed(FixedOffset::east_opt(0).expect("UTC"))
    }

    /// The zone's name: the IANA name, `UTC`, or the offset (`+05:30`).
    pub fn name(&self) -> String {
        match self {
            Zone::Fixed(z) if z.local_minus_utc() == 0 => "UTC".into(),
            Zone::Fixed(z) => z.to_string(),
            Zone::Named(z) => z.name().to_string(),
        }
    }
}

fn window_error(s: &str) -> String {
    format!("{s:?} is not a window: use hourly, daily, weekly, monthly, total, or a length like \"30s\", \"15m\", \"2h\"")
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// One cap on one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cap {
    pub window: Window,
    pub usd: Option<Pico>,
    pub tokens: Option<u64>,
    pub soft_usd: Option<Pico>,
    pub soft_tokens: Option<u64>,
    /// Alert thresholds, in thousandths of the cap (800: 80 %).
    pub alerts: Vec<u32>,
}

/// Who a cap belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    User(String),
    Team(String),
}

impl Subject {
    /// The ledger key: `user:alice`, `team:research`.
    pub fn key(&self) -> String {
        match self {
            Subject::User(u) => format!("user:{u}"),
            Subject::Team(t) => format!("team:{t}"),
        }
    }
}

/// The compiled policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BudgetPolicy {
    pub missing_user: MissingUser,
    pub default_user: String,
    pub offset: Option<Zone>,
    pub default_max_output_tokens: u64,
    pub default_max_searches: u64,
    pub default_caps: Vec<Cap>,
    pub user_caps: HashMap<String, Vec<Cap>>,
    pub teams: HashMap<String, Vec<Cap>>,
    /// user -> teams they belong to
    pub membership: HashMap<String, Vec<String>>,
    pub ledger: LedgerConfig,
    pub limits: super::limits::Limits,
    pub alerts: super::alerts::AlertsConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerConfig {
    pub backend: Backend,
    pub path: PathBuf,
    pub flush_interval: std::time::Duration,
    pub retention_days: u64,
    /// The Redis of the redis backend (`None` for the embedded one).
    pub redis: Option<crate::budget::redis::Target>,
    pub redis_prefix: String,
    pub fail_open: bool,
    pub reservation_ttl: std::time::Duration,
    pub redis_timeout: std::time::Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            backend: Backend::Embedded,
            path: PathBuf::from("tokentap-ledger.db"),
            flush_interval: std::time::Duration::from_millis(500),
            retention_days: 90,
            redis: None,
            redis_prefix: "tokentap".into(),
            fail_open: false,
            reservation_ttl: std::time::Duration::from_secs(900),
            redis_timeout: std::time::Duration::from_millis(500),
        }
    }
}

impl BudgetPolicy {
    /// True when any cap is configured: only then are calls reserved and checked.
    pub fn enforcing(&self) -> bool {
        !self.default_caps.is_empty() || !self.user_caps.is_empty() || !self.teams.is_empty()
    }

    /// The zone calendar windows are computed in (UTC by default).
    pub fn offset(&self) -> Zone {
        self.offset.unwrap_or_else(Zone::utc)
    }

    /// Every (subject, cap) that applies to `user`: their own caps (or the default ones) and
    /// those of their teams.
    pub fn caps_for(&self, user: &str) -> Vec<(Subject, &Cap)> {
        let own = self.user_caps.get(user).unwrap_or(&self.default_caps);
        let mut v: Vec<(Subject, &Cap)> = own
            .iter()
            .map(|c| (Subject::User(user.to_string()), c))
            .collect();
        if let Some(teams) = self.membership.get(user) {
            for t in teams {
                for c in self.teams.get(t).into_iter().flatten() {
                    v.push((Subject::Team(t.clone()), c));
                }
            }
        }
        v
    }

    pub fn teams_of(&self, user: &str) -> &[String] {
        self.membership.get(user).map_or(&[], |v| v.as_slice())
    }
}

pub fn compile(raw: &RawBudgets, dir: &std::path::Path) -> Result<BudgetPolicy, String> {
    let default_alerts = super::alerts::per_mille(&raw.alerts.thresholds)
        .map_err(|e| format!("budgets.alerts.thresholds: {e}"))?;
    let caps = |key: &str, m: &BTreeMap<String, RawCap>| -> Result<Vec<Cap>, String> {
        let mut v = Vec::new();
        for (w, c) in m {
            let window = Window::parse(w).map_err(|e| format!("{key}.{w}: {e}"))?;
            let usd = |f: &str, x: &Option<UsdValue>| -> Result<Option<Pico>, String> {
                match x {
                    None => Ok(None),
                    Some(u) => crate::meter::pricing::usd_to_pico(&u.0)
                        .map(Some)
                        .map_err(|e| format!("{key}.{w}.{f}: {e}")),
                }
            };
            let alerts = match &c.alerts {
                Some(f) => {
                    super::alerts::per_mille(f).map_err(|e| format!("{key}.{w}.alerts: {e}"))?
                }
                None => default_alerts.clone(),
            };
            let cap = Cap {
                window,
                usd: usd("usd", &c.usd)?,
                tokens: c.tokens,
                soft_usd: usd("soft_usd", &c.soft_usd)?,
                soft_tokens: c.soft_tokens,
                alerts,
            };
            if cap.usd.is_none()
                && cap.tokens.is_none()
                && cap.soft_usd.is_none()
                && cap.soft_tokens.is_none()
            {
                return Err(format!(
                    "{key}.{w}: give usd, tokens, soft_usd or soft_tokens"
                ));
            }
            // Two caps on one counter would each ignore the other's reservations.
            // ("60m" and "1h" are the same window.)
            if v.iter().any(|o: &Cap| o.window == cap.window) {
                return Err(format!("{key}.{w}: this window is given twice"));
            }
            v.push(cap);
        }
        Ok(v)
    };
    let offset = match (&raw.utc_offset, &raw.time_zone) {
        (Some(_), Some(_)) => {
            return Err("budgets.time_zone: give time_zone or utc_offset, not both".into())
        }
        (Some(s), None) => Some(Zone::Fixed(
            parse_offset(s).map_err(|e| format!("budgets.utc_offset: {e}"))?,
        )),
        (None, Some(z)) => Some(Zone::Named(z.parse::<chrono_tz::Tz>().map_err(|_| {
            format!("budgets.time_zone: {z:?} is not an IANA time zone like \"Europe/Berlin\"")
        })?)),
        (None, None) => None,
    };
    let default_caps = match &raw.default {
        Some(m) => caps("budgets.default", m)?,
        None => Vec::new(),
    };
    let mut user_caps = HashMap::new();
    for (u, m) in &raw.users {
        user_caps.insert(u.clone(), caps(&format!("budgets.users.{u:?}"), m)?);
    }
    let mut teams = HashMap::new();
    let mut membership: HashMap<String, Vec<String>> = HashMap::new();
    for (t, team) in &raw.teams {
        let key = format!("budgets.teams.{t:?}");
        if team.members.is_empty() {
            return Err(format!("{key}.members: a team needs at least one member"));
        }
        teams.insert(t.clone(), caps(&format!("{key}.caps"), &team.caps)?);
        let mut seen = std::collections::HashSet::new();
        for m in &team.members {
            // A member listed twice would be charged twice against the team's caps.
            if seen.insert(m) {
                membership.entry(m.clone()).or_default().push(t.clone());
            }
        }
    }
    let backend = raw.ledger.backend;
    let l = &raw.ledger;
    if l.redis_timeout_ms == 0 {
        return Err("budgets.ledger.redis_timeout_ms: must be greater than 0".into());
    }
    if backend == Backend::Redis
        && l.redis_mode == crate::budget::redis::Mode::Cluster
        && (l.redis_prefix.is_empty() || l.redis_prefix.contains(['{', '}']))
    {
        return Err(format!(
            "budgets.ledger.redis_prefix: {:?} cannot be a Cluster hash tag (in Cluster mode the \
             prefix is written {{prefix}} so that a call's keys share a slot): give a name \
             without braces",
            l.redis_prefix
        ));
    }
    let redis = match backend {
        Backend::Embedded => None,
        Backend::Redis => {
            let path = |p: &Option<PathBuf>| p.as_ref().map(|p| dir.join(p));
            let (ca, cert, key) = (
                path(&l.redis_ca_file),
                path(&l.redis_client_cert_file),
                path(&l.redis_client_key_file),
            );
            Some(crate::budget::redis::Target::new(
                &crate::budget::redis::Settings {
                    mode: l.redis_mode,
                    url: l.redis_url.as_deref(),
                    nodes: &l.redis_nodes,
                    sentinel_master: l.redis_sentinel_master.as_deref(),
                    username_env: l.redis_username_env.as_deref(),
                    password_env: l.redis_password_env.as_deref(),
                    sentinel_password_env: l.redis_sentinel_password_env.as_deref(),
                    ca_file: ca.as_deref(),
                    client_cert_file: cert.as_deref(),
                    client_key_file: key.as_deref(),
                    timeout: std::time::Duration::from_millis(l.redis_timeout_ms),
                },
            )?)
        }
    };
    let fail_open = raw.ledger.on_error == OnError::FailOpen;
    if raw.ledger.flush_interval_ms == 0 {
        return Err("budgets.ledger.flush_interval_ms: must be greater than 0".into());
    }
    if raw.ledger.reservation_ttl_s == 0 {
        return Err("budgets.ledger.reservation_ttl_s: must be greater than 0".into());
    }
    Ok(BudgetPolicy {
        missing_user: raw.missing_user,
        default_user: raw.default_user.clone(),
        offset,
        default_max_output_tokens: raw.default_max_output_tokens,
        default_max_searches: raw.default_max_searches,
        default_caps,
        user_caps,
        teams,
        membership,
        limits: super::limits::compile(&raw.limits)?,
        alerts: super::alerts::compile(&raw.alerts)?,
        ledger: LedgerConfig {
            backend,
            path: dir.join(&raw.ledger.path),
            flush_interval: std::time::Duration::from_millis(raw.ledger.flush_interval_ms),
            retention_days: raw.ledger.retention_days,
            redis,
            redis_prefix: raw.ledger.redis_prefix.clone(),
            fail_open,
            reservation_ttl: std::time::Duration::from_secs(raw.ledger.reservation_ttl_s),
            redis_timeout: std::time::Duration::from_millis(raw.ledger.redis_timeout_ms),
        },
    })
}

fn parse_offset(s: &str) -> Result<FixedOffset, String> {
    let bad = || format!("{s:?} is not a UTC offset like \"+02:00\" or \"-05:30\"");
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 14 || m > 59 {
        return Err(bad());
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The kept windows answer exactly as the computation would, in any order of calls:
        /// each moment asked in a random zone and then in the next one, at random moments and
        /// at the edges of the window found, around daylight-saving changes (named zones are
        /// computed every time: `kept_hours_in_lord_howe` shows why), month and year ends, and
        /// before 1970, with every window kind sharing a thread's memory.
        #[test]
        fn kept_bounds_equal_computed(
            steps in proptest::collection::vec(
                (0usize..7, 0usize..8, 0usize..8, -3i64 * 86_400..3 * 86_400),
                1..60,
            )
        ) {
            let fixed = |secs: i32| Zone::Fixed(FixedOffset::east_opt(secs).unwrap());
            let zones = [
                Zone::utc(),
                fixed(5 * 3600 + 1800),
                fixed(-3 * 3600),
                fixed(14 * 3600),
                fixed(-9 * 3600 - 1800),
                Zone::Named("Europe/Berlin".parse().unwrap()),
                Zone::Named("America/Santiago".parse().unwrap()),
                Zone::Named("Australia/Lord_Howe".parse().unwrap()),
            ];
            let windows = [
                Window::Hourly,
                Window::Daily,
                Window::Weekly,
                Window::Monthly,
                Window::Total,
                Window::Every(90),
                Window::Every(86_400),
            ];
            // Daylight-saving changes (Berlin, Santiago at midnight, Lord Howe by 30 minutes),
            // a month's end in a leap year, a year's end, and moments before 1970.
            let bases = [
                ts("2026-03-29T01:00:00Z"),
                ts("2026-10-25T01:00:00Z"),
                ts("2026-04-05T03:00:00Z"),
                ts("2026-04-04T15:00:00Z"),
                ts("2028-02-29T12:00:00Z"),
                ts("2026-12-31T23:30:00Z"),
                ts("1969-12-31T23:00:00Z"),
                ts("1900-03-01T00:00:00Z"),
            ];
            for (w, z, b, delta) in steps {
                let window = windows[w];
                let now = bases[b] + delta;
                for zone in [zones[z], zones[(z + 1) % zones.len()]] {
                    let (start, end) = window.bounds(now, zone);
                    proptest::prop_assert_eq!((start, end), window.bounds_uncached(now, zone));
                    // The edges: the window's first second, its last, and the first after it.
                    let edges = if end == i64::MAX { vec![start] } else { vec![start, end - 1, end] };
                    for at in edges {
                        proptest::prop_assert_eq!(window.bounds(at, zone), window.bounds_uncached(at, zone));
                    }
                }
            }
        }
    }

    /// Lord Howe moves its clocks by 30 minutes, so the hour before the change and the hour
    /// after it overlap: every minute around the change of 2026-04-05 gets the hour the
    /// computation gives, whatever was asked before it (a kept hour would answer for minutes
    /// that belong to the other one).
    #[test]
    fn kept_hours_in_lord_howe() {
        let zone = Zone::Named("Australia/Lord_Howe".parse().unwrap());
        let change = ts("2026-04-04T15:00:00Z");
        for minute in (-120..120).chain((-120..120).rev()) {
            let now = change + minute * 60;
            assert_eq!(
                Window::Hourly.bounds(now, zone),
                Window::Hourly.bounds_uncached(now, zone),
                "{now}"
            );
        }
    }

    fn utc() -> Zone {
        Zone::utc()
    }

    fn ts(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp()
    }

    #[test]
    fn named_zones_follow_daylight_saving_time() {
        let berlin = Zone::Named("Europe/Berlin".parse().unwrap());
        // Winter: midnight is 23:00 UTC; summer: 22:00 UTC.
        assert_eq!(
            Window::Daily.bounds(ts("2026-01-15T12:00:00Z"), berlin).0,
            ts("2026-01-14T23:00:00Z")
        );
        assert_eq!(
            Window::Daily.bounds(ts("2026-07-15T12:00:00Z"), berlin).0,
            ts("2026-07-14T22:00:00Z")
        );
        // The day of the spring change is 23 hours long.
        let (a, b) = Window::Daily.bounds(ts("2026-03-29T12:00:00Z"), berlin);
        assert_eq!(b - a, 23 * 3600);
        // Hours follow the local clock (a 30-minute offset zone too).
        let india = Zone::Named("Asia/Kolkata".parse().unwrap());
        assert_eq!(
            Window::Hourly.bounds(ts("2026-01-15T12:40:00Z"), india),
            (ts("2026-01-15T12:30:00Z"), ts("2026-01-15T13:30:00Z"))
        );
    }

    #[test]
    fn calendar_windows() {
        let now = ts("2026-11-25T19:45:10Z"); // a Wednesday
        assert_eq!(
            Window::Daily.bounds(now, utc()),
            (ts("2026-11-25T00:00:00Z"), ts("2026-11-26T00:00:00Z"))
        );
        assert_eq!(
            Window::Hourly.bounds(now, utc()),
            (ts("2026-11-25T19:00:00Z"), ts("2026-11-25T20:00:00Z"))
        );
        assert_eq!(
            Window::Weekly.bounds(now, utc()),
            (ts("2026-11-23T00:00:00Z"), ts("2026-11-30T00:00:00Z"))
        );
        assert_eq!(
            Window::Monthly.bounds(now, utc()),
            (ts("2026-11-01T00:00:00Z"), ts("2026-12-01T00:00:00Z"))
        );
        let dec = ts("2026-12-31T23:59:59Z");
        assert_eq!(
            Window::Monthly.bounds(dec, utc()).1,
            ts("2027-01-01T00:00:00Z")
        );
        assert_eq!(Window::Every(30).bounds(95, utc()), (90, 120));
        assert_eq!(Window::Total.bounds(now, utc()).1, i64::MAX);
    }

    #[test]
    fn windows_follow_the_configured_offset() {
        let plus2 = Zone::Fixed(parse_offset("+02:00").unwrap());
        // 23:30 UTC is already the next day at +02:00.
        let now = ts("2026-11-25T23:30:00Z");
        assert_eq!(
            Window::Daily.bounds(now, plus2).0,
            ts("2026-11-26T00:00:00+02:00")
        );
        assert!(parse_offset("2:00").is_err());
        assert!(parse_offset("+25:00").is_err());
    }

    #[test]
    fn one_counter_gets_one_cap() {
        let raw: RawBudgets =
            toml::from_str("[users.a]\n\"60m\" = { usd = 1 }\n\"1h\" = { usd = 2 }\n").unwrap();
        assert!(compile(&raw, std::path::Path::new("."))
            .unwrap_err()
            .contains("given twice"));
        let raw: RawBudgets =
            toml::from_str("[teams.t]\nmembers = [\"a\", \"a\"]\ncaps = { daily = { usd = 1 } }\n")
                .unwrap();
        let p = compile(&raw, std::path::Path::new(".")).unwrap();
        assert_eq!(
            p.caps_for("a").len(),
            1,
            "a member listed twice is charged once"
        );
    }

    #[test]
    fn window_names_parse() {
        assert_eq!(Window::parse("15m"), Ok(Window::Every(900)));
        assert_eq!(Window::parse("2s").unwrap().name(), "2s");
        assert!(Window::parse("fortnightly").is_err());
        assert!(Window::parse("0s").is_err());
        assert!(
            Window::parse("5é").is_err(),
            "no panic on a multi-byte last character"
        );
        assert!(Window::parse("").is_err());
    }
}
