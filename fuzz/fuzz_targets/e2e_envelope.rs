//! The end-to-end envelope into an engine with encryption on (body: `hypha_rpc_core::fuzzing::e2e_envelope`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hypha_rpc_core::fuzzing::e2e_envelope(data));
