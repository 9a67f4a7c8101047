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
//! Other dialects, streamed (`"stream": true`) or not, in the real APIs' shapes:
//!
//! | path                                      | dialect (input the tokenizer reads)              |
//! |-------------------------------------------|--------------------------------------------------|
//! | `POST /v1/responses`, `/responses`         | OpenAI Responses (`input` + `instructions`); SSE |
//! |                                           | `event:`+`data:` lines with `sequence_number`,   |
//! |                                           | no `[DONE]`                                      |
//! | `POST /v1/messages`, `/messages`           | Anthropic Messages (`messages` + `system`); 400  |
//! |                                           | without `anthropic-version`; Anthropic's errors  |
//! | `POST /v1/messages/count_tokens`, `/messages/count_tokens` | `{"input_tokens": N}`, bills nothing |
//! | `POST /v1/embeddings`, `/embeddings`       | embeddings (`input`: strings, or token ids that  |
//! |                                           | count one each); never streamed                  |
//! | `POST /v1/completions`, `/completions`     | legacy completions (`prompt`); `x-mock-usage` as |
//! |                                           | for chat (default: a usage chunk, always)        |
//!
//! They take `x-mock-status` (OpenAI's error shape, Anthropic's on `/v1/messages`: `type`
//! `invalid_request_error`, `authentication_error`, `permission_error`, `not_found_error`,
//! `rate_limit_error` with `retry-after`, `api_error`, `overloaded_error` for 529, and a
//! `request-id` header), `x-mock-chunks`, `x-mock-delay-ms`, `x-mock-reset-after` (after K text
//! deltas; mid-body for JSON), `x-mock-encoding`, `x-mock-crlf`, `x-mock-split`, `x-mock-cached`
//! and `x-mock-reasoning` (Responses: a `reasoning` item; Messages: a `thinking` block streamed
//! as `thinking_delta`s of 4 bytes, before the text), and these:
//!
//! | header                     | effect                                                      |
//! |----------------------------|-------------------------------------------------------------|
//! | `x-mock-searches: N`       | N web searches (default 1; 0: offered, never ran) when the  |
//! |                            | request offers `web_search`/`web_search_preview`/`web_search_2025_08_26` |
//! |                            | (Responses: `web_search_call` items) or a `web_search_*`    |
//! |                            | tool (Messages: `server_tool_use` + `web_search_tool_result`|
//! |                            | blocks, `usage.server_tool_use.web_search_requests`)        |
//! | `x-mock-incomplete: 1`     | Responses: status `incomplete` (`max_output_tokens`);      |
//! |                            | streamed, the last event is `response.incomplete`           |
//! | `x-mock-failed: 1`         | Responses: status `failed`, `error.code` `server_error`;    |
//! |                            | streamed, `response.failed` right after the text deltas     |
//! | `x-mock-cache-write: N`    | Messages: N `cache_creation_input_tokens`                    |
//! | `x-mock-delta-usage: full` | Messages: `message_delta`'s usage also carries the input    |
//! |                            | and cache counts (cumulative). `output`: `output_tokens`    |
//! |                            | only. Default: `output_tokens`, and `server_tool_use` when  |
//! |                            | web search is offered                                       |
//! | `x-mock-deltas: N`         | Messages: N `message_delta` events, cumulative output       |
//! |                            | tokens O*i/N (the last one is the total)                    |
//! | `x-mock-stream-error: 1`   | Messages: `event: error` (`overloaded_error`) after the     |
//! |                            | content, instead of `message_delta` and `message_stop`      |
//!
//! Anthropic's `input_tokens` leaves out the cache reads (`x-mock-cached`) and writes
//! (`x-mock-cache-write`): the three add up to the tokenizer's count. Every logged request's
//! `billed` has one form for every dialect: `prompt` (all input tokens, cache reads and
//! writes included), `completion` (reasoning included), `cached` (cache reads), `cache_write`,
//! `reasoning` and `web_searches`; its `user` is the body's `user` (Responses:
//! `safety_identifier`, else `user`; Messages: `metadata.user_id`).
//!
//! `GET /__mock/received` counts the requests read so far (answered or not);
//! `GET /__mock/requests` lists what it received (method, path, headers, the credential
//! headers by name, body and its SHA-256, the TLS server name and the connection it came on)
//! and what it billed; `POST /__mock/reset` clears
//! that list. `--tls-cert FILE --tls-key FILE` serves HTTPS instead of HTTP, and then also
//! plain HTTP on a second, printed address, for those two control paths.

mod http;
mod legacy;
mod messages;
mod responses;
mod stream;

use http::*;
use stream::stream;

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
use tokio::io::{AsyncWriteExt, BufReader};
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
                println!("usage: tokentap-mock [--listen 127.0.0.1:8000] [--tls-cert FILE --tls-key FILE]\nSee the module docs of src/bin/tokentap-mock/main.rs for the x-mock-* headers.");
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

/// Handles one request; returns whether the connection may be kept.
async fn handle(conn: &mut Conn, req: Request, state: &State) -> std::io::Result<bool> {
    let path = req.path.split('?').next().unwrap_or("").to_string();
    if !path.starts_with("/__mock/") {
        state.received.fetch_add(1, Ordering::Relaxed);
    }
    // The dialects answer `x-mock-status` (and wait `x-mock-delay-ms`) themselves.
    let is_chat = req.method == "POST"
        && matches!(
            path.as_str(),
            "/v1/chat/completions"
                | "/chat/completions"
                | "/v1/responses"
                | "/responses"
                | "/v1/messages"
                | "/messages"
                | "/v1/messages/count_tokens"
                | "/messages/count_tokens"
                | "/v1/embeddings"
                | "/embeddings"
                | "/v1/completions"
                | "/completions"
        );
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
        ("POST", "/v1/responses") | ("POST", "/responses") => {
            responses::responses(conn, req, state).await
        }
        ("POST", "/v1/messages") | ("POST", "/messages") => {
            messages::messages(conn, req, state).await
        }
        ("POST", "/v1/messages/count_tokens") | ("POST", "/messages/count_tokens") => {
            messages::count_tokens(conn, req, state).await
        }
        ("POST", "/v1/embeddings") | ("POST", "/embeddings") => {
            legacy::embeddings(conn, req, state).await
        }
        ("POST", "/v1/completions") | ("POST", "/completions") => {
            legacy::completions(conn, req, state).await
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
    let path = req.path.split('?').next().unwrap_or("");
    let user = serde_json::from_slice::<Value>(&req.inflated())
        .ok()
        .and_then(|v| user_of(path, &v).cloned())
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

/// The body's field naming the end user, as the dialect of `path` names it.
fn user_of<'a>(path: &str, body: &'a Value) -> Option<&'a Value> {
    match path {
        "/v1/responses" | "/responses" => body
            .get("safety_identifier")
            .filter(|v| !v.is_null())
            .or_else(|| body.get("user")),
        "/v1/messages" | "/messages" | "/v1/messages/count_tokens" | "/messages/count_tokens" => {
            body.get("metadata").and_then(|m| m.get("user_id"))
        }
        _ => body.get("user"),
    }
}

/// What the mock billed, in the one form every dialect's log entry has: `prompt` counts every
/// input token (cache reads and writes included), `completion` every output token (reasoning
/// included).
pub(crate) fn bill(
    prompt: u64,
    completion: u64,
    cached: u64,
    cache_write: u64,
    reasoning: u64,
    web_searches: u64,
) -> Value {
    json!({
        "prompt": prompt,
        "completion": completion,
        "cached": cached,
        "cache_write": cache_write,
        "reasoning": reasoning,
        "web_searches": web_searches,
    })
}

/// The request's body when it is a JSON object.
pub(crate) fn body_object(req: &Request) -> Option<Value> {
    match serde_json::from_slice(&req.inflated()) {
        Ok(v @ Value::Object(_)) => Some(v),
        _ => None,
    }
}

/// The seed of a request's ids: the digest of its body without `stream_options`.
pub(crate) fn seed(body: &Value) -> [u8; 32] {
    let mut seed = body.clone();
    if let Value::Object(m) = &mut seed {
        m.remove("stream_options");
    }
    Sha256::digest(serde_json::to_vec(&seed).unwrap()).into()
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes of every string in `messages`: the mock tokenizer's input.
pub(crate) fn text_bytes(v: &Value) -> u64 {
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
    /// The plan the headers make, for a call of no particular dialect: no web search, no
    /// warning, usage as the target API streams it.
    pub(crate) fn base(req: &Request, id: String, model: String, prompt: u64) -> Plan {
        Plan {
            id,
            model,
            created: 1_764_000_000,
            chunks: req.num("x-mock-chunks").unwrap_or(5),
            delay: Duration::from_millis(req.num("x-mock-delay-ms").unwrap_or(0)),
            reset_after: req.num("x-mock-reset-after"),
            prompt,
            cached: req.num("x-mock-cached").unwrap_or(0).min(prompt),
            reasoning: req.num("x-mock-reasoning").unwrap_or(0),
            search: false,
            warning: None,
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
            event_lines: false,
            usage_style: UsageStyle::Target,
            usage_asked: false,
            search_counted: true,
            search_flat: false,
            encoding: req.header("x-mock-encoding").map(str::to_string),
        }
    }

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
        bill(
            self.prompt,
            completed_chunks + self.reasoning,
            self.cached,
            0,
            self.reasoning,
            if self.search { 2 } else { 0 },
        )
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

    /// The whole text: the words of every content chunk.
    pub(crate) fn text(&self) -> String {
        (0..self.chunks).map(Plan::word).collect()
    }

    pub(crate) fn word(i: u64) -> String {
        format!("w{:02} ", i % 100)
    }
}

/// The answer to `x-mock-status` on an OpenAI-style path: OpenAI's error shape, with
/// `retry-after` on a 429.
pub(crate) async fn openai_status(
    conn: &mut Conn,
    req: &Request,
    state: &State,
    status: u16,
) -> std::io::Result<bool> {
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
    log_request(state, conn, req, json!(null), "error", &body);
    Ok(true)
}

/// A 400 in OpenAI's shape, for a body that is no JSON object (or lacks what it needs).
pub(crate) async fn openai_bad_request(
    conn: &mut Conn,
    req: &Request,
    state: &State,
) -> std::io::Result<bool> {
    let b = error_body(400, "Missing or invalid parameter");
    respond(conn, 400, "application/json", &[], &b).await?;
    log_request(state, conn, req, json!(null), "error", &b);
    Ok(true)
}

async fn chat(conn: &mut Conn, req: Request, state: &State) -> std::io::Result<bool> {
    if let Some(status) = req.num("x-mock-status") {
        return openai_status(conn, &req, state, status as u16).await;
    }
    let Some(body) = body_object(&req) else {
        return openai_bad_request(conn, &req, state).await;
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
    let digest = seed(&body);
    let plan = Plan {
        search,
        warning: req.header("x-mock-warning").map(str::to_string),
        event_lines: req.header("x-mock-event-lines").is_some(),
        usage_style: usage_style(&req),
        usage_asked,
        search_counted: req.header("x-mock-search-count") != Some("none"),
        search_flat: req.header("x-mock-search-shape") == Some("flat"),
        ..Plan::base(
            &req,
            format!("gen-mock-{}", hex(&digest[..8])),
            body["model"].as_str().unwrap_or("mock/model").to_string(),
            prompt,
        )
    };
    if body["stream"].as_bool() == Some(true) {
        stream(conn, &req, &plan, state).await
    } else {
        non_stream(conn, &req, &plan, state).await
    }
}

/// How `x-mock-usage` says a stream reports its usage.
pub(crate) fn usage_style(req: &Request) -> UsageStyle {
    match req.header("x-mock-usage") {
        Some("openai") => UsageStyle::OpenAi,
        Some("with-finish") => UsageStyle::WithFinish,
        _ => UsageStyle::Target,
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
    send_json(conn, req, plan, state, raw, plan.billed(plan.chunks)).await
}

/// A JSON answer (`raw`), compressed as `x-mock-encoding` says, or cut in the middle and the
/// connection reset when the plan has `x-mock-reset-after`. Logged with `billed` either way.
pub(crate) async fn send_json(
    conn: &mut Conn,
    req: &Request,
    plan: &Plan,
    state: &State,
    raw: Vec<u8>,
    billed: Value,
) -> std::io::Result<bool> {
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
        log_request(state, conn, req, billed, "reset", half);
        reset(conn).await;
        return Ok(false);
    }
    respond(conn, 200, "application/json", &extra, &body).await?;
    log_request(state, conn, req, billed, "complete", &body);
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
