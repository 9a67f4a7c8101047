//! The Redis teams run in production (issue 28), with real `redis-server` processes started
//! here: TLS only, with mutual TLS and a password from the environment; a three-master
//! Cluster; a master and replica watched by a Sentinel, failed over. Certificates are made by
//! the test (rcgen).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MODEL: &str = "anthropic/claude-opus-4.6";
const PROMPT_TOKENS: u64 = 14;
const IN: u64 = 5_000_000;
const OUT: u64 = 25_000_000;

/// `redis-server` with `args`, run in `dir` (its log to `redis-<n>.log` there).
fn redis_server(dir: &Path, args: &[&str]) -> Proc {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let log = format!(
        "redis-{}.log",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let child = Command::new("redis-server")
        .args(args)
        .args(["--logfile", &log])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "redis-server is missing: scripts/test.sh installs it (Debian package redis-server)",
        );
    Proc { child }
}

/// `redis-cli` with `args`: its output, or `None` when it failed.
fn cli(args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli").args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && !text.starts_with("Could not connect") && !text.contains("ERR"))
        .then_some(text)
}

/// Waits until `redis-cli args` answers with something containing `want`.
fn wait_cli(args: &[&str], want: &str) -> String {
    let start = Instant::now();
    loop {
        if let Some(out) = cli(args) {
            if out.contains(want) {
                return out;
            }
        }
        assert!(
            start.elapsed() < PATIENCE,
            "redis-cli {args:?} never answered {want:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn plain(port: u16) -> Vec<String> {
    ["-h", "127.0.0.1", "-p", &port.to_string()]
        .map(str::to_string)
        .to_vec()
}

fn with<'a>(base: &'a [String], more: &[&'a str]) -> Vec<&'a str> {
    base.iter()
        .map(String::as_str)
        .chain(more.iter().copied())
        .collect()
}

/// A private CA, a server certificate for localhost and 127.0.0.1, and a client
/// certificate, all signed by it; and a second CA that signed none of them.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            // Names of their own (OpenSSL takes a certificate whose subject is its issuer's
            // for a self-signed one).
            p.distinguished_name
                .push(DnType::CommonName, format!("test {name}"));
            let cert = p.self_signed(&key).unwrap();
            std::fs::write(dir.path().join(name), cert.pem()).unwrap();
            Issuer::new(p, key)
        };
        let issuer = ca("ca.pem");
        let _other = ca("other-ca.pem");
        for (name, sans) in [
            (
                "server",
                vec!["localhost".to_string(), "127.0.0.1".to_string()],
            ),
            ("client", vec!["tokentap".to_string()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            let cert = p.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(
                dir.path().join(format!("{name}-key.pem")),
                key.serialize_pem(),
            )
            .unwrap();
        }
        Pki { dir }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn s(&self, f: &str) -> String {
        self.path(f).display().to_string()
    }
}

fn ledger(lines: &str, caps: &str) -> String {
    format!("{TEST_PRICING}\n[budgets.ledger]\nbackend = \"redis\"\n{lines}\n{caps}")
}

/// A TLS-only Redis (no plaintext port) that wants a client certificate and a password: the
/// password comes from the environment, caps hold under 64 concurrent calls, and the
/// password appears nowhere tokentap writes or serves. A wrong CA is a clear error and never
/// a plaintext fallback.
#[test]
fn a_tls_only_redis_with_a_password_from_the_environment_holds_caps_and_hides_it() {
    const SECRET: &str = "s3cret-redis-pass-4e1d";
    let pki = Pki::new();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let p = port.to_string();
    let (cert, key, ca) = (
        pki.s("server.pem"),
        pki.s("server-key.pem"),
        pki.s("ca.pem"),
    );
    let _redis = redis_server(
        dir.path(),
        &[
            "--port",
            "0",
            "--tls-port",
            &p,
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "yes",
            "--requirepass",
            SECRET,
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    );
    let (ccert, ckey) = (pki.s("client.pem"), pki.s("client-key.pem"));
    wait_cli(
        &[
            "--tls",
            "--cacert",
            &ca,
            "--cert",
            &ccert,
            "--key",
            &ckey,
            "-h",
            "127.0.0.1",
            "-p",
            &p,
            "--no-auth-warning",
            "-a",
            SECRET,
            "PING",
        ],
        "PONG",
    );
    let mock = Mock::start();
    let (cap, caps) = cap_of_ten();
    let lines = |ca: &str| {
        format!(
            "redis_url = \"rediss://localhost:{port}/0\"\nredis_password_env = \
             \"TT_REDIS_PASSWORD\"\nredis_ca_file = \"{ca}\"\nredis_client_cert_file = \
             \"{ccert}\"\nredis_client_key_file = \"{ckey}\"\nredis_timeout_ms = 5000\n\
             on_error = \"fail_closed\""
        )
    };
    let tap = TapBuilder::new(&mock.url())
        .extra(&ledger(&lines(&ca), &caps))
        .env("TT_REDIS_PASSWORD", SECRET)
        .log_to_file()
        .start();
    assert!(!tap.text.contains(SECRET));
    caps_hold_under_64_concurrent_calls(&mock, &[&tap], "greedy", cap);
    // Nowhere: the log, the metrics, the config dump, check-config, the records.
    let log = std::fs::read_to_string(tap.dir.path().join("tokentap.stderr")).unwrap();
    let metrics =
        String::from_utf8_lossy(&request(tap.admin, "GET", "/metrics", &[], b"").body).into_owned();
    let dump = String::from_utf8_lossy(&request(tap.admin, "GET", "/admin/config", &[], b"").body)
        .into_owned();
    let check = Command::new(env!("CARGO_BIN_EXE_tokentap"))
        .args(["check-config"])
        .arg(&tap.config)
        .env("TT_REDIS_PASSWORD", SECRET)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let check = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let records = std::fs::read_to_string(&tap.log).unwrap();
    for (what, text) in [
        ("log", &log),
        ("metrics", &metrics),
        ("config dump", &dump),
        ("check-config", &check),
        ("records", &records),
    ] {
        assert!(!text.contains(SECRET), "the password is in the {what}");
    }
    assert_eq!(tap.metric("tokentap_ledger_store_up"), 1.0);

    // A CA that did not sign the server's certificate: tokentap starts, is not ready, and
    // says why; nothing goes in plaintext (there is no plaintext port to fall back to).
    let wrong = TapBuilder::new(&mock.url())
        .extra(&ledger(&lines(&pki.s("other-ca.pem")), &caps))
        .env("TT_REDIS_PASSWORD", SECRET)
        .log_to_file()
        .start();
    assert_eq!(request(wrong.admin, "GET", "/readyz", &[], b"").status, 503);
    assert_eq!(wrong.metric("tokentap_ledger_store_up"), 0.0);
    let r = post_chat(wrong.addr, &[], &chat_body(MODEL, "greedy", false, ""));
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "budget_store_unavailable");
    let log = std::fs::read_to_string(wrong.dir.path().join("tokentap.stderr")).unwrap();
    assert!(log.to_lowercase().contains("certificate"), "{log}");
    assert!(!log.contains(SECRET));
}

/// A Cluster of three masters shared by two tokentap replicas: every script's keys share a
/// slot (the prefix is a hash tag), caps hold under 64 concurrent calls split across both,
/// and the spend report reads the Cluster.
#[test]
fn a_three_master_cluster_shared_by_two_replicas_holds_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let (_nodes, ports) = cluster(dir.path(), 3, 0);
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mock = Mock::start();
    let (cap, caps) = cap_of_ten();
    let caps = format!("{caps}[budgets.users.mover]\ndaily = {{ usd = 100 }}\n");
    let lines = format!(
        "redis_mode = \"cluster\"\nredis_nodes = [\"{}\"]\nredis_timeout_ms = 5000",
        addrs[0]
    );
    let a = Tap::start(&mock.url(), &ledger(&lines, &caps));
    let b = Tap::start(&mock.url(), &ledger(&lines, &caps));
    caps_hold_under_64_concurrent_calls(&mock, &[&a, &b], "greedy", cap);
    // Reports, through the Cluster too.
    let start = Instant::now();
    loop {
        let out = tokentap_cli(&["spend", "--format", "json"], &a.config);
        let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
        let calls = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["user"] == "greedy")
            .map_or(0, |r| r["calls"].as_u64().unwrap());
        if calls == 64 {
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the report has {calls} of 64 calls"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The slot of every key moves to another master while calls go on: the replicas meet
    // ASK redirects (and TRYAGAIN for a script whose keys are split) while it moves, MOVED
    // after. A call either goes through or meets on_error (503, fail_closed), and every
    // call that went through is charged once.
    let slot = ledger_slot(ports[0]);
    let nodes = cli(&with(&plain(ports[0]), &["CLUSTER", "NODES"])).unwrap();
    let (src_id, src) = id_port(nodes.lines().find(|l| serves(l, &slot)).unwrap());
    let (dst_id, dst) = id_port(
        nodes
            .lines()
            .find(|l| !serves(l, &slot) && !l.trim().is_empty())
            .unwrap(),
    );
    let charge = |tap: &Tap| {
        post_chat(
            tap.addr,
            &[],
            &chat_body(MODEL, "mover", false, r#","max_tokens":5"#),
        )
        .status
    };
    let mut statuses = vec![charge(&a), charge(&b)];
    cli(&with(
        &plain(dst),
        &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &src_id],
    ))
    .unwrap();
    cli(&with(
        &plain(src),
        &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &dst_id],
    ))
    .unwrap();
    let mut moved = 0;
    loop {
        // Four keys at a time, a call in between.
        let keys = cli(&with(
            &plain(src),
            &["CLUSTER", "GETKEYSINSLOT", &slot, "4"],
        ))
        .unwrap();
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        if keys.is_empty() {
            break;
        }
        let d = dst.to_string();
        let mut args = vec!["MIGRATE", "127.0.0.1", &d, "", "0", "5000", "KEYS"];
        args.extend(&keys);
        cli(&with(&plain(src), &args)).unwrap();
        moved += keys.len();
        statuses.push(charge(if moved % 8 == 0 { &a } else { &b }));
    }
    assert!(moved > 0, "no key to move");
    for p in &ports {
        cli(&with(
            &plain(*p),
            &["CLUSTER", "SETSLOT", &slot, "NODE", &dst_id],
        ))
        .unwrap();
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    // Moved: served from the new owner.
    for tap in [&a, &b] {
        let start = Instant::now();
        loop {
            let s = charge(tap);
            statuses.push(s);
            if s == 200 {
                break;
            }
            assert_eq!(s, 503);
            assert!(
                start.elapsed() < PATIENCE,
                "never served after the slot moved"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        for _ in 0..3 {
            statuses.push(charge(tap));
            assert_eq!(statuses.last(), Some(&200));
        }
    }
    let went = statuses.iter().filter(|s| **s == 200).count() as u64;
    let start = Instant::now();
    loop {
        let recs: Vec<_> = [&a, &b]
            .iter()
            .flat_map(|t| t.records())
            .filter(|r| r["user"] == "mover")
            .collect();
        let charged: u64 = recs
            .iter()
            .filter(|r| r["status"] == 200)
            .map(pico_of)
            .sum();
        let w = a.window_spend("mover");
        if recs.len() == statuses.len() && w == (charged, 0) {
            assert_eq!(charged, went * (PROMPT_TOKENS * IN + 5 * OUT));
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "mover: {w:?} vs {charged} charged in records"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("slot {slot} moved ({moved} keys): {statuses:?}");
    assert_ne!(
        cli(&with(&plain(dst), &["CLUSTER", "COUNTKEYSINSLOT", &slot]))
            .map(|s| s.trim().to_string()),
        Some("0".to_string()),
        "the keys did not move"
    );
}

/// Waits until `tokentap spend` (from Redis) has every call of `user` that `tap` recorded,
/// each once.
fn wait_report_matches(tap: &Tap, user: &str) {
    let start = Instant::now();
    loop {
        let recs: Vec<_> = tap
            .records()
            .into_iter()
            .filter(|r| r["user"] == user)
            .collect();
        let want = (recs.len() as u64, recs.iter().map(pico_of).sum::<u64>());
        let out = tokentap_cli(&["spend", "--format", "json"], &tap.config);
        let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
        let got = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["user"] == user)
            .map_or((0, 0), |r| {
                (r["calls"].as_u64().unwrap(), pico_of_usd(&r["cost_usd"]))
            });
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the report has {got:?}, the records {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Cluster of `masters` masters with `replicas` replicas each, on free ports: its
/// processes (in `dir`) and ports, once every node says the cluster is ok.
fn cluster(dir: &Path, masters: usize, replicas: usize) -> (Vec<Option<Proc>>, Vec<u16>) {
    let ports: Vec<u16> = (0..masters * (1 + replicas))
        .map(|_| cluster_port())
        .collect();
    let nodes = ports
        .iter()
        .map(|p| {
            let p = p.to_string();
            let conf = format!("nodes-{p}.conf");
            Some(redis_server(
                dir,
                &[
                    "--port",
                    &p,
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    // Long enough that a loaded machine does not fail a master over by
                    // itself (with 1 s, one did, to a replica that had not caught up).
                    "--cluster-node-timeout",
                    "3000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
            ))
        })
        .collect();
    for p in &ports {
        wait_cli(&with(&plain(*p), &["PING"]), "PONG");
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let r = replicas.to_string();
    let mut create = vec!["--cluster", "create"];
    create.extend(addrs.iter().map(String::as_str));
    create.extend(["--cluster-replicas", &r, "--cluster-yes"]);
    assert!(cli(&create).is_some(), "redis-cli --cluster create failed");
    for p in &ports {
        wait_cli(&with(&plain(*p), &["CLUSTER", "INFO"]), "cluster_state:ok");
    }
    (nodes, ports)
}

/// The slot of the ledger's keys (their hash tag is the prefix, `tokentap`).
fn ledger_slot(port: u16) -> String {
    cli(&with(&plain(port), &["CLUSTER", "KEYSLOT", "tokentap"]))
        .unwrap()
        .trim()
        .to_string()
}

/// A `CLUSTER NODES` line's node id and port.
fn id_port(line: &str) -> (String, u16) {
    let mut w = line.split_whitespace();
    let id = w.next().unwrap().to_string();
    let port = w
        .next()
        .unwrap()
        .split(['@', ':'])
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    (id, port)
}

/// Whether a `CLUSTER NODES` line's node serves `slot`.
fn serves(line: &str, slot: &str) -> bool {
    let slot: u32 = slot.parse().unwrap();
    line.split_whitespace()
        .skip(8)
        .any(|r| match r.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().unwrap()..=b.parse().unwrap()).contains(&slot),
            None => r.parse::<u32>().ok() == Some(slot),
        })
}

/// Waits until the replica at `replica` has everything the master at `master` has now (its
/// replication offset). (`WAIT` from another client would not do: it waits for that
/// client's own writes.)
fn caught_up(master: u16, replica: u16) {
    let offset = |port: u16, field: &str| -> Option<u64> {
        cli(&with(&plain(port), &["INFO", "replication"]))?
            .lines()
            .find_map(|l| l.strip_prefix(field)?.trim().parse().ok())
    };
    let want = offset(master, "master_repl_offset:").expect("the master's offset");
    let start = Instant::now();
    while offset(replica, "slave_repl_offset:").is_none_or(|o| o < want) {
        assert!(start.elapsed() < PATIENCE, "the replica never caught up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free port whose cluster bus port (10,000 above) is free too.
fn cluster_port() -> u16 {
    loop {
        let p = free_port();
        if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

/// A master and a replica watched by a Sentinel: after `kill -9` of the master, the Sentinel
/// promotes the replica and tokentap serves again within 20 seconds of that, writing to the
/// new master, with nothing counted twice.
#[test]
fn sentinel_failover_is_followed_and_nothing_is_counted_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (m, r, s) = (free_port(), free_port(), free_port());
    let common_args = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
    let mut master = redis_server(
        dir.path(),
        &with(&["--port".into(), m.to_string()], &common_args),
    );
    let _replica = redis_server(
        dir.path(),
        &with(
            &[
                "--port".into(),
                r.to_string(),
                "--replicaof".into(),
                "127.0.0.1".into(),
                m.to_string(),
            ],
            &common_args,
        ),
    );
    wait_cli(
        &with(&plain(r), &["INFO", "replication"]),
        "master_link_status:up",
    );
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {s}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {m} 1\n\
             sentinel down-after-milliseconds mymaster 3000\n\
             sentinel failover-timeout mymaster 5000\n"
        ),
    )
    .unwrap();
    let _sentinel = redis_server(dir.path(), &[conf.to_str().unwrap(), "--sentinel"]);
    // The Sentinel knows the replica (else it could not promote it).
    wait_cli(
        &with(&plain(s), &["SENTINEL", "REPLICAS", "mymaster"]),
        &r.to_string(),
    );

    let mock = Mock::start();
    let real = PROMPT_TOKENS * IN + 5 * OUT;
    let lines = format!(
        "redis_mode = \"sentinel\"\nredis_nodes = [\"127.0.0.1:{s}\"]\n\
         redis_sentinel_master = \"mymaster\"\nredis_timeout_ms = 1000\non_error = \"fail_closed\""
    );
    let tap = Tap::start(
        &mock.url(),
        &ledger(&lines, "[budgets.users.s]\ndaily = { usd = 100 }\n"),
    );
    let call = || {
        post_chat(
            tap.addr,
            &[],
            &chat_body(MODEL, "s", false, r#","max_tokens":5"#),
        )
    };
    for _ in 0..3 {
        assert_eq!(call().status, 200);
    }
    let spent = || tap.window_spend("s").0;
    let wait_spent = |want: u64| {
        let start = Instant::now();
        while spent() != want {
            assert!(start.elapsed() < PATIENCE, "spent {}, want {want}", spent());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_spent(3 * real);
    // What the master holds has reached the replica before it dies.
    caught_up(m, r);

    master.signal("KILL");
    let _ = master.child.wait();
    let promoted = wait_cli(
        &with(
            &plain(s),
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
        ),
        &r.to_string(),
    );
    assert!(promoted.contains(&r.to_string()));
    let since = Instant::now();
    loop {
        let resp = call();
        if resp.status == 200 {
            break;
        }
        assert_eq!(resp.status, 503, "{}", String::from_utf8_lossy(&resp.body));
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "not serving 20 s after the Sentinel promoted the replica"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "served again {:?} after the Sentinel's answer",
        since.elapsed()
    );
    // Written to the new master; the three calls before, once; the one after, once.
    wait_spent(4 * real);
    wait_cli(&with(&plain(r), &["ROLE"]), "master");
    let start = Instant::now();
    while request(tap.admin, "GET", "/readyz", &[], b"").status != 200
        || tap.metric("tokentap_ledger_store_up") != 1.0
    {
        assert!(start.elapsed() < PATIENCE, "never ready again");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_report_matches(&tap, "s");
}

/// Six nodes: three masters, each with a replica (cluster-node-timeout 3 s). The master holding the ledger's slot is
/// killed; the Cluster promotes its replica, and tokentap follows (a call meanwhile meets
/// on_error), with nothing counted twice.
#[test]
fn a_cluster_master_failing_over_is_followed_and_nothing_is_counted_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, ports) = cluster(dir.path(), 3, 1);
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let slot = ledger_slot(ports[0]);
    // The master of the slot, and its replica once it is in sync.
    let (master_id, master) = id_port(
        cli(&with(&plain(ports[0]), &["CLUSTER", "NODES"]))
            .unwrap()
            .lines()
            .find(|l| l.contains("master") && serves(l, &slot))
            .unwrap(),
    );
    let replica = {
        let start = Instant::now();
        loop {
            let nodes = cli(&with(&plain(ports[0]), &["CLUSTER", "NODES"])).unwrap();
            if let Some(l) = nodes
                .lines()
                .find(|l| l.contains("slave") && l.contains(&master_id))
            {
                break id_port(l).1;
            }
            assert!(start.elapsed() < PATIENCE, "the master has no replica");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_cli(
        &with(&plain(replica), &["INFO", "replication"]),
        "master_link_status:up",
    );

    let mock = Mock::start();
    let real = PROMPT_TOKENS * IN + 5 * OUT;
    let seeds: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    let lines = format!(
        "redis_mode = \"cluster\"\nredis_nodes = [{}]\nredis_timeout_ms = 1000\n\
         on_error = \"fail_closed\"",
        seeds.join(", ")
    );
    let tap = TapBuilder::new(&mock.url())
        .extra(&ledger(
            &lines,
            "[budgets.users.f]\ndaily = { usd = 100 }\n",
        ))
        .env("RUST_LOG", "tokentap::budget=debug,warn")
        .log_to_file()
        .start();
    let logp = tap.dir.path().join("tokentap.stderr");
    let call = || {
        post_chat(
            tap.addr,
            &[],
            &chat_body(MODEL, "f", false, r#","max_tokens":5"#),
        )
    };
    for _ in 0..3 {
        assert_eq!(call().status, 200);
    }
    let spent = || tap.window_spend("f").0;
    let start = Instant::now();
    while spent() != 3 * real {
        assert!(start.elapsed() < PATIENCE, "spent {}", spent());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Everything the master has is on its replica before it dies.
    caught_up(master, replica);

    let i = ports.iter().position(|p| *p == master).unwrap();
    nodes[i].take().unwrap().signal("KILL");
    wait_cli(&with(&plain(replica), &["ROLE"]), "master");
    let since = Instant::now();
    let mut went = 3;
    loop {
        let r = call();
        if r.status == 200 {
            went += 1;
            break;
        }
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        assert!(
            since.elapsed() < PATIENCE,
            "never served after the failover"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Served from now on (a round trip on a stale route meets on_error, and the next one
    // goes through): three in a row.
    let mut in_a_row = 1;
    while in_a_row < 3 {
        let s = call().status;
        if s == 200 {
            went += 1;
            in_a_row += 1;
        } else {
            assert_eq!(s, 503);
            in_a_row = 0;
        }
        assert!(
            since.elapsed() < PATIENCE,
            "not served steadily after the failover"
        );
    }
    let start = Instant::now();
    while spent() != went * real {
        let late = start.elapsed() > PATIENCE;
        if late {
            println!("LOG {}", std::fs::read_to_string(&logp).unwrap());
        }
        assert!(!late, "spent {}, want {}", spent(), went * real);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(mock.received(), went);
    wait_report_matches(&tap, "f");
}

/// The Sentinels name another master while the old one still answers and takes writes (as
/// on the cut-off side of a partition): round trips to it do not fail, and tokentap still
/// moves to the named master within seconds, because it asks the Sentinels every 5 s.
#[test]
fn the_master_the_sentinels_name_is_followed_while_the_old_one_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, s) = (free_port(), free_port(), free_port());
    let args = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
    let _a = redis_server(dir.path(), &with(&["--port".into(), a.to_string()], &args));
    let _b = redis_server(dir.path(), &with(&["--port".into(), b.to_string()], &args));
    for p in [a, b] {
        wait_cli(&with(&plain(p), &["PING"]), "PONG");
    }
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!("port {s}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {a} 1\n"),
    )
    .unwrap();
    let _sentinel = redis_server(dir.path(), &[conf.to_str().unwrap(), "--sentinel"]);
    wait_cli(
        &with(
            &plain(s),
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
        ),
        &a.to_string(),
    );
    let mock = Mock::start();
    let lines = format!(
        "redis_mode = \"sentinel\"\nredis_nodes = [\"127.0.0.1:{s}\"]\n\
         redis_sentinel_master = \"mymaster\"\nredis_timeout_ms = 2000"
    );
    let tap = Tap::start(
        &mock.url(),
        &ledger(&lines, "[budgets.users.p]\ndaily = { usd = 100 }\n"),
    );
    let call = || {
        let r = post_chat(
            tap.addr,
            &[],
            &chat_body(MODEL, "p", false, r#","max_tokens":5"#),
        );
        assert_eq!(r.status, 200);
    };
    call();
    wait_cli(&with(&plain(a), &["KEYS", "*user:p*"]), "user:p");

    // The Sentinels now name b; a goes on answering and taking writes.
    cli(&with(&plain(s), &["SENTINEL", "REMOVE", "mymaster"])).unwrap();
    let bp = b.to_string();
    cli(&with(
        &plain(s),
        &["SENTINEL", "MONITOR", "mymaster", "127.0.0.1", &bp, "1"],
    ))
    .unwrap();
    let start = Instant::now();
    loop {
        call();
        if cli(&with(&plain(b), &["KEYS", "*user:p*"])).is_some_and(|k| k.contains("user:p")) {
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "tokentap stayed with the master the Sentinels no longer name"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // From now on, b: a call adds to b's counter and not to a's.
    let sum = |port: u16| -> u64 {
        let keys = cli(&with(&plain(port), &["KEYS", "*user:p:daily:*"])).unwrap_or_default();
        keys.lines()
            .filter(|k| !k.is_empty() && !k.ends_with(":leases"))
            .map(|k| {
                cli(&with(&plain(port), &["HGET", k, "sp"]))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    };
    let settled = |port: u16, want: u64| {
        let start = Instant::now();
        while sum(port) != want {
            assert!(
                start.elapsed() < PATIENCE,
                "{port}: {} not {want}",
                sum(port)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let real = PROMPT_TOKENS * IN + 5 * OUT;
    let (on_a, on_b) = (sum(a), sum(b));
    settled(b, on_b.max(real));
    let on_b = sum(b);
    call();
    settled(b, on_b + real);
    assert_eq!(sum(a), on_a);
}
