//! OpenAI's embeddings (`POST /v1/embeddings`) and legacy completions (`POST /v1/completions`).

use serde_json::{json, Value};

use crate::http::Request;
use crate::stream::{event, script, Step};
use crate::{
    bill, body_object, hex, openai_bad_request, openai_status, seed, send_json, text_bytes,
    usage_style, Conn, Plan, State, UsageStyle,
};

/// Token ids in an embeddings input: every number counts one token.
fn token_ids(v: &Value) -> u64 {
    match v {
        Value::Number(_) => 1,
        Value::Array(a) => a.iter().map(token_ids).sum(),
        _ => 0,
    }
}

/// The tokenizer's count of an embeddings input: its strings' bytes / 4, and its token ids.
pub(crate) fn embedding_tokens(input: &Value) -> u64 {
    text_bytes(input).div_ceil(4) + token_ids(input)
}

/// How many embeddings an input asks for: one for a string or a list of token ids, one per
/// item of a list of strings or of lists of ids.
fn inputs(input: &Value) -> usize {
    match input {
        Value::Array(a) if a.iter().all(Value::is_number) => 1,
        Value::Array(a) => a.len(),
        _ => 1,
    }
}

/// Standard base64 (the `encoding_format: base64` embeddings).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub(crate) async fn embeddings(
    conn: &mut Conn,
    req: Request,
    state: &State,
) -> std::io::Result<bool> {
    if let Some(status) = req.num("x-mock-status") {
        return openai_status(conn, &req, state, status as u16).await;
    }
    let Some(body) = body_object(&req).filter(|b| !b["input"].is_null()) else {
        return openai_bad_request(conn, &req, state).await;
    };
    let prompt = embedding_tokens(&body["input"]);
    let digest = seed(&body);
    let plan = Plan::base(
        &req,
        String::new(),
        body["model"]
            .as_str()
            .unwrap_or("mock/embedding")
            .to_string(),
        prompt,
    );
    let dims = body["dimensions"].as_u64().unwrap_or(8).clamp(1, 4096) as usize;
    let b64 = body["encoding_format"].as_str() == Some("base64");
    let data: Vec<Value> = (0..inputs(&body["input"]))
        .map(|i| {
            let floats: Vec<f32> = (0..dims)
                .map(|j| (digest[(i * 7 + j) % 32] as f32 - 127.5) / 1275.0)
                .collect();
            let embedding = if b64 {
                let bytes: Vec<u8> = floats.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64(&bytes))
            } else {
                json!(floats)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let v = json!({
        "object": "list",
        "data": data,
        "model": plan.model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    });
    if !plan.delay.is_zero() {
        tokio::time::sleep(plan.delay).await;
    }
    let raw = serde_json::to_vec(&v).unwrap();
    send_json(conn, &req, &plan, state, raw, bill(prompt, 0, 0, 0, 0, 0)).await
}

pub(crate) async fn completions(
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
    let digest = seed(&body);
    let plan = Plan {
        usage_style: usage_style(&req),
        usage_asked: body["stream_options"]["include_usage"].as_bool() == Some(true),
        event_lines: req.header("x-mock-event-lines").is_some(),
        ..Plan::base(
            &req,
            format!("cmpl-{}", hex(&digest[..12])),
            body["model"].as_str().unwrap_or("mock/model").to_string(),
            text_bytes(&body["prompt"]).div_ceil(4),
        )
    };
    if body["stream"].as_bool() == Some(true) {
        let steps = completion_steps(&plan);
        script(
            conn,
            &req,
            &plan,
            state,
            &steps,
            &|sent| plan.billed(sent),
            "complete",
        )
        .await
    } else {
        if !plan.delay.is_zero() {
            tokio::time::sleep(plan.delay).await;
        }
        let v = json!({
            "id": plan.id,
            "object": "text_completion",
            "created": plan.created,
            "model": plan.model,
            "choices": [{"text": plan.text(), "index": 0, "logprobs": null,
                "finish_reason": "stop"}],
            "usage": plan.usage(plan.chunks),
        });
        let raw = serde_json::to_vec(&v).unwrap();
        send_json(conn, &req, &plan, state, raw, plan.billed(plan.chunks)).await
    }
}

/// A streamed completion: a chunk per word, the finish chunk, the usage chunk (as
/// `x-mock-usage` says), `[DONE]`.
pub(crate) fn completion_steps(plan: &Plan) -> Vec<Step> {
    let null_usage = plan.usage_style == UsageStyle::OpenAi && plan.usage_asked;
    let chunk = |choices: Value, usage: Option<Value>| {
        let mut v = json!({"id": plan.id, "object": "text_completion",
            "created": plan.created, "model": plan.model, "choices": choices});
        match usage {
            Some(u) => v["usage"] = u,
            None if null_usage => v["usage"] = Value::Null,
            None => {}
        }
        event(plan, None, &serde_json::to_string(&v).unwrap())
    };
    let choice = |text: String, finish: Value| json!([{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]);
    let mut steps: Vec<Step> = (0..plan.chunks)
        .map(|i| Step::Delta(chunk(choice(Plan::word(i), Value::Null), None)))
        .collect();
    steps.push(Step::EndOfContent);
    let with_finish = plan.usage_style == UsageStyle::WithFinish;
    steps.push(Step::Event(chunk(
        choice(String::new(), json!("stop")),
        with_finish.then(|| plan.usage(plan.chunks)),
    )));
    let usage_chunk = match plan.usage_style {
        UsageStyle::Target => true,
        UsageStyle::OpenAi => plan.usage_asked,
        UsageStyle::WithFinish => false,
    };
    if usage_chunk {
        steps.push(Step::Event(chunk(json!([]), Some(plan.usage(plan.chunks)))));
    }
    steps.push(Step::Event(event(plan, None, "[DONE]")));
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_inputs_are_counted_as_strings_or_ids() {
        assert_eq!(embedding_tokens(&json!("abcdefghi")), 3);
        assert_eq!(embedding_tokens(&json!(["abcd", "efgh"])), 2);
        assert_eq!(embedding_tokens(&json!([1, 2, 3])), 3);
        assert_eq!(embedding_tokens(&json!([[1, 2], [3]])), 3);
        assert_eq!(inputs(&json!("x")), 1);
        assert_eq!(inputs(&json!(["x", "y"])), 2);
        assert_eq!(inputs(&json!([1, 2, 3])), 1);
        assert_eq!(inputs(&json!([[1, 2], [3]])), 2);
    }

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
