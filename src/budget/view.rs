//! Budgets as the admin API shows them: a subject's caps, spend and what is left per window,
//! and the top spenders.

use super::policy::{self, BudgetPolicy, Subject, Window};
use super::Ledger;
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
