//! Engine ↔ engine tests through the simulated hub, second part: large messages (chunking
//! through `message_cache`), generators and `_rintf` interfaces. Every test ends with
//! [`Sim::finish_clean`] (every call settled, nothing held by any engine) and checks that no
//! frame the hub saw was larger than the chunk size plus 2 KiB.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::Bytes;
use hypha_rpc_core::codec::rtype::{Generator, Method, PromiseMode, RTypeCodec, StopIteration};
use hypha_rpc_core::codec::{Frame, decode_frame};
use hypha_rpc_core::engine::{is_stop_iteration, local_function, local_generator};
use hypha_rpc_core::time::Duration;
use hypha_rpc_core::{
    CallError, CallId, EngineConfig, Event, FnId, FunctionSpec, GenId, Invocation, InvokeTarget, Limits, Map,
    ServiceSpec, Value,
};
use hypha_rpc_tests::hub::{HubConfig, HubOutput, WsMessage};
use hypha_rpc_tests::sim::{ClientId, Dir, Handler, Owner, Reply, Sim, handler, method_at};

const SEC: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);
/// The default chunk size (Python's).
const CHUNK: usize = 262_144;
/// A small chunk size, for the threshold and interleaving tests.
const SMALL_CHUNK: usize = 4096;
/// How much larger than the chunk size a frame may be (headers, the hub's rewrite).
const FRAME_SLACK: usize = 2048;

// ---------------------------------------------------------------------------------------------
// Helpers: clients.

fn config(name: &str, chunk: usize) -> EngineConfig {
    let mut c = EngineConfig::new(name);
    c.chunk_size = chunk;
    c
}

/// An anonymous client, connected (alone in its own workspace).
fn anon(sim: &mut Sim, config: EngineConfig) -> ClientId {
    let c = sim.add_client(config);
    sim.connect(c);
    c
}

/// A client joining `owner`'s workspace with a token `owner` minted.
fn join(sim: &mut Sim, owner: ClientId, mut config: EngineConfig) -> ClientId {
    let mut grant = Map::new();
    grant.insert("permission", "read_write");
    let call = sim.call_manager(owner, "generate_token", vec![Value::from(grant)], None);
    let token = sim.wait_ok(owner, call).as_str().expect("a token").to_string();
    config.token = Some(token);
    config.workspace = Some(sim.workspace(owner));
    let c = sim.add_client(config);
    sim.connect(c);
    c
}

fn fetch(sim: &mut Sim, c: ClientId, id: &str) -> Value {
    let call = sim.get_service(c, id);
    sim.wait_ok(c, call)
}

fn remote_message(r: &Result<Value, CallError>) -> String {
    match r {
        Err(CallError::Remote { message, .. }) => message.clone(),
        other => panic!("expected a remote error, got {other:?}"),
    }
}

/// The end of every test: all calls settled, nothing held anywhere, no frame over the cap.
fn done(sim: &mut Sim, chunk: usize) {
    sim.run_for(SEC); // whatever is still in flight lands
    sim.finish_clean();
    check_frame_sizes(sim, chunk);
}

fn check_frame_sizes(sim: &Sim, chunk: usize) {
    let largest = sim.largest_frame();
    assert!(largest <= chunk + FRAME_SLACK, "a frame of {largest} bytes with chunk size {chunk}");
}

/// Binary frames `c` sent (any of its links), with their encoded length, in order.
fn sent_frames(sim: &Sim, c: ClientId) -> Vec<(usize, Frame)> {
    sim.trace()
        .iter()
        .filter(|t| t.dir == Dir::Up && t.owner == Some(Owner::Client(c)))
        .filter_map(|t| match &t.what {
            HubOutput::Message(WsMessage::Binary(b)) => {
                Some((b.len(), decode_frame(b, &Limits::default()).expect("a valid frame")))
            }
            _ => None,
        })
        .collect()
}

/// Frames `c` sent calling its peer's `message_cache.<op>`.
fn cache_calls(sim: &Sim, c: ClientId, op: &str) -> Vec<Frame> {
    let method = format!("services.built-in.message_cache.{op}");
    sent_frames(sim, c)
        .into_iter()
        .filter(|(_, f)| f.main_str("method") == Some(method.as_str()))
        .map(|(_, f)| f)
        .collect()
}

/// Arguments of a frame's call.
fn args(f: &Frame) -> &[Value] {
    f.extra.as_ref().and_then(|e| e.get("args")).and_then(Value::as_array).unwrap_or(&[])
}

/// Keys of the `message_cache.set` calls delivered to `c`, in arrival order.
fn set_keys_received(sim: &Sim, c: ClientId) -> Vec<String> {
    sim.frames(c, Dir::Down)
        .iter()
        .filter(|(_, f)| f.main_str("method") == Some("services.built-in.message_cache.set"))
        .map(|(_, f)| args(f)[0].as_str().expect("a key").to_string())
        .collect()
}

/// `true` when some key's chunks are interrupted by another key's and then resume.
fn interleaved(keys: &[String]) -> bool {
    keys.iter().enumerate().any(|(i, k)| {
        let other = keys[i + 1..].iter().position(|x| x != k);
        other.is_some_and(|o| keys[i + 1 + o..].contains(k))
    })
}

// ---------------------------------------------------------------------------------------------
// Helpers: random payloads.

/// `len` bytes from a seeded splitmix64.
fn random_bytes(seed: u64, len: usize) -> Bytes {
    let mut state = seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(len as u64);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// Where `got` first differs from `want` (a length difference counts), if anywhere.
fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    if got == want {
        return None;
    }
    Some(got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len())))
}

/// `blob.exchange(data, seed_in, reply_len, seed_out)`: checks that `data` is
/// `random_bytes(seed_in, len)` byte for byte, then returns `random_bytes(seed_out, reply_len)`.
fn blob_service() -> (ServiceSpec, Vec<(&'static str, Handler)>) {
    let spec = ServiceSpec::new("blob").function("exchange", FunctionSpec::new("exchange"));
    let exchange = handler(|inv: &Invocation| {
        let data = inv.args[0].as_bin().expect("bytes");
        let seed_in = inv.args[1].as_u64().expect("seed_in");
        let reply_len = inv.args[2].as_u64().expect("reply_len") as usize;
        let seed_out = inv.args[3].as_u64().expect("seed_out");
        if let Some(i) = first_difference(data, &random_bytes(seed_in, data.len())) {
            return Reply::error(format!("request differs at byte {i} of {}", data.len()));
        }
        Reply::ok(Value::bin(random_bytes(seed_out, reply_len)))
    });
    (spec, vec![("exchange", exchange)])
}

fn serve_blob(sim: &mut Sim, c: ClientId) {
    let (spec, handlers) = blob_service();
    let reg = sim.register(c, spec, handlers);
    sim.wait_ok(c, reg);
}

/// Starts `from` sending `up` random bytes (seed `seed`) to `svc.exchange` and asking for
/// `down` bytes back (seed `seed + 1`).
fn start_exchange(sim: &mut Sim, from: ClientId, svc: &Value, up: usize, down: usize, seed: u64) -> CallId {
    let args = vec![Value::bin(random_bytes(seed, up)), seed.into(), down.into(), (seed + 1).into()];
    sim.call(from, &method_at(svc, "exchange"), args, None)
}

/// Checks the answer of [`start_exchange`].
fn check_exchange(sim: &mut Sim, from: ClientId, call: CallId, up: usize, down: usize, seed: u64) {
    let v = sim.wait_ok(from, call);
    let got = v.as_bin().unwrap_or_else(|| panic!("not bytes: {:?}", v.kind()));
    if let Some(i) = first_difference(got, &random_bytes(seed + 1, down)) {
        panic!("{up} B up / {down} B down: the reply ({} B) differs at byte {i}", got.len());
    }
}

fn exchange(sim: &mut Sim, from: ClientId, svc: &Value, up: usize, down: usize, seed: u64) {
    let call = start_exchange(sim, from, svc, up, down, seed);
    check_exchange(sim, from, call, up, down, seed);
}

/// Two clients of one workspace, both serving `blob`, with chunk size `chunk`; each holds the
/// other's `blob` service.
fn blob_pair(chunk: usize, limits: Option<Limits>) -> (Sim, ClientId, ClientId, Value, Value) {
    let mut sim = Sim::new(HubConfig::default());
    let mut ca = config("alice", chunk);
    let mut cb = config("bob", chunk);
    if let Some(l) = limits {
        ca.limits = l.clone();
        cb.limits = l;
    }
    let a = anon(&mut sim, ca);
    let b = join(&mut sim, a, cb);
    serve_blob(&mut sim, a);
    serve_blob(&mut sim, b);
    let a_blob = fetch(&mut sim, b, "alice:blob");
    let b_blob = fetch(&mut sim, a, "bob:blob");
    (sim, a, b, a_blob, b_blob)
}

// ---------------------------------------------------------------------------------------------
// Large messages.

/// A payload length whose frame is exactly `frame_len`, given a probe: a frame of
/// `probe_frame` bytes carried `probe_payload` bytes (both bin16 sized).
fn payload_for(frame_len: usize, probe_frame: usize, probe_payload: usize) -> usize {
    frame_len - (probe_frame - probe_payload)
}

#[test]
fn messages_around_the_chunk_threshold_arrive_intact_both_ways() {
    let (mut sim, a, b, _, b_blob) = blob_pair(SMALL_CHUNK, None);
    let threshold = SMALL_CHUNK + 1024;

    // 0 B and 1 B both ways.
    for (up, down) in [(0, 0), (1, 1), (0, 1), (1, 0)] {
        exchange(&mut sim, a, &b_blob, up, down, 11);
    }
    assert!(cache_calls(&sim, a, "create").is_empty() && cache_calls(&sim, b, "create").is_empty());

    // Probes (1000 B each way) give the frame overheads of a request and of a reply.
    const PROBE: usize = 1000;
    exchange(&mut sim, a, &b_blob, PROBE, 16, 21);
    let request = sent_frames(&sim, a)
        .into_iter()
        .rfind(|(_, f)| f.main_str("method") == Some("services.blob.exchange"))
        .expect("the request")
        .0;
    exchange(&mut sim, a, &b_blob, 0, PROBE, 31);
    let reply = sent_frames(&sim, b)
        .into_iter()
        .rfind(|(_, f)| f.main_str("method").is_some_and(|m| m.ends_with(".resolve")))
        .expect("the reply")
        .0;

    for delta in [-1i64, 0, 1] {
        let frame_len = (threshold as i64 + delta) as usize;
        let chunked = delta > 0;

        // Request of exactly `frame_len` bytes.
        let up = payload_for(frame_len, request, PROBE);
        let before = cache_calls(&sim, a, "create").len();
        exchange(&mut sim, a, &b_blob, up, 16, 21);
        let uploads = cache_calls(&sim, a, "create").len() - before;
        assert_eq!(uploads, usize::from(chunked), "request frame of {frame_len} B");
        if chunked {
            let sets = cache_calls(&sim, a, "set");
            let sizes: Vec<usize> = sets.iter().map(|f| args(f)[2].as_bin().unwrap().len()).collect();
            assert_eq!(sizes, [SMALL_CHUNK, frame_len - SMALL_CHUNK], "raw slices of the frame");
        } else {
            let direct = sent_frames(&sim, a)
                .into_iter()
                .rfind(|(_, f)| f.main_str("method") == Some("services.blob.exchange"))
                .unwrap();
            assert_eq!(direct.0, frame_len, "the probe arithmetic");
        }

        // Reply of exactly `frame_len` bytes.
        let down = payload_for(frame_len, reply, PROBE);
        let before = cache_calls(&sim, b, "create").len();
        exchange(&mut sim, a, &b_blob, 0, down, 31);
        let creates = cache_calls(&sim, b, "create");
        assert_eq!(creates.len() - before, usize::from(chunked), "reply frame of {frame_len} B");
        if chunked {
            // Keyed by the caller's session, with heartbeat = true.
            let session = sent_frames(&sim, a)
                .into_iter()
                .rfind(|(_, f)| f.main_str("method") == Some("services.blob.exchange"))
                .and_then(|(_, f)| f.main_str("session").map(String::from))
                .unwrap();
            let create = creates.last().unwrap();
            assert_eq!(args(create), [Value::from(session.as_str()), Value::Bool(true)]);
        } else {
            let direct = sent_frames(&sim, b)
                .into_iter()
                .rfind(|(_, f)| f.main_str("method").is_some_and(|m| m.ends_with(".resolve")))
                .unwrap();
            assert_eq!(direct.0, frame_len, "the probe arithmetic");
        }
    }
    done(&mut sim, SMALL_CHUNK);
}

#[test]
fn five_megabytes_both_ways_at_the_default_chunk_size() {
    let (mut sim, a, b, a_blob, b_blob) = blob_pair(CHUNK, None);
    const MB5: usize = 5_000_000;
    for (from, svc) in [(a, &b_blob), (b, &a_blob)] {
        for (up, down) in [(0, MB5), (MB5, 0), (1, MB5), (MB5, MB5)] {
            exchange(&mut sim, from, svc, up, down, 41);
        }
    }
    // 5 MB is 20 chunks of 256 KiB (the last one shorter).
    let sets = cache_calls(&sim, a, "set");
    let first: Vec<usize> = sets.iter().take(20).map(|f| args(f)[2].as_bin().unwrap().len()).collect();
    assert!(first[..19].iter().all(|n| *n == CHUNK), "{first:?}");
    done(&mut sim, CHUNK);
}

#[test]
fn fifty_megabytes_both_ways_at_the_default_chunk_size() {
    let (mut sim, a, b, _, b_blob) = blob_pair(CHUNK, None);
    const MB50: usize = 50_000_000;
    let started = std::time::Instant::now();
    exchange(&mut sim, a, &b_blob, MB50, MB50, 51);
    println!("50 MB each way through the sim in {:?}", started.elapsed());
    let sets = cache_calls(&sim, a, "set").len() + cache_calls(&sim, b, "set").len();
    assert_eq!(sets, 2 * MB50.div_ceil(CHUNK), "191 chunks each way");
    done(&mut sim, CHUNK);
}

#[test]
fn two_concurrent_large_calls_interleave_their_chunks() {
    let (mut sim, a, b, _, b_blob) = blob_pair(SMALL_CHUNK, None);
    let c = join(&mut sim, a, config("carol", SMALL_CHUNK));
    let c_b_blob = fetch(&mut sim, c, "bob:blob");
    for x in [a, b, c] {
        sim.set_latency(x, MS);
    }
    const N: usize = 200_000; // 49 chunks of 4 KiB, more than one window of 30
    let first = start_exchange(&mut sim, a, &b_blob, N, N, 61);
    let second = start_exchange(&mut sim, a, &b_blob, N + 1, N - 1, 63);
    let third = start_exchange(&mut sim, c, &c_b_blob, N - 1, N + 1, 65);
    sim.run_until(|s: &Sim| s.engine(b).partial_messages() == 3);
    assert_eq!(sim.engine(a).uploads(), 2);
    check_exchange(&mut sim, a, first, N, N, 61);
    check_exchange(&mut sim, a, second, N + 1, N - 1, 63);
    check_exchange(&mut sim, c, third, N - 1, N + 1, 65);

    // Bob received the chunks of the three requests mixed, and alice those of her two replies.
    let at_bob = set_keys_received(&sim, b);
    let keys: std::collections::BTreeSet<_> = at_bob.iter().collect();
    assert_eq!(keys.len(), 3);
    assert!(interleaved(&at_bob), "bob got the requests one after the other");
    assert!(interleaved(&set_keys_received(&sim, a)), "alice got the replies one after the other");
    done(&mut sim, SMALL_CHUNK);
}

/// Alice starts a 400 kB call to bob (chunks of 4 KiB, 1 ms latency) and runs until bob holds
/// part of it.
fn half_sent_message() -> (Sim, ClientId, ClientId, CallId) {
    let (mut sim, a, b, _, b_blob) = blob_pair(SMALL_CHUNK, None);
    sim.set_latency(a, MS);
    sim.set_latency(b, MS);
    let call = start_exchange(&mut sim, a, &b_blob, 400_000, 16, 71);
    sim.run_until(|s: &Sim| set_keys_received(s, b).len() >= 20);
    assert_eq!(sim.engine(b).partial_messages(), 1);
    assert_eq!(sim.engine(a).uploads(), 1);
    (sim, a, b, call)
}

#[test]
fn a_sender_vanishing_mid_message_frees_the_partial_message_at_once() {
    let (mut sim, a, b, call) = half_sent_message();
    let t0 = sim.now();
    sim.drop_link(a);
    sim.run_for(10 * MS); // the client_disconnected event reaches bob
    assert_eq!(sim.engine(b).partial_messages(), 0, "freed by the disconnection, not the expiry");
    assert!(sim.events(b).iter().any(|(_, e)| matches!(e, Event::PeerDisconnected { .. })));

    // Alice's call fails at once: its request can never be completed on a new connection.
    let r = sim.wait(a, call);
    assert!(matches!(r, Err(CallError::ConnectionLost { .. })), "{r:?}");
    assert!(sim.settled_at(a, call).unwrap() < t0 + SEC, "failed at once, not at the timeout");
    sim.reconnect(a);
    done(&mut sim, SMALL_CHUNK);
}

#[test]
fn a_sender_cut_off_mid_upload_frees_its_upload() {
    // The sender of a large request.
    let (mut sim, a, _b, call) = half_sent_message();
    sim.drop_link(a);
    let r = sim.wait(a, call);
    assert!(r.is_err(), "{r:?}");
    sim.reconnect(a);
    sim.run_for(10 * SEC);
    assert_eq!(
        sim.engine(a).uploads(),
        0,
        "the request upload can never finish: its chunk calls were dropped"
    );
    done(&mut sim, SMALL_CHUNK);

    // The sender of a large reply.
    let (mut sim, a, b, _, b_blob) = blob_pair(SMALL_CHUNK, None);
    sim.set_latency(a, MS);
    sim.set_latency(b, MS);
    let call = start_exchange(&mut sim, a, &b_blob, 16, 400_000, 73);
    sim.run_until(|s: &Sim| set_keys_received(s, a).len() >= 20);
    sim.drop_link(b);
    let r = sim.wait(a, call);
    assert_eq!(r, Err(CallError::PeerDisconnected { peer: sim.full_id(b) }));
    sim.reconnect(b);
    sim.run_for(10 * SEC);
    assert_eq!(sim.engine(b).uploads(), 0, "the reply upload can never finish: its chunk calls were dropped");
    done(&mut sim, SMALL_CHUNK);
}

#[test]
fn a_receiver_vanishing_mid_message_fails_the_call_at_once_and_frees_the_upload() {
    let (mut sim, a, b, call) = half_sent_message();
    let t0 = sim.now();
    sim.drop_link(b);
    let r = sim.wait(a, call);
    assert_eq!(r, Err(CallError::PeerDisconnected { peer: sim.full_id(b) }));
    assert!(sim.settled_at(a, call).unwrap() <= t0 + 10 * MS, "at once, not at the timeout");
    assert_eq!(sim.engine(a).uploads(), 0);
    assert_eq!(sim.engine(b).partial_messages(), 1, "bob has no link: nothing told him yet");
    sim.reconnect(b);
    // Bob's stale buffer goes with the expiry (alice's remove call could not reach him).
    sim.run_for(Limits::default().partial_message_expiry + SEC);
    done(&mut sim, SMALL_CHUNK);
}

#[test]
fn a_stalled_partial_message_expires_after_120_s() {
    let (mut sim, a, b, call) = half_sent_message();
    // A half-open link: the hub does not notice, so nobody tells bob.
    sim.cut_link(a);
    sim.run_for(10 * MS);
    let last_chunk = sim
        .frames(b, Dir::Down)
        .iter()
        .rfind(|(_, f)| f.main_str("method") == Some("services.built-in.message_cache.set"))
        .map(|(t, _)| *t)
        .unwrap();
    let expiry = Limits::default().partial_message_expiry;
    sim.run_until(last_chunk + (expiry - MS));
    assert_eq!(sim.engine(b).partial_messages(), 1, "still within the expiry");
    sim.run_until(last_chunk + expiry);
    assert_eq!(sim.engine(b).partial_messages(), 0, "expired {expiry:?} after the last chunk");

    let r = sim.wait(a, call);
    assert!(r.is_err(), "{r:?}");
    sim.reconnect(a);
    done(&mut sim, SMALL_CHUNK);
}

#[test]
fn messages_over_the_receivers_limits_are_refused_and_freed() {
    let mut by_size = Limits::default();
    by_size.max_message_bytes = 100_000;
    let mut by_chunks = Limits::default();
    by_chunks.max_chunks_per_message = 10;
    for (limits, refusal) in [(by_size, "exceeds 100000 bytes"), (by_chunks, "over the limit of 10")] {
        let (mut sim, a, b, _, b_blob) = blob_pair(SMALL_CHUNK, Some(limits));
        let call = start_exchange(&mut sim, a, &b_blob, 150_000, 16, 81);
        let r = sim.wait(a, call);
        assert!(remote_message(&r).contains(refusal), "{r:?}");
        assert_eq!(sim.invocations(b).len(), 0, "no user code ran");
        assert_eq!(cache_calls(&sim, a, "remove").len(), 1, "the sender asked to free the buffer");
        assert_eq!((sim.engine(a).uploads(), sim.engine(b).partial_messages()), (0, 0));
        // The other direction: a reply too large for alice fails her call, though only at
        // its timeout (see `a_reply_too_large_for_the_caller_fails_the_call_at_once`).
        let t0 = sim.now();
        let call = start_exchange(&mut sim, a, &b_blob, 16, 150_000, 83);
        let r = sim.wait(a, call);
        assert!(r.is_err(), "{r:?}");
        println!(
            "{refusal}: a refused reply failed the call after {:?}: {r:?}",
            sim.now().saturating_duration_since(t0)
        );
        assert_eq!((sim.engine(b).uploads(), sim.engine(a).partial_messages()), (0, 0));
        // Below the limits, all is well.
        exchange(&mut sim, a, &b_blob, 30_000, 30_000, 85);
        done(&mut sim, SMALL_CHUNK);
    }
}

#[test]
fn a_reply_too_large_for_the_caller_fails_the_call_at_once() {
    let mut limits = Limits::default();
    limits.max_message_bytes = 100_000;
    let (mut sim, a, _b, _, b_blob) = blob_pair(SMALL_CHUNK, Some(limits));
    let t0 = sim.now();
    let call = start_exchange(&mut sim, a, &b_blob, 16, 150_000, 83);
    let r = sim.wait(a, call);
    // Our own limit refused the reply: a local refusal of the peer's answer, not a remote error.
    assert!(matches!(&r, Err(CallError::BadReply(m)) if m.contains("exceeds 100000 bytes")), "{r:?}");
    assert!(sim.settled_at(a, call).unwrap() < t0 + SEC, "failed at once, not at the 30 s timeout");
    done(&mut sim, SMALL_CHUNK);
}

#[test]
fn too_many_concurrent_partial_messages_are_refused() {
    let mut limits = Limits::default();
    limits.max_partial_messages = 2;
    let (mut sim, a, b, _, b_blob) = blob_pair(SMALL_CHUNK, Some(limits));
    sim.set_latency(a, MS);
    sim.set_latency(b, MS);
    let calls: Vec<(CallId, u64)> = (0..3u64)
        .map(|i| (start_exchange(&mut sim, a, &b_blob, 50_000, 16, 91 + 2 * i), 91 + 2 * i))
        .collect();
    let mut refused = Vec::new();
    for (i, (call, seed)) in calls.iter().enumerate() {
        match sim.wait(a, *call) {
            Ok(v) => assert_eq!(first_difference(v.as_bin().unwrap(), &random_bytes(seed + 1, 16)), None),
            Err(e) => {
                assert!(remote_message(&Err(e)).contains("Too many partial messages (limit 2)"));
                refused.push(i);
            }
        }
    }
    assert_eq!(refused, [2], "the third of three concurrent uploads is refused");
    assert_eq!(sim.invocations(b).len(), 2);
    // Once the others are through, there is room again.
    exchange(&mut sim, a, &b_blob, 50_000, 16, 99);
    done(&mut sim, SMALL_CHUNK);
}

// ---------------------------------------------------------------------------------------------
// Generators.

/// What a producer's generators do: yield `0..len`, raising once at `raise_at`.
#[derive(Debug, Clone, Copy)]
struct Plan {
    pos: u64,
    len: u64,
    raise_at: Option<u64>,
}

/// The producer's user code: a `gen` service whose `count(n, raise_at?)` returns a new local
/// generator, and the generators themselves (served through the callback handler).
#[derive(Default)]
struct Producer {
    next: u64,
    live: BTreeMap<GenId, Plan>,
    pulls: u64,
}

impl Producer {
    fn start(&mut self, len: u64, raise_at: Option<u64>) -> GenId {
        self.next += 1;
        let id = GenId(self.next);
        self.live.insert(id, Plan { pos: 0, len, raise_at });
        id
    }

    fn pull(&mut self, generator: GenId) -> Reply {
        self.pulls += 1;
        let Some(p) = self.live.get_mut(&generator) else {
            return Reply::error(format!("unknown generator {generator:?}"));
        };
        if p.raise_at == Some(p.pos) {
            p.raise_at = None;
            return Reply::error(format!("boom at item {}", p.pos));
        }
        if p.pos < p.len {
            p.pos += 1;
            Reply::ok(p.pos - 1)
        } else {
            self.live.remove(&generator);
            Reply::Ok(StopIteration.to_value())
        }
    }
}

/// Installs a [`Producer`] on `c`: the `gen` service and the generator pulls.
fn serve_generators(sim: &mut Sim, c: ClientId) -> Rc<RefCell<Producer>> {
    let state = Rc::new(RefCell::new(Producer::default()));
    let s = state.clone();
    let count = handler(move |inv: &Invocation| {
        let n = inv.args[0].as_u64().expect("n");
        let raise_at = inv.args.get(1).and_then(Value::as_u64);
        Reply::Ok(local_generator(s.borrow_mut().start(n, raise_at)))
    });
    let spec = ServiceSpec::new("gen").function("count", FunctionSpec::new("count"));
    let reg = sim.register(c, spec, vec![("count", count)]);
    sim.wait_ok(c, reg);
    let s = state.clone();
    sim.on_callback(
        c,
        handler(move |inv: &Invocation| match inv.target {
            InvokeTarget::GeneratorNext { generator } => s.borrow_mut().pull(generator),
            ref other => Reply::error(format!("unexpected {other:?}")),
        }),
    );
    state
}

/// A producer (alice, serving `gen`) and a consumer (bob) holding alice's `gen`, both with
/// link latency `latency` (the hub's rate limit allows 200 frames/s: long streams need time).
fn generator_world(latency: Duration) -> (Sim, ClientId, ClientId, Rc<RefCell<Producer>>, Value) {
    let mut sim = Sim::new(HubConfig::default());
    let p = anon(&mut sim, EngineConfig::new("alice"));
    let state = serve_generators(&mut sim, p);
    let c = join(&mut sim, p, EngineConfig::new("bob"));
    let gen_svc = fetch(&mut sim, c, "alice:gen");
    sim.set_latency(p, latency);
    sim.set_latency(c, latency);
    (sim, p, c, state, gen_svc)
}

fn open_generator(sim: &mut Sim, c: ClientId, svc: &Value, args: Vec<Value>) -> Generator {
    let call = sim.call(c, &method_at(svc, "count"), args, None);
    let v = sim.wait_ok(c, call);
    Generator::from_value(&v).unwrap_or_else(|| panic!("not a generator: {v:?}")).expect("valid")
}

/// Pulls every item of `g` (sequentially) until `stop_iteration`.
fn pull_all(sim: &mut Sim, c: ClientId, g: &Generator) -> Vec<u64> {
    let mut items = Vec::new();
    loop {
        let id = sim.generator_next(c, g);
        let v = sim.wait_ok(c, id);
        if is_stop_iteration(&v) {
            return items;
        }
        items.push(v.as_u64().unwrap_or_else(|| panic!("not an item: {v:?}")));
    }
}

fn generator_closed_events(sim: &Sim, c: ClientId) -> Vec<GenId> {
    sim.events(c)
        .iter()
        .filter_map(|(_, e)| match e {
            Event::GeneratorClosed { generator } => Some(*generator),
            _ => None,
        })
        .collect()
}

#[test]
fn generators_of_0_1_and_10_000_items_stream_in_order_and_free_their_producer() {
    let (mut sim, p, c, state, svc) = generator_world(2 * MS);
    for n in [0u64, 1, 10_000] {
        let g = open_generator(&mut sim, c, &svc, vec![n.into()]);
        assert_eq!(g.target, sim.full_id(p));
        assert_eq!(sim.engine(p).exports(), 1, "the generator lives in an export of alice's");
        let pulls = state.borrow().pulls;
        let items = pull_all(&mut sim, c, &g);
        assert_eq!(items, (0..n).collect::<Vec<_>>(), "{n} items");
        assert_eq!(state.borrow().pulls - pulls, n + 1, "one pull per item and one for the end");
        assert_eq!(sim.engine(p).exports(), 0, "freed at its end");
        // The end is final: another pull is refused without reaching user code.
        let again = sim.generator_next(c, &g);
        let r = sim.wait(c, again);
        assert!(remote_message(&r).contains("not found"), "{r:?}");
        assert_eq!(state.borrow().pulls - pulls, n + 1);
    }
    assert!(generator_closed_events(&sim, p).is_empty(), "exhausted generators are not reported closed");
    assert!(state.borrow().live.is_empty());
    done(&mut sim, CHUNK);
}

#[test]
fn closing_a_generator_early_frees_it_at_the_producer() {
    let (mut sim, p, c, state, svc) = generator_world(Duration::ZERO);
    let g = open_generator(&mut sim, c, &svc, vec![100.into()]);
    for want in 0..3u64 {
        let id = sim.generator_next(c, &g);
        assert_eq!(sim.wait_ok(c, id), Value::from(want));
    }
    let close = sim.generator_close(c, &g);
    assert_eq!(sim.wait_ok(c, close), Value::Bool(true));
    assert_eq!(generator_closed_events(&sim, p), [GenId(1)]);
    assert_eq!(sim.engine(p).exports(), 0);
    // Pulling after the close is refused.
    let next = sim.generator_next(c, &g);
    let r = sim.wait(c, next);
    assert!(remote_message(&r).contains("not found"), "{r:?}");
    assert_eq!(generator_closed_events(&sim, p), [GenId(1)], "reported once");
    assert_eq!(state.borrow().pulls, 3);
    state.borrow_mut().live.clear(); // the user code drops it on GeneratorClosed
    done(&mut sim, CHUNK);
}

#[test]
fn closing_a_generator_twice_or_after_its_end_is_harmless() {
    let (mut sim, p, c, _state, svc) = generator_world(Duration::ZERO);
    let g = open_generator(&mut sim, c, &svc, vec![5.into()]);
    for _ in 0..2 {
        let close = sim.generator_close(c, &g);
        assert_eq!(sim.wait(c, close), Ok(Value::Bool(true)), "closing twice");
    }
    let ended = open_generator(&mut sim, c, &svc, vec![1.into()]);
    assert_eq!(pull_all(&mut sim, c, &ended), [0]);
    let close = sim.generator_close(c, &ended);
    assert_eq!(sim.wait(c, close), Ok(Value::Bool(true)), "closing after the end");
    assert_eq!(generator_closed_events(&sim, p), [GenId(1)], "reported once, and not for the ended one");
    done(&mut sim, CHUNK);
}

#[test]
fn a_producer_raising_rejects_that_pull_and_the_consumer_can_still_close() {
    let (mut sim, p, c, state, svc) = generator_world(Duration::ZERO);
    let g = open_generator(&mut sim, c, &svc, vec![10.into(), 2.into()]);
    for want in 0..2u64 {
        let id = sim.generator_next(c, &g);
        assert_eq!(sim.wait_ok(c, id), Value::from(want));
    }
    let id = sim.generator_next(c, &g);
    match sim.wait(c, id) {
        Err(CallError::Remote { message, trace }) => {
            assert_eq!(message, "boom at item 2");
            assert!(trace.is_some_and(|t| t.contains("Exception: boom at item 2")));
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    assert_eq!(sim.engine(p).exports(), 1, "the generator stays open after raising, as in Python");
    // The generator still works after the error (this one resumes where it was) ...
    let id = sim.generator_next(c, &g);
    assert_eq!(sim.wait_ok(c, id), Value::from(2u64));
    // ... and the consumer closes it, as Python's consumer does after re-raising.
    let close = sim.generator_close(c, &g);
    assert_eq!(sim.wait_ok(c, close), Value::Bool(true));
    assert_eq!(generator_closed_events(&sim, p), [GenId(1)]);
    assert_eq!(sim.engine(p).exports(), 0);
    state.borrow_mut().live.clear();
    done(&mut sim, CHUNK);
}

#[test]
fn a_consumer_leaving_closes_its_generators() {
    let (mut sim, p, c, state, svc) = generator_world(Duration::ZERO);
    let g1 = open_generator(&mut sim, c, &svc, vec![5.into()]);
    let _g2 = open_generator(&mut sim, c, &svc, vec![5.into()]);
    let id = sim.generator_next(c, &g1);
    sim.wait_ok(c, id);
    assert_eq!(sim.engine(p).exports(), 2);
    sim.drop_link(c);
    let mut closed = generator_closed_events(&sim, p);
    closed.sort();
    assert_eq!(closed, [GenId(1), GenId(2)]);
    assert_eq!(sim.engine(p).exports(), 0);
    state.borrow_mut().live.clear();
    sim.reconnect(c);
    done(&mut sim, CHUNK);
}

#[test]
fn only_the_consumer_may_pull_a_generator() {
    let (mut sim, p, c, state, svc) = generator_world(Duration::ZERO);
    let g = open_generator(&mut sim, c, &svc, vec![3.into()]);
    let stranger = join(&mut sim, p, EngineConfig::new("mallory"));
    for close in [false, true] {
        let id = if close { sim.generator_close(stranger, &g) } else { sim.generator_next(stranger, &g) };
        let r = sim.wait(stranger, id);
        assert!(remote_message(&r).contains("Access denied"), "{r:?}");
    }
    assert_eq!(state.borrow().pulls, 0, "no user code ran");
    assert!(generator_closed_events(&sim, p).is_empty());
    assert_eq!(pull_all(&mut sim, c, &g), [0, 1, 2], "the consumer's generator is untouched");
    done(&mut sim, CHUNK);
}

/// Pulls a remote generator to its end from inside a handler, answering `[count, sum]`.
fn sum_rest(next: Method, count: u64, sum: u64) -> Reply {
    Reply::call(next.clone(), Vec::new(), move |r| match r {
        Ok(v) if is_stop_iteration(&v) => Reply::ok(vec![Value::from(count), Value::from(sum)]),
        Ok(v) => sum_rest(next.clone(), count + 1, sum + v.as_u64().unwrap_or(0)),
        Err(e) => Reply::error(format!("pull failed: {e}")),
    })
}

#[test]
fn a_generator_passed_as_an_argument_is_pulled_by_the_callee() {
    let mut sim = Sim::new(HubConfig::default());
    let a = anon(&mut sim, EngineConfig::new("alice"));
    let b = join(&mut sim, a, EngineConfig::new("bob"));
    let state = serve_generators(&mut sim, a);
    // bob's `sink.sum(gen)` pulls the generator alice passed to its end.
    let sum = handler(|inv: &Invocation| {
        let g = Generator::from_value(&inv.args[0]).expect("a generator").expect("valid");
        let next = Method {
            target: g.target,
            method: g.method,
            promise: Some(PromiseMode::Compact),
            ..Method::default()
        };
        sum_rest(next, 0, 0)
    });
    let reg = sim.register(
        b,
        ServiceSpec::new("sink").function("sum", FunctionSpec::new("sum")),
        vec![("sum", sum)],
    );
    sim.wait_ok(b, reg);
    let sink = fetch(&mut sim, a, "bob:sink");
    let g = state.borrow_mut().start(100, None);
    let call = sim.call(a, &method_at(&sink, "sum"), vec![local_generator(g)], None);
    assert_eq!(sim.wait_ok(a, call), Value::from(vec![Value::from(100u64), Value::from(4950u64)]));
    assert_eq!(state.borrow().pulls, 101);
    let pulls: Vec<_> = sim
        .invocations(a)
        .iter()
        .filter(|(_, inv)| inv.target == InvokeTarget::GeneratorNext { generator: g })
        .map(|(_, inv)| inv.caller.clone())
        .collect();
    assert_eq!(pulls.len(), 101);
    assert!(pulls.iter().all(|c| *c == sim.full_id(b)), "only bob pulled");
    assert!(generator_closed_events(&sim, a).is_empty());
    done(&mut sim, CHUNK);
}

#[test]
fn figure_generator_items_per_second_through_the_sim() {
    let (mut sim, _p, c, _state, svc) = generator_world(2 * MS);
    const N: u64 = 10_000;
    let g = open_generator(&mut sim, c, &svc, vec![N.into()]);
    let (t0, started) = (sim.now(), std::time::Instant::now());
    let mut n = 0u64;
    loop {
        let id = sim.generator_next(c, &g);
        let v = sim.wait_ok(c, id);
        if is_stop_iteration(&v) {
            break;
        }
        assert_eq!(v.as_u64(), Some(n));
        n += 1;
    }
    let wall = started.elapsed();
    let virt = sim.now().saturating_duration_since(t0);
    assert_eq!(n, N);
    println!(
        "figure: {N} generator items pulled sequentially through the sim in {wall:?} wall \
         ({:.0} items/s; {virt:?} virtual at 2 ms latency per hop)",
        N as f64 / wall.as_secs_f64()
    );
    done(&mut sim, CHUNK);
}

// ---------------------------------------------------------------------------------------------
// `_rintf` interfaces.

/// Functions of the counter interface.
const INC: FnId = FnId(1);
const VALUE: FnId = FnId(2);
const SLOW: FnId = FnId(3);

/// `{_rintf: true, name, inc, value, slow}`.
fn counter_object() -> Value {
    let mut m = Map::new();
    m.push("_rintf", true);
    m.push("name", "counter");
    m.push("inc", local_function(INC, "inc"));
    m.push("value", local_function(VALUE, "value"));
    m.push("slow", local_function(SLOW, "slow"));
    Value::Map(m)
}

/// A producer (alice) serving `objects.make_counter()`, which returns a `_rintf` counter
/// (one shared count), and a holder (bob) in her workspace. Returns the count.
fn rintf_world() -> (Sim, ClientId, ClientId, Rc<Cell<i64>>, Value) {
    let mut sim = Sim::new(HubConfig::default());
    let p = anon(&mut sim, EngineConfig::new("alice"));
    let spec = ServiceSpec::new("objects").function("make_counter", FunctionSpec::new("make_counter"));
    let make = handler(|_: &Invocation| Reply::Ok(counter_object()));
    let reg = sim.register(p, spec, vec![("make_counter", make)]);
    sim.wait_ok(p, reg);
    let count = Rc::new(Cell::new(0i64));
    let n = count.clone();
    sim.on_callback(
        p,
        handler(move |inv: &Invocation| match &inv.target {
            InvokeTarget::Interface { function, .. } if *function == INC => {
                n.set(n.get() + inv.args.first().and_then(Value::as_i64).unwrap_or(1));
                Reply::ok(n.get())
            }
            InvokeTarget::Interface { function, .. } if *function == VALUE => Reply::ok(n.get()),
            InvokeTarget::Interface { function, .. } if *function == SLOW => {
                Reply::Blocking(20 * SEC, Ok(Value::from("too late")))
            }
            other => Reply::error(format!("unexpected {other:?}")),
        }),
    );
    let h = join(&mut sim, p, EngineConfig::new("bob"));
    let objects = fetch(&mut sim, h, "alice:objects");
    (sim, p, h, count, objects)
}

fn make_counter(sim: &mut Sim, h: ClientId, objects: &Value) -> Value {
    let call = sim.call(h, &method_at(objects, "make_counter"), vec![], None);
    sim.wait_ok(h, call)
}

fn call_ok(sim: &mut Sim, c: ClientId, obj: &Value, name: &str, args: Vec<Value>) -> Value {
    let call = sim.call(c, &method_at(obj, name), args, None);
    sim.wait_ok(c, call)
}

fn call_err(sim: &mut Sim, c: ClientId, obj: &Value, name: &str) -> String {
    let call = sim.call(c, &method_at(obj, name), vec![], None);
    let r = sim.wait(c, call);
    remote_message(&r)
}

fn disposed(sim: &Sim, c: ClientId) -> Vec<(String, Vec<FnId>)> {
    sim.events(c)
        .iter()
        .filter_map(|(_, e)| match e {
            Event::InterfaceDisposed { service, functions } => Some((service.clone(), functions.clone())),
            _ => None,
        })
        .collect()
}

fn service_id(obj: &Value) -> String {
    obj.as_map().and_then(|m| m.get("_rintf_service_id")).and_then(Value::as_str).expect("an _rintf").into()
}

#[test]
fn rintf_lives_until_disposed_then_nothing_is_left() {
    let (mut sim, p, h, count, objects) = rintf_world();
    let obj = make_counter(&mut sim, h, &objects);
    let sid = service_id(&obj);
    assert!(sid.starts_with("_rintf_"));
    assert_eq!(obj.as_map().unwrap().get("name"), Some(&Value::from("counter")));
    assert_eq!(sim.engine(p).interfaces(), 1);
    assert_eq!(sim.engine(p).exports(), 0, "an interface is not a session");
    assert!(!sim.hub.services().iter().any(|s| s.contains("_rintf_")), "never registered with the server");

    // The object outlives the call that returned it.
    sim.run_for(60 * SEC);
    assert_eq!(call_ok(&mut sim, h, &obj, "inc", vec![5.into()]), Value::from(5));
    assert_eq!(call_ok(&mut sim, h, &obj, "inc", vec![]), Value::from(6));
    assert_eq!(call_ok(&mut sim, h, &obj, "value", vec![]), Value::from(6));
    let (_, inv) = sim.invocations(p).last().unwrap().clone();
    assert_eq!(inv.target, InvokeTarget::Interface { service: sid.clone(), function: VALUE });
    assert_eq!(inv.caller, sim.full_id(h));

    // Two live objects, disposed one at a time.
    let other = make_counter(&mut sim, h, &objects);
    assert_eq!(sim.engine(p).interfaces(), 2);
    assert_eq!(call_ok(&mut sim, h, &obj, "_dispose", vec![]), Value::Nil);
    assert_eq!(sim.engine(p).interfaces(), 1);
    assert_eq!(disposed(&sim, p), [(sid, vec![INC, VALUE, SLOW])]);
    assert!(call_err(&mut sim, h, &obj, "inc").contains("not found"));
    assert_eq!(count.get(), 6, "no user code ran for the disposed object");
    assert_eq!(call_ok(&mut sim, h, &other, "value", vec![]), Value::from(6), "the other one still works");
    assert_eq!(call_ok(&mut sim, h, &other, "_dispose", vec![]), Value::Nil);
    assert_eq!(sim.engine(p).interfaces(), 0);
    assert_eq!(disposed(&sim, p).len(), 2);
    done(&mut sim, CHUNK);
}

#[test]
fn rintf_is_freed_when_its_holder_disconnects() {
    let (mut sim, p, h, _, objects) = rintf_world();
    let h2 = join(&mut sim, p, EngineConfig::new("carol"));
    let obj_h = make_counter(&mut sim, h, &objects);
    let objects2 = fetch(&mut sim, h2, "alice:objects");
    let obj_h2 = make_counter(&mut sim, h2, &objects2);
    assert_eq!(sim.engine(p).interfaces(), 2);
    sim.drop_link(h2);
    assert_eq!(sim.engine(p).interfaces(), 1, "carol's object is gone, bob's is not");
    assert_eq!(disposed(&sim, p), [(service_id(&obj_h2), vec![INC, VALUE, SLOW])]);
    assert_eq!(call_ok(&mut sim, h, &obj_h, "inc", vec![]), Value::from(1));
    // Carol comes back: her old object stays dead.
    sim.reconnect(h2);
    assert!(call_err(&mut sim, h2, &obj_h2, "inc").contains("not found"));
    // A holder killed for good frees its objects too.
    sim.kill_client(h);
    assert_eq!(sim.engine(p).interfaces(), 0);
    assert_eq!(disposed(&sim, p).len(), 2);
    done(&mut sim, CHUNK);
}

#[test]
fn rintf_dies_with_the_producers_link() {
    let (mut sim, p, h, count, objects) = rintf_world();
    let obj = make_counter(&mut sim, h, &objects);
    assert_eq!(call_ok(&mut sim, h, &obj, "inc", vec![]), Value::from(1));
    sim.drop_link(p);
    assert_eq!(sim.engine(p).interfaces(), 0, "dropped with the connection");
    assert_eq!(disposed(&sim, p), [(service_id(&obj), vec![INC, VALUE, SLOW])]);
    sim.reconnect(p);
    assert!(call_err(&mut sim, h, &obj, "inc").contains("not found"), "no zombie after the reconnection");
    assert_eq!(count.get(), 1);
    // The ordinary service came back; a new object works.
    let objects = fetch(&mut sim, h, "alice:objects");
    let fresh = make_counter(&mut sim, h, &objects);
    assert_eq!(call_ok(&mut sim, h, &fresh, "inc", vec![]), Value::from(2));
    assert!(!sim.hub.services().iter().any(|s| s.contains("_rintf_")));
    assert_eq!(sim.engine(p).interfaces(), 1);
    // A hub restart drops it too (every link goes down).
    sim.restart_hub("restarted-hub-1");
    sim.run_for(5 * SEC);
    assert!(sim.engine(p).is_ready() && sim.engine(h).is_ready());
    assert_eq!(sim.engine(p).interfaces(), 0);
    done(&mut sim, CHUNK);
}

#[test]
fn a_stranger_may_not_call_another_peers_rintf_methods() {
    let (mut sim, p, h, count, objects) = rintf_world();
    let obj = make_counter(&mut sim, h, &objects);
    // Mallory, in the same workspace, got hold of the descriptors somehow.
    let mallory = join(&mut sim, p, EngineConfig::new("mallory"));
    let before = sim.invocations(p).len();
    for name in ["inc", "value", "_dispose"] {
        let msg = call_err(&mut sim, mallory, &obj, name);
        assert!(msg.contains("Permission denied"), "{name}: {msg}");
    }
    // And a client of another workspace.
    let outsider = anon(&mut sim, EngineConfig::new("oscar"));
    let call = sim.call(outsider, &method_at(&obj, "inc"), vec![], None);
    let r = sim.wait(outsider, call);
    assert!(r.is_err(), "{r:?}");
    assert_eq!(sim.invocations(p).len(), before, "no user code ran");
    assert_eq!(count.get(), 0);
    assert_eq!(sim.engine(p).interfaces(), 1, "a refused _dispose disposes of nothing");
    assert_eq!(call_ok(&mut sim, h, &obj, "inc", vec![]), Value::from(1));
    assert_eq!(call_ok(&mut sim, h, &obj, "_dispose", vec![]), Value::Nil);
    done(&mut sim, CHUNK);
}

#[test]
fn rintf_calls_time_out_after_10_s() {
    let (mut sim, _p, h, _, objects) = rintf_world();
    let obj = make_counter(&mut sim, h, &objects);
    let t0 = sim.now();
    let call = sim.call(h, &method_at(&obj, "slow"), vec![], None);
    match sim.wait(h, call) {
        Err(CallError::Timeout { after, .. }) => assert_eq!(after, 10 * SEC),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(sim.settled_at(h, call), Some(t0 + 10 * SEC), "the _rintf timeout, not the 30 s one");
    // The blocked producer answers at 20 s, to nobody; then the object is disposed of.
    sim.run_until(t0 + 21 * SEC);
    assert_eq!(call_ok(&mut sim, h, &obj, "_dispose", vec![]), Value::Nil);
    done(&mut sim, CHUNK);
}

#[test]
fn rintf_passed_as_an_argument_is_held_by_the_callee() {
    let mut sim = Sim::new(HubConfig::default());
    let a = anon(&mut sim, EngineConfig::new("alice"));
    let b = join(&mut sim, a, EngineConfig::new("bob"));
    // bob's `events.register_listener(listener)` keeps the listener.
    let held: Rc<RefCell<Option<Value>>> = Rc::default();
    let keep = held.clone();
    let register = handler(move |inv: &Invocation| {
        *keep.borrow_mut() = Some(inv.args[0].clone());
        Reply::ok("registered")
    });
    let spec =
        ServiceSpec::new("events").function("register_listener", FunctionSpec::new("register_listener"));
    let reg = sim.register(b, spec, vec![("register_listener", register)]);
    sim.wait_ok(b, reg);
    let got: Rc<RefCell<Vec<Value>>> = Rc::default();
    let log = got.clone();
    sim.on_callback(
        a,
        handler(move |inv: &Invocation| match inv.target {
            InvokeTarget::Interface { function: FnId(9), .. } => {
                log.borrow_mut().push(inv.args[0].clone());
                Reply::ok(true)
            }
            ref other => Reply::error(format!("unexpected {other:?}")),
        }),
    );
    let events = fetch(&mut sim, a, "bob:events");
    let mut listener = Map::new();
    listener.push("_rintf", true);
    listener.push("on_event", local_function(FnId(9), "on_event"));
    let call = sim.call(a, &method_at(&events, "register_listener"), vec![Value::Map(listener)], None);
    assert_eq!(sim.wait_ok(a, call), Value::from("registered"));
    // The call settled, the listener lives on.
    assert_eq!(sim.engine(a).interfaces(), 1);
    let listener = held.borrow().clone().expect("bob kept it");
    sim.run_for(30 * SEC);
    for i in 0..3 {
        assert_eq!(call_ok(&mut sim, b, &listener, "on_event", vec![i.into()]), Value::Bool(true));
    }
    assert_eq!(*got.borrow(), [Value::from(0), Value::from(1), Value::from(2)]);
    // Only bob may call it.
    let carol = join(&mut sim, a, EngineConfig::new("carol"));
    assert!(call_err(&mut sim, carol, &listener, "on_event").contains("Permission denied"));
    assert_eq!(call_ok(&mut sim, b, &listener, "_dispose", vec![]), Value::Nil);
    assert_eq!(sim.engine(a).interfaces(), 0);
    assert_eq!(disposed(&sim, a), [(service_id(&listener), vec![FnId(9)])]);
    done(&mut sim, CHUNK);
}
