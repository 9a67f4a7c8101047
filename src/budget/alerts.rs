//! Budget alerts: when settled spend passes a threshold of a cap (a fraction of it, such as
//! 0.8, 0.95 and 1.0, or its soft threshold), once per user (or team) and window.
//!
//! A crossing is found where the spend changes (a settle adds to a counter atomically, in
//! memory or in Redis's script, so exactly one settle crosses each threshold, whichever
//! replica runs it); a cap that refuses a call for what was spent is at 100 %. Each alert is
//! logged, counted (`tokentap_budget_alerts_total{threshold, outcome}`), kept in the ledger
//! file until every configured webhook took it (so a restart does not lose it), and POSTed
//! off the request path, retried with backoff. With Redis, a marker in Redis makes sure two
//! replicas never raise the same alert.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::policy::Window;
use super::Amount;

/// `[budgets.alerts]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAlerts {
    /// Fractions of every cap (without `alerts` of its own) that raise an alert.
    pub thresholds: Vec<f64>,
    /// Soft thresholds (`soft_usd`, `soft_tokens`) raise one too.
    pub soft: bool,
    pub webhooks: Vec<RawWebhook>,
}

impl Default for RawAlerts {
    fn default() -> Self {
        RawAlerts {
            thresholds: Vec::new(),
            soft: true,
            webhooks: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: String,
    /// `generic` (tokentap's JSON) or `slack` (an incoming webhook's `{"text": ...}`).
    #[serde(default)]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Generic,
    Slack,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    pub format: Format,
}

/// The compiled `[budgets.alerts]` (thresholds go to each cap).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertsConfig {
    pub soft: bool,
    pub webhooks: Vec<Webhook>,
}

/// Fractions as thousandths, checked.
pub fn per_mille(fractions: &[f64]) -> Result<Vec<u32>, String> {
    let mut v = Vec::new();
    for f in fractions {
        if !(*f >= 0.001 && *f <= 1.0) {
            return Err(format!(
                "{f} is not a fraction of the cap: give 0.001 <= f <= 1 (0.8 is 80 %)"
            ));
        }
        v.push((f * 1000.0).round() as u32);
    }
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

pub fn compile(raw: &RawAlerts) -> Result<AlertsConfig, String> {
    let mut webhooks = Vec::new();
    for (i, w) in raw.webhooks.iter().enumerate() {
        if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
            return Err(format!(
                "budgets.alerts.webhooks[{i}].url: {:?} is not an http:// or https:// URL",
                w.url
            ));
        }
        webhooks.push(Webhook {
            url: w.url.clone(),
            format: w.format,
        });
    }
    Ok(AlertsConfig {
        soft: raw.soft,
        webhooks,
    })
}

/// What a hold alerts at: its cap and the thousandths of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thresholds {
    pub cap_usd: Option<u64>,
    pub cap_tokens: Option<u64>,
    pub at: Vec<u32>,
    pub soft_usd: Option<u64>,
    pub soft_tokens: Option<u64>,
}

impl Thresholds {
    /// The thresholds going from `before` to `after` passes: `"0.8"`-like labels for
    /// fractions (reached: the spend got to the level), `"soft"` for a soft threshold.
    pub fn crossed(&self, before: Amount, after: Amount) -> Vec<String> {
        let mut v = Vec::new();
        let reached = |cap: Option<u64>, t: u32, b: u64, a: u64| {
            cap.is_some_and(|c| {
                let level = (u128::from(c) * u128::from(t)).div_ceil(1000) as u64;
                b < level && a >= level
            })
        };
        for t in &self.at {
            if reached(self.cap_usd, *t, before.pico, after.pico)
                || reached(self.cap_tokens, *t, before.tokens, after.tokens)
            {
                v.push(label(*t));
            }
        }
        let soft = |s: Option<u64>, b: u64, a: u64| s.is_some_and(|s| b <= s && a > s);
        if soft(self.soft_usd, before.pico, after.pico)
            || soft(self.soft_tokens, before.tokens, after.tokens)
        {
            v.push("soft".into());
        }
        v
    }
}

/// A threshold's label: `0.8`, `0.95`, `1`.
pub fn label(per_mille: u32) -> String {
    let s = format!("{}.{:03}", per_mille / 1000, per_mille % 1000);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// One alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Unique per subject, window, window start and threshold (deduplicates).
    pub id: String,
    /// `user:<id>` or `team:<name>`.
    pub subject: String,
    pub window: String,
    pub window_start: i64,
    pub window_end: i64,
    /// `0.8`, `1`, `soft`.
    pub threshold: String,
    pub spent_pico: u64,
    pub spent_tokens: u64,
    pub cap_pico: Option<u64>,
    pub cap_tokens: Option<u64>,
    /// When it was raised (Unix seconds).
    pub at: i64,
}

impl Alert {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        subject: &str,
        window: Window,
        start: i64,
        end: i64,
        threshold: String,
        spent: Amount,
        t: &Thresholds,
        now: i64,
    ) -> Alert {
        Alert {
            id: format!("{subject}|{}|{start}|{threshold}", window.name()),
            subject: subject.to_string(),
            window: window.name(),
            window_start: start,
            window_end: end,
            threshold,
            spent_pico: spent.pico,
            spent_tokens: spent.tokens,
            cap_pico: t.cap_usd,
            cap_tokens: t.cap_tokens,
            at: now,
        }
    }

    fn kind_name(&self) -> (&str, &str) {
        self.subject
            .split_once(':')
            .unwrap_or(("user", &self.subject))
    }

    /// tokentap's JSON.
    pub fn generic(&self) -> serde_json::Value {
        let (kind, name) = self.kind_name();
        let usd = |p: Option<u64>| p.map(|p| crate::meter::Pico(p).to_string());
        let time = |t: i64| {
            (t != i64::MAX).then(|| {
                chrono::DateTime::from_timestamp(t, 0)
                    .unwrap_or_default()
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            })
        };
        serde_json::json!({
            "type": "budget_alert",
            "id": self.id,
            "subject": {"kind": kind, "name": name},
            "window": self.window,
            "window_start": time(self.window_start),
            "window_end": time(self.window_end),
            "threshold": self.threshold,
            "spent_usd": usd(Some(self.spent_pico)),
            "spent_tokens": self.spent_tokens,
            "cap_usd": usd(self.cap_pico),
            "cap_tokens": self.cap_tokens,
            "at": time(self.at),
        })
    }

    /// A Slack incoming webhook's message.
    pub fn slack(&self) -> serde_json::Value {
        let (kind, name) = self.kind_name();
        let usd = |p: u64| crate::meter::Pico(p).to_string();
        let what = if self.threshold == "soft" {
            "passed the soft threshold of".to_string()
        } else {
            let pct = self.threshold.parse::<f64>().unwrap_or(1.0) * 100.0;
            format!("reached {pct:.0}% of")
        };
        let amount = match (self.cap_pico, self.cap_tokens) {
            (Some(c), _) => format!("${} of ${}", usd(self.spent_pico), usd(c)),
            (None, Some(c)) => format!("{} of {} tokens", self.spent_tokens, c),
            _ => format!("${}", usd(self.spent_pico)),
        };
        // Slack reads `<...>` as links and mentions (`<!channel>`) and `&` as an entity: a
        // user id is the caller's to choose.
        let name = name
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        serde_json::json!({
            "text": format!("tokentap: {kind} {name} {what} its {} budget ({amount}).", self.window)
        })
    }
}

/// Raises alerts found by the ledgers: logs and counts them, and hands them to the deliverer.
pub struct Alerts {
    tx: std::sync::mpsc::SyncSender<Alert>,
    config: arc_swap::ArcSwap<AlertsConfig>,
    /// `tokentap_budget_alerts_total{threshold, outcome}` (alerts are rare: the counter's
    /// own lookup per alert is fine).
    pub counts: prometheus::IntCounterVec,
    dropped: std::sync::atomic::AtomicU64,
    rx: std::sync::Mutex<Option<std::sync::mpsc::Receiver<Alert>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    stop: std::sync::atomic::AtomicBool,
    file: PathBuf,
}

/// How long after its window's end an alert is still tried (a week).
const EXPIRE_S: i64 = 7 * 86_400;

/// Alerts waiting for the deliverer at most (beyond, counted as dropped: a crossing is rare,
/// thousands at once are a fault).
const QUEUE: usize = 10_000;

impl Alerts {
    pub fn new(cfg: &AlertsConfig, ledger_file: PathBuf) -> Arc<Alerts> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        Arc::new(Alerts {
            tx,
            config: arc_swap::ArcSwap::from_pointee(cfg.clone()),
            counts: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "tokentap_budget_alerts_total",
                    "Budget alerts by threshold (0.8, 1, soft, ...) and outcome: raised (found \
                     and logged), delivered (every webhook took it), no_webhook (none is \
                     configured), failed (a delivery round that did not reach every webhook; \
                     retried), expired (given up a week after its window ended).",
                ),
                &["threshold", "outcome"],
            )
            .expect("valid metric"),
            dropped: Default::default(),
            rx: std::sync::Mutex::new(Some(rx)),
            thread: std::sync::Mutex::new(None),
            stop: Default::default(),
            file: ledger_file,
        })
    }

    pub fn reconfigure(&self, cfg: &AlertsConfig) {
        self.config.store(Arc::new(cfg.clone()));
    }

    /// Counts an alert's outcome (`raised`, `delivered`, `failed`).
    fn count(&self, threshold: &str, outcome: &'static str) {
        self.counts.with_label_values(&[threshold, outcome]).inc();
    }

    /// An alert a ledger found: never blocks. (Logged and counted by the deliverer, once it
    /// is this replica's to raise and not raised before.)
    pub fn raise(&self, a: Alert) {
        if a.threshold == "soft" && !self.config.load().soft {
            return;
        }
        if self.tx.try_send(a).is_err() {
            let n = self
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_multiple_of(100) {
                log::error!(
                    "budget alerts: {} alerts dropped (the deliverer is not keeping up, or \
                     did not start)",
                    n + 1
                );
            }
        }
    }

    /// Logs and counts an alert this replica raises.
    fn raised(&self, a: &Alert) {
        log::warn!(
            "budget alert: {} reached {} of its {} budget (spent {} USD, {} tokens)",
            a.subject,
            if a.threshold == "soft" {
                "the soft threshold".to_string()
            } else {
                format!("{}x", a.threshold)
            },
            a.window,
            crate::meter::Pico(a.spent_pico),
            a.spent_tokens
        );
        self.count(&a.threshold, "raised");
    }

    /// Starts the deliverer: it keeps each alert in the ledger file until delivered, and
    /// delivers those an earlier run left.
    pub fn start(self: &Arc<Self>, claim: Claim) {
        let Some(rx) = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let me = Arc::clone(self);
        let t = std::thread::Builder::new()
            .name("tokentap-alerts".into())
            .spawn(move || deliver_loop(&me, rx, claim));
        if let Ok(t) = t {
            *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        }
    }

    /// Stops the deliverer after it has kept what it holds (at shutdown).
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// Asks the shared store whether this replica is the one to raise an alert (Redis: a marker
/// set if absent, until the window ends); `true` without one.
pub type Claim = Arc<
    dyn Fn(&Alert) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
        + Send
        + Sync,
>;

/// An alert waiting for its webhooks.
struct Pending {
    alert: Alert,
    /// The webhooks (URLs) that took it.
    done: Vec<String>,
    attempts: u32,
    due: std::time::Instant,
}

fn open_table(path: &std::path::Path) -> rusqlite::Result<rusqlite::Connection> {
    let db = rusqlite::Connection::open(path)?;
    db.busy_timeout(Duration::from_secs(5))?;
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS alerts (
             id TEXT PRIMARY KEY, payload TEXT NOT NULL, done TEXT NOT NULL DEFAULT '[]',
             delivered INTEGER NOT NULL DEFAULT 0, window_end INTEGER NOT NULL);",
    )?;
    Ok(db)
}

fn deliver_loop(alerts: &Alerts, rx: std::sync::mpsc::Receiver<Alert>, claim: Claim) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("budget alerts: cannot start the deliverer: {e}");
            return;
        }
    };
    let client = match http_client() {
        Ok(c) => c,
        Err(e) => {
            log::error!("budget alerts: cannot make an HTTP client: {e}");
            return;
        }
    };
    let mut db: Option<rusqlite::Connection> = None;
    let mut pending: Vec<Pending> = Vec::new();
    let mut loaded = false;
    loop {
        let stopping = alerts.stop.load(std::sync::atomic::Ordering::Acquire);
        if db.is_none() {
            db = open_table(&alerts.file).ok();
        }
        // What an earlier run kept.
        if let (false, Some(c)) = (loaded, db.as_ref()) {
            loaded = true;
            if let Ok(mut q) = c.prepare("SELECT payload, done FROM alerts WHERE delivered = 0") {
                let rows =
                    q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)));
                if let Ok(rows) = rows {
                    for (p, d) in rows.flatten() {
                        if let Ok(alert) = serde_json::from_str::<Alert>(&p) {
                            pending.push(Pending {
                                alert,
                                done: serde_json::from_str(&d).unwrap_or_default(),
                                attempts: 0,
                                due: std::time::Instant::now(),
                            });
                        }
                    }
                }
            }
        }
        // New ones: claimed (one replica raises each), kept, then delivered.
        while let Ok(a) = rx.try_recv() {
            if !rt.block_on(claim(&a)) {
                continue;
            }
            let kept = db.as_ref().map(|c| {
                c.execute(
                    "INSERT OR IGNORE INTO alerts (id, payload, window_end) VALUES (?1, ?2, ?3)",
                    rusqlite::params![
                        a.id,
                        serde_json::to_string(&a).unwrap_or_default(),
                        a.window_end
                    ],
                )
            });
            // Already kept (raised before): not again.
            if matches!(kept, Some(Ok(0))) {
                continue;
            }
            alerts.raised(&a);
            pending.push(Pending {
                alert: a,
                done: Vec::new(),
                attempts: 0,
                due: std::time::Instant::now(),
            });
        }
        if stopping {
            return;
        }
        // An alert no webhook took within a week of its window's end is given up (counted
        // and logged): its news is stale, and the file must not grow for ever.
        let unix = super::now_unix();
        pending.retain(|p| {
            let stale = p.alert.window_end != i64::MAX && p.alert.window_end + EXPIRE_S < unix;
            if stale {
                alerts.count(&p.alert.threshold, "expired");
                log::error!("budget alert {}: given up, no webhook took it", p.alert.id);
                if let Some(c) = db.as_ref() {
                    let _ = c.execute(
                        "DELETE FROM alerts WHERE id = ?1",
                        rusqlite::params![p.alert.id],
                    );
                }
            }
            !stale
        });
        let webhooks = alerts.config.load().webhooks.clone();
        let now = std::time::Instant::now();
        for p in pending.iter_mut().filter(|p| p.due <= now) {
            let mut all = true;
            for w in &webhooks {
                // (Noted by a digest: a webhook's URL is a secret, kept out of the file.)
                let mark = url_mark(&w.url);
                if p.done.contains(&mark) {
                    continue;
                }
                if alerts.stop.load(std::sync::atomic::Ordering::Acquire) {
                    // Shutting down: what is not delivered stays in the file.
                    return;
                }
                let body = match w.format {
                    Format::Generic => p.alert.generic(),
                    Format::Slack => p.alert.slack(),
                };
                let send = client
                    .post(&w.url)
                    .header("content-type", "application/json")
                    .header("idempotency-key", &p.alert.id)
                    .body(body.to_string())
                    .send();
                match rt
                    .block_on(async { tokio::time::timeout(Duration::from_secs(10), send).await })
                {
                    Ok(Ok(r)) if r.status().is_success() => {
                        p.done.push(mark);
                        if let Some(c) = db.as_ref() {
                            let _ = c.execute(
                                "UPDATE alerts SET done = ?2 WHERE id = ?1",
                                rusqlite::params![
                                    p.alert.id,
                                    serde_json::to_string(&p.done).unwrap_or_default()
                                ],
                            );
                        }
                    }
                    other => {
                        all = false;
                        let why = match other {
                            Ok(Ok(r)) => format!("answered {}", r.status()),
                            Ok(Err(e)) => e.without_url().to_string(),
                            Err(_) => "timed out".into(),
                        };
                        if p.attempts % 10 == 0 {
                            log::warn!(
                                "budget alert {}: a webhook failed ({why}); retrying",
                                p.alert.id
                            );
                        }
                    }
                }
            }
            if all {
                let outcome = if webhooks.is_empty() {
                    "no_webhook"
                } else {
                    "delivered"
                };
                alerts.count(&p.alert.threshold, outcome);
                if let Some(c) = db.as_ref() {
                    let _ = c.execute(
                        "UPDATE alerts SET delivered = 1 WHERE id = ?1",
                        rusqlite::params![p.alert.id],
                    );
                }
                p.attempts = u32::MAX;
            } else {
                alerts.count(&p.alert.threshold, "failed");
                p.attempts += 1;
                let backoff =
                    Duration::from_secs(1 << p.attempts.min(8)).min(Duration::from_secs(300));
                p.due = now + backoff;
            }
        }
        pending.retain(|p| p.attempts != u32::MAX);
        // Delivered alerts are kept until their window ends (they deduplicate).
        if let Some(c) = db.as_ref() {
            let _ = c.execute(
                "DELETE FROM alerts WHERE delivered = 1 AND window_end < ?1",
                rusqlite::params![super::now_unix()],
            );
        }
        let next = pending
            .iter()
            .map(|p| p.due)
            .min()
            .map_or(Duration::from_millis(200), |d| {
                d.saturating_duration_since(std::time::Instant::now())
                    .min(Duration::from_millis(200))
            });
        std::thread::sleep(next.max(Duration::from_millis(20)));
    }
}

/// How the file notes that a webhook took an alert: a digest of its URL.
fn url_mark(url: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(url.as_bytes())
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The webhooks' client: HTTP/1.1, and HTTPS verified against the system's roots (ring, as
/// the rest of tokentap).
fn http_client() -> Result<reqwest::Client, String> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())
}

/// The alerts as a sink: follows the config's webhooks on reload, and stops the deliverer at
/// shutdown (after the ledger's flush: it keeps what it holds in the ledger file).
pub struct AlertsSink(pub Arc<Alerts>);

impl crate::telemetry::Sink for AlertsSink {
    fn record(&self, _rec: &Arc<crate::meter::UsageRecord>) {}

    fn reconfigure(&self, cfg: &crate::config::Config) {
        self.0.reconfigure(&cfg.budgets.alerts);
    }

    fn shutdown(&self) {
        self.0.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_crossed_once_as_spend_grows() {
        let t = Thresholds {
            cap_usd: Some(1000),
            cap_tokens: None,
            at: per_mille(&[0.8, 0.95, 1.0]).unwrap(),
            soft_usd: Some(500),
            soft_tokens: None,
        };
        let a = |p| Amount { pico: p, tokens: 0 };
        assert!(t.crossed(a(0), a(499)).is_empty());
        assert_eq!(t.crossed(a(499), a(501)), ["soft"]);
        assert_eq!(t.crossed(a(501), a(960)), ["0.8", "0.95"]);
        assert!(t.crossed(a(960), a(999)).is_empty());
        assert_eq!(t.crossed(a(999), a(1000)), ["1"]);
        assert!(per_mille(&[1.5]).is_err());
        assert_eq!(label(950), "0.95");
        assert_eq!(label(1000), "1");
    }

    #[test]
    fn an_alert_reads_for_a_receiver_and_for_slack() {
        let t = Thresholds {
            cap_usd: Some(10_000_000_000_000),
            ..Default::default()
        };
        let a = Alert::new(
            "team:lab",
            Window::Monthly,
            0,
            100,
            "0.8".into(),
            Amount {
                pico: 8_000_000_000_000,
                tokens: 5,
            },
            &t,
            50,
        );
        let g = a.generic();
        assert_eq!(
            g["subject"],
            serde_json::json!({"kind": "team", "name": "lab"})
        );
        assert_eq!(
            (g["spent_usd"].as_str(), g["cap_usd"].as_str()),
            (Some("8"), Some("10"))
        );
        assert_eq!(
            a.slack()["text"],
            "tokentap: team lab reached 80% of its monthly budget ($8 of $10)."
        );
    }
}
