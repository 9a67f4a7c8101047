//! Exact numbers against upstreams shaped like the real ones: OpenAI-style streams that carry
//! usage only when asked (tokentap asks, and the client still gets what it would have got),
//! searches the upstream ran but did not count, and the target API's own key header.

mod common;

use common::*;
use serde_json::Value;

const MODEL: &str = "anthropic/claude-opus-4.6";

/// pico-USD per token of [`TEST_PRICING`].
const INPUT: u64 = 5_000_000;
const CACHED: u64 = 500_000;
const OUTPUT: u64 = 25_000_000;
const SEARCH: u64 = 5_000_000_000;

fn tap(mock: &Mock, upstream_extra: &str) -> Tap {
    TapBuilder::new(&mock.url())
        .upstream_extra(upstream_extra)
        .extra(TEST_PRICING)
        .start()
}

/// What the upstream billed for the last call it logged.
fn billed(mock: &Mock, n: usize) -> Value {
    mock.wait_requests(n)[n - 1]["billed"].clone()
}

/// The record matches the upstream's bill, reasoning tokens included.
fn assert_billed(rec: &Value, bill: &Value) {
    assert_eq!(rec["usage_source"], "reported", "{rec}");
    assert_eq!(rec["prompt_tokens"], bill["prompt"], "{rec}");
    assert_eq!(rec["completion_tokens"], bill["completion"], "{rec}");
    assert_eq!(rec["reasoning_tokens"], bill["reasoning"], "{rec}");
    assert_eq!(rec["cached_tokens"], bill["cached"], "{rec}");
    let n = |k: &str| bill[k].as_u64().unwrap();
    let want = (n("prompt") - n("cached")) * INPUT
        + n("cached") * CACHED
        + n("completion") * OUTPUT
        + n("web_searches") * SEARCH;
    assert_eq!(pico_of(rec), want, "{rec}");
}

#[test]
fn a_stream_without_include_usage_reaches_the_client_as_the_upstream_sends_it_and_is_billed_exactly(
) {
    let mock = Mock::start();
    let tap = tap(&mock, "");
    let body = chat_body(MODEL, "alice", true, "");
    let variants: [&[(&str, &str)]; 5] = [
        &[],
        &[("x-mock-crlf", "1")],
        &[("x-mock-split", "bytes")],
        &[("x-mock-encoding", "gzip")],
        &[
            ("x-mock-encoding", "gzip"),
            ("x-mock-split", "bytes"),
            ("x-mock-crlf", "1"),
        ],
    ];
    let mut logged = 0;
    for (i, variant) in variants.iter().enumerate() {
        let mut h = vec![
            ("x-mock-usage", "openai"),
            ("x-mock-reasoning", "7"),
            ("x-mock-cached", "3"),
            ("accept-encoding", "gzip, zstd"),
        ];
        h.extend_from_slice(variant);
        let enc = variant
            .iter()
            .find(|(k, _)| *k == "x-mock-encoding")
            .map(|(_, v)| *v);
        // The same call straight to the upstream, as the client sent it: no usage in it.
        let direct = post_chat(mock.addr, &h, &body);
        logged += 1;
        assert!(direct.complete);
        let plain = String::from_utf8(inflate(enc, &direct.body)).unwrap();
        assert!(!plain.contains("usage"), "{variant:?}: {plain}");

        let through = post_chat(tap.addr, &h, &body);
        logged += 1;
        assert!(through.complete, "{variant:?}");
        assert_eq!(through.status, 200);
        assert_eq!(
            through.body, direct.body,
            "{variant:?}: the client's bytes are the upstream's for the call without usage"
        );
        assert_eq!(through.header("content-encoding"), enc);

        // The upstream was asked for usage: one splice, the rest as sent, length right.
        let seen = &mock.wait_requests(logged)[logged - 1];
        let mut want = body.clone();
        want.pop();
        want.extend_from_slice(br#","stream_options":{"include_usage":true}}"#);
        assert_eq!(seen["body"], String::from_utf8(want.clone()).unwrap());
        assert_eq!(
            seen["headers"]["content-length"],
            want.len().to_string(),
            "{variant:?}"
        );
        // Asked for a coding tokentap can read back.
        assert_eq!(seen["headers"]["accept-encoding"], "gzip");

        let rec = &tap.wait_records(i + 1)[i];
        assert_billed(rec, &billed(&mock, logged));
        assert_eq!(rec["usage_injected"], true);
        assert_eq!(rec["reasoning_tokens"], 7);
        assert_eq!(rec["outcome"], "complete");
    }
}

#[test]
fn a_client_that_asks_for_usage_gets_the_chunk_unchanged_and_false_is_turned_on() {
    let mock = Mock::start();
    let tap = tap(&mock, "");
    let h = [("x-mock-usage", "openai"), ("x-mock-reasoning", "2")];

    // Asked: nothing changes, in either direction.
    let asked = chat_body(
        MODEL,
        "bob",
        true,
        r#","stream_options":{"include_usage":true}"#,
    );
    let direct = post_chat(mock.addr, &h, &asked);
    let through = post_chat(tap.addr, &h, &asked);
    assert_eq!(through.body, direct.body);
    assert!(usage_chunk(&through.body).is_some_and(|c| c["choices"] == serde_json::json!([])));
    let seen = mock.wait_requests(2);
    assert_eq!(seen[1]["body_sha256"], sha256_hex(&asked));
    let rec = &tap.wait_records(1)[0];
    assert!(rec.get("usage_injected").is_none(), "{rec}");
    assert_billed(rec, &seen[1]["billed"]);

    // `include_usage: false`: set to true upstream, and the client gets the stream without.
    let off = chat_body(
        MODEL,
        "bob",
        true,
        r#","stream_options":{"include_usage":false}"#,
    );
    let direct = post_chat(mock.addr, &h, &off);
    let through = post_chat(tap.addr, &h, &off);
    assert_eq!(through.body, direct.body);
    assert!(!String::from_utf8_lossy(&through.body).contains("usage"));
    let seen = mock.wait_requests(4);
    assert_eq!(
        seen[3]["body"],
        String::from_utf8(off.clone())
            .unwrap()
            .replace(r#""include_usage":false"#, r#""include_usage":true"#)
    );
    let rec = &tap.wait_records(2)[1];
    assert_eq!(rec["usage_injected"], true);
    assert_billed(rec, &seen[3]["billed"]);
}

#[test]
fn a_usage_chunk_that_carries_choices_too_reaches_the_client() {
    let mock = Mock::start();
    let tap = tap(&mock, "");
    // Usage on the finish chunk, asked for or not (DeepSeek sends it so).
    let h = [("x-mock-usage", "with-finish")];
    let body = chat_body(MODEL, "carol", true, "");
    let direct = post_chat(mock.addr, &h, &body);
    let through = post_chat(tap.addr, &h, &body);
    assert_eq!(through.body, direct.body);
    let c = usage_chunk(&through.body).unwrap();
    assert_eq!(c["choices"][0]["finish_reason"], "stop");
    let rec = &tap.wait_records(1)[0];
    assert_billed(rec, &billed(&mock, 2));

    // The target API's own `type: usage` chunk (always sent) is left alone as well.
    let direct = post_chat(mock.addr, &[], &body);
    let through = post_chat(tap.addr, &[], &body);
    assert_eq!(through.body, direct.body);
    assert_eq!(usage_chunk(&through.body).unwrap()["type"], "usage");
}

/// The stream's chunk that carries a usage object.
fn usage_chunk(stream: &[u8]) -> Option<Value> {
    String::from_utf8_lossy(stream)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|c| c["usage"].is_object())
}

#[test]
fn a_long_conversation_is_asked_for_usage_too_sent_chunked() {
    let mock = Mock::start();
    let tap = tap(&mock, "");
    let long = "many words ".repeat(20_000);
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"{long}"}}],"stream":true,"user":"dan"}}"#
    )
    .into_bytes();
    let h = [("x-mock-usage", "openai")];
    let direct = post_chat(mock.addr, &h, &body);
    let through = post_chat(tap.addr, &h, &body);
    assert_eq!(through.body, direct.body);
    let seen = &mock.wait_requests(2)[1];
    // Over Pingora's 64 KiB replay buffer: the head went before the body was read, so the
    // body may change only chunked.
    assert_eq!(seen["headers"]["transfer-encoding"], "chunked");
    assert!(seen["headers"].get("content-length").is_none());
    let mut want = body.clone();
    want.pop();
    want.extend_from_slice(br#","stream_options":{"include_usage":true}}"#);
    assert_eq!(seen["body_sha256"], sha256_hex(&want));
    assert_billed(&tap.wait_records(1)[0], &seen["billed"]);
}

#[test]
fn usage_injection_is_turned_off_per_upstream_and_per_model() {
    let mock = Mock::start();
    let h = [("x-mock-usage", "openai")];
    for (extra, model) in [
        ("inject_stream_usage = false", MODEL),
        (r#"inject_stream_usage_except = ["anthropic/*"]"#, MODEL),
    ] {
        let tap = tap(&mock, extra);
        for (n, body) in [
            chat_body(model, "erin", true, ""),
            format!(
                r#"{{"model":"{model}","messages":[{{"role":"user","content":"{}"}}],"stream":true}}"#,
                "x".repeat(100_000)
            )
            .into_bytes(),
        ]
        .iter()
        .enumerate()
        {
            let before = mock.requests().len();
            let r = post_chat(tap.addr, &h, body);
            assert_eq!(r.status, 200);
            let seen = &mock.wait_requests(before + 1)[before];
            assert_eq!(seen["body_sha256"], sha256_hex(body), "{extra}");
            // Off for the upstream, the request goes exactly as sent. Off for a model only,
            // a body too long to read before the head goes (over 64 KiB) still goes chunked:
            // its model is not known then.
            if n == 0 || extra.contains("false") {
                assert_eq!(
                    seen["headers"]["content-length"],
                    body.len().to_string(),
                    "{extra}"
                );
            }
            let rec = &tap.wait_records(n + 1)[n];
            assert_eq!(rec["usage_source"], "estimated", "{rec}");
            assert!(rec.get("usage_injected").is_none());
        }
    }
    // Another model on the same upstream is still asked for.
    let tap = tap(&mock, r#"inject_stream_usage_except = ["openai/*"]"#);
    post_chat(tap.addr, &h, &chat_body(MODEL, "erin", true, ""));
    assert_eq!(tap.wait_records(1)[0]["usage_source"], "reported");
}

#[test]
fn an_upstream_that_refuses_stream_options_says_injection_was_on() {
    let mock = Mock::start();
    let tap = tap(&mock, "");
    let h = [
        ("x-mock-usage", "openai"),
        ("x-mock-refuse-stream-options", "1"),
    ];
    let r = post_chat(tap.addr, &h, &chat_body(MODEL, "fay", true, ""));
    assert_eq!(r.status, 400, "the upstream's answer, as it sent it");
    assert_eq!(r.json()["error"]["param"], "stream_options");
    let rec = &tap.wait_records(1)[0];
    assert_eq!(rec["usage_injected"], true);
    assert_eq!(rec["outcome"], "upstream_error");
    let e = rec["error"].as_str().unwrap();
    assert!(
        e.contains("stream_options") && e.contains("inject_stream_usage"),
        "{e}"
    );
}

#[test]
fn searches_without_a_count_are_counted_and_priced() {
    let mock = Mock::start();
    let tap = tap(&mock, "");
    let tools = r#","tools":[{"type":"octen_search"}]"#;
    let mut n = 0;
    // (stream, shape, count reported, searches expected, source)
    for (stream, shape, count, want, source) in [
        (false, "groups", "none", 2, "counted"),
        (true, "groups", "none", 2, "counted"),
        (false, "flat", "none", 1, "counted"),
        (true, "flat", "none", 1, "counted"),
        (true, "groups", "yes", 2, "reported"),
        (false, "flat", "yes", 2, "reported"),
    ] {
        let h = [
            ("x-mock-search-count", count),
            ("x-mock-search-shape", shape),
        ];
        let body = chat_body(MODEL, "gus", stream, tools);
        let r = post_chat(tap.addr, &h, &body);
        assert_eq!(r.status, 200);
        let text = String::from_utf8_lossy(&r.body);
        assert_eq!(text.contains("num_search_queries"), count == "yes");
        n += 1;
        let rec = &tap.wait_records(n)[n - 1];
        let what = format!("stream {stream}, {shape}, count {count}: {rec}");
        assert_eq!(rec["web_searches"], want, "{what}");
        assert_eq!(rec["web_searches_source"], source, "{what}");
        assert_eq!(rec["usage_source"], "reported", "{what}");
        let bill = billed(&mock, n);
        let tokens = |k: &str| bill[k].as_u64().unwrap();
        assert_eq!(
            pico_of(rec),
            tokens("prompt") * INPUT + tokens("completion") * OUTPUT + want * SEARCH,
            "{what}"
        );
    }
}

#[test]
fn a_counted_search_is_reserved_and_settled_like_a_reported_one() {
    let mock = Mock::start();
    // A cap that a call with its searches fits, and two such calls do not.
    let tap = TapBuilder::new(&mock.url())
        .extra(&format!(
            "{TEST_PRICING}\n[budgets.default]\ntotal = {{ usd = 0.015 }}\n"
        ))
        .start();
    let body = chat_body(
        MODEL,
        "hal",
        true,
        r#","max_tokens":10,"tools":[{"type":"octen_search","parameters":{"max_searches":2}}]"#,
    );
    let h = [("x-mock-search-count", "none"), ("x-mock-usage", "openai")];
    assert_eq!(post_chat(tap.addr, &h, &body).status, 200);
    let rec = &tap.wait_records(1)[0];
    assert_eq!(rec["web_searches"], 2);
    assert!(pico_of(rec) > 2 * SEARCH, "{rec}");
    let v = request(tap.admin, "GET", "/admin/budgets/users/hal", &[], b"").json();
    assert_eq!(
        pico_of_usd(&v["windows"][0]["spent_usd"]),
        pico_of(rec),
        "the ledger holds the record's cost, searches included: {v}"
    );
    // Two searches at $0.005 are $0.01: what is left cannot cover another call's worst case.
    let r = post_chat(tap.addr, &h, &body);
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
}

#[test]
fn the_virtual_key_works_from_each_header_and_only_the_real_key_goes_upstream() {
    const REAL: &str = "sk-real-upstream-5f0c2a";
    let mock = Mock::start();
    let tap = TapBuilder::new(&mock.url())
        .env("UPSTREAM_KEY", REAL)
        .env("RUST_LOG", "debug")
        .log_to_file()
        .extra(&format!(
            "{TEST_PRICING}\n[auth]\nmode = \"virtual_keys\"\nupstream_key_env = \"UPSTREAM_KEY\"\nupstream_key_header = \"x-api-key\"\n"
        ))
        .start();
    let old = tap.config_hash();
    let out = tokentap_cli(&["keys", "create", "--user", "ivy"], &tap.config);
    let key = out.lines().next().unwrap().trim().to_string();
    tap.wait_config_change(&old);
    let bearer = format!("Bearer {key}");
    let body = chat_body(MODEL, "ivy", false, "");
    let mut calls = 0;
    for h in [
        ("authorization", bearer.as_str()),
        ("x-api-key", key.as_str()),
        ("api-key", key.as_str()),
    ] {
        // Other credentials the client sends never travel on either.
        let r = post_chat(
            tap.addr,
            &[h, ("proxy-authorization", "Basic c2VjcmV0")],
            &body,
        );
        assert_eq!(
            r.status,
            200,
            "{}: {}",
            h.0,
            String::from_utf8_lossy(&r.body)
        );
        calls += 1;
        let seen = &mock.wait_requests(calls)[calls - 1];
        assert_eq!(
            seen["credentials"],
            serde_json::json!(["x-api-key"]),
            "{}",
            h.0
        );
        assert_eq!(seen["headers"]["x-api-key"], REAL);
    }
    // Unknown keys, in any of the headers, and two different keys: 401, nothing upstream.
    for h in [
        vec![("authorization", "Bearer tt-unknown")],
        vec![("x-api-key", "tt-unknown")],
        vec![("api-key", REAL)],
        vec![
            ("authorization", bearer.as_str()),
            ("x-api-key", "tt-other"),
        ],
    ] {
        let r = post_chat(tap.addr, &h, &body);
        assert_eq!(r.status, 401, "{h:?}");
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        assert!(
            !String::from_utf8_lossy(&r.body).contains("tt-"),
            "no key echoed"
        );
    }
    assert_eq!(mock.received(), calls as u64);
    // No key in anything tokentap writes.
    let recs = tap.wait_records(calls + 4);
    let metrics = request(tap.admin, "GET", "/metrics", &[], b"").body;
    let admin = request(tap.admin, "GET", "/admin/config", &[], b"").body;
    let log = std::fs::read(tap.dir.path().join("tokentap.stderr")).unwrap();
    for (what, text) in [
        ("access log", serde_json::to_string(&recs).unwrap()),
        ("metrics", String::from_utf8_lossy(&metrics).into_owned()),
        ("admin", String::from_utf8_lossy(&admin).into_owned()),
        ("log", String::from_utf8_lossy(&log).into_owned()),
    ] {
        for secret in [key.as_str(), REAL, "c2VjcmV0"] {
            assert!(!text.contains(secret), "{what} holds a credential");
        }
    }
}

#[test]
fn the_openai_sdk_gets_the_same_objects_through_a_tokentap_that_asks_for_usage() {
    let mock = Mock::start();
    let tap = tap(&mock, "");
    let text = openai_sdk_check(&mock, &tap);
    assert!(text.contains("9 passed, 0 failed"), "{text}");
    let recs = tap.wait_records(9);
    // Every stream the SDK did not ask usage for was asked for by tokentap: two to the
    // target-shaped upstream (which sends it anyway), two OpenAI-shaped.
    let asked = recs.iter().filter(|r| r["usage_injected"] == true).count();
    assert_eq!(asked, 4, "{recs:?}");
    for r in recs.iter().filter(|r| r["status"] == 200) {
        assert_eq!(r["usage_source"], "reported", "{r}");
    }
}
