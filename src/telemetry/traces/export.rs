//! The trace sink and its exporter thread: a bounded queue, batches, and export over OTLP
//! with its own runtime; what cannot be exported is counted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::super::otlp::transport::Exporter;
use super::super::otlp::{Attrs, Batch};
use super::super::wake::LazyWake;
use super::span::{add, SpanSettings};
use super::ExportConfig;
use crate::meter::UsageRecord;

pub(super) enum Msg {
    Record(Arc<UsageRecord>),
    /// Export what is queued, then answer.
    Flush(mpsc::Sender<()>),
}

/// The trace sink: queues sampled records for the exporter thread.
pub struct TraceSink {
    tx: Option<SyncSender<Msg>>,
    /// How records show as spans, from the running config.
    settings: Arc<arc_swap::ArcSwap<SpanSettings>>,
    /// Wakes the exporter thread when a batch waits (else it sleeps until the batch is due).
    wake: Arc<LazyWake>,
    pub counters: TraceCounters,
    stopped: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// `tokentap_spans_dropped_total{reason}` and `tokentap_spans_exported_total`.
#[derive(Clone)]
pub struct TraceCounters {
    pub dropped: prometheus::IntCounterVec,
    pub exported: prometheus::IntCounter,
    /// Spans waiting for export (`tokentap_spans_queued`).
    pub queued: prometheus::IntGauge,
}

impl TraceCounters {
    fn new() -> Self {
        TraceCounters {
            dropped: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "tokentap_spans_dropped_total",
                    "Spans not exported: the queue was full, or the collector failed or timed out.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            exported: prometheus::IntCounter::new(
                "tokentap_spans_exported_total",
                "Spans the collector accepted.",
            )
            .expect("valid metric"),
            queued: prometheus::IntGauge::new(
                "tokentap_spans_queued",
                "Spans in the queue to the exporter (traces.queue_size at most).",
            )
            .expect("valid metric"),
        }
    }

    pub fn register(&self, r: &prometheus::Registry) -> prometheus::Result<()> {
        r.register(Box::new(self.dropped.clone()))?;
        r.register(Box::new(self.queued.clone()))?;
        r.register(Box::new(self.exported.clone()))
    }
}

impl TraceSink {
    /// Starts the exporter thread when `cfg` has an endpoint; otherwise a sink that does
    /// nothing.
    pub fn new(config: &crate::config::Config) -> Result<TraceSink, String> {
        let cfg = &config.traces;
        let settings = Arc::new(arc_swap::ArcSwap::from_pointee(SpanSettings::of(config)));
        let counters = TraceCounters::new();
        for r in ["queue_full", "export_failed", "stopped"] {
            counters.dropped.with_label_values(&[r]);
        }
        let Some(export) = cfg.export.clone() else {
            return Ok(TraceSink {
                tx: None,
                settings,
                wake: Arc::new(LazyWake::new(1)),
                counters,
                stopped: AtomicBool::new(false),
                thread: Mutex::new(None),
            });
        };
        let (tx, rx) = mpsc::sync_channel(export.queue_size);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        // Inside the runtime: the gRPC channel starts its worker there.
        let exporter = rt.block_on(async { Exporter::new(&export) })?;
        let c = counters.clone();
        let wake = Arc::new(LazyWake::new(export.batch_size.min(export.queue_size / 2)));
        let w = Arc::clone(&wake);
        let s = Arc::clone(&settings);
        let thread = std::thread::Builder::new()
            .name("tokentap-traces".into())
            .spawn(move || {
                super::super::wake::lower_priority();
                export_loop(rt, exporter, rx, &w, export, c, &s)
            })
            .map_err(|e| e.to_string())?;
        wake.set_worker(thread.thread().clone());
        Ok(TraceSink {
            tx: Some(tx),
            settings,
            wake,
            counters,
            stopped: AtomicBool::new(false),
            thread: Mutex::new(Some(thread)),
        })
    }
}

pub(super) fn export_loop(
    rt: tokio::runtime::Runtime,
    exporter: Exporter,
    rx: Receiver<Msg>,
    wake: &LazyWake,
    cfg: ExportConfig,
    counters: TraceCounters,
    settings: &arc_swap::ArcSwap<SpanSettings>,
) {
    let mut batch = Batch::new(&cfg.service_name);
    let mut attrs = Attrs::default();
    let mut due = Instant::now() + cfg.batch_delay;
    // One warning per run of failures (a dead collector would otherwise fill the log).
    let failing = std::cell::Cell::new(false);
    let rejecting = std::cell::Cell::new(false);
    let export = |batch: &mut Batch| {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let body = batch.request();
        batch.clear();
        let r =
            rt.block_on(async { tokio::time::timeout(cfg.timeout, exporter.export(body)).await });
        match r {
            Ok(Ok(rejected)) => {
                let rejected = rejected.min(n);
                counters.exported.inc_by(n - rejected);
                if rejected > 0 {
                    counters
                        .dropped
                        .with_label_values(&["rejected"])
                        .inc_by(rejected);
                    if !rejecting.replace(true) {
                        log::warn!(
                            "traces: the collector rejected {rejected} of {n} spans (counted in \
                             tokentap_spans_dropped_total{{reason=\"rejected\"}})"
                        );
                    }
                } else {
                    rejecting.set(false);
                }
                if failing.replace(false) {
                    log::info!("traces: the collector takes spans again");
                }
            }
            Ok(Err(_)) | Err(_) => {
                counters
                    .dropped
                    .with_label_values(&["export_failed"])
                    .inc_by(n);
                if !failing.replace(true) {
                    let why = match r {
                        Ok(Err(e)) => e,
                        _ => "the collector timed out".to_string(),
                    };
                    log::warn!(
                        "traces: spans not exported (counted in \
                         tokentap_spans_dropped_total): {why}"
                    );
                }
            }
        }
    };
    loop {
        // Asleep until the batch is due, or a full batch or a flush wakes it.
        wake.wait(due.saturating_duration_since(Instant::now()));
        loop {
            match rx.try_recv() {
                Ok(Msg::Record(rec)) => {
                    counters.queued.dec();
                    add(&mut batch, &mut attrs, &rec, &settings.load());
                    if batch.len() >= cfg.batch_size {
                        export(&mut batch);
                        due = Instant::now() + cfg.batch_delay;
                    }
                }
                Ok(Msg::Flush(done)) => {
                    // Everything queued before the flush, then answer.
                    while let Ok(m) = rx.try_recv() {
                        if let Msg::Record(rec) = m {
                            counters.queued.dec();
                            add(&mut batch, &mut attrs, &rec, &settings.load());
                            if batch.len() >= cfg.batch_size {
                                export(&mut batch);
                            }
                        }
                    }
                    export(&mut batch);
                    // The flush is the shutdown's: the exporter is done.
                    let _ = done.send(());
                    return;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    export(&mut batch);
                    return;
                }
            }
        }
        if Instant::now() >= due {
            export(&mut batch);
            due = Instant::now() + cfg.batch_delay;
        }
    }
}

impl super::super::Sink for TraceSink {
    fn reconfigure(&self, cfg: &crate::config::Config) {
        self.settings.store(Arc::new(SpanSettings::of(cfg)));
    }

    fn record(&self, rec: &Arc<UsageRecord>) {
        let Some(tx) = &self.tx else { return };
        if rec.trace.is_none() {
            return;
        }
        // Counted before it is sent: the exporter may take it out at once.
        self.counters.queued.inc();
        match tx.try_send(Msg::Record(Arc::clone(rec))) {
            Ok(()) => self.wake.queued(),
            Err(TrySendError::Full(_)) => {
                self.counters.queued.dec();
                self.counters
                    .dropped
                    .with_label_values(&["queue_full"])
                    .inc()
            }
            // After the shutdown's flush (or if the exporter thread died).
            Err(TrySendError::Disconnected(_)) => {
                self.counters.queued.dec();
                self.counters.dropped.with_label_values(&["stopped"]).inc()
            }
        }
    }

    fn shutdown(&self) {
        let Some(tx) = &self.tx else { return };
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        // Export what is queued, waiting a bounded time (a dead collector must not hold up
        // the exit for long).
        let (done_tx, done_rx) = mpsc::channel();
        let sent = std::time::Instant::now();
        let mut msg = Msg::Flush(done_tx);
        loop {
            self.wake.now();
            match tx.try_send(msg) {
                Ok(()) => {
                    self.wake.now();
                    break;
                }
                Err(TrySendError::Full(m)) if sent.elapsed() < Duration::from_secs(5) => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
        // Long enough for the queue's batches to be tried once each, bounded.
        if done_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            log::warn!("traces: the collector did not take the last spans in time; they are lost");
            return;
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}
