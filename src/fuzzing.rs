//! The fuzz targets' bodies, shared with the test that replays their corpus
//! (`tests/fuzz_corpus.rs`): any input, split anywhere, must decode the same and never panic.

use bytes::Bytes;

use crate::openai::response::{BodyKind, ResponseTap};
use crate::openai::sse::SseDecoder;
use crate::openai::{edit, request};

/// Splits `data` into the input and a split point taken from its first two bytes.
fn split(data: &[u8]) -> (&[u8], usize) {
    match data {
        [a, b, rest @ ..] => (rest, usize::from(u16::from_le_bytes([*a, *b]))),
        _ => (data, 0),
    }
}

fn events(chunks: &[&[u8]]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut d = SseDecoder::new(64 * 1024);
    let mut on =
        |e: crate::openai::sse::SseEvent<'_>| out.push((e.event.to_vec(), e.data.to_vec()));
    for c in chunks {
        d.feed(c, &mut on);
    }
    d.finish(&mut on);
    out
}

/// The SSE decoder: whole, or split in two anywhere, the same events.
pub fn sse(data: &[u8]) {
    let (input, at) = split(data);
    let at = at.min(input.len());
    let whole = events(&[input]);
    let parts = events(&[&input[..at], &input[at..]]);
    assert_eq!(whole, parts, "an SSE split at {at} changed the events");
}

/// Request inspection (plain, and as each supported encoding would be tried) and its checks;
/// and the usage splice: the edited body asks for usage, reads as the same request otherwise,
/// and keeps every byte outside the splice.
pub fn request(data: &[u8]) {
    if let Ok(m) = request::inspect(data) {
        let _ = m.check(256);
        let _ = m.output_cap();
        let _ = m.web_search_requested();
        if let edit::UsageAsk::Edit(e) = edit::ask_for_usage(data, &m) {
            let out = edit::apply(data, vec![e.clone()]);
            let after = request::inspect(&out).expect("an edited body still reads");
            assert_eq!(after.include_usage, Some(true), "the edit asks for usage");
            assert_eq!((after.model, after.user), (m.model, m.user));
            assert_eq!(&out[..e.range.start], &data[..e.range.start]);
            assert_eq!(&out[e.range.start + e.with.len()..], &data[e.range.end..]);
        }
    }
    for enc in [
        None,
        Some("gzip"),
        Some("deflate"),
        Some("br"),
        Some("zstd"),
    ] {
        for api in crate::meter::Api::ALL {
            let _ = request::inspect_encoded(api, data, enc, 1 << 20);
        }
    }
}

fn observe(api: crate::meter::Api, kind: BodyKind, chunks: &[&[u8]]) -> String {
    let mut tap = ResponseTap::for_api(api, kind, None, 1 << 20);
    for c in chunks {
        tap.feed(&Bytes::copy_from_slice(c));
    }
    format!("{:?}", tap.finish())
}

/// Usage extraction from SSE and JSON bodies of every dialect: whole, or split in two
/// anywhere, the same.
pub fn response(data: &[u8]) {
    let (input, at) = split(data);
    let at = at.min(input.len());
    for api in crate::meter::Api::ALL {
        for kind in [BodyKind::Sse, BodyKind::Json] {
            let whole = observe(api, kind, &[input]);
            let parts = observe(api, kind, &[&input[..at], &input[at..]]);
            assert_eq!(
                whole, parts,
                "a {api:?} {kind:?} body split at {at} changed what was observed"
            );
        }
    }
}

fn stripped(enc: Option<&str>, chunks: &[&[u8]]) -> Vec<u8> {
    let Some(mut s) = crate::openai::strip::UsageStrip::new(enc) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for c in chunks {
        out.extend(s.feed(c));
    }
    out.extend(s.finish());
    out
}

/// The filter that takes asked-for usage out of a stream: whole, or split in two anywhere,
/// the same bytes to the client. Plain, always; fed as gzip, when the input is a whole gzip
/// stream (a corrupt one is passed on from where it stops decoding, so what went before
/// depends on where the reads fell: then only no panic).
pub fn strip(data: &[u8]) {
    let (input, at) = split(data);
    let at = at.min(input.len());
    let valid_gzip = {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(input)
            .read_to_end(&mut out)
            .is_ok()
    };
    for enc in [None, Some("gzip")] {
        let whole = stripped(enc, &[input]);
        let parts = stripped(enc, &[&input[..at], &input[at..]]);
        if enc.is_none() || valid_gzip {
            assert_eq!(
                whole, parts,
                "a stream split at {at} changed what the client gets"
            );
        }
    }
}
