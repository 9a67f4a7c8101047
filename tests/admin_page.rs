//! The admin page's JSON API (`/admin/api/…`, docs/admin-page.md) against the real binary:
//! shapes, figures equal to the ledger's, date ranges and time zones, an empty ledger, 1,000
//! users, paging, live calls, status, and the page's login, cookie and CSRF rules.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MODEL: &str = "anthropic/claude-opus-4.6";

fn api(tap: &Tap, path: &str) -> Value {
    let r = request(tap.admin, "GET", path, &[], b"");
    assert_eq!(
        r.status,
        200,
        "{path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// Asks `path` until `done` holds for its answer (the ledger writes every flush interval).
fn wait_api(tap: &Tap, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let v = api(tap, path);
        if done(&v) {
            return v;
        }
        assert!(start.elapsed() < PATIENCE, "{path} never got there: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn period<'a>(overview: &'a Value, name: &str) -> &'a Value {
    overview["periods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap()
}

fn sum_usd<'a>(it: impl Iterator<Item = &'a Value>) -> u64 {
    it.map(pico_of_usd).sum()
}

fn calls_today(v: &Value) -> u64 {
    period(v, "today")["calls"].as_u64().unwrap()
}

fn chat(tap: &Tap, user: &str, headers: &[(&str, &str)]) -> Resp {
    post_chat(tap.addr, headers, &chat_body(MODEL, user, false, ""))
}

const BUDGETS: &str = r#"
[budgets]
[budgets.default]
daily = { usd = 1.00, soft_usd = 0.00001 }
[budgets.users.dave]
daily = { usd = 0.0002 }
[budgets.teams.research]
members = ["alice", "bob"]
caps = { monthly = { usd = 50.00 } }
"#;

/// The overview's totals, charts and top lists and the budgets' spend are the ledger's: the
/// sums of the calls' records, and what `tokentap spend` says.
#[test]
fn overview_and_budgets_show_what_the_ledger_holds() {
    let mock = Mock::start();
    let tap = Tap::start(&mock.url(), &format!("{TEST_PRICING}{BUDGETS}"));
    for (user, n) in [("alice", 3), ("bob", 2), ("carol", 1)] {
        for _ in 0..n {
            assert_eq!(chat(&tap, user, &[]).status, 200);
        }
    }
    // An upstream error (counted as an error, charged nothing) and dave until capped.
    assert_eq!(chat(&tap, "carol", &[("x-mock-status", "500")]).status, 500);
    let mut sent = 7;
    let mut refused = 0;
    for _ in 0..20 {
        sent += 1;
        if chat(&tap, "dave", &[]).status == 429 {
            refused += 1;
            break;
        }
    }
    assert_eq!(refused, 1, "dave's tiny cap refuses a call");
    let records = tap.wait_records(sent);
    assert_eq!(records.len(), sent);
    let n = records.len() as u64;
    let mut by_user: BTreeMap<String, u64> = BTreeMap::new();
    for r in &records {
        *by_user
            .entry(r["user"].as_str().unwrap().to_string())
            .or_default() += pico_of(r);
    }
    let total: u64 = by_user.values().sum();
    let errors = records
        .iter()
        .filter(|r| r["outcome"] != "complete" || r["status"].as_u64().unwrap() >= 400)
        .count() as u64;
    assert_eq!(errors, 2, "the 500 and dave's 429");

    let v = wait_api(&tap, "/admin/api/overview", |v| calls_today(v) == n);
    for name in ["today", "week", "month"] {
        let p = period(&v, name);
        assert_eq!(p["calls"], n, "{name}");
        assert_eq!(pico_of_usd(&p["cost_usd"]), total, "{name}");
        assert_eq!(p["errors"], errors, "{name}");
    }
    let hourly = v["hourly"].as_array().unwrap();
    let daily = v["daily"].as_array().unwrap();
    assert_eq!((hourly.len(), daily.len()), (48, 90));
    assert_eq!(sum_usd(hourly.iter().map(|h| &h["cost_usd"])), total);
    assert_eq!(sum_usd(daily.iter().map(|d| &d["cost_usd"])), total);
    assert_eq!(
        pico_of_usd(&daily[89]["cost_usd"]),
        total,
        "all of it today"
    );
    // Top users, by spend, each with the sum of their records.
    let top: Vec<(String, u64)> = v["top"]["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["name"].as_str().unwrap().to_string(),
                pico_of_usd(&u["cost_usd"]),
            )
        })
        .collect();
    let mut want: Vec<(String, u64)> = by_user.clone().into_iter().collect();
    want.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    assert_eq!(top, want);
    let teams = &v["top"]["teams"];
    assert_eq!(teams[0]["name"], "research");
    assert_eq!(
        pico_of_usd(&teams[0]["cost_usd"]),
        by_user["alice"] + by_user["bob"]
    );
    assert_eq!(v["top"]["models"][0]["name"], MODEL);
    assert_eq!(pico_of_usd(&v["top"]["models"][0]["cost_usd"]), total);
    // The same figures as `tokentap spend`.
    let cli: Value =
        serde_json::from_str(&tokentap_cli(&["spend", "--format", "json"], &tap.config)).unwrap();
    let cli: BTreeMap<String, u64> = cli
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["user"].as_str().unwrap().to_string(),
                pico_of_usd(&r["cost_usd"]),
            )
        })
        .collect();
    assert_eq!(cli, by_user);

    // Budgets: every capped user (own caps, or the default caps and spent today) and team.
    let b = api(&tap, "/admin/api/budgets?sort=name&order=asc");
    let rows = b["rows"].as_array().unwrap();
    let names: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["kind"].as_str().unwrap(), r["name"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            ("user", "alice"),
            ("user", "bob"),
            ("user", "carol"),
            ("user", "dave"),
            ("team", "research")
        ]
    );
    for r in rows {
        let name = r["name"].as_str().unwrap();
        let spent = pico_of_usd(&r["spent_usd"]);
        let cap = pico_of_usd(&r["cap_usd"]);
        if r["kind"] == "team" {
            assert_eq!(spent, by_user["alice"] + by_user["bob"]);
        } else {
            assert_eq!(spent, by_user[name], "{name}");
        }
        assert_eq!(pico_of_usd(&r["remaining_usd"]), cap.saturating_sub(spent));
        assert_eq!(r["reserved_usd"], "0", "nothing in flight");
        let state = r["state"].as_str().unwrap();
        match name {
            "dave" => assert_eq!(state, "capped"),
            "research" => assert_eq!(state, "ok"),
            _ => assert_eq!(state, "soft", "{name} passed the soft threshold"),
        }
        assert!(r["resets_at"].as_str().unwrap().ends_with('Z'));
    }
    // Filter by name (any case), and the default order: the most used first.
    let f = api(&tap, "/admin/api/budgets?q=ALI");
    assert_eq!(f["rows"].as_array().unwrap().len(), 1);
    assert_eq!(f["rows"][0]["name"], "alice");
    let d = api(&tap, "/admin/api/budgets");
    assert_eq!(d["rows"][0]["name"], "dave");
    let bad = request(tap.admin, "GET", "/admin/api/budgets?sort=colour", &[], b"");
    assert_eq!(bad.status, 400);

    // A user's page: caps, spend per model per day, totals.
    let u = api(&tap, "/admin/api/users/alice");
    assert_eq!(u["teams"], serde_json::json!(["research"]));
    assert_eq!(u["caps"][0]["window"], "daily");
    assert_eq!(u["days"].as_array().unwrap().len(), 30);
    let m = &u["models"][0];
    assert_eq!(m["model"], MODEL);
    assert_eq!(pico_of_usd(&m["cost_usd"][29]), by_user["alice"]);
    assert_eq!(m["calls"][29], 3);
    assert_eq!(u["totals"]["calls"], 3);
    let t = api(&tap, "/admin/api/teams/research");
    assert_eq!(t["members"], serde_json::json!(["alice", "bob"]));
    assert_eq!(t["totals"]["calls"], 5);
    let none = request(tap.admin, "GET", "/admin/api/teams/nope", &[], b"");
    assert_eq!(none.status, 404);
}

/// A ledger with no calls answers every view with zeros and complete series, never an error.
#[test]
fn an_empty_ledger_answers_every_view_with_zeros() {
    let mock = Mock::start();
    let tap = Tap::start(&mock.url(), TEST_PRICING);
    let v = api(&tap, "/admin/api/overview");
    assert_eq!(v["backend"], "embedded");
    assert_eq!(v["zone"], "UTC");
    for name in ["today", "week", "month"] {
        let p = period(&v, name);
        assert_eq!(
            (p["calls"].as_u64(), p["cost_usd"].as_str()),
            (Some(0), Some("0"))
        );
        assert!(p["from"].as_str().unwrap() < p["to"].as_str().unwrap());
    }
    let hourly = v["hourly"].as_array().unwrap();
    assert_eq!(hourly.len(), 48);
    let times: Vec<&str> = hourly.iter().map(|h| h["t"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "oldest first");
    assert!(times.iter().all(|t| t.ends_with(":00:00Z")));
    let daily = v["daily"].as_array().unwrap();
    assert_eq!(daily.len(), 90);
    assert_eq!(
        daily[89]["date"].as_str().unwrap(),
        &period(&v, "today")["from"].as_str().unwrap()[..10]
    );
    for list in ["users", "teams", "models"] {
        assert_eq!(v["top"][list], serde_json::json!([]));
    }
    assert_eq!(
        api(&tap, "/admin/api/budgets")["rows"],
        serde_json::json!([])
    );
    let u = api(&tap, "/admin/api/users/nobody");
    assert_eq!(u["caps"], serde_json::json!([]));
    assert_eq!(u["models"], serde_json::json!([]));
    assert_eq!(u["totals"]["calls"], 0);
    let c = api(&tap, "/admin/api/users/nobody/calls");
    assert_eq!(
        (c["calls"].clone(), c["next"].clone()),
        (serde_json::json!([]), Value::Null)
    );
    assert_eq!(api(&tap, "/admin/api/live")["calls"], serde_json::json!([]));
    let s = request(tap.admin, "GET", "/admin/api/spend?format=csv", &[], b"");
    assert_eq!(s.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&s.body).lines().count(),
        1,
        "the header only"
    );
    let unknown = request(tap.admin, "GET", "/admin/api/nothing", &[], b"");
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["type"], "invalid_request_error");
}

/// Periods, hours and days are the budgets' time zone's (here +05:30); the export takes date
/// ranges in it and refuses bad ones with a clear error.
#[test]
fn periods_hours_and_export_ranges_follow_the_budgets_time_zone() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &format!("{TEST_PRICING}\n[budgets]\ntime_zone = \"Asia/Kolkata\"\n"),
    );
    assert_eq!(chat(&tap, "zed", &[]).status, 200);
    let v = wait_api(&tap, "/admin/api/overview", |v| calls_today(v) == 1);
    assert_eq!(v["zone"], "Asia/Kolkata");
    let today = period(&v, "today");
    // Local midnight is 18:30 UTC the day before.
    assert!(
        today["from"].as_str().unwrap().ends_with("T18:30:00Z"),
        "{today}"
    );
    for h in v["hourly"].as_array().unwrap() {
        assert!(h["t"].as_str().unwrap().ends_with(":30:00Z"), "{h}");
    }
    let local_today = {
        let from = today["from"].as_str().unwrap();
        let d = chrono_date(&from[..10]);
        d + chrono_days(1)
    };
    assert_eq!(v["daily"][89]["date"], local_today.to_string());
    assert_eq!(v["daily"][89]["calls"], 1);
    let csv = |q: &str| {
        let r = request(tap.admin, "GET", &format!("/admin/api/spend?{q}"), &[], b"");
        (r.status, String::from_utf8_lossy(&r.body).to_string(), r)
    };
    let (status, body, r) = csv(&format!("from={local_today}&to={local_today}&by=model"));
    assert_eq!(status, 200);
    assert!(body.starts_with("model,calls,"), "{body}");
    assert!(body.contains(&format!("{MODEL},1,")), "{body}");
    assert!(r.header("content-disposition").unwrap().contains(&format!(
        "tokentap-spend-{local_today}-{local_today}-by-model.csv"
    )));
    let yesterday = local_today - chrono_days(1);
    let (_, body, _) = csv(&format!("from={yesterday}&to={yesterday}"));
    assert_eq!(body.lines().count(), 1, "nothing the day before: {body}");
    let (status, body, r) = csv(&format!("from={local_today}&format=json&by=team"));
    assert_eq!(
        (status, r.header("content-type")),
        (200, Some("application/json"))
    );
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()[0]["team"],
        "(no team)"
    );
    for bad in [
        "from=2026-13-01",
        "from=2026-12-08&to=2026-12-01",
        "from=2020-01-01&to=2026-01-01",
        "by=colour",
        "format=xml",
    ] {
        let (status, body, _) = csv(bad);
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("\"message\""), "{body}");
    }
}

fn chrono_date(s: &str) -> chrono::NaiveDate {
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
}

fn chrono_days(n: u64) -> chrono::Days {
    chrono::Days::new(n)
}

/// 1,000 users under the default caps: all listed on the budgets view, filtered by name,
/// the top ten ranked on the overview, any one's page answering.
#[test]
fn a_thousand_users_are_listed_filtered_and_ranked() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &format!("{TEST_PRICING}\n[budgets.default]\ndaily = {{ usd = 5.00 }}\n"),
    );
    let mut s = connect(tap.addr);
    for i in 0..1000 {
        // user-0 asks for 1 token, user-999 for 1000: spend grows with the number.
        let body = chat_body(MODEL, &format!("user-{i}"), false, "");
        let r = chat_on(
            &mut s,
            &[("x-mock-chunks", &(1 + i / 100).to_string())],
            &body,
        );
        assert_eq!(r.status, 200);
    }
    wait_api(&tap, "/admin/api/overview", |v| calls_today(v) == 1000);
    let b = api(&tap, "/admin/api/budgets");
    let rows = b["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1000);
    assert!(rows
        .windows(2)
        .all(|w| w[0]["used"].as_f64() >= w[1]["used"].as_f64()));
    let f = api(&tap, "/admin/api/budgets?q=user-99");
    let mut names: Vec<&str> = f["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = std::iter::once("user-99".to_string())
        .chain((990..1000).map(|i| format!("user-{i}")))
        .collect();
    want.sort();
    assert_eq!(names, want);
    let v = api(&tap, "/admin/api/overview?top=today");
    let top = v["top"]["users"].as_array().unwrap();
    assert_eq!(top.len(), 10);
    assert!(top
        .iter()
        .all(|u| u["name"].as_str().unwrap().starts_with("user-9")));
    let u = api(&tap, "/admin/api/users/user-500");
    assert_eq!(u["totals"]["calls"], 1);
    let bad = request(tap.admin, "GET", "/admin/api/overview?top=year", &[], b"");
    assert_eq!(bad.status, 400);
}

/// A user's calls come newest first, page after page by cursor, each with its figures; a
/// team's are its members'.
#[test]
fn a_users_and_a_teams_calls_page_from_newest_to_oldest() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &format!(
            "{TEST_PRICING}\n[budgets.teams.research]\nmembers = [\"alice\", \"bob\"]\ncaps = {{ monthly = {{ usd = 50.00 }} }}\n"
        ),
    );
    for i in 0..7 {
        let user = if i % 3 == 2 { "bob" } else { "alice" };
        assert_eq!(chat(&tap, user, &[]).status, 200);
    }
    let records = tap.wait_records(7);
    let ids = |user: &str| -> Vec<String> {
        let mut v: Vec<String> = records
            .iter()
            .filter(|r| user.is_empty() || r["user"] == user)
            .map(|r| r["request_id"].as_str().unwrap().to_string())
            .collect();
        v.reverse();
        v
    };
    wait_api(&tap, "/admin/api/overview", |v| calls_today(v) == 7);
    let mut got = Vec::new();
    let mut pages = 0;
    let mut cursor = String::new();
    loop {
        let v = api(
            &tap,
            &format!("/admin/api/users/alice/calls?limit=2&before={cursor}"),
        );
        pages += 1;
        for c in v["calls"].as_array().unwrap() {
            assert_eq!(c["user"], "alice");
            assert_eq!(c["model"], MODEL);
            assert_eq!(c["outcome"], "complete");
            assert_eq!(c["status"], 200);
            assert_eq!(c["usage_source"], "reported");
            assert_eq!(c["api"], "chat_completions");
            assert!(c["completion_tokens"].as_u64().unwrap() > 0);
            assert!(c["duration_ms"].is_u64());
            let r = records
                .iter()
                .find(|r| r["request_id"] == c["request_id"])
                .unwrap();
            assert_eq!(pico_of_usd(&c["cost_usd"]), pico_of(r));
            got.push(c["request_id"].as_str().unwrap().to_string());
        }
        match v["next"].as_str() {
            Some(n) => cursor = n.to_string(),
            None => break,
        }
    }
    assert_eq!(got, ids("alice"));
    assert_eq!(pages, 3, "2 + 2 + 1");
    let team = api(&tap, "/admin/api/teams/research/calls?limit=500");
    let team_ids: Vec<&str> = team["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(team_ids, ids(""));
    for bad in ["limit=0", "limit=501", "before=x"] {
        let r = request(
            tap.admin,
            "GET",
            &format!("/admin/api/users/alice/calls?{bad}"),
            &[],
            b"",
        );
        assert_eq!(r.status, 400, "{bad}");
    }
}

/// A slow stream is on the live view while it runs, with its chunks so far, and leaves it
/// when it ends.
#[test]
fn a_slow_stream_is_live_while_it_runs_and_leaves_when_it_ends() {
    let mock = Mock::start();
    let tap = Tap::start(&mock.url(), TEST_PRICING);
    let addr = tap.addr;
    let call = std::thread::spawn(move || {
        post_chat(
            addr,
            &[("x-mock-chunks", "80"), ("x-mock-delay-ms", "60")],
            &chat_body(MODEL, "streamer", true, ""),
        )
    });
    let v = wait_api(&tap, "/admin/api/live", |v| {
        v["calls"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["user"] == "streamer" && c["chunks"].as_u64().unwrap() > 0)
    });
    // (About five seconds of stream: seen by a poll every 50 ms.)
    let in_flight = api(&tap, "/admin/api/status")["in_flight"].clone();
    let c = &v["calls"][0];
    assert_eq!(
        (c["model"].as_str(), c["stream"].as_bool()),
        (Some(MODEL), Some(true))
    );
    assert_eq!(c["api"], "chat_completions");
    assert!(c["bytes"].as_u64().unwrap() > 0);
    assert_eq!(call.join().unwrap().status, 200);
    assert!(
        in_flight == 1 || tap.records().len() == 1,
        "in flight: {in_flight}"
    );
    wait_api(&tap, "/admin/api/live", |v| {
        v["calls"] == serde_json::json!([])
    });
}

/// Status: version, uptime, the running config and the last reload (also a rejected one,
/// with its error), the ledger's health, OTLP, and upstream errors in the last 5 minutes.
#[test]
fn status_tells_the_config_reloads_ledger_and_upstream_errors() {
    let mock = Mock::start();
    let tap = Tap::start(&mock.url(), TEST_PRICING);
    let s = api(&tap, "/admin/api/status");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["config"]["hash"], tap.config_hash().as_str());
    assert_eq!(s["config"]["last_reload"], Value::Null);
    assert_eq!(s["ledger"]["backend"], "embedded");
    assert_eq!(s["ledger"]["file_writable"], true);
    assert_eq!(s["otlp"]["enabled"], false);
    assert_eq!(s["upstream"]["errors_5m"], 0);
    assert_eq!(s["upstream"]["url"], mock.url().trim_end_matches('/'));

    // A broken edit is rejected (the watcher reloads on its own), with its error; the fix is
    // reloaded; a reload asked for with nothing changed is "unchanged".
    tap.write_config(&tap.text.replace("[access_log]", "[access_log\n"));
    let s = wait_api(&tap, "/admin/api/status", |s| {
        s["config"]["last_reload"]["result"] == "rejected"
    });
    let last = &s["config"]["last_reload"];
    assert!(
        last["error"].as_str().unwrap().contains("tokentap.toml"),
        "{last}"
    );
    assert!(last["at"].as_str().unwrap().ends_with('Z'));
    tap.write_config(&format!("{}\n# changed\n", tap.text));
    let s = wait_api(&tap, "/admin/api/status", |s| {
        s["config"]["last_reload"]["result"] == "reloaded"
    });
    assert_eq!(s["config"]["last_reload"]["error"], Value::Null);
    assert_eq!(s["config"]["hash"], s["config"]["last_reload"]["hash"]);
    assert_eq!(tap.reload().status, 200);
    let last = &api(&tap, "/admin/api/status")["config"]["last_reload"];
    assert_eq!(
        (last["result"].as_str(), last["trigger"].as_str()),
        (Some("unchanged"), Some("POST /admin/reload"))
    );

    for _ in 0..2 {
        assert_eq!(chat(&tap, "u", &[("x-mock-status", "503")]).status, 503);
    }
    wait_api(&tap, "/admin/api/status", |s| {
        s["upstream"]["errors_5m"] == 2
    });
}

/// With an admin token, the page and its files load, and nothing else does without the
/// token: the login answers an HttpOnly, SameSite=Strict cookie that is not the token; with
/// the cookie, a state change needs the CSRF value and the listener's own origin.
#[test]
fn the_page_needs_the_token_and_state_changes_need_the_session_and_the_origin() {
    let mock = Mock::start();
    let tap = TapBuilder::new(&mock.url())
        .extra(TEST_PRICING)
        .env("TT_ADMIN_TOKEN", "s3cret-admin-token-42")
        .start_with_server_extra("admin_token_env = \"TT_ADMIN_TOKEN\"\n");
    let page = request(tap.admin, "GET", "/", &[], b"");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"));
    for asset in [
        "/ui/app.js",
        "/ui/app.css",
        "/ui/uplot.iife.min.js",
        "/ui/LICENSE.uplot",
    ] {
        assert_eq!(
            request(tap.admin, "GET", asset, &[], b"").status,
            200,
            "{asset}"
        );
    }
    let s = api(&tap, "/admin/api/session");
    assert_eq!(
        (s["auth"].as_str(), s["logged_in"].as_bool()),
        (Some("token"), Some(false))
    );
    assert_eq!(s["csrf"], Value::Null);
    for path in [
        "/admin/api/overview",
        "/admin/api/budgets",
        "/admin/api/status",
    ] {
        assert_eq!(
            request(tap.admin, "GET", path, &[], b"").status,
            401,
            "{path}"
        );
    }
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let wrong = request(tap.admin, "POST", "/admin/login", &form, b"token=nope");
    assert_eq!(wrong.status, 401);
    assert!(wrong.header("set-cookie").is_none());
    let ok = request(
        tap.admin,
        "POST",
        "/admin/login",
        &form,
        b"token=s3cret-admin-token-42",
    );
    assert_eq!(ok.status, 204);
    let set = ok.header("set-cookie").unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    // Only for /admin: never sent along with calls to the proxy on the same host.
    assert!(set.contains("Path=/admin;"), "{set}");
    assert!(!set.contains("s3cret-admin-token-42"));
    let cookie = set.split(';').next().unwrap().to_string();
    let with = |extra: &[(&str, &str)]| -> Vec<(String, String)> {
        let mut h = vec![("cookie".to_string(), cookie.clone())];
        h.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        h
    };
    let get = |path: &str, h: &[(String, String)]| {
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        request(tap.admin, "GET", path, &h, b"")
    };
    let post = |path: &str, h: &[(String, String)]| {
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        request(tap.admin, "POST", path, &h, b"")
    };
    assert_eq!(get("/admin/api/overview", &with(&[])).status, 200);
    let s = get("/admin/api/session", &with(&[])).json();
    assert_eq!(s["logged_in"], true);
    let csrf = s["csrf"].as_str().unwrap().to_string();
    assert_eq!(csrf.len(), 64);
    // A reload with the cookie alone, or from another origin, is refused; with the CSRF value
    // from the listener's own origin it goes.
    assert_eq!(post("/admin/reload", &with(&[])).status, 403);
    // (The test client's requests name `localhost` as their host.)
    let own = "http://localhost".to_string();
    assert_eq!(
        post(
            "/admin/reload",
            &with(&[
                ("x-tokentap-csrf", &csrf),
                ("origin", "http://evil.example")
            ])
        )
        .status,
        403
    );
    assert_eq!(
        post(
            "/admin/reload",
            &with(&[("x-tokentap-csrf", &csrf), ("sec-fetch-site", "cross-site")])
        )
        .status,
        403
    );
    assert_eq!(
        post(
            "/admin/reload",
            &with(&[("x-tokentap-csrf", &csrf), ("origin", &own)])
        )
        .status,
        200
    );
    // Scripts keep the bearer token; a wrong one is refused.
    let bearer = request(
        tap.admin,
        "POST",
        "/admin/reload",
        &[("authorization", "Bearer s3cret-admin-token-42")],
        b"",
    );
    assert_eq!(bearer.status, 200);
    let bad = request(
        tap.admin,
        "GET",
        "/admin/api/status",
        &[("authorization", "Bearer x")],
        b"",
    );
    assert_eq!(bad.status, 401);
    // A second login is a session of its own.
    let again = request(
        tap.admin,
        "POST",
        "/admin/login",
        &form,
        b"token=s3cret-admin-token-42",
    );
    let other = again
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert_ne!(other, cookie);
    // Logging out ends the session on the server too: the old cookie opens nothing.
    let out = post("/admin/logout", &with(&[("x-tokentap-csrf", &csrf)]));
    assert_eq!(out.status, 204);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(get("/admin/api/overview", &with(&[])).status, 401);
    let h = [("cookie", other.as_str())];
    assert_eq!(
        request(tap.admin, "GET", "/admin/api/overview", &h, b"").status,
        200
    );
    // HEAD is no way around the token either.
    assert_eq!(
        request(tap.admin, "HEAD", "/admin/api/overview", &[], b"").status,
        401
    );
}

/// One request with its own `Host` header (the test client's is `localhost`).
fn with_host(tap: &Tap, method: &str, path: &str, host: &str) -> Resp {
    use std::io::Write;
    let mut s = connect(tap.admin);
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: 0\r\n\r\n"
    )
    .unwrap();
    read_response(&mut s, usize::MAX)
}

/// Without a token, the page and `/admin/…` answer only to an IP address or localhost as
/// the host: a DNS name could be an attacker's pointed at the listener (DNS rebinding), whose
/// pages would then be same-origin with the admin page. Health and metrics stay open.
#[test]
fn without_a_token_the_page_answers_only_to_an_address_not_a_dns_name() {
    let mock = Mock::start();
    let tap = Tap::start(&mock.url(), TEST_PRICING);
    let port = tap.admin.port();
    for path in ["/", "/ui/app.js", "/admin/api/overview", "/admin/config"] {
        let r = with_host(&tap, "GET", path, &format!("evil.example:{port}"));
        assert_eq!(r.status, 403, "{path}");
        assert!(String::from_utf8_lossy(&r.body).contains("admin_token_env"));
    }
    let r = with_host(
        &tap,
        "POST",
        "/admin/reload",
        &format!("evil.example:{port}"),
    );
    assert_eq!(r.status, 403);
    for host in [
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        format!("localhost:{port}"),
    ] {
        assert_eq!(
            with_host(&tap, "GET", "/admin/api/overview", &host).status,
            200,
            "{host}"
        );
    }
    assert_eq!(
        with_host(&tap, "GET", "/healthz", "evil.example").status,
        200
    );
    assert_eq!(
        with_host(&tap, "GET", "/metrics", "evil.example").status,
        200
    );
}

/// A cap that refused a call shows as reached until an operator resets the spend (or a call
/// fits again).
#[test]
fn a_reached_cap_stands_out_until_its_spend_is_reset() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &format!("{TEST_PRICING}\n[budgets.users.dave]\ndaily = {{ usd = 0.0002 }}\n"),
    );
    let mut refused = false;
    for _ in 0..20 {
        if chat(&tap, "dave", &[]).status == 429 {
            refused = true;
            break;
        }
    }
    assert!(refused);
    let state = |tap: &Tap| api(tap, "/admin/api/budgets")["rows"][0]["state"].clone();
    assert_eq!(state(&tap), "capped");
    let r = request(
        tap.admin,
        "POST",
        "/admin/budgets/users/dave/reset?window=daily",
        &[],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(state(&tap), "ok");
}

/// Without a token the admin listener is open (loopback by default), but a browser on another
/// site still cannot make it reload.
#[test]
fn without_a_token_a_cross_site_state_change_is_refused() {
    let mock = Mock::start();
    let tap = Tap::start(&mock.url(), TEST_PRICING);
    let cross = request(
        tap.admin,
        "POST",
        "/admin/reload",
        &[("origin", "http://evil.example")],
        b"",
    );
    assert_eq!(cross.status, 403);
    assert_eq!(
        tap.reload().status,
        200,
        "curl, with no Origin, still reloads"
    );
    let s = api(&tap, "/admin/api/session");
    assert_eq!(
        (s["auth"].as_str(), s["logged_in"].as_bool()),
        (Some("none"), Some(true))
    );
}

/// A team without caps still has its members' calls: on the overview's top teams and on its
/// own page (a call's teams come from the config, not only from a reservation).
#[test]
fn an_uncapped_teams_calls_are_its_own() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &format!("{TEST_PRICING}\n[budgets.teams.docs]\nmembers = [\"zoe\"]\n"),
    );
    assert_eq!(chat(&tap, "zoe", &[]).status, 200);
    let v = wait_api(&tap, "/admin/api/overview", |v| calls_today(v) == 1);
    assert_eq!(v["top"]["teams"][0]["name"], "docs");
    let calls = api(&tap, "/admin/api/teams/docs/calls");
    assert_eq!(calls["calls"].as_array().unwrap().len(), 1);
}
