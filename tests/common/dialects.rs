//! Requests in each metered dialect, and the price table the dialect tests bill with.

use serde_json::Value;

use super::*;

/// Prices with every kind of token: an OpenAI model (Responses), an Anthropic one (Messages,
/// cache writes priced apart), an embedding model and a legacy completions model.
pub const DIALECT_PRICING: &str = r#"
[pricing]
unknown_model = "unpriced"
[pricing.models."gpt-5"]
input_per_mtok = 1.25
cached_input_per_mtok = 0.125
output_per_mtok = 10
per_web_search = 0.01
[pricing.models."claude-sonnet-4-5"]
input_per_mtok = 3
cached_input_per_mtok = 0.3
cache_write_per_mtok = 3.75
output_per_mtok = 15
per_web_search = 0.01
[pricing.models."text-embedding-3-small"]
input_per_mtok = 0.02
output_per_mtok = 0
[pricing.models."gpt-3.5-turbo-instruct"]
input_per_mtok = 1.5
output_per_mtok = 2
[pricing.models."anthropic/claude-opus-4.6"]
input_per_mtok = 5
cached_input_per_mtok = 0.5
output_per_mtok = 25
per_web_search = 0.005
"#;

/// pico-USD per unit of [`DIALECT_PRICING`]: (input, cached, cache write, output, search).
pub fn prices(model: &str) -> (u64, u64, u64, u64, u64) {
    match model {
        "gpt-5" => (1_250_000, 125_000, 1_562_500, 10_000_000, 10_000_000_000),
        "claude-sonnet-4-5" => (3_000_000, 300_000, 3_750_000, 15_000_000, 10_000_000_000),
        "text-embedding-3-small" => (20_000, 20_000, 25_000, 0, 0),
        "gpt-3.5-turbo-instruct" => (1_500_000, 1_500_000, 1_875_000, 2_000_000, 0),
        "anthropic/claude-opus-4.6" => (5_000_000, 500_000, 6_250_000, 25_000_000, 5_000_000_000),
        m => panic!("no test price for {m}"),
    }
}

/// One metered API, as a client calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Chat,
    Responses,
    Messages,
    Embeddings,
    Completions,
}

impl Dialect {
    pub const ALL: [Dialect; 5] = [
        Dialect::Chat,
        Dialect::Responses,
        Dialect::Messages,
        Dialect::Embeddings,
        Dialect::Completions,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Dialect::Chat => "/v1/chat/completions",
            Dialect::Responses => "/v1/responses",
            Dialect::Messages => "/v1/messages",
            Dialect::Embeddings => "/v1/embeddings",
            Dialect::Completions => "/v1/completions",
        }
    }

    /// The record's `api`.
    pub fn api(self) -> &'static str {
        match self {
            Dialect::Chat => "chat_completions",
            Dialect::Responses => "responses",
            Dialect::Messages => "messages",
            Dialect::Embeddings => "embeddings",
            Dialect::Completions => "completions",
        }
    }

    pub fn model(self) -> &'static str {
        match self {
            Dialect::Chat => "anthropic/claude-opus-4.6",
            Dialect::Responses => "gpt-5",
            Dialect::Messages => "claude-sonnet-4-5",
            Dialect::Embeddings => "text-embedding-3-small",
            Dialect::Completions => "gpt-3.5-turbo-instruct",
        }
    }

    pub fn streams(self) -> bool {
        self != Dialect::Embeddings
    }

    /// A request body for `user`, streamed or not, with a web search tool where the dialect
    /// has one.
    pub fn body(self, user: &str, stream: bool, search: bool) -> Vec<u8> {
        let model = self.model();
        let v = match self {
            Dialect::Chat => {
                let mut v = serde_json::json!({"model": model, "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Say something about tokens, please."}],
                    "stream": stream, "user": user, "max_tokens": 64});
                if search {
                    v["tools"] = serde_json::json!([{"type": "octen_search"}]);
                }
                v
            }
            Dialect::Responses => {
                let mut v = serde_json::json!({"model": model,
                    "input": [{"role": "user", "content": [{"type": "input_text", "text": "Say something about tokens, please."}]}],
                    "instructions": "Be brief.", "stream": stream, "safety_identifier": user,
                    "max_output_tokens": 64});
                if search {
                    v["tools"] = serde_json::json!([{"type": "web_search"}]);
                    v["max_tool_calls"] = serde_json::json!(3);
                }
                v
            }
            Dialect::Messages => {
                let mut v = serde_json::json!({"model": model, "max_tokens": 64,
                    "system": "Be brief.",
                    "messages": [{"role": "user", "content": "Say something about tokens, please."}],
                    "metadata": {"user_id": user}, "stream": stream});
                if search {
                    v["tools"] = serde_json::json!([{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]);
                }
                v
            }
            Dialect::Embeddings => {
                serde_json::json!({"model": model, "input": ["tokens are", "counted"], "user": user})
            }
            Dialect::Completions => serde_json::json!({"model": model,
                "prompt": "Say something about tokens, please.", "max_tokens": 64,
                "stream": stream, "user": user}),
        };
        serde_json::to_vec(&v).unwrap()
    }

    /// Headers every call of the dialect carries (Anthropic's version header).
    pub fn headers(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Dialect::Messages => vec![
                ("anthropic-version", "2023-06-01"),
                ("anthropic-beta", "prompt-caching-2024-07-31"),
                ("content-type", "application/json"),
            ],
            _ => vec![("content-type", "application/json")],
        }
    }
}

/// The cost of a bill (the mock's `billed`) at [`DIALECT_PRICING`].
pub fn cost_of_bill(model: &str, bill: &Value) -> u64 {
    let (input, cached, write, output, search) = prices(model);
    let n = |k: &str| bill[k].as_u64().unwrap_or(0);
    (n("prompt") - n("cached") - n("cache_write")) * input
        + n("cached") * cached
        + n("cache_write") * write
        + n("completion") * output
        + n("web_searches") * search
}

/// The record says what the upstream billed, to the token, and costs what the bill costs.
pub fn assert_record_is_the_bill(rec: &Value, bill: &Value, model: &str) {
    assert_eq!(rec["prompt_tokens"], bill["prompt"], "{rec}\n{bill}");
    assert_eq!(
        rec["completion_tokens"], bill["completion"],
        "{rec}\n{bill}"
    );
    assert_eq!(rec["cached_tokens"], bill["cached"], "{rec}\n{bill}");
    assert_eq!(
        rec["cache_write_tokens"], bill["cache_write"],
        "{rec}\n{bill}"
    );
    assert_eq!(rec["web_searches"], bill["web_searches"], "{rec}\n{bill}");
    if rec["api"] != "messages" {
        // (Anthropic reports thinking tokens inside the output only.)
        assert_eq!(rec["reasoning_tokens"], bill["reasoning"], "{rec}\n{bill}");
    }
    assert!(!rec["cost_usd"].is_null(), "priced: {rec}");
    assert_eq!(pico_of(rec), cost_of_bill(model, bill), "{rec}\n{bill}");
}

/// One call of dialect `d` to `addr`, with the dialect's headers and `extra`.
pub fn call(addr: std::net::SocketAddr, d: Dialect, extra: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut h = d.headers();
    h.extend_from_slice(extra);
    request(addr, "POST", d.path(), &h, body)
}

/// A capped user sending 64 calls at once, mixed across chat, Responses and Messages, spends at
/// most the cap plus one call's worst case; refused calls never reach the upstream.
pub fn mixed_dialects_hold_the_cap(tap: &Tap, mock: &Mock, cap_pico: u64) {
    let n = 64;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let d = [Dialect::Chat, Dialect::Responses, Dialect::Messages][i % 3];
            let (addr, barrier) = (tap.addr, std::sync::Arc::clone(&barrier));
            std::thread::spawn(move || {
                let body = d.body("capped", i % 2 == 0, false);
                barrier.wait();
                (d, call(addr, d, &[("x-mock-chunks", "20")], &body))
            })
        })
        .collect();
    let answers: Vec<(Dialect, Resp)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let allowed = answers.iter().filter(|(_, r)| r.status == 200).count();
    let refused = answers.iter().filter(|(_, r)| r.status == 429).count();
    assert_eq!(allowed + refused, n, "every call was allowed or refused");
    assert!(
        allowed > 0 && refused > 0,
        "{allowed} allowed, {refused} refused"
    );
    for (d, r) in answers.iter().filter(|(_, r)| r.status == 429) {
        if *d == Dialect::Messages {
            assert_eq!(r.json()["error"]["type"], "rate_limit_error");
        } else {
            assert_eq!(r.json()["error"]["code"], "budget_exceeded");
        }
    }
    let recs = tap.wait_records(n);
    let spent: u64 = recs
        .iter()
        .filter(|r| r["user"] == "capped" && r["status"] == 200)
        .map(pico_of)
        .sum();
    // The dearest single call's worst case: 64 output tokens of Claude at $15/MTok and its
    // prompt written to the cache, far above any real call here.
    let worst = 64 * 25_000_000 + 200 * 6_250_000;
    assert!(
        spent <= cap_pico + worst,
        "spent {spent} pico over a cap of {cap_pico}"
    );
    let reqs = mock.wait_requests(allowed);
    assert_eq!(
        reqs.len(),
        allowed,
        "refused calls never reached the upstream"
    );
    let billed: u64 = reqs
        .iter()
        .map(|q| {
            let model = serde_json::from_str::<Value>(q["body"].as_str().unwrap()).unwrap()
                ["model"]
                .as_str()
                .unwrap()
                .to_string();
            cost_of_bill(&model, &q["billed"])
        })
        .sum();
    assert_eq!(spent, billed, "the spend is what the upstream billed");
}
