//! Consuming a remote generator with several pulls in flight while still delivering items in
//! order, and staying correct against producers that refuse concurrent pulls.
//!
//! A Python producer serves each `next` call as its own task: a sync generator answers pulls
//! one after the other in arrival order, but an async generator that is suspended refuses a
//! second pull with "asynchronous generator is already running". Such a refused pull consumed
//! nothing, so dropping it keeps the sequence intact; the reader then falls back to one pull
//! at a time.

use alloc::collections::VecDeque;

use crate::vecmap::VecMap;

use crate::codec::rtype::Generator;
use crate::engine::is_stop_iteration;
use crate::error::{CallError, EngineError};
use crate::event::CallId;
use crate::time::Instant;
use crate::{Engine, Value};

/// Pulls items of one remote generator, up to `prefetch` at a time, in order.
///
/// Drive it with the engine: [`GeneratorReader::pump`] issues pulls, every
/// [`Event::CallSettled`](crate::Event::CallSettled) goes to
/// [`GeneratorReader::handle_settled`], and [`GeneratorReader::poll_item`] yields items in
/// order. When the consumer stops before the end it should call
/// [`GeneratorReader::close`] so the producer frees the generator.
#[derive(Debug)]
pub struct GeneratorReader {
    generator: Generator,
    window: usize,
    in_flight: VecDeque<CallId>,
    ready: VecMap<CallId, Result<Value, CallError>>,
    finished: bool,
}

impl GeneratorReader {
    /// A reader with up to `prefetch` pulls in flight (at least 1).
    pub fn new(generator: Generator, prefetch: usize) -> Self {
        GeneratorReader {
            generator,
            window: prefetch.max(1),
            in_flight: VecDeque::new(),
            ready: VecMap::new(),
            finished: false,
        }
    }

    /// `true` once the producer signalled the end (or the reader was closed).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Pulls currently in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The pulls in flight, oldest first (their [`Event::CallSettled`](crate::Event::CallSettled)
    /// belong to this reader).
    pub fn in_flight_ids(&self) -> impl Iterator<Item = CallId> + '_ {
        self.in_flight.iter().copied()
    }

    /// Issues pulls until `prefetch` are in flight.
    pub fn pump(&mut self, engine: &mut Engine, now: Instant) -> Result<(), EngineError> {
        while !self.finished && self.in_flight.len() < self.window {
            let id = engine.generator_next(now, &self.generator)?;
            self.in_flight.push_back(id);
        }
        Ok(())
    }

    /// Offers a settled call; returns `true` if it was one of this reader's pulls.
    pub fn handle_settled(&mut self, id: CallId, result: Result<Value, CallError>) -> bool {
        if !self.in_flight.contains(&id) {
            return false;
        }
        if self.finished {
            // A pull that raced past the end: its answer means nothing.
            self.in_flight.retain(|c| *c != id);
        } else {
            self.ready.insert(id, result);
        }
        true
    }

    /// The next item in order: `Some(Ok(item))`, `Some(Err(e))` for an error the producer
    /// raised, or `None` when the next answer has not arrived (or the generator ended).
    pub fn poll_item(&mut self) -> Option<Result<Value, CallError>> {
        loop {
            let front = *self.in_flight.front()?;
            let result = self.ready.remove(&front)?;
            self.in_flight.pop_front();
            match result {
                Ok(v) if is_stop_iteration(&v) => {
                    self.finished = true;
                    self.ready.clear();
                    return None;
                }
                Err(CallError::Remote { message, .. }) if message.contains("already running") => {
                    // A concurrent pull the producer refused: it consumed nothing. Pull one
                    // at a time from now on.
                    self.window = 1;
                    continue;
                }
                other => return Some(other),
            }
        }
    }

    /// Stops early: asks the producer to free the generator (unless it already ended).
    pub fn close(&mut self, engine: &mut Engine, now: Instant) -> Result<Option<CallId>, EngineError> {
        if self.finished {
            return Ok(None);
        }
        self.finished = true;
        self.ready.clear();
        engine.generator_close(now, &self.generator).map(Some)
    }
}
