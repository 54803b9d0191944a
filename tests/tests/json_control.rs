//! The engine's own JSON reader (for the server's text control messages) against serde_json:
//! whatever serde_json reads, ours reads to the same value; whatever only ours reads is one of
//! the extensions Python's `json` module also reads (`NaN`, `Infinity`, lone surrogates,
//! numbers beyond f64).

use hypha_rpc_core::fuzzing::json_parse;
use hypha_rpc_core::{Limits, Value};
use proptest::prelude::*;
use serde_json::Value as Json;

/// A value in a form both sides can be compared in: maps with their duplicate keys resolved
/// (last wins, as lookups on both sides see it) and sorted.
#[derive(Debug, PartialEq)]
enum Canon {
    Null,
    Bool(bool),
    Int(i128),
    Float(u64),
    Str(String),
    List(Vec<Canon>),
    Map(Vec<(String, Canon)>),
}

fn resolve(pairs: Vec<(String, Canon)>) -> Canon {
    let mut out: Vec<(String, Canon)> = Vec::new();
    for (k, v) in pairs {
        out.retain(|(seen, _)| *seen != k);
        out.push((k, v));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Canon::Map(out)
}

/// serde_json reads `-0` as the float -0.0; we read it as the integer 0, as Python does. Both
/// sides map -0.0 to 0 so that the difference does not count.
fn float(x: f64) -> Canon {
    if x == 0.0 && x.is_sign_negative() { Canon::Int(0) } else { Canon::Float(x.to_bits()) }
}

fn ours(v: &Value) -> Canon {
    match v {
        Value::Nil => Canon::Null,
        Value::Bool(b) => Canon::Bool(*b),
        Value::Integer(i) => Canon::Int(i.as_u64().map_or_else(|| i.as_i64().unwrap().into(), i128::from)),
        Value::F64(x) => float(*x),
        Value::Str(s) => Canon::Str(s.as_str().into()),
        Value::Array(a) => Canon::List(a.iter().map(ours).collect()),
        Value::Map(m) => resolve(m.iter().map(|(k, v)| (k.as_str().unwrap().into(), ours(v))).collect()),
        other => panic!("JSON never yields {other:?}"),
    }
}

fn theirs(v: &Json) -> Canon {
    match v {
        Json::Null => Canon::Null,
        Json::Bool(b) => Canon::Bool(*b),
        Json::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Canon::Int(u.into()),
            (_, Some(i)) => Canon::Int(i.into()),
            _ => float(n.as_f64().unwrap()),
        },
        Json::String(s) => Canon::Str(s.clone()),
        Json::Array(a) => Canon::List(a.iter().map(theirs).collect()),
        Json::Object(o) => resolve(o.iter().map(|(k, v)| (k.clone(), theirs(v))).collect()),
    }
}

fn json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<u64>().prop_map(Json::from),
        any::<i64>().prop_map(Json::from),
        any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(Json::from),
        "\\PC{0,12}".prop_map(Json::String),
        "[\u{0}-\u{1f}\"\\\\/\u{7f}-\u{10ffff}]{0,6}".prop_map(Json::String),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
            prop::collection::vec(("[a-z\u{e9}\"]{0,4}", inner), 0..6)
                .prop_map(|kv| Json::Object(kv.into_iter().collect())),
        ]
    })
}

/// Text that is often almost JSON: pieces of real messages glued in random order.
fn near_json() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(",".to_string()),
        Just(":".to_string()),
        Just(" ".to_string()),
        Just("\"type\"".to_string()),
        Just("\"a\\u00e9\\n\"".to_string()),
        Just("\"\\ud83d\\ude00\"".to_string()),
        Just("\"\\ud800\"".to_string()),
        Just("\"\\x\"".to_string()),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("NaN".to_string()),
        Just("-Infinity".to_string()),
        Just("1e400".to_string()),
        Just("01".to_string()),
        Just("-0.5e+3".to_string()),
        Just("18446744073709551616".to_string()),
        "-?[0-9]{1,4}(\\.[0-9]{0,2})?([eE][+-]?[0-9]{0,2})?",
        // Past u64 and f64's exact integers: the float must be correctly rounded.
        "-?[1-9][0-9]{16,22}(\\.[0-9]{1,20})?",
        "\"[a-z\\\\]{0,3}\"",
    ];
    prop::collection::vec(piece, 1..12).prop_map(|p| p.concat())
}

/// A number beyond f64 (`1e400`): Python reads it as infinity, serde_json refuses it.
fn overflowed(v: &Value) -> bool {
    match v {
        Value::F64(x) => x.is_infinite(),
        Value::Array(a) => a.iter().any(overflowed),
        Value::Map(m) => m.iter().any(|(_, v)| overflowed(v)),
        _ => false,
    }
}

fn check(text: &str) -> Result<(), TestCaseError> {
    let mine = json_parse(text, &Limits::default());
    match serde_json::from_str::<Json>(text) {
        Ok(v) => {
            let mine =
                mine.map_err(|e| TestCaseError::fail(format!("{text:?}: serde_json reads it, we say {e}")))?;
            prop_assert_eq!(ours(&mine), theirs(&v), "{:?}", text);
        }
        Err(_) => {
            if let Ok(v) = mine {
                let extension = [
                    "NaN", "Infinity", "\\ud8", "\\ud9", "\\uda", "\\udb", "\\udc", "\\udd", "\\ude", "\\udf",
                ]
                .iter()
                .any(|x| text.contains(x))
                    || overflowed(&v);
                prop_assert!(extension, "we read {:?}, which serde_json refuses", text);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn reads_what_serde_json_writes(v in json()) {
        for text in [serde_json::to_string(&v).unwrap(), serde_json::to_string_pretty(&v).unwrap()] {
            let mine = json_parse(&text, &Limits::default())
                .map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
            prop_assert_eq!(ours(&mine), theirs(&v));
        }
    }

    #[test]
    fn accepts_what_serde_json_accepts(text in near_json()) {
        check(&text)?;
    }
}

/// The `json_text` fuzz corpus: the server's control messages from the transcripts, and
/// what fuzzing grew from them (read as the fuzz body reads bytes: invalid UTF-8 replaced).
#[test]
fn fuzz_corpus_agrees_with_serde_json() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/json_text");
    let (mut n, mut transcripts) = (0, 0);
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        check(&String::from_utf8_lossy(&bytes)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        n += 1;
        transcripts += usize::from(path.to_string_lossy().ends_with(".bin"));
    }
    assert!(transcripts >= 5, "only {transcripts} transcript messages");
    println!("{n} corpus inputs agree");
}
