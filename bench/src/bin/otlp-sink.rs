//! A live OTLP/HTTP receiver for the benchmark: `POST /v1/traces` decodes each export request
//! (protobuf) and counts its spans, then answers 200 with an empty `ExportTraceServiceResponse`.
//! `GET /spans` answers the count, so the benchmark can show that tokentap's traces were sent.
//!
//! `otlp-sink --listen 127.0.0.1:14318`

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use tokentap_bench::{arg_addr, listen, runtime};

async fn handle(
    req: Request<Incoming>,
    spans: Arc<AtomicU64>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/spans" {
        let n = spans.load(Ordering::Relaxed).to_string();
        return Ok(Response::new(Full::new(Bytes::from(n))));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let Ok(export) = ExportTraceServiceRequest::decode(body) else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"bad protobuf")));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(r);
    };
    let n: usize = export
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum();
    spans.fetch_add(n as u64, Ordering::Relaxed);
    let mut r = Response::new(Full::new(Bytes::new()));
    r.headers_mut()
        .insert("content-type", "application/x-protobuf".parse().unwrap());
    Ok(r)
}

fn main() {
    let addr = arg_addr("--listen", "127.0.0.1:14318");
    let spans = Arc::new(AtomicU64::new(0));
    runtime(1).block_on(async move {
        let listener = listen(addr).expect("bind");
        println!("otlp-sink listening on {addr}");
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let spans = Arc::clone(&spans);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| handle(r, Arc::clone(&spans)));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
}
