//! Shared helpers for the test suites: transcripts, the real server, allocation counting.
pub mod drive;
pub mod hostile;
pub mod hub;
pub mod payloads;
pub mod pypeer;
pub mod rtc;
pub mod server;
pub mod sim;
pub mod transcripts;
pub mod workload;
pub mod ws_driver;
