//! The JSON-lines access log: one line per call with who, what, how it ended, tokens, cost and
//! timings. Never an API key, never prompt or completion text.
//!
//! Records are queued to a dedicated writer thread that serializes and writes them in batches,
//! every [`TICK`] (or as soon as [`BATCH`] records wait), flushing after each batch; a full
//! queue drops (and counts) rather than stall requests. The writer is never woken per record
//! (see [`super::wake`]).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;
use serde_json::value::RawValue;

use super::wake::LazyWake;
use super::Sink;
use crate::config::AccessLogTarget;
use crate::meter::{Outcome, UsageRecord, UsageSource};

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
            if serde_json::to_writer(&mut line, &Line::from(&*rec)).is_ok() {
                line.push(b'\n');
                if let Err(e) = buffered.write_all(&line) {
                    failed(e);
                }
                wrote = true;
            }
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

/// The line's shape. Field names are part of tokentap's interface: add, never rename.
#[derive(Serialize)]
struct Line<'a> {
    ts: f64,
    request_id: &'a str,
    method: &'a str,
    path: &'a str,
    user: Option<&'a str>,
    model: Option<&'a str>,
    response_model: Option<&'a str>,
    response_id: Option<&'a str>,
    stream: bool,
    status: u16,
    outcome: Outcome,
    usage_source: UsageSource,
    prompt_tokens: u64,
    completion_tokens: u64,
    cached_tokens: u64,
    reasoning_tokens: u64,
    web_searches: u64,
    /// Exact decimal USD (from integer pico-USD); null when the model is unpriced.
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

impl<'a> From<&'a UsageRecord> for Line<'a> {
    fn from(r: &'a UsageRecord) -> Self {
        let ts = r
            .started_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        Line {
            ts: (ts * 1e6).round() / 1e6,
            request_id: &r.request_id,
            method: &r.method,
            path: &r.path,
            user: r.user.as_deref(),
            model: r.model.as_deref(),
            response_model: r.response_model.as_deref(),
            response_id: r.response_id.as_deref(),
            stream: r.stream,
            status: r.status,
            outcome: r.outcome,
            usage_source: r.usage_source,
            prompt_tokens: r.usage.prompt,
            completion_tokens: r.usage.completion,
            cached_tokens: r.usage.cached,
            reasoning_tokens: r.usage.reasoning,
            web_searches: r.usage.web_searches,
            cost_usd: r
                .cost
                .and_then(|c| RawValue::from_string(c.to_string()).ok()),
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
        }
    }
}
