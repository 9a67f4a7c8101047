//! The calls holding a reservation not settled yet: settled by their record (found by request
//! id), or at the one estimate when they never get one (a panic, the drain deadline).

use std::sync::Arc;

use super::{now_unix, Amount, CallRow, Ledger, Reservation};
use crate::meter::Usage;
/// A call whose reservation is not settled yet, with what it takes to settle it at an
/// estimate should the call never get its record (a panic, or a stream still running when
/// the shutdown's drain deadline ends the process).
pub struct OpenCall {
    pub reservation: Arc<Reservation>,
    pub request_id: String,
    pub model: Option<String>,
    pub price: Option<crate::meter::pricing::ModelPrice>,
    /// Bytes of the request's text (the prompt estimate's basis).
    pub prompt_text_bytes: u64,
    pub started: i64,
    /// Content relayed so far, and the usage once the upstream reported it.
    pub completion_bytes: std::sync::atomic::AtomicU64,
    /// Web searches counted so far (`Observed::web_searches`).
    pub web_searches: std::sync::atomic::AtomicU64,
    pub reported: std::sync::Mutex<Option<Usage>>,
    /// The usage the stream announced when it started, while that is all it sent.
    pub opening: std::sync::Mutex<Option<Usage>>,
    /// The call's dialect (its searches may be priced apart).
    pub api: Option<crate::meter::Api>,
}

impl OpenCall {
    /// Follows the response as the tap sees it.
    pub fn observe(&self, tap: &crate::openai::response::ResponseTap) {
        use std::sync::atomic::Ordering::Relaxed;
        let o = &tap.observed;
        self.completion_bytes.store(tap.completion_bytes(), Relaxed);
        if let Some((n, _)) = o.web_searches() {
            self.web_searches.store(n, Relaxed);
        }
        if let Some(u) = o.reported_usage() {
            *self.reported.lock().unwrap_or_else(|p| p.into_inner()) = Some(u);
        }
        if let Some(u) = o.opening_usage() {
            *self.opening.lock().unwrap_or_else(|p| p.into_inner()) = Some(u);
        }
    }

    /// What the call cost as far as tokentap saw it: the usage the upstream reported, or the
    /// prompt estimated from the request and the completion from the content relayed.
    fn estimate(&self) -> (Usage, bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(u) = *self.reported.lock().unwrap_or_else(|p| p.into_inner()) {
            return (u, false);
        }
        let usage = crate::meter::estimate(
            self.prompt_text_bytes,
            self.completion_bytes.load(Relaxed),
            self.web_searches.load(Relaxed),
            *self.opening.lock().unwrap_or_else(|p| p.into_inner()),
        );
        (usage, true)
    }

    /// Settles the call at its estimate unless its record settled it; true if this did.
    fn abandon(&self, ledger: &dyn Ledger) -> bool {
        if !self.reservation.claim() {
            return false;
        }
        let (usage, estimated) = self.estimate();
        let cost = self.price.map(|p| p.cost(self.api, &usage).0);
        let amount = Amount {
            pico: cost.unwrap_or(0),
            tokens: usage.prompt.saturating_add(usage.completion),
        };
        ledger.settle(&self.reservation, amount, now_unix());
        ledger.record_call(CallRow {
            ts: self.started,
            request_id: self.request_id.clone(),
            user: Some(self.reservation.user.clone()),
            teams: self.reservation.teams.clone(),
            model: self.model.clone(),
            api: self.api,
            usage,
            cost_pico: cost,
            estimated,
            outcome: "abandoned",
            status: 0,
            duration_ms: None,
            usage_source: if estimated { "estimated" } else { "reported" },
        });
        true
    }
}

/// The calls holding a reservation not settled yet.
#[derive(Default)]
pub struct OpenCalls {
    /// By request id (unique across restarts).
    calls: dashmap::DashMap<String, Arc<OpenCall>>,
}

impl OpenCalls {
    /// Registers a call; dropping the guard settles it at its estimate if nothing else did.
    pub fn open(self: &Arc<Self>, call: OpenCall, ledger: Arc<dyn Ledger>) -> OpenGuard {
        let call = Arc::new(call);
        self.calls
            .insert(call.request_id.clone(), Arc::clone(&call));
        OpenGuard {
            call,
            calls: Arc::clone(self),
            ledger,
        }
    }

    /// The open call of a request, for its record to settle.
    pub fn get(&self, request_id: &str) -> Option<Arc<OpenCall>> {
        self.calls.get(request_id).map(|c| Arc::clone(c.value()))
    }

    /// The reservations of the calls in flight.
    pub fn held(&self) -> Vec<Arc<Reservation>> {
        self.calls
            .iter()
            .map(|e| Arc::clone(&e.value().reservation))
            .collect()
    }

    /// Settles every open call at its estimate (the drain deadline is ending the process);
    /// returns how many it settled.
    pub fn abandon_all(&self, ledger: &dyn Ledger) -> usize {
        let open: Vec<Arc<OpenCall>> = self.calls.iter().map(|e| Arc::clone(e.value())).collect();
        open.iter().filter(|c| c.abandon(ledger)).count()
    }
}

pub struct OpenGuard {
    pub call: Arc<OpenCall>,
    calls: Arc<OpenCalls>,
    ledger: Arc<dyn Ledger>,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.calls.calls.remove(&self.call.request_id);
        if self.call.abandon(&*self.ledger) {
            log::warn!(
                "call {} ended without a record: settled its reservation at the estimate",
                self.call.request_id
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::policy::BudgetPolicy;

    /// A call cut off (upstream reset, client gone) is estimated by its record; one that never
    /// gets a record (a panic, the drain deadline) by its open call. The same bytes must give
    /// the same figure both ways.
    #[test]
    fn an_abandoned_call_and_a_recorded_one_are_estimated_alike() {
        use crate::openai::response::{BodyKind, ResponseTap};
        let stream = concat!(
            "data: {\"type\":\"search_done\",\"search_results\":[{\"query\":\"a\",\"results\":[]},",
            "{\"query\":\"b\",\"results\":[]},{\"query\":\"c\",\"results\":[]}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"some words here\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"reasoning\":\"hmm\"}}]}\n\ndata: {\"cho",
        );
        let json = r#"{"id":"x","choices":[{"message":{"content":"a whole answer, cut"}}],"usa"#;
        let policy = BudgetPolicy::default();
        for (kind, body) in [(BodyKind::Sse, stream), (BodyKind::Json, json)] {
            let mut tap = ResponseTap::new(kind, None, 1 << 20);
            let call = OpenCall {
                reservation: Arc::new(Reservation::new(
                    &policy,
                    "u",
                    Vec::new(),
                    Amount::default(),
                )),
                request_id: "r".into(),
                model: None,
                price: None,
                prompt_text_bytes: 41,
                started: 0,
                completion_bytes: Default::default(),
                web_searches: Default::default(),
                reported: Default::default(),
                opening: Default::default(),
                api: None,
            };
            for piece in body.as_bytes().chunks(7) {
                tap.feed(&bytes::Bytes::copy_from_slice(piece));
                call.observe(&tap);
            }
            let (abandoned, estimated) = call.estimate();
            assert!(estimated);
            let recorded = tap.finish().estimate(41);
            assert_eq!(abandoned, recorded, "{kind:?}");
            assert!(recorded.completion > 0, "{kind:?}");
        }
    }
}
