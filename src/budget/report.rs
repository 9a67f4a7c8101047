//! `tokentap spend`: spend per user, team or model over a date range, from the embedded
//! ledger's per-call rows, as a table, CSV or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use chrono::NaiveDate;
use rusqlite::{params, Connection, OpenFlags};

use crate::meter::Pico;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    User,
    Team,
    Model,
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
    reasoning: u64,
    searches: u64,
    cost: u64,
    estimated: u64,
    unpriced: u64,
}

/// Midnight UTC of a `YYYY-MM-DD` date, as Unix seconds.
pub fn day(s: &str) -> Result<i64, String> {
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| format!("{s:?} is not a date: write it as YYYY-MM-DD"))?;
    Ok(d.and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc()
        .timestamp())
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
                    SUM(estimated), SUM(cost_pico IS NULL)
             FROM calls WHERE ts >= ?1 AND ts < ?2 GROUP BY user, teams, model",
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
                },
            ))
        })
        .map_err(|e| e.to_string())?;
    for r in it {
        let (user, teams, model, row) = r.map_err(|e| e.to_string())?;
        let keys: Vec<String> = match by {
            By::User => vec![user.unwrap_or_else(|| "(no user)".into())],
            By::Model => vec![model.unwrap_or_else(|| "(no model)".into())],
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
                        "cached_tokens": r.cached, "reasoning_tokens": r.reasoning,
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
            let mut out = format!("{key},calls,prompt_tokens,completion_tokens,cached_tokens,reasoning_tokens,web_searches,cost_usd,estimated_calls,unpriced_calls\n");
            for (k, r) in &sorted {
                let k = if k.contains([',', '"', '\n']) {
                    format!("\"{}\"", k.replace('"', "\"\""))
                } else {
                    k.clone()
                };
                let _ = writeln!(
                    out,
                    "{k},{},{},{},{},{},{},{},{},{}",
                    r.calls,
                    r.prompt,
                    r.completion,
                    r.cached,
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
            let total: u64 = sorted.iter().map(|(_, r)| r.cost).sum();
            let _ = writeln!(out, "total cost_usd {}", Pico(total));
            out
        }
    })
}
