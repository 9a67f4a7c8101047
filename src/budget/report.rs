//! `tokentap spend`: spend per user, team or model over a date range, from the embedded
//! ledger's per-call rows, as a table, CSV or JSON.

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

#[derive(Debug, Default, Clone)]
struct Row {
    calls: u64,
    prompt: u64,
    completion: u64,
    cached: u64,
    cache_write: u64,
    reasoning: u64,
    searches: u64,
    cost: u64,
    estimated: u64,
    unpriced: u64,
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
    (0..=3)
        .find_map(|h| at(start + chrono::Duration::hours(h)))
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

/// The report for calls in `[from, to)` (Unix seconds).
pub fn report(ledger: &Path, from: i64, to: i64, by: By, format: Format) -> Result<String, String> {
    if !ledger.exists() {
        return Err(format!(
            "{}: no ledger here (budgets.ledger.path); has tokentap run with this config?",
            ledger.display()
        ));
    }
    let db = Connection::open_with_flags(ledger, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("{}: {e}", ledger.display()))?;
    let mut q = db
        .prepare(
            "SELECT user, teams, model, COUNT(*), SUM(prompt), SUM(completion), SUM(cached),
                    SUM(reasoning), SUM(web_searches), SUM(COALESCE(cost_pico, 0)),
                    SUM(estimated), SUM(cost_pico IS NULL), api, SUM(cache_write)
             FROM calls WHERE ts >= ?1 AND ts < ?2 GROUP BY user, teams, model, api",
        )
        .map_err(|e| e.to_string())?;
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let it = q
        .query_map(params![from, to], |r| {
            let n = |i| r.get::<_, Option<i64>>(i).map(|v| v.unwrap_or(0) as u64);
            Ok((
                r.get::<_, Option<String>>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(12)?,
                Row {
                    calls: n(3)?,
                    prompt: n(4)?,
                    completion: n(5)?,
                    cached: n(6)?,
                    reasoning: n(7)?,
                    searches: n(8)?,
                    cost: n(9)?,
                    estimated: n(10)?,
                    unpriced: n(11)?,
                    cache_write: n(13)?,
                },
            ))
        })
        .map_err(|e| e.to_string())?;
    // Every call counted once, also where a user's call appears under each of their teams.
    let mut total = 0u64;
    for r in it {
        let (user, teams, model, api, row) = r.map_err(|e| e.to_string())?;
        total += row.cost;
        let keys: Vec<String> = match by {
            By::User => vec![user.unwrap_or_else(|| "(no user)".into())],
            By::Model => vec![model.unwrap_or_else(|| "(no model)".into())],
            By::Api => vec![api.unwrap_or_else(|| "(no api)".into())],
            By::Team => {
                let t: Vec<String> = teams
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
            let e = rows.entry(k).or_default();
            e.calls += row.calls;
            e.prompt += row.prompt;
            e.completion += row.completion;
            e.cached += row.cached;
            e.cache_write += row.cache_write;
            e.reasoning += row.reasoning;
            e.searches += row.searches;
            e.cost += row.cost;
            e.estimated += row.estimated;
            e.unpriced += row.unpriced;
        }
    }
    let key = match by {
        By::User => "user",
        By::Team => "team",
        By::Model => "model",
        By::Api => "api",
    };
    let mut sorted: Vec<(String, Row)> = rows.into_iter().collect();
    sorted.sort_by(|a, b| b.1.cost.cmp(&a.1.cost).then(a.0.cmp(&b.0)));
    Ok(match format {
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
                let k = if k.contains([',', '"', '\n']) {
                    format!("\"{}\"", k.replace('"', "\"\""))
                } else {
                    k.clone()
                };
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
