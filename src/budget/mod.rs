//! Budgets: caps that hold under concurrency.
//!
//! Before the upstream sees a chat call, its worst-case cost (the prompt estimated from the
//! body, the output cap, the searches it may run) is reserved atomically against every cap
//! that applies to its user and the user's teams; if any hard cap could be passed, the call is
//! refused with 429. When the call ends, its record settles the reservation to the real cost
//! (the estimate for a cut-off stream; nothing when the upstream failed and billed nothing).
//! Concurrent first requests therefore cannot overshoot a cap by more than one call's worst
//! case, whatever their number.

pub mod embedded;
pub mod policy;
pub mod redis;
pub mod report;

use std::sync::Arc;

use crate::config::Config;
use crate::meter::{estimate_tokens, Usage, UsageRecord};
use crate::openai::request::RequestMeta;
use crate::openai::ApiError;
use policy::{BudgetPolicy, MissingUser, Subject, Window};

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
}

impl Hold {
    /// Whether going from `before` to `after` passes one of this hold's soft thresholds.
    pub fn passes_soft(&self, before: Amount, after: Amount) -> bool {
        let crossed = |soft: Option<u64>, b: u64, a: u64| soft.is_some_and(|s| b <= s && a > s);
        crossed(self.soft_usd, before.pico, after.pico)
            || crossed(self.soft_tokens, before.tokens, after.tokens)
    }
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

/// Told when settled spend passes a cap's soft threshold.
pub type SoftHook = Arc<dyn Fn(&Hold) + Send + Sync>;

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
    pub usage: Usage,
    pub cost_pico: Option<u64>,
    pub estimated: bool,
    pub outcome: &'static str,
    pub status: u16,
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
    /// Forgets the spend of `subject` in the current `window` (an operator's reset).
    async fn reset(&self, subject: &Subject, window: Window, policy: &BudgetPolicy, now: i64);
}

/// The decision about a call, made when its body is complete.
pub enum Decision {
    /// Go ahead, holding this reservation (none when nothing is capped for the caller).
    Allow(Option<Arc<Reservation>>),
    /// Let through unchecked because the store is down and `on_error` says `fail_open`
    /// (counted in `tokentap_budget_fail_open_total`). The call still carries a reservation of
    /// nothing, so its real cost is charged once the store is back.
    Unchecked(Option<Arc<Reservation>>),
    /// Refused: the answer, and why.
    Refuse(ApiError, Refusal),
}

/// Why a call was refused before the upstream saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A cap of the user (or of `team`, when not empty) would be passed; in tokens or USD.
    OverBudget {
        user: String,
        team: String,
        tokens: bool,
    },
    /// The request names no user and `missing_user = "reject"`.
    UserRequired,
    /// The body could not be read, so the call could not be capped.
    UnreadableBody,
    /// The budget store cannot be reached and `on_error = "fail_closed"`.
    StoreUnavailable,
}

impl Refusal {
    /// The `reason` label of `tokentap_budget_rejections_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::OverBudget { tokens: true, .. } => "tokens",
            Refusal::OverBudget { tokens: false, .. } => "usd",
            Refusal::UserRequired => "user_required",
            Refusal::UnreadableBody => "invalid_body",
            Refusal::StoreUnavailable => "store_unavailable",
        }
    }
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The most a call can cost: the prompt (estimated from the body), its output cap (or the
/// model's, or the default), and the searches it may run.
pub fn worst_case(meta: &RequestMeta, cfg: &Config) -> Amount {
    let policy = &cfg.budgets;
    // A model the table cannot price is assumed to cost as much as the dearest one: the
    // upstream may bill it under a priced name, and a USD cap must still hold.
    let price = cfg
        .pricing
        .lookup(None, meta.model.as_deref())
        .or_else(|| cfg.pricing.dearest());
    let prompt = estimate_tokens(meta.prompt_text_bytes + meta.other_text_bytes);
    let per_choice = meta
        .output_cap()
        .or_else(|| price.and_then(|p| p.max_output_tokens))
        .unwrap_or(policy.default_max_output_tokens);
    let output = per_choice.saturating_mul(meta.n.unwrap_or(1).max(1));
    let searches = if meta.web_search_requested() {
        meta.tool_max_searches
            .unwrap_or(policy.default_max_searches)
    } else {
        0
    };
    // Priced at the dearer of output and reasoning, whichever the output turns out to be.
    let reasoning_dearer = price.is_some_and(|p| p.reasoning.is_some_and(|r| r > p.output));
    let usage = Usage {
        prompt,
        completion: output,
        cached: 0,
        reasoning: if reasoning_dearer { output } else { 0 },
        web_searches: searches,
    };
    // Beyond 2^53 (9,007 USD, or 9e15 tokens, for one call) amounts lose exactness in the
    // Redis scripts' arithmetic; no real call comes near, and such a call is refused anyway.
    const MAX: u64 = 1 << 53;
    Amount {
        pico: price.map_or(0, |p| p.cost(&usage).0).min(MAX),
        tokens: prompt.saturating_add(output).min(MAX),
    }
}

/// Decides about a chat call (`meta` is `None` when its body was not a JSON object).
pub async fn decide(ledger: &dyn Ledger, cfg: &Config, meta: Option<&RequestMeta>) -> Decision {
    let policy = &cfg.budgets;
    if !policy.enforcing() {
        return Decision::Allow(None);
    }
    // A chat body tokentap cannot read cannot be capped: refuse it rather than let it through.
    let Some(meta) = meta else {
        return Decision::Refuse(
            ApiError::new(
                400,
                "invalid_request_error",
                "This proxy enforces budgets and could not read the request body: send a JSON \
                 object (UTF-8, not compressed with an unsupported encoding).",
            )
            .code("invalid_body"),
            Refusal::UnreadableBody,
        );
    };
    // An empty user names nobody.
    let user =
        match (
            meta.user.as_deref().filter(|u| !u.is_empty()),
            policy.missing_user,
        ) {
            (Some(u), _) => u.to_string(),
            (None, MissingUser::Allow) => return Decision::Allow(None),
            (None, MissingUser::DefaultUser) => policy.default_user.clone(),
            (None, MissingUser::Reject) => return Decision::Refuse(
                ApiError::new(
                    400,
                    "invalid_request_error",
                    "This proxy enforces per-user budgets: set the `user` field of the request \
                     to the end user's id.",
                )
                .param("user")
                .code("user_required"),
                Refusal::UserRequired,
            ),
        };
    let now = now_unix();
    match ledger
        .reserve(policy, &user, worst_case(meta, cfg), now)
        .await
    {
        Err(StoreDown(why)) => {
            if policy.ledger.fail_open {
                log::warn!(
                    "budget store unavailable ({why}): letting the call through (fail_open)"
                );
                let holds = holds_for(policy, &user, now);
                Decision::Unchecked(
                    (!holds.is_empty()).then(|| {
                        Arc::new(Reservation::new(policy, &user, holds, Amount::default()))
                    }),
                )
            } else {
                Decision::Refuse(
                    ApiError::new(
                        503,
                        "api_error",
                        "The budget store is unavailable, so this proxy cannot check your \
                         budget. Retry shortly.",
                    )
                    .code("budget_store_unavailable"),
                    Refusal::StoreUnavailable,
                )
            }
        }
        Ok(Ok(r)) => Decision::Allow(Some(Arc::new(r))),
        Ok(Err(rej)) => {
            let team = match &rej.subject {
                Subject::Team(t) => t.clone(),
                Subject::User(_) => String::new(),
            };
            let why = Refusal::OverBudget {
                user,
                team,
                tokens: rej.tokens,
            };
            Decision::Refuse(refusal(&rej, now), why)
        }
    }
}

/// The `Retry-After` of a call refused only because of the caller's calls in flight.
const IN_FLIGHT_RETRY_S: u64 = 5;

/// The 429 for a refused call: it names the caller's own window and when it resets, and
/// nothing about anyone's spend.
fn refusal(r: &Rejection, now: i64) -> ApiError {
    let whose = match &r.subject {
        Subject::User(_) => "your".to_string(),
        Subject::Team(t) => format!("your team {t:?}'s"),
    };
    let what = if r.tokens { "token" } else { "spending" };
    let (when, retry) = if r.in_flight {
        // Spend settled so far leaves room; the caller's calls still running hold it.
        (
            "Calls still in flight hold the rest of it; retry when they finish.".to_string(),
            Some(IN_FLIGHT_RETRY_S.min((r.resets_at - now).max(1) as u64)),
        )
    } else if r.resets_at == i64::MAX {
        (
            "It does not reset; ask the operator to raise it.".to_string(),
            None,
        )
    } else {
        let at = chrono::DateTime::from_timestamp(r.resets_at, 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        (
            format!("It resets at {at}."),
            Some((r.resets_at - now).max(1) as u64),
        )
    };
    let mut e = ApiError::new(
        429,
        "budget_exceeded",
        format!(
            "This request could exceed {whose} {} {what} budget. {when}",
            r.window
        ),
    )
    .code("budget_exceeded");
    e.retry_after = retry;
    e
}

/// What a record settles: its cost and tokens (zero when the upstream billed nothing).
pub fn actual(rec: &UsageRecord) -> Amount {
    Amount {
        pico: rec.cost.map_or(0, |c| c.0),
        tokens: rec.usage.prompt.saturating_add(rec.usage.completion),
    }
}

/// The ledger as a sink: settles each call's reservation (found by its request id among the
/// open calls) and keeps its row for reports.
pub struct LedgerSink {
    pub ledger: Arc<dyn Ledger>,
    pub open: Arc<OpenCalls>,
}

/// The soft-threshold signal: a warning in the log and
/// `tokentap_budget_soft_threshold_crossed_total`.
pub fn soft_hook(calls: Arc<crate::telemetry::calls::CallMetrics>) -> SoftHook {
    Arc::new(move |h: &Hold| {
        log::warn!(
            "budget: {} passed the soft threshold of its {} budget",
            h.key,
            h.window
        );
        calls.soft_threshold_crossed(&h.key, &h.window.name());
    })
}

impl crate::telemetry::Sink for LedgerSink {
    fn record(&self, rec: &Arc<UsageRecord>) {
        if !rec.chat {
            return;
        }
        let now = now_unix();
        let reservation = self
            .open
            .get(&rec.request_id)
            .map(|c| Arc::clone(&c.reservation));
        if let Some(r) = &reservation {
            if !r.claim() {
                // The drain deadline settled it (and wrote its row) while this record was
                // being built: charging or listing it again would count the call twice.
                return;
            }
            self.ledger.settle(r, actual(rec), now);
        }
        let ts = rec
            .started_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(now, |d| d.as_secs() as i64);
        self.ledger.record_call(CallRow {
            ts,
            request_id: rec.request_id.clone(),
            user: reservation
                .as_ref()
                .map(|r| r.user.clone())
                .or_else(|| rec.user.clone()),
            teams: reservation
                .as_ref()
                .map(|r| r.teams.clone())
                .unwrap_or_default(),
            model: rec.model.clone(),
            usage: rec.usage,
            cost_pico: rec.cost.map(|c| c.0),
            estimated: rec.usage_source == crate::meter::UsageSource::Estimated,
            outcome: rec.outcome.as_str(),
            status: rec.status,
        });
    }

    fn shutdown(&self) {
        self.ledger.flush();
    }
}

/// A call whose reservation is not settled yet, with what it takes to settle it at an
/// estimate should the call never get its record (a panic, or a stream still running when
/// the shutdown's drain deadline ends the process).
pub struct OpenCall {
    pub reservation: Arc<Reservation>,
    pub request_id: String,
    pub model: Option<String>,
    pub price: Option<crate::meter::pricing::ModelPrice>,
    /// Bytes of the request's text (the prompt estimate's basis).
    pub prompt_text_bytes: u64,
    pub started: i64,
    /// Content relayed so far, and the usage once the upstream reported it.
    pub completion_bytes: std::sync::atomic::AtomicU64,
    /// Web searches counted so far (`Observed::web_searches`).
    pub web_searches: std::sync::atomic::AtomicU64,
    pub reported: std::sync::Mutex<Option<Usage>>,
}

impl OpenCall {
    /// Follows the response as the tap sees it.
    pub fn observe(&self, tap: &crate::openai::response::ResponseTap) {
        use std::sync::atomic::Ordering::Relaxed;
        let o = &tap.observed;
        self.completion_bytes.store(tap.completion_bytes(), Relaxed);
        if let Some((n, _)) = o.web_searches() {
            self.web_searches.store(n, Relaxed);
        }
        if let Some(u) = o.reported_usage() {
            *self.reported.lock().unwrap_or_else(|p| p.into_inner()) = Some(u);
        }
    }

    /// What the call cost as far as tokentap saw it: the usage the upstream reported, or the
    /// prompt estimated from the request and the completion from the content relayed.
    fn estimate(&self) -> (Usage, bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(u) = *self.reported.lock().unwrap_or_else(|p| p.into_inner()) {
            return (u, false);
        }
        let usage = crate::meter::estimate(
            self.prompt_text_bytes,
            self.completion_bytes.load(Relaxed),
            self.web_searches.load(Relaxed),
        );
        (usage, true)
    }

    /// Settles the call at its estimate unless its record settled it; true if this did.
    fn abandon(&self, ledger: &dyn Ledger) -> bool {
        if !self.reservation.claim() {
            return false;
        }
        let (usage, estimated) = self.estimate();
        let cost = self.price.map(|p| p.cost(&usage).0);
        let amount = Amount {
            pico: cost.unwrap_or(0),
            tokens: usage.prompt.saturating_add(usage.completion),
        };
        ledger.settle(&self.reservation, amount, now_unix());
        ledger.record_call(CallRow {
            ts: self.started,
            request_id: self.request_id.clone(),
            user: Some(self.reservation.user.clone()),
            teams: self.reservation.teams.clone(),
            model: self.model.clone(),
            usage,
            cost_pico: cost,
            estimated,
            outcome: "abandoned",
            status: 0,
        });
        true
    }
}

/// The calls holding a reservation not settled yet.
#[derive(Default)]
pub struct OpenCalls {
    /// By request id (unique across restarts).
    calls: dashmap::DashMap<String, Arc<OpenCall>>,
}

impl OpenCalls {
    /// Registers a call; dropping the guard settles it at its estimate if nothing else did.
    pub fn open(self: &Arc<Self>, call: OpenCall, ledger: Arc<dyn Ledger>) -> OpenGuard {
        let call = Arc::new(call);
        self.calls
            .insert(call.request_id.clone(), Arc::clone(&call));
        OpenGuard {
            call,
            calls: Arc::clone(self),
            ledger,
        }
    }

    /// The open call of a request, for its record to settle.
    pub fn get(&self, request_id: &str) -> Option<Arc<OpenCall>> {
        self.calls.get(request_id).map(|c| Arc::clone(c.value()))
    }

    /// The reservations of the calls in flight.
    pub fn held(&self) -> Vec<Arc<Reservation>> {
        self.calls
            .iter()
            .map(|e| Arc::clone(&e.value().reservation))
            .collect()
    }

    /// Settles every open call at its estimate (the drain deadline is ending the process);
    /// returns how many it settled.
    pub fn abandon_all(&self, ledger: &dyn Ledger) -> usize {
        let open: Vec<Arc<OpenCall>> = self.calls.iter().map(|e| Arc::clone(e.value())).collect();
        open.iter().filter(|c| c.abandon(ledger)).count()
    }
}

pub struct OpenGuard {
    pub call: Arc<OpenCall>,
    calls: Arc<OpenCalls>,
    ledger: Arc<dyn Ledger>,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.calls.calls.remove(&self.call.request_id);
        if self.call.abandon(&*self.ledger) {
            log::warn!(
                "call {} ended without a record: settled its reservation at the estimate",
                self.call.request_id
            );
        }
    }
}

fn usd_json(p: u64) -> serde_json::Value {
    serde_json::value::RawValue::from_string(crate::meter::Pico(p).to_string())
        .map(|r| serde_json::to_value(r).unwrap_or_default())
        .unwrap_or_default()
}

fn rfc3339(t: i64) -> serde_json::Value {
    if t == i64::MAX {
        return serde_json::Value::Null;
    }
    chrono::DateTime::from_timestamp(t, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true).into())
        .unwrap_or_default()
}

/// A subject's caps, spend and what is left, per window (the admin API's answer).
pub async fn view(
    ledger: &dyn Ledger,
    policy: &BudgetPolicy,
    subject: &Subject,
    now: i64,
) -> serde_json::Value {
    let caps: Vec<&policy::Cap> = match subject {
        Subject::User(u) => policy
            .user_caps
            .get(u)
            .unwrap_or(&policy.default_caps)
            .iter()
            .collect(),
        Subject::Team(t) => policy
            .teams
            .get(t)
            .map(|v| v.iter().collect())
            .unwrap_or_default(),
    };
    let mut windows: Vec<serde_json::Value> = Vec::new();
    for c in caps {
        let (spent, reserved) = ledger.spend(subject, c.window, policy, now).await;
        let (_, end) = c.window.bounds(now, policy.offset());
        windows.push(serde_json::json!({
                "window": c.window.name(),
                "cap_usd": c.usd.map(|p| usd_json(p.0)),
                "cap_tokens": c.tokens,
                "spent_usd": usd_json(spent.pico),
                "spent_tokens": spent.tokens,
                "reserved_usd": usd_json(reserved.pico),
                "remaining_usd": c.usd.map(|p| usd_json(p.0.saturating_sub(spent.pico))),
                "remaining_tokens": c.tokens.map(|t| t.saturating_sub(spent.tokens)),
                "resets_at": rfc3339(end),
        }));
    }
    let (kind, name) = match subject {
        Subject::User(u) => ("user", u.clone()),
        Subject::Team(t) => ("team", t.clone()),
    };
    let mut v = serde_json::json!({ kind: name, "windows": windows });
    if let Subject::User(u) = subject {
        v["teams"] = serde_json::json!(policy.teams_of(u));
    }
    v
}

/// The users who spent most in the current `window`.
pub async fn top(
    ledger: &dyn Ledger,
    policy: &BudgetPolicy,
    window: Window,
    limit: usize,
    now: i64,
) -> serde_json::Value {
    let v = ledger.top(policy, window, limit, now).await;
    serde_json::json!({
        "window": window.name(),
        "users": v.iter().map(|(u, a)| serde_json::json!({
            "user": u, "spent_usd": usd_json(a.pico), "spent_tokens": a.tokens
        })).collect::<Vec<_>>(),
    })
}

/// Budget gauges read from the ledger at scrape time: `tokentap_budget_spend_usd` and
/// `tokentap_budget_remaining_usd` per capped user and window, and
/// `tokentap_ledger_errors_total`. Users with caps of their own are always exported; users
/// under the default caps only up to `metrics.max_users`, biggest spenders first.
pub struct BudgetCollector {
    config: crate::config::Live,
    ledger: Arc<dyn Ledger>,
    descs: Vec<prometheus::core::Desc>,
}

impl BudgetCollector {
    pub fn new(config: crate::config::Live, ledger: Arc<dyn Ledger>) -> Self {
        let d = |n: &str, h: &str, l: &[&str]| {
            prometheus::core::Desc::new(
                n.into(),
                h.into(),
                l.iter().map(|s| s.to_string()).collect(),
                Default::default(),
            )
            .expect("valid metric description")
        };
        BudgetCollector {
            config,
            ledger,
            descs: vec![
                d(
                    "tokentap_budget_spend_usd",
                    "Spend in the current window, per capped user.",
                    &["user", "window"],
                ),
                d(
                    "tokentap_budget_remaining_usd",
                    "USD left under the hard cap in the current window, per capped user.",
                    &["user", "window"],
                ),
                d(
                    "tokentap_ledger_errors_total",
                    "Times the ledger could not persist or reach its store.",
                    &[],
                ),
            ],
        }
    }
}

impl prometheus::core::Collector for BudgetCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use prometheus::proto::{Gauge, LabelPair, Metric, MetricFamily, MetricType};
        let cfg = self.config.load();
        let policy = &cfg.budgets;
        let now = now_unix();
        let mut spend = MetricFamily::default();
        spend.set_name(self.descs[0].fq_name.clone());
        spend.set_help(self.descs[0].help.clone());
        spend.set_field_type(MetricType::GAUGE);
        let mut remaining = MetricFamily::default();
        remaining.set_name(self.descs[1].fq_name.clone());
        remaining.set_help(self.descs[1].help.clone());
        remaining.set_field_type(MetricType::GAUGE);
        let mut users: Vec<(String, Window, Amount, Option<crate::meter::Pico>, bool)> = self
            .ledger
            .counters(policy, now)
            .into_iter()
            .filter_map(|(key, window, amount)| {
                let user = key.strip_prefix("user:")?.to_string();
                let own = policy.user_caps.contains_key(&user);
                let cap = policy
                    .caps_for(&user)
                    .into_iter()
                    .find(|(s, c)| matches!(s, Subject::User(_)) && c.window == window)?
                    .1
                    .usd;
                Some((user, window, amount, cap, own))
            })
            .collect();
        users.sort_by(|a, b| b.4.cmp(&a.4).then(b.2.pico.cmp(&a.2.pico)));
        let max = cfg.metrics.max_users;
        let mut default_seen = 0;
        let gauge = |user: &str, window: Window, v: f64| {
            let mut l1 = LabelPair::default();
            l1.set_name("user".into());
            l1.set_value(crate::telemetry::calls::escape(user));
            let mut l2 = LabelPair::default();
            l2.set_name("window".into());
            l2.set_value(window.name());
            let mut g = Gauge::default();
            g.set_value(v);
            let mut m = Metric::default();
            m.set_label(vec![l1, l2]);
            m.set_gauge(g);
            m
        };
        for (user, window, amount, cap, own) in users {
            if !own {
                default_seen += 1;
                if default_seen > max {
                    continue;
                }
            }
            spend
                .mut_metric()
                .push(gauge(&user, window, amount.pico as f64 / 1e12));
            if let Some(cap) = cap {
                let left = cap.0.saturating_sub(amount.pico);
                remaining
                    .mut_metric()
                    .push(gauge(&user, window, left as f64 / 1e12));
            }
        }
        let mut errors = MetricFamily::default();
        errors.set_name(self.descs[2].fq_name.clone());
        errors.set_help(self.descs[2].help.clone());
        errors.set_field_type(MetricType::COUNTER);
        let mut c = prometheus::proto::Counter::default();
        c.set_value(self.ledger.errors() as f64);
        let mut m = Metric::default();
        m.set_counter(c);
        errors.mut_metric().push(m);
        let mut out = vec![errors];
        for f in [spend, remaining] {
            if !f.get_metric().is_empty() {
                out.push(f);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call cut off (upstream reset, client gone) is estimated by its record; one that never
    /// gets a record (a panic, the drain deadline) by its open call. The same bytes must give
    /// the same figure both ways.
    #[test]
    fn an_abandoned_call_and_a_recorded_one_are_estimated_alike() {
        use crate::openai::response::{BodyKind, ResponseTap};
        let stream = concat!(
            "data: {\"type\":\"search_done\",\"search_results\":[{\"query\":\"a\",\"results\":[]},",
            "{\"query\":\"b\",\"results\":[]},{\"query\":\"c\",\"results\":[]}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"some words here\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"reasoning\":\"hmm\"}}]}\n\ndata: {\"cho",
        );
        let json = r#"{"id":"x","choices":[{"message":{"content":"a whole answer, cut"}}],"usa"#;
        let policy = BudgetPolicy::default();
        for (kind, body) in [(BodyKind::Sse, stream), (BodyKind::Json, json)] {
            let mut tap = ResponseTap::new(kind, None, 1 << 20);
            let call = OpenCall {
                reservation: Arc::new(Reservation::new(
                    &policy,
                    "u",
                    Vec::new(),
                    Amount::default(),
                )),
                request_id: "r".into(),
                model: None,
                price: None,
                prompt_text_bytes: 41,
                started: 0,
                completion_bytes: Default::default(),
                web_searches: Default::default(),
                reported: Default::default(),
            };
            for piece in body.as_bytes().chunks(7) {
                tap.feed(&bytes::Bytes::copy_from_slice(piece));
                call.observe(&tap);
            }
            let (abandoned, estimated) = call.estimate();
            assert!(estimated);
            let recorded = tap.finish().estimate(41);
            assert_eq!(abandoned, recorded, "{kind:?}");
            assert!(recorded.completion > 0, "{kind:?}");
        }
    }

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
