//! The response tap: reads a copy of the upstream's response and extracts what metering needs.
//!
//! The client always gets the upstream's bytes untouched; the tap sees the same bytes, inflates
//! its own copy when the body is compressed, and feeds either the SSE decoder (streams) or a
//! buffer parsed once at the end (JSON). It never fails the request: what it cannot read it
//! reports in [`Observed::tap_error`].

use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

use super::codec::Decoding;
use super::sse::{SseDecoder, SseEvent};
use crate::meter::{Api, Usage, WebSearchSource};

/// What the tap learned from a response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    pub response_id: Option<String>,
    pub response_model: Option<String>,
    pub finish_reasons: Vec<String>,
    /// The last `usage` object the upstream sent (`web_searches`: its count, 0 without one).
    pub usage: Option<Usage>,
    /// `usage` holds a stream's opening figures only (Anthropic's `message_start`: the input
    /// is final, the output still counting): the stream was cut before its final usage.
    pub usage_partial: bool,
    /// That usage object counted web searches itself (`num_search_queries`).
    pub searches_reported: bool,
    pub upstream_cost_usd: Option<f64>,
    pub search_ran: bool,
    /// `search_results` entries naming a `query` (the target API's shape); each is one search.
    pub search_queries: u64,
    /// Individual results across all groups.
    pub search_results: u64,
    pub warning: Option<String>,
    /// SSE events carrying content (text, reasoning, refusal or tool-call arguments).
    pub content_chunks: u64,
    /// Bytes of that content, the basis of the completion estimate for cut-off streams.
    pub content_bytes: u64,
    /// `data: [DONE]` arrived.
    pub done: bool,
    /// The `type` (and `code`) of an `error` object the upstream sent (error body or
    /// mid-stream error event). Its message is not kept: some providers echo request content.
    pub upstream_error: Option<String>,
    /// That error's `type` (else its `code`), a short identifier for `error.type`.
    pub upstream_error_type: Option<String>,
    /// That error names `stream_options` (in its message, param or code).
    pub upstream_error_names_stream_options: bool,
    /// Bytes of a JSON body that could not be parsed (cut off, or not JSON): the basis of the
    /// completion estimate when a non-streaming answer was cut.
    pub unparsed_body_bytes: u64,
    /// Why the tap could not read (part of) the response, if it could not.
    pub tap_error: Option<String>,
    /// The completion's text, only when the operator opted in to content capture: at most
    /// `capture_limit` bytes (cut on a character boundary).
    pub captured: Option<String>,
    pub capture_limit: usize,
}

impl Observed {
    /// The web searches the call ran: the upstream's count when it reported one (a reported
    /// count always wins, zero included), else one per `search_results` entry naming a
    /// `query`, and one when searches ran without such entries (results of another shape, a
    /// `search_done` event alone).
    pub fn web_searches(&self) -> Option<(u64, WebSearchSource)> {
        match self.usage {
            Some(u) if self.searches_reported => Some((u.web_searches, WebSearchSource::Reported)),
            _ if self.search_ran => Some((self.search_queries.max(1), WebSearchSource::Counted)),
            _ => None,
        }
    }

    /// The bytes the completion estimate counts: the content delivered, or, for a JSON answer
    /// that could not be parsed, its bytes.
    pub fn completion_bytes(&self) -> u64 {
        match self.content_bytes {
            0 => self.unparsed_body_bytes,
            n => n,
        }
    }

    /// The estimate of this call's usage ([`crate::meter::estimate`]), for a prompt of
    /// `prompt_text_bytes`.
    pub fn estimate(&self, prompt_text_bytes: u64) -> Usage {
        crate::meter::estimate(
            prompt_text_bytes,
            self.completion_bytes(),
            self.web_searches().map_or(0, |(n, _)| n),
            self.opening_usage(),
        )
    }

    /// The usage a stream announced when it started, when that is all it sent.
    pub fn opening_usage(&self) -> Option<Usage> {
        self.usage.filter(|_| self.usage_partial)
    }

    /// The usage the upstream reported, its web searches counted when it did not count them.
    /// `None` also when only a stream's opening figures arrived ([`Observed::estimate`]
    /// completes them).
    pub fn reported_usage(&self) -> Option<Usage> {
        if self.usage_partial {
            return None;
        }
        self.usage.map(|u| Usage {
            web_searches: self.web_searches().map_or(0, |(n, _)| n),
            ..u
        })
    }

    pub(super) fn capture(&mut self, text: &str) {
        let limit = self.capture_limit;
        if let Some(c) = self.captured.as_mut() {
            let room = limit.saturating_sub(c.len());
            if room > 0 {
                let mut end = room.min(text.len());
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                c.push_str(&text[..end]);
            }
        }
    }
}

/// The text of a choice, parsed again only when content is captured.
#[derive(Deserialize)]
struct TextChoice<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    delta: Option<TextMessage<'a>>,
    #[serde(borrow, default)]
    message: Option<TextMessage<'a>>,
}

#[derive(Deserialize)]
struct TextMessage<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

/// How the response body is framed, decided from its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Sse,
    Json,
}

/// How a dialect's answers are read: the OpenAI shapes (chat, completions, embeddings), or a
/// dialect with its own events and the little state its usage rule needs.
#[derive(Debug)]
enum Dialect {
    OpenAi,
    Responses(super::responses::State),
    Messages(super::messages::State),
}

impl Dialect {
    fn on_event(&mut self, obs: &mut Observed, e: SseEvent<'_>) {
        match self {
            Dialect::OpenAi => on_event(obs, e),
            Dialect::Responses(s) => s.on_event(obs, trim_ascii(e.data)),
            Dialect::Messages(s) => s.on_event(obs, trim_ascii(e.data)),
        }
    }

    fn apply_body(&mut self, obs: &mut Observed, json: &[u8]) -> Result<(), serde_json::Error> {
        match self {
            Dialect::OpenAi => apply_json(obs, json, false),
            Dialect::Responses(s) => s.apply_body(obs, json),
            Dialect::Messages(s) => s.apply_body(obs, json),
        }
    }
}

pub struct ResponseTap {
    kind: BodyKind,
    dialect: Dialect,
    decoding: Decoding,
    sse: SseDecoder,
    /// JSON body chunks: refcounted clones of the upstream's buffers when not compressed.
    json: Vec<Bytes>,
    json_len: usize,
    limit: usize,
    pub observed: Observed,
}

impl fmt::Debug for ResponseTap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseTap")
            .field("kind", &self.kind)
            .field("observed", &self.observed)
            .finish()
    }
}

impl ResponseTap {
    /// `content_encoding` is the response's `Content-Encoding`; `limit` caps how many
    /// (inflated) bytes of a JSON body the tap keeps.
    pub fn new(kind: BodyKind, content_encoding: Option<&str>, limit: usize) -> Self {
        Self::for_api(Api::ChatCompletions, kind, content_encoding, limit)
    }

    /// A tap for an answer in `api`'s dialect.
    pub fn for_api(api: Api, kind: BodyKind, content_encoding: Option<&str>, limit: usize) -> Self {
        let mut observed = Observed::default();
        let decoding = Decoding::new(content_encoding).unwrap_or_else(|e| {
            observed.tap_error = Some(e);
            Decoding::Off
        });
        let dialect = match api {
            Api::Responses => Dialect::Responses(Default::default()),
            Api::Messages => Dialect::Messages(Default::default()),
            Api::ChatCompletions | Api::Completions | Api::Embeddings => Dialect::OpenAi,
        };
        ResponseTap {
            kind,
            dialect,
            decoding,
            sse: SseDecoder::new(limit),
            json: Vec::new(),
            json_len: 0,
            limit,
            observed,
        }
    }

    /// The bytes the completion estimate counts so far ([`crate::meter::estimate`]): the
    /// content delivered; for a JSON answer not (yet) read, its bytes (a whole answer was
    /// generated before it was sent). What [`Observed::completion_bytes`] gives once finished.
    pub fn completion_bytes(&self) -> u64 {
        match self.observed.content_bytes {
            0 if self.kind == BodyKind::Json => self.json_len as u64,
            n => n,
        }
    }

    /// Keeps up to `limit` bytes of the completion's text (content capture, opt-in).
    pub fn capture_content(&mut self, limit: usize) {
        self.observed.captured = Some(String::new());
        self.observed.capture_limit = limit;
    }

    /// Feeds one body read. Returns true when this read carried the first content of the call.
    pub fn feed(&mut self, chunk: &Bytes) -> bool {
        let before = self.observed.content_chunks;
        match &mut self.decoding {
            Decoding::Off => {}
            Decoding::Identity => match self.kind {
                BodyKind::Sse => {
                    let (obs, d) = (&mut self.observed, &mut self.dialect);
                    self.sse.feed(chunk, &mut |e| d.on_event(obs, e));
                    self.check_sse_overflow();
                }
                BodyKind::Json => {
                    if self.json_len + chunk.len() <= self.limit {
                        self.json_len += chunk.len();
                        self.json.push(chunk.clone());
                    } else {
                        self.overflow();
                    }
                }
            },
            d => match d.inflate(chunk) {
                Ok(out) => self.take_inflated(out),
                Err(e) => {
                    self.observed.tap_error = Some(format!("cannot decompress response: {e}"));
                    self.decoding = Decoding::Off;
                }
            },
        }
        before == 0 && self.observed.content_chunks > 0
    }

    fn take_inflated(&mut self, out: Vec<u8>) {
        if out.is_empty() {
            return;
        }
        match self.kind {
            BodyKind::Sse => {
                let (obs, d) = (&mut self.observed, &mut self.dialect);
                self.sse.feed(&out, &mut |e| d.on_event(obs, e));
                self.check_sse_overflow();
            }
            BodyKind::Json => {
                if self.json_len + out.len() <= self.limit {
                    self.json_len += out.len();
                    self.json.push(Bytes::from(out));
                } else {
                    self.overflow();
                }
            }
        }
    }

    fn check_sse_overflow(&mut self) {
        if self.sse.overflowed && self.observed.tap_error.is_none() {
            self.observed.tap_error = Some(format!(
                "an SSE line or event longer than limits.max_response_tap_bytes ({} bytes) was skipped",
                self.limit
            ));
        }
    }

    fn overflow(&mut self) {
        self.observed.tap_error = Some(format!(
            "response body larger than limits.max_response_tap_bytes ({} bytes); usage not read",
            self.limit
        ));
        self.json.clear();
        // Nothing of it is read: the completion estimate counts none of it either (as the
        // record's does).
        self.json_len = 0;
        self.decoding = Decoding::Off;
    }

    /// The body ended (completely or not). Parses a JSON body, flushes the SSE decoder and
    /// hands over what was observed.
    pub fn finish(&mut self) -> Observed {
        // A cut-off compressed body does not finish cleanly; what it inflated to still counts.
        let (rest, err) = self.decoding.finish();
        self.take_inflated(rest);
        if let (Some(e), None) = (err, &self.observed.tap_error) {
            self.observed.tap_error = Some(format!("compressed body ended early: {e}"));
        }
        match self.kind {
            BodyKind::Sse => {
                let (obs, d) = (&mut self.observed, &mut self.dialect);
                self.sse.finish(&mut |e| d.on_event(obs, e));
            }
            BodyKind::Json => {
                if !matches!(self.decoding, Decoding::Off) && !self.json.is_empty() {
                    let body: Cow<[u8]> = if self.json.len() == 1 {
                        Cow::Borrowed(&self.json[0])
                    } else {
                        Cow::Owned(self.json.concat())
                    };
                    if let Err(e) = self.dialect.apply_body(&mut self.observed, &body) {
                        self.observed.unparsed_body_bytes = body.len() as u64;
                        // (An error answer in plain text may name it too.)
                        self.observed.upstream_error_names_stream_options |=
                            memchr::memmem::find(&body, b"stream_options").is_some();
                        if self.observed.tap_error.is_none() {
                            self.observed.tap_error =
                                Some(format!("response body is not (whole) JSON: {e}"));
                        }
                    }
                }
                self.json = Vec::new();
            }
        }
        std::mem::take(&mut self.observed)
    }
}

fn on_event(obs: &mut Observed, e: SseEvent<'_>) {
    if e.event == b"search_done" {
        obs.search_ran = true;
    }
    let data = trim_ascii(e.data);
    if data == b"[DONE]" {
        obs.done = true;
        return;
    }
    if data.first() == Some(&b'{') {
        // A chunk that does not parse is skipped; the rest of the stream still counts.
        let _ = apply_json(obs, data, true);
    }
}

pub(super) fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &b[start..end]
}

/// The top level of a response or chunk. Fields are kept raw and parsed one by one, so a field
/// of an unexpected shape loses only itself. The choices are `C`: raw (`View<&RawValue>`, the
/// lenient path, where one odd choice loses only itself), or parsed in the same pass
/// (`View<Vec<Choice>>`, the shape nearly every chunk has). [`apply_json`] tries the one-pass
/// parse first and falls back to the lenient one when a choice does not fit; when it fits,
/// both give the same result (a property test checks it), and a streamed answer's content
/// chunks are parsed once instead of three times.
#[derive(Deserialize)]
#[serde(bound(deserialize = "C: Deserialize<'de>"))]
struct View<'a, C> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    request_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    choices: Option<C>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    meta: Option<&'a RawValue>,
    #[serde(borrow, default)]
    search_results: Option<&'a RawValue>,
    #[serde(borrow, default)]
    warning: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

/// How a [`View`]'s choices become parsed choices.
trait Choices<'a> {
    fn parsed(self, obs: &mut Observed) -> Option<Vec<Choice<'a>>>;
}

impl<'a> Choices<'a> for Vec<Choice<'a>> {
    fn parsed(self, _: &mut Observed) -> Option<Vec<Choice<'a>>> {
        Some(self)
    }
}

impl<'a> Choices<'a> for &'a RawValue {
    fn parsed(self, obs: &mut Observed) -> Option<Vec<Choice<'a>>> {
        let raw = field::<Vec<&RawValue>>(Some(self))?;
        // One choice of an unexpected shape loses only itself.
        if obs.captured.is_some() {
            for c in raw.iter().filter_map(|c| field::<TextChoice>(Some(c))) {
                if let Some(t) = c.delta.or(c.message).and_then(|m| m.content).or(c.text) {
                    obs.capture(&t);
                }
            }
        }
        Some(
            raw.iter()
                .filter_map(|c| field::<Choice>(Some(c)))
                .collect(),
        )
    }
}

pub(super) fn field<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>) -> Option<T> {
    raw.and_then(|r| serde_json::from_str(r.get()).ok())
}

#[derive(Deserialize)]
struct Choice<'a> {
    /// A legacy completion's text (streamed or not).
    #[serde(default)]
    text: StrLen,
    #[serde(borrow, default)]
    delta: Option<Message<'a>>,
    #[serde(borrow, default)]
    message: Option<Message<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
struct Message<'a> {
    #[serde(default)]
    content: StrLen,
    #[serde(default)]
    reasoning: StrLen,
    #[serde(default)]
    refusal: StrLen,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<ToolCall<'a>>>,
}

#[derive(Deserialize)]
struct ToolCall<'a> {
    #[serde(borrow, default)]
    function: Option<ToolFn<'a>>,
}

#[derive(Deserialize)]
struct ToolFn<'a> {
    #[serde(default)]
    arguments: StrLen,
    #[serde(borrow, default)]
    #[allow(dead_code)]
    name: Option<Cow<'a, str>>,
}

/// The byte length of a text field without allocating it: a string, or an array of content
/// parts (`[{"type": "text", "text": "..."}]` or strings); 0 for null, absent or other shapes.
#[derive(Default, Clone, Copy)]
pub(super) struct StrLen(pub(super) u64);

/// One content part: the length of its `text` (or of the part itself when it is a string).
struct PartLen(u64);

impl<'de> Deserialize<'de> for PartLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PartLen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a content part")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PartLen, E> {
                Ok(PartLen(s.len() as u64))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<PartLen, A::Error> {
                let mut n = 0;
                while let Some(k) = map.next_key::<Cow<'de, str>>()? {
                    if k == "text" {
                        n += map.next_value::<StrLen>()?.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(PartLen(n))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<PartLen, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(PartLen(0))
            }
            fn visit_unit<E: de::Error>(self) -> Result<PartLen, E> {
                Ok(PartLen(0))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<PartLen, E> {
                Ok(PartLen(0))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<PartLen, E> {
                Ok(PartLen(0))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<PartLen, E> {
                Ok(PartLen(0))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<PartLen, E> {
                Ok(PartLen(0))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for StrLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrLen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or null")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StrLen, E> {
                Ok(StrLen(s.len() as u64))
            }
            fn visit_unit<E: de::Error>(self) -> Result<StrLen, E> {
                Ok(StrLen(0))
            }
            fn visit_none<E: de::Error>(self) -> Result<StrLen, E> {
                Ok(StrLen(0))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<StrLen, D::Error> {
                d.deserialize_any(V)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<StrLen, A::Error> {
                let mut n = 0;
                while let Some(p) = seq.next_element::<PartLen>()? {
                    n += p.0;
                }
                Ok(StrLen(n))
            }
        }
        d.deserialize_option(V)
    }
}

/// `usage`, every field kept raw so that one odd field (a string `cost`, a detail object of
/// another shape) does not lose the token counts.
#[derive(Deserialize)]
struct UsageView<'a> {
    #[serde(borrow, default)]
    prompt_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt_tokens_details: Option<&'a RawValue>,
    #[serde(borrow, default)]
    completion_tokens_details: Option<&'a RawValue>,
    #[serde(borrow, default)]
    num_search_queries: Option<&'a RawValue>,
    #[serde(borrow, default)]
    cost: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct PromptDetails<'a> {
    #[serde(borrow, default)]
    cached_tokens: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct CompletionDetails<'a> {
    #[serde(borrow, default)]
    reasoning_tokens: Option<&'a RawValue>,
}

/// A cost as a number or a numeric string.
fn cost_from(raw: Option<&RawValue>) -> Option<f64> {
    let raw = raw?;
    field::<f64>(Some(raw)).or_else(|| field::<Cow<str>>(Some(raw))?.trim().parse().ok())
}

/// A token count: a non-negative integer, also when written as `12.0`.
#[derive(Clone, Copy)]
pub(super) struct Count(pub(super) u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-negative integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                Ok(Count(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                u64::try_from(v)
                    .map(Count)
                    .map_err(|_| E::custom("negative count"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
                if v >= 0.0 && v.fract() == 0.0 && v < u64::MAX as f64 {
                    Ok(Count(v as u64))
                } else {
                    Err(E::custom("not a whole count"))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// One entry of `search_results` in the target API's shape: `{query, results[]}`.
#[derive(Deserialize)]
struct SearchGroup<'a> {
    #[serde(borrow, default)]
    query: Option<&'a RawValue>,
    #[serde(default)]
    results: Option<Vec<IgnoredAny>>,
}

#[derive(Deserialize)]
struct MetaView<'a> {
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ErrorView<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    code: Option<&'a RawValue>,
}

/// A usage object's counts, whether it counted searches, and its cost.
fn usage_from(raw: Option<&RawValue>) -> Option<(Usage, bool, Option<f64>)> {
    let u: UsageView = field(raw)?;
    let count = |r: Option<&RawValue>| field::<Count>(r).map(|c| c.0);
    let (prompt, completion) = (count(u.prompt_tokens), count(u.completion_tokens));
    if prompt.is_none() && completion.is_none() {
        return None;
    }
    let cached =
        field::<PromptDetails>(u.prompt_tokens_details).and_then(|d| count(d.cached_tokens));
    let reasoning = field::<CompletionDetails>(u.completion_tokens_details)
        .and_then(|d| count(d.reasoning_tokens));
    let searches = count(u.num_search_queries);
    Some((
        Usage {
            prompt: prompt.unwrap_or(0),
            completion: completion.unwrap_or(0),
            cached: cached.unwrap_or(0),
            cache_write: 0,
            cache_write_1h: 0,
            reasoning: reasoning.unwrap_or(0),
            web_searches: searches.unwrap_or(0),
        },
        searches.is_some(),
        cost_from(u.cost),
    ))
}

/// Longest upstream error message kept in a record.
pub(super) const MAX_ERROR_CHARS: usize = 300;

/// Applies one JSON object (a whole response, or one stream chunk) to `obs`.
fn apply_json(obs: &mut Observed, json: &[u8], chunk: bool) -> Result<(), serde_json::Error> {
    // Captured text needs each choice's content itself: that is the lenient path's work.
    if obs.captured.is_none() {
        if let Some(c) = super::skim::chunk(json) {
            apply_skimmed(obs, c, chunk);
            return Ok(());
        }
        // (serde skips ignored fields without checking their UTF-8; the lenient path's raw
        // values do check it: a chunk that is not UTF-8 is refused on every path.)
        if std::str::from_utf8(json).is_ok() {
            if let Ok(v) = serde_json::from_slice::<View<Vec<Choice>>>(json) {
                apply_view(obs, v, chunk);
                return Ok(());
            }
        }
    }
    apply_lenient(obs, json, chunk)
}

/// A chunk [`super::skim`] read: what [`apply_view`] does with the same chunk.
fn apply_skimmed(obs: &mut Observed, c: super::skim::Chunk<'_>, chunk: bool) {
    // (Checked UTF-8 by the reader; converted only while still unknown, i.e. once.)
    let text = |b: &[u8]| std::str::from_utf8(b).ok().map(str::to_string);
    if obs.response_id.is_none() {
        obs.response_id = c.id.and_then(text);
    }
    if obs.response_model.is_none() {
        obs.response_model = c.model.and_then(text);
    }
    if c.search_done {
        obs.search_ran = true;
    }
    if c.has_choices {
        for r in c.finish.into_iter().flatten() {
            if !obs.finish_reasons.iter().any(|x| x == r) {
                obs.finish_reasons.push(r.to_string());
            }
        }
        let bytes = if chunk {
            c.content_bytes
        } else {
            c.message_bytes
        };
        if bytes > 0 {
            obs.content_chunks += 1;
            obs.content_bytes += bytes;
        }
    }
    // As usage_from: no usage without a prompt or a completion count.
    if let Some(u) = c
        .usage
        .filter(|u| u.prompt.is_some() || u.completion.is_some())
    {
        obs.searches_reported = u.searches.is_some();
        obs.usage = Some(Usage {
            prompt: u.prompt.unwrap_or(0),
            completion: u.completion.unwrap_or(0),
            cached: u.cached.unwrap_or(0),
            cache_write: 0,
            cache_write_1h: 0,
            reasoning: u.reasoning.unwrap_or(0),
            web_searches: u.searches.unwrap_or(0),
        });
    }
}

/// [`apply_json`] without the fast paths.
fn apply_lenient(obs: &mut Observed, json: &[u8], chunk: bool) -> Result<(), serde_json::Error> {
    let v: View<&RawValue> = serde_json::from_slice(json)?;
    apply_view(obs, v, chunk);
    Ok(())
}

/// Applies a parsed object.
fn apply_view<'a, C: Choices<'a>>(obs: &mut Observed, v: View<'a, C>, chunk: bool) {
    if obs.response_id.is_none() {
        obs.response_id = field::<Cow<str>>(v.id)
            .or_else(|| field(v.request_id))
            .map(Cow::into_owned);
    }
    if obs.response_model.is_none() {
        obs.response_model = field::<Cow<str>>(v.model).map(Cow::into_owned);
    }
    if field::<Cow<str>>(v.kind).as_deref() == Some("search_done") {
        obs.search_ran = true;
    }
    if let Some(raw) = v.search_results.filter(|r| r.get() != "null") {
        match field::<Vec<&RawValue>>(Some(raw)) {
            Some(entries) => {
                for e in &entries {
                    let g = field::<SearchGroup>(Some(e));
                    match g.filter(|g| field::<Cow<str>>(g.query).is_some()) {
                        Some(g) => {
                            obs.search_queries += 1;
                            obs.search_results += g.results.as_ref().map_or(0, |r| r.len() as u64);
                        }
                        None => obs.search_results += 1,
                    }
                }
                if !entries.is_empty() {
                    obs.search_ran = true;
                }
            }
            // Results, but not as a list: one search, at least.
            None => obs.search_ran = true,
        }
    }
    let choices = v.choices.and_then(|c| c.parsed(obs));
    if let Some(choices) = choices {
        let mut bytes = 0;
        for c in &choices {
            bytes += c.text.0;
            if let Some(m) = if chunk { &c.delta } else { &c.message } {
                bytes += m.content.0 + m.reasoning.0 + m.refusal.0;
                for t in m.tool_calls.iter().flatten() {
                    bytes += t.function.as_ref().map_or(0, |f| f.arguments.0);
                }
            }
            if let Some(r) = &c.finish_reason {
                if !obs.finish_reasons.iter().any(|x| x == r) {
                    obs.finish_reasons.push(r.to_string());
                }
            }
        }
        if bytes > 0 {
            obs.content_chunks += 1;
            obs.content_bytes += bytes;
        }
    }
    let usage = usage_from(v.usage).or_else(|| {
        let meta: MetaView = field(v.meta)?;
        usage_from(meta.usage)
    });
    if let Some((u, reported, cost)) = usage {
        obs.usage = Some(u);
        obs.searches_reported = reported;
        if cost.is_some() {
            obs.upstream_cost_usd = cost;
        }
    }
    if let Some(w) = field::<Cow<str>>(v.warning) {
        obs.warning = Some(truncate(&w, MAX_ERROR_CHARS));
    }
    if let Some(raw) = v.error {
        note_error(obs, raw);
    }
}

/// Notes an upstream `error` object (by type and code: some providers echo request content
/// in their messages).
pub(super) fn note_error(obs: &mut Observed, raw: &RawValue) {
    obs.upstream_error_names_stream_options = raw.get().contains("stream_options");
    let e = field::<ErrorView>(Some(raw));
    let part = |r: Option<&RawValue>| -> Option<String> {
        let r = r?;
        field::<Cow<str>>(Some(r))
            .map(Cow::into_owned)
            .or_else(|| field::<i64>(Some(r)).map(|n| n.to_string()))
    };
    let kind = e.as_ref().and_then(|e| part(e.kind));
    let code = e.as_ref().and_then(|e| part(e.code));
    obs.upstream_error_type = kind
        .as_deref()
        .or(code.as_deref())
        .filter(|k| !k.is_empty())
        .map(|k| truncate(k, 64));
    let msg = match (kind, code) {
        (Some(k), Some(c)) => format!("upstream error {k} ({c})"),
        (Some(k), None) => format!("upstream error {k}"),
        (None, Some(c)) => format!("upstream error ({c})"),
        (None, None) => "upstream error".into(),
    };
    obs.upstream_error = Some(truncate(&msg, MAX_ERROR_CHARS));
}

pub(super) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    /// A stream as the target API sends it, with CRLF line ends, an `event:` line, a comment,
    /// multi-byte UTF-8 content and a usage chunk.
    const STREAM: &str = concat!(
        ": ping\r\n\r\n",
        "event: search_done\r\n",
        "data: {\"type\":\"search_done\",\"id\":\"gen-1\",\"object\":\"chat.completion.chunk\",\"model\":\"m/x\",",
        "\"search_results\":[{\"query\":\"q\",\"results\":[{\"title\":\"a\"},{\"title\":\"b\"}]}]}\r\n\r\n",
        "data: {\"type\":\"content\",\"id\":\"gen-1\",\"model\":\"m/x\",\"choices\":[{\"index\":0,",
        "\"delta\":{\"role\":\"assistant\",\"content\":\"h\u{e9}llo \u{1F600}\"},\"finish_reason\":null}]}\r\n\r\n",
        "data: {\"type\":\"content\",\"id\":\"gen-1\",\"model\":\"m/x\",\"choices\":[{\"index\":0,",
        "\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\":1}\"}}]},\"finish_reason\":null}]}\r\n\r\n",
        "data: {\"type\":\"finish\",\"id\":\"gen-1\",\"model\":\"m/x\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],",
        "\"warning\":\"w\"}\r\n\r\n",
        "data: {\"type\":\"usage\",\"id\":\"gen-1\",\"model\":\"m/x\",\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":20,",
        "\"total_tokens\":30,\"prompt_tokens_details\":{\"cached_tokens\":4},",
        "\"completion_tokens_details\":{\"reasoning_tokens\":5},\"num_search_queries\":1,\"cost\":0.25}}\r\n\r\n",
        "data: [DONE]\r\n\r\n",
    );

    fn run(kind: BodyKind, enc: Option<&str>, parts: &[&[u8]]) -> Observed {
        run_as(Api::ChatCompletions, kind, enc, parts)
    }

    /// What a tap of `api` observes of a body fed in `parts`.
    pub(in crate::openai) fn run_as(
        api: Api,
        kind: BodyKind,
        enc: Option<&str>,
        parts: &[&[u8]],
    ) -> Observed {
        let mut tap = ResponseTap::for_api(api, kind, enc, 1 << 20);
        for p in parts {
            tap.feed(&Bytes::copy_from_slice(p));
        }
        tap.finish()
    }

    /// `data` cut at `cuts` (each taken modulo the length plus one, in any order).
    pub(in crate::openai) fn split<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        cuts.sort_unstable();
        let mut parts = Vec::new();
        let mut last = 0;
        for c in cuts {
            parts.push(&data[last..c]);
            last = c;
        }
        parts.push(&data[last..]);
        parts
    }

    #[test]
    fn stream_yields_everything_metering_needs() {
        let o = run(BodyKind::Sse, None, &[STREAM.as_bytes()]);
        assert_eq!(o.response_id.as_deref(), Some("gen-1"));
        assert_eq!(o.response_model.as_deref(), Some("m/x"));
        assert_eq!(
            o.usage,
            Some(Usage {
                prompt: 10,
                completion: 20,
                cached: 4,
                cache_write: 0,
                cache_write_1h: 0,
                reasoning: 5,
                web_searches: 1
            })
        );
        assert_eq!(o.upstream_cost_usd, Some(0.25));
        assert!(o.search_ran);
        assert_eq!((o.search_queries, o.search_results), (1, 2));
        assert_eq!(o.finish_reasons, vec!["stop"]);
        assert_eq!(o.warning.as_deref(), Some("w"));
        assert_eq!(o.content_chunks, 2);
        assert_eq!(o.content_bytes, "héllo 😀".len() as u64 + 7);
        assert!(o.done);
        assert_eq!(o.tap_error, None);
    }

    #[test]
    fn explicit_zero_usage_is_a_real_zero() {
        let s = "data: {\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":0}}\n\n";
        let o = run(BodyKind::Sse, None, &[s.as_bytes()]);
        assert_eq!(o.usage, Some(Usage::default()));
    }

    #[test]
    fn a_chunk_of_unexpected_shape_loses_only_itself() {
        let s = concat!(
            "data: {\"choices\":\"weird\",\"warning\":{\"not\":\"a string\"}}\n\n",
            "data: {not json}\n\n",
            "data: {\"usage\":{\"prompt_tokens\":3.0,\"completion_tokens\":2}}\n\n",
        );
        let o = run(BodyKind::Sse, None, &[s.as_bytes()]);
        assert_eq!(o.usage.map(|u| (u.prompt, u.completion)), Some((3, 2)));
        assert_eq!(o.warning, None);
    }

    #[test]
    fn non_streaming_body_in_web_chat_shape() {
        let body = br#"{"request_id":"r1","model":"m","choices":[{"finish_reason":"length","message":{"content":"x"}}],
            "search_results":[{"query":"q","results":[{"title":"t"}]}],
            "meta":{"usage":{"num_search_queries":1,"prompt_tokens":58,"completion_tokens":32,"total_tokens":90}}}"#;
        let o = run(BodyKind::Json, None, &[body]);
        assert_eq!(o.response_id.as_deref(), Some("r1"));
        assert_eq!(
            o.usage.map(|u| (u.prompt, u.completion, u.web_searches)),
            Some((58, 32, 1))
        );
        assert_eq!(o.finish_reasons, vec!["length"]);
    }

    #[test]
    fn oversized_body_is_reported_not_parsed() {
        let mut tap = ResponseTap::new(BodyKind::Json, None, 10);
        tap.feed(&Bytes::from_static(b"{\"usage\":{\"prompt_tokens\":1}}"));
        let o = tap.finish();
        assert!(o.usage.is_none());
        assert!(o
            .tap_error
            .as_deref()
            .unwrap()
            .contains("max_response_tap_bytes"));
    }

    #[test]
    fn unsupported_encoding_is_reported() {
        let o = run(BodyKind::Json, Some("zstd"), &[b"\x28\xb5\x2f\xfd"]);
        assert!(o.tap_error.as_deref().unwrap().contains("zstd"));
    }

    #[test]
    fn one_odd_usage_field_does_not_lose_the_counts() {
        let s = concat!(
            "data: {\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\"cost\":\"0.0042\",",
            "\"prompt_tokens_details\":[1,2],\"completion_tokens_details\":{\"reasoning_tokens\":-1}}}\n\n"
        );
        let o = run(BodyKind::Sse, None, &[s.as_bytes()]);
        assert_eq!(
            o.usage
                .map(|u| (u.prompt, u.completion, u.cached, u.reasoning)),
            Some((12, 3, 0, 0))
        );
        assert_eq!(o.upstream_cost_usd, Some(0.0042));
    }

    #[test]
    fn content_parts_and_odd_choices_are_counted_choice_by_choice() {
        let s = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":[{\"type\":\"text\",\"text\":\"abcd\"},\"ef\"]}},",
            "{\"delta\":{\"content\":{\"weird\":1}}},{\"delta\":{\"content\":\"gh\"}}]}\n\n"
        );
        let o = run(BodyKind::Sse, None, &[s.as_bytes()]);
        assert_eq!(o.content_chunks, 1);
        assert_eq!(o.content_bytes, 4 + 2 + 2);
    }

    #[test]
    fn upstream_error_keeps_type_and_code_not_the_message() {
        let body = br#"{"error":{"message":"you said: my secret prompt","type":"invalid_request_error","code":"bad"}}"#;
        let o = run(BodyKind::Json, None, &[body]);
        let e = o.upstream_error.unwrap();
        assert_eq!(e, "upstream error invalid_request_error (bad)");
    }

    #[test]
    fn compressed_stream_is_tapped_without_lagging_a_read_behind() {
        let first = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
        let rest = b"data: {\"choices\":[{\"delta\":{\"content\":\"more\"}}]}\n\n";
        for enc in ["gzip", "deflate", "br"] {
            // An upstream that streams compressed SSE flushes its encoder after each event: the
            // first read holds exactly the first event's compressed bytes.
            let (head, tail) = compress_flushed(enc, first, rest);
            let mut tap = ResponseTap::new(BodyKind::Sse, Some(enc), 1 << 20);
            assert!(
                tap.feed(&Bytes::from(head)),
                "{enc}: the first event's content was not seen on the read that carried it"
            );
            tap.feed(&Bytes::from(tail));
            assert_eq!(tap.finish().content_chunks, 2, "{enc}");
        }
    }

    /// Compresses `a`, flushes the encoder (a sync point), then `b`; returns the bytes up to
    /// the flush and the rest.
    fn compress_flushed(enc: &str, a: &[u8], b: &[u8]) -> (Vec<u8>, Vec<u8>) {
        fn go<W: Write>(
            mut w: W,
            a: &[u8],
            b: &[u8],
            take: impl Fn(&mut W) -> Vec<u8>,
        ) -> (Vec<u8>, W) {
            w.write_all(a).unwrap();
            w.flush().unwrap();
            let head = take(&mut w);
            w.write_all(b).unwrap();
            (head, w)
        }
        match enc {
            "gzip" => {
                let w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                let (head, w) = go(w, a, b, |w| std::mem::take(w.get_mut()));
                (head, w.finish().unwrap())
            }
            "deflate" => {
                let w = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
                let (head, w) = go(w, a, b, |w| std::mem::take(w.get_mut()));
                (head, w.finish().unwrap())
            }
            _ => {
                let w = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
                let (head, w) = go(w, a, b, |w| std::mem::take(w.get_mut()));
                (head, w.into_inner())
            }
        }
    }

    #[test]
    fn truncated_compressed_json_still_reports_what_arrived() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"a long answer that was cut"}}],"usage":{"prompt_tokens":7}}"#;
        let z = compress("gzip", body);
        let o = run(BodyKind::Json, Some("gzip"), &[&z[..z.len() - 12]]);
        assert!(o.usage.is_none());
        assert!(o.unparsed_body_bytes > 0);
        assert!(o.tap_error.is_some());
    }

    fn compress(enc: &str, data: &[u8]) -> Vec<u8> {
        match enc {
            "gzip" => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            "deflate" => {
                let mut e =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            "raw-deflate" => {
                let mut e =
                    flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            "br" => {
                let mut out = Vec::new();
                {
                    let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                    w.write_all(data).unwrap();
                }
                out
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn hand_picked_chunks_read_the_same_on_every_path() {
        let reasons = r#"[{"finish_reason":"a"},{"finish_reason":"b"},{"finish_reason":"c"},{"finish_reason":"d"},{"finish_reason":"e"}]"#;
        let many = format!(r#"{{"id":"g","choices":{reasons}}}"#);
        for j in [
            many.as_bytes(),
            br#"{"id":"g","created":01,"choices":[]}"#,
            br#"{"id":"g","created":-0.5e+3,"choices":[{"index":1E2}]}"#,
            br#"{"id":"g","created":1.,"choices":[]}"#,
            br#"{"id":"g","x":-,"choices":[]}"#,
            b"{\"id\":\"g\",\"choices\":[{\"delta\":{\"content\":\"a\x01\"}}]}",
            b"{\"id\":\"g\",\"choices\":[{\"delta\":{\"content\":\"a\xc3\"}}]}",
            br#"{"id":"g","choices":[{"delta":{"content":"\ud83d\ude00\u00e9\/"}}]}"#,
            br#"{"id":"g","choices":[{"delta":{"content":"\ud83d"}}]}"#,
            br#"{"id":"g","choices":[{"delta":{"content":"\ude00"}}]}"#,
            br#"{"id":"g","choices":[{"delta":{"content":"\x"}}]}"#,
            br#"{"id":"g","choices":[{"delta":{"content":"a"}}]} "#,
            br#"{"id":"g","choices":[{"delta":{"content":"a"}}]}}"#,
            br#"{"id":"g","choices":[{"delta":{"content":"a"}},]}"#,
            br#"{"id":"g","choices":[{"delta":{},"delta":{"content":"a"}}]}"#,
            br#"{"id":"g","choices":[{"delta":{"content":"a","content":"b"}}]}"#,
            br#"{"id":"g","nested":[[[[{"a":[true,false,null]}]]]],"choices":[]}"#,
            b"{\"choices\":[{\"delta\":{\"content\":\"a\"},\"logprobs\":{\"c\xffontent\":[]}}]}",
        ] {
            let (mut fast, mut lenient) = (Observed::default(), Observed::default());
            let a = apply_json(&mut fast, j, true).is_ok();
            let b = apply_lenient(&mut lenient, j, true).is_ok();
            let text = String::from_utf8_lossy(j);
            assert_eq!(a, b, "{text}");
            assert_eq!(fast, lenient, "{text}");
        }
    }

    /// Chunks of the shape nearly every stream chunk has, with the variations upstreams write.
    fn usual_chunk() -> BoxedStrategy<serde_json::Value> {
        use serde_json::{json, Value};
        let text = prop_oneof![
            Just(json!("w00 ")),
            Just(json!("")),
            Just(json!("é \" \\ \n\t / \u{1F600} \u{7} \u{2028}")),
            Just(Value::Null),
        ];
        let delta = prop_oneof![
            text.clone().prop_map(|t| json!({"content": t})),
            (text.clone(), text.clone())
                .prop_map(|(r, t)| json!({"role": "assistant", "reasoning": r, "content": t})),
            text.clone()
                .prop_map(|t| json!({"refusal": t, "tool_calls": null})),
            Just(json!({})),
            Just(json!({"content": "a", "tool_calls": "x"})),
            Just(Value::Null),
        ];
        let finish = prop_oneof![
            Just(Value::Null),
            Just(json!("stop")),
            Just(json!("length"))
        ];
        let choice = (delta, finish, proptest::option::of(text)).prop_map(|(d, f, m)| {
            let mut c = json!({"index": 0, "delta": d, "finish_reason": f, "logprobs": {"content": [1, -2.5e3, true]}});
            if let Some(m) = m {
                c["message"] = json!({"content": m});
            }
            c
        });
        let scalar = prop_oneof![Just(json!("gen-1")), Just(json!(5)), Just(Value::Null)];
        let kind = prop_oneof![
            Just(json!("content")),
            Just(json!("search_done")),
            Just(json!(3))
        ];
        let count = prop_oneof![
            Just(json!(257)),
            Just(json!(0)),
            Just(Value::Null),
            Just(json!(12.0)),
            Just(json!(-3)),
            Just(json!("7")),
            Just(json!(1e20)),
        ];
        let details = |key: &'static str| {
            prop_oneof![
                count
                    .clone()
                    .prop_map(move |n| json!({ key: n, "audio_tokens": 0 })),
                Just(Value::Null),
                Just(json!({})),
                Just(json!(4)),
            ]
        };
        let usage = (
            proptest::option::of(count.clone()),
            proptest::option::of(count.clone()),
            proptest::option::of(details("cached_tokens")),
            proptest::option::of(details("reasoning_tokens")),
            proptest::option::of(count),
            proptest::option::of(prop_oneof![Just(json!(0.0012)), Just(json!("0.5"))]),
        )
            .prop_map(|(p, c, pd, cd, q, cost)| {
                let mut u = serde_json::Map::new();
                u.insert("total_tokens".into(), json!(277));
                for (k, v) in [
                    ("prompt_tokens", p),
                    ("completion_tokens", c),
                    ("prompt_tokens_details", pd),
                    ("completion_tokens_details", cd),
                    ("num_search_queries", q),
                    ("cost", cost),
                ] {
                    if let Some(v) = v {
                        u.insert(k.into(), v);
                    }
                }
                Value::Object(u)
            })
            .boxed();
        (
            proptest::collection::vec(choice, 0..6),
            scalar.clone(),
            scalar,
            proptest::option::of(kind),
            proptest::option::of(prop_oneof![4 => usage, 1 => Just(Value::Null)]),
        )
            .prop_map(|(choices, id, model, kind, usage)| {
                let mut c = json!({"id": id, "object": "chat.completion.chunk",
                    "created": 1764000000, "model": model, "choices": choices});
                if let Some(k) = kind {
                    c["type"] = k;
                }
                if let Some(u) = usage {
                    c["usage"] = u;
                }
                c
            })
            .boxed()
    }

    /// Chunks of every shape a field can take, well-formed and not.
    fn any_chunk() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::{json, Value};
        let content = prop_oneof![
            Just(json!("hello")),
            Just(json!("é \" \\ \n\t / \u{1F600} \u{7}")),
            Just(Value::Null),
            Just(json!(5)),
            Just(json!([{"type": "text", "text": "ab"}, "cd"])),
            Just(json!({"x": 1})),
        ];
        let message = prop_oneof![
            Just(Value::Null),
            content.prop_map(|c| json!({"content": c})),
            Just(json!("a string")),
            Just(json!({"content": "a", "reasoning": "bb", "refusal": null,
                "tool_calls": [{"function": {"arguments": "{}"}}, {"function": null}]})),
            Just(json!({"tool_calls": 3})),
        ];
        let finish = prop_oneof![Just(Value::Null), Just(json!("stop")), Just(json!(1))];
        let choice = prop_oneof![
            (message.clone(), message, finish).prop_map(
                |(d, m, f)| json!({"index": 0, "delta": d, "message": m, "finish_reason": f})
            ),
            Just(Value::Null),
            Just(json!(7)),
            Just(json!([])),
        ];
        let choices = prop_oneof![
            proptest::collection::vec(choice, 0..4).prop_map(Value::Array),
            Just(Value::Null),
            Just(json!("x")),
        ];
        let scalar = prop_oneof![Just(json!("gen-1")), Just(json!(5)), Just(Value::Null)];
        let usage = prop_oneof![
            Just(json!({"prompt_tokens": 7, "completion_tokens": 9, "cost": "0.5"})),
            Just(json!({"prompt_tokens": "x"})),
            Just(json!("bad")),
        ];
        let kind = prop_oneof![
            Just(json!("content")),
            Just(json!("search_done")),
            Just(json!(3))
        ];
        let search = prop_oneof![Just(json!([{"results": [1, 2]}, {}])), Just(json!(4))];
        let error = prop_oneof![
            Just(json!({"type": "rate_limit", "code": 429})),
            Just(json!("e"))
        ];
        (
            proptest::option::of(choices),
            proptest::option::of(scalar.clone()),
            proptest::option::of(scalar),
            proptest::option::of(usage),
            proptest::option::of(kind),
            proptest::option::of(search),
            proptest::option::of(error),
            proptest::option::of(Just(json!({"usage": {"prompt_tokens": 1}}))),
        )
            .prop_map(|(c, id, model, u, k, sr, e, meta)| {
                let mut m = serde_json::Map::new();
                for (key, v) in [
                    ("choices", c),
                    ("id", id),
                    ("model", model),
                    ("usage", u),
                    ("type", k),
                    ("search_results", sr),
                    ("error", e),
                    ("meta", meta),
                ] {
                    if let Some(v) = v {
                        m.insert(key.to_string(), v);
                    }
                }
                Value::Object(m)
            })
    }

    proptest! {
        #[test]
        fn the_one_pass_parse_gives_what_the_lenient_one_gives(
            chunks in proptest::collection::vec(any_chunk(), 1..4),
            chunk in any::<bool>(),
        ) {
            let (mut fast, mut lenient) = (Observed::default(), Observed::default());
            for c in &chunks {
                let bytes = serde_json::to_vec(c).unwrap();
                let a = apply_json(&mut fast, &bytes, chunk).is_ok();
                let b = apply_lenient(&mut lenient, &bytes, chunk).is_ok();
                prop_assert_eq!(a, b);
            }
            prop_assert_eq!(fast, lenient);
        }

        /// Chunks as an upstream might write them (other whitespace, escapes where none are
        /// needed, a field twice) and damaged ones: every fast path gives what the lenient
        /// one gives.
        #[test]
        fn edited_chunks_read_the_same_on_every_path(
            c in prop_oneof![any_chunk(), usual_chunk()],
            twice in proptest::option::of(prop_oneof![
                Just(r#""id":"x","#), Just(r#""choices":[],"#), Just(r#""object":1,"#)
            ]),
            edits in proptest::collection::vec(
                (any::<prop::sample::Index>(), 0..super::super::skim::damage::KINDS), 0..4),
            chunk in any::<bool>(),
        ) {
            let mut bytes = serde_json::to_vec(&c).unwrap();
            super::super::skim::damage::apply(&mut bytes, twice, &edits);
            let (mut fast, mut lenient) = (Observed::default(), Observed::default());
            let a = apply_json(&mut fast, &bytes, chunk).is_ok();
            let b = apply_lenient(&mut lenient, &bytes, chunk).is_ok();
            prop_assert_eq!(a, b);
            prop_assert_eq!(fast, lenient);
        }

        #[test]
        fn usage_split_across_reads_is_counted_once(cuts in proptest::collection::vec(any::<usize>(), 0..16)) {
            let whole = run(BodyKind::Sse, None, &[STREAM.as_bytes()]);
            let parts = split(STREAM.as_bytes(), &cuts);
            prop_assert_eq!(run(BodyKind::Sse, None, &parts), whole);
        }

        #[test]
        fn compressed_bodies_split_anywhere_give_the_same_record(
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
            enc in prop_oneof![Just("gzip"), Just("deflate"), Just("raw-deflate"), Just("br")],
            sse in any::<bool>(),
        ) {
            let (kind, plain): (BodyKind, &[u8]) = if sse {
                (BodyKind::Sse, STREAM.as_bytes())
            } else {
                (BodyKind::Json, br#"{"id":"x","usage":{"prompt_tokens":7,"completion_tokens":9}}"#)
            };
            let whole = run(kind, None, &[plain]);
            let z = compress(enc, plain);
            let header = if enc == "raw-deflate" { "deflate" } else { enc };
            let parts = split(&z, &cuts);
            prop_assert_eq!(run(kind, Some(header), &parts), whole);
        }
    }
}
