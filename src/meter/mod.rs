//! Metering: token usage, money, and the [`UsageRecord`], the one seam between the proxy and
//! everything that observes it (access log, metrics, traces, ledger).

pub mod pricing;
pub mod provider;

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// Money in integer pico-USD (10^-12 USD). Never summed as floating point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pico(pub u64);

impl Pico {
    pub const PER_USD: u64 = 1_000_000_000_000;

    pub fn saturating_add(self, o: Pico) -> Pico {
        Pico(self.0.saturating_add(o.0))
    }

    /// The amount in USD as a float, for display and for Prometheus (which only has floats).
    pub fn as_usd_f64(self) -> f64 {
        self.0 as f64 / Self::PER_USD as f64
    }

    /// The amount as an exact decimal in USD (no exponent, no trailing zeros), written into
    /// `buf` without allocating: at most 21 bytes (`u64::MAX` is `18446744.073709551615`).
    pub fn decimal(self, buf: &mut [u8; 24]) -> &str {
        let mut end = buf.len();
        let mut put = |d: u8| {
            end -= 1;
            buf[end] = d;
        };
        let mut frac = self.0 % Self::PER_USD;
        if frac != 0 {
            let mut digits = 12;
            while frac.is_multiple_of(10) {
                frac /= 10;
                digits -= 1;
            }
            for _ in 0..digits {
                put(b'0' + (frac % 10) as u8);
                frac /= 10;
            }
            put(b'.');
        }
        let mut int = self.0 / Self::PER_USD;
        loop {
            put(b'0' + (int % 10) as u8);
            int /= 10;
            if int == 0 {
                break;
            }
        }
        std::str::from_utf8(&buf[end..]).unwrap_or_default()
    }
}

#[cfg(test)]
impl Pico {
    /// [`Pico::decimal`] the obvious way (integer part, twelve fraction digits with trailing
    /// zeros dropped), for tests to hold the fast one to.
    pub fn decimal_by_format(pico: u64) -> String {
        let (int, frac) = (pico / Self::PER_USD, pico % Self::PER_USD);
        if frac == 0 {
            int.to_string()
        } else {
            format!("{int}.{}", format!("{frac:012}").trim_end_matches('0'))
        }
    }
}

/// Exact decimal USD, e.g. `0.000123450000` is printed as `0.00012345`.
impl fmt::Display for Pico {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.decimal(&mut [0; 24]))
    }
}

/// Token usage of one call, as the upstream reported it (or as estimated).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Input tokens, cached ones included.
    pub prompt: u64,
    /// Output tokens, reasoning ones included.
    pub completion: u64,
    /// The part of `prompt` served from cache (cache reads).
    pub cached: u64,
    /// The part of `prompt` written to the cache (Anthropic's `cache_creation_input_tokens`),
    /// billed at its own price. Disjoint from `cached`.
    pub cache_write: u64,
    /// The part of `cache_write` kept for an hour (Anthropic's
    /// `cache_creation.ephemeral_1h_input_tokens`), dearer than five-minute writes.
    pub cache_write_1h: u64,
    /// The part of `completion` spent on reasoning.
    pub reasoning: u64,
    /// Web searches the upstream ran and bills.
    pub web_searches: u64,
}

/// The API dialect of a metered call: which request and response shapes it speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// OpenAI Chat Completions (`POST /v1/chat/completions`), the target API's own.
    #[default]
    ChatCompletions,
    /// OpenAI Responses (`POST /v1/responses`).
    Responses,
    /// Anthropic Messages (`POST /v1/messages`).
    Messages,
    /// OpenAI Embeddings (`POST /v1/embeddings`).
    Embeddings,
    /// OpenAI legacy Completions (`POST /v1/completions`).
    Completions,
}

impl Api {
    pub const ALL: [Api; 5] = [
        Api::ChatCompletions,
        Api::Responses,
        Api::Messages,
        Api::Embeddings,
        Api::Completions,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Api::ChatCompletions => "chat_completions",
            Api::Responses => "responses",
            Api::Messages => "messages",
            Api::Embeddings => "embeddings",
            Api::Completions => "completions",
        }
    }

    /// `gen_ai.operation.name` of the GenAI semantic conventions.
    pub fn operation(self) -> &'static str {
        match self {
            Api::ChatCompletions | Api::Responses | Api::Messages => "chat",
            Api::Embeddings => "embeddings",
            Api::Completions => "text_completion",
        }
    }

    pub fn from_name(name: &str) -> Option<Api> {
        Api::ALL.into_iter().find(|a| a.as_str() == name)
    }
}

/// Where the usage figures of a record come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The upstream's own `usage` object.
    Reported,
    /// Estimated by tokentap: the call was cut off before the upstream reported usage.
    Estimated,
    /// No usage: not a chat call, or the upstream answered with an error and billed nothing.
    None,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Estimated => "estimated",
            UsageSource::None => "none",
        }
    }
}

/// Where a record's web search count comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WebSearchSource {
    /// The upstream's own count (`num_search_queries`).
    Reported,
    /// Counted by tokentap from the search results the upstream sent (no count reported).
    Counted,
}

impl WebSearchSource {
    pub fn as_str(self) -> &'static str {
        match self {
            WebSearchSource::Reported => "reported",
            WebSearchSource::Counted => "counted",
        }
    }
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The upstream answered (2xx/3xx) and the whole response reached the client.
    Complete,
    /// The upstream answered with an error status, or could not be reached.
    UpstreamError,
    /// The upstream connection broke before the response was complete.
    UpstreamReset,
    /// The client went away before the response was complete.
    ClientDisconnected,
    /// The upstream did not answer within the configured timeout.
    Timeout,
    /// tokentap answered itself (bad request, body too large, over budget) without the upstream.
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamReset => "upstream_reset",
            Outcome::ClientDisconnected => "client_disconnected",
            Outcome::Timeout => "timeout",
            Outcome::Rejected => "rejected",
        }
    }
}

/// A traced call's place in its trace (W3C Trace Context), as plain facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The caller's span, from its `traceparent`.
    pub parent: Option<[u8; 8]>,
    /// The caller's `tracestate`, as received.
    pub tracestate: Option<String>,
}

/// Everything tokentap learned about one call. Built once, at the end of the call.
#[derive(Debug, Clone)]
pub struct UsageRecord {
    pub request_id: String,
    pub started_at: SystemTime,
    pub method: String,
    pub path: String,
    /// The dialect of a metered call (a `POST` to a path one of them serves); `None` for
    /// every other request, which passes through unmetered.
    pub api: Option<Api>,
    /// The class of an unmetered request's path (`models`, `files`, ..., `other`): a bounded
    /// label for the unmetered-requests metric. Empty for metered calls.
    pub path_class: &'static str,
    pub model: Option<String>,
    /// `gen_ai.provider.name` of a metered call's model ([`provider::Providers`]): the one name
    /// metrics, spans and the access log give the call's provider. `None` for other calls.
    pub provider: Option<std::sync::Arc<str>>,
    pub response_model: Option<String>,
    pub response_id: Option<String>,
    pub user: Option<String>,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    /// Tools requested: `octen_search`, `octen_broad_search`, `function:<name>`, ...
    pub tools: Vec<String>,
    pub web_search_requested: bool,
    /// HTTP status the client received (0 when none was sent).
    pub status: u16,
    /// The status the upstream answered with, if it answered.
    pub upstream_status: Option<u16>,
    pub outcome: Outcome,
    pub usage: Usage,
    pub usage_source: UsageSource,
    /// Where `usage.web_searches` comes from (`None`: no search ran).
    pub web_searches_source: Option<WebSearchSource>,
    /// tokentap asked the upstream for this stream's usage (`stream_options.include_usage`)
    /// and took the usage chunk out of what the client received.
    pub usage_injected: bool,
    /// Cost from the price table; `None` when the model is unpriced.
    pub cost: Option<Pico>,
    /// A cost the upstream reported itself (`usage.cost`), in USD as sent.
    pub upstream_cost_usd: Option<f64>,
    pub finish_reasons: Vec<String>,
    /// Web search ran (`search_results` or a `search_done` chunk/event).
    pub search_ran: bool,
    pub search_results: u64,
    pub warning: Option<String>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub content_chunks: u64,
    /// Time to the upstream's response head.
    pub ttfb: Option<Duration>,
    /// Time to the first content token (streams: first non-empty delta).
    pub ttft: Option<Duration>,
    /// From the first content token to the end of the response.
    pub generation: Option<Duration>,
    pub duration: Duration,
    /// A short description of what went wrong, for the log; never user content.
    pub error: Option<String>,
    /// The call's place in a trace, when it is traced (sampled).
    pub trace: Option<TraceContext>,
    /// What the request asked for beyond the model: sampling settings.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// The budget decision: "allowed", "refused", "fail_open" or "not_capped"; `None` when
    /// none ran.
    pub budget_decision: Option<&'static str>,
    /// The upstream error's `type` (else its `code`), if it sent one.
    pub upstream_error_type: Option<String>,
    /// From sending the request to the first chunk of a streamed response.
    pub time_to_first_chunk: Option<Duration>,
    /// Where the call went: the upstream's host and port, and `scheme://host[:port][/base]`.
    pub upstream_host: std::sync::Arc<str>,
    pub upstream_port: u16,
    pub url_base: std::sync::Arc<str>,
    /// Content kept for the call's span when the operator opted in (and it is traced): the
    /// request's `messages` as sent (the whole body when inspection did not find them), and
    /// the completion's text (at most `traces.max_content_bytes`).
    pub captured_input: Option<bytes::Bytes>,
    pub captured_output: Option<String>,
}

impl UsageRecord {
    /// The call spoke a dialect tokentap meters.
    pub fn metered(&self) -> bool {
        self.api.is_some()
    }
}

#[cfg(test)]
impl UsageRecord {
    /// A complete, non-streamed chat call of `alice`, for tests to adjust
    /// (`UsageRecord { model: …, ..UsageRecord::test_chat() }`).
    pub fn test_chat() -> Self {
        UsageRecord {
            request_id: "req-1".into(),
            started_at: std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            api: Some(Api::ChatCompletions),
            path_class: "",
            model: Some("m".into()),
            provider: Some("openai".into()),
            response_model: None,
            response_id: None,
            user: Some("alice".into()),
            stream: false,
            max_tokens: None,
            tools: Vec::new(),
            web_search_requested: false,
            status: 200,
            upstream_status: Some(200),
            outcome: Outcome::Complete,
            usage: Usage {
                prompt: 10,
                completion: 5,
                cached: 4,
                cache_write: 0,
                cache_write_1h: 0,
                reasoning: 2,
                web_searches: 0,
            },
            usage_source: UsageSource::Reported,
            web_searches_source: None,
            usage_injected: false,
            cost: None,
            upstream_cost_usd: None,
            finish_reasons: Vec::new(),
            search_ran: false,
            search_results: 0,
            warning: None,
            request_bytes: 0,
            response_bytes: 0,
            content_chunks: 0,
            ttfb: None,
            ttft: None,
            generation: None,
            duration: Duration::from_millis(5),
            error: None,
            trace: None,
            temperature: None,
            top_p: None,
            budget_decision: None,
            upstream_error_type: None,
            time_to_first_chunk: None,
            upstream_host: "api.example".into(),
            upstream_port: 443,
            url_base: "https://api.example".into(),
            captured_input: None,
            captured_output: None,
        }
    }
}

/// Token estimate for text the upstream did not count for us: about four bytes of UTF-8 per
/// token, never zero for non-empty text.
pub fn estimate_tokens(text_bytes: u64) -> u64 {
    text_bytes.div_ceil(4)
}

/// The one estimate of a call whose usage the upstream did not report (cut off, or never
/// recorded): the prompt from the request's text, the completion from the bytes it
/// delivered (what the response tap counted: content, or the bytes of an unread JSON answer), the searches as
/// counted. A call's record and its abandoned reservation are settled by this same figure.
///
/// `opening`: the usage a stream announced when it started (Anthropic's `message_start`),
/// when that is all it sent: its input figures are exact and kept; the output is the larger
/// of its count and the estimate.
pub fn estimate(
    prompt_text_bytes: u64,
    completion_bytes: u64,
    web_searches: u64,
    opening: Option<Usage>,
) -> Usage {
    let e = Usage {
        prompt: estimate_tokens(prompt_text_bytes),
        completion: estimate_tokens(completion_bytes),
        cached: 0,
        cache_write: 0,
        cache_write_1h: 0,
        reasoning: 0,
        web_searches,
    };
    match opening {
        Some(u) => Usage {
            completion: u.completion.max(e.completion),
            web_searches: u.web_searches.max(e.web_searches),
            ..u
        },
        None => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The allocation-free decimal equals the obvious one (integer part, twelve fraction
        /// digits with trailing zeros dropped).
        #[test]
        fn pico_decimal_equals_the_obvious_one(n: u64) {
            proptest::prop_assert_eq!(Pico(n).to_string(), Pico::decimal_by_format(n));
        }
    }

    #[test]
    fn pico_prints_exact_decimal_usd() {
        assert_eq!(Pico(0).to_string(), "0");
        assert_eq!(Pico(1).to_string(), "0.000000000001");
        assert_eq!(Pico(123_450_000).to_string(), "0.00012345");
        assert_eq!(Pico(2 * Pico::PER_USD + 500_000_000_000).to_string(), "2.5");
        assert_eq!(Pico(u64::MAX).to_string(), "18446744.073709551615");
        assert_eq!(Pico(7 * Pico::PER_USD).to_string(), "7");
        assert_eq!(Pico(Pico::PER_USD / 10).to_string(), "0.1");
    }

    #[test]
    fn estimates_are_never_zero_for_text() {
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(1), 1);
        assert_eq!(estimate_tokens(8), 2);
        assert_eq!(estimate_tokens(9), 3);
    }
}
