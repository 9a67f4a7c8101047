//! The benchmark's mock upstream: the target API's Chat Completions format, as cheaply as it can
//! be served, so that the floor ("direct") measures the network path and not the mock.
//!
//! `POST /v1/chat/completions` reads the whole body. Prompt tokens are its bytes / 4 (the body
//! is not parsed: a JSON parse of a 256 KiB prompt would make the floor slower than the proxies'
//! work). A body with `"stream": true` gets a stream: `role`, then `x-bench-chunks` content
//! chunks (default 20), each after `x-bench-delay-us` microseconds (default 1000), each its own
//! write, then `finish`, `usage` and `data: [DONE]` in one last write. Otherwise a
//! `chat.completion` with `usage`. `GET /__bench/requests` answers the number of chat requests
//! served; `GET /__bench/active` the number of streams in progress (started, not yet ended or
//! abandoned by the client), which proves how many are open at once.
//!
//! `bench-mock --listen 127.0.0.1:18000 --threads 1`

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokentap_bench::{arg_addr, arg_num, listen, runtime};

type Body = UnsyncBoxBody<Bytes, Infallible>;

const MODEL: &str = "bench/model";

fn header_num(req: &Request<Incoming>, name: &str, default: u64) -> u64 {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn is_stream(body: &[u8]) -> bool {
    let Some(at) = memchr::memmem::find(body, b"\"stream\"") else {
        return false;
    };
    let rest = &body[at + 8..];
    let rest = rest
        .iter()
        .position(|b| !matches!(b, b' ' | b':' | b'\t' | b'\r' | b'\n'))
        .map_or(&[][..], |i| &rest[i..]);
    rest.starts_with(b"true")
}

fn usage(prompt: u64, completion: u64) -> String {
    format!(
        r#"{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{}}}"#,
        prompt + completion
    )
}

fn chunk(id: u64, kind: &str, rest: &str) -> Bytes {
    Bytes::from(format!(
        "data: {{\"type\":\"{kind}\",\"id\":\"gen-bench-{id}\",\"object\":\"chat.completion.chunk\",\"created\":1764000000,\"model\":\"{MODEL}\",{rest}}}\n\n"
    ))
}

/// Counts a stream as active from its start until its body is dropped (sent to the end, or
/// abandoned when the client went away).
struct Active(Arc<AtomicU64>);

impl Active {
    fn new(n: &Arc<AtomicU64>) -> Active {
        n.fetch_add(1, Ordering::Relaxed);
        Active(Arc::clone(n))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Counts {
    served: Arc<AtomicU64>,
    active: Arc<AtomicU64>,
}

async fn handle(req: Request<Incoming>, counts: Arc<Counts>) -> Result<Response<Body>, Infallible> {
    let count = match req.uri().path() {
        "/__bench/requests" => Some(&counts.served),
        "/__bench/active" => Some(&counts.active),
        _ => None,
    };
    if let Some(c) = count {
        let n = c.load(Ordering::Relaxed).to_string();
        return Ok(Response::new(Full::new(Bytes::from(n)).boxed_unsync()));
    }
    let chunks = header_num(&req, "x-bench-chunks", 20);
    let delay = Duration::from_micros(header_num(&req, "x-bench-delay-us", 1000));
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let id = counts.served.fetch_add(1, Ordering::Relaxed);
    let prompt = (body.len() as u64).div_ceil(4);
    if !is_stream(&body) {
        let content = "w00 ".repeat(chunks as usize);
        let json = format!(
            r#"{{"id":"gen-bench-{id}","object":"chat.completion","created":1764000000,"model":"{MODEL}","choices":[{{"index":0,"finish_reason":"stop","message":{{"role":"assistant","content":"{content}","refusal":null}}}}],"usage":{}}}"#,
            usage(prompt, chunks)
        );
        let mut r = Response::new(Full::new(Bytes::from(json)).boxed_unsync());
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        return Ok(r);
    }
    // Step 0: the role chunk at once; 1..=chunks: content after the delay; then the tail.
    let active = Active::new(&counts.active);
    let frames = futures::stream::unfold((0u64, active), move |(step, active)| async move {
        let data = match step {
            0 => chunk(
                id,
                "content",
                r#""choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]"#,
            ),
            s if s <= chunks => {
                tokio::time::sleep(delay).await;
                chunk(
                    id,
                    "content",
                    r#""choices":[{"index":0,"delta":{"content":"w00 "},"finish_reason":null}]"#,
                )
            }
            s if s == chunks + 1 => {
                let mut t = chunk(
                    id,
                    "finish",
                    r#""choices":[{"index":0,"delta":{},"finish_reason":"stop"}]"#,
                )
                .to_vec();
                t.extend_from_slice(&chunk(
                    id,
                    "usage",
                    &format!("\"usage\":{}", usage(prompt, chunks)),
                ));
                t.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(t)
            }
            _ => return None,
        };
        Some((Ok::<_, Infallible>(Frame::data(data)), (step + 1, active)))
    });
    let mut r = Response::new(BodyExt::boxed_unsync(StreamBody::new(frames.boxed())));
    let h = r.headers_mut();
    h.insert("content-type", "text/event-stream".parse().unwrap());
    h.insert("cache-control", "no-cache".parse().unwrap());
    Ok(r)
}

fn main() {
    let addr = arg_addr("--listen", "127.0.0.1:18000");
    let threads = arg_num("--threads", 1usize);
    let counts = Arc::new(Counts::default());
    runtime(threads).block_on(async move {
        let listener = listen(addr).expect("bind");
        println!("bench-mock listening on {addr}");
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let counts = Arc::clone(&counts);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| handle(r, Arc::clone(&counts)));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
}
