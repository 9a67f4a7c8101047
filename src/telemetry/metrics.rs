//! The Prometheus registry served on the admin listener's `/metrics`. `server.rs` creates it
//! once and hands it to admin and the reloader, so its values survive config reloads.

use prometheus::{Encoder, Gauge, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

pub struct Metrics {
    pub registry: Registry,
    /// `tokentap_config_reloads_total{result="success|error"}`
    pub config_reloads: IntCounterVec,
    /// `tokentap_config_last_reload_success_timestamp_seconds`
    pub config_last_success: Gauge,
    /// `tokentap_config_info{hash}`: 1 for the running config.
    pub config_info: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "tokentap_config_reloads_total",
                "Config reload attempts, by result (an error keeps the previous config running).",
            ),
            &["result"],
        )
        .expect("metric");
        let config_last_success = Gauge::new(
            "tokentap_config_last_reload_success_timestamp_seconds",
            "When the running config was loaded (Unix time).",
        )
        .expect("metric");
        let config_info = IntGaugeVec::new(
            Opts::new(
                "tokentap_config_info",
                "The running config, identified by a digest of its files (value is always 1).",
            ),
            &["hash"],
        )
        .expect("metric");
        for c in [
            Box::new(config_reloads.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(config_last_success.clone()),
            Box::new(config_info.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        // Both results exist from the start, so rate() and alerts see a zero, not nothing.
        config_reloads.with_label_values(&["success"]);
        config_reloads.with_label_values(&["error"]);
        Metrics {
            registry,
            config_reloads,
            config_last_success,
            config_info,
        }
    }

    /// Records that `hash` is now the running config.
    pub fn config_loaded(&self, hash: &str) {
        // Set the new series before removing the old one: a scrape never sees none.
        self.config_info.with_label_values(&[hash]).set(1);
        for mf in prometheus::core::Collector::collect(&self.config_info) {
            for m in mf.get_metric() {
                if let Some(old) = m.get_label().iter().find(|l| l.name() == "hash") {
                    if old.value() != hash {
                        let _ = self.config_info.remove_label_values(&[old.value()]);
                    }
                }
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.config_last_success.set(now.as_secs_f64());
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
