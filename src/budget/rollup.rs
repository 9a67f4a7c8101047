//! The ledger file's rollups, so that the admin page and `tokentap spend` answer from a few
//! thousand rows instead of every call (a ledger keeps up to millions of call rows):
//!
//! - `roll_quarter`: every figure of all calls per quarter hour (UTC; every zone's hours and
//!   midnights fall on a quarter hour): the overview's totals and its hourly chart;
//! - `roll_day`: per day of the budgets' zone and group of calls (user, teams, model, API):
//!   reports, top users and models, a user's spend per model;
//! - `roll_user_day`, `roll_model_day`: per day and user, per day and model (top spenders and
//!   reports by user or model over months read a few thousand rows, not every group's);
//! - `roll_team_day`: per day, team and model (a call counts once under each of its teams);
//! - `call_teams`: the calls of each team, newest first, for a team's recent calls.
//!
//! They are written in the same transaction as the call rows, so they always agree with them.
//! A ledger from before them, or one whose days were counted in another zone, has them built
//! again from its call rows when it opens.

use std::collections::HashMap;

use rusqlite::{params, Connection, Transaction};

use super::policy::Zone;
use super::report::{self, Group, Totals};

/// Every rollup's figures, in [`Totals::fields`] order (`cost` is `$`).
const FIGURE_COLUMNS: &str = "n INTEGER NOT NULL, p INTEGER NOT NULL, c INTEGER NOT NULL,
    k INTEGER NOT NULL, w INTEGER NOT NULL, r INTEGER NOT NULL, s INTEGER NOT NULL,
    cost INTEGER NOT NULL, e INTEGER NOT NULL, u INTEGER NOT NULL, x INTEGER NOT NULL";

/// The rollups' tables and indexes.
pub(super) fn schema() -> String {
    let f = FIGURE_COLUMNS;
    format!(
        "CREATE INDEX IF NOT EXISTS calls_user ON calls (user);
         CREATE TABLE IF NOT EXISTS call_teams (
             team TEXT NOT NULL, call INTEGER NOT NULL, PRIMARY KEY (team, call)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS roll_quarter (q INTEGER PRIMARY KEY, {f});
         CREATE TABLE IF NOT EXISTS roll_day (
             day INTEGER NOT NULL, user TEXT NOT NULL, teams TEXT NOT NULL, model TEXT NOT NULL,
             api TEXT NOT NULL, {f},
             PRIMARY KEY (day, user, teams, model, api)) WITHOUT ROWID;
         CREATE INDEX IF NOT EXISTS roll_day_user ON roll_day (user, day);
         CREATE TABLE IF NOT EXISTS roll_user_day (
             day INTEGER NOT NULL, user TEXT NOT NULL, {f},
             PRIMARY KEY (day, user)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS roll_model_day (
             day INTEGER NOT NULL, model TEXT NOT NULL, {f},
             PRIMARY KEY (day, model)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS roll_team_day (
             day INTEGER NOT NULL, team TEXT NOT NULL, model TEXT NOT NULL, {f},
             PRIMARY KEY (day, team, model)) WITHOUT ROWID;"
    )
}

/// The sums of a rollup's figures, laid out as [`report::group_and_totals`] reads them after
/// the group (the count first).
pub const SUMS: &str = "SUM(n), SUM(p), SUM(c), SUM(k), SUM(w), SUM(r), SUM(s), SUM(cost), \
                        SUM(e), SUM(u), SUM(x)";

/// The figures' columns, in [`Totals::fields`] order.
const FIGURES: &str = "n, p, c, k, w, r, s, cost, e, u, x";

/// Seconds in a rollup quarter.
pub const QUARTER: i64 = 900;

/// A day of the budgets' zone as the rollups number it (days since 0001-01-01).
pub fn day_number(d: chrono::NaiveDate) -> i64 {
    use chrono::Datelike;
    i64::from(d.num_days_from_ce())
}

/// The date of a day number.
pub fn day_of_number(n: i64) -> chrono::NaiveDate {
    i32::try_from(n)
        .ok()
        .and_then(chrono::NaiveDate::from_num_days_from_ce_opt)
        .unwrap_or_default()
}

/// What a batch of calls adds to the rollups, summed before it is written. Its keys borrow
/// the calls' own strings (a group without a user, model or API has `""` there, as the
/// tables keep it): summing a flush's rows allocates per distinct key, not per row.
pub(super) struct Batch<'a> {
    zone: Zone,
    /// The day last found, and the instants it spans: rows come in time order.
    last_day: Option<(i64, i64, i64)>,
    quarters: HashMap<i64, Totals>,
    days: HashMap<(i64, &'a str, &'a str, &'a str, &'a str), Totals>,
    /// Per day and user, per day and model: the one-key rollups.
    user_days: HashMap<(i64, &'a str), Totals>,
    model_days: HashMap<(i64, &'a str), Totals>,
    team_days: HashMap<(i64, &'a str, &'a str), Totals>,
}

impl<'a> Batch<'a> {
    pub(super) fn new(zone: Zone) -> Self {
        Batch {
            zone,
            last_day: None,
            quarters: HashMap::new(),
            days: HashMap::new(),
            user_days: HashMap::new(),
            model_days: HashMap::new(),
            team_days: HashMap::new(),
        }
    }

    /// The number of the day (of the zone) `ts` falls in.
    fn day(&mut self, ts: i64) -> i64 {
        match self.last_day {
            Some((n, from, to)) if (from..to).contains(&ts) => n,
            _ => {
                let d = report::date_of(ts, self.zone);
                let from = report::midnight(d, self.zone);
                let to = d
                    .succ_opt()
                    .map_or(i64::MAX, |next| report::midnight(next, self.zone));
                let n = day_number(d);
                // (A day whose bounds do not hold `ts`, at a zone's odd change, is not kept.)
                if (from..to).contains(&ts) {
                    self.last_day = Some((n, from, to));
                }
                n
            }
        }
    }

    /// Adds a call (or a group of calls) made at `ts`; `teams` joined by commas.
    pub(super) fn add(
        &mut self,
        ts: i64,
        (user, teams, model, api): (&'a str, &'a str, &'a str, &'a str),
        t: &Totals,
    ) {
        self.quarters
            .entry(ts.div_euclid(QUARTER))
            .or_default()
            .add(t);
        let day = self.day(ts);
        for team in teams.split(',').filter(|t| !t.is_empty()) {
            self.team_days.entry((day, team, model)).or_default().add(t);
        }
        self.user_days.entry((day, user)).or_default().add(t);
        self.model_days.entry((day, model)).or_default().add(t);
        self.days
            .entry((day, user, teams, model, api))
            .or_default()
            .add(t);
    }

    /// [`Batch::add`] of a group as reports read it.
    pub(super) fn add_group(&mut self, ts: i64, g: &'a Group, t: &Totals) {
        let s = |o: &'a Option<String>| o.as_deref().unwrap_or("");
        self.add(ts, (s(&g.user), s(&g.teams), s(&g.model), s(&g.api)), t);
    }

    pub(super) fn write(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let set: String = FIGURES
            .split(", ")
            .map(|f| format!("{f} = {f} + excluded.{f}"))
            .collect::<Vec<_>>()
            .join(", ");
        let v = |t: &Totals| t.fields().map(|(_, v)| v.min(i64::MAX as u64) as i64);
        let mut q = tx.prepare_cached(&format!(
            "INSERT INTO roll_quarter (q, {FIGURES}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9,
             ?10, ?11, ?12) ON CONFLICT (q) DO UPDATE SET {set}"
        ))?;
        for (quarter, t) in &self.quarters {
            let f = v(t);
            q.execute(params![
                quarter, f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10]
            ])?;
        }
        let mut d = tx.prepare_cached(&format!(
            "INSERT INTO roll_day (day, user, teams, model, api, {FIGURES}) VALUES (?1, ?2, ?3,
             ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
             ON CONFLICT (day, user, teams, model, api) DO UPDATE SET {set}"
        ))?;
        for ((day, user, teams, model, api), t) in &self.days {
            let f = v(t);
            d.execute(params![
                day, user, teams, model, api, f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8],
                f[9], f[10]
            ])?;
        }
        for (table, key, rows) in [
            ("roll_user_day", "user", &self.user_days),
            ("roll_model_day", "model", &self.model_days),
        ] {
            let mut one = tx.prepare_cached(&format!(
                "INSERT INTO {table} (day, {key}, {FIGURES}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7,
                 ?8, ?9, ?10, ?11, ?12, ?13) ON CONFLICT (day, {key}) DO UPDATE SET {set}"
            ))?;
            for ((day, name), t) in rows {
                let f = v(t);
                one.execute(params![
                    day, name, f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10]
                ])?;
            }
        }
        let mut td = tx.prepare_cached(&format!(
            "INSERT INTO roll_team_day (day, team, model, {FIGURES}) VALUES (?1, ?2, ?3, ?4, ?5,
             ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
             ON CONFLICT (day, team, model) DO UPDATE SET {set}"
        ))?;
        for ((day, team, model), t) in &self.team_days {
            let f = v(t);
            td.execute(params![
                day, team, model, f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10]
            ])?;
        }
        Ok(())
    }
}

/// The meta key saying in which zone the rollups count days (and which rollups the file has:
/// [`VERSION`] before the zone's name).
pub const ZONE_KEY: &str = "rollup_zone";
/// Changes when the rollups do: a file with another version has them built again.
const VERSION: &str = "2";

/// What [`ZONE_KEY`] holds for rollups of this version counted in `zone`.
pub fn zone_mark(zone: Zone) -> String {
    format!("{VERSION} {}", zone.name())
}

/// Builds the rollups again from the call rows when the file has none yet (a ledger from
/// before them) or counted its days in another zone than `zone`.
pub(super) fn ensure(db: &mut Connection, zone: Zone) -> rusqlite::Result<()> {
    let have: Option<String> = db
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            params![ZONE_KEY],
            |r| r.get(0),
        )
        .ok();
    if have.as_deref() == Some(zone_mark(zone).as_str()) {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let tx = db.transaction()?;
    tx.execute_batch(
        "DELETE FROM roll_quarter; DELETE FROM roll_day; DELETE FROM roll_team_day;
         DELETE FROM roll_user_day; DELETE FROM roll_model_day; DELETE FROM call_teams;
         INSERT INTO call_teams (team, call)
             WITH RECURSIVE split(call, team, rest) AS (
                 SELECT rowid, '', teams || ',' FROM calls WHERE teams != ''
                 UNION ALL
                 SELECT call, substr(rest, 1, instr(rest, ',') - 1),
                        substr(rest, instr(rest, ',') + 1)
                 FROM split WHERE rest != '')
             SELECT team, call FROM split WHERE team != '';",
    )?;
    // In pieces: the rows of a piece are held while its batch borrows them.
    let mut rows = 0u64;
    let mut after = 0i64;
    loop {
        let piece: Vec<(i64, i64, Group, Totals)> = {
            let mut q = tx.prepare_cached(&format!(
                "SELECT rowid, ts, {}, 1, {} FROM calls WHERE rowid > ?1 ORDER BY rowid LIMIT 50000",
                report::GROUP_COLUMNS,
                report::SUM_COLUMNS.replace("SUM(", "(")
            ))?;
            let it = q.query_map(params![after], |r| {
                let (g, t) = report::group_and_totals(r, 2)?;
                Ok((r.get(0)?, r.get(1)?, g, t))
            })?;
            it.collect::<rusqlite::Result<_>>()?
        };
        let Some(&(last, ..)) = piece.last() else {
            break;
        };
        let mut batch = Batch::new(zone);
        for (_, ts, g, t) in &piece {
            batch.add_group(*ts, g, t);
        }
        batch.write(&tx)?;
        rows += piece.len() as u64;
        after = last;
    }
    tx.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = ?2",
        params![ZONE_KEY, zone_mark(zone)],
    )?;
    tx.commit()?;
    if rows > 0 {
        log::info!(
            "ledger: rollups built from {rows} call rows in {:?} (days of {})",
            started.elapsed(),
            zone.name()
        );
    }
    Ok(())
}

/// Drops what retention drops of the calls (before `cutoff`, a midnight of `zone`, in Unix
/// seconds): the rollups before it, and the team entries of the rows about to be deleted
/// (run before the rows are).
pub(super) fn expire(tx: &Transaction<'_>, cutoff: i64, zone: Zone) -> rusqlite::Result<()> {
    tx.execute(
        "DELETE FROM call_teams WHERE call IN (SELECT rowid FROM calls
         WHERE ts < ?1 AND rowid < (SELECT MAX(rowid) FROM calls))",
        params![cutoff],
    )?;
    tx.execute(
        "DELETE FROM roll_quarter WHERE q < ?1",
        params![cutoff.div_euclid(QUARTER)],
    )?;
    let day = day_number(report::date_of(cutoff, zone));
    tx.execute("DELETE FROM roll_day WHERE day < ?1", params![day])?;
    tx.execute("DELETE FROM roll_team_day WHERE day < ?1", params![day])?;
    tx.execute("DELETE FROM roll_user_day WHERE day < ?1", params![day])?;
    tx.execute("DELETE FROM roll_model_day WHERE day < ?1", params![day])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::embedded::Embedded;
    use crate::budget::policy::{Backend, LedgerConfig};
    use crate::budget::{CallRow, Ledger};
    use std::time::Duration;

    fn row(i: u64, ts: i64, users: u64, teams: &[&str]) -> CallRow {
        CallRow {
            ts,
            request_id: format!("r{i}"),
            user: (!i.is_multiple_of(7)).then(|| format!("u{}", i % users.max(1))),
            teams: teams
                .iter()
                .take((i % 3) as usize)
                .map(|t| t.to_string())
                .collect(),
            model: (!i.is_multiple_of(5)).then(|| format!("m{}", i % 3)),
            api: crate::meter::Api::ALL.get((i % 6) as usize).copied(),
            usage: crate::meter::Usage {
                prompt: i * 3 + 1,
                completion: i * 2,
                cached: i % 4,
                cache_write: i % 2,
                cache_write_1h: 0,
                reasoning: i % 3,
                web_searches: i % 2,
            },
            cost_pico: (!i.is_multiple_of(4)).then_some(i * 1_000_003),
            estimated: i.is_multiple_of(2),
            outcome: ["complete", "upstream_error", "complete"][(i % 3) as usize],
            status: [200, 502, 429][(i % 3) as usize],
            duration_ms: Some(i),
            usage_source: "reported",
        }
    }

    fn sorted(mut v: Vec<(Group, Totals)>) -> Vec<(Group, Totals)> {
        for (g, _) in &mut v {
            // A row's empty teams read back as "" from the calls, NULL from a rollup.
            if g.teams.as_deref() == Some("") {
                g.teams = None;
            }
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]
        /// Whatever the calls (times across days and zones, users, teams, outcomes), a report
        /// from the day rollups equals one summed from the call rows, in the zone the ledger
        /// counts days in; opened in another zone, the rollups are rebuilt for it.
        #[test]
        fn reports_from_rollups_equal_reports_from_calls(
            times in proptest::collection::vec(0i64..40 * 86_400, 1..120),
            users in 1u64..9,
            zone_minutes in proptest::sample::select(vec![0i32, 330, -300, 525, 765]),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let cfg = LedgerConfig {
                path: dir.path().join("ledger.db"),
                flush_interval: Duration::from_secs(3600),
                backend: Backend::Embedded,
                retention_days: 0,
                ..LedgerConfig::default()
            };
            let base = crate::budget::now_unix() - 45 * 86_400;
            let zone = Zone::Fixed(chrono::FixedOffset::east_opt(zone_minutes * 60).unwrap());
            {
                let ledger = Embedded::open_in(&cfg, Zone::utc()).unwrap();
                for (i, t) in times.iter().enumerate() {
                    ledger.record_call(row(i as u64, base + t, users, &["a", "b,c"]));
                }
                ledger.flush();
            }
            for z in [Zone::utc(), zone] {
                let ledger = Embedded::open_in(&cfg, z).unwrap();
                drop(ledger);
                let today = report::date_of(crate::budget::now_unix(), z);
                let (from, to) = (today - chrono::Days::new(50), today - chrono::Days::new(10));
                let calls = report::local(
                    &cfg.path,
                    report::midnight(from, z),
                    report::midnight(to + chrono::Days::new(1), z),
                )
                .unwrap();
                let rolled = report::spend(&cfg, z, from, to, report::By::Api, false).unwrap();
                proptest::prop_assert_eq!(sorted(rolled), sorted(calls.clone()));
                for by in [report::By::User, report::By::Team, report::By::Model, report::By::Api] {
                    for format in [report::Format::Json, report::Format::Table] {
                        let rolled = report::spend(&cfg, z, from, to, by, false).unwrap();
                        proptest::prop_assert_eq!(
                            report::render(rolled, by, format),
                            report::render(calls.clone(), by, format)
                        );
                    }
                }
                // The quarter hours hold every call once.
                let h = crate::budget::history::History::new(cfg.path.clone(), z);
                let q: u64 = h
                    .quarters(base - 86_400, base + 41 * 86_400)
                    .unwrap()
                    .iter()
                    .map(|(_, t)| t.calls)
                    .sum();
                proptest::prop_assert_eq!(q, times.len() as u64);
            }
        }
    }
}
