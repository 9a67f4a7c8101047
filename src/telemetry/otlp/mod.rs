//! OTLP trace export without an SDK: a batch of spans, each encoded once as it arrives, framed
//! as an `ExportTraceServiceRequest` when the batch goes, and the transports that send it.
//!
//! prost encodes a message by asking every nested message for its length at each level of
//! nesting, so a span inside the request's three wrappers (ResourceSpans, ScopeSpans, the
//! request itself) had its attributes measured again for each. Here a span is measured and
//! written once (its attributes as they are added, see [`Attrs`]), and the wrappers, whose
//! only content is the resource, the scope and the spans, are written around the
//! concatenated span bytes: their lengths are sums.

mod attrs;
pub mod transport;

pub use attrs::Attrs;

use bytes::Bytes;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;

/// `ExportTraceServiceRequest.resource_spans`, `ResourceSpans.resource`,
/// `ResourceSpans.scope_spans`, `ScopeSpans.scope` and `ScopeSpans.spans`.
const REQUEST_RESOURCE_SPANS: u32 = 1;
const RESOURCE_SPANS_RESOURCE: u32 = 1;
const RESOURCE_SPANS_SCOPE_SPANS: u32 = 2;
const SCOPE_SPANS_SCOPE: u32 = 1;
const SCOPE_SPANS_SPANS: u32 = 2;

/// The spans of one export: one resource (the service) and one scope (tokentap), as the
/// OTLP exporter grouped them, since every span shares both.
pub struct Batch {
    /// `ResourceSpans.resource`, with its key and length: the same for every batch.
    resource: Vec<u8>,
    /// `ScopeSpans.scope`, likewise.
    scope: Vec<u8>,
    /// Each span as `ScopeSpans.spans`: key, length, message. Kept between batches (cleared,
    /// not freed), so a steady load reuses one buffer.
    spans: Vec<u8>,
    count: usize,
}

impl Batch {
    /// An empty batch of `service_name`'s spans.
    pub fn new(service_name: &str) -> Batch {
        let resource = Resource {
            attributes: vec![KeyValue {
                key: crate::telemetry::semconv::SERVICE_NAME.into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(service_name.into())),
                }),
                key_strindex: 0,
            }],
            ..Resource::default()
        };
        let scope = InstrumentationScope {
            name: "tokentap".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..InstrumentationScope::default()
        };
        Batch {
            resource: field(RESOURCE_SPANS_RESOURCE, &resource),
            scope: field(SCOPE_SPANS_SCOPE, &scope),
            spans: Vec::new(),
            count: 0,
        }
    }

    /// Adds a span, encoded now: `span`'s fields, with `attrs` after its own attributes (if
    /// any). The batch keeps the bytes, not the message.
    pub fn push(&mut self, mut span: Span, attrs: &Attrs) {
        // prost writes fields in tag order: a span is its fields up to the attributes (1 to
        // 9), then the rest (10 to 16). Split so, the two halves, prost-encoded, go around the
        // attributes written already.
        let rest = Span {
            dropped_attributes_count: std::mem::take(&mut span.dropped_attributes_count),
            events: std::mem::take(&mut span.events),
            dropped_events_count: std::mem::take(&mut span.dropped_events_count),
            links: std::mem::take(&mut span.links),
            dropped_links_count: std::mem::take(&mut span.dropped_links_count),
            status: span.status.take(),
            flags: std::mem::take(&mut span.flags),
            ..Span::default()
        };
        let len = span.encoded_len() + attrs.bytes().len() + rest.encoded_len();
        encode_key(
            SCOPE_SPANS_SPANS,
            WireType::LengthDelimited,
            &mut self.spans,
        );
        encode_varint(len as u64, &mut self.spans);
        // Into a Vec these cannot fail: it grows as needed.
        let _ = span.encode(&mut self.spans);
        self.spans.extend_from_slice(attrs.bytes());
        let _ = rest.encode(&mut self.spans);
        self.count += 1;
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The `ExportTraceServiceRequest` of the spans so far, byte for byte what prost makes of
    /// the same message.
    pub fn request(&self) -> Bytes {
        let scope_spans = self.scope.len() + self.spans.len();
        let resource_spans = self.resource.len()
            + key_len(RESOURCE_SPANS_SCOPE_SPANS)
            + encoded_len_varint(scope_spans as u64)
            + scope_spans;
        let mut out = Vec::with_capacity(
            key_len(REQUEST_RESOURCE_SPANS)
                + encoded_len_varint(resource_spans as u64)
                + resource_spans,
        );
        encode_key(REQUEST_RESOURCE_SPANS, WireType::LengthDelimited, &mut out);
        encode_varint(resource_spans as u64, &mut out);
        out.extend_from_slice(&self.resource);
        encode_key(
            RESOURCE_SPANS_SCOPE_SPANS,
            WireType::LengthDelimited,
            &mut out,
        );
        encode_varint(scope_spans as u64, &mut out);
        out.extend_from_slice(&self.scope);
        out.extend_from_slice(&self.spans);
        Bytes::from(out)
    }

    /// Empty again, keeping the buffer.
    pub fn clear(&mut self) {
        self.spans.clear();
        self.count = 0;
    }
}

/// A message as a length-delimited field with this tag.
fn field(tag: u32, m: &impl Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(key_len(tag) + m.encoded_len() + 10);
    encode_key(tag, WireType::LengthDelimited, &mut out);
    let _ = m.encode_length_delimited(&mut out);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};

    /// `got` decodes to `want` and is byte for byte what prost encodes for it.
    pub(crate) fn assert_encodes_as(got: Bytes, want: &ExportTraceServiceRequest, n: usize) {
        assert_eq!(
            &ExportTraceServiceRequest::decode(got.clone()).unwrap(),
            want
        );
        assert_eq!(got.as_ref(), want.encode_to_vec().as_slice(), "{n} spans");
    }

    /// What the OTLP exporter built for these spans: one resource, one scope.
    pub(crate) fn expected(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![KeyValue {
                        key: "service.name".into(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::StringValue(service.into())),
                        }),
                        key_strindex: 0,
                    }],
                    dropped_attributes_count: 0,
                    entity_refs: vec![],
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "tokentap".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    fn span(name: &str, attrs: usize) -> Span {
        Span {
            trace_id: vec![7; 16],
            span_id: vec![9; 8],
            name: name.into(),
            kind: 3,
            start_time_unix_nano: 1,
            end_time_unix_nano: 2,
            attributes: (0..attrs)
                .map(|i| KeyValue {
                    key: format!("k{i}"),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::IntValue(i as i64 * 1000)),
                    }),
                    key_strindex: 0,
                })
                .collect(),
            status: Some(Default::default()),
            ..Default::default()
        }
    }

    #[test]
    fn a_batch_is_what_prost_makes_of_the_request_it_stands_for() {
        // 0, 1 and many spans; big enough that the lengths need several varint bytes.
        for n in [0, 1, 2, 300] {
            let spans: Vec<Span> = (0..n).map(|i| span(&format!("s{i}"), i % 40)).collect();
            let mut b = Batch::new("svc");
            for s in &spans {
                b.push(s.clone(), &Attrs::default());
            }
            assert_eq!(b.len(), n);
            assert_encodes_as(b.request(), &expected("svc", spans), n);
        }
    }

    #[test]
    fn written_attributes_join_the_spans_own_in_place() {
        let mut with = span("s", 3);
        with.events.push(Default::default());
        with.flags = 0x301;
        let mut own = with.clone();
        let extra = own.attributes.split_off(1);
        let mut attrs = Attrs::default();
        for kv in &extra {
            match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::IntValue(i)) => attrs.int(&kv.key, *i),
                other => panic!("not an int: {other:?}"),
            }
        }
        let mut b = Batch::new("svc");
        b.push(own, &attrs);
        let want = expected("svc", vec![with]);
        assert_eq!(b.request().as_ref(), want.encode_to_vec().as_slice());
    }

    #[test]
    fn a_cleared_batch_starts_over() {
        let mut b = Batch::new("svc");
        b.push(span("old", 3), &Attrs::default());
        b.clear();
        assert!(b.is_empty());
        b.push(span("new", 1), &Attrs::default());
        let got = ExportTraceServiceRequest::decode(b.request()).unwrap();
        assert_eq!(got, expected("svc", vec![span("new", 1)]));
    }
}
