//! The wire formats of the APIs tokentap meters: which dialect a request speaks (by method and
//! path), request inspection and the few byte-level edits of a request body, the SSE decoder,
//! usage extraction (the OpenAI shapes in `response`, each other dialect's rule in a file of
//! its own: `responses`, `messages`), the stream filter that takes asked-for usage out again,
//! content codings, and error bodies in each dialect's shape.
//!
//! (Named `openai` for the shapes most of it reads; Anthropic's Messages dialect lives here
//! too, behind the same two faces: a request inspection and a response tap.)

mod codec;
pub mod edit;
mod messages;
pub mod request;
pub mod response;
mod responses;
pub(crate) mod skim;
pub mod sse;
pub mod strip;

use bytes::Bytes;
use serde::Serialize;

use crate::meter::Api;

/// The dialect of a request: a `POST` to a path one of them serves, read as leniently as
/// [`is_chat_path`] reads chat paths (with or without the `/v1` prefix). `None` for every
/// other request (`/v1/messages/count_tokens` included: it is free).
pub fn api_of(method: &str, path: &str) -> Option<Api> {
    if !method.eq_ignore_ascii_case("POST") {
        return None;
    }
    let by_path = |p: &str| match p.strip_prefix("/v1").unwrap_or(p) {
        "/chat/completions" => Some(Api::ChatCompletions),
        "/responses" => Some(Api::Responses),
        "/messages" => Some(Api::Messages),
        "/embeddings" => Some(Api::Embeddings),
        "/completions" => Some(Api::Completions),
        _ => None,
    };
    // Nearly every call: a path already in normal form.
    by_path(path).or_else(|| by_path(&normalized_path(path)))
}

/// A bounded name for the path of a request no dialect meters, for a metric label: the known
/// endpoints of the OpenAI and Anthropic APIs by name, anything else `other`.
pub fn path_class(path: &str) -> &'static str {
    let p = normalized_path(path);
    let p = p.strip_prefix("/v1").unwrap_or(&p);
    let mut segs = p.trim_start_matches('/').split('/');
    let (first, second) = (segs.next().unwrap_or_default(), segs.next());
    match first {
        "messages" if second == Some("count_tokens") => "count_tokens",
        "responses" if second == Some("input_tokens") => "count_tokens",
        "messages" if second == Some("batches") => "batches",
        "chat" | "responses" | "messages" | "embeddings" | "completions" => "metered_path",
        "models" => "models",
        "files" => "files",
        "uploads" => "uploads",
        "batches" => "batches",
        "moderations" => "moderations",
        "images" => "images",
        "audio" => "audio",
        "realtime" => "realtime",
        "assistants" | "threads" => "assistants",
        "vector_stores" => "vector_stores",
        "fine_tuning" => "fine_tuning",
        "conversations" => "conversations",
        "organization" | "organizations" => "organization",
        "" => "root",
        _ => "other",
    }
}

/// Requests no dialect meters that are free by nature and part of the APIs clients use
/// (listing models, counting tokens): never refused as unmetered.
pub fn is_free_path(method: &str, path: &str) -> bool {
    if !["GET", "HEAD", "POST"]
        .iter()
        .any(|m| method.eq_ignore_ascii_case(m))
    {
        return false;
    }
    match path_class(path) {
        "count_tokens" => method.eq_ignore_ascii_case("POST"),
        "models" => method.eq_ignore_ascii_case("GET") || method.eq_ignore_ascii_case("HEAD"),
        _ => false,
    }
}

/// True for the Chat Completions endpoint (`/v1/chat/completions` or `/chat/completions`).
///
/// The path is compared the way a lenient upstream router might read it (percent-decoded,
/// repeated slashes and `.` / `..` segments resolved, any case, query ignored), so that a
/// disguised path cannot slip a chat call past inspection.
pub fn is_chat_path(path: &str) -> bool {
    const CHAT: [&str; 2] = ["/v1/chat/completions", "/chat/completions"];
    // Nearly every call: a path already in normal form (normalizing costs an allocation and a
    // few thousand instructions per call).
    CHAT.contains(&path) || CHAT.contains(&normalized_path(path).as_str())
}

/// A path as a lenient router might read it: query dropped, percent-decoded, empty, `.` and
/// `..` segments resolved, `;` parameters dropped, lower case. `/V1//chat/./Completions;x`
/// is `/v1/chat/completions`.
pub fn normalized_path(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let decoded = percent_decode(path);
    let mut segs: Vec<&str> = Vec::with_capacity(4);
    for seg in decoded.split('/') {
        match seg.split(';').next().unwrap_or_default() {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in segs {
        out.push('/');
        out.push_str(&s.to_ascii_lowercase());
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod path_tests {
    use super::*;

    #[test]
    fn paths_are_read_as_lenient_routers_read_them() {
        for p in [
            "/v1/chat/completions",
            "/V1//Chat/./completions",
            "/v1/chat/completions;jsessionid=x",
            "/v1/x/../chat/completions?a=b",
            "/v1/chat%2Fcompletions",
            "/chat/completions",
        ] {
            assert!(is_chat_path(p), "{p}");
        }
        assert!(!is_chat_path("/v1/completions"));
        assert_eq!(normalized_path("/V1/Models/"), "/v1/models");
        assert_eq!(normalized_path(""), "/");
    }
}

/// `Accept-Encoding` with only the codings tokentap can read (gzip, deflate, br, identity),
/// when it names others (zstd, `*`): a stream tokentap edits must come back readable. `None`
/// when nothing needs to change.
pub fn readable_accept_encoding(value: &str) -> Option<String> {
    let codings: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    let readable = |c: &&str| {
        let name = c.split(';').next().unwrap_or_default().trim();
        ["gzip", "x-gzip", "deflate", "br", "identity"]
            .iter()
            .any(|r| name.eq_ignore_ascii_case(r))
    };
    let kept: Vec<&str> = codings.iter().copied().filter(readable).collect();
    if kept.len() == codings.len() {
        return None;
    }
    Some(if kept.is_empty() {
        "identity".to_string()
    } else {
        kept.join(", ")
    })
}

/// `%XX` escapes decoded, leniently (as a router reads a path): a broken escape stays as
/// written, bytes that are not UTF-8 become U+FFFD.
pub fn percent_decode(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains('%') {
        return std::borrow::Cow::Borrowed(s);
    }
    let (bytes, _) = unescape(s);
    std::borrow::Cow::Owned(String::from_utf8_lossy(&bytes).into_owned())
}

/// `%XX` escapes decoded, strictly (as OTLP's header variables are): `None` when an escape is
/// broken or the result is not UTF-8.
pub fn percent_decode_strict(s: &str) -> Option<String> {
    let (bytes, whole) = unescape(s);
    whole.then(|| String::from_utf8(bytes).ok()).flatten()
}

/// The one `%XX` decoder: the bytes, and whether every `%` began a valid escape (one that
/// did not is kept as written).
fn unescape(s: &str) -> (Vec<u8>, bool) {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut whole = true;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: Option<&u8>| c.and_then(|&c| (c as char).to_digit(16));
            if let (Some(h), Some(l)) = (hex(b.get(i + 1)), hex(b.get(i + 2))) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
            whole = false;
        }
        out.push(b[i]);
        i += 1;
    }
    (out, whole)
}

/// An error answered by tokentap itself, in the shape OpenAI clients parse:
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
    /// More headers of the answer (a rate limit's `x-ratelimit-*`).
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
            retry_after: None,
            headers: Vec::new(),
        }
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// The body in the shape `api`'s clients parse: Anthropic's
    /// `{"type": "error", "error": {"type", "message"}}` for Messages, OpenAI's otherwise.
    pub fn body_for(&self, api: Option<Api>) -> Bytes {
        if api != Some(Api::Messages) {
            return self.body();
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            message: &'a str,
        }
        #[derive(Serialize)]
        struct Outer<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            error: Inner<'a>,
        }
        let v = Outer {
            kind: "error",
            error: Inner {
                kind: self.anthropic_type(),
                message: &self.message,
            },
        };
        Bytes::from(serde_json::to_vec(&v).expect("error body serializes"))
    }

    /// Anthropic's error type for this status.
    fn anthropic_type(&self) -> &'static str {
        match self.status {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            529 => "overloaded_error",
            400..=499 => "invalid_request_error",
            504 => "timeout_error",
            _ => "api_error",
        }
    }

    pub fn body(&self) -> Bytes {
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct Outer<'a> {
            error: Inner<'a>,
        }
        let v = Outer {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param,
                code: self.code,
            },
        };
        Bytes::from(serde_json::to_vec(&v).expect("error body serializes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_paths() {
        assert!(is_chat_path("/v1/chat/completions"));
        assert!(is_chat_path("/chat/completions"));
        assert!(is_chat_path("/v1/chat/completions/"));
        assert!(is_chat_path("/v1/chat/completions?x=1"));
        assert!(!is_chat_path("/v1/completions"));
        assert!(!is_chat_path("/v1/chat/completions/abc"));
        // Disguises a lenient upstream would still route to the chat endpoint.
        assert!(is_chat_path("/v1//chat/completions"));
        assert!(is_chat_path("/v1/chat/%63ompletions"));
        assert!(is_chat_path("/V1/Chat/Completions"));
        assert!(is_chat_path("/v1/x/../chat/./completions"));
        assert!(is_chat_path("/v1/chat/completions%2F"));
        assert!(!is_chat_path("/v1/chat/completions%"));
        assert!(!is_chat_path("/v1/chat/completions%2"));
    }

    #[test]
    fn dialects_are_picked_by_method_and_path() {
        use Api::*;
        for (m, p, api) in [
            ("POST", "/v1/chat/completions", Some(ChatCompletions)),
            ("POST", "/v1/responses", Some(Responses)),
            ("post", "/responses?x=1", Some(Responses)),
            ("POST", "/v1/messages", Some(Messages)),
            ("POST", "/V1//Messages/", Some(Messages)),
            ("POST", "/v1/%6Dessages", Some(Messages)),
            ("POST", "/v1/embeddings", Some(Embeddings)),
            ("POST", "/v1/completions", Some(Completions)),
            ("POST", "/completions", Some(Completions)),
            ("POST", "/v1/messages/count_tokens", None),
            ("GET", "/v1/responses", None),
            ("POST", "/v1/responses/resp_1/cancel", None),
            ("POST", "/v2/messages", None),
        ] {
            assert_eq!(api_of(m, p), api, "{m} {p}");
        }
        assert_eq!(path_class("/v1/messages/count_tokens"), "count_tokens");
        assert_eq!(path_class("/v1/models/gpt-5"), "models");
        assert_eq!(path_class("/v1/responses/resp_1"), "metered_path");
        assert_eq!(path_class("/whatever/else"), "other");
        assert!(is_free_path("GET", "/v1/models"));
        assert!(is_free_path("POST", "/v1/messages/count_tokens"));
        assert!(!is_free_path("POST", "/v1/files"));
        assert!(is_free_path("POST", "/v1/responses/input_tokens"));
        assert!(!is_free_path("POST", "/v1/messages/count_tokensX"));
    }

    #[test]
    fn errors_for_anthropic_clients_are_anthropic_shaped() {
        let e = ApiError::new(429, "rate_limit_exceeded", "over budget").code("budget_exceeded");
        let v: serde_json::Value =
            serde_json::from_slice(&e.body_for(Some(Api::Messages))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "error", "error": {"type": "rate_limit_error", "message": "over budget"}})
        );
        let v: serde_json::Value =
            serde_json::from_slice(&e.body_for(Some(Api::Responses))).unwrap();
        assert_eq!(v["error"]["code"], "budget_exceeded");
    }

    #[test]
    fn only_readable_codings_are_accepted_for_an_edited_stream() {
        assert_eq!(readable_accept_encoding("gzip, deflate, br"), None);
        assert_eq!(
            readable_accept_encoding("gzip, deflate, zstd").as_deref(),
            Some("gzip, deflate")
        );
        assert_eq!(
            readable_accept_encoding("zstd;q=1.0, br;q=0.5").as_deref(),
            Some("br;q=0.5")
        );
        assert_eq!(readable_accept_encoding("*").as_deref(), Some("identity"));
        assert_eq!(readable_accept_encoding("identity"), None);
    }

    #[test]
    fn error_body_is_openai_shaped() {
        let e =
            ApiError::new(413, "invalid_request_error", "too \"big\"").code("request_too_large");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["message"], "too \"big\"");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], serde_json::Value::Null);
        assert_eq!(v["error"]["code"], "request_too_large");
    }
}
