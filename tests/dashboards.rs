//! Metrics and dashboards against a real Prometheus (Debian's `prometheus`) scraping a running
//! tokentap while mixed traffic goes through to the mock upstream.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

struct Prometheus {
    _proc: Proc,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Prometheus {
    /// Starts Prometheus scraping `target`'s /metrics every second.
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: tokentap\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "prometheus is missing: scripts/test.sh installs it (Debian package prometheus)",
            );
        let p = Prometheus {
            _proc: Proc { child },
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _dir: dir,
        };
        let start = Instant::now();
        loop {
            if probe(p.addr, "/-/ready").is_some_and(|r| r.status == 200) {
                return p;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "prometheus did not become ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn query(&self, expr: &str) -> Value {
        let r = request(
            self.addr,
            "GET",
            &format!("/api/v1/query?query={}", urlencode(expr)),
            &[],
            b"",
        );
        let v = r.json();
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v["data"]["result"].clone()
    }

    fn scalar(&self, expr: &str) -> f64 {
        let r = self.query(expr);
        r[0]["value"][1]
            .as_str()
            .map_or(f64::NAN, |s| s.parse().unwrap())
    }
}

/// The pricing the shipped config uses, so every model in the traffic is priced.
fn shipped_pricing() -> String {
    format!(
        "[pricing]\nfile = \"{}/config/pricing.toml\"\n",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// The usage object a client received, if any (whole JSON body, or the SSE usage chunk).
fn received_usage(resp: &Resp) -> Option<(u64, u64)> {
    let from = |v: &Value| {
        let u = &v["usage"];
        Some((
            u["prompt_tokens"].as_u64()?,
            u["completion_tokens"].as_u64()?,
        ))
    };
    if resp.header("content-type") == Some("text/event-stream") {
        String::from_utf8_lossy(&resp.body)
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find_map(|v| from(&v))
    } else {
        serde_json::from_slice::<Value>(&resp.body)
            .ok()
            .and_then(|v| from(&v))
    }
}

const MODELS: [&str; 3] = [
    "anthropic/claude-opus-4.6",
    "openai/gpt-5.5",
    "google/gemini-3-flash-preview",
];

/// One wave of mixed traffic; returns the tokens the clients saw in usage objects.
fn traffic(tap: &Tap, wave: usize) -> u64 {
    let mut tokens = 0;
    for i in 0..12 {
        let model = MODELS[i % 3];
        let user = format!("user{}", i % 5);
        let stream = i % 2 == 0;
        let search = if i % 4 == 1 {
            r#","tools":[{"type":"octen_search"}]"#
        } else {
            ""
        };
        let body = chat_body(model, &user, stream, search);
        let cached = (i % 3).to_string();
        let reasoning = (i % 4).to_string();
        let resp = post_chat(
            tap.addr,
            &[("x-mock-cached", &cached), ("x-mock-reasoning", &reasoning)],
            &body,
        );
        assert_eq!(resp.status, 200);
        let (p, c) = received_usage(&resp).expect("usage in a complete answer");
        tokens += p + c;
    }
    // Errors, a reset, a client that hangs up, and a call without a user.
    for status in ["429", "500"] {
        let body = chat_body(MODELS[wave % 3], "user0", false, "");
        post_chat(tap.addr, &[("x-mock-status", status)], &body);
    }
    let body = chat_body(MODELS[1], "user1", true, "");
    let r = post_chat(
        tap.addr,
        &[("x-mock-chunks", "8"), ("x-mock-reset-after", "3")],
        &body,
    );
    assert!(!r.complete);
    let body = chat_body(MODELS[2], "user2", true, "");
    let mut s = connect(tap.addr);
    send_chat(
        &mut s,
        &[("x-mock-chunks", "100"), ("x-mock-delay-ms", "10")],
        &body,
    );
    let _ = read_response(&mut s, 800);
    drop(s);
    // A request no dialect meters (counted apart).
    assert_eq!(request(tap.addr, "GET", "/v1/models", &[], b"").status, 200);
    let anon = br#"{"model":"openai/gpt-5.5","messages":[{"role":"user","content":"hi"}]}"#;
    let resp = post_chat(tap.addr, &[], anon);
    let (p, c) = received_usage(&resp).unwrap();
    let mut tokens = tokens + p + c;
    // A user whose cap covers one call a day: later calls are refused.
    for _ in 0..2 {
        let body = chat_body(MODELS[0], "capped", false, r#","max_tokens":5"#);
        let resp = post_chat(tap.addr, &[], &body);
        match resp.status {
            200 => {
                let (p, c) = received_usage(&resp).unwrap();
                tokens += p + c;
            }
            429 => assert_eq!(resp.json()["error"]["type"], "budget_exceeded"),
            s => panic!("capped user got {s}"),
        }
    }
    // A user limited to one call a minute: the second (and the next wave's) is refused.
    for _ in 0..2 {
        let body = chat_body(MODELS[0], "limited", false, r#","max_tokens":5"#);
        let resp = post_chat(tap.addr, &[], &body);
        match resp.status {
            200 => {
                let (p, c) = received_usage(&resp).unwrap();
                tokens += p + c;
            }
            429 => assert_eq!(resp.json()["error"]["type"], "rate_limit_exceeded"),
            s => panic!("limited user got {s}"),
        }
    }
    tokens
}

/// Budgets for the traffic: one capped user (one call's worth a day, whose soft threshold
/// raises an alert), one limited to a call a minute, everyone else free.
const BUDGETS: &str = "[budgets]\nmissing_user = \"allow\"\n[budgets.users.capped]\ndaily = { usd = \"0.0002\", soft_usd = \"0.0001\" }\n[budgets.limits]\nusers.limited = { requests_per_minute = 1 }\n";

fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__range", "10m")
        .replace("$model", ".*")
        .replace("$user", ".*")
}

#[test]
fn every_dashboard_panel_returns_data_and_counters_match_what_clients_got() {
    let mock = Mock::start();
    let tap = Tap::start(&mock.url(), &format!("{}{BUDGETS}", shipped_pricing()));
    let prom = Prometheus::start(tap.admin);
    // Ready is not scraping: wait for the first scrape, or the first wave goes unseen.
    let start = Instant::now();
    while prom.scalar("up{job=\"tokentap\"}") != 1.0 {
        assert!(
            start.elapsed() < PATIENCE,
            "prometheus never scraped tokentap"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Two waves, so every series has several samples for rate() by the time it is queried.
    let mut seen_tokens = traffic(&tap, 0);
    std::thread::sleep(Duration::from_millis(2500));
    seen_tokens += traffic(&tap, 1);
    let calls = 2 * (12 + 6 + 2 + 2);
    let recs = tap.wait_records(calls);
    assert_eq!(recs.len(), calls);

    // Wait until Prometheus has scraped all of it, and a little more.
    let start = Instant::now();
    while prom.scalar("sum(tokentap_requests_total)") != calls as f64 {
        assert!(start.elapsed() < PATIENCE, "prometheus never saw all calls");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(2500));

    // promtool has nothing to say about the exposition.
    let metrics = request(tap.admin, "GET", "/metrics", &[], b"").body;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    child.stdin.take().unwrap().write_all(&metrics).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );

    // Counters equal what happened: tokens the clients received (plus the estimates of the
    // calls that were cut off before any usage arrived), and the access log's cost.
    let estimated: u64 = recs
        .iter()
        .filter(|r| r["usage_source"] == "estimated")
        .map(|r| r["prompt_tokens"].as_u64().unwrap() + r["completion_tokens"].as_u64().unwrap())
        .sum();
    assert!(estimated > 0);
    assert_eq!(
        prom.scalar("sum(tokentap_tokens_total)"),
        (seen_tokens + estimated) as f64
    );
    let log_cost: f64 = recs.iter().filter_map(|r| r["cost_usd"].as_f64()).sum();
    let prom_cost = prom.scalar("sum(tokentap_cost_usd_total)");
    assert!(log_cost > 0.0);
    assert!(
        (prom_cost - log_cost).abs() < 1e-9,
        "prometheus {prom_cost} vs log {log_cost}"
    );

    // The capped user's one allowed call passed its soft threshold, once.
    assert_eq!(
        prom.scalar("sum(tokentap_budget_soft_threshold_crossed_total{user=\"capped\"})"),
        1.0
    );

    // Every panel of every dashboard: described, with a unit, and each query returns data.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let vars: Vec<&str> = d["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(vars, ["datasource", "model", "user"], "{}", path.display());
        for p in d["panels"].as_array().unwrap() {
            let title = p["title"].as_str().unwrap();
            assert!(
                !p["description"].as_str().unwrap_or("").is_empty(),
                "{title}: no description"
            );
            assert!(
                !p["fieldConfig"]["defaults"]["unit"]
                    .as_str()
                    .unwrap_or("")
                    .is_empty(),
                "{title}: no unit"
            );
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
            for t in p["targets"].as_array().unwrap() {
                let expr = substitute(t["expr"].as_str().unwrap());
                let result = prom.query(&expr);
                assert!(
                    result.as_array().is_some_and(|a| !a.is_empty()),
                    "{}: panel {title:?}: no data for {expr}",
                    path.display()
                );
                // Real numbers, not NaN from an empty histogram or a 0/0 ratio.
                for sample in result.as_array().unwrap() {
                    let v: f64 = sample["value"][1].as_str().unwrap().parse().unwrap();
                    assert!(v.is_finite() && v >= 0.0, "{title:?}: {expr} = {v}");
                }
                checked += 1;
            }
        }
        // The variables' queries find values too.
        for label in ["model", "user"] {
            let r = request(
                prom.addr,
                "GET",
                &format!("/api/v1/label/{label}/values?match[]=tokentap_requests_total"),
                &[],
                b"",
            );
            assert!(!r.json()["data"].as_array().unwrap().is_empty(), "{label}");
        }
    }
    assert!(checked >= 24, "only {checked} queries checked");
}

#[test]
fn ten_thousand_users_under_a_cap_of_100_make_at_most_101_series() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &format!(
            "{}[metrics]\nuser_label = \"all\"\nmax_users = 100\n",
            shipped_pricing()
        ),
    );
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let addr = tap.addr;
            std::thread::spawn(move || {
                let mut s = connect(addr);
                for i in 0..2500 {
                    let body = chat_body("openai/gpt-5.5", &format!("u{t}-{i}"), false, "");
                    assert_eq!(chat_on(&mut s, &[], &body).status, 200);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // A call is recorded just after its answer reached the client: wait for all of them.
    assert_eq!(tap.wait_records(10_000).len(), 10_000);
    let text = String::from_utf8(request(tap.admin, "GET", "/metrics", &[], b"").body).unwrap();
    for family in [
        "tokentap_requests_total{",
        "tokentap_tokens_total{",
        "tokentap_cost_usd_total{",
        "tokentap_web_searches_total{",
    ] {
        let mut users: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(family))
            .filter_map(|l| l.split("user=\"").nth(1)?.split('"').next())
            .collect();
        users.sort_unstable();
        users.dedup();
        assert!(users.len() <= 101, "{family}: {} user series", users.len());
        assert!(users.contains(&"__other__"), "{family}");
    }
    // Nothing is lost by folding: the counts still add up.
    let total: f64 = text
        .lines()
        .filter(|l| l.starts_with("tokentap_requests_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(total, 10_000.0);
}
