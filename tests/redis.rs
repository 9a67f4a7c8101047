//! The Redis ledger against a real `redis-server` (Debian package), started here on a free
//! loopback port: caps shared by two tokentap processes, and Redis going away.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MODEL: &str = "anthropic/claude-opus-4.6";
const PROMPT_TOKENS: u64 = 14;
const IN: u64 = 5_000_000;
const OUT: u64 = 25_000_000;

struct Redis {
    proc: Option<Proc>,
    port: u16,
}

impl Redis {
    fn start_on(port: u16) -> Proc {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is missing: scripts/test.sh installs it (Debian package redis-server)");
        let proc = Proc { child };
        let start = Instant::now();
        loop {
            if let Ok(mut s) = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))) {
                let _ = s.write_all(b"PING\r\n");
                let mut buf = [0u8; 16];
                if s.read(&mut buf)
                    .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
                {
                    return proc;
                }
            }
            assert!(start.elapsed() < PATIENCE, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start() -> Redis {
        let port = free_port();
        Redis {
            proc: Some(Self::start_on(port)),
            port,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

fn config(redis: &Redis, on_error: &str, caps: &str) -> String {
    format!(
        "{TEST_PRICING}\n[budgets.ledger]\nbackend = \"redis\"\nredis_url = \"{}\"\non_error = \"{on_error}\"\n{caps}",
        redis.url()
    )
}

#[test]
fn two_replicas_sharing_redis_hold_the_cap_together() {
    let mock = Mock::start();
    let redis = Redis::start();
    let (cap, caps) = cap_of_ten();
    // A generous Redis timeout: a loaded CI machine must not turn this test's calls into
    // fail_closed 503s.
    let caps = format!("redis_timeout_ms = 5000\n{caps}");
    let a = Tap::start(&mock.url(), &config(&redis, "fail_closed", &caps));
    let b = Tap::start(&mock.url(), &config(&redis, "fail_closed", &caps));
    // Together, not each: a cap of ten calls lets two replicas through at most ten calls'
    // worth (each reservation holds the worst case), not twenty.
    caps_hold_under_64_concurrent_calls(&mock, &[&a, &b], "greedy", cap);
}

/// Waits until `user`'s spend is `want` with nothing reserved.
fn wait_spent(tap: &Tap, user: &str, want: u64) {
    let start = Instant::now();
    loop {
        let got = tap.window_spend(user);
        if got == (want, 0) {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{user}: spent and reserved {got:?}, want ({want}, 0)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn redis_paused_follows_on_error_charges_fail_open_calls_and_enforcement_resumes() {
    let mock = Mock::start();
    let redis = Redis::start();
    let real = PROMPT_TOKENS * IN + 5 * OUT;
    let caps = format!(
        "[budgets.default]\ndaily = {{ usd = 100 }}\n[budgets.users.tiny]\ndaily = {{ usd = \"{}\" }}\n",
        usd(2 * real)
    );
    let open = Tap::start(&mock.url(), &config(&redis, "fail_open", &caps));
    let closed = Tap::start(&mock.url(), &config(&redis, "fail_closed", &caps));
    let call = |tap: &Tap, user: &str| {
        let body = chat_body(MODEL, user, false, r#","max_tokens":5"#);
        post_chat(tap.addr, &[], &body)
    };
    assert_eq!(call(&open, "u").status, 200);
    assert_eq!(call(&closed, "u").status, 200);
    assert_eq!(call(&open, "tiny").status, 200);
    wait_spent(&closed, "u", 2 * real);

    // Redis stops answering (paused, not replaced: what it holds must survive).
    let pid = redis.proc.as_ref().unwrap().pid();
    redis.proc.as_ref().unwrap().signal("STOP");
    let _cont = Cont(pid);
    for _ in 0..3 {
        assert_eq!(call(&open, "u").status, 200, "fail_open lets calls through");
    }
    // Through fail_open, tiny could pass its cap; what it costs is charged all the same.
    assert_eq!(call(&open, "tiny").status, 200);
    assert_eq!(call(&open, "tiny").status, 200);
    let r = call(&closed, "u");
    assert_eq!(r.status, 503, "fail_closed refuses");
    assert_eq!(r.json()["error"]["code"], "budget_store_unavailable");
    for tap in [&open, &closed] {
        assert!(tap.metric("tokentap_ledger_errors_total") >= 1.0);
    }
    assert_eq!(open.metric("tokentap_budget_fail_open_total"), 5.0);
    assert_eq!(closed.metric("tokentap_budget_fail_open_total"), 0.0);

    // Back: both replicas use it again by themselves; the calls let through meanwhile are
    // charged (to the pico-dollar, once each) and what Redis held before is still there.
    redis.proc.as_ref().unwrap().signal("CONT");
    wait_spent(&closed, "u", 5 * real);
    wait_spent(&open, "tiny", 3 * real);
    assert_eq!(mock.received(), 8);
    // tiny is over its cap now: refused on both replicas.
    for tap in [&open, &closed] {
        let r = call(tap, "tiny");
        assert_eq!(
            r.status, 429,
            "the cap was not enforced after Redis came back"
        );
        assert!(r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("resets at"));
    }
    assert_eq!(call(&closed, "u").status, 200);
    wait_spent(&open, "u", 6 * real);
}

/// Resumes a stopped process when dropped (a failing test must not leave Redis stopped).
struct Cont(u32);

impl Drop for Cont {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

#[test]
fn a_replica_killed_mid_call_releases_its_reservation_when_the_lease_ends() {
    let mock = Mock::start();
    let redis = Redis::start();
    let worst = PROMPT_TOKENS * IN + 20 * OUT;
    // Room for one call's worst case, not two; the lease of a reservation lasts 3 s (by
    // Redis' clock, in whole seconds: at least 2 s).
    let caps = format!(
        "reservation_ttl_s = 3\nredis_timeout_ms = 5000\n[budgets.users.solo]\ndaily = {{ usd = \"{}\" }}\n",
        usd(worst + worst / 2)
    );
    let mut a = TapBuilder::new(&mock.url())
        .extra(&config(&redis, "fail_closed", &caps))
        .read_timeout_ms(600_000)
        .start();
    let b = Tap::start(&mock.url(), &config(&redis, "fail_closed", &caps));
    let body = chat_body(MODEL, "solo", false, r#","max_tokens":20"#);
    let slow = {
        let (addr, body) = (a.addr, body.clone());
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(PATIENCE)).unwrap();
            send_chat(&mut s, &[("x-mock-delay-ms", "600000")], &body);
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
        })
    };
    let start = Instant::now();
    while mock.received() < 1 {
        assert!(
            start.elapsed() < PATIENCE,
            "the slow call never reached the upstream"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The slow call holds the cap: b refuses, the call in flight named as the reason.
    let r = post_chat(b.addr, &[], &body);
    assert_eq!(r.status, 429);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("in flight"), "{msg}");
    // While a lives, it renews the lease: past the lease's length, the call still holds.
    std::thread::sleep(Duration::from_secs(4));
    let r = post_chat(b.addr, &[], &body);
    assert_eq!(r.status, 429, "a live call's lease was renewed");
    // a dies without settling: its lease ends and the next reserve releases it.
    a.proc.signal("KILL");
    let _ = a.proc.child.wait();
    slow.join().unwrap();
    let start = Instant::now();
    loop {
        let r = post_chat(b.addr, &[], &body);
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 429);
        assert!(
            start.elapsed() < PATIENCE,
            "the dead replica's reservation was never released"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The call b let through is charged; the dead one never settled (nothing to charge).
    wait_spent(&b, "solo", PROMPT_TOKENS * IN + 5 * OUT);
}

#[test]
fn settles_release_token_reservations_even_at_zero_cost() {
    // Nothing is priced: every worst case is 0 USD, and each settle must still release the
    // tokens it reserved (a negated zero once made the settle script fail, so reservations
    // piled up until the cap was reached by calls long finished).
    let mock = Mock::start();
    let redis = Redis::start();
    let cfg = format!(
        "[budgets.ledger]\nbackend = \"redis\"\nredis_url = \"{}\"\n[budgets.users.t]\ntotal = {{ tokens = 1000 }}\n",
        redis.url()
    );
    let tap = Tap::start(&mock.url(), &cfg);
    // Worst case 14 + 20 tokens, really 14 + 5: forty calls fit only if reservations go.
    for i in 0..40 {
        let body = chat_body(MODEL, "t", false, r#","max_tokens":20"#);
        let r = post_chat(tap.addr, &[], &body);
        assert_eq!(
            r.status, 200,
            "call {i} refused: reservations are not released"
        );
        // Let the settle (its own task) land before the next reservation.
        let start = Instant::now();
        while tap.records().len() < i + 1 {
            assert!(start.elapsed() < PATIENCE);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert_eq!(tap.metric("tokentap_ledger_errors_total"), 0.0);
    let start = Instant::now();
    loop {
        let v = request(tap.admin, "GET", "/admin/budgets/users/t", &[], b"").json();
        let w = &v["windows"][0];
        if w["spent_tokens"] == 40 * (PROMPT_TOKENS + 5) {
            assert_eq!(pico_of_usd(&w["reserved_usd"]), 0);
            break;
        }
        assert!(start.elapsed() < PATIENCE, "spend never settled: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 27: a capped user mixing chat, Responses and Messages calls at once holds the cap on
/// the Redis ledger too.
#[test]
fn a_capped_user_mixing_dialects_at_once_stays_within_the_cap_on_the_redis_ledger() {
    use common::dialects::*;
    let mock = Mock::start();
    let redis = Redis::start();
    let cap = 10_000_000_000u64; // $0.01
    let tap = Tap::start(
        &mock.url(),
        &format!(
            "{DIALECT_PRICING}\n[budgets.ledger]\nbackend = \"redis\"\nredis_url = \"{}\"\nredis_timeout_ms = 5000\n\
             [budgets.users.capped]\ntotal = {{ usd = \"{}\" }}\n",
            redis.url(),
            usd(cap)
        ),
    );
    mixed_dialects_hold_the_cap(&tap, &mock, cap);
}

/// Issue 22: Redis is not needed to start. With it absent, replicas listen and serve per
/// `on_error` (fail_open: through, fail_closed: 503 and /readyz unready), report it, and use
/// Redis by themselves once it appears; the fail_open spend made meanwhile reaches Redis
/// exactly once, from both replicas.
#[test]
fn replicas_start_without_redis_serve_per_policy_and_charge_once_when_it_appears() {
    let mock = Mock::start();
    let port = free_port();
    let absent = Redis { proc: None, port };
    let real = PROMPT_TOKENS * IN + 5 * OUT;
    let caps = "[budgets.users.early]\ndaily = { usd = 100 }\n";
    let a = Tap::start(&mock.url(), &config(&absent, "fail_open", caps));
    let b = Tap::start(&mock.url(), &config(&absent, "fail_open", caps));
    let closed = Tap::start(&mock.url(), &config(&absent, "fail_closed", caps));
    let call = |tap: &Tap| {
        let body = chat_body(MODEL, "early", false, r#","max_tokens":5"#);
        post_chat(tap.addr, &[], &body)
    };
    for tap in [&a, &b] {
        for _ in 0..3 {
            assert_eq!(call(tap).status, 200, "fail_open serves without Redis");
        }
        assert_eq!(tap.metric("tokentap_ledger_store_up"), 0.0);
        let ready = request(tap.admin, "GET", "/readyz", &[], b"");
        assert_eq!(ready.status, 200);
        assert!(String::from_utf8_lossy(&ready.body).contains("degraded"));
    }
    let r = call(&closed);
    assert_eq!(r.status, 503, "fail_closed refuses without Redis");
    assert_eq!(r.json()["error"]["code"], "budget_store_unavailable");
    assert_eq!(
        request(closed.admin, "GET", "/readyz", &[], b"").status,
        503
    );
    assert_eq!(
        mock.received(),
        6,
        "the refused call never reached the upstream"
    );

    // Redis appears: every replica connects by itself.
    let redis = Redis {
        proc: Some(Redis::start_on(port)),
        port,
    };
    let start = Instant::now();
    while request(closed.admin, "GET", "/readyz", &[], b"").status != 200 {
        assert!(
            start.elapsed() < PATIENCE,
            "tokentap never connected to Redis"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(call(&closed).status, 200);
    // Six calls let through while it was absent, and one since: each charged once.
    wait_spent(&closed, "early", 7 * real);
    for tap in [&a, &b, &closed] {
        assert_eq!(tap.metric("tokentap_ledger_store_up"), 1.0);
    }
    assert_eq!(mock.received(), 7);
    drop(redis);
}

/// Issue 22: Redis that loses its data (`FLUSHALL` here; a restart without persistence or a
/// failover to an empty replica alike) is noticed by every replica, counted and logged, and
/// the loss is exactly the documented one: the spend settled before it.
#[test]
fn a_flushed_redis_is_noticed_by_every_replica_and_the_loss_is_the_documented_one() {
    let mock = Mock::start();
    let redis = Redis::start();
    let real = PROMPT_TOKENS * IN + 5 * OUT;
    let caps = "[budgets.users.f]\ndaily = { usd = 100 }\n";
    let a = Tap::start(&mock.url(), &config(&redis, "fail_closed", caps));
    let b = Tap::start(&mock.url(), &config(&redis, "fail_closed", caps));
    let call = |tap: &Tap| {
        let body = chat_body(MODEL, "f", false, r#","max_tokens":5"#);
        assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
    };
    call(&a);
    call(&b);
    wait_spent(&a, "f", 2 * real);
    for tap in [&a, &b] {
        assert_eq!(tap.metric("tokentap_ledger_store_resets_total"), 0.0);
    }
    // (Each replica learned the epoch when it connected, before it served.)
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], redis.port))).unwrap();
    s.write_all(b"FLUSHALL\r\n").unwrap();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"+OK"));
    for tap in [&a, &b] {
        let start = Instant::now();
        while tap.metric("tokentap_ledger_store_resets_total") != 1.0 {
            assert!(start.elapsed() < PATIENCE, "the reset went unnoticed");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // What was settled before is gone (the documented loss); what is settled after counts.
    wait_spent(&a, "f", 0);
    call(&b);
    wait_spent(&a, "f", real);
    for tap in [&a, &b] {
        assert_eq!(tap.metric("tokentap_ledger_store_resets_total"), 1.0);
    }
}

/// Issue 22: Redis killed and started again empty under two fail_open replicas: calls go on
/// meanwhile, both replicas reconnect by themselves and notice the lost data, and what they
/// let through is charged once each.
#[test]
fn redis_killed_and_restarted_empty_is_lived_through_and_outage_spend_is_charged_once() {
    let mock = Mock::start();
    let port = free_port();
    let mut redis = Redis {
        proc: Some(Redis::start_on(port)),
        port,
    };
    let real = PROMPT_TOKENS * IN + 5 * OUT;
    let caps = "[budgets.users.k]\ndaily = { usd = 100 }\n";
    let a = Tap::start(&mock.url(), &config(&redis, "fail_open", caps));
    let b = Tap::start(&mock.url(), &config(&redis, "fail_open", caps));
    let call = |tap: &Tap| {
        let body = chat_body(MODEL, "k", false, r#","max_tokens":5"#);
        assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
    };
    call(&a);
    call(&b);
    wait_spent(&a, "k", 2 * real);
    // Killed (no persistence: what it held is gone).
    redis.proc.take().unwrap().signal("KILL");
    for tap in [&a, &b] {
        for _ in 0..2 {
            call(tap);
        }
        let start = Instant::now();
        while tap.metric("tokentap_ledger_store_up") != 0.0 {
            assert!(start.elapsed() < PATIENCE, "the outage went unnoticed");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    redis.proc = Some(Redis::start_on(port));
    for tap in [&a, &b] {
        let start = Instant::now();
        while tap.metric("tokentap_ledger_store_resets_total") != 1.0
            || tap.metric("tokentap_ledger_store_up") != 1.0
        {
            assert!(
                start.elapsed() < PATIENCE,
                "no reconnect, or the loss unnoticed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The four calls of the outage, once each; the two before it went with Redis' data.
    wait_spent(&a, "k", 4 * real);
    call(&b);
    wait_spent(&a, "k", 5 * real);
    assert_eq!(mock.received(), 7);
}

/// `tokentap spend --format json` as a map user -> (calls, pico), from `config`'s view.
fn report(config: &std::path::Path, local: bool) -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut args = vec!["spend", "--format", "json"];
    if local {
        args.push("--local");
    }
    let out = tokentap_cli(&args, config);
    let rows: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["user"].as_str().unwrap().to_string(),
                (r["calls"].as_u64().unwrap(), pico_of_usd(&r["cost_usd"])),
            )
        })
        .collect()
}

/// What the records of `taps` add up to, per user.
fn recorded(taps: &[&Tap]) -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut m = std::collections::BTreeMap::new();
    for t in taps {
        for r in t.records() {
            let e = m
                .entry(r["user"].as_str().unwrap().to_string())
                .or_insert((0, 0));
            e.0 += 1;
            e.1 += pico_of(&r);
        }
    }
    m
}

/// Waits until the shared report read through `config` is `want`.
fn wait_report(config: &std::path::Path, want: &std::collections::BTreeMap<String, (u64, u64)>) {
    let start = Instant::now();
    loop {
        let got = report(config, false);
        if &got == want {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the shared report is {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 22: with the Redis ledger, `tokentap spend` answers for every replica: each ships
/// the rows of its own file to Redis exactly once. After Redis lost its data the totals are
/// rebuilt from what each replica recorded, each adding only its own calls (never twice), and
/// a replica stopping ships its last calls on the way out.
#[test]
fn spend_answers_for_every_replica_once_also_after_redis_lost_its_data() {
    let mock = Mock::start();
    let redis = Redis::start();
    let caps = "[budgets.users.capped]\ndaily = { usd = 100 }\n";
    let a = Tap::start(&mock.url(), &config(&redis, "fail_closed", caps));
    let mut b = Tap::start(&mock.url(), &config(&redis, "fail_closed", caps));
    let call = |tap: &Tap, user: &str, out: u32| {
        let body = chat_body(MODEL, user, false, &format!(r#","max_tokens":{out}"#));
        assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
    };
    // Uncapped users too: the report is of every call, not only of reserved ones.
    for (tap, user, out) in [
        (&a, "capped", 5),
        (&a, "free", 7),
        (&a, "capped", 3),
        (&b, "capped", 9),
        (&b, "free", 2),
    ] {
        call(tap, user, out);
    }
    a.wait_records(3);
    b.wait_records(2);
    let both = recorded(&[&a, &b]);
    assert_eq!(both["capped"].0, 3);
    wait_report(&a.config, &both);
    // Either replica's view is the same; --local is one replica's own file.
    assert_eq!(report(&b.config, false), both);
    assert_eq!(report(&a.config, true), recorded(&[&a]));
    assert_eq!(report(&b.config, true), recorded(&[&b]));

    // Redis loses its data: the totals come back, rebuilt from both replicas' rows.
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], redis.port))).unwrap();
    s.write_all(b"FLUSHALL\r\n").unwrap();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"+OK"));
    wait_report(&a.config, &both);
    // A call after the rebuild is added once, and nothing else arrives before it: each
    // replica ships in order, so a late second copy of the rebuild would show here.
    call(&a, "free", 4);
    a.wait_records(4);
    let after = recorded(&[&a, &b]);
    wait_report(&b.config, &after);

    // b stops: its last call is in the shared report when it has exited, without a wait.
    call(&b, "late", 6);
    b.wait_records(3);
    let last = recorded(&[&a, &b]);
    assert!(b.proc.terminate().success());
    assert_eq!(report(&a.config, false), last);
    assert_eq!(mock.received(), 7);
}

/// The ship script's contract (`src/budget/redis/ship.lua`), against a real Redis: a batch
/// applies only on top of exactly the rows Redis has, so a batch sent again (its first reply
/// lost) adds nothing and is answered with the row to go on from.
#[test]
fn a_batch_of_rows_shipped_twice_is_added_once() {
    let redis = Redis::start();
    let script = redis::Script::new(include_str!("../src/budget/redis/ship.lua"));
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let ship = |con: &mut redis::Connection, after: i64, last: i64, add: i64| -> i64 {
        script
            .key("m")
            .key("day")
            .arg(after)
            .arg(last)
            .arg(60)
            .arg(0)
            .arg(1)
            .arg("$x")
            .arg(add)
            .invoke(con)
            .unwrap()
    };
    let total = |con: &mut redis::Connection| -> i64 {
        redis::cmd("HGET").arg("day").arg("$x").query(con).unwrap()
    };
    assert_eq!(ship(&mut con, 0, 5, 10), -1);
    assert_eq!(ship(&mut con, 0, 5, 10), 5, "the same batch again");
    assert_eq!(total(&mut con), 10);
    assert_eq!(ship(&mut con, 3, 7, 4), 5, "a batch not on top of row 5");
    assert_eq!(ship(&mut con, 5, 7, 4), -1);
    assert_eq!(total(&mut con), 14);
    let ttl: i64 = redis::cmd("TTL").arg("m").query(&mut con).unwrap();
    assert!((1..=60).contains(&ttl), "{ttl}");
}

/// Issue 23: with the Redis ledger, the admin page's spend is what every replica shipped to
/// Redis (either replica shows the same overview, top lists and budgets), and its call list
/// is the replica's own, which it says.
#[test]
fn the_admin_page_shows_every_replicas_spend_and_its_own_calls() {
    let mock = Mock::start();
    let redis = Redis::start();
    let caps = "[budgets.default]\ndaily = { usd = 100 }\n";
    let a = Tap::start(&mock.url(), &config(&redis, "fail_closed", caps));
    let b = Tap::start(&mock.url(), &config(&redis, "fail_closed", caps));
    for (tap, user) in [(&a, "ann"), (&a, "ann"), (&b, "ann"), (&b, "ben")] {
        let body = chat_body(MODEL, user, false, "");
        assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
    }
    a.wait_records(2);
    b.wait_records(2);
    let both = recorded(&[&a, &b]);
    let total: u64 = both.values().map(|(_, c)| c).sum();
    let overview = |tap: &Tap| request(tap.admin, "GET", "/admin/api/overview", &[], b"").json();
    let start = Instant::now();
    for tap in [&a, &b] {
        loop {
            let v = overview(tap);
            if v["periods"][0]["calls"] == 4 {
                assert_eq!(v["backend"], "redis");
                assert_eq!(v["scope"]["totals"], "shared");
                assert_eq!(pico_of_usd(&v["periods"][0]["cost_usd"]), total);
                assert_eq!(pico_of_usd(&v["daily"][89]["cost_usd"]), total);
                let top: std::collections::BTreeMap<String, (u64, u64)> = v["top"]["users"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|u| {
                        let name = u["name"].as_str().unwrap().to_string();
                        (
                            name,
                            (u["calls"].as_u64().unwrap(), pico_of_usd(&u["cost_usd"])),
                        )
                    })
                    .collect();
                assert_eq!(top, both);
                break;
            }
            assert!(start.elapsed() < PATIENCE, "never shared: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Budgets come from Redis: ann's spend through both replicas, on either.
    for tap in [&a, &b] {
        let rows = request(tap.admin, "GET", "/admin/api/budgets?q=ann", &[], b"").json();
        assert_eq!(pico_of_usd(&rows["rows"][0]["spent_usd"]), both["ann"].1);
        let u = request(tap.admin, "GET", "/admin/api/users/ann", &[], b"").json();
        assert_eq!(u["totals"]["calls"], 3);
    }
    // The call list is the replica's: a has two of ann's three calls.
    let calls = request(a.admin, "GET", "/admin/api/users/ann/calls", &[], b"").json();
    assert_eq!(calls["calls"].as_array().unwrap().len(), 2);
    assert_eq!(
        (calls["scope"].as_str(), calls["backend"].as_str()),
        (Some("replica"), Some("redis"))
    );
    // Redis gone: the page shows this replica's own figures and says why.
    let mut redis = redis;
    drop(redis.proc.take());
    let v = overview(&a);
    assert_eq!(v["scope"]["totals"], "replica");
    assert!(
        v["scope"]["note"]
            .as_str()
            .unwrap()
            .contains("Redis could not be read"),
        "{v}"
    );
    assert_eq!(v["periods"][0]["calls"], 2, "a's own calls");
    let u = request(a.admin, "GET", "/admin/api/users/ann", &[], b"").json();
    assert_eq!(u["totals"]["calls"], 2);
    assert!(u["note"]
        .as_str()
        .unwrap()
        .contains("Redis could not be read"));
}

/// Issue 24: rate limits are exact across replicas sharing Redis: 5 a minute through two
/// replicas is 5, and a tokens-per-minute limit holds under 64 calls at once on both.
#[test]
fn rate_limits_hold_across_two_replicas_sharing_redis() {
    let mock = Mock::start();
    let redis = Redis::start();
    let limits = "[budgets.limits]\nusers.alice = { requests_per_minute = 5 }\n\
                  users.tess = { tokens_per_minute = 400 }\nusers.cory = { concurrent = 1 }\n";
    let a = Tap::start(&mock.url(), &config(&redis, "fail_closed", limits));
    let b = Tap::start(&mock.url(), &config(&redis, "fail_closed", limits));
    five_a_minute_hold(&mock, &[&a, &b], "alice");
    tokens_a_minute_hold_under_64_calls(&mock, &[&a, &b], "tess", 400);
    // One call in flight at a time, whichever replica: a stream on a holds b's call off.
    let addr = a.addr;
    let stream = std::thread::spawn(move || {
        post_chat(
            addr,
            &[("x-mock-chunks", "60"), ("x-mock-delay-ms", "50")],
            &chat_body(MODEL, "cory", true, ""),
        )
    });
    wait_live(&a, "the stream in flight", |c| !c.is_empty());
    assert_eq!(calls_in_turn(&[b.addr], "cory", 1)[0].status, 429);
    assert_eq!(stream.join().unwrap().status, 200);
    // Its end reaches Redis off the call's path: b lets the next one through soon after.
    let start = Instant::now();
    while calls_in_turn(&[b.addr], "cory", 1)[0].status != 200 {
        assert!(
            start.elapsed() < PATIENCE,
            "the stream's end never freed the limit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 24: rate limits follow the Redis backend's fault rules: with Redis gone, a limited
/// caller is refused (fail_closed, 503) or let through unlimited (fail_open).
#[test]
fn rate_limits_follow_on_error_when_redis_is_gone() {
    let mock = Mock::start();
    let mut redis = Redis::start();
    let limits = "[budgets.limits]\ndefault = { requests_per_minute = 100 }\n";
    let closed = Tap::start(&mock.url(), &config(&redis, "fail_closed", limits));
    let open = Tap::start(&mock.url(), &config(&redis, "fail_open", limits));
    assert_eq!(calls_in_turn(&[closed.addr], "u", 1)[0].status, 200);
    drop(redis.proc.take());
    let r = calls_in_turn(&[closed.addr], "u", 1).remove(0);
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "budget_store_unavailable");
    assert_eq!(calls_in_turn(&[open.addr], "u", 1)[0].status, 200);
}

/// Issue 24: with two replicas sharing Redis, each threshold crossed is POSTed once: the
/// settle that crosses it runs once, on one replica, and a marker in Redis keeps the 100 %
/// of a refusal (which either replica may find) to one.
#[test]
fn budget_alerts_are_posted_once_by_two_replicas() {
    let mock = Mock::start();
    let redis = Redis::start();
    let hooks = Hooks::start(1);
    let extra = format!(
        "[budgets.users.al]\ndaily = {{ tokens = 200 }}\n{}",
        alerts_config(&hooks, "[0.5, 0.8, 1.0]")
    );
    let a = Tap::start(&mock.url(), &config(&redis, "fail_closed", &extra));
    let b = Tap::start(&mock.url(), &config(&redis, "fail_closed", &extra));
    calls_until_refused(&[a.addr, b.addr], "al");
    // Refused on both replicas too: the 100 % is still raised once.
    calls_until_refused(&[b.addr, a.addr], "al");
    assert_eq!(thresholds_of(&hooks.wait("/hook", 3)), ["0.5", "0.8", "1"]);
    hooks.wait("/slack", 3);
    let delivered = |t: &Tap, th: &str| {
        t.metric(&format!(
            "tokentap_budget_alerts_total{{outcome=\"delivered\",threshold=\"{th}\"}}"
        ))
    };
    for th in ["0.5", "0.8", "1"] {
        let start = Instant::now();
        while delivered(&a, th) + delivered(&b, th) != 1.0 {
            assert!(start.elapsed() < PATIENCE, "{th}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert_eq!(hooks.taken("/hook").len(), 3);
}

/// Issue 24: a call in flight longer than the lease still counts against a calls-in-flight
/// limit: its lease is renewed while it runs, as reservations' are.
#[test]
fn a_stream_longer_than_the_lease_keeps_its_concurrent_slot() {
    let mock = Mock::start();
    let redis = Redis::start();
    let extra = "reservation_ttl_s = 2\n[budgets.limits]\nusers.cory = { concurrent = 1 }\n";
    let a = Tap::start(&mock.url(), &config(&redis, "fail_closed", extra));
    let addr = a.addr;
    let stream = std::thread::spawn(move || {
        post_chat(
            addr,
            &[("x-mock-chunks", "60"), ("x-mock-delay-ms", "100")],
            &chat_body(MODEL, "cory", true, ""),
        )
    });
    // Past three leases of its own.
    wait_live(&a, "the stream past three leases", |c| {
        c.first()
            .is_some_and(|c| c["elapsed_ms"].as_u64().unwrap_or(0) > 4_500)
    });
    let r = calls_in_turn(&[a.addr], "cory", 1).remove(0);
    assert_eq!(r.status, 429, "the stream's slot was lost with its lease");
    assert_eq!(stream.join().unwrap().status, 200);
}
