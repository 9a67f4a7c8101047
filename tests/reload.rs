//! Hot reload against the real binary: file changes (editor-style and Kubernetes-style), SIGHUP
//! and `POST /admin/reload`, under load, with bad configs among the good ones.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MODEL: &str = "anthropic/claude-opus-4.6";

/// The config text with another output price (USD per million tokens) for MODEL.
fn priced(text: &str, output: u64) -> String {
    assert!(text.contains("output_per_mtok = 25\n"));
    text.replace(
        "output_per_mtok = 25\n",
        &format!("output_per_mtok = {output}\n"),
    )
}

/// The output price a record was charged, from its cost (TEST_PRICING: input $5, no cache).
fn output_price(r: &Value) -> u64 {
    let s = r["cost_usd"].to_string();
    let (i, f) = s.split_once('.').unwrap_or((&s, ""));
    let pico =
        i.parse::<u64>().unwrap() * 1_000_000_000_000 + format!("{f:0<12}").parse::<u64>().unwrap();
    let prompt = r["prompt_tokens"].as_u64().unwrap();
    let completion = r["completion_tokens"].as_u64().unwrap();
    (pico - prompt * 5_000_000) / (completion * 1_000_000)
}

fn sighup(tap: &Tap) {
    let ok = Command::new("kill")
        .args(["-HUP", &tap.proc.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Calls until the running config charges `price`, or panics after a while.
fn wait_price(tap: &Tap, price: u64) {
    let start = Instant::now();
    let mut n = tap.records().len();
    loop {
        let body = chat_body(MODEL, "probe", false, "");
        assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
        n += 1;
        let recs = tap.wait_records(n);
        if output_price(&recs[n - 1]) == price {
            return;
        }
        assert!(start.elapsed() < PATIENCE, "price {price} never applied");
        std::thread::sleep(Duration::from_millis(30));
    }
}

#[test]
fn fifty_reloads_under_load_fail_no_request_and_lose_no_record() {
    let mock = Mock::start();
    let tap = Tap::start(&mock.url(), TEST_PRICING);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|t| {
            let (stop, sent, addr) = (Arc::clone(&stop), Arc::clone(&sent), tap.addr);
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let user = format!("c{t}-{i}");
                    let stream = i % 2 == 0;
                    let body = chat_body(MODEL, &user, stream, "");
                    let resp = post_chat(
                        addr,
                        &[("x-mock-chunks", "3"), ("x-mock-delay-ms", "2")],
                        &body,
                    );
                    sent.fetch_add(1, Ordering::Relaxed);
                    if resp.status != 200 || !resp.complete {
                        failures.push(format!(
                            "{user}: {} complete={}",
                            resp.status, resp.complete
                        ));
                    }
                    i += 1;
                }
                failures
            })
        })
        .collect();

    let mut last_valid = 25;
    for k in 0..50u64 {
        let bad = k % 5 == 4;
        let text = if bad {
            format!("{}\n[upstream]\nbogus = 1\n", tap.text)
        } else {
            last_valid = 26 + k;
            priced(&tap.text, last_valid)
        };
        let before = tap.config_hash();
        let errors = tap.metric("tokentap_config_reloads_total{result=\"error\"}");
        tap.write_config(&text);
        match k % 3 {
            0 => {
                let r = tap.reload();
                assert_eq!(r.status, if bad { 400 } else { 200 }, "reload {k}");
            }
            1 => sighup(&tap),
            _ => {} // the file watch alone
        }
        // Wait for this reload to take effect (or be rejected) before the next one.
        let start = Instant::now();
        loop {
            let done = if bad {
                tap.metric("tokentap_config_reloads_total{result=\"error\"}") > errors
            } else {
                tap.config_hash() != before
            };
            if done {
                break;
            }
            assert!(start.elapsed() < PATIENCE, "reload {k} had no effect");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(
        failures.is_empty(),
        "failed requests during reloads: {failures:?}"
    );

    let sent = sent.load(Ordering::Relaxed) as usize;
    assert!(sent > 50, "too little load to mean anything: {sent}");
    let recs = tap.wait_records(sent);
    assert_eq!(recs.len(), sent, "exactly one record per request");
    let mut users: Vec<&str> = recs.iter().map(|r| r["user"].as_str().unwrap()).collect();
    users.sort_unstable();
    users.dedup();
    assert_eq!(users.len(), sent, "a request was recorded twice");
    assert!(recs.iter().all(|r| r["outcome"] == "complete"));
    assert!(tap.metric("tokentap_config_reloads_total{result=\"success\"}") >= 40.0);
    assert!(tap.metric("tokentap_config_reloads_total{result=\"error\"}") >= 10.0);
    wait_price(&tap, last_valid);
}

#[test]
fn a_price_change_applies_to_calls_that_start_after_it() {
    let mock = Mock::start();
    let tap = Tap::start(&mock.url(), TEST_PRICING);
    let addr = tap.addr;
    let long = std::thread::spawn(move || {
        let body = chat_body(MODEL, "before", true, "");
        post_chat(
            addr,
            &[("x-mock-chunks", "20"), ("x-mock-delay-ms", "30")],
            &body,
        )
        .complete
    });
    // Once the upstream has the request, tokentap took its config snapshot long before.
    let start = Instant::now();
    while mock.received() == 0 {
        assert!(start.elapsed() < PATIENCE);
        std::thread::sleep(Duration::from_millis(5));
    }
    tap.write_config(&priced(&tap.text, 100));
    assert_eq!(tap.reload().status, 200);
    // The stream was still running when the new price took effect (the mock logs a stream
    // when it ends).
    assert!(
        mock.requests().is_empty(),
        "the stream ended before the reload"
    );
    let body = chat_body(MODEL, "after", false, "");
    assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
    assert!(
        long.join().unwrap(),
        "the running stream was disturbed by the reload"
    );
    let recs = tap.wait_records(2);
    let by_user = |u: &str| recs.iter().find(|r| r["user"] == u).unwrap();
    assert_eq!(
        output_price(by_user("before")),
        25,
        "a running call changed price"
    );
    assert_eq!(output_price(by_user("after")), 100);
}

#[test]
fn an_editor_style_replace_is_picked_up() {
    let mock = Mock::start();
    let tap = Tap::start(&mock.url(), TEST_PRICING);
    let before = tap.config_hash();
    tap.write_config(&priced(&tap.text, 40));
    tap.wait_config_change(&before);
    wait_price(&tap, 40);
}

#[test]
fn a_kubernetes_configmap_symlink_swap_is_picked_up() {
    let mock = Mock::start();
    let tap = TapBuilder::new(&mock.url())
        .extra(TEST_PRICING)
        .k8s_layout()
        .start();
    let before = tap.config_hash();
    // What the kubelet does: a new versioned directory, a temporary ..data link to it, and an
    // atomic rename of that link over ..data.
    let dir = tap.dir.path();
    let v2 = dir.join("..v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("tokentap.toml"), priced(&tap.text, 60)).unwrap();
    std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join("..v1")).unwrap();
    tap.wait_config_change(&before);
    wait_price(&tap, 60);
}

#[test]
fn a_reload_storm_leaves_the_last_valid_config_active() {
    let mock = Mock::start();
    let tap = Tap::start(&mock.url(), TEST_PRICING);
    for k in 0..100u64 {
        let text = if k % 7 == 3 {
            "[upstream\nbroken".to_string()
        } else {
            priced(&tap.text, 200 + k)
        };
        if k % 2 == 0 {
            tap.write_config(&text);
        } else {
            // In place, the way some tools write: truncate, then write.
            std::fs::write(&tap.config, &text).unwrap();
        }
        std::thread::sleep(Duration::from_millis(8));
    }
    // The last write (k = 99) was valid: its price must win.
    wait_price(&tap, 299);
    let running = tap.config_hash();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        tap.config_hash(),
        running,
        "the config kept changing after the storm"
    );
}

#[test]
fn a_bad_config_is_rejected_whole_and_the_old_one_keeps_serving() {
    let mock = Mock::start();
    let tap = Tap::start(&mock.url(), TEST_PRICING);
    let before = tap.config_hash();
    let loaded_at = tap.metric("tokentap_config_last_reload_success_timestamp_seconds");
    std::thread::sleep(Duration::from_millis(1100));
    // A good price change and a typo in the same file: none of it may apply.
    let text = priced(&tap.text, 80).replace("connect_timeout_ms", "conect_timeout_ms");
    tap.write_config(&text);
    let r = tap.reload();
    assert_eq!(r.status, 400);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains(&tap.config.display().to_string()), "{msg}");
    assert!(
        msg.contains("line ") && msg.contains("conect_timeout_ms"),
        "{msg}"
    );
    assert!(msg.contains("previous config is still running"), "{msg}");
    assert_eq!(tap.config_hash(), before);
    wait_price(&tap, 25);
    assert!(tap.metric("tokentap_config_reloads_total{result=\"error\"}") >= 1.0);

    // A missing included file is just as bad.
    tap.write_config(&format!(
        "{}\n",
        priced(&tap.text, 80).replace("[pricing]\n", "[pricing]\nfile = \"missing-prices.toml\"\n")
    ));
    let r = tap.reload();
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("missing-prices.toml"));

    // Fixed: it applies.
    tap.write_config(&priced(&tap.text, 80));
    assert_eq!(tap.reload().status, 200);
    wait_price(&tap, 80);
    let ok = tap.metric("tokentap_config_last_reload_success_timestamp_seconds");
    assert!(
        ok > loaded_at,
        "the last success time did not move: {ok} <= {loaded_at}"
    );
    let hash = tap.config_hash();
    assert_eq!(
        tap.metric(&format!("tokentap_config_info{{hash=\"{hash}\"}}")),
        1.0
    );
}

#[test]
fn a_changed_listen_address_needs_a_restart_but_the_rest_applies() {
    let mock = Mock::start();
    let tap = Tap::start(&mock.url(), TEST_PRICING);
    let new_port = free_port();
    let text = priced(&tap.text, 90).replace(
        &format!("listen = \"{}\"", tap.addr),
        &format!("listen = \"127.0.0.1:{new_port}\""),
    );
    assert_ne!(text, priced(&tap.text, 90));
    tap.write_config(&text);
    let r = tap.reload();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["restart_required"],
        serde_json::json!(["server.listen"])
    );
    // Still serving where it listened, at the new price.
    wait_price(&tap, 90);
    let cfg = request(tap.admin, "GET", "/admin/config", &[], b"").json();
    assert_eq!(
        cfg["restart_required"],
        serde_json::json!(["server.listen"])
    );
}

#[test]
fn sighup_reloads() {
    let mock = Mock::start();
    let tap = Tap::start(&mock.url(), TEST_PRICING);
    // The file watch applies a change first; SIGHUP then reloads again (an explicit reload
    // always counts), which only SIGHUP can have done.
    let before = tap.config_hash();
    std::fs::write(&tap.config, priced(&tap.text, 70)).unwrap();
    tap.wait_config_change(&before);
    wait_price(&tap, 70);
    let ok = "tokentap_config_reloads_total{result=\"success\"}";
    let successes = tap.metric(ok);
    sighup(&tap);
    let start = Instant::now();
    while tap.metric(ok) <= successes {
        assert!(start.elapsed() < PATIENCE, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The process survived the signal.
    assert!(tap.proc.pid() > 0);
    assert_eq!(request(tap.admin, "GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn the_upstream_itself_can_be_switched_without_a_restart() {
    let (a, b) = (Mock::start(), Mock::start());
    let tap = Tap::start(&a.url(), TEST_PRICING);
    let body = chat_body(MODEL, "to-a", false, "");
    assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
    tap.write_config(&tap.text.replace(&a.url(), &b.url()));
    assert_eq!(tap.reload().status, 200);
    let body = chat_body(MODEL, "to-b", false, "");
    assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
    assert_eq!(a.received(), 1);
    assert_eq!(b.received(), 1);
    assert_eq!(b.wait_requests(1)[0]["user"], "to-b");
}
