//! Virtual keys against the real binary: identity from the key, never from the body; the
//! real upstream key sent instead; revocation on reload; and no key anywhere in what tokentap
//! writes (its log at debug level, the access log, metrics, the admin API, the keys file).

mod common;
#[path = "common/otlp.rs"]
mod otlp;

use std::path::Path;

use common::*;

const MODEL: &str = "anthropic/claude-opus-4.6";
const UPSTREAM_KEY: &str = "sk-upstream-real-7c1d9e";

fn keys(config: &Path, args: &[&str]) -> String {
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    tokentap_cli(&all, config)
}

fn issue(tap: &Tap, user: &str) -> (String, String) {
    issue_key(tap, user)
}

fn call(tap: &Tap, key: Option<&str>, user: Option<&str>) -> Resp {
    let bearer = key.map(|k| format!("Bearer {k}"));
    let mut h: Vec<(&str, &str)> = Vec::new();
    if let Some(b) = &bearer {
        h.push(("authorization", b));
    }
    let extra = user.map_or(String::new(), |u| format!(r#","user":"{u}""#));
    let body =
        format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#);
    post_chat(tap.addr, &h, body.as_bytes())
}

#[test]
fn identity_comes_from_the_key_and_no_key_is_ever_written_anywhere() {
    let mock = Mock::start();
    let collector = otlp::Collector::http();
    let tap = TapBuilder::new(&mock.url())
        .env("UPSTREAM_KEY", UPSTREAM_KEY)
        // Debug level, Pingora included (a narrower directive beats the cap on its modules):
        // not even its header dumps may carry a key.
        .env("RUST_LOG", "debug,pingora_proxy::proxy_h1=debug,pingora_core=debug")
        .log_to_file()
        .extra(&format!(
            "{TEST_PRICING}\n[auth]\nmode = \"virtual_keys\"\nupstream_key_env = \"UPSTREAM_KEY\"\n[traces]\nendpoint = \"http://{}\"\nprotocol = \"http/protobuf\"\nbatch_delay_ms = 50\n",
            collector.addr
        ))
        .start();
    let (alice, alice_id) = issue(&tap, "alice");

    // No key, or a key tokentap never issued: 401, nothing upstream.
    for k in [None, Some("tt-0000"), Some(UPSTREAM_KEY)] {
        let r = call(&tap, k, Some("alice"));
        assert_eq!(r.status, 401, "{k:?}");
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    }
    assert_eq!(mock.received(), 0);

    // alice's key naming bob: refused, bob is never charged.
    let r = call(&tap, Some(&alice), Some("bob"));
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "user_mismatch");
    assert_eq!(r.json()["error"]["param"], "user");
    assert_eq!(mock.received(), 0);

    // Her own name, or none: charged to alice; the upstream gets the real key only.
    assert_eq!(call(&tap, Some(&alice), Some("alice")).status, 200);
    assert_eq!(call(&tap, Some(&alice), None).status, 200);
    let r = post_chat(
        tap.addr,
        &[("api-key", &alice)],
        format!(r#"{{"model":"{MODEL}","messages":[]}}"#).as_bytes(),
    );
    assert_eq!(r.status, 200, "a key in api-key works too");
    let r = request(
        tap.addr,
        "GET",
        "/v1/models",
        &[("authorization", &format!("Bearer {alice}"))],
        b"",
    );
    assert_eq!(r.status, 200);
    let seen = mock.wait_requests(4);
    for s in &seen {
        assert_eq!(
            s["headers"]["authorization"],
            format!("Bearer {UPSTREAM_KEY}")
        );
        assert!(s["headers"].get("api-key").is_none());
    }
    let recs = tap.wait_records(8);
    for r in &recs {
        assert_ne!(r["user"], "bob", "{r}");
    }
    assert!(recs
        .iter()
        .filter(|r| r["status"] == 200)
        .all(|r| r["user"] == "alice"));

    // Nothing the key does not allow, nothing tokentap cannot read, nothing ambiguous reaches
    // the upstream on the real key.
    let before = mock.received();
    let bearer = format!("Bearer {alice}");
    // (Every metered API is allowed; an unmetered one is not.)
    let r = request(
        tap.addr,
        "POST",
        "/v1/moderations",
        &[("authorization", &bearer)],
        br#"{"model":"m","input":"x"}"#,
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "endpoint_not_allowed");
    let utf16: Vec<u8> = format!(r#"{{"model":"{MODEL}","messages":[],"user":"mallory"}}"#)
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let r = post_chat(tap.addr, &[("authorization", &bearer)], &utf16);
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_body");
    let dup = format!(r#"{{"model":"{MODEL}","messages":[],"user":"mallory","user":"alice"}}"#);
    let r = post_chat(tap.addr, &[("authorization", &bearer)], dup.as_bytes());
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "ambiguous_field");
    let r = post_chat(tap.addr, &[("authorization", &bearer)], b"");
    assert_eq!(r.status, 400, "a bodiless chat call is not forwarded");
    assert_eq!(mock.received(), before);
    // The client may not pick the organisation the real key bills.
    assert_eq!(
        post_chat(
            tap.addr,
            &[
                ("authorization", &bearer),
                ("openai-organization", "org-other")
            ],
            format!(r#"{{"model":"{MODEL}","messages":[]}}"#).as_bytes(),
        )
        .status,
        200
    );
    let seen = mock.wait_requests(before as usize + 1);
    assert!(seen.last().unwrap()["headers"]
        .get("openai-organization")
        .is_none());

    // Overwrite mode: carol's key naming mallory goes through as carol.
    let old = tap.config_hash();
    let text = std::fs::read_to_string(&tap.config).unwrap();
    tap.write_config(&text.replace(
        "mode = \"virtual_keys\"",
        "mode = \"virtual_keys\"\nuser_mismatch = \"overwrite\"",
    ));
    tap.wait_config_change(&old);
    let (carol, _) = issue(&tap, "carol");
    let r = call(&tap, Some(&carol), Some("mallory"));
    assert_eq!(r.status, 200);
    let seen = mock.wait_requests(6);
    assert_eq!(seen[5]["user"], "carol", "the upstream saw the key's user");
    assert_eq!(tap.wait_records(14)[13]["user"], "carol");

    // Revoked: refused from the reload on.
    let old = tap.config_hash();
    keys(&tap.config, &["revoke", &alice_id]);
    tap.wait_config_change(&old);
    assert_eq!(call(&tap, Some(&alice), Some("alice")).status, 401);
    assert_eq!(call(&tap, Some(&carol), Some("carol")).status, 200);
    let listed = keys(&tap.config, &["list"]);
    assert!(
        listed.contains(&alice_id) && listed.contains("true"),
        "{listed}"
    );

    // No key anywhere tokentap writes: spans (every call's), logs, metrics, admin, files.
    let recs = tap.records();
    for r in &recs {
        collector.span_of(r["request_id"].as_str().unwrap());
    }
    let spans = format!("{:?}", collector.spans());
    assert!(spans.contains("alice"), "the spans name the key's user");
    let metrics = request(tap.admin, "GET", "/metrics", &[], b"");
    let admin = request(tap.admin, "GET", "/admin/config", &[], b"");
    let written = [
        std::fs::read_to_string(tap.dir.path().join("tokentap.stderr")).unwrap(),
        std::fs::read_to_string(&tap.log).unwrap(),
        String::from_utf8_lossy(&metrics.body).into_owned(),
        String::from_utf8_lossy(&admin.body).into_owned(),
        std::fs::read_to_string(tap.dir.path().join("tokentap-keys.toml")).unwrap(),
        listed,
        spans,
    ];
    assert!(written[0].contains("tokentap listening"), "this is the log");
    assert!(
        written[0].contains("Sending header to upstream"),
        "Pingora's header dumps ran"
    );
    for text in &written {
        for secret in [alice.as_str(), carol.as_str(), UPSTREAM_KEY, &alice[3..]] {
            assert!(
                !text.contains(secret),
                "a key was written: {secret} in {}",
                text.lines()
                    .find(|l| l.contains(secret))
                    .unwrap_or_default()
            );
        }
    }
}

#[test]
fn the_admin_listener_protects_admin_and_optionally_metrics() {
    let mock = Mock::start();
    let token = "admin-token-0123456789abcdef";
    let tap = TapBuilder::new(&mock.url())
        .env("TT_ADMIN_TOKEN", token)
        .start_with_server_extra("admin_token_env = \"TT_ADMIN_TOKEN\"\nprotect_metrics = true\n");
    let bearer = format!("Bearer {token}");
    for path in ["/admin/config", "/metrics"] {
        let r = request(tap.admin, "GET", path, &[], b"");
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(r.json()["error"]["type"], "authentication_error", "{path}");
        let r = request(
            tap.admin,
            "GET",
            path,
            &[("authorization", "Bearer wrong")],
            b"",
        );
        assert_eq!(r.status, 401, "{path}");
        let r = request(tap.admin, "GET", path, &[("authorization", &bearer)], b"");
        assert_eq!(r.status, 200, "{path}");
    }
    // Probes stay open unless protect_health says otherwise (the container's health check
    // uses /healthz too).
    assert_eq!(request(tap.admin, "GET", "/healthz", &[], b"").status, 200);
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_tokentap"))
        .args(["health", "--admin", &tap.admin.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    // The admin listener is on loopback by default.
    let defaults =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/tokentap.toml"))
            .unwrap();
    assert!(defaults.contains("admin_listen = \"127.0.0.1:"));
}

/// Issue 22: `user_mismatch = "overwrite"` works for bodies tokentap cannot read before the
/// head goes upstream (chunked, or longer than Pingora replays): the upstream gets the key's
/// user, the rest of the body as sent.
#[test]
fn overwrite_mode_rewrites_the_user_of_chunked_and_long_bodies() {
    let mock = Mock::start();
    let tap = TapBuilder::new(&mock.url())
        .extra(&format!(
            "{TEST_PRICING}\n[auth]\nmode = \"virtual_keys\"\nuser_mismatch = \"overwrite\"\n"
        ))
        .start();
    let (key, _) = issue(&tap, "dana");
    let bearer = format!("Bearer {key}");
    let long = "x".repeat(100 * 1024);
    for (i, (filler, chunked)) in [("", true), (long.as_str(), false), (long.as_str(), true)]
        .into_iter()
        .enumerate()
    {
        let body = format!(
            r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi{filler}"}}],"user":"mallory"}}"#
        );
        let mut framed = Vec::new();
        let mut h = vec![("authorization", bearer.as_str())];
        if chunked {
            for part in body.as_bytes().chunks(7000) {
                std::io::Write::write_fmt(&mut framed, format_args!("{:x}\r\n", part.len()))
                    .unwrap();
                framed.extend_from_slice(part);
                framed.extend_from_slice(b"\r\n");
            }
            framed.extend_from_slice(b"0\r\n\r\n");
            h.push(("transfer-encoding", "chunked"));
        } else {
            framed = body.clone().into_bytes();
        }
        let r = post_chat(tap.addr, &h, &framed);
        assert_eq!(r.status, 200, "{i}: {}", String::from_utf8_lossy(&r.body));
        let seen = &mock.wait_requests(i + 1)[i];
        assert_eq!(seen["user"], "dana", "{i}: the upstream saw the key's user");
        let want = body.replace(r#""user":"mallory""#, r#""user":"dana""#);
        assert_eq!(seen["body"], want, "{i}: every other byte as sent");
        assert_eq!(tap.wait_records(i + 1)[i]["user"], "dana");
    }
}
