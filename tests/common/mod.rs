//! Test harness: starts the real `tokentap` and `tokentap-mock` binaries on free loopback
//! ports, talks raw HTTP/1.1 to them (so bytes can be compared exactly), and reads the access
//! log and the mock's request log. Every process is killed when its handle drops.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// How long a test waits for something that must happen (a process to listen, a record to be
/// written). Waiting is bounded; nothing asserts on how long it took.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// An exact decimal USD value (a record's `cost_usd`, an API's `spent_usd`) in pico-USD.
pub fn pico_of_usd(v: &Value) -> u64 {
    let s = match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    if s.contains(['e', 'E']) {
        // A tiny amount read back as a float (`1e-7`): exact enough at twelve decimals.
        return (s.parse::<f64>().unwrap() * 1e12).round() as u64;
    }
    let (i, f) = s.split_once('.').unwrap_or((&s, ""));
    i.parse::<u64>().unwrap() * 1_000_000_000_000 + format!("{f:0<12}").parse::<u64>().unwrap()
}

/// A record's cost in pico-USD.
pub fn pico_of(record: &Value) -> u64 {
    pico_of_usd(&record["cost_usd"])
}

/// Pico-USD as an exact decimal string for a config.
pub fn usd(pico: u64) -> String {
    format!(
        "{}.{:012}",
        pico / 1_000_000_000_000,
        pico % 1_000_000_000_000
    )
}

pub fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Proc {
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// Sends a signal ("STOP", "CONT", "KILL", ...).
    pub fn signal(&self, sig: &str) {
        unsafe_kill(self.child.id(), sig);
    }
    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe_kill(self.child.id(), "TERM");
        self.child.wait().unwrap()
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

pub struct Mock {
    _proc: Proc,
    pub addr: SocketAddr,
    /// Where the control paths (`/__mock/*`) answer in plain HTTP.
    control: SocketAddr,
}

impl Mock {
    pub fn start() -> Mock {
        Self::start_with(&[])
    }

    /// An HTTPS mock serving `cert`/`key` (PEM files).
    pub fn start_tls(cert: &Path, key: &Path) -> Mock {
        Self::start_with(&[
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
        ])
    }

    fn start_with(extra: &[&std::ffi::OsStr]) -> Mock {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tokentap-mock"))
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tokentap-mock");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut read_addr = || -> SocketAddr {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            line.trim()
                .rsplit(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("mock said {line:?}"))
        };
        let addr = read_addr();
        let control = if extra.is_empty() { addr } else { read_addr() };
        Mock {
            _proc: Proc { child },
            addr,
            control,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The mock's request log.
    pub fn requests(&self) -> Vec<Value> {
        let r = request(self.control, "GET", "/__mock/requests", &[], b"");
        serde_json::from_slice::<Value>(&r.body)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// How many requests the mock has read (answered or not).
    pub fn received(&self) -> u64 {
        let r = request(self.control, "GET", "/__mock/received", &[], b"");
        String::from_utf8_lossy(&r.body).trim().parse().unwrap()
    }

    /// Waits until the mock has logged `n` requests, and returns them.
    pub fn wait_requests(&self, n: usize) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let r = self.requests();
            if r.len() >= n || start.elapsed() > PATIENCE {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub struct Tap {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    pub config: PathBuf,
    /// The config text it started with.
    pub text: String,
}

/// Pricing used by the tests: one model priced with every field.
pub const TEST_PRICING: &str = r#"
[pricing]
unknown_model = "unpriced"
[pricing.models."anthropic/claude-opus-4.6"]
input_per_mtok = 5
cached_input_per_mtok = 0.5
output_per_mtok = 25
per_web_search = 0.005
"#;

/// Builds a tokentap config around an upstream URL and starts the binary.
pub struct TapBuilder {
    upstream: String,
    upstream_extra: String,
    extra: String,
    read_timeout_ms: u64,
    k8s: bool,
    dir: Option<tempfile::TempDir>,
    env: Vec<(String, String)>,
    server_extra: String,
    /// tokentap's log (stderr) goes to `tokentap.stderr` in its directory.
    log_to_file: bool,
    /// A command that runs tokentap (its command line follows this one's).
    wrapper: Vec<String>,
}

impl TapBuilder {
    pub fn new(upstream: &str) -> Self {
        TapBuilder {
            upstream: upstream.to_string(),
            upstream_extra: String::new(),
            extra: String::new(),
            read_timeout_ms: 10_000,
            k8s: false,
            dir: None,
            env: Vec::new(),
            server_extra: String::new(),
            log_to_file: false,
            wrapper: Vec::new(),
        }
    }

    /// Runs tokentap through `cmd` (e.g. `unshare`, then tokentap's command line; the wrapper
    /// must `exec` it, so that the process started is tokentap).
    pub fn wrapper(mut self, cmd: &[&str]) -> Self {
        self.wrapper = cmd.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Lines added to the `[server]` table, then start.
    pub fn start_with_server_extra(mut self, lines: &str) -> Tap {
        self.server_extra = lines.to_string();
        self.start()
    }

    /// Sends tokentap's log to `tokentap.stderr` in its directory (to read it back).
    pub fn log_to_file(mut self) -> Self {
        self.log_to_file = true;
        self
    }

    /// An environment variable for the tokentap process.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// Runs in this directory (e.g. a stopped tokentap's, to reuse its ledger and log).
    pub fn in_dir(mut self, dir: tempfile::TempDir) -> Self {
        self.dir = Some(dir);
        self
    }

    /// Lays the config out like a mounted Kubernetes ConfigMap: `tokentap.toml` is a symlink
    /// to `..data/tokentap.toml`, and `..data` a symlink to a versioned directory.
    pub fn k8s_layout(mut self) -> Self {
        self.k8s = true;
        self
    }

    pub fn read_timeout_ms(mut self, ms: u64) -> Self {
        self.read_timeout_ms = ms;
        self
    }

    /// Lines added to the `[upstream]` table.
    pub fn upstream_extra(mut self, lines: &str) -> Self {
        self.upstream_extra = lines.to_string();
        self
    }

    /// Tables appended to the config.
    pub fn extra(mut self, text: &str) -> Self {
        self.extra = text.to_string();
        self
    }

    pub fn start(mut self) -> Tap {
        // A free port can be taken by another test between picking it and binding it: then
        // this tokentap exits (or another answers), and it is started again on new ports.
        let mut dir = self.dir.take();
        for _ in 0..5 {
            let d = dir.take().unwrap_or_else(|| tempfile::tempdir().unwrap());
            match self.try_start(d) {
                Ok(tap) => return tap,
                Err(d) => dir = Some(d),
            }
        }
        panic!("tokentap did not start on free ports five times");
    }

    fn try_start(&self, dir: tempfile::TempDir) -> Result<Tap, tempfile::TempDir> {
        let port = free_port();
        let admin_port = free_port();
        let log = dir.path().join("access.log");
        let config = dir.path().join("tokentap.toml");
        let TapBuilder {
            upstream,
            upstream_extra,
            extra,
            read_timeout_ms,
            k8s,
            dir: _,
            env,
            server_extra,
            log_to_file,
            wrapper,
        } = self;
        let drain = if server_extra.contains("drain_timeout_ms") {
            ""
        } else {
            "drain_timeout_ms = 10000"
        };
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
threads = 2
{drain}
{server_extra}
[upstream]
url = "{upstream}"
connect_timeout_ms = 2000
read_timeout_ms = {read_timeout_ms}
{upstream_extra}

[access_log]
path = "access.log"
{extra}
"#
        );
        if *k8s && !dir.path().join("..v1").exists() {
            let v1 = dir.path().join("..v1");
            std::fs::create_dir(&v1).unwrap();
            std::fs::write(v1.join("tokentap.toml"), &text).unwrap();
            std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
            std::os::unix::fs::symlink("..data/tokentap.toml", &config).unwrap();
        } else {
            std::fs::write(&config, &text).unwrap();
        }
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(env!("CARGO_BIN_EXE_tokentap"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_tokentap")),
        };
        // Hermetic: an OTEL_* variable of the runner's must not turn on traces here.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("OTEL_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(if *log_to_file {
                Stdio::from(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.path().join("tokentap.stderr"))
                        .unwrap(),
                )
            } else {
                Stdio::inherit()
            })
            .spawn()
            .expect("start tokentap");
        let mut tap = Tap {
            proc: Proc { child },
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            dir,
            log,
            config,
            text,
        };
        let me = format!("pid={} ", tap.proc.pid());
        let start = Instant::now();
        loop {
            if tap.proc.child.try_wait().unwrap().is_some() {
                return Err(tap.into_dir());
            }
            if let Some(ready) = probe(tap.admin, "/readyz") {
                if !String::from_utf8_lossy(&ready.body).contains(&me) {
                    return Err(tap.into_dir()); // another process holds the admin port
                }
                // Ours, not another process's on the port picked for this one (this one would
                // then fail to bind it and exit, which the check above sees).
                if owns_listener(tap.proc.pid(), port) {
                    break;
                }
            }
            assert!(
                start.elapsed() < PATIENCE,
                "tokentap did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(tap)
    }
}

impl Tap {
    /// Stops the process and hands back its directory.
    pub fn into_dir(self) -> tempfile::TempDir {
        let Tap { proc, dir, .. } = self;
        drop(proc);
        dir
    }

    /// Starts tokentap in front of `upstream` with extra config tables appended.
    pub fn start(upstream: &str, extra: &str) -> Tap {
        TapBuilder::new(upstream).extra(extra).start()
    }

    pub fn records(&self) -> Vec<Value> {
        read_records(&self.log)
    }

    /// `user`'s spent and reserved pico-USD in their first budget window, as the admin API
    /// reads them from the ledger.
    pub fn window_spend(&self, user: &str) -> (u64, u64) {
        let v = request(
            self.admin,
            "GET",
            &format!("/admin/budgets/users/{user}"),
            &[],
            b"",
        )
        .json();
        let w = &v["windows"][0];
        (
            pico_of_usd(&w["spent_usd"]),
            pico_of_usd(&w["reserved_usd"]),
        )
    }

    /// The hash of the running config (`GET /admin/config`).
    pub fn config_hash(&self) -> String {
        let r = request(self.admin, "GET", "/admin/config", &[], b"");
        r.json()["hash"].as_str().unwrap().to_string()
    }

    /// Waits until the running config's hash differs from `old`; returns the new one.
    pub fn wait_config_change(&self, old: &str) -> String {
        let start = Instant::now();
        loop {
            let h = self.config_hash();
            if h != old {
                return h;
            }
            assert!(start.elapsed() < PATIENCE, "the config was not reloaded");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `POST /admin/reload`.
    pub fn reload(&self) -> Resp {
        request(self.admin, "POST", "/admin/reload", &[], b"")
    }

    /// A sample's value from `/metrics`, e.g. `tokentap_config_reloads_total{result="error"}`.
    pub fn metric(&self, series: &str) -> f64 {
        let r = request(self.admin, "GET", "/metrics", &[], b"");
        String::from_utf8_lossy(&r.body)
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0)
    }

    /// Replaces the config file the way editors do: write a temporary file, rename it over.
    pub fn write_config(&self, text: &str) {
        let tmp = self.config.with_extension("toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// Waits until the access log holds `n` records, and returns them.
    pub fn wait_records(&self, n: usize) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let r = self.records();
            if r.len() >= n || start.elapsed() > PATIENCE {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn read_records(path: &Path) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| l.ends_with('}'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad record {l:?}: {e}")))
        .collect()
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body payload (chunked framing removed, content encoding kept).
    pub body: Vec<u8>,
    /// The body ended by its own framing (not by a broken connection).
    pub complete: bool,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// One request on a fresh connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    send_request(&mut s, method, path, headers, body);
    if method == "HEAD" {
        read_response(&mut s, 0)
    } else {
        read_response(&mut s, usize::MAX)
    }
}

/// A chat call (`POST /v1/chat/completions`) on a fresh connection.
pub fn post_chat(addr: SocketAddr, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    request(addr, "POST", CHAT_PATH, headers, body)
}

/// Sends a chat call on `s`; the caller reads the answer.
pub fn send_chat(s: &mut TcpStream, headers: &[(&str, &str)], body: &[u8]) {
    send_request(s, "POST", CHAT_PATH, headers, body)
}

/// A connection for many calls (keep-alive), reads bounded by [`PATIENCE`].
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s
}

/// One chat call on an open connection: sent, and its answer read.
pub fn chat_on(s: &mut TcpStream, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    send_chat(s, headers, body);
    read_response(s, usize::MAX)
}

/// `n` chat calls let go at the same moment (a barrier), one a thread, call `i` to `addr(i)`;
/// their answers, in order.
pub fn chats_at_once(
    n: usize,
    addr: impl Fn(usize) -> SocketAddr,
    headers: &'static [(&'static str, &'static str)],
    body: &[u8],
) -> Vec<Resp> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (a, barrier, body) = (addr(i), std::sync::Arc::clone(&barrier), body.to_vec());
            std::thread::spawn(move || {
                barrier.wait();
                post_chat(a, headers, &body)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// The Chat Completions endpoint.
pub const CHAT_PATH: &str = "/v1/chat/completions";

pub fn send_request(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
    {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let _ = s.set_nodelay(true);
    // One write for head and body (two small writes would meet Nagle and delayed ACKs). A
    // write can fail when the server answered early (e.g. 413) and closed.
    let mut msg = head.into_bytes();
    msg.extend_from_slice(body);
    let _ = s.write_all(&msg);
}

/// A connection to whatever listens on `addr`, or `None`. A bare successful connect proves
/// nothing: a connect to a loopback port in the ephemeral range that nobody listens on can,
/// rarely, pick that same port as its source and connect the socket to itself (TCP
/// simultaneous open). Such a connection is refused here.
fn connect_listener(addr: SocketAddr) -> Option<TcpStream> {
    let s = TcpStream::connect(addr).ok()?;
    (s.local_addr().ok()? != s.peer_addr().ok()?).then_some(s)
}

/// Whether process `pid` holds a listening TCP socket on port `port` (its socket descriptors
/// against `/proc/net/tcp`), so that another process listening on a port picked for this one
/// is not taken for it.
fn owns_listener(pid: u32, port: u16) -> bool {
    let Ok(tcp) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    // Lines: `sl local_address rem_address st ... inode`, the address as `HEXIP:HEXPORT`, the
    // state 0A for LISTEN, the inode the tenth field.
    let inodes: Vec<String> = tcp
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let p = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            let inode = f.get(9)?;
            (p == port && *f.get(3)? == "0A").then(|| format!("socket:[{inode}]"))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

/// `GET path` on a server that may not be up yet (or may be going away): `None` rather than
/// a panic when nothing listens, nothing answers within a short while, or the connection
/// closes before a whole response head.
pub fn probe(addr: SocketAddr, path: &str) -> Option<Resp> {
    let mut s = connect_listener(addr)?;
    // Short: a listener that accepted but does not answer (say, another test's process
    // draining) must not use up the caller's patience in one probe.
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    send_request(&mut s, "GET", path, &[], b"");
    try_read_response(&mut s, usize::MAX).ok()
}

/// Reads one response; stops (incomplete) after `max_body` body bytes. A response that has no
/// body by its status (204, 304), or a `max_body` of 0 (the answer to HEAD), reads none.
pub fn read_response(s: &mut TcpStream, max_body: usize) -> Resp {
    try_read_response(s, max_body).unwrap_or_else(|e| panic!("{e}"))
}

/// [`read_response`], with an error when no complete response head arrives.
pub fn try_read_response(s: &mut TcpStream, max_body: usize) -> Result<Resp, String> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 65536];
    let (status, headers, consumed) = loop {
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut hs);
        let parsed = r
            .parse(&buf)
            .map_err(|e| format!("bad response head: {e}"))?;
        if let httparse::Status::Complete(n) = parsed {
            let status = r.code.unwrap();
            let headers: Vec<(String, String)> = r
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            if (100..200).contains(&status) {
                buf.drain(..n);
                continue;
            }
            break (status, headers, n);
        }
        let n = s.read(&mut tmp).unwrap_or(0);
        if n == 0 {
            return Err("connection closed before a response head".into());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    buf.drain(..consumed);
    if max_body == 0 || status == 204 || status == 304 {
        return Ok(Resp {
            status,
            headers,
            body: Vec::new(),
            complete: true,
        });
    }
    let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let chunked = get("transfer-encoding").is_some_and(|v| v.contains("chunked"));
    let mut body = Vec::new();
    let mut complete = false;
    if chunked {
        // Decode chunks as they come; stop on the last chunk or a broken connection.
        'outer: loop {
            while let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                let size = usize::from_str_radix(String::from_utf8_lossy(&buf[..i]).trim(), 16)
                    .map_err(|e| format!("bad chunk size: {e}"))?;
                if buf.len() < i + 2 + size + 2 {
                    break;
                }
                body.extend_from_slice(&buf[i + 2..i + 2 + size]);
                buf.drain(..i + 2 + size + 2);
                if size == 0 {
                    complete = true;
                    break 'outer;
                }
                if body.len() >= max_body {
                    break 'outer;
                }
            }
            match s.read(&mut tmp) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
    } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body = buf;
        while body.len() < len && body.len() < max_body {
            match s.read(&mut tmp) {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&tmp[..n]),
            }
        }
        complete = body.len() == len;
    } else {
        body = buf;
        loop {
            match s.read(&mut tmp) {
                Ok(0) => {
                    complete = true;
                    break;
                }
                Err(_) => break,
                Ok(n) => body.extend_from_slice(&tmp[..n]),
            }
        }
    }
    Ok(Resp {
        status,
        headers,
        body,
        complete,
    })
}

/// Runs the `tokentap` command line (`args`, then `--config config`) and returns what it
/// printed; it must succeed.
pub fn tokentap_cli(args: &[&str], config: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tokentap"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tokentap {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A chat request body.
pub fn chat_body(model: &str, user: &str, stream: bool, extra: &str) -> Vec<u8> {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"system","content":"Be brief."}},{{"role":"user","content":"Say something about tokens, please."}}],"stream":{stream},"user":"{user}"{extra}}}"#
    )
    .into_bytes()
}

/// Runs tests/sdk/openai_sdk_check.py (the official openai Python SDK, the same calls straight
/// to `mock` and through `tap`); it must pass. Returns what it printed.
pub fn openai_sdk_check(mock: &Mock, tap: &Tap) -> String {
    sdk_script(
        "openai_sdk_check.py",
        "openai",
        &[mock.url(), format!("http://{}", tap.addr)],
    )
}

/// Runs a script of tests/sdk with `args` under the Python scripts/test.sh prepares (with the
/// `modules` it imports); it must pass. Returns what it printed.
pub fn sdk_script(script: &str, modules: &str, args: &[String]) -> String {
    // scripts/test.sh points this at a Python that has the SDKs (installing them if needed).
    let python = std::env::var("TOKENTAP_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "{modules} (Python) missing for {python}: run scripts/test.sh (it installs them)"
    );
    let out = Command::new(&python)
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/sdk")
                .join(script),
        )
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A gzip body inflated (any other as it is).
pub fn inflate(enc: Option<&str>, body: &[u8]) -> Vec<u8> {
    match enc {
        Some("gzip") => {
            let mut d = flate2::write::GzDecoder::new(Vec::new());
            d.write_all(body).unwrap();
            d.finish().unwrap()
        }
        _ => body.to_vec(),
    }
}

pub mod browser;
pub mod dialects;

/// The model priced in [`TEST_PRICING`] that the shared-cap tests call, its prompt's tokens
/// and its prices in pico-USD per token.
pub const CAP_MODEL: &str = "anthropic/claude-opus-4.6";
const CAP_PROMPT_TOKENS: u64 = 14;
const CAP_IN: u64 = 5_000_000;
const CAP_OUT: u64 = 25_000_000;

/// A daily cap of about ten calls (of five output tokens) for the user `greedy`: the cap in
/// pico-USD and its config lines.
pub fn cap_of_ten() -> (u64, String) {
    let real = CAP_PROMPT_TOKENS * CAP_IN + 5 * CAP_OUT;
    let cap = 10 * real;
    (
        cap,
        format!(
            "[budgets.users.greedy]\ndaily = {{ usd = \"{}\" }}\n",
            usd(cap)
        ),
    )
}

/// 64 calls at once of a user whose cap is about ten calls, over `taps`: the cap holds
/// (within one worst case), refused calls never reach the upstream, and each answered call
/// is charged once.
pub fn caps_hold_under_64_concurrent_calls(mock: &Mock, taps: &[&Tap], user: &str, cap: u64) {
    let worst = CAP_PROMPT_TOKENS * CAP_IN + 20 * CAP_OUT;
    let before = mock.received();
    let body = chat_body(CAP_MODEL, user, false, r#","max_tokens":20"#);
    let addrs: Vec<_> = taps.iter().map(|t| t.addr).collect();
    let statuses: Vec<u16> = chats_at_once(
        64,
        |i| addrs[i % addrs.len()],
        &[("x-mock-delay-ms", "100")],
        &body,
    )
    .iter()
    .map(|r| r.status)
    .collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        64 - ok,
        "{statuses:?}"
    );
    assert!(
        (1..=10).contains(&ok),
        "{ok} calls through a cap of about 10"
    );
    assert_eq!(
        mock.received() - before,
        ok as u64,
        "a refused call reached the upstream"
    );
    let n: usize = taps.iter().map(|t| t.records().len()).sum();
    let start = Instant::now();
    while taps.iter().map(|t| t.records().len()).sum::<usize>() < n.max(64) {
        assert!(start.elapsed() < PATIENCE, "records missing");
        std::thread::sleep(Duration::from_millis(20));
    }
    let spent: u64 = taps
        .iter()
        .flat_map(|t| t.records())
        .filter(|r| r["user"] == user && r["status"] == 200)
        .map(|r| pico_of(&r))
        .sum();
    assert!(
        spent <= cap + worst,
        "spent {spent} > cap {cap} + worst {worst}"
    );
    // And the shared counter says the same, to the pico-USD.
    let start = Instant::now();
    loop {
        let w = taps[0].window_spend(user);
        if w == (spent, 0) {
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the shared spend and reserve are {w:?}, want {spent}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A rate-limited user's calls: `n` one after the other, call `i` to `addrs[i % len]`; their
/// answers.
pub fn calls_in_turn(addrs: &[SocketAddr], user: &str, n: usize) -> Vec<Resp> {
    let body = chat_body(CAP_MODEL, user, false, r#","max_tokens":20"#);
    (0..n)
        .map(|i| post_chat(addrs[i % addrs.len()], &[], &body))
        .collect()
}

/// Issue 24: a user limited to 5 requests a minute gets exactly 5 calls through, however
/// many replicas they call, and 429 `rate_limit_exceeded` with `Retry-After` for the rest,
/// none of which reaches the upstream.
pub fn five_a_minute_hold(mock: &Mock, taps: &[&Tap], user: &str) {
    let before = mock.received();
    let addrs: Vec<SocketAddr> = taps.iter().map(|t| t.addr).collect();
    let answers = calls_in_turn(&addrs, user, 12);
    let ok: Vec<&Resp> = answers.iter().filter(|r| r.status == 200).collect();
    assert_eq!(
        ok.len(),
        5,
        "{:?}",
        answers.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(
        mock.received() - before,
        5,
        "a refused call reached the upstream"
    );
    // Every answer tells where the caller stands.
    for (i, r) in ok.iter().enumerate() {
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("5"));
        let left = (4 - i).to_string();
        assert_eq!(
            r.header("x-ratelimit-remaining-requests"),
            Some(left.as_str())
        );
        assert!(r
            .header("x-ratelimit-reset-requests")
            .unwrap()
            .ends_with('s'));
    }
    for r in answers.iter().filter(|r| r.status != 200) {
        assert_eq!(r.status, 429);
        let e = r.json();
        assert_eq!(e["error"]["type"], "rate_limit_exceeded", "{e}");
        assert_eq!(e["error"]["code"], "rate_limit_exceeded");
        assert!(e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requests_per_minute"));
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    }
}

/// Issue 24: a tokens-per-minute limit holds under 64 calls at once (spread over `taps`):
/// the calls let through were counted at their worst case, so what they used stays within
/// the limit, and every other call is refused before the upstream.
pub fn tokens_a_minute_hold_under_64_calls(mock: &Mock, taps: &[&Tap], user: &str, limit: u64) {
    let before = mock.received();
    let body = chat_body(CAP_MODEL, user, false, r#","max_tokens":20"#);
    let addrs: Vec<SocketAddr> = taps.iter().map(|t| t.addr).collect();
    let answers = chats_at_once(
        64,
        |i| addrs[i % addrs.len()],
        &[("x-mock-delay-ms", "2000")],
        &body,
    );
    let ok: Vec<&Resp> = answers.iter().filter(|r| r.status == 200).collect();
    assert!(
        !ok.is_empty() && ok.len() < 64,
        "{} of 64 through",
        ok.len()
    );
    assert_eq!(mock.received() - before, ok.len() as u64);
    // The worst case each call was counted at: what the first one let through left.
    let worst = ok
        .iter()
        .map(|r| {
            let left: u64 = r
                .header("x-ratelimit-remaining-tokens")
                .unwrap()
                .parse()
                .unwrap();
            limit - left
        })
        .min()
        .unwrap();
    assert!(
        ok.len() as u64 * worst <= limit,
        "{} calls of {worst} tokens",
        ok.len()
    );
    assert!(
        (ok.len() as u64 + 1) * worst > limit,
        "fewer through than the limit allows"
    );
    for r in answers.iter().filter(|r| r.status != 200) {
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["error"]["type"], "rate_limit_exceeded");
    }
}

/// A webhook receiver on a free loopback port: answers each POST with 500 while `fail` is
/// above zero (counting it down), then 200; keeps the bodies it answered 200 to.
pub struct Hooks {
    pub addr: SocketAddr,
    pub fail: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub attempts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub taken: std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>,
}

impl Hooks {
    pub fn start(fail: usize) -> Hooks {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let fail = std::sync::Arc::new(AtomicUsize::new(fail));
        let attempts = std::sync::Arc::new(AtomicUsize::new(0));
        let taken = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (f, a, t) = (fail.clone(), attempts.clone(), taken.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let (f, a, t) = (f.clone(), a.clone(), t.clone());
                std::thread::spawn(move || {
                    let mut r = BufReader::new(s.try_clone().unwrap());
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                        let mut len = 0usize;
                        loop {
                            let mut h = String::new();
                            if r.read_line(&mut h).unwrap_or(0) == 0 {
                                return;
                            }
                            if h == "\r\n" {
                                break;
                            }
                            if let Some((k, v)) = h.split_once(':') {
                                if k.eq_ignore_ascii_case("content-length") {
                                    len = v.trim().parse().unwrap_or(0);
                                }
                            }
                        }
                        let mut body = vec![0u8; len];
                        r.read_exact(&mut body).unwrap();
                        a.fetch_add(1, Ordering::SeqCst);
                        let failing = f
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        let status = if failing {
                            "500 Internal Server Error"
                        } else {
                            "200 OK"
                        };
                        if !failing {
                            let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            t.lock().unwrap().push((path, v));
                        }
                        let _ = write!(s, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                    }
                });
            }
        });
        Hooks {
            addr,
            fail,
            attempts,
            taken,
        }
    }

    /// What was taken on `path`.
    pub fn taken(&self, path: &str) -> Vec<Value> {
        self.taken
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Waits until `path` has taken `n` POSTs; returns them.
    pub fn wait(&self, path: &str, n: usize) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let t = self.taken(path);
            if t.len() >= n {
                return t;
            }
            assert!(
                start.elapsed() < PATIENCE * 2,
                "{path} took {} of {n}: {t:?}",
                t.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The config of budget alerts to `hooks` (generic on /hook, Slack's on /slack).
pub fn alerts_config(hooks: &Hooks, thresholds: &str) -> String {
    format!(
        "[budgets.alerts]\nthresholds = {thresholds}\nwebhooks = [{{ url = \"http://{0}/hook\" }}, \
         {{ url = \"http://{0}/slack\", format = \"slack\" }}]\n",
        hooks.addr
    )
}

/// Calls of `user` through `addrs` in turn until one is refused (429); how many went.
///
/// A refusal only for the caller's calls still in flight (the previous call settles just
/// after its answer reached the client) is asked again until it is a refusal for what was
/// spent.
pub fn calls_until_refused(addrs: &[SocketAddr], user: &str) -> usize {
    let body = chat_body(CAP_MODEL, user, false, r#","max_tokens":20"#);
    let mut went = 0;
    let start = Instant::now();
    for i in 0..400 {
        let r = post_chat(addrs[i % addrs.len()], &[], &body);
        if r.status == 429 {
            let msg = r.json()["error"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if !msg.contains("in flight") {
                return went;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "only ever refused for calls in flight"
            );
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        assert_eq!(r.status, 200);
        went += 1;
    }
    panic!("never refused");
}

/// The thresholds of the generic alerts taken, sorted.
pub fn thresholds_of(alerts: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = alerts
        .iter()
        .map(|a| a["threshold"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// Issues a virtual key for `user` (`tokentap keys create`) and waits until the running
/// tokentap has it (the keys file is config: it reloads on its own); returns (key, id).
pub fn issue_key(tap: &Tap, user: &str) -> (String, String) {
    let old = tap.config_hash();
    let out = tokentap_cli(&["keys", "create", "--user", user], &tap.config);
    let key = out.lines().next().unwrap().trim().to_string();
    assert!(key.starts_with("tt-"), "{out}");
    let id = out
        .split("(key ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_string();
    tap.wait_config_change(&old);
    (key, id)
}

/// Waits until the admin page's live view of `tap` shows calls for which `done` holds (the
/// calls in flight, as `/admin/api/live` lists them); returns them.
pub fn wait_live(tap: &Tap, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let live = request(tap.admin, "GET", "/admin/api/live", &[], b"").json();
        let calls = live["calls"].as_array().cloned().unwrap_or_default();
        if done(&calls) {
            return calls;
        }
        assert!(start.elapsed() < PATIENCE, "never {what}: {live}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
