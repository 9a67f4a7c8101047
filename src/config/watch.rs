//! Watches the config's files and reloads when they change.
//!
//! Directories are watched, not files: editors save by writing a temporary file and renaming
//! it over the old one, and Kubernetes updates a mounted ConfigMap by swapping a `..data`
//! symlink; both replace the file a file watch would be attached to. Events are debounced
//! (quiet for 150 ms, or at most 1 s of continuous writes), then the files are loaded again:
//! after a burst of writes the last version on disk is the one that counts.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};

use super::reload::{Reloader, Trigger};
use super::Live;

const QUIET: Duration = Duration::from_millis(150);
const MAX_DELAY: Duration = Duration::from_secs(1);

pub fn spawn(reloader: Arc<Reloader>, config: Live) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel::<notify::Event>();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // A watcher error (e.g. an overflowed event queue) may hide a change: treat it as one.
        let ev = ev.unwrap_or_else(|_| {
            notify::Event::new(notify::EventKind::Any).set_flag(notify::event::Flag::Rescan)
        });
        let _ = tx.send(ev);
    })
    .map_err(std::io::Error::other)?;
    let mut watched = Watched::default();
    watched.sync(&mut watcher, &config.load().files);
    std::thread::Builder::new()
        .name("tokentap-config-watch".into())
        .spawn(move || {
            while let Ok(ev) = rx.recv() {
                if !watched.concerns(&ev) {
                    continue;
                }
                // Debounce: wait until the config's files have been quiet for a moment
                // (other files in the directory, like a busy access log, do not count).
                let first = Instant::now();
                let mut last = Instant::now();
                while first.elapsed() < MAX_DELAY && last.elapsed() < QUIET {
                    match rx.recv_timeout(QUIET.saturating_sub(last.elapsed())) {
                        Ok(ev) if watched.concerns(&ev) => last = Instant::now(),
                        Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                let _ = reloader.reload(Trigger::File);
                // The new config may include other files.
                watched.sync(&mut watcher, &config.load().files);
            }
        })?;
    Ok(())
}

#[derive(Default)]
struct Watched {
    dirs: BTreeSet<PathBuf>,
    names: BTreeSet<OsString>,
}

impl Watched {
    /// Watches the directories of `files` (and of their symlink targets).
    fn sync(&mut self, w: &mut impl Watcher, files: &[PathBuf]) {
        let mut dirs = BTreeSet::new();
        let mut names = BTreeSet::new();
        for f in files {
            for p in [Some(f.clone()), std::fs::canonicalize(f).ok()]
                .into_iter()
                .flatten()
            {
                if let Some(n) = p.file_name() {
                    names.insert(n.to_os_string());
                }
                let dir = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                dirs.insert(dir);
            }
        }
        for d in self.dirs.difference(&dirs) {
            let _ = w.unwatch(d);
        }
        for d in dirs.difference(&self.dirs) {
            if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
                log::warn!("cannot watch {} for config changes: {e}", d.display());
            }
        }
        self.dirs = dirs;
        self.names = names;
    }

    /// An event about one of the config's files, a Kubernetes-style `..data` swap, a watched
    /// directory itself, or one that may hide a change (a rescan). Decided from names only:
    /// the other files of the directory (a busy access log, the ledger) change all the time,
    /// and a `stat` per event was a measurable share of tokentap's CPU under load.
    fn concerns(&self, ev: &notify::Event) -> bool {
        if ev.need_rescan() || ev.paths.is_empty() {
            return true;
        }
        if matches!(ev.kind, notify::EventKind::Access(_)) {
            return false;
        }
        ev.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| self.names.contains(n) || n.as_encoded_bytes().starts_with(b".."))
                || self.dirs.contains(p)
        })
    }
}
