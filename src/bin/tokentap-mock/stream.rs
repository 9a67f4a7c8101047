//! A streamed answer: SSE events in the target API's shape or OpenAI's, compressed event by
//! event when asked, written as HTTP chunks (split as asked).

use std::io::Write;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::http::Request;
use crate::{log_request, reset, Conn, Plan, Split, State, UsageStyle};

pub(crate) fn event(plan: &Plan, name: Option<&str>, data: &str) -> String {
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
pub(crate) struct Body {
    enc: Option<Encoder>,
    sent: Vec<u8>,
}

pub(crate) enum Encoder {
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

/// Writes a stream's head (compressed as the plan says): the body to write its events on.
async fn open(conn: &mut Conn, plan: &Plan) -> std::io::Result<Body> {
    let enc = Encoder::new(plan.encoding.as_deref());
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n{}transfer-encoding: chunked\r\n\r\n",
        match (&enc, plan.encoding.as_deref()) {
            (Some(_), Some(e)) => format!("content-encoding: {e}\r\n"),
            _ => String::new(),
        }
    );
    conn.get_mut().write_all(head.as_bytes()).await?;
    Ok(Body {
        enc,
        sent: Vec::new(),
    })
}

/// `v` as JSON with every object's `type` first, as the real APIs write their events (the
/// other keys in serde_json's order).
pub(crate) fn typed_json(v: &Value) -> String {
    let mut out = String::new();
    write_typed(v, &mut out);
    out
}

fn write_typed(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            out.push('{');
            let first = m.get_key_value("type");
            for (i, (k, v)) in first
                .into_iter()
                .chain(m.iter().filter(|(k, _)| *k != "type"))
                .enumerate()
            {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push(':');
                write_typed(v, out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_typed(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap()),
    }
}

/// A named SSE event (`event:` and `data:` lines), as the Responses and Messages APIs send
/// every event; `data`'s `type` goes first.
pub(crate) fn named(plan: &Plan, name: &str, data: &Value) -> String {
    let nl = plan.nl;
    format!("event: {name}{nl}data: {}{nl}{nl}", typed_json(data))
}

/// One step of a scripted stream (a dialect other than chat's, made in full before it starts).
pub(crate) enum Step {
    /// An event, sent as it is.
    Event(String),
    /// An event with one content delta (one token): counted, preceded by `x-mock-delay-ms`,
    /// and where `x-mock-reset-after: K` cuts the stream, before the (K+1)th.
    Delta(String),
    /// The end of the content: `x-mock-reset-after` at or past the number of deltas cuts here.
    EndOfContent,
}

/// Sends a scripted stream. `billed(n)` is the bill once n content deltas went out; a stream
/// that ends as scripted is logged with `outcome`.
pub(crate) async fn script(
    conn: &mut Conn,
    req: &Request,
    plan: &Plan,
    state: &State,
    steps: &[Step],
    billed: &(dyn Fn(u64) -> Value + Sync),
    outcome: &str,
) -> std::io::Result<bool> {
    let mut body = open(conn, plan).await?;
    let mut sent = 0;
    for step in steps {
        let payload = match step {
            Step::Event(p) => p,
            Step::Delta(p) => {
                if plan.reset_after == Some(sent) {
                    log_request(state, conn, req, billed(sent), "reset", &body.sent);
                    reset(conn).await;
                    return Ok(false);
                }
                if !plan.delay.is_zero() {
                    tokio::time::sleep(plan.delay).await;
                }
                p
            }
            Step::EndOfContent => {
                if plan.reset_after.is_some_and(|k| k >= sent) {
                    log_request(state, conn, req, billed(sent), "reset", &body.sent);
                    reset(conn).await;
                    return Ok(false);
                }
                continue;
            }
        };
        if let Err(e) = body.event(conn, plan, payload).await {
            log_request(state, conn, req, billed(sent), "client_gone", &body.sent);
            return Err(e);
        }
        if matches!(step, Step::Delta(_)) {
            sent += 1;
        }
    }
    let r = body.end(conn, plan).await;
    let outcome = if r.is_ok() { outcome } else { "client_gone" };
    log_request(state, conn, req, billed(sent), outcome, &body.sent);
    r.map(|()| true)
}

pub(crate) async fn stream(
    conn: &mut Conn,
    req: &Request,
    plan: &Plan,
    state: &State,
) -> std::io::Result<bool> {
    let mut body = open(conn, plan).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_json_puts_type_first_everywhere_and_is_the_same_json() {
        let v = serde_json::json!({"index": 1, "type": "content_block_delta",
            "delta": {"text": "a\"b", "type": "text_delta"}, "list": [{"z": 1, "type": "t"}, 2, null],
            "empty": {}});
        let s = typed_json(&v);
        assert!(s.starts_with(r#"{"type":"content_block_delta","#), "{s}");
        assert!(s.contains(r#"{"type":"text_delta","text":"a\"b"}"#), "{s}");
        assert!(s.contains(r#"[{"type":"t","z":1},2,null]"#), "{s}");
        assert_eq!(serde_json::from_str::<Value>(&s).unwrap(), v);
    }
}
