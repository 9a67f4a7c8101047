//! Sinks of the [`UsageRecord`]: everything that observes calls. The proxy hands each record to
//! [`Sinks::record`] and never learns which sinks exist; a sink never blocks the byte path
//! (it queues, or updates atomics).

pub mod access_log;
pub mod calls;
pub mod live;
pub mod metrics;
pub mod otlp;
pub mod semconv;
pub mod traces;
pub mod wake;

use std::sync::Arc;

use crate::config::Config;
use crate::meter::UsageRecord;

/// Logs a warning about the configuration once per process: a config is compiled again on
/// every reload, and the same complaint (about an environment variable, say) would otherwise
/// be repeated each time. Returns whether it was logged.
pub fn warn_once(message: String) -> bool {
    static SAID: std::sync::Mutex<Option<std::collections::HashSet<String>>> =
        std::sync::Mutex::new(None);
    let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
    let first = said
        .get_or_insert_with(Default::default)
        .insert(message.clone());
    if first {
        log::warn!("{message}");
    }
    first
}

pub trait Sink: Send + Sync {
    /// Called once per call, on the request's task, after the response ended. Must not block.
    fn record(&self, rec: &Arc<UsageRecord>);
    /// A new config snapshot was loaded: pick up what changed.
    fn reconfigure(&self, _cfg: &Config) {}
    /// Called once at shutdown, off the async runtime: flush what is queued.
    fn shutdown(&self) {}
}

#[derive(Default)]
pub struct Sinks(Vec<Box<dyn Sink>>);

impl Sinks {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, s: Box<dyn Sink>) {
        self.0.push(s);
    }

    pub fn record(&self, rec: Arc<UsageRecord>) {
        for s in &self.0 {
            s.record(&rec);
        }
    }

    pub fn reconfigure(&self, cfg: &Config) {
        for s in &self.0 {
            s.reconfigure(cfg);
        }
    }

    pub fn shutdown(&self) {
        for s in &self.0 {
            s.shutdown();
        }
    }
}

#[cfg(test)]
mod warn_tests {
    #[test]
    fn a_config_warning_is_logged_once_however_often_the_config_is_compiled() {
        let m = "test: OTEL_X is not supported (warn_once test)".to_string();
        assert!(super::warn_once(m.clone()));
        assert!(!super::warn_once(m.clone()));
        assert!(super::warn_once(format!("{m} (another)")));
    }
}
