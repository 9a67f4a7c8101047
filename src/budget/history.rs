//! What the admin page reads of a ledger file: totals and series from its rollups, top
//! spenders, a user's or team's spend per model per day and their recent calls. A read-only
//! connection of its own (the file is in WAL mode: reading never blocks the writer).
//!
//! The Redis ledger answers the same questions from what all replicas share
//! ([`SharedOverview`], `Ledger::shared_by_model`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use chrono::NaiveDate;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::policy::Zone;
use super::report::{self, Totals};
use super::rollup::{self, QUARTER, SUMS};

/// Who a page is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    User,
    Team,
    Model,
}

/// One call as the page lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CallView {
    pub time: String,
    pub request_id: String,
    pub user: Option<String>,
    pub model: Option<String>,
    pub api: Option<String>,
    pub outcome: String,
    pub status: u16,
    pub usage_source: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub cache_write_tokens: u64,
    pub reasoning_tokens: u64,
    pub web_searches: u64,
    pub cost_usd: Option<String>,
    pub duration_ms: Option<u64>,
}

/// Pico-USD as the exact decimal string of US dollars the admin API answers (`"0.000123"`).
pub fn usd(pico: u64) -> String {
    crate::meter::Pico(pico).to_string()
}

/// RFC 3339 in UTC, to the second.
pub fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A reader of one ledger file.
pub struct History {
    path: PathBuf,
    zone: Zone,
    db: Mutex<Option<Connection>>,
}

impl History {
    pub fn new(path: PathBuf, zone: Zone) -> Self {
        History {
            path,
            zone,
            db: Mutex::new(None),
        }
    }

    /// The zone the file's days are counted in.
    pub fn zone(&self) -> Zone {
        self.zone
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, String> {
        let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        if db.is_none() {
            let c = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(|e| format!("ledger {}: {e}", self.path.display()))?;
            *db = Some(c);
        }
        let c = db.as_ref().ok_or("no ledger")?;
        f(c).map_err(|e| {
            // A file replaced or not yet migrated: open it again next time.
            *db = None;
            format!("ledger {}: {e}", self.path.display())
        })
    }

    /// Every call in `[from, to)` (Unix seconds, on quarter hours), summed per quarter hour:
    /// (the quarter's start, its totals), oldest first, only quarters with calls.
    pub fn quarters(&self, from: i64, to: i64) -> Result<Vec<(i64, Totals)>, String> {
        self.with(|db| {
            let mut q = db.prepare_cached(&format!(
                "SELECT q, '', '', '', '', {SUMS} FROM roll_quarter
                 WHERE q >= ?1 AND q < ?2 GROUP BY q ORDER BY q"
            ))?;
            let rows = q.query_map(
                params![from.div_euclid(QUARTER), to.div_euclid(QUARTER)],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? * QUARTER,
                        report::group_and_totals(r, 1)?.1,
                    ))
                },
            )?;
            rows.collect()
        })
    }

    /// The `limit` users, teams or models that spent most on days `from..=to`.
    pub fn top(
        &self,
        dim: Dim,
        from: NaiveDate,
        to: NaiveDate,
        limit: usize,
    ) -> Result<Vec<(String, Totals)>, String> {
        let sql = match dim {
            Dim::User => format!(
                "SELECT user, '', '', '', '', {SUMS} FROM roll_user_day
                 WHERE day >= ?1 AND day <= ?2
                 GROUP BY user ORDER BY SUM(cost) DESC, user LIMIT ?3"
            ),
            Dim::Model => format!(
                "SELECT model, '', '', '', '', {SUMS} FROM roll_model_day
                 WHERE day >= ?1 AND day <= ?2
                 GROUP BY model ORDER BY SUM(cost) DESC, model LIMIT ?3"
            ),
            Dim::Team => format!(
                "SELECT team, '', '', '', '', {SUMS} FROM roll_team_day
                 WHERE day >= ?1 AND day <= ?2
                 GROUP BY team ORDER BY SUM(cost) DESC, team LIMIT ?3"
            ),
        };
        self.with(|db| {
            let mut q = db.prepare_cached(&sql)?;
            let rows = q.query_map(
                params![
                    rollup::day_number(from),
                    rollup::day_number(to),
                    limit as i64
                ],
                |r| Ok((r.get::<_, String>(0)?, report::group_and_totals(r, 1)?.1)),
            )?;
            rows.collect()
        })
    }

    /// A user's or team's spend per day and model on days `from..=to`.
    pub fn by_model(
        &self,
        dim: Dim,
        name: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<(NaiveDate, String, Totals)>, String> {
        let sql = match dim {
            Dim::Team => format!(
                "SELECT day, model, '', '', '', {SUMS} FROM roll_team_day
                 WHERE team = ?1 AND day >= ?2 AND day <= ?3 GROUP BY day, model"
            ),
            _ => format!(
                "SELECT day, model, '', '', '', {SUMS} FROM roll_day
                 WHERE user = ?1 AND day >= ?2 AND day <= ?3 GROUP BY day, model"
            ),
        };
        self.with(|db| {
            let mut q = db.prepare_cached(&sql)?;
            let rows = q.query_map(
                params![name, rollup::day_number(from), rollup::day_number(to)],
                |r| {
                    Ok((
                        rollup::day_of_number(r.get(0)?),
                        r.get::<_, String>(1)?,
                        report::group_and_totals(r, 1)?.1,
                    ))
                },
            )?;
            rows.collect()
        })
    }

    /// A user's or team's calls, newest first: up to `limit` before the cursor `before` (a
    /// row id), and the cursor of the next page.
    pub fn calls(
        &self,
        dim: Dim,
        name: &str,
        before: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<CallView>, Option<i64>), String> {
        const COLUMNS: &str = "c.rowid, c.ts, c.request_id, c.user, c.model, c.api, c.outcome,
            c.status, c.usage_source, c.estimated, c.prompt, c.completion, c.cached,
            c.cache_write, c.reasoning, c.web_searches, c.cost_pico, c.duration_ms";
        let sql = match dim {
            Dim::Team => format!(
                "SELECT {COLUMNS} FROM call_teams t JOIN calls c ON c.rowid = t.call
                 WHERE t.team = ?1 AND t.call < ?2 ORDER BY t.call DESC LIMIT ?3"
            ),
            _ => format!(
                "SELECT {COLUMNS} FROM calls c INDEXED BY calls_user
                 WHERE c.user = ?1 AND c.rowid < ?2 ORDER BY c.rowid DESC LIMIT ?3"
            ),
        };
        let limit = limit.clamp(1, 500);
        self.with(|db| {
            let mut q = db.prepare_cached(&sql)?;
            let rows = q.query_map(
                params![name, before.unwrap_or(i64::MAX), limit as i64 + 1],
                |r| {
                    let n = |i: usize| {
                        r.get::<_, Option<i64>>(i)
                            .map(|v| v.unwrap_or(0).max(0) as u64)
                    };
                    let estimated: bool = r.get(9)?;
                    let source: Option<String> = r.get(8)?;
                    Ok((
                        r.get::<_, i64>(0)?,
                        CallView {
                            time: rfc3339(r.get(1)?),
                            request_id: r.get(2)?,
                            user: r.get(3)?,
                            model: r.get(4)?,
                            api: r.get(5)?,
                            outcome: r.get(6)?,
                            status: r.get::<_, i64>(7)?.clamp(0, 999) as u16,
                            // Rows from before the column: estimated or reported.
                            usage_source: source.unwrap_or_else(|| {
                                if estimated { "estimated" } else { "reported" }.into()
                            }),
                            prompt_tokens: n(10)?,
                            completion_tokens: n(11)?,
                            cached_tokens: n(12)?,
                            cache_write_tokens: n(13)?,
                            reasoning_tokens: n(14)?,
                            web_searches: n(15)?,
                            cost_usd: r
                                .get::<_, Option<i64>>(16)?
                                .map(|c| crate::meter::Pico(c.max(0) as u64).to_string()),
                            duration_ms: r.get::<_, Option<i64>>(17)?.map(|d| d.max(0) as u64),
                        },
                    ))
                },
            )?;
            let mut v: Vec<(i64, CallView)> = rows.collect::<rusqlite::Result<_>>()?;
            let next = (v.len() > limit).then(|| {
                v.truncate(limit);
                v.last().map(|(id, _)| *id)
            });
            Ok((v.into_iter().map(|(_, c)| c).collect(), next.flatten()))
        })
    }

    /// The newest `limit` budget alerts this replica raised (`budgets.alerts`), with whether
    /// every webhook took them: (alert, delivered).
    pub fn alerts(&self, limit: usize) -> Result<Vec<(super::alerts::Alert, bool)>, String> {
        self.with(|db| {
            let exists = db
                .prepare_cached(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alerts'",
                )?
                .exists([])?;
            if !exists {
                return Ok(Vec::new());
            }
            let mut q = db.prepare_cached(
                "SELECT payload, delivered FROM alerts ORDER BY rowid DESC LIMIT ?1",
            )?;
            let rows = q.query_map(params![limit as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?))
            })?;
            Ok(rows
                .flatten()
                .filter_map(|(p, d)| Some((serde_json::from_str(&p).ok()?, d)))
                .collect())
        })
    }

    /// Calls since `since` (Unix seconds) that the upstream failed: an error status of its
    /// own, a broken connection, no answer in time.
    pub fn upstream_errors_since(&self, since: i64) -> Result<u64, String> {
        self.with(|db| {
            db.prepare_cached(
                "SELECT COUNT(*) FROM calls WHERE ts >= ?1
                 AND outcome IN ('upstream_error', 'upstream_reset', 'timeout')",
            )?
            .query_row(params![since], |r| r.get::<_, i64>(0))
            .optional()
            .map(|n| n.unwrap_or(0).max(0) as u64)
        })
    }
}

/// The admin page's overview as Redis shares it (the summaries every replica ships).
#[derive(Debug, Default)]
pub struct SharedOverview {
    /// Totals of each day asked for that has calls.
    pub daily: BTreeMap<NaiveDate, Totals>,
    pub users: Vec<(String, Totals)>,
    pub teams: Vec<(String, Totals)>,
    pub models: Vec<(String, Totals)>,
}
