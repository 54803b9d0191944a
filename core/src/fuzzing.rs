//! Fuzz target bodies, shared by `fuzz/` (libFuzzer) and the stable corpus replay in `cargo test`.
//!
//! Compiled only with the `fuzzing` feature. Each body may panic: a panic is the finding.

use crate::codec::rtype::RType;
use crate::codec::{decode_frame, decode_frame_slice, encode_frame, to_vec};
use crate::{Limits, Value};

/// Any bytes as a binary frame: decoding must not panic, and whatever decodes must re-encode
/// to bytes that decode to the same frame, with every typed `_rtype` view stable.
pub fn frame_decode(data: &[u8]) {
    let limits = Limits::default();
    let Ok(frame) = decode_frame_slice(data, &limits) else { return };
    let once = encode_frame(&frame);
    let back = decode_frame(&once, &limits).expect("our own encoding must decode");
    // Compare bytes, not values: NaN != NaN.
    assert_eq!(encode_frame(&back), once, "re-encoding is not stable");
    check_typed(&crate::Value::Map(frame.main));
    if let Some(extra) = frame.extra {
        check_typed(&Value::Map(extra));
    }
}

fn check_typed(v: &Value) {
    match v {
        Value::Array(a) => a.iter().for_each(check_typed),
        Value::Map(m) => {
            if let Some(Ok(t)) = RType::from_value(v) {
                let first = to_vec(&t.to_value());
                let again = RType::from_value(&t.to_value())
                    .expect("still typed")
                    .expect("our own typed encoding must parse");
                assert_eq!(to_vec(&again.to_value()), first, "typed view of {} is not stable", t.name());
            }
            m.iter().for_each(|(k, x)| {
                check_typed(k);
                check_typed(x);
            });
        }
        _ => {}
    }
}
