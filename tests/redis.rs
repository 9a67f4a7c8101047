//! The Redis ledger against a real `redis-server` (Debian package), started here on a free
//! loopback port: caps shared by two tokentap processes, and Redis going away.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
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

    fn stop(&mut self) {
        drop(self.proc.take());
    }

    fn restart(&mut self) {
        self.proc = Some(Self::start_on(self.port));
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
    let worst = PROMPT_TOKENS * IN + 20 * OUT;
    let real = PROMPT_TOKENS * IN + 5 * OUT;
    let cap = 10 * real;
    let caps = format!(
        "[budgets.users.greedy]\ndaily = {{ usd = \"{}\" }}\n",
        usd(cap)
    );
    let a = Tap::start(&mock.url(), &config(&redis, "fail_closed", &caps));
    let b = Tap::start(&mock.url(), &config(&redis, "fail_closed", &caps));
    let barrier = Arc::new(Barrier::new(64));
    let threads: Vec<_> = (0..64)
        .map(|i| {
            let addr = if i % 2 == 0 { a.addr } else { b.addr };
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let body = chat_body(MODEL, "greedy", false, r#","max_tokens":20"#);
                barrier.wait();
                request(
                    addr,
                    "POST",
                    "/v1/chat/completions",
                    &[("x-mock-delay-ms", "100")],
                    &body,
                )
                .status
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        64 - ok,
        "{statuses:?}"
    );
    assert!((1..64).contains(&ok), "ok {ok}");
    assert_eq!(
        mock.received(),
        ok as u64,
        "a refused call reached the upstream"
    );
    let ra = a.wait_records(32);
    let rb = b.wait_records(32);
    let spent: u64 = ra
        .iter()
        .chain(rb.iter())
        .filter(|r| r["status"] == 200)
        .map(pico_of)
        .sum();
    assert!(
        spent <= cap + worst,
        "spent {spent} > cap {cap} + worst {worst}"
    );
    // Together, not each: a cap of ten calls lets two replicas through at most ten calls'
    // worth (each reservation holds the worst case), not twenty.
    assert!(ok <= 10, "{ok} calls went through a cap of about 10");
}

#[test]
fn redis_going_away_follows_on_error_and_enforcement_resumes_when_it_is_back() {
    let mock = Mock::start();
    let mut redis = Redis::start();
    let real = PROMPT_TOKENS * IN + 5 * OUT;
    let caps = format!(
        "[budgets.default]\ndaily = {{ usd = 100 }}\n[budgets.users.tiny]\ndaily = {{ usd = \"{}\" }}\n",
        usd(real)
    );
    let open = Tap::start(&mock.url(), &config(&redis, "fail_open", &caps));
    let closed = Tap::start(&mock.url(), &config(&redis, "fail_closed", &caps));
    let call = |tap: &Tap, user: &str| {
        let body = chat_body(MODEL, user, false, r#","max_tokens":5"#);
        request(tap.addr, "POST", "/v1/chat/completions", &[], &body)
    };
    assert_eq!(call(&open, "u").status, 200);
    assert_eq!(call(&closed, "u").status, 200);

    redis.stop();
    assert_eq!(call(&open, "u").status, 200, "fail_open lets calls through");
    let r = call(&closed, "u");
    assert_eq!(r.status, 503, "fail_closed refuses");
    assert_eq!(r.json()["error"]["code"], "budget_store_unavailable");
    for tap in [&open, &closed] {
        assert!(tap.metric("tokentap_ledger_errors_total") >= 1.0);
    }
    assert_eq!(open.metric("tokentap_budget_fail_open_total"), 1.0);
    assert_eq!(closed.metric("tokentap_budget_fail_open_total"), 0.0);

    // Back, on the same address: both replicas reconnect by themselves and enforce again.
    redis.restart();
    let start = Instant::now();
    while call(&closed, "u").status != 200 {
        assert!(
            start.elapsed() < PATIENCE,
            "tokentap did not reconnect to Redis"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(call(&open, "tiny").status, 200);
    // The settle of tiny's call reaches Redis on its own task: wait for the refusal.
    let start = Instant::now();
    loop {
        let s = call(&closed, "tiny").status;
        if s == 429 {
            break;
        }
        assert_eq!(s, 200);
        assert!(
            start.elapsed() < PATIENCE,
            "the cap was not enforced after Redis came back"
        );
    }
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
        let r = request(tap.addr, "POST", "/v1/chat/completions", &[], &body);
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
