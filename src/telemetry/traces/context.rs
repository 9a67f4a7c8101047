//! A call's place in a trace (W3C Trace Context): continued from `traceparent`, or new and
//! sampled by trace-id ratio.

use opentelemetry::trace::{SpanId, TraceId};
use rand::Rng;

/// A call's place in a trace, decided at its request head.
#[derive(Debug, Clone)]
pub struct CallTrace {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The caller's span, from its `traceparent`.
    pub parent: Option<SpanId>,
    pub sampled: bool,
    pub tracestate: Option<String>,
}

impl CallTrace {
    /// The trace of a call whose head carried `traceparent` (and `tracestate`), or a new one.
    pub fn start(traceparent: Option<&str>, tracestate: Option<&str>, ratio: f64) -> CallTrace {
        let mut rng = rand::thread_rng();
        let span_id = SpanId::from(rng.gen::<u64>());
        if let Some((trace_id, parent, sampled)) = traceparent.and_then(parse_traceparent) {
            return CallTrace {
                trace_id,
                span_id,
                parent: Some(parent),
                sampled,
                tracestate: tracestate.map(str::to_string),
            };
        }
        let trace_id = TraceId::from(rng.gen::<u128>());
        CallTrace {
            trace_id,
            span_id,
            parent: None,
            sampled: ratio_samples(trace_id, ratio),
            tracestate: None,
        }
    }

    /// The call's place in its trace, as the record keeps it.
    pub fn into_context(self) -> crate::meter::TraceContext {
        crate::meter::TraceContext {
            trace_id: self.trace_id.to_bytes(),
            span_id: self.span_id.to_bytes(),
            parent: self.parent.map(|p| p.to_bytes()),
            tracestate: self.tracestate,
        }
    }

    /// This call's span as a `traceparent` (for the upstream, when injecting).
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

/// The trace-id ratio rule of the OpenTelemetry spec: the low 63 bits of the trace id
/// against the ratio, so every tokentap replica decides a trace the same way.
pub(super) fn ratio_samples(id: TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    let bytes = id.to_bytes();
    let low = u64::from_be_bytes(bytes[8..16].try_into().unwrap_or_default()) >> 1;
    (low as f64) < ratio * (1u64 << 63) as f64
}

/// `version-traceid-spanid-flags` (W3C Trace Context); `None` for anything malformed.
pub fn parse_traceparent(s: &str) -> Option<(TraceId, SpanId, bool)> {
    let s = s.trim();
    let mut parts = s.split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    // Version 00 has exactly four fields; later versions may add more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace_id, span_id, flags & 1 == 1))
}
