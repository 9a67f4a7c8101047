//! A real OTLP receiver for tests (gRPC through tonic, HTTP/protobuf on a plain socket, both
//! decoding the OTLP protobuf messages), on a free loopback port. Included with
//! `#[path = "common/otlp.rs"] mod otlp;` by the tests that need it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{json, Value};

use super::common::PATIENCE;

/// A span as received, with its service name and attributes as JSON values.
#[derive(Debug, Clone)]
pub struct Got {
    pub service: String,
    pub span: Span,
    pub attrs: BTreeMap<String, Value>,
}

impl Got {
    pub fn attr(&self, k: &str) -> &Value {
        self.attrs.get(k).unwrap_or(&Value::Null)
    }
}

fn json_of(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> Value {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => json!(s),
        Some(Any::BoolValue(b)) => json!(b),
        Some(Any::IntValue(i)) => json!(i),
        Some(Any::DoubleValue(d)) => json!(d),
        Some(Any::ArrayValue(a)) => {
            Value::Array(a.values.iter().map(|v| json_of(&Some(v.clone()))).collect())
        }
        _ => Value::Null,
    }
}

type Store = Arc<Mutex<Vec<Got>>>;

fn keep(store: &Store, req: ExportTraceServiceRequest) {
    let mut s = store.lock().unwrap();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
            .map(|a| json_of(&a.value).as_str().unwrap_or_default().to_string())
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                let attrs = span
                    .attributes
                    .iter()
                    .map(|a| (a.key.clone(), json_of(&a.value)))
                    .collect();
                s.push(Got {
                    service: service.clone(),
                    span,
                    attrs,
                });
            }
        }
    }
}

struct Grpc(Store);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP receiver on a free loopback port; stops when dropped.
pub struct Collector {
    rt: Option<tokio::runtime::Runtime>,
    pub addr: std::net::SocketAddr,
    store: Store,
}

impl Collector {
    /// Its runtime, store and a listener on a free loopback port.
    fn parts() -> (tokio::runtime::Runtime, Store, tokio::net::TcpListener) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        (rt, Arc::default(), listener)
    }

    pub fn grpc() -> Collector {
        let (rt, store, listener) = Self::parts();
        let addr = listener.local_addr().unwrap();
        let svc = TraceServiceServer::new(Grpc(Arc::clone(&store)));
        rt.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        Collector {
            rt: Some(rt),
            addr,
            store,
        }
    }

    /// OTLP/HTTP with protobuf bodies at `/v1/traces`, on a plain socket.
    pub fn http() -> Collector {
        Self::http_rejecting(0)
    }

    /// As [`Collector::http`], answering each export with a partial success that rejects
    /// `rejects` of its spans (OTLP's `partial_success.rejected_spans`).
    pub fn http_rejecting(rejects: i64) -> Collector {
        let (rt, store, listener) = Self::parts();
        let addr = listener.local_addr().unwrap();
        let s = Arc::clone(&store);
        rt.spawn(async move {
            loop {
                let Ok((mut c, _)) = listener.accept().await else {
                    return;
                };
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = Vec::new();
                    loop {
                        // One request: head, then a Content-Length body.
                        let (head_len, path, len) = loop {
                            let mut headers = [httparse::EMPTY_HEADER; 64];
                            let mut req = httparse::Request::new(&mut headers);
                            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                                let len = req
                                    .headers
                                    .iter()
                                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                                    .and_then(|h| std::str::from_utf8(h.value).ok())
                                    .and_then(|v| v.parse::<usize>().ok())
                                    .unwrap_or(0);
                                break (n, req.path.unwrap_or("").to_string(), len);
                            }
                            let mut chunk = [0u8; 8192];
                            match c.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        while buf.len() < head_len + len {
                            let mut chunk = [0u8; 65536];
                            match c.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let body: Vec<u8> = buf.drain(..head_len + len).skip(head_len).collect();
                        let mut answer = Vec::new();
                        let status = if path == "/v1/traces" {
                            match ExportTraceServiceRequest::decode(body.as_slice()) {
                                Ok(r) => {
                                    keep(&s, r);
                                    if rejects > 0 {
                                        answer = ExportTraceServiceResponse {
                                            partial_success: Some(opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess {
                                                rejected_spans: rejects,
                                                error_message: "rejected by the test".into(),
                                            }),
                                        }
                                        .encode_to_vec();
                                    }
                                    "200 OK"
                                }
                                Err(_) => "400 Bad Request",
                            }
                        } else {
                            "404 Not Found"
                        };
                        let resp = format!(
                            "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
                            answer.len()
                        );
                        if c.write_all(resp.as_bytes()).await.is_err()
                            || c.write_all(&answer).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Collector {
            rt: Some(rt),
            addr,
            store,
        }
    }

    pub fn spans(&self) -> Vec<Got> {
        self.store.lock().unwrap().clone()
    }

    /// Waits for the span of the call with this request id.
    pub fn span_of(&self, request_id: &str) -> Got {
        let start = Instant::now();
        loop {
            if let Some(g) = self
                .spans()
                .into_iter()
                .find(|g| g.attr("tokentap.request_id") == request_id)
            {
                return g;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "no span for {request_id}: {:?}",
                self.spans()
                    .iter()
                    .map(|g| &g.span.name)
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
