//! The Redis ledger: caps shared by every replica pointed at the same Redis.
//!
//! Each (subject, window, window start) is a hash with spent and reserved picodollars and
//! tokens. Reserving checks every cap of a call and, only if all hold, adds the worst case to
//! all of them, in one Lua script, so concurrent calls on any number of replicas cannot pass a
//! cap together. Settling releases the reservation and charges the real cost, also in a
//! script. Keys expire a week after their window ends.
//!
//! When Redis cannot be reached, `budgets.ledger.on_error` decides (`fail_open` lets calls
//! through uncapped, `fail_closed` refuses them) and `tokentap_ledger_errors_total` counts it;
//! the connection manager reconnects by itself. Redis is not needed to start: until the first
//! connection succeeds (retried with backoff) the ledger is down, as it is when Redis goes
//! away later; `store_up` says which, and a log line marks each change. Settles Redis could
//! not take wait in the outbox (kept in this replica's file) and go once it is back, each
//! exactly once. Per-call rows for reports stay local (the embedded ledger's file of this
//! replica).
//!
//! Redis that lost its data (restarted without persistence, `FLUSHALL`, a failover to an
//! empty replica) is noticed within about a second: every replica watches an epoch key that
//! the first of them sets; when it vanishes or changes, the window totals started again from
//! zero. That is logged as an error and counted (`tokentap_ledger_store_resets_total`, alert
//! `TokentapBudgetStoreReset`); the spend settled before it is not rebuilt (see
//! docs/operations.md for what that allows).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use redis::Script;
use serde::{Deserialize, Serialize};

mod shared;
mod store;
pub use shared::read as read_report;
pub use store::{Con, Mode, Settings, Target};

use super::embedded::Embedded;
use super::policy::{BudgetPolicy, LedgerConfig, Subject, Window, Zone};
use super::{Amount, CallRow, Ledger, Rejection, Reservation, SoftHook, StoreDown};

/// After a window ends, its counters are kept this long (for reports and late settles).
const KEEP_AFTER_END: i64 = 7 * 86_400;
/// How often settles Redis could not take are offered again.
const OUTBOX_RETRY: Duration = Duration::from_millis(250);
/// Settles kept for Redis at most (beyond, the oldest are dropped and counted as errors).
const OUTBOX_MAX: usize = 1_000_000;
/// The epoch key is looked at every this many outbox rounds (about a second).
const EPOCH_EVERY: u32 = 4;
/// The longest wait between attempts at a first connection.
const CONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// In Sentinel mode, the Sentinels are asked which master they name every this many outbox
/// rounds (about 5 s), also while Redis answers.
const SENTINEL_EVERY: u32 = 20;
/// While Redis is down, a new connection is made at most this often.
const REBUILD_EVERY: Duration = Duration::from_secs(2);
/// Users under the default caps whose spend the gauges follow (the top spenders).
const FOLLOW_TOP: isize = 1000;

/// The Lua scripts, in files of their own beside this one (each says what its KEYS and ARGV
/// are): reserve a call's worst case against every cap at once, settle it, renew its lease.
const RESERVE: &str = include_str!("reserve.lua");
const LIMIT: &str = include_str!("limit.lua");
const UNLIMIT: &str = include_str!("unlimit.lua");
const SETTLE: &str = include_str!("settle.lua");
const RENEW: &str = include_str!("renew.lua");
/// Ships a batch of this replica's call rows to the shared reports (see `shared.rs`).
const SHIP: &str = include_str!("ship.lua");
/// Reads (or first sets) the epoch key, as a write: see `check_epoch`.
const EPOCH: &str = include_str!("epoch.lua");

/// One settle, as sent to Redis (and kept in the outbox until Redis takes it).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SettleCall {
    id: String,
    keys: Vec<String>,
    args: Vec<String>,
    /// Per hold: subject key, window, window start (to follow spend and signal soft caps).
    holds: Vec<(String, String, i64)>,
    /// Per hold: its window's end and what it alerts at; and what the call cost (a settle
    /// kept by an older tokentap has neither: it raises no alert).
    #[serde(default)]
    alerts: Vec<(i64, crate::budget::alerts::Thresholds)>,
    #[serde(default)]
    actual: (u64, u64),
}

pub struct RedisLedger {
    /// Runs the connection's driver, the settles and the outbox: it must outlive start-up,
    /// and settles must be able to start from any thread.
    rt: tokio::runtime::Runtime,
    inner: Arc<Inner>,
}

struct Inner {
    /// Set once a connection succeeds. It reconnects by itself to the same server (a Cluster
    /// connection follows the Cluster); in Sentinel mode, a new one is made to the master the
    /// Sentinels name when the old one fails.
    con: arc_swap::ArcSwapOption<Con>,
    /// Whether the last round trip to Redis worked (false until the first connection).
    up: AtomicBool,
    target: Target,
    /// The next (re)connection attempt waits until then; doubled after each failure.
    retry: Mutex<(std::time::Instant, Duration)>,
    /// Sentinel mode: the address of the master the connection goes to.
    master: Mutex<Option<String>>,
    /// Key prefix (in Cluster mode in braces: a hash tag, so every key of a script is in one
    /// slot).
    prefix: String,
    lease: Duration,
    /// A round trip longer than this counts as Redis being down.
    timeout: Duration,
    reserve: Script,
    settle: Script,
    limit: Script,
    unlimit: Script,
    /// The rate-limit grants with calls-in-flight leases, by id: their flight sets, renewed
    /// with the reservations' leases while the call runs.
    flights: dashmap::DashMap<String, Vec<String>>,
    renew: Script,
    /// Per-call rows for reports, and the outbox, go to this replica's embedded file.
    rows: Arc<Embedded>,
    errors: AtomicU64,
    /// Settles sent and not yet answered (waited for at shutdown).
    pending: AtomicI64,
    /// Settles Redis has not taken yet (also in the file), oldest first.
    outbox: Mutex<VecDeque<SettleCall>>,
    soft: OnceLock<SoftHook>,
    /// The last spend seen per counter, for metrics, which cannot wait on Redis: updated
    /// by every settle's answer and refreshed from Redis at each scrape.
    seen: Mutex<HashMap<(String, Window), (i64, Amount)>>,
    refreshing: AtomicBool,
    /// Settles sent and not answered yet, by reservation id.
    unanswered: Mutex<HashMap<String, SettleCall>>,
    /// Whether the settles an earlier run kept in the file have been read (they are read once
    /// the file is open, which may be after start-up).
    kept_loaded: AtomicBool,
    /// The value of the epoch key last seen (`None` before the first look).
    epoch: Mutex<Option<String>>,
    /// Times Redis was seen to have lost its data.
    resets: AtomicU64,
    ship: Script,
    epoch_script: Script,
    /// This replica's name in the shared reports (kept in its file, read once it is open).
    replica: OnceLock<String>,
    /// The last of this replica's rows Redis has (`None`: ask Redis).
    shipped: Mutex<Option<i64>>,
    /// The budgets' zone: reports are by its days.
    zone: Zone,
    retention_days: u64,
}

impl RedisLedger {
    /// Opens the ledger. Redis need not be up: the first connection is tried at once and
    /// again with backoff until it works (meanwhile every call meets `on_error`). Reports are
    /// by days of `zone`.
    pub fn open(cfg: &LedgerConfig, zone: Zone) -> Result<Arc<Self>, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tokentap-redis")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let target = cfg
            .redis
            .clone()
            .ok_or("budgets.ledger: the redis backend needs redis_url or redis_nodes")?;
        let first = rt.block_on(target.connect());
        let rows = Embedded::open_in(cfg, zone)?;
        // (A file that cannot be opened yet is read once it opens: see `load_kept`.)
        let outbox = VecDeque::new();
        let con = arc_swap::ArcSwapOption::empty();
        let mut master = None;
        let up = match first {
            Ok((c, m)) => {
                con.store(Some(Arc::new(c)));
                master = m;
                true
            }
            Err(e) => {
                log::warn!(
                    "ledger: {e}; serving without it (budgets.ledger.on_error applies) and \
                     connecting in the background"
                );
                false
            }
        };
        let inner = Arc::new(Inner {
            con,
            up: AtomicBool::new(up),
            retry: Mutex::new((std::time::Instant::now(), Duration::from_millis(100))),
            master: Mutex::new(master),
            prefix: key_prefix(cfg),
            lease: cfg.reservation_ttl,
            timeout: target.timeout,
            reserve: Script::new(RESERVE),
            settle: Script::new(SETTLE),
            limit: Script::new(LIMIT),
            unlimit: Script::new(UNLIMIT),
            flights: Default::default(),
            renew: Script::new(RENEW),
            rows,
            errors: AtomicU64::new(0),
            pending: AtomicI64::new(0),
            outbox: Mutex::new(outbox),
            soft: OnceLock::new(),
            seen: Mutex::new(HashMap::new()),
            refreshing: AtomicBool::new(false),
            unanswered: Mutex::new(HashMap::new()),
            epoch: Mutex::new(None),
            kept_loaded: AtomicBool::new(false),
            resets: AtomicU64::new(0),
            ship: Script::new(SHIP),
            epoch_script: Script::new(EPOCH),
            replica: OnceLock::new(),
            shipped: Mutex::new(None),
            zone,
            retention_days: cfg.retention_days,
            target,
        });
        inner.load_kept();
        if up {
            // The epoch is known before the first call: a loss from now on is noticed.
            rt.block_on(inner.check_epoch());
        }
        let weak = Arc::downgrade(&inner);
        rt.spawn(async move {
            let mut round = 0u32;
            loop {
                tokio::time::sleep(OUTBOX_RETRY).await;
                let Some(inner) = weak.upgrade() else { return };
                if !inner.kept_loaded.load(Ordering::Relaxed) {
                    // (A file read: off the thread that drives the connections.)
                    let i = Arc::clone(&inner);
                    let _ = tokio::task::spawn_blocking(move || i.load_kept()).await;
                }
                inner.reconnect_if_needed().await;
                let second = round.is_multiple_of(EPOCH_EVERY);
                if second {
                    inner.check_epoch().await;
                }
                if round % SENTINEL_EVERY == SENTINEL_EVERY - 1 {
                    inner.follow_sentinels().await;
                }
                round = round.wrapping_add(1);
                inner.drain_outbox().await;
                if second {
                    inner.ship_rows().await;
                }
            }
        });
        Ok(Arc::new(RedisLedger { rt, inner }))
    }

    fn expire_at(end: i64) -> i64 {
        if end == i64::MAX {
            0
        } else {
            end + KEEP_AFTER_END
        }
    }

    /// The settle of `r` at `actual`, as Redis will run it.
    fn settle_call(&self, r: &Reservation, actual: Amount, policy_ends: &[i64]) -> SettleCall {
        let p = &self.inner.prefix;
        let int = |v: u64| v.min(i64::MAX as u64).to_string();
        let mut keys = Vec::with_capacity(1 + 3 * r.holds.len());
        keys.push(format!("{p}:settled:{}", r.id));
        let mut args = vec![
            lease_member(r),
            int(r.worst.pico),
            int(r.worst.tokens),
            int(actual.pico),
            int(actual.tokens),
        ];
        let mut holds = Vec::with_capacity(r.holds.len());
        for (i, h) in r.holds.iter().enumerate() {
            let counter = self.inner.key(&h.key, h.window, h.start);
            let leases = format!("{counter}:leases");
            keys.extend([
                counter,
                leases,
                self.inner.top_key(&h.key, h.window, h.start),
            ]);
            let soft = |v: Option<u64>| v.map_or("-1".to_string(), int);
            args.push(soft(h.soft_usd));
            args.push(soft(h.soft_tokens));
            args.push(h.key.clone());
            args.push(Self::expire_at(policy_ends.get(i).copied().unwrap_or(i64::MAX)).to_string());
            holds.push((h.key.clone(), h.window.name(), h.start));
        }
        SettleCall {
            id: r.id.clone(),
            keys,
            args,
            alerts: r.holds.iter().map(|h| (h.end, h.alert.clone())).collect(),
            holds,
            actual: (actual.pico, actual.tokens),
        }
    }

    /// Sends a settle from the ledger's runtime; what Redis does not take goes to the outbox.
    fn send(&self, call: SettleCall) {
        let inner = Arc::clone(&self.inner);
        inner.pending.fetch_add(1, Ordering::AcqRel);
        // Known until answered: a shutdown keeps in the file what Redis has not answered.
        inner
            .unanswered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(call.id.clone(), call.clone());
        self.rt.spawn(async move {
            // Settles of different calls commute (and each runs once, by its marker), so a
            // new one never waits behind a backlog.
            let ok = inner.run_settle(&call).await.is_ok();
            let mine = inner
                .unanswered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&call.id)
                .is_some();
            // (Not mine: the shutdown already kept it.)
            if !ok && mine {
                inner.keep(call);
            }
            inner.pending.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// A reservation's lease in the leases sets: its id and the amount it holds.
fn lease_member(r: &Reservation) -> String {
    format!("{}|{}|{}", r.id, clamp(r.worst.pico), clamp(r.worst.tokens))
}

/// An amount as Redis takes it (a signed 64-bit integer).
fn clamp(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// The prefix of the ledger's keys: in Cluster mode in braces, a hash tag, so that the keys a
/// script touches (a call's caps: its user's and its teams') are in one slot.
fn key_prefix(cfg: &LedgerConfig) -> String {
    match cfg.redis.as_ref().map(|t| t.mode) {
        Some(Mode::Cluster) => format!("{{{}}}", cfg.redis_prefix),
        _ => cfg.redis_prefix.clone(),
    }
}

impl Inner {
    /// Reads the settles an earlier run kept in the file into the outbox, once the file is
    /// open (sending one twice is harmless: each runs once, by its marker).
    fn load_kept(&self) {
        if self.kept_loaded.load(Ordering::Relaxed) || self.rows.store_up() != Some(true) {
            return;
        }
        let kept = match self.rows.outbox_load() {
            Ok(k) => k,
            Err(e) => {
                log::error!("ledger: settles kept by an earlier run cannot be read yet: {e}");
                return;
            }
        };
        self.kept_loaded.store(true, Ordering::Relaxed);
        let mut calls = Vec::with_capacity(kept.len());
        for (id, payload) in kept {
            match serde_json::from_str::<SettleCall>(&payload) {
                // Kept under another prefix (redis_prefix or redis_mode changed since): its
                // keys are not this ledger's, and a Cluster would refuse them for ever.
                Ok(c)
                    if !c
                        .keys
                        .iter()
                        .all(|k| k.starts_with(&format!("{}:", self.prefix))) =>
                {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    self.rows.outbox_done(c.id);
                    log::error!(
                        "ledger: dropping kept settle {id}: its keys are not under the prefix \
                         {:?} (budgets.ledger.redis_prefix or redis_mode changed)",
                        self.prefix
                    );
                }
                Ok(c) => calls.push(c),
                Err(e) => log::error!("ledger: dropping unreadable kept settle {id}: {e}"),
            }
        }
        if !calls.is_empty() {
            log::info!(
                "ledger: {} settles kept from an earlier run go to Redis now",
                calls.len()
            );
            self.lock_outbox().extend(calls);
        }
    }

    /// The connection, if there is one.
    fn current(&self) -> Option<Con> {
        self.con.load().as_deref().cloned()
    }

    /// Connects when there is no connection yet (with backoff: 0.1 s doubling to 2 s), and
    /// makes a new one, at most every 2 s, while Redis is down: a connection keeps its
    /// server, and the master may now be another (a Sentinel promotion, an endpoint whose
    /// DNS name moved to a new primary, a Cluster master gone without a word).
    async fn reconnect_if_needed(&self) {
        let none = self.con.load().is_none();
        if !none && self.up.load(Ordering::Relaxed) {
            return;
        }
        {
            let r = self.retry.lock().unwrap_or_else(|p| p.into_inner());
            if std::time::Instant::now() < r.0 {
                return;
            }
        }
        let next = match self.target.connect().await {
            Ok((c, master)) => {
                self.con.store(Some(Arc::new(c)));
                *self.master.lock().unwrap_or_else(|p| p.into_inner()) = master;
                // The epoch check is a write: it says whether this one takes writes (a
                // demoted master does not) and marks Redis up if so.
                self.check_epoch().await;
                REBUILD_EVERY
            }
            Err(e) => {
                log::debug!("ledger: {e}");
                let r = self.retry.lock().unwrap_or_else(|p| p.into_inner());
                if none {
                    (r.1 * 2).min(CONNECT_BACKOFF_MAX)
                } else {
                    REBUILD_EVERY
                }
            }
        };
        *self.retry.lock().unwrap_or_else(|p| p.into_inner()) =
            (std::time::Instant::now() + next, next);
    }

    /// Sentinel mode: moves to the master the Sentinels name when it is not the one this
    /// connection goes to. A master cut off from the Sentinels (a partition) can go on taking
    /// writes that its replicas will never see; round trips to it do not fail, so only
    /// asking tells.
    async fn follow_sentinels(&self) {
        if self.target.mode != Mode::Sentinel || self.con.load().is_none() {
            return;
        }
        let Ok(named) = self.target.sentinel_master().await else {
            return; // (the Sentinels unreachable: stay with the master we have)
        };
        let current = self
            .master
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if current.as_deref() == Some(named.as_str()) {
            return;
        }
        log::warn!(
            "ledger: the Sentinels name {named} as the master, not {}: moving to it",
            current.as_deref().unwrap_or("(unknown)")
        );
        match self.target.connect().await {
            Ok((c, master)) => {
                self.con.store(Some(Arc::new(c)));
                *self.master.lock().unwrap_or_else(|p| p.into_inner()) = master;
                self.check_epoch().await;
            }
            Err(e) => {
                let _ = self.failed("connect", &e);
            }
        }
    }

    /// A subject's (`user:…`, `team:…`, `key:…`) rate-limit counts (`w`: per second) or calls
    /// in flight (`f`). The kind comes before the subject, whose id is the caller's to choose:
    /// no id can name another's key.
    fn limit_key(&self, kind: &str, subject_key: &str) -> String {
        format!("{}:rl:{kind}:{subject_key}", self.prefix)
    }

    fn key(&self, subject_key: &str, window: Window, start: i64) -> String {
        format!(
            "{}:{}:{}:{}",
            self.prefix,
            subject_key,
            window.name(),
            start
        )
    }

    /// The set of a window's biggest spenders, per kind of subject (user, team).
    fn top_key(&self, subject_key: &str, window: Window, start: i64) -> String {
        let kind = subject_key.split(':').next().unwrap_or_default();
        format!("{}:top:{kind}:{}:{start}", self.prefix, window.name())
    }

    fn failed(&self, what: &str, e: &dyn std::fmt::Display) -> StoreDown {
        if self.up.swap(false, Ordering::Relaxed) {
            log::warn!(
                "ledger: Redis at {} went away ({e}); budgets.ledger.on_error applies until it \
                 is back",
                self.target.display()
            );
        }
        if self
            .errors
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(100)
        {
            log::error!("ledger: Redis {what} failed: {e}");
        }
        StoreDown(e.to_string())
    }

    /// Looks at the epoch key: set it if there is none, and note a reset when the one this
    /// replica saw before is gone or replaced (Redis lost its data).
    async fn check_epoch(&self) {
        let Some(mut con) = self.current() else {
            return;
        };
        let mine = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let mut inv = self.epoch_script.prepare_invoke();
        inv.key(format!("{}:epoch", self.prefix)).arg(&mine);
        // Also the heartbeat that says whether Redis is up (and a master), between calls.
        let now: Option<String> =
            match tokio::time::timeout(self.timeout, inv.invoke_async(&mut con)).await {
                Ok(Ok(v)) => {
                    self.came_up();
                    v
                }
                Ok(Err(e)) => {
                    let _ = self.failed("epoch check", &e);
                    return;
                }
                Err(_) => {
                    let _ = self.failed("epoch check", &"timed out");
                    return;
                }
            };
        let mut seen = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(old), Some(new)) = (seen.as_ref(), now.as_ref()) {
            if old != new {
                self.resets.fetch_add(1, Ordering::Relaxed);
                // The shared reports went too: every replica ships its rows again.
                self.forget_shipped();
                log::error!(
                    "ledger: Redis at {} lost its data (restarted without persistence, flushed, \
                     or failed over to an empty replica): the current windows' spend starts \
                     again from what is settled from now on; caps allow more until the windows \
                     end (see docs/operations.md)",
                    self.target.display()
                );
            }
        }
        if now.is_some() {
            *seen = now;
        }
    }

    /// A round trip worked.
    fn came_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            log::info!("ledger: Redis at {} is reachable", self.target.display());
        }
    }

    /// The connection, once there is one; else the outage, counted.
    fn con(&self, what: &str) -> Result<Con, StoreDown> {
        match self.current() {
            Some(c) => Ok(c),
            None => Err(self.failed(
                what,
                &format!("not connected to Redis at {} yet", self.target.display()),
            )),
        }
    }

    fn lock_outbox(&self) -> std::sync::MutexGuard<'_, VecDeque<SettleCall>> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a settle Redis did not take, in memory and (with the next flush) in the file.
    fn keep(&self, call: SettleCall) {
        let payload = serde_json::to_string(&call).unwrap_or_default();
        self.rows.outbox_put(call.id.clone(), payload);
        let mut q = self.lock_outbox();
        if q.len() >= OUTBOX_MAX {
            if let Some(old) = q.pop_front() {
                self.rows.outbox_done(old.id.clone());
                self.errors.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "ledger: more than {OUTBOX_MAX} settles waiting for Redis: dropped the \
                     oldest ({})",
                    old.id
                );
            }
        }
        q.push_back(call);
    }

    /// Runs one settle; on success follows the spend it answers and signals soft caps.
    async fn run_settle(&self, call: &SettleCall) -> Result<(), ()> {
        let mut inv = self.settle.prepare_invoke();
        for k in &call.keys {
            inv.key(k);
        }
        for a in &call.args {
            inv.arg(a);
        }
        let Ok(mut con) = self.con("settle") else {
            return Err(());
        };
        let out: Vec<i64> =
            match tokio::time::timeout(self.timeout, inv.invoke_async(&mut con)).await {
                Ok(Ok(v)) => {
                    self.came_up();
                    v
                }
                Ok(Err(e)) => {
                    let _ = self.failed("settle", &e);
                    return Err(());
                }
                Err(_) => {
                    let _ = self.failed("settle", &"timed out");
                    return Err(());
                }
            };
        // An empty answer: an earlier attempt of this settle already ran.
        for (i, (key, window, start)) in call.holds.iter().enumerate() {
            let (Some(sp), Some(st), Some(crossed)) =
                (out.get(3 * i), out.get(3 * i + 1), out.get(3 * i + 2))
            else {
                break;
            };
            let Ok(window) = Window::parse(window) else {
                continue;
            };
            let spent = Amount {
                pico: (*sp).max(0) as u64,
                tokens: (*st).max(0) as u64,
            };
            self.follow(key, window, *start, spent);
            // The script added the call's cost to this counter atomically: what it held
            // before is known, and exactly one settle (on one replica) passes each threshold.
            let before = Amount {
                pico: spent.pico.saturating_sub(call.actual.0),
                tokens: spent.tokens.saturating_sub(call.actual.1),
            };
            let hook = self.soft.get();
            match (call.alerts.get(i), hook) {
                (Some((end, t)), Some(hook)) => {
                    for label in t.crossed(before, spent) {
                        hook(crate::budget::alerts::Alert::new(
                            key,
                            window,
                            *start,
                            *end,
                            label,
                            spent,
                            t,
                            crate::budget::now_unix(),
                        ));
                    }
                }
                // Kept by an older tokentap: the script's own soft signal.
                (None, Some(hook)) if *crossed == 1 => {
                    hook(crate::budget::alerts::Alert::new(
                        key,
                        window,
                        *start,
                        i64::MAX,
                        "soft".into(),
                        spent,
                        &Default::default(),
                        crate::budget::now_unix(),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Notes the spend of a counter's window (a newer window replaces an older one).
    fn follow(&self, key: &str, window: Window, start: i64, spent: Amount) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let e = seen
            .entry((key.to_string(), window))
            .or_insert((start, spent));
        if start >= e.0 {
            *e = (start, spent);
        }
    }

    /// Offers the outbox to Redis, oldest first, until Redis refuses one.
    /// Offers the outbox to Redis, many settles at a time, until it is empty or a whole
    /// round fails (order does not matter: settles commute, and each runs once). What fails
    /// goes to the back, so one settle Redis keeps refusing cannot hold up the others.
    async fn drain_outbox(&self) {
        const AT_ONCE: usize = 64;
        loop {
            let round: Vec<SettleCall> = {
                let mut q = self.lock_outbox();
                let n = q.len().min(AT_ONCE);
                q.drain(..n).collect()
            };
            if round.is_empty() {
                return;
            }
            let results = futures::future::join_all(round.iter().map(|c| self.run_settle(c))).await;
            let mut failed = 0;
            for (call, r) in round.into_iter().zip(results) {
                match r {
                    Ok(()) => self.rows.outbox_done(call.id),
                    Err(()) => {
                        failed += 1;
                        self.lock_outbox().push_back(call);
                    }
                }
            }
            if failed > 0 {
                // Redis refused some: try those again later.
                return;
            }
        }
    }

    /// Reads the spend of `counters` (subject key, window, start) into `seen`.
    async fn refresh(&self, counters: Vec<(String, Window, i64)>, tops: Vec<(Window, i64)>) {
        let Some(mut con) = self.current() else {
            return;
        };
        let mut all = counters;
        for (window, start) in tops {
            let key = self.top_key("user:", window, start);
            let users: redis::RedisResult<Vec<String>> = redis::cmd("ZREVRANGE")
                .arg(&key)
                .arg(0)
                .arg(FOLLOW_TOP - 1)
                .query_async(&mut con)
                .await;
            match users {
                Ok(u) => all.extend(u.into_iter().map(|u| (u, window, start))),
                Err(e) => {
                    let _ = self.failed("read", &e);
                    return;
                }
            }
        }
        all.sort();
        all.dedup();
        let mut pipe = redis::pipe();
        for (k, w, start) in &all {
            pipe.cmd("HMGET")
                .arg(self.key(k, *w, *start))
                .arg("sp")
                .arg("st");
        }
        let got: redis::RedisResult<Vec<(Option<u64>, Option<u64>)>> =
            pipe.query_async(&mut con).await;
        match got {
            Ok(v) => {
                for ((k, w, start), (sp, st)) in all.iter().zip(v) {
                    let spent = Amount {
                        pico: sp.unwrap_or(0),
                        tokens: st.unwrap_or(0),
                    };
                    self.follow(k, *w, *start, spent);
                }
            }
            Err(e) => {
                let _ = self.failed("read", &e);
            }
        }
    }
}

#[async_trait::async_trait]
impl Ledger for RedisLedger {
    async fn reserve(
        &self,
        policy: &BudgetPolicy,
        user: &str,
        worst: Amount,
        now: i64,
    ) -> Result<Result<Reservation, Rejection>, StoreDown> {
        let caps = policy.caps_for(user);
        if caps.is_empty() {
            return Ok(Ok(Reservation::new(policy, user, Vec::new(), worst)));
        }
        let zone = policy.offset();
        let mut holds = Vec::with_capacity(caps.len());
        let mut ends = Vec::with_capacity(caps.len());
        for (subject, cap) in &caps {
            let (h, end) = super::hold(subject, cap, now, zone);
            holds.push(h);
            ends.push(end);
        }
        let r = Reservation::new(policy, user, holds, worst);
        let inner = &self.inner;
        let mut inv = inner.reserve.prepare_invoke();
        inv.key(format!("{}:settled:{}", inner.prefix, r.id));
        inv.arg(lease_member(&r))
            .arg(clamp(worst.pico))
            .arg(clamp(worst.tokens))
            .arg(inner.lease.as_secs().max(1));
        for ((h, (_, cap)), end) in r.holds.iter().zip(&caps).zip(&ends) {
            let counter = inner.key(&h.key, h.window, h.start);
            let leases = format!("{counter}:leases");
            inv.key(counter).key(leases);
            inv.arg(cap.usd.map_or(-1, |p| clamp(p.0)))
                .arg(cap.tokens.map_or(-1, clamp))
                .arg(Self::expire_at(*end));
        }
        let mut con = match inner.con("reserve") {
            Ok(c) => c,
            // Nothing was sent: nothing to cancel.
            Err(down) => {
                r.claim();
                return Err(down);
            }
        };
        let reply: Result<Vec<i64>, StoreDown> =
            match tokio::time::timeout(inner.timeout, inv.invoke_async(&mut con)).await {
                Ok(Ok(v)) => {
                    inner.came_up();
                    Ok(v)
                }
                Ok(Err(e)) => Err(inner.failed("reserve", &e)),
                Err(_) => Err(inner.failed("reserve", &"timed out")),
            };
        let reply = match reply {
            Ok(v) => v,
            Err(down) => {
                // The script may have run and only its reply been lost: cancel the
                // reservation (a settle of nothing, which also stops the reserve should it
                // run later). Whatever happens, the lease's deadline releases it.
                if r.claim() {
                    self.send(self.settle_call(&r, Amount::default(), &ends));
                }
                return Err(down);
            }
        };
        match reply.first() {
            Some(0) => Ok(Ok(r)),
            Some(-1) | None => Err(StoreDown("reservation cancelled before it ran".into())),
            Some(_) => {
                let mut refused: Option<Rejection> = None;
                for f in reply.chunks_exact(3) {
                    let i = (f[0].max(1) as usize - 1).min(caps.len() - 1);
                    let rej = Rejection {
                        subject: caps[i].0.clone(),
                        window: caps[i].1.window,
                        resets_at: ends[i],
                        tokens: f[1] == 1,
                        in_flight: f[2] == 0,
                    };
                    if refused.as_ref().is_none_or(|old| rej.outranks(old)) {
                        refused = Some(rej);
                    }
                }
                // Nothing was reserved under this id.
                r.claim();
                Ok(Err(refused.expect("a refusal names at least one cap")))
            }
        }
    }

    fn settle(&self, r: &Reservation, actual: Amount, now: i64) {
        if r.holds.is_empty() {
            return;
        }
        let _ = now;
        let ends: Vec<i64> = r.holds.iter().map(|h| h.end).collect();
        self.send(self.settle_call(r, actual, &ends));
    }

    fn set_soft_hook(&self, hook: SoftHook) {
        let _ = self.inner.soft.set(hook);
    }

    fn renew(&self, held: &[Arc<Reservation>]) {
        let inner = Arc::clone(&self.inner);
        let mut calls: Vec<(Vec<String>, String)> = held
            .iter()
            .filter(|r| !r.holds.is_empty())
            .map(|r| {
                let keys = r
                    .holds
                    .iter()
                    .map(|h| format!("{}:leases", inner.key(&h.key, h.window, h.start)))
                    .collect();
                (keys, lease_member(r))
            })
            .collect();
        // The calls in flight of rate limits: the same script moves their deadlines on.
        calls.extend(
            inner
                .flights
                .iter()
                .map(|e| (e.value().clone(), e.key().clone())),
        );
        if calls.is_empty() {
            return;
        }
        let ttl = inner.lease.as_secs().max(1);
        self.rt.spawn(async move {
            let Some(mut con) = inner.current() else {
                return;
            };
            for (keys, member) in calls {
                let mut inv = inner.renew.prepare_invoke();
                for k in &keys {
                    inv.key(k);
                }
                inv.arg(&member).arg(ttl);
                let r =
                    tokio::time::timeout(inner.timeout, inv.invoke_async::<i64>(&mut con)).await;
                if !matches!(r, Ok(Ok(_))) {
                    let _ = inner.failed("renew", &"failed or timed out");
                    return;
                }
            }
        });
    }

    fn renew_every(&self) -> Option<Duration> {
        // A third of the lease: two renewals can fail before a live call loses its hold.
        Some((self.inner.lease / 3).max(Duration::from_millis(500)))
    }

    fn record_call(&self, row: CallRow) {
        self.inner.rows.record_call(row);
    }

    async fn spend(
        &self,
        subject: &Subject,
        window: Window,
        policy: &BudgetPolicy,
        now: i64,
    ) -> (Amount, Amount) {
        let (start, _) = window.bounds(now, policy.offset());
        let inner = &self.inner;
        let Some(mut con) = inner.current() else {
            return Default::default();
        };
        let key = inner.key(&subject.key(), window, start);
        let h: redis::RedisResult<(Option<u64>, Option<u64>, Option<u64>, Option<u64>)> =
            redis::cmd("HMGET")
                .arg(&key)
                .arg("sp")
                .arg("st")
                .arg("rp")
                .arg("rt")
                .query_async(&mut con)
                .await;
        match h {
            Ok((sp, st, rp, rt)) => (
                Amount {
                    pico: sp.unwrap_or(0),
                    tokens: st.unwrap_or(0),
                },
                Amount {
                    pico: rp.unwrap_or(0),
                    tokens: rt.unwrap_or(0),
                },
            ),
            Err(e) => {
                let _ = inner.failed("read", &e);
                (Amount::default(), Amount::default())
            }
        }
    }

    fn flush(&self) {
        let inner = &self.inner;
        // Wait (briefly) for settles on their way, offer the outbox once more, then write
        // the rows and what is still kept to the file.
        for _ in 0..200 {
            if inner.pending.load(Ordering::Acquire) <= 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Settles still unanswered go to the outbox (and so to the file): sent again at
        // the next start, applied at most once by their markers.
        let unanswered: Vec<SettleCall> = inner
            .unanswered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, c)| c)
            .collect();
        for c in unanswered {
            inner.keep(c);
        }
        let i2 = Arc::clone(inner);
        let _ = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(2), i2.drain_outbox()).await
        });
        let left = inner.lock_outbox().len();
        if left > 0 {
            log::warn!(
                "ledger: {left} settles wait for Redis in the ledger file (sent at next start)"
            );
        }
        inner.rows.flush();
        // And the rows just written, to the shared reports.
        let i2 = Arc::clone(inner);
        let _ = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(2), i2.ship_rows()).await
        });
    }

    fn counters(&self, policy: &BudgetPolicy, now: i64) -> Vec<(String, Window, Amount)> {
        let zone = policy.offset();
        // Refresh from Redis in the background (the next scrape sees it): the users with
        // caps of their own, and the top spenders under the default caps.
        if !self.inner.refreshing.swap(true, Ordering::AcqRel) {
            let mut counters = Vec::new();
            for (user, caps) in &policy.user_caps {
                for c in caps {
                    let key = Subject::User(user.clone()).key();
                    counters.push((key, c.window, c.window.bounds(now, zone).0));
                }
            }
            let tops: Vec<(Window, i64)> = policy
                .default_caps
                .iter()
                .map(|c| (c.window, c.window.bounds(now, zone).0))
                .collect();
            let inner = Arc::clone(&self.inner);
            self.rt.spawn(async move {
                let _ =
                    tokio::time::timeout(inner.timeout * 4, inner.refresh(counters, tops)).await;
                inner.refreshing.store(false, Ordering::Release);
            });
        }
        self.inner
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|((k, w), (start, a))| {
                let current = *start == w.bounds(now, zone).0;
                (k.clone(), *w, if current { *a } else { Amount::default() })
            })
            .collect()
    }

    async fn top(
        &self,
        policy: &BudgetPolicy,
        window: Window,
        limit: usize,
        now: i64,
    ) -> Vec<(String, Amount)> {
        let (start, _) = window.bounds(now, policy.offset());
        let inner = &self.inner;
        let Some(mut con) = inner.current() else {
            return Vec::new();
        };
        let users: redis::RedisResult<Vec<String>> = redis::cmd("ZREVRANGE")
            .arg(inner.top_key("user:", window, start))
            .arg(0)
            .arg(limit.clamp(1, isize::MAX as usize) as isize - 1)
            .query_async(&mut con)
            .await;
        let users = match users {
            Ok(u) => u,
            Err(e) => {
                let _ = inner.failed("read", &e);
                return Vec::new();
            }
        };
        let mut pipe = redis::pipe();
        for u in &users {
            pipe.cmd("HMGET")
                .arg(inner.key(u, window, start))
                .arg("sp")
                .arg("st");
        }
        let got: redis::RedisResult<Vec<(Option<u64>, Option<u64>)>> =
            pipe.query_async(&mut con).await;
        let got = match got {
            Ok(v) => v,
            Err(e) => {
                let _ = inner.failed("read", &e);
                return Vec::new();
            }
        };
        let mut v: Vec<(String, Amount)> = users
            .into_iter()
            .zip(got)
            .filter_map(|(u, (sp, st))| {
                let name = u.strip_prefix("user:")?.to_string();
                let a = Amount {
                    pico: sp.unwrap_or(0),
                    tokens: st.unwrap_or(0),
                };
                (a != Amount::default()).then_some((name, a))
            })
            .collect();
        v.sort_by(|a, b| b.1.pico.cmp(&a.1.pico).then(a.0.cmp(&b.0)));
        v
    }

    fn errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    fn file_writable(&self) -> Option<bool> {
        self.inner.rows.file_writable()
    }

    fn store_up(&self) -> Option<bool> {
        Some(self.inner.up.load(Ordering::Relaxed))
    }

    fn store_resets(&self) -> u64 {
        self.inner.resets.load(Ordering::Relaxed)
    }

    fn backend(&self) -> &'static str {
        "redis"
    }

    fn raise(&self, alert: crate::budget::alerts::Alert) {
        if let Some(hook) = self.inner.soft.get() {
            hook(alert);
        }
    }

    async fn claim_alert(&self, id: &str, until: i64) -> bool {
        let inner = &self.inner;
        let Ok(mut con) = inner.con("alert") else {
            // Raised rather than lost; another replica may raise it too.
            return true;
        };
        let mut set = redis::cmd("SET");
        set.arg(format!("{}:alerted:{id}", inner.prefix))
            .arg(1)
            .arg("NX");
        if until != i64::MAX {
            // (EX, not EXAT: Redis before 6.2 has no EXAT.)
            set.arg("EX")
                .arg((until - crate::budget::now_unix()).max(1));
        }
        match tokio::time::timeout(inner.timeout, set.query_async::<Option<String>>(&mut con)).await
        {
            Ok(Ok(v)) => v.is_some(),
            _ => true,
        }
    }

    async fn limit(
        &self,
        checks: &[crate::budget::limits::Check],
        tokens: u64,
        now: i64,
    ) -> Result<Result<crate::budget::limits::Grant, crate::budget::limits::Limited>, StoreDown>
    {
        use crate::budget::limits::{Grant, Kind, Limited, Standing};
        let inner = &self.inner;
        let id = super::reservation_id();
        let lease = inner.lease.as_secs().max(1) as i64;
        let mut inv = inner.limit.prepare_invoke();
        for c in checks {
            inv.key(inner.limit_key("w", &c.key))
                .key(inner.limit_key("f", &c.key));
        }
        inv.arg(now).arg(&id).arg(clamp(tokens)).arg(lease);
        for c in checks {
            let v = |o: Option<u64>| o.map_or(-1, clamp);
            inv.arg(v(c.limit.requests_per_minute))
                .arg(v(c.limit.tokens_per_minute))
                .arg(v(c.limit.concurrent));
        }
        let mut con = inner.con("limit")?;
        let reply: Vec<i64> =
            match tokio::time::timeout(inner.timeout, inv.invoke_async(&mut con)).await {
                Ok(Ok(v)) => {
                    inner.came_up();
                    v
                }
                Ok(Err(e)) => return Err(inner.failed("limit", &e)),
                Err(_) => return Err(inner.failed("limit", &"timed out")),
            };
        let n = |i: usize| reply.get(i).copied().unwrap_or(0).max(0) as u64;
        if reply.first() == Some(&0) {
            let flights: Vec<String> = checks
                .iter()
                .filter(|c| c.limit.concurrent.is_some())
                .map(|c| inner.limit_key("f", &c.key))
                .collect();
            if !flights.is_empty() {
                inner.flights.insert(id.clone(), flights);
            }
            let first = checks.first().map(|c| c.limit).unwrap_or_default();
            return Ok(Ok(Grant {
                id,
                checks: checks.to_vec(),
                // The second Redis counted it in (its clock, not this replica's).
                second: reply.get(5).copied().unwrap_or(now),
                tokens,
                standing: Standing {
                    requests: first
                        .requests_per_minute
                        .map(|l| (l, l.saturating_sub(n(1)), n(3))),
                    tokens: first
                        .tokens_per_minute
                        .map(|l| (l, l.saturating_sub(n(2)), n(4))),
                },
            }));
        }
        let kind = match n(0) {
            1 => Kind::Requests,
            2 => Kind::Tokens,
            _ => Kind::Concurrent,
        };
        let at = (n(1) as usize).saturating_sub(1);
        Ok(Err(Limited {
            key: checks.get(at).map(|c| c.key.clone()).unwrap_or_default(),
            kind,
            limit: n(2),
            retry_after: n(3).max(1),
        }))
    }

    fn unlimit(&self, grant: &crate::budget::limits::Grant, used: u64, undo: bool) {
        self.inner.flights.remove(&grant.id);
        let inner = Arc::clone(&self.inner);
        let g = grant.clone();
        self.rt.spawn(async move {
            let mut inv = inner.unlimit.prepare_invoke();
            for c in &g.checks {
                inv.key(inner.limit_key("w", &c.key))
                    .key(inner.limit_key("f", &c.key));
            }
            inv.arg(g.second)
                .arg(&g.id)
                .arg(clamp(g.tokens))
                .arg(clamp(used))
                .arg(if undo { 1 } else { 0 });
            // Not connected: tried again a few times (the script did not run); after that its
            // counts leave the minute by themselves and its lease ends. (A reply lost after it
            // ran is not retried: correcting the tokens twice would be wrong.)
            let mut con = None;
            for wait in [0u64, 1, 2, 4] {
                tokio::time::sleep(Duration::from_secs(wait)).await;
                if let Ok(c) = inner.con("unlimit") {
                    con = Some(c);
                    break;
                }
            }
            let Some(mut con) = con else {
                return;
            };
            match tokio::time::timeout(inner.timeout * 4, inv.invoke_async::<i64>(&mut con)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    inner.failed("unlimit", &e);
                }
                Err(_) => {
                    inner.failed("unlimit", &"timed out");
                }
            }
        });
    }

    fn history(&self) -> Arc<crate::budget::history::History> {
        self.inner.rows.history()
    }

    async fn shared_overview(
        &self,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
        top: (chrono::NaiveDate, chrono::NaiveDate),
        limit: usize,
    ) -> Option<Result<crate::budget::history::SharedOverview, String>> {
        Some(self.inner.shared_overview(from, to, top, limit).await)
    }

    async fn shared_by_model(
        &self,
        team: bool,
        name: &str,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
    ) -> Option<Result<Vec<(chrono::NaiveDate, String, crate::budget::report::Totals)>, String>>
    {
        Some(self.inner.shared_by_model(team, name, from, to).await)
    }

    async fn reset(&self, subject: &Subject, window: Window, policy: &BudgetPolicy, now: i64) {
        let (start, _) = window.bounds(now, policy.offset());
        let inner = &self.inner;
        let key = inner.key(&subject.key(), window, start);
        let Some(mut con) = inner.current() else {
            log::error!("ledger: reset not done: not connected to Redis");
            return;
        };
        let r: redis::RedisResult<()> = redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(&key)
            .arg("sp")
            .arg(0)
            .arg("st")
            .arg(0)
            .ignore()
            .cmd("ZREM")
            .arg(inner.top_key(&subject.key(), window, start))
            .arg(subject.key())
            .ignore()
            .query_async(&mut con)
            .await;
        if let Err(e) = r {
            let _ = inner.failed("reset", &e);
        }
        inner.follow(&subject.key(), window, start, Amount::default());
    }
}
