//! Takes back out of a stream what asking for its usage added, so that a client that did not
//! ask receives the bytes the upstream would have sent it without tokentap's request.
//!
//! OpenAI-style upstreams answer `stream_options.include_usage: true` with two changes: every
//! chunk carries `"usage": null`, and one more chunk, `"choices": []` with the `usage` object,
//! comes before `data: [DONE]`. [`UsageStrip`] removes exactly those: an event whose data is a
//! usage-only chunk (empty `choices`, a `usage` object, and otherwise only the members every
//! chunk has: `id`, `object`, `created`, `model`, ...), and a top-level `"usage": null` member
//! (with its comma). Everything else passes byte for byte: other events, comments (also
//! inside the removed event), line ends, and chunks that carry anything besides usage (a
//! usage object next to choices, a `type`, any other member).
//!
//! An event is held until its blank line arrives (its bytes may be split anywhere across
//! reads), then emitted or dropped whole: a client's SSE parser cannot act on an unfinished
//! event anyway. A compressed stream (gzip, deflate, br) is inflated, edited and compressed
//! again with the same coding, flushed after every event, so the client decodes exactly the
//! upstream's events; its compressed bytes are the upstream's only when the upstream
//! compresses the same way (same encoder and level, a flush after every event).

use serde_json::value::RawValue;

use super::codec::{Decoding, Encoding};

/// Members every chunk of an OpenAI-style stream may carry: a usage chunk with nothing else
/// is one tokentap asked for. (Not `provider`: OpenRouter, which names it, sends usage
/// whether asked or not, and its usage chunk must stay.)
const ENVELOPE: [&str; 7] = [
    "id",
    "object",
    "created",
    "model",
    "system_fingerprint",
    "service_tier",
    "obfuscation",
];

/// A block longer than this is passed on as it is and the filter stops editing (a stream
/// without blank lines must not grow memory without bound).
const MAX_BLOCK: usize = 1 << 20;

/// The filter of one response body.
pub struct UsageStrip {
    events: Events,
    codec: Codec,
    /// Events removed (usage-only chunks) and members removed (`"usage": null`).
    pub removed_events: u64,
    pub removed_members: u64,
}

impl UsageStrip {
    /// A filter for a body of `Content-Encoding: encoding`; `None` for a coding it cannot
    /// read (the body then passes unchanged).
    pub fn new(encoding: Option<&str>) -> Option<Self> {
        Some(UsageStrip {
            events: Events::default(),
            codec: Codec::new(encoding)?,
            removed_events: 0,
            removed_members: 0,
        })
    }

    /// Feeds one read of the upstream's body; returns what goes to the client now.
    pub fn feed(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match &mut self.codec {
            Codec::Identity => self.events.feed(input, &mut Emit::Plain(&mut out)),
            Codec::Broken => out.extend_from_slice(input),
            Codec::Edit(c) => {
                if let Some(raw) = &mut c.raw {
                    raw.extend_from_slice(input);
                }
                match c.dec.inflate(input) {
                    Ok(plain) => {
                        if c.enc.is_none() {
                            c.enc = c.dec.encoder();
                        }
                        if let Some(enc) = &mut c.enc {
                            self.events.feed(&plain, &mut Emit::Coded(enc));
                            out = enc.take();
                        }
                        if !out.is_empty() {
                            c.raw = None;
                        }
                    }
                    Err(_) => {
                        // The client's decoder fails here too. Nothing coded again went out
                        // yet: everything goes as the upstream sent it. Else what was coded
                        // again has gone (it decodes to what the upstream's bytes did), and
                        // the rest goes as sent.
                        out = c.raw.take().unwrap_or_else(|| input.to_vec());
                        self.codec = Codec::Broken;
                    }
                }
            }
        }
        self.count();
        out
    }

    /// The body ended: what is still held goes (a last event without its blank line is judged
    /// like any other), and a compressed body is closed.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        match std::mem::replace(&mut self.codec, Codec::Broken) {
            Codec::Identity => self.events.finish(&mut Emit::Plain(&mut out)),
            Codec::Broken => {}
            Codec::Edit(mut c) => {
                let (plain, err) = c.dec.finish();
                if let (Some(_), Some(raw)) = (err, c.raw.take()) {
                    // It never decoded to anything: it goes as it came.
                    if plain.is_empty() {
                        self.count();
                        return raw;
                    }
                }
                if c.enc.is_none() {
                    c.enc = c.dec.encoder();
                }
                if let Some(mut enc) = c.enc {
                    self.events.feed(&plain, &mut Emit::Coded(&mut enc));
                    self.events.finish(&mut Emit::Coded(&mut enc));
                    out = enc.take();
                    out.extend(enc.close());
                }
            }
        }
        self.count();
        out
    }

    fn count(&mut self) {
        self.removed_events += std::mem::take(&mut self.events.removed_events);
        self.removed_members += std::mem::take(&mut self.events.removed_members);
    }
}

/// Where kept blocks go.
enum Emit<'a> {
    Plain(&'a mut Vec<u8>),
    /// Compressed, and flushed at the end of each block.
    Coded(&'a mut Encoding),
}

impl Emit<'_> {
    /// Part of a block.
    fn piece(&mut self, b: &[u8]) {
        match self {
            Emit::Plain(out) => out.extend_from_slice(b),
            Emit::Coded(enc) => enc.write(b),
        }
    }

    /// A block ends: what was written of it can be decoded now.
    fn end(&mut self) {
        if let Emit::Coded(enc) = self {
            enc.flush();
        }
    }

    /// A whole block.
    fn block(&mut self, b: &[u8]) {
        if !b.is_empty() {
            self.piece(b);
            self.end();
        }
    }
}

/// Splits the plain stream into blocks (the lines of one event and the blank line that ends
/// it) and judges each.
#[derive(Default)]
struct Events {
    /// The current block's bytes, line ends as sent.
    block: Vec<u8>,
    /// Where the current (unfinished) line starts in `block`.
    line: usize,
    /// The last byte seen was a CR that ended a line of `block`: a LF first in the next read
    /// belongs to the same line end.
    cr: bool,
    /// That CR ended the blank line that completes the block: the block is judged once its
    /// line end is whole (so an edited block is written in one piece, as the upstream wrote
    /// it).
    blank: bool,
    /// Gave up editing (an overlong block): everything passes.
    passing: bool,
    removed_events: u64,
    removed_members: u64,
}

impl Events {
    fn feed(&mut self, mut input: &[u8], out: &mut Emit<'_>) {
        if self.passing {
            out.block(input);
            return;
        }
        if input.is_empty() {
            return;
        }
        if std::mem::take(&mut self.cr) {
            if let Some(rest) = input.strip_prefix(b"\n") {
                self.block.push(b'\n');
                self.line = self.block.len();
                input = rest;
            }
            if std::mem::take(&mut self.blank) {
                self.judge(out);
            }
        }
        while let Some(pos) = memchr::memchr2(b'\n', b'\r', input) {
            let mut end = pos + 1;
            let mut open_cr = false;
            if input[pos] == b'\r' {
                match input.get(end) {
                    Some(b'\n') => end += 1,
                    Some(_) => {}
                    None => open_cr = true,
                }
            }
            let blank = pos == 0 && self.block.len() == self.line;
            self.block.extend_from_slice(&input[..end]);
            input = &input[end..];
            self.line = self.block.len();
            if open_cr {
                self.cr = true;
                self.blank = blank;
            } else if blank {
                self.judge(out);
            }
        }
        self.block.extend_from_slice(input);
        if self.block.len() > MAX_BLOCK {
            self.passing = true;
            out.block(&std::mem::take(&mut self.block));
        }
    }

    fn finish(&mut self, out: &mut Emit<'_>) {
        if !self.block.is_empty() {
            if self.passing {
                out.block(&std::mem::take(&mut self.block));
            } else {
                self.judge(out);
            }
        }
    }

    /// Emits the complete block in `self.block`: edited, or only its comments when it is a
    /// usage-only chunk.
    fn judge(&mut self, out: &mut Emit<'_>) {
        let mut block = std::mem::take(&mut self.block);
        self.judge_block(&block, out);
        block.clear();
        // A long event's buffer is not kept for the rest of the stream.
        if block.capacity() > 64 * 1024 {
            block = Vec::new();
        }
        self.block = block;
        self.line = 0;
    }

    fn judge_block(&mut self, block: &[u8], out: &mut Emit<'_>) {
        let lines = Lines::of(block);
        let mut data_lines = lines.iter().filter(|l| l.field() == Some(b"data"));
        let (Some(first), None) = (data_lines.next(), data_lines.next()) else {
            // No data, or data on several lines (upstreams that add usage write one line
            // per chunk).
            out.block(block);
            return;
        };
        let value = first.value();
        // Only a chunk that names `usage` can be edited (most chunks of most streams do not:
        // they pass without being parsed).
        if memchr::memmem::find(value, b"\"usage\"").is_none() {
            out.block(block);
            return;
        }
        let Some(members) = Members::of(value) else {
            out.block(block);
            return;
        };
        if members.usage_only() {
            self.removed_events += 1;
            let mut comments = lines.iter().filter(|l| l.is_comment()).peekable();
            if comments.peek().is_some() {
                comments.for_each(|l| out.piece(l.whole));
                out.end();
            }
            return;
        }
        let Some(cut) = members.null_usage(value) else {
            out.block(block);
            return;
        };
        self.removed_members += 1;
        // Where the data line's value starts in the block.
        let base = value.as_ptr() as usize - block.as_ptr() as usize;
        out.piece(&block[..base + cut.start]);
        out.piece(&block[base + cut.end..]);
        out.end();
    }
}

/// The lines of a block, each with its line end.
struct Lines<'a>(Vec<Line<'a>>);

struct Line<'a> {
    whole: &'a [u8],
    text: &'a [u8],
}

impl<'a> Lines<'a> {
    fn of(block: &'a [u8]) -> Self {
        let mut v = Vec::new();
        let mut rest = block;
        while !rest.is_empty() {
            let (text_end, end) = match memchr::memchr2(b'\n', b'\r', rest) {
                Some(p) if rest[p] == b'\r' && rest.get(p + 1) == Some(&b'\n') => (p, p + 2),
                Some(p) => (p, p + 1),
                None => (rest.len(), rest.len()),
            };
            v.push(Line {
                whole: &rest[..end],
                text: &rest[..text_end],
            });
            rest = &rest[end..];
        }
        Lines(v)
    }

    fn iter(&self) -> std::slice::Iter<'_, Line<'a>> {
        self.0.iter()
    }
}

impl Line<'_> {
    fn is_comment(&self) -> bool {
        self.text.first() == Some(&b':')
    }

    /// The field name (`None` for comments and blank lines).
    fn field(&self) -> Option<&[u8]> {
        if self.text.is_empty() || self.is_comment() {
            return None;
        }
        Some(super::sse::field_value(self.text).0)
    }

    /// The field's value, as the SSE decoder reads it.
    fn value(&self) -> &[u8] {
        super::sse::field_value(self.text).1
    }
}

/// A chunk's top-level members, values raw.
struct Members<'a>(Vec<(std::borrow::Cow<'a, str>, &'a RawValue)>);

impl<'a> Members<'a> {
    fn of(json: &'a [u8]) -> Option<Self> {
        let start = json.iter().position(|b| !b.is_ascii_whitespace())?;
        if json[start] != b'{' {
            return None;
        }
        super::edit::members(json).map(Members)
    }

    fn get<'s>(&'s self, key: &'s str) -> impl Iterator<Item = &'a RawValue> + 's {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| *v)
    }

    /// Empty `choices`, a `usage` object, and nothing but envelope members.
    fn usage_only(&self) -> bool {
        let one = |key: &str| {
            let mut it = self.get(key);
            match (it.next(), it.next()) {
                (Some(v), None) => Some(v.get()),
                _ => None,
            }
        };
        let empty_choices = one("choices").is_some_and(|c| {
            c.strip_prefix('[')
                .and_then(|c| c.strip_suffix(']'))
                .is_some_and(|inner| {
                    inner
                        .trim_matches(|c: char| c.is_ascii_whitespace())
                        .is_empty()
                })
        });
        empty_choices
            && one("usage").is_some_and(|u| u.starts_with('{'))
            && self
                .0
                .iter()
                .all(|(k, _)| k == "choices" || k == "usage" || ENVELOPE.contains(&k.as_ref()))
    }

    /// Where the one top-level `"usage": null` member stands in `json` with the comma that
    /// separates it from its neighbour, if there is exactly one.
    fn null_usage(&self, json: &[u8]) -> Option<std::ops::Range<usize>> {
        let mut usage = self.get("usage");
        let v = usage.next()?;
        if usage.next().is_some() || v.get() != "null" {
            return None;
        }
        let base = json.as_ptr() as usize;
        let value_start = v.get().as_ptr() as usize - base;
        let value_end = value_start + v.get().len();
        // Back over `:` and the key (whose text has no quote: it reads `usage`).
        let mut i = value_start;
        let ws = |b: u8| b.is_ascii_whitespace();
        while i > 0 && ws(json[i - 1]) {
            i -= 1;
        }
        if i == 0 || json[i - 1] != b':' {
            return None;
        }
        i -= 1;
        while i > 0 && ws(json[i - 1]) {
            i -= 1;
        }
        if i == 0 || json[i - 1] != b'"' {
            return None;
        }
        i -= 1;
        let key_start = memchr::memrchr(b'"', &json[..i])?;
        // The comma before it, else the one after it (the member was first).
        let mut j = key_start;
        while j > 0 && ws(json[j - 1]) {
            j -= 1;
        }
        if j > 0 && json[j - 1] == b',' {
            return Some(j - 1..value_end);
        }
        let mut k = value_end;
        while k < json.len() && ws(json[k]) {
            k += 1;
        }
        if json.get(k) == Some(&b',') {
            let mut after = k + 1;
            while after < json.len() && ws(json[after]) {
                after += 1;
            }
            return Some(key_start..after);
        }
        // The only member.
        Some(key_start..value_end)
    }
}

/// The body's coding.
enum Codec {
    Identity,
    /// Inflated, edited, and compressed again as it came (`enc` is `None` until "deflate"
    /// has shown which kind it is).
    Edit(Box<Coded>),
    /// The compressed body stopped decoding: the rest passes as sent.
    Broken,
}

/// A compressed body's decoder, and the encoder writing the edited body back.
struct Coded {
    dec: Decoding,
    enc: Option<Encoding>,
    /// The upstream's bytes, kept until something coded again has gone to the client: a body
    /// that turns out not to decode is then passed on whole, as it came.
    raw: Option<Vec<u8>>,
}

impl Codec {
    fn new(encoding: Option<&str>) -> Option<Self> {
        match Decoding::new(encoding).ok()? {
            Decoding::Identity => Some(Codec::Identity),
            dec => Some(Codec::Edit(Box::new(Coded {
                enc: dec.encoder(),
                dec,
                raw: Some(Vec::new()),
            }))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::response::tests::split;
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    /// An OpenAI-style stream: with `asked`, as the upstream answers `include_usage: true`
    /// (`"usage":null` in every chunk, the usage chunk before `[DONE]`).
    fn openai_stream(asked: bool, nl: &str, extras: bool) -> Vec<String> {
        let null = if asked { r#","usage":null"# } else { "" };
        let mut events = vec![format!(": OPENROUTER PROCESSING{nl}{nl}")];
        for (i, w) in ["Hel", "lo \u{e9}\u{1F600}", "!"].iter().enumerate() {
            let role = if i == 0 { r#""role":"assistant","# } else { "" };
            events.push(format!(
                r#"data: {{"id":"c-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{{{role}"content":"{w}"}},"finish_reason":null}}]{null},"obfuscation":"x{i}"}}{nl}{nl}"#
            ));
        }
        if extras {
            events.push(format!("event: ping{nl}data: {{}}{nl}{nl}"));
            events.push(format!(": keep-alive{nl}{nl}"));
        }
        events.push(format!(
            r#"data: {{"id":"c-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{{}},"finish_reason":"stop"}}]{null}}}{nl}{nl}"#
        ));
        if asked {
            events.push(format!(
                r#"data: {{"id":"c-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,"completion_tokens_details":{{"reasoning_tokens":8}}}},"obfuscation":"u"}}{nl}{nl}"#
            ));
        }
        events.push(format!("data: [DONE]{nl}{nl}"));
        events
    }

    fn run(enc: Option<&str>, parts: &[&[u8]]) -> Vec<u8> {
        let mut s = UsageStrip::new(enc).unwrap();
        let mut out = Vec::new();
        for p in parts {
            out.extend(s.feed(p));
        }
        out.extend(s.finish());
        out
    }

    /// Compresses event by event, flushing after each, as an upstream streaming compressed
    /// SSE does.
    fn compress(enc: &str, events: &[String]) -> Vec<u8> {
        let mut e = Decoding::new(Some(enc))
            .unwrap()
            .encoder()
            .unwrap_or_else(|| {
                Encoding::Zlib(flate2::write::ZlibEncoder::new(
                    Vec::new(),
                    flate2::Compression::default(),
                ))
            });
        let mut out = Vec::new();
        for ev in events {
            e.write(ev.as_bytes());
            e.flush();
            out.extend(e.take());
        }
        out.extend(e.close());
        out
    }

    fn inflate(enc: &str, data: &[u8]) -> Vec<u8> {
        let mut d = Decoding::new(Some(enc)).unwrap();
        let mut out = d.inflate(data).unwrap();
        let (rest, err) = d.finish();
        assert!(err.is_none(), "{enc}: {err:?}");
        out.extend(rest);
        out
    }

    #[test]
    fn the_asked_for_usage_goes_and_nothing_else() {
        for nl in ["\n", "\r\n", "\r"] {
            for extras in [false, true] {
                let asked = openai_stream(true, nl, extras).concat();
                let plain = openai_stream(false, nl, extras).concat();
                assert_eq!(
                    String::from_utf8(run(None, &[asked.as_bytes()])).unwrap(),
                    plain,
                    "{nl:?}"
                );
                // A stream that is already what the client would get passes as it is.
                assert_eq!(run(None, &[plain.as_bytes()]), plain.as_bytes());
            }
        }
        let mut s = UsageStrip::new(None).unwrap();
        s.feed(openai_stream(true, "\n", true).concat().as_bytes());
        s.finish();
        assert_eq!((s.removed_events, s.removed_members), (1, 4));
    }

    #[test]
    fn chunks_that_carry_more_than_usage_are_kept() {
        for kept in [
            // Usage next to a choice (DeepSeek puts it on the last content chunk).
            r#"data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            // The target API's own usage chunk (a `type`, no `choices`).
            r#"data: {"type":"usage","id":"c","object":"chat.completion.chunk","model":"m","usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            // Something else the client may need.
            r#"data: {"id":"c","choices":[],"usage":{"prompt_tokens":1},"search_results":[{"query":"q"}]}"#,
            r#"data: {"id":"c","choices":[],"usage":{"prompt_tokens":1},"warning":"w"}"#,
            // Usage that is not an object, a repeated key, choices that are not empty.
            r#"data: {"id":"c","choices":[],"usage":null}"#,
            r#"data: {"id":"c","choices":[],"choices":[],"usage":{"prompt_tokens":1}}"#,
            r#"data: {"id":"c","choices":[1],"usage":{"prompt_tokens":1}}"#,
            // Data on two lines.
            "data: {\"id\":\"c\",\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":1}}",
            // Not JSON, or cut off.
            r#"data: {"choices":[],"usage":{"prompt_tokens":1}"#,
            "data: [DONE]",
        ] {
            let ev = format!("{kept}\n\n");
            let out = run(None, &[ev.as_bytes()]);
            let want = if kept.ends_with(r#""usage":null}"#) {
                // (The null member goes: that is what asking added.)
                r#"data: {"id":"c","choices":[]}"#.to_string() + "\n\n"
            } else {
                ev.clone()
            };
            assert_eq!(String::from_utf8(out).unwrap(), want, "{kept}");
        }
    }

    #[test]
    fn comments_inside_the_removed_event_stay() {
        let s = ": a\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n: b\r\n\ndata: [DONE]\n\n";
        assert_eq!(
            String::from_utf8(run(None, &[s.as_bytes()])).unwrap(),
            ": a\n: b\r\ndata: [DONE]\n\n"
        );
    }

    #[test]
    fn null_usage_goes_with_its_comma_wherever_it_stands() {
        for (chunk, want) in [
            (r#"{"usage":null,"a":1}"#, r#"{"a":1}"#),
            (r#"{"a":1,"usage":null}"#, r#"{"a":1}"#),
            (r#"{"a": 1, "usage" : null, "b": 2}"#, r#"{"a": 1, "b": 2}"#),
            (r#"{ "usage": null , "a": 1}"#, r#"{ "a": 1}"#),
            (r#"{"usage":null}"#, r#"{}"#),
            (r#"{"a":{"usage":null}}"#, r#"{"a":{"usage":null}}"#),
        ] {
            let ev = format!("data: {chunk}\n\n");
            assert_eq!(
                String::from_utf8(run(None, &[ev.as_bytes()])).unwrap(),
                format!("data: {want}\n\n"),
                "{chunk}"
            );
        }
    }

    #[test]
    fn a_last_event_without_its_blank_line_is_judged_too() {
        let s = "data: {\"x\":1,\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}";
        assert_eq!(
            String::from_utf8(run(None, &[s.as_bytes()])).unwrap(),
            "data: {\"x\":1}\n\n"
        );
        assert_eq!(run(None, &[b"data: {\"x\""]), b"data: {\"x\"");
    }

    #[test]
    fn a_stream_without_blank_lines_is_passed_on_not_held() {
        let mut s = UsageStrip::new(None).unwrap();
        let line = vec![b'x'; 4096];
        let mut out = 0;
        for _ in 0..(MAX_BLOCK / line.len() + 2) {
            out += s.feed(&line).len();
        }
        assert!(out > 0, "the block was given up on and passed");
        out += s.feed(b"\n\ndata: {\"usage\":null}\n\n").len();
        out += s.finish().len();
        assert_eq!(out, (MAX_BLOCK / line.len() + 2) * 4096 + 24);
    }

    #[test]
    fn compressed_streams_are_edited_and_compressed_the_same_way() {
        let asked = openai_stream(true, "\n", true);
        let plain = openai_stream(false, "\n", true);
        for enc in ["gzip", "deflate", "br"] {
            let out = run(Some(enc), &[&compress(enc, &asked)]);
            assert_eq!(inflate(enc, &out), plain.concat().as_bytes(), "{enc}");
            // Same encoder, a flush after every event: the upstream's own bytes.
            assert_eq!(out, compress(enc, &plain), "{enc}");
        }
        // Raw deflate (some servers send it as "deflate").
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        raw.write_all(asked.concat().as_bytes()).unwrap();
        let out = run(Some("deflate"), &[&raw.finish().unwrap()]);
        let mut d = flate2::write::DeflateDecoder::new(Vec::new());
        d.write_all(&out).unwrap();
        assert_eq!(d.finish().unwrap(), plain.concat().as_bytes());
        assert!(UsageStrip::new(Some("zstd")).is_none());
    }

    #[test]
    fn a_body_that_stops_decoding_passes_as_sent_from_there() {
        let mut s = UsageStrip::new(Some("gzip")).unwrap();
        let mut out = s.feed(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff");
        out.extend(s.feed(b"garbage that is not deflate \xff\xff\xff"));
        out.extend(s.finish());
        assert!(out.ends_with(b"\xff\xff\xff"));
    }

    #[test]
    fn a_body_that_never_decodes_goes_as_it_came() {
        let body = b"\x1f\x8b\x08\x00 then no gzip at all";
        for at in 0..body.len() {
            let out = run(Some("gzip"), &[&body[..at], &body[at..]]);
            assert_eq!(out, body, "split at {at}");
        }
        // Cut inside its header: it never decoded to anything either.
        assert_eq!(run(Some("gzip"), &[&body[..3]]), &body[..3]);
    }

    proptest! {
        /// Any split of the upstream's bytes, in any line-end style, plain or compressed,
        /// gives the same client bytes (compressed: those of the same encoder flushed after
        /// every event, as the upstream compresses), and the tap reads the same usage.
        #[test]
        fn any_split_gives_the_same_client_bytes(
            cuts in proptest::collection::vec(any::<usize>(), 0..24),
            nl in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
            extras in any::<bool>(),
            enc in prop_oneof![Just(None), Just(Some("gzip")), Just(Some("deflate")), Just(Some("br"))],
        ) {
            let asked = openai_stream(true, nl, extras);
            let want = openai_stream(false, nl, extras).concat().into_bytes();
            let upstream = match enc {
                None => asked.concat().into_bytes(),
                Some(e) => compress(e, &asked),
            };
            let parts = split(&upstream, &cuts);
            let out = run(enc, &parts);
            match enc {
                None => prop_assert_eq!(out, want),
                Some(e) => {
                    prop_assert_eq!(inflate(e, &out), want);
                    prop_assert_eq!(out, compress(e, &openai_stream(false, nl, extras)));
                }
            }
            let mut tap = super::super::response::ResponseTap::new(
                super::super::response::BodyKind::Sse, enc, 1 << 20);
            for p in &parts {
                tap.feed(&bytes::Bytes::copy_from_slice(p));
            }
            let seen = tap.finish();
            prop_assert_eq!(
                seen.reported_usage(),
                Some(crate::meter::Usage { prompt: 9, completion: 12, reasoning: 8, ..Default::default() })
            );
            prop_assert_eq!(seen.content_chunks, 3);
        }
    }
}
