//! Per-user caps against the real binary and the embedded ledger (SQLite file, read back
//! directly here).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MODEL: &str = "anthropic/claude-opus-4.6";

/// chat_body's prompt: "system" + "Be brief." + "user" + "Say something about tokens, please."
/// = 54 bytes = 14 tokens (mock and estimate alike: bytes / 4, rounded up).
const PROMPT_TOKENS: u64 = 14;
/// TEST_PRICING in pico-USD per token.
const IN: u64 = 5_000_000;
const OUT: u64 = 25_000_000;
const CACHED: u64 = 500_000;
const SEARCH: u64 = 5_000_000_000;

fn ledger_db(tap: &Tap) -> rusqlite::Connection {
    rusqlite::Connection::open(tap.dir.path().join("tokentap-ledger.db")).unwrap()
}

/// Sum of cost in the ledger's per-call rows for `user`.
fn ledger_spend(tap: &Tap, user: &str) -> u64 {
    ledger_db(tap)
        .query_row(
            "SELECT COALESCE(SUM(cost_pico), 0) FROM calls WHERE user = ?1",
            [user],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as u64
}

fn ledger_rows(tap: &Tap) -> u64 {
    ledger_db(tap)
        .query_row("SELECT COUNT(*) FROM calls", [], |r| r.get::<_, i64>(0))
        .unwrap() as u64
}

/// What the calls the upstream answered with 200 cost, by their records.
fn spent_by_answered(recs: &[Value]) -> u64 {
    recs.iter()
        .filter(|r| r["status"] == 200)
        .map(pico_of)
        .sum()
}

#[test]
fn sixty_four_concurrent_first_requests_cannot_overshoot_the_cap() {
    let mock = Mock::start();
    // Each call: worst case 14 prompt + 20 output tokens; really 14 + 5.
    let worst = PROMPT_TOKENS * IN + 20 * OUT;
    let real = PROMPT_TOKENS * IN + 5 * OUT;
    let cap = 10 * real;
    let tap = Tap::start(
        &mock.url(),
        &format!(
            "{TEST_PRICING}\n[budgets.users.greedy]\ndaily = {{ usd = \"{}\" }}\n",
            usd(cap)
        ),
    );
    let body = chat_body(MODEL, "greedy", false, r#","max_tokens":20"#);
    let resps = chats_at_once(64, |_| tap.addr, &[("x-mock-delay-ms", "100")], &body);
    let ok = resps.iter().filter(|r| r.status == 200).count();
    let refused: Vec<&Resp> = resps.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok + refused.len(), 64, "every call is answered or refused");
    assert!(ok >= 1 && !refused.is_empty(), "ok {ok}");
    for r in &refused {
        let e = r.json();
        assert_eq!(e["error"]["type"], "budget_exceeded");
        assert_eq!(e["error"]["code"], "budget_exceeded");
        assert_eq!(e["error"]["param"], Value::Null);
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(!msg.contains('$'), "no spend figures in the message: {msg}");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!(msg.contains("daily"), "{msg}");
        // Refused while settled spend alone still leaves room: the calls in flight hold the
        // rest, and the caller may retry as soon as they end. (A call delayed until enough of
        // the burst settled is refused until the window resets.)
        if msg.contains("in flight") {
            assert!((1..=5).contains(&retry), "retry after {retry}");
        } else {
            assert!(msg.contains("resets at"), "{msg}");
            assert!((1..=86_400).contains(&retry));
        }
    }
    assert!(
        refused.iter().any(|r| r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in flight")),
        "a burst of 64 is refused for the calls in flight"
    );
    // The refused calls never reached the upstream.
    assert_eq!(mock.received(), ok as u64);
    let recs = tap.wait_records(64);
    let spent = spent_by_answered(&recs);
    assert!(
        spent <= cap + worst,
        "spent {spent} > cap {cap} + worst {worst}"
    );
    assert_eq!(
        recs.iter().filter(|r| r["outcome"] == "rejected").count(),
        refused.len()
    );
    // Once the burst has settled, calls one after another fill the cap; the first refusal
    // comes from settled spend and names the window's reset.
    let mut more = 0;
    let mut waited = 0;
    let last = loop {
        let body = chat_body(MODEL, "greedy", false, r#","max_tokens":20"#);
        let r = post_chat(tap.addr, &[], &body);
        if r.status == 429
            && r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("in flight")
        {
            // The previous call's answer arrives just before its record settles it: as the
            // refusal says, retry when it has.
            waited += 1;
            assert!(waited < 400, "a finished call never settled");
            std::thread::sleep(Duration::from_millis(25));
            continue;
        }
        if r.status != 200 {
            break r;
        }
        more += 1;
        assert!(more < 64, "the cap never refused a call");
    };
    assert_eq!(last.status, 429);
    let msg = last.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("daily") && msg.contains("resets at"), "{msg}");
    let retry: u64 = last.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry));
    let spent = spent_by_answered(&tap.wait_records(64 + more + waited + 1));
    assert!(
        spent <= cap + worst,
        "spent {spent} > cap {cap} + worst {worst}"
    );
}

#[test]
fn spend_equals_the_upstreams_bill_to_the_micro_dollar() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &format!("{TEST_PRICING}\n[budgets.default]\nmonthly = {{ usd = 1000 }}\n"),
    );
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let addr = tap.addr;
            std::thread::spawn(move || {
                let mut s = connect(addr);
                for i in 0..2500 {
                    let user = format!("u{}", (t * 2500 + i) % 7);
                    let search = if i % 5 == 0 {
                        r#","tools":[{"type":"octen_search"}]"#
                    } else {
                        ""
                    };
                    let body = chat_body(MODEL, &user, i % 2 == 0, search);
                    let cached = (i % 4).to_string();
                    let reasoning = (i % 3).to_string();
                    let mut h = vec![
                        ("x-mock-cached", cached.as_str()),
                        ("x-mock-reasoning", reasoning.as_str()),
                    ];
                    if i % 100 == 8 {
                        // A stream the upstream cuts after two content chunks: billed for what
                        // it generated, which is what the record estimates.
                        h.push(("x-mock-reset-after", "2"));
                    }
                    let r = chat_on(&mut s, &h, &body);
                    assert_eq!(r.status, 200);
                    if !r.complete {
                        s = connect(addr);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let reqs = mock.wait_requests(10_000);
    assert_eq!(reqs.len(), 10_000);
    let recs = tap.wait_records(10_000);
    assert!(recs.iter().any(|r| r["usage_source"] == "estimated"));
    // What the upstream billed, priced by hand, per user.
    let mut billed = std::collections::BTreeMap::<String, u64>::new();
    for r in &reqs {
        let b = &r["billed"];
        let g = |k: &str| b[k].as_u64().unwrap();
        let cost = (g("prompt") - g("cached")) * IN
            + g("cached") * CACHED
            + g("completion") * OUT
            + g("web_searches") * SEARCH;
        *billed
            .entry(r["user"].as_str().unwrap().to_string())
            .or_default() += cost;
    }
    // The access log and the ledger agree with it, user by user.
    let mut logged = std::collections::BTreeMap::<String, u64>::new();
    for r in &recs {
        *logged
            .entry(r["user"].as_str().unwrap().to_string())
            .or_default() += pico_of(r);
    }
    assert_eq!(logged, billed);
    // Wait for the ledger's group commit to catch up.
    let start = Instant::now();
    while ledger_rows(&tap) < 10_000 {
        assert!(start.elapsed() < PATIENCE);
        std::thread::sleep(Duration::from_millis(100));
    }
    for (user, pico) in &billed {
        assert_eq!(ledger_spend(&tap, user), *pico, "{user}");
        // The counter that enforces the cap holds the same, with nothing left reserved.
        assert_eq!(tap.window_spend(user), (*pico, 0), "{user}");
    }
}

#[test]
fn spend_survives_sigterm_and_kill_9_loses_at_most_one_flush_interval() {
    let mock = Mock::start();
    let extra = format!(
        "{TEST_PRICING}\n[budgets]\n[budgets.ledger]\nflush_interval_ms = 200\n[budgets.users.keeper]\ntotal = {{ usd = 1000 }}\n"
    );
    let mut tap = Tap::start(&mock.url(), &extra);
    for _ in 0..20 {
        let body = chat_body(MODEL, "keeper", false, "");
        assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
    }
    let recs = tap.wait_records(20);
    let spent: u64 = recs.iter().map(pico_of).sum();
    assert!(tap.proc.terminate().success());
    // Everything settled before SIGTERM is in the file.
    assert_eq!(ledger_spend(&tap, "keeper"), spent);
    let total: i64 = ledger_db(&tap)
        .query_row(
            "SELECT pico FROM spend WHERE key = 'user:keeper' AND window = 'total'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(total as u64, spent);

    // Start again on the same ledger: the spend is still charged. Calls keep coming while
    // the process is killed with -9: what was settled more than a flush interval before the
    // kill is in the file; at most the calls of the last interval or two are lost.
    let per_call = spent / 20;
    let tap2 = TapBuilder::new(&mock.url())
        .extra(&extra)
        .in_dir(tap.dir)
        .start();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let caller = {
        let (addr, stop) = (tap2.addr, Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut done = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = chat_body(MODEL, "keeper", false, "");
                let Ok(mut s) = std::net::TcpStream::connect(addr) else {
                    break;
                };
                s.set_read_timeout(Some(PATIENCE)).unwrap();
                send_chat(&mut s, &[("connection", "close")], &body);
                // Read to the close: the kill may cut a response anywhere.
                let mut got = Vec::new();
                let _ = std::io::Read::read_to_end(&mut s, &mut got);
                let text = String::from_utf8_lossy(&got);
                if !(text.starts_with("HTTP/1.1 200") && text.trim_end().ends_with('}')) {
                    break;
                }
                done.push(Instant::now());
            }
            done
        })
    };
    // Let a few flush intervals of calls pass, then kill in the middle of the traffic.
    let start = Instant::now();
    while ledger_rows(&tap2) < 60 {
        assert!(
            start.elapsed() < PATIENCE,
            "calls are not reaching the ledger"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    tap2.proc.signal("KILL");
    let killed = Instant::now();
    let mut tap2 = tap2;
    let _ = tap2.proc.child.wait();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let done = caller.join().unwrap();
    let total: i64 = ledger_db(&tap2)
        .query_row(
            "SELECT pico FROM spend WHERE key = 'user:keeper' AND window = 'total'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let kept = (total as u64 - spent) / per_call;
    assert_eq!(
        (total as u64 - spent) % per_call,
        0,
        "whole calls are kept or lost"
    );
    let interval = Duration::from_millis(200);
    let surely_kept = done.iter().filter(|t| killed - **t > 2 * interval).count() as u64;
    let finished = done.len() as u64;
    assert!(
        finished > surely_kept,
        "no call ended within the last flush interval: the test proves nothing"
    );
    assert!(
        (surely_kept..=finished + 1).contains(&kept),
        "kill -9 lost more than a flush interval: {kept} calls kept of {finished} \
         ({surely_kept} ended over two intervals before the kill)"
    );
}

#[test]
fn a_stream_cut_at_the_drain_deadline_is_charged_what_it_used() {
    let mock = Mock::start();
    let extra = format!("{TEST_PRICING}\n[budgets.users.cut]\ntotal = {{ usd = 1000 }}\n");
    let mut tap = TapBuilder::new(&mock.url())
        .extra(&extra)
        .start_with_server_extra("drain_timeout_ms = 300\n");
    let mut s = connect(tap.addr);
    let body = chat_body(MODEL, "cut", true, "");
    send_chat(
        &mut s,
        &[("x-mock-chunks", "100"), ("x-mock-delay-ms", "200")],
        &body,
    );
    // Two content chunks have arrived; the stream would run for another 20 s.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.windows(9).filter(|w| w == b"\"content\"").count() < 2 {
        let n = std::io::Read::read(&mut s, &mut buf).unwrap();
        assert!(n > 0, "the stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    // SIGTERM: the stream outlives server.drain_timeout_ms and is cut when the process ends.
    assert!(tap.proc.terminate().success());
    let (cost, completion, outcome, estimated): (i64, i64, String, bool) = ledger_db(&tap)
        .query_row(
            "SELECT cost_pico, completion, outcome, estimated FROM calls WHERE user = 'cut'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(outcome, "abandoned");
    assert!(estimated);
    // Charged what it used as far as tokentap saw (the prompt and the content relayed), not
    // nothing and not its worst case.
    assert!(completion >= 2, "completion {completion}");
    assert_eq!(cost as u64, PROMPT_TOKENS * IN + completion as u64 * OUT);
    let total: i64 = ledger_db(&tap)
        .query_row(
            "SELECT pico FROM spend WHERE key = 'user:cut' AND window = 'total'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(total, cost);
    // After a restart the cap sees the same, with nothing reserved.
    let tap2 = TapBuilder::new(&mock.url())
        .extra(&extra)
        .in_dir(tap.dir)
        .start();
    let v = request(tap2.admin, "GET", "/admin/budgets/users/cut", &[], b"").json();
    assert_eq!(
        pico_of_usd(&v["windows"][0]["spent_usd"]),
        cost as u64,
        "{v}"
    );
    assert_eq!(pico_of_usd(&v["windows"][0]["reserved_usd"]), 0, "{v}");
}

#[test]
fn a_second_process_cannot_share_the_embedded_ledger() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &format!("{TEST_PRICING}\n[budgets.default]\ndaily = {{ usd = 10 }}\n"),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokentap"))
        .args(["serve", "--config"])
        .arg(&tap.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another tokentap process"), "{err}");
    // The first one is unharmed.
    let body = chat_body(MODEL, "x", false, "");
    assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
}

#[test]
fn a_blocked_user_is_allowed_again_when_the_window_resets() {
    let mock = Mock::start();
    let real = PROMPT_TOKENS * IN + 5 * OUT;
    let tap = Tap::start(
        &mock.url(),
        &format!(
            "{TEST_PRICING}\n[budgets.users.burst]\n\"3s\" = {{ usd = \"{}\" }}\n",
            usd(real)
        ),
    );
    let body = chat_body(MODEL, "burst", false, r#","max_tokens":5"#);
    // Wait for the start of a fresh window, so the next two calls fall in the same one.
    let start = Instant::now();
    let mut blocked = None;
    while start.elapsed() < PATIENCE {
        let r = post_chat(tap.addr, &[], &body);
        if r.status == 429 {
            blocked = Some(r);
            break;
        }
    }
    let blocked = blocked.expect("the cap never blocked");
    let retry: u64 = blocked.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3).contains(&retry), "retry-after {retry}");
    // Once the window has passed, the same call goes through.
    let start = Instant::now();
    loop {
        let r = post_chat(tap.addr, &[], &body);
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 429);
        assert!(start.elapsed() < PATIENCE, "never allowed again");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_request_without_a_user_is_refused_when_budgets_apply() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &format!("{TEST_PRICING}\n[budgets.default]\ndaily = {{ usd = 10 }}\n"),
    );
    let body =
        br#"{"model":"anthropic/claude-opus-4.6","messages":[{"role":"user","content":"hi"}]}"#;
    let r = post_chat(tap.addr, &[], body);
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "user");
    assert_eq!(r.json()["error"]["code"], "user_required");
    // An empty user names nobody; a body tokentap cannot read cannot be capped.
    let r = post_chat(tap.addr, &[], &chat_body(MODEL, "", false, ""));
    assert_eq!(r.json()["error"]["code"], "user_required");
    let r = post_chat(
        tap.addr,
        &[],
        b"{\"user\":\"x\",\"messages\":[\"\\ud800\"]}",
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_body");
    assert_eq!(mock.received(), 0);
}

fn admin(tap: &Tap, method: &str, path: &str, token: Option<&str>) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    request(tap.admin, method, path, &headers, b"")
}

#[test]
fn the_admin_api_reports_and_resets_budgets_behind_its_token() {
    let mock = Mock::start();
    let token = "test-admin-token-0123456789";
    let tap = TapBuilder::new(&mock.url())
        .extra(&format!(
            "{TEST_PRICING}\n[budgets.users.alice]\ndaily = {{ usd = 1 }}\nmonthly = {{ usd = 10, tokens = 1000000 }}\n\
             [budgets.teams.lab]\nmembers = [\"alice\"]\ncaps = {{ daily = {{ usd = 5 }} }}\n"
        ))
        .env("TT_ADMIN_TOKEN", token)
        .start_with_server_extra("admin_token_env = \"TT_ADMIN_TOKEN\"\n");
    for _ in 0..3 {
        let body = chat_body(MODEL, "alice", false, "");
        assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
    }
    let spent: u64 = tap.wait_records(3).iter().map(pico_of).sum();

    // Without the token (or with a wrong one): 401, OpenAI-shaped.
    for t in [None, Some("wrong-token-wrong-token")] {
        for (m, p) in [
            ("GET", "/admin/budgets/users/alice"),
            ("POST", "/admin/reload"),
            ("GET", "/admin/config"),
        ] {
            let r = admin(&tap, m, p, t);
            assert_eq!(r.status, 401, "{m} {p}");
            assert_eq!(r.json()["error"]["type"], "authentication_error");
        }
    }
    // Health and metrics stay open.
    assert_eq!(admin(&tap, "GET", "/healthz", None).status, 200);

    let v = admin(&tap, "GET", "/admin/budgets/users/alice", Some(token)).json();
    assert_eq!(v["user"], "alice");
    assert_eq!(v["teams"], serde_json::json!(["lab"]));
    let daily = v["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["window"] == "daily")
        .unwrap();
    assert_eq!(pico_of_usd(&daily["spent_usd"]), spent);
    assert_eq!(
        pico_of_usd(&daily["remaining_usd"]),
        1_000_000_000_000 - spent
    );
    assert!(daily["resets_at"].as_str().unwrap().ends_with("T00:00:00Z"));
    let monthly = v["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["window"] == "monthly")
        .unwrap();
    assert_eq!(monthly["spent_tokens"], 3 * (PROMPT_TOKENS + 5));

    let team = admin(&tap, "GET", "/admin/budgets/teams/lab", Some(token)).json();
    assert_eq!(pico_of_usd(&team["windows"][0]["spent_usd"]), spent);
    assert_eq!(
        admin(&tap, "GET", "/admin/budgets/teams/nope", Some(token)).status,
        404
    );

    let top = admin(
        &tap,
        "GET",
        "/admin/budgets/top?window=monthly&limit=5",
        Some(token),
    )
    .json();
    assert_eq!(top["users"][0]["user"], "alice");

    let r = admin(
        &tap,
        "POST",
        "/admin/budgets/users/alice/reset?window=daily",
        Some(token),
    );
    assert_eq!(r.status, 200);
    let daily = r.json()["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["window"] == "daily")
        .cloned()
        .unwrap();
    assert_eq!(pico_of_usd(&daily["spent_usd"]), 0);
    // The monthly window is untouched.
    let v = admin(&tap, "GET", "/admin/budgets/users/alice", Some(token)).json();
    let monthly = v["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["window"] == "monthly")
        .unwrap();
    assert_eq!(pico_of_usd(&monthly["spent_usd"]), spent);
}

#[test]
fn tokentap_spend_reports_what_the_calls_cost() {
    let mock = Mock::start();
    let mut tap = Tap::start(
        &mock.url(),
        &format!("{TEST_PRICING}\n[budgets]\ntime_zone = \"Pacific/Kiritimati\"\n[budgets.teams.lab]\nmembers = [\"ann\"]\ncaps = {{ daily = {{ usd = 5 }} }}\n[budgets.teams.ops]\nmembers = [\"ann\"]\ncaps = {{ daily = {{ usd = 5 }} }}\n"),
    );
    for (user, n) in [("ann", 3), ("ben", 2)] {
        for _ in 0..n {
            let body = chat_body(MODEL, user, false, "");
            assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
        }
    }
    let recs = tap.wait_records(5);
    let cost = |u: &str| -> u64 { recs.iter().filter(|r| r["user"] == u).map(pico_of).sum() };
    // A backup while tokentap runs holds what was flushed.
    let start = Instant::now();
    while ledger_rows(&tap) < 5 {
        assert!(start.elapsed() < PATIENCE, "rows never reached the ledger");
        std::thread::sleep(Duration::from_millis(50));
    }
    let copy = tap.dir.path().join("backup.db");
    tokentap_cli(&["backup", "--to", copy.to_str().unwrap()], &tap.config);
    let rows: i64 = rusqlite::Connection::open(&copy)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 5);
    assert!(tap.proc.terminate().success());
    let run = |args: &[&str]| {
        let mut all = vec!["spend"];
        all.extend_from_slice(args);
        tokentap_cli(&all, &tap.config)
    };
    let json: Value = serde_json::from_str(&run(&["--format", "json"])).unwrap();
    let row = |u: &str| {
        json.as_array()
            .unwrap()
            .iter()
            .find(|r| r["user"] == u)
            .cloned()
            .unwrap()
    };
    assert_eq!(row("ann")["calls"], 3);
    assert_eq!(
        row("ann")["cost_usd"].as_str().unwrap(),
        usd(cost("ann")).trim_end_matches('0')
    );
    assert_eq!(row("ben")["calls"], 2);
    let teams = run(&["--by", "team", "--format", "csv"]);
    assert!(teams.starts_with("team,calls,"), "{teams}");
    assert!(teams.lines().any(|l| l.starts_with("lab,3,")), "{teams}");
    assert!(
        teams.lines().any(|l| l.starts_with("(no team),2,")),
        "{teams}"
    );
    assert!(teams.lines().any(|l| l.starts_with("ops,3,")), "{teams}");
    // ann's calls are under both of her teams; the total counts each call once.
    let by_team = run(&["--by", "team"]);
    let all = cost("ann") + cost("ben");
    assert!(
        by_team.contains(&format!(
            "total cost_usd {}",
            usd(all).trim_end_matches('0')
        )),
        "{by_team}"
    );
    let table = run(&["--by", "model"]);
    assert!(
        table.contains(MODEL) && table.contains("total cost_usd"),
        "{table}"
    );
    // An empty range reports nothing, and a bad date is a clear error.
    let empty: Value = serde_json::from_str(&run(&[
        "--from",
        "2001-01-01",
        "--to",
        "2001-01-02",
        "--format",
        "json",
    ]))
    .unwrap();
    assert_eq!(empty, serde_json::json!([]));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokentap"))
        .args(["spend", "--from", "yesterday", "--config"])
        .arg(&tap.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("YYYY-MM-DD"));
}

#[test]
fn each_refusal_is_counted_under_its_own_reason() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &format!("{TEST_PRICING}\n[budgets.default]\ndaily = {{ usd = 0.000001 }}\n"),
    );
    // Over the cap, no user, a body that is no JSON object: three reasons, none guessed.
    let over = post_chat(tap.addr, &[], &chat_body(MODEL, "tiny", false, ""));
    assert_eq!(over.status, 429);
    let anonymous = br#"{"model":"anthropic/claude-opus-4.6","messages":[]}"#;
    assert_eq!(post_chat(tap.addr, &[], anonymous).status, 400);
    let unreadable = post_chat(tap.addr, &[], b"[1,2,3]");
    assert_eq!(unreadable.status, 400);
    assert_eq!(unreadable.json()["error"]["code"], "invalid_body");
    let metrics = request(tap.admin, "GET", "/metrics", &[], b"").body;
    let text = String::from_utf8_lossy(&metrics);
    for reason in ["usd", "user_required", "invalid_body"] {
        let line = text
            .lines()
            .find(|l| {
                l.starts_with("tokentap_budget_rejections_total{")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .unwrap_or_else(|| panic!("no {reason} series in:\n{text}"));
        assert!(line.ends_with(" 1"), "{line}");
    }
    assert_eq!(mock.received(), 0);
}
