//! Loads the captured wire transcripts in `shared/protocol/transcripts/` and compares decoded
//! values with their JSON rendering, so every test reads the golden frames the same way.

use std::fs;
use std::path::{Path, PathBuf};

use hypha_rpc_core::Value;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

/// The transcripts folder: `$HYPHA_TRANSCRIPTS`, else `<workspace>/../shared/protocol/transcripts`.
///
/// Panics with a clear message when it is missing: the golden tests must never pass vacuously.
pub fn dir() -> PathBuf {
    if let Ok(d) = std::env::var("HYPHA_TRANSCRIPTS") {
        return PathBuf::from(d);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let d = root.join("../shared/protocol/transcripts");
    assert!(d.is_dir(), "transcripts not found at {} (set HYPHA_TRANSCRIPTS)", d.display());
    d
}

/// One captured frame with its raw bytes.
#[derive(Debug, Clone)]
pub struct CapturedFrame {
    /// Scenario name (file stem).
    pub scenario: String,
    /// Sequence number in the scenario.
    pub seq: u64,
    /// `"c2s"` or `"s2c"`.
    pub dir: String,
    /// `"text"`, `"binary"` or `"close"`.
    pub kind: String,
    /// Full length of the frame on the wire.
    pub len: usize,
    /// Whether `bytes` holds only a prefix of the frame.
    pub truncated: bool,
    /// The stored bytes.
    pub bytes: Vec<u8>,
    /// The JSON rendering of this frame from `<scenario>.json`.
    pub json: Json,
}

impl CapturedFrame {
    /// `scenario#seq`, for messages.
    pub fn label(&self) -> String {
        format!("{}#{} ({} {})", self.scenario, self.seq, self.dir, self.kind)
    }
}

/// Every frame of every scenario, in scenario then sequence order.
pub fn load_all() -> Vec<CapturedFrame> {
    let d = dir();
    let mut scenarios: Vec<_> = fs::read_dir(&d)
        .expect("read transcripts dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    scenarios.sort();
    let mut out = Vec::new();
    for path in scenarios {
        let scenario = path.file_stem().unwrap().to_string_lossy().into_owned();
        let doc: Json = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        let index: Json =
            serde_json::from_slice(&fs::read(d.join(&scenario).join("index.json")).unwrap()).unwrap();
        for (frame, entry) in doc["frames"].as_array().unwrap().iter().zip(index.as_array().unwrap()) {
            assert_eq!(frame["seq"], entry["seq"], "{scenario}: index and transcript disagree");
            // Close frames have no file.
            let bytes = match entry["file"].as_str() {
                Some(file) => fs::read(d.join(&scenario).join(file)).unwrap(),
                None => Vec::new(),
            };
            let truncated = entry["truncated"].as_bool().unwrap_or(false);
            if !truncated {
                let sha = hex(&Sha256::digest(&bytes));
                assert_eq!(Some(sha.as_str()), entry["sha256"].as_str(), "{scenario}: {} is corrupt", entry);
            }
            out.push(CapturedFrame {
                scenario: scenario.clone(),
                seq: frame["seq"].as_u64().unwrap(),
                dir: frame["dir"].as_str().unwrap().into(),
                kind: frame["kind"].as_str().unwrap().into(),
                len: entry["len"].as_u64().unwrap() as usize,
                truncated,
                bytes,
                json: frame.clone(),
            });
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Compares a decoded value with the transcript's JSON rendering of it; `Err` says where they
/// differ. Maps must match in key order too. Binaries are rendered as `{"bin": hex}` up to 64
/// bytes and as `{"bin_len", "head", "sha256"}` above.
pub fn compare(v: &Value, j: &Json, path: &str) -> Result<(), String> {
    let bad = || Err(format!("{path}: decoded {v:?} but transcript has {j}"));
    match (v, j) {
        (Value::Nil, Json::Null) => Ok(()),
        (Value::Bool(a), Json::Bool(b)) if a == b => Ok(()),
        (Value::Integer(i), Json::Number(n)) if n.is_i64() || n.is_u64() => {
            if i.as_i64().map(|x| Some(x) == n.as_i64()).unwrap_or(false) || i.as_u64() == n.as_u64() {
                Ok(())
            } else {
                bad()
            }
        }
        (Value::F64(f), Json::Number(n)) if n.is_f64() && n.as_f64() == Some(*f) => Ok(()),
        (Value::F32(f), Json::Number(n)) if n.as_f64() == Some(f64::from(*f)) => Ok(()),
        (Value::Str(s), Json::String(t)) if s == t => Ok(()),
        (Value::Bin(b), Json::Object(o)) => {
            if let Some(h) = o.get("bin").and_then(Json::as_str) {
                return if hex(b) == h { Ok(()) } else { bad() };
            }
            let len_ok = o.get("bin_len").and_then(Json::as_u64) == Some(b.len() as u64);
            let head_ok = o.get("head").and_then(Json::as_str) == Some(&hex(&b[..b.len().min(32)]));
            let sha_ok = o.get("sha256").and_then(Json::as_str) == Some(&hex(&Sha256::digest(b)));
            if len_ok && head_ok && sha_ok { Ok(()) } else { bad() }
        }
        (Value::Array(a), Json::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                compare(x, y, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (Value::Map(m), Json::Object(o)) if m.len() == o.len() => {
            for ((k, x), (jk, y)) in m.iter().zip(o) {
                if k.as_str() != Some(jk.as_str()) {
                    return Err(format!("{path}: key {k:?} where transcript has {jk:?}"));
                }
                compare(x, y, &format!("{path}.{jk}"))?;
            }
            Ok(())
        }
        _ => bad(),
    }
}
