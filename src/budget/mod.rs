//! Budgets: caps that hold under concurrency.
//!
//! Before the upstream sees a chat call, its worst-case cost (the prompt estimated from the
//! body, the output cap, the searches it may run) is reserved atomically against every cap
//! that applies to its user and the user's teams; if any hard cap could be passed, the call is
//! refused with 429. When the call ends, its record settles the reservation to the real cost
//! (the estimate for a cut-off stream; nothing when the upstream failed and billed nothing).
//! Concurrent first requests therefore cannot overshoot a cap by more than one call's worst
//! case, whatever their number.

pub mod alerts;
mod collector;
mod decision;
pub mod embedded;
pub mod history;
pub mod limits;
mod open_calls;
pub mod policy;
pub mod redis;
pub mod report;
pub mod rollup;
mod sink;
mod view;

pub use collector::BudgetCollector;
pub use decision::{
    decide, forget_refusal, limit, ratelimit_headers, refused_now, worst_case, Decision, Refusal,
};
pub use open_calls::{OpenCall, OpenCalls, OpenGuard};
pub use sink::{actual, soft_hook, LedgerSink};
pub use view::*;

use std::sync::Arc;

use crate::meter::Usage;
use policy::{BudgetPolicy, Subject, Window};

/// Money and tokens, together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    pub pico: u64,
    pub tokens: u64,
}

impl Amount {
    fn add(&mut self, o: Amount) {
        self.pico = self.pico.saturating_add(o.pico);
        self.tokens = self.tokens.saturating_add(o.tokens);
    }
    fn sub(&mut self, o: Amount) {
        self.pico = self.pico.saturating_sub(o.pico);
        self.tokens = self.tokens.saturating_sub(o.tokens);
    }
}

/// What a call holds against its caps until it settles.
#[derive(Debug)]
pub struct Reservation {
    /// Unique per reservation (process, time, counter): settles are applied once per id.
    pub id: String,
    pub user: String,
    pub teams: Vec<String>,
    pub holds: Vec<Hold>,
    pub worst: Amount,
    /// The zone calendar windows were computed in.
    pub offset: policy::Zone,
    /// Taken by whoever settles it: the call's record, or (for a call that never gets one)
    /// its guard or the shutdown. A reservation is settled exactly once.
    settled: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub key: String,
    pub window: Window,
    /// Soft thresholds of the cap (signalled when settled spend passes them).
    pub soft_usd: Option<u64>,
    pub soft_tokens: Option<u64>,
    /// Start of the window the reservation was made in.
    pub start: i64,
    /// And its end, as found when reserving. (Found again from `start` at settle time it can
    /// differ: where the zone's offset changes by half an hour, Lord Howe's, the hours before
    /// and after the change overlap, and the offset at `start` is the one before.)
    pub end: i64,
    /// What its settles raise alerts at.
    pub alert: alerts::Thresholds,
}

impl Reservation {
    /// A new reservation of `worst` for `user`, holding `holds`.
    pub fn new(policy: &BudgetPolicy, user: &str, holds: Vec<Hold>, worst: Amount) -> Self {
        Reservation {
            id: reservation_id(),
            user: user.to_string(),
            teams: policy.teams_of(user).to_vec(),
            holds,
            worst,
            offset: policy.offset(),
            settled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// True for the one caller that gets to settle this reservation.
    pub fn claim(&self) -> bool {
        !self.settled.swap(true, std::sync::atomic::Ordering::AcqRel)
    }
}

/// Told of every alert a settle raises (a threshold of a cap passed: a fraction of it, or
/// its soft threshold).
pub type SoftHook = Arc<dyn Fn(alerts::Alert) + Send + Sync>;

/// The hold a cap takes on a call made at `now`, and the end of its window.
pub fn hold(subject: &Subject, cap: &policy::Cap, now: i64, zone: policy::Zone) -> (Hold, i64) {
    let (start, end) = cap.window.bounds(now, zone);
    (
        Hold {
            key: subject.key(),
            window: cap.window,
            soft_usd: cap.soft_usd.map(|p| p.0),
            soft_tokens: cap.soft_tokens,
            start,
            end,
            alert: alerts::Thresholds {
                cap_usd: cap.usd.map(|p| p.0),
                cap_tokens: cap.tokens,
                at: cap.alerts.clone(),
                soft_usd: cap.soft_usd.map(|p| p.0),
                soft_tokens: cap.soft_tokens,
            },
        },
        end,
    )
}

/// The holds a call of `user` made at `now` takes: one per cap that applies to it.
pub fn holds_for(policy: &BudgetPolicy, user: &str, now: i64) -> Vec<Hold> {
    let zone = policy.offset();
    policy
        .caps_for(user)
        .iter()
        .map(|(s, c)| hold(s, c, now, zone).0)
        .collect()
}

/// A reservation id unique across processes, replicas and restarts: the process's own
/// prefix (pid, the time of its first reservation and 32 random bits: replicas in containers
/// all run as pid 1) and a counter. The prefix is made once: `getpid` and formatting per call
/// cost a syscall and ~1,700 instructions.
pub fn reservation_id() -> String {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        format!(
            "{:x}-{:x}-{:08x}-",
            std::process::id(),
            t,
            rand::random::<u32>()
        )
    });
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut id = String::with_capacity(prefix.len() + 16);
    id.push_str(prefix);
    push_hex(&mut id, n);
    id
}

/// `n` in lowercase hex, as `{:x}` writes it.
fn push_hex(s: &mut String, n: u64) {
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        s.push(char::from(
            b"0123456789abcdef"[(n >> (i * 4)) as usize & 0xf],
        ));
    }
}

/// A cap the call would pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub subject: Subject,
    pub window: Window,
    /// Unix seconds when the window resets (`i64::MAX` for `total`).
    pub resets_at: i64,
    pub tokens: bool,
    /// Settled spend alone leaves room: the caller's own calls still in flight hold the rest,
    /// and it can retry as soon as they end.
    pub in_flight: bool,
}

impl Rejection {
    /// Of two caps that refuse a call, the one to report: a cap that settled spend has passed
    /// outranks one blocked only by calls in flight, and then the one that resets last (the
    /// caller cannot get through before that).
    pub fn outranks(&self, other: &Rejection) -> bool {
        (!self.in_flight, self.resets_at) > (!other.in_flight, other.resets_at)
    }
}

/// A per-call row for reports.
#[derive(Debug, Clone)]
pub struct CallRow {
    pub ts: i64,
    pub request_id: String,
    pub user: Option<String>,
    pub teams: Vec<String>,
    pub model: Option<String>,
    /// The call's dialect.
    pub api: Option<crate::meter::Api>,
    pub usage: Usage,
    pub cost_pico: Option<u64>,
    pub estimated: bool,
    pub outcome: &'static str,
    pub status: u16,
    /// From the request's head to the record (`None` for a call that never got one).
    pub duration_ms: Option<u64>,
    /// `reported`, `estimated` or `none`.
    pub usage_source: &'static str,
}

impl CallRow {
    /// The call's figures, as reports add them up.
    pub fn totals(&self) -> report::Totals {
        report::Totals {
            calls: 1,
            prompt: self.usage.prompt,
            completion: self.usage.completion,
            cached: self.usage.cached,
            cache_write: self.usage.cache_write,
            reasoning: self.usage.reasoning,
            searches: self.usage.web_searches,
            cost: self.cost_pico.unwrap_or(0),
            estimated: u64::from(self.estimated),
            unpriced: u64::from(self.cost_pico.is_none()),
            errors: u64::from(self.outcome != "complete" || self.status >= 400),
        }
    }
}

/// The ledger's store failed; the config says whether calls go ahead (`fail_open`).
#[derive(Debug, Clone)]
pub struct StoreDown(pub String);

/// Where spend is kept. One trait, two backends (embedded, Redis).
#[async_trait::async_trait]
pub trait Ledger: Send + Sync {
    /// Atomically reserves `worst` against every cap in `caps`, or refuses without reserving.
    async fn reserve(
        &self,
        policy: &BudgetPolicy,
        user: &str,
        worst: Amount,
        now: i64,
    ) -> Result<Result<Reservation, Rejection>, StoreDown>;
    /// Releases a reservation and charges what the call really cost (to the windows it
    /// reserved in). Must not block; a store that cannot take it now keeps it until it can.
    fn settle(&self, r: &Reservation, actual: Amount, now: i64);
    /// Called for every soft threshold a settle passes (once, across replicas).
    fn set_soft_hook(&self, hook: SoftHook);
    /// Extends the leases of reservations still held by calls in flight (stores whose
    /// reservations expire; the embedded ledger's live as long as the process).
    fn renew(&self, _held: &[Arc<Reservation>]) {}
    /// How often `renew` should run, if the store needs it.
    fn renew_every(&self) -> Option<std::time::Duration> {
        None
    }
    /// Records a call for reports (whether or not it was capped).
    fn record_call(&self, row: CallRow);
    /// Spend so far in the window containing `now`, for `subject` (committed, reserved).
    async fn spend(
        &self,
        subject: &Subject,
        window: Window,
        policy: &BudgetPolicy,
        now: i64,
    ) -> (Amount, Amount);
    /// Writes what is pending (at shutdown).
    fn flush(&self);
    /// The spend of capped counters in their current window, as last seen (for metrics,
    /// which cannot wait on a store): (ledger key, window, spent).
    fn counters(&self, policy: &BudgetPolicy, now: i64) -> Vec<(String, Window, Amount)>;
    /// The `limit` users who spent most in the current `window`.
    async fn top(
        &self,
        policy: &BudgetPolicy,
        window: Window,
        limit: usize,
        now: i64,
    ) -> Vec<(String, Amount)>;
    /// How often the ledger failed to persist or reach its store.
    fn errors(&self) -> u64;
    /// Whether a shared store (Redis) answered its last round trip; `None` for a ledger
    /// without one.
    fn store_up(&self) -> Option<bool> {
        None
    }
    /// Whether the last write to the ledger's own file worked; `None` without a file.
    fn file_writable(&self) -> Option<bool> {
        None
    }
    /// Times the shared store was seen to have lost its data (0 without one).
    fn store_resets(&self) -> u64 {
        0
    }
    /// Forgets the spend of `subject` in the current `window` (an operator's reset).
    async fn reset(&self, subject: &Subject, window: Window, policy: &BudgetPolicy, now: i64);
    /// Counts a call of `tokens` (its worst case) against the rate limits of `checks` at
    /// second `now`, or refuses it (counting nothing) with the limit it would pass.
    async fn limit(
        &self,
        checks: &[limits::Check],
        tokens: u64,
        now: i64,
    ) -> Result<Result<limits::Grant, limits::Limited>, StoreDown>;
    /// Settles a call counted by [`Ledger::limit`]: its tokens become `used`, and it leaves
    /// the calls in flight; `undo`, it never went and counts nothing. Must not block.
    fn unlimit(&self, grant: &limits::Grant, used: u64, undo: bool);
    /// Whether this replica is the one to raise alert `id` (a marker until `until`, Unix
    /// seconds, in the shared store; `true` without one).
    async fn claim_alert(&self, _id: &str, _until: i64) -> bool {
        true
    }
    /// Raises an alert found outside a settle (a cap that refused a call is at 100 %).
    fn raise(&self, _alert: alerts::Alert) {}
    /// `embedded` or `redis`.
    fn backend(&self) -> &'static str;
    /// The reader of this replica's ledger file (its per-call rows and rollups).
    fn history(&self) -> Arc<history::History>;
    /// What all replicas share for the admin page's overview (the Redis ledger): the totals
    /// of each of days `from..=to` and the top `limit` users, teams and models of days
    /// `top.0..=top.1`; `None` where the ledger file is the whole record (the embedded one).
    async fn shared_overview(
        &self,
        _from: chrono::NaiveDate,
        _to: chrono::NaiveDate,
        _top: (chrono::NaiveDate, chrono::NaiveDate),
        _limit: usize,
    ) -> Option<Result<history::SharedOverview, String>> {
        None
    }
    /// A user's (or, `team`, a team's) spend per day and model on days `from..=to` as all
    /// replicas share it; `None` as for [`Ledger::shared_overview`].
    async fn shared_by_model(
        &self,
        _team: bool,
        _name: &str,
        _from: chrono::NaiveDate,
        _to: chrono::NaiveDate,
    ) -> Option<Result<Vec<(chrono::NaiveDate, String, report::Totals)>, String>> {
        None
    }
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn push_hex_writes_what_lower_hex_formatting_writes(n: u64, shift in 0u32..64) {
            for n in [n, n >> shift] {
                let mut s = String::from("x");
                push_hex(&mut s, n);
                proptest::prop_assert_eq!(s, format!("x{n:x}"));
            }
        }
    }

    /// Lord Howe springs forward by 30 minutes (2026-10-04, 02:00 +10:30 to 02:30 +11:00,
    /// 15:30 UTC): the hour reserved in at 15:40 UTC is 15:00–16:00 UTC (local 02:00–03:00
    /// at +11). Found again from its start, 15:00 UTC, it would be 14:30–15:30 (the offset
    /// then was +10:30), and the Redis ledger set its counter to expire half an hour early:
    /// a hold keeps the end found when reserving.
    #[test]
    fn a_hold_keeps_its_windows_end_across_lord_howes_half_hour_change() {
        let zone = policy::Zone::Named("Australia/Lord_Howe".parse().unwrap());
        let cap = policy::Cap {
            window: Window::Hourly,
            usd: None,
            tokens: Some(1),
            soft_usd: None,
            soft_tokens: None,
            alerts: Vec::new(),
        };
        let change = 1_791_041_400; // 2026-10-03T15:30:00Z
        let now = change + 600;
        let (h, end) = hold(&Subject::User("u".into()), &cap, now, zone);
        assert_eq!(
            (h.start, h.end, end),
            (change - 1800, change + 1800, change + 1800)
        );
        assert_eq!(
            Window::Hourly.bounds(h.start, zone),
            (change - 3600, change)
        );
        // Before the change, an hour is 14:30–15:30 UTC, as at +10:30.
        let (before, _) = hold(&Subject::User("u".into()), &cap, change - 600, zone);
        assert_eq!((before.start, before.end), (change - 3600, change));
    }

    #[test]
    fn reservation_ids_share_the_process_prefix_and_never_repeat() {
        let a = reservation_id();
        let b = reservation_id();
        assert_ne!(a, b);
        let prefix = |s: &str| s[..s.rfind('-').unwrap()].to_string();
        assert_eq!(prefix(&a), prefix(&b));
        assert!(prefix(&a).starts_with(&format!("{:x}-", std::process::id())));
        for n in [0, 9, 10, 255, u64::MAX] {
            let mut s = String::new();
            push_hex(&mut s, n);
            assert_eq!(s, format!("{n:x}"));
        }
    }
}
