//! Seeded deterministic simulation: one seed builds a small Hypha deployment on the simulated hub, drives a random workload through it under random faults, and checks the engine's invariants at every step and at the end.
//!
//! # What one seed does
//!
//! [`run_seed`] derives everything from the seed:
//!
//! - **Deployment.** 2–5 engines (`c0` anonymous, the others joining its workspace with a token
//!   it minted), each with its own chunk size (2–8 KiB, so large messages are cheap), method
//!   timeout and [`Limits`] (mostly roomy, sometimes tight). Some of them serve the service `w`
//!   and every client fetches every provider's `w` once.
//! - **User code** (the handlers of `w`, one callback handler per client):
//!   `echo`, `add`, `fail`, `slow` (async, answers later: heartbeats), `block` (synchronous:
//!   the whole client stops), `call_back` (calls the caller's callback argument several times),
//!   `gen` (returns a generator of seeded length), `sum_gen` (pulls a generator the caller
//!   passed), `blob` (checks a large request byte for byte, returns a large reply), `counter`
//!   (returns a `_rintf` object), `listen` (calls a `_rintf` listener the caller passed, then
//!   disposes of it), `adder` (returns a local function), `relay` (calls another provider).
//!   Callers pull generators to their end or close them early, use and dispose of counters,
//!   call returned functions; every `Ok` result is checked against what it must be.
//! - **Actions**, interleaved with seeded gaps of virtual time (0 to 45 s): calls of all of
//!   the above (some with short timeouts), bursts, manager calls (`echo`, `list_services`,
//!   `get_service`), registering and unregistering an extra service.
//! - **Faults**: links dropped (both ends notice) or cut (half-open: the hub does not notice)
//!   and reopened later, clients killed for good or closed, hub restarts (new manager id,
//!   every client reconnects by itself), per-link latency changes (messages of different
//!   connections overtake each other; each link stays FIFO) and latency spikes of 20–45 s
//!   (calls time out, chunks of large messages arrive after their partial message expired).
//!
//! # What is checked
//!
//! After every step (every quiescent [`Sim::drive`], through [`Sim::set_checker`]): no engine
//! holds more than its [`Limits`] allow (pending calls, invocations, queued frames, partial
//! messages, exports, interfaces, generators); the engine's open invocations are exactly the
//! ones the user code has not answered; no settlement of a call nobody made. The harness
//! itself panics on a second settlement of any call, a livelock, and time that stops moving.
//! Contracts of events: `GeneratorClosed` at most once and never after the end,
//! `InterfaceDisposed` at most once per interface.
//!
//! At the end, after healing every link and letting every timeout and expiry pass: every call
//! of a live client settled; live engines hold nothing (no pending call, invocation, upload,
//! partial message, export, interface, generator or queued frame) and are connected; no
//! scheduled reply or reconnection is left; nothing but keep-alive pings moves for a minute;
//! every provider's `w` is registered at the hub again; no frame exceeded the chunk size.
//! A panic anywhere (engine, hub, harness) is a failure too. [`WorkloadOptions::check_determinism`]
//! runs the seed twice and compares the hashes of every frame exchanged.
//!
//! A failure prints a one-line reproduction: `cargo run --release -p hypha-rpc-tests --example
//! sim_seeds -- --seed <N>`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};

use bytes::Bytes;
use hypha_rpc_core::codec::rtype::{Generator, Method, RTypeCodec, StopIteration};
use hypha_rpc_core::engine::{is_stop_iteration, local_function, local_generator};
use hypha_rpc_core::time::{Duration, Instant};
use hypha_rpc_core::{
    CallError, CallId, CallOptions, EngineConfig, EngineError, Event, FnId, FunctionSpec, GenId, Invocation,
    InvokeId, InvokeTarget, Limits, Map, ServiceSpec, Value,
};

use crate::hub::{HubConfig, HubOutput, WsMessage};
use crate::sim::{Checker, ClientId, Handler, Reply, Sim, handler, method_at};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
/// How much larger than the chunk size a frame may be (headers, the hub's rewrite).
const FRAME_SLACK: usize = 2048;
/// Lines of the action log a failure keeps when the whole log was not asked for.
const LOG_TAIL: usize = 80;

/// The command that replays one seed with these options, verbosely.
pub fn repro_command(seed: u64, opts: &WorkloadOptions) -> String {
    repro_line(seed, &opts.flags())
}

fn repro_line(seed: u64, flags: &str) -> String {
    format!("cargo run --release -p hypha-rpc-tests --example sim_seeds -- --seed {seed}{flags}")
}

// ---------------------------------------------------------------------------------------------
// Options, reports, failures.

/// How [`run_seed`] runs.
#[derive(Debug, Clone, Default)]
pub struct WorkloadOptions {
    /// Number of workload steps (actions and faults); `None`: 20–60, from the seed.
    pub steps: Option<usize>,
    /// Keep the whole action log (in the report, and in a failure) instead of its tail.
    pub trace: bool,
    /// Run the seed twice and fail unless both runs exchange exactly the same frames.
    pub check_determinism: bool,
    /// Also drive the engine where it once had bugs (each now a regression test in
    /// `tests/tests/sim_seeds.rs`), which the default workload steers clear of: tight
    /// `max_pending_calls` and `max_queued_frames` on the clients with tight limits (a refused
    /// built-in or deferred registration at a reconnection, a leaked upload, one pending call
    /// over the limit), and values mixing an `_rintf` object with a generator sent by clients
    /// with tight limits (an interface left behind by a refused call or reply).
    pub known_bugs: bool,
    /// End-to-end encryption on every engine (the deterministic `FakeCrypto`), and every
    /// service fetched with its provider's key: every call, reply, callback and chunked
    /// message of the workload travels sealed.
    pub encryption: bool,
}

impl WorkloadOptions {
    /// The command-line flags that reproduce these options (the seed aside).
    pub fn flags(&self) -> String {
        let mut f = String::new();
        if let Some(n) = self.steps {
            f.push_str(&format!(" --steps {n}"));
        }
        if self.known_bugs {
            f.push_str(" --known-bugs");
        }
        if self.encryption {
            f.push_str(" --encryption");
        }
        f
    }
}

/// What one passing seed did.
#[derive(Debug, Clone, Default)]
pub struct SeedReport {
    /// The seed.
    pub seed: u64,
    /// Engines in the deployment.
    pub clients: usize,
    /// SHA-256 of every message exchanged ([`Sim::frame_hash`]).
    pub frame_hash: String,
    /// Messages exchanged (delivered or lost).
    pub messages: u64,
    /// Messages lost with their link.
    pub lost: u64,
    /// Virtual time at the end.
    pub virtual_time: Duration,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Workload actions, by kind.
    pub actions: BTreeMap<&'static str, u64>,
    /// How calls ended: `ok`, `timeout`, `remote error`, `refused: ...`, by kind.
    pub outcomes: BTreeMap<String, u64>,
    /// The action log, when [`WorkloadOptions::trace`] asked for it.
    pub log: Vec<String>,
}

/// A seed that broke an invariant (or panicked).
#[derive(Debug, Clone)]
pub struct SeedFailure {
    /// The seed.
    pub seed: u64,
    /// What broke.
    pub message: String,
    /// The action log up to the failure (its tail unless [`WorkloadOptions::trace`]).
    pub log: Vec<String>,
    /// [`WorkloadOptions::flags`] of the run.
    pub flags: String,
}

impl SeedFailure {
    /// The command that replays this seed.
    pub fn repro(&self) -> String {
        repro_line(self.seed, &self.flags)
    }
}

impl fmt::Display for SeedFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first = self.message.lines().next().unwrap_or_default();
        write!(f, "seed {} failed: {first}\n  reproduce: {}", self.seed, self.repro())
    }
}

impl std::error::Error for SeedFailure {}

// ---------------------------------------------------------------------------------------------
// Running seeds.

/// Runs one seed (twice with [`WorkloadOptions::check_determinism`]).
pub fn run_seed(seed: u64, opts: &WorkloadOptions) -> Result<SeedReport, SeedFailure> {
    let first = run_once(seed, opts)?;
    if opts.check_determinism {
        let second = run_once(seed, opts).map_err(|f| SeedFailure {
            message: format!("nondeterministic: the first run passed, the second failed: {}", f.message),
            ..f
        })?;
        if (second.frame_hash.as_str(), second.messages) != (first.frame_hash.as_str(), first.messages) {
            return Err(SeedFailure {
                seed,
                message: format!(
                    "nondeterministic: two runs exchanged different frames ({} messages, hash {}; then {} \
                     messages, hash {})",
                    first.messages, first.frame_hash, second.messages, second.frame_hash
                ),
                log: first.log,
                flags: opts.flags(),
            });
        }
    }
    Ok(first)
}

/// Totals over many seeds.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Seeds run.
    pub seeds: u64,
    /// Seeds that failed, by seed.
    pub failures: Vec<SeedFailure>,
    /// Engines, over all seeds.
    pub clients: u64,
    /// Messages exchanged, over all seeds.
    pub messages: u64,
    /// Messages lost with their link, over all seeds.
    pub lost: u64,
    /// Virtual time, over all seeds.
    pub virtual_time: Duration,
    /// Faults, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Actions, by kind.
    pub actions: BTreeMap<&'static str, u64>,
    /// Call outcomes, by kind.
    pub outcomes: BTreeMap<String, u64>,
}

impl Summary {
    /// Adds one seed's result.
    pub fn add(&mut self, result: Result<SeedReport, SeedFailure>) {
        self.seeds += 1;
        match result {
            Ok(r) => {
                self.clients += r.clients as u64;
                self.messages += r.messages;
                self.lost += r.lost;
                self.virtual_time += r.virtual_time;
                for (k, n) in r.faults {
                    *self.faults.entry(k).or_default() += n;
                }
                for (k, n) in r.actions {
                    *self.actions.entry(k).or_default() += n;
                }
                for (k, n) in r.outcomes {
                    *self.outcomes.entry(k).or_default() += n;
                }
            }
            Err(f) => self.failures.push(f),
        }
    }

    /// Merges another summary in.
    pub fn merge(&mut self, other: Summary) {
        self.seeds += other.seeds;
        self.clients += other.clients;
        self.messages += other.messages;
        self.lost += other.lost;
        self.virtual_time += other.virtual_time;
        for (k, n) in other.faults {
            *self.faults.entry(k).or_default() += n;
        }
        for (k, n) in other.actions {
            *self.actions.entry(k).or_default() += n;
        }
        for (k, n) in other.outcomes {
            *self.outcomes.entry(k).or_default() += n;
        }
        self.failures.extend(other.failures);
        self.failures.sort_by_key(|f| f.seed);
    }

    /// Faults over all kinds.
    pub fn total_faults(&self) -> u64 {
        self.faults.values().sum()
    }
}

fn counts<K: fmt::Display>(m: &BTreeMap<K, u64>) -> String {
    m.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let passed = self.seeds - self.failures.len() as u64;
        writeln!(f, "seeds: {} run, {passed} passed, {} failed", self.seeds, self.failures.len())?;
        writeln!(
            f,
            "engines: {}; messages: {} ({} lost with their link); virtual time: {:.1} h",
            self.clients,
            self.messages,
            self.lost,
            self.virtual_time.as_secs_f64() / 3600.0
        )?;
        writeln!(f, "faults ({}): {}", self.total_faults(), counts(&self.faults))?;
        writeln!(f, "actions ({}): {}", self.actions.values().sum::<u64>(), counts(&self.actions))?;
        write!(f, "call outcomes ({}): {}", self.outcomes.values().sum::<u64>(), counts(&self.outcomes))?;
        for fail in &self.failures {
            write!(f, "\nFAILED {fail}")?;
        }
        Ok(())
    }
}

/// Runs every seed of `seeds` on `threads` threads; `progress` is told each time a seed is done
/// (with the number done so far).
pub fn run_seeds(
    seeds: Range<u64>,
    opts: &WorkloadOptions,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Summary {
    let next = AtomicU64::new(seeds.start);
    let done = AtomicU64::new(0);
    let total = Mutex::new(Summary::default());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                let mut mine = Summary::default();
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= seeds.end {
                        break;
                    }
                    mine.add(run_seed(seed, opts));
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1);
                }
                total.lock().expect("no poisoned lock").merge(mine);
            });
        }
    });
    total.into_inner().expect("no poisoned lock")
}

// ---------------------------------------------------------------------------------------------
// Panics.

thread_local! {
    /// Set while a seed runs on this thread: its panics are recorded, not printed.
    static IN_SEED: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if IN_SEED.with(Cell::get) {
                let payload = info.payload();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                let at =
                    info.location().map(|l| format!(" (at {}:{})", l.file(), l.line())).unwrap_or_default();
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("panic: {message}{at}")));
            } else {
                previous(info);
            }
        }));
    });
}

fn run_once(seed: u64, opts: &WorkloadOptions) -> Result<SeedReport, SeedFailure> {
    install_panic_hook();
    let log = Log::new(opts.trace);
    IN_SEED.with(|f| f.set(true));
    LAST_PANIC.with(|p| p.borrow_mut().take());
    // The run and its simulation outlive a panic, so that a failure can describe the engines.
    let mut run = Run::new(seed, opts, log.clone());
    let mut sim = None;
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| run.all(&mut sim)));
    IN_SEED.with(|f| f.set(false));
    let message = match outcome {
        Ok(Ok(report)) => return Ok(report),
        Ok(Err(message)) => message,
        Err(_) => LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| "panic".into()),
    };
    let state = sim.as_ref().and_then(|sim| {
        IN_SEED.with(|f| f.set(true));
        let state = panic::catch_unwind(AssertUnwindSafe(|| run.state(sim))).ok();
        IN_SEED.with(|f| f.set(false));
        state
    });
    let message = match state {
        Some(state) if !message.contains(&state) => format!("{message}\nat the failure:\n  {state}"),
        _ => message,
    };
    Err(SeedFailure { seed, message, log: log.lines(), flags: opts.flags() })
}

// ---------------------------------------------------------------------------------------------
// Seeded randomness.

/// splitmix64: small, fast, and the same everywhere.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x6A09_E667_F3BC_C908)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    /// `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize].clone()
    }
    fn weighted<T: Clone>(&mut self, xs: &[(u64, T)]) -> T {
        let total: u64 = xs.iter().map(|(w, _)| w).sum();
        let mut r = self.below(total);
        for (w, x) in xs {
            if r < *w {
                return x.clone();
            }
            r -= w;
        }
        unreachable!("weights sum to {total}")
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

/// `len` bytes from a seeded splitmix64.
pub fn random_bytes(seed: u64, len: usize) -> Bytes {
    let mut rng = Rng::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(len as u64));
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// A small random value tree that survives the round trip through Python's msgpack unchanged
/// (no float32, no duplicate or non-string map keys, no reserved `_` keys).
fn random_value(rng: &mut Rng, depth: u32) -> Value {
    match rng.below(if depth >= 2 { 6 } else { 8 }) {
        0 => Value::Nil,
        1 => Value::Bool(rng.chance(50)),
        2 => Value::from(rng.next() as i64 >> rng.below(60)),
        3 => Value::F64((rng.next() as i64 >> 20) as f64 / 1000.0),
        4 => {
            let len = rng.below(24) as usize;
            Value::from((0..len).map(|_| char::from(b' ' + rng.below(95) as u8)).collect::<String>())
        }
        5 => Value::bin(random_bytes(rng.next(), rng.below(40) as usize)),
        6 => Value::Array((0..rng.below(4)).map(|_| random_value(rng, depth + 1)).collect()),
        _ => {
            let mut m = Map::new();
            for i in 0..rng.below(4) {
                m.push(format!("k{i}"), random_value(rng, depth + 1));
            }
            Value::Map(m)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The action log (shared with the panic path).

#[derive(Clone)]
struct Log {
    lines: Rc<RefCell<Vec<String>>>,
    all: bool,
}

impl Log {
    fn new(all: bool) -> Log {
        Log { lines: Rc::default(), all }
    }
    fn push(&self, now: Instant, line: String) {
        let mut lines = self.lines.borrow_mut();
        if !self.all && lines.len() >= 4 * LOG_TAIL {
            let cut = lines.len() - LOG_TAIL;
            lines.drain(..cut);
        }
        lines.push(format!("{:>10.3}s {line}", now.as_micros() as f64 / 1e6));
    }
    fn lines(&self) -> Vec<String> {
        let lines = self.lines.borrow();
        let from = if self.all { 0 } else { lines.len().saturating_sub(LOG_TAIL) };
        lines[from..].to_vec()
    }
}

// ---------------------------------------------------------------------------------------------
// User code.

/// Kinds of local functions, in the high half of a [`FnId`].
const CALLBACK: u64 = 1;
const ADDER: u64 = 2;
const COUNTER_INC: u64 = 3;
const COUNTER_VALUE: u64 = 4;
const LISTENER: u64 = 5;

fn fn_id(kind: u64, n: u64) -> FnId {
    FnId((kind << 32) | (n & 0xFFFF_FFFF))
}

fn fn_kind(f: FnId) -> (u64, u64) {
    (f.0 >> 32, f.0 & 0xFFFF_FFFF)
}

/// The functions of service `w`.
const W_FUNCTIONS: &[&str] = &[
    "echo",
    "add",
    "fail",
    "slow",
    "block",
    "call_back",
    "gen",
    "sum_gen",
    "blob",
    "counter",
    "bundle",
    "listen",
    "adder",
    "relay",
];

/// One client's user-level state, shared by its handlers and the workload.
struct User {
    rng: Rng,
    next: u64,
    /// Live local generators: position and length.
    gens: BTreeMap<GenId, (u64, u64)>,
    /// Generators that reached their end or were reported closed.
    finished_gens: BTreeSet<GenId>,
    /// `_rintf` counters this client serves.
    counters: BTreeMap<u64, i64>,
    /// Listener objects this client received (as a provider) and has not disposed of yet.
    held: Vec<(String, Value)>,
    /// The invocation whose reply carried each generator and counter this client made.
    origin: BTreeMap<u64, InvokeId>,
    /// Service ids of every `_rintf` object the user code of this client received.
    received: BTreeMap<String, Instant>,
    /// Invocations the engine reported cancelled.
    cancelled: BTreeSet<InvokeId>,
}

impl User {
    fn new(seed: u64) -> User {
        User {
            rng: Rng::new(seed),
            next: 0,
            gens: BTreeMap::new(),
            finished_gens: BTreeSet::new(),
            counters: BTreeMap::new(),
            held: Vec::new(),
            origin: BTreeMap::new(),
            received: BTreeMap::new(),
            cancelled: BTreeSet::new(),
        }
    }
    fn id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
    /// A new `_rintf` counter `{inc, value}`, made for invocation `origin`.
    fn new_counter(&mut self, origin: InvokeId) -> Value {
        let id = self.id();
        self.counters.insert(id, 0);
        self.origin.insert(id, origin);
        let mut m = Map::new();
        m.push("_rintf", true);
        m.push("name", "counter");
        m.push("inc", local_function(fn_id(COUNTER_INC, id), "inc"));
        m.push("value", local_function(fn_id(COUNTER_VALUE, id), "value"));
        Value::Map(m)
    }

    fn start_gen(&mut self, len: u64) -> GenId {
        let id = GenId(self.id());
        self.gens.insert(id, (0, len));
        id
    }
    fn pull(&mut self, g: GenId) -> Reply {
        let Some((pos, len)) = self.gens.get_mut(&g) else {
            return Reply::error(format!("unknown generator {g:?}"));
        };
        if *pos < *len {
            *pos += 1;
            Reply::ok(*pos - 1)
        } else {
            self.gens.remove(&g);
            self.finished_gens.insert(g);
            Reply::Ok(StopIteration.to_value())
        }
    }
}

type Shared = Rc<RefCell<User>>;

fn int_arg(inv: &Invocation, i: usize) -> i64 {
    inv.args.get(i).and_then(Value::as_i64).unwrap_or(0)
}

fn method_arg(inv: &Invocation, i: usize) -> Option<Method> {
    inv.args.get(i).and_then(Method::from_value).and_then(Result::ok)
}

fn pass_through(what: &'static str) -> impl Fn(Result<Value, CallError>) -> Reply + 'static {
    move |r| match r {
        Ok(v) => Reply::Ok(v),
        Err(e) => Reply::error(format!("{what} failed: {e}")),
    }
}

/// Calls `cb(x)`, `left` times in a row (each time with the last result).
fn call_back_chain(cb: Method, left: u64, x: i64) -> Reply {
    if left == 0 {
        return Reply::ok(x);
    }
    let again = cb.clone();
    Reply::call(cb, vec![x.into()], move |r| match r {
        Ok(v) => match v.as_i64() {
            Some(y) => call_back_chain(again.clone(), left - 1, y),
            None => Reply::error(format!("the callback returned {v:?}")),
        },
        Err(e) => Reply::error(format!("the callback failed: {e}")),
    })
}

/// Pulls a generator to its end, answering `[count, sum]`.
fn sum_rest(next: Method, count: u64, sum: u64) -> Reply {
    if count > 64 {
        return Reply::error("a generator that does not end");
    }
    Reply::call(next.clone(), Vec::new(), move |r| match r {
        Ok(v) if is_stop_iteration(&v) => Reply::ok(vec![Value::from(count), Value::from(sum)]),
        Ok(v) => sum_rest(next.clone(), count + 1, sum + v.as_u64().unwrap_or(1 << 40)),
        Err(e) => Reply::error(format!("pull failed: {e}")),
    })
}

/// Calls `obj.on_event(i)` for `i` in `from..n`, then `obj._dispose()`, then answers `n`.
fn listen_chain(user: Shared, sid: String, obj: Value, from: u64, n: u64) -> Reply {
    if from < n {
        let on_event = method_at(&obj, "on_event");
        return Reply::call(on_event, vec![from.into()], move |r| match r {
            Ok(_) => listen_chain(user.clone(), sid.clone(), obj.clone(), from + 1, n),
            Err(e) => Reply::error(format!("on_event failed: {e}")),
        });
    }
    let dispose = method_at(&obj, "_dispose");
    Reply::call(dispose, vec![], move |r| match r {
        Ok(_) => {
            user.borrow_mut().held.retain(|(s, _)| *s != sid);
            Reply::ok(n)
        }
        Err(e) => Reply::error(format!("_dispose failed: {e}")),
    })
}

fn rintf_id(obj: &Value) -> Option<String> {
    obj.as_map()?.get("_rintf_service_id")?.as_str().map(String::from)
}

/// The handlers of `w` on a client whose user state is `user`.
fn w_handlers(user: &Shared) -> Vec<(&'static str, Handler)> {
    let u = user.clone();
    let gen_handler = handler(move |inv: &Invocation| {
        let len = int_arg(inv, 0).clamp(0, 32) as u64;
        let mut user = u.borrow_mut();
        let g = user.start_gen(len);
        user.origin.insert(g.0, inv.id);
        Reply::Ok(local_generator(g))
    });
    let u = user.clone();
    let counter = handler(move |inv: &Invocation| Reply::Ok(u.borrow_mut().new_counter(inv.id)));
    let u = user.clone();
    let bundle = handler(move |inv: &Invocation| {
        let len = int_arg(inv, 0).clamp(0, 32) as u64;
        let mut user = u.borrow_mut();
        let counter = user.new_counter(inv.id);
        let g = user.start_gen(len);
        user.origin.insert(g.0, inv.id);
        Reply::ok(vec![counter, local_generator(g)])
    });
    let u = user.clone();
    let listen = handler(move |inv: &Invocation| {
        let obj = inv.args.first().cloned().unwrap_or_default();
        let n = int_arg(inv, 1).clamp(0, 8) as u64;
        let Some(sid) = rintf_id(&obj) else { return Reply::error("not an _rintf object") };
        u.borrow_mut().held.push((sid.clone(), obj.clone()));
        u.borrow_mut().received.insert(sid.clone(), Instant::ZERO);
        listen_chain(u.clone(), sid, obj, 0, n)
    });
    vec![
        ("echo", handler(|inv: &Invocation| Reply::Ok(inv.args.first().cloned().unwrap_or_default()))),
        ("add", handler(|inv: &Invocation| Reply::ok(int_arg(inv, 0).wrapping_add(int_arg(inv, 1))))),
        ("fail", handler(|inv: &Invocation| Reply::error(format!("fail: {:?}", inv.args.first())))),
        (
            "slow",
            handler(|inv: &Invocation| {
                let d = Duration::from_millis(int_arg(inv, 0).max(0) as u64);
                Reply::After(d, Ok(inv.args.get(1).cloned().unwrap_or_default()))
            }),
        ),
        (
            "block",
            handler(|inv: &Invocation| {
                let d = Duration::from_millis(int_arg(inv, 0).max(0) as u64);
                Reply::Blocking(d, Ok(inv.args.get(1).cloned().unwrap_or_default()))
            }),
        ),
        (
            "call_back",
            handler(|inv: &Invocation| match method_arg(inv, 0) {
                Some(cb) => call_back_chain(cb, int_arg(inv, 1).clamp(0, 8) as u64, int_arg(inv, 2)),
                None => Reply::error("call_back needs a callback"),
            }),
        ),
        ("gen", gen_handler),
        (
            "sum_gen",
            handler(|inv: &Invocation| {
                let g = inv.args.first().and_then(Generator::from_value).and_then(Result::ok);
                match g {
                    Some(g) => {
                        let next = Method {
                            target: g.target,
                            method: g.method,
                            promise: g.promise,
                            ..Method::default()
                        };
                        sum_rest(next, 0, 0)
                    }
                    None => Reply::error("sum_gen needs a generator"),
                }
            }),
        ),
        (
            "blob",
            handler(|inv: &Invocation| {
                let len = int_arg(inv, 0).clamp(0, 1 << 20) as usize;
                let seed = int_arg(inv, 1) as u64;
                let data = inv.args.get(2).and_then(Value::as_bin).cloned().unwrap_or_default();
                if data != random_bytes(seed, data.len()) {
                    return Reply::error(format!("the request of {} bytes arrived corrupted", data.len()));
                }
                Reply::Ok(Value::bin(random_bytes(seed.wrapping_add(1), len)))
            }),
        ),
        ("counter", counter),
        ("bundle", bundle),
        ("listen", listen),
        (
            "adder",
            handler(|inv: &Invocation| {
                let k = int_arg(inv, 0).clamp(0, 1000) as u64;
                Reply::Ok(local_function(fn_id(ADDER, k), "adder"))
            }),
        ),
        (
            "relay",
            handler(|inv: &Invocation| match method_arg(inv, 0) {
                Some(m) => {
                    Reply::call(m, vec![inv.args.get(1).cloned().unwrap_or_default()], pass_through("relay"))
                }
                None => Reply::error("relay needs a method"),
            }),
        ),
    ]
}

/// The handler of every callback, returned function, interface and generator of a client.
fn callback_handler(user: &Shared) -> Handler {
    let u = user.clone();
    handler(move |inv: &Invocation| {
        let mut user = u.borrow_mut();
        match &inv.target {
            InvokeTarget::GeneratorNext { generator } => user.pull(*generator),
            InvokeTarget::Callback { function, .. } if fn_kind(*function).0 == CALLBACK => {
                let v = Value::from(int_arg(inv, 0).wrapping_add(1));
                match user.rng.below(10) {
                    0..7 => Reply::Ok(v),
                    7..9 => Reply::After(user.rng.millis(0, 2000), Ok(v)),
                    _ => Reply::Blocking(user.rng.millis(0, 1000), Ok(v)),
                }
            }
            InvokeTarget::Returned { function } if fn_kind(*function).0 == ADDER => {
                Reply::ok(int_arg(inv, 0).wrapping_add(fn_kind(*function).1 as i64))
            }
            InvokeTarget::Interface { function, .. } => match fn_kind(*function) {
                (COUNTER_INC, id) => match user.counters.get_mut(&id) {
                    Some(n) => {
                        *n += 1;
                        Reply::ok(*n)
                    }
                    None => Reply::error(format!("no counter {id}")),
                },
                (COUNTER_VALUE, id) => match user.counters.get(&id) {
                    Some(n) => Reply::ok(*n),
                    None => Reply::error(format!("no counter {id}")),
                },
                (LISTENER, _) => Reply::ok(true),
                other => Reply::error(format!("unknown interface function {other:?}")),
            },
            other => Reply::error(format!("unexpected invocation {other:?}")),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Calls in flight and multi-call flows of the callers.

#[derive(Debug, Clone)]
enum Expect {
    /// `Ok` must be exactly this.
    Exact(Value),
    /// Must fail.
    Fail,
    /// `Ok` must be `random_bytes(seed + 1, len)`.
    Blob { seed: u64, len: usize },
    /// `Ok` is a generator of `len` items: pull it.
    OpenGen { len: u64, stop_at: u64 },
    /// `Ok` is a counter `_rintf`: use it.
    Counter { incs: u32 },
    /// `Ok` is `[counter, generator]`: use both.
    Bundle { incs: u32, len: u64, stop_at: u64 },
    /// `Ok` is a function adding `k`: call it.
    Adder { k: i64, calls: u32 },
    /// `sum_gen` of a generator of `len` items.
    SumGen { len: u64 },
    /// Anything.
    Any,
    /// A step of flow `id`.
    Flow(u64),
}

#[derive(Debug)]
struct Pending {
    c: ClientId,
    id: CallId,
    kind: &'static str,
    expect: Expect,
    /// A local generator of the caller passed in the arguments: gone once the call settles.
    carried: Option<GenId>,
}

#[derive(Debug)]
enum Flow {
    Gen { c: ClientId, g: Generator, len: u64, next: u64, stop_at: u64, faulted: bool, closing: bool },
    Counter { c: ClientId, obj: Value, incs: u32, last: i64, faulted: bool, stage: CounterStage },
    Adder { c: ClientId, f: Method, k: i64, left: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CounterStage {
    Inc,
    Value,
    Dispose,
}

fn outcome(r: &Result<Value, CallError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(CallError::Remote { .. }) => "remote error",
        Err(CallError::Timeout { .. }) => "timeout",
        Err(CallError::NoReplyEncrypted { .. }) => "timeout (encrypted, nothing heard)",
        Err(CallError::PeerDisconnected { .. }) => "peer disconnected",
        Err(CallError::ServerRestarted { .. }) => "server restarted",
        Err(CallError::ConnectionLost { .. }) => "connection lost",
        Err(CallError::Closed) => "closed",
        Err(CallError::BadReply(_)) => "bad reply",
        Err(_) => "other error",
    }
}

/// [`outcome`], with the name of any error variant it does not know.
fn outcome_name(r: &Result<Value, CallError>) -> String {
    match (outcome(r), r) {
        ("other error", Err(e)) => {
            let debug = format!("{e:?}");
            let name = debug.split(|c: char| !c.is_alphanumeric()).next().unwrap_or_default();
            format!("error {name}")
        }
        (o, _) => o.to_string(),
    }
}

fn refusal(e: &EngineError) -> String {
    match e {
        EngineError::LimitReached { what, .. } => format!("refused: {what}"),
        EngineError::Closed => "refused: closed".into(),
        EngineError::NotConnected => "refused: not connected".into(),
        other => format!("refused: {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// One run.

struct Client {
    id: ClientId,
    name: String,
    limits: Limits,
    chunk: usize,
    method_timeout: Duration,
    base_latency: Duration,
    user: Shared,
    provider: bool,
    extra: bool,
    events_seen: usize,
    disposed: BTreeSet<String>,
}

struct Run {
    seed: u64,
    rng: Rng,
    steps: usize,
    known_bugs: bool,
    encryption: bool,
    fault_rate: u64,
    log: Log,
    clients: Vec<Client>,
    /// `(caller, provider)` → the provider's `w` as the caller fetched it.
    services: BTreeMap<(usize, usize), Value>,
    pending: Vec<Pending>,
    flows: BTreeMap<u64, Flow>,
    next_flow: u64,
    leftover_rintf: Vec<(ClientId, Value)>,
    leftover_gens: Vec<(ClientId, Generator)>,
    spikes: Vec<(Instant, ClientId)>,
    restarts: u64,
    /// Listeners (client, id) whose `listen` call the engine refused: no interface may stay.
    refused_listeners: BTreeSet<(ClientId, u64)>,
    report: SeedReport,
}

impl Run {
    fn new(seed: u64, opts: &WorkloadOptions, log: Log) -> Run {
        let mut rng = Rng::new(seed);
        let steps = opts.steps.unwrap_or_else(|| rng.range(20, 60) as usize);
        let fault_rate = rng.range(10, 35);
        Run {
            seed,
            rng,
            steps,
            known_bugs: opts.known_bugs,
            encryption: opts.encryption,
            fault_rate,
            log,
            clients: Vec::new(),
            services: BTreeMap::new(),
            pending: Vec::new(),
            flows: BTreeMap::new(),
            next_flow: 0,
            leftover_rintf: Vec::new(),
            leftover_gens: Vec::new(),
            spikes: Vec::new(),
            restarts: 0,
            refused_listeners: BTreeSet::new(),
            report: SeedReport { seed, ..SeedReport::default() },
        }
    }

    fn say(&self, sim: &Sim, line: String) {
        self.log.push(sim.now(), line);
    }

    fn all(&mut self, slot: &mut Option<Sim>) -> Result<SeedReport, String> {
        let sim = slot.insert(self.setup());
        for _ in 0..self.steps {
            self.iteration(sim)?;
        }
        self.finish(sim)?;
        self.report.clients = self.clients.len();
        self.report.frame_hash = sim.frame_hash();
        self.report.messages = sim.trace().len() as u64;
        self.report.lost = sim.lost_messages();
        self.report.virtual_time = sim.now().saturating_duration_since(Instant::ZERO);
        if self.log.all {
            self.report.log = self.log.lines();
        }
        Ok(std::mem::take(&mut self.report))
    }

    // ---- setup ---------------------------------------------------------------------------------

    fn limits(&mut self) -> Limits {
        let mut l = Limits::default();
        l.partial_message_expiry = self.rng.pick(&[10 * SEC, 30 * SEC, 60 * SEC]);
        l.export_idle_expiry = self.rng.pick(&[30 * SEC, 60 * SEC, 120 * SEC]);
        if self.rng.chance(20) {
            // Tight: refusals everywhere.
            l.max_pending_calls = self.rng.range(8, 24) as usize;
            l.max_active_invocations = self.rng.range(1, 4) as usize;
            l.max_queued_frames = self.rng.range(2, 16) as usize;
            l.max_partial_messages = self.rng.range(1, 2) as usize;
            l.max_exports = self.rng.range(1, 3) as usize;
            l.max_interfaces = self.rng.range(1, 3) as usize;
            l.max_generators = self.rng.range(1, 3) as usize;
            l.max_message_bytes = self.rng.pick(&[16_384, 40_000, 65_536]);
            l.max_chunks_per_message = self.rng.range(4, 32) as usize;
            if !self.known_bugs {
                l.max_pending_calls = 256;
                l.max_queued_frames = 256;
            }
        } else {
            l.max_pending_calls = 256;
            l.max_active_invocations = 64;
            l.max_queued_frames = 256;
            l.max_partial_messages = 16;
            l.max_exports = 32;
            l.max_interfaces = 32;
            l.max_generators = 32;
            l.max_message_bytes = 1 << 20;
        }
        l
    }

    fn setup(&mut self) -> Sim {
        let n = self.rng.range(2, 5) as usize;
        let hub = HubConfig {
            seed: self.rng.next(),
            send_peer_not_found: self.rng.chance(30),
            server_id: format!("hub-{:016x}", self.seed),
            ..HubConfig::default()
        };
        let mut sim = Sim::new(hub);
        sim.horizon = Duration::from_secs(4 * 3600);
        sim.step_limit = 2_000_000;
        sim.stall_limit = 20_000;
        let mut token = None;
        for i in 0..n {
            let name = format!("c{i}");
            let mut config = EngineConfig::new(name.as_str());
            config.seed = self.rng.next() | 1;
            config.chunk_size = self.rng.pick(&[2048, 4096, 8192]);
            config.method_timeout = self.rng.pick(&[10 * SEC, 20 * SEC, 30 * SEC]);
            config.limits = self.limits();
            let base_latency = self.rng.pick(&[Duration::ZERO, MS, 3 * MS, 10 * MS, 40 * MS]);
            let user = Rc::new(RefCell::new(User::new(self.rng.next())));
            let client = Client {
                id: ClientId(i),
                name,
                limits: config.limits.clone(),
                chunk: config.chunk_size,
                method_timeout: config.method_timeout,
                base_latency,
                user,
                provider: self.rng.chance(60),
                extra: false,
                events_seen: 0,
                disposed: BTreeSet::new(),
            };
            if let Some((ws, t)) = &token {
                config.token = Some(String::clone(t));
                config.workspace = Some(String::clone(ws));
            }
            let c = sim.add_client(config);
            assert_eq!(c, client.id);
            if self.encryption {
                let fake = hypha_rpc_core::crypto::FakeCrypto::new(0xe2e0_0000 + i as u64);
                sim.engine_mut(c).set_crypto(Box::new(fake));
            }
            sim.connect(c);
            if token.is_none() {
                let mut grant = Map::new();
                grant.insert("permission", "read_write");
                let call = sim.call_manager(c, "generate_token", vec![Value::from(grant)], None);
                let t = sim.wait_ok(c, call).as_str().expect("a token").to_string();
                token = Some((sim.workspace(c), t));
            }
            sim.on_callback(c, callback_handler(&client.user));
            self.clients.push(client);
        }
        if !self.clients.iter().any(|c| c.provider) {
            let i = self.rng.below(n as u64) as usize;
            self.clients[i].provider = true;
        }
        let spec =
            W_FUNCTIONS.iter().fold(ServiceSpec::new("w"), |s, f| s.function(f, FunctionSpec::new(*f)));
        for i in 0..n {
            if self.clients[i].provider {
                let handlers = w_handlers(&self.clients[i].user);
                let reg = sim.register(ClientId(i), spec.clone(), handlers);
                sim.wait_ok(ClientId(i), reg);
            }
        }
        for caller in 0..n {
            for p in 0..n {
                if self.clients[p].provider {
                    let id = format!("{}:w", self.clients[p].name);
                    let call = sim.get_service(ClientId(caller), &id);
                    let mut svc = sim.wait_ok(ClientId(caller), call);
                    if let Some(key) = sim.engine(ClientId(p)).public_key().filter(|_| self.encryption) {
                        attach_key(&mut svc, &key);
                    }
                    self.services.insert((caller, p), svc);
                }
            }
        }
        for c in &self.clients {
            sim.set_latency(c.id, c.base_latency);
        }
        let desc: Vec<String> = self
            .clients
            .iter()
            .map(|c| {
                let tight = c.tight();
                format!(
                    "{}{} (chunk {}, timeout {:?}, latency {:?}{})",
                    c.name,
                    if c.provider { "*" } else { "" },
                    c.chunk,
                    c.method_timeout,
                    c.base_latency,
                    if tight { ", tight limits" } else { "" }
                )
            })
            .collect();
        self.say(
            &sim,
            format!(
                "seed {}: {} steps, faults {}%: {}",
                self.seed,
                self.steps,
                self.fault_rate,
                desc.join("; ")
            ),
        );
        sim.set_checker(Some(self.checker()));
        sim
    }

    /// The invariants checked after every step.
    fn checker(&self) -> Checker {
        let limits: Vec<(String, Limits)> =
            self.clients.iter().map(|c| (c.name.clone(), c.limits.clone())).collect();
        Box::new(move |s: &Sim| {
            for c in s.clients() {
                if s.is_dead(c) {
                    continue;
                }
                let (name, l) = &limits[c.0];
                let e = s.engine(c);
                // The engine's own registration calls (built-in, subscribe, one per service,
                // the registration check) may go past max_pending_calls: user calls may not.
                let own = e.service_ids().count() + 3;
                let held = [
                    ("pending calls", e.pending_calls(), l.max_pending_calls + own),
                    ("active invocations", e.active_invocations(), l.max_active_invocations),
                    ("queued frames", e.queued_frames(), l.max_queued_frames),
                    ("partial messages", e.partial_messages(), l.max_partial_messages),
                    ("exports", e.exports(), l.max_exports),
                    ("interfaces", e.interfaces(), l.max_interfaces),
                    ("open generators", e.open_generators(), l.max_generators),
                ];
                for (what, n, max) in held {
                    assert!(n <= max, "{name}: {n} {what}, over the limit of {max}");
                }
                if !s.is_closed(c) && !s.is_blocked(c) {
                    assert_eq!(
                        e.active_invocations(),
                        s.open_invocations(c),
                        "{name}: the engine's open invocations differ from the unanswered ones"
                    );
                }
                assert_eq!(s.untracked_settlements(c), 0, "{name}: a call nobody made settled");
            }
        })
    }

    // ---- the loop ------------------------------------------------------------------------------

    fn live(&self, sim: &Sim) -> Vec<ClientId> {
        self.clients.iter().map(|c| c.id).filter(|&c| !sim.is_dead(c) && !sim.is_closed(c)).collect()
    }

    /// Live clients whose user code can run now.
    fn runnable(&self, sim: &Sim) -> Vec<ClientId> {
        self.live(sim).into_iter().filter(|&c| !sim.is_blocked(c)).collect()
    }

    fn iteration(&mut self, sim: &mut Sim) -> Result<(), String> {
        self.undo_spikes(sim);
        if self.rng.chance(self.fault_rate) {
            self.fault(sim);
        } else {
            self.action(sim);
        }
        let gap = self.rng.weighted(&[
            (30, (0, 0)),
            (30, (1, 50)),
            (20, (50, 500)),
            (15, (500, 5000)),
            (5, (5000, 45_000)),
        ]);
        let gap = self.rng.millis(gap.0, gap.1);
        sim.run_for(gap);
        self.process(sim)
    }

    fn undo_spikes(&mut self, sim: &mut Sim) {
        let now = sim.now();
        let (due, later): (Vec<_>, Vec<_>) = self.spikes.iter().partition(|(t, _)| *t <= now);
        self.spikes = later;
        for (_, c) in due {
            if !sim.is_dead(c) {
                sim.set_latency(c, self.clients[c.0].base_latency);
                self.say(
                    sim,
                    format!(
                        "{}: latency back to {:?}",
                        self.clients[c.0].name, self.clients[c.0].base_latency
                    ),
                );
            }
        }
    }

    fn count_fault(&mut self, kind: &'static str) {
        *self.report.faults.entry(kind).or_default() += 1;
    }

    fn fault(&mut self, sim: &mut Sim) {
        let live = self.live(sim);
        let Some(c) = (!live.is_empty()).then(|| self.rng.pick(&live)) else { return };
        let name = self.clients[c.0].name.clone();
        let kind = self.rng.weighted(&[
            (25, "drop link"),
            (20, "cut link"),
            (4, "kill client"),
            (2, "close client"),
            (8, "restart hub"),
            (25, "latency"),
            (6, "latency spike"),
        ]);
        let kind = match kind {
            "kill client" | "close client" if live.len() < 2 => "latency",
            k => k,
        };
        self.count_fault(kind);
        match kind {
            "drop link" | "cut link" => {
                let delay = self.rng.pick(&[Duration::ZERO, 100 * MS, SEC, 5 * SEC, 20 * SEC, 60 * SEC]);
                self.say(sim, format!("FAULT {name}: {kind}, reconnect after {delay:?}"));
                if kind == "drop link" {
                    sim.drop_link(c);
                } else {
                    sim.cut_link(c);
                }
                sim.reconnect_after(c, delay);
            }
            "kill client" => {
                self.say(sim, format!("FAULT {name}: killed"));
                sim.kill_client(c);
                self.pending.retain(|p| p.c != c);
                self.flows.retain(|_, f| f.client() != c);
                self.leftover_gens.retain(|(x, _)| *x != c);
                self.leftover_rintf.retain(|(x, _)| *x != c);
                self.spikes.retain(|(_, x)| *x != c);
            }
            "close client" => {
                self.say(sim, format!("FAULT {name}: closed"));
                sim.close_client(c);
            }
            "restart hub" => {
                self.restarts += 1;
                let id = format!("hub-{:016x}-{}", self.seed, self.restarts);
                self.say(sim, format!("FAULT hub restarts as {id}"));
                sim.restart_hub(&id);
            }
            "latency" => {
                let l =
                    self.rng.pick(&[Duration::ZERO, MS, 5 * MS, 20 * MS, 100 * MS, 400 * MS, SEC, 3 * SEC]);
                self.say(sim, format!("FAULT {name}: latency {l:?}"));
                sim.set_latency(c, l);
            }
            _ => {
                let l = self.rng.millis(20_000, 45_000);
                let until = sim.now() + self.rng.millis(1000, 60_000);
                self.say(sim, format!("FAULT {name}: latency spike {l:?} until {until:?}"));
                sim.set_latency(c, l);
                self.spikes.push((until, c));
            }
        }
    }

    fn count_action(&mut self, kind: &'static str) {
        *self.report.actions.entry(kind).or_default() += 1;
    }

    fn count_outcome(&mut self, o: String) {
        *self.report.outcomes.entry(o).or_default() += 1;
    }

    /// Starts a call on `c` and tracks it; a refusal is counted.
    fn start(
        &mut self,
        sim: &mut Sim,
        c: ClientId,
        kind: &'static str,
        expect: Expect,
        command: impl FnOnce(&mut hypha_rpc_core::Engine, Instant) -> Result<CallId, EngineError>,
    ) -> Option<CallId> {
        match sim.try_command(c, command) {
            Ok(id) => {
                self.pending.push(Pending { c, id, kind, expect, carried: None });
                Some(id)
            }
            Err(e) => {
                let why = refusal(&e);
                self.say(sim, format!("  {} {kind}: {why}", self.clients[c.0].name));
                self.count_outcome(why);
                None
            }
        }
    }

    fn options(&mut self) -> CallOptions {
        let timeout = self.rng.chance(15).then(|| self.rng.pick(&[SEC, 2 * SEC, 5 * SEC]));
        CallOptions { timeout, ..CallOptions::default() }
    }

    fn action(&mut self, sim: &mut Sim) {
        let runnable = self.runnable(sim);
        if runnable.is_empty() {
            return;
        }
        let c = self.rng.pick(&runnable);
        let providers: Vec<usize> =
            self.clients.iter().enumerate().filter(|(_, x)| x.provider).map(|(i, _)| i).collect();
        let p = self.rng.pick(&providers);
        let svc = self.services[&(c.0, p)].clone();
        let kind = self.rng.weighted(&[
            (10, "echo"),
            (6, "add"),
            (3, "fail"),
            (6, "slow"),
            (3, "block"),
            (6, "call_back"),
            (7, "gen"),
            (4, "sum_gen"),
            (8, "blob"),
            (5, "counter"),
            (2, "bundle"),
            (4, "listen"),
            (4, "adder"),
            (4, "relay"),
            (3, "burst"),
            (3, "manager"),
            (2, "get_service"),
            (2, "extra service"),
        ]);
        self.count_action(kind);
        let name = self.clients[c.0].name.clone();
        let to = self.clients[p].name.clone();
        self.say(sim, format!("{name} -> {to}: {kind}"));
        let call =
            |sim: &mut Sim, run: &mut Run, f: &str, args: Vec<Value>, expect: Expect, kind: &'static str| {
                let m = method_at(&svc, f);
                let options = run.options();
                run.start(sim, c, kind, expect, move |e, now| e.call(now, &m, args, None, options))
            };
        match kind {
            "echo" => {
                let v = if self.rng.chance(10) {
                    Value::from("x".repeat(self.rng.range(3000, 20_000) as usize))
                } else {
                    random_value(&mut self.rng, 0)
                };
                call(sim, self, "echo", vec![v.clone()], Expect::Exact(v), kind);
            }
            "add" => {
                let (a, b) = (self.rng.next() as i64 >> 2, self.rng.next() as i64 >> 2);
                call(
                    sim,
                    self,
                    "add",
                    vec![a.into(), b.into()],
                    Expect::Exact(Value::from(a.wrapping_add(b))),
                    kind,
                );
            }
            "fail" => {
                let x = self.rng.below(100);
                call(sim, self, "fail", vec![x.into()], Expect::Fail, kind);
            }
            "slow" | "block" => {
                let ms = if kind == "slow" {
                    self.rng.weighted(&[(6, (0, 2000)), (3, (2000, 20_000)), (1, (20_000, 45_000))])
                } else {
                    self.rng.weighted(&[(7, (0, 1000)), (2, (1000, 12_000)), (1, (12_000, 40_000))])
                };
                let ms = self.rng.range(ms.0, ms.1);
                let x = Value::from(self.rng.below(1000));
                call(sim, self, kind, vec![ms.into(), x.clone()], Expect::Exact(x), kind);
            }
            "call_back" => {
                let n = self.rng.range(0, 4) as i64;
                let x = self.rng.below(1000) as i64;
                let args = vec![local_function(fn_id(CALLBACK, 0), "cb"), n.into(), x.into()];
                call(sim, self, "call_back", args, Expect::Exact(Value::from(x + n)), kind);
            }
            "gen" => {
                let len = self.rng.pick(&[0, 1, 2, 5, 12]);
                let stop_at = if self.rng.chance(30) { self.rng.range(0, len) } else { u64::MAX };
                call(sim, self, "gen", vec![len.into()], Expect::OpenGen { len, stop_at }, kind);
            }
            "sum_gen" => {
                let len = self.rng.pick(&[0, 1, 3, 8]);
                let g = self.clients[c.0].user.borrow_mut().start_gen(len);
                let started =
                    call(sim, self, "sum_gen", vec![local_generator(g)], Expect::SumGen { len }, kind);
                self.carry(c, started, g);
            }
            "blob" => {
                let sizes = [0usize, 100, 3000, 9000, 20_000, 60_000];
                let up = if self.rng.chance(50) { self.rng.pick(&sizes) } else { 0 };
                let down = self.rng.pick(&sizes);
                let seed = self.rng.next() >> 1;
                let args = vec![down.into(), seed.into(), Value::bin(random_bytes(seed, up))];
                call(sim, self, "blob", args, Expect::Blob { seed, len: down }, kind);
            }
            "counter" => {
                let incs = self.rng.range(0, 4) as u32;
                call(sim, self, "counter", vec![], Expect::Counter { incs }, kind);
            }
            "bundle" if !self.known_bugs && self.clients[p].tight() => {
                // A refusal half-way through the reply would leave its `_rintf` behind.
                let incs = self.rng.range(0, 4) as u32;
                call(sim, self, "counter", vec![], Expect::Counter { incs }, kind);
            }
            "bundle" => {
                let incs = self.rng.range(0, 2) as u32;
                let len = self.rng.pick(&[0, 3]);
                let stop_at = if self.rng.chance(50) { 1 } else { u64::MAX };
                call(sim, self, "bundle", vec![len.into()], Expect::Bundle { incs, len, stop_at }, kind);
            }
            "listen" => {
                let n = self.rng.range(0, 3);
                let id = self.clients[c.0].user.borrow_mut().id();
                let mut obj = Map::new();
                obj.push("_rintf", true);
                obj.push("on_event", local_function(fn_id(LISTENER, id), "on_event"));
                let mut args = vec![Value::Map(obj), n.into()];
                // Sometimes with a generator too (which the callee ignores).
                // (Not from a client with tight limits unless asked: a refusal half-way through
                // the arguments would leave the listener's `_rintf` behind.)
                let mixed = self.known_bugs || !self.clients[c.0].tight();
                let g =
                    (self.rng.chance(30) && mixed).then(|| self.clients[c.0].user.borrow_mut().start_gen(1));
                args.extend(g.map(local_generator));
                let started = call(sim, self, "listen", args, Expect::Exact(Value::from(n)), kind);
                if started.is_none() {
                    self.refused_listeners.insert((c, id));
                }
                if let Some(g) = g {
                    self.carry(c, started, g);
                }
            }
            "adder" => {
                let k = self.rng.below(1000) as i64;
                let calls = self.rng.range(1, 3) as u32;
                call(sim, self, "adder", vec![k.into()], Expect::Adder { k, calls }, kind);
            }
            "relay" => {
                let p2 = self.rng.pick(&providers);
                let target = method_at(&self.services[&(c.0, p2)], "echo").to_value();
                let x = random_value(&mut self.rng, 1);
                call(sim, self, "relay", vec![target, x.clone()], Expect::Exact(x), kind);
            }
            "burst" => {
                for _ in 0..self.rng.range(3, 10) {
                    let p = self.rng.pick(&providers);
                    let m = method_at(&self.services[&(c.0, p)], "echo");
                    let x = Value::from(self.rng.below(1 << 20));
                    let want = Expect::Exact(x.clone());
                    self.start(sim, c, "echo", want, move |e, now| {
                        e.call(now, &m, vec![x], None, CallOptions::default())
                    });
                }
            }
            "manager" => {
                if self.rng.chance(50) {
                    let x = random_value(&mut self.rng, 1);
                    let want = Expect::Exact(x.clone());
                    self.start(sim, c, "manager echo", want, move |e, now| {
                        e.call_manager(now, "echo", vec![x], None)
                    });
                } else {
                    self.start(sim, c, "list_services", Expect::Any, |e, now| {
                        e.call_manager(now, "list_services", vec![], None)
                    });
                }
            }
            "get_service" => {
                let id = match self.rng.below(3) {
                    0 => format!("{to}:w"),
                    1 => format!("{to}:x"),
                    _ => "nobody:w".to_string(),
                };
                self.start(sim, c, "get_service", Expect::Any, move |e, now| e.get_service(now, &id, None));
            }
            _ => {
                let client = &mut self.clients[c.0];
                client.extra = !client.extra;
                if client.extra {
                    sim.set_handler(c, "x", "ping", handler(|_: &Invocation| Reply::ok("pong")));
                    let spec = ServiceSpec::new("x").function("ping", FunctionSpec::new("ping"));
                    self.start(sim, c, "register", Expect::Any, move |e, now| e.register_service(now, spec));
                } else {
                    self.start(sim, c, "unregister", Expect::Any, |e, now| e.unregister_service(now, "x"));
                }
            }
        }
    }

    // ---- results -------------------------------------------------------------------------------

    /// Checks contracts of new events, then handles settled calls and advances flows.
    fn process(&mut self, sim: &mut Sim) -> Result<(), String> {
        self.scan_events(sim)?;
        let mut i = 0;
        while i < self.pending.len() {
            let p = &self.pending[i];
            if sim.is_blocked(p.c) {
                i += 1;
                continue;
            }
            match sim.settled(p.c, p.id) {
                Some(r) => {
                    let p = self.pending.remove(i);
                    self.settled(sim, p, r)?;
                }
                None => i += 1,
            }
        }
        Ok(())
    }

    fn scan_events(&mut self, sim: &Sim) -> Result<(), String> {
        for client in &mut self.clients {
            let events = sim.events(client.id);
            for (_, e) in &events[client.events_seen..] {
                match e {
                    Event::GeneratorClosed { generator } => {
                        let mut user = client.user.borrow_mut();
                        if user.gens.remove(generator).is_none() {
                            return Err(format!(
                                "{}: GeneratorClosed for {generator:?}, which ended or was closed before",
                                client.name
                            ));
                        }
                        user.finished_gens.insert(*generator);
                    }
                    Event::InvokeCancelled { id } => {
                        client.user.borrow_mut().cancelled.insert(*id);
                    }
                    Event::InterfaceDisposed { service, functions } => {
                        if !client.disposed.insert(service.clone()) {
                            return Err(format!("{}: {service} disposed of twice", client.name));
                        }
                        let mut user = client.user.borrow_mut();
                        for f in functions {
                            if let (COUNTER_INC, id) = fn_kind(*f) {
                                user.counters.remove(&id);
                            }
                        }
                    }
                    _ => {}
                }
            }
            client.events_seen = events.len();
        }
        Ok(())
    }

    fn settled(&mut self, sim: &mut Sim, p: Pending, r: Result<Value, CallError>) -> Result<(), String> {
        let name = self.clients[p.c.0].name.clone();
        self.count_outcome(outcome_name(&r));
        let wrong = |what: String| Err(format!("{name}: {} returned a wrong result: {what}", p.kind));
        if let Some(g) = p.carried {
            // The call settled: the generator it carried is gone with its session.
            self.clients[p.c.0].user.borrow_mut().gens.remove(&g);
        }
        match (&p.expect, &r) {
            (_, Err(e)) if !matches!(p.expect, Expect::Flow(_)) => {
                self.say(sim, format!("  {name} {}: {e}", p.kind));
                Ok(())
            }
            (Expect::Exact(want), Ok(got)) => {
                if got != want {
                    return wrong(format!("got {got:?}, want {want:?}"));
                }
                Ok(())
            }
            (Expect::Fail, Ok(got)) => wrong(format!("a failing function returned {got:?}")),
            (Expect::Blob { seed, len }, Ok(got)) => {
                let want = random_bytes(seed.wrapping_add(1), *len);
                match got.as_bin() {
                    Some(b) if *b == want => Ok(()),
                    Some(b) => wrong(format!("{} bytes that differ from the {len} sent", b.len())),
                    None => wrong(format!("not bytes: {}", got.kind())),
                }
            }
            (Expect::SumGen { len }, Ok(got)) => {
                let want = Value::from(vec![Value::from(*len), Value::from(len * len.saturating_sub(1) / 2)]);
                if *got != want {
                    return wrong(format!("got {got:?}, want {want:?}"));
                }
                Ok(())
            }
            (Expect::OpenGen { len, stop_at }, Ok(got)) => {
                let g = match Generator::from_value(got) {
                    Some(Ok(g)) => g,
                    _ => return wrong(format!("not a generator: {got:?}")),
                };
                let flow = Flow::Gen {
                    c: p.c,
                    g,
                    len: *len,
                    next: 0,
                    stop_at: *stop_at,
                    faulted: false,
                    closing: false,
                };
                self.begin(sim, flow);
                Ok(())
            }
            (Expect::Counter { incs }, Ok(got)) => self.use_counter(sim, p.c, got, *incs).or_else(wrong),
            (Expect::Bundle { incs, len, stop_at }, Ok(got)) => {
                let (Some(counter), Some(g)) =
                    (got.as_array().and_then(|a| a.first()), got.as_array().and_then(|a| a.get(1)))
                else {
                    return wrong(format!("not a pair: {got:?}"));
                };
                let Some(Ok(g)) = Generator::from_value(g) else {
                    return wrong(format!("not a generator: {g:?}"));
                };
                self.use_counter(sim, p.c, counter, *incs).or_else(wrong)?;
                let flow = Flow::Gen {
                    c: p.c,
                    g,
                    len: *len,
                    next: 0,
                    stop_at: *stop_at,
                    faulted: false,
                    closing: false,
                };
                self.begin(sim, flow);
                Ok(())
            }
            (Expect::Adder { k, calls }, Ok(got)) => {
                let f = match Method::from_value(got) {
                    Some(Ok(f)) => f,
                    _ => return wrong(format!("not a function: {got:?}")),
                };
                self.begin(sim, Flow::Adder { c: p.c, f, k: *k, left: *calls });
                Ok(())
            }
            (Expect::Any, Ok(_)) => Ok(()),
            (Expect::Flow(id), _) => {
                let id = *id;
                match self.flows.remove(&id) {
                    Some(flow) => self.advance(sim, id, flow, Some(r)),
                    None => Ok(()),
                }
            }
            (_, Err(_)) => unreachable!("handled above"),
        }
    }

    /// The user code got a counter `_rintf`: it uses it, then disposes of it.
    fn use_counter(&mut self, sim: &mut Sim, c: ClientId, obj: &Value, incs: u32) -> Result<(), String> {
        let Some(sid) = rintf_id(obj) else {
            return Err(format!("not an _rintf object: {obj:?}"));
        };
        self.clients[c.0].user.borrow_mut().received.insert(sid, sim.now());
        let flow =
            Flow::Counter { c, obj: obj.clone(), incs, last: 0, faulted: false, stage: CounterStage::Inc };
        self.begin(sim, flow);
        Ok(())
    }

    /// Records that the call `started` (if it did) carries the caller's generator `g`.
    fn carry(&mut self, c: ClientId, started: Option<CallId>, g: GenId) {
        match started {
            Some(id) => {
                let p = self.pending.iter_mut().rev().find(|p| p.c == c && p.id == id).expect("just started");
                p.carried = Some(g);
            }
            None => {
                self.clients[c.0].user.borrow_mut().gens.remove(&g);
            }
        }
    }

    fn begin(&mut self, sim: &mut Sim, flow: Flow) {
        self.next_flow += 1;
        let id = self.next_flow;
        if let Err(e) = self.advance(sim, id, flow, None) {
            unreachable!("a flow's first step cannot fail: {e}");
        }
    }

    /// Moves a flow on with the result of its last call (`None`: its first step).
    fn advance(
        &mut self,
        sim: &mut Sim,
        id: u64,
        mut flow: Flow,
        r: Option<Result<Value, CallError>>,
    ) -> Result<(), String> {
        let c = flow.client();
        let name = self.clients[c.0].name.clone();
        if let Some(Err(e)) = &r {
            self.say(sim, format!("  {name} flow {id}: {e}"));
        }
        // What to call next, if anything.
        let next: Option<(&'static str, Method, Vec<Value>)> = match &mut flow {
            Flow::Gen { g, len, next, stop_at, faulted, closing, .. } => {
                let close = Method {
                    target: g.target.clone(),
                    method: g.close_method.clone().unwrap_or_else(|| format!("{}:close", g.method)),
                    promise: g.promise,
                    ..Method::default()
                };
                let pull = Method {
                    target: g.target.clone(),
                    method: g.method.clone(),
                    promise: g.promise,
                    ..Method::default()
                };
                match r {
                    _ if *closing => {
                        if !matches!(r, Some(Ok(Value::Bool(true)))) {
                            self.leftover_gens.push((c, g.clone()));
                        }
                        None
                    }
                    None if *next >= *stop_at => {
                        *closing = true;
                        Some(("generator close", close, vec![]))
                    }
                    None => Some(("generator next", pull, vec![])),
                    Some(Ok(v)) if is_stop_iteration(&v) => {
                        if !*faulted && *next != *len {
                            return Err(format!("{name}: a generator of {len} items stopped after {next}"));
                        }
                        None
                    }
                    Some(Ok(v)) => {
                        let Some(item) = v.as_u64() else {
                            return Err(format!("{name}: a generator item is {v:?}"));
                        };
                        if item >= *len || item < *next || (!*faulted && item != *next) {
                            return Err(format!(
                                "{name}: generator item {item} where {next} was due (of {len}; after errors: {faulted})"
                            ));
                        }
                        *next = item + 1;
                        if *next >= *stop_at {
                            *closing = true;
                            Some(("generator close", close, vec![]))
                        } else {
                            Some(("generator next", pull, vec![]))
                        }
                    }
                    Some(Err(_)) => {
                        *faulted = true;
                        *closing = true;
                        Some(("generator close", close, vec![]))
                    }
                }
            }
            Flow::Counter { obj, incs, last, faulted, stage, .. } => {
                let dispose = ("rintf _dispose", method_at(obj, "_dispose"), vec![]);
                match (r, *stage) {
                    (None, _) => Some(self.counter_step(obj, incs, stage)),
                    (Some(Ok(v)), CounterStage::Inc) => {
                        let n = v.as_i64().unwrap_or(i64::MIN);
                        if n <= *last || (!*faulted && n != *last + 1) {
                            return Err(format!("{name}: counter.inc returned {v:?} after {last}"));
                        }
                        *last = n;
                        Some(self.counter_step(obj, incs, stage))
                    }
                    (Some(Ok(v)), CounterStage::Value) => {
                        let n = v.as_i64().unwrap_or(i64::MIN);
                        if n < *last || (!*faulted && n != *last) {
                            return Err(format!("{name}: counter.value returned {v:?} after {last}"));
                        }
                        *stage = CounterStage::Dispose;
                        Some(dispose)
                    }
                    (Some(Ok(_)), CounterStage::Dispose) => None,
                    (Some(Err(_)), CounterStage::Dispose) => {
                        self.leftover_rintf.push((c, obj.clone()));
                        None
                    }
                    (Some(Err(_)), _) => {
                        *faulted = true;
                        *stage = CounterStage::Dispose;
                        Some(dispose)
                    }
                }
            }
            Flow::Adder { f, k, left, .. } => {
                if let Some(Ok(v)) = &r {
                    let x = (id as i64) * 10;
                    if v.as_i64() != Some(x + *k) {
                        return Err(format!("{name}: the returned adder of {k} gave {v:?} for {x}"));
                    }
                }
                match r {
                    Some(Err(_)) => None,
                    _ if *left == 0 => None,
                    _ => {
                        *left -= 1;
                        Some(("returned function", f.clone(), vec![Value::from((id as i64) * 10)]))
                    }
                }
            }
        };
        if let Some((kind, m, args)) = next {
            let options = self.options();
            if self
                .start(sim, c, kind, Expect::Flow(id), move |e, now| e.call(now, &m, args, None, options))
                .is_some()
            {
                self.flows.insert(id, flow);
            } else {
                flow.abandon(self);
            }
        }
        Ok(())
    }

    fn counter_step(
        &self,
        obj: &Value,
        incs: &mut u32,
        stage: &mut CounterStage,
    ) -> (&'static str, Method, Vec<Value>) {
        if *incs > 0 {
            *incs -= 1;
            ("rintf inc", method_at(obj, "inc"), vec![])
        } else {
            *stage = CounterStage::Value;
            ("rintf value", method_at(obj, "value"), vec![])
        }
    }

    // ---- the end -------------------------------------------------------------------------------

    fn state(&self, sim: &Sim) -> String {
        let clients: Vec<String> = self
            .clients
            .iter()
            .map(|c| {
                let e = sim.engine(c.id);
                let mut line = format!(
                    "{}: {}{}{}{} ready {} link {} unsettled {} pending {} active {}/{} uploads {} partial {} \
                     exports {} interfaces {} generators {} queued {} next timer {:?}",
                    c.name,
                    if sim.is_dead(c.id) { "dead " } else { "" },
                    if sim.is_closed(c.id) { "closed " } else { "" },
                    if sim.is_blocked(c.id) { "blocked " } else { "" },
                    if c.provider { "provider" } else { "" },
                    e.is_ready(),
                    sim.link(c.id).is_some(),
                    sim.unsettled(c.id),
                    e.pending_calls(),
                    e.active_invocations(),
                    sim.open_invocations(c.id),
                    e.uploads(),
                    e.partial_messages(),
                    e.exports(),
                    e.interfaces(),
                    e.open_generators(),
                    e.queued_frames(),
                    e.poll_timeout(),
                );
                if !sim.is_dead(c.id) && !sim.is_closed(c.id) && !e.is_ready() {
                    let events = sim.events(c.id);
                    for (t, ev) in &events[events.len().saturating_sub(8)..] {
                        let mut ev = format!("{ev:?}");
                        ev.truncate(200);
                        line.push_str(&format!("\n      event at {t:?}: {ev}"));
                    }
                    let mine: Vec<_> =
                        sim.trace().iter().filter(|t| t.owner == Some(crate::sim::Owner::Client(c.id))).collect();
                    for t in &mine[mine.len().saturating_sub(10)..] {
                        let what = match (&t.what, t.frame()) {
                            (_, Some(f)) => format!(
                                "{} {}",
                                f.main_str("type").unwrap_or_default(),
                                f.main_str("method").unwrap_or_default()
                            ),
                            (HubOutput::Message(WsMessage::Text(x)), _) => x.chars().take(120).collect(),
                            (other, _) => format!("{other:?}"),
                        };
                        let ok = if t.delivered { "" } else { " (lost)" };
                        line.push_str(&format!("\n      {:?} {:?} {:?}{ok}: {what}", t.at, t.conn, t.dir));
                    }
                }
                line
            })
            .collect();
        let mut out = clients.join("\n  ");
        let waiting: Vec<String> = self
            .pending
            .iter()
            .filter(|p| sim.settled(p.c, p.id).is_none())
            .take(12)
            .map(|p| format!("{} {} {:?}", self.clients[p.c.0].name, p.kind, p.id))
            .collect();
        if !waiting.is_empty() {
            out.push_str(&format!("\n  unsettled calls of the workload: {}", waiting.join(", ")));
        }
        out
    }

    /// Runs until `done` holds, handling results and retrying reconnections every second.
    fn settle(
        &mut self,
        sim: &mut Sim,
        what: &str,
        limit: Duration,
        done: impl Fn(&Run, &Sim) -> bool,
    ) -> Result<(), String> {
        let deadline = sim.now() + limit;
        loop {
            self.process(sim)?;
            if done(self, sim) {
                return Ok(());
            }
            if sim.now() >= deadline {
                return Err(format!(
                    "{what}: not within {limit:?}; at {:?}:\n  {}",
                    sim.now(),
                    self.state(sim)
                ));
            }
            for c in self.live(sim) {
                if sim.link(c).is_none() {
                    sim.reconnect_after(c, Duration::ZERO);
                }
            }
            sim.run_for(SEC);
        }
    }

    /// Nothing left to do: no call or flow of the workload, every live client connected and
    /// serving no invocation, no message in flight, no reply or reconnection scheduled.
    fn idle(&self, sim: &Sim) -> bool {
        self.pending.is_empty()
            && self.flows.is_empty()
            && sim.in_flight() == 0
            && sim.pending_timers() == 0
            && self.live(sim).iter().all(|&c| {
                let e = sim.engine(c);
                e.is_ready() && e.active_invocations() == 0 && sim.open_invocations(c) == 0
            })
    }

    /// `_rintf` objects whose reply (or call) never reached user code cannot be disposed of by
    /// anyone: they live until their producer's link drops. Drops the link of every producer
    /// still holding some, and checks from its `InterfaceDisposed` events that those were
    /// all such orphans: none reached user code (which always disposes of what it gets).
    fn probe_interfaces(&mut self, sim: &mut Sim) -> Result<(), String> {
        let mut holders: BTreeMap<String, (ClientId, Instant)> = BTreeMap::new();
        for c in &self.clients {
            for (sid, at) in &c.user.borrow().received {
                holders.insert(sid.clone(), (c.id, *at));
            }
        }
        let mut probed = false;
        for c in self.live(sim) {
            let n = sim.engine(c).interfaces();
            if n == 0 {
                continue;
            }
            let name = self.clients[c.0].name.clone();
            self.say(sim, format!("END: {name} still serves {n} _rintf objects: drop its link to see which"));
            let from = sim.events(c).len();
            sim.drop_link(c);
            let gone: Vec<(String, Vec<FnId>)> = sim.events(c)[from..]
                .iter()
                .filter_map(|(_, e)| match e {
                    Event::InterfaceDisposed { service, functions } => {
                        Some((service.clone(), functions.clone()))
                    }
                    _ => None,
                })
                .collect();
            if gone.len() != n {
                return Err(format!("{name}: {n} interfaces, but {} disposed with the link", gone.len()));
            }
            // The invocations whose reply the engine refused.
            let refused: BTreeSet<InvokeId> = sim.reply_failures(c).iter().map(|(_, i, _)| *i).collect();
            for (sid, functions) in gone {
                for f in &functions {
                    match fn_kind(*f) {
                        (LISTENER, id) if self.refused_listeners.contains(&(c, id)) => {
                            return Err(format!(
                                "{name}: {sid} (listener {id}) outlived the call that carried it, which \
                                 the engine refused"
                            ));
                        }
                        (COUNTER_INC, id) => {
                            let origin = self.clients[c.0].user.borrow().origin.get(&id).copied();
                            if origin.is_some_and(|o| refused.contains(&o)) {
                                return Err(format!(
                                    "{name}: {sid} (counter {id}) outlived the reply that carried it, which \
                                     the engine refused"
                                ));
                            }
                        }
                        _ => {}
                    }
                }
                if let Some((holder, at)) = holders.get(&sid) {
                    let h = &self.clients[holder.0].name;
                    let state = if sim.is_dead(*holder) || sim.is_closed(*holder) {
                        "since left"
                    } else {
                        "still here"
                    };
                    // What the producer heard of its links and of the holder.
                    let full = sim.full_id(*holder);
                    let heard: Vec<String> = sim
                        .events(c)
                        .iter()
                        .filter_map(|(t, e)| match e {
                            Event::Connected { .. } => Some(format!("{t:?} connected")),
                            Event::Disconnected { .. } => Some(format!("{t:?} disconnected")),
                            Event::PeerDisconnected { peer } if *peer == full => {
                                Some(format!("{t:?} {h} left"))
                            }
                            _ => None,
                        })
                        .collect();
                    return Err(format!(
                        "{name}: {sid} outlived its holder's user code: {h} ({state}) received it (at {at:?}) \
                         and disposed of it (or left); {name} heard: {}",
                        heard.join(", ")
                    ));
                }
                self.count_outcome("orphaned _rintf (reply never reached user code)".into());
            }
            sim.reconnect_after(c, Duration::ZERO);
            probed = true;
        }
        if probed {
            self.settle(sim, "reconnected after the probe", 10 * 60 * SEC, Run::idle)?;
        }
        Ok(())
    }

    fn finish(&mut self, sim: &mut Sim) -> Result<(), String> {
        self.say(sim, "END: heal every link, let the work finish".into());
        self.spikes.clear();
        for c in &self.clients {
            if !sim.is_dead(c.id) {
                sim.set_latency(c.id, c.base_latency);
            }
        }
        let ready = |run: &Run, sim: &Sim| run.live(sim).iter().all(|&c| sim.engine(c).is_ready());
        self.settle(sim, "every live client reconnected", 10 * 60 * SEC, ready)?;
        let idle = Run::idle;
        self.settle(sim, "the workload's calls settled", 30 * 60 * SEC, idle)?;

        // The user code lets go of what it still holds.
        self.say(sim, "END: dispose of what the user code still holds".into());
        for (c, obj) in std::mem::take(&mut self.leftover_rintf) {
            if !sim.is_dead(c) && !sim.is_closed(c) {
                let m = method_at(&obj, "_dispose");
                self.start(sim, c, "cleanup _dispose", Expect::Any, move |e, now| {
                    e.call(now, &m, vec![], None, CallOptions::default())
                });
            }
        }
        for client in 0..self.clients.len() {
            let c = ClientId(client);
            if sim.is_dead(c) || sim.is_closed(c) {
                continue;
            }
            let held = std::mem::take(&mut self.clients[client].user.borrow_mut().held);
            for (_, obj) in held {
                let m = method_at(&obj, "_dispose");
                self.start(sim, c, "cleanup _dispose", Expect::Any, move |e, now| {
                    e.call(now, &m, vec![], None, CallOptions::default())
                });
            }
        }
        for (c, g) in std::mem::take(&mut self.leftover_gens) {
            if !sim.is_dead(c) && !sim.is_closed(c) {
                self.start(sim, c, "cleanup close", Expect::Any, move |e, now| e.generator_close(now, &g));
            }
        }
        self.settle(sim, "the clean-up calls settled", 10 * 60 * SEC, idle)?;

        // Every timeout and expiry passes.
        let longest = |f: &dyn Fn(&Client) -> Duration| self.clients.iter().map(f).max().unwrap_or_default();
        let wait = longest(&|c| c.limits.export_idle_expiry)
            + longest(&|c| c.limits.partial_message_expiry)
            + 2 * longest(&|c| c.method_timeout)
            + 10 * SEC;
        self.say(sim, format!("END: wait {wait:?} for every expiry"));
        sim.run_for(wait);
        self.settle(sim, "after the expiries", 10 * 60 * SEC, idle)?;
        // A client killed while its link was half-open is noticed by the hub only at its idle
        // timeout (600 s); then its peers hear of it and free what it held.
        let hub_clean =
            |run: &Run, sim: &Sim| run.idle(sim) && sim.hub.open_connections().len() == run.live(sim).len();
        self.settle(sim, "the hub closed the connections of vanished clients", 20 * 60 * SEC, hub_clean)?;

        self.probe_interfaces(sim)?;

        // A quiet minute: only keep-alives move (pings, and the engine's own periodic calls to
        // the manager, a few per client at most); nothing between clients.
        let mark = sim.trace().len();
        sim.run_for(60 * SEC);
        self.process(sim)?;
        let mut manager_frames: BTreeMap<ClientId, u64> = BTreeMap::new();
        let mut busy = Vec::new();
        for t in &sim.trace()[mark..] {
            if !matches!(t.what, HubOutput::Message(WsMessage::Binary(_))) {
                continue;
            }
            let f = t.frame();
            let peer = f.as_ref().and_then(|f| match t.dir {
                crate::sim::Dir::Up => f.main_str("to"),
                crate::sim::Dir::Down => f.main_str("from"),
            });
            if let (Some(p), Some(crate::sim::Owner::Client(c))) = (peer, t.owner) {
                if p.starts_with("*/") {
                    *manager_frames.entry(c).or_default() += 1;
                    continue;
                }
            }
            let m = f.as_ref().and_then(|f| f.main_str("method").or(f.main_str("type")).map(String::from));
            busy.push(format!("{:?} {:?} {:?} {}", t.at, t.owner, t.dir, m.unwrap_or_default()));
        }
        if !busy.is_empty() {
            busy.truncate(6);
            return Err(format!("frames still flow once all work is done: {busy:?}"));
        }
        if let Some((c, n)) = manager_frames.iter().find(|(_, n)| **n > 12) {
            return Err(format!(
                "{} exchanged {n} frames with the manager in a quiet minute",
                self.clients[c.0].name
            ));
        }

        if self.encryption {
            // Nothing the workload said to a service went over the wire readable: every call
            // of the workload's service that carried a payload carried only the envelope.
            for client in &self.clients {
                for (_, f) in sim.frames(client.id, crate::sim::Dir::Up) {
                    let to_service = f.main_str("method").is_some_and(|m| m.starts_with("services.w."));
                    if let (true, Some(extra)) = (to_service, &f.extra) {
                        if !extra.contains_key("_enc") || extra.contains_key("args") {
                            return Err(format!("{}: a call went out in clear: {extra:?}", client.name));
                        }
                    }
                }
            }
        }

        sim.finish();
        for client in &self.clients {
            let c = client.id;
            if sim.is_dead(c) || sim.is_closed(c) {
                continue;
            }
            let e = sim.engine(c);
            if !e.is_ready() {
                return Err(format!("{} is not connected at the end", client.name));
            }
            let held = [
                ("pending calls", e.pending_calls()),
                ("active invocations", e.active_invocations()),
                ("uploads", e.uploads()),
                ("partial messages", e.partial_messages()),
                ("exports", e.exports()),
                ("interfaces", e.interfaces()),
                ("open generators", e.open_generators()),
                ("queued frames", e.queued_frames()),
            ];
            for (what, n) in held {
                if n != 0 {
                    return Err(format!(
                        "{}: {n} {what} left once all work is done:\n  {}",
                        client.name,
                        self.state(sim)
                    ));
                }
            }
            // What the user code made and the engine never gave back: only generators and
            // counters whose reply was refused or went to a cancelled invocation.
            let user = client.user.borrow();
            let excused: BTreeSet<InvokeId> = sim
                .reply_failures(c)
                .iter()
                .map(|(_, i, _)| *i)
                .chain(user.cancelled.iter().copied())
                .collect();
            let made = user
                .gens
                .keys()
                .map(|g| ("generator", g.0))
                .chain(user.counters.keys().map(|k| ("counter", *k)));
            for (what, id) in made {
                if !user.origin.get(&id).is_some_and(|i| excused.contains(i)) {
                    return Err(format!(
                        "{}: {what} {id} is still alive for the user code, but the engine let go of it without a word",
                        client.name
                    ));
                }
            }
            if client.provider {
                let full = format!("{}:w", sim.full_id(c));
                let restore_failed = sim
                    .events(c)
                    .iter()
                    .rev()
                    .take_while(|(_, e)| !matches!(e, Event::Connected { .. }))
                    .any(|(_, e)| matches!(e, Event::ServiceRestoreFailed { .. }));
                if !restore_failed && !sim.hub.services().contains(&full) {
                    return Err(format!("{full} is not registered at the hub at the end"));
                }
            }
        }
        if sim.pending_timers() != 0 {
            return Err(format!(
                "{} scheduled replies or reconnections left at the end",
                sim.pending_timers()
            ));
        }
        // Frames the engines sent stay below their chunk threshold (the hub's own replies, such
        // as a long `list_services`, are not chunked by anyone).
        for t in sim.trace() {
            let (
                Some(crate::sim::Owner::Client(c)),
                crate::sim::Dir::Up,
                HubOutput::Message(WsMessage::Binary(b)),
            ) = (t.owner, t.dir, &t.what)
            else {
                continue;
            };
            let chunk = self.clients[c.0].chunk;
            if b.len() > chunk + FRAME_SLACK {
                return Err(format!(
                    "{} sent a frame of {} bytes with chunks of {chunk}",
                    self.clients[c.0].name,
                    b.len()
                ));
            }
        }
        self.say(sim, format!("END: passed, {} messages, hash {}", sim.trace().len(), sim.frame_hash()));
        Ok(())
    }
}

impl Client {
    /// Whether this client runs with the tight limits.
    fn tight(&self) -> bool {
        self.limits.max_generators < 32
    }
}

impl Flow {
    fn client(&self) -> ClientId {
        match self {
            Flow::Gen { c, .. } | Flow::Counter { c, .. } | Flow::Adder { c, .. } => *c,
        }
    }

    /// The next call could not start: whatever the flow holds is left for the clean-up.
    fn abandon(self, run: &mut Run) {
        match self {
            Flow::Gen { c, g, .. } => run.leftover_gens.push((c, g)),
            Flow::Counter { c, obj, .. } => run.leftover_rintf.push((c, obj)),
            Flow::Adder { .. } => {}
        }
    }
}

/// Puts the provider's key on every function descriptor of a fetched service, as the async
/// client's `get_encrypted_service` does.
fn attach_key(v: &mut Value, key: &[u8; 32]) {
    if let Value::Map(m) = v {
        if m.get("_rtype").and_then(Value::as_str) == Some("method") {
            m.insert("_renc_pub", Value::bin(Bytes::copy_from_slice(key)));
            return;
        }
        for (_, x) in m.iter_mut() {
            attach_key(x, key);
        }
    }
}
