//! Shared helpers for the test suites: transcripts, the real server, allocation counting.
pub mod transcripts;
pub mod payloads;
pub mod server;
