//! Content codings (gzip, deflate, br): one decoder for everything tokentap reads of a body
//! (the usage tap's copy, a stream it edits), and the encoder that writes a body edited back
//! in the coding it came in.

use std::io::{Read, Write};

/// A content coding tokentap reads, by its `Content-Encoding` name (case and blanks ignored;
/// `None` for identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Gzip,
    Deflate,
    Brotli,
}

impl Coding {
    fn parse(content_encoding: Option<&str>) -> Result<Option<Coding>, String> {
        let enc = content_encoding.map(str::trim).unwrap_or("");
        Ok(match enc.to_ascii_lowercase().as_str() {
            "" | "identity" => None,
            "gzip" | "x-gzip" => Some(Coding::Gzip),
            "deflate" => Some(Coding::Deflate),
            "br" => Some(Coding::Brotli),
            other => return Err(format!("content-encoding {other:?} cannot be read")),
        })
    }
}

/// HTTP's "deflate" is zlib-wrapped, but some servers (and clients) send raw deflate: a
/// stream is zlib when its first two bytes are a zlib header.
fn is_zlib(head: &[u8]) -> bool {
    head.len() >= 2
        && head[0] & 0x0f == 8
        && (u16::from(head[0]) << 8 | u16::from(head[1])) % 31 == 0
}

/// A reader of `body` sent with `Content-Encoding: encoding`, inflating it by the same rules
/// as [`Decoding`] (for a whole body in hand, whose output the caller bounds as it reads);
/// `None` for identity.
pub(super) fn reader<'a>(
    body: &'a [u8],
    encoding: Option<&str>,
) -> Result<Option<Box<dyn Read + 'a>>, String> {
    Ok(Some(match Coding::parse(encoding)? {
        None => return Ok(None),
        Some(Coding::Gzip) => Box::new(flate2::read::MultiGzDecoder::new(body)),
        Some(Coding::Deflate) if is_zlib(body) => Box::new(flate2::read::ZlibDecoder::new(body)),
        Some(Coding::Deflate) => Box::new(flate2::read::DeflateDecoder::new(body)),
        Some(Coding::Brotli) => Box::new(brotli::Decompressor::new(body, 8192)),
    }))
}

/// A body's `Content-Encoding`, inflated (a copy, for the tap; or to be edited and coded
/// again, see [`Encoding`]).
pub(super) enum Decoding {
    Identity,
    Off,
    Gzip(flate2::write::MultiGzDecoder<Vec<u8>>),
    /// HTTP "deflate" is zlib-wrapped, but some servers send raw deflate: decided on the first
    /// two bytes.
    DeflatePending(Vec<u8>),
    Zlib(flate2::write::ZlibDecoder<Vec<u8>>),
    RawDeflate(flate2::write::DeflateDecoder<Vec<u8>>),
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
}

impl Decoding {
    pub(super) fn new(content_encoding: Option<&str>) -> Result<Self, String> {
        Ok(match Coding::parse(content_encoding)? {
            None => Decoding::Identity,
            Some(Coding::Gzip) => Decoding::Gzip(flate2::write::MultiGzDecoder::new(Vec::new())),
            Some(Coding::Deflate) => Decoding::DeflatePending(Vec::new()),
            Some(Coding::Brotli) => {
                Decoding::Brotli(Box::new(brotli::DecompressorWriter::new(Vec::new(), 8192)))
            }
        })
    }

    fn output(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            Decoding::Gzip(d) => Some(d.get_mut()),
            Decoding::Zlib(d) => Some(d.get_mut()),
            Decoding::RawDeflate(d) => Some(d.get_mut()),
            Decoding::Brotli(d) => Some(d.get_mut()),
            _ => None,
        }
    }

    /// Writes compressed bytes; returns what they inflated to.
    pub(super) fn inflate(&mut self, input: &[u8]) -> std::io::Result<Vec<u8>> {
        if let Decoding::DeflatePending(buf) = self {
            buf.extend_from_slice(input);
            if buf.len() < 2 {
                return Ok(Vec::new());
            }
            let head = std::mem::take(buf);
            *self = if is_zlib(&head) {
                Decoding::Zlib(flate2::write::ZlibDecoder::new(Vec::new()))
            } else {
                Decoding::RawDeflate(flate2::write::DeflateDecoder::new(Vec::new()))
            };
            return self.inflate(&head);
        }
        // flush() makes the decoders hand out everything the input so far inflates to, so the
        // tap is never a read behind the client.
        match self {
            Decoding::Gzip(d) => d.write_all(input).and_then(|()| d.flush())?,
            Decoding::Zlib(d) => d.write_all(input).and_then(|()| d.flush())?,
            Decoding::RawDeflate(d) => d.write_all(input).and_then(|()| d.flush())?,
            Decoding::Brotli(d) => d.write_all(input).and_then(|()| d.flush())?,
            _ => {}
        }
        Ok(self.output().map(std::mem::take).unwrap_or_default())
    }

    /// Flushes what the decoder still holds at the end of the body: the output, and the error
    /// if the compressed stream did not end cleanly (its output still counts).
    pub(super) fn finish(&mut self) -> (Vec<u8>, Option<std::io::Error>) {
        let mut out = Vec::new();
        if let Decoding::DeflatePending(buf) = self {
            if buf.is_empty() {
                return (out, None);
            }
            let head = std::mem::take(buf);
            *self = Decoding::RawDeflate(flate2::write::DeflateDecoder::new(Vec::new()));
            match self.inflate(&head) {
                Ok(o) => out = o,
                Err(e) => return (out, Some(e)),
            }
        }
        let r = match self {
            Decoding::Gzip(d) => d.try_finish(),
            Decoding::Zlib(d) => d.try_finish(),
            Decoding::RawDeflate(d) => d.try_finish(),
            Decoding::Brotli(d) => d.flush(),
            _ => return (out, None),
        };
        if let Some(rest) = self.output() {
            out.append(rest);
        }
        (out, r.err())
    }
}

impl Decoding {
    /// The encoder for what this decoder reads: same coding, the common default level
    /// (deflate's 6, brotli's 5), flushed block by block; `None` while "deflate" has not yet
    /// shown whether it is zlib-wrapped, and for identity.
    pub(super) fn encoder(&self) -> Option<Encoding> {
        let level = flate2::Compression::default();
        Some(match self {
            Decoding::Gzip(_) => Encoding::Gzip(flate2::write::GzEncoder::new(Vec::new(), level)),
            Decoding::Zlib(_) => Encoding::Zlib(flate2::write::ZlibEncoder::new(Vec::new(), level)),
            Decoding::RawDeflate(_) => {
                Encoding::RawDeflate(flate2::write::DeflateEncoder::new(Vec::new(), level))
            }
            Decoding::Brotli(_) => Encoding::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                5,
                22,
            ))),
            _ => return None,
        })
    }
}

/// Writes a body back in a content coding, one flushed block at a time.
pub(super) enum Encoding {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Zlib(flate2::write::ZlibEncoder<Vec<u8>>),
    RawDeflate(flate2::write::DeflateEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    Closed,
}

impl Encoding {
    /// Compresses `b` (the reader may not see it before the next [`Encoding::flush`]).
    pub(super) fn write(&mut self, b: &[u8]) {
        // Writing into a Vec cannot fail.
        let _ = match self {
            Encoding::Gzip(e) => e.write_all(b),
            Encoding::Zlib(e) => e.write_all(b),
            Encoding::RawDeflate(e) => e.write_all(b),
            Encoding::Brotli(e) => e.write_all(b),
            Encoding::Closed => Ok(()),
        };
    }

    /// Ends a block: everything written so far can be decoded from what was taken.
    pub(super) fn flush(&mut self) {
        let _ = match self {
            Encoding::Gzip(e) => e.flush(),
            Encoding::Zlib(e) => e.flush(),
            Encoding::RawDeflate(e) => e.flush(),
            Encoding::Brotli(e) => e.flush(),
            Encoding::Closed => Ok(()),
        };
    }

    /// The compressed bytes written so far and not yet taken.
    pub(super) fn take(&mut self) -> Vec<u8> {
        match self {
            Encoding::Gzip(e) => std::mem::take(e.get_mut()),
            Encoding::Zlib(e) => std::mem::take(e.get_mut()),
            Encoding::RawDeflate(e) => std::mem::take(e.get_mut()),
            Encoding::Brotli(e) => std::mem::take(e.get_mut()),
            Encoding::Closed => Vec::new(),
        }
    }

    /// Ends the compressed stream: what is left of it (the last block, a trailer).
    pub(super) fn close(&mut self) -> Vec<u8> {
        let rest = match std::mem::replace(self, Encoding::Closed) {
            Encoding::Gzip(e) => e.finish(),
            Encoding::Zlib(e) => e.finish(),
            Encoding::RawDeflate(e) => e.finish(),
            Encoding::Brotli(e) => Ok(e.into_inner()),
            Encoding::Closed => Ok(Vec::new()),
        };
        rest.unwrap_or_default()
    }
}
