//! Arbitrary message_cache operations (body: `hypha_rpc_core::fuzzing::chunk_reassembly`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hypha_rpc_core::fuzzing::chunk_reassembly(data));
