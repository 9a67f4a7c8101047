//! One-pass readers for the two shapes tokentap reads on every call, with serde as the
//! fallback: stream chunks, and the `messages` of a request.
//!
//! **Stream chunks.** Nearly every one has this shape:
//! `{"id": "…", "model": "…", "choices": [{"index": 0, "delta": {"content": "…"},
//! "finish_reason": null}], …}`.
//!
//! A streamed answer is mostly such chunks, and serde's derived readers cost ~7k instructions
//! for each ~200-byte one (callgrind; more than the rest of the call's bookkeeping). This reader
//! builds nothing: it walks the bytes once and keeps what the tap needs (the id, the model,
//! whether `type` is `search_done`, the content's byte length, the finish reasons).
//!
//! It reads whole (non-streamed) answers too, and `usage` when it holds plain counts. It gives
//! up (`None`) at anything it would need serde for: a field it does not read here (`error`,
//! `search_results`, `meta`, `warning`, `request_id`, a usage `cost`, tool calls, content
//! parts), a repeated field, an escape in a key or in a string it keeps, a choice or message of
//! another type, and any syntax it does not check exactly as strictly as serde_json does. The
//! serde path then reads the chunk. When it does not give up it gives what the serde path gives
//! (a property test in `response.rs` checks it).
//!
//! **A request's `messages`.** A long conversation is mostly string content, which serde_json
//! scans 8 bytes at a time (~3 instructions a byte with its UTF-8 check); [`messages`] finds the
//! end of long strings with SIMD (`memchr`) and counts what `request::TextBytes` counts. The
//! rest of the request is still read by serde (`request::inspect`). It gives up at any number
//! that is not a plain integer, escaped keys, lone surrogates, repeated `messages`, and bytes
//! that are not UTF-8; a property test in `request.rs` checks it against serde.

use std::ops::Range;

/// What the tap needs from a chunk of the usual shape.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Chunk<'a> {
    /// `id` when it is a string (another type counts as absent, as on the serde path), as
    /// it stands in the chunk (which is UTF-8, and the string has no escapes).
    pub id: Option<&'a [u8]>,
    pub model: Option<&'a [u8]>,
    pub search_done: bool,
    /// `choices` was an array (even empty).
    pub has_choices: bool,
    /// Decoded bytes of `delta.content`, `delta.reasoning` and `delta.refusal` over the choices.
    pub content_bytes: u64,
    /// The same of `message` (what a whole, non-streamed answer counts).
    pub message_bytes: u64,
    /// `usage`, when it is an object of plain counts.
    pub usage: Option<Counts>,
    /// The choices' finish reasons, in order (at most [`MAX_FINISH`]).
    pub finish: [Option<&'a str>; MAX_FINISH],
}

/// The counts of a `usage` object (`None`: absent or null), before the rules of
/// `response::usage_from` apply.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Counts {
    pub prompt: Option<u64>,
    pub completion: Option<u64>,
    pub cached: Option<u64>,
    pub reasoning: Option<u64>,
    pub searches: Option<u64>,
}

/// Choices with a finish reason in one chunk, at most (more: the serde path reads it).
pub(super) const MAX_FINISH: usize = 4;

/// Deeper nesting than this in a skipped value: the serde path reads it (serde_json itself
/// stops at 128).
const MAX_DEPTH: u32 = 100;

/// Reads a stream chunk of the usual shape, or `None` (then the serde path reads it).
pub(super) fn chunk(json: &[u8]) -> Option<Chunk<'_>> {
    // Every string sliced out below starts and ends at an ASCII quote, so it is valid too.
    utf8(json)?;
    let mut p = Reader { b: json, i: 0 };
    let mut c = Chunk::default();
    let mut seen = [false; 5];
    p.object(|p, key| {
        let slot = match key {
            b"id" => 0,
            b"model" => 1,
            b"type" => 2,
            b"choices" => 3,
            b"usage" => 4,
            b"request_id" | b"meta" | b"search_results" | b"warning" | b"error" => return None,
            _ => return p.skip(0),
        };
        first(&mut seen[slot])?;
        match slot {
            0 => c.id = p.loose_str()?,
            1 => c.model = p.loose_str()?,
            2 => c.search_done = p.loose_str()? == Some(b"search_done"),
            3 => match p.peek()? {
                b'n' => p.literal(b"null")?,
                b'[' => {
                    c.has_choices = true;
                    let mut n = 0;
                    p.array(|p| {
                        let (bytes, message, finish) = p.choice()?;
                        c.content_bytes += bytes;
                        c.message_bytes += message;
                        if let Some(f) = finish {
                            *c.finish.get_mut(n)? = Some(f);
                            n += 1;
                        }
                        Some(())
                    })?;
                }
                _ => return None,
            },
            _ => {
                if p.peek()? == b'n' {
                    p.literal(b"null")?;
                } else {
                    c.usage = Some(p.usage()?);
                }
            }
        }
        Some(())
    })?;
    p.ws();
    (p.i == json.len()).then_some(c)
}

/// The bytes that end a run of plain string content: quote, backslash, control characters
/// (one table lookup per byte instead of three comparisons).
static STOPS: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// The first quote, backslash or control character in `b` (any length; [`Reader::run`] gives
/// it at most 16 bytes): eight bytes a step as one `u64` (bit tricks, no `unsafe`), a table
/// lookup a byte for a tail shorter than eight. Every string the reader meets starts here:
/// keys, ids and roles end inside the first word (callgrind: a lookup a byte cost ~2k
/// instructions a call, in ~30 strings).
pub(crate) fn first_stop(b: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // A byte's high bit set where the byte is below `n` (n <= 0x80; or, only above a byte that
    // is, a false alarm from the borrow: the lowest set bit is always a true one). A byte
    // equal to `c` is below 1 once xored with `c`.
    let below = |v: u64, n: u8| v.wrapping_sub(ONES * u64::from(n)) & !v & HIGH;
    let mut at = 0;
    while let Some(word) = b.get(at..at + 8) {
        let v = u64::from_le_bytes(word.try_into().unwrap_or_default());
        // A control character, or a quote or backslash.
        let hits = below(v, 0x20)
            | below(v ^ (ONES * u64::from(b'"')), 1)
            | below(v ^ (ONES * u64::from(b'\\')), 1);
        if hits != 0 {
            return Some(at + hits.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    b[at..]
        .iter()
        .position(|&c| STOPS[c as usize])
        .map(|n| at + n)
}

/// Whether `b` holds a byte below 0x20: the least byte of each 256-byte block (a minimum
/// without early exit vectorizes; callgrind: 0.31 instructions a byte, 0.68 for `any`).
fn has_control(b: &[u8]) -> bool {
    b.chunks(256)
        .any(|c| c.iter().fold(u8::MAX, |m, &x| m.min(x)) < 0x20)
}

/// Where a request's `messages` value is, and what `request::TextBytes` counts in it.
#[derive(Debug, PartialEq)]
pub(crate) struct Messages {
    pub span: Range<usize>,
    /// Messages (array elements; 1 for a lone object or string, 0 for null and scalars).
    pub count: u64,
    /// Bytes of every string value inside, inline media excepted.
    pub text_bytes: u64,
}

/// Reads a request's top-level `messages`, or `None` (then serde reads the whole body): no
/// `messages`, or anything [`Reader::text_bytes`] leaves to serde.
pub(crate) fn messages(body: &[u8]) -> Option<Messages> {
    let mut p = Reader { b: body, i: 0 };
    let mut found = None;
    p.object(|p, key| {
        if key != b"messages" {
            return p.skip(0);
        }
        if found.is_some() {
            return None;
        }
        p.ws();
        let start = p.i;
        let (count, text_bytes) = p.messages()?;
        found = Some(Messages {
            span: start..p.i,
            count,
            text_bytes,
        });
        Some(())
    })?;
    p.ws();
    let m = found.filter(|_| p.i == body.len())?;
    utf8(&body[m.span.clone()])?;
    Some(m)
}

/// Whether `b` is UTF-8. Long input is checked with SIMD (simdutf8): a 256 KiB prompt took
/// std's check ~116k instructions, nearly half of reading its messages. Short input (stream
/// chunks) is checked by std, which is cheaper there. Only valid or not is needed (the serde
/// path words the error).
fn utf8(b: &[u8]) -> Option<()> {
    let ok = if b.len() >= 1024 {
        simdutf8::basic::from_utf8(b).is_ok()
    } else {
        std::str::from_utf8(b).is_ok()
    };
    ok.then_some(())
}

/// `Some` the first time a field is met, `None` (give up) when it comes again: serde's derived
/// readers refuse a repeated field.
fn first(seen: &mut bool) -> Option<()> {
    (!std::mem::replace(seen, true)).then_some(())
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    /// JSON's whitespace: exactly these four.
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    fn literal(&mut self, lit: &[u8]) -> Option<()> {
        self.ws();
        let end = self.i + lit.len();
        (self.b.get(self.i..end)? == lit).then(|| self.i = end)
    }

    /// `{ "key": value, … }`, each value read by `f`. Keys with escapes: `None`.
    fn object(&mut self, mut f: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let key = self.plain_bytes()?;
            self.eat(b':')?;
            f(self, key)?;
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// `[ value, … ]`, each value read by `f`.
    fn array(&mut self, mut f: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'[')?;
        if self.peek()? == b']' {
            self.i += 1;
            return Some(());
        }
        loop {
            f(self)?;
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// The bytes up to the next quote, backslash or control character (one of which must
    /// come), and that byte. `None` also for a control character after the first 16 bytes.
    fn run(&mut self) -> Option<(&'a [u8], u8)> {
        let rest = self.b.get(self.i..)?;
        // Short strings (keys, ids): a lookup per byte. Long text: SIMD to the next quote or
        // backslash, then a check for control characters before it (vectorized).
        let head = rest.len().min(16);
        let n = match first_stop(&rest[..head]) {
            Some(n) => n,
            None => {
                let n = head + memchr::memchr2(b'"', b'\\', &rest[head..])?;
                if has_control(&rest[head..n]) {
                    return None;
                }
                n
            }
        };
        self.i += n + 1;
        Some((&rest[..n], rest[n]))
    }

    /// A string without escapes or control characters, as it stands in the input.
    fn plain_bytes(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        match self.run()? {
            (s, b'"') => Some(s),
            _ => None,
        }
    }

    /// [`Self::plain_bytes`] as text (the chunk was checked to be UTF-8 and the string is cut
    /// at ASCII quotes, so this only re-checks).
    fn plain_str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.plain_bytes()?).ok()
    }

    /// A field the serde path reads as `Option<&RawValue>` and then as a string: a plain string
    /// is kept; null and the other types count as absent (but must be well-formed).
    fn loose_str(&mut self) -> Option<Option<&'a [u8]>> {
        if self.peek()? == b'"' {
            self.plain_bytes().map(Some)
        } else {
            self.skip(0).map(|_| None)
        }
    }

    /// A string's length once decoded, in UTF-8 bytes (what `StrLen` counts).
    fn str_len(&mut self) -> Option<u64> {
        self.eat(b'"')?;
        let mut n = 0u64;
        loop {
            let (run, end) = self.run()?;
            n += run.len() as u64;
            match end {
                b'"' => return Some(n),
                b'\\' => n += self.escape_len()?,
                _ => return None,
            }
        }
    }

    /// The decoded length of the escape after a backslash; lone surrogates give up.
    fn escape_len(&mut self) -> Option<u64> {
        let e = *self.b.get(self.i)?;
        self.i += 1;
        match e {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(1),
            b'u' => {
                let cp = self.hex4()?;
                if (0xD800..0xDC00).contains(&cp) {
                    if self.b.get(self.i..self.i + 2)? != b"\\u" {
                        return None;
                    }
                    self.i += 2;
                    (0xDC00..0xE000).contains(&self.hex4()?).then_some(4)
                } else {
                    char::from_u32(cp).map(|c| c.len_utf8() as u64)
                }
            }
            _ => None,
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let h = self.b.get(self.i..self.i + 4)?;
        self.i += 4;
        h.iter()
            .try_fold(0u32, |v, &d| Some(v * 16 + (d as char).to_digit(16)?))
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.b.get(self.i).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
        }
        self.i - start
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Option<()> {
        self.ws();
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match *self.b.get(self.i)? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
            if let Some(b'+' | b'-') = self.b.get(self.i) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    /// Any well-formed value, read and dropped.
    fn skip(&mut self, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.str_len().map(|_| ()),
            b'{' => self.object(|p, _| p.skip(depth + 1)),
            b'[' => self.array(|p| p.skip(depth + 1)),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// The `messages` value: (messages, text bytes), as `request::MessagesSeed` counts them.
    fn messages(&mut self) -> Option<(u64, u64)> {
        match self.peek()? {
            b'[' => {
                let (mut n, mut bytes) = (0, 0);
                self.array(|p| {
                    n += 1;
                    bytes += p.text_bytes(1)?;
                    Some(())
                })?;
                Some((n, bytes))
            }
            b'{' => Some((1, self.text_bytes(0)?)),
            b'"' => Some((1, self.str_len()?)),
            _ => self.text_bytes(0).map(|_| (0, 0)),
        }
    }

    /// The bytes of every string value (not key) in a value, inline media excepted: what
    /// `request::TextBytes` counts. serde reads these values with `deserialize_any`, which
    /// parses numbers: only plain integers are taken here (a float can be out of range).
    fn text_bytes(&mut self, depth: u32) -> Option<u64> {
        if depth > MAX_DEPTH {
            return None;
        }
        let mut n = 0;
        match self.peek()? {
            b'"' => return self.str_len(),
            b'{' => self.object(|p, key| {
                if super::request::MEDIA_KEYS
                    .iter()
                    .any(|k| k.as_bytes() == key)
                {
                    p.skip(depth + 1)
                } else {
                    n += p.text_bytes(depth + 1)?;
                    Some(())
                }
            })?,
            b'[' => self.array(|p| {
                n += p.text_bytes(depth + 1)?;
                Some(())
            })?,
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'n' => self.literal(b"null")?,
            _ => self.integer()?,
        }
        Some(n)
    }

    /// An integer of at most 18 digits (serde_json reads it exactly); a fraction, an exponent
    /// or a longer one gives up.
    fn integer(&mut self) -> Option<()> {
        self.ws();
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match *self.b.get(self.i)? {
            b'0' => self.i += 1,
            b'1'..=b'9' if self.digits() <= 18 => {}
            _ => return None,
        }
        match self.b.get(self.i) {
            Some(b'.' | b'e' | b'E') => None,
            _ => Some(()),
        }
    }

    /// `usage`: an object of plain counts (a `cost`, a count of another kind, a repeated
    /// field: `None`, the serde path reads it).
    fn usage(&mut self) -> Option<Counts> {
        let mut u = Counts::default();
        let mut seen = [false; 5];
        self.object(|p, key| {
            let slot = match key {
                b"prompt_tokens" => 0,
                b"completion_tokens" => 1,
                b"prompt_tokens_details" => 2,
                b"completion_tokens_details" => 3,
                b"num_search_queries" => 4,
                b"cost" => return None,
                _ => return p.skip(0),
            };
            first(&mut seen[slot])?;
            match slot {
                0 => u.prompt = p.count()?,
                1 => u.completion = p.count()?,
                2 => u.cached = p.details(b"cached_tokens")?,
                3 => u.reasoning = p.details(b"reasoning_tokens")?,
                _ => u.searches = p.count()?,
            }
            Some(())
        })?;
        Some(u)
    }

    /// A token count: null (absent), or a non-negative plain integer.
    fn count(&mut self) -> Option<Option<u64>> {
        match self.peek()? {
            b'n' => self.literal(b"null").map(|_| None),
            b'0'..=b'9' => {
                let start = self.i;
                self.integer()?;
                std::str::from_utf8(&self.b[start..self.i])
                    .ok()?
                    .parse()
                    .ok()
                    .map(Some)
            }
            _ => None,
        }
    }

    /// `prompt_tokens_details` or `completion_tokens_details`: null, or an object whose `key`
    /// is a count.
    fn details(&mut self, key: &[u8]) -> Option<Option<u64>> {
        if self.peek()? == b'n' {
            return self.literal(b"null").map(|_| None);
        }
        let (mut n, mut seen) = (None, false);
        self.object(|p, k| {
            if k != key {
                return p.skip(0);
            }
            first(&mut seen)?;
            n = p.count()?;
            Some(())
        })?;
        Some(n)
    }

    /// One choice: the content bytes of its `delta` and of its `message`, and its finish
    /// reason.
    fn choice(&mut self) -> Option<(u64, u64, Option<&'a str>)> {
        let (mut bytes, mut message, mut finish) = (0, 0, None);
        let mut seen = [false; 3];
        self.object(|p, key| {
            let slot = match key {
                b"delta" => 0,
                b"message" => 1,
                b"finish_reason" => 2,
                // A legacy completion's text: the serde path reads it.
                b"text" => return None,
                _ => return p.skip(0),
            };
            first(&mut seen[slot])?;
            match slot {
                0 => bytes = p.message()?,
                1 => message = p.message()?,
                _ => {
                    finish = match p.peek()? {
                        b'n' => p.literal(b"null").map(|_| None)?,
                        _ => Some(p.plain_str()?),
                    }
                }
            }
            Some(())
        })?;
        Some((bytes, message, finish))
    }

    /// A `delta` (or `message`): null, or an object whose text fields are strings or null and
    /// whose `tool_calls`, if any, is null. Its text's decoded bytes.
    fn message(&mut self) -> Option<u64> {
        if self.peek()? == b'n' {
            return self.literal(b"null").map(|_| 0);
        }
        let mut bytes = 0;
        let mut seen = [false; 4];
        self.object(|p, key| {
            let slot = match key {
                b"content" => 0,
                b"reasoning" => 1,
                b"refusal" => 2,
                b"tool_calls" => 3,
                _ => return p.skip(0),
            };
            first(&mut seen[slot])?;
            match p.peek()? {
                b'n' => p.literal(b"null"),
                b'"' if slot < 3 => {
                    bytes += p.str_len()?;
                    Some(())
                }
                _ => None,
            }
        })?;
        Some(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The word-at-a-time search finds the same first stop as a byte-by-byte one.
        #[test]
        fn first_stop_equals_bytewise(
            b in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(vec![b'"', b'\\', 0x00, 0x1f, 0x20, 0x21, 0x5b, 0x5d, 0x7f, 0x80, 0xa2, 0xdc, 0xff]),
                    proptest::num::u8::ANY,
                ],
                0..=16,
            )
        ) {
            let want = b.iter().position(|&c| c < 0x20 || c == b'"' || c == b'\\');
            proptest::prop_assert_eq!(first_stop(&b), want);
        }

        /// Both sides of the SIMD threshold agree with std's check, whatever the bytes and
        /// wherever a bad or multi-byte sequence falls.
        #[test]
        fn the_utf8_check_agrees_with_std(
            len in 0usize..3000,
            inserts in proptest::collection::vec(
                (0usize..3000, proptest::sample::select(vec![
                    &b"\xc3\xa9"[..], b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"\xff", b"\xc3",
                    b"\xed\xa0\x80", b"\xe2\x82", b"\x80",
                ])),
                0..3,
            ),
        ) {
            let mut b = vec![b'a'; len];
            for (at, bytes) in inserts {
                let at = at.min(b.len());
                b.splice(at..at, bytes.iter().copied());
            }
            proptest::prop_assert_eq!(utf8(&b).is_some(), std::str::from_utf8(&b).is_ok());
        }
    }

    #[test]
    fn the_usual_chunks_are_read_without_serde() {
        let c = chunk(
            br#"{"type":"content","id":"gen-1","object":"chat.completion.chunk","created":1764000000,"model":"m/x","choices":[{"index":0,"delta":{"role":"assistant","content":"w\u00e9 \n"},"finish_reason":null}]}"#,
        )
        .expect("the usual shape");
        assert_eq!(c.id, Some(&b"gen-1"[..]));
        assert_eq!(c.model, Some(&b"m/x"[..]));
        assert!(!c.search_done && c.has_choices);
        assert_eq!(c.content_bytes, "wé \n".len() as u64);
        assert_eq!(c.finish, [None; MAX_FINISH]);

        let c = chunk(br#" {"id": 5, "choices": [{"delta": {}, "finish_reason": "stop"}], "type": "search_done"} "#)
            .expect("the finish chunk");
        assert_eq!((c.id, c.search_done), (None, true));
        assert_eq!(c.finish[0], Some("stop"));
        assert_eq!(c.content_bytes, 0);
    }

    #[test]
    fn anything_else_is_left_to_serde() {
        for j in [
            &br#"{"id":"a","usage":{"prompt_tokens":1,"cost":0.5}}"#[..],
            br#"{"usage":{"prompt_tokens":1.0}}"#,
            br#"{"usage":{"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":2}}}"#,
            br#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{}"}}]}}]}"#,
            br#"{"choices":[{"delta":{"content":[{"type":"text","text":"a"}]}}]}"#,
            br#"{"choices":[null]}"#,
            br#"{"choices":"x"}"#,
            br#"{"id":"a","id":"b"}"#,
            br#"{"i\u0064":"a"}"#,
            br#"{"id":"a\"b"}"#,
            br#"{"choices":[{"finish_reason":"st\u006fp"}]}"#,
            br#"{"x":01}"#,
            br#"{"x":1.}"#,
            br#"{"x":tru}"#,
            br#"{"x":"\ud800"}"#,
            br#"{"x":"a"}x"#,
            br#"{"x":"a",}"#,
            br#"{"x":"tab	"}"#,
            b"{\"x\":\"\xff\"}",
            br#"[]"#,
        ] {
            assert_eq!(chunk(j), None, "{}", String::from_utf8_lossy(j));
        }
    }
}

/// Damage for the property tests of both readers: JSON as writers vary it and broken.
#[cfg(test)]
pub(super) mod damage {
    use proptest::sample::Index;

    /// Kinds of edit [`apply`] knows.
    pub const KINDS: u8 = 10;

    /// Applies `edits` (where, which kind) to `b`; `twice`, if any, goes in after the
    /// opening brace (a field written twice).
    pub fn apply(b: &mut Vec<u8>, twice: Option<&str>, edits: &[(Index, u8)]) {
        if let (Some(t), Some(b'{')) = (twice, b.first()) {
            b.splice(1..1, t.bytes()).for_each(drop);
        }
        for (at, how) in edits {
            let i = at.index(b.len() + 1);
            match how {
                0 => b.insert(i, b' '),
                1 => b.splice(i..i, *b"\r\n\t").for_each(drop),
                // A letter as a \u escape: the same text inside a string, damage outside.
                2 if i < b.len() && b[i].is_ascii_alphabetic() => {
                    let e = format!("\\u{:04x}", b[i]);
                    b.splice(i..=i, e.into_bytes()).for_each(drop);
                }
                3 if i < b.len() => {
                    b.remove(i);
                }
                4 => b.insert(i, b'"'),
                5 => b.insert(i, b','),
                // The emoji as the surrogate pair a writer may send instead.
                6 => {
                    let emoji = "\u{1F600}".as_bytes();
                    if let Some(j) = b.windows(4).position(|w| w == emoji) {
                        b.splice(j..j + 4, *br"\ud83d\ude00").for_each(drop);
                    }
                }
                7 => b.push(if i % 2 == 0 { b'}' } else { b'x' }),
                8 => b.insert(i, b'0'),
                _ => b.insert(i, if i % 2 == 0 { 0x01 } else { 0xff }),
            }
        }
    }
}
