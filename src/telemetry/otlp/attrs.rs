//! A span's attributes, written as they are added: each one a `Span.attributes` field (an
//! OTLP `KeyValue` holding an `AnyValue`), byte for byte as prost writes it.
//!
//! Building the messages first cost more than the rest of the span: a `KeyValue` owns its key
//! and its value (two allocations per attribute, freed again after encoding), and prost
//! measures a `KeyValue`'s `AnyValue` once for the span's length, once for the `KeyValue`'s
//! and once for its own. Here each length is computed once, from the value in hand.

use prost::encoding::{encode_varint, encoded_len_varint, key_len};

/// `Span.attributes`; `KeyValue.key` and `.value`; `AnyValue`'s `string_value`, `bool_value`,
/// `int_value`, `double_value` and `array_value`; `ArrayValue.values`.
const SPAN_ATTRIBUTES: u32 = 9;
const KEY: u32 = 1;
const VALUE: u32 = 2;
const STRING: u32 = 1;
const BOOL: u32 = 2;
const INT: u32 = 3;
const DOUBLE: u32 = 4;
const ARRAY: u32 = 5;
const ARRAY_VALUES: u32 = 1;

/// Attributes typed as the OpenTelemetry API types them. One is reused for every span (cleared,
/// not freed).
#[derive(Default)]
pub struct Attrs {
    buf: Vec<u8>,
}

impl Attrs {
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// The encoded `Span.attributes` fields.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn str(&mut self, key: &str, v: &str) {
        self.key_value(key, delimited_len(STRING, v.len()));
        delimited(STRING, v.as_bytes(), &mut self.buf);
    }

    pub fn int(&mut self, key: &str, v: i64) {
        self.key_value(key, prost::encoding::int64::encoded_len(INT, &v));
        prost::encoding::int64::encode(INT, &v, &mut self.buf);
    }

    pub fn f64(&mut self, key: &str, v: f64) {
        self.key_value(key, prost::encoding::double::encoded_len(DOUBLE, &v));
        prost::encoding::double::encode(DOUBLE, &v, &mut self.buf);
    }

    pub fn bool(&mut self, key: &str, v: bool) {
        self.key_value(key, prost::encoding::bool::encoded_len(BOOL, &v));
        prost::encoding::bool::encode(BOOL, &v, &mut self.buf);
    }

    /// An array of strings.
    pub fn strs(&mut self, key: &str, vs: &[String]) {
        let item = |v: &String| delimited_len(STRING, v.len());
        let items: usize = vs
            .iter()
            .map(|v| delimited_len(ARRAY_VALUES, item(v)))
            .sum();
        self.key_value(key, delimited_len(ARRAY, items));
        delimited_key(ARRAY, &mut self.buf);
        varint(items as u64, &mut self.buf);
        for v in vs {
            delimited_key(ARRAY_VALUES, &mut self.buf);
            varint(item(v) as u64, &mut self.buf);
            delimited(STRING, v.as_bytes(), &mut self.buf);
        }
    }

    /// A `KeyValue` up to its value's content: the attribute field's key and length, the
    /// key, and the value field's key and length (`any_len`, the encoded `AnyValue`'s). An
    /// `AnyValue` is always written, even of a zero (its field is a oneof); an empty key is
    /// not (a proto3 string at its default).
    fn key_value(&mut self, key: &str, any_len: usize) {
        let key_field = if key.is_empty() {
            0
        } else {
            delimited_len(KEY, key.len())
        };
        let kv_len = key_field + delimited_len(VALUE, any_len);
        delimited_key(SPAN_ATTRIBUTES, &mut self.buf);
        varint(kv_len as u64, &mut self.buf);
        if !key.is_empty() {
            delimited(KEY, key.as_bytes(), &mut self.buf);
        }
        delimited_key(VALUE, &mut self.buf);
        varint(any_len as u64, &mut self.buf);
    }
}

/// prost's `encode_varint`, with a value below 128 written as one byte in one push: field
/// keys and most lengths here are, and prost's loop writes a byte at a time through `BufMut`
/// (callgrind: ~3.1k instructions a span, six varints an attribute).
#[inline]
fn varint(v: u64, buf: &mut Vec<u8>) {
    if v < 0x80 {
        buf.push(v as u8);
    } else {
        encode_varint(v, buf);
    }
}

/// prost's `encode_key` for a length-delimited field.
#[inline]
fn delimited_key(tag: u32, buf: &mut Vec<u8>) {
    const LENGTH_DELIMITED: u32 = 2;
    varint(u64::from(tag << 3 | LENGTH_DELIMITED), buf);
}

/// The encoded length of a length-delimited field of `len` bytes.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn delimited(tag: u32, bytes: &[u8], buf: &mut Vec<u8>) {
    delimited_key(tag, buf);
    varint(bytes.len() as u64, buf);
    buf.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue};
    use opentelemetry_proto::tonic::trace::v1::Span;
    use prost::Message;

    fn kv(key: &str, v: Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(v) }),
            key_strindex: 0,
        }
    }

    fn strings(vs: &[String]) -> Value {
        Value::ArrayValue(ArrayValue {
            values: vs
                .iter()
                .map(|s| AnyValue {
                    value: Some(Value::StringValue(s.clone())),
                })
                .collect(),
        })
    }

    #[test]
    fn attributes_are_written_as_prost_writes_them() {
        let long = "é".repeat(200);
        let many: Vec<String> = (0..100).map(|i| format!("reason-{i}")).collect();
        let mut a = Attrs::default();
        let mut want = Vec::new();
        let mut both = |k: &str, v: Value, write: &dyn Fn(&mut Attrs)| {
            write(&mut a);
            want.push(kv(k, v));
        };
        both("s", Value::StringValue("v".into()), &|a| a.str("s", "v"));
        both("empty", Value::StringValue("".into()), &|a| {
            a.str("empty", "")
        });
        both("", Value::StringValue("no key".into()), &|a| {
            a.str("", "no key")
        });
        both(&long, Value::StringValue(long.clone()), &|a| {
            a.str(&long, &long)
        });
        // Every length around the one-byte varint's edge, in each place a length is written:
        // the value, the key, the whole attribute (127 and 128 bytes, and up to 255, which a
        // wrong threshold would write as one invalid byte).
        for n in [
            120, 121, 122, 123, 124, 125, 126, 127, 128, 129, 200, 255, 256,
        ] {
            let v = "v".repeat(n);
            both("k", Value::StringValue(v.clone()), &|a| a.str("k", &v));
            let k = "k".repeat(n);
            both(&k, Value::StringValue("v".into()), &|a| a.str(&k, "v"));
        }
        for i in [0, 1, 127, 128, -1, i64::MIN, i64::MAX] {
            both("i", Value::IntValue(i), &|a| a.int("i", i));
        }
        for f in [0.0, -0.0, 0.5, f64::MAX, f64::INFINITY] {
            both("f", Value::DoubleValue(f), &|a| a.f64("f", f));
        }
        both("t", Value::BoolValue(true), &|a| a.bool("t", true));
        both("no", Value::BoolValue(false), &|a| a.bool("no", false));
        let one = vec!["stop".to_string()];
        both("a1", strings(&one), &|a| a.strs("a1", &one));
        both("a0", strings(&[]), &|a| a.strs("a0", &[]));
        both("a100", strings(&many), &|a| a.strs("a100", &many));
        let span = Span {
            attributes: want,
            ..Span::default()
        };
        assert_eq!(a.bytes(), span.encode_to_vec().as_slice());
        a.clear();
        assert!(a.bytes().is_empty());
    }
}
