//! Sending an encoded `ExportTraceServiceRequest` to the collector: OTLP/gRPC through tonic,
//! or OTLP/HTTP with a protobuf body through reqwest, with the OTLP exporter's retries.
//!
//! tokentap used `opentelemetry_otlp`'s span exporter, which takes only SDK span data; it
//! now encodes spans itself (see the parent module), so it sends them itself, the way that
//! exporter did: the same headers, timeout, TLS roots, status handling and retry policy.

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use rand::Rng;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::telemetry::traces::{ExportConfig, Protocol};

const USER_AGENT: &str = concat!("tokentap/", env!("CARGO_PKG_VERSION"));
const GRPC_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// A collector's answer is a small message; a bigger one is not a collector's.
const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// Where batches go. Built inside the exporter thread's runtime (tonic's channel starts its
/// worker there).
pub struct Exporter {
    client: Client,
    timeout: Duration,
}

enum Client {
    Grpc {
        channel: Channel,
        metadata: tonic::metadata::MetadataMap,
    },
    Http {
        client: reqwest::Client,
        url: String,
        headers: http::HeaderMap,
    },
}

impl Exporter {
    pub fn new(cfg: &ExportConfig) -> Result<Exporter, String> {
        let headers = header_map(cfg)?;
        let client = match cfg.protocol {
            Protocol::Grpc => Client::Grpc {
                channel: channel(cfg)?,
                metadata: tonic::metadata::MetadataMap::from_headers(headers),
            },
            Protocol::HttpProtobuf => Client::Http {
                client: {
                    // reqwest's rustls (for the alerts' https webhooks) takes the process's
                    // crypto provider: ring, as the rest of tokentap.
                    let _ =
                        tokio_rustls::rustls::crypto::ring::default_provider().install_default();
                    reqwest::Client::builder()
                }
                .timeout(cfg.timeout)
                .user_agent(USER_AGENT)
                .build()
                .map_err(|e| format!("traces: cannot build the HTTP client: {e}"))?,
                url: cfg.endpoint.clone(),
                headers,
            },
        };
        Ok(Exporter {
            client,
            timeout: cfg.timeout,
        })
    }

    /// Sends one request, retrying what the collector says may pass; the error says why the
    /// collector did not take it. On success, how many of its spans the collector rejected
    /// (OTLP's partial success).
    pub async fn export(&self, body: Bytes) -> Result<u64, String> {
        with_retries(self.timeout, || self.send(body.clone())).await
    }

    async fn send(&self, body: Bytes) -> Result<u64, Failure> {
        match &self.client {
            Client::Grpc { channel, metadata } => send_grpc(channel, metadata, body).await,
            Client::Http {
                client,
                url,
                headers,
            } => send_http(client, url, headers, body).await,
        }
    }
}

/// The configured headers (checked when the config was compiled).
fn header_map(cfg: &ExportConfig) -> Result<http::HeaderMap, String> {
    let mut map = http::HeaderMap::new();
    for (k, v) in &cfg.headers {
        let name = http::HeaderName::from_bytes(k.as_bytes());
        let value = http::HeaderValue::from_str(v);
        match (name, value) {
            (Ok(n), Ok(v)) => map.insert(n, v),
            _ => return Err(format!("traces.headers: {k:?} is not a valid header")),
        };
    }
    Ok(map)
}

/// A lazy channel: it connects on the first export, and reconnects after a failure.
fn channel(cfg: &ExportConfig) -> Result<Channel, String> {
    let bad = |e: tonic::transport::Error| format!("traces.endpoint: {:?}: {e}", cfg.endpoint);
    let mut endpoint = Endpoint::from_shared(cfg.endpoint.clone())
        .map_err(bad)?
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .user_agent(USER_AGENT)
        .map_err(bad)?;
    if cfg.endpoint.starts_with("https://") {
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().with_enabled_roots())
            .map_err(bad)?;
    }
    Ok(endpoint.connect_lazy())
}

/// Why an attempt failed, and whether another may succeed.
#[derive(Debug)]
struct Failure {
    why: String,
    retry: Retry,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Retry {
    Never,
    /// After the usual backoff.
    Backoff,
    /// After the delay the collector asked for.
    After(Duration),
}

async fn send_grpc(
    channel: &Channel,
    metadata: &tonic::metadata::MetadataMap,
    body: Bytes,
) -> Result<u64, Failure> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    // Not ready: the channel could not connect (a local failure, not the collector's
    // answer), retried like a network error.
    grpc.ready().await.map_err(|e| Failure {
        why: format!("the collector could not be reached: {}", error_chain(&e)),
        retry: Retry::Backoff,
    })?;
    let request = tonic::Request::from_parts(metadata.clone(), Default::default(), body);
    let path = http::uri::PathAndQuery::from_static(GRPC_EXPORT);
    grpc.unary(request, path, Preencoded)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| grpc_failure(&s))
}

/// The spans an `ExportTraceServiceResponse` says the collector rejected (its
/// `partial_success`; 0 without one, or for an answer that is not one).
fn rejected_spans(resp: &ExportTraceServiceResponse) -> u64 {
    resp.partial_success
        .as_ref()
        .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))
}

/// What a gRPC status means for the export. Its message stays out of the log (a collector
/// may echo credentials there); a status tonic made from a local error keeps that error.
fn grpc_failure(s: &Status) -> Failure {
    let mut why = format!("the collector answered gRPC status {:?}", s.code());
    if let Some(e) = std::error::Error::source(s) {
        why.push_str(": ");
        why.push_str(&error_chain(e));
    }
    Failure {
        why,
        retry: grpc_retry(s.code(), retry_info(s.details())),
    }
}

/// The OTLP exporter's reading of gRPC codes: throttling only with the server's delay,
/// passing trouble (unavailable, cancelled or timed out, aborted) retried, the rest final.
fn grpc_retry(code: Code, delay: Option<Duration>) -> Retry {
    match code {
        Code::ResourceExhausted => delay.map_or(Retry::Never, Retry::After),
        Code::Unavailable => match delay.filter(|d| !d.is_zero()) {
            Some(d) => Retry::After(d),
            None => Retry::Backoff,
        },
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::DataLoss => Retry::Backoff,
        _ => Retry::Never,
    }
}

/// `google.rpc.Status` and `google.rpc.RetryInfo`, as much as the delay needs.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(message, repeated, tag = "3")]
    details: Vec<ProtoAny>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProtoAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<ProtoDuration>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// The delay of the first `RetryInfo` in a status's details (a negative one is zero).
fn retry_info(details: &[u8]) -> Option<Duration> {
    let status = RpcStatus::decode(details).ok()?;
    let info = status.details.iter().find_map(|a| {
        (a.type_url == "type.googleapis.com/google.rpc.RetryInfo")
            .then(|| RetryInfo::decode(a.value.as_slice()).ok())
            .flatten()
    })?;
    let d = info.retry_delay?;
    let secs = u64::try_from(d.seconds).unwrap_or(0);
    let nanos = u64::try_from(d.nanos).unwrap_or(0);
    Some(Duration::from_secs(secs).saturating_add(Duration::from_nanos(nanos)))
}

/// Writes the request as it was encoded; reads from the response the spans it rejected.
#[derive(Clone, Copy)]
struct Preencoded;

impl Codec for Preencoded {
    type Encode = Bytes;
    type Decode = u64;
    type Encoder = Preencoded;
    type Decoder = Preencoded;

    fn encoder(&mut self) -> Preencoded {
        Preencoded
    }

    fn decoder(&mut self) -> Preencoded {
        Preencoded
    }
}

impl Encoder for Preencoded {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Preencoded {
    type Item = u64;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<u64>, Status> {
        ExportTraceServiceResponse::decode(src)
            .map(|r| Some(rejected_spans(&r)))
            .map_err(|e| Status::internal(e.to_string()))
    }
}

async fn send_http(
    client: &reqwest::Client,
    url: &str,
    headers: &http::HeaderMap,
    body: Bytes,
) -> Result<u64, Failure> {
    // Without the URL: reqwest's error text names it with its query, which may hold a key.
    let network = |e: reqwest::Error| Failure {
        why: format!(
            "the collector could not be reached: {}",
            error_chain(&e.without_url())
        ),
        retry: Retry::Backoff,
    };
    let mut response = client
        .post(url)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .headers(headers.clone())
        .body(body)
        .send()
        .await
        .map_err(network)?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after(v, std::time::SystemTime::now()));
    // Read to the end (so the connection can serve the next export), within reason.
    let mut read = 0;
    let mut answer = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(network)? {
        read += chunk.len();
        answer.extend_from_slice(&chunk);
        if read > MAX_RESPONSE_BYTES {
            return Err(Failure {
                why: "the collector's answer is too large".into(),
                retry: Retry::Never,
            });
        }
    }
    if status.is_success() {
        // (An answer that is not a protobuf response, e.g. an empty one, rejected nothing.)
        return Ok(
            ExportTraceServiceResponse::decode(answer.as_slice()).map_or(0, |r| rejected_spans(&r))
        );
    }
    Err(Failure {
        why: format!("the collector answered HTTP {status}"),
        retry: http_retry(status.as_u16(), retry_after),
    })
}

/// A `Retry-After` value, delay-seconds or an HTTP date (RFC 9110 10.2.3), as a delay from
/// `now` (a date in the past is no delay).
fn retry_after(v: &str, now: std::time::SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// The OTLP exporter's reading of HTTP statuses: throttled (after `Retry-After` when given),
/// a gateway's passing trouble, or final.
fn http_retry(status: u16, retry_after: Option<Duration>) -> Retry {
    match (status, retry_after) {
        (429 | 503, Some(d)) => Retry::After(d.min(Duration::from_secs(600))),
        (429 | 502 | 503 | 504, _) => Retry::Backoff,
        _ => Retry::Never,
    }
}

/// An error and its sources, each said once (a wrapper often repeats its source's text).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !last.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        source = s.source();
    }
    out
}

/// The OTLP exporter's retry policy: at most three retries, 100 ms apart doubling to 1.6 s,
/// each with up to 100 ms of jitter, or after the delay a throttling collector asks for (up
/// to 30 s); never past the export timeout.
struct Backoff {
    delay: Duration,
    cap: Duration,
}

const MAX_RETRIES: usize = 3;
const MAX_THROTTLE: Duration = Duration::from_secs(30);

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            delay: Duration::from_millis(100),
            cap: Duration::from_millis(1600),
        }
    }

    /// How long to wait before retrying after this failure; `None`: do not retry.
    fn next(&mut self, retry: Retry, jitter: Duration) -> Option<Duration> {
        match retry {
            Retry::Never => return None,
            Retry::Backoff => {}
            Retry::After(asked) => {
                let asked = asked.min(MAX_THROTTLE);
                if asked > self.cap {
                    self.cap = MAX_THROTTLE;
                }
                self.delay = self.delay.max(asked);
            }
        }
        let wait = self.delay.saturating_add(jitter).min(self.cap);
        self.delay = self.delay.saturating_mul(2).min(self.cap);
        Some(wait)
    }
}

async fn with_retries<T, F, Fut>(timeout: Duration, mut attempt: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let start = Instant::now();
    let mut backoff = Backoff::new();
    let mut retries = 0;
    loop {
        let failed = match attempt().await {
            Ok(v) => return Ok(v),
            Err(f) => f,
        };
        let jitter = Duration::from_millis(rand::thread_rng().gen_range(0..=100));
        let wait = match backoff.next(failed.retry, jitter) {
            Some(w) if retries < MAX_RETRIES && start.elapsed() + w < timeout => w,
            _ => return Err(failed.why),
        };
        retries += 1;
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_success_counts_the_spans_it_rejected() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess;
        let r = ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 3,
                error_message: "too old".into(),
            }),
        };
        let bytes = r.encode_to_vec();
        let back = ExportTraceServiceResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(rejected_spans(&back), 3);
        assert_eq!(rejected_spans(&ExportTraceServiceResponse::default()), 0);
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_as_an_http_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past: no delay"
        );
        assert_eq!(retry_after("soon", now), None);
        // An HTTP date as the answer of a throttling collector.
        assert_eq!(
            http_retry(429, retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now)),
            Retry::After(Duration::from_secs(10))
        );
    }

    #[test]
    fn statuses_are_retried_as_the_otlp_exporter_retried_them() {
        let two = Some(Duration::from_secs(2));
        assert_eq!(http_retry(503, two), Retry::After(Duration::from_secs(2)));
        assert_eq!(http_retry(429, None), Retry::Backoff);
        assert_eq!(http_retry(502, two), Retry::Backoff);
        for final_status in [400, 401, 404, 413, 500, 501] {
            assert_eq!(http_retry(final_status, None), Retry::Never);
        }
        let s = Duration::from_secs(1);
        let d = Some(s);
        assert_eq!(grpc_retry(Code::ResourceExhausted, None), Retry::Never);
        assert_eq!(grpc_retry(Code::ResourceExhausted, d), Retry::After(s));
        assert_eq!(
            grpc_retry(Code::Unavailable, Some(Duration::ZERO)),
            Retry::Backoff
        );
        assert_eq!(grpc_retry(Code::Unavailable, d), Retry::After(s));
        assert_eq!(grpc_retry(Code::Cancelled, None), Retry::Backoff);
        for final_code in [Code::Unknown, Code::Internal, Code::Unauthenticated] {
            assert_eq!(grpc_retry(final_code, d), Retry::Never);
        }
    }

    #[test]
    fn the_retry_delay_is_read_from_the_status_details() {
        let info = RetryInfo {
            retry_delay: Some(ProtoDuration {
                seconds: 2,
                nanos: 500_000_000,
            }),
        };
        let status = RpcStatus {
            details: vec![
                ProtoAny {
                    type_url: "type.googleapis.com/google.rpc.DebugInfo".into(),
                    value: vec![1, 2, 3],
                },
                ProtoAny {
                    type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                    value: info.encode_to_vec(),
                },
            ],
        };
        assert_eq!(
            retry_info(&status.encode_to_vec()),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(retry_info(b""), None);
        assert_eq!(retry_info(b"\xff\xff"), None);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_honours_the_collectors_delay() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new();
        let waits: Vec<_> = (0..6)
            .map(|_| b.next(Retry::Backoff, ms(0)).unwrap())
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 1600].map(ms));
        assert_eq!(b.next(Retry::Never, ms(0)), None);
        let mut b = Backoff::new();
        assert_eq!(b.next(Retry::Backoff, ms(50)), Some(ms(150)));
        assert_eq!(b.next(Retry::After(ms(5000)), ms(0)), Some(ms(5000)));
        assert_eq!(
            b.next(Retry::After(Duration::from_secs(600)), ms(0)),
            Some(MAX_THROTTLE)
        );
    }

    #[test]
    fn retries_stop_at_three_and_at_the_timeout() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let tries = std::cell::Cell::new(0);
        let fail = |retry| {
            tries.set(tries.get() + 1);
            async move {
                Err::<(), _>(Failure {
                    why: "no".into(),
                    retry,
                })
            }
        };
        let r = rt.block_on(with_retries(Duration::from_secs(60), || {
            fail(Retry::Backoff)
        }));
        assert_eq!((r, tries.replace(0)), (Err("no".into()), 4));
        let r = rt.block_on(with_retries(Duration::from_secs(60), || fail(Retry::Never)));
        assert_eq!((r, tries.replace(0)), (Err("no".into()), 1));
        // Waiting 2 s would end past the 1 s timeout: give up at once.
        let later = Retry::After(Duration::from_secs(2));
        let r = rt.block_on(with_retries(Duration::from_secs(1), || fail(later)));
        assert_eq!((r, tries.replace(0)), (Err("no".into()), 1));
    }
}
