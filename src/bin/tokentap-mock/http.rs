//! HTTP/1.1 as the mock speaks it: reading a request (length or chunked body) and writing
//! an answer.

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{log_request, Conn, State};

pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Request {
    /// The body, inflated when it came gzip-compressed (as an API behind a gateway reads it).
    pub(crate) fn inflated(&self) -> std::borrow::Cow<'_, [u8]> {
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

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub(crate) fn num(&self, name: &str) -> Option<u64> {
        self.header(name).and_then(|v| v.trim().parse().ok())
    }
}

/// Reads one request; `None` at a clean end of the connection.
pub(crate) async fn read_request(
    conn: &mut Conn,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Request>> {
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

pub(crate) async fn fill(conn: &mut Conn, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut tmp = [0u8; 65536];
    let n = conn.io.read(&mut tmp).await?;
    buf.extend_from_slice(&tmp[..n]);
    Ok(n)
}

pub(crate) async fn read_chunked(conn: &mut Conn, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
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

/// The answer to `x-mock-status` on a non-chat path.
pub(crate) async fn status_answer(
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
pub(crate) async fn respond_head(
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

pub(crate) fn error_body(status: u16, message: &str) -> Vec<u8> {
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

pub(crate) async fn respond(
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

pub(crate) fn reason(status: u16) -> &'static str {
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
