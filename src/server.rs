//! Wiring: builds the Pingora server from a config (proxy and admin services, sinks, reload
//! triggers), runs it until SIGTERM/SIGINT, then drains in-flight calls and flushes the sinks.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::ServerConf;
use pingora::server::{ExecutionPhase, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::listening::Service;

use crate::admin::Admin;
use crate::budget::{embedded::Embedded, redis::RedisLedger, Ledger, LedgerSink};
use crate::config::reload::{Reloader, Trigger};
use crate::config::Config;
use crate::proxy::{Shared, TokenTap};
use crate::telemetry::calls::{CallCollector, CallMetrics};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::{access_log::AccessLog, Sinks};

/// Longest Pingora waits after SIGTERM; the drain watch ends the process as soon as the
/// in-flight calls are done or `server.drain_timeout_ms` (reloadable) has passed.
const MAX_GRACE: Duration = Duration::from_secs(3600);

/// Runs tokentap until it is told to stop. Returns an error only for start-up problems.
pub fn run(config: Config, config_path: PathBuf, log_from_env: bool) -> Result<(), String> {
    let mut sinks = Sinks::new();
    sinks.push(Box::new(
        AccessLog::new(&config.access_log).map_err(|e| e.to_string())?,
    ));
    let calls = CallMetrics::new(&config.metrics);
    sinks.push(Box::new(Arc::clone(&calls)));
    use crate::budget::policy::Backend;
    let ledger: Arc<dyn Ledger> = match config.budgets.ledger.backend {
        Backend::Redis => RedisLedger::open(&config.budgets.ledger, config.budgets.offset())?,
        Backend::Embedded => Embedded::open_in(&config.budgets.ledger, config.budgets.offset())?,
    };
    // Budget alerts: raised by the ledger's settles, kept in its file until delivered.
    let alerts = crate::budget::alerts::Alerts::new(
        &config.budgets.alerts,
        config.budgets.ledger.path.clone(),
    );
    ledger.set_soft_hook(crate::budget::soft_hook(
        Arc::clone(&calls),
        Arc::clone(&alerts),
    ));
    // The calls holding a reservation: the proxy opens them, the ledger sink settles them by
    // request id, the drain deadline and the lease renewal walk them.
    let open_calls = Arc::new(crate::budget::OpenCalls::default());
    sinks.push(Box::new(LedgerSink {
        ledger: Arc::clone(&ledger),
        open: Arc::clone(&open_calls),
        membership: arc_swap::ArcSwap::from_pointee(config.budgets.membership.clone()),
    }));
    sinks.push(Box::new(crate::budget::alerts::AlertsSink(Arc::clone(
        &alerts,
    ))));
    {
        let ledger = Arc::clone(&ledger);
        alerts.start(Arc::new(move |a: &crate::budget::alerts::Alert| {
            let (ledger, id, until) = (Arc::clone(&ledger), a.id.clone(), a.window_end);
            Box::pin(async move { ledger.claim_alert(&id, until).await })
        }));
    }
    // Last: at shutdown the ledger is flushed before spans wait on a collector.
    let traces = crate::telemetry::traces::TraceSink::new(&config)?;
    let trace_counters = traces.counters.clone();
    sinks.push(Box::new(traces));
    let sinks = Arc::new(sinks);

    let conf = server_conf(&config);
    let listen = config.server.listen;
    let admin_listen = config.server.admin_listen;
    let config: crate::config::Live = Arc::new(arc_swap::ArcSwap::from_pointee(config));
    let metrics = Arc::new(Metrics::new());
    let registry = &metrics.registry;
    registry
        .register(Box::new(CallCollector(Arc::clone(&calls))))
        .map_err(|e| e.to_string())?;
    registry
        .register(Box::new(crate::budget::BudgetCollector::new(
            Arc::clone(&config),
            Arc::clone(&ledger),
        )))
        .map_err(|e| e.to_string())?;
    registry
        .register(Box::new(alerts.counts.clone()))
        .map_err(|e| e.to_string())?;
    trace_counters
        .register(registry)
        .map_err(|e| e.to_string())?;
    let shared = Shared::new(
        Arc::clone(&config),
        Arc::clone(&sinks),
        calls,
        Arc::clone(&ledger),
        open_calls,
    );
    let reloader = Reloader::new(
        Arc::clone(&config),
        Arc::clone(&sinks),
        Arc::clone(&metrics),
        config_path,
        log_from_env,
    );
    // SIGHUP would end the process by default: take it over before anything else runs.
    spawn_sighup(Arc::clone(&reloader))?;
    crate::config::watch::spawn(Arc::clone(&reloader), Arc::clone(&config))
        .map_err(|e| format!("cannot watch the config files: {e}"))?;

    let mut server = Server::new_with_opt_and_conf(None, conf);
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        TokenTap {
            shared: Arc::clone(&shared),
        },
        "tokentap proxy",
    );
    // No read buffer in front of the client connection: Pingora reads request heads and
    // bodies into buffers of its own, so its default 64 KiB layer on top is a second copy that
    // each open connection keeps (measured in docs/benchmarks.md: 5,000 open streams took
    // ~300 MB less RSS without it, at the same throughput).
    proxy.add_listener(
        ListenerConfig::tcp(listen.to_string()).l4_buffer(L4BufferSettings::default().read(0)),
    );
    let mut admin = Service::new(
        "tokentap admin".to_string(),
        Admin {
            config: Arc::clone(&config),
            ledger,
            metrics,
            reloader,
            live: Arc::clone(&shared.calls.live),
            traces: trace_counters,
            started: Instant::now(),
            sessions: Default::default(),
        },
    );
    admin.add_tcp(&admin_listen.to_string());
    admin.threads = Some(1);
    server.add_service(proxy);
    server.add_service(admin);
    server.bootstrap();
    spawn_drain_watch(&server, Arc::clone(&shared));
    spawn_lease_renewal(&shared);

    if !admin_listen.ip().is_loopback() && shared.config.load().server.admin_token.is_none() {
        log::warn!(
            "the admin API on {admin_listen} is reachable off this host and has no token: set \
             server.admin_token_env"
        );
    }
    log::info!("tokentap listening on {listen}, admin on {admin_listen}");
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals),
    });
    // The runtimes are gone: flush what the sinks still hold.
    shared.sinks.shutdown();
    log::info!("tokentap stopped");
    Ok(())
}

/// SIGHUP reloads the config. Handled on its own thread and runtime, apart from Pingora's.
fn spawn_sighup(reloader: Arc<Reloader>) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut hup = rt
        .block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) })
        .map_err(|e| format!("cannot handle SIGHUP: {e}"))?;
    std::thread::Builder::new()
        .name("tokentap-sighup".into())
        .spawn(move || {
            rt.block_on(async move {
                while hup.recv().await.is_some() {
                    let r = Arc::clone(&reloader);
                    let _ = tokio::task::spawn_blocking(move || r.reload(Trigger::Signal)).await;
                }
            })
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Pingora, once told to stop, closes its listeners and then sleeps the whole grace period
/// before dropping its runtimes, however few calls are left. This watcher ends the process as
/// soon as the last in-flight call has been recorded (sinks flushed first), so a stop takes as
/// long as the slowest call, at most `server.drain_timeout_ms` of the running config.
fn spawn_drain_watch(server: &Server, shared: Arc<Shared>) {
    let mut phases = server.watch_execution_phase();
    std::thread::spawn(move || loop {
        match phases.blocking_recv() {
            Ok(ExecutionPhase::ShutdownStarted) => {
                let timeout = shared.config.load().server.drain_timeout;
                let deadline = Instant::now() + timeout;
                while shared.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                match shared.in_flight.load(Ordering::Acquire) {
                    0 => log::info!("drained in-flight calls; flushing records"),
                    n => {
                        // Their budgets are settled at what they used so far (the estimate),
                        // so the ledger loses nothing; they get no access-log record.
                        let settled = shared.open_calls.abandon_all(&*shared.ledger);
                        log::warn!(
                            "{n} calls still in flight after server.drain_timeout_ms \
                             ({timeout:?}) are cut; {settled} budget reservations settled at \
                             their estimate"
                        )
                    }
                }
                shared.sinks.shutdown();
                std::process::exit(0);
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(_) => return,
        }
    });
}

/// Keeps the leases of calls in flight alive, for stores whose reservations expire (Redis):
/// a stream longer than budgets.ledger.reservation_ttl_s keeps holding its worst case.
fn spawn_lease_renewal(shared: &Arc<Shared>) {
    let Some(every) = shared.ledger.renew_every() else {
        return;
    };
    let weak = Arc::downgrade(shared);
    std::thread::Builder::new()
        .name("tokentap-leases".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let Some(shared) = weak.upgrade() else { return };
            // (Also with no reservation held: a ledger may hold other leases, the calls in
            // flight of a rate limit.)
            shared.ledger.renew(&shared.open_calls.held());
        })
        .expect("spawn lease renewal");
}

fn server_conf(c: &Config) -> ServerConf {
    ServerConf {
        threads: c.server.threads,
        grace_period_seconds: Some(MAX_GRACE.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        // Retries only happen where nothing of the request was sent (see error_while_proxy).
        max_retries: 2,
        upstream_keepalive_pool_size: 1024,
        ca_file: c
            .upstream
            .ca_file
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
        ..ServerConf::default()
    }
}

/// SIGTERM and SIGINT both stop gracefully: stop accepting, let in-flight calls finish (up to
/// `server.drain_timeout_ms`), so that every call still gets its record.
struct Signals;

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM: shutting down gracefully"),
            _ = int.recv() => log::info!("SIGINT: shutting down gracefully"),
        }
        ShutdownSignal::GracefulTerminate
    }
}
