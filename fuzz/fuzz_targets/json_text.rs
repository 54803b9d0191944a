//! Arbitrary text as a server control message (body: `hypha_rpc_core::fuzzing::json_text`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hypha_rpc_core::fuzzing::json_text(data));
