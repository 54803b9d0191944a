//! Golden tests: every binary frame captured between real Python clients and a real server
//! decodes to exactly what the transcript's JSON says, and every frame a client sent
//! re-encodes to the same bytes — at the msgpack level and through the typed `_rtype` views.

use std::collections::BTreeMap;

use bytes::Bytes;
use hypha_rpc_core::codec::rtype::RType;
use hypha_rpc_core::codec::{DecodeError, Frame, decode_frame, decode_value, encode_frame};
use hypha_rpc_core::{Limits, Map, Value};
use hypha_rpc_tests::transcripts::{self, CapturedFrame, compare};

fn check_structure(f: &CapturedFrame, frame: &Frame) -> Result<(), String> {
    compare(&Value::Map(frame.main.clone()), &f.json["main"], "main")?;
    match (&frame.extra, f.json.get("extra")) {
        (None, None) => {}
        (Some(extra), Some(j)) => compare(&Value::Map(extra.clone()), j, "extra")?,
        (a, b) => {
            return Err(format!("extra present in decode: {}, in transcript: {}", a.is_some(), b.is_some()));
        }
    }
    let objects = f.json["msgpack_objects"].as_u64().unwrap_or(0);
    if objects != 1 + frame.extra.is_some() as u64 {
        return Err(format!("transcript says {objects} msgpack objects"));
    }
    Ok(())
}

/// Replaces every typed map in `v` by its typed view re-encoded, counting them.
fn retype(v: &Value, count: &mut usize) -> Result<Value, String> {
    Ok(match v {
        Value::Array(a) => Value::Array(a.iter().map(|x| retype(x, count)).collect::<Result<_, _>>()?),
        Value::Map(m) => {
            let inner: Map = m
                .iter()
                .map(|(k, x)| Ok((k.clone(), retype(x, count)?)))
                .collect::<Result<Vec<_>, String>>()?
                .into();
            let inner = Value::Map(inner);
            match RType::from_value(&inner) {
                None => inner,
                Some(Ok(t)) => {
                    *count += 1;
                    t.to_value()
                }
                Some(Err(e)) => return Err(format!("typed view failed: {e}")),
            }
        }
        other => other.clone(),
    })
}

#[derive(Default)]
struct Counts {
    structural: usize,
    byte_exact: usize,
    typed_maps: usize,
    truncated_rejected: usize,
    truncated_main: usize,
    prefixes_rejected: usize,
    reassembled: usize,
}

/// Cuts `bytes` at up to 48 points and checks every prefix is refused cleanly.
fn prefixes_fail_cleanly(bytes: &[u8], limits: &Limits) -> Result<usize, String> {
    let step = (bytes.len() / 48).max(1);
    let mut n = 0;
    for cut in (1..bytes.len()).step_by(step) {
        match decode_frame(&Bytes::copy_from_slice(&bytes[..cut]), limits) {
            // A cut exactly between main and extra is a valid one-object frame.
            Ok(f) if f.extra.is_none() => {}
            Ok(_) => return Err(format!("prefix of {cut} bytes decoded as a two-object frame")),
            Err(DecodeError::Truncated { .. }) => n += 1,
            Err(e) => return Err(format!("prefix of {cut} bytes: unexpected error {e}")),
        }
    }
    Ok(n)
}

#[test]
fn every_transcript_frame_decodes_and_matches() {
    let limits = Limits::default();
    let frames = transcripts::load_all();
    let mut c = Counts::default();
    let mut failures = Vec::new();
    // Chunks seen per (scenario, key): index -> bytes, to rebuild `message_cache.process` targets.
    let mut chunks: BTreeMap<(String, String), BTreeMap<u64, Bytes>> = BTreeMap::new();

    for f in frames.iter().filter(|f| f.kind == "binary") {
        let bytes = Bytes::from(f.bytes.clone());
        if f.truncated {
            assert!(bytes.len() < f.len, "{}: marked truncated but complete", f.label());
            match decode_frame(&bytes, &limits) {
                Err(DecodeError::Truncated { .. }) => c.truncated_rejected += 1,
                other => failures.push(format!("{}: truncated frame gave {other:?}", f.label())),
            }
            // The stored prefix still holds the whole `main` object: check it on its own.
            match decode_value(&bytes, &limits) {
                Ok((main, _)) => match compare(&main, &f.json["main"], "main") {
                    Ok(()) => c.truncated_main += 1,
                    Err(e) => failures.push(format!("{}: {e}", f.label())),
                },
                Err(e) => failures.push(format!("{}: main of truncated frame: {e}", f.label())),
            }
            continue;
        }
        assert_eq!(bytes.len(), f.len, "{}: length", f.label());
        let frame = match decode_frame(&bytes, &limits) {
            Ok(fr) => fr,
            Err(e) => {
                failures.push(format!("{}: {e}", f.label()));
                continue;
            }
        };
        match check_structure(f, &frame) {
            Ok(()) => c.structural += 1,
            Err(e) => failures.push(format!("{}: {e}", f.label())),
        }
        match prefixes_fail_cleanly(&bytes, &limits) {
            Ok(n) => c.prefixes_rejected += n,
            Err(e) => failures.push(format!("{}: {e}", f.label())),
        }
        if f.dir == "c2s" {
            // Frames the Python client wrote: our encoder must reproduce them exactly, both from
            // the raw value tree and after lifting every `_rtype` map into its typed view.
            if encode_frame(&frame)[..] == bytes[..] {
                c.byte_exact += 1;
            } else {
                failures.push(format!("{}: re-encoding differs", f.label()));
            }
            let mut typed = 0;
            let retyped = retype(&Value::Map(frame.main.clone()), &mut typed).and_then(|main| {
                let extra =
                    frame.extra.as_ref().map(|e| retype(&Value::Map(e.clone()), &mut typed)).transpose()?;
                let as_map = |v: Value| match v {
                    Value::Map(m) => m,
                    _ => unreachable!(),
                };
                Ok(Frame { main: as_map(main), extra: extra.map(as_map) })
            });
            match retyped {
                Ok(rf) if encode_frame(&rf)[..] == bytes[..] => c.typed_maps += typed,
                Ok(_) => failures.push(format!("{}: typed re-encoding differs", f.label())),
                Err(e) => failures.push(format!("{}: {e}", f.label())),
            }
            // Collect chunk uploads and check reassembled messages against the transcript.
            let method = frame.main_str("method").unwrap_or_default();
            let args = frame.extra.as_ref().and_then(|e| e.get("args")).and_then(Value::as_array);
            if method.ends_with("message_cache.set") {
                if let Some([Value::Str(key), idx, Value::Bin(data), ..]) = args {
                    chunks
                        .entry((f.scenario.clone(), key.to_string()))
                        .or_default()
                        .insert(idx.as_u64().unwrap(), data.clone());
                }
            }
            if let (true, Some([Value::Str(key), ..])) = (method.ends_with("message_cache.process"), args) {
                if let Some(parts) = chunks.remove(&(f.scenario.clone(), key.to_string())) {
                    let whole: Vec<u8> = parts.values().flat_map(|b| b.iter().copied()).collect();
                    let want = &f.json["reassembled"];
                    match decode_frame(&Bytes::from(whole), &limits) {
                        Ok(r) => {
                            let got = Value::Array(vec![
                                Value::Map(r.main),
                                Value::Map(r.extra.unwrap_or_default()),
                            ]);
                            match compare(&got, want, "reassembled") {
                                Ok(()) => c.reassembled += 1,
                                Err(e) => failures.push(format!("{}: {e}", f.label())),
                            }
                        }
                        Err(e) => failures.push(format!("{}: reassembled message: {e}", f.label())),
                    }
                }
            }
        }
    }

    let binary = frames.iter().filter(|f| f.kind == "binary").count();
    println!(
        "golden: {binary} binary frames; {} decoded and matched their JSON structurally; {} c2s frames \
         re-encoded byte-exact; {} typed _rtype maps round-tripped inside them; {} truncated frames \
         rejected cleanly (their `main` matched: {}); {} cut prefixes rejected cleanly; {} chunked messages reassembled and matched",
        c.structural,
        c.byte_exact,
        c.typed_maps,
        c.truncated_rejected,
        c.truncated_main,
        c.prefixes_rejected,
        c.reassembled
    );
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    let complete = frames.iter().filter(|f| f.kind == "binary" && !f.truncated).count();
    assert_eq!(c.structural, complete);
    assert_eq!(
        c.byte_exact,
        frames.iter().filter(|f| f.kind == "binary" && !f.truncated && f.dir == "c2s").count()
    );
    assert_eq!(c.truncated_main, c.truncated_rejected);
    assert!(c.truncated_rejected > 0 && c.reassembled >= 2 && c.typed_maps > 50, "the transcripts shrank?");
}

/// Every built-in `_rtype` seen in the transcripts parses into its own variant, not `Custom`.
#[test]
fn transcript_rtypes_are_recognised() {
    let limits = Limits::default();
    let mut seen = BTreeMap::<String, usize>::new();
    fn walk(v: &Value, seen: &mut BTreeMap<String, usize>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| walk(x, seen)),
            Value::Map(m) => {
                if let Some(Ok(t)) = RType::from_value(v) {
                    assert!(!matches!(t, RType::Custom { .. }), "unrecognised {}", t.name());
                    *seen.entry(t.name().to_string()).or_default() += 1;
                }
                m.values().for_each(|x| walk(x, seen));
            }
            _ => {}
        }
    }
    for f in transcripts::load_all().iter().filter(|f| f.kind == "binary" && !f.truncated) {
        let frame = decode_frame(&Bytes::from(f.bytes.clone()), &limits).unwrap();
        walk(&Value::Map(frame.merged()), &mut seen);
    }
    println!("typed maps by _rtype: {seen:?}");
    for name in ["method", "generator", "stop_iteration", "ndarray", "error"] {
        assert!(seen.contains_key(name), "no {name} in transcripts");
    }
}
