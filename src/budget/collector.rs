//! Budget gauges for Prometheus, read from the ledger at scrape time.

use std::sync::Arc;

use super::policy::{Subject, Window};
use super::{now_unix, Amount, Ledger};
/// Budget gauges read from the ledger at scrape time: `tokentap_budget_spend_usd` and
/// `tokentap_budget_remaining_usd` per capped user and window, and
/// `tokentap_ledger_errors_total`. Users with caps of their own are always exported; users
/// under the default caps only up to `metrics.max_users`, biggest spenders first.
pub struct BudgetCollector {
    config: crate::config::Live,
    ledger: Arc<dyn Ledger>,
    descs: Vec<prometheus::core::Desc>,
}

impl BudgetCollector {
    pub fn new(config: crate::config::Live, ledger: Arc<dyn Ledger>) -> Self {
        let d = |n: &str, h: &str, l: &[&str]| {
            prometheus::core::Desc::new(
                n.into(),
                h.into(),
                l.iter().map(|s| s.to_string()).collect(),
                Default::default(),
            )
            .expect("valid metric description")
        };
        BudgetCollector {
            config,
            ledger,
            descs: vec![
                d(
                    "tokentap_budget_spend_usd",
                    "Spend in the current window, per capped user.",
                    &["user", "window"],
                ),
                d(
                    "tokentap_budget_remaining_usd",
                    "USD left under the hard cap in the current window, per capped user.",
                    &["user", "window"],
                ),
                d(
                    "tokentap_ledger_errors_total",
                    "Times the ledger could not persist or reach its store.",
                    &[],
                ),
                d(
                    "tokentap_ledger_store_resets_total",
                    "Times the shared budget store (Redis) was seen to have lost its data \
                     (restart without persistence, FLUSHALL, failover to an empty replica).",
                    &[],
                ),
                d(
                    "tokentap_ledger_store_up",
                    "1 when the budget store answers (Redis: its last round trip worked; the \
                     embedded ledger: its file is open), 0 while it does not \
                     (budgets.ledger.on_error applies).",
                    &[],
                ),
                d(
                    "tokentap_ledger_file_writable",
                    "1 when the last write to the ledger's file worked, 0 while it fails (disk \
                     full or read-only): spend and call rows then wait in memory and caps still \
                     hold.",
                    &[],
                ),
            ],
        }
    }
}

impl prometheus::core::Collector for BudgetCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use prometheus::proto::{Gauge, LabelPair, Metric, MetricFamily, MetricType};
        let cfg = self.config.load();
        let policy = &cfg.budgets;
        let now = now_unix();
        let mut spend = MetricFamily::default();
        spend.set_name(self.descs[0].fq_name.clone());
        spend.set_help(self.descs[0].help.clone());
        spend.set_field_type(MetricType::GAUGE);
        let mut remaining = MetricFamily::default();
        remaining.set_name(self.descs[1].fq_name.clone());
        remaining.set_help(self.descs[1].help.clone());
        remaining.set_field_type(MetricType::GAUGE);
        let mut users: Vec<(String, Window, Amount, Option<crate::meter::Pico>, bool)> = self
            .ledger
            .counters(policy, now)
            .into_iter()
            .filter_map(|(key, window, amount)| {
                let user = key.strip_prefix("user:")?.to_string();
                let own = policy.user_caps.contains_key(&user);
                let cap = policy
                    .caps_for(&user)
                    .into_iter()
                    .find(|(s, c)| matches!(s, Subject::User(_)) && c.window == window)?
                    .1
                    .usd;
                Some((user, window, amount, cap, own))
            })
            .collect();
        users.sort_by(|a, b| b.4.cmp(&a.4).then(b.2.pico.cmp(&a.2.pico)));
        let max = cfg.metrics.max_users;
        let mut default_seen = 0;
        let gauge = |user: &str, window: Window, v: f64| {
            let mut l1 = LabelPair::default();
            l1.set_name("user".into());
            l1.set_value(crate::telemetry::calls::escape(user));
            let mut l2 = LabelPair::default();
            l2.set_name("window".into());
            l2.set_value(window.name());
            let mut g = Gauge::default();
            g.set_value(v);
            let mut m = Metric::default();
            m.set_label(vec![l1, l2]);
            m.set_gauge(g);
            m
        };
        for (user, window, amount, cap, own) in users {
            if !own {
                default_seen += 1;
                if default_seen > max {
                    continue;
                }
            }
            spend
                .mut_metric()
                .push(gauge(&user, window, amount.pico as f64 / 1e12));
            if let Some(cap) = cap {
                let left = cap.0.saturating_sub(amount.pico);
                remaining
                    .mut_metric()
                    .push(gauge(&user, window, left as f64 / 1e12));
            }
        }
        // One unlabelled sample of the family described by `descs[i]`.
        let single = |i: usize, kind: MetricType, v: f64| {
            let mut f = MetricFamily::default();
            f.set_name(self.descs[i].fq_name.clone());
            f.set_help(self.descs[i].help.clone());
            f.set_field_type(kind);
            let mut m = Metric::default();
            if kind == MetricType::COUNTER {
                let mut c = prometheus::proto::Counter::default();
                c.set_value(v);
                m.set_counter(c);
            } else {
                let mut g = Gauge::default();
                g.set_value(v);
                m.set_gauge(g);
            }
            f.mut_metric().push(m);
            f
        };
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let mut out = vec![single(2, MetricType::COUNTER, self.ledger.errors() as f64)];
        if let Some(up) = self.ledger.store_up() {
            out.push(single(
                3,
                MetricType::COUNTER,
                self.ledger.store_resets() as f64,
            ));
            out.push(single(4, MetricType::GAUGE, flag(up)));
        }
        if let Some(ok) = self.ledger.file_writable() {
            out.push(single(5, MetricType::GAUGE, flag(ok)));
        }
        for f in [spend, remaining] {
            if !f.get_metric().is_empty() {
                out.push(f);
            }
        }
        out
    }
}
