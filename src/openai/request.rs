//! Request inspection: what a Chat Completions request asks for, read from the whole body in
//! one pass without building a JSON tree.
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

/// What the request asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestMeta {
    pub model: Option<String>,
    pub user: Option<String>,
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
    /// `n`: how many choices to generate.
    pub n: Option<u64>,
    /// The web search tool's own limit (`max_searches` / `max_queries`), when given.
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

/// The top-level fields tokentap reads.
const KNOWN: [&str; 14] = [
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
];

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
const CHECKED: [&str; 9] = [
    "model",
    "user",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "temperature",
    "top_p",
    "tools",
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

    /// The built-in web search tool was offered to the model.
    pub fn web_search_requested(&self) -> bool {
        self.tools
            .iter()
            .any(|t| t == "octen_search" || t == "octen_broad_search")
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

/// Inspects a whole request body sent with `Content-Encoding: encoding` (gzip, deflate, br or
/// none): a compressed body is inflated (a copy, at most `limit` bytes) for inspection only.
pub fn inspect_encoded(
    body: &[u8],
    encoding: Option<&str>,
    limit: usize,
) -> Result<RequestMeta, NotAnObject> {
    use std::io::Read;
    let reader = match super::codec::reader(body, encoding) {
        Ok(None) => return inspect(body),
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
    inspect(&plain)
}

/// Inspects a whole request body.
pub fn inspect(body: &[u8]) -> Result<RequestMeta, NotAnObject> {
    // A long conversation's messages are read without serde, and serde reads the rest, with
    // `0` where the messages were. Anything unusual (or a rest serde refuses): serde reads the
    // whole body, so the answer and its error message are serde's.
    if let Some(m) = super::skim::messages(body) {
        let mut rest = Vec::with_capacity(body.len() - m.span.len() + 1);
        rest.extend_from_slice(&body[..m.span.start]);
        rest.push(b'0');
        rest.extend_from_slice(&body[m.span.end..]);
        if let Ok(mut meta) = inspect_serde(&rest) {
            meta.messages = m.count;
            meta.prompt_text_bytes = m.text_bytes;
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
    inspect_serde(body)
}

/// [`inspect`] by serde alone.
fn inspect_serde(body: &[u8]) -> Result<RequestMeta, NotAnObject> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut meta = de
        .deserialize_any(MetaVisitor {
            base: body.as_ptr() as usize,
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
        let mut m = RequestMeta::default();
        let mut seen: Vec<Cow<'de, str>> = Vec::new();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            // Parsers disagree about duplicate keys (first or last wins) and some match keys
            // case-insensitively: a body that could mean two things to tokentap and the
            // upstream is refused, not guessed at.
            if seen.contains(&key) {
                m.ambiguous.push(format!("`{key}` appears twice"));
            } else if !KNOWN.contains(&key.as_ref()) {
                let folded = fold(&key);
                if let Some(k) = KNOWN.iter().find(|k| **k == folded) {
                    m.ambiguous.push(format!("`{key}` looks like `{k}`"));
                }
            }
            if seen.len() < 256 {
                seen.push(key.clone());
            }
            match key.as_ref() {
                "messages" => {
                    let (n, bytes) = map.next_value_seed(MessagesSeed)?;
                    m.messages = n;
                    m.prompt_text_bytes = bytes;
                }
                "model" => m.model = string(&key, map.next_value()?, &mut m.type_errors),
                "user" => {
                    let raw: &'de RawValue = map.next_value()?;
                    m.spans.user.push(self.span(raw));
                    m.user = string(&key, raw_value(raw)?, &mut m.type_errors)
                }
                "stream" => {
                    m.stream = match map.next_value::<Value>()? {
                        Value::Bool(b) => b,
                        Value::Null => false,
                        v => {
                            m.type_errors.push(type_error(&key, &v));
                            false
                        }
                    }
                }
                "max_tokens" => m.max_tokens = uint(&key, map.next_value()?, &mut m.type_errors),
                "n" => m.n = uint(&key, map.next_value()?, &mut m.type_errors),
                "response_format" => m.other_text_bytes += map.next_value_seed(TextBytes)?,
                "max_completion_tokens" => {
                    m.max_completion_tokens = uint(&key, map.next_value()?, &mut m.type_errors)
                }
                "temperature" => m.temperature = float(&key, map.next_value()?, &mut m.type_errors),
                "top_p" => m.top_p = float(&key, map.next_value()?, &mut m.type_errors),
                "stream_options" => {
                    let raw: &'de RawValue = map.next_value()?;
                    m.spans.stream_options = Some(self.span(raw));
                    m.include_usage = match raw_value(raw)? {
                        Value::Object(o) => o.get("include_usage").and_then(Value::as_bool),
                        _ => None,
                    }
                }
                "tools" => {
                    m.tools = match map.next_value::<Value>()? {
                        Value::Array(a) => {
                            m.other_text_bytes += a.iter().map(value_text_bytes).sum::<u64>();
                            m.tool_max_searches = a
                                .iter()
                                .filter_map(|t| {
                                    let p = t.get("parameters")?;
                                    p.get("max_searches")
                                        .or_else(|| p.get("max_queries"))?
                                        .as_u64()
                                })
                                .max();
                            a.iter().filter_map(tool_name).collect()
                        }
                        Value::Null => Vec::new(),
                        v => {
                            m.type_errors.push(type_error(&key, &v));
                            Vec::new()
                        }
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(m)
    }
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

fn tool_name(t: &Value) -> Option<String> {
    let ty = t.get("type")?.as_str()?;
    if ty == "function" {
        let name = t.get("function")?.get("name")?.as_str()?;
        Some(format!("function:{name}"))
    } else {
        Some(ty.to_string())
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

/// Sums the byte length of every string (object values, not keys) in a JSON value, except
/// inline media (`image`, `image_url`, `input_audio`, `file`): base64 data is not text, and a
/// cut-off call's prompt estimate must not count it as such.
struct TextBytes;

pub(super) const MEDIA_KEYS: [&str; 4] = ["image", "image_url", "input_audio", "file"];

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
        let m = inspect_encoded(&z, Some("gzip"), 1000).unwrap();
        assert_eq!(m.user.as_deref(), Some("zoe"));
        assert!(
            inspect_encoded(&z, Some("gzip"), 10).is_err(),
            "inflating is bounded"
        );
        assert!(inspect_encoded(&z, Some("zstd"), 1000).is_err());
        assert!(inspect_encoded(b"garbage", Some("gzip"), 1000).is_err());
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
            let m = inspect_encoded(&z, Some(" Deflate "), 1000).unwrap();
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
            prop_assert_eq!(fast(&b), inspect_serde(&b), "{}", String::from_utf8_lossy(&b));
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
        assert_eq!(fast(body.as_bytes()), inspect_serde(body.as_bytes()));
        assert_eq!(
            inspect(body.as_bytes()).unwrap().spans.messages,
            Some(m.span),
            "the fast reader says where the messages are"
        );
    }
}
