//! Trust boundaries against the real binary: a table of bad inputs, each with its defined
//! answer (none crashing, none reaching the upstream when refused, none bypassing a cap),
//! and every limit hit with its status and error body.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

const MODEL: &str = "anthropic/claude-opus-4.6";

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

struct Row {
    name: &'static str,
    body: Vec<u8>,
    headers: Vec<(&'static str, &'static str)>,
    status: u16,
    /// The error's code, for refusals.
    code: Option<&'static str>,
    param: Option<&'static str>,
    /// Who is charged, for calls that go through.
    charged: Option<String>,
}

fn ok(name: &'static str, body: Vec<u8>, charged: &str) -> Row {
    Row {
        name,
        body,
        headers: vec![],
        status: 200,
        code: None,
        param: None,
        charged: Some(charged.into()),
    }
}

fn refused(
    name: &'static str,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    param: Option<&'static str>,
) -> Row {
    Row {
        name,
        body,
        headers: vec![],
        status,
        code: Some(code),
        param,
        charged: None,
    }
}

fn body(fields: &str) -> Vec<u8> {
    format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}]{fields}}}"#)
        .into_bytes()
}

#[test]
fn bad_inputs_get_defined_answers_and_never_bypass_a_cap() {
    let mock = Mock::start();
    let tap = Tap::start(
        &mock.url(),
        &format!("{TEST_PRICING}\n[budgets.default]\ndaily = {{ usd = 1 }}\n"),
    );
    let long_user = "u".repeat(10_000);
    let mut truncated = body(r#","user":"t""#);
    truncated.truncate(truncated.len() - 7);
    let mut bad_utf8 = body(r#","user":"x""#);
    let at = bad_utf8.len() - 3;
    bad_utf8[at] = 0xff;
    let mut gz = ok(
        "gzip-compressed body",
        gzip(&body(r#","user":"zipped""#)),
        "zipped",
    );
    gz.headers.push(("content-encoding", "gzip"));
    let utf16: Vec<u8> = String::from_utf8(body(r#","user":"a""#))
        .unwrap()
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let mut bom = b"\xef\xbb\xbf".to_vec();
    bom.extend(body(r#","user":"a""#));
    let mut zstd = refused(
        "zstd body",
        body(r#","user":"a""#),
        400,
        "invalid_body",
        None,
    );
    zstd.headers.push(("content-encoding", "zstd"));
    let rows = vec![
        refused(
            "malformed JSON",
            b"{\"model\": \"m\", ".to_vec(),
            400,
            "invalid_body",
            None,
        ),
        refused(
            "not an object",
            b"[1, 2, 3]".to_vec(),
            400,
            "invalid_body",
            None,
        ),
        refused("empty body", Vec::new(), 400, "invalid_body", None),
        refused(
            "user is a number",
            body(r#","user":123"#),
            400,
            "invalid_type",
            Some("user"),
        ),
        refused(
            "stream is a string",
            body(r#","user":"a","stream":"yes""#),
            400,
            "invalid_type",
            Some("stream"),
        ),
        refused(
            "max_tokens is huge as a float",
            body(r#","user":"a","max_tokens":1e30"#),
            400,
            "invalid_type",
            Some("max_tokens"),
        ),
        refused(
            "max_tokens is negative",
            body(r#","user":"a","max_tokens":-5"#),
            400,
            "invalid_type",
            Some("max_tokens"),
        ),
        // Fits in 64 bits: a worst case far past any cap.
        refused(
            "absurd max_tokens",
            body(r#","user":"a","max_tokens":18000000000000000000"#),
            429,
            "budget_exceeded",
            None,
        ),
        refused(
            "n is a string",
            body(r#","user":"a","n":"5""#),
            400,
            "invalid_type",
            Some("n"),
        ),
        refused(
            "CRLF in user",
            body(r#","user":"a\r\nX-Injected: 1""#),
            400,
            "invalid_user",
            Some("user"),
        ),
        refused(
            "control character in user",
            body(r#","user":"a\u0007b""#),
            400,
            "invalid_user",
            Some("user"),
        ),
        refused(
            "10,000-character user",
            body(&format!(r#","user":"{long_user}""#)),
            400,
            "invalid_user",
            Some("user"),
        ),
        refused("no user", body(""), 400, "user_required", Some("user")),
        refused(
            "empty user",
            body(r#","user":"""#),
            400,
            "user_required",
            Some("user"),
        ),
        refused("truncated body", truncated, 400, "invalid_body", None),
        refused("invalid UTF-8", bad_utf8, 400, "invalid_body", None),
        ok("unicode user", body(r#","user":"ünï-😀""#), "ünï-😀"),
        // Parsers disagree on duplicates (first or last wins) and some match keys without
        // regard to case: a body that can be read two ways is refused.
        refused(
            "duplicate user keys",
            body(r#","user":"first","user":"second""#),
            400,
            "ambiguous_field",
            None,
        ),
        refused(
            "case-variant max_tokens",
            body(r#","user":"a","max_tokens":1,"MAX_TOKENS":100000"#),
            400,
            "ambiguous_field",
            None,
        ),
        refused(
            "long-s stream",
            body(r#","user":"a","ſtream":true"#),
            400,
            "ambiguous_field",
            None,
        ),
        refused("UTF-16 body", utf16, 400, "invalid_body", None),
        refused("byte-order mark", bom, 400, "invalid_body", None),
        refused(
            "NaN",
            body(r#","user":"a","temperature":NaN"#),
            400,
            "invalid_body",
            None,
        ),
        zstd,
        gz,
    ];
    let mut forwarded = 0;
    for (i, row) in rows.iter().enumerate() {
        let r = post_chat(tap.addr, &row.headers, &row.body);
        assert_eq!(
            r.status,
            row.status,
            "{}: {}",
            row.name,
            String::from_utf8_lossy(&r.body)
        );
        if let Some(code) = row.code {
            let e = r.json();
            assert_eq!(e["error"]["code"], code, "{}: {e}", row.name);
            assert!(e["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
            assert!(e["error"]["type"].is_string(), "{}", row.name);
            match row.param {
                Some(p) => assert_eq!(e["error"]["param"], p, "{}", row.name),
                None => assert!(e["error"]["param"].is_null(), "{}", row.name),
            }
        } else {
            forwarded += 1;
        }
        // Refused calls never reach the upstream.
        assert_eq!(mock.received(), forwarded, "{}", row.name);
        let recs = tap.wait_records(i + 1);
        let rec = &recs[i];
        match &row.charged {
            Some(user) => {
                assert_eq!(rec["user"], user.as_str(), "{}", row.name);
                assert!(pico_of(rec) > 0, "{}", row.name);
                // The upstream saw the same user tokentap charged.
                let seen = mock.wait_requests(forwarded as usize);
                assert_eq!(seen.last().unwrap()["user"], user.as_str(), "{}", row.name);
            }
            None => assert!(
                rec["cost_usd"].is_null() || pico_of(rec) == 0,
                "{}: {rec}",
                row.name
            ),
        }
    }
    // tokentap is still there.
    let r = post_chat(tap.addr, &[], &body(r#","user":"a""#));
    assert_eq!(r.status, 200);
}

#[test]
fn each_limit_answers_with_its_status_and_error() {
    let mock = Mock::start();
    let tap = TapBuilder::new(&mock.url())
        .extra(&format!(
            "{TEST_PRICING}\n[limits]\nmax_request_body_bytes = 10000\nmax_header_bytes = 4096\nmax_streams_per_user = 1\nrequest_deadline_ms = 1000\nclient_idle_timeout_ms = 500\n"
        ))
        .start();
    let chat = |user: &str, stream: bool| chat_body(MODEL, user, stream, "");
    let post = |h: &[(&str, &str)], body: &[u8]| post_chat(tap.addr, h, body);

    // Body size: 413.
    let big = body(&format!(r#","user":"a","pad":"{}""#, "x".repeat(20_000)));
    let r = post(&[], &big);
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "request_too_large");

    // Header size: 431.
    let huge = "h".repeat(8000);
    let r = post(&[("x-big", &huge)], &chat("a", false));
    assert_eq!(r.status, 431);
    assert_eq!(r.json()["error"]["code"], "request_header_too_large");

    // Overall deadline, before the answer: 504.
    let r = post(&[("x-mock-delay-ms", "3000")], &chat("a", false));
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"]["code"], "deadline_exceeded");
    // ... and during a stream: cut.
    let r = post(
        &[("x-mock-chunks", "40"), ("x-mock-delay-ms", "100")],
        &chat("a", true),
    );
    assert_eq!(r.status, 200);
    assert!(!r.complete, "a stream past the deadline is cut");

    // Concurrent streams per user: 429 for the second of alice's, not for bob's.
    let mut first = TcpStream::connect(tap.addr).unwrap();
    first.set_read_timeout(Some(PATIENCE)).unwrap();
    send_chat(
        &mut first,
        &[("x-mock-chunks", "8"), ("x-mock-delay-ms", "100")],
        &chat("alice", true),
    );
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(9).any(|w| w == b"\"content\"") {
        let n = first.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let r = post(&[], &chat("alice", true));
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "too_many_streams");
    let r = post(&[], &chat("bob", true));
    assert_eq!(r.status, 200);
    // Non-streamed calls are not streams.
    let r = post(&[], &chat("alice", false));
    assert_eq!(r.status, 200);
    let mut rest = Vec::new();
    let _ = first.read_to_end(&mut rest);
    drop(first);
    // Once alice's stream is over, she may open another.
    let start = std::time::Instant::now();
    loop {
        let r = post(&[], &chat("alice", true));
        if r.status == 200 {
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "alice's stream count never went down"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A client that goes quiet mid-body: 408, and its connection is closed.
    let before = mock.received();
    let mut s = TcpStream::connect(tap.addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":",
    )
    .unwrap();
    let r = read_response(&mut s, usize::MAX);
    assert_eq!(r.status, 408);
    assert_eq!(r.json()["error"]["code"], "client_timeout");
    assert_eq!(
        mock.received(),
        before,
        "the quiet client's request never went upstream"
    );
}

#[test]
fn an_upstream_that_never_accepts_the_connection_gets_504() {
    use socket2::{Domain, Socket, Type};
    // A listener whose accept queue is full and never drained: new connections hang in SYN.
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let _fillers: Vec<TcpStream> = (0..8)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
        .collect();
    let tap = Tap::start(&format!("http://{addr}"), TEST_PRICING);
    let r = post_chat(tap.addr, &[], &chat_body(MODEL, "a", false, ""));
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    let rec = &tap.wait_records(1)[0];
    assert_eq!(rec["outcome"], "timeout");
}
