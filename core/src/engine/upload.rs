//! Large outgoing messages: cutting a frame into chunks and uploading it through the
//! receiver's `message_cache` (create, set with a bounded window, process).

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChunkStep {
    Create,
    Set(usize),
    Process,
    Remove,
}

/// A large message we are uploading to a peer's `message_cache` (PROTOCOL.md §7.2).
#[derive(Debug)]
pub(super) struct Upload {
    /// The receiver, `ws/client`.
    pub(super) target: String,
    /// The cache key: the receiver's session for replies, a fresh id otherwise.
    pub(super) key: String,
    /// `true` for replies: each step also counts as a heartbeat of the receiver's call.
    pub(super) heartbeat: bool,
    /// The whole frame.
    pub(super) data: Bytes,
    pub(super) chunk: usize,
    /// Next chunk index to send, and chunks acknowledged.
    pub(super) next: usize,
    pub(super) acked: usize,
    /// The session of our call this message is, if it is one.
    pub(super) call_session: Option<String>,
}

impl Upload {
    fn chunks(&self) -> usize {
        self.data.len().div_ceil(self.chunk)
    }
}

/// Chunk uploads in flight per message, as the Python client does.
pub(super) const UPLOAD_WINDOW: usize = 30;

impl Engine {
    /// Sends a reply frame, through the caller's `message_cache` when it is large (keyed by the
    /// caller's session, with `heartbeat` so the upload keeps its call alive).
    pub(super) fn send_reply(
        &mut self,
        now: Instant,
        to: String,
        session: Option<String>,
        bytes: Bytes,
    ) -> Result<(), EngineError> {
        if bytes.len() <= self.chunk_threshold() {
            return self.send(bytes);
        }
        let (key, heartbeat) = match session {
            Some(s) => (s, true),
            None => (self.rng.short_id(), false),
        };
        self.start_upload(now, to, key, heartbeat, bytes, None)
    }

    /// Frames longer than this go through the receiver's `message_cache`.
    pub(super) fn chunk_threshold(&self) -> usize {
        self.chunk_size() + 1024
    }

    /// The chunk size in force: the configured one, kept below the transport's message limit
    /// (and so below the 524 288-byte object limit of a Python receiver at the default).
    pub(super) fn chunk_size(&self) -> usize {
        self.config.chunk_size.min(self.config.transport_max_message.saturating_sub(2048)).max(1024)
    }

    /// Starts uploading `data` to `target` under `key`: create, then sets, then process.
    pub(super) fn start_upload(
        &mut self,
        now: Instant,
        target: String,
        key: String,
        heartbeat: bool,
        data: Bytes,
        call_session: Option<String>,
    ) -> Result<(), EngineError> {
        self.next_upload += 1;
        let id = self.next_upload;
        let chunk = self.chunk_size();
        self.uploads
            .insert(id, Upload { target, key, heartbeat, data, chunk, next: 0, acked: 0, call_session });
        let started = self.upload_step(now, id, ChunkStep::Create);
        if started.is_err() {
            self.uploads.remove(&id);
        }
        started
    }

    /// Sends one step of upload `id` as a call of the receiver's `built-in.message_cache`.
    pub(super) fn upload_step(&mut self, now: Instant, id: u64, step: ChunkStep) -> Result<(), EngineError> {
        let Some(u) = self.uploads.get(&id) else { return Ok(()) };
        let (name, args): (&str, Vec<Value>) = match step {
            ChunkStep::Create => ("create", vec![u.key.as_str().into(), u.heartbeat.into()]),
            ChunkStep::Set(i) => {
                let end = ((i + 1) * u.chunk).min(u.data.len());
                let part = u.data.slice(i * u.chunk..end);
                ("set", vec![u.key.as_str().into(), i.into(), Value::Bin(part), u.heartbeat.into()])
            }
            ChunkStep::Process => ("process", vec![u.key.as_str().into(), u.heartbeat.into()]),
            ChunkStep::Remove => ("remove", vec![u.key.as_str().into()]),
        };
        let target = Method {
            target: u.target.clone(),
            method: format!("services.built-in.message_cache.{name}"),
            promise: Some(PromiseMode::Compact),
            ..Method::default()
        };
        let internal = Some(Internal::Chunk { upload: id, step });
        self.call_inner(now, &target, args, None, CallOptions::default(), internal).map(|_| ())
    }

    /// One step of an upload settled: send the next ones, or finish, or give up.
    pub(super) fn upload_progress(
        &mut self,
        now: Instant,
        id: u64,
        step: ChunkStep,
        result: Result<Value, CallError>,
    ) {
        if step == ChunkStep::Remove {
            return;
        }
        let Some(u) = self.uploads.get_mut(&id) else { return };
        if let Err(error) = result {
            // Best effort: free the receiver's buffer, then fail the call this message was.
            let call = u.call_session.take();
            let _ = self.upload_step(now, id, ChunkStep::Remove);
            self.uploads.remove(&id);
            if let Some(s) = call {
                self.settle(now, s, Err(error));
            }
            return;
        }
        // Progress keeps our own call alive while its request is still uploading.
        if let Some(s) = u.call_session.clone() {
            self.touch_session(now, &s, true);
        }
        let Some(u) = self.uploads.get_mut(&id) else { return };
        let mut next = Vec::new();
        match step {
            ChunkStep::Create | ChunkStep::Set(_) => {
                if matches!(step, ChunkStep::Set(_)) {
                    u.acked += 1;
                }
                let total = u.chunks();
                while u.next < total && u.next - u.acked < UPLOAD_WINDOW {
                    next.push(ChunkStep::Set(u.next));
                    u.next += 1;
                }
                if u.acked == total {
                    next.push(ChunkStep::Process);
                }
            }
            ChunkStep::Process => {
                self.uploads.remove(&id);
            }
            ChunkStep::Remove => {}
        }
        for step in next {
            if let Err(e) = self.upload_step(now, id, step) {
                let call = self.uploads.remove(&id).and_then(|u| u.call_session);
                if let Some(s) = call {
                    self.settle(now, s, Err(CallError::BadReply(format!("could not send a chunk: {e}"))));
                }
                return;
            }
        }
    }
}
