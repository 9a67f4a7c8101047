//! Every API a team sends is metered and capped: Chat Completions, Responses, Anthropic
//! Messages, embeddings and legacy completions, streamed and not, against a mock that speaks
//! each dialect in its real shapes.

mod common;

use common::dialects::*;
use common::*;
use serde_json::Value;

fn tap(mock: &Mock, extra: &str) -> Tap {
    TapBuilder::new(&mock.url())
        .extra(&format!("{DIALECT_PRICING}\n{extra}"))
        .start()
}

#[test]
fn every_dialect_streamed_or_not_reaches_the_client_unchanged_and_is_billed_as_the_upstream_billed()
{
    let mock = Mock::start();
    let tap = tap(&mock, "");
    let variants: [&[(&str, &str)]; 3] = [
        &[],
        &[("x-mock-split", "bytes"), ("x-mock-crlf", "1")],
        &[("x-mock-encoding", "gzip")],
    ];
    let (mut logged, mut recorded) = (0, 0);
    for d in Dialect::ALL {
        for stream in [false, true] {
            if stream && !d.streams() {
                continue;
            }
            for variant in variants {
                let mut h = vec![("x-mock-cached", "3"), ("x-mock-chunks", "6")];
                if d == Dialect::Messages {
                    h.push(("x-mock-cache-write", "2"));
                }
                if matches!(d, Dialect::Responses | Dialect::Chat) {
                    h.push(("x-mock-reasoning", "4"));
                }
                if d == Dialect::Completions {
                    // As OpenAI: stream usage only when asked (tokentap asks, and takes
                    // the usage chunk out again).
                    h.push(("x-mock-usage", "openai"));
                }
                h.extend_from_slice(variant);
                let search = matches!(d, Dialect::Chat | Dialect::Responses | Dialect::Messages);
                let body = d.body("alice", stream, search);
                let what = format!("{d:?} stream={stream} {variant:?}");

                // The same call straight to the upstream, then through tokentap.
                let direct = call(mock.addr, d, &h, &body);
                logged += 1;
                assert_eq!(direct.status, 200, "{what}");
                let through = call(tap.addr, d, &h, &body);
                logged += 1;
                assert_eq!(through.status, 200, "{what}");
                assert!(through.complete, "{what}");
                let enc = variant
                    .iter()
                    .find(|(k, _)| *k == "x-mock-encoding")
                    .map(|(_, v)| *v);
                if matches!(d, Dialect::Chat | Dialect::Completions) && stream {
                    // (Chat streams are asked for their usage, which comes out again: the
                    // client gets what it would have got, as tests/upstreams.rs checks.)
                    assert_eq!(
                        inflate(enc, &through.body),
                        inflate(enc, &direct.body),
                        "{what}"
                    );
                } else {
                    assert_eq!(through.body, direct.body, "{what}: the client's bytes");
                }
                assert_eq!(through.header("content-encoding"), enc, "{what}");
                let seen = &mock.wait_requests(logged)[logged - 1];
                if !(matches!(d, Dialect::Chat | Dialect::Completions) && stream) {
                    assert_eq!(
                        seen["body"],
                        String::from_utf8(body.clone()).unwrap(),
                        "{what}: the request goes as sent"
                    );
                }
                if d == Dialect::Messages {
                    assert_eq!(seen["headers"]["anthropic-version"], "2023-06-01");
                    assert_eq!(
                        seen["headers"]["anthropic-beta"],
                        "prompt-caching-2024-07-31"
                    );
                }
                recorded += 1;
                let rec = &tap.wait_records(recorded)[recorded - 1];
                assert_eq!(rec["api"], d.api(), "{what}: {rec}");
                if d == Dialect::Messages {
                    assert_eq!(rec["provider"], "anthropic", "{what}: {rec}");
                }
                assert_eq!(rec["user"], "alice", "{what}: {rec}");
                assert_eq!(rec["usage_source"], "reported", "{what}: {rec}");
                assert_eq!(rec["outcome"], "complete", "{what}: {rec}");
                assert_record_is_the_bill(rec, &seen["billed"], d.model());
                if search {
                    assert!(rec["web_searches"].as_u64().unwrap() > 0, "{what}: {rec}");
                }
            }
        }
    }
    // The metrics know each dialect, for the same user.
    for d in Dialect::ALL {
        let series = format!(
            "tokentap_tokens_total{{model=\"{}\",user=\"alice\",api=\"{}\",type=\"output\"}}",
            d.model(),
            d.api()
        );
        let out = tap.metric(&series);
        assert_eq!(out > 0.0, d != Dialect::Embeddings, "{series} = {out}");
    }
    let writes = tap.metric(
        "tokentap_tokens_total{model=\"claude-sonnet-4-5\",user=\"alice\",api=\"messages\",type=\"cache_write_input\"}",
    );
    assert_eq!(
        writes,
        2.0 * 6.0,
        "six Messages calls wrote two tokens each"
    );
    let metrics = String::from_utf8(request(tap.admin, "GET", "/metrics", &[], b"").body).unwrap();
    for op in ["chat", "embeddings", "text_completion"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("gen_ai_client_token_usage_count{")
                    && l.contains(&format!("gen_ai_operation_name=\"{op}\""))),
            "{op}: {metrics}"
        );
    }
}

#[test]
fn anthropic_cumulative_deltas_and_cache_tokens_are_counted_once() {
    let mock = Mock::start();
    let tap = tap(&mock, "");
    let d = Dialect::Messages;
    for (i, h) in [
        vec![("x-mock-deltas", "2"), ("x-mock-delta-usage", "full")],
        vec![("x-mock-deltas", "3"), ("x-mock-delta-usage", "output")],
        vec![("x-mock-deltas", "2")],
    ]
    .into_iter()
    .enumerate()
    {
        let mut h = h;
        h.extend([
            ("x-mock-cached", "5"),
            ("x-mock-cache-write", "4"),
            ("x-mock-chunks", "8"),
            ("x-mock-searches", "2"),
        ]);
        let r = call(tap.addr, d, &h, &d.body("bob", true, true));
        assert_eq!(r.status, 200);
        let bill = &mock.wait_requests(i + 1)[i]["billed"];
        let rec = &tap.wait_records(i + 1)[i];
        assert_record_is_the_bill(rec, bill, d.model());
        assert_eq!(rec["completion_tokens"], 8, "{rec}");
        assert_eq!(rec["cached_tokens"], 5, "{rec}");
        assert_eq!(rec["cache_write_tokens"], 4, "{rec}");
        assert_eq!(rec["web_searches"], 2, "{rec}");
        assert_eq!(rec["finish_reasons"], serde_json::json!(["end_turn"]));
    }
}

#[test]
fn responses_web_search_calls_are_each_one_search_and_a_tool_that_never_ran_costs_nothing() {
    let mock = Mock::start();
    let tap = tap(&mock, "");
    let d = Dialect::Responses;
    let mut n = 0;
    for stream in [false, true] {
        for searches in ["0", "1", "3"] {
            let r = call(
                tap.addr,
                d,
                &[("x-mock-searches", searches)],
                &d.body("carol", stream, true),
            );
            assert_eq!(r.status, 200);
            n += 1;
            let bill = &mock.wait_requests(n)[n - 1]["billed"];
            let rec = &tap.wait_records(n)[n - 1];
            assert_record_is_the_bill(rec, bill, d.model());
            assert_eq!(rec["web_searches"].to_string(), searches, "{rec}");
        }
    }
    // Ended short: billed all the same, and the record says why.
    for (h, why) in [
        ("x-mock-incomplete", "max_output_tokens"),
        ("x-mock-failed", "failed"),
    ] {
        for stream in [false, true] {
            let r = call(tap.addr, d, &[(h, "1")], &d.body("carol", stream, false));
            assert_eq!(r.status, 200);
            n += 1;
            let bill = &mock.wait_requests(n)[n - 1]["billed"];
            let rec = &tap.wait_records(n)[n - 1];
            assert_record_is_the_bill(rec, bill, d.model());
            assert!(
                rec["finish_reasons"].to_string().contains(why),
                "{h}: {rec}"
            );
        }
    }
}

#[test]
fn cut_off_streams_of_each_dialect_are_billed_from_what_was_delivered() {
    let mock = Mock::start();
    let tap = tap(&mock, "");
    let mut n = 0;
    for d in [Dialect::Responses, Dialect::Messages, Dialect::Completions] {
        let h = [
            ("x-mock-reset-after", "3"),
            ("x-mock-chunks", "10"),
            ("x-mock-cache-write", "2"),
        ];
        let r = call(tap.addr, d, &h, &d.body("dave", true, false));
        assert_eq!(r.status, 200, "{d:?}");
        assert!(!r.complete, "{d:?}: the stream was cut");
        n += 1;
        let bill = &mock.wait_requests(n)[n - 1]["billed"];
        let rec = &tap.wait_records(n)[n - 1];
        assert_eq!(rec["usage_source"], "estimated", "{d:?}: {rec}");
        assert_eq!(rec["outcome"], "upstream_reset", "{d:?}: {rec}");
        // Three deltas of one token each were delivered.
        assert_eq!(rec["completion_tokens"], 3, "{d:?}: {rec}");
        if d == Dialect::Messages {
            // The input as message_start counted it, not guessed from the request.
            assert_eq!(rec["prompt_tokens"], bill["prompt"], "{rec}");
            assert_eq!(rec["cache_write_tokens"], 2, "{rec}");
            assert_eq!(rec["cached_tokens"], bill["cached"], "{rec}");
        }
        assert!(super_pico(rec) > 0, "{d:?}: {rec}");
    }
}

fn super_pico(rec: &Value) -> u64 {
    pico_of(rec)
}

#[test]
fn refusals_come_in_the_shape_each_dialects_clients_parse() {
    let mock = Mock::start();
    let tap = tap(
        &mock,
        "[budgets.users.broke]\ndaily = { usd = 0.000000000001 }\n",
    );
    for d in Dialect::ALL {
        let r = call(tap.addr, d, &[], &d.body("broke", false, false));
        assert_eq!(r.status, 429, "{d:?}: {}", String::from_utf8_lossy(&r.body));
        assert!(r.header("retry-after").is_some(), "{d:?}");
        let v = r.json();
        if d == Dialect::Messages {
            assert_eq!(v["type"], "error", "{v}");
            assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
            assert!(v["error"]["message"].is_string(), "{v}");
        } else {
            assert_eq!(v["error"]["code"], "budget_exceeded", "{d:?}: {v}");
        }
    }
    assert_eq!(mock.received(), 0, "no refused call reached the upstream");
    // count_tokens is free and passes; unknown paths are forwarded and counted.
    let r = request(
        tap.addr,
        "POST",
        "/v1/messages/count_tokens",
        &Dialect::Messages.headers(),
        &Dialect::Messages.body("broke", false, false),
    );
    assert_eq!(r.status, 200);
    assert!(r.json()["input_tokens"].as_u64().unwrap() > 0);
    let r = request(tap.addr, "GET", "/v1/models", &[], b"");
    assert_eq!(r.status, 200);
    // The Responses API over a WebSocket (Codex tries it first) would go unmetered: refused
    // (the client falls back to HTTP).
    let r = request(
        tap.addr,
        "GET",
        "/v1/responses",
        &[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        b"",
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "websocket_not_metered");
    let r = request(tap.addr, "POST", "/v1/files", &[], b"{}");
    assert_eq!(r.status, 404, "the mock serves no files");
    // A background response is billed after the answer tokentap sees: refused under caps.
    let r = request(
        tap.addr,
        "POST",
        "/v1/responses",
        &[],
        br#"{"model":"gpt-5","input":"hi","background":true,"safety_identifier":"rich"}"#,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "background_not_capped");
    tap.wait_records(Dialect::ALL.len() + 5);
    assert_eq!(
        tap.metric(
            "tokentap_unmetered_requests_total{method=\"POST\",path_class=\"count_tokens\"}"
        ),
        1.0
    );
    assert_eq!(
        tap.metric("tokentap_unmetered_requests_total{method=\"POST\",path_class=\"files\"}"),
        1.0
    );
    assert_eq!(
        tap.metric("tokentap_unmetered_requests_total{method=\"GET\",path_class=\"models\"}"),
        1.0
    );
}

#[test]
fn unmetered_paths_can_be_refused_so_caps_have_no_way_around() {
    let mock = Mock::start();
    let tap = tap(&mock, "[limits]\nunmetered = \"refuse\"\n");
    let r = request(tap.addr, "POST", "/v1/files", &[], b"{}");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "unmetered_endpoint");
    let r = request(tap.addr, "POST", "/v1/responses/resp_1/cancel", &[], b"");
    assert_eq!(r.status, 404);
    // Listing models and counting tokens stay open; metered calls go.
    assert_eq!(request(tap.addr, "GET", "/v1/models", &[], b"").status, 200);
    let d = Dialect::Messages;
    let r = request(
        tap.addr,
        "POST",
        "/v1/messages/count_tokens",
        &d.headers(),
        &d.body("x", false, false),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        call(tap.addr, d, &[], &d.body("x", false, false)).status,
        200
    );
    assert_eq!(
        mock.received(),
        3,
        "refused requests never reached the upstream"
    );
}

#[test]
fn claude_code_sessions_of_one_account_are_one_user() {
    let mock = Mock::start();
    let tap = tap(&mock, "");
    let d = Dialect::Messages;
    for (i, (device, account, session)) in [
        ("dev-1", "acc-1", "s-1"),
        ("dev-1", "acc-1", "s-2"),
        ("dev-2", "", "s-3"),
    ]
    .into_iter()
    .enumerate()
    {
        let user_id = serde_json::json!({"device_id": device, "account_uuid": account, "session_id": session})
            .to_string();
        let mut body: Value = serde_json::from_slice(&d.body("", false, false)).unwrap();
        body["metadata"]["user_id"] = Value::String(user_id);
        let r = call(tap.addr, d, &[], &serde_json::to_vec(&body).unwrap());
        assert_eq!(r.status, 200);
        let rec = &tap.wait_records(i + 1)[i];
        assert_eq!(
            rec["user"],
            if account.is_empty() { device } else { account },
            "{rec}"
        );
    }
}

#[test]
fn a_capped_user_mixing_dialects_at_once_stays_within_the_cap_on_the_embedded_ledger() {
    let mock = Mock::start();
    let cap = 10_000_000_000u64; // $0.01
    let tap = tap(
        &mock,
        &format!(
            "[budgets.users.capped]\ntotal = {{ usd = \"{}\" }}\n",
            usd(cap)
        ),
    );
    mixed_dialects_hold_the_cap(&tap, &mock, cap);

    // The spend report knows the APIs: each one's spend is its calls' in the access log.
    let mut tap = tap;
    let recs = tap.records();
    assert!(tap.proc.terminate().success());
    let out = tokentap_cli(&["spend", "--by", "api", "--format", "json"], &tap.config);
    let rows: Value = serde_json::from_str(&out).unwrap();
    for api in ["chat_completions", "responses", "messages"] {
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["api"] == api)
            .unwrap_or_else(|| panic!("no {api} row: {out}"));
        let want: u64 = recs
            .iter()
            .filter(|r| r["api"] == api && !r["cost_usd"].is_null())
            .map(pico_of)
            .sum();
        assert_eq!(pico_of_usd(&row["cost_usd"]), want, "{api}: {out}");
    }
}

fn issue_key(tap: &Tap, user: &str) -> String {
    let old = tap.config_hash();
    let out = tokentap_cli(&["keys", "create", "--user", user], &tap.config);
    let key = out.lines().next().unwrap().trim().to_string();
    assert!(key.starts_with("tt-"), "{out}");
    tap.wait_config_change(&old);
    key
}

#[test]
fn two_routes_serve_openai_and_anthropic_clients_with_their_own_keys_and_one_cap() {
    let openai = Mock::start();
    let anthropic = Mock::start();
    let cap = 20_000_000_000u64; // $0.02
    let tap = TapBuilder::new(&openai.url())
        .env("OPENAI_KEY", "sk-openai-real")
        .env("ANTHROPIC_KEY", "sk-ant-real")
        .extra(&format!(
            "{DIALECT_PRICING}\n[auth]\nmode = \"virtual_keys\"\nupstream_key_env = \"OPENAI_KEY\"\n\
             [budgets.users.alice]\ndaily = {{ usd = \"{}\" }}\n\
             [[routes]]\nprefix = \"/v1/messages\"\nurl = \"{}\"\nkey_env = \"ANTHROPIC_KEY\"\nkey_header = \"x-api-key\"\n\
             [[routes]]\nprefix = \"/anthropic\"\nstrip_prefix = true\nurl = \"{}\"\nkey_env = \"ANTHROPIC_KEY\"\nkey_header = \"x-api-key\"\n",
            usd(cap),
            anthropic.url(),
            anthropic.url()
        ))
        .start();
    let key = issue_key(&tap, "alice");
    let bearer = format!("Bearer {key}");

    // No key: each dialect's own 401, nothing upstream.
    let r = call(
        tap.addr,
        Dialect::Messages,
        &[],
        &Dialect::Messages.body("x", false, false),
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = call(
        tap.addr,
        Dialect::Responses,
        &[],
        &Dialect::Responses.body("x", false, false),
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    assert_eq!(openai.received() + anthropic.received(), 0);

    // Claude Code's body names its own session ids: the call is the key's user's.
    let mut claude: Value =
        serde_json::from_slice(&Dialect::Messages.body("", true, false)).unwrap();
    claude["metadata"]["user_id"] =
        Value::String(r#"{"device_id":"d","account_uuid":"a","session_id":"s"}"#.into());
    let claude = serde_json::to_vec(&claude).unwrap();
    let codex = Dialect::Responses.body("", true, false);

    let (mut allowed, mut refused) = (Vec::new(), Vec::new());
    let paths = ["/v1/responses", "/v1/messages", "/anthropic/v1/messages"];
    for i in 0..300 {
        let (d, path, h, body) = match i % 3 {
            0 => (
                Dialect::Responses,
                "/v1/responses",
                ("authorization", bearer.as_str()),
                &codex,
            ),
            1 => (
                Dialect::Messages,
                "/v1/messages",
                ("x-api-key", key.as_str()),
                &claude,
            ),
            _ => (
                Dialect::Messages,
                "/anthropic/v1/messages",
                ("x-api-key", key.as_str()),
                &claude,
            ),
        };
        let mut hs = d.headers();
        hs.push(h);
        hs.push(("x-mock-chunks", "40"));
        let r = request(tap.addr, "POST", path, &hs, body);
        match r.status {
            200 => allowed.push(path),
            429 => refused.push(path),
            s => panic!("{path}: {s} {}", String::from_utf8_lossy(&r.body)),
        }
        if paths.iter().all(|p| refused.contains(p)) {
            break;
        }
    }
    // Every route ran into the one cap.
    for p in ["/v1/responses", "/v1/messages", "/anthropic/v1/messages"] {
        assert!(allowed.contains(&p), "{p} was never allowed: {allowed:?}");
        assert!(refused.contains(&p), "{p} was never refused: {refused:?}");
    }
    let recs = tap.wait_records(allowed.len() + refused.len() + 2);
    let spent: u64 = recs
        .iter()
        .filter(|r| r["status"] == 200)
        .inspect(|r| assert_eq!(r["user"], "alice", "{r}"))
        .map(pico_of)
        .sum();
    let worst = 64 * 15_000_000 + 100 * 3_750_000;
    assert!(spent <= cap + worst, "spent {spent} of a cap of {cap}");

    // Each upstream got its own real key in its own header, and the path it serves.
    let to_openai = openai.requests();
    let to_anthropic = anthropic.requests();
    assert_eq!(to_openai.len() + to_anthropic.len(), allowed.len());
    for q in &to_openai {
        assert_eq!(q["path"], "/v1/responses");
        assert_eq!(q["headers"]["authorization"], "Bearer sk-openai-real");
        assert_eq!(q["credentials"], serde_json::json!(["authorization"]));
    }
    for q in &to_anthropic {
        assert_eq!(
            q["path"], "/v1/messages",
            "the /anthropic prefix is stripped"
        );
        assert_eq!(q["headers"]["x-api-key"], "sk-ant-real");
        assert_eq!(q["credentials"], serde_json::json!(["x-api-key"]));
        assert_eq!(q["headers"]["anthropic-version"], "2023-06-01");
    }
    // A path that reads one way and would be forwarded another is refused.
    let mut hs = Dialect::Messages.headers();
    hs.push(("x-api-key", key.as_str()));
    let before = anthropic.requests().len() + openai.requests().len();
    // (Read as `/anthropic/x/v1/messages`, they would go as `/v1/messages`.)
    for path in [
        "/anthropic%2Fx/v1/messages",
        "/Anthropic%2fx%2F/v1/messages",
    ] {
        let r = request(tap.addr, "POST", path, &hs, &claude);
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(r.json()["error"]["type"], "invalid_request_error", "{path}");
    }
    assert_eq!(anthropic.requests().len() + openai.requests().len(), before);
    // alice's key naming bob in a Responses body, either way: refused.
    for body in [
        br#"{"model":"gpt-5","input":"hi","safety_identifier":"bob"}"#.as_slice(),
        br#"{"model":"gpt-5","input":"hi","safety_identifier":"alice","user":"bob"}"#,
    ] {
        let r = request(
            tap.addr,
            "POST",
            "/v1/responses",
            &[("authorization", bearer.as_str())],
            body,
        );
        assert_eq!(r.status, 403);
        assert_eq!(r.json()["error"]["code"], "user_mismatch");
    }
    // Counting tokens is free and goes to Anthropic too.
    let mut hs = Dialect::Messages.headers();
    hs.push(("x-api-key", key.as_str()));
    let r = request(tap.addr, "POST", "/v1/messages/count_tokens", &hs, &claude);
    assert_eq!(r.status, 200);
    assert_eq!(anthropic.requests().len(), to_anthropic.len() + 1);
}

/// Runs tests/sdk/dialects_sdk_check.py: the real openai SDK (Responses) and anthropic SDK
/// (Messages), the same calls straight to `mock` and through `tap`.
fn dialects_sdk_check(
    mock: &Mock,
    tap: &Tap,
    key: &str,
    capped_key: &str,
    messages_user: &str,
) -> String {
    sdk_script(
        "dialects_sdk_check.py",
        "openai, anthropic",
        &[
            mock.url(),
            format!("http://{}", tap.addr),
            key.to_string(),
            capped_key.to_string(),
            "capped".to_string(),
            messages_user.to_string(),
        ],
    )
}

/// The SDK calls through tokentap are metered: each a reported usage of its dialect.
fn assert_sdk_calls_metered(tap: &Tap, user: &str) {
    // 10 cases, the two refusals.
    let recs = tap.wait_records(12);
    let by = |api: &str| {
        recs.iter()
            .filter(|r| r["api"] == api && r["status"] == 200)
            .inspect(|r| {
                assert_eq!(r["usage_source"], "reported", "{r}");
                assert_eq!(r["user"], user, "{r}");
                assert!(pico_of(r) > 0, "{r}");
            })
            .count()
    };
    assert_eq!(by("responses"), 5);
    assert_eq!(by("messages"), 5);
    let refused: Vec<_> = recs.iter().filter(|r| r["status"] == 429).collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
}

#[test]
fn the_openai_and_anthropic_sdks_work_unchanged_through_tokentap_and_are_metered() {
    let mock = Mock::start();
    let tap = tap(
        &mock,
        "[budgets.users.capped]\ndaily = { usd = 0.000000000001 }\n",
    );
    let text = dialects_sdk_check(&mock, &tap, "sk-any", "sk-any", "sdk-user");
    assert!(text.contains("12 passed, 0 failed"), "{text}");
    assert_sdk_calls_metered(&tap, "sdk-user");
}

#[test]
fn the_openai_and_anthropic_sdks_work_with_virtual_keys() {
    let mock = Mock::start();
    let tap = TapBuilder::new(&mock.url())
        .extra(&format!(
            "{DIALECT_PRICING}\n[auth]\nmode = \"virtual_keys\"\n\
             [budgets.users.capped]\ndaily = {{ usd = 0.000000000001 }}\n"
        ))
        .start();
    let key = issue_key(&tap, "sdk-user");
    let capped = issue_key(&tap, "capped");
    // Claude Code's metadata.user_id names a session, not the key's user: the key decides.
    let session = r#"{"device_id":"d-1","account_uuid":"a-1","session_id":"s-1"}"#;
    let text = dialects_sdk_check(&mock, &tap, &key, &capped, session);
    assert!(text.contains("12 passed, 0 failed"), "{text}");
    assert_sdk_calls_metered(&tap, "sdk-user");
    // The anthropic SDK sent its key as x-api-key, the openai SDK as a bearer token; neither
    // reached the upstream (the direct calls carry the SDKs' own `sk-direct`).
    let through: Vec<Value> = mock
        .requests()
        .into_iter()
        .filter(|q| q["credentials"] == serde_json::json!([]))
        .collect();
    assert_eq!(
        through.len(),
        10,
        "the ten calls through tokentap went without a key"
    );
    for q in mock.requests() {
        let headers = q["headers"].to_string();
        assert!(!headers.contains(&key) && !headers.contains(&capped), "{q}");
    }
}
