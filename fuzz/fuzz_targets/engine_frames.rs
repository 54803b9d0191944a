//! Arbitrary frames into a connected engine (body: `hypha_rpc_core::fuzzing::engine_frames`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hypha_rpc_core::fuzzing::engine_frames(data));
