//! The OpenAI Responses API (`POST /v1/responses`): a `response` object, or a stream of
//! `response.*` events (`event:` and `data:` lines, each with its `sequence_number`, no
//! `[DONE]`).

use serde_json::{json, Value};

use crate::http::Request;
use crate::stream::{named, script, Step};
use crate::{
    bill, body_object, hex, openai_bad_request, openai_status, seed, send_json, text_bytes, Conn,
    Plan, State,
};

/// How the response ends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum End {
    Completed,
    /// `x-mock-incomplete`: stopped at `max_output_tokens`.
    Incomplete,
    /// `x-mock-failed`: a server error after the text.
    Failed,
}

pub(crate) struct Resp {
    pub(crate) plan: Plan,
    /// The request, whose parameters the response echoes.
    pub(crate) request: Value,
    /// Web searches run (`x-mock-searches`, when the request offers the tool).
    pub(crate) searches: u64,
    pub(crate) end: End,
    /// The seed's hex, for the items' ids.
    pub(crate) ids: String,
}

/// Whether `tools` offers OpenAI's hosted web search.
pub(crate) fn offers_web_search(tools: &Value) -> bool {
    tools.as_array().is_some_and(|t| {
        t.iter().any(|t| {
            matches!(
                t["type"].as_str(),
                Some(
                    "web_search"
                        | "web_search_preview"
                        | "web_search_preview_2025_03_11"
                        | "web_search_2025_08_26"
                )
            )
        })
    })
}

pub(crate) async fn responses(
    conn: &mut Conn,
    req: Request,
    state: &State,
) -> std::io::Result<bool> {
    if let Some(status) = req.num("x-mock-status") {
        return openai_status(conn, &req, state, status as u16).await;
    }
    let Some(body) = body_object(&req) else {
        return openai_bad_request(conn, &req, state).await;
    };
    let prompt = (text_bytes(&body["input"]) + text_bytes(&body["instructions"])).div_ceil(4);
    let digest = seed(&body);
    let plan = Plan::base(
        &req,
        format!("resp_{}", hex(&digest[..24])),
        body["model"].as_str().unwrap_or("mock/model").to_string(),
        prompt,
    );
    let r = Resp {
        searches: if offers_web_search(&body["tools"]) {
            req.num("x-mock-searches").unwrap_or(1)
        } else {
            0
        },
        end: if req.header("x-mock-failed").is_some() {
            End::Failed
        } else if req.header("x-mock-incomplete").is_some() {
            End::Incomplete
        } else {
            End::Completed
        },
        ids: hex(&digest[8..32]),
        request: body,
        plan,
    };
    if r.request["stream"].as_bool() == Some(true) {
        let steps = r.stream_steps();
        let outcome = if r.end == End::Failed {
            "failed"
        } else {
            "complete"
        };
        script(
            conn,
            &req,
            &r.plan,
            state,
            &steps,
            &|sent| r.billed(sent),
            outcome,
        )
        .await
    } else {
        if !r.plan.delay.is_zero() {
            tokio::time::sleep(r.plan.delay).await;
        }
        let raw = serde_json::to_vec(&r.response_object()).unwrap();
        let billed = r.billed(r.plan.chunks);
        send_json(conn, &req, &r.plan, state, raw, billed).await
    }
}

impl Resp {
    /// The request's `key`, or `default` when it has none.
    fn echo(&self, key: &str, default: Value) -> Value {
        match self.request.get(key) {
            Some(v) if !v.is_null() => v.clone(),
            _ => default,
        }
    }

    pub(crate) fn usage(&self, sent: u64) -> Value {
        let p = &self.plan;
        let output = sent + p.reasoning;
        json!({
            "input_tokens": p.prompt,
            "input_tokens_details": {"cached_tokens": p.cached},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": p.reasoning},
            "total_tokens": p.prompt + output,
        })
    }

    pub(crate) fn billed(&self, sent: u64) -> Value {
        let p = &self.plan;
        bill(
            p.prompt,
            sent + p.reasoning,
            p.cached,
            0,
            p.reasoning,
            self.searches,
        )
    }

    fn reasoning_item(&self) -> Value {
        json!({"id": format!("rs_{}", self.ids), "type": "reasoning", "summary": []})
    }

    fn search_item(&self, k: u64, done: bool) -> Value {
        let id = format!("ws_{}{:02x}", self.ids, k);
        if done {
            json!({"id": id, "type": "web_search_call", "status": "completed",
                "action": {"type": "search", "query": format!("mock query {}", k + 1)}})
        } else {
            json!({"id": id, "type": "web_search_call", "status": "in_progress"})
        }
    }

    fn message_id(&self) -> String {
        format!("msg_{}", self.ids)
    }

    fn text_part(text: &str) -> Value {
        json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text})
    }

    fn message_item(&self, status: &str, content: Vec<Value>) -> Value {
        json!({"id": self.message_id(), "type": "message", "status": status,
            "role": "assistant", "content": content})
    }

    /// The items before the message: reasoning, then the searches.
    fn leading_items(&self) -> Vec<Value> {
        let mut out = Vec::new();
        if self.plan.reasoning > 0 {
            out.push(self.reasoning_item());
        }
        out.extend((0..self.searches).map(|k| self.search_item(k, true)));
        out
    }

    /// The status of the message item once its text is out.
    fn message_status(&self) -> &'static str {
        match self.end {
            End::Completed => "completed",
            End::Incomplete | End::Failed => "incomplete",
        }
    }

    /// The `response` object: `status` with `output` and `usage` (null while in progress).
    fn response(&self, status: &str, output: Vec<Value>, usage: Value) -> Value {
        let (error, incomplete) = match status {
            "failed" => (
                json!({"code": "server_error",
                    "message": "The server had an error while processing your request. Sorry about that!"}),
                Value::Null,
            ),
            "incomplete" => (Value::Null, json!({"reason": "max_output_tokens"})),
            _ => (Value::Null, Value::Null),
        };
        json!({
            "id": self.plan.id,
            "object": "response",
            "created_at": self.plan.created,
            "status": status,
            "background": self.echo("background", json!(false)),
            "error": error,
            "incomplete_details": incomplete,
            "instructions": self.echo("instructions", Value::Null),
            "max_output_tokens": self.echo("max_output_tokens", Value::Null),
            "max_tool_calls": self.echo("max_tool_calls", Value::Null),
            "model": self.plan.model,
            "output": output,
            "parallel_tool_calls": self.echo("parallel_tool_calls", json!(true)),
            "previous_response_id": self.echo("previous_response_id", Value::Null),
            "prompt_cache_key": self.echo("prompt_cache_key", Value::Null),
            "reasoning": self.echo("reasoning", json!({"effort": null, "summary": null})),
            "safety_identifier": self.echo("safety_identifier", Value::Null),
            "service_tier": self.echo("service_tier", json!("default")),
            "store": self.echo("store", json!(true)),
            "temperature": self.echo("temperature", json!(1.0)),
            "text": self.echo("text", json!({"format": {"type": "text"}, "verbosity": "medium"})),
            "tool_choice": self.echo("tool_choice", json!("auto")),
            "tools": self.echo("tools", json!([])),
            "top_logprobs": self.echo("top_logprobs", json!(0)),
            "top_p": self.echo("top_p", json!(1.0)),
            "truncation": self.echo("truncation", json!("disabled")),
            "usage": usage,
            "user": self.echo("user", Value::Null),
            "metadata": self.echo("metadata", json!({})),
        })
    }

    fn terminal_status(&self) -> &'static str {
        match self.end {
            End::Completed => "completed",
            End::Incomplete => "incomplete",
            End::Failed => "failed",
        }
    }

    /// The non-streamed answer.
    pub(crate) fn response_object(&self) -> Value {
        let mut output = self.leading_items();
        output.push(self.message_item(
            self.message_status(),
            vec![Self::text_part(&self.plan.text())],
        ));
        self.response(self.terminal_status(), output, self.usage(self.plan.chunks))
    }

    /// The streamed answer, event by event.
    pub(crate) fn stream_steps(&self) -> Vec<Step> {
        let plan = &self.plan;
        let mut seq = 0u64;
        let mut ev = |kind: &str, mut data: Value| {
            data["type"] = json!(kind);
            data["sequence_number"] = json!(seq);
            seq += 1;
            named(plan, kind, &data)
        };
        let mut steps = Vec::new();
        let progress = self.response("in_progress", vec![], Value::Null);
        steps.push(Step::Event(ev(
            "response.created",
            json!({"response": progress}),
        )));
        steps.push(Step::Event(ev(
            "response.in_progress",
            json!({"response": progress}),
        )));
        let mut index = 0u64;
        if plan.reasoning > 0 {
            let item = self.reasoning_item();
            steps.push(Step::Event(ev(
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            )));
            steps.push(Step::Event(ev(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            )));
            index += 1;
        }
        for k in 0..self.searches {
            let item_id = format!("ws_{}{:02x}", self.ids, k);
            steps.push(Step::Event(ev(
                "response.output_item.added",
                json!({"output_index": index, "item": self.search_item(k, false)}),
            )));
            for kind in [
                "response.web_search_call.in_progress",
                "response.web_search_call.searching",
                "response.web_search_call.completed",
            ] {
                steps.push(Step::Event(ev(
                    kind,
                    json!({"output_index": index, "item_id": item_id}),
                )));
            }
            steps.push(Step::Event(ev(
                "response.output_item.done",
                json!({"output_index": index, "item": self.search_item(k, true)}),
            )));
            index += 1;
        }
        let item_id = self.message_id();
        steps.push(Step::Event(ev(
            "response.output_item.added",
            json!({"output_index": index, "item": self.message_item("in_progress", vec![])}),
        )));
        steps.push(Step::Event(ev(
            "response.content_part.added",
            json!({"item_id": item_id, "output_index": index, "content_index": 0,
                "part": Self::text_part("")}),
        )));
        for i in 0..plan.chunks {
            steps.push(Step::Delta(ev(
                "response.output_text.delta",
                json!({"item_id": item_id, "output_index": index, "content_index": 0,
                    "delta": Plan::word(i), "logprobs": []}),
            )));
        }
        steps.push(Step::EndOfContent);
        let text = plan.text();
        let mut output = self.leading_items();
        if self.end == End::Failed {
            output.push(self.message_item("incomplete", vec![Self::text_part(&text)]));
            let response = self.response("failed", output, self.usage(plan.chunks));
            steps.push(Step::Event(ev(
                "response.failed",
                json!({"response": response}),
            )));
            return steps;
        }
        steps.push(Step::Event(ev(
            "response.output_text.done",
            json!({"item_id": item_id, "output_index": index, "content_index": 0,
                "text": text, "logprobs": []}),
        )));
        steps.push(Step::Event(ev(
            "response.content_part.done",
            json!({"item_id": item_id, "output_index": index, "content_index": 0,
                "part": Self::text_part(&text)}),
        )));
        let message = self.message_item(self.message_status(), vec![Self::text_part(&text)]);
        steps.push(Step::Event(ev(
            "response.output_item.done",
            json!({"output_index": index, "item": message}),
        )));
        output.push(message);
        let status = self.terminal_status();
        let response = self.response(status, output, self.usage(plan.chunks));
        steps.push(Step::Event(ev(
            &format!("response.{status}"),
            json!({"response": response}),
        )));
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(headers: &[(&str, &str)], body: Value) -> Resp {
        let req = Request {
            method: "POST".into(),
            path: "/v1/responses".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: serde_json::to_vec(&body).unwrap(),
        };
        let plan = Plan::base(&req, "resp_x".into(), "m".into(), 40);
        Resp {
            searches: if offers_web_search(&body["tools"]) {
                req.num("x-mock-searches").unwrap_or(1)
            } else {
                0
            },
            end: End::Completed,
            ids: "ab".into(),
            request: body,
            plan,
        }
    }

    #[test]
    fn usage_counts_cached_in_input_and_reasoning_in_output() {
        let r = resp(
            &[("x-mock-cached", "10"), ("x-mock-reasoning", "3")],
            json!({}),
        );
        let u = r.usage(5);
        assert_eq!(u["input_tokens"], 40);
        assert_eq!(u["input_tokens_details"]["cached_tokens"], 10);
        assert_eq!(u["output_tokens"], 8);
        assert_eq!(u["output_tokens_details"]["reasoning_tokens"], 3);
        assert_eq!(u["total_tokens"], 48);
        let b = r.billed(5);
        assert_eq!(
            b,
            json!({"prompt": 40, "completion": 8, "cached": 10, "cache_write": 0,
                "reasoning": 3, "web_searches": 0})
        );
    }

    #[test]
    fn web_search_items_come_before_the_message() {
        let r = resp(
            &[("x-mock-searches", "2")],
            json!({"tools": [{"type": "web_search"}]}),
        );
        let out = r.response_object()["output"].clone();
        let kinds: Vec<&str> = out
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["web_search_call", "web_search_call", "message"]);
        assert_eq!(r.billed(5)["web_searches"], 2);
        let none = resp(&[], json!({"tools": [{"type": "function", "name": "f"}]}));
        assert_eq!(none.searches, 0);
    }

    #[test]
    fn stream_sequence_numbers_count_up_and_it_ends_with_completed() {
        let r = resp(&[], json!({"tools": [{"type": "web_search_preview"}]}));
        let steps = r.stream_steps();
        let mut seqs = Vec::new();
        let mut last = String::new();
        for s in &steps {
            if let Step::Event(e) | Step::Delta(e) = s {
                let data = e.lines().nth(1).unwrap().strip_prefix("data: ").unwrap();
                let v: Value = serde_json::from_str(data).unwrap();
                seqs.push(v["sequence_number"].as_u64().unwrap());
                last = v["type"].as_str().unwrap().to_string();
                assert!(e.starts_with(&format!("event: {last}\n")));
            }
        }
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
        assert_eq!(last, "response.completed");
    }
}
