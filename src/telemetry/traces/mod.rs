//! Traces: one OTLP span per call, built from its [`UsageRecord`] after the call ended.
//!
//! The proxy decides at the request head whether a call is traced (continuing an incoming W3C
//! `traceparent`, otherwise sampling by trace-id ratio) and gives it its span id, so that the
//! upstream request can carry the span as parent when the operator asks for it. The record
//! goes to a bounded queue (a full queue drops it and counts the drop); tokentap's own
//! exporter thread, with its own Tokio runtime, builds the spans and exports them in batches
//! over OTLP gRPC or HTTP/protobuf. A collector that is down or slow never slows a call: its
//! batches fail after the export timeout, and their spans are counted as dropped.

mod config;
mod context;
mod export;
mod span;

pub use config::*;
pub use context::*;
pub use export::*;
pub use span::*;

#[cfg(test)]
mod tests {
    use super::super::otlp::{Attrs, Batch};
    use super::*;
    use crate::meter::{UsageRecord, UsageSource};
    use opentelemetry_proto::tonic::common::v1::any_value;
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
    use opentelemetry_proto::tonic::trace::v1::{Span, Status};
    use std::collections::BTreeMap;
    use std::time::Duration;

    #[test]
    fn traceparent_is_parsed_strictly() {
        let ok = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let (t, s, sampled) = parse_traceparent(ok).unwrap();
        assert_eq!(t.to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(s.to_string(), "b7ad6b7169203331");
        assert!(sampled);
        assert!(!parse_traceparent(&ok.replace("-01", "-00")).unwrap().2);
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
        // A later version may carry more fields.
        assert!(parse_traceparent(&format!("01{}-more", &ok[2..])).is_some());
    }

    #[test]
    fn a_continued_trace_keeps_the_callers_trace_and_sampling() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let t = CallTrace::start(Some(tp), Some("vendor=x"), 0.0);
        assert_eq!(t.trace_id.to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(t.parent.unwrap().to_string(), "b7ad6b7169203331");
        assert!(t.sampled, "the parent's decision wins over the ratio");
        assert_ne!(t.span_id.to_string(), "b7ad6b7169203331");
        assert!(t
            .traceparent()
            .starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
        assert!(t.traceparent().ends_with("-01"));
        // New traces follow the ratio.
        assert!(CallTrace::start(None, None, 1.0).sampled);
        assert!(!CallTrace::start(None, None, 0.0).sampled);
        let half = (0..2000)
            .filter(|_| CallTrace::start(None, None, 0.5).sampled)
            .count();
        assert!((800..1200).contains(&half), "{half}");
    }

    #[test]
    fn input_messages_are_cut_to_the_limit_and_stay_json() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"h\u00e9llo world"},
            {"type":"image_url","image_url":{"url":"data:..."}}]}]}"#;
        let all: serde_json::Value =
            serde_json::from_str(&input_messages(body, 1000).unwrap()).unwrap();
        assert_eq!(all[0]["role"], "system");
        assert_eq!(all[0]["parts"][0]["content"], "Be brief.");
        assert_eq!(all[1]["parts"][0]["content"], "héllo world");
        assert_eq!(all[1]["parts"][1]["type"], "image_url");
        let cut: serde_json::Value =
            serde_json::from_str(&input_messages(body, 11).unwrap()).unwrap();
        assert_eq!(cut[0]["parts"][0]["content"], "Be brief.");
        // 2 bytes left: "h" and not half of "é".
        assert_eq!(cut[1]["parts"][0]["content"], "h");
        // The messages alone, as request inspection hands them over, read the same.
        let meta = crate::openai::request::inspect(body).unwrap();
        let messages = &body[meta.spans.messages.unwrap()];
        assert_eq!(input_messages(messages, 1000), input_messages(body, 1000));
    }

    #[test]
    fn endpoints_are_checked_and_http_gets_the_signal_path() {
        let raw = |e: &str, p: &str| RawTraces {
            endpoint: Some(e.into()),
            protocol: Some(p.into()),
            ..RawTraces::default()
        };
        let c = compile(&raw("http://c:4318/", "http/protobuf")).unwrap();
        assert_eq!(c.export.unwrap().endpoint, "http://c:4318/v1/traces");
        let c = compile(&raw("http://c:4317", "grpc")).unwrap();
        assert_eq!(c.export.unwrap().endpoint, "http://c:4317");
        assert!(compile(&raw("https://c:4317", "grpc")).is_ok());
        assert!(compile(&raw("https://c:4318", "http/protobuf"))
            .unwrap_err()
            .contains("TLS"));
        let c = compile(&raw("http://c:4318/v1/traces", "http/protobuf")).unwrap();
        assert_eq!(c.export.unwrap().endpoint, "http://c:4318/v1/traces");
        let off = RawTraces {
            endpoint: Some(String::new()),
            ..RawTraces::default()
        };
        assert!(compile(&off).unwrap().export.is_none());
        assert!(compile(&raw("c:4317", "grpc")).is_err());
        assert!(compile(&raw("http://c:4317", "thrift"))
            .unwrap_err()
            .contains("traces.protocol"));
        let bad = RawTraces {
            sampling_ratio: Some(1.5),
            ..RawTraces::default()
        };
        assert!(compile(&bad).unwrap_err().contains("sampling_ratio"));
    }

    /// `compile` in an environment of these variables only.
    fn compile_env(raw: &RawTraces, vars: &[(&str, &str)]) -> Result<TracesConfig, String> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        compile_in(raw, &Env(&|name| vars.get(name).cloned()))
    }

    fn grpc_to(headers: &[(&str, &str)]) -> RawTraces {
        RawTraces {
            endpoint: Some("http://c:4317".into()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..RawTraces::default()
        }
    }

    fn headers_of(c: Result<TracesConfig, String>) -> Vec<(String, String)> {
        c.unwrap().export.unwrap().headers.into_iter().collect()
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn otlp_header_variables_add_to_the_files_and_win_for_the_same_name() {
        let raw = grpc_to(&[("X-Team", "file"), ("Authorization", "file")]);
        let vars = [
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Authorization=Bearer%20abc , x-extra = 1,",
            ),
            // Never applied: the config always sets the timeout (as the exporter had it).
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "1"),
        ];
        let c = compile_env(&raw, &vars);
        assert_eq!(
            c.as_ref()
                .unwrap()
                .export
                .as_ref()
                .unwrap()
                .timeout
                .as_millis(),
            5000
        );
        assert_eq!(
            headers_of(c),
            pairs(&[
                ("authorization", "Bearer abc"),
                ("x-extra", "1"),
                ("x-team", "file")
            ])
        );
        assert_eq!(
            headers_of(compile_env(&raw, &[])),
            pairs(&[("authorization", "file"), ("x-team", "file")])
        );
    }

    #[test]
    fn the_traces_header_variable_replaces_the_generic_one() {
        let raw = grpc_to(&[]);
        let generic = ("OTEL_EXPORTER_OTLP_HEADERS", "a=1,b=2");
        let c = compile_env(
            &raw,
            &[generic, ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "b=3")],
        );
        assert_eq!(headers_of(c), pairs(&[("b", "3")]));
        // Set but empty, it still hides the generic one.
        let c = compile_env(&raw, &[generic, ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "")]);
        assert_eq!(headers_of(c), pairs(&[]));
        let c = compile_env(&raw, &[generic]);
        assert_eq!(headers_of(c), pairs(&[("a", "1"), ("b", "2")]));
    }

    #[test]
    fn header_variable_entries_that_cannot_be_sent_are_skipped() {
        let list = "novalue,=x,k=,bad name=1,ok=1,v=%zz,x-bin=AAEC,ctl=%0A";
        let vars = [("OTEL_EXPORTER_OTLP_HEADERS", list)];
        let c = compile_env(&grpc_to(&[]), &vars);
        assert_eq!(headers_of(c), pairs(&[("ok", "1"), ("v", "%zz")]));
        // Binary metadata is a gRPC notion: over HTTP it is a header like any other.
        let http = RawTraces {
            protocol: Some("http/protobuf".into()),
            ..grpc_to(&[])
        };
        let c = compile_env(&http, &vars);
        assert_eq!(
            headers_of(c),
            pairs(&[("ok", "1"), ("v", "%zz"), ("x-bin", "AAEC")])
        );
    }

    #[test]
    fn file_headers_that_cannot_be_sent_are_config_errors() {
        for bad in [
            ("bad name", "v"),
            ("x-key", "line\nbreak"),
            ("x-bin", "AAEC"),
        ] {
            let e = compile_env(&grpc_to(&[bad]), &[]).unwrap_err();
            assert!(e.starts_with("traces.headers: "), "{e}");
        }
    }

    #[test]
    fn header_values_are_percent_decoded_unless_broken() {
        for (v, want) in [
            ("a%20b", "a b"),
            ("%C3%A9t%C3%A9", "été"),
            ("100%", "100%"),
            ("%4", "%4"),
            ("%zz1", "%zz1"),
            ("%FF", "%FF"),
            ("plain", "plain"),
        ] {
            assert_eq!(percent_decoded(v), want, "{v}");
        }
    }

    /// A traced call: a chat call with every optional field set, or with none; or another
    /// call.
    fn record(kind: &str) -> UsageRecord {
        let full = kind == "full";
        let some = |v: &str| full.then(|| v.to_string());
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let trace = CallTrace::start(full.then_some(tp), Some("vendor=abc"), 1.0);
        UsageRecord {
            provider: Some("anthropic".into()),
            method: if kind == "other" { "PROPFIND" } else { "POST" }.into(),
            api: (kind != "other").then_some(crate::meter::Api::ChatCompletions),
            path_class: "",
            model: some("anthropic/claude"),
            response_model: some("anthropic/claude-1"),
            response_id: some("gen-1"),
            user: some("alice"),
            stream: full,
            max_tokens: full.then_some(50),
            status: if full { 529 } else { 200 },
            upstream_status: full.then_some(529),
            usage: crate::meter::Usage {
                web_searches: 1,
                ..UsageRecord::test_chat().usage
            },
            usage_source: if full {
                UsageSource::Reported
            } else {
                UsageSource::None
            },
            cost: full.then_some(crate::meter::Pico(1_500_000)),
            finish_reasons: if full { vec!["stop".into()] } else { vec![] },
            duration: Duration::from_millis(1500),
            trace: Some(trace.into_context()),
            upstream_host: "api.example".into(),
            upstream_port: 443,
            url_base: "https://api.example/api".into(),
            temperature: full.then_some(0.5),
            top_p: full.then_some(0.9),
            budget_decision: full.then_some("allowed"),
            captured_input: full.then(|| {
                bytes::Bytes::from_static(br#"{"messages":[{"role":"user","content":"hi"}]}"#)
            }),
            captured_output: some("hello"),
            upstream_error_type: some("overloaded"),
            time_to_first_chunk: full.then_some(Duration::from_millis(30)),
            ..UsageRecord::test_chat()
        }
    }

    fn settings() -> SpanSettings {
        SpanSettings {
            metrics: crate::config::MetricsConfig {
                user_label: crate::config::UserLabel::All,
                max_users: 10,
                users: Vec::new(),
                max_models: 10,
                max_series: 100,
                hash_salt: String::new(),
                priced_models: Vec::new(),
            },
            max_content_bytes: 100,
        }
    }

    /// A record's span as a collector gets it.
    fn encoded(rec: &UsageRecord) -> Span {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message;
        let mut batch = Batch::new("svc");
        add(&mut batch, &mut Attrs::default(), rec, &settings());
        let mut req = ExportTraceServiceRequest::decode(batch.request()).unwrap();
        req.resource_spans[0].scope_spans[0].spans.remove(0)
    }

    fn attr<'a>(s: &'a Span, k: &str) -> &'a any_value::Value {
        let kv = s.attributes.iter().find(|a| a.key == k);
        let v = kv
            .and_then(|a| a.value.as_ref())
            .and_then(|v| v.value.as_ref());
        v.unwrap_or_else(|| panic!("no {k}"))
    }

    #[test]
    fn a_span_carries_the_calls_context_and_attributes() {
        use any_value::Value as V;
        let full = encoded(&record("full"));
        assert_eq!(full.name, "chat anthropic/claude");
        assert_eq!(full.kind, SpanKind::Client as i32);
        assert_eq!(
            full.parent_span_id,
            [0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31]
        );
        assert_eq!(full.trace_state, "vendor=abc");
        assert_eq!(full.flags, 0x301, "sampled, with a remote parent");
        assert_eq!(full.start_time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(full.end_time_unix_nano, 1_700_000_001_500_000_000);
        let status = full.status.as_ref().unwrap();
        assert_eq!(
            (status.code, status.message.as_str()),
            (StatusCode::Error as i32, "overloaded")
        );
        assert_eq!(
            *attr(&full, "error.type"),
            V::StringValue("overloaded".into())
        );
        assert_eq!(*attr(&full, "gen_ai.request.max_tokens"), V::IntValue(50));
        assert_eq!(*attr(&full, "gen_ai.request.top_p"), V::DoubleValue(0.9));
        assert_eq!(*attr(&full, "gen_ai.request.stream"), V::BoolValue(true));
        assert_eq!(*attr(&full, "tokentap.cost_usd"), V::DoubleValue(1.5e-6));
        assert_eq!(*attr(&full, "http.response.status_code"), V::IntValue(529));
        let V::ArrayValue(reasons) = attr(&full, "gen_ai.response.finish_reasons") else {
            panic!("not an array")
        };
        assert_eq!(reasons.values[0].value, Some(V::StringValue("stop".into())));
        assert!(
            matches!(attr(&full, "gen_ai.input.messages"), V::StringValue(m) if m.contains("hi"))
        );

        let bare = encoded(&record("bare"));
        assert_eq!(bare.name, "chat");
        assert!(bare.parent_span_id.is_empty());
        assert_eq!(bare.trace_state, "", "a new trace has no tracestate");
        assert_eq!(bare.flags, 0x101, "sampled, no remote parent");
        assert_eq!(bare.status, Some(Status::default()));
        let keys: Vec<&str> = bare.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "gen_ai.operation.name",
                "tokentap.api",
                "gen_ai.provider.name",
                "gen_ai.request.stream",
                "tokentap.usage.estimated",
                "tokentap.web_searches",
                "server.address",
                "server.port",
                "tokentap.outcome",
                "tokentap.request_id",
            ]
        );

        let other = encoded(&record("other"));
        assert_eq!(other.name, "HTTP");
        assert_eq!(
            *attr(&other, "http.request.method"),
            V::StringValue("_OTHER".into())
        );
        assert_eq!(
            *attr(&other, "url.full"),
            V::StringValue("https://api.example/api/v1/chat/completions".into())
        );
    }

    #[test]
    fn an_invalid_tracestate_is_dropped() {
        let mut rec = record("full");
        if let Some(t) = rec.trace.as_mut() {
            t.tracestate = Some("vendor=abc,no equals sign".into());
        }
        assert_eq!(encoded(&rec).trace_state, "");
    }

    #[test]
    fn batches_of_real_spans_decode_to_what_prost_encodes() {
        let kinds = ["full", "bare", "other"];
        for n in [0, 1, 2, 3, 50] {
            let recs: Vec<UsageRecord> = (0..n).map(|i| record(kinds[i % 3])).collect();
            let spans: Vec<Span> = recs.iter().map(encoded).collect();
            let mut batch = Batch::new("svc");
            let mut attrs = Attrs::default();
            for r in &recs {
                add(&mut batch, &mut attrs, r, &settings());
            }
            use crate::telemetry::otlp::tests::{assert_encodes_as, expected};
            assert_encodes_as(batch.request(), &expected("svc", spans), n);
        }
    }
}
