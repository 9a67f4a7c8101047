//! Request inspection: what a request of one of the metered dialects (Chat Completions,
//! Responses, Anthropic Messages, embeddings, legacy completions) asks for, read from the whole
//! body in one pass without building a JSON tree. Each dialect names its fields its own way
//! (`max_output_tokens`, `safety_identifier`, `metadata.user_id`, `system`, `input`); they all
//! land in the one [`RequestMeta`] the decision and the record read.
//!
//! The body is forwarded unchanged whatever this finds; inspection only feeds metering and
//! budget decisions. A field of the wrong type is left out and noted (the upstream will answer
//! the request as it sees fit). Duplicate keys resolve to the last one, as the common JSON
//! parsers upstreams use do.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::ApiError;
use crate::meter::Api;

/// What the request asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestMeta {
    /// The dialect the body was read as.
    pub api: Api,
    pub model: Option<String>,
    /// Who the call is for: `user`; Responses' `safety_identifier` (else `user`); Messages'
    /// `metadata.user_id`, keyed on the account (or device) when it is Claude Code's JSON.
    pub user: Option<String>,
    /// `user` is a field the client sets to name its end user (every dialect but Messages,
    /// whose `metadata.user_id` clients fill with their own session or device ids). Under a
    /// virtual key, a claim naming someone else is a mismatch; a Messages body is simply
    /// attributed to the key's user.
    pub user_claim: bool,
    /// A second name the body gives its user: a Responses `user` next to a different
    /// `safety_identifier` (under a virtual key, each must be the key's user).
    pub other_user: Option<String>,
    /// Responses' `background: true`: the answer comes before the work, its usage later, where
    /// tokentap does not see it.
    pub background: bool,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    /// `stream_options.include_usage`, when given.
    pub include_usage: Option<bool>,
    /// `octen_search`, `octen_broad_search`, `function:<name>`, or the type of any other tool.
    pub tools: Vec<String>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub messages: u64,
    /// Bytes of text in `messages` (every string in them), the basis of the prompt estimate.
    pub prompt_text_bytes: u64,
    /// Bytes of other text the model reads as input (tool schemas, `response_format`): part
    /// of a budget's worst case.
    pub other_text_bytes: u64,
    /// `n`: how many choices to generate (legacy completions: the larger of `n` and `best_of`).
    pub n: Option<u64>,
    /// The web search tool's own limit (`max_searches` / `max_queries`; Messages' `max_uses`;
    /// Responses' `max_tool_calls`), when given.
    pub tool_max_searches: Option<u64>,
    /// Fields present with a type tokentap did not expect, e.g. `user (number)`.
    pub type_errors: Vec<String>,
    /// Keys that could mean two things: duplicates, or case variants of a known field.
    pub ambiguous: Vec<String>,
    /// Where members tokentap may edit stand in the inspected bytes (see [`Spans`]).
    pub spans: Spans,
}

/// Byte ranges in the inspected body, for edits that leave every other byte as sent
/// (`super::edit`). Only meaningful for the bytes that were inspected: a compressed body's
/// spans are those of its inflated copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spans {
    /// The value of each top-level `user` member (quotes included).
    pub user: Vec<std::ops::Range<usize>>,
    /// The value of the top-level `stream_options` member.
    pub stream_options: Option<std::ops::Range<usize>>,
    /// The top-level object's closing brace.
    pub close: usize,
    /// The value of `messages`, when the fast reader found it (the usual shape).
    pub messages: Option<std::ops::Range<usize>>,
}

/// The top-level fields tokentap reads, by dialect.
fn known(api: Api) -> &'static [&'static str] {
    match api {
        Api::ChatCompletions => &[
            "messages",
            "model",
            "user",
            "stream",
            "max_tokens",
            "n",
            "response_format",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "stream_options",
            "tools",
            "tool_choice",
            "functions",
            "web_search_options",
        ],
        Api::Completions => &[
            "prompt",
            "model",
            "user",
            "stream",
            "max_tokens",
            "n",
            "best_of",
            "temperature",
            "top_p",
            "stream_options",
        ],
        Api::Embeddings => &["input", "model", "user"],
        Api::Responses => &[
            "input",
            "instructions",
            "model",
            "user",
            "safety_identifier",
            "stream",
            "max_output_tokens",
            "max_tool_calls",
            "background",
            "temperature",
            "top_p",
            "text",
            "tools",
            "tool_choice",
        ],
        Api::Messages => &[
            "messages",
            "system",
            "model",
            "metadata",
            "stream",
            "max_tokens",
            "temperature",
            "top_p",
            "tools",
            "tool_choice",
        ],
    }
}

/// A key as a case-insensitive parser may read it (Unicode simple folding of the letters
/// that fold onto ASCII: `ſ` is `s`, the Kelvin sign is `k`).
fn fold(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            '\u{17F}' => 's',
            '\u{212A}' => 'k',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// Fields whose types tokentap relies on (metering, caps).
const CHECKED: [&str; 15] = [
    "model",
    "user",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "temperature",
    "top_p",
    "tools",
    "best_of",
    "safety_identifier",
    "max_output_tokens",
    "max_tool_calls",
    "metadata",
    "metadata.user_id",
];

impl RequestMeta {
    /// Refuses what tokentap cannot meter or cap faithfully: a field of the wrong type (the
    /// upstream would refuse it too; tokentap must not guess), and a `user` id that is too
    /// long or holds control characters (it becomes a ledger key, a label and a log field).
    pub fn check(&self, max_user_bytes: usize) -> Result<(), ApiError> {
        if let Some(a) = self.ambiguous.first() {
            return Err(ApiError::new(
                400,
                "invalid_request_error",
                format!("Ambiguous request body: {a}. Send each field once, in lower case."),
            )
            .code("ambiguous_field"));
        }
        if let Some(e) = self.type_errors.first() {
            let field = e.split(" (").next().unwrap_or_default();
            let param = CHECKED
                .iter()
                .find(|f| **f == field)
                .copied()
                .unwrap_or("body");
            return Err(ApiError::new(
                400,
                "invalid_request_error",
                format!(
                    "Invalid type for `{field}`: got {}.",
                    &e[field.len()..].trim()
                ),
            )
            .param(param)
            .code("invalid_type"));
        }
        if let Some(u) = &self.user {
            if u.len() > max_user_bytes {
                return Err(ApiError::new(
                    400,
                    "invalid_request_error",
                    format!("`user` is longer than {max_user_bytes} bytes."),
                )
                .param("user")
                .code("invalid_user"));
            }
            if u.chars().any(char::is_control) {
                return Err(ApiError::new(
                    400,
                    "invalid_request_error",
                    "`user` contains control characters.",
                )
                .param("user")
                .code("invalid_user"));
            }
        }
        Ok(())
    }

    /// A web search tool the upstream runs (and bills) was offered to the model: the
    /// target's `octen_search`, OpenAI's `web_search*` (Responses tools, Chat's
    /// `web_search_options`), Anthropic's `web_search_*`.
    pub fn web_search_requested(&self) -> bool {
        self.tools.iter().any(|t| is_search_tool(t))
    }

    /// The output cap the request sets: `max_completion_tokens` wins over `max_tokens`.
    pub fn output_cap(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAnObject(pub String);

impl fmt::Display for NotAnObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tool type that runs web searches the upstream bills.
fn is_search_tool(t: &str) -> bool {
    t == "octen_search" || t == "octen_broad_search" || t.starts_with("web_search")
}

/// Inspects a whole request body of `api` sent with `Content-Encoding: encoding` (gzip,
/// deflate, br or none): a compressed body is inflated (a copy, at most `limit` bytes) for
/// inspection only.
pub fn inspect_encoded(
    api: Api,
    body: &[u8],
    encoding: Option<&str>,
    limit: usize,
) -> Result<RequestMeta, NotAnObject> {
    use std::io::Read;
    let reader = match super::codec::reader(body, encoding) {
        Ok(None) => return inspect_as(api, body),
        Ok(Some(r)) => r,
        Err(e) => return Err(NotAnObject(format!("request {e}"))),
    };
    let mut plain = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut plain)
        .map_err(|e| NotAnObject(format!("compressed request body does not inflate: {e}")))?;
    if plain.len() > limit {
        return Err(NotAnObject(format!(
            "compressed request body inflates to more than {limit} bytes"
        )));
    }
    inspect_as(api, &plain)
}

/// Inspects a whole Chat Completions request body.
pub fn inspect(body: &[u8]) -> Result<RequestMeta, NotAnObject> {
    inspect_as(Api::ChatCompletions, body)
}

/// Inspects a whole request body of `api`.
pub fn inspect_as(api: Api, body: &[u8]) -> Result<RequestMeta, NotAnObject> {
    // A long conversation's messages are read without serde, and serde reads the rest, with
    // `0` where the messages were. Anything unusual (or a rest serde refuses): serde reads the
    // whole body, so the answer and its error message are serde's.
    let has_messages = matches!(api, Api::ChatCompletions | Api::Messages);
    if let Some(m) = has_messages.then(|| super::skim::messages(body)).flatten() {
        let mut rest = Vec::with_capacity(body.len() - m.span.len() + 1);
        rest.extend_from_slice(&body[..m.span.start]);
        rest.push(b'0');
        rest.extend_from_slice(&body[m.span.end..]);
        if let Ok(mut meta) = inspect_serde(api, &rest) {
            meta.messages = m.count;
            meta.prompt_text_bytes += m.text_bytes;
            // Spans after the messages move back to where they stand in the body.
            let shift = m.span.len() - 1;
            let at = |r: &mut std::ops::Range<usize>| {
                if r.start > m.span.start {
                    *r = r.start + shift..r.end + shift;
                }
            };
            meta.spans.user.iter_mut().for_each(at);
            meta.spans.stream_options.iter_mut().for_each(at);
            meta.spans.close += shift;
            meta.spans.messages = Some(m.span);
            return Ok(meta);
        }
    }
    inspect_serde(api, body)
}

/// [`inspect_as`] by serde alone.
fn inspect_serde(api: Api, body: &[u8]) -> Result<RequestMeta, NotAnObject> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut meta = de
        .deserialize_any(MetaVisitor {
            base: body.as_ptr() as usize,
            api,
        })
        .map_err(|e| NotAnObject(format!("request body is not a JSON object: {e}")))?;
    de.end()
        .map_err(|e| NotAnObject(format!("request body has trailing data: {e}")))?;
    // Only whitespace follows the object.
    meta.spans.close = body
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .unwrap_or_default();
    Ok(meta)
}

/// An object key, borrowed from the body unless it holds an escape (serde's own `Cow<str>`
/// always allocates, and the key was cloned once more into `seen`: callgrind, eight
/// allocations for a four-key request).
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Reads the top level; `base` is the address of the body's first byte, so that a borrowed
/// value's place in the body is known.
struct MetaVisitor {
    base: usize,
    api: Api,
}

impl MetaVisitor {
    fn span(&self, raw: &RawValue) -> std::ops::Range<usize> {
        let start = raw.get().as_ptr() as usize - self.base;
        start..start + raw.get().len()
    }
}

impl<'de> Visitor<'de> for MetaVisitor {
    type Value = RequestMeta;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RequestMeta, A::Error> {
        use Api::*;
        let api = self.api;
        let mut m = RequestMeta {
            api,
            user_claim: api != Messages,
            ..RequestMeta::default()
        };
        let known = known(api);
        // Responses: `safety_identifier` wins over the deprecated `user`, in any order.
        let (mut safety, mut plain_user) = (None, None);
        let mut best_of = None;
        let mut seen: Vec<Cow<'de, str>> = Vec::new();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            // Parsers disagree about duplicate keys (first or last wins) and some match keys
            // case-insensitively: a body that could mean two things to tokentap and the
            // upstream is refused, not guessed at.
            if seen.contains(&key) {
                m.ambiguous.push(format!("`{key}` appears twice"));
            } else if !known.contains(&key.as_ref()) {
                let folded = fold(&key);
                if let Some(k) = known.iter().find(|k| **k == folded) {
                    m.ambiguous.push(format!("`{key}` looks like `{k}`"));
                }
            }
            if seen.len() < 256 {
                seen.push(key.clone());
            }
            match (api, key.as_ref()) {
                (ChatCompletions | Messages, "messages") => {
                    let (n, bytes) = map.next_value_seed(MessagesSeed)?;
                    m.messages = n;
                    m.prompt_text_bytes += bytes;
                }
                // The rest of what the model reads as its prompt.
                (Responses, "input" | "instructions")
                | (Messages, "system")
                | (Completions, "suffix") => {
                    m.prompt_text_bytes += map.next_value_seed(TextBytes)?
                }
                // (Either may be token ids.)
                (Embeddings, "input") | (Completions, "prompt") => {
                    m.prompt_text_bytes += map.next_value_seed(InputBytes)?
                }
                (_, "model") => m.model = string(&key, map.next_value()?, &mut m.type_errors),
                (Responses, "safety_identifier") => {
                    let raw: &'de RawValue = map.next_value()?;
                    m.spans.user.push(self.span(raw));
                    safety = string(&key, raw_value(raw)?, &mut m.type_errors)
                }
                (ChatCompletions | Completions | Embeddings | Responses, "user") => {
                    let raw: &'de RawValue = map.next_value()?;
                    m.spans.user.push(self.span(raw));
                    plain_user = string(&key, raw_value(raw)?, &mut m.type_errors)
                }
                (Messages, "metadata") => match map.next_value::<Value>()? {
                    Value::Object(o) => match o.get("user_id") {
                        Some(Value::String(u)) => plain_user = Some(messages_user(u)),
                        None | Some(Value::Null) => {}
                        Some(v) => m.type_errors.push(type_error("metadata.user_id", v)),
                    },
                    Value::Null => {}
                    v => m.type_errors.push(type_error(&key, &v)),
                },
                (ChatCompletions | Completions | Responses | Messages, "stream") => {
                    m.stream = match map.next_value::<Value>()? {
                        Value::Bool(b) => b,
                        Value::Null => false,
                        v => {
                            m.type_errors.push(type_error(&key, &v));
                            false
                        }
                    }
                }
                (ChatCompletions | Completions | Messages, "max_tokens")
                | (Responses, "max_output_tokens") => {
                    m.max_tokens = uint(&key, map.next_value()?, &mut m.type_errors)
                }
                (ChatCompletions | Completions, "n") => {
                    m.n = uint(&key, map.next_value()?, &mut m.type_errors)
                }
                (Completions, "best_of") => {
                    best_of = uint(&key, map.next_value()?, &mut m.type_errors)
                }
                (ChatCompletions, "response_format") | (Responses, "text") => {
                    m.other_text_bytes += map.next_value_seed(TextBytes)?
                }
                (ChatCompletions, "max_completion_tokens") => {
                    m.max_completion_tokens = uint(&key, map.next_value()?, &mut m.type_errors)
                }
                (Responses, "background") => {
                    m.background = matches!(map.next_value::<Value>()?, Value::Bool(true))
                }
                (Responses, "max_tool_calls") => {
                    m.tool_max_searches = uint(&key, map.next_value()?, &mut m.type_errors)
                }
                (ChatCompletions | Completions | Responses | Messages, "temperature") => {
                    m.temperature = float(&key, map.next_value()?, &mut m.type_errors)
                }
                (ChatCompletions | Completions | Responses | Messages, "top_p") => {
                    m.top_p = float(&key, map.next_value()?, &mut m.type_errors)
                }
                (ChatCompletions | Completions, "stream_options") => {
                    let raw: &'de RawValue = map.next_value()?;
                    m.spans.stream_options = Some(self.span(raw));
                    m.include_usage = match raw_value(raw)? {
                        Value::Object(o) => o.get("include_usage").and_then(Value::as_bool),
                        _ => None,
                    }
                }
                // Chat's search models search when asked to (`web_search_options`).
                (ChatCompletions, "web_search_options") => {
                    if !matches!(map.next_value::<Value>()?, Value::Null) {
                        m.tools.push("web_search_options".into());
                    }
                }
                (ChatCompletions | Responses | Messages, "tools") => {
                    match map.next_value::<Value>()? {
                        Value::Array(a) => {
                            m.other_text_bytes += a.iter().map(value_text_bytes).sum::<u64>();
                            let limit = a
                                .iter()
                                .filter(|t| {
                                    t.get("type")
                                        .and_then(Value::as_str)
                                        .is_some_and(is_search_tool)
                                })
                                .filter_map(|t| {
                                    let p = t.get("parameters").unwrap_or(t);
                                    p.get("max_searches")
                                        .or_else(|| p.get("max_queries"))
                                        .or_else(|| t.get("max_uses"))?
                                        .as_u64()
                                })
                                .max();
                            m.tool_max_searches = m.tool_max_searches.or(limit);
                            m.tools.extend(a.iter().filter_map(tool_name));
                        }
                        Value::Null => {}
                        v => m.type_errors.push(type_error(&key, &v)),
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        m.other_user = plain_user
            .clone()
            .filter(|u| safety.is_some() && safety.as_ref() != Some(u));
        m.user = safety.or(plain_user);
        if best_of.is_some() {
            m.n = m.n.max(best_of);
        }
        Ok(m)
    }
}

/// The user of a Messages call from `metadata.user_id`. Claude Code sends a JSON string,
/// `{"device_id":…,"account_uuid":…,"session_id":…}` (older versions:
/// `user_<device>_account_<uuid>_session_<uuid>`), with a new session every run: the user is
/// the account, or the device when no account is signed in, never the session (else every
/// session would be a new user with caps of its own). Any other value is the user as sent.
pub fn messages_user(user_id: &str) -> String {
    let t = user_id.trim_start();
    if t.starts_with('{') {
        if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(t) {
            let field = |k: &str| {
                o.get(k)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
            };
            if let Some(u) = field("account_uuid").or_else(|| field("device_id")) {
                return u;
            }
        }
        return user_id.to_string();
    }
    if let Some(rest) = user_id.strip_prefix("user_") {
        if let Some((device, rest)) = rest.split_once("_account_") {
            let account = rest.split("_session_").next().unwrap_or_default();
            return if account.is_empty() { device } else { account }.to_string();
        }
    }
    user_id.to_string()
}

/// A borrowed raw value as a tree (it is valid JSON: the parser just read it).
fn raw_value<E: de::Error>(raw: &RawValue) -> Result<Value, E> {
    serde_json::from_str(raw.get()).map_err(E::custom)
}

fn value_text_bytes(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.len() as u64,
        Value::Array(a) => a.iter().map(value_text_bytes).sum(),
        Value::Object(o) => o.values().map(value_text_bytes).sum(),
        _ => 0,
    }
}

/// A tool as the record names it: `function:<name>` for the client's own tools (Chat's
/// `function.name`, Responses' `name`, Messages' custom tools, which may have no type), the
/// type of a built-in one.
fn tool_name(t: &Value) -> Option<String> {
    let name = || {
        t.get("function")
            .and_then(|f| f.get("name"))
            .or_else(|| t.get("name"))
            .and_then(Value::as_str)
    };
    match t.get("type").and_then(Value::as_str) {
        Some("function" | "custom") | None => Some(format!("function:{}", name()?)),
        Some(ty) => Some(ty.to_string()),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_error(key: &str, v: &Value) -> String {
    format!("{key} ({})", kind(v))
}

fn string(key: &str, v: Value, errs: &mut Vec<String>) -> Option<String> {
    match v {
        Value::String(s) => Some(s),
        Value::Null => None,
        v => {
            errs.push(type_error(key, &v));
            None
        }
    }
}

fn uint(key: &str, v: Value, errs: &mut Vec<String>) -> Option<u64> {
    match v {
        Value::Number(n) if n.as_u64().is_some() => n.as_u64(),
        Value::Null => None,
        v => {
            errs.push(type_error(key, &v));
            None
        }
    }
}

fn float(key: &str, v: Value, errs: &mut Vec<String>) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Null => None,
        v => {
            errs.push(type_error(key, &v));
            None
        }
    }
}

/// Walks `messages` counting messages and the bytes of every string inside them, without
/// allocating a tree (a long conversation can be many megabytes).
struct MessagesSeed;

impl<'de> DeserializeSeed<'de> for MessagesSeed {
    type Value = (u64, u64);

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(u64, u64), D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = (u64, u64);
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(u64, u64), A::Error> {
                let (mut n, mut bytes) = (0, 0);
                while let Some(b) = seq.next_element_seed(TextBytes)? {
                    n += 1;
                    bytes += b;
                }
                Ok((n, bytes))
            }
            fn visit_unit<E: de::Error>(self) -> Result<(u64, u64), E> {
                Ok((0, 0))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(u64, u64), A::Error> {
                let b = TextBytes.visit_map(map)?;
                Ok((1, b))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<(u64, u64), E> {
                Ok((1, s.len() as u64))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<(u64, u64), E> {
                Ok((0, 0))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<(u64, u64), E> {
                Ok((0, 0))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<(u64, u64), E> {
                Ok((0, 0))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<(u64, u64), E> {
                Ok((0, 0))
            }
        }
        d.deserialize_any(V)
    }
}

/// An embeddings `input`: the bytes of its strings, and four bytes (one token's worth) for
/// each token id of an input given as ids.
struct InputBytes;

impl<'de> DeserializeSeed<'de> for InputBytes {
    type Value = u64;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = u64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an embeddings input")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<u64, E> {
                Ok(s.len() as u64)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<u64, E> {
                Ok(4)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<u64, E> {
                Ok(4)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<u64, E> {
                Ok(4)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<u64, E> {
                Ok(0)
            }
            fn visit_unit<E: de::Error>(self) -> Result<u64, E> {
                Ok(0)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
                let mut n = 0;
                while let Some(b) = seq.next_element_seed(InputBytes)? {
                    n += b;
                }
                Ok(n)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<u64, A::Error> {
                TextBytes.visit_map(map)
            }
        }
        d.deserialize_any(V)
    }
}

/// Sums the byte length of every string (object values, not keys) in a JSON value, except
/// inline media (`image`, `image_url`, `input_audio`, `file`): base64 data is not text, and a
/// cut-off call's prompt estimate must not count it as such.
struct TextBytes;

pub(super) const MEDIA_KEYS: [&str; 5] = [
    "image",
    "image_url",
    "input_audio",
    "file",
    // Responses' inline files.
    "file_data",
];

impl<'de> DeserializeSeed<'de> for TextBytes {
    type Value = u64;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_any(TextBytes)
    }
}

impl<'de> Visitor<'de> for TextBytes {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<u64, E> {
        Ok(s.len() as u64)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<u64, E> {
        Ok(0)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<u64, E> {
        Ok(0)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<u64, E> {
        Ok(0)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<u64, E> {
        Ok(0)
    }
    fn visit_unit<E: de::Error>(self) -> Result<u64, E> {
        Ok(0)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let mut n = 0;
        while let Some(b) = seq.next_element_seed(TextBytes)? {
            n += b;
        }
        Ok(n)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        let mut n = 0;
        while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if MEDIA_KEYS.contains(&k.as_ref()) {
                map.next_value::<IgnoredAny>()?;
            } else {
                n += map.next_value_seed(TextBytes)?;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_the_fields_metering_needs() {
        let body = br#"{"model":"anthropic/claude-opus-4.6","messages":[{"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"hello"}]}],"stream":true,
            "stream_options":{"include_usage":true},"max_tokens":100,"max_completion_tokens":50,
            "tools":[{"type":"octen_search","parameters":{"max_searches":3}},
                     {"type":"function","function":{"name":"get_weather"}}],
            "temperature":0.5,"top_p":1,"user":"alice"}"#;
        let m = inspect(body).unwrap();
        assert_eq!(m.model.as_deref(), Some("anthropic/claude-opus-4.6"));
        assert_eq!(m.user.as_deref(), Some("alice"));
        assert!(m.stream);
        assert_eq!(m.include_usage, Some(true));
        assert_eq!(m.output_cap(), Some(50));
        assert_eq!(m.tools, vec!["octen_search", "function:get_weather"]);
        assert!(m.web_search_requested());
        assert_eq!(m.messages, 2);
        // "system" + "be brief" + "user" + "text" + "hello"
        assert_eq!(m.prompt_text_bytes, 6 + 8 + 4 + 4 + 5);
        assert_eq!(m.temperature, Some(0.5));
        assert!(m.type_errors.is_empty());
    }

    #[test]
    fn a_responses_request_is_read_in_its_own_terms() {
        let body = br#"{"model":"gpt-5","input":[{"role":"user","content":[{"type":"input_text","text":"hello"}]}],
            "instructions":"be brief","stream":true,"max_output_tokens":300,"user":"old-style",
            "safety_identifier":"alice","tools":[{"type":"web_search"},{"type":"function","name":"f","parameters":{}}],
            "max_tool_calls":4,"stream_options":{"include_obfuscation":false}}"#;
        let m = inspect_as(Api::Responses, body).unwrap();
        assert_eq!(m.api, Api::Responses);
        assert_eq!(m.user.as_deref(), Some("alice"), "safety_identifier wins");
        assert!(m.user_claim);
        assert!(m.stream);
        assert_eq!(m.output_cap(), Some(300));
        assert_eq!(m.tools, vec!["web_search", "function:f"]);
        assert!(m.web_search_requested());
        assert_eq!(m.tool_max_searches, Some(4));
        assert_eq!(m.include_usage, None, "no usage to ask for in this dialect");
        // "user" + "input_text" + "hello" + "be brief"
        assert_eq!(m.prompt_text_bytes, 4 + 10 + 5 + 8);
        assert_eq!(m.spans.user.len(), 2);
        let m = inspect_as(Api::Responses, br#"{"safety_identifier":"a","user":"b"}"#).unwrap();
        assert_eq!(m.user.as_deref(), Some("a"), "in any order");
    }

    #[test]
    fn a_messages_request_is_read_in_its_own_terms() {
        let body = br#"{"model":"claude-sonnet-4-5","max_tokens":1024,"system":[{"type":"text","text":"sys"}],
            "messages":[{"role":"user","content":[{"type":"text","text":"hi"},
              {"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}}]}],
            "metadata":{"user_id":"{\"device_id\":\"dev-1\",\"account_uuid\":\"acc-9\",\"session_id\":\"s-1\"}"},
            "tools":[{"type":"web_search_20250305","name":"web_search","max_uses":3},
                     {"name":"get_weather","input_schema":{"type":"object"}}],
            "stream":true,"user":"ignored"}"#;
        let m = inspect_as(Api::Messages, body).unwrap();
        assert_eq!(
            m.user.as_deref(),
            Some("acc-9"),
            "Claude Code: the account, not the session"
        );
        assert!(!m.user_claim);
        assert_eq!(m.output_cap(), Some(1024));
        assert_eq!(m.tools, vec!["web_search_20250305", "function:get_weather"]);
        assert!(m.web_search_requested());
        assert_eq!(m.tool_max_searches, Some(3));
        assert_eq!(m.messages, 1);
        // "text" + "sys" + "user" + "text" + "hi" + "image" + the image's source, counted as
        // text (Anthropic's `source` may be a text document: better over than under a cap)
        assert_eq!(m.prompt_text_bytes, 4 + 3 + 4 + 4 + 2 + 5 + 6 + 9 + 4);
        assert!(
            m.spans.user.is_empty(),
            "a Messages body is never rewritten"
        );
    }

    #[test]
    fn claude_code_users_are_keyed_on_the_account_or_the_device() {
        let cc = |d: &str, a: &str, s: &str| {
            messages_user(
                &serde_json::json!({"device_id": d, "account_uuid": a, "session_id": s})
                    .to_string(),
            )
        };
        assert_eq!(cc("dev", "acc", "s1"), "acc");
        assert_eq!(cc("dev", "acc", "s2"), "acc");
        assert_eq!(cc("dev", "", "s3"), "dev");
        assert_eq!(messages_user("user_dev_account_acc_session_s1"), "acc");
        assert_eq!(messages_user("user_dev_account__session_s1"), "dev");
        assert_eq!(messages_user("alice"), "alice");
        assert_eq!(messages_user("{not json"), "{not json");
    }

    #[test]
    fn embeddings_and_completions_requests_are_read() {
        let m = inspect_as(
            Api::Embeddings,
            br#"{"model":"text-embedding-3-small","input":["abcd","ef",[1,2,3]],"user":"u"}"#,
        )
        .unwrap();
        assert_eq!(m.prompt_text_bytes, 4 + 2 + 3 * 4);
        assert_eq!(m.user.as_deref(), Some("u"));
        assert!(!m.stream);
        let m = inspect_as(
            Api::Completions,
            br#"{"model":"gpt-3.5-turbo-instruct","prompt":"say hi","max_tokens":7,"n":2,"best_of":3,"stream":true}"#,
        )
        .unwrap();
        assert_eq!(m.prompt_text_bytes, 6);
        assert_eq!((m.output_cap(), m.n), (Some(7), Some(3)));
        assert!(m.stream);
        // A prompt of token ids reserves a token each.
        let m = inspect_as(
            Api::Completions,
            br#"{"model":"m","prompt":[[1,2,3],[4]],"suffix":"ab"}"#,
        )
        .unwrap();
        assert_eq!(m.prompt_text_bytes, 4 * 4 + 2);
        // Responses naming two different users: both are claims.
        let m = inspect_as(
            Api::Responses,
            br#"{"safety_identifier":"alice","user":"bob","background":true}"#,
        )
        .unwrap();
        assert_eq!(
            (m.user.as_deref(), m.other_user.as_deref()),
            (Some("alice"), Some("bob"))
        );
        assert!(m.background);
    }

    #[test]
    fn wrong_types_are_noted_not_fatal() {
        let m = inspect(br#"{"user":123,"stream":"yes","max_tokens":-5,"model":"m"}"#).unwrap();
        assert_eq!(m.user, None);
        assert!(!m.stream);
        assert_eq!(m.max_tokens, None);
        assert_eq!(m.model.as_deref(), Some("m"));
        assert_eq!(
            m.type_errors,
            vec!["user (number)", "stream (string)", "max_tokens (number)"]
        );
    }

    #[test]
    fn keys_with_escapes_are_read_and_compared_unescaped() {
        let m = inspect(br#"{"model":"m","us\u0065r":"bob","messages":[]}"#).unwrap();
        assert_eq!(m.user.as_deref(), Some("bob"));
        assert!(m.ambiguous.is_empty());
        let m = inspect(br#"{"user":"a","us\u0065r":"b"}"#).unwrap();
        assert_eq!(m.ambiguous, vec!["`user` appears twice".to_string()]);
    }

    #[test]
    fn last_duplicate_key_wins() {
        let m = inspect(br#"{"user":"alice","user":"bob"}"#).unwrap();
        assert_eq!(m.user.as_deref(), Some("bob"));
    }

    #[test]
    fn user_may_be_the_last_field_of_a_large_body() {
        let big = "x".repeat(5 << 20);
        let body = format!(r#"{{"messages":[{{"role":"user","content":"{big}"}}],"user":"zed"}}"#);
        let m = inspect(body.as_bytes()).unwrap();
        assert_eq!(m.user.as_deref(), Some("zed"));
        assert_eq!(m.prompt_text_bytes, 4 + (5 << 20));
    }

    #[test]
    fn inline_media_is_not_counted_as_prompt_text() {
        let m = inspect(
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"},
            {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAAAAAAAAAAAAAA"}}]}]}"#,
        )
        .unwrap();
        // "user" + "text" + "hi" + "image_url" (the part's type)
        assert_eq!(m.prompt_text_bytes, 4 + 4 + 2 + 9);
    }

    #[test]
    fn compressed_request_bodies_are_inspected() {
        use std::io::Write;
        let body = br#"{"model":"m","user":"zoe","messages":[]}"#;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(body).unwrap();
        let z = e.finish().unwrap();
        let m = inspect_encoded(Api::ChatCompletions, &z, Some("gzip"), 1000).unwrap();
        assert_eq!(m.user.as_deref(), Some("zoe"));
        assert!(
            inspect_encoded(Api::ChatCompletions, &z, Some("gzip"), 10).is_err(),
            "inflating is bounded"
        );
        assert!(inspect_encoded(Api::ChatCompletions, &z, Some("zstd"), 1000).is_err());
        assert!(inspect_encoded(Api::ChatCompletions, b"garbage", Some("gzip"), 1000).is_err());
        // "deflate" zlib-wrapped or raw, as the response tap reads it.
        for raw in [false, true] {
            let z = if raw {
                let mut e =
                    flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(body).unwrap();
                e.finish().unwrap()
            } else {
                let mut e =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(body).unwrap();
                e.finish().unwrap()
            };
            let m = inspect_encoded(Api::ChatCompletions, &z, Some(" Deflate "), 1000).unwrap();
            assert_eq!(m.user.as_deref(), Some("zoe"), "raw deflate: {raw}");
        }
    }

    #[test]
    fn non_objects_are_refused() {
        assert!(inspect(b"[1,2]").is_err());
        assert!(inspect(b"not json").is_err());
        assert!(inspect(b"{\"a\":1").is_err());
        assert!(inspect(b"{} x").is_err());
        assert!(inspect(b"").is_err());
    }

    /// [`inspect`], less what only its fast reader finds (where `messages` stands).
    fn fast(body: &[u8]) -> Result<RequestMeta, NotAnObject> {
        inspect(body).map(|mut m| {
            m.spans.messages = None;
            m
        })
    }

    /// Request bodies as clients write them, and damaged ones.
    fn any_request() -> impl Strategy<Value = String> {
        use serde_json::json;
        let text = prop_oneof![
            Just(json!("hello")),
            Just(json!("")),
            Just(json!("é \" \\ \n\t / \u{1F600} \u{7} \u{2028}")),
            Just(json!("a long turn of a conversation, ".repeat(9))),
        ];
        let part = prop_oneof![
            text.clone()
                .prop_map(|t| json!({"type": "text", "text": t})),
            Just(json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})),
            text.clone(),
        ];
        let content = prop_oneof![
            text.clone(),
            proptest::collection::vec(part, 0..3).prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
        ];
        let scalar = prop_oneof![
            Just(json!(7)),
            Just(json!(-0)),
            Just(json!(123456789012345678_u64)),
            Just(json!(12345678901234567890_u64)),
            Just(json!(0.5)),
            Just(json!(true)),
            Just(json!([1, {"k": null}])),
            // Numbers serde_json reads as out of range (written in below).
            Just(json!("@E400@")),
            Just(json!("@D400@")),
            Just(json!({"input_audio": {"data": "AAAA", "n": 1.5e300}})),
        ];
        let message = (content, proptest::option::of(scalar.clone())).prop_map(|(c, extra)| {
            let mut m = json!({"role": "user", "content": c});
            if let Some(x) = extra {
                m["name"] = x;
            }
            m
        });
        let messages = prop_oneof![
            4 => proptest::collection::vec(message.clone(), 0..4).prop_map(serde_json::Value::from),
            1 => message,
            1 => text,
            1 => scalar,
        ];
        (messages, any::<bool>(), any::<bool>()).prop_map(|(msgs, first, user)| {
            let mut m = serde_json::Map::new();
            if first {
                m.insert("messages".into(), msgs.clone());
            }
            m.insert("model".into(), json!("m/x"));
            if user {
                m.insert("user".into(), json!("alice"));
            }
            m.insert("temperature".into(), json!(0.25));
            if !first {
                m.insert("messages".into(), msgs);
            }
            serde_json::Value::Object(m)
                .to_string()
                .replace(r#""@E400@""#, "1e400")
                .replace(r#""@D400@""#, &format!("1{}", "0".repeat(400)))
        })
    }

    proptest! {
        #[test]
        fn the_fast_messages_reader_gives_what_serde_gives(
            body in any_request(),
            twice in proptest::option::of(Just(r#""messages":[],"#)),
            edits in proptest::collection::vec(
                (any::<prop::sample::Index>(), 0..super::super::skim::damage::KINDS), 0..3),
        ) {
            let mut b = body.into_bytes();
            super::super::skim::damage::apply(&mut b, twice, &edits);
            prop_assert_eq!(fast(&b), inspect_serde(Api::ChatCompletions, &b), "{}", String::from_utf8_lossy(&b));
        }
    }

    #[test]
    fn long_conversations_are_read_without_serde_and_counted_the_same() {
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}},{{"role":"assistant","content":[{{"type":"text","text":"ok\n"}},{{"type":"image_url","image_url":{{"url":"data:x"}}}}]}}],"user":"u"}}"#,
            "x".repeat(100_000)
        );
        let m = super::super::skim::messages(body.as_bytes()).expect("the usual shape");
        assert_eq!((m.count, m.text_bytes), (2, 4 + 100_000 + 9 + 4 + 3 + 9));
        assert_eq!(
            fast(body.as_bytes()),
            inspect_serde(Api::ChatCompletions, body.as_bytes())
        );
        assert_eq!(
            inspect(body.as_bytes()).unwrap().spans.messages,
            Some(m.span),
            "the fast reader says where the messages are"
        );
    }
}
