//! The JSON-lines access log: one line per call with who, what, how it ended, tokens, cost and
//! timings. Never an API key, never prompt or completion text.
//!
//! Records are queued to a dedicated writer thread that serializes and writes them in batches,
//! every [`TICK`] (or as soon as [`BATCH`] records wait), flushing after each batch; a full
//! queue drops (and counts) rather than stall requests. The writer is never woken per record
//! (see [`super::wake`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, UNIX_EPOCH};

use serde::Deserialize;

use super::wake::LazyWake;
use super::Sink;
use crate::meter::UsageRecord;

const QUEUE: usize = 65_536;
/// How long a record may wait for the writer, at most.
const TICK: Duration = Duration::from_millis(50);
/// Records that wake the writer before its tick.
const BATCH: usize = QUEUE / 8;

enum Msg {
    Record(Arc<UsageRecord>),
    /// Look at `reopen` (sent without blocking: a full queue means the writer is busy and
    /// looks anyway).
    Wake,
    Stop,
}

/// A new output for the writer, left here by a reload (never queued behind records, so a
/// stuck output cannot hold up a reload).
type Reopen = Arc<Mutex<Option<Box<dyn Write + Send>>>>;

pub struct AccessLog {
    tx: SyncSender<Msg>,
    wake: Arc<LazyWake>,
    reopen: Reopen,
    /// `access_log.enabled` of the running config.
    enabled: AtomicBool,
    target: Mutex<Option<AccessLogTarget>>,
    stopped: AtomicBool,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// Records not written: the queue was full, or the log was already shut down.
    pub dropped: Arc<AtomicU64>,
    /// Records (or flushes) the output refused, e.g. a full disk or a closed pipe.
    pub write_errors: Arc<AtomicU64>,
}

fn open_target(target: &AccessLogTarget) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(match target {
        AccessLogTarget::Stdout => Box::new(std::io::stdout()),
        AccessLogTarget::File(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| {
                    std::io::Error::new(e.kind(), format!("access log {}: {e}", p.display()))
                })?,
        ),
    })
}

impl AccessLog {
    /// The access log as configured: its output is opened now when enabled (so a bad path
    /// stops start-up), or when a reload enables it.
    pub fn new(cfg: &crate::config::AccessLogConfig) -> std::io::Result<Self> {
        let (out, target): (Box<dyn Write + Send>, _) = if cfg.enabled {
            (open_target(&cfg.target)?, Some(cfg.target.clone()))
        } else {
            (Box::new(std::io::sink()), None)
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let write_errors = Arc::new(AtomicU64::new(0));
        let errors = Arc::clone(&write_errors);
        let reopen: Reopen = Arc::default();
        let slot = Arc::clone(&reopen);
        let wake = Arc::new(LazyWake::new(BATCH));
        let w = Arc::clone(&wake);
        let worker = std::thread::Builder::new()
            .name("tokentap-access-log".into())
            .spawn(move || {
                super::wake::lower_priority();
                write_loop(rx, &w, out, &slot, &errors)
            })?;
        wake.set_worker(worker.thread().clone());
        Ok(AccessLog {
            tx,
            wake,
            reopen,
            enabled: AtomicBool::new(cfg.enabled),
            target: Mutex::new(target),
            stopped: AtomicBool::new(false),
            worker: Mutex::new(Some(worker)),
            dropped: Arc::new(AtomicU64::new(0)),
            write_errors,
        })
    }

    fn drop_one(&self, why: &str) {
        if self
            .dropped
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(10_000)
        {
            log::warn!("access log: dropping records ({why})");
        }
    }
}

impl Sink for AccessLog {
    fn record(&self, rec: &Arc<UsageRecord>) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        if self.stopped.load(Ordering::Acquire) {
            return self.drop_one("already shut down");
        }
        match self.tx.try_send(Msg::Record(Arc::clone(rec))) {
            Ok(()) => self.wake.queued(),
            Err(TrySendError::Full(_)) => self.drop_one("queue full: the output is too slow"),
            Err(TrySendError::Disconnected(_)) => self.drop_one("writer stopped"),
        }
    }

    fn reconfigure(&self, cfg: &crate::config::Config) {
        let want = &cfg.access_log;
        let mut target = self.target.lock().unwrap_or_else(|p| p.into_inner());
        if want.enabled && target.as_ref() != Some(&want.target) {
            match open_target(&want.target) {
                Ok(out) => {
                    *self.reopen.lock().unwrap_or_else(|p| p.into_inner()) = Some(out);
                    let _ = self.tx.try_send(Msg::Wake);
                    self.wake.now();
                    *target = Some(want.target.clone());
                }
                Err(e) => {
                    // Keep writing where it was: losing records is worse than a stale path.
                    log::error!("access log: {e}; still writing to the previous output");
                }
            }
        }
        self.enabled
            .store(want.enabled && target.is_some(), Ordering::Relaxed);
    }

    fn shutdown(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        self.wake.now();
        let _ = self.tx.send(Msg::Stop);
        self.wake.now();
        if let Some(w) = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = w.join();
        }
    }
}

/// Writes records in batches: each tick (or wake-up), everything queued, then one flush. A
/// failing output is reported and counted, and writing goes on (a full disk may free up).
fn write_loop(
    rx: Receiver<Msg>,
    wake: &LazyWake,
    out: Box<dyn Write + Send>,
    reopen: &Reopen,
    errors: &AtomicU64,
) {
    let mut line = Vec::with_capacity(1024);
    let failed = |e: std::io::Error| {
        if errors
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(10_000)
        {
            log::error!("access log: cannot write: {e}");
        }
    };
    let mut buffered = std::io::BufWriter::with_capacity(64 * 1024, out);
    loop {
        wake.wait(TICK);
        // A new output (a reload) takes the records queued after it.
        let swap = |buffered: &mut std::io::BufWriter<Box<dyn Write + Send>>| {
            if let Some(new) = reopen.lock().unwrap_or_else(|p| p.into_inner()).take() {
                if let Err(e) = buffered.flush() {
                    failed(e);
                }
                *buffered = std::io::BufWriter::with_capacity(64 * 1024, new);
            }
        };
        swap(&mut buffered);
        let mut wrote = false;
        loop {
            let rec = match rx.try_recv() {
                Ok(Msg::Record(rec)) => rec,
                Ok(Msg::Wake) => {
                    swap(&mut buffered);
                    continue;
                }
                Ok(Msg::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                    if let Err(e) = buffered.flush() {
                        failed(e);
                    }
                    return;
                }
                Err(mpsc::TryRecvError::Empty) => break,
            };
            line.clear();
            write_line(&mut line, &rec);
            line.push(b'\n');
            if let Err(e) = buffered.write_all(&line) {
                failed(e);
            }
            wrote = true;
        }
        if wrote {
            if let Err(e) = buffered.flush() {
                failed(e);
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The call's start, in seconds since the epoch, to the microsecond.
fn ts(r: &UsageRecord) -> f64 {
    let ts = r
        .started_at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    (ts * 1e6).round() / 1e6
}

/// Appends the call's line (no newline) to `out`. Field names and order are part of
/// tokentap's interface: add, never rename. The bytes are those serde_json writes for the same
/// fields (a property test holds the two equal), written by hand because serde_json escapes
/// every key and string value a byte at a time: with serde this thread spent ~10.5k
/// instructions a line, half of them in that loop.
fn write_line(out: &mut Vec<u8>, r: &UsageRecord) {
    let mut j = JsonOut(out);
    j.raw(b"{\"ts\":");
    j.f64(ts(r));
    j.key(b"request_id");
    j.str(&r.request_id);
    j.key(b"method");
    j.str(&r.method);
    j.key(b"path");
    j.str(&r.path);
    j.key(b"api");
    j.opt_str(r.api.map(crate::meter::Api::as_str));
    j.key(b"user");
    j.opt_str(r.user.as_deref());
    j.key(b"model");
    j.opt_str(r.model.as_deref());
    j.key(b"provider");
    j.opt_str(r.provider.as_deref());
    j.key(b"response_model");
    j.opt_str(r.response_model.as_deref());
    j.key(b"response_id");
    j.opt_str(r.response_id.as_deref());
    j.key(b"stream");
    j.bool(r.stream);
    j.key(b"status");
    j.u64(u64::from(r.status));
    j.key(b"outcome");
    j.str(r.outcome.as_str());
    j.key(b"usage_source");
    j.str(r.usage_source.as_str());
    j.key(b"prompt_tokens");
    j.u64(r.usage.prompt);
    j.key(b"completion_tokens");
    j.u64(r.usage.completion);
    j.key(b"cached_tokens");
    j.u64(r.usage.cached);
    j.key(b"cache_write_tokens");
    j.u64(r.usage.cache_write);
    if r.usage.cache_write_1h > 0 {
        j.key(b"cache_write_1h_tokens");
        j.u64(r.usage.cache_write_1h);
    }
    j.key(b"reasoning_tokens");
    j.u64(r.usage.reasoning);
    j.key(b"web_searches");
    j.u64(r.usage.web_searches);
    if let Some(src) = r.web_searches_source {
        j.key(b"web_searches_source");
        j.str(src.as_str());
    }
    if r.usage_injected {
        j.key(b"usage_injected");
        j.bool(true);
    }
    // Exact decimal USD (from integer pico-USD); null when the model is unpriced.
    j.key(b"cost_usd");
    match r.cost {
        Some(c) => j.raw(c.decimal(&mut [0; 24]).as_bytes()),
        None => j.raw(b"null"),
    }
    if let Some(c) = r.upstream_cost_usd {
        j.key(b"upstream_cost_usd");
        j.f64(c);
    }
    if !r.tools.is_empty() {
        j.key(b"tools");
        j.strs(&r.tools);
    }
    if !r.finish_reasons.is_empty() {
        j.key(b"finish_reasons");
        j.strs(&r.finish_reasons);
    }
    if r.search_ran {
        j.key(b"search");
        j.bool(true);
    }
    if r.search_results != 0 {
        j.key(b"search_results");
        j.u64(r.search_results);
    }
    if let Some(w) = &r.warning {
        j.key(b"warning");
        j.str(w);
    }
    j.key(b"content_chunks");
    j.u64(r.content_chunks);
    j.key(b"request_bytes");
    j.u64(r.request_bytes);
    j.key(b"response_bytes");
    j.u64(r.response_bytes);
    j.key(b"ttfb_ms");
    j.opt_f64(r.ttfb.map(ms));
    j.key(b"ttft_ms");
    j.opt_f64(r.ttft.map(ms));
    j.key(b"duration_ms");
    j.f64(ms(r.duration));
    if let Some(e) = &r.error {
        j.key(b"error");
        j.str(e);
    }
    j.raw(b"}");
}

/// A JSON writer for [`write_line`], writing what serde_json would: numbers by `itoa` and
/// `zmij` (non-finite floats as `null`), strings escaped as serde_json escapes them.
struct JsonOut<'a>(&'a mut Vec<u8>);

impl JsonOut<'_> {
    fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }

    /// `,"name":` (names are plain ASCII, nothing to escape).
    fn key(&mut self, name: &[u8]) {
        self.raw(b",\"");
        self.raw(name);
        self.raw(b"\":");
    }

    fn bool(&mut self, b: bool) {
        self.raw(if b { b"true" } else { b"false" });
    }

    fn u64(&mut self, n: u64) {
        self.raw(itoa::Buffer::new().format(n).as_bytes());
    }

    fn f64(&mut self, x: f64) {
        if x.is_finite() {
            self.raw(zmij::Buffer::new().format_finite(x).as_bytes());
        } else {
            self.raw(b"null");
        }
    }

    fn opt_f64(&mut self, x: Option<f64>) {
        match x {
            Some(x) => self.f64(x),
            None => self.raw(b"null"),
        }
    }

    /// A string: runs without a quote, backslash or control character are copied whole (found
    /// eight bytes a step), those three escaped as serde_json does.
    fn str(&mut self, s: &str) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.0.push(b'"');
        let mut rest = s.as_bytes();
        while let Some(i) = crate::openai::skim::first_stop(rest) {
            let (run, tail) = rest.split_at(i);
            self.raw(run);
            let b = tail[0];
            match b {
                b'"' => self.raw(b"\\\""),
                b'\\' => self.raw(b"\\\\"),
                0x08 => self.raw(b"\\b"),
                0x0c => self.raw(b"\\f"),
                b'\n' => self.raw(b"\\n"),
                b'\r' => self.raw(b"\\r"),
                b'\t' => self.raw(b"\\t"),
                _ => self.raw(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ]),
            }
            rest = &tail[1..];
        }
        self.raw(rest);
        self.0.push(b'"');
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.str(s),
            None => self.raw(b"null"),
        }
    }

    fn strs(&mut self, v: &[String]) {
        self.0.push(b'[');
        for (i, s) in v.iter().enumerate() {
            if i > 0 {
                self.0.push(b',');
            }
            self.str(s);
        }
        self.0.push(b']');
    }
}

// ---- `[access_log]`: this sink's section of the config ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAccessLog {
    pub enabled: bool,
    /// `"-"` for stdout, otherwise a file path (relative to the config file's directory).
    pub path: AccessLogTarget,
}

impl Default for RawAccessLog {
    fn default() -> Self {
        RawAccessLog {
            enabled: true,
            path: AccessLogTarget::Stdout,
        }
    }
}

/// Where JSON-lines access records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    File(PathBuf),
}

impl AccessLogTarget {
    fn resolve(self, dir: &Path) -> Self {
        match self {
            AccessLogTarget::File(p) => AccessLogTarget::File(dir.join(p)),
            t => t,
        }
    }
}

impl<'de> Deserialize<'de> for AccessLogTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "-" | "stdout" => AccessLogTarget::Stdout,
            "" => return Err(serde::de::Error::custom("empty path: use \"-\" for stdout")),
            p => AccessLogTarget::File(PathBuf::from(p)),
        })
    }
}

#[derive(Debug, Clone)]
pub struct AccessLogConfig {
    pub enabled: bool,
    pub target: AccessLogTarget,
}

/// Checks `[access_log]` (`dir`: the config file's directory): its output must open now, so
/// that a config that would fail at start-up fails a check or a reload instead. An error
/// names its key.
pub fn compile(raw: RawAccessLog, dir: &Path) -> Result<AccessLogConfig, (&'static str, String)> {
    let cfg = AccessLogConfig {
        enabled: raw.enabled,
        target: raw.path.resolve(dir),
    };
    if let (true, AccessLogTarget::File(p)) = (cfg.enabled, &cfg.target) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| {
                (
                    "access_log.path",
                    format!("cannot open {}: {e}", p.display()),
                )
            })?;
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use proptest::prelude::*;
    use serde::Serialize;
    use serde_json::value::RawValue;

    use super::*;
    use crate::meter::{Outcome, Pico, Usage, UsageSource};

    /// The line's shape as serde writes it: the reference [`write_line`] must equal.
    #[derive(Serialize)]
    struct Line<'a> {
        ts: f64,
        request_id: &'a str,
        method: &'a str,
        path: &'a str,
        api: Option<&'a str>,
        user: Option<&'a str>,
        model: Option<&'a str>,
        provider: Option<&'a str>,
        response_model: Option<&'a str>,
        response_id: Option<&'a str>,
        stream: bool,
        status: u16,
        outcome: Outcome,
        usage_source: UsageSource,
        prompt_tokens: u64,
        completion_tokens: u64,
        cached_tokens: u64,
        cache_write_tokens: u64,
        #[serde(skip_serializing_if = "is_zero")]
        cache_write_1h_tokens: u64,
        reasoning_tokens: u64,
        web_searches: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        web_searches_source: Option<crate::meter::WebSearchSource>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        usage_injected: bool,
        cost_usd: Option<Box<RawValue>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        upstream_cost_usd: Option<f64>,
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        tools: &'a [String],
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        finish_reasons: &'a [String],
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        search: bool,
        #[serde(skip_serializing_if = "is_zero")]
        search_results: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        warning: Option<&'a str>,
        content_chunks: u64,
        request_bytes: u64,
        response_bytes: u64,
        ttfb_ms: Option<f64>,
        ttft_ms: Option<f64>,
        duration_ms: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a str>,
    }

    fn is_zero(n: &u64) -> bool {
        *n == 0
    }

    fn serde_line(r: &UsageRecord) -> String {
        serde_json::to_string(&Line {
            ts: ts(r),
            request_id: &r.request_id,
            method: &r.method,
            path: &r.path,
            api: r.api.map(crate::meter::Api::as_str),
            user: r.user.as_deref(),
            model: r.model.as_deref(),
            provider: r.provider.as_deref(),
            response_model: r.response_model.as_deref(),
            response_id: r.response_id.as_deref(),
            stream: r.stream,
            status: r.status,
            outcome: r.outcome,
            usage_source: r.usage_source,
            prompt_tokens: r.usage.prompt,
            completion_tokens: r.usage.completion,
            cached_tokens: r.usage.cached,
            cache_write_tokens: r.usage.cache_write,
            cache_write_1h_tokens: r.usage.cache_write_1h,
            reasoning_tokens: r.usage.reasoning,
            web_searches: r.usage.web_searches,
            web_searches_source: r.web_searches_source,
            usage_injected: r.usage_injected,
            cost_usd: r
                .cost
                // Not `Pico::decimal` itself: the reference must not share the code it checks.
                .map(|c| RawValue::from_string(Pico::decimal_by_format(c.0)).unwrap()),
            upstream_cost_usd: r.upstream_cost_usd,
            tools: &r.tools,
            finish_reasons: &r.finish_reasons,
            search: r.search_ran,
            search_results: r.search_results,
            warning: r.warning.as_deref(),
            content_chunks: r.content_chunks,
            request_bytes: r.request_bytes,
            response_bytes: r.response_bytes,
            ttfb_ms: r.ttfb.map(ms),
            ttft_ms: r.ttft.map(ms),
            duration_ms: ms(r.duration),
            error: r.error.as_deref(),
        })
        .unwrap()
    }

    fn line(r: &UsageRecord) -> String {
        let mut out = Vec::new();
        write_line(&mut out, r);
        String::from_utf8(out).unwrap()
    }

    /// Strings with what needs escaping: quotes, backslashes, every control character, DEL,
    /// and multi-byte UTF-8, at any place and in runs longer than eight bytes.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9/_.-]{0,40}",
            proptest::collection::vec(
                prop_oneof![
                    Just('"'),
                    Just('\\'),
                    (0u32..0x20).prop_map(|c| char::from_u32(c).unwrap()),
                    Just('\u{7f}'),
                    Just('é'),
                    Just('😀'),
                    proptest::char::range('a', 'z'),
                    // Any character: three-byte UTF-8 such as U+2028 among them.
                    any::<char>(),
                ],
                0..40
            )
            .prop_map(|v| v.into_iter().collect()),
        ]
    }

    fn float() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>(),
            0.0..1e3f64,
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(-0.0)
        ]
    }

    prop_compose! {
        fn record()(
            (request_id, method, path, user, model) in
                (text(), text(), text(), proptest::option::of(text()), proptest::option::of(text())),
            provider in proptest::option::of(text()),
            (response_model, response_id, warning, error) in (
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(text()),
            ),
            (tools, finish_reasons) in (
                proptest::collection::vec(text(), 0..3),
                proptest::collection::vec(text(), 0..3),
            ),
            (started_us, stream, status, outcome, source) in
                (any::<u64>(), any::<bool>(), any::<u16>(), 0..6usize, 0..3usize),
            usage in any::<[u64; 5]>(),
            (cost, upstream_cost, search_ran, search_results) in (
                proptest::option::of(any::<u64>()),
                proptest::option::of(float()),
                any::<bool>(),
                prop_oneof![Just(0u64), any::<u64>()],
            ),
            (search_source, usage_injected) in (0..3usize, any::<bool>()),
            counts in any::<[u64; 3]>(),
            (ttfb, ttft, duration) in (
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<u64>()),
                any::<u64>(),
            ),
        ) -> UsageRecord {
            let outcomes = [
                Outcome::Complete,
                Outcome::UpstreamError,
                Outcome::UpstreamReset,
                Outcome::ClientDisconnected,
                Outcome::Timeout,
                Outcome::Rejected,
            ];
            let sources = [UsageSource::Reported, UsageSource::Estimated, UsageSource::None];
            UsageRecord {
                request_id,
                // Any moment from 1970 to about 2540 (microsecond steps, as `ts` rounds).
                started_at: UNIX_EPOCH + Duration::from_micros(started_us >> 10),
                method,
                path,
                api: crate::meter::Api::ALL.get(usage[4] as usize % 6).copied(),
                path_class: "",
                user,
                model,
                provider: provider.map(Into::into),
                response_model,
                response_id,
                stream,
                status,
                outcome: outcomes[outcome],
                usage: Usage {
                    prompt: usage[0],
                    completion: usage[1],
                    cached: usage[2],
                    cache_write: usage[2] / 3,
                    cache_write_1h: usage[2] / 7,
                    reasoning: usage[3],
                    web_searches: usage[4],
                },
                usage_source: sources[source],
                web_searches_source: [
                    None,
                    Some(crate::meter::WebSearchSource::Reported),
                    Some(crate::meter::WebSearchSource::Counted),
                ][search_source],
                usage_injected,
                cost: cost.map(Pico),
                upstream_cost_usd: upstream_cost,
                tools,
                finish_reasons,
                search_ran,
                search_results,
                warning,
                request_bytes: counts[0],
                response_bytes: counts[1],
                content_chunks: counts[2],
                // Durations up to about 584 years, in nanoseconds.
                ttfb: ttfb.map(Duration::from_nanos),
                ttft: ttft.map(Duration::from_nanos),
                duration: Duration::from_nanos(duration),
                error,
                ..UsageRecord::test_chat()
            }
        }
    }

    proptest! {
        /// The hand-written line is byte for byte what serde_json writes for the same fields.
        #[test]
        fn line_equals_serde(r in record()) {
            prop_assert_eq!(line(&r), serde_line(&r));
        }
    }

    #[test]
    fn a_usual_line() {
        let r = UsageRecord {
            cost: Some(Pico(1_068_000_000)),
            finish_reasons: vec!["stop".into()],
            error: Some("a \"quoted\"\nline\u{1}".into()),
            ..UsageRecord::test_chat()
        };
        let l = line(&r);
        assert_eq!(l, serde_line(&r));
        assert!(l.starts_with(r#"{"ts":1700000000.0,"request_id":"req-1","method":"POST""#));
        assert!(l.contains(r#""cost_usd":0.001068,"finish_reasons":["stop"]"#));
        assert!(l.ends_with(r#""error":"a \"quoted\"\nline\u0001"}"#));
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["error"], "a \"quoted\"\nline\u{1}");
    }
}
