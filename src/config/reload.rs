//! Reloading: a new snapshot replaces the running one atomically, or not at all.
//!
//! Every trigger (a watched file changing, SIGHUP, `POST /admin/reload`) goes through
//! [`Reloader::reload`], which loads the file with the same [`super::load`] that `check-config`
//! and start-up use. A config that does not load is rejected whole and the running one keeps
//! serving; requests already running keep the snapshot they started with. Settings that only a
//! restart can change (listen addresses, threads, TLS roots) are reported, and the rest of the
//! new config applies.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{Config, ConfigError, Live};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::Sinks;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A watched file changed. Reloads only when the files' contents did.
    File,
    Signal,
    Admin,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Trigger::File => "file change",
            Trigger::Signal => "SIGHUP",
            Trigger::Admin => "POST /admin/reload",
        })
    }
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub previous: String,
    pub hash: String,
    /// False when the files had not changed (nothing was swapped).
    pub changed: bool,
    /// Settings that differ from what this process started with and need a restart.
    pub restart_required: Vec<&'static str>,
}

pub struct Reloader {
    /// The running config, swapped here.
    config: Live,
    /// Told of every new config before it is swapped in.
    sinks: Arc<Sinks>,
    /// Reload counters and the running config's hash.
    metrics: Arc<Metrics>,
    path: PathBuf,
    /// The config the process started with: its listeners and threads are fixed.
    started: Arc<Config>,
    /// Set when `RUST_LOG` governs logging (then `server.log_level` does not).
    log_from_env: bool,
    /// One reload at a time; the last rejection, so a file event that changes nothing
    /// does not report the same error again.
    state: Mutex<Option<String>>,
    /// The last reload that did something (or failed), for the admin page.
    last: Mutex<Option<LastReload>>,
    serial: Mutex<()>,
}

/// A reload as the admin page shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastReload {
    /// Unix seconds.
    pub at: i64,
    pub trigger: String,
    /// `reloaded`, `unchanged` or `rejected`.
    pub result: &'static str,
    pub error: Option<String>,
    pub hash: String,
}

impl Reloader {
    pub fn new(
        config: Live,
        sinks: Arc<Sinks>,
        metrics: Arc<Metrics>,
        path: PathBuf,
        log_from_env: bool,
    ) -> Arc<Self> {
        let started = config.load_full();
        metrics.config_loaded(&started.hash);
        Arc::new(Reloader {
            config,
            sinks,
            metrics,
            path,
            started,
            log_from_env,
            state: Mutex::new(None),
            last: Mutex::new(None),
            serial: Mutex::new(()),
        })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The settings of the running snapshot that wait for a restart.
    pub fn restart_required(&self) -> Vec<&'static str> {
        self.config.load().needs_restart_against(&self.started)
    }

    /// The last reload that swapped a config, was asked for, or failed.
    pub fn last(&self) -> Option<LastReload> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn reload(&self, trigger: Trigger) -> Result<Applied, ConfigError> {
        // Held until `last` says what this reload did (two at once record in their order).
        let _one = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.reload_now(trigger);
        let (result, error) = match &r {
            Ok(a) if a.changed => ("reloaded", None),
            // A file event that changed nothing is not a reload anyone asked for.
            Ok(_) if trigger == Trigger::File => return r,
            Ok(_) => ("unchanged", None),
            Err(e) => ("rejected", Some(e.to_string())),
        };
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(LastReload {
            at: crate::budget::now_unix(),
            trigger: trigger.to_string(),
            result,
            error,
            hash: self.config.load().hash.clone(),
        });
        r
    }

    fn reload_now(&self, trigger: Trigger) -> Result<Applied, ConfigError> {
        let mut last_error = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let running = self.config.load_full();
        let m = &self.metrics;
        match super::load(&self.path) {
            Ok(mut new) => {
                *last_error = None;
                let restart_required = new.needs_restart_against(&self.started);
                // Calendar windows keep the zone the ledger started with (reported above as
                // needing a restart): moving every window start at once would zero the spend
                // of the current windows.
                new.budgets.offset = self.started.budgets.offset;
                // Likewise the trace exporter (reported above): the running one stays, and
                // calls are traced as it can export them.
                new.traces.export = self.started.traces.export.clone();
                if trigger == Trigger::File && new.hash == running.hash {
                    return Ok(Applied {
                        previous: running.hash.clone(),
                        hash: new.hash,
                        changed: false,
                        restart_required,
                    });
                }
                let applied = Applied {
                    previous: running.hash.clone(),
                    hash: new.hash.clone(),
                    changed: new.hash != running.hash,
                    restart_required,
                };
                if !self.log_from_env {
                    log::set_max_level(new.server.log_level);
                }
                let new = Arc::new(new);
                self.sinks.reconfigure(&new);
                self.config.store(Arc::clone(&new));
                m.config_reloads.with_label_values(&["success"]).inc();
                m.config_loaded(&new.hash);
                log::info!(
                    "config reloaded ({trigger}): {} -> {}",
                    applied.previous,
                    applied.hash
                );
                if !applied.restart_required.is_empty() {
                    log::warn!(
                        "config reloaded, but these settings need a restart to take effect: {}",
                        applied.restart_required.join(", ")
                    );
                }
                Ok(applied)
            }
            Err(e) => {
                let msg = e.to_string();
                if trigger == Trigger::File && last_error.as_deref() == Some(msg.as_str()) {
                    return Err(e);
                }
                m.config_reloads.with_label_values(&["error"]).inc();
                log::error!(
                    "config reload ({trigger}) rejected, still running {}: {msg}",
                    running.hash
                );
                *last_error = Some(msg);
                Err(e)
            }
        }
    }
}
