//! The admin page's JSON API (`/admin/api/…`, documented in docs/admin-page.md): overview,
//! budgets, a user's or team's page and calls, live calls, status and the spend export.
//!
//! Reads of the ledger file run on blocking threads (SQLite); with the Redis ledger, spend
//! comes from the per-day totals all replicas share, and the per-call history is this
//! replica's own.

use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use futures::future::join_all;
use http::{Response, StatusCode};
use serde_json::{json, Value};

use super::{error, json_response, Admin};
use crate::budget::history::{rfc3339, usd, Dim, SharedOverview};
use crate::budget::policy::{BudgetPolicy, Cap, Subject, Window, Zone};
use crate::budget::report::{self, Totals};

/// Top entries per list on the overview.
const TOP: usize = 10;
/// Users under the default caps the budgets view lists at most (the biggest spenders of each
/// default window): with the Redis ledger, every row is a round trip.
const DEFAULT_CAPPED_LISTED: usize = 2_000;

/// A query string's parameter, decoded.
pub(super) fn param(query: &str, k: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (a, b) = kv.split_once('=')?;
        (a == k).then(|| crate::openai::percent_decode(&b.replace('+', " ")).into_owned())
    })
}

/// Runs a ledger-file read off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
}

fn totals_json(t: &Totals) -> Value {
    json!({
        "calls": t.calls,
        "prompt_tokens": t.prompt,
        "completion_tokens": t.completion,
        "cached_tokens": t.cached,
        "reasoning_tokens": t.reasoning,
        "web_searches": t.searches,
        "tokens": t.prompt + t.completion,
        "cost_usd": usd(t.cost),
        "errors": t.errors,
    })
}

/// Per-quarter totals folded into buckets starting at `starts` (sorted): each quarter goes to
/// the last bucket starting at or before it; quarters before the first are left out.
fn fold(quarters: &[(i64, Totals)], starts: &[i64], end: i64) -> Vec<Totals> {
    let mut out = vec![Totals::default(); starts.len()];
    for (q, t) in quarters {
        if *q >= end {
            continue;
        }
        let i = starts.partition_point(|s| s <= q);
        if i > 0 {
            out[i - 1].add(t);
        }
    }
    out
}

/// Why the page shows this replica's file where Redis's shared figures were wanted.
fn unshared(e: &str) -> String {
    format!("Redis could not be read ({e}): these are this replica's own calls")
}

impl Admin {
    pub(super) async fn overview(&self, query: &str) -> Response<Vec<u8>> {
        let cfg = self.config.load();
        let zone = cfg.budgets.offset();
        let now = crate::budget::now_unix();
        let today = report::date_of(now, zone);
        let periods = [
            ("today", Window::Daily),
            ("week", Window::Weekly),
            ("month", Window::Monthly),
        ];
        let top_period = param(query, "top").unwrap_or_else(|| "month".into());
        let Some(&(_, top_window)) = periods.iter().find(|(n, _)| *n == top_period) else {
            return error(StatusCode::BAD_REQUEST, "top: today, week or month");
        };
        let first_day = today - chrono::Days::new(89);
        let day_starts: Vec<i64> = first_day
            .iter_days()
            .take(90)
            .map(|d| report::midnight(d, zone))
            .collect();
        let hour = Window::Hourly.bounds(now, zone).0;
        let hour_starts: Vec<i64> = (0..48).rev().map(|k| hour - k * 3600).collect();
        let from = day_starts[0].min(hour_starts[0]);
        let end = Window::Daily.bounds(now, zone).1;
        let history = self.ledger.history();
        let quarters = {
            let h = Arc::clone(&history);
            match blocking(move || h.quarters(from, end)).await {
                Ok(q) => q,
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e),
            }
        };
        let hourly = fold(&quarters, &hour_starts, end);
        let window_days = |w: Window| {
            let (start, _) = w.bounds(now, zone);
            (report::date_of(start, zone), today)
        };
        // The longest period: the shared days asked for cover it and the 90 days' chart.
        let earliest = periods
            .iter()
            .map(|(_, w)| window_days(*w).0)
            .min()
            .unwrap_or(today)
            .min(first_day);
        let (shared, note) = match self
            .ledger
            .shared_overview(earliest, today, window_days(top_window), TOP)
            .await
        {
            Some(Ok(o)) => (Some(o), None),
            Some(Err(e)) => (None, Some(unshared(&e))),
            None => (None, None),
        };
        let (period_totals, daily, top) = match shared {
            None => {
                let period_totals: Vec<Totals> = periods
                    .iter()
                    .map(|(_, w)| {
                        let (s, e) = w.bounds(now, zone);
                        fold(&quarters, &[s], e).remove(0)
                    })
                    .collect();
                let daily = fold(&quarters, &day_starts, end);
                let (f, t) = window_days(top_window);
                let h = Arc::clone(&history);
                let top = blocking(move || {
                    Ok([
                        h.top(Dim::User, f, t, TOP)?,
                        h.top(Dim::Team, f, t, TOP)?,
                        h.top(Dim::Model, f, t, TOP)?,
                    ])
                })
                .await;
                match top {
                    Ok(top) => (period_totals, daily, top),
                    Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e),
                }
            }
            Some(SharedOverview {
                daily: per_day,
                users,
                teams,
                models,
            }) => {
                let period_totals = periods
                    .iter()
                    .map(|(_, w)| {
                        let (f, _) = window_days(*w);
                        per_day
                            .range(f..=today)
                            .fold(Totals::default(), |mut a, (_, t)| {
                                a.add(t);
                                a
                            })
                    })
                    .collect();
                let daily = first_day
                    .iter_days()
                    .take(90)
                    .map(|d| per_day.get(&d).cloned().unwrap_or_default())
                    .collect();
                (period_totals, daily, [users, teams, models])
            }
        };
        let top_json = |v: &Vec<(String, Totals)>| -> Vec<Value> {
            v.iter()
                .map(|(name, t)| {
                    // Calls without a user (or model): `null`.
                    let name = (!name.is_empty()).then_some(name);
                    json!({
                        "name": name, "calls": t.calls, "tokens": t.prompt + t.completion,
                        "cost_usd": usd(t.cost),
                    })
                })
                .collect()
        };
        let shared = note.is_none() && self.ledger.backend() == "redis";
        json_response(
            StatusCode::OK,
            &json!({
                "backend": self.ledger.backend(),
                "zone": zone.name(),
                "now": rfc3339(now),
                "scope": {
                    "totals": if shared { "shared" } else { "replica" },
                    "hourly": "replica",
                    "note": note,
                },
                "periods": periods.iter().zip(&period_totals).map(|((name, w), t)| {
                    let (s, e) = w.bounds(now, zone);
                    let mut v = totals_json(t);
                    v["name"] = json!(name);
                    v["from"] = json!(rfc3339(s));
                    v["to"] = json!(rfc3339(e));
                    v
                }).collect::<Vec<_>>(),
                "hourly": hour_starts.iter().zip(&hourly).map(|(s, t)| json!({
                    "t": rfc3339(*s), "calls": t.calls, "cost_usd": usd(t.cost),
                })).collect::<Vec<_>>(),
                "daily": first_day.iter_days().zip(&daily).map(|(d, t)| json!({
                    "date": d.to_string(), "calls": t.calls, "cost_usd": usd(t.cost),
                })).collect::<Vec<_>>(),
                "top": {
                    "period": top_period,
                    "users": top_json(&top[0]),
                    "teams": top_json(&top[1]),
                    "models": top_json(&top[2]),
                },
            }),
        )
    }

    /// A subject's caps as budget rows.
    async fn cap_rows(
        &self,
        policy: &BudgetPolicy,
        subjects: Vec<(Subject, Vec<Cap>)>,
        now: i64,
    ) -> Vec<Value> {
        let zone = policy.offset();
        let ledger = &*self.ledger;
        let mut rows = Vec::new();
        let all: Vec<(Subject, Cap)> = subjects
            .into_iter()
            .flat_map(|(s, caps)| caps.into_iter().map(move |c| (s.clone(), c)))
            .collect();
        // Asked together: with Redis, one round trip each, all on the way at once.
        for chunk in all.chunks(64) {
            let spends = join_all(
                chunk
                    .iter()
                    .map(|(s, c)| ledger.spend(s, c.window, policy, now)),
            )
            .await;
            for ((subject, cap), (spent, reserved)) in chunk.iter().zip(spends) {
                rows.push(cap_row(subject, cap, spent, reserved, now, zone));
            }
        }
        rows
    }

    /// Every capped user and team: users with caps of their own, users under the default
    /// caps who spent in one of its windows, and teams with caps.
    async fn capped_subjects(&self, policy: &BudgetPolicy, now: i64) -> Vec<(Subject, Vec<Cap>)> {
        let mut users: std::collections::BTreeMap<String, Vec<Cap>> = policy
            .user_caps
            .iter()
            .map(|(u, c)| (u.clone(), c.clone()))
            .collect();
        if !policy.default_caps.is_empty() {
            let mut windows: Vec<Window> = policy.default_caps.iter().map(|c| c.window).collect();
            windows.dedup();
            for w in windows {
                for (u, _) in self.ledger.top(policy, w, DEFAULT_CAPPED_LISTED, now).await {
                    if !policy.user_caps.contains_key(&u) {
                        users
                            .entry(u)
                            .or_insert_with(|| policy.default_caps.clone());
                    }
                }
            }
        }
        let mut teams: Vec<(&String, &Vec<Cap>)> =
            policy.teams.iter().filter(|(_, c)| !c.is_empty()).collect();
        teams.sort_by(|a, b| a.0.cmp(b.0));
        users
            .into_iter()
            .map(|(u, c)| (Subject::User(u), c))
            .chain(
                teams
                    .into_iter()
                    .map(|(t, c)| (Subject::Team(t.clone()), c.clone())),
            )
            .collect()
    }

    pub(super) async fn budgets_view(&self, query: &str) -> Response<Vec<u8>> {
        let cfg = self.config.load();
        let policy = &cfg.budgets;
        let now = crate::budget::now_unix();
        let q = param(query, "q").unwrap_or_default().to_lowercase();
        let subjects: Vec<(Subject, Vec<Cap>)> = self
            .capped_subjects(policy, now)
            .await
            .into_iter()
            .filter(|(s, _)| {
                let name = match s {
                    Subject::User(n) | Subject::Team(n) => n,
                };
                q.is_empty() || name.to_lowercase().contains(&q)
            })
            .collect();
        // A store that does not answer in time gives an error, not a page that never loads.
        let Ok(mut rows) = tokio::time::timeout(
            Duration::from_secs(10),
            self.cap_rows(policy, subjects, now),
        )
        .await
        else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "The budget store did not answer in time.",
            );
        };
        let sort = param(query, "sort").unwrap_or_else(|| "used".into());
        let desc = param(query, "order").map_or(sort != "name", |o| o != "asc");
        let key = |v: &Value| -> (f64, String) {
            let name = v["name"].as_str().unwrap_or_default().to_string();
            let num = |f: &str| v[f].as_str().and_then(|s| s.parse().ok()).unwrap_or(0.0);
            let k = match sort.as_str() {
                "spent" => num("spent_usd"),
                "remaining" => v["remaining_usd"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(f64::INFINITY),
                "resets" => v["resets_unix"].as_f64().unwrap_or(f64::INFINITY),
                "name" => 0.0,
                // Reached caps first, then soft thresholds passed, each by how much is used.
                _ => {
                    let rank = match v["state"].as_str() {
                        Some("capped") => 2.0,
                        Some("soft") => 1.0,
                        _ => 0.0,
                    };
                    rank * 10.0 + v["used"].as_f64().unwrap_or(0.0).min(9.0)
                }
            };
            (k, name)
        };
        if !["used", "name", "spent", "remaining", "resets"].contains(&sort.as_str()) {
            return error(
                StatusCode::BAD_REQUEST,
                "sort: used, name, spent, remaining or resets",
            );
        }
        rows.sort_by(|a, b| {
            let (ka, na) = key(a);
            let (kb, nb) = key(b);
            let o = ka.total_cmp(&kb).then_with(|| na.cmp(&nb));
            if desc {
                o.reverse()
            } else {
                o
            }
        });
        json_response(
            StatusCode::OK,
            &json!({
                "backend": self.ledger.backend(),
                "zone": policy.offset().name(),
                "rows": rows,
            }),
        )
    }

    /// `/admin/api/users/<u>` or `/admin/api/teams/<t>`.
    pub(super) async fn subject(&self, dim: Dim, name: &str) -> Response<Vec<u8>> {
        let cfg = self.config.load();
        let policy = &cfg.budgets;
        let now = crate::budget::now_unix();
        let zone = policy.offset();
        let (subject, caps) = match dim {
            Dim::Team => {
                let Some(caps) = policy.teams.get(name) else {
                    return error(StatusCode::NOT_FOUND, "no such team in the config");
                };
                (Subject::Team(name.to_string()), caps.clone())
            }
            _ => (
                Subject::User(name.to_string()),
                policy
                    .user_caps
                    .get(name)
                    .unwrap_or(&policy.default_caps)
                    .clone(),
            ),
        };
        let caps = self.cap_rows(policy, vec![(subject, caps)], now).await;
        let today = report::date_of(now, zone);
        let first = today - chrono::Days::new(29);
        let (shared, note) = match self
            .ledger
            .shared_by_model(dim == Dim::Team, name, first, today)
            .await
        {
            Some(Ok(v)) => (Some(v), None),
            Some(Err(e)) => (None, Some(unshared(&e))),
            None => (None, None),
        };
        let per_day = match shared {
            Some(v) => v,
            None => {
                let h = self.ledger.history();
                let n = name.to_string();
                match blocking(move || h.by_model(dim, &n, first, today)).await {
                    Ok(v) => v,
                    Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e),
                }
            }
        };
        let days: Vec<NaiveDate> = first.iter_days().take(30).collect();
        let mut models: std::collections::BTreeMap<String, Vec<Totals>> = Default::default();
        let mut total = Totals::default();
        for (d, model, t) in per_day {
            let i = (d - first).num_days();
            if !(0..30).contains(&i) {
                continue;
            }
            total.add(&t);
            models
                .entry(model)
                .or_insert_with(|| vec![Totals::default(); 30])[i as usize]
                .add(&t);
        }
        // The rate limits the subject is held to (a user: their own or the default, and their
        // teams').
        let limits = &policy.limits;
        let checks = match dim {
            Dim::Team => limits
                .teams
                .get(name)
                .map(|l| {
                    vec![crate::budget::limits::Check {
                        key: format!("team:{name}"),
                        limit: *l,
                    }]
                })
                .unwrap_or_default(),
            _ => limits.checks(name, policy.teams_of(name), None),
        };
        let limits: Vec<Value> = checks
            .iter()
            .map(|c| {
                json!({
                    "subject": c.key,
                    "requests_per_minute": c.limit.requests_per_minute,
                    "tokens_per_minute": c.limit.tokens_per_minute,
                    "concurrent": c.limit.concurrent,
                })
            })
            .collect();
        let mut v = json!({
            "limits": limits,
            "kind": if dim == Dim::Team { "team" } else { "user" },
            "name": name,
            "zone": zone.name(),
            "caps": caps,
            "days": days.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            "models": models.iter().map(|(m, ts)| json!({
                "model": m,
                "cost_usd": ts.iter().map(|t| usd(t.cost)).collect::<Vec<_>>(),
                "calls": ts.iter().map(|t| t.calls).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "totals": totals_json(&total),
            "note": note,
        });
        match dim {
            Dim::Team => {
                let mut members: Vec<&String> = policy
                    .membership
                    .iter()
                    .filter(|(_, ts)| ts.iter().any(|t| t == name))
                    .map(|(u, _)| u)
                    .collect();
                members.sort();
                v["members"] = json!(members);
            }
            _ => v["teams"] = json!(policy.teams_of(name)),
        }
        json_response(StatusCode::OK, &v)
    }

    /// `/admin/api/users/<u>/calls` or `/admin/api/teams/<t>/calls`.
    pub(super) async fn calls(&self, dim: Dim, name: &str, query: &str) -> Response<Vec<u8>> {
        let before = match param(query, "before").filter(|b| !b.is_empty()) {
            None => None,
            Some(b) => match b.parse::<i64>() {
                Ok(b) => Some(b),
                Err(_) => return error(StatusCode::BAD_REQUEST, "before: a cursor from `next`"),
            },
        };
        let limit = match param(query, "limit").map(|l| l.parse::<usize>()) {
            None => 50,
            Some(Ok(l)) if (1..=500).contains(&l) => l,
            Some(_) => return error(StatusCode::BAD_REQUEST, "limit: 1 to 500"),
        };
        let h = self.ledger.history();
        let n = name.to_string();
        match blocking(move || h.calls(dim, &n, before, limit)).await {
            Ok((calls, next)) => json_response(
                StatusCode::OK,
                &json!({
                    "scope": "replica",
                    "backend": self.ledger.backend(),
                    "calls": calls,
                    "next": next.map(|n| n.to_string()),
                }),
            ),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e),
        }
    }

    /// `/admin/api/alerts`: the newest budget alerts this replica raised.
    pub(super) async fn alerts(&self, query: &str) -> Response<Vec<u8>> {
        let limit = match param(query, "limit").map(|l| l.parse::<usize>()) {
            None => 50,
            Some(Ok(l)) if (1..=500).contains(&l) => l,
            Some(_) => return error(StatusCode::BAD_REQUEST, "limit: 1 to 500"),
        };
        let h = self.ledger.history();
        let cfg = self.config.load();
        match blocking(move || h.alerts(limit)).await {
            Ok(list) => json_response(
                StatusCode::OK,
                &json!({
                    "scope": "replica",
                    "webhooks": cfg.budgets.alerts.webhooks.len(),
                    "alerts": list.iter().map(|(a, delivered)| {
                        let mut v = a.generic();
                        v["delivered"] = json!(delivered);
                        v
                    }).collect::<Vec<_>>(),
                }),
            ),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e),
        }
    }

    pub(super) fn live(&self) -> Response<Vec<u8>> {
        json_response(
            StatusCode::OK,
            &json!({
                "now": rfc3339(crate::budget::now_unix()),
                "calls": self.live.snapshot(),
            }),
        )
    }

    pub(super) async fn status(&self) -> Response<Vec<u8>> {
        let cfg = self.config.load();
        let now = crate::budget::now_unix();
        let h = self.ledger.history();
        let errors_5m = blocking(move || h.upstream_errors_since(now - 300))
            .await
            .ok();
        let uptime = self.started.elapsed().as_secs();
        let otlp = cfg.traces.export.as_ref();
        let t = &self.traces;
        let dropped: u64 = ["queue_full", "export_failed", "stopped", "rejected"]
            .iter()
            .map(|r| t.dropped.with_label_values(&[r]).get())
            .sum();
        json_response(
            StatusCode::OK,
            &json!({
                "version": env!("CARGO_PKG_VERSION"),
                "started_at": rfc3339(now - uptime as i64),
                "uptime_s": uptime,
                "config": {
                    "hash": cfg.hash,
                    "files": cfg.files,
                    "restart_required": self.reloader.restart_required(),
                    "last_reload": self.reloader.last().map(|l| json!({
                        "at": rfc3339(l.at),
                        "trigger": l.trigger,
                        "result": l.result,
                        "error": l.error,
                        "hash": l.hash,
                    })),
                },
                "ledger": {
                    "backend": self.ledger.backend(),
                    "store_up": self.ledger.store_up(),
                    "file_writable": self.ledger.file_writable(),
                    "errors": self.ledger.errors(),
                    "store_resets": self.ledger.store_resets(),
                },
                "otlp": {
                    "enabled": otlp.is_some(),
                    "endpoint": otlp.map(|e| e.endpoint.clone()),
                    "queued": t.queued.get().max(0),
                    "dropped": dropped,
                    "exported": t.exported.get(),
                },
                "upstream": {
                    "url": cfg.upstream.url.url_base.to_string(),
                    "errors_5m": errors_5m,
                },
                "in_flight": self.live.len(),
            }),
        )
    }

    /// The spend report as a download (the code `tokentap spend` runs).
    pub(super) async fn spend(&self, query: &str) -> Response<Vec<u8>> {
        let cfg = self.config.load();
        let zone = cfg.budgets.offset();
        let today = report::date_of(crate::budget::now_unix(), zone);
        let day = |k: &str| match param(query, k).filter(|s| !s.is_empty()) {
            None => Ok(today),
            Some(s) => report::date(&s).map_err(|e| format!("{k}: {e}")),
        };
        let (from, to) = match (day("from"), day("to")) {
            (Ok(f), Ok(t)) if f <= t && (t - f).num_days() < 1100 => (f, t),
            (Ok(_), Ok(_)) if day("from").ok() <= day("to").ok() => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "from..to: at most 1,100 days at once (tokentap spend takes any range)",
                )
            }
            (Ok(f), Ok(t)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("to ({t}) is before from ({f})"),
                )
            }
            (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, &e),
        };
        let by = match param(query, "by").as_deref().unwrap_or("user") {
            "user" => report::By::User,
            "team" => report::By::Team,
            "model" => report::By::Model,
            "api" => report::By::Api,
            _ => return error(StatusCode::BAD_REQUEST, "by: user, team, model or api"),
        };
        let (format, ctype, ext) = match param(query, "format").as_deref().unwrap_or("csv") {
            "csv" => (report::Format::Csv, "text/csv; charset=utf-8", "csv"),
            "json" => (report::Format::Json, "application/json", "json"),
            _ => return error(StatusCode::BAD_REQUEST, "format: csv or json"),
        };
        let ledger = cfg.budgets.ledger.clone();
        let groups = blocking(move || report::spend(&ledger, zone, from, to, by, false)).await;
        match groups {
            Ok(g) => {
                let body = report::render(g, by, format).into_bytes();
                let by_name = param(query, "by").unwrap_or_else(|| "user".into());
                let mut r = super::bytes_response(StatusCode::OK, ctype, body);
                if let Ok(v) = http::HeaderValue::from_str(&format!(
                    "attachment; filename=\"tokentap-spend-{from}-{to}-by-{by_name}.{ext}\""
                )) {
                    r.headers_mut().insert(http::header::CONTENT_DISPOSITION, v);
                }
                r
            }
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e),
        }
    }
}

/// A cap's row: limits, spend, what is left, how much is used and when it resets.
fn cap_row(
    subject: &Subject,
    cap: &Cap,
    spent: crate::budget::Amount,
    reserved: crate::budget::Amount,
    now: i64,
    zone: Zone,
) -> Value {
    let (kind, name) = match subject {
        Subject::User(n) => ("user", n),
        Subject::Team(n) => ("team", n),
    };
    let (_, end) = cap.window.bounds(now, zone);
    let ratio = |s: u64, c: u64| {
        if c == 0 {
            f64::INFINITY
        } else {
            s as f64 / c as f64
        }
    };
    let used = [
        cap.usd.map(|c| ratio(spent.pico, c.0)),
        cap.tokens.map(|c| ratio(spent.tokens, c)),
    ]
    .into_iter()
    .flatten()
    .fold(0.0f64, f64::max);
    let soft = cap.soft_usd.is_some_and(|s| spent.pico > s.0)
        || cap.soft_tokens.is_some_and(|s| spent.tokens > s);
    // Reached: spent to the cap, or it refused a call for what was spent (a call's worst
    // case no longer fits) in this window.
    let state = if used >= 1.0 || crate::budget::refused_now(subject, cap.window, now) {
        "capped"
    } else if soft {
        "soft"
    } else {
        "ok"
    };
    json!({
        "kind": kind,
        "name": name,
        "window": cap.window.name(),
        "cap_usd": cap.usd.map(|p| usd(p.0)),
        "cap_tokens": cap.tokens,
        "soft_usd": cap.soft_usd.map(|p| usd(p.0)),
        "soft_tokens": cap.soft_tokens,
        "spent_usd": usd(spent.pico),
        "spent_tokens": spent.tokens,
        "reserved_usd": usd(reserved.pico),
        "reserved_tokens": reserved.tokens,
        "remaining_usd": cap.usd.map(|c| usd(c.0.saturating_sub(spent.pico))),
        "remaining_tokens": cap.tokens.map(|c| c.saturating_sub(spent.tokens)),
        "used": if used.is_finite() { (used * 10_000.0).round() / 10_000.0 } else { 1.0 },
        "state": state,
        "resets_at": (end != i64::MAX).then(|| rfc3339(end)),
        "resets_unix": (end != i64::MAX).then_some(end),
    })
}
