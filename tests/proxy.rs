//! The metering core against the real binaries: tokentap in front of the mock upstream.
//! Every case checks both directions byte for byte (digests) and the one record it produced.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::Value;

const MODEL: &str = "anthropic/claude-opus-4.6";

/// tokentap as the target API needs it: the target always streams its usage, so tokentap
/// does not ask for it and every request goes exactly as the client sent it. (Asking, for
/// upstreams that send usage only when asked, is pinned in `upstreams.rs`.)
fn setup() -> (Mock, Tap) {
    let mock = Mock::start();
    let tap = TapBuilder::new(&mock.url())
        .upstream_extra("inject_stream_usage = false")
        .extra(TEST_PRICING)
        .start();
    (mock, tap)
}

/// The upstream got exactly the client's body, and the client got exactly the upstream's body.
fn assert_byte_exact(entry: &Value, sent: &[u8], resp: &Resp) {
    assert_eq!(
        entry["body_sha256"],
        sha256_hex(sent),
        "request body changed"
    );
    assert_eq!(
        entry["response_sha256"],
        sha256_hex(&resp.body),
        "response body changed"
    );
}

/// Sends a chat request and returns the connection, for reading the answer bit by bit.
fn open_chat(tap: &Tap, body: &[u8], headers: &[(&str, &str)]) -> TcpStream {
    let mut s = connect(tap.addr);
    send_chat(&mut s, headers, body);
    s
}

fn cost_of(prompt: u64, cached: u64, completion: u64, searches: u64) -> u64 {
    // Prices of TEST_PRICING in pico-USD per token / per search.
    (prompt - cached) * 5_000_000
        + cached * 500_000
        + completion * 25_000_000
        + searches * 5_000_000_000
}

#[test]
fn non_streaming_call_is_byte_exact_and_metered() {
    let (mock, tap) = setup();
    let body = chat_body(MODEL, "alice", false, "");
    let resp = post_chat(
        tap.addr,
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer sk-test-secret"),
            ("x-custom", "kept"),
            ("x-mock-cached", "3"),
            ("x-mock-warning", "model is deprecated"),
        ],
        &body,
    );
    assert_eq!(resp.status, 200);
    let m = &mock.wait_requests(1)[0];
    assert_byte_exact(m, &body, &resp);
    // Headers are forwarded unchanged (but Host, which names the upstream).
    assert_eq!(m["headers"]["authorization"], "Bearer sk-test-secret");
    assert_eq!(m["headers"]["x-custom"], "kept");
    assert_eq!(m["headers"]["host"], mock.addr.to_string());

    let r = &tap.wait_records(1)[0];
    let u = resp.json()["usage"].clone();
    assert_eq!(r["user"], "alice");
    assert_eq!(r["model"], MODEL);
    assert_eq!(r["stream"], false);
    assert_eq!(r["outcome"], "complete");
    assert_eq!(r["usage_source"], "reported");
    assert_eq!(r["status"], 200);
    assert_eq!(r["prompt_tokens"], u["prompt_tokens"]);
    assert_eq!(r["completion_tokens"], u["completion_tokens"]);
    assert_eq!(r["cached_tokens"], 3);
    assert_eq!(r["warning"], "model is deprecated");
    assert_eq!(r["finish_reasons"], serde_json::json!(["stop"]));
    assert_eq!(r["response_id"], resp.json()["id"]);
    let p = u["prompt_tokens"].as_u64().unwrap();
    let c = u["completion_tokens"].as_u64().unwrap();
    assert_eq!(pico_of(r), cost_of(p, 3, c, 0));
    // No secret in the log.
    let log = std::fs::read_to_string(&tap.log).unwrap();
    assert!(!log.contains("sk-test-secret"));
}

#[test]
fn streaming_call_is_byte_exact_and_metered_from_the_usage_chunk() {
    let (mock, tap) = setup();
    let body = chat_body(MODEL, "bob", true, "");
    let resp = post_chat(
        tap.addr,
        &[
            ("x-mock-chunks", "12"),
            ("x-mock-reasoning", "7"),
            ("x-mock-split", "1"),
        ],
        &body,
    );
    assert_eq!(resp.status, 200);
    assert!(resp.complete);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    let m = &mock.wait_requests(1)[0];
    assert_byte_exact(m, &body, &resp);
    let r = &tap.wait_records(1)[0];
    assert_eq!(r["stream"], true);
    assert_eq!(r["outcome"], "complete");
    assert_eq!(r["usage_source"], "reported");
    assert_eq!(r["completion_tokens"], 12 + 7);
    assert_eq!(r["reasoning_tokens"], 7);
    // Twelve content chunks and the reasoning the mock streams before them.
    assert_eq!(r["content_chunks"], 13);
    assert!(r["ttft_ms"].as_f64().is_some());
    assert_eq!(m["billed"]["completion"], 19);
}

#[test]
fn five_mib_request_body_reaches_the_upstream_byte_exact_with_user_last() {
    let (mock, tap) = setup();
    let big = "lorem ipsum ".repeat(5 * 1024 * 1024 / 12 + 1);
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"{big}"}}],"stream":true,"user":"carol"}}"#
    )
    .into_bytes();
    assert!(body.len() > 5 * 1024 * 1024);
    let resp = post_chat(tap.addr, &[], &body);
    assert_eq!(resp.status, 200);
    let m = &mock.wait_requests(1)[0];
    assert_byte_exact(m, &body, &resp);
    assert_eq!(m["body_len"], body.len());
    let r = &tap.wait_records(1)[0];
    assert_eq!(r["user"], "carol");
    assert_eq!(r["request_bytes"], body.len());
    assert_eq!(r["prompt_tokens"], m["billed"]["prompt"]);
}

#[test]
fn chunked_request_body_is_forwarded_and_inspected() {
    let (mock, tap) = setup();
    let body = chat_body(MODEL, "dora", false, "");
    let mut chunked = Vec::new();
    for part in body.chunks(7) {
        write!(chunked, "{:x}\r\n", part.len()).unwrap();
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let resp = post_chat(tap.addr, &[("transfer-encoding", "chunked")], &chunked);
    assert_eq!(resp.status, 200);
    assert_byte_exact(&mock.wait_requests(1)[0], &body, &resp);
    assert_eq!(tap.wait_records(1)[0]["user"], "dora");
}

#[test]
fn compressed_responses_pass_through_compressed_and_are_metered() {
    let (mock, tap) = setup();
    for (i, enc) in ["gzip", "deflate", "br"].iter().enumerate() {
        let body = chat_body(MODEL, enc, false, "");
        let resp = post_chat(
            tap.addr,
            &[
                ("x-mock-encoding", enc),
                ("accept-encoding", "gzip, deflate, br"),
            ],
            &body,
        );
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-encoding"), Some(*enc));
        let m = &mock.wait_requests(i + 1)[i];
        assert_byte_exact(m, &body, &resp);
        let r = &tap.wait_records(i + 1)[i];
        assert_eq!(r["user"], *enc);
        assert_eq!(r["usage_source"], "reported", "{enc}: {r}");
        assert_eq!(r["completion_tokens"], 5);
        assert_eq!(r["prompt_tokens"], m["billed"]["prompt"]);
    }
}

#[test]
fn crlf_stream_with_search_done_events_counts_searches() {
    let (mock, tap) = setup();
    let body = chat_body(
        MODEL,
        "erin",
        true,
        r#","tools":[{"type":"octen_search","parameters":{"max_searches":3}}]"#,
    );
    let resp = post_chat(
        tap.addr,
        &[
            ("x-mock-crlf", "1"),
            ("x-mock-event-lines", "1"),
            ("x-mock-split", "1"),
        ],
        &body,
    );
    assert_eq!(resp.status, 200);
    assert!(String::from_utf8_lossy(&resp.body).contains("event: search_done\r\n"));
    let m = &mock.wait_requests(1)[0];
    assert_byte_exact(m, &body, &resp);
    let r = &tap.wait_records(1)[0];
    assert_eq!(r["search"], true);
    assert_eq!(r["search_results"], 3);
    assert_eq!(r["web_searches"], 2);
    assert_eq!(r["tools"], serde_json::json!(["octen_search"]));
    assert_eq!(r["usage_source"], "reported");
    let (p, c) = (
        r["prompt_tokens"].as_u64().unwrap(),
        r["completion_tokens"].as_u64().unwrap(),
    );
    assert_eq!(pico_of(r), cost_of(p, 0, c, 2));
}

#[test]
fn client_disconnect_mid_stream_is_estimated_and_not_zero() {
    let (mock, tap) = setup();
    let body = chat_body(MODEL, "frank", true, "");
    let mut s = open_chat(
        &tap,
        &body,
        &[("x-mock-chunks", "200"), ("x-mock-delay-ms", "20")],
    );
    // Read a few content chunks, then hang up.
    let resp = read_response(&mut s, 1500);
    assert_eq!(resp.status, 200);
    assert!(!resp.complete);
    drop(s);
    let r = &tap.wait_records(1)[0];
    assert_eq!(r["outcome"], "client_disconnected");
    assert_eq!(r["usage_source"], "estimated");
    assert!(r["completion_tokens"].as_u64().unwrap() > 0, "{r}");
    assert!(r["prompt_tokens"].as_u64().unwrap() > 0, "{r}");
    assert!(pico_of(r) > 0);
    // The upstream stopped generating, and its bill is what the record estimated: each mock
    // token is 4 bytes of content, and the prompt is counted the same way.
    let m = &mock.wait_requests(1)[0];
    assert_eq!(m["outcome"], "client_gone");
    assert_eq!(r["prompt_tokens"], m["billed"]["prompt"]);
    let billed = m["billed"]["completion"].as_u64().unwrap();
    let estimated = r["completion_tokens"].as_u64().unwrap();
    assert!(
        estimated <= billed && billed < 200,
        "estimated {estimated}, billed {billed}"
    );
}

#[test]
fn upstream_reset_mid_stream_is_recorded_with_what_was_delivered() {
    let (mock, tap) = setup();
    let body = chat_body(MODEL, "gina", true, "");
    let resp = post_chat(
        tap.addr,
        &[("x-mock-chunks", "10"), ("x-mock-reset-after", "4")],
        &body,
    );
    assert_eq!(resp.status, 200);
    assert!(
        !resp.complete,
        "a reset stream must not look complete to the client"
    );
    let m = &mock.wait_requests(1)[0];
    assert_eq!(m["outcome"], "reset");
    // What the client got is a prefix of what the upstream sent.
    let sent = unhex(m["response_hex"].as_str().unwrap());
    assert!(
        sent.starts_with(&resp.body),
        "client bytes are not a prefix of upstream bytes"
    );
    let r = &tap.wait_records(1)[0];
    assert_eq!(r["outcome"], "upstream_reset");
    assert_eq!(r["usage_source"], "estimated");
    assert!(r["completion_tokens"].as_u64().unwrap() > 0);
    assert!(r["completion_tokens"].as_u64().unwrap() <= 4);
}

#[test]
fn upstream_errors_pass_through_unchanged() {
    let (mock, tap) = setup();
    for (i, status) in [429u16, 500].iter().enumerate() {
        let body = chat_body(MODEL, "hank", false, "");
        let s = status.to_string();
        let resp = post_chat(tap.addr, &[("x-mock-status", &s)], &body);
        assert_eq!(resp.status, *status);
        let m = &mock.wait_requests(i + 1)[i];
        assert_byte_exact(m, &body, &resp);
        if *status == 429 {
            assert_eq!(resp.header("retry-after"), Some("7"));
        }
        let r = &tap.wait_records(i + 1)[i];
        assert_eq!(r["status"], *status);
        assert_eq!(r["outcome"], "upstream_error");
        assert_eq!(r["usage_source"], "none");
        assert_eq!(pico_of(r), 0);
        assert!(r["error"].as_str().unwrap().contains("error"));
    }
}

#[test]
fn non_json_body_is_forwarded_unchanged_and_unattributed() {
    let (mock, tap) = setup();
    let body = b"this is not json \xff\xfe".to_vec();
    let resp = post_chat(tap.addr, &[], &body);
    assert_eq!(resp.status, 400, "the upstream's own answer");
    let m = &mock.wait_requests(1)[0];
    assert_byte_exact(m, &body, &resp);
    let r = &tap.wait_records(1)[0];
    assert_eq!(r["user"], Value::Null);
    assert_eq!(r["model"], Value::Null);
    assert_eq!(r["status"], 400);
}

#[test]
fn other_paths_pass_through() {
    let (mock, tap) = setup();
    let resp = request(tap.addr, "GET", "/v1/models?limit=5", &[], b"");
    assert_eq!(resp.status, 200);
    let m = &mock.wait_requests(1)[0];
    assert_eq!(m["path"], "/v1/models?limit=5");
    assert_byte_exact(m, b"", &resp);
    assert!(resp.json()["data"].as_array().unwrap().len() >= 15);
    let resp = request(tap.addr, "DELETE", "/v1/files/abc", &[], b"");
    assert_eq!(resp.status, 404);
    let recs = tap.wait_records(2);
    assert_eq!(recs[0]["path"], "/v1/models");
    assert_eq!(recs[0]["usage_source"], "none");
    assert_eq!(recs[1]["method"], "DELETE");
}

#[test]
fn body_over_the_limit_is_refused_with_413_before_the_upstream() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &format!("[limits]\nmax_request_body_bytes = 1000\n{TEST_PRICING}"),
    );
    let body = chat_body(MODEL, &"x".repeat(2000), false, "");
    let resp = post_chat(tap.addr, &[], &body);
    assert_eq!(resp.status, 413);
    let e = resp.json();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert_eq!(e["error"]["code"], "request_too_large");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_request_body_bytes"));

    // The same without a declared length: chunked, caught while reading.
    let mut chunked = Vec::new();
    write!(chunked, "{:x}\r\n", body.len()).unwrap();
    chunked.extend_from_slice(&body);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let resp = post_chat(tap.addr, &[("transfer-encoding", "chunked")], &chunked);
    assert_eq!(resp.status, 413);
    let recs = tap.wait_records(2);
    assert!(recs
        .iter()
        .all(|r| r["outcome"] == "rejected" && r["status"] == 413));
    // Nothing reached the upstream's handler: a call after them is the first it reads.
    let sentinel = chat_body(MODEL, "sentinel", false, "");
    assert_eq!(post_chat(tap.addr, &[], &sentinel).status, 200);
    let seen = mock.wait_requests(1);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["user"], "sentinel");
    assert_eq!(mock.received(), 1);
}

#[test]
fn unreachable_upstream_is_a_502_with_an_openai_error() {
    let port = free_port();
    let tap = Tap::start(&format!("http://127.0.0.1:{port}"), TEST_PRICING);
    let body = chat_body(MODEL, "ivan", false, "");
    let resp = post_chat(tap.addr, &[], &body);
    assert_eq!(resp.status, 502);
    let e = resp.json();
    assert_eq!(e["error"]["type"], "upstream_error");
    let r = &tap.wait_records(1)[0];
    assert_eq!(r["outcome"], "upstream_error");
    assert_eq!(r["status"], 502);
    assert_eq!(r["usage_source"], "none");
}

#[test]
fn keep_alive_connection_carries_many_calls_each_with_one_record() {
    let (mock, tap) = setup();
    let mut s = connect(tap.addr);
    for i in 0..20 {
        let stream = i % 2 == 0;
        let body = chat_body(MODEL, &format!("u{i}"), stream, "");
        let resp = chat_on(&mut s, &[], &body);
        assert_eq!(resp.status, 200);
        assert!(resp.complete);
    }
    let recs = tap.wait_records(20);
    assert_eq!(recs.len(), 20);
    let users: Vec<String> = recs
        .iter()
        .map(|r| r["user"].as_str().unwrap().to_string())
        .collect();
    for i in 0..20 {
        assert_eq!(users.iter().filter(|u| **u == format!("u{i}")).count(), 1);
    }
    assert_eq!(mock.wait_requests(20).len(), 20);
    // Exactly one record per call: the next call's record is the 21st.
    assert_eq!(
        chat_on(&mut s, &[], &chat_body(MODEL, "last", false, "")).status,
        200
    );
    let recs = tap.wait_records(21);
    assert_eq!(recs.len(), 21);
    assert_eq!(recs[20]["user"], "last");
}

#[test]
fn sigterm_drains_in_flight_streams_and_flushes_their_records() {
    let (_mock, mut tap) = setup();
    let body = chat_body(MODEL, "late", true, "");
    let mut s = open_chat(
        &tap,
        &body,
        &[("x-mock-chunks", "20"), ("x-mock-delay-ms", "25")],
    );
    // The stream is under way once its first bytes are here.
    let mut first = [0u8; 1];
    s.read_exact(&mut first).unwrap();
    let h = std::thread::spawn(move || {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).map(|_| rest)
    });
    let status = tap.proc.terminate();
    assert!(status.success(), "{status:?}");
    let rest = h.join().unwrap().unwrap();
    let whole = [&first[..], &rest].concat();
    assert!(
        whole.starts_with(b"HTTP/1.1 200 "),
        "{}",
        String::from_utf8_lossy(&whole)
    );
    assert!(
        rest.ends_with(b"0\r\n\r\n") && String::from_utf8_lossy(&rest).contains("[DONE]"),
        "in-flight stream was cut by shutdown"
    );
    let recs = tap.records();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["outcome"], "complete");
    assert_eq!(recs[0]["usage_source"], "reported");
}

#[test]
fn openai_python_sdk_gets_the_same_objects_through_tokentap() {
    let (mock, tap) = setup();
    let text = openai_sdk_check(&mock, &tap);
    assert!(text.contains("9 passed, 0 failed"), "{text}");
    // Every proxied call (8 cases + the 429) has its record.
    assert_eq!(tap.wait_records(9).len(), 9);
}

#[test]
fn upstream_connections_are_pooled() {
    let (mock, tap) = setup();
    for i in 0..10 {
        // A new client connection each time: reuse can only come from tokentap's pool.
        let body = chat_body(MODEL, &format!("p{i}"), i % 2 == 0, "");
        let resp = post_chat(tap.addr, &[], &body);
        assert_eq!(resp.status, 200);
    }
    let reqs = mock.wait_requests(10);
    let mut conns: Vec<u64> = reqs.iter().map(|r| r["conn"].as_u64().unwrap()).collect();
    conns.sort_unstable();
    conns.dedup();
    // Two worker threads may each hold a connection; ten calls must not open ten.
    assert!(
        conns.len() <= 2,
        "10 calls used {} upstream connections",
        conns.len()
    );
}

#[test]
fn streams_are_passed_on_chunk_by_chunk() {
    let (mock, tap) = setup();
    let body = chat_body(MODEL, "stream", true, "");
    let mut s = open_chat(
        &tap,
        &body,
        &[("x-mock-chunks", "30"), ("x-mock-delay-ms", "40")],
    );
    // Read until the first content token arrives...
    let mut seen = Vec::new();
    let mut tmp = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("w00 ") {
        let n = std::io::Read::read(&mut s, &mut tmp).unwrap();
        assert!(n > 0, "stream ended before its first token");
        seen.extend_from_slice(&tmp[..n]);
    }
    // ...while the upstream is still generating the rest (it logs a stream when it ends).
    assert!(
        mock.requests().is_empty(),
        "the first token arrived only after the whole stream was sent"
    );
    drop(s);
}

#[test]
fn upstream_silence_beyond_the_read_timeout_is_a_504_or_a_cut_stream() {
    let mock = Mock::start();
    let tap = TapBuilder::new(&mock.url())
        .read_timeout_ms(300)
        .extra(TEST_PRICING)
        .start();
    let body = chat_body(MODEL, "slow", false, "");
    let resp = post_chat(tap.addr, &[("x-mock-delay-ms", "3000")], &body);
    assert_eq!(resp.status, 504);
    assert_eq!(resp.json()["error"]["code"], "upstream_timeout");
    let r = &tap.wait_records(1)[0];
    assert_eq!(r["outcome"], "timeout");
    assert_eq!(r["status"], 504);
    // The upstream had the request and may bill it: the prompt is estimated.
    assert_eq!(r["usage_source"], "estimated");
    assert!(r["prompt_tokens"].as_u64().unwrap() > 0);

    let body = chat_body(MODEL, "slow-stream", true, "");
    let resp = post_chat(tap.addr, &[("x-mock-delay-ms", "3000")], &body);
    assert_eq!(resp.status, 200, "the stream's head was already sent");
    assert!(!resp.complete);
    let r = &tap.wait_records(2)[1];
    assert_eq!(r["outcome"], "timeout");
    assert_eq!(r["user"], "slow-stream");
}

#[test]
fn responses_without_a_body_are_complete() {
    let (_mock, tap) = setup();
    let resp = request(tap.addr, "HEAD", "/v1/models", &[], b"");
    assert_eq!(resp.status, 200);
    let resp = request(
        tap.addr,
        "DELETE",
        "/v1/files/f1",
        &[("x-mock-status", "204")],
        b"",
    );
    assert_eq!(resp.status, 204);
    let recs = tap.wait_records(2);
    for r in &recs {
        assert_eq!(r["outcome"], "complete", "{r}");
        assert_eq!(r["usage_source"], "none");
    }
    assert_eq!(recs[1]["status"], 204);
}

#[test]
fn a_request_is_never_sent_twice() {
    let mock = Mock::start();
    let tap = TapBuilder::new(&mock.url())
        .read_timeout_ms(300)
        .extra(TEST_PRICING)
        .start();
    // Warm the pool, so the next calls go out on a reused connection (where Pingora would
    // consider a retry).
    assert_eq!(request(tap.addr, "GET", "/v1/models", &[], b"").status, 200);
    let slow = [("x-mock-delay-ms", "2000")];
    let cases: [(&str, &str, Vec<u8>); 3] = [
        ("POST", "/v1/files", Vec::new()),
        ("GET", "/v1/models", Vec::new()),
        (
            "POST",
            "/v1/chat/completions",
            chat_body(MODEL, "once", false, ""),
        ),
    ];
    for (i, (method, path, body)) in cases.iter().enumerate() {
        let resp = request(tap.addr, method, path, &slow, body);
        assert_eq!(resp.status, 504, "{method} {path}");
        // Every attempt was made before the client got its answer.
        // Calls so far: one warm-up per case and each case once.
        assert_eq!(
            mock.received(),
            2 + 2 * i as u64,
            "{method} {path} reached the upstream twice"
        );
        // Reuse the pool again for the next case.
        assert_eq!(request(tap.addr, "GET", "/v1/models", &[], b"").status, 200);
    }
}

/// A bare upstream that accepts one connection and reports every byte it received until the
/// connection closed (or nothing, if none came).
fn raw_upstream() -> (std::net::SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        l.set_nonblocking(true).unwrap();
        let start = std::time::Instant::now();
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(_) if start.elapsed() < PATIENCE => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(_) => return Vec::new(),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut got);
        got
    });
    (addr, h)
}

fn body_bytes_after_head(got: &[u8]) -> usize {
    match got.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => got.len() - (i + 4),
        None => 0,
    }
}

#[test]
fn a_chat_body_is_held_until_complete_and_none_of_it_leaks_when_refused() {
    // The limit is crossed by the body's last chunk: a refusal at the decision point, after
    // tokentap has read (and held) everything before it.
    let body = chat_body(MODEL, "held", false, "");
    let limit = body.len() - 1;
    let mut chunked = Vec::new();
    for part in body.chunks(16) {
        write!(chunked, "{:x}\r\n", part.len()).unwrap();
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    for (path, held) in [("/v1/chat/completions", true), ("/v1/moderations", false)] {
        let (up, got) = raw_upstream();
        let tap = Tap::start(
            &format!("http://{up}"),
            &format!("[limits]\nmax_request_body_bytes = {limit}\n"),
        );
        let resp = request(
            tap.addr,
            "POST",
            path,
            &[("transfer-encoding", "chunked")],
            &chunked,
        );
        assert_eq!(resp.status, 413);
        drop(tap);
        let got = got.join().unwrap();
        let leaked = body_bytes_after_head(&got);
        if held {
            assert_eq!(
                leaked, 0,
                "{path}: {leaked} body bytes reached the upstream"
            );
        } else {
            // The control case: other paths stream through, so the same test sees bytes.
            assert!(leaked > 0, "{path}: expected streamed body bytes upstream");
        }
    }
}
