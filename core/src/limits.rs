//! Every cap on untrusted input, in one place, so a deployment tunes them together.
//!
//! Defaults follow the real peers: 16 MiB frames (the server's limit), and per-object caps
//! generous enough for anything a Python or JS `hypha-rpc` client sends.

use core::time::Duration;

/// Caps applied to everything a peer can send. Breaking one is an error value, never a panic
/// and never an allocation sized by the peer's claim.
///
/// ```
/// use hypha_rpc_core::Limits;
/// let mut limits = Limits::default();
/// limits.max_depth = 32;
/// assert_eq!(limits.max_frame_bytes, 16 * 1024 * 1024);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest binary frame accepted, in bytes. Default 16 MiB, the server's own cap.
    pub max_frame_bytes: usize,
    /// Deepest nesting of arrays and maps. Default 128. Values above
    /// [`Limits::DEPTH_CEILING`] are treated as the ceiling, since decoding recurses.
    pub max_depth: usize,
    /// Most elements in one array, or entries in one map. Default 1 048 576.
    pub max_collection_len: usize,
    /// Longest string, in bytes. Default 16 MiB.
    pub max_str_len: usize,
    /// Longest binary or ext payload, in bytes. Default 16 MiB.
    pub max_bin_len: usize,
    /// Most calls waiting for a reply at once. User calls beyond it are refused; the engine's
    /// own registration calls (built-in, subscription, one per service, the registration
    /// check) still go out, so they may exceed it by that handful. Default 10 000.
    pub max_pending_calls: usize,
    /// Most incoming calls being served at once; more are rejected. Default 1024.
    pub max_active_invocations: usize,
    /// Most frames held while the connection is down. Default 1024.
    pub max_queued_frames: usize,
    /// Shortest heartbeat interval we honour, whatever `t` a caller asks for (a `t` of 0
    /// must not make us flood the server's rate limit). Default 0.5 s.
    pub min_heartbeat_interval: Duration,
    /// Largest message reassembled from chunks. Default 256 MiB.
    pub max_message_bytes: usize,
    /// Most bytes held by all partial messages together. Default 512 MiB.
    pub max_reassembly_bytes: usize,
    /// Most chunks in one message (chunk indices above are refused). Default 65 536.
    pub max_chunks_per_message: usize,
    /// Most chunks of one message held ahead of a missing one. Senders upload a few chunks at
    /// a time (Python's `hypha-rpc` up to 30), so only a hostile peer comes near it. Default 1024.
    pub max_waiting_chunks: usize,
    /// Most messages being uploaded to us at once. Default 64.
    pub max_partial_messages: usize,
    /// A partial message with no new chunk for this long is dropped (its sender vanished).
    /// Default 120 s.
    pub partial_message_expiry: Duration,
    /// Most sessions holding functions or generators we returned. Default 1024.
    pub max_exports: usize,
    /// Returned functions and generators nobody called for this long are dropped (Python's
    /// session GC uses 600 s). Default 600 s.
    pub export_idle_expiry: Duration,
    /// Most live `_rintf` interfaces we sent. Default 1024.
    pub max_interfaces: usize,
    /// Most local generators peers can pull from at once. Default 1024.
    pub max_generators: usize,
}

impl Limits {
    /// Hard upper bound on nesting depth, whatever `max_depth` says: decoding recurses once
    /// per level, and this keeps the stack use of a hostile frame small and fixed.
    pub const DEPTH_CEILING: usize = 512;

    /// The nesting cap in force: `max_depth`, clamped to [`Limits::DEPTH_CEILING`].
    pub fn effective_depth(&self) -> usize {
        self.max_depth.min(Self::DEPTH_CEILING)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 16 * 1024 * 1024,
            max_depth: 128,
            max_collection_len: 1 << 20,
            max_str_len: 16 * 1024 * 1024,
            max_bin_len: 16 * 1024 * 1024,
            max_pending_calls: 10_000,
            max_active_invocations: 1024,
            max_queued_frames: 1024,
            min_heartbeat_interval: Duration::from_millis(500),
            max_message_bytes: 256 * 1024 * 1024,
            max_reassembly_bytes: 512 * 1024 * 1024,
            max_chunks_per_message: 65_536,
            max_waiting_chunks: 1024,
            max_partial_messages: 64,
            partial_message_expiry: Duration::from_secs(120),
            max_exports: 1024,
            export_idle_expiry: Duration::from_secs(600),
            max_interfaces: 1024,
            max_generators: 1024,
        }
    }
}
