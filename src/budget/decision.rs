//! The decision about a call, made when its body is complete: its worst case reserved against
//! every cap of its user and teams, or a refusal (OpenAI-shaped, with `Retry-After`) and why.

use std::sync::Arc;

use super::policy::{MissingUser, Subject, Window};
use super::{holds_for, now_unix, Amount, Ledger, Rejection, Reservation, StoreDown};
use crate::config::Config;
use crate::meter::{estimate_tokens, Usage};
use crate::openai::request::RequestMeta;
use crate::openai::ApiError;
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
    /// A rate limit of the user, a team of theirs or their key would be passed.
    RateLimited { user: String, limit: &'static str },
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
            Refusal::RateLimited { .. } => "rate_limit",
        }
    }
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
    let output = match meta.api {
        // Embeddings produce no output tokens.
        crate::meter::Api::Embeddings => 0,
        _ => per_choice.saturating_mul(meta.n.unwrap_or(1).max(1)),
    };
    let searches = if meta.web_search_requested() {
        meta.tool_max_searches
            .unwrap_or(policy.default_max_searches)
    } else {
        0
    };
    // Priced at the dearer of output and reasoning, whichever the output turns out to be.
    let reasoning_dearer = price.is_some_and(|p| p.reasoning.is_some_and(|r| r > p.output));
    // The prompt at the dearer of input and a cache write: a Messages call may write it all
    // to the cache (no other dialect bills cache writes).
    // (At the dearer of five-minute and one-hour writes.)
    let writes_dearer = meta.api == crate::meter::Api::Messages
        && price.is_some_and(|p| p.cache_write.max(p.cache_write_1h) > p.input);
    let hour_dearer = price.is_some_and(|p| p.cache_write_1h > p.cache_write);
    let usage = Usage {
        prompt,
        completion: output,
        cached: 0,
        cache_write: if writes_dearer { prompt } else { 0 },
        cache_write_1h: if writes_dearer && hour_dearer {
            prompt
        } else {
            0
        },
        reasoning: if reasoning_dearer { output } else { 0 },
        web_searches: searches,
    };
    // Beyond 2^53 (9,007 USD, or 9e15 tokens, for one call) amounts lose exactness in the
    // Redis scripts' arithmetic; no real call comes near, and such a call is refused anyway.
    const MAX: u64 = 1 << 53;
    Amount {
        pico: price
            .map_or(0, |p| p.cost(Some(meta.api), &usage).0)
            .min(MAX),
        tokens: prompt.saturating_add(output).min(MAX),
    }
}

/// The `x-ratelimit-*` headers (OpenAI's names) of a caller's standing against its own
/// limits: limit, remaining, and when the window has room again (`12s`).
pub fn ratelimit_headers(s: &super::limits::Standing) -> Vec<(&'static str, String)> {
    let mut h = Vec::new();
    if let Some((limit, left, reset)) = s.requests {
        h.push(("x-ratelimit-limit-requests", limit.to_string()));
        h.push(("x-ratelimit-remaining-requests", left.to_string()));
        h.push(("x-ratelimit-reset-requests", format!("{reset}s")));
    }
    if let Some((limit, left, reset)) = s.tokens {
        h.push(("x-ratelimit-limit-tokens", limit.to_string()));
        h.push(("x-ratelimit-remaining-tokens", left.to_string()));
        h.push(("x-ratelimit-reset-tokens", format!("{reset}s")));
    }
    h
}

/// Holds a call to its rate limits (`[budgets.limits]`: its user's, its user's teams', its
/// virtual key's) before its budget: `Ok(None)` when none apply (or the store is down and
/// `on_error = "fail_open"`), the grant to settle when it ends, or the answer that refuses it.
pub async fn limit(
    ledger: &dyn Ledger,
    cfg: &Config,
    meta: Option<&RequestMeta>,
    key: Option<&str>,
) -> Result<Option<super::limits::Grant>, (ApiError, Refusal)> {
    let policy = &cfg.budgets;
    if policy.limits.is_empty() {
        return Ok(None);
    }
    let Some(meta) = meta else {
        // (The budget decision answers an unreadable body.)
        return Ok(None);
    };
    let user = match (
        meta.user.as_deref().filter(|u| !u.is_empty()),
        policy.missing_user,
    ) {
        (Some(u), _) => u.to_string(),
        (None, MissingUser::DefaultUser) => policy.default_user.clone(),
        (None, _) => String::new(),
    };
    let checks = if user.is_empty() {
        // No user: only the key's limits can apply.
        policy
            .limits
            .checks("", &[], key)
            .into_iter()
            .filter(|c| c.key.starts_with("key:"))
            .collect()
    } else {
        policy.limits.checks(&user, policy.teams_of(&user), key)
    };
    if checks.is_empty() {
        return Ok(None);
    }
    let tokens = worst_case(meta, cfg).tokens;
    match ledger.limit(&checks, tokens, now_unix()).await {
        Ok(Ok(g)) => Ok(Some(g)),
        Ok(Err(l)) => {
            let whose = match l.key.split_once(':') {
                Some(("team", t)) => format!("your team {t:?}'s"),
                Some(("key", _)) => "your API key's".to_string(),
                _ => "your".to_string(),
            };
            let what = match l.kind {
                super::limits::Kind::Requests => format!("{} requests per minute", l.limit),
                super::limits::Kind::Tokens => format!("{} tokens per minute", l.limit),
                super::limits::Kind::Concurrent => format!("{} calls at once", l.limit),
            };
            let mut e = ApiError::new(
                429,
                "rate_limit_exceeded",
                format!(
                    "Rate limit reached: {whose} limit is {what} ({}). Retry after {} s.",
                    l.kind.name(),
                    l.retry_after
                ),
            )
            .code("rate_limit_exceeded");
            e.retry_after = Some(l.retry_after);
            let (name, header) = match l.kind {
                super::limits::Kind::Requests => ("requests", true),
                super::limits::Kind::Tokens => ("tokens", true),
                super::limits::Kind::Concurrent => ("", false),
            };
            if header {
                let h = |what: &str| -> &'static str {
                    match (what, name) {
                        ("limit", "requests") => "x-ratelimit-limit-requests",
                        ("remaining", "requests") => "x-ratelimit-remaining-requests",
                        ("reset", "requests") => "x-ratelimit-reset-requests",
                        ("limit", _) => "x-ratelimit-limit-tokens",
                        ("remaining", _) => "x-ratelimit-remaining-tokens",
                        _ => "x-ratelimit-reset-tokens",
                    }
                };
                e.headers = vec![
                    (h("limit"), l.limit.to_string()),
                    (h("remaining"), "0".into()),
                    (h("reset"), format!("{}s", l.retry_after)),
                ];
            }
            Err((
                e,
                Refusal::RateLimited {
                    user,
                    limit: l.kind.name(),
                },
            ))
        }
        Err(StoreDown(why)) if policy.ledger.fail_open => {
            log::warn!(
                "rate-limit store unavailable ({why}): letting the call through (fail_open)"
            );
            Ok(None)
        }
        Err(StoreDown(_)) => Err((
            ApiError::new(
                503,
                "api_error",
                "The budget store is unavailable, so this proxy cannot check your rate limits. \
                 Retry shortly.",
            )
            .code("budget_store_unavailable"),
            Refusal::StoreUnavailable,
        )),
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
        Ok(Ok(r)) => {
            // A call fits again: its caps are no longer reached.
            if !REFUSED.is_empty() {
                for h in &r.holds {
                    REFUSED.remove(&(h.key.clone(), h.window));
                }
            }
            Decision::Allow(Some(Arc::new(r)))
        }
        Ok(Err(rej)) => {
            if !rej.in_flight {
                note_refusal(&rej, now);
                full_alert(ledger, policy, &user, &rej, now).await;
            }
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

/// The caps that refused a call on this replica (not for calls in flight: for what was
/// spent), until their window resets, a call fits again, or an operator resets the spend:
/// (subject key, window) -> reset time. The admin page shows them as reached.
static REFUSED: std::sync::LazyLock<dashmap::DashMap<(String, Window), i64>> =
    std::sync::LazyLock::new(dashmap::DashMap::new);
/// Caps kept as refused at most (user ids are callers' to choose); past it, ended windows
/// are dropped at most once a second, and refusals beyond are not kept.
const REFUSED_MAX: usize = 10_000;
static REFUSED_SWEPT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// The 100 % alert of a cap (spend alone never reaches a cap: reservations stop it short):
/// raised when the cap refuses a call for what was spent, with the spend at or past the cap's
/// highest other threshold (and at least half of it: one oversized call refused at a low spend
/// is not the cap being reached). Once per cap and window on this replica (and, deduplicated
/// by the deliverer, across replicas).
async fn full_alert(
    ledger: &dyn Ledger,
    policy: &super::policy::BudgetPolicy,
    user: &str,
    rej: &super::Rejection,
    now: i64,
) {
    let caps = policy.caps_for(user);
    let Some((s, c)) = caps
        .iter()
        .find(|(s, c)| *s == rej.subject && c.window == rej.window && c.alerts.contains(&1000))
    else {
        return;
    };
    let (h, end) = super::hold(s, c, now, policy.offset());
    let key = (h.key.clone(), h.window, h.start);
    if FULL.contains_key(&key) {
        return;
    }
    let spend = ledger.spend(s, c.window, policy, now);
    let Ok((spent, _)) = tokio::time::timeout(std::time::Duration::from_secs(1), spend).await
    else {
        return;
    };
    let at = c
        .alerts
        .iter()
        .filter(|t| **t < 1000)
        .max()
        .copied()
        .unwrap_or(0)
        .max(500);
    let level = |cap: u64| (u128::from(cap) * u128::from(at) / 1000) as u64;
    let near = if rej.tokens {
        c.tokens.is_some_and(|cap| spent.tokens >= level(cap))
    } else {
        c.usd.is_some_and(|cap| spent.pico >= level(cap.0))
    };
    if !near {
        return;
    }
    if FULL.len() >= REFUSED_MAX {
        FULL.retain(|_, until| *until > now);
    }
    FULL.insert(key, end);
    ledger.raise(super::alerts::Alert::new(
        &h.key,
        h.window,
        h.start,
        end,
        "1".into(),
        spent,
        &h.alert,
        now,
    ));
}

/// The caps whose 100 % alert this replica raised, until their window ends.
static FULL: std::sync::LazyLock<dashmap::DashMap<(String, Window, i64), i64>> =
    std::sync::LazyLock::new(dashmap::DashMap::new);

/// Notes a cap's refusal (kept until its window resets).
fn note_refusal(rej: &super::Rejection, now: i64) {
    use std::sync::atomic::Ordering::Relaxed;
    if REFUSED.len() >= REFUSED_MAX {
        if REFUSED_SWEPT.swap(now, Relaxed) == now {
            return;
        }
        REFUSED.retain(|_, until| *until > now);
        if REFUSED.len() >= REFUSED_MAX {
            return;
        }
    }
    REFUSED.insert((rej.subject.key(), rej.window), rej.resets_at);
}

/// An operator reset `subject`'s spend on `window`: its cap is no longer reached.
pub fn forget_refusal(subject: &Subject, window: Window) {
    REFUSED.remove(&(subject.key(), window));
}

/// Whether `subject`'s cap on `window` refused a call in its current window (on this
/// replica).
pub fn refused_now(subject: &Subject, window: Window, now: i64) -> bool {
    REFUSED
        .get(&(subject.key(), window))
        .is_some_and(|until| *until > now)
}
