//! Traces against a real OTLP receiver started here (gRPC through tonic, HTTP/protobuf on a
//! plain socket, both decoding the OTLP protobuf messages): span names, kinds, parents and
//! GenAI attributes, content capture and trace-context injection when asked, and a dead
//! collector that neither slows nor fails calls.

mod common;
#[path = "common/otlp.rs"]
mod otlp;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use otlp::{Collector, Got};
use serde_json::{json, Value};

const MODEL: &str = "anthropic/claude-opus-4.6";
const API_KEY: &str = "sk-test-do-not-leak-4f1c2a";
const PROMPT_TEXT: &str = "Say something about tokens";
/// The mock's completion of three content chunks (one 4-byte token each).
const COMPLETION_TEXT: &str = "w00 w01 w02 ";

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// The request id tokentap gave the last call it logged.
fn last_request_id(tap: &Tap, n: usize) -> String {
    let recs = tap.wait_records(n);
    recs[n - 1]["request_id"].as_str().unwrap().to_string()
}

fn traces_config(endpoint: &str, extra: &str) -> String {
    format!("{TEST_PRICING}\n[traces]\nendpoint = \"{endpoint}\"\nbatch_delay_ms = 50\n{extra}\n")
}

/// No span attribute carries the API key; with capture off, none carries the prompt or the
/// completion either.
fn assert_clean(spans: &[Got], content_off: bool) {
    for g in spans {
        let text = format!("{:?} {:?}", g.span.name, g.attrs);
        assert!(!text.contains(API_KEY), "API key in a span: {text}");
        if content_off {
            assert!(!text.contains(PROMPT_TEXT), "prompt in a span: {text}");
            assert!(
                !g.attrs.contains_key("gen_ai.output.messages") && !text.contains("w01 "),
                "completion in a span: {text}"
            );
        }
    }
}

#[test]
fn chat_calls_become_genai_client_spans_over_grpc() {
    let mock = Mock::start();
    let collector = Collector::grpc();
    let tap = TapBuilder::new(&mock.url())
        .extra(&traces_config(
            &format!("http://{}", collector.addr),
            "service_name = \"tokentap-test\"",
        ))
        .start();
    let auth = format!("Bearer {API_KEY}");

    // 1. A streamed call continuing the client's trace.
    let parent_trace = "0af7651916cd43dd8448eb211c80319c";
    let parent_span = "b7ad6b7169203331";
    let traceparent = format!("00-{parent_trace}-{parent_span}-01");
    let body = chat_body(
        MODEL,
        "alice",
        true,
        r#","max_tokens":50,"temperature":0.5,"top_p":0.9"#,
    );
    let r = post_chat(
        tap.addr,
        &[
            ("authorization", &auth),
            ("traceparent", &traceparent),
            ("tracestate", "vendor=abc"),
            ("x-mock-chunks", "3"),
        ],
        &body,
    );
    assert_eq!(r.status, 200);
    let g = collector.span_of(&last_request_id(&tap, 1));
    assert_eq!(g.service, "tokentap-test");
    assert_eq!(g.span.name, format!("chat {MODEL}"));
    assert_eq!(g.span.kind, SpanKind::Client as i32);
    assert_eq!(hex(&g.span.trace_id), parent_trace);
    assert_eq!(hex(&g.span.parent_span_id), parent_span);
    assert_ne!(hex(&g.span.span_id), parent_span);
    assert_eq!(g.span.trace_state, "vendor=abc");
    assert!(g.span.end_time_unix_nano > g.span.start_time_unix_nano);
    assert_eq!(g.attr("gen_ai.operation.name"), "chat");
    assert_eq!(g.attr("gen_ai.provider.name"), "anthropic");
    assert_eq!(g.attr("gen_ai.request.model"), MODEL);
    assert_eq!(g.attr("gen_ai.response.model"), MODEL);
    assert_eq!(g.attr("gen_ai.request.max_tokens"), 50);
    assert_eq!(g.attr("gen_ai.request.temperature"), 0.5);
    assert_eq!(g.attr("gen_ai.request.top_p"), 0.9);
    assert_eq!(g.attr("gen_ai.request.stream"), true);
    assert!(g
        .attr("gen_ai.response.id")
        .as_str()
        .unwrap()
        .starts_with("gen-mock-"));
    assert_eq!(*g.attr("gen_ai.response.finish_reasons"), json!(["stop"]));
    assert_eq!(g.attr("gen_ai.usage.input_tokens"), 14);
    assert_eq!(g.attr("gen_ai.usage.output_tokens"), 3);
    assert_eq!(g.attr("gen_ai.usage.cache_read.input_tokens"), 0);
    assert_eq!(g.attr("gen_ai.usage.reasoning.output_tokens"), 0);
    assert!(
        g.attr("gen_ai.response.time_to_first_chunk")
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(g.attr("server.address"), "127.0.0.1");
    assert_eq!(
        g.attr("server.port"),
        mock.url()
            .rsplit(':')
            .next()
            .unwrap()
            .parse::<i64>()
            .unwrap()
    );
    assert_eq!(g.attr("http.response.status_code"), 200);
    assert_eq!(g.attr("user.id"), "alice");
    assert_eq!(g.attr("tokentap.usage.estimated"), false);
    assert_eq!(g.attr("tokentap.web_searches"), 0);
    assert_eq!(g.attr("tokentap.budget.decision"), "not_capped");
    let cost = g.attr("tokentap.cost_usd").as_f64().unwrap();
    assert!((cost - (14.0 * 5e-6 + 3.0 * 25e-6)).abs() < 1e-12, "{cost}");
    assert_eq!(*g.attr("error.type"), Value::Null);
    assert_eq!(
        g.span.status.as_ref().map_or(0, |s| s.code),
        StatusCode::Unset as i32
    );
    // The upstream got the client's traceparent untouched (injection is off).
    let seen = mock.wait_requests(1);
    assert_eq!(seen[0]["headers"]["traceparent"], traceparent);

    // 2. A non-streamed call starting a new trace.
    let body = chat_body(MODEL, "bob", false, "");
    let r = post_chat(tap.addr, &[("authorization", &auth)], &body);
    assert_eq!(r.status, 200);
    let g = collector.span_of(&last_request_id(&tap, 2));
    assert_eq!(g.span.name, format!("chat {MODEL}"));
    assert!(g.span.parent_span_id.is_empty());
    assert_eq!(g.attr("gen_ai.request.stream"), false);
    assert_eq!(g.attr("gen_ai.usage.output_tokens"), 5);
    assert_eq!(*g.attr("gen_ai.response.time_to_first_chunk"), Value::Null);

    // 3. An upstream error.
    let r = post_chat(
        tap.addr,
        &[("authorization", &auth), ("x-mock-status", "500")],
        &body,
    );
    assert_eq!(r.status, 500);
    let g = collector.span_of(&last_request_id(&tap, 3));
    assert_eq!(g.attr("http.response.status_code"), 500);
    // The upstream's error type, as its body named it.
    assert_eq!(g.attr("error.type"), "api_error");
    assert_eq!(
        g.span.status.as_ref().map_or(0, |s| s.code),
        StatusCode::Error as i32
    );
    assert_eq!(g.attr("tokentap.outcome"), "upstream_error");

    // 4. A client that goes away mid-stream.
    let mut s = connect(tap.addr);
    let body = chat_body(MODEL, "carol", true, "");
    send_chat(
        &mut s,
        &[
            ("authorization", &auth),
            ("x-mock-chunks", "50"),
            ("x-mock-delay-ms", "50"),
        ],
        &body,
    );
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(9).any(|w| w == b"\"content\"") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    drop(s);
    let g = collector.span_of(&last_request_id(&tap, 4));
    assert_eq!(g.attr("tokentap.outcome"), "client_disconnected");
    assert_eq!(g.attr("error.type"), "client_disconnected");
    assert_eq!(g.attr("tokentap.usage.estimated"), true);
    assert!(g.attr("gen_ai.usage.output_tokens").as_i64().unwrap() >= 1);
    // Estimated usage claims nothing about cached or reasoning tokens.
    assert_eq!(*g.attr("gen_ai.usage.cache_read.input_tokens"), Value::Null);
    assert!(
        g.attr("gen_ai.response.time_to_first_chunk")
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(g.attr("http.response.status_code"), 200);

    // 5. Other paths get a plain HTTP client span.
    let r = request(
        tap.addr,
        "GET",
        "/v1/models",
        &[("authorization", &auth)],
        b"",
    );
    assert_eq!(r.status, 200);
    let g = collector.span_of(&last_request_id(&tap, 5));
    assert_eq!(g.span.name, "GET");
    assert_eq!(g.span.kind, SpanKind::Client as i32);
    assert_eq!(g.attr("http.request.method"), "GET");
    assert_eq!(g.attr("url.path"), "/v1/models");
    assert_eq!(
        g.attr("url.full"),
        format!("{}/v1/models", mock.url()).as_str()
    );
    assert_eq!(*g.attr("gen_ai.operation.name"), Value::Null);

    // 6. Sampling is reloadable: at 0, new traces are not recorded; a sampled caller's
    // trace still is (parent-based). Spans leave in call order, so once the second call's
    // span is in, the first one's would be too.
    let cfg = std::fs::read_to_string(&tap.config).unwrap();
    let old = tap.config_hash();
    tap.write_config(&cfg.replace(
        "batch_delay_ms = 50",
        "batch_delay_ms = 50\nsampling_ratio = 0",
    ));
    tap.wait_config_change(&old);
    let body = chat_body(MODEL, "dave", false, "");
    assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
    let unsampled = last_request_id(&tap, 6);
    assert_eq!(
        post_chat(tap.addr, &[("traceparent", &traceparent)], &body).status,
        200
    );
    collector.span_of(&last_request_id(&tap, 7));
    assert!(!collector
        .spans()
        .iter()
        .any(|g| g.attr("tokentap.request_id") == unsampled.as_str()));

    // Nothing anywhere carries the API key or, with capture off, the conversation.
    assert_clean(&collector.spans(), true);
    let log = std::fs::read_to_string(&tap.log).unwrap();
    assert!(!log.contains(API_KEY));
    let metrics = request(tap.admin, "GET", "/metrics", &[], b"");
    let metrics = String::from_utf8_lossy(&metrics.body);
    assert!(!metrics.contains(API_KEY));
    assert!(metrics.contains("tokentap_spans_exported_total"));
}

#[test]
fn content_capture_and_traceparent_injection_when_opted_in_over_http() {
    let mock = Mock::start();
    let collector = Collector::http();
    // Where and how to export come from the standard OTEL_* variables this time (a base
    // endpoint: /v1/traces is added for HTTP).
    let tap = TapBuilder::new(&mock.url())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{}", collector.addr))
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_SERVICE_NAME", "from-env")
        .extra(&format!(
            "{TEST_PRICING}\n[traces]\nbatch_delay_ms = 50\ninject_traceparent = true\ncapture_content = true\nmax_content_bytes = 20\n[metrics]\nuser_label = \"hash\"\nhash_salt = \"pepper\"\n"
        ))
        .start();
    let body = chat_body(MODEL, "erin", true, "");
    let r = post_chat(
        tap.addr,
        &[
            ("authorization", &format!("Bearer {API_KEY}")),
            ("x-mock-chunks", "3"),
        ],
        &body,
    );
    assert_eq!(r.status, 200);
    let g = collector.span_of(&last_request_id(&tap, 1));
    assert_eq!(g.service, "from-env");
    // The upstream saw tokentap's span as its parent.
    let seen = mock.wait_requests(1);
    let tp = seen[0]["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        tp,
        format!("00-{}-{}-01", hex(&g.span.trace_id), hex(&g.span.span_id))
    );
    // The conversation, cut to 20 bytes of text in all, as GenAI message JSON.
    let input: Value =
        serde_json::from_str(g.attr("gen_ai.input.messages").as_str().unwrap()).unwrap();
    assert_eq!(input[0]["role"], "system");
    assert_eq!(input[0]["parts"][0]["content"], "Be brief.");
    assert_eq!(input[1]["parts"][0]["content"], "Say somethi");
    let output: Value =
        serde_json::from_str(g.attr("gen_ai.output.messages").as_str().unwrap()).unwrap();
    assert_eq!(output[0]["role"], "assistant");
    assert_eq!(output[0]["parts"][0]["content"], COMPLETION_TEXT);
    assert_eq!(output[0]["finish_reason"], "stop");
    // The user is hashed, as the label policy hashes it.
    let uid = g.attr("user.id").as_str().unwrap();
    assert_ne!(uid, "erin");
    assert_eq!(uid.len(), 12);
    assert_clean(&collector.spans(), false);
}

#[test]
fn a_dead_collector_neither_fails_calls_nor_hides_the_dropped_spans() {
    // Nothing listens there.
    burst_against(&format!("http://127.0.0.1:{}", free_port()), false);
}

#[test]
fn a_collector_that_never_answers_neither_fails_calls_nor_hides_the_dropped_spans() {
    // Accepts connections and never says a word.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming() {
            held.push(c);
        }
    });
    // Each batch of 4 waits the 200 ms export timeout: the queue of 8 must overflow.
    burst_against(&format!("http://{addr}"), true);
}

/// 200 calls with spans for a collector that cannot take them: every call succeeds and
/// every span is counted as dropped.
fn burst_against(dead: &str, overflows: bool) {
    let mock = Mock::start();
    let tap = TapBuilder::new(&mock.url())
        .extra(&traces_config(
            dead,
            "queue_size = 8\nbatch_size = 4\nexport_timeout_ms = 200",
        ))
        .start();
    let n = 200;
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let addr = tap.addr;
            std::thread::spawn(move || {
                let mut s = connect(addr);
                for i in 0..n / 4 {
                    let body = chat_body(MODEL, &format!("u{t}"), i % 2 == 0, "");
                    let r = chat_on(&mut s, &[], &body);
                    assert_eq!(r.status, 200);
                    assert!(r.complete);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(mock.received(), n as u64);
    // Every span is accounted for: none exported, each one dropped (queue full or export
    // failed), none silently lost.
    let start = Instant::now();
    loop {
        let full = tap.metric("tokentap_spans_dropped_total{reason=\"queue_full\"}");
        let failed = tap.metric("tokentap_spans_dropped_total{reason=\"export_failed\"}");
        if full + failed == n as f64 {
            // (A refused connection fails fast: whether the queue overflows then depends on
            // timing, so only the silent collector must show it.)
            assert!(!overflows || full > 0.0, "a queue of 8 took a burst of {n}");
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "dropped {full} + {failed} of {n}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(tap.metric("tokentap_spans_exported_total"), 0.0);
}

#[test]
fn spans_still_queued_are_exported_on_shutdown() {
    let mock = Mock::start();
    let collector = Collector::grpc();
    // Batches would wait ten minutes: only the shutdown's flush can send this span.
    let mut tap = TapBuilder::new(&mock.url())
        .extra(
            &traces_config(&format!("http://{}", collector.addr), "")
                .replace("batch_delay_ms = 50", "batch_delay_ms = 600000"),
        )
        .start();
    let body = chat_body(MODEL, "frank", false, "");
    assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
    let id = last_request_id(&tap, 1);
    assert!(collector.spans().is_empty());
    assert!(tap.proc.terminate().success());
    let spans = collector.spans();
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].attr("tokentap.request_id"), id.as_str());
}

#[test]
fn a_calls_provider_is_the_same_in_its_record_its_span_and_its_metrics() {
    let mock = Mock::start();
    let collector = Collector::http();
    let tap = TapBuilder::new(&mock.url())
        .extra(&traces_config(
            &format!("http://{}", collector.addr),
            "protocol = \"http/protobuf\"\n[traces.providers]\nacme = \"acme_ai\"",
        ))
        .start();
    // (model, provider): a built-in prefix, the operator's, an unknown one, none at all.
    let cases = [
        ("google/gemini-3-flash-preview", "gcp.gemini"),
        ("acme/m-1", "acme_ai"),
        ("zed/m-2", "zed"),
        ("bare-model", "openai"),
    ];
    for (i, (model, provider)) in cases.iter().enumerate() {
        let body = chat_body(model, "pat", false, "");
        assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
        let rec = &tap.wait_records(i + 1)[i];
        assert_eq!(rec["provider"], *provider, "{rec}");
        let span = collector.span_of(rec["request_id"].as_str().unwrap());
        assert_eq!(span.attr("gen_ai.provider.name"), provider, "{model}");
        let metrics = request(tap.admin, "GET", "/metrics", &[], b"").body;
        let line = String::from_utf8_lossy(&metrics)
            .lines()
            .find(|l| {
                l.starts_with("gen_ai_client_operation_duration_seconds_count")
                    && l.contains(&format!("gen_ai_request_model=\"{model}\""))
            })
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no duration series for {model}"));
        assert!(
            line.contains(&format!("gen_ai_provider_name=\"{provider}\"")),
            "{line}"
        );
    }
}

/// Issue 22: a collector that takes a request but rejects some of its spans (OTLP's partial
/// success) does not have them counted as exported.
#[test]
fn spans_a_collector_rejects_in_a_partial_success_are_counted_as_dropped() {
    let mock = Mock::start();
    let collector = Collector::http_rejecting(1);
    let tap = TapBuilder::new(&mock.url())
        .extra(&traces_config(
            &format!("http://{}", collector.addr),
            "protocol = \"http/protobuf\"\nbatch_size = 2",
        ))
        .start();
    for i in 0..6 {
        let body = chat_body("anthropic/claude-opus-4.6", &format!("u{i}"), false, "");
        assert_eq!(post_chat(tap.addr, &[], &body).status, 200);
    }
    let start = Instant::now();
    loop {
        let exported = tap.metric("tokentap_spans_exported_total");
        let rejected = tap.metric("tokentap_spans_dropped_total{reason=\"rejected\"}");
        if exported + rejected == 6.0 {
            assert!(
                rejected >= 1.0,
                "each request rejected one span: {rejected}"
            );
            assert!(exported >= 1.0);
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "exported {exported}, rejected {rejected}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(collector.spans().len(), 6, "the collector saw every span");
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Issue 22: a collector that accepts connections and never answers holds spans back, but
/// only as many as the queue takes: memory stays flat however many calls come.
#[test]
fn a_silent_collector_keeps_memory_flat() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming() {
            held.push(c);
        }
    });
    let mock = Mock::start();
    let tap = TapBuilder::new(&mock.url())
        .extra(&traces_config(
            &format!("http://{addr}"),
            "queue_size = 512\nbatch_size = 64\nexport_timeout_ms = 200",
        ))
        .start();
    let wave = |n: usize| {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let a = tap.addr;
                std::thread::spawn(move || {
                    let mut s = connect(a);
                    for _ in 0..n / 4 {
                        let body = chat_body(MODEL, &format!("m{t}"), false, "");
                        assert_eq!(chat_on(&mut s, &[], &body).status, 200);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    };
    // Warm: the queue fills, every buffer grows to its working size.
    wave(1000);
    let warm = rss_kib(tap.proc.pid());
    wave(5000);
    let after = rss_kib(tap.proc.pid());
    eprintln!("RSS with a silent collector: {warm} KiB after 1,000 calls, {after} KiB after 6,000");
    assert!(
        after < warm + 16 * 1024,
        "memory grew with the calls: {warm} KiB -> {after} KiB"
    );
    assert!(tap.metric("tokentap_spans_dropped_total{reason=\"queue_full\"}") > 0.0);
}
