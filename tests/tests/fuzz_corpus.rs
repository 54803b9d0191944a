//! Replays the committed fuzz corpus (and any saved crash inputs) through the fuzz target
//! bodies on stable, so every `cargo test` re-checks what fuzzing once found.

use std::path::Path;

type Body = fn(&[u8]);

const TARGETS: &[(&str, Body)] = &[
    ("frame_decode", hypha_rpc_core::fuzzing::frame_decode),
    ("engine_frames", hypha_rpc_core::fuzzing::engine_frames),
    ("chunk_reassembly", hypha_rpc_core::fuzzing::chunk_reassembly),
    ("e2e_envelope", hypha_rpc_core::fuzzing::e2e_envelope),
    ("json_text", hypha_rpc_core::fuzzing::json_text),
];

#[test]
fn replay_fuzz_corpus_and_regressions() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (name, body) in TARGETS {
        let mut n = 0;
        for dir in ["corpus", "regressions", "artifacts"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(name)) else { continue };
            for e in entries {
                let path = e.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let r = std::panic::catch_unwind(|| body(&data));
                assert!(r.is_ok(), "{name}: {} panicked", path.display());
                n += 1;
            }
        }
        println!("fuzz replay: {name}: {n} inputs");
        assert!(n > 0, "{name}: empty corpus");
    }
}
