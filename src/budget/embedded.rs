//! The embedded ledger: no external service. Spend is kept in memory, where reservations are
//! made under one short lock, and group-committed to a SQLite file (rusqlite, bundled) every
//! `flush_interval_ms` and at shutdown: on `kill -9` at most one interval of settled spend is
//! lost. The file holds per-window aggregates (what budgets need after a restart) and one row
//! per call (what reports need), the rows kept for `retention_days`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};

use super::policy::{BudgetPolicy, LedgerConfig, Subject, Window, Zone};
use super::{Amount, CallRow, Hold, Ledger, Rejection, Reservation};

#[derive(Debug, Clone, Copy, Default)]
struct Counter {
    /// Start of the window `spent` belongs to.
    start: i64,
    spent: Amount,
    /// Held by calls in flight (carried across a window's end: they settle into the new one).
    reserved: Amount,
    /// When a call last reserved or settled here (idle counters of ended windows are dropped
    /// from memory; the file keeps them).
    touched: i64,
    /// Its spend is not in the file yet (its key is then in [`State::dirty`], once).
    dirty: bool,
}

impl Counter {
    /// Marks its spend as not in the file yet; `true` when it was not marked already (its key
    /// is then to be listed in [`State::dirty`]).
    fn mark_dirty(&mut self) -> bool {
        !std::mem::replace(&mut self.dirty, true)
    }
}

/// A counter's key: its subject's key and the window.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    name: String,
    window: Window,
}

/// A [`Key`] borrowed from a hold, to find a counter without building its key (reservations
/// and settles look up every counter of every call). Hashes as `Key` does.
#[derive(Hash)]
struct KeyRef<'a> {
    name: &'a str,
    window: Window,
}

impl hashbrown::Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, k: &Key) -> bool {
        self.window == k.window && self.name == k.name
    }
}

impl From<&KeyRef<'_>> for Key {
    fn from(k: &KeyRef<'_>) -> Key {
        Key {
            name: k.name.to_string(),
            window: k.window,
        }
    }
}

#[derive(Default)]
struct State {
    counters: Counters,
    /// The next shard of `counters` to look for idle counters in.
    evict_next: usize,
    /// The counters whose spend the file does not have yet.
    dirty: Vec<Key>,
    /// Windows that ended with spend the file does not have yet (their counter moved on to
    /// the next window before a flush): written as they ended.
    rolled: Vec<(String, Window, Counter)>,
    rows: Vec<CallRow>,
    /// The Redis ledger's settles that Redis has not taken yet: added, and taken.
    outbox_put: Vec<(String, String)>,
    outbox_done: Vec<String>,
    /// When idle counters were last looked for.
    last_evict: i64,
}

/// Shards of the counters: eviction scans one at a time, so that the lock every reserve and
/// settle takes is held for a slice of them, not for all (1,000,000 counters took 70 ms).
const SHARDS: usize = 32;

/// The counters, in [`SHARDS`] maps by a hash of their key.
struct Counters([hashbrown::HashMap<Key, Counter, std::hash::RandomState>; SHARDS]);

impl Default for Counters {
    fn default() -> Self {
        Counters(std::array::from_fn(|_| Default::default()))
    }
}

impl Counters {
    /// The shard of a key: FNV-1a of its subject's name (a subject's windows share one).
    fn shard(name: &str, _window: Window) -> usize {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        (h % SHARDS as u64) as usize
    }

    fn map(
        &self,
        name: &str,
        window: Window,
    ) -> &hashbrown::HashMap<Key, Counter, std::hash::RandomState> {
        &self.0[Self::shard(name, window)]
    }

    fn map_mut(
        &mut self,
        name: &str,
        window: Window,
    ) -> &mut hashbrown::HashMap<Key, Counter, std::hash::RandomState> {
        &mut self.0[Self::shard(name, window)]
    }

    fn get(&self, name: &str, window: Window) -> Option<&Counter> {
        self.map(name, window).get(&KeyRef { name, window })
    }

    fn get_mut(&mut self, name: &str, window: Window) -> Option<&mut Counter> {
        self.map_mut(name, window).get_mut(&KeyRef { name, window })
    }

    fn iter(&self) -> impl Iterator<Item = (&Key, &Counter)> {
        self.0.iter().flat_map(|m| m.iter())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.iter().map(|m| m.len()).sum()
    }
}

impl State {
    /// The counter of `key` for the window starting at `start` (a new window starts at zero).
    fn counter(&mut self, key: &str, window: Window, start: i64) -> &mut Counter {
        let k = KeyRef { name: key, window };
        let (_, c) = self
            .counters
            .map_mut(key, window)
            .raw_entry_mut()
            .from_key(&k)
            .or_insert_with(|| {
                let c = Counter {
                    start,
                    ..Counter::default()
                };
                (Key::from(&k), c)
            });
        if c.start != start {
            if c.dirty {
                // The ended window's last spend still goes to the file, under its own start.
                self.rolled.push((key.to_string(), window, *c));
            }
            c.start = start;
            c.spent = Amount::default();
        }
        c.touched = c.touched.max(start);
        c
    }

    /// Lists the counter for the next write to the file (once, however often it changes).
    fn mark_dirty(&mut self, name: &str, window: Window) {
        if let Some(c) = self.counters.get_mut(name, window) {
            if c.mark_dirty() {
                self.dirty.push(Key {
                    name: name.to_string(),
                    window,
                });
            }
        }
    }

    /// The spend to write to the file: windows that ended since the last write, then the
    /// counters changed since it.
    fn take_dirty(&mut self) -> Vec<(String, Window, Counter)> {
        let mut spend = std::mem::take(&mut self.rolled);
        let keys = std::mem::take(&mut self.dirty);
        spend.extend(keys.into_iter().filter_map(|k| {
            let c = self.counters.get_mut(&k.name, k.window)?;
            c.dirty = false;
            Some((k.name, k.window, *c))
        }));
        spend
    }

    /// Puts back what a failed write took: a counter's current window is marked again (the
    /// next write takes its newest spend), an ended one is kept as it was.
    fn untake_dirty(&mut self, spend: Vec<(String, Window, Counter)>) {
        for (name, window, c) in spend {
            let current = self
                .counters
                .get(&name, window)
                .is_some_and(|now| now.start == c.start);
            if current {
                self.mark_dirty(&name, window);
            } else {
                self.rolled.push((name, window, c));
            }
        }
    }

    /// Adds the spend the file holds to the counters: a counter's newest window in the file
    /// becomes its current one where memory has none; where memory has the same window
    /// (spend settled before a late open), the two add up; an ended window still waiting to
    /// be written gets the file's spend of that window added.
    fn add_from_file(&mut self, file: HashMap<(String, Window, i64), Amount>) {
        for (name, window, c) in &mut self.rolled {
            if let Some(f) = file.get(&(name.clone(), *window, c.start)) {
                c.spent.add(*f);
            }
        }
        let mut newest: HashMap<(String, Window), (i64, Amount)> = HashMap::new();
        for ((name, window, start), spent) in file {
            let e = newest.entry((name, window)).or_insert((start, spent));
            if start > e.0 {
                *e = (start, spent);
            }
        }
        for ((name, window), (start, spent)) in newest {
            match self.counters.get_mut(&name, window) {
                Some(c) if c.start == start => c.spent.add(spent),
                Some(c) if c.start > start => {}
                _ => {
                    let c = self.counter(&name, window, start);
                    c.spent = spent;
                    c.touched = start;
                }
            }
        }
    }

    /// Drops the oldest call rows beyond [`UNWRITTEN_ROWS_MAX`] (counted in `errors`).
    fn bound_rows(&mut self, errors: &std::sync::atomic::AtomicU64) {
        let Some(over) = self.rows.len().checked_sub(UNWRITTEN_ROWS_MAX) else {
            return;
        };
        if over == 0 {
            return;
        }
        self.rows.drain(..over);
        errors.fetch_add(over as u64, std::sync::atomic::Ordering::Relaxed);
        log::error!(
            "ledger: more than {UNWRITTEN_ROWS_MAX} call rows wait for the file: dropped the \
             oldest {over} (their spend is kept)"
        );
    }

    /// Forgets counters whose window has surely ended since they were last used and that hold
    /// nothing: memory follows the callers of the current windows, not every caller ever. One
    /// shard at a time, one every two seconds (all of them about once a minute), so that a
    /// call waits for a slice of the scan at most.
    fn evict_idle(&mut self, now: i64) {
        if now - self.last_evict < 2 {
            return;
        }
        self.last_evict = now;
        let shard = self.evict_next;
        self.evict_next = (shard + 1) % SHARDS;
        self.counters.0[shard].retain(|k, c| {
            let ended = k.window.max_len().is_some_and(|len| now - c.touched > len);
            !ended || c.reserved != Amount::default() || c.dirty
        });
    }
}

pub struct Embedded {
    /// Held for the ledger's life: one process per file (two would overwrite each other).
    file_lock: Mutex<Option<std::fs::File>>,
    soft: std::sync::OnceLock<super::SoftHook>,
    errors: std::sync::atomic::AtomicU64,
    state: Mutex<State>,
    /// The file, once open (`None` while it cannot be opened).
    db: Mutex<Option<Connection>>,
    retention: Duration,
    last_retention: Mutex<Instant>,
    path: std::path::PathBuf,
    /// Whether the last write to the file worked (false while the disk is full, read-only
    /// or failing: spend and rows wait in memory).
    writable: std::sync::atomic::AtomicBool,
    /// Whether the file has been opened (and its spend loaded): until then the ledger is down.
    opened: std::sync::atomic::AtomicBool,
    /// The zone whose days the rollups count (the budgets' zone when the ledger opened).
    zone: Zone,
    history: Arc<super::history::History>,
    /// Rate limits: one replica's, in memory.
    limiter: super::limits::Local,
}

/// Why the file did not open.
enum OpenError {
    /// Another tokentap process holds it, or it is not a ledger (corrupt, not SQLite): an
    /// error at start-up, not an outage to wait out.
    Fatal(String),
    /// Anything else (read-only, full, missing directory, permissions): retried.
    Failed(String),
}

impl OpenError {
    fn of(path: &Path, e: rusqlite::Error) -> OpenError {
        use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
        let fatal = matches!(e.sqlite_error_code(), Some(DatabaseCorrupt | NotADatabase));
        let e = format!("ledger {}: {e}", path.display());
        if fatal {
            OpenError::Fatal(format!(
                "{e} (restore it from a backup, or move it away to start a new ledger)"
            ))
        } else {
            OpenError::Failed(e)
        }
    }
}

/// Call rows kept in memory while the file cannot be written, at most (about 60 MB); beyond,
/// the oldest are dropped and counted as errors. Spend totals are never dropped (one counter
/// per subject and window).
const UNWRITTEN_ROWS_MAX: usize = 250_000;

impl Embedded {
    /// Opens (or creates) the ledger file and loads the spend of the current windows. A file
    /// that cannot be opened (a read-only or full disk, a missing volume) is not a reason to
    /// stop: until it opens (tried again every flush interval) the ledger is down, and
    /// `budgets.ledger.on_error` decides capped calls. Only a file another tokentap holds is.
    pub fn open(cfg: &LedgerConfig) -> Result<Arc<Self>, String> {
        Self::open_in(cfg, Zone::utc())
    }

    /// [`Embedded::open`], with the rollups' days counted in `zone` (the budgets' zone).
    pub fn open_in(cfg: &LedgerConfig, zone: Zone) -> Result<Arc<Self>, String> {
        let ledger = Arc::new(Embedded {
            zone,
            history: Arc::new(super::history::History::new(cfg.path.clone(), zone)),
            limiter: Default::default(),
            file_lock: Mutex::new(None),
            soft: std::sync::OnceLock::new(),
            errors: std::sync::atomic::AtomicU64::new(0),
            state: Mutex::new(State::default()),
            db: Mutex::new(None),
            retention: Duration::from_secs(cfg.retention_days.saturating_mul(86_400)),
            last_retention: Mutex::new(Instant::now() - Duration::from_secs(7200)),
            path: cfg.path.clone(),
            writable: std::sync::atomic::AtomicBool::new(true),
            opened: std::sync::atomic::AtomicBool::new(false),
        });
        {
            let mut db = ledger.db.lock().unwrap_or_else(|p| p.into_inner());
            match ledger.open_file() {
                Ok(c) => *db = Some(c),
                Err(OpenError::Fatal(e)) => return Err(e),
                Err(OpenError::Failed(e)) => ledger.cannot_write(&e),
            }
        }
        spawn_flusher(Arc::downgrade(&ledger), cfg.flush_interval);
        Ok(ledger)
    }

    /// Takes the file's lock, opens it, and adds the spend it holds to what is in memory (at
    /// start, nothing; after a late open, the spend settled meanwhile).
    fn open_file(&self) -> Result<Connection, OpenError> {
        let lock = lock_file(&self.path)?;
        let mut db = open_db(&self.path)?;
        let what = |e| OpenError::of(&self.path, e);
        super::rollup::ensure(&mut db, self.zone).map_err(what)?;
        let mut file: HashMap<(String, Window, i64), Amount> = HashMap::new();
        {
            let mut q = db
                .prepare("SELECT key, window, start, pico, tokens FROM spend")
                .map_err(what)?;
            let rows = q
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })
                .map_err(what)?;
            for row in rows {
                let (key, window, start, pico, tokens) = row.map_err(what)?;
                let Ok(window) = Window::parse(&window) else {
                    continue;
                };
                let spent = Amount {
                    pico: pico as u64,
                    tokens: tokens as u64,
                };
                file.insert((key, window, start), spent);
            }
        }
        self.lock().add_from_file(file);
        *self.file_lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(lock);
        if self.opened.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return Ok(db);
        }
        if !self.writable.load(std::sync::atomic::Ordering::Relaxed) {
            log::warn!("ledger: {} is open", self.path.display());
        }
        Ok(db)
    }

    fn not_open(&self) -> String {
        format!("{} is not open", self.path.display())
    }

    /// Notes a failed open or write: counted each time, logged once per fault.
    fn cannot_write(&self, e: &str) {
        use std::sync::atomic::Ordering::Relaxed;
        self.errors.fetch_add(1, Relaxed);
        if !self.writable.swap(false, Relaxed) {
            return;
        }
        if self.opened.load(Relaxed) {
            log::error!(
                "ledger: cannot write to {}: {e}; spend and call rows wait in memory (caps still \
                 hold; a crash now loses them) and are written once it works again",
                self.path.display()
            );
        } else {
            log::error!(
                "ledger: cannot open {}: {e}; until it opens (tried every flush interval) the \
                 spend it holds is unknown, so budgets.ledger.on_error decides capped calls \
                 (fail_closed: 503; fail_open: through, charged when it opens)",
                self.path.display()
            );
        }
    }

    fn reserve_now(
        &self,
        policy: &BudgetPolicy,
        user: &str,
        worst: Amount,
        now: i64,
    ) -> Result<Reservation, Rejection> {
        let caps = policy.caps_for(user);
        let offset = policy.offset();
        // Each cap's hold (its key and window bounds), worked out once, outside the lock.
        let holds: Vec<(Hold, i64)> = caps
            .iter()
            .map(|(subject, cap)| super::hold(subject, cap, now, offset))
            .collect();
        let mut st = self.lock();
        let mut refused: Option<Rejection> = None;
        for ((subject, cap), (h, end)) in caps.iter().zip(&holds) {
            let end = *end;
            let c = st.counter(&h.key, h.window, h.start);
            let mut settled = c.spent;
            settled.add(worst);
            let mut after = settled;
            after.add(c.reserved);
            let over = |a: Amount| {
                (
                    cap.usd.is_some_and(|u| a.pico > u.0),
                    cap.tokens.is_some_and(|t| a.tokens > t),
                )
            };
            let (over_usd, over_tokens) = over(after);
            if over_usd || over_tokens {
                let (settled_usd, settled_tokens) = over(settled);
                let r = Rejection {
                    subject: subject.clone(),
                    window: cap.window,
                    resets_at: end,
                    tokens: !over_usd,
                    in_flight: !settled_usd && !settled_tokens,
                };
                if refused.as_ref().is_none_or(|old| r.outranks(old)) {
                    refused = Some(r);
                }
            }
        }
        if let Some(r) = refused {
            return Err(r);
        }
        let holds: Vec<Hold> = holds.into_iter().map(|(h, _)| h).collect();
        for h in &holds {
            let c = st.counter(&h.key, h.window, h.start);
            c.reserved.add(worst);
            c.touched = now;
        }
        drop(st);
        Ok(Reservation::new(policy, user, holds, worst))
    }

    fn settle_now(&self, r: &Reservation, actual: Amount, now: i64) -> Vec<super::alerts::Alert> {
        let mut raised = Vec::new();
        // A call that ran across a window's end is charged to the window it ended in.
        let mut st = self.lock();
        for h in &r.holds {
            let (start, _) = h.window.bounds(now, r.offset);
            let c = st.counter(&h.key, h.window, start);
            c.reserved.sub(r.worst);
            c.touched = c.touched.max(now);
            let before = c.spent;
            c.spent.add(actual);
            let after = c.spent;
            // Listed once until the next flush (the counter is at hand: no second lookup).
            if c.mark_dirty() {
                st.dirty.push(Key {
                    name: h.key.clone(),
                    window: h.window,
                });
            }
            // A threshold passed raises an alert (a soft threshold only signals).
            for t in h.alert.crossed(before, after) {
                let (start, end) = h.window.bounds(now, r.offset);
                raised.push(super::alerts::Alert::new(
                    &h.key, h.window, start, end, t, after, &h.alert, now,
                ));
            }
        }
        raised
    }

    /// Keeps a settle the Redis ledger could not deliver (written with the next flush).
    pub fn outbox_put(&self, id: String, payload: String) {
        self.lock().outbox_put.push((id, payload));
    }

    /// Forgets a settle Redis has taken.
    pub fn outbox_done(&self, id: String) {
        self.lock().outbox_done.push(id);
    }

    /// The settles kept by an earlier run, oldest first.
    pub fn outbox_load(&self) -> Result<Vec<(String, String)>, String> {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let db = db.as_ref().ok_or_else(|| self.not_open())?;
        let mut q = db
            .prepare("SELECT id, payload FROM outbox ORDER BY seq")
            .map_err(|e| e.to_string())?;
        let rows = q
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| e.to_string())?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| e.to_string())
    }

    /// This file's name among the replicas sharing a Redis ledger: random, made the first
    /// time it is asked for and kept in the file (a new file is a new replica).
    pub fn replica_id(&self) -> Result<String, String> {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let db = db.as_ref().ok_or_else(|| self.not_open())?;
        let mut bytes = [0u8; 12];
        getrandom::fill(&mut bytes).map_err(|e| e.to_string())?;
        let fresh: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('replica', ?1)",
            params![fresh],
        )
        .map_err(|e| e.to_string())?;
        db.query_row("SELECT value FROM meta WHERE key = 'replica'", [], |r| {
            r.get(0)
        })
        .map_err(|e| e.to_string())
    }

    /// Up to `limit` per-call rows written after row `after`, oldest first: each row's id,
    /// time, and figures (one call).
    pub fn rows_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, i64, super::report::Group, super::report::Totals)>, String> {
        use super::report::{group_and_totals, GROUP_COLUMNS, SUM_COLUMNS};
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let db = db.as_ref().ok_or_else(|| self.not_open())?;
        let mut q = db
            .prepare_cached(&format!(
                "SELECT rowid, ts, {GROUP_COLUMNS}, 1, {} FROM calls
                 WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
                SUM_COLUMNS.replace("SUM(", "(")
            ))
            .map_err(|e| e.to_string())?;
        let rows = q
            .query_map(params![after, limit as i64], |r| {
                let (g, t) = group_and_totals(r, 2)?;
                Ok((r.get(0)?, r.get(1)?, g, t))
            })
            .map_err(|e| e.to_string())?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| e.to_string())
    }

    fn spend_now(
        &self,
        subject: &Subject,
        window: Window,
        policy: &BudgetPolicy,
        now: i64,
    ) -> (Amount, Amount) {
        let (start, _) = window.bounds(now, policy.offset());
        let st = self.lock();
        let name = subject.key();
        match st.counters.get(&name, window) {
            Some(c) if c.start == start => (c.spent, c.reserved),
            Some(c) => (Amount::default(), c.reserved),
            None => (Amount::default(), Amount::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(
        &self,
        db: &mut Connection,
        spend: &[(String, Window, Counter)],
        rows: &[CallRow],
        outbox: (&[(String, String)], &[String]),
    ) -> rusqlite::Result<()> {
        let tx = db.transaction()?;
        {
            let mut put =
                tx.prepare_cached("INSERT OR IGNORE INTO outbox (id, payload) VALUES (?1, ?2)")?;
            for (id, payload) in outbox.0 {
                put.execute(params![id, payload])?;
            }
            let mut done = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
            for id in outbox.1 {
                done.execute(params![id])?;
            }
            let mut up = tx.prepare_cached(
                "INSERT INTO spend (key, window, start, pico, tokens) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (key, window, start) DO UPDATE SET pico = ?4, tokens = ?5",
            )?;
            for (key, window, c) in spend {
                up.execute(params![
                    key,
                    window.name(),
                    c.start,
                    c.spent.pico as i64,
                    c.spent.tokens as i64
                ])?;
            }
            let mut ins = tx.prepare_cached(
                "INSERT INTO calls (ts, request_id, user, teams, model, prompt, completion, cached,
                 reasoning, web_searches, cost_pico, estimated, outcome, status, api, cache_write,
                 duration_ms, usage_source)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                 ?17, ?18)",
            )?;
            let mut team =
                tx.prepare_cached("INSERT OR IGNORE INTO call_teams (team, call) VALUES (?1, ?2)")?;
            let teams: Vec<String> = rows.iter().map(|r| r.teams.join(",")).collect();
            let mut rollup = super::rollup::Batch::new(self.zone);
            for (r, teams) in rows.iter().zip(&teams) {
                let user = r.user.as_deref().unwrap_or("");
                let model = r.model.as_deref().unwrap_or("");
                let api = r.api.map_or("", |a| a.as_str());
                rollup.add(r.ts, (user, teams, model, api), &r.totals());
                ins.execute(params![
                    r.ts,
                    r.request_id,
                    r.user,
                    teams,
                    r.model,
                    r.usage.prompt as i64,
                    r.usage.completion as i64,
                    r.usage.cached as i64,
                    r.usage.reasoning as i64,
                    r.usage.web_searches as i64,
                    r.cost_pico.map(|c| c as i64),
                    r.estimated,
                    r.outcome,
                    r.status,
                    r.api.map(crate::meter::Api::as_str),
                    r.usage.cache_write as i64,
                    r.duration_ms.map(|d| d.min(i64::MAX as u64) as i64),
                    r.usage_source
                ])?;
                let call = tx.last_insert_rowid();
                for t in &r.teams {
                    team.execute(params![t, call])?;
                }
            }
            rollup.write(&tx)?;
        }
        let mut last = self
            .last_retention
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.elapsed() > Duration::from_secs(3600) && !self.retention.is_zero() {
            // From a midnight of the budgets' zone: the rows, the quarter hours and the days
            // all end at the same instant, and agree.
            let oldest = super::report::date_of(
                super::now_unix() - self.retention.as_secs() as i64,
                self.zone,
            );
            let cutoff = super::report::midnight(oldest, self.zone);
            super::rollup::expire(&tx, cutoff, self.zone)?;
            // The newest row stays, however old: row ids keep growing, and the Redis ledger
            // ships rows to the shared reports by id.
            tx.execute(
                "DELETE FROM calls WHERE ts < ?1 AND rowid < (SELECT MAX(rowid) FROM calls)",
                params![cutoff],
            )?;
            *last = Instant::now();
        }
        tx.commit()
    }
}

fn open_db(path: &Path) -> Result<Connection, OpenError> {
    let what = |e: rusqlite::Error| OpenError::of(path, e);
    let db = Connection::open(path).map_err(what)?;
    db.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         CREATE TABLE IF NOT EXISTS spend (
             key TEXT NOT NULL, window TEXT NOT NULL, start INTEGER NOT NULL,
             pico INTEGER NOT NULL, tokens INTEGER NOT NULL,
             PRIMARY KEY (key, window, start));
         CREATE TABLE IF NOT EXISTS calls (
             ts INTEGER NOT NULL, request_id TEXT NOT NULL, user TEXT, teams TEXT, model TEXT,
             prompt INTEGER NOT NULL, completion INTEGER NOT NULL, cached INTEGER NOT NULL,
             reasoning INTEGER NOT NULL, web_searches INTEGER NOT NULL, cost_pico INTEGER,
             estimated INTEGER NOT NULL, outcome TEXT NOT NULL, status INTEGER NOT NULL,
             api TEXT, cache_write INTEGER NOT NULL DEFAULT 0);
         CREATE INDEX IF NOT EXISTS calls_ts ON calls (ts);
         CREATE TABLE IF NOT EXISTS outbox (
             seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
             payload TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    )
    .map_err(what)?;
    // A ledger written before tokentap metered several APIs gets their columns (its calls
    // were all chat calls).
    let has = |col: &str| -> Result<bool, rusqlite::Error> {
        db.prepare("SELECT 1 FROM pragma_table_info('calls') WHERE name = ?1")?
            .exists(params![col])
    };
    if !has("api").map_err(what)? {
        db.execute_batch(
            "BEGIN;
             ALTER TABLE calls ADD COLUMN api TEXT;
             UPDATE calls SET api = 'chat_completions';
             COMMIT;",
        )
        .map_err(what)?;
    }
    if !has("cache_write").map_err(what)? {
        db.execute_batch("ALTER TABLE calls ADD COLUMN cache_write INTEGER NOT NULL DEFAULT 0;")
            .map_err(what)?;
    }
    // Kept since the admin page lists a user's calls (older rows have neither).
    if !has("duration_ms").map_err(what)? {
        db.execute_batch(
            "ALTER TABLE calls ADD COLUMN duration_ms INTEGER;
             ALTER TABLE calls ADD COLUMN usage_source TEXT;",
        )
        .map_err(what)?;
    }
    db.execute_batch(&super::rollup::schema()).map_err(what)?;
    Ok(db)
}

/// Takes the ledger's lock file (`<path>.lock`) for the life of the process: a second
/// tokentap on the same file would overwrite this one's spend. Reports read the file itself
/// and need no lock.
fn lock_file(path: &Path) -> Result<std::fs::File, OpenError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = std::path::PathBuf::from(name);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| OpenError::Failed(format!("ledger lock {}: {e}", lock_path.display())))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(OpenError::Fatal(format!(
            "ledger {} is in use by another tokentap process (it holds {}): give each \
             process its own budgets.ledger.path, or share caps through the redis backend",
            path.display(),
            lock_path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(OpenError::Failed(format!(
            "ledger lock {}: {e}",
            lock_path.display()
        ))),
    }
}

fn spawn_flusher(ledger: Weak<Embedded>, every: Duration) {
    std::thread::Builder::new()
        .name("tokentap-ledger".into())
        .spawn(move || {
            crate::telemetry::wake::lower_priority();
            loop {
                std::thread::sleep(every);
                match ledger.upgrade() {
                    Some(l) => l.flush(),
                    None => return,
                }
            }
        })
        .expect("spawn ledger flusher");
}

#[async_trait::async_trait]
impl Ledger for Embedded {
    async fn reserve(
        &self,
        policy: &BudgetPolicy,
        user: &str,
        worst: Amount,
        now: i64,
    ) -> Result<Result<Reservation, Rejection>, super::StoreDown> {
        if !self.opened.load(std::sync::atomic::Ordering::Relaxed) {
            // The spend the file holds is unknown: no cap can be checked.
            return Err(super::StoreDown(self.not_open()));
        }
        Ok(self.reserve_now(policy, user, worst, now))
    }

    fn settle(&self, r: &Reservation, actual: Amount, now: i64) {
        let raised = self.settle_now(r, actual, now);
        if let Some(hook) = self.soft.get() {
            raised.into_iter().for_each(|a| hook(a));
        }
    }

    fn set_soft_hook(&self, hook: super::SoftHook) {
        let _ = self.soft.set(hook);
    }

    async fn top(
        &self,
        policy: &BudgetPolicy,
        window: Window,
        limit: usize,
        now: i64,
    ) -> Vec<(String, Amount)> {
        let mut v: Vec<(String, Amount)> = self
            .counters(policy, now)
            .into_iter()
            .filter(|(_, w, _)| *w == window)
            .filter_map(|(k, _, a)| Some((k.strip_prefix("user:")?.to_string(), a)))
            .filter(|(_, a)| *a != Amount::default())
            .collect();
        v.sort_by(|a, b| b.1.pico.cmp(&a.1.pico).then(a.0.cmp(&b.0)));
        v.truncate(limit);
        v
    }

    fn record_call(&self, row: CallRow) {
        self.lock().rows.push(row);
    }

    async fn spend(
        &self,
        subject: &Subject,
        window: Window,
        policy: &BudgetPolicy,
        now: i64,
    ) -> (Amount, Amount) {
        self.spend_now(subject, window, policy, now)
    }

    fn counters(&self, policy: &BudgetPolicy, now: i64) -> Vec<(String, Window, Amount)> {
        let offset = policy.offset();
        self.lock()
            .counters
            .iter()
            .map(|(k, c)| {
                let current = c.start == k.window.bounds(now, offset).0;
                (
                    k.name.clone(),
                    k.window,
                    if current { c.spent } else { Amount::default() },
                )
            })
            .collect()
    }

    async fn reset(&self, subject: &Subject, window: Window, policy: &BudgetPolicy, now: i64) {
        let (start, _) = window.bounds(now, policy.offset());
        let key = subject.key();
        let mut st = self.lock();
        st.counter(&key, window, start).spent = Amount::default();
        st.mark_dirty(&key, window);
    }

    fn errors(&self) -> u64 {
        self.errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn flush(&self) {
        // The file's lock is held from the snapshot to the commit: two flushes (the flusher
        // and the one at shutdown) commit in the order they took their snapshots, so an
        // older snapshot can never overwrite a newer one.
        let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        if db.is_none() {
            match self.open_file() {
                Ok(c) => *db = Some(c),
                Err(OpenError::Fatal(e) | OpenError::Failed(e)) => {
                    self.cannot_write(&e);
                    self.lock().bound_rows(&self.errors);
                    return;
                }
            }
        }
        let Some(db) = db.as_mut() else { return };
        let (spend, rows, put, done) = {
            let mut st = self.lock();
            st.evict_idle(super::now_unix());
            if st.dirty.is_empty()
                && st.rolled.is_empty()
                && st.rows.is_empty()
                && st.outbox_put.is_empty()
                && st.outbox_done.is_empty()
            {
                return;
            }
            (
                st.take_dirty(),
                std::mem::take(&mut st.rows),
                std::mem::take(&mut st.outbox_put),
                std::mem::take(&mut st.outbox_done),
            )
        };
        let written = rows.len();
        if let Err(e) = self.write(db, &spend, &rows, (&put, &done)) {
            self.cannot_write(&e.to_string());
            let mut st = self.lock();
            st.untake_dirty(spend);
            let mut rows = rows;
            rows.append(&mut st.rows);
            st.rows = rows;
            st.bound_rows(&self.errors);
            let mut put = put;
            put.append(&mut st.outbox_put);
            st.outbox_put = put;
            let mut done = done;
            done.append(&mut st.outbox_done);
            st.outbox_done = done;
        } else if !self
            .writable
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            log::warn!(
                "ledger: {} is written again ({written} call rows that waited)",
                self.path.display()
            );
        }
    }

    fn file_writable(&self) -> Option<bool> {
        Some(self.writable.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn store_up(&self) -> Option<bool> {
        Some(self.opened.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn raise(&self, alert: super::alerts::Alert) {
        if let Some(hook) = self.soft.get() {
            hook(alert);
        }
    }

    async fn limit(
        &self,
        checks: &[super::limits::Check],
        tokens: u64,
        now: i64,
    ) -> Result<Result<super::limits::Grant, super::limits::Limited>, super::StoreDown> {
        Ok(self
            .limiter
            .take(checks, tokens, now, super::reservation_id()))
    }

    fn unlimit(&self, grant: &super::limits::Grant, used: u64, undo: bool) {
        self.limiter.settle(grant, used, undo);
    }

    fn history(&self) -> Arc<super::history::History> {
        Arc::clone(&self.history)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_from_before_the_dialects_gets_their_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE calls (
                 ts INTEGER NOT NULL, request_id TEXT NOT NULL, user TEXT, teams TEXT, model TEXT,
                 prompt INTEGER NOT NULL, completion INTEGER NOT NULL, cached INTEGER NOT NULL,
                 reasoning INTEGER NOT NULL, web_searches INTEGER NOT NULL, cost_pico INTEGER,
                 estimated INTEGER NOT NULL, outcome TEXT NOT NULL, status INTEGER NOT NULL);
             INSERT INTO calls VALUES (1, 'r', 'u', '', 'm', 1, 2, 0, 0, 0, 5, 0, 'complete', 200);",
        )
        .unwrap();
        drop(old);
        for _ in 0..2 {
            // (Opening twice: the second finds the columns in place.)
            let db = open_db(&path).unwrap_or_else(|_| panic!("open"));
            let (api, writes): (String, i64) = db
                .query_row("SELECT api, cache_write FROM calls", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .unwrap();
            assert_eq!((api.as_str(), writes), ("chat_completions", 0));
        }
    }

    /// Every row lands with every column in its place.
    #[test]
    fn every_call_row_is_written_with_its_own_values() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LedgerConfig {
            path: dir.path().join("ledger.db"),
            flush_interval: Duration::from_secs(3600),
            ..LedgerConfig::default()
        };
        let ledger = Embedded::open(&cfg).unwrap();
        let n = 133;
        // Recent: older rows than `retention_days` are deleted as they are written.
        let now = super::super::now_unix();
        let row = |i: usize| CallRow {
            ts: now - 1000 + i as i64,
            request_id: format!("req-{i}"),
            user: (!i.is_multiple_of(3)).then(|| format!("user-{i}")),
            teams: (0..i % 3).map(|t| format!("team-{t}")).collect(),
            model: (!i.is_multiple_of(4)).then(|| format!("model-{i}")),
            api: crate::meter::Api::ALL.get(i % 6).copied(),
            usage: crate::meter::Usage {
                prompt: i as u64 * 10 + 1,
                completion: i as u64 * 10 + 2,
                cached: i as u64 * 10 + 3,
                cache_write: i as u64 * 10 + 7,
                cache_write_1h: 0,
                reasoning: i as u64 * 10 + 4,
                web_searches: i as u64 * 10 + 5,
            },
            cost_pico: (!i.is_multiple_of(5)).then_some(i as u64 * 1000 + 6),
            estimated: i.is_multiple_of(2),
            outcome: ["complete", "rejected"][i % 2],
            status: 200 + i as u16,
            duration_ms: Some(i as u64),
            usage_source: "reported",
        };
        for i in 0..n {
            ledger.record_call(row(i));
        }
        ledger.flush();
        let db = Connection::open(&cfg.path).unwrap();
        let mut q = db
            .prepare(
                "SELECT ts, request_id, user, teams, model, prompt, completion, cached, reasoning,
                 web_searches, cost_pico, estimated, outcome, status, api, cache_write
                 FROM calls ORDER BY ts",
            )
            .unwrap();
        let got: Vec<String> = q
            .query_map([], |r| {
                Ok(format!(
                    "{} {} {:?} {} {:?} {} {} {} {} {} {:?} {} {} {} {:?} {}",
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, i64>(8)?,
                    r.get::<_, i64>(9)?,
                    r.get::<_, Option<i64>>(10)?,
                    r.get::<_, bool>(11)?,
                    r.get::<_, String>(12)?,
                    r.get::<_, i64>(13)?,
                    r.get::<_, Option<String>>(14)?,
                    r.get::<_, i64>(15)?,
                ))
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let want: Vec<String> = (0..n)
            .map(|i| {
                let r = row(i);
                format!(
                    "{} {} {:?} {} {:?} {} {} {} {} {} {:?} {} {} {} {:?} {}",
                    r.ts,
                    r.request_id,
                    r.user,
                    r.teams.join(","),
                    r.model,
                    r.usage.prompt,
                    r.usage.completion,
                    r.usage.cached,
                    r.usage.reasoning,
                    r.usage.web_searches,
                    r.cost_pico,
                    r.estimated,
                    r.outcome,
                    r.status,
                    r.api.map(|a| a.as_str().to_string()),
                    r.usage.cache_write
                )
            })
            .collect();
        assert_eq!(got, want);
        // Rows as shipped to the shared reports: in order, one call each, and together what
        // a report of the file adds up to.
        let shipped = ledger.rows_after(0, 1000).unwrap();
        assert_eq!(shipped.len(), n);
        assert!(shipped.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(
            ledger.rows_after(shipped[99].0, 1000).unwrap().len(),
            n - 100
        );
        let mut by_row = std::collections::BTreeMap::<_, super::super::report::Totals>::new();
        for (_, ts, g, t) in shipped {
            assert_eq!(t.calls, 1);
            assert!(ts >= now - 1000);
            by_row.entry(g).or_default().add(&t);
        }
        let by_sql: std::collections::BTreeMap<_, _> =
            super::super::report::local(&cfg.path, 0, now + 1)
                .unwrap()
                .into_iter()
                .collect();
        assert_eq!(by_row, by_sql);
    }

    /// Rows past `retention_days` are deleted, but the newest stays: row ids keep growing
    /// (the Redis ledger ships rows by id).
    #[test]
    fn retention_keeps_the_newest_row_so_row_ids_keep_growing() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LedgerConfig {
            path: dir.path().join("ledger.db"),
            flush_interval: Duration::from_secs(3600),
            retention_days: 1,
            ..LedgerConfig::default()
        };
        let ledger = Embedded::open(&cfg).unwrap();
        let old = super::super::now_unix() - 3 * 86_400;
        let row = |ts: i64| CallRow {
            ts,
            request_id: format!("r{ts}"),
            user: None,
            teams: vec![],
            model: None,
            api: None,
            usage: crate::meter::Usage::default(),
            cost_pico: None,
            estimated: false,
            outcome: "complete",
            status: 200,
            duration_ms: None,
            usage_source: "none",
        };
        for i in 0..3 {
            ledger.record_call(row(old + i));
        }
        // Written, then the retention pass deletes the old rows (the newest kept).
        ledger.flush();
        *ledger.last_retention.lock().unwrap() = Instant::now() - Duration::from_secs(7200);
        ledger.record_call(row(old + 3));
        ledger.flush();
        let left = ledger.rows_after(0, 10).unwrap();
        assert_eq!(
            left.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
            vec![(4, old + 3)]
        );
        ledger.record_call(row(old + 4));
        ledger.flush();
        assert_eq!(ledger.rows_after(4, 10).unwrap()[0].0, 5);
    }

    /// Retention drops the rows, their team entries and the rollups from the same midnight of
    /// the budgets' zone: what is left agrees, however the rows fell across days.
    #[test]
    fn retention_drops_rows_and_rollups_from_the_same_midnight() {
        use super::super::report;
        let dir = tempfile::tempdir().unwrap();
        let zone = Zone::Fixed(chrono::FixedOffset::east_opt(-5 * 3600 - 1800).unwrap());
        let cfg = LedgerConfig {
            path: dir.path().join("ledger.db"),
            flush_interval: Duration::from_secs(3600),
            retention_days: 2,
            ..LedgerConfig::default()
        };
        let ledger = Embedded::open_in(&cfg, zone).unwrap();
        let now = super::super::now_unix();
        // Every 37 minutes over five days, in one team or two, written before retention runs.
        let n = 5 * 24 * 60 / 37;
        // (The last one after the retention pass is due: written, it runs the pass.)
        for i in 0..=n {
            if i == n {
                ledger.flush();
                *ledger.last_retention.lock().unwrap() = Instant::now() - Duration::from_secs(7200);
            }
            ledger.record_call(CallRow {
                ts: now - 5 * 86_400 + i * 37 * 60,
                request_id: format!("r{i}"),
                user: Some(format!("u{}", i % 4)),
                teams: (0..1 + i % 2).map(|t| format!("t{t}")).collect(),
                model: Some("m".into()),
                api: None,
                usage: crate::meter::Usage {
                    prompt: 10,
                    ..Default::default()
                },
                cost_pico: Some(1000 + i as u64),
                estimated: false,
                outcome: "complete",
                status: 200,
                duration_ms: None,
                usage_source: "reported",
            });
        }
        ledger.flush();
        let db = Connection::open(&cfg.path).unwrap();
        let one = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
        let rows = one("SELECT COUNT(*) FROM calls");
        assert!(rows > 0 && rows < n, "{rows} of {n} left");
        let first = one("SELECT MIN(ts) FROM calls");
        let cutoff = report::midnight(report::date_of(now - 2 * 86_400, zone), zone);
        assert!(
            first >= cutoff && first < cutoff + 37 * 60,
            "rows start at the midnight"
        );
        assert_eq!(one("SELECT SUM(n) FROM roll_quarter"), rows);
        assert_eq!(one("SELECT SUM(n) FROM roll_user_day"), rows);
        assert_eq!(one("SELECT SUM(n) FROM roll_day"), rows);
        assert_eq!(
            one("SELECT COUNT(*) FROM call_teams"),
            one("SELECT SUM(1 + (teams LIKE '%,%')) FROM calls"),
            "no team entry outlives its row"
        );
        assert_eq!(
            one("SELECT COUNT(*) FROM call_teams WHERE call NOT IN (SELECT rowid FROM calls)"),
            0
        );
        assert_eq!(
            one("SELECT SUM(cost) FROM roll_day"),
            one("SELECT SUM(cost_pico) FROM calls")
        );
    }

    /// A file that is not a ledger stops the start (an outage would be waited out; this is
    /// not one), with what to do; a directory that does not exist yet is waited for.
    #[test]
    fn a_corrupt_file_stops_the_start_and_a_missing_directory_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let cfg = LedgerConfig {
            path,
            ..LedgerConfig::default()
        };
        let e = Embedded::open(&cfg).err().unwrap();
        assert!(e.contains("not a database") && e.contains("backup"), "{e}");
        let later = LedgerConfig {
            path: dir.path().join("not-yet").join("ledger.db"),
            ..LedgerConfig::default()
        };
        let l = Embedded::open(&later).unwrap();
        assert_eq!(l.store_up(), Some(false));
        std::fs::create_dir(dir.path().join("not-yet")).unwrap();
        l.flush();
        assert_eq!(l.store_up(), Some(true));
    }

    /// A file that opens late (its disk was read-only at start): the spend it holds adds to
    /// what was settled in memory meanwhile, window by window.
    #[test]
    fn a_late_open_adds_the_files_spend_to_what_was_settled_meanwhile() {
        let day = 86_400;
        let pico = |p| Amount { pico: p, tokens: 0 };
        let mut st = State::default();
        st.counter("user:a", Window::Daily, day).spent = pico(5);
        st.mark_dirty("user:a", Window::Daily);
        // b's window ended before the file opened: its spend waits to be written as it ended.
        st.counter("user:b", Window::Daily, 0).spent = pico(2);
        st.mark_dirty("user:b", Window::Daily);
        st.counter("user:b", Window::Daily, day);
        let file: HashMap<(String, Window, i64), Amount> = [
            (("user:a".into(), Window::Daily, day), pico(7)),
            (("user:a".into(), Window::Daily, 0), pico(3)),
            (("user:b".into(), Window::Daily, 0), pico(4)),
            (("user:c".into(), Window::Daily, day), pico(9)),
            (("user:c".into(), Window::Daily, 0), pico(1)),
        ]
        .into_iter()
        .collect();
        st.add_from_file(file);
        let spent = |st: &State, k: &str| {
            st.counters
                .get(k, Window::Daily)
                .map(|c| (c.start, c.spent.pico))
        };
        assert_eq!(spent(&st, "user:a"), Some((day, 12)));
        assert_eq!(spent(&st, "user:b"), Some((day, 0)));
        assert_eq!(spent(&st, "user:c"), Some((day, 9)));
        let written: Vec<(String, i64, u64)> = st
            .take_dirty()
            .into_iter()
            .map(|(k, _, c)| (k, c.start, c.spent.pico))
            .collect();
        assert!(written.contains(&("user:b".into(), 0, 6)), "{written:?}");
        assert!(written.contains(&("user:a".into(), day, 12)), "{written:?}");
    }

    /// A window that ends with spend not yet written still gets its row, under its own
    /// start, and a failed write keeps it for the next one.
    #[test]
    fn an_ended_windows_unwritten_spend_is_written_as_it_ended() {
        let day = 86_400;
        let mut st = State::default();
        st.counter("user:a", Window::Daily, 0).spent.pico = 7;
        st.mark_dirty("user:a", Window::Daily);
        // The next day's first call, before a flush.
        st.counter("user:a", Window::Daily, day).spent.pico = 2;
        st.mark_dirty("user:a", Window::Daily);
        let rows = |spend: &[(String, Window, Counter)]| {
            spend
                .iter()
                .map(|(k, w, c)| (k.clone(), *w, c.start, c.spent.pico))
                .collect::<Vec<_>>()
        };
        let want = vec![
            ("user:a".to_string(), Window::Daily, 0, 7),
            ("user:a".to_string(), Window::Daily, day, 2),
        ];
        let spend = st.take_dirty();
        assert_eq!(rows(&spend), want);
        // The write failed: both are written next time, the current window with its newest
        // spend.
        st.untake_dirty(spend);
        st.counter("user:a", Window::Daily, day).spent.pico = 3;
        let again = st.take_dirty();
        assert_eq!(
            rows(&again),
            [
                want[0].clone(),
                ("user:a".to_string(), Window::Daily, day, 3)
            ]
        );
        assert!(st.take_dirty().is_empty());
    }

    #[test]
    fn idle_counters_of_ended_windows_leave_memory_and_busy_ones_stay() {
        let mut st = State::default();
        let day = 86_400;
        // Used yesterday, nothing held: its window has ended.
        st.counter("user:old", Window::Daily, 0).touched = 100;
        // Used yesterday but a call still holds a reservation: kept.
        let held = st.counter("user:held", Window::Daily, 0);
        held.touched = 100;
        held.reserved.pico = 5;
        // Used yesterday, spend not yet written to the file: kept until it is.
        st.counter("user:dirty", Window::Daily, 0).touched = 100;
        st.mark_dirty("user:dirty", Window::Daily);
        // Used just now, and a total that never ends: kept.
        st.counter("user:now", Window::Daily, day).touched = 2 * day;
        st.counter("user:old", Window::Total, 0).touched = 100;
        // One shard every two seconds: a whole round.
        let t0 = 2 * day + 10;
        for i in 0..SHARDS as i64 {
            st.evict_idle(t0 + 2 * i);
        }
        let mut left: Vec<String> = st
            .counters
            .iter()
            .map(|(k, _)| format!("{}/{}", k.name, k.window))
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "user:dirty/daily",
                "user:held/daily",
                "user:now/daily",
                "user:old/total"
            ]
        );
        // At most one shard every two seconds: a second look in the same second does nothing.
        assert_eq!(st.take_dirty().len(), 1);
        let before = st.evict_next;
        st.evict_idle(t0 + 2 * (SHARDS as i64 - 1));
        assert_eq!(st.evict_next, before);
        assert_eq!(st.counters.len(), 4);
    }
}

#[cfg(test)]
mod evict_cost {
    use super::*;

    /// A measurement, not a check: how long eviction holds the state lock, the figures in
    /// docs/operations.md (`cargo test --release --lib evict_idle_time -- --ignored
    /// --nocapture`).
    #[test]
    #[ignore]
    fn evict_idle_time() {
        for n in [10_000usize, 100_000, 1_000_000] {
            let mut st = State::default();
            for i in 0..n {
                st.counter(&format!("user:u{i}"), Window::Daily, 0).touched = 100;
            }
            // Half busy (kept), half idle (evicted).
            for i in (0..n).step_by(2) {
                st.counter(&format!("user:u{i}"), Window::Daily, 0).touched = 2 * 86_400;
            }
            // The longest of a round of shards: what one call may wait for.
            let mut longest = std::time::Duration::ZERO;
            for i in 0..SHARDS as i64 {
                let t = std::time::Instant::now();
                st.evict_idle(2 * 86_400 + 10 + 2 * i);
                longest = longest.max(t.elapsed());
            }
            assert_eq!(st.counters.len(), n / 2);
            eprintln!("{n} counters, half idle: longest evict_idle {longest:?}");
        }
    }
}
