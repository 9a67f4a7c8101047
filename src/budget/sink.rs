//! The ledger as a sink of records: settles each call's reservation at its real cost and
//! keeps its row for reports; the soft-threshold signal.

use std::sync::Arc;

use super::{now_unix, Amount, CallRow, Ledger, OpenCalls, SoftHook};
use crate::meter::UsageRecord;
/// What a record settles: its cost and tokens (zero when the upstream billed nothing).
pub fn actual(rec: &UsageRecord) -> Amount {
    Amount {
        pico: rec.cost.map_or(0, |c| c.0),
        tokens: rec.usage.prompt.saturating_add(rec.usage.completion),
    }
}

/// The ledger as a sink: settles each call's reservation (found by its request id among the
/// open calls) and keeps its row for reports.
pub struct LedgerSink {
    pub ledger: Arc<dyn Ledger>,
    pub open: Arc<OpenCalls>,
    /// Each user's teams, from the running config: a call's row names them also when no
    /// cap reserved it (teams without caps still show on reports and the admin page).
    pub membership: arc_swap::ArcSwap<std::collections::HashMap<String, Vec<String>>>,
}

/// Where the alerts settles raise go: a soft threshold to
/// `tokentap_budget_soft_threshold_crossed_total`, and every alert to `alerts` (logged,
/// counted, delivered to the webhooks).
pub fn soft_hook(
    calls: Arc<crate::telemetry::calls::CallMetrics>,
    alerts: Arc<super::alerts::Alerts>,
) -> SoftHook {
    Arc::new(move |a: super::alerts::Alert| {
        if a.threshold == "soft" {
            calls.soft_threshold_crossed(&a.subject, &a.window);
        }
        alerts.raise(a);
    })
}

impl crate::telemetry::Sink for LedgerSink {
    fn record(&self, rec: &Arc<UsageRecord>) {
        if !rec.metered() {
            return;
        }
        let now = now_unix();
        let reservation = self
            .open
            .get(&rec.request_id)
            .map(|c| Arc::clone(&c.reservation));
        if let Some(r) = &reservation {
            if !r.claim() {
                // The drain deadline settled it (and wrote its row) while this record was
                // being built: charging or listing it again would count the call twice.
                return;
            }
            self.ledger.settle(r, actual(rec), now);
        }
        let ts = rec
            .started_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(now, |d| d.as_secs() as i64);
        self.ledger.record_call(CallRow {
            ts,
            request_id: rec.request_id.clone(),
            user: reservation
                .as_ref()
                .map(|r| r.user.clone())
                .or_else(|| rec.user.clone()),
            teams: match (&reservation, &rec.user) {
                (Some(r), _) => r.teams.clone(),
                (None, Some(u)) => self.membership.load().get(u).cloned().unwrap_or_default(),
                (None, None) => Vec::new(),
            },
            model: rec.model.clone(),
            api: rec.api,
            usage: rec.usage,
            cost_pico: rec.cost.map(|c| c.0),
            estimated: rec.usage_source == crate::meter::UsageSource::Estimated,
            outcome: rec.outcome.as_str(),
            status: rec.status,
            duration_ms: Some(rec.duration.as_millis().min(u128::from(u64::MAX)) as u64),
            usage_source: rec.usage_source.as_str(),
        });
    }

    fn reconfigure(&self, cfg: &crate::config::Config) {
        self.membership
            .store(Arc::new(cfg.budgets.membership.clone()));
    }

    fn shutdown(&self) {
        self.ledger.flush();
    }
}
