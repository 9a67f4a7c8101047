//! `tokentap spend`: spend per user, team, model or API over a date range, from the per-call
//! rows of a ledger file or (the Redis ledger) the per-day totals every replica ships to Redis,
//! as a table, CSV or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use chrono::NaiveDate;
use rusqlite::{params, Connection, OpenFlags};

use super::policy::Zone;
use crate::meter::Pico;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    User,
    Team,
    Model,
    /// The API dialect (`chat_completions`, `responses`, `messages`, ...).
    Api,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// What a group of calls adds up to (a single call: `calls` is 1).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    pub calls: u64,
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub cache_write: u64,
    pub reasoning: u64,
    pub searches: u64,
    pub cost: u64,
    pub estimated: u64,
    pub unpriced: u64,
    /// Calls that did not complete (an error status, refused, cut off, timed out).
    pub errors: u64,
}

impl Totals {
    pub fn add(&mut self, o: &Totals) {
        for ((_, v), (_, w)) in self.fields_mut().into_iter().zip(o.fields()) {
            *v += w;
        }
    }

    /// Each figure with a one-letter name (how the Redis ledger stores it).
    pub fn fields(&self) -> [(char, u64); 11] {
        [
            ('n', self.calls),
            ('p', self.prompt),
            ('c', self.completion),
            ('k', self.cached),
            ('w', self.cache_write),
            ('r', self.reasoning),
            ('s', self.searches),
            ('$', self.cost),
            ('e', self.estimated),
            ('u', self.unpriced),
            ('x', self.errors),
        ]
    }

    fn fields_mut(&mut self) -> [(char, &mut u64); 11] {
        [
            ('n', &mut self.calls),
            ('p', &mut self.prompt),
            ('c', &mut self.completion),
            ('k', &mut self.cached),
            ('w', &mut self.cache_write),
            ('r', &mut self.reasoning),
            ('s', &mut self.searches),
            ('$', &mut self.cost),
            ('e', &mut self.estimated),
            ('u', &mut self.unpriced),
            ('x', &mut self.errors),
        ]
    }

    /// The figure named `letter` (see [`Totals::fields`]); `None` for an unknown letter.
    pub fn field_mut(&mut self, letter: char) -> Option<&mut u64> {
        self.fields_mut()
            .into_iter()
            .find(|(c, _)| *c == letter)
            .map(|(_, v)| v)
    }
}

/// The calls a report can tell apart: by user, team (`teams` is the call's teams, joined
/// by commas), model or API.
#[derive(
    Debug,
    Default,
    Clone,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Group {
    pub user: Option<String>,
    pub teams: Option<String>,
    pub model: Option<String>,
    pub api: Option<String>,
}

/// A `YYYY-MM-DD` date.
pub fn date(s: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| format!("{s:?} is not a date: write it as YYYY-MM-DD"))
}

/// The start of `d` in the budgets' time zone, as Unix seconds (where a daylight-saving
/// change skips midnight, the first instant of the day that exists).
pub fn midnight(d: NaiveDate, zone: Zone) -> i64 {
    use chrono::TimeZone;
    let start = d.and_hms_opt(0, 0, 0).unwrap_or_default();
    let at = |t: chrono::NaiveDateTime| match zone {
        Zone::Fixed(z) => z.from_local_datetime(&t).earliest().map(|t| t.timestamp()),
        Zone::Named(z) => z.from_local_datetime(&t).earliest().map(|t| t.timestamp()),
    };
    (0..=6)
        .find_map(|k| at(start + chrono::Duration::minutes(30 * k)))
        .unwrap_or_else(|| start.and_utc().timestamp())
}

/// The date of `t` (Unix seconds) in the budgets' time zone.
pub fn date_of(t: i64, zone: Zone) -> NaiveDate {
    let utc = chrono::DateTime::from_timestamp(t, 0).unwrap_or_default();
    match zone {
        Zone::Fixed(z) => utc.with_timezone(&z).date_naive(),
        Zone::Named(z) => utc.with_timezone(&z).date_naive(),
    }
}

/// `tokentap spend` and the admin page's export: what was spent on days `from..=to` of
/// `zone`, per group of calls (enough of each group to lay it out `by`): with the Redis
/// ledger (unless `local`), of every replica, as shipped to Redis; otherwise of this
/// replica's ledger file.
pub fn spend(
    ledger: &super::policy::LedgerConfig,
    zone: Zone,
    from: NaiveDate,
    to: NaiveDate,
    by: By,
    local_only: bool,
) -> Result<Vec<(Group, Totals)>, String> {
    if to < from {
        return Err(format!("the last day {to} is before the first {from}"));
    }
    let after = to
        .checked_add_days(chrono::Days::new(1))
        .ok_or_else(|| format!("{to} is too far in the future"))?;
    if ledger.backend == super::policy::Backend::Redis && !local_only {
        return super::redis::read_report(ledger, from, to);
    }
    local_days(&ledger.path, zone, from, to, by)
        .unwrap_or_else(|| local(&ledger.path, midnight(from, zone), midnight(after, zone)))
}

/// [`local`] from the file's day rollups, when its days are counted in `zone` (`None`
/// otherwise, or for a file without them).
fn local_days(
    ledger: &Path,
    zone: Zone,
    from: NaiveDate,
    to: NaiveDate,
    by: By,
) -> Option<Result<Vec<(Group, Totals)>, String>> {
    use super::rollup::{zone_mark, SUMS, ZONE_KEY};
    let db = Connection::open_with_flags(ledger, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    let counted: String = db
        .query_row("SELECT value FROM meta WHERE key = ?1", [ZONE_KEY], |r| {
            r.get(0)
        })
        .ok()?;
    if counted != zone_mark(zone) {
        return None;
    }
    // By user or model, the one-key rollups (a few rows a day); by team or API, every group
    // (a call in several teams counts once in a table's total).
    let sql = match by {
        By::User => format!(
            "SELECT NULLIF(user, ''), NULL, NULL, NULL, {SUMS} FROM roll_user_day
             WHERE day >= ?1 AND day <= ?2 GROUP BY user"
        ),
        By::Model => format!(
            "SELECT NULL, NULL, NULLIF(model, ''), NULL, {SUMS} FROM roll_model_day
             WHERE day >= ?1 AND day <= ?2 GROUP BY model"
        ),
        By::Team | By::Api => format!(
            "SELECT NULLIF(user, ''), NULLIF(teams, ''), NULLIF(model, ''), NULLIF(api, ''),
             {SUMS} FROM roll_day WHERE day >= ?1 AND day <= ?2 GROUP BY user, teams, model, api"
        ),
    };
    let run = || -> rusqlite::Result<Vec<(Group, Totals)>> {
        let mut q = db.prepare(&sql)?;
        let rows = q.query_map(
            params![
                super::rollup::day_number(from),
                super::rollup::day_number(to)
            ],
            |r| group_and_totals(r, 0),
        )?;
        rows.collect()
    };
    Some(run().map_err(|e| format!("{}: {e}", ledger.display())))
}

/// What the ledger file at `ledger` holds of the calls in `[from, to)` (Unix seconds).
pub fn local(ledger: &Path, from: i64, to: i64) -> Result<Vec<(Group, Totals)>, String> {
    if !ledger.exists() {
        return Err(format!(
            "{}: no ledger here (budgets.ledger.path); has tokentap run with this config?",
            ledger.display()
        ));
    }
    let db = Connection::open_with_flags(ledger, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("{}: {e}", ledger.display()))?;
    let mut q = db
        .prepare(&format!(
            "SELECT {GROUP_COLUMNS}, COUNT(*), {SUM_COLUMNS}
             FROM calls WHERE ts >= ?1 AND ts < ?2 GROUP BY user, teams, model, api"
        ))
        .map_err(|e| e.to_string())?;
    let it = q
        .query_map(params![from, to], |r| group_and_totals(r, 0))
        .map_err(|e| e.to_string())?;
    it.collect::<rusqlite::Result<_>>()
        .map_err(|e| e.to_string())
}

/// The columns of a [`Group`], then (after a count of calls) the sums of a [`Totals`], as
/// [`group_and_totals`] reads them.
pub const GROUP_COLUMNS: &str = "user, teams, model, api";
pub const SUM_COLUMNS: &str = "SUM(prompt), SUM(completion), SUM(cached), SUM(cache_write),
    SUM(reasoning), SUM(web_searches), SUM(COALESCE(cost_pico, 0)), SUM(estimated),
    SUM(cost_pico IS NULL), SUM(outcome != 'complete' OR status >= 400)";

/// Reads a [`Group`] and its [`Totals`] from a row laid out as [`GROUP_COLUMNS`], a count,
/// and [`SUM_COLUMNS`], starting at column `at`.
pub fn group_and_totals(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<(Group, Totals)> {
    let n = |i: usize| {
        r.get::<_, Option<i64>>(at + i)
            .map(|v| v.unwrap_or(0).max(0) as u64)
    };
    let s = |i: usize| r.get::<_, Option<String>>(at + i);
    Ok((
        Group {
            user: s(0)?,
            teams: s(1)?,
            model: s(2)?,
            api: s(3)?,
        },
        Totals {
            calls: n(4)?,
            prompt: n(5)?,
            completion: n(6)?,
            cached: n(7)?,
            cache_write: n(8)?,
            reasoning: n(9)?,
            searches: n(10)?,
            cost: n(11)?,
            estimated: n(12)?,
            unpriced: n(13)?,
            errors: n(14)?,
        },
    ))
}

/// A CSV cell (RFC 4180) of a name callers chose: quoted when it holds a separator, a quote
/// or a line break, and, when it starts like a formula (`=`, `+`, `-`, `@`, a tab or a
/// carriage return), prefixed with `'` so that a spreadsheet shows it instead of running it.
fn csv_cell(k: &str) -> String {
    let k = if k.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{k}")
    } else {
        k.to_string()
    };
    if k.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", k.replace('"', "\"\""))
    } else {
        k
    }
}

/// Lays out `groups` by user, team, model or API.
pub fn render(groups: Vec<(Group, Totals)>, by: By, format: Format) -> String {
    let mut rows: BTreeMap<String, Totals> = BTreeMap::new();
    // Every call counted once, also where a user's call appears under each of their teams.
    let mut total = 0u64;
    for (g, row) in groups {
        total += row.cost;
        let keys: Vec<String> = match by {
            By::User => vec![g.user.unwrap_or_else(|| "(no user)".into())],
            By::Model => vec![g.model.unwrap_or_else(|| "(no model)".into())],
            By::Api => vec![g.api.unwrap_or_else(|| "(no api)".into())],
            By::Team => {
                let t: Vec<String> = g
                    .teams
                    .unwrap_or_default()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                if t.is_empty() {
                    vec!["(no team)".into()]
                } else {
                    t
                }
            }
        };
        for k in keys {
            rows.entry(k).or_default().add(&row);
        }
    }
    let key = match by {
        By::User => "user",
        By::Team => "team",
        By::Model => "model",
        By::Api => "api",
    };
    let mut sorted: Vec<(String, Totals)> = rows.into_iter().collect();
    sorted.sort_by(|a, b| b.1.cost.cmp(&a.1.cost).then(a.0.cmp(&b.0)));
    match format {
        Format::Json => {
            let v: Vec<serde_json::Value> = sorted
                .iter()
                .map(|(k, r)| {
                    let mut o = serde_json::json!({
                        "calls": r.calls, "prompt_tokens": r.prompt, "completion_tokens": r.completion,
                        "cached_tokens": r.cached, "cache_write_tokens": r.cache_write,
                        "reasoning_tokens": r.reasoning,
                        "web_searches": r.searches, "cost_usd": Pico(r.cost).to_string(),
                        "estimated_calls": r.estimated, "unpriced_calls": r.unpriced,
                    });
                    o[key] = serde_json::Value::String(k.clone());
                    o
                })
                .collect();
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
        }
        Format::Csv => {
            let mut out = format!("{key},calls,prompt_tokens,completion_tokens,cached_tokens,cache_write_tokens,reasoning_tokens,web_searches,cost_usd,estimated_calls,unpriced_calls\n");
            for (k, r) in &sorted {
                let k = csv_cell(k);
                let _ = writeln!(
                    out,
                    "{k},{},{},{},{},{},{},{},{},{},{}",
                    r.calls,
                    r.prompt,
                    r.completion,
                    r.cached,
                    r.cache_write,
                    r.reasoning,
                    r.searches,
                    Pico(r.cost),
                    r.estimated,
                    r.unpriced
                );
            }
            out
        }
        Format::Table => {
            let head = [
                key,
                "calls",
                "prompt",
                "completion",
                "cached",
                "reasoning",
                "searches",
                "cost_usd",
                "estimated",
            ];
            let body: Vec<[String; 9]> = sorted
                .iter()
                .map(|(k, r)| {
                    [
                        k.clone(),
                        r.calls.to_string(),
                        r.prompt.to_string(),
                        r.completion.to_string(),
                        r.cached.to_string(),
                        r.reasoning.to_string(),
                        r.searches.to_string(),
                        Pico(r.cost).to_string(),
                        r.estimated.to_string(),
                    ]
                })
                .collect();
            let mut w = head.map(str::len);
            for row in &body {
                for (i, c) in row.iter().enumerate() {
                    w[i] = w[i].max(c.chars().count());
                }
            }
            let mut out = String::new();
            let line = |out: &mut String, cells: Vec<&str>| {
                for (i, c) in cells.iter().enumerate() {
                    if i == 0 {
                        let _ = write!(out, "{c:<width$}", width = w[0]);
                    } else {
                        let _ = write!(out, "  {c:>width$}", width = w[i]);
                    }
                }
                out.push('\n');
            };
            line(&mut out, head.to_vec());
            for row in &body {
                line(&mut out, row.iter().map(String::as_str).collect());
            }
            let _ = writeln!(out, "total cost_usd {}", Pico(total));
            if by == By::Team {
                out.push_str(
                    "(a call of a user in several teams is listed under each; the total counts it once)\n",
                );
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_of_caller_names_neither_break_rows_nor_run_as_formulas() {
        assert_eq!(csv_cell("alice"), "alice");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\"\r\n"), "\"say \"\"hi\"\"\r\n\"");
        assert_eq!(csv_cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_cell("+1"), "'+1");
        assert_eq!(csv_cell("@sum"), "'@sum");
    }

    #[test]
    fn days_start_at_midnight_in_the_budgets_zone() {
        let d = date("2026-11-25").unwrap();
        assert_eq!(midnight(d, Zone::utc()), 1_795_564_800);
        let plus2 = Zone::Fixed(chrono::FixedOffset::east_opt(2 * 3600).unwrap());
        assert_eq!(midnight(d, plus2), 1_795_564_800 - 7200);
        let ny = Zone::Named(chrono_tz::America::New_York);
        assert_eq!(midnight(d, ny), 1_795_564_800 + 5 * 3600);
        // A day on which clocks change is 23 hours long, from midnight to midnight.
        let dst = date("2026-03-08").unwrap();
        let next = date("2026-03-09").unwrap();
        assert_eq!(midnight(next, ny) - midnight(dst, ny), 23 * 3600);
        // 23:30 UTC is already the next day at UTC+2.
        assert_eq!(date_of(1_795_564_800 - 1800, plus2), d);
        assert!(date("25/11/2026").unwrap_err().contains("YYYY-MM-DD"));
    }
}
