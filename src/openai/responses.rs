//! The usage rule of OpenAI's Responses API (`POST /v1/responses`).
//!
//! - A whole answer is a `response` object; a stream is typed events (`event:` lines, no
//!   `[DONE]`) ending in `response.completed`, `response.incomplete` or `response.failed`,
//!   whose `response` carries the usage. A stream cut before it has no usage: the call is
//!   estimated from what was delivered.
//! - `usage.input_tokens` includes `input_tokens_details.cached_tokens`; `output_tokens`
//!   includes `output_tokens_details.reasoning_tokens` (tokentap's own convention).
//! - Each `web_search_call` output item is one search (a declared tool that never ran costs
//!   nothing). Items are counted once by id, whether they arrive as events, in the final
//!   `response`, or both.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::response::{field, note_error, Count, Observed};
use crate::meter::Usage;

/// What a Responses stream's usage rule keeps between events.
#[derive(Debug, Default)]
pub(super) struct State {
    /// Ids of the `web_search_call` items seen.
    searches: std::collections::HashSet<String>,
}

/// The most search ids kept for counting each once.
const MAX_IDS: usize = 4096;

/// One stream event (or the fields of one that the tap reads).
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    delta: Option<&'a RawValue>,
    #[serde(borrow, default)]
    item: Option<&'a RawValue>,
    #[serde(borrow, default)]
    response: Option<&'a RawValue>,
}

/// A `response` object.
#[derive(Deserialize)]
struct ResponseObject<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    status: Option<&'a RawValue>,
    #[serde(borrow, default)]
    incomplete_details: Option<&'a RawValue>,
    #[serde(borrow, default)]
    output: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Item<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default)]
    summary: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default)]
    arguments: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Text<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    refusal: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct UsageView<'a> {
    #[serde(borrow, default)]
    input_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    output_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input_tokens_details: Option<&'a RawValue>,
    #[serde(borrow, default)]
    output_tokens_details: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Details<'a> {
    #[serde(borrow, default)]
    cached_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    reasoning_tokens: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Incomplete<'a> {
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
}

fn count(r: Option<&RawValue>) -> Option<u64> {
    field::<Count>(r).map(|c| c.0)
}

/// A Responses `usage` object in tokentap's terms; `None` without input or output counts.
fn usage_from(raw: Option<&RawValue>) -> Option<Usage> {
    let u: UsageView = field(raw)?;
    let (input, output) = (count(u.input_tokens), count(u.output_tokens));
    if input.is_none() && output.is_none() {
        return None;
    }
    let detail = |r| field::<Details>(r);
    Some(Usage {
        prompt: input.unwrap_or(0),
        completion: output.unwrap_or(0),
        cached: detail(u.input_tokens_details)
            .and_then(|d| count(d.cached_tokens))
            .unwrap_or(0),
        cache_write: 0,
        cache_write_1h: 0,
        reasoning: detail(u.output_tokens_details)
            .and_then(|d| count(d.reasoning_tokens))
            .unwrap_or(0),
        web_searches: 0,
    })
}

impl State {
    /// One stream event's data.
    pub(super) fn on_event(&mut self, obs: &mut Observed, data: &[u8]) {
        let Ok(e) = serde_json::from_slice::<Event>(data) else {
            return;
        };
        let kind = e.kind.as_deref().unwrap_or_default();
        match kind {
            // Text the model generates: output text, refusals, reasoning, tool arguments.
            "response.output_text.delta"
            | "response.refusal.delta"
            | "response.reasoning_text.delta"
            | "response.reasoning_summary_text.delta"
            | "response.function_call_arguments.delta"
            | "response.custom_tool_call_input.delta" => {
                if let Some(d) = field::<Cow<str>>(e.delta).filter(|d| !d.is_empty()) {
                    obs.content_chunks += 1;
                    obs.content_bytes += d.len() as u64;
                    if kind == "response.output_text.delta" {
                        obs.capture(&d);
                    }
                }
            }
            "response.output_item.added" | "response.output_item.done" => {
                if let Some(item) = field::<Item>(e.item) {
                    self.item(obs, &item, false);
                }
            }
            "response.created"
            | "response.in_progress"
            | "response.queued"
            | "response.completed"
            | "response.incomplete"
            | "response.failed" => {
                let terminal = matches!(
                    kind,
                    "response.completed" | "response.incomplete" | "response.failed"
                );
                if let Some(r) = field::<ResponseObject>(e.response) {
                    self.response(obs, r, terminal, false);
                }
                if terminal {
                    obs.done = true;
                }
            }
            "error" => {
                // `{"type":"error","code":…,"message":…}`: the code is its identifier.
                if let Ok(raw) = serde_json::from_slice::<&RawValue>(data) {
                    note_error(obs, raw);
                }
            }
            _ => {}
        }
    }

    /// A whole (non-streamed) answer: a `response` object, or an error.
    pub(super) fn apply_body(
        &mut self,
        obs: &mut Observed,
        json: &[u8],
    ) -> Result<(), serde_json::Error> {
        let r: ResponseObject = serde_json::from_slice(json)?;
        self.response(obs, r, true, true);
        Ok(())
    }

    fn response(&mut self, obs: &mut Observed, r: ResponseObject, terminal: bool, whole: bool) {
        if obs.response_id.is_none() {
            obs.response_id = field::<Cow<str>>(r.id).map(Cow::into_owned);
        }
        if obs.response_model.is_none() {
            obs.response_model = field::<Cow<str>>(r.model).map(Cow::into_owned);
        }
        for raw in r.output.iter().flatten() {
            if let Some(item) = field::<Item>(Some(raw)) {
                self.item(obs, &item, whole);
            }
        }
        if let Some(raw) = r.error.filter(|e| e.get() != "null") {
            note_error(obs, raw);
        }
        if !terminal {
            return;
        }
        if let Some(u) = usage_from(r.usage) {
            obs.usage = Some(u);
            obs.searches_reported = false;
        }
        let reason = field::<Incomplete>(r.incomplete_details)
            .and_then(|d| d.reason)
            .or_else(|| field::<Cow<str>>(r.status));
        if let Some(reason) = reason {
            if !obs.finish_reasons.iter().any(|x| *x == reason) {
                obs.finish_reasons.push(reason.into_owned());
            }
        }
    }

    /// An output item: a web search (counted once by id), or, in a whole answer, generated
    /// text.
    fn item(&mut self, obs: &mut Observed, item: &Item, whole: bool) {
        match item.kind.as_deref() {
            Some("web_search_call") => {
                let id = item.id.as_deref().unwrap_or_default();
                // (Past a few thousand ids, no real answer's, each item counts.)
                let new = id.is_empty()
                    || self.searches.len() >= MAX_IDS
                    || self.searches.insert(id.to_string());
                if new {
                    obs.search_ran = true;
                    obs.search_queries += 1;
                }
            }
            _ if whole => {
                let mut bytes = item.arguments.as_ref().map_or(0, |a| a.len() as u64);
                for part in item.content.iter().chain(&item.summary).flatten() {
                    if let Some(t) = field::<Text>(Some(part)) {
                        if let Some(text) = &t.text {
                            bytes += text.len() as u64;
                            if item.kind.as_deref() == Some("message") {
                                obs.capture(text);
                            }
                        }
                        bytes += t.refusal.map_or(0, |r| r.len() as u64);
                    }
                }
                if bytes > 0 {
                    obs.content_chunks += 1;
                    obs.content_bytes += bytes;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::response::tests::split;
    use super::super::response::{BodyKind, Observed};
    use crate::meter::{Api, Usage, WebSearchSource};
    use proptest::prelude::*;

    /// A streamed Responses call as OpenAI sends it: typed events, a web search, reasoning,
    /// text, and the usage in `response.completed` (no `[DONE]`).
    const STREAM: &str = concat!(
        "event: response.created\n",
        "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"gpt-5\",\"output\":[],\"usage\":null}}\n\n",
        "event: response.output_item.added\n",
        "data: {\"type\":\"response.output_item.added\",\"sequence_number\":1,\"output_index\":0,\"item\":{\"type\":\"web_search_call\",\"id\":\"ws_1\",\"status\":\"in_progress\"}}\n\n",
        "event: response.output_item.done\n",
        "data: {\"type\":\"response.output_item.done\",\"sequence_number\":2,\"output_index\":0,\"item\":{\"type\":\"web_search_call\",\"id\":\"ws_1\",\"status\":\"completed\",\"action\":{\"type\":\"search\",\"query\":\"q\"}}}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":3,\"item_id\":\"msg_1\",\"output_index\":1,\"content_index\":0,\"delta\":\"h\u{e9}llo \"}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_1\",\"output_index\":1,\"content_index\":0,\"delta\":\"world\"}\n\n",
        "event: response.completed\n",
        "data: {\"type\":\"response.completed\",\"sequence_number\":5,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"gpt-5-2025-08-07\",",
        "\"output\":[{\"type\":\"web_search_call\",\"id\":\"ws_1\",\"status\":\"completed\"},{\"type\":\"message\",\"id\":\"msg_1\",\"content\":[{\"type\":\"output_text\",\"text\":\"h\u{e9}llo world\"}]}],",
        "\"usage\":{\"input_tokens\":100,\"input_tokens_details\":{\"cached_tokens\":40},\"output_tokens\":30,\"output_tokens_details\":{\"reasoning_tokens\":12},\"total_tokens\":130}}}\n\n",
    );

    fn run(kind: BodyKind, parts: &[&[u8]]) -> Observed {
        super::super::response::tests::run_as(Api::Responses, kind, None, parts)
    }

    #[test]
    fn a_responses_stream_yields_usage_and_searches() {
        let o = run(BodyKind::Sse, &[STREAM.as_bytes()]);
        assert_eq!(o.response_id.as_deref(), Some("resp_1"));
        assert_eq!(o.response_model.as_deref(), Some("gpt-5"));
        assert_eq!(
            o.reported_usage(),
            Some(Usage {
                prompt: 100,
                completion: 30,
                cached: 40,
                cache_write: 0,
                cache_write_1h: 0,
                reasoning: 12,
                // The one web_search_call item, seen three times.
                web_searches: 1,
            })
        );
        assert_eq!(o.web_searches(), Some((1, WebSearchSource::Counted)));
        assert_eq!(o.finish_reasons, vec!["completed"]);
        assert_eq!(o.content_chunks, 2);
        assert_eq!(o.content_bytes, "héllo world".len() as u64);
        assert!(o.done);
    }

    #[test]
    fn a_cut_responses_stream_has_no_usage_but_its_content() {
        let cut = &STREAM[..STREAM.find("event: response.completed").unwrap()];
        let o = run(BodyKind::Sse, &[cut.as_bytes()]);
        assert_eq!(o.reported_usage(), None);
        assert_eq!(o.content_bytes, "héllo world".len() as u64);
        assert_eq!(o.web_searches(), Some((1, WebSearchSource::Counted)));
        assert!(!o.done);
        let e = o.estimate(400);
        assert_eq!((e.prompt, e.completion, e.web_searches), (100, 3, 1));
    }

    #[test]
    fn an_incomplete_response_is_billed_and_says_why() {
        let body = r#"{"id":"resp_2","object":"response","status":"incomplete","model":"gpt-5",
            "incomplete_details":{"reason":"max_output_tokens"},"error":null,
            "output":[{"type":"reasoning","id":"rs_1","summary":[]}],
            "usage":{"input_tokens":7,"input_tokens_details":{"cached_tokens":0},"output_tokens":16,
            "output_tokens_details":{"reasoning_tokens":16},"total_tokens":23}}"#;
        let o = run(BodyKind::Json, &[body.as_bytes()]);
        assert_eq!(o.finish_reasons, vec!["max_output_tokens"]);
        let u = o.reported_usage().unwrap();
        assert_eq!((u.prompt, u.completion, u.reasoning), (7, 16, 16));
        assert_eq!(o.web_searches(), None, "no search ran: none billed");
        assert_eq!(o.upstream_error, None);
    }

    #[test]
    fn a_declared_search_tool_that_never_ran_costs_nothing() {
        let body = r#"{"id":"r","status":"completed","tools":[{"type":"web_search"}],
            "output":[{"type":"message","id":"m","content":[{"type":"output_text","text":"hi"}]}],
            "usage":{"input_tokens":3,"output_tokens":1}}"#;
        let o = run(BodyKind::Json, &[body.as_bytes()]);
        assert_eq!(o.reported_usage().unwrap().web_searches, 0);
        assert_eq!(o.content_bytes, 2);
    }

    #[test]
    fn an_error_answer_is_noted() {
        let body =
            r#"{"error":{"message":"bad","type":"invalid_request_error","param":null,"code":"x"}}"#;
        let o = run(BodyKind::Json, &[body.as_bytes()]);
        assert_eq!(
            o.upstream_error_type.as_deref(),
            Some("invalid_request_error")
        );
        assert_eq!(o.reported_usage(), None);
        let s = "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"m\",\"sequence_number\":2}\n\n";
        let o = run(BodyKind::Sse, &[s.as_bytes()]);
        assert_eq!(o.upstream_error_type.as_deref(), Some("error"));
    }

    proptest! {
        /// Any split of the stream gives the same observation.
        #[test]
        fn any_split_of_a_responses_stream_gives_the_same_usage(
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let whole = run(BodyKind::Sse, &[STREAM.as_bytes()]);
            let parts = split(STREAM.as_bytes(), &cuts);
            prop_assert_eq!(run(BodyKind::Sse, &parts), whole);
        }
    }
}
