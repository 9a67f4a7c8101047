//! The Anthropic Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`): a
//! `message` object, or a stream of `message_start`, `ping`, `content_block_*`,
//! `message_delta` and `message_stop` events (`event:` and `data:` lines, no `[DONE]`).
//! Anthropic's `input_tokens` leaves out the cache reads and writes.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::http::{respond, Request};
use crate::stream::{named, script, typed_json, Step};
use crate::{bill, body_object, hex, log_request, seed, send_json, text_bytes, Conn, Plan, State};

/// What `message_delta`'s usage carries (`x-mock-delta-usage`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum DeltaUsage {
    /// `output_tokens` only.
    Output,
    /// `output_tokens`, and `server_tool_use` when web search is offered (the default).
    Default,
    /// Everything the totals have, cumulative: input, cache reads and writes, output, searches.
    Full,
}

pub(crate) struct Msg {
    pub(crate) plan: Plan,
    /// Cache-creation tokens (`x-mock-cache-write`), part of the plan's prompt.
    pub(crate) cache_write: u64,
    /// Web searches run, when the request offers the tool (`None`: not offered).
    pub(crate) searches: Option<u64>,
    pub(crate) delta_usage: DeltaUsage,
    /// How many `message_delta` events (`x-mock-deltas`).
    pub(crate) deltas: u64,
    /// `x-mock-stream-error`: an `error` event instead of the end of the message.
    pub(crate) stream_error: bool,
    /// The seed's hex, for the blocks' ids.
    pub(crate) ids: String,
}

/// Anthropic's error body and headers for `status`.
fn error(
    status: u16,
    message: Option<&str>,
    req: &Request,
) -> (Vec<u8>, Vec<(&'static str, String)>) {
    let (kind, default) = match status {
        400 => ("invalid_request_error", "Mock invalid request"),
        401 => ("authentication_error", "invalid x-api-key"),
        402 => ("billing_error", "Your credit balance is too low"),
        403 => (
            "permission_error",
            "Your API key does not have permission to use the specified resource.",
        ),
        404 => ("not_found_error", "Not found"),
        413 => (
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes.",
        ),
        429 => (
            "rate_limit_error",
            "This request would exceed the rate limit for your organization",
        ),
        504 => ("timeout_error", "Request timed out"),
        529 => ("overloaded_error", "Overloaded"),
        _ => ("api_error", "Internal server error"),
    };
    let request_id = format!("req_{}", hex(&Sha256::digest(&req.body)[..12]));
    let body = typed_json(&json!({"type": "error",
        "error": {"type": kind, "message": message.unwrap_or(default)},
        "request_id": request_id}));
    let mut headers = vec![("request-id", request_id)];
    if status == 429 {
        headers.push(("retry-after", "7".into()));
    }
    (body.into_bytes(), headers)
}

async fn answer_error(
    conn: &mut Conn,
    req: &Request,
    state: &State,
    status: u16,
    message: Option<&str>,
) -> std::io::Result<bool> {
    let (body, headers) = error(status, message, req);
    respond(conn, status, "application/json", &headers, &body).await?;
    log_request(state, conn, req, json!(null), "error", &body);
    Ok(true)
}

/// The checks every Messages path makes: `x-mock-status`, `anthropic-version`, a JSON body.
async fn checked(
    conn: &mut Conn,
    req: &Request,
    state: &State,
) -> std::io::Result<Result<Value, bool>> {
    if let Some(status) = req.num("x-mock-status") {
        return answer_error(conn, req, state, status as u16, None)
            .await
            .map(Err);
    }
    if req.header("anthropic-version").is_none() {
        let m = "anthropic-version: header is required";
        return answer_error(conn, req, state, 400, Some(m)).await.map(Err);
    }
    match body_object(req) {
        Some(v) => Ok(Ok(v)),
        None => {
            let m = "messages: field required";
            answer_error(conn, req, state, 400, Some(m)).await.map(Err)
        }
    }
}

/// The tokenizer's count of a Messages request: `messages` and `system`.
fn prompt_of(body: &Value) -> u64 {
    (text_bytes(&body["messages"]) + text_bytes(&body["system"])).div_ceil(4)
}

pub(crate) async fn count_tokens(
    conn: &mut Conn,
    req: Request,
    state: &State,
) -> std::io::Result<bool> {
    let body = match checked(conn, &req, state).await? {
        Ok(v) => v,
        Err(keep) => return Ok(keep),
    };
    if let Some(ms) = req.num("x-mock-delay-ms") {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let b = serde_json::to_vec(&json!({"input_tokens": prompt_of(&body)})).unwrap();
    respond(conn, 200, "application/json", &[], &b).await?;
    log_request(state, conn, &req, bill(0, 0, 0, 0, 0, 0), "complete", &b);
    Ok(true)
}

pub(crate) async fn messages(
    conn: &mut Conn,
    req: Request,
    state: &State,
) -> std::io::Result<bool> {
    let body = match checked(conn, &req, state).await? {
        Ok(v) => v,
        Err(keep) => return Ok(keep),
    };
    let digest = seed(&body);
    let plan = Plan::base(
        &req,
        format!("msg_{}", hex(&digest[..12])),
        body["model"].as_str().unwrap_or("mock/model").to_string(),
        prompt_of(&body),
    );
    let m = Msg::new(&req, plan, &body, hex(&digest[12..24]));
    if body["stream"].as_bool() == Some(true) {
        let outcome = if m.stream_error {
            "stream_error"
        } else {
            "complete"
        };
        let steps = m.stream_steps();
        script(
            conn,
            &req,
            &m.plan,
            state,
            &steps,
            &|sent| m.billed(sent),
            outcome,
        )
        .await
    } else {
        if !m.plan.delay.is_zero() {
            tokio::time::sleep(m.plan.delay).await;
        }
        let raw = serde_json::to_vec(&m.message()).unwrap();
        let billed = m.billed(m.plan.chunks);
        send_json(conn, &req, &m.plan, state, raw, billed).await
    }
}

impl Msg {
    pub(crate) fn new(req: &Request, plan: Plan, body: &Value, ids: String) -> Msg {
        let offered = body["tools"].as_array().is_some_and(|t| {
            t.iter().any(|t| {
                t["type"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("web_search_"))
            })
        });
        Msg {
            cache_write: req
                .num("x-mock-cache-write")
                .unwrap_or(0)
                .min(plan.prompt - plan.cached),
            searches: offered.then(|| req.num("x-mock-searches").unwrap_or(1)),
            delta_usage: match req.header("x-mock-delta-usage") {
                Some("full") => DeltaUsage::Full,
                Some("output") => DeltaUsage::Output,
                _ => DeltaUsage::Default,
            },
            deltas: req.num("x-mock-deltas").unwrap_or(1).max(1),
            stream_error: req.header("x-mock-stream-error").is_some(),
            ids,
            plan,
        }
    }

    /// Input tokens as Anthropic counts them: without the cache reads and writes.
    pub(crate) fn input_tokens(&self) -> u64 {
        self.plan.prompt - self.plan.cached - self.cache_write
    }

    fn output_tokens(&self, sent: u64) -> u64 {
        sent + self.plan.reasoning
    }

    /// The message's usage with `output` tokens (`message_start`'s leaves out the searches).
    pub(crate) fn usage(&self, output: u64, searches: bool) -> Value {
        let mut u = json!({
            "input_tokens": self.input_tokens(),
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": self.plan.cached,
            "cache_creation": {"ephemeral_5m_input_tokens": self.cache_write,
                "ephemeral_1h_input_tokens": 0},
            "output_tokens": output,
            "service_tier": "standard",
        });
        if let (Some(n), true) = (self.searches, searches) {
            u["server_tool_use"] = json!({"web_search_requests": n});
        }
        u
    }

    /// `message_delta`'s usage with `output` tokens so far.
    pub(crate) fn delta_usage(&self, output: u64) -> Value {
        let mut u = match self.delta_usage {
            DeltaUsage::Full => json!({
                "input_tokens": self.input_tokens(),
                "cache_creation_input_tokens": self.cache_write,
                "cache_read_input_tokens": self.plan.cached,
                "output_tokens": output,
            }),
            _ => json!({"output_tokens": output}),
        };
        if let (Some(n), DeltaUsage::Default | DeltaUsage::Full) = (self.searches, self.delta_usage)
        {
            u["server_tool_use"] = json!({"web_search_requests": n});
        }
        u
    }

    pub(crate) fn billed(&self, sent: u64) -> Value {
        let p = &self.plan;
        bill(
            p.prompt,
            self.output_tokens(sent),
            p.cached,
            self.cache_write,
            p.reasoning,
            self.searches.unwrap_or(0),
        )
    }

    fn thinking(&self) -> String {
        (0..self.plan.reasoning)
            .map(|i| format!("r{:02} ", i % 100))
            .collect()
    }

    fn signature(&self) -> String {
        format!("EqMockSignature{}", self.ids)
    }

    fn tool_use_id(&self, k: u64) -> String {
        format!("srvtoolu_{}{:02x}", self.ids, k)
    }

    fn query(k: u64) -> String {
        format!("mock query {}", k + 1)
    }

    fn search_result(&self, k: u64) -> Value {
        json!({"type": "web_search_tool_result", "tool_use_id": self.tool_use_id(k),
        "content": [
            {"type": "web_search_result", "url": format!("https://example.com/{}/a", k + 1),
                "title": format!("Mock result {} A", k + 1),
                "encrypted_content": format!("EqMockEncrypted{}a", k + 1), "page_age": null},
            {"type": "web_search_result", "url": format!("https://example.com/{}/b", k + 1),
                "title": format!("Mock result {} B", k + 1),
                "encrypted_content": format!("EqMockEncrypted{}b", k + 1), "page_age": null}
        ]})
    }

    /// The non-streamed answer.
    pub(crate) fn message(&self) -> Value {
        let mut content = Vec::new();
        if self.plan.reasoning > 0 {
            content.push(json!({"type": "thinking", "thinking": self.thinking(),
                "signature": self.signature()}));
        }
        for k in 0..self.searches.unwrap_or(0) {
            content.push(json!({"type": "server_tool_use", "id": self.tool_use_id(k),
                "name": "web_search", "input": {"query": Self::query(k)}}));
            content.push(self.search_result(k));
        }
        content.push(json!({"type": "text", "text": self.plan.text()}));
        json!({
            "id": self.plan.id,
            "type": "message",
            "role": "assistant",
            "model": self.plan.model,
            "content": content,
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": self.usage(self.output_tokens(self.plan.chunks), true),
        })
    }

    /// The streamed answer, event by event.
    pub(crate) fn stream_steps(&self) -> Vec<Step> {
        let plan = &self.plan;
        let ev = |kind: &str, mut data: Value| {
            data["type"] = json!(kind);
            Step::Event(named(plan, kind, &data))
        };
        let mut steps = vec![ev(
            "message_start",
            json!({"message": {"id": plan.id, "type": "message", "role": "assistant",
                "model": plan.model, "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": self.usage(1, false)}}),
        )];
        let mut index = 0u64;
        let mut start = |steps: &mut Vec<Step>, block: Value| {
            steps.push(ev(
                "content_block_start",
                json!({"index": index, "content_block": block}),
            ));
            // As Anthropic does: a ping after the first block's start.
            if index == 0 {
                steps.push(ev("ping", json!({})));
            }
            index += 1;
            index - 1
        };
        let delta = |i: u64, delta: Value| {
            named(
                plan,
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": i, "delta": delta}),
            )
        };
        let stop = |i: u64| ev("content_block_stop", json!({"index": i}));
        if plan.reasoning > 0 {
            let i = start(
                &mut steps,
                json!({"type": "thinking", "thinking": "", "signature": ""}),
            );
            for r in 0..plan.reasoning {
                steps.push(Step::Event(delta(
                    i,
                    json!({"type": "thinking_delta", "thinking": format!("r{:02} ", r % 100)}),
                )));
            }
            steps.push(Step::Event(delta(
                i,
                json!({"type": "signature_delta", "signature": self.signature()}),
            )));
            steps.push(stop(i));
        }
        for k in 0..self.searches.unwrap_or(0) {
            let i = start(
                &mut steps,
                json!({"type": "server_tool_use", "id": self.tool_use_id(k),
                    "name": "web_search", "input": {}}),
            );
            steps.push(Step::Event(delta(
                i,
                json!({"type": "input_json_delta",
                    "partial_json": json!({"query": Self::query(k)}).to_string()}),
            )));
            steps.push(stop(i));
            let i = start(&mut steps, self.search_result(k));
            steps.push(stop(i));
        }
        let i = start(&mut steps, json!({"type": "text", "text": ""}));
        for c in 0..plan.chunks {
            steps.push(Step::Delta(delta(
                i,
                json!({"type": "text_delta", "text": Plan::word(c)}),
            )));
        }
        steps.push(Step::EndOfContent);
        steps.push(stop(i));
        if self.stream_error {
            steps.push(ev(
                "error",
                json!({"error": {"type": "overloaded_error", "message": "Overloaded"}}),
            ));
            return steps;
        }
        let total = self.output_tokens(plan.chunks);
        for j in 1..=self.deltas {
            steps.push(ev(
                "message_delta",
                json!({"delta": {"stop_reason": "end_turn", "stop_sequence": null},
                    "usage": self.delta_usage(total * j / self.deltas)}),
            ));
        }
        steps.push(ev("message_stop", json!({})));
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(headers: &[(&str, &str)], body: Value, prompt: u64) -> Msg {
        let req = Request {
            method: "POST".into(),
            path: "/v1/messages".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: serde_json::to_vec(&body).unwrap(),
        };
        let plan = Plan::base(&req, "msg_x".into(), "m".into(), prompt);
        Msg::new(&req, plan, &body, "ab".into())
    }

    #[test]
    fn input_tokens_and_the_cache_fields_add_up_to_the_prompt() {
        let m = msg(
            &[("x-mock-cached", "10"), ("x-mock-cache-write", "7")],
            json!({}),
            40,
        );
        let u = m.usage(5, true);
        assert_eq!(u["input_tokens"], 23);
        assert_eq!(u["cache_read_input_tokens"], 10);
        assert_eq!(u["cache_creation_input_tokens"], 7);
        assert!(u.get("server_tool_use").is_none());
        assert_eq!(
            m.billed(5),
            json!({"prompt": 40, "completion": 5, "cached": 10, "cache_write": 7,
                "reasoning": 0, "web_searches": 0})
        );
        // Clamped: never more cache than prompt, never a negative input.
        let m = msg(
            &[("x-mock-cached", "30"), ("x-mock-cache-write", "30")],
            json!({}),
            40,
        );
        assert_eq!(
            (m.input_tokens(), m.plan.cached, m.cache_write),
            (0, 30, 10)
        );
    }

    #[test]
    fn web_search_is_billed_when_offered() {
        let m = msg(
            &[("x-mock-searches", "3"), ("x-mock-reasoning", "2")],
            json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
            8,
        );
        let v = m.message();
        assert_eq!(v["usage"]["server_tool_use"]["web_search_requests"], 3);
        assert_eq!(v["usage"]["output_tokens"], 7);
        let kinds: Vec<&str> = v["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds[0], "thinking");
        assert_eq!(kinds.len(), 1 + 3 * 2 + 1);
        assert_eq!(m.billed(5)["web_searches"], 3);
        assert_eq!(m.billed(5)["completion"], 7);
    }

    #[test]
    fn message_deltas_are_cumulative() {
        let m = msg(
            &[("x-mock-deltas", "2"), ("x-mock-delta-usage", "full")],
            json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
            8,
        );
        let outs: Vec<Value> = m
            .stream_steps()
            .iter()
            .filter_map(|s| match s {
                Step::Event(e) if e.starts_with("event: message_delta\n") => {
                    let data = e.lines().nth(1).unwrap().strip_prefix("data: ").unwrap();
                    Some(serde_json::from_str::<Value>(data).unwrap()["usage"].clone())
                }
                _ => None,
            })
            .collect();
        assert_eq!(outs.len(), 2);
        assert_eq!(outs[0]["output_tokens"], 2);
        assert_eq!(outs[1]["output_tokens"], 5);
        assert_eq!(outs[1]["input_tokens"], 8);
        assert_eq!(outs[1]["server_tool_use"]["web_search_requests"], 1);
    }
}
