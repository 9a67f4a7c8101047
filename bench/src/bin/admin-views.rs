//! The admin page's views on a big embedded ledger (issue 23: each view's query under 200 ms
//! on 1,000,000 calls over 90 days).
//!
//! 1. Writes the ledger through tokentap's own ledger code (the rows and their rollups, as
//!    the proxy writes them): `--calls` calls (1,000,000) spread over the last 90 days, of
//!    1,000 users in 10 teams, 5 models; each user also holds today's default daily cap.
//! 2. Starts the real `tokentap` binary on it and times every view's endpoint over HTTP
//!    (`--runs` times each, after one warm-up), answers included.
//! 3. Times the same questions answered from the call rows instead of the rollups (the
//!    baseline: what the views would cost without them).
//!
//! Prints a Markdown table (for docs/benchmarks.md). Usage:
//! `admin-views [--calls N] [--runs N] [--tokentap target/release/tokentap] [--keep DIR]`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokentap::budget::embedded::Embedded;
use tokentap::budget::policy::{BudgetPolicy, LedgerConfig, Zone};
use tokentap::budget::{Amount, CallRow, Ledger};

const USERS: u64 = 1000;
const TEAMS: u64 = 10;
const MODELS: [&str; 5] = ["gpt-4o", "gpt-4o-mini", "claude-sonnet", "o3", "search-pro"];

struct Args {
    calls: u64,
    runs: usize,
    tokentap: PathBuf,
    keep: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        calls: 1_000_000,
        runs: 20,
        tokentap: PathBuf::from("target/release/tokentap"),
        keep: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--calls" => a.calls = v.parse().expect("--calls N"),
            "--runs" => a.runs = v.parse().expect("--runs N"),
            "--tokentap" => a.tokentap = v.into(),
            "--keep" => a.keep = Some(v.into()),
            _ => panic!("unknown argument {k}"),
        }
    }
    a
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn user_of(i: u64) -> u64 {
    // Some users call far more than others (a few heavy ones, a long tail).
    let r = (i.wrapping_mul(2_654_435_761)) % 1_000_000;
    (r * r / 1_000_000) * USERS / 1_000_000
}

/// Writes `calls` calls over the last 90 days, through the ledger's own write path.
fn write_ledger(dir: &Path, calls: u64, policy: &BudgetPolicy) -> Duration {
    let cfg = LedgerConfig {
        path: dir.join("ledger.db"),
        flush_interval: Duration::from_secs(3600),
        retention_days: 0,
        ..LedgerConfig::default()
    };
    let ledger: Arc<Embedded> = Embedded::open_in(&cfg, Zone::utc()).expect("ledger");
    let start = Instant::now();
    let end = now();
    let span = 90 * 86_400 - 60;
    for i in 0..calls {
        let u = user_of(i);
        let model = MODELS[(i % 5) as usize];
        let prompt = 200 + (i * 37) % 4000;
        let completion = 50 + (i * 13) % 800;
        let ok = i % 50 != 0;
        ledger.record_call(CallRow {
            ts: end - span + (i * span as u64 / calls) as i64,
            request_id: format!("tt-bench-{i}"),
            user: Some(format!("user-{u}")),
            teams: vec![format!("team-{}", u % TEAMS)],
            model: Some(model.to_string()),
            api: Some(tokentap::meter::Api::ALL[(i % 3) as usize]),
            usage: tokentap::meter::Usage {
                prompt,
                completion,
                cached: prompt / 4,
                reasoning: if model == "o3" { completion / 2 } else { 0 },
                web_searches: u64::from(model == "search-pro"),
                ..Default::default()
            },
            cost_pico: Some(prompt * 2_500_000 + completion * 10_000_000),
            estimated: i % 97 == 0,
            outcome: if ok { "complete" } else { "upstream_error" },
            status: if ok { 200 } else { 502 },
            duration_ms: Some(300 + i % 5000),
            usage_source: if i % 97 == 0 { "estimated" } else { "reported" },
        });
        if i % 20_000 == 19_999 {
            ledger.flush();
        }
    }
    ledger.flush();
    let took = start.elapsed();
    // Today's spend of every user under the default daily cap (the budgets view's rows).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for u in 0..USERS {
        let user = format!("user-{u}");
        let r = rt
            .block_on(ledger.reserve(policy, &user, Amount { pico: 1, tokens: 1 }, now()))
            .expect("ledger up")
            .expect("under the cap");
        ledger.settle(
            &r,
            Amount {
                pico: 1_000_000 * (u + 1),
                tokens: 10,
            },
            now(),
        );
    }
    ledger.flush();
    took
}

const CONFIG_CAPS: &str = "[budgets.default]\ndaily = { usd = 5.00, soft_usd = 4.00 }\n";

fn teams_toml() -> String {
    let mut s = String::new();
    for t in 0..TEAMS {
        let members: Vec<String> = (0..USERS)
            .filter(|u| u % TEAMS == t)
            .map(|u| format!("\"user-{u}\""))
            .collect();
        s.push_str(&format!(
            "[budgets.teams.team-{t}]\nmembers = [{}]\ncaps = {{ monthly = {{ usd = 1000.00 }} }}\n",
            members.join(", ")
        ));
    }
    s
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(addr: SocketAddr, path: &str) -> (u16, usize) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(buf.len(), |p| p + 4);
    let status = std::str::from_utf8(&buf[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, buf.len() - head_end)
}

fn stats(mut ms: Vec<f64>) -> (f64, f64, f64) {
    ms.sort_by(f64::total_cmp);
    let p = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    (p(0.5), p(0.95), ms[ms.len() - 1])
}

fn main() {
    let a = args();
    let tmp = std::env::temp_dir().join(format!("tokentap-admin-views-{}", std::process::id()));
    let dir = a.keep.clone().unwrap_or(tmp);
    std::fs::create_dir_all(&dir).unwrap();
    let (port, admin) = (free_port(), free_port());
    std::fs::write(
        dir.join("tokentap.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             [upstream]\nurl = \"http://127.0.0.1:9\"\n[access_log]\npath = \"-\"\n\
             [budgets]\n{CONFIG_CAPS}{}\n[budgets.ledger]\npath = \"ledger.db\"\nretention_days = 0\n",
            teams_toml()
        )
        .replace("[budgets]\n[budgets.default]", "[budgets.default]"),
    )
    .unwrap();
    let policy = tokentap::config::load(&dir.join("tokentap.toml"))
        .expect("the benchmark's config")
        .budgets;
    let fresh = !dir.join("ledger.db").exists();
    if fresh {
        eprintln!("writing {} calls …", a.calls);
        let took = write_ledger(&dir, a.calls, &policy);
        println!(
            "Wrote {} calls through the ledger's write path (rows and rollups) in {:.1} s \
             ({:.1} µs a call); file {} MB.\n",
            a.calls,
            took.as_secs_f64(),
            took.as_secs_f64() * 1e6 / a.calls as f64,
            std::fs::metadata(dir.join("ledger.db")).map_or(0, |m| m.len() / 1_000_000)
        );
    }
    let child = Command::new(&a.tokentap)
        .args(["serve", "--config"])
        .arg(dir.join("tokentap.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (build it: cargo build --release)",
                a.tokentap.display()
            )
        });
    let _tap = Proc(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let start = Instant::now();
    while TcpStream::connect(addr).is_err() || get(addr, "/readyz").0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "tokentap did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let page2 = {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET /admin/api/users/user-3/calls?limit=50 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut b = String::new();
        s.read_to_string(&mut b).unwrap();
        let next = b
            .split("\"next\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next());
        format!(
            "/admin/api/users/user-3/calls?limit=50&before={}",
            next.unwrap_or("")
        )
    };
    let today = chrono_today();
    let views: Vec<(&str, String)> = vec![
        ("Overview (top of the month)", "/admin/api/overview".into()),
        (
            "Overview (top of today)",
            "/admin/api/overview?top=today".into(),
        ),
        ("Budgets (1,010 caps)", "/admin/api/budgets".into()),
        ("Budgets, filtered", "/admin/api/budgets?q=user-99".into()),
        (
            "User (heaviest: caps, 30 days per model)",
            "/admin/api/users/user-0".into(),
        ),
        (
            "User's calls, first page",
            "/admin/api/users/user-3/calls?limit=50".into(),
        ),
        ("User's calls, second page", page2),
        ("Team (30 days per model)", "/admin/api/teams/team-3".into()),
        (
            "Team's calls, first page",
            "/admin/api/teams/team-3/calls?limit=50".into(),
        ),
        ("Live", "/admin/api/live".into()),
        (
            "Status (with upstream errors in 5 min)",
            "/admin/api/status".into(),
        ),
        (
            "Export: 90 days by user (CSV)",
            format!(
                "/admin/api/spend?from={}&to={today}&by=user",
                today - chrono::Days::new(89)
            ),
        ),
        (
            "Export: 30 days by team (CSV)",
            format!(
                "/admin/api/spend?from={}&to={today}&by=team",
                today - chrono::Days::new(29)
            ),
        ),
    ];
    println!(
        "| view | endpoint | median ms | p95 ms | max ms | answer bytes |\n|---|---|---:|---:|---:|---:|"
    );
    for (name, path) in &views {
        let (status, bytes) = get(addr, path);
        assert_eq!(status, 200, "{path}");
        let ms: Vec<f64> = (0..a.runs)
            .map(|_| {
                let t = Instant::now();
                get(addr, path);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        let (p50, p95, max) = stats(ms);
        println!(
            "| {name} | `{}` | {p50:.1} | {p95:.1} | {max:.1} | {bytes} |",
            path.split('?').next().unwrap_or(path)
        );
    }
    drop(_tap);
    baseline(&dir.join("ledger.db"), a.runs.min(5));
    if a.keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn chrono_today() -> chrono::NaiveDate {
    chrono::Utc::now().date_naive()
}

/// The same questions from the call rows (no rollups): the month's totals and top users,
/// and 90 days per day.
fn baseline(db: &Path, runs: usize) {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let month = now() - 30 * 86_400;
    let ninety = now() - 90 * 86_400;
    let queries = [
        (
            "month's totals, from the rows",
            format!("SELECT COUNT(*), SUM(prompt), SUM(completion), SUM(cost_pico) FROM calls WHERE ts >= {month}"),
            format!("SELECT SUM(n), SUM(p), SUM(c), SUM(cost) FROM roll_quarter WHERE q >= {}", month / 900),
        ),
        (
            "30 days' top 10 users (the overview's on a month's last day), from the rows",
            format!("SELECT user, SUM(cost_pico) s FROM calls WHERE ts >= {month} GROUP BY user ORDER BY s DESC LIMIT 10"),
            format!("SELECT user, SUM(cost) s FROM roll_user_day WHERE day >= {} GROUP BY user ORDER BY s DESC LIMIT 10", day_number(month)),
        ),
        (
            "90 days, per day, from the rows",
            format!("SELECT ts / 86400, SUM(cost_pico) FROM calls WHERE ts >= {ninety} GROUP BY 1"),
            format!("SELECT q / 96, SUM(cost) FROM roll_quarter WHERE q >= {} GROUP BY 1", ninety / 900),
        ),
    ];
    println!(
        "\n| question | from the call rows, ms | from the rollups, ms | ratio |\n|---|---:|---:|---:|"
    );
    for (name, rows, roll) in queries {
        let time = |sql: &str| -> f64 {
            let mut ms: Vec<f64> = (0..runs)
                .map(|_| {
                    let t = Instant::now();
                    let mut q = c.prepare(sql).unwrap();
                    let n = q.query_map([], |_| Ok(())).unwrap().count();
                    assert!(n > 0);
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            ms.sort_by(f64::total_cmp);
            ms[ms.len() / 2]
        };
        let (r, o) = (time(&rows), time(&roll));
        println!(
            "| {} | {r:.1} | {o:.1} | {:.0}× |",
            name.trim_end_matches(", from the rows"),
            r / o
        );
    }
}

fn day_number(t: i64) -> i64 {
    use chrono::Datelike;
    i64::from(
        chrono::DateTime::from_timestamp(t, 0)
            .unwrap()
            .date_naive()
            .num_days_from_ce(),
    )
}
