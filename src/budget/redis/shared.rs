//! Spend reports for every replica: each replica ships the per-call rows of its own ledger
//! file to Redis as per-day totals (one hash per day of the budgets' zone, a field per
//! figure and group of calls), and `tokentap spend` reads those.
//!
//! With them go, in the same script, the small summaries the admin page reads (a page load
//! must not pull every group's figures over the connection that reservations use): per day,
//! the totals of all calls; the calls, tokens and cost per user, per model and per team; and
//! per user and per team, those per model.
//!
//! Exactly once, by row id: a replica's rows get growing ids in its file, and Redis keeps,
//! beside the totals and changed in the same script, the id of the last row it has from that
//! replica. A batch applies only on top of exactly that row, so a batch whose reply was lost
//! is not added again, and after Redis lost its data (the marker is gone with the totals)
//! every replica ships its rows again from its first: the totals are rebuilt, each replica
//! adding only its own calls. Rows older than `retention_days` are not shipped (their days
//! have expired in Redis as in the file).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;

use super::Inner;
use crate::budget::policy::LedgerConfig;
use crate::budget::report::{self, Group, Totals};

/// Rows shipped in one script, and batches a round (a second) ships at most: a replica that
/// ships its whole file again (after Redis lost its data) sends 4,000 rows a second in small
/// scripts, so that the reserves sharing the connection do not wait behind them.
const AT_ONCE: usize = 500;
const BATCHES: usize = 8;
/// A ship may take this long (it is off every call's path).
const SHIP_TIMEOUT: Duration = Duration::from_secs(5);

/// A day's totals.
pub(super) fn day_key(prefix: &str, day: NaiveDate) -> String {
    // One hash tag for every report key: a ship script touches a marker and day hashes,
    // which a Redis Cluster must find on one node.
    format!("{prefix}:{{report}}:day:{day}")
}

/// A day's summary for the admin page: `sum` (every figure of all calls), `users`, `models`
/// or `teams` (calls, tokens and cost of each), or `user`/`team` with the name (per model).
pub(super) fn summary_key(prefix: &str, kind: &str, day: NaiveDate, name: Option<&str>) -> String {
    match name {
        None => format!("{prefix}:{{report}}:{kind}:{day}"),
        Some(n) => format!("{prefix}:{{report}}:{kind}:{day}:{n}"),
    }
}

/// The figures the per-name summaries keep: calls, prompt and completion tokens, cost.
const SUMMARY_LETTERS: [char; 4] = ['n', 'p', 'c', '$'];

/// A summary's field: the figure's letter, then the name as JSON (`null` for none).
fn name_field(letter: char, name: Option<&str>) -> String {
    format!(
        "{letter}{}",
        serde_json::to_string(&name).unwrap_or_default()
    )
}

fn parse_name_field(f: &str) -> Option<(char, Option<String>)> {
    let mut chars = f.chars();
    let letter = chars.next()?;
    Some((letter, serde_json::from_str(chars.as_str()).ok()?))
}

/// The admin page's summaries of one day's groups: (key, fields) per summary hash.
fn summaries(
    prefix: &str,
    day: NaiveDate,
    groups: &HashMap<Group, Totals>,
) -> Vec<(String, Vec<(String, u64)>)> {
    let mut hashes: BTreeMap<String, HashMap<String, u64>> = BTreeMap::new();
    let mut add = |key: String, letters: &[char], name: Option<&str>, t: &Totals, all: bool| {
        let h = hashes.entry(key).or_default();
        for (c, v) in t.fields() {
            if v != 0 && (all || letters.contains(&c)) {
                let f = if all {
                    c.to_string()
                } else {
                    name_field(c, name)
                };
                *h.entry(f).or_default() += v;
            }
        }
    };
    for (g, t) in groups {
        let teams = g.teams.as_deref().unwrap_or("");
        let teams = teams.split(',').filter(|t| !t.is_empty());
        add(summary_key(prefix, "sum", day, None), &[], None, t, true);
        add(
            summary_key(prefix, "users", day, None),
            &SUMMARY_LETTERS,
            g.user.as_deref(),
            t,
            false,
        );
        add(
            summary_key(prefix, "models", day, None),
            &SUMMARY_LETTERS,
            g.model.as_deref(),
            t,
            false,
        );
        if let Some(u) = &g.user {
            add(
                summary_key(prefix, "user", day, Some(u)),
                &SUMMARY_LETTERS,
                g.model.as_deref(),
                t,
                false,
            );
        }
        for team in teams {
            add(
                summary_key(prefix, "teams", day, None),
                &SUMMARY_LETTERS,
                Some(team),
                t,
                false,
            );
            add(
                summary_key(prefix, "team", day, Some(team)),
                &SUMMARY_LETTERS,
                g.model.as_deref(),
                t,
                false,
            );
        }
    }
    hashes
        .into_iter()
        .map(|(k, h)| (k, h.into_iter().collect()))
        .collect()
}

/// The last row Redis has from `replica`.
fn shipped_key(prefix: &str, replica: &str) -> String {
    format!("{prefix}:{{report}}:shipped:{replica}")
}

/// A group as a hash field: the figure's letter, then the group as a JSON array.
fn field(letter: char, g: &Group) -> String {
    let group = serde_json::to_string(&(&g.user, &g.teams, &g.model, &g.api)).unwrap_or_default();
    format!("{letter}{group}")
}

/// Reads a field made by [`field`].
fn parse_field(f: &str) -> Option<(char, Group)> {
    let mut chars = f.chars();
    let letter = chars.next()?;
    let (user, teams, model, api) = serde_json::from_str(chars.as_str()).ok()?;
    Some((
        letter,
        Group {
            user,
            teams,
            model,
            api,
        },
    ))
}

impl Inner {
    /// Until when Redis keeps a day's totals (0: for ever).
    fn day_expires(&self, day: NaiveDate) -> i64 {
        if self.retention_days == 0 {
            return 0;
        }
        let end = day
            .succ_opt()
            .map_or(i64::MAX / 2, |next| report::midnight(next, self.zone));
        end + self.retention_days as i64 * 86_400
    }

    /// Ships this replica's rows Redis does not have yet (those written to the file; the file
    /// is written every flush interval).
    pub(super) async fn ship_rows(&self) {
        let Some(mut con) = self.current() else {
            return;
        };
        let replica = match self.replica.get() {
            Some(r) => r.clone(),
            None => {
                let file = Arc::clone(&self.rows);
                let Ok(Ok(r)) = tokio::task::spawn_blocking(move || file.replica_id()).await else {
                    return; // (the file is not open yet)
                };
                self.replica.get_or_init(|| r).clone()
            }
        };
        let marker = shipped_key(&self.prefix, &replica);
        let ttl = if self.retention_days == 0 {
            0
        } else {
            // Longer than any row it covers is shipped for: when it expires, the replica's
            // rows are all past retention, and shipping them again adds nothing.
            (self.retention_days + 2) * 86_400
        };
        for _ in 0..BATCHES {
            let known = *self.shipped.lock().unwrap_or_else(|p| p.into_inner());
            let after = match known {
                Some(v) => v,
                None => {
                    let mut get = redis::cmd("GET");
                    get.arg(&marker);
                    let get = get.query_async::<Option<i64>>(&mut con);
                    match tokio::time::timeout(SHIP_TIMEOUT, get).await {
                        Ok(Ok(v)) => v.unwrap_or(0),
                        Ok(Err(e)) => {
                            return self.ship_failed(&e);
                        }
                        Err(_) => {
                            return self.ship_failed(&"timed out");
                        }
                    }
                }
            };
            let file = Arc::clone(&self.rows);
            let rows =
                match tokio::task::spawn_blocking(move || file.rows_after(after, AT_ONCE)).await {
                    Ok(Ok(rows)) => rows,
                    Ok(Err(e)) => {
                        log::error!("ledger: cannot read calls to ship to Redis: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            let Some(&(last, ..)) = rows.last() else {
                *self.shipped.lock().unwrap_or_else(|p| p.into_inner()) = Some(after);
                return;
            };
            let full = rows.len() == AT_ONCE;
            let now = crate::budget::now_unix();
            let mut days: BTreeMap<NaiveDate, HashMap<Group, Totals>> = BTreeMap::new();
            for (_, ts, g, t) in rows {
                let day = report::date_of(ts, self.zone);
                let expires = self.day_expires(day);
                if expires != 0 && expires <= now {
                    continue;
                }
                days.entry(day).or_default().entry(g).or_default().add(&t);
            }
            let mut inv = self.ship.prepare_invoke();
            inv.key(&marker).arg(after).arg(last).arg(ttl);
            for (day, groups) in &days {
                let pairs: Vec<(String, u64)> = groups
                    .iter()
                    .flat_map(|(g, t)| {
                        t.fields()
                            .into_iter()
                            .filter(|(_, v)| *v != 0)
                            .map(move |(c, v)| (field(c, g), v))
                    })
                    .collect();
                inv.key(day_key(&self.prefix, *day))
                    .arg(self.day_expires(*day))
                    .arg(pairs.len());
                for (f, v) in pairs {
                    inv.arg(f).arg(v.min(i64::MAX as u64));
                }
                for (key, pairs) in summaries(&self.prefix, *day, groups) {
                    inv.key(key).arg(self.day_expires(*day)).arg(pairs.len());
                    for (f, v) in pairs {
                        inv.arg(f).arg(v.min(i64::MAX as u64));
                    }
                }
            }
            let have =
                match tokio::time::timeout(self.timeout, inv.invoke_async::<i64>(&mut con)).await {
                    Ok(Ok(v)) => v,
                    Ok(Err(e)) => {
                        return self.ship_failed(&e);
                    }
                    Err(_) => {
                        return self.ship_failed(&"timed out");
                    }
                };
            let mut shipped = self.shipped.lock().unwrap_or_else(|p| p.into_inner());
            if have == -1 {
                *shipped = Some(last);
                if !full {
                    return;
                }
            } else {
                // Redis has another row than this replica thought (a lost reply, or lost
                // data): go on from the row it has.
                *shipped = Some(have);
            }
        }
    }

    /// A ship that failed: counted, logged now and then, tried again next round. Not a sign
    /// that Redis is down (that is for the calls' own round trips to say).
    fn ship_failed(&self, e: &dyn std::fmt::Display) {
        if self
            .errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(100)
        {
            log::warn!("ledger: shipping call rows to Redis for reports failed ({e}); retrying");
        }
    }

    /// Redis lost its data: what it has of this replica is asked again before shipping.
    pub(super) fn forget_shipped(&self) {
        *self.shipped.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// The calls of every replica on days `from..=to` (of the budgets' zone), as Redis has them.
pub fn read(
    cfg: &LedgerConfig,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Vec<(Group, Totals)>, String> {
    let target = cfg
        .redis
        .as_ref()
        .ok_or("budgets.ledger: the redis backend needs redis_url or redis_nodes")?;
    let local = " (--local reads this replica's own calls from its ledger file)";
    let prefix = super::key_prefix(cfg);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let (mut con, _) = target.connect().await.map_err(|e| format!("{e}{local}"))?;
        let mut all: HashMap<Group, Totals> = HashMap::new();
        read_days(
            &mut con,
            &prefix,
            cfg.retention_days,
            from,
            to,
            target.timeout.max(Duration::from_secs(10)),
            |_, g, t| all.entry(g).or_default().add(&t),
        )
        .await
        .map_err(|e| format!("Redis at {}: {e}{local}", target.display()))?;
        Ok(all.into_iter().collect())
    })
}

/// The per-day totals of every replica on days `from..=to`, each (day, group, totals) handed
/// to `each` as it comes (one pipeline of `HGETALL`s per month: the report keys share one
/// hash tag, so one node of a Cluster).
pub(super) async fn read_days<C: redis::aio::ConnectionLike>(
    con: &mut C,
    prefix: &str,
    retention_days: u64,
    from: NaiveDate,
    to: NaiveDate,
    timeout: Duration,
    mut each: impl FnMut(NaiveDate, Group, Totals),
) -> Result<(), String> {
    let days = days_kept(retention_days, from, to);
    let keys: Vec<String> = days.iter().map(|d| day_key(prefix, *d)).collect();
    hgetall(con, &keys, timeout, |i, h| {
        let mut groups: HashMap<Group, Totals> = HashMap::new();
        for (f, v) in h {
            let Some((letter, g)) = parse_field(&f) else {
                continue;
            };
            if let Some(slot) = groups.entry(g).or_default().field_mut(letter) {
                *slot += v;
            }
        }
        for (g, t) in groups {
            each(days[i], g, t);
        }
    })
    .await
}

/// The days of `from..=to` Redis may still hold (days past retention are gone from it: not
/// asked for one by one).
fn days_kept(retention_days: u64, from: NaiveDate, to: NaiveDate) -> Vec<NaiveDate> {
    let floor = if retention_days > 0 {
        chrono::Utc::now().date_naive() - chrono::Days::new(retention_days.saturating_add(2))
    } else {
        NaiveDate::MIN
    };
    from.max(floor)
        .iter_days()
        .take_while(|d| *d <= to)
        .collect()
}

/// `HGETALL` of every key, 31 to a pipeline; `each` gets the key's index and its fields.
async fn hgetall<C: redis::aio::ConnectionLike>(
    con: &mut C,
    keys: &[String],
    timeout: Duration,
    mut each: impl FnMut(usize, Vec<(String, u64)>),
) -> Result<(), String> {
    for (n, chunk) in keys.chunks(31).enumerate() {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("HGETALL").arg(k);
        }
        let hashes: Vec<Vec<(String, u64)>> = tokio::time::timeout(timeout, pipe.query_async(con))
            .await
            .map_err(|_| "did not answer".to_string())?
            .map_err(|e| super::store::shown(&e))?;
        for (i, h) in hashes.into_iter().enumerate() {
            each(n * 31 + i, h);
        }
    }
    Ok(())
}

/// Folds a per-name summary's fields into totals per name.
fn per_name(h: Vec<(String, u64)>, into: &mut HashMap<Option<String>, Totals>) {
    for (f, v) in h {
        if let Some((letter, name)) = parse_name_field(&f) {
            if let Some(slot) = into.entry(name).or_default().field_mut(letter) {
                *slot += v;
            }
        }
    }
}

impl Inner {
    /// The admin page's overview from the summaries all replicas ship: the totals of each
    /// of days `from..=to`, and the top `limit` users, teams and models of days
    /// `top_from..=top_to`.
    pub(super) async fn shared_overview(
        &self,
        from: NaiveDate,
        to: NaiveDate,
        top: (NaiveDate, NaiveDate),
        limit: usize,
    ) -> Result<crate::budget::history::SharedOverview, String> {
        let mut con = self.current().ok_or("Redis is not connected")?;
        let timeout = self.timeout.max(Duration::from_secs(2));
        let days = days_kept(self.retention_days, from, to);
        let keys: Vec<String> = days
            .iter()
            .map(|d| summary_key(&self.prefix, "sum", *d, None))
            .collect();
        let mut daily = BTreeMap::new();
        hgetall(&mut con, &keys, timeout, |i, h| {
            let mut t = Totals::default();
            for (f, v) in h {
                if let Some(slot) = f.chars().next().and_then(|c| t.field_mut(c)) {
                    *slot += v;
                }
            }
            daily.insert(days[i], t);
        })
        .await?;
        let top_days = days_kept(self.retention_days, top.0, top.1);
        let mut lists = Vec::new();
        for kind in ["users", "teams", "models"] {
            let keys: Vec<String> = top_days
                .iter()
                .map(|d| summary_key(&self.prefix, kind, *d, None))
                .collect();
            let mut m = HashMap::new();
            hgetall(&mut con, &keys, timeout, |_, h| per_name(h, &mut m)).await?;
            let mut v: Vec<(String, Totals)> = m
                .into_iter()
                .map(|(k, t)| (k.unwrap_or_default(), t))
                .collect();
            v.sort_by(|a, b| b.1.cost.cmp(&a.1.cost).then(a.0.cmp(&b.0)));
            v.truncate(limit);
            lists.push(v);
        }
        let mut lists = lists.into_iter();
        Ok(crate::budget::history::SharedOverview {
            daily,
            users: lists.next().unwrap_or_default(),
            teams: lists.next().unwrap_or_default(),
            models: lists.next().unwrap_or_default(),
        })
    }

    /// A user's (or team's) spend per day and model on days `from..=to`, from the summaries
    /// all replicas ship.
    pub(super) async fn shared_by_model(
        &self,
        team: bool,
        name: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<(NaiveDate, String, Totals)>, String> {
        let mut con = self.current().ok_or("Redis is not connected")?;
        let days = days_kept(self.retention_days, from, to);
        let kind = if team { "team" } else { "user" };
        let keys: Vec<String> = days
            .iter()
            .map(|d| summary_key(&self.prefix, kind, *d, Some(name)))
            .collect();
        let mut out = Vec::new();
        hgetall(
            &mut con,
            &keys,
            self.timeout.max(Duration::from_secs(2)),
            |i, h| {
                let mut m = HashMap::new();
                per_name(h, &mut m);
                out.extend(
                    m.into_iter()
                        .map(|(model, t)| (days[i], model.unwrap_or_default(), t)),
                );
            },
        )
        .await?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_name_their_figure_and_group_and_read_back() {
        let g = Group {
            user: Some("al\"ice|,".into()),
            teams: Some("a,b".into()),
            model: None,
            api: Some("messages".into()),
        };
        let f = field('$', &g);
        assert_eq!(parse_field(&f), Some(('$', g)));
        assert_eq!(parse_field("x"), None);
        assert_eq!(parse_field(""), None);
    }
}
