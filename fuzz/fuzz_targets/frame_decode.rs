//! Arbitrary bytes as a binary RPC frame (body: `hypha_rpc_core::fuzzing::frame_decode`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hypha_rpc_core::fuzzing::frame_decode(data));
