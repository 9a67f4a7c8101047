//! `tokentap-mock`: a mock of the target Chat Completions API, for tests and the README tour.
//!
//! It speaks the target's format: non-streaming `chat.completion` objects with `usage`,
//! `search_results` and `warning`; streams of `search_done`, `content`, `finish` and `usage`
//! chunks followed by `data: [DONE]`. Request headers choose a scenario:
//!
//! | header                  | effect                                                         |
//! |-------------------------|----------------------------------------------------------------|
//! | `x-mock-status: 429`    | answer with that status (any path) and an OpenAI-style error    |
//! |                         | body (none for 204 and 304)                                     |
//! | `x-mock-chunks: N`      | N content chunks (default 5); each is one token of 4 bytes      |
//! | `x-mock-delay-ms: D`    | wait D ms before each chunk, or before any non-streaming answer |
//! | `x-mock-reset-after: K` | reset the connection after K content chunks (mid-body if JSON)  |
//! | `x-mock-encoding: gzip` | compress the answer (`gzip`, `deflate`, `br`); a stream is      |
//! |                         | compressed event by event, flushed after each                   |
//! | `x-mock-crlf: 1`        | end SSE lines with CRLF                                         |
//! | `x-mock-split: 1`       | write every SSE event in three separate small writes            |
//! | `x-mock-split: bytes`   | write a stream one byte at a time                               |
//! | `x-mock-usage: openai`  | stream usage as OpenAI does: only when the request sets         |
//! |                         | `stream_options.include_usage`, then `"usage":null` in every    |
//! |                         | chunk and a usage-only chunk (`"choices":[]`) before `[DONE]`;  |
//! |                         | chunks without `type`. `with-finish`: usage on the finish chunk |
//! |                         | (next to its choice), asked or not. Default: the target API's   |
//! |                         | `type: usage` chunk, always                                     |
//! | `x-mock-refuse-stream-options: 1` | 400 naming `stream_options` when the body has it      |
//! | `x-mock-search-count: none` | searches without `num_search_queries`                       |
//! | `x-mock-search-shape: flat` | `search_results` as a flat list of results (no queries)     |
//! | `x-mock-event-lines: 1` | add `event:` lines (`event: search_done`, ...)                  |
//! | `x-mock-cached: N`      | report N cached prompt tokens                                   |
//! | `x-mock-reasoning: N`   | N reasoning tokens (added to completion tokens; streamed first  |
//! |                         | as `delta.reasoning`, 4 bytes each)                              |
//! | `x-mock-warning: text`  | add a `warning`                                                  |
//!
//! Web search runs when the request offers the `octen_search` (or `octen_broad_search`) tool.
//! The mock's tokenizer: prompt tokens = ceil(bytes of every string in `messages` / 4). Ids
//! are derived from the request body without `stream_options`: the same call, asking for its
//! usage or not, gets the same answer (the "seed").
//!
//! `GET /__mock/received` counts the requests read so far (answered or not);
//! `GET /__mock/requests` lists what it received (method, path, headers, the credential
//! headers by name, body and its SHA-256, the TLS server name and the connection it came on)
//! and what it billed; `POST /__mock/reset` clears
//! that list. `--tls-cert FILE --tls-key FILE` serves HTTPS instead of HTTP, and then also
//! plain HTTP on a second, printed address, for those two control paths.

use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Default)]
struct State {
    log: Mutex<Vec<Value>>,
    seq: AtomicU64,
    conns: AtomicU64,
    /// Requests read in full, before they are answered.
    received: AtomicU64,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One client connection: the (maybe TLS) stream, its socket for resets, and what identifies it.
struct Conn {
    io: BufReader<Pin<Box<dyn Io>>>,
    fd: RawFd,
    id: u64,
    sni: Option<String>,
}

impl Conn {
    fn get_mut(&mut self) -> &mut Pin<Box<dyn Io>> {
        self.io.get_mut()
    }
}

fn tls_acceptor(cert: &str, key: &str) -> tokio_rustls::TlsAcceptor {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap_or_else(|e| panic!("{cert}: {e}"))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{cert}: {e}"));
    let key = PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("certificate and key match");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

const MODELS: &[&str] = &[
    "anthropic/claude-opus-4.8",
    "anthropic/claude-opus-4.6",
    "anthropic/claude-sonnet-4.6",
    "anthropic/claude-haiku-4.5",
    "google/gemini-3.5-flash",
    "google/gemini-3.1-pro-preview",
    "google/gemini-3.1-flash-lite",
    "google/gemini-3-flash-preview",
    "openai/gpt-5.5-pro",
    "openai/gpt-5.5",
    "openai/gpt-5.4",
    "moonshotai/kimi-k2.6",
    "moonshotai/kimi-k2.5",
    "minimax/minimax-m2.5",
    "qwen/qwen3.6-plus",
];

#[tokio::main]
async fn main() {
    let mut listen = "127.0.0.1:8000".to_string();
    let (mut cert, mut key) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().expect("--listen ADDR"),
            "--tls-cert" => cert = Some(args.next().expect("--tls-cert FILE")),
            "--tls-key" => key = Some(args.next().expect("--tls-key FILE")),
            "-h" | "--help" => {
                println!("usage: tokentap-mock [--listen 127.0.0.1:8000] [--tls-cert FILE --tls-key FILE]\nSee the module docs of src/bin/tokentap-mock.rs for the x-mock-* headers.");
                return;
            }
            other => {
                eprintln!("unknown argument {other:?}; try --help");
                std::process::exit(2);
            }
        }
    }
    let listener = TcpListener::bind(&listen)
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {listen}: {e}"));
    let tls = match (cert, key) {
        (Some(c), Some(k)) => Some(tls_acceptor(&c, &k)),
        (None, None) => None,
        _ => panic!("--tls-cert and --tls-key go together"),
    };
    let addr = listener.local_addr().expect("local addr");
    println!("tokentap-mock listening on {addr}");
    let state = Arc::new(State::default());
    if tls.is_some() {
        let control = TcpListener::bind((addr.ip(), 0))
            .await
            .expect("control listener");
        println!(
            "tokentap-mock control on {}",
            control.local_addr().expect("addr")
        );
        tokio::spawn(accept_loop(control, None, Arc::clone(&state)));
    }
    let _ = std::io::stdout().flush();
    accept_loop(listener, tls, state).await;
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let state = Arc::clone(&state);
        let tls = tls.clone();
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            let fd = sock.as_raw_fd();
            let id = state.conns.fetch_add(1, Ordering::Relaxed);
            let (io, sni): (Pin<Box<dyn Io>>, _) = match tls {
                None => (Box::pin(sock), None),
                Some(acceptor) => match acceptor.accept(sock).await {
                    Ok(s) => {
                        let sni = s.get_ref().1.server_name().map(str::to_string);
                        (Box::pin(s), sni)
                    }
                    Err(_) => return,
                },
            };
            let conn = Conn {
                io: BufReader::with_capacity(64 * 1024, io),
                fd,
                id,
                sni,
            };
            let _ = serve_conn(conn, state).await;
        });
    }
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    /// The body, inflated when it came gzip-compressed (as an API behind a gateway reads it).
    fn inflated(&self) -> std::borrow::Cow<'_, [u8]> {
        if self
            .header("content-encoding")
            .is_some_and(|e| e.eq_ignore_ascii_case("gzip"))
        {
            use std::io::Read;
            let mut out = Vec::new();
            let _ = flate2::read::GzDecoder::new(&self.body[..]).read_to_end(&mut out);
            std::borrow::Cow::Owned(out)
        } else {
            std::borrow::Cow::Borrowed(&self.body)
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn num(&self, name: &str) -> Option<u64> {
        self.header(name).and_then(|v| v.trim().parse().ok())
    }
}

async fn serve_conn(mut conn: Conn, state: Arc<State>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(8192);
    loop {
        let Some(req) = read_request(&mut conn, &mut buf).await? else {
            return Ok(());
        };
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let keep = handle(&mut conn, req, &state).await?;
        if close || !keep {
            conn.get_mut().shutdown().await.ok();
            return Ok(());
        }
    }
}

/// Reads one request; `None` at a clean end of the connection.
async fn read_request(conn: &mut Conn, buf: &mut Vec<u8>) -> std::io::Result<Option<Request>> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(n) = req
            .parse(buf)
            .map_err(|e| std::io::Error::other(e.to_string()))?
        {
            let method = req.method.unwrap_or("").to_string();
            let path = req.path.unwrap_or("").to_string();
            let headers: Vec<(String, String)> = req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            buf.drain(..n);
            let mut r = Request {
                method,
                path,
                headers,
                body: Vec::new(),
            };
            if r.header("expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
            {
                conn.get_mut()
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .await?;
            }
            let chunked = r
                .header("transfer-encoding")
                .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
            if chunked {
                r.body = read_chunked(conn, buf).await?;
            } else if let Some(len) = r.num("content-length") {
                let len = len as usize;
                while buf.len() < len {
                    if fill(conn, buf).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
                r.body = buf.drain(..len).collect();
            }
            return Ok(Some(r));
        }
        if fill(conn, buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

async fn fill(conn: &mut Conn, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut tmp = [0u8; 65536];
    let n = conn.io.read(&mut tmp).await?;
    buf.extend_from_slice(&tmp[..n]);
    Ok(n)
}

async fn read_chunked(conn: &mut Conn, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if fill(conn, buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        };
        let size_str = String::from_utf8_lossy(&buf[..line_end]).to_string();
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| std::io::Error::other("bad chunk size"))?;
        buf.drain(..line_end + 2);
        while buf.len() < size + 2 {
            if fill(conn, buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
        if size == 0 {
            return Ok(body);
        }
    }
}

/// Handles one request; returns whether the connection may be kept.
async fn handle(conn: &mut Conn, req: Request, state: &State) -> std::io::Result<bool> {
    let path = req.path.split('?').next().unwrap_or("").to_string();
    if !path.starts_with("/__mock/") {
        state.received.fetch_add(1, Ordering::Relaxed);
    }
    let is_chat = req.method == "POST"
        && matches!(path.as_str(), "/v1/chat/completions" | "/chat/completions");
    if !is_chat && !path.starts_with("/__mock/") {
        if let Some(ms) = req.num("x-mock-delay-ms") {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if let Some(status) = req.num("x-mock-status") {
            return status_answer(conn, &req, state, status as u16).await;
        }
    }
    match (req.method.as_str(), path.as_str()) {
        ("GET", "/__mock/received") => {
            let n = state.received.load(Ordering::Relaxed).to_string();
            respond(conn, 200, "application/json", &[], n.as_bytes()).await?;
            Ok(true)
        }
        ("GET", "/__mock/requests") => {
            let body = serde_json::to_vec(&*state.log.lock().unwrap()).unwrap();
            respond(conn, 200, "application/json", &[], &body).await?;
            Ok(true)
        }
        ("POST", "/__mock/reset") => {
            state.log.lock().unwrap().clear();
            respond(conn, 200, "application/json", &[], b"{}").await?;
            Ok(true)
        }
        ("POST", "/v1/chat/completions") | ("POST", "/chat/completions") => {
            chat(conn, req, state).await
        }
        ("GET" | "HEAD", "/v1/models") | ("GET" | "HEAD", "/models") => {
            let data: Vec<Value> = MODELS
                .iter()
                .map(|m| json!({"id": m, "object": "model", "created": 1764000000, "owned_by": m.split('/').next()}))
                .collect();
            let body = serde_json::to_vec(&json!({"object": "list", "data": data})).unwrap();
            if req.method == "HEAD" {
                respond_head(conn, 200, "application/json", body.len()).await?;
                log_request(state, conn, &req, json!(null), "complete", b"");
            } else {
                respond(conn, 200, "application/json", &[], &body).await?;
                log_request(state, conn, &req, json!(null), "complete", &body);
            }
            Ok(true)
        }
        _ if req.method == "HEAD" => {
            respond_head(conn, 404, "application/json", 0).await?;
            log_request(state, conn, &req, json!(null), "not_found", b"");
            Ok(true)
        }
        _ => {
            let body = error_body(404, "Model or resource not found");
            respond(conn, 404, "application/json", &[], &body).await?;
            log_request(state, conn, &req, json!(null), "not_found", &body);
            Ok(true)
        }
    }
}

fn log_request(
    state: &State,
    conn: &Conn,
    req: &Request,
    billed: Value,
    outcome: &str,
    response: &[u8],
) {
    let seq = state.seq.fetch_add(1, Ordering::Relaxed);
    let headers: serde_json::Map<String, Value> = req
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let user = serde_json::from_slice::<Value>(&req.inflated())
        .ok()
        .and_then(|v| v.get("user").cloned())
        .unwrap_or(Value::Null);
    let credentials: Vec<&str> = [
        "authorization",
        "x-api-key",
        "api-key",
        "proxy-authorization",
    ]
    .into_iter()
    .filter(|h| req.header(h).is_some())
    .collect();
    state.log.lock().unwrap().push(json!({
        "seq": seq,
        "method": req.method,
        "path": req.path,
        "headers": headers,
        "credentials": credentials,
        "body": String::from_utf8_lossy(&req.body),
        "body_len": req.body.len(),
        "body_sha256": hex(&Sha256::digest(&req.body)),
        "user": user,
        "billed": billed,
        "outcome": outcome,
        "response_len": response.len(),
        "response_sha256": hex(&Sha256::digest(response)),
        "response_hex": hex(response),
        "conn": conn.id,
        "sni": conn.sni,
    }));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The answer to `x-mock-status` on a non-chat path.
async fn status_answer(
    conn: &mut Conn,
    req: &Request,
    state: &State,
    status: u16,
) -> std::io::Result<bool> {
    if matches!(status, 204 | 304) || req.method == "HEAD" {
        let head = format!("HTTP/1.1 {status} {}\r\n\r\n", reason(status));
        let s = conn.get_mut();
        s.write_all(head.as_bytes()).await?;
        s.flush().await?;
        log_request(state, conn, req, json!(null), "complete", b"");
    } else {
        let body = error_body(status, "Mock status");
        respond(conn, status, "application/json", &[], &body).await?;
        log_request(state, conn, req, json!(null), "error", &body);
    }
    Ok(true)
}

/// A response head announcing `len` bytes that are not sent (the answer to HEAD).
async fn respond_head(
    conn: &mut Conn,
    status: u16,
    ctype: &str,
    len: usize,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {ctype}\r\ncontent-length: {len}\r\n\r\n",
        reason(status)
    );
    let s = conn.get_mut();
    s.write_all(head.as_bytes()).await?;
    s.flush().await
}

fn error_body(status: u16, message: &str) -> Vec<u8> {
    let kind = match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        _ => "api_error",
    };
    serde_json::to_vec(
        &json!({"error": {"message": message, "type": kind, "param": null, "code": null}}),
    )
    .unwrap()
}

async fn respond(
    conn: &mut Conn,
    status: u16,
    ctype: &str,
    extra: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n",
        reason(status),
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let s = conn.get_mut();
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.flush().await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Bytes of every string in `messages`: the mock tokenizer's input.
fn text_bytes(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.len() as u64,
        Value::Array(a) => a.iter().map(text_bytes).sum(),
        Value::Object(o) => o.values().map(text_bytes).sum(),
        _ => 0,
    }
}

struct Plan {
    id: String,
    model: String,
    created: u64,
    chunks: u64,
    delay: Duration,
    reset_after: Option<u64>,
    prompt: u64,
    cached: u64,
    reasoning: u64,
    search: bool,
    warning: Option<String>,
    nl: &'static str,
    split: Split,
    event_lines: bool,
    usage_style: UsageStyle,
    /// `stream_options.include_usage` was true.
    usage_asked: bool,
    search_counted: bool,
    search_flat: bool,
    encoding: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Split {
    No,
    Thirds,
    Bytes,
}

/// How a stream reports its usage.
#[derive(Clone, Copy, PartialEq, Eq)]
enum UsageStyle {
    /// The target API: a `type: usage` chunk, always.
    Target,
    /// OpenAI: only when asked; `"usage":null` in the other chunks.
    OpenAi,
    /// On the finish chunk, next to its choice, always (DeepSeek-like).
    WithFinish,
}

impl Plan {
    fn usage(&self, completed_chunks: u64) -> Value {
        let completion = completed_chunks + self.reasoning;
        let mut u = json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": completion,
            "total_tokens": self.prompt + completion,
        });
        if self.cached > 0 {
            u["prompt_tokens_details"] = json!({"cached_tokens": self.cached});
        }
        if self.reasoning > 0 {
            u["completion_tokens_details"] = json!({"reasoning_tokens": self.reasoning});
        }
        if self.search && self.search_counted {
            u["num_search_queries"] = json!(2);
        }
        u
    }

    fn billed(&self, completed_chunks: u64) -> Value {
        json!({
            "prompt": self.prompt,
            "completion": completed_chunks + self.reasoning,
            "cached": self.cached,
            "reasoning": self.reasoning,
            "web_searches": if self.search { 2 } else { 0 },
        })
    }

    fn search_results(&self) -> Value {
        if self.search_flat {
            return json!([
                {"title": "Mock result A", "url": "https://example.com/a"},
                {"title": "Mock result B", "url": "https://example.com/b"}
            ]);
        }
        json!([
            {"query": "mock query one", "results": [
                {"title": "Mock result A", "url": "https://example.com/a", "highlights": "alpha", "authors": "example.com"},
                {"title": "Mock result B", "url": "https://example.com/b", "highlights": "beta", "authors": "example.com"}
            ]},
            {"query": "mock query two", "results": [
                {"title": "Mock result C", "url": "https://example.com/c", "highlights": "gamma", "authors": "example.com"}
            ]}
        ])
    }

    fn word(i: u64) -> String {
        format!("w{:02} ", i % 100)
    }
}

async fn chat(conn: &mut Conn, req: Request, state: &State) -> std::io::Result<bool> {
    if let Some(status) = req.num("x-mock-status") {
        let status = status as u16;
        let msg = match status {
            429 => "Exceeding the rate limit",
            500 => "Internal error",
            _ => "Mock error",
        };
        let extra: Vec<(&str, String)> = if status == 429 {
            vec![("retry-after", "7".into())]
        } else {
            vec![]
        };
        let body = error_body(status, msg);
        respond(conn, status, "application/json", &extra, &body).await?;
        log_request(state, conn, &req, json!(null), "error", &body);
        return Ok(true);
    }
    let body: Value = match serde_json::from_slice(&req.inflated()) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            let b = error_body(400, "Missing or invalid parameter");
            respond(conn, 400, "application/json", &[], &b).await?;
            log_request(state, conn, &req, json!(null), "error", &b);
            return Ok(true);
        }
    };
    let search = body["tools"].as_array().is_some_and(|t| {
        t.iter().any(|t| {
            matches!(
                t["type"].as_str(),
                Some("octen_search") | Some("octen_broad_search")
            )
        })
    });
    if req.header("x-mock-refuse-stream-options").is_some() && body.get("stream_options").is_some()
    {
        let b = serde_json::to_vec(&json!({"error": {
            "message": "Unrecognized request argument supplied: stream_options",
            "type": "invalid_request_error", "param": "stream_options", "code": null}}))
        .unwrap();
        respond(conn, 400, "application/json", &[], &b).await?;
        log_request(state, conn, &req, json!(null), "error", &b);
        return Ok(true);
    }
    let prompt = text_bytes(&body["messages"]).div_ceil(4);
    let usage_asked = body["stream_options"]["include_usage"].as_bool() == Some(true);
    // Deterministic ids: the same request gets the same answer, directly or through a proxy,
    // asking for its usage or not (the seed leaves `stream_options` out).
    let mut seed = body.clone();
    if let Value::Object(m) = &mut seed {
        m.remove("stream_options");
    }
    let digest = Sha256::digest(serde_json::to_vec(&seed).unwrap());
    let plan = Plan {
        id: format!("gen-mock-{}", hex(&digest[..8])),
        model: body["model"].as_str().unwrap_or("mock/model").to_string(),
        created: 1_764_000_000,
        chunks: req.num("x-mock-chunks").unwrap_or(5),
        delay: Duration::from_millis(req.num("x-mock-delay-ms").unwrap_or(0)),
        reset_after: req.num("x-mock-reset-after"),
        prompt,
        cached: req.num("x-mock-cached").unwrap_or(0).min(prompt),
        reasoning: req.num("x-mock-reasoning").unwrap_or(0),
        search,
        warning: req.header("x-mock-warning").map(str::to_string),
        nl: if req.header("x-mock-crlf").is_some() {
            "\r\n"
        } else {
            "\n"
        },
        split: match req.header("x-mock-split") {
            None => Split::No,
            Some("bytes") => Split::Bytes,
            Some(_) => Split::Thirds,
        },
        event_lines: req.header("x-mock-event-lines").is_some(),
        usage_style: match req.header("x-mock-usage") {
            Some("openai") => UsageStyle::OpenAi,
            Some("with-finish") => UsageStyle::WithFinish,
            _ => UsageStyle::Target,
        },
        usage_asked,
        search_counted: req.header("x-mock-search-count") != Some("none"),
        search_flat: req.header("x-mock-search-shape") == Some("flat"),
        encoding: req.header("x-mock-encoding").map(str::to_string),
    };
    if body["stream"].as_bool() == Some(true) {
        stream(conn, &req, &plan, state).await
    } else {
        non_stream(conn, &req, &plan, state).await
    }
}

async fn non_stream(
    conn: &mut Conn,
    req: &Request,
    plan: &Plan,
    state: &State,
) -> std::io::Result<bool> {
    if !plan.delay.is_zero() {
        tokio::time::sleep(plan.delay).await;
    }
    let content: String = (0..plan.chunks).map(Plan::word).collect();
    let mut v = json!({
        "id": plan.id,
        "object": "chat.completion",
        "created": plan.created,
        "model": plan.model,
        "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": content, "refusal": null, "reasoning": null}}],
        "usage": plan.usage(plan.chunks),
    });
    if plan.search {
        v["search_results"] = plan.search_results();
    }
    if let Some(w) = &plan.warning {
        v["warning"] = json!(w);
    }
    let raw = serde_json::to_vec(&v).unwrap();
    let (body, enc) = match req.header("x-mock-encoding") {
        Some("gzip") => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&raw)?;
            (e.finish()?, Some("gzip"))
        }
        Some("deflate") => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&raw)?;
            (e.finish()?, Some("deflate"))
        }
        Some("br") => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                w.write_all(&raw)?;
            }
            (out, Some("br"))
        }
        _ => (raw, None),
    };
    let extra: Vec<(&str, String)> = enc
        .map(|e| vec![("content-encoding", e.to_string())])
        .unwrap_or_default();
    if plan.reset_after.is_some() {
        // Headers and half the body, then a reset.
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let half = &body[..body.len() / 2];
        let s = conn.get_mut();
        s.write_all(head.as_bytes()).await?;
        s.write_all(half).await?;
        s.flush().await?;
        log_request(state, conn, req, plan.billed(plan.chunks), "reset", half);
        reset(conn).await;
        return Ok(false);
    }
    respond(conn, 200, "application/json", &extra, &body).await?;
    log_request(
        state,
        conn,
        req,
        plan.billed(plan.chunks),
        "complete",
        &body,
    );
    Ok(true)
}

/// Aborts the connection with a TCP RST (the socket is closed when the connection drops),
/// a moment after the last write: an RST can make the peer drop data it has not read yet, and
/// the mock bills what it sent.
async fn reset(conn: &mut Conn) {
    tokio::time::sleep(Duration::from_millis(30)).await;
    // SAFETY: the fd belongs to this connection's socket, which is still open here.
    let fd = unsafe { BorrowedFd::borrow_raw(conn.fd) };
    let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
}

fn event(plan: &Plan, name: Option<&str>, data: &str) -> String {
    let nl = plan.nl;
    let mut s = String::new();
    if let (true, Some(n)) = (plan.event_lines, name) {
        s.push_str(&format!("event: {n}{nl}"));
    }
    s.push_str(&format!("data: {data}{nl}{nl}"));
    s
}

/// A stream's body as it goes out: each payload (an event) compressed and flushed when the
/// stream is compressed, then written as HTTP chunks (split as the plan says). `sent` is what
/// went on the wire (compressed bytes, when compressed).
struct Body {
    enc: Option<Encoder>,
    sent: Vec<u8>,
}

enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Zlib(flate2::write::ZlibEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
}

impl Encoder {
    fn new(name: Option<&str>) -> Option<Self> {
        let level = flate2::Compression::default();
        Some(match name? {
            "gzip" => Encoder::Gzip(flate2::write::GzEncoder::new(Vec::new(), level)),
            "deflate" => Encoder::Zlib(flate2::write::ZlibEncoder::new(Vec::new(), level)),
            "br" => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                5,
                22,
            ))),
            _ => return None,
        })
    }

    /// Compresses and flushes one event: the bytes to send now.
    fn event(&mut self, b: &[u8]) -> Vec<u8> {
        let _ = match self {
            Encoder::Gzip(e) => e.write_all(b).and_then(|()| e.flush()),
            Encoder::Zlib(e) => e.write_all(b).and_then(|()| e.flush()),
            Encoder::Brotli(e) => e.write_all(b).and_then(|()| e.flush()),
        };
        match self {
            Encoder::Gzip(e) => std::mem::take(e.get_mut()),
            Encoder::Zlib(e) => std::mem::take(e.get_mut()),
            Encoder::Brotli(e) => std::mem::take(e.get_mut()),
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            Encoder::Gzip(e) => e.finish().unwrap_or_default(),
            Encoder::Zlib(e) => e.finish().unwrap_or_default(),
            Encoder::Brotli(e) => e.into_inner(),
        }
    }
}

impl Body {
    async fn event(&mut self, conn: &mut Conn, plan: &Plan, payload: &str) -> std::io::Result<()> {
        let bytes = match &mut self.enc {
            Some(e) => e.event(payload.as_bytes()),
            None => payload.as_bytes().to_vec(),
        };
        self.write(conn, plan, &bytes).await
    }

    async fn write(&mut self, conn: &mut Conn, plan: &Plan, bytes: &[u8]) -> std::io::Result<()> {
        let s = conn.get_mut();
        let parts: Vec<&[u8]> = match plan.split {
            // Cut inside the payload, including (for non-ASCII content) inside a character.
            Split::Thirds if bytes.len() >= 3 => {
                let a = bytes.len() / 3;
                let b = 2 * bytes.len() / 3;
                vec![&bytes[..a], &bytes[a..b], &bytes[b..]]
            }
            Split::Bytes => bytes.chunks(1).collect(),
            _ => vec![bytes],
        };
        for p in parts {
            s.write_all(format!("{:x}\r\n", p.len()).as_bytes()).await?;
            s.write_all(p).await?;
            s.write_all(b"\r\n").await?;
            s.flush().await?;
            self.sent.extend_from_slice(p);
            if plan.split == Split::Thirds {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        Ok(())
    }

    /// The last bytes of a compressed stream, and the end of the chunked body.
    async fn end(&mut self, conn: &mut Conn, plan: &Plan) -> std::io::Result<()> {
        if let Some(e) = self.enc.take() {
            let rest = e.finish();
            if !rest.is_empty() {
                self.write(conn, plan, &rest).await?;
            }
        }
        let s = conn.get_mut();
        s.write_all(b"0\r\n\r\n").await?;
        s.flush().await
    }
}

async fn stream(
    conn: &mut Conn,
    req: &Request,
    plan: &Plan,
    state: &State,
) -> std::io::Result<bool> {
    let enc = Encoder::new(plan.encoding.as_deref());
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n{}transfer-encoding: chunked\r\n\r\n",
        match (&enc, plan.encoding.as_deref()) {
            (Some(_), Some(e)) => format!("content-encoding: {e}\r\n"),
            _ => String::new(),
        }
    );
    conn.get_mut().write_all(head.as_bytes()).await?;
    let openai = plan.usage_style == UsageStyle::OpenAi;
    // OpenAI's chunks carry no `type`, and `"usage": null` when usage was asked for.
    let null_usage = openai && plan.usage_asked;
    let chunk = |kind: &str, extra: Value| {
        let mut v = if openai {
            json!({"id": plan.id, "object": "chat.completion.chunk", "created": plan.created,
                "model": plan.model})
        } else {
            json!({"type": kind, "id": plan.id, "object": "chat.completion.chunk",
                "created": plan.created, "model": plan.model})
        };
        if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
            m.extend(e);
        }
        if null_usage && v.get("usage").is_none() {
            v["usage"] = Value::Null;
        }
        serde_json::to_string(&v).unwrap()
    };
    let mut body = Body {
        enc,
        sent: Vec::new(),
    };
    let result: std::io::Result<()> = async {
        body.event(conn, plan, &format!(": mock stream{}{}", plan.nl, plan.nl))
            .await?;
        if plan.search {
            let data = chunk(
                "search_done",
                json!({"search_results": plan.search_results()}),
            );
            body.event(conn, plan, &event(plan, Some("search_done"), &data))
                .await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        log_request(state, conn, req, plan.billed(0), "client_gone", &body.sent);
        return Err(e);
    }
    // Reasoning is streamed first, as `delta.reasoning` (4 bytes per token, like content).
    if plan.reasoning > 0 {
        let text: String = (0..plan.reasoning)
            .map(|i| format!("r{:02} ", i % 100))
            .collect();
        let data = chunk(
            "content",
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "reasoning": text}, "finish_reason": null}]}),
        );
        if let Err(e) = body.event(conn, plan, &event(plan, None, &data)).await {
            log_request(state, conn, req, plan.billed(0), "client_gone", &body.sent);
            return Err(e);
        }
    }
    let mut sent = 0;
    for i in 0..plan.chunks {
        if plan.reset_after == Some(sent) {
            log_request(state, conn, req, plan.billed(sent), "reset", &body.sent);
            reset(conn).await;
            return Ok(false);
        }
        if !plan.delay.is_zero() {
            tokio::time::sleep(plan.delay).await;
        }
        let mut delta = json!({"content": Plan::word(i)});
        if i == 0 {
            delta["role"] = json!("assistant");
        }
        let data = chunk(
            "content",
            json!({"choices": [{"index": 0, "delta": delta, "finish_reason": null}]}),
        );
        if let Err(e) = body.event(conn, plan, &event(plan, None, &data)).await {
            // The client (tokentap) went away: bill what was generated and delivered.
            log_request(
                state,
                conn,
                req,
                plan.billed(sent),
                "client_gone",
                &body.sent,
            );
            return Err(e);
        }
        sent += 1;
    }
    if plan.reset_after.is_some_and(|k| k >= sent) {
        log_request(state, conn, req, plan.billed(sent), "reset", &body.sent);
        reset(conn).await;
        return Ok(false);
    }
    let mut fin = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
    if let Some(w) = &plan.warning {
        fin["warning"] = json!(w);
    }
    if plan.usage_style == UsageStyle::WithFinish {
        fin["usage"] = plan.usage(sent);
    }
    let mut tail = vec![event(plan, None, &chunk("finish", fin))];
    match plan.usage_style {
        UsageStyle::Target => {
            tail.push(event(
                plan,
                None,
                &chunk("usage", json!({"usage": plan.usage(sent)})),
            ));
        }
        UsageStyle::OpenAi if plan.usage_asked => {
            tail.push(event(
                plan,
                None,
                &chunk("usage", json!({"choices": [], "usage": plan.usage(sent)})),
            ));
        }
        _ => {}
    }
    tail.push(event(plan, None, "[DONE]"));
    let mut r = Ok(());
    for ev in &tail {
        r = body.event(conn, plan, ev).await;
        if r.is_err() {
            break;
        }
    }
    if r.is_ok() {
        r = body.end(conn, plan).await;
    }
    let outcome = if r.is_ok() { "complete" } else { "client_gone" };
    log_request(state, conn, req, plan.billed(sent), outcome, &body.sent);
    r.map(|()| true)
}
