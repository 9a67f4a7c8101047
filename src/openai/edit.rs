//! Byte-level edits of a request body: the few changes tokentap makes to what it forwards
//! (asking for stream usage, naming the key's user), each a splice at a place request
//! inspection found, so that every other byte stays as the client sent it. Nothing is
//! re-serialised.

use std::borrow::Cow;
use std::ops::Range;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::request::RequestMeta;

/// One splice: `range` of the body is replaced by `with` (an empty range inserts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub range: Range<usize>,
    pub with: Vec<u8>,
}

/// The body with `edits` applied (non-overlapping; any order).
pub fn apply(body: &[u8], mut edits: Vec<Edit>) -> Vec<u8> {
    edits.sort_by_key(|e| (e.range.start, e.range.end));
    let grow: usize = edits.iter().map(|e| e.with.len()).sum();
    let mut out = Vec::with_capacity(body.len() + grow);
    let mut at = 0;
    for e in edits {
        out.extend_from_slice(&body[at..e.range.start]);
        out.extend_from_slice(&e.with);
        at = e.range.end;
    }
    out.extend_from_slice(&body[at..]);
    out
}

/// Sets every top-level `user` to `user` (a JSON string), values elsewhere untouched.
pub fn set_user(meta: &RequestMeta, user: &str) -> Vec<Edit> {
    let json = serde_json::to_vec(user).unwrap_or_default();
    meta.spans
        .user
        .iter()
        .map(|r| Edit {
            range: r.clone(),
            with: json.clone(),
        })
        .collect()
}

/// What asking for stream usage takes, for a body whose top level `meta` describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageAsk {
    /// The client asked for usage itself (`stream_options.include_usage: true`): nothing.
    AlreadyAsked,
    /// This edit asks for it.
    Edit(Edit),
    /// `stream_options` (or its `include_usage`) is of a shape tokentap leaves to the
    /// upstream to judge (not an object, a repeated key, a value neither boolean nor null).
    Unsure,
}

/// The edit that makes a streamed chat call ask for its usage: `"stream_options":
/// {"include_usage":true}` added as the object's last member, or `"include_usage":true` set
/// inside an existing `stream_options` object (added, or `false`/`null` replaced).
pub fn ask_for_usage(body: &[u8], meta: &RequestMeta) -> UsageAsk {
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true}"#;
    let Some(span) = meta.spans.stream_options.clone() else {
        // A member of its own, before the closing brace (after a comma unless the object is
        // empty).
        let close = meta.spans.close;
        let empty = body[..close]
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .is_none_or(|i| body[i] == b'{');
        let mut with = Vec::with_capacity(MEMBER.len() + 1);
        if !empty {
            with.push(b',');
        }
        with.extend_from_slice(MEMBER);
        return UsageAsk::Edit(Edit {
            range: close..close,
            with,
        });
    };
    let raw = &body[span.clone()];
    if raw == b"null" {
        return UsageAsk::Edit(Edit {
            range: span,
            with: MEMBER[MEMBER.iter().position(|&b| b == b':').unwrap_or(0) + 1..].to_vec(),
        });
    }
    let Some(members) = top_members(raw) else {
        return UsageAsk::Unsure;
    };
    let mut found = None;
    for (key, value) in &members {
        if key == "include_usage" {
            if found.is_some() {
                return UsageAsk::Unsure;
            }
            found = Some(value.clone());
        }
    }
    match found {
        None => {
            // After the opening brace, before the first member if there is one.
            let open = span.start;
            let with = if members.is_empty() {
                br#""include_usage":true"#.to_vec()
            } else {
                br#""include_usage":true,"#.to_vec()
            };
            UsageAsk::Edit(Edit {
                range: open + 1..open + 1,
                with,
            })
        }
        Some(v) => match &raw[v.clone()] {
            b"true" => UsageAsk::AlreadyAsked,
            b"false" | b"null" => UsageAsk::Edit(Edit {
                range: span.start + v.start..span.start + v.end,
                with: b"true".to_vec(),
            }),
            _ => UsageAsk::Unsure,
        },
    }
}

/// The members of a JSON object: each key (unescaped) and where its value stands in `raw`;
/// `None` if `raw` is not an object.
fn top_members(raw: &[u8]) -> Option<Vec<(Cow<'_, str>, Range<usize>)>> {
    let base = raw.as_ptr() as usize;
    Some(
        members(raw)?
            .into_iter()
            .map(|(k, v)| {
                let start = v.get().as_ptr() as usize - base;
                (k, start..start + v.get().len())
            })
            .collect(),
    )
}

/// A JSON object's members in order (a repeated key kept), each value raw, borrowed from
/// `json`; `None` if `json` is not an object.
pub(super) fn members(json: &[u8]) -> Option<Vec<(Cow<'_, str>, &RawValue)>> {
    serde_json::from_slice::<Members>(json).ok().map(|m| m.0)
}

struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Members<'de>, A::Error> {
                let mut v = Vec::new();
                while let Some(k) = m.next_key::<Cow<'de, str>>()? {
                    v.push((k, m.next_value::<&'de RawValue>()?));
                }
                Ok(Members(v))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::inspect;
    use super::*;
    use proptest::prelude::*;

    fn ask(body: &str) -> Option<String> {
        let meta = inspect(body.as_bytes()).unwrap();
        match ask_for_usage(body.as_bytes(), &meta) {
            UsageAsk::Edit(e) => Some(String::from_utf8(apply(body.as_bytes(), vec![e])).unwrap()),
            UsageAsk::AlreadyAsked => None,
            UsageAsk::Unsure => Some("unsure".into()),
        }
    }

    #[test]
    fn usage_is_asked_for_with_one_splice() {
        let cases = [
            (
                r#"{"model":"m","stream":true}"#,
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                "{ \"stream\" : true }\r\n",
                "{ \"stream\" : true ,\"stream_options\":{\"include_usage\":true}}\r\n",
            ),
            ("{}", r#"{"stream_options":{"include_usage":true}}"#),
            ("{ \n}", "{ \n\"stream_options\":{\"include_usage\":true}}"),
            (
                r#"{"stream_options":null,"stream":true}"#,
                r#"{"stream_options":{"include_usage":true},"stream":true}"#,
            ),
            (
                r#"{"stream_options":{},"stream":true}"#,
                r#"{"stream_options":{"include_usage":true},"stream":true}"#,
            ),
            (
                r#"{"stream_options": { "include_obfuscation": false }}"#,
                r#"{"stream_options": {"include_usage":true, "include_obfuscation": false }}"#,
            ),
            (
                r#"{"stream_options":{"include_usage" : false},"stream":true}"#,
                r#"{"stream_options":{"include_usage" : true},"stream":true}"#,
            ),
            (
                r#"{"stream_options":{"include_usage":null}}"#,
                r#"{"stream_options":{"include_usage":true}}"#,
            ),
            (r#"{"stream_options":"x"}"#, "unsure"),
            (r#"{"stream_options":{"include_usage":"yes"}}"#, "unsure"),
            (
                r#"{"stream_options":{"include_usage":false,"include_usage":false}}"#,
                "unsure",
            ),
        ];
        for (body, want) in cases {
            assert_eq!(ask(body).as_deref(), Some(want), "{body}");
        }
        assert_eq!(
            ask(r#"{"stream_options":{"include_usage":true}}"#),
            None,
            "asked already"
        );
    }

    #[test]
    fn the_splice_lands_after_a_long_conversation_read_by_the_fast_path() {
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":"{}"}}],"user":"bob","stream":true,"stream_options":{{}}}}"#,
            "x".repeat(5000)
        );
        let meta = inspect(body.as_bytes()).unwrap();
        let UsageAsk::Edit(e) = ask_for_usage(body.as_bytes(), &meta) else {
            panic!("an edit")
        };
        let mut edits = set_user(&meta, "al\"ice");
        edits.push(e);
        let out = String::from_utf8(apply(body.as_bytes(), edits)).unwrap();
        assert_eq!(
            out,
            body.replace(r#""bob""#, r#""al\"ice""#).replace(
                r#""stream_options":{}"#,
                r#""stream_options":{"include_usage":true}"#
            )
        );
    }

    #[test]
    fn every_user_is_set_and_nothing_else_changes() {
        let body = r#"{"model":"m", "user" :"bob","messages":[{"role":"user","content":"hi \"x\"","user":"keep"}]}"#;
        let meta = inspect(body.as_bytes()).unwrap();
        let out = apply(body.as_bytes(), set_user(&meta, "al\"ice"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"model":"m", "user" :"al\"ice","messages":[{"role":"user","content":"hi \"x\"","user":"keep"}]}"#
        );
    }

    proptest! {
        /// Whatever the body looks like, the edited body reads as the same request with usage
        /// asked for, and differs from it only in the spliced bytes.
        #[test]
        fn the_edited_body_is_the_same_request_asking_for_usage(
            ws in proptest::sample::select(vec!["", " ", "\n\t", "\r\n  "]),
            so in proptest::option::of(proptest::sample::select(vec![
                "null", "{}", "{\"include_usage\":false}", "{\"a\":1}",
                "{\"include_usage\":null,\"b\":[1]}",
            ])),
            long in any::<bool>(),
            first in any::<bool>(),
        ) {
            let content = if long { "y".repeat(3000) } else { "hi".into() };
            let msgs = format!(r#""messages":[{{"role":"user","content":"{content}"}}]"#);
            let mut members = vec![msgs, r#""stream":true"#.to_string()];
            if let Some(so) = so {
                let m = format!(r#""stream_options":{ws}{so}"#);
                if first { members.insert(0, m) } else { members.push(m) }
            }
            let body = format!("{ws}{{{ws}{}{ws}}}{ws}", members.join(&format!("{ws},{ws}")));
            let meta = inspect(body.as_bytes()).unwrap();
            let UsageAsk::Edit(e) = ask_for_usage(body.as_bytes(), &meta) else {
                panic!("an edit for {body}")
            };
            let out = apply(body.as_bytes(), vec![e.clone()]);
            let after = inspect(&out).unwrap();
            prop_assert_eq!(after.include_usage, Some(true));
            let (a, b): (serde_json::Value, serde_json::Value) =
                (serde_json::from_slice(&out).unwrap(), serde_json::from_str(&body).unwrap());
            let mut a = a;
            let mut b = b;
            a.as_object_mut().unwrap().remove("stream_options");
            let so_b = b.as_object_mut().unwrap().remove("stream_options");
            prop_assert_eq!(&a, &b);
            // Bytes outside the splice are the client's.
            prop_assert_eq!(&out[..e.range.start], &body.as_bytes()[..e.range.start]);
            prop_assert_eq!(
                &out[e.range.start + e.with.len()..],
                &body.as_bytes()[e.range.end..]
            );
            if let Some(serde_json::Value::Object(o)) = so_b {
                let so_a = serde_json::from_slice::<serde_json::Value>(&out).unwrap()["stream_options"].clone();
                for (k, v) in o.iter().filter(|(k, _)| *k != "include_usage") {
                    prop_assert_eq!(&so_a[k], v);
                }
            }
        }
    }
}
