//! Issue 24, rate limits on one replica (the embedded ledger): requests and tokens per minute,
//! calls in flight, per user, team and virtual key, the answer a limited caller gets, and a
//! change by hot reload. (Several replicas sharing Redis: tests/redis.rs.)

mod common;

use std::time::{Duration, Instant};

use common::*;

fn limits(text: &str) -> String {
    format!("{TEST_PRICING}\n[budgets.limits]\n{text}\n")
}

#[test]
fn a_user_limited_to_five_requests_a_minute_gets_exactly_five_through() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &limits("users.alice = { requests_per_minute = 5 }"),
    );
    five_a_minute_hold(&mock, &[&tap], "alice");
    // Others are not limited (no default), and their answers carry no rate-limit headers.
    let r = calls_in_turn(&[tap.addr], "bob", 8);
    assert!(r.iter().all(|r| r.status == 200));
    assert!(r[0].header("x-ratelimit-limit-requests").is_none());
    assert!(
        tap.metric("tokentap_rate_limited_total{user=\"alice\",limit=\"requests_per_minute\"}")
            >= 7.0
    );
    // The admin page shows the limits a user is held to.
    let u = request(tap.admin, "GET", "/admin/api/users/alice", &[], b"").json();
    assert_eq!(u["limits"][0]["subject"], "user:alice");
    assert_eq!(u["limits"][0]["requests_per_minute"], 5);
    let b = request(tap.admin, "GET", "/admin/api/users/bob", &[], b"").json();
    assert_eq!(b["limits"], serde_json::json!([]));
}

#[test]
fn a_tokens_per_minute_limit_holds_under_64_concurrent_calls() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &limits("default = { tokens_per_minute = 400 }"),
    );
    tokens_a_minute_hold_under_64_calls(&mock, &[&tap], "tess", 400);
}

#[test]
fn a_concurrent_calls_limit_holds_with_streams_and_frees_when_they_end() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &limits(
            "teams.lab = { concurrent = 2 }\n[budgets.teams.lab]\nmembers = [\"sam\", \"sue\"]",
        ),
    );
    let addr = tap.addr;
    let stream = |user: &'static str| {
        std::thread::spawn(move || {
            post_chat(
                addr,
                &[("x-mock-chunks", "60"), ("x-mock-delay-ms", "50")],
                &chat_body(CAP_MODEL, user, true, ""),
            )
        })
    };
    let (a, b) = (stream("sam"), stream("sue"));
    // Both streams in flight (the admin page's live view lists them).
    wait_live(&tap, "both streams in flight", |c| c.len() == 2);
    let third = calls_in_turn(&[tap.addr], "sam", 1).remove(0);
    assert_eq!(third.status, 429);
    let e = third.json();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("team \"lab\""),
        "{e}"
    );
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("concurrent"));
    assert_eq!(a.join().unwrap().status, 200);
    assert_eq!(b.join().unwrap().status, 200);
    // The streams' ends free their slots just after their answers (when they are recorded).
    let start = Instant::now();
    while calls_in_turn(&[tap.addr], "sue", 1)[0].status != 200 {
        assert!(
            start.elapsed() < PATIENCE,
            "the streams' ends never freed the limit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn limits_change_by_hot_reload_without_dropping_a_call() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &limits("default = { requests_per_minute = 2 }"),
    );
    assert!(calls_in_turn(&[tap.addr], "rae", 2)
        .iter()
        .all(|r| r.status == 200));
    assert_eq!(calls_in_turn(&[tap.addr], "rae", 1)[0].status, 429);
    // A stream runs across the reload.
    let addr = tap.addr;
    let stream = std::thread::spawn(move || {
        post_chat(
            addr,
            &[("x-mock-chunks", "40"), ("x-mock-delay-ms", "50")],
            &chat_body(CAP_MODEL, "other", true, ""),
        )
    });
    let old = tap.config_hash();
    tap.write_config(
        &tap.text
            .replace("requests_per_minute = 2", "requests_per_minute = 10"),
    );
    tap.wait_config_change(&old);
    let r = calls_in_turn(&[tap.addr], "rae", 1).remove(0);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("10"));
    let s = stream.join().unwrap();
    assert_eq!(s.status, 200);
    assert!(s.complete);
}

#[test]
fn a_virtual_keys_limit_holds_whoever_the_body_names() {
    let mock = Mock::start();
    let tap = TapBuilder::new(&mock.url())
        .extra(&format!(
            "{}\n[auth]\nmode = \"virtual_keys\"\nuser_mismatch = \"overwrite\"\n",
            limits("")
        ))
        .start();
    let (key, id) = issue_key(&tap, "kim");
    let old = tap.config_hash();
    let text = std::fs::read_to_string(&tap.config).unwrap().replace(
        "[budgets.limits]\n",
        &format!("[budgets.limits]\nkeys.{id} = {{ requests_per_minute = 1 }}\n"),
    );
    tap.write_config(&text);
    tap.wait_config_change(&old);
    let auth = format!("Bearer {key}");
    let body = chat_body(CAP_MODEL, "someone-else", false, "");
    let first = post_chat(tap.addr, &[("authorization", &auth)], &body);
    let second = post_chat(tap.addr, &[("authorization", &auth)], &body);
    assert_eq!((first.status, second.status), (200, 429));
    assert!(second.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("API key"));
}
