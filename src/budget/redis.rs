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
//! the connection manager reconnects by itself. Per-call rows for reports stay local (the
//! embedded ledger's file of this replica).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::embedded::Embedded;
use super::policy::{BudgetPolicy, LedgerConfig, Subject, Window};
use super::{Amount, CallRow, Hold, Ledger, Rejection, Reservation, StoreDown};

/// After a window ends, its counters are kept this long (for reports and late settles).
const KEEP_AFTER_END: i64 = 7 * 86_400;
/// A Redis round trip that takes longer than this counts as Redis being down.
const TIMEOUT: Duration = Duration::from_millis(500);

const RESERVE: &str = r#"
-- KEYS: one hash per cap. ARGV: worst pico, worst tokens, then per key: cap pico, cap
-- tokens (-1: none), expire-at (0: never). Returns {0, 0} when reserved, or {i, kind} for
-- the first cap that would pass (kind 0: USD, 1: tokens). Lua numbers are doubles: exact
-- to 2^53 pico-USD (9,007 USD) per window; past that the comparison is off by picodollars.
local wp = tonumber(ARGV[1])
local wt = tonumber(ARGV[2])
for i, k in ipairs(KEYS) do
  local b = 2 + (i - 1) * 3
  local cp = tonumber(ARGV[b + 1])
  local ct = tonumber(ARGV[b + 2])
  local h = redis.call('HMGET', k, 'sp', 'st', 'rp', 'rt')
  local sp, st = tonumber(h[1] or '0'), tonumber(h[2] or '0')
  local rp, rt = tonumber(h[3] or '0'), tonumber(h[4] or '0')
  if cp >= 0 and sp + rp + wp > cp then return {i, 0} end
  if ct >= 0 and st + rt + wt > ct then return {i, 1} end
end
for i, k in ipairs(KEYS) do
  redis.call('HINCRBY', k, 'rp', ARGV[1])
  redis.call('HINCRBY', k, 'rt', ARGV[2])
  local exp = tonumber(ARGV[2 + (i - 1) * 3 + 3])
  if exp > 0 then redis.call('EXPIREAT', k, exp) end
end
return {0, 0}
"#;

const SETTLE: &str = r#"
-- KEYS: a marker for this reservation, then the key of each hold (the window it reserved in,
-- so a call across a window's end stays visible to the window that admitted it). ARGV:
-- minus the worst pico and tokens, the real pico and tokens, as integer strings made in
-- Rust. Runs at most once per reservation (a retried settle whose first reply was lost
-- must not release or charge twice).
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 604800) then return 1 end
for i = 2, #KEYS do
  if ARGV[1] ~= '0' then redis.call('HINCRBY', KEYS[i], 'rp', ARGV[1]) end
  if ARGV[2] ~= '0' then redis.call('HINCRBY', KEYS[i], 'rt', ARGV[2]) end
  if ARGV[3] ~= '0' then redis.call('HINCRBY', KEYS[i], 'sp', ARGV[3]) end
  if ARGV[4] ~= '0' then redis.call('HINCRBY', KEYS[i], 'st', ARGV[4]) end
end
return 0
"#;

pub struct RedisLedger {
    /// Runs the connection's driver and the settles: it must outlive start-up, and settles
    /// must be able to start from any thread.
    rt: tokio::runtime::Runtime,
    con: ConnectionManager,
    prefix: String,
    reserve: Script,
    settle: Script,
    /// Per-call rows for reports (and nothing else) go to this replica's embedded file.
    rows: Arc<Embedded>,
    errors: Arc<AtomicU64>,
    /// Settles sent and not yet answered (flushed at shutdown).
    pending: Arc<AtomicI64>,
    /// The last spend this replica saw per counter (for metrics, which cannot wait on Redis).
    seen: Mutex<HashMap<(String, Window), (i64, Amount)>>,
}

impl RedisLedger {
    /// Connects (the first connection must work; later losses are retried by themselves).
    pub fn open(cfg: &LedgerConfig) -> Result<Arc<Self>, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tokentap-redis")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let con = rt.block_on(Self::connect(cfg))?;
        Ok(Arc::new(RedisLedger {
            rt,
            con,
            prefix: cfg.redis_prefix.clone(),
            reserve: Script::new(RESERVE),
            settle: Script::new(SETTLE),
            rows: Embedded::open(cfg)?,
            errors: Arc::new(AtomicU64::new(0)),
            pending: Arc::new(AtomicI64::new(0)),
            seen: Mutex::new(HashMap::new()),
        }))
    }

    async fn connect(cfg: &LedgerConfig) -> Result<ConnectionManager, String> {
        let url = cfg.redis_url.as_deref().unwrap_or_default();
        let client =
            redis::Client::open(url).map_err(|e| format!("budgets.ledger.redis_url: {e}"))?;
        let mcfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1);
        tokio::time::timeout(
            Duration::from_secs(5),
            ConnectionManager::new_with_config(client, mcfg),
        )
        .await
        .map_err(|_| format!("cannot reach Redis at {url}: timed out"))?
        .map_err(|e| format!("cannot reach Redis at {url}: {e}"))
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

    fn expire_at(end: i64) -> i64 {
        if end == i64::MAX {
            0
        } else {
            end + KEEP_AFTER_END
        }
    }

    fn failed(&self, what: &str, e: &dyn std::fmt::Display) -> StoreDown {
        if self
            .errors
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(100)
        {
            log::error!("ledger: Redis {what} failed: {e}");
        }
        StoreDown(e.to_string())
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
        let offset = policy.offset();
        let mut inv = self.reserve.prepare_invoke();
        inv.arg(worst.pico.min(i64::MAX as u64))
            .arg(worst.tokens.min(i64::MAX as u64));
        let mut holds = Vec::with_capacity(caps.len());
        let mut ends = Vec::with_capacity(caps.len());
        for (subject, cap) in &caps {
            let (start, end) = cap.window.bounds(now, offset);
            let key = subject.key();
            inv.key(self.key(&key, cap.window, start));
            let clamp = |v: u64| v.min(i64::MAX as u64) as i64;
            inv.arg(cap.usd.map_or(-1, |p| clamp(p.0)))
                .arg(cap.tokens.map_or(-1, clamp))
                .arg(Self::expire_at(end));
            holds.push(Hold {
                key,
                window: cap.window,
                soft_usd: cap.soft_usd.map(|p| p.0),
                soft_tokens: cap.soft_tokens,
                start,
            });
            ends.push(end);
        }
        if caps.is_empty() {
            return Ok(Ok(Reservation::new(policy, user, holds, worst)));
        }
        let mut con = self.con.clone();
        let (i, kind): (usize, u8) =
            match tokio::time::timeout(TIMEOUT, inv.invoke_async(&mut con)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(self.failed("reserve", &e)),
                Err(_) => return Err(self.failed("reserve", &"timed out")),
            };
        if i > 0 {
            let (subject, cap) = &caps[i - 1];
            return Ok(Err(Rejection {
                subject: subject.clone(),
                window: cap.window,
                resets_at: ends[i - 1],
                tokens: kind == 1,
            }));
        }
        Ok(Ok(Reservation::new(policy, user, holds, worst)))
    }

    fn settle(&self, r: &Reservation, actual: Amount, now: i64) -> Vec<Hold> {
        let mut crossed_holds = Vec::new();
        if r.holds.is_empty() {
            return crossed_holds;
        }
        // Integer strings (a Lua-negated "0" would be "-0", which HINCRBY refuses), clamped
        // to Redis' int64.
        let int = |v: u64| v.min(i64::MAX as u64).to_string();
        let neg = |v: u64| {
            if v == 0 {
                "0".to_string()
            } else {
                format!("-{}", int(v))
            }
        };
        let mut keys = Vec::with_capacity(1 + r.holds.len());
        keys.push(format!("{}:settled:{}", self.prefix, r.id));
        let args: Vec<String> = vec![
            neg(r.worst.pico),
            neg(r.worst.tokens),
            int(actual.pico),
            int(actual.tokens),
        ];
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            for h in &r.holds {
                let (start, _) = h.window.bounds(now, r.offset);
                keys.push(self.key(&h.key, h.window, h.start));
                let e = seen
                    .entry((h.key.clone(), h.window))
                    .or_insert((start, Amount::default()));
                if e.0 != start {
                    *e = (start, Amount::default());
                }
                // Soft thresholds are judged on this replica's view of the spend.
                let before = e.1;
                e.1.add(actual);
                if h.passes_soft(before, e.1) {
                    crossed_holds.push(h.clone());
                }
            }
        }
        let mut con = self.con.clone();
        let pending = Arc::clone(&self.pending);
        let errors = Arc::clone(&self.errors);
        let user = r.user.clone();
        let script = self.settle.clone();
        pending.fetch_add(1, Ordering::AcqRel);
        // Settling must not hold up the response: the script runs on the ledger's runtime,
        // retried once if Redis was briefly away.
        self.rt.spawn(async move {
            let mut inv = script.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            for a in &args {
                inv.arg(a);
            }
            let mut last = None;
            for _ in 0..3 {
                match inv.invoke_async::<i64>(&mut con).await {
                    Ok(_) => {
                        last = None;
                        break;
                    }
                    Err(e) => {
                        last = Some(e);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            if let Some(e) = last {
                errors.fetch_add(1, Ordering::Relaxed);
                log::error!("ledger: Redis settle for {user:?} failed: {e}; its spend is lost");
            }
            pending.fetch_sub(1, Ordering::AcqRel);
        });
        crossed_holds
    }

    fn record_call(&self, row: CallRow) {
        self.rows.record_call(row);
    }

    async fn spend(
        &self,
        subject: &Subject,
        window: Window,
        policy: &BudgetPolicy,
        now: i64,
    ) -> (Amount, Amount) {
        let (start, _) = window.bounds(now, policy.offset());
        let mut con = self.con.clone();
        let key = self.key(&subject.key(), window, start);
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
                let _ = self.failed("read", &e);
                (Amount::default(), Amount::default())
            }
        }
    }

    fn flush(&self) {
        // Wait (briefly) for settles still on their way, then the local rows.
        for _ in 0..200 {
            if self.pending.load(Ordering::Acquire) <= 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.rows.flush();
    }

    fn counters(&self, policy: &BudgetPolicy, now: i64) -> Vec<(String, Window, Amount)> {
        let offset = policy.offset();
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|((k, w), (start, a))| {
                let current = *start == w.bounds(now, offset).0;
                (k.clone(), *w, if current { *a } else { Amount::default() })
            })
            .collect()
    }

    fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    async fn reset(&self, subject: &Subject, window: Window, policy: &BudgetPolicy, now: i64) {
        let (start, _) = window.bounds(now, policy.offset());
        let key = self.key(&subject.key(), window, start);
        let mut con = self.con.clone();
        let r: redis::RedisResult<()> = redis::cmd("HSET")
            .arg(&key)
            .arg("sp")
            .arg(0)
            .arg("st")
            .arg(0)
            .query_async(&mut con)
            .await;
        if let Err(e) = r {
            let _ = self.failed("reset", &e);
        }
        if let Some(e) = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&(subject.key(), window))
        {
            e.1 = Amount::default();
        }
    }
}
