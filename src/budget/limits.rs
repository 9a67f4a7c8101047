//! Rate limits: requests per minute, tokens per minute and calls in flight, per user (or the
//! default for everyone), per team and per virtual key (`[budgets.limits]`).
//!
//! A minute is a sliding window of the last 60 whole seconds: a call counts from its second
//! until 60 seconds later, so no 60 seconds ever hold more than the limit. Tokens are counted
//! from the call's worst case when it starts (what the budget reserves) and settled to what
//! it used when it ends. A call refused by a limit never reaches the upstream and counts
//! nothing. The ledger keeps the counts: in memory for the embedded ledger (one replica), in
//! Redis (one atomic script) for the replicas sharing it.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

/// A subject's limits, as written.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    /// Calls in flight at once.
    pub concurrent: Option<u64>,
}

impl Limit {
    fn is_empty(&self) -> bool {
        *self == Limit::default()
    }
}

/// `[budgets.limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Every user without limits of their own.
    #[serde(default)]
    pub default: Option<Limit>,
    #[serde(default)]
    pub users: BTreeMap<String, Limit>,
    #[serde(default)]
    pub teams: BTreeMap<String, Limit>,
    /// By virtual key id (`tokentap keys`).
    #[serde(default)]
    pub keys: BTreeMap<String, Limit>,
}

/// The compiled limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub default: Limit,
    pub users: HashMap<String, Limit>,
    pub teams: HashMap<String, Limit>,
    pub keys: HashMap<String, Limit>,
}

pub fn compile(raw: &RawLimits) -> Result<Limits, String> {
    let check = |what: &str, l: &Limit| -> Result<Limit, String> {
        for (name, v) in [
            ("requests_per_minute", l.requests_per_minute),
            ("tokens_per_minute", l.tokens_per_minute),
            ("concurrent", l.concurrent),
        ] {
            if v == Some(0) {
                return Err(format!(
                    "budgets.limits.{what}.{name} is 0: leave it out for no limit"
                ));
            }
        }
        Ok(*l)
    };
    let map = |kind: &str, m: &BTreeMap<String, Limit>| -> Result<HashMap<String, Limit>, String> {
        m.iter()
            .map(|(k, l)| Ok((k.clone(), check(&format!("{kind}.{k:?}"), l)?)))
            .collect()
    };
    Ok(Limits {
        default: raw
            .default
            .as_ref()
            .map(|l| check("default", l))
            .transpose()?
            .unwrap_or_default(),
        users: map("users", &raw.users)?,
        teams: map("teams", &raw.teams)?,
        keys: map("keys", &raw.keys)?,
    })
}

/// One subject's limits that a call is checked against, and what it would add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// `user:<id>`, `team:<name>` or `key:<id>`.
    pub key: String,
    pub limit: Limit,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.default.is_empty()
            && self.users.is_empty()
            && self.teams.is_empty()
            && self.keys.is_empty()
    }

    /// The limits a call of `user` (in `teams`, with virtual key `key`) is held to, the
    /// user's first.
    pub fn checks(&self, user: &str, teams: &[String], key: Option<&str>) -> Vec<Check> {
        let mut v = Vec::new();
        let own = self.users.get(user).copied().unwrap_or(self.default);
        if !own.is_empty() {
            v.push(Check {
                key: format!("user:{user}"),
                limit: own,
            });
        }
        for t in teams {
            if let Some(l) = self.teams.get(t) {
                v.push(Check {
                    key: format!("team:{t}"),
                    limit: *l,
                });
            }
        }
        if let Some(k) = key.and_then(|k| self.keys.get(k).map(|l| (k, l))) {
            v.push(Check {
                key: format!("key:{}", k.0),
                limit: *k.1,
            });
        }
        v
    }
}

/// Which limit refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Requests,
    Tokens,
    Concurrent,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Requests => "requests_per_minute",
            Kind::Tokens => "tokens_per_minute",
            Kind::Concurrent => "concurrent",
        }
    }
}

/// A call a limit refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// The subject (`user:…`, `team:…`, `key:…`).
    pub key: String,
    pub kind: Kind,
    pub limit: u64,
    /// Seconds until a call of this size could go.
    pub retry_after: u64,
}

/// Where the first (the user's) limits stand after a call was let through: for the
/// `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    pub requests: Option<(u64, u64, u64)>,
    pub tokens: Option<(u64, u64, u64)>,
}

/// A call let through: what it holds, to be settled when it ends.
#[derive(Debug, Clone)]
pub struct Grant {
    pub id: String,
    pub checks: Vec<Check>,
    /// The second it was counted in.
    pub second: i64,
    /// The tokens it was counted for (its worst case).
    pub tokens: u64,
    /// (limit, remaining, seconds to reset) of the user's requests and tokens.
    pub standing: Standing,
}

/// A call's grant, held until it ends: settled to what it used, undone if it never went, or
/// (dropped unsettled, e.g. by a panic) settled at its worst case.
pub struct Held {
    ledger: std::sync::Arc<dyn super::Ledger>,
    pub grant: Grant,
    done: bool,
}

impl Held {
    pub fn new(ledger: std::sync::Arc<dyn super::Ledger>, grant: Grant) -> Self {
        Held {
            ledger,
            grant,
            done: false,
        }
    }

    /// The call ended having used `tokens`.
    pub fn settle(mut self, tokens: u64) {
        self.done = true;
        self.ledger.unlimit(&self.grant, tokens, false);
    }

    /// The call never went (a later check refused it): it counts nothing.
    pub fn undo(mut self) {
        self.done = true;
        self.ledger.unlimit(&self.grant, 0, true);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.done {
            self.ledger.unlimit(&self.grant, self.grant.tokens, false);
        }
    }
}

/// The per-second counts of one subject over the last minute, and its calls in flight.
#[derive(Debug)]
struct Window {
    /// (second, requests, tokens), by second modulo 60.
    slots: [(i64, u64, u64); 60],
    in_flight: u64,
    last: i64,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            slots: [(i64::MIN, 0, 0); 60],
            in_flight: 0,
            last: 0,
        }
    }
}

impl Window {
    fn slot(&mut self, second: i64) -> &mut (i64, u64, u64) {
        let s = &mut self.slots[second.rem_euclid(60) as usize];
        if s.0 != second {
            *s = (second, 0, 0);
        }
        s
    }

    /// Requests and tokens counted in the minute ending at second `now`.
    fn sums(&self, now: i64) -> (u64, u64) {
        self.slots
            .iter()
            .filter(|s| s.0 > now - 60 && s.0 <= now)
            .fold((0, 0), |(r, t), s| (r + s.1, t + s.2))
    }

    /// Seconds until the counts that must leave the window for `need` more to fit have
    /// left it (`pick` chooses requests or tokens).
    fn wait(&self, now: i64, limit: u64, need: u64, pick: impl Fn(&(i64, u64, u64)) -> u64) -> u64 {
        let mut live: Vec<&(i64, u64, u64)> = self
            .slots
            .iter()
            .filter(|s| s.0 > now - 60 && s.0 <= now)
            .collect();
        live.sort_by_key(|s| s.0);
        let mut total: u64 = live.iter().map(|s| pick(s)).sum();
        for s in live {
            total -= pick(s);
            if total + need <= limit {
                return (s.0 + 60 - now).max(1) as u64;
            }
        }
        60
    }
}

/// The embedded ledger's limiter (one replica, in memory).
#[derive(Default)]
pub struct Local {
    windows: std::sync::Mutex<HashMap<String, Window>>,
    swept: std::sync::atomic::AtomicI64,
}

/// The standing of `w` after a call, under `limit`.
fn standing(w: &Window, limit: &Limit, now: i64) -> Standing {
    let (r, t) = w.sums(now);
    let reset = |pick: fn(&(i64, u64, u64)) -> u64| {
        w.slots
            .iter()
            .filter(|s| s.0 > now - 60 && s.0 <= now && pick(s) > 0)
            .map(|s| (s.0 + 60 - now).max(1) as u64)
            .min()
            .unwrap_or(0)
    };
    Standing {
        requests: limit
            .requests_per_minute
            .map(|l| (l, l.saturating_sub(r), reset(|s| s.1))),
        tokens: limit
            .tokens_per_minute
            .map(|l| (l, l.saturating_sub(t), reset(|s| s.2))),
    }
}

impl Local {
    /// Counts a call of `tokens` (its worst case) at second `now` against every check, or
    /// refuses it (counting nothing) with the limit that would be passed.
    pub fn take(
        &self,
        checks: &[Check],
        tokens: u64,
        now: i64,
        id: String,
    ) -> Result<Grant, Limited> {
        let mut all = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        // Subjects idle for a minute leave memory: swept at most once a second (ids are the
        // callers' to choose, and a sweep walks them all).
        if all.len() > 10_000 && self.swept.swap(now, std::sync::atomic::Ordering::Relaxed) != now {
            all.retain(|_, w| w.in_flight > 0 || w.last > now - 60);
        }
        for c in checks {
            let w = all.entry(c.key.clone()).or_default();
            let (r, t) = w.sums(now);
            if let Some(l) = c.limit.requests_per_minute {
                if r + 1 > l {
                    return Err(Limited {
                        key: c.key.clone(),
                        kind: Kind::Requests,
                        limit: l,
                        retry_after: w.wait(now, l, 1, |s| s.1),
                    });
                }
            }
            if let Some(l) = c.limit.tokens_per_minute {
                if t + tokens > l {
                    return Err(Limited {
                        key: c.key.clone(),
                        kind: Kind::Tokens,
                        limit: l,
                        retry_after: if tokens > l {
                            60
                        } else {
                            w.wait(now, l, tokens, |s| s.2)
                        },
                    });
                }
            }
            if let Some(l) = c.limit.concurrent {
                if w.in_flight + 1 > l {
                    return Err(Limited {
                        key: c.key.clone(),
                        kind: Kind::Concurrent,
                        limit: l,
                        retry_after: 1,
                    });
                }
            }
        }
        let mut first = Standing::default();
        for (i, c) in checks.iter().enumerate() {
            let w = all.entry(c.key.clone()).or_default();
            let s = w.slot(now);
            s.1 += 1;
            s.2 += tokens;
            w.last = now;
            if c.limit.concurrent.is_some() {
                w.in_flight += 1;
            }
            if i == 0 {
                first = standing(w, &c.limit, now);
            }
        }
        Ok(Grant {
            id,
            checks: checks.to_vec(),
            second: now,
            tokens,
            standing: first,
        })
    }

    /// Settles a call: its tokens become `used` (its worst case was counted), and it leaves
    /// the calls in flight. `undo`: it never went (a later check refused it): it counts
    /// nothing.
    pub fn settle(&self, g: &Grant, used: u64, undo: bool) {
        let mut all = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        for c in &g.checks {
            let Some(w) = all.get_mut(&c.key) else {
                continue;
            };
            if c.limit.concurrent.is_some() {
                w.in_flight = w.in_flight.saturating_sub(1);
            }
            let s = &mut w.slots[g.second.rem_euclid(60) as usize];
            if s.0 == g.second {
                if undo {
                    s.1 = s.1.saturating_sub(1);
                    s.2 = s.2.saturating_sub(g.tokens);
                } else {
                    s.2 = s.2.saturating_sub(g.tokens).saturating_add(used);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rpm: Option<u64>, tpm: Option<u64>, conc: Option<u64>) -> Vec<Check> {
        vec![Check {
            key: "user:u".into(),
            limit: Limit {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                concurrent: conc,
            },
        }]
    }

    #[test]
    fn no_sixty_seconds_hold_more_requests_than_the_limit() {
        let l = Local::default();
        let c = check(Some(5), None, None);
        let mut let_through = Vec::new();
        for t in 0..300 {
            // Two tries a second.
            for _ in 0..2 {
                if let Ok(g) = l.take(&c, 1, 1000 + t, "x".into()) {
                    l.settle(&g, 1, false);
                    let_through.push(1000 + t);
                }
            }
        }
        for w in 0..300 {
            let n = let_through
                .iter()
                .filter(|&&t| t >= 1000 + w && t < 1000 + w + 60)
                .count();
            assert!(n <= 5, "{n} in the minute from {w}");
        }
        assert_eq!(let_through.len(), 25, "5 a minute for 5 minutes");
        // Refused: when the oldest leaves the window.
        let l = Local::default();
        for t in [0, 10, 20, 30, 40] {
            l.take(&c, 1, t, "x".into()).unwrap();
        }
        let e = l.take(&c, 1, 45, "x".into()).unwrap_err();
        assert_eq!((e.kind, e.limit, e.retry_after), (Kind::Requests, 5, 15));
    }

    #[test]
    fn tokens_count_the_worst_case_then_what_was_used_and_undo_counts_nothing() {
        let l = Local::default();
        let c = check(None, Some(1000), None);
        let g = l.take(&c, 800, 10, "a".into()).unwrap();
        assert_eq!(g.standing.tokens, Some((1000, 200, 60)));
        assert_eq!(
            l.take(&c, 300, 11, "b".into()).unwrap_err().kind,
            Kind::Tokens
        );
        l.settle(&g, 100, false);
        let g2 = l.take(&c, 300, 12, "c".into()).unwrap();
        assert_eq!(g2.standing.tokens, Some((1000, 600, 58)));
        l.settle(&g2, 0, true);
        assert_eq!(
            l.take(&c, 900, 13, "d".into())
                .unwrap()
                .standing
                .tokens
                .unwrap()
                .1,
            0
        );
        // A call larger than the limit can never go.
        let l = Local::default();
        assert_eq!(
            l.take(&c, 5000, 10, "e".into()).unwrap_err().retry_after,
            60
        );
    }

    #[test]
    fn calls_in_flight_are_held_until_they_settle() {
        let l = Local::default();
        let c = check(None, None, Some(2));
        let a = l.take(&c, 1, 0, "a".into()).unwrap();
        let _b = l.take(&c, 1, 0, "b".into()).unwrap();
        assert_eq!(
            l.take(&c, 1, 0, "c".into()).unwrap_err().kind,
            Kind::Concurrent
        );
        l.settle(&a, 1, false);
        assert!(l.take(&c, 1, 0, "d".into()).is_ok());
    }

    #[test]
    fn a_call_is_held_to_its_users_teams_and_keys_limits() {
        let raw: RawLimits = toml::from_str(
            "default = { requests_per_minute = 10 }\n\
             users.alice = { tokens_per_minute = 5 }\n\
             teams.lab = { concurrent = 3 }\n\
             keys.k1 = { requests_per_minute = 2 }\n",
        )
        .unwrap();
        let l = compile(&raw).unwrap();
        let keys: Vec<String> = l
            .checks("alice", &["lab".into(), "other".into()], Some("k1"))
            .into_iter()
            .map(|c| c.key)
            .collect();
        assert_eq!(keys, ["user:alice", "team:lab", "key:k1"]);
        assert_eq!(
            l.checks("bob", &[], None)[0].limit.requests_per_minute,
            Some(10)
        );
        let bad: RawLimits = toml::from_str("default = { concurrent = 0 }").unwrap();
        assert!(compile(&bad).unwrap_err().contains("leave it out"));
        assert!(toml::from_str::<RawLimits>("default = { rpm = 1 }").is_err());
    }
}
