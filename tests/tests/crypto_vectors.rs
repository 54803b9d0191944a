//! Byte-for-byte agreement of our `crypto_box` ([`hypha_rpc_core::crypto::NaclBox`]) with
//! PyNaCl 1.5.0 (libsodium), the library the Python hypha-rpc client encrypts with, and of the
//! whole encrypted `extra` envelope with what hypha-rpc 0.21.47's `rpc.py` packs (PROTOCOL.md
//! §12). PyNaCl runs in the project venv (`tests/py/e2e_vectors.py`); a missing venv fails.
//!
//! Nonces come from a test RNG that returns fixed bytes, so both sides seal with the same
//! nonce and must produce the same bytes.

use std::io::Write;
use std::process::{Command, Stdio};

use bytes::Bytes;
use hypha_rpc_core::codec::rtype::{Method, PromiseMode};
use hypha_rpc_core::codec::{decode_frame_slice, decode_value_slice, to_vec};
use hypha_rpc_core::crypto::{Crypto, NONCE_LEN, NaclBox, TAG_LEN, key_from_hex, to_hex};
use hypha_rpc_core::time::{Duration, Instant};
use hypha_rpc_core::{CallOptions, Limits, Map, Transmit, Value};
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};

/// An "RNG" that repeats a fixed byte pattern: the nonce of the next seal is the pattern.
struct FixedRng {
    pattern: Vec<u8>,
    pos: usize,
}

impl FixedRng {
    fn new(pattern: &[u8]) -> Self {
        assert!(!pattern.is_empty());
        FixedRng { pattern: pattern.to_vec(), pos: 0 }
    }
}

impl rand_core::RngCore for FixedRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for d in dest {
            *d = self.pattern[self.pos % self.pattern.len()];
            self.pos += 1;
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rand_core::CryptoRng for FixedRng {}

fn hex(b: &[u8]) -> String {
    to_hex(b)
}

fn unhex(s: &str) -> Vec<u8> {
    assert_eq!(s.len() % 2, 0, "odd hex length");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn sha(label: &str) -> [u8; 32] {
    Sha256::digest(label.as_bytes()).into()
}

fn nonce24(v: &[u8]) -> [u8; NONCE_LEN] {
    v.try_into().expect("24 bytes")
}

/// Runs `tests/py/e2e_vectors.py` with the venv's python; panics when it cannot.
fn pynacl(request: &Json) -> Json {
    let root = hypha_rpc_tests::server::workspace_root().unwrap_or_else(|e| panic!("{e}"));
    let python = hypha_rpc_tests::server::venv_python(&root)
        .unwrap_or_else(|e| panic!("the project venv (with PyNaCl) is required: {e}"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/e2e_vectors.py");
    let mut child = Command::new(&python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let body = request.to_string();
    let mut stdin = child.stdin.take().unwrap();
    // Written from a thread: the answer can be larger than a pipe buffer.
    let writer = std::thread::spawn(move || stdin.write_all(body.as_bytes()));
    let out = child.wait_with_output().expect("wait for PyNaCl");
    writer.join().unwrap().expect("write the request");
    assert!(
        out.status.success(),
        "e2e_vectors.py failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("e2e_vectors.py answers one JSON object")
}

struct BoxCase {
    sk_a: [u8; 32],
    sk_b: [u8; 32],
    nonce: [u8; 24],
    pt: Vec<u8>,
}

fn cases() -> Vec<BoxCase> {
    let pairs: [([u8; 32], [u8; 32]); 4] = [
        ([1; 32], [2; 32]),
        (sha("alice"), sha("bob")),
        // High and low bits that X25519 clamps away.
        ([0xff; 32], [0x80; 32]),
        (core::array::from_fn(|i| i as u8), core::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0x5a)),
    ];
    let nonces: [[u8; 24]; 4] =
        [[0; 24], [0xff; 24], core::array::from_fn(|i| i as u8), core::array::from_fn(|i| sha("nonce")[i])];
    let mb: Vec<u8> = (0..1024 * 1024u32).map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8).collect();
    let plaintexts: [Vec<u8>; 4] = [Vec::new(), vec![0x42], b"29 bytes of protocol example!".to_vec(), mb];
    assert_eq!(plaintexts[2].len(), 29);
    let mut out = Vec::new();
    for (p, (sk_a, sk_b)) in pairs.iter().enumerate() {
        for (i, pt) in plaintexts.iter().enumerate() {
            out.push(BoxCase {
                sk_a: *sk_a,
                sk_b: *sk_b,
                nonce: nonces[(p + i) % nonces.len()],
                pt: pt.clone(),
            });
        }
    }
    out
}

#[test]
fn crypto_box_agrees_with_pynacl_byte_for_byte() {
    let cases = cases();
    let mut ours = Vec::new();
    let mut request = Vec::new();
    for c in &cases {
        let mut a = NaclBox::from_secret(c.sk_a, FixedRng::new(&c.nonce));
        let b = NaclBox::from_secret(c.sk_b, FixedRng::new(&[0]));
        let (nonce, sealed) = a.seal(&b.public_key(), &c.pt).expect("an honest key");
        assert_eq!(nonce, c.nonce, "the nonce comes from the RNG");
        assert_eq!(sealed.len(), c.pt.len() + TAG_LEN);
        request.push(json!({
            "sk_a": hex(&c.sk_a), "sk_b": hex(&c.sk_b), "nonce": hex(&c.nonce),
            "pt": hex(&c.pt), "ours": hex(&sealed),
        }));
        ours.push((a, b, sealed));
    }
    let answer = pynacl(&json!({ "boxes": request }));
    println!("PyNaCl side: {}", answer["versions"]);
    assert_eq!(answer["versions"]["pynacl"], "1.5.0", "the pinned PyNaCl");
    let answers = answer["boxes"].as_array().expect("boxes");
    assert_eq!(answers.len(), cases.len());
    // A third party, to check that a wrong key does not open.
    let mut eve = NaclBox::from_secret(sha("eve"), FixedRng::new(&[0]));

    for (i, ((c, (a, b, sealed)), py)) in cases.iter().zip(&mut ours).zip(answers).enumerate() {
        let what = format!("case {i} ({} bytes)", c.pt.len());
        assert_eq!(py["pub_a"].as_str(), Some(hex(&a.public_key()).as_str()), "{what}: public key of A");
        assert_eq!(py["pub_b"].as_str(), Some(hex(&b.public_key()).as_str()), "{what}: public key of B");
        assert_eq!(a.secret_key(), c.sk_a, "{what}: the secret key is kept as given");
        let theirs = unhex(py["ct"].as_str().expect("ct"));
        assert!(theirs == *sealed, "{what}: our sealed bytes differ from PyNaCl's");
        assert_eq!(py["opened_ours"], true, "{what}: PyNaCl opens ours");
        assert_eq!(py["tampered_rejected"], true, "{what}: PyNaCl rejects a flipped bit");
        // We open PyNaCl's: the same-nonce one and one with PyNaCl's own random nonce.
        let opened = b.open(&a.public_key(), &c.nonce, &theirs).expect("we open PyNaCl's ciphertext");
        assert!(opened == c.pt, "{what}: opened plaintext differs");
        let rnonce = nonce24(&unhex(py["random"]["nonce"].as_str().unwrap()));
        let rct = unhex(py["random"]["ct"].as_str().unwrap());
        let opened =
            b.open(&a.public_key(), &rnonce, &rct).expect("we open PyNaCl's random-nonce ciphertext");
        assert!(opened == c.pt, "{what}: opened plaintext (random nonce) differs");
        // Failure modes on our side: wrong key, wrong nonce, flipped bit, truncation.
        assert!(eve.open(&a.public_key(), &rnonce, &rct).is_none(), "{what}: a third key opens it");
        assert!(b.open(&eve.public_key(), &rnonce, &rct).is_none(), "{what}: the wrong sender key opens it");
        let mut other = rnonce;
        other[0] ^= 1;
        assert!(b.open(&a.public_key(), &other, &rct).is_none(), "{what}: another nonce opens it");
        let mut t = rct.clone();
        *t.last_mut().expect("non-empty") ^= 0x80;
        assert!(b.open(&a.public_key(), &rnonce, &t).is_none(), "{what}: a flipped bit opens it");
        assert!(b.open(&a.public_key(), &rnonce, &rct[..TAG_LEN - 1]).is_none(), "{what}: short input");
    }
    println!("{} crypto_box vectors agree with PyNaCl", cases.len());
}

// ---- the whole envelope ------------------------------------------------------------------------

/// The `extra` segment of the frame our engine sends for one encrypted call to `callee_pub`,
/// with `sk` as our secret key and `nonce` from the RNG.
fn engine_extra(sk: [u8; 32], nonce: [u8; 24], callee_pub: [u8; 32], args: Vec<Value>) -> Vec<u8> {
    let now = Instant::from_micros(1);
    let mut engine = hypha_rpc_tests::drive::engine("caller", 7);
    engine.set_crypto(Box::new(NaclBox::from_secret(sk, FixedRng::new(&nonce))));
    hypha_rpc_tests::drive::connect(&mut engine, now, "caller", "ws", "manager");
    let target = Method {
        target: "ws/callee".into(),
        method: "services.svc.f".into(),
        promise: Some(PromiseMode::Compact),
        enc_pub: Some(Bytes::copy_from_slice(&callee_pub)),
        ..Method::default()
    };
    let options = CallOptions { timeout: Some(Duration::from_secs(20)), parent: None };
    engine.call(now, &target, args, None, options).expect("call");
    let limits = Limits::default();
    while let Some(t) = engine.poll_transmit() {
        let Transmit::Binary(frame) = t else { continue };
        let decoded = decode_frame_slice(&frame, &limits).expect("our frame decodes");
        if decoded.main_str("method") != Some("services.svc.f") {
            continue;
        }
        // The frame is msgpack(main) followed by msgpack(extra).
        let (_, used) = decode_value_slice(&frame, &limits).expect("main");
        return frame[used..].to_vec();
    }
    panic!("the engine sent no call frame");
}

/// `extra` as JSON for the Python side: bytes as {"$bytes": hex}, floats as {"$float": x}.
fn to_json(v: &Value) -> Json {
    match v {
        Value::Nil => Json::Null,
        Value::Bool(b) => json!(b),
        Value::Integer(i) => {
            i.as_i64().map(Json::from).or_else(|| i.as_u64().map(Json::from)).expect("integer")
        }
        Value::F64(f) => json!({ "$float": f }),
        Value::Str(s) => json!(s.as_str()),
        Value::Bin(b) => json!({ "$bytes": hex(b) }),
        Value::Array(a) => Json::Array(a.iter().map(to_json).collect()),
        Value::Map(m) => Json::Object(
            m.iter().map(|(k, v)| (k.as_str().expect("string keys").to_string(), to_json(v))).collect(),
        ),
        other => panic!("no JSON form for {other:?}"),
    }
}

/// Checks PROTOCOL.md §12's byte layout: `82 a4 _enc 83 a1 v 02 a3 pub c4 20 <32> a5 nonce c4 18
/// <24> a4 data <bin header> <ciphertext>`; returns the ciphertext.
fn check_layout(extra: &[u8], pub_key: &[u8; 32], nonce: &[u8; 24], pt_len: usize) -> Vec<u8> {
    let mut want = vec![0x82, 0xa4];
    want.extend_from_slice(b"_enc");
    want.extend_from_slice(&[0x83, 0xa1, b'v', 0x02, 0xa3]);
    want.extend_from_slice(b"pub");
    want.extend_from_slice(&[0xc4, 0x20]);
    want.extend_from_slice(pub_key);
    want.push(0xa5);
    want.extend_from_slice(b"nonce");
    want.extend_from_slice(&[0xc4, 0x18]);
    want.extend_from_slice(nonce);
    want.push(0xa4);
    want.extend_from_slice(b"data");
    let n = pt_len + TAG_LEN;
    match n {
        0..=0xff => want.extend_from_slice(&[0xc4, n as u8]),
        0x100..=0xffff => {
            want.push(0xc5);
            want.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            want.push(0xc6);
            want.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
    assert_eq!(extra.len(), want.len() + n, "envelope length");
    assert_eq!(hex(&extra[..want.len()]), hex(&want), "envelope header bytes");
    extra[want.len()..].to_vec()
}

#[test]
fn encrypted_envelope_matches_python_rpc_py() {
    let sk_a = sha("caller secret");
    let sk_b = sha("callee secret");
    let mut callee = NaclBox::from_secret(sk_b, FixedRng::new(&[0]));
    let caller_pub = NaclBox::from_secret(sk_a, FixedRng::new(&[0])).public_key();
    let nonce: [u8; 24] = core::array::from_fn(|i| 0xa0 + i as u8);

    // 1: args [1], so the plaintext {args: [1], promise: "*", t: 10.0} is the 29 bytes of
    // PROTOCOL's example (data = c4 2d). 2: every value kind, a 1 KB blob and a nested map.
    let mut nested = Map::new();
    nested.insert("k", Value::Array(vec![Value::from(1.5), Value::Nil, Value::from(true)]));
    nested.insert("neg", Value::from(-300i64));
    let calls: Vec<Vec<Value>> = vec![
        vec![Value::from(1)],
        vec![
            Value::from("héllo"),
            Value::from(42),
            Value::from(u64::MAX),
            Value::bin((0..1024u32).map(|i| i as u8).collect::<Vec<u8>>()),
            Value::Map(nested),
        ],
    ];
    let mut ours = Vec::new();
    let mut request = Vec::new();
    for args in calls {
        let extra = engine_extra(sk_a, nonce, callee.public_key(), args);
        // Our plaintext: open our own envelope with the callee's key.
        let (env, used) = decode_value_slice(&extra, &Limits::default()).expect("envelope decodes");
        assert_eq!(used, extra.len());
        let env = env.as_map().expect("map").clone();
        let data = env.get("data").and_then(Value::as_bin).expect("data").clone();
        let pt = callee.open(&caller_pub, &nonce, &data).expect("the callee opens our envelope");
        let (inner, used) = decode_value_slice(&pt, &Limits::default()).expect("plaintext decodes");
        assert_eq!(used, pt.len());
        assert_eq!(to_vec(&inner), pt, "the plaintext is canonical msgpack of the extra map");
        let sealed = check_layout(&extra, &caller_pub, &nonce, pt.len());
        assert!(sealed == data.to_vec());
        request.push(json!({
            "sk_a": hex(&sk_a), "pub_b": hex(&callee.public_key()), "nonce": hex(&nonce),
            "extra": to_json(&inner),
        }));
        ours.push((extra, pt));
    }
    assert_eq!(ours[0].1.len(), 29, "PROTOCOL's 29-byte example plaintext");
    assert_eq!(&ours[0].0[ours[0].0.len() - 45 - 2..][..2], &[0xc4, 0x2d], "data is bin8 of 45 bytes");

    // The same map encoded directly (no engine) gives the same bytes.
    let mut enc = Map::new();
    enc.push(Value::from("v"), 2u64);
    enc.push(Value::from("pub"), Value::bin(caller_pub.to_vec()));
    enc.push(Value::from("nonce"), Value::bin(nonce.to_vec()));
    let mut env = Map::new();
    env.push(Value::from("_enc"), Value::Map(enc));
    let mut me = NaclBox::from_secret(sk_a, FixedRng::new(&nonce));
    env.push(
        Value::from("data"),
        Value::bin(me.seal(&callee.public_key(), &ours[0].1).expect("an honest key").1),
    );
    assert_eq!(hex(&to_vec(&Value::Map(env))), hex(&ours[0].0), "codec::to_vec of the same map");

    let answer = pynacl(&json!({ "envelopes": request }));
    let answers = answer["envelopes"].as_array().expect("envelopes");
    for (i, ((extra, pt), py)) in ours.iter().zip(answers).enumerate() {
        assert_eq!(py["plaintext"].as_str(), Some(hex(pt).as_str()), "call {i}: plaintext vs msgpack.packb");
        assert_eq!(py["envelope"].as_str(), Some(hex(extra).as_str()), "call {i}: envelope vs rpc.py");
    }
    println!(
        "envelopes agree with rpc.py: {} and {} bytes (29 and {} bytes of plaintext)",
        ours[0].0.len(),
        ours[1].0.len(),
        ours[1].1.len()
    );
}

/// libsodium's blacklist of small-order Curve25519 public keys (`has_small_order` in
/// crypto_scalarmult/curve25519/ref10/x25519_ref10.c): 0, 1, two points of order 8, p-1, p, p+1.
const SMALL_ORDER: [&str; 7] = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
];

/// Small-order public keys: libsodium (PyNaCl) refuses them when making the Box. crypto_box
/// 0.9.1 alone does not (it multiplies by the clamped secret *reduced mod l*, so the cofactor is
/// not cleared): for 0 and p the shared secret is zero for everyone, for the others one of a
/// few values, so a forger gets a box to open "from" such a key every few tries. NaclBox
/// refuses these keys both ways, and the engine drops an envelope "from" one.
#[test]
fn small_order_public_keys() {
    let mut bob = NaclBox::from_secret(sha("bob"), FixedRng::new(&[0]));
    for k in SMALL_ORDER {
        let py = pynacl(&json!({ "low_order": k }));
        assert_eq!(py["low_order"]["refused"], true, "PyNaCl refuses {k}: {}", py["low_order"]);
        let key = key_from_hex(k).expect("hex");
        // Forgers with 32 different secrets each seal a message "from" k... to bob (they seal
        // for k; with a small-order k the key they derive does not depend on who "k" is).
        let mut opened = 0;
        for i in 0..32 {
            // Our NaclBox refuses to seal for such a key; a forger uses plain crypto_box.
            let mut forger = NaclBox::from_secret(sha(&format!("forger {i}")), FixedRng::new(&[i as u8]));
            assert!(forger.seal(&key, b"forged").is_none(), "NaclBox sealed for the small-order key {k}");
            let (nonce, sealed) = forge(&sha(&format!("forger {i}")), &key, b"forged");
            let forged = bob.open(&key, &nonce, &sealed);
            if forged.is_some() {
                opened += 1;
            }
            // crypto_box 0.9.1 alone reduces the clamped scalar mod l, so the cofactor is not
            // cleared and such boxes are readable by anyone (k = 0 or p) or forgeable by trial;
            // NaclBox refuses these keys both ways, as libsodium does.
            assert!(forged.is_none(), "a box with the small-order key {k} opened");
        }
        println!(
            "{k}: PyNaCl {}; boxes from 32 unrelated forgers that bob opens: {opened}",
            py["low_order"]["error"]
        );
    }

    // The same through the engine: a call sealed by a forger "from" the all-zero key reaches
    // user code as an encrypted call with that caller key.
    for k in SMALL_ORDER {
        let callee = forged_call_reaches(k);
        assert_eq!(callee, None, "the engine must refuse an envelope from the small-order key {k}");
    }
}

/// A box sealed with plain `crypto_box` (no small-order check), as a forger would.
fn forge(secret: &[u8; 32], their_public: &[u8; 32], plaintext: &[u8]) -> ([u8; 24], Vec<u8>) {
    use crypto_box::aead::Aead;
    let nonce = [9u8; 24];
    let b = crypto_box::SalsaBox::new(
        &crypto_box::PublicKey::from_bytes(*their_public),
        &crypto_box::SecretKey::from_bytes(*secret),
    );
    (nonce, b.encrypt(&nonce.into(), plaintext).expect("seal"))
}

/// Feeds an engine with encryption on (and a public `svc.f` that takes the context) a call
/// whose envelope says it comes from `key`, sealed by unrelated forgers; `Some(context's
/// caller_public_key)` when the call reached user code.
fn forged_call_reaches(key: &str) -> Option<Option<String>> {
    use hypha_rpc_core::codec::{Frame, encode_frame};
    use hypha_rpc_core::service::{FunctionSpec, RequireContext, ServiceSpec, Visibility};
    use hypha_rpc_core::{Event, Invocation};

    let now = Instant::from_micros(1);
    let mut engine = hypha_rpc_tests::drive::engine("callee", 9);
    engine.set_crypto(Box::new(NaclBox::from_secret(sha("callee"), FixedRng::new(&[0]))));
    hypha_rpc_tests::drive::connect(&mut engine, now, "callee", "ws", "manager");
    let svc = ServiceSpec::new("svc")
        .visibility(Visibility::Public)
        .require_context(RequireContext::All)
        .function("f", FunctionSpec::new("f"));
    engine.register_service(now, svc).expect("register");
    hypha_rpc_tests::drive::drain(&mut engine);

    let k = key_from_hex(key).expect("hex");
    let mut plain = Map::new();
    plain.push("args", Value::Array(vec![Value::from("forged")]));
    let mut hits = None;
    // A few forgers, since for some small-order keys only some forgers' boxes open.
    for i in 0..8u8 {
        let (nonce, data) = forge(&sha(&format!("forger {i}")), &k, &to_vec(&Value::Map(plain.clone())));
        let mut enc = Map::new();
        enc.push("v", 2u64);
        enc.push("pub", Value::bin(k.to_vec()));
        enc.push("nonce", Value::bin(nonce.to_vec()));
        let mut extra = Map::new();
        extra.push("_enc", Value::Map(enc));
        extra.push("data", Value::bin(data));
        let mut main = Map::new();
        main.push("type", "method");
        main.push("from", "ws/mallory");
        main.push("to", "ws/callee");
        main.push("method", "services.svc.f");
        main.push("ws", "ws");
        main.push("user", Value::Map(Map::new()));
        let _ = engine.handle_binary(now, &encode_frame(&Frame { main, extra: Some(extra) }));
        for e in hypha_rpc_tests::drive::drain(&mut engine).events {
            if let Event::Invoke(Invocation { args, context, .. }) = e {
                assert_eq!(args, vec![Value::from("forged")]);
                hits = Some(context.and_then(|c| c.caller_public_key));
            }
        }
    }
    hits
}
