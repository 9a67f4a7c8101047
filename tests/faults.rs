//! Fault injection (issue 22): dependencies and clients that misbehave, with real processes.
//! For every case: the record's outcome is right, nothing is charged twice or for nothing, no
//! request is forwarded twice, and the process stays up. (Faults covered elsewhere: upstream
//! refusing connections, resetting mid-stream or stalling past the read timeout, and a client
//! gone mid-stream in `proxy.rs`; a dead or silent OTLP collector in `traces.rs`; Redis absent
//! at start or paused in `redis.rs`.)

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const MODEL: &str = "anthropic/claude-opus-4.6";

/// An upstream that answers every connection with `answer` (after reading the request head),
/// then closes; counts the connections it took.
fn scripted_upstream(answer: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&n);
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            seen.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                c.set_read_timeout(Some(PATIENCE)).unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => got.extend_from_slice(&buf[..k]),
                    }
                }
                let _ = c.write_all(answer);
            });
        }
    });
    (addr, n)
}

/// The process answers its health check: it stayed up.
fn assert_up(tap: &Tap) {
    let r = request(tap.admin, "GET", "/healthz", &[], b"");
    assert_eq!(r.status, 200, "tokentap is down");
}

#[test]
fn an_upstream_answering_garbage_is_a_502_charged_nothing() {
    let (up, conns) = scripted_upstream(b"this is not HTTP at all\r\n\r\n");
    let tap = Tap::start(
        &format!("http://{up}"),
        &format!("{TEST_PRICING}\n[budgets.users.g]\ndaily = {{ usd = 1 }}\n"),
    );
    let r = post_chat(tap.addr, &[], &chat_body(MODEL, "g", false, ""));
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "upstream_unavailable");
    let rec = &tap.wait_records(1)[0];
    assert_eq!(rec["outcome"], "upstream_error", "{rec}");
    assert_eq!(rec["usage_source"], "none", "{rec}");
    assert_eq!(pico_of(rec), 0, "nothing was generated: nothing charged");
    assert_eq!(conns.load(Ordering::SeqCst), 1, "not forwarded twice");
    assert_up(&tap);
}

#[test]
fn a_truncated_json_answer_is_billed_from_what_arrived() {
    let (up, conns) = scripted_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4000\r\n\r\n\
          {\"id\":\"gen-t\",\"model\":\"anthropic/claude-opus-4.6\",\"choices\":[{\"message\":\
          {\"role\":\"assistant\",\"content\":\"a whole answer cut short by the upstream",
    );
    let tap = Tap::start(&format!("http://{up}"), TEST_PRICING);
    let r = post_chat(tap.addr, &[], &chat_body(MODEL, "t", false, ""));
    assert!(!r.complete, "the client sees the body end early");
    let rec = &tap.wait_records(1)[0];
    assert_eq!(rec["outcome"], "upstream_reset", "{rec}");
    assert_eq!(rec["usage_source"], "estimated", "{rec}");
    assert!(rec["completion_tokens"].as_u64().unwrap() > 0, "{rec}");
    assert!(pico_of(rec) > 0, "{rec}");
    assert_eq!(conns.load(Ordering::SeqCst), 1, "not forwarded twice");
    assert_up(&tap);
}

#[test]
fn a_client_gone_mid_request_body_sends_nothing_upstream_and_is_charged_nothing() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &format!("{TEST_PRICING}\n[budgets.users.h]\ndaily = {{ usd = 1 }}\n"),
    );
    let body = chat_body(MODEL, "h", false, "");
    // A small body (read before the upstream is contacted) and a long chunked one (held after
    // the head went): the client sends part of it and hangs up.
    for chunked in [false, true] {
        let mut s = TcpStream::connect(tap.addr).unwrap();
        let head = if chunked {
            "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
                .to_string()
        } else {
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
        };
        s.write_all(head.as_bytes()).unwrap();
        let part = &body[..body.len() / 2];
        if chunked {
            write!(s, "{:x}\r\n", part.len()).unwrap();
        }
        s.write_all(part).unwrap();
        drop(s);
    }
    let recs = tap.wait_records(2);
    assert_eq!(recs.len(), 2);
    for rec in &recs {
        assert_eq!(rec["outcome"], "client_disconnected", "{rec}");
        assert_eq!(rec["usage_source"], "none", "{rec}");
        assert!(rec["cost_usd"].is_null() || pico_of(rec) == 0, "{rec}");
    }
    // No request reached the mock whole (it logs only requests it read in full).
    assert_eq!(mock.received(), 0);
    // The held reservations were released: the user's next call has the whole budget.
    let r = post_chat(tap.addr, &[], &body);
    assert_eq!(r.status, 200);
    assert_up(&tap);
}

#[test]
fn a_config_reload_with_a_thousand_streams_open_drops_none() {
    let mock = Mock::start();
    let tap = Tap::start(&mock.url(), TEST_PRICING);
    let n = 1000;
    let body = chat_body(MODEL, "many", true, "");
    let mut streams: Vec<TcpStream> = (0..n)
        .map(|_| {
            let mut s = connect(tap.addr);
            send_chat(
                &mut s,
                &[("x-mock-chunks", "6"), ("x-mock-delay-ms", "300")],
                &body,
            );
            s
        })
        .collect();
    // Every stream is under way (its head is here) before the reload.
    for s in &mut streams {
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
    }
    let old = tap.config_hash();
    tap.write_config(&format!("{}\n# changed\n", tap.text));
    tap.wait_config_change(&old);
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
                rest
            })
        })
        .collect();
    for r in readers {
        let rest = r.join().unwrap();
        assert!(
            String::from_utf8_lossy(&rest).contains("[DONE]"),
            "a stream was cut by the reload"
        );
    }
    let start = Instant::now();
    let recs = loop {
        let recs = tap.records();
        if recs.len() >= n || start.elapsed() > PATIENCE {
            break recs;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(recs.len(), n);
    assert!(recs
        .iter()
        .all(|r| r["outcome"] == "complete" && r["usage_source"] == "reported"));
    assert_eq!(mock.received(), n as u64);
    assert_up(&tap);
}

#[test]
fn sigterm_with_streams_in_flight_stops_being_ready_first_then_finishes_them_and_flushes_spend() {
    let mock = Mock::start();
    let mut tap = TapBuilder::new(&mock.url())
        .extra(&format!(
            "{TEST_PRICING}\n[budgets.users.late]\ndaily = {{ usd = 1 }}\n"
        ))
        .start_with_server_extra("drain_timeout_ms = 20000");
    let body = chat_body(MODEL, "late", true, "");
    let mut streams: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut s = connect(tap.addr);
            send_chat(
                &mut s,
                &[("x-mock-chunks", "20"), ("x-mock-delay-ms", "100")],
                &body,
            );
            let mut head = [0u8; 12];
            s.read_exact(&mut head).unwrap();
            s
        })
        .collect();
    tap.proc.signal("TERM");
    // Not ready (the admin listener answers no more, or says so) while the streams still run.
    let start = Instant::now();
    while probe(tap.admin, "/readyz").is_some_and(|r| r.status == 200) {
        assert!(start.elapsed() < PATIENCE, "still ready after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    for s in &mut streams {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(
            String::from_utf8_lossy(&rest).contains("[DONE]"),
            "a stream in flight was cut by the shutdown"
        );
    }
    let status = tap.proc.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let recs = tap.records();
    assert_eq!(recs.len(), 5);
    let spent: u64 = recs
        .iter()
        .inspect(|r| assert_eq!(r["outcome"], "complete", "{r}"))
        .map(pico_of)
        .sum();
    // The ledger holds every stream's spend, flushed on the way out.
    let out = tokentap_cli(&["spend", "--format", "json"], &tap.config);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["user"] == "late")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(row["calls"], 5);
    assert_eq!(pico_of_usd(&row["cost_usd"]), spent);
}

/// kill -9 under load: the embedded ledger loses at most the calls of its last flush
/// interval. Measured here: with `flush_interval_ms = 200`, every call that ended a second
/// before the kill is in the file, and the spend read back after a restart is exactly theirs
/// and those flushed after (never a call counted twice).
#[test]
fn kill_9_under_load_loses_at_most_the_last_flush_interval_of_spend() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &format!(
            "{TEST_PRICING}\n[budgets.ledger]\nflush_interval_ms = 200\n[budgets.users.k9]\ndaily = {{ usd = 100 }}\n"
        ),
    );
    let body = chat_body(MODEL, "k9", false, r#","max_tokens":5"#);
    let mut ended = Vec::new();
    let mut s = connect(tap.addr);
    let start = Instant::now();
    // Calls one after another for two seconds.
    while start.elapsed() < Duration::from_secs(2) {
        let r = chat_on(&mut s, &[], &body);
        assert_eq!(r.status, 200);
        ended.push(Instant::now());
    }
    let killed = Instant::now();
    tap.proc.signal("KILL");
    let dir = tap.into_dir();
    let db = rusqlite::Connection::open(dir.path().join("tokentap-ledger.db")).unwrap();
    let kept: u64 = db
        .query_row("SELECT COUNT(*) FROM calls WHERE user = 'k9'", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap() as u64;
    let settled_long_before = ended
        .iter()
        .filter(|t| killed.duration_since(**t) >= Duration::from_secs(1))
        .count() as u64;
    let lost = ended.len() as u64 - kept;
    eprintln!(
        "kill -9 after {} calls in 2 s (flush every 200 ms): {kept} kept, {lost} lost",
        ended.len()
    );
    assert!(
        kept >= settled_long_before,
        "calls that ended a second before the kill were lost: kept {kept} of {settled_long_before}"
    );
    assert!(kept <= ended.len() as u64, "a call counted twice");
    // Restarted on the same file: the window's spend is exactly the kept calls' (the spend
    // counters are flushed with the rows).
    let tap = TapBuilder::new(&mock.url())
        .in_dir(dir)
        .extra(&format!(
            "{TEST_PRICING}\n[budgets.ledger]\nflush_interval_ms = 200\n[budgets.users.k9]\ndaily = {{ usd = 100 }}\n"
        ))
        .start();
    let per_call: i64 = db
        .query_row(
            "SELECT MIN(cost_pico) FROM calls WHERE user = 'k9'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let v = request(tap.admin, "GET", "/admin/budgets/users/k9", &[], b"").json();
    let spent = pico_of_usd(&v["windows"][0]["spent_usd"]);
    assert_eq!(spent, kept * per_call as u64, "{v}");
}

/// Runs tokentap with a disk of its own: a tmpfs mounted (with `opts`) on `disk` in a mount
/// namespace of its own (`unshare`; no root needed where user namespaces are allowed), which
/// the test sees through `/proc/<pid>/root`.
fn own_disk(disk: &std::path::Path, opts: &str) -> Vec<String> {
    [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        &format!(r#"mount -t tmpfs -o {opts} tmpfs "$0" && exec "$@""#),
        disk.to_str().unwrap(),
    ]
    .map(str::to_string)
    .to_vec()
}

/// A tokentap whose embedded ledger is on a disk of its own.
struct OnOwnDisk {
    tap: Tap,
    _outer: tempfile::TempDir,
    /// The disk as tokentap sees it, and as this test does.
    disk: std::path::PathBuf,
    seen: std::path::PathBuf,
}

fn tap_on_own_disk(mock: &Mock, opts: &str, on_error: &str) -> OnOwnDisk {
    let can = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "true"])
        .status();
    assert!(
        can.is_ok_and(|s| s.success()),
        "this test gives tokentap a disk of its own in a mount namespace (`unshare --user \
         --mount`, util-linux): run it as root, or allow unprivileged user namespaces \
         (sysctl kernel.unprivileged_userns_clone=1)"
    );
    let outer = tempfile::tempdir().unwrap();
    let disk = outer.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let wrapper = own_disk(&disk, opts);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let tap = TapBuilder::new(&mock.url())
        .wrapper(&wrapper)
        .extra(&format!(
            "{TEST_PRICING}\n[budgets.ledger]\npath = \"{}\"\nflush_interval_ms = 100\n\
             on_error = \"{on_error}\"\n[budgets.users.d]\ndaily = {{ usd = 100 }}\n\
             [budgets.users.broke]\ndaily = {{ usd = \"0.000000000001\" }}\n",
            disk.join("ledger.db").display()
        ))
        .log_to_file()
        .start();
    let seen = format!("/proc/{}/root{}", tap.proc.pid(), disk.display());
    OnOwnDisk {
        tap,
        _outer: outer,
        disk,
        seen: seen.into(),
    }
}

/// `tokentap spend`'s (calls, pico) for `user`, run in `tap`'s mount namespace (SQLite
/// resolves `/proc/<pid>/root` to this namespace's root); none before the ledger file exists.
fn spend_of(tap: &Tap, user: &str) -> (u64, u64) {
    let out = std::process::Command::new("nsenter")
        .args([
            "-t",
            &tap.proc.pid().to_string(),
            "-U",
            "-m",
            "--preserve-credentials",
        ])
        .arg(env!("CARGO_BIN_EXE_tokentap"))
        .args(["spend", "--format", "json", "--config"])
        .arg(&tap.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("no ledger here") {
        return (0, 0);
    }
    assert!(out.status.success(), "{err}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["user"] == user)
        .map_or((0, 0), |r| {
            (r["calls"].as_u64().unwrap(), pico_of_usd(&r["cost_usd"]))
        })
}

/// What `tap`'s records hold for `user`: (calls, pico).
fn recorded_for(tap: &Tap, user: &str) -> (u64, u64) {
    tap.records()
        .iter()
        .filter(|r| r["user"] == user)
        .fold((0, 0), |(n, p), r| (n + 1, p + pico_of(r)))
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < PATIENCE, "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn call_as(tap: &Tap, user: &str) -> Resp {
    post_chat(
        tap.addr,
        &[],
        &chat_body(MODEL, user, false, r#","max_tokens":5"#),
    )
}

/// The embedded ledger's disk fills up mid-traffic: calls go on and caps still hold; the
/// fault is logged once, counted, and shown by a gauge and `/readyz`; nothing panics; and
/// once there is room again every call's row and spend are in the file, once.
#[test]
fn a_full_disk_under_the_embedded_ledger_is_lived_through_and_loses_nothing() {
    let mock = Mock::start();
    let OnOwnDisk {
        mut tap,
        seen,
        _outer: _keep,
        ..
    } = tap_on_own_disk(&mock, "size=8m", "fail_closed");
    assert_eq!(call_as(&tap, "d").status, 200);
    wait_for("the first call in the file", || spend_of(&tap, "d").0 == 1);
    assert_eq!(tap.metric("tokentap_ledger_file_writable"), 1.0);

    // Fill the disk.
    let filler = seen.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let full = loop {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_all()) {
            break e;
        }
    };
    assert_eq!(full.raw_os_error(), Some(28), "{full}"); // ENOSPC
    for _ in 0..5 {
        assert_eq!(call_as(&tap, "d").status, 200);
    }
    // Caps are decided in memory: they still hold.
    let r = call_as(&tap, "broke");
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    wait_for("the gauge to show the fault", || {
        tap.metric("tokentap_ledger_file_writable") == 0.0
    });
    assert!(tap.metric("tokentap_ledger_errors_total") >= 1.0);
    let ready = request(tap.admin, "GET", "/readyz", &[], b"");
    assert_eq!(ready.status, 200);
    assert!(
        String::from_utf8_lossy(&ready.body).contains("ledger file not writable"),
        "{}",
        String::from_utf8_lossy(&ready.body)
    );
    assert_eq!(spend_of(&tap, "d").0, 1, "written while the disk was full?");

    // Room again: what waited is written, once.
    drop(f);
    std::fs::remove_file(&filler).unwrap();
    wait_for("the gauge to show the file written", || {
        tap.metric("tokentap_ledger_file_writable") == 1.0
    });
    tap.wait_records(7);
    let want = recorded_for(&tap, "d");
    assert_eq!(want.0, 6);
    assert_eq!(spend_of(&tap, "d"), want);
    assert_eq!(tap.window_spend("d").0, want.1);
    let log = std::fs::read_to_string(tap.dir.path().join("tokentap.stderr")).unwrap();
    assert_eq!(log.matches("cannot write to").count(), 1, "{log}");
    assert_eq!(log.matches("is written again").count(), 1, "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(tap.proc.terminate().success());
    assert_eq!(mock.received(), 6);
}

/// The embedded ledger's disk is read-only at start (a volume mounted read-only, say):
/// tokentap starts anyway. The spend in the file is unknown, so `on_error` decides capped
/// calls: fail_closed refuses them with 503 and is not ready; fail_open lets them through.
/// Once the disk is writable the file opens, and the spend let through meanwhile is in it.
#[test]
fn a_read_only_disk_at_start_is_served_per_policy_until_the_ledger_opens() {
    let mock = Mock::start();
    let OnOwnDisk {
        tap: closed,
        _outer: _keep1,
        ..
    } = tap_on_own_disk(&mock, "ro,size=8m", "fail_closed");
    let r = call_as(&closed, "d");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "budget_store_unavailable");
    assert_eq!(
        request(closed.admin, "GET", "/readyz", &[], b"").status,
        503
    );
    assert_eq!(closed.metric("tokentap_ledger_store_up"), 0.0);
    assert_eq!(mock.received(), 0, "a refused call reached the upstream");

    let OnOwnDisk {
        tap: open,
        disk,
        _outer: _keep2,
        ..
    } = tap_on_own_disk(&mock, "ro,size=8m", "fail_open");
    for _ in 0..3 {
        assert_eq!(call_as(&open, "d").status, 200);
    }
    let ready = request(open.admin, "GET", "/readyz", &[], b"");
    assert_eq!(ready.status, 200);
    assert!(String::from_utf8_lossy(&ready.body).contains("degraded"));
    assert_eq!(open.metric("tokentap_ledger_store_up"), 0.0);
    let log = std::fs::read_to_string(open.dir.path().join("tokentap.stderr")).unwrap();
    assert!(log.contains("cannot open"), "{log}");

    // The disk becomes writable: the ledger opens by itself.
    let pid = open.proc.pid().to_string();
    let st = std::process::Command::new("nsenter")
        .args([
            "-t",
            &pid,
            "-U",
            "-m",
            "--preserve-credentials",
            "mount",
            "-o",
            "remount,rw",
        ])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    wait_for("the ledger to open", || {
        open.metric("tokentap_ledger_store_up") == 1.0
    });
    assert_eq!(call_as(&open, "d").status, 200);
    open.wait_records(4);
    let want = recorded_for(&open, "d");
    assert_eq!(want.0, 4);
    wait_for("every call in the file", || spend_of(&open, "d") == want);
    // And in the caps' spend: what was let through meanwhile is charged.
    assert_eq!(open.window_spend("d").0, want.1);
    assert_eq!(mock.received(), 4);
}
