//! The usage rule of Anthropic's Messages API (`POST /v1/messages`).
//!
//! - `input_tokens` *excludes* cache reads (`cache_read_input_tokens`) and cache writes
//!   (`cache_creation_input_tokens`): tokentap's prompt is their sum, with the reads as
//!   `cached` and the writes as `cache_write` (priced apart).
//! - A stream's usage is `message_start`'s, with the non-null fields of each `message_delta`
//!   laid over it. Those fields are cumulative: they replace, never add (peers that add
//!   count cache tokens twice).
//! - `usage.server_tool_use.web_search_requests` counts the searches. A stream cut before its
//!   `message_delta` has only the opening figures: the input is exact, the output and the
//!   searches are counted from what was delivered (`server_tool_use` blocks named
//!   `web_search`).
//! - Errors are `{"type": "error", "error": {"type", "message"}}`, as a body or an `error`
//!   event.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::response::{field, note_error, Count, Observed};
use crate::meter::Usage;

/// The usage fields, each `None` until some event set it.
#[derive(Debug, Default, Clone, Copy)]
struct Fields {
    input: Option<u64>,
    cache_read: Option<u64>,
    cache_write: Option<u64>,
    /// Of the writes, those kept for an hour (`cache_creation.ephemeral_1h_input_tokens`).
    cache_write_1h: Option<u64>,
    output: Option<u64>,
    searches: Option<u64>,
}

impl Fields {
    fn from_raw(raw: Option<&RawValue>) -> Option<Fields> {
        let u: UsageView = field(raw)?;
        let count = |r: Option<&RawValue>| field::<Count>(r).map(|c| c.0);
        Some(Fields {
            input: count(u.input_tokens),
            cache_read: count(u.cache_read_input_tokens),
            cache_write: count(u.cache_creation_input_tokens),
            cache_write_1h: field::<CacheCreation>(u.cache_creation)
                .and_then(|c| count(c.ephemeral_1h_input_tokens)),
            output: count(u.output_tokens),
            searches: field::<ServerToolUse>(u.server_tool_use)
                .and_then(|s| count(s.web_search_requests)),
        })
    }

    /// `o`'s non-null fields laid over these (cumulative figures replace).
    fn lay(&mut self, o: Fields) {
        self.input = o.input.or(self.input);
        self.cache_read = o.cache_read.or(self.cache_read);
        self.cache_write = o.cache_write.or(self.cache_write);
        self.cache_write_1h = o.cache_write_1h.or(self.cache_write_1h);
        self.output = o.output.or(self.output);
        self.searches = o.searches.or(self.searches);
    }

    fn usage(&self) -> Option<Usage> {
        if self.input.is_none() && self.output.is_none() {
            return None;
        }
        let (read, write) = (self.cache_read.unwrap_or(0), self.cache_write.unwrap_or(0));
        Some(Usage {
            prompt: self
                .input
                .unwrap_or(0)
                .saturating_add(read)
                .saturating_add(write),
            completion: self.output.unwrap_or(0),
            cached: read,
            cache_write: write,
            cache_write_1h: self.cache_write_1h.unwrap_or(0).min(write),
            reasoning: 0,
            web_searches: self.searches.unwrap_or(0),
        })
    }
}

/// What a Messages stream's usage rule keeps between events.
#[derive(Debug, Default)]
pub(super) struct State {
    fields: Fields,
    /// The final `message_delta` (with its stop reason) or `message_stop` arrived: the
    /// figures are final. (Before, a stream cut short is estimated from what it delivered.)
    delta_seen: bool,
}

#[derive(Deserialize)]
struct UsageView<'a> {
    #[serde(borrow, default)]
    input_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    cache_read_input_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    cache_creation_input_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    output_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    server_tool_use: Option<&'a RawValue>,
    #[serde(borrow, default)]
    cache_creation: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct CacheCreation<'a> {
    #[serde(borrow, default)]
    ephemeral_1h_input_tokens: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ServerToolUse<'a> {
    #[serde(borrow, default)]
    web_search_requests: Option<&'a RawValue>,
}

/// A stream event, or a whole answer (a `message`, or an `error`).
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
    #[serde(borrow, default)]
    delta: Option<&'a RawValue>,
    #[serde(borrow, default)]
    content_block: Option<&'a RawValue>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
    // A whole message's own fields.
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stop_reason: Option<&'a RawValue>,
    #[serde(borrow, default)]
    content: Option<Vec<&'a RawValue>>,
}

/// A content block, or a block's delta: whichever text field it has.
#[derive(Deserialize)]
struct Block<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    thinking: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    partial_json: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stop_reason: Option<Cow<'a, str>>,
}

impl State {
    /// One stream event's data.
    pub(super) fn on_event(&mut self, obs: &mut Observed, data: &[u8]) {
        let Ok(e) = serde_json::from_slice::<Event>(data) else {
            return;
        };
        match e.kind.as_deref().unwrap_or_default() {
            "message_start" => {
                if let Some(m) = e
                    .message
                    .and_then(|m| serde_json::from_str::<Event>(m.get()).ok())
                {
                    self.message(obs, &m);
                    if let Some(f) = Fields::from_raw(m.usage) {
                        self.fields.lay(f);
                    }
                }
            }
            "content_block_start" => {
                if let Some(b) = field::<Block>(e.content_block) {
                    self.block(obs, &b, false);
                }
            }
            "content_block_delta" => {
                if let Some(d) = field::<Block>(e.delta) {
                    let text = d.text.as_deref().or(d.thinking.as_deref());
                    let bytes = text.map_or(0, str::len) + d.partial_json.map_or(0, |j| j.len());
                    if bytes > 0 {
                        obs.content_chunks += 1;
                        obs.content_bytes += bytes as u64;
                    }
                    if let Some(t) = d.text.as_deref() {
                        obs.capture(t);
                    }
                }
            }
            "message_delta" => {
                if let Some(f) = Fields::from_raw(e.usage) {
                    self.fields.lay(f);
                }
                if let Some(r) = field::<Block>(e.delta).and_then(|d| d.stop_reason) {
                    finish(obs, &r);
                    self.delta_seen = true;
                }
            }
            "message_stop" => {
                obs.done = true;
                self.delta_seen = true;
            }
            "error" => {
                if let Some(raw) = e.error {
                    note_error(obs, raw);
                }
            }
            _ => return,
        }
        self.publish(obs);
    }

    /// A whole (non-streamed) answer: a `message`, or an error.
    pub(super) fn apply_body(
        &mut self,
        obs: &mut Observed,
        json: &[u8],
    ) -> Result<(), serde_json::Error> {
        let m: Event = serde_json::from_slice(json)?;
        if let Some(raw) = m.error.filter(|e| e.get() != "null") {
            note_error(obs, raw);
        }
        self.message(obs, &m);
        for raw in m.content.iter().flatten() {
            if let Some(b) = field::<Block>(Some(raw)) {
                self.block(obs, &b, true);
            }
        }
        if let Some(f) = Fields::from_raw(m.usage) {
            self.fields.lay(f);
            self.delta_seen = true;
        }
        self.publish(obs);
        Ok(())
    }

    /// A message's id, model and stop reason.
    fn message(&mut self, obs: &mut Observed, m: &Event) {
        if obs.response_id.is_none() {
            obs.response_id = field::<Cow<str>>(m.id).map(Cow::into_owned);
        }
        if obs.response_model.is_none() {
            obs.response_model = field::<Cow<str>>(m.model).map(Cow::into_owned);
        }
        if let Some(r) = field::<Cow<str>>(m.stop_reason) {
            finish(obs, &r);
        }
    }

    /// A content block: a web search the upstream ran, or (in a whole answer) text.
    fn block(&mut self, obs: &mut Observed, b: &Block, whole: bool) {
        if b.kind.as_deref() == Some("server_tool_use") && b.name.as_deref() == Some("web_search") {
            obs.search_ran = true;
            obs.search_queries += 1;
        }
        if whole {
            let text = b.text.as_deref().or(b.thinking.as_deref());
            let input = match b.kind.as_deref() {
                Some("tool_use") => b.input.map_or(0, |i| i.get().len()),
                _ => 0,
            };
            let bytes = text.map_or(0, str::len) + input;
            if bytes > 0 {
                obs.content_chunks += 1;
                obs.content_bytes += bytes as u64;
            }
            if let Some(t) = b
                .text
                .as_deref()
                .filter(|_| b.kind.as_deref() == Some("text"))
            {
                obs.capture(t);
            }
        }
    }

    /// The usage so far, as the record reads it.
    fn publish(&self, obs: &mut Observed) {
        if let Some(u) = self.fields.usage() {
            obs.usage = Some(u);
            obs.usage_partial = !self.delta_seen;
            obs.searches_reported = self.delta_seen && self.fields.searches.is_some();
        }
    }
}

fn finish(obs: &mut Observed, reason: &str) {
    if !obs.finish_reasons.iter().any(|x| x == reason) {
        obs.finish_reasons.push(reason.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::super::response::tests::split;
    use super::super::response::{BodyKind, Observed};
    use crate::meter::{Api, Usage, WebSearchSource};
    use proptest::prelude::*;

    /// A streamed Messages call as Anthropic sends it, with cache reads and writes, a web
    /// search, and two `message_delta` events whose counts are cumulative (a reader that adds
    /// them double-counts).
    const STREAM: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,",
        "\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":200,\"cache_read_input_tokens\":3000,\"output_tokens\":1}}}\n\n",
        "event: ping\ndata: {\"type\":\"ping\"}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"server_tool_use\",\"id\":\"srvtoolu_1\",\"name\":\"web_search\",\"input\":{}}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"query\\\":\\\"q\\\"}\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"h\u{e9}llo \"}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":null,\"stop_sequence\":null},\"usage\":{\"output_tokens\":9,\"input_tokens\":10,\"cache_creation_input_tokens\":200,\"cache_read_input_tokens\":3000,\"server_tool_use\":{\"web_search_requests\":1}}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"world\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":25,\"input_tokens\":null,\"server_tool_use\":{\"web_search_requests\":1}}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    fn run(kind: BodyKind, parts: &[&[u8]]) -> Observed {
        super::super::response::tests::run_as(Api::Messages, kind, None, parts)
    }

    #[test]
    fn message_delta_counts_replace_never_add() {
        let o = run(BodyKind::Sse, &[STREAM.as_bytes()]);
        assert_eq!(o.response_id.as_deref(), Some("msg_1"));
        assert_eq!(o.response_model.as_deref(), Some("claude-sonnet-4-5"));
        assert_eq!(
            o.reported_usage(),
            Some(Usage {
                prompt: 10 + 200 + 3000,
                completion: 25,
                cached: 3000,
                cache_write: 200,
                cache_write_1h: 0,
                reasoning: 0,
                web_searches: 1,
            })
        );
        assert_eq!(o.web_searches(), Some((1, WebSearchSource::Reported)));
        assert_eq!(o.finish_reasons, vec!["end_turn"]);
        assert_eq!(o.content_bytes, "héllo world".len() as u64 + 13);
        assert!(o.done);
    }

    #[test]
    fn a_stream_cut_before_its_delta_keeps_the_exact_input() {
        let cut = &STREAM[..STREAM.find("event: message_delta").unwrap()];
        let o = run(BodyKind::Sse, &[cut.as_bytes()]);
        assert_eq!(o.reported_usage(), None);
        let e = o.estimate(999_999);
        // The input as message_start counted it (not from the request's bytes); the output
        // from what was delivered; the search that started.
        assert_eq!((e.prompt, e.cached, e.cache_write), (3210, 3000, 200));
        assert_eq!(e.completion, (7 + 13u64).div_ceil(4));
        assert_eq!(e.web_searches, 1);
    }

    #[test]
    fn a_whole_message_is_read() {
        let body = r#"{"id":"msg_2","type":"message","role":"assistant","model":"claude-haiku-4-5",
            "content":[{"type":"thinking","thinking":"hmm","signature":"s"},{"type":"text","text":"hi there"}],
            "stop_reason":"max_tokens","stop_sequence":null,
            "usage":{"input_tokens":5,"cache_creation_input_tokens":0,"cache_read_input_tokens":7,"output_tokens":4}}"#;
        let o = run(BodyKind::Json, &[body.as_bytes()]);
        let u = o.reported_usage().unwrap();
        assert_eq!(
            (u.prompt, u.cached, u.cache_write, u.completion),
            (12, 7, 0, 4)
        );
        assert_eq!(o.finish_reasons, vec!["max_tokens"]);
        assert_eq!(o.content_bytes, 3 + 8);
        assert_eq!(o.web_searches(), None);
    }

    #[test]
    fn one_hour_cache_writes_are_told_apart() {
        let body = r#"{"id":"m","type":"message","model":"claude-sonnet-4-5","content":[],"stop_reason":"end_turn",
            "usage":{"input_tokens":1,"cache_creation_input_tokens":80,"cache_read_input_tokens":0,
            "cache_creation":{"ephemeral_5m_input_tokens":30,"ephemeral_1h_input_tokens":50},"output_tokens":2}}"#;
        let u = run(BodyKind::Json, &[body.as_bytes()])
            .reported_usage()
            .unwrap();
        assert_eq!((u.prompt, u.cache_write, u.cache_write_1h), (81, 80, 50));
    }

    #[test]
    fn anthropic_errors_are_noted() {
        let body = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        let o = run(BodyKind::Json, &[body.as_bytes()]);
        assert_eq!(o.upstream_error_type.as_deref(), Some("overloaded_error"));
        assert_eq!(o.reported_usage(), None);
        let cut = &STREAM[..STREAM.find("event: message_delta").unwrap()];
        let s = format!("{cut}event: error\ndata: {body}\n\n");
        let o = run(BodyKind::Sse, &[s.as_bytes()]);
        assert_eq!(o.upstream_error_type.as_deref(), Some("overloaded_error"));
    }

    proptest! {
        /// Any split of the stream gives the same observation.
        #[test]
        fn any_split_of_a_messages_stream_gives_the_same_usage(
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let whole = run(BodyKind::Sse, &[STREAM.as_bytes()]);
            let parts = split(STREAM.as_bytes(), &cuts);
            prop_assert_eq!(run(BodyKind::Sse, &parts), whole);
        }
    }
}
