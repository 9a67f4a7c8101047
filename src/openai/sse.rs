//! An incremental Server-Sent Events decoder.
//!
//! Upstream reads never line up with events: an event (even a UTF-8 character) can be split at
//! any byte. The decoder keeps only the unfinished line and the unfinished event between calls,
//! accepts LF, CRLF and CR line ends, `event:` fields, `:` comments and multi-line `data:`, and
//! works on bytes, so UTF-8 is only interpreted once an event is complete.

/// One complete event. `event` is empty for the default ("message") type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    pub event: &'a [u8],
    pub data: &'a [u8],
}

#[derive(Debug)]
pub struct SseDecoder {
    /// The current line when it spans reads.
    line: Vec<u8>,
    /// Data of the current event, each `data:` line followed by LF.
    data: Vec<u8>,
    has_data: bool,
    event: Vec<u8>,
    /// The previous read ended in CR: a LF at the start of the next one belongs to it.
    skip_lf: bool,
    /// Longest line or event kept; a longer one is dropped (and `overflowed` set), so a
    /// stream without line ends cannot grow memory without bound.
    max: usize,
    pub overflowed: bool,
    /// Dropping the rest of an overlong line.
    discard: bool,
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

impl SseDecoder {
    /// A decoder keeping at most `max` bytes of one line or one event.
    pub fn new(max: usize) -> Self {
        SseDecoder {
            line: Vec::new(),
            data: Vec::new(),
            has_data: false,
            event: Vec::new(),
            skip_lf: false,
            max,
            overflowed: false,
            discard: false,
        }
    }

    /// Feeds one read; calls `on_event` for every event it completes.
    pub fn feed(&mut self, mut input: &[u8], on_event: &mut impl FnMut(SseEvent<'_>)) {
        if self.skip_lf {
            if let Some(rest) = input.strip_prefix(b"\n") {
                input = rest;
                self.skip_lf = false;
            } else if !input.is_empty() {
                self.skip_lf = false;
            }
        }
        while let Some(pos) = memchr::memchr2(b'\n', b'\r', input) {
            let (head, rest) = input.split_at(pos);
            let cr = rest[0] == b'\r';
            input = &rest[1..];
            if self.discard {
                // The overlong line ends here.
                self.discard = false;
                self.line.clear();
            } else if self.line.is_empty() {
                self.process_line(head, on_event);
            } else {
                self.line.extend_from_slice(head);
                let line = std::mem::take(&mut self.line);
                self.process_line(&line, on_event);
                self.line = line;
                self.line.clear();
            }
            if cr {
                match input.first() {
                    Some(b'\n') => input = &input[1..],
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
        }
        if self.discard {
            return;
        }
        if self.line.len() + input.len() > self.max {
            self.overflowed = true;
            self.discard = true;
            self.line.clear();
            self.data.clear();
            self.has_data = false;
            return;
        }
        self.line.extend_from_slice(input);
    }

    /// The stream ended. A last event that was not closed by a blank line is still delivered:
    /// upstreams that stop abruptly often leave one behind, and its JSON is either whole (and
    /// counts) or truncated (and is ignored by the caller).
    pub fn finish(&mut self, on_event: &mut impl FnMut(SseEvent<'_>)) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.process_line(&line, on_event);
        }
        self.process_line(b"", on_event);
    }

    fn process_line(&mut self, line: &[u8], on_event: &mut impl FnMut(SseEvent<'_>)) {
        if line.is_empty() {
            if self.has_data || !self.event.is_empty() {
                let data = self.data.strip_suffix(b"\n").unwrap_or(&self.data);
                on_event(SseEvent {
                    event: &self.event,
                    data,
                });
            }
            self.data.clear();
            self.event.clear();
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return; // comment
        }
        let (field, value) = field_value(line);
        match field {
            b"data" => {
                if self.data.len() + value.len() >= self.max {
                    self.overflowed = true;
                    self.data.clear();
                    return;
                }
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            _ => {} // id, retry and unknown fields do not matter to the tap
        }
    }
}

/// A field line's name and value: split at the first `:`, one space after it dropped (a line
/// without `:` is a field with an empty value). The one reading of SSE fields, for the decoder
/// and for the stream filter (`super::strip`).
pub(super) fn field_value(line: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(b':', line) {
        Some(i) => {
            let v = &line[i + 1..];
            (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
        }
        None => (line, b""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_in(parts: &[&[u8]]) -> Vec<(String, String)> {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        let mut f = |e: SseEvent<'_>| {
            out.push((
                String::from_utf8_lossy(e.event).into_owned(),
                String::from_utf8_lossy(e.data).into_owned(),
            ))
        };
        for p in parts {
            d.feed(p, &mut f);
        }
        d.finish(&mut f);
        out
    }

    const STREAM: &[u8] = b": keep-alive\r\nevent: search_done\r\ndata: {\"a\":1}\r\n\r\n\
data: {\"b\":\"\xc3\xa9\"}\n\ndata: line1\ndata: line2\n\nid: 7\nretry: 10\ndata:x\r\rdata: [DONE]\n\n";

    fn expected() -> Vec<(String, String)> {
        vec![
            ("search_done".into(), "{\"a\":1}".into()),
            (String::new(), "{\"b\":\"é\"}".into()),
            (String::new(), "line1\nline2".into()),
            (String::new(), "x".into()),
            (String::new(), "[DONE]".into()),
        ]
    }

    #[test]
    fn whole_stream() {
        assert_eq!(decode_in(&[STREAM]), expected());
    }

    #[test]
    fn stream_without_final_blank_line_still_yields_last_event() {
        assert_eq!(
            decode_in(&[b"data: a\n\ndata: b"]),
            vec![(String::new(), "a".into()), (String::new(), "b".into())]
        );
    }

    #[test]
    fn cr_at_end_of_read_then_lf() {
        assert_eq!(
            decode_in(&[b"data: a\r", b"\n\r", b"\n"]),
            vec![(String::new(), "a".into())]
        );
    }

    #[test]
    fn a_stream_without_line_ends_is_bounded() {
        let mut d = SseDecoder::new(100);
        let mut n = 0;
        for _ in 0..1000 {
            d.feed(&[b'x'; 64], &mut |_| n += 1);
        }
        assert!(d.overflowed);
        assert!(d.line.capacity() <= 256);
        d.feed(b"\n\ndata: ok\n\n", &mut |_| n += 1);
        assert_eq!(n, 1, "the decoder recovers at the next line end");
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_events(cuts in proptest::collection::vec(0..STREAM.len(), 0..12)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut parts = Vec::new();
            let mut last = 0;
            for c in cuts {
                parts.push(&STREAM[last..c]);
                last = c;
            }
            parts.push(&STREAM[last..]);
            prop_assert_eq!(decode_in(&parts), expected());
        }
    }
}
