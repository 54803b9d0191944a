//! A small, bounded JSON reader for the server's text control messages (PROTOCOL.md §2).
//!
//! Only a handful of small messages ever arrive as text, so a general JSON library would cost
//! more code than everything else the handshake needs (see `ci/nostd-check/footprint.sh`).
//! The result is our own [`Value`]: objects keep their key order and duplicate keys (lookups
//! see the last, as Python's `json.loads` keeps), integers stay integers, and `NaN` and
//! `Infinity`, which Python's `json.dumps` writes, are read back. Nesting, entries and string
//! lengths are capped by [`Limits`], and bad input is an error value naming the byte offset.

use alloc::string::String;
use alloc::vec::Vec;

use crate::{Limits, Map, Value};

/// Parses one JSON document (surrounding whitespace allowed) into a [`Value`].
pub(crate) fn parse(text: &str, limits: &Limits) -> Result<Value, String> {
    let mut r = Reader { s: text.as_bytes(), pos: 0, limits };
    let v = r.value(limits.effective_depth()).and_then(|v| {
        r.ws();
        if r.pos == r.s.len() { Ok(v) } else { Err("trailing characters") }
    });
    v.map_err(|what| alloc::format!("bad JSON at byte {}: {what}", r.pos))
}

struct Reader<'a> {
    s: &'a [u8],
    pos: usize,
    limits: &'a Limits,
}

type Res<T> = Result<T, &'static str>;

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// Skips whitespace, then consumes `c` if it comes next.
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        let hit = self.peek() == Some(c);
        self.pos += usize::from(hit);
        hit
    }

    fn expect(&mut self, c: u8, what: &'static str) -> Res<()> {
        if self.eat(c) { Ok(()) } else { Err(what) }
    }

    fn word(&mut self, word: &str, v: Value) -> Res<Value> {
        if self.s[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(v)
        } else {
            Err("expected a value")
        }
    }

    fn value(&mut self, depth: usize) -> Res<Value> {
        self.ws();
        let Some(c) = self.peek() else { return Err("unexpected end") };
        if matches!(c, b'[' | b'{') {
            if depth == 0 {
                return Err("nested too deeply");
            }
            self.pos += 1;
            let close = if c == b'[' { b']' } else { b'}' };
            let mut items = Vec::new();
            let mut map = Map::new();
            if !self.eat(close) {
                loop {
                    if items.len() + map.len() >= self.limits.max_collection_len {
                        return Err("too many entries");
                    }
                    if c == b'[' {
                        items.push(self.value(depth - 1)?);
                    } else {
                        self.ws();
                        let key = self.string()?;
                        self.expect(b':', "expected `:`")?;
                        map.push(key, self.value(depth - 1)?);
                    }
                    if !self.eat(b',') {
                        self.expect(close, "expected `,` or a closing bracket")?;
                        break;
                    }
                }
            }
            return Ok(if c == b'[' { Value::Array(items) } else { Value::Map(map) });
        }
        match c {
            b'"' => self.string().map(Value::from),
            b't' => self.word("true", Value::Bool(true)),
            b'f' => self.word("false", Value::Bool(false)),
            b'n' => self.word("null", Value::Nil),
            b'N' => self.word("NaN", Value::F64(f64::NAN)),
            b'I' => self.word("Infinity", Value::F64(f64::INFINITY)),
            b'-' if self.s[self.pos + 1..].starts_with(b"Infinity") => {
                self.pos += 1;
                self.word("Infinity", Value::F64(f64::NEG_INFINITY))
            }
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err("expected a value"),
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Res<Value> {
        let start = self.pos;
        self.pos += usize::from(self.peek() == Some(b'-'));
        let int_start = self.pos;
        let int_digits = self.digits();
        if int_digits == 0 || (int_digits > 1 && self.s[int_start] == b'0') {
            return Err("bad number");
        }
        let mut integral = true;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            integral = false;
            if self.digits() == 0 {
                return Err("bad number");
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            integral = false;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err("bad number");
            }
        }
        // The grammar above admits only ASCII, so this slice is valid UTF-8.
        let text = core::str::from_utf8(&self.s[start..self.pos]).map_err(|_| "bad number")?;
        if integral {
            if let Ok(u) = text.parse::<u64>() {
                return Ok(Value::from(u));
            }
            if let Ok(i) = text.parse::<i64>() {
                return Ok(Value::from(i));
            }
        }
        text.parse::<f64>().map(Value::F64).map_err(|_| "bad number")
    }

    fn hex4(&mut self) -> Res<u32> {
        let digits = self.s.get(self.pos..self.pos + 4).ok_or("bad \\u escape")?;
        let mut n = 0;
        for &d in digits {
            n = n * 16 + char::from(d).to_digit(16).ok_or("bad \\u escape")?;
        }
        self.pos += 4;
        Ok(n)
    }

    fn string(&mut self) -> Res<String> {
        if self.peek() != Some(b'"') {
            return Err("expected a string");
        }
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            if out.len() > self.limits.max_str_len {
                return Err("string too long");
            }
            let Some(c) = self.peek() else { return Err("unterminated string") };
            self.pos += 1;
            match c {
                b'"' => break,
                0..=0x1f => return Err("control character in a string"),
                b'\\' => {
                    let Some(e) = self.peek() else { return Err("unterminated string") };
                    self.pos += 1;
                    let ch = match e {
                        b'"' | b'\\' | b'/' => char::from(e),
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code =
                                if (0xd800..0xdc00).contains(&hi) && self.s[self.pos..].starts_with(b"\\u") {
                                    let save = self.pos;
                                    self.pos += 2;
                                    let lo = self.hex4()?;
                                    if (0xdc00..0xe000).contains(&lo) {
                                        0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                                    } else {
                                        self.pos = save;
                                        hi
                                    }
                                } else {
                                    hi
                                };
                            // A lone surrogate (Python allows them) has no UTF-8 form.
                            char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
                        }
                        _ => return Err("bad escape"),
                    };
                    let mut buf = [0; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                _ => out.push(c),
            }
        }
        // Raw bytes were copied whole from a `str` and escapes were encoded as UTF-8.
        String::from_utf8(out).map_err(|_| "bad UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Value, String> {
        parse(text, &Limits::default())
    }

    #[test]
    fn reads_what_python_writes() {
        let v = p(r#" {"a": [1, -2, 18446744073709551615, -9223372036854775808, 172800.0, 1e3],
                      "s": "\u00e9\"\\\/\b\f\n\r\t\ud83d\ude00", "t": true, "f": false, "n": null,
                      "x": NaN, "y": -Infinity, "a": {}} "#)
        .unwrap();
        let m = v.as_map().unwrap();
        assert_eq!(m.len(), 8, "duplicate keys are kept");
        assert_eq!(m.get("a"), Some(&Value::Map(Map::new())), "the last duplicate wins");
        let Some((_, Value::Array(a))) = m.iter().next() else { panic!("{m:?}") };
        assert_eq!(a[0], Value::from(1u64));
        assert_eq!(a[1], Value::from(-2i64));
        assert_eq!(a[2], Value::from(u64::MAX));
        assert_eq!(a[3], Value::from(i64::MIN));
        assert_eq!(a[4], Value::F64(172800.0));
        assert_eq!(a[5], Value::F64(1000.0));
        assert_eq!(m.get("s").and_then(Value::as_str), Some("é\"\\/\u{8}\u{c}\n\r\t😀"));
        assert_eq!(m.get("t"), Some(&Value::Bool(true)));
        assert_eq!(m.get("n"), Some(&Value::Nil));
        assert!(matches!(m.get("x"), Some(Value::F64(x)) if x.is_nan()));
        assert_eq!(m.get("y"), Some(&Value::F64(f64::NEG_INFINITY)));
        assert_eq!(p(r#""\ud800x""#).unwrap().as_str(), Some("\u{fffd}x"), "lone surrogate");
        assert_eq!(p("99999999999999999999").unwrap(), Value::F64(1e20), "too big for an integer");
    }

    #[test]
    fn refuses_bad_input_with_its_offset() {
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\" 1}",
            "{1: 2}",
            "01",
            "1.",
            "-",
            "1e",
            "tru",
            "\"a",
            "\"\\x\"",
            "\"\\u12\"",
            "\"\u{1}\"",
            "[1] x",
            "{\"a\":1,}",
            "-Inf",
        ] {
            let err = p(bad).expect_err(bad);
            assert!(err.starts_with("bad JSON at byte "), "{bad}: {err}");
        }
        assert_eq!(p("[1, x]").unwrap_err(), "bad JSON at byte 4: expected a value");
    }

    #[test]
    fn caps_depth_entries_and_strings() {
        let limits = Limits { max_depth: 3, max_collection_len: 2, max_str_len: 4, ..Limits::default() };
        assert!(parse("[[[1]]]", &limits).is_ok());
        assert!(parse("[[[[1]]]]", &limits).unwrap_err().contains("nested too deeply"));
        assert!(parse("[1, 2, 3]", &limits).unwrap_err().contains("too many entries"));
        assert!(parse(r#"{"a": 1, "b": 2, "c": 3}"#, &limits).unwrap_err().contains("too many entries"));
        assert!(parse(r#""abcd""#, &limits).is_ok());
        assert!(parse(r#""abcdef""#, &limits).unwrap_err().contains("string too long"));
        // Far past the depth cap: an error, not a stack overflow.
        let deep = "[".repeat(100_000);
        assert!(parse(&deep, &Limits::default()).unwrap_err().contains("nested too deeply"));
    }
}
