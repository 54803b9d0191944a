// The JavaScript peer of tests/tests/client_e2e_js.rs: end-to-end encryption between the npm
// `hypha-rpc` client (encryption on, tweetnacl inside) and our Rust client, both directions.
//
// Usage: node tests/js/e2e_js.mjs <server_url> <workspace> <token> <rust_key> <other_key>
//                                 <rust_open_id> <rust_control_id>
//
// 1. Connects with `encryption: true`, reads its key (`server.rpc.getPublicKey()`), and
//    registers three JS services (`require_context: true`): e2e-js-open, e2e-js-trusted
//    (`trusted_keys: [rust_key]`) and e2e-js-other (`trusted_keys: [other_key]`).
// 2. Tells Rust its key (`control.hello(js_key)`, which registers Rust services trusting it)
//    and calls the Rust services encrypted (`getService(id, {encryption_public_key})`), in
//    clear, and with a second client that brings its own key pair.
// 3. Calls `control.ready(js_key, ids)` and serves Rust's encrypted calls until Rust calls
//    `finish` on e2e-js-open; then prints one line `RESULT <json>`: the outcome of every JS
//    call, the context every JS service function saw, and, from a tap on the main client's
//    socket, which requests and replies went over the wire as `_enc` envelopes.
//
// Every case runs in its own try/catch, so one failure does not hide the others. A watchdog
// exits non-zero if Rust never calls `finish`.
import { decodeMulti } from "@msgpack/msgpack";
import WebSocket from "ws";

const [serverUrl, workspace, token, rustKey, otherKey, rustOpenId, controlId] = process.argv.slice(2);
if (!controlId) {
  console.error(
    "usage: e2e_js.mjs <server_url> <workspace> <token> <rust_key> <other_key> <rust_open_id> <control_id>",
  );
  process.exit(2);
}

// Node 20 has no global WebSocket, and the client reads `WebSocket.OPEN` from the global even
// when given `WebSocketClass`, so set both.
globalThis.WebSocket ??= WebSocket;
// The tweetnacl bundled in hypha-rpc's ESM build looks for its random source at `self.crypto`
// only (webpack stubbed out its `require("crypto")` fallback), and Node has no `self`: without
// this, `encryption: true` fails with "no PRNG". Set before hypha-rpc (and tweetnacl) load.
globalThis.self ??= globalThis;
const { hyphaWebsocketClient } = await import("hypha-rpc");

const watchdog = setTimeout(() => {
  console.error("e2e_js.mjs: watchdog fired, Rust never called finish");
  process.exit(3);
}, 100_000);

// The client logs to the logger it is given; keep stdout for the RESULT line.
const quiet = () => {};
const logger = { log: quiet, debug: quiet, info: quiet, warn: console.error, error: console.error };

// RFC 7748 §6.1 Alice: a fixed X25519 key pair for the bring-your-own-key client.
const BYO_SECRET = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
const BYO_PUBLIC = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";
const fromHex = (hex) => new Uint8Array(Buffer.from(hex, "hex"));

/** `i % 251` for `i` in `0..n`, as Rust's `pattern`. */
function pattern(n) {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = i % 251;
  return b;
}
function sum(bytes) {
  let s = 0;
  for (const x of bytes) s += x;
  return s;
}
/** Typed arrays as `{ctor, values}` so that JSON keeps them apart from objects. */
function plain(x) {
  if (ArrayBuffer.isView(x)) return { ctor: x.constructor.name, values: Array.from(x) };
  if (Array.isArray(x)) return x.map(plain);
  if (x && typeof x === "object") return Object.fromEntries(Object.entries(x).map(([k, v]) => [k, plain(v)]));
  return x;
}

// A wire tap on the main client's socket: every RPC frame sent and received, with its `_enc`
// envelope if `extra` was sealed, so the test can see which requests and replies were sealed.
// Large messages travel as `services.built-in.message_cache.*` calls carrying chunks of the
// (already sealed) frame; the tap puts them back together and records the whole frame too.
const frames = [];
const uploads = {};
function record(dir, bytes, outer) {
  const [main, extra] = decodeMulti(bytes);
  if (!main || main.type !== "method") return;
  const enc = extra && extra._enc;
  if (main.method.startsWith("services.built-in.message_cache.") && !outer) {
    const op = main.method.split(".").pop();
    if (enc) return frames.push({ dir, method: main.method, sealed_chunk_call: true });
    const [key, a, b] = extra.args;
    const id = `${dir}:${key}`;
    if (op === "create") uploads[id] = [];
    else if (op === "append") uploads[id]?.push(a);
    else if (op === "set" && uploads[id]) uploads[id][a] = b;
    else if (op === "process" && uploads[id]) {
      const parts = uploads[id];
      delete uploads[id];
      record(dir, Buffer.concat(parts), main);
    }
    return;
  }
  frames.push({
    dir,
    from: (outer ?? main).from ?? null,
    to: (outer ?? main).to ?? null,
    method: main.method,
    session: main.session ?? null,
    chunked: !!outer,
    enc: enc ? { v: enc.v, pub: Buffer.from(enc.pub).toString("hex"), nonce: enc.nonce.length } : null,
  });
}
function tap(dir, data) {
  let bytes;
  if (data instanceof ArrayBuffer) bytes = new Uint8Array(data);
  else if (ArrayBuffer.isView(data)) bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  else return; // JSON control frames (auth, ping)
  try {
    record(dir, bytes, null);
  } catch (e) {
    frames.push({ dir, undecodable: String(e) });
  }
}
class TappedWebSocket extends WebSocket {
  constructor(...args) {
    super(...args);
    this.on("message", (data, isBinary) => isBinary && tap("in", data));
  }
  send(data, ...rest) {
    tap("out", data);
    return super.send(data, ...rest);
  }
}
const isManager = (id) => !id || id.startsWith("*/") || id.includes("manager");
/**
 * Every request between us and a Rust client (not the workspace manager, not the `built-in`
 * service) with its reply (`<session>.resolve` or `.reject` the other way), each with its
 * `_enc` envelope or null, and whether it was chunked. A reply that never came is "unseen".
 */
function sealing() {
  const rows = [];
  for (const f of frames) {
    if (f.undecodable || f.sealed_chunk_call) rows.push(f);
    if (!f.session || f.method.startsWith("services.built-in")) continue;
    if (f.dir === "out" ? isManager(f.to) : isManager(f.from)) continue;
    const back = frames.find(
      (g) =>
        g.dir !== f.dir &&
        (g.method === `${f.session}.resolve` || g.method === `${f.session}.reject`),
    );
    rows.push({
      dir: f.dir,
      method: f.method.startsWith("services.") ? f.method : "callback",
      request: f.enc,
      chunked: f.chunked,
      reply: back ? { how: back.method.split(".").pop(), enc: back.enc, chunked: back.chunked } : "unseen",
    });
  }
  return rows;
}

const results = {};
async function run(name, f) {
  const t = Date.now();
  try {
    results[name] = { ok: true, value: plain(await f()) };
  } catch (e) {
    results[name] = { ok: false, error: String(e && e.message ? e.message : e) };
  }
  results[name].ms = Date.now() - t;
}

const connect = (extra) =>
  hyphaWebsocketClient.connectToServer({
    server_url: serverUrl,
    workspace,
    token,
    WebSocketClass: WebSocket,
    method_timeout: 30,
    logger,
    encryption: true,
    ...extra,
  });

const server = await connect({ WebSocketClass: TappedWebSocket });
const jsKey = server.rpc.getPublicKey();

// What every JS service function saw, in call order.
const observed = [];
let finished;
const finish = new Promise((resolve) => (finished = resolve));

function jsService(id, trustedKeys) {
  const config = { visibility: "public", require_context: true };
  if (trustedKeys) config.trusted_keys = trustedKeys;
  const note = (method, context) =>
    observed.push({
      service: id,
      method,
      encryption: context.encryption ?? false,
      caller_public_key: context.caller_public_key ?? null,
    });
  return {
    id,
    config,
    whoami(context) {
      note("whoami", context);
      return {
        from: context.from,
        encryption: context.encryption ?? false,
        caller_public_key: context.caller_public_key ?? null,
      };
    },
    echo(x, context) {
      note("echo", context);
      return x;
    },
    sha(bytes, context) {
      note("sha", context);
      return [bytes.constructor.name, bytes.length, sum(bytes)];
    },
    make_bytes(n, context) {
      note("make_bytes", context);
      return pattern(n);
    },
    async twice(f, x, context) {
      note("twice", context);
      return 2 * (await f(x));
    },
    fail(why, context) {
      note("fail", context);
      throw new Error(`js refused: ${why}`);
    },
    finish(context) {
      note("finish", context);
      // Leave time for this reply to go out before the script disconnects.
      setTimeout(finished, 300);
      return "bye";
    },
  };
}
const jsOpen = await server.registerService(jsService("e2e-js-open"));
const jsTrusted = await server.registerService(jsService("e2e-js-trusted", [rustKey]));
const jsOther = await server.registerService(jsService("e2e-js-other", [otherKey]));

// Out-of-band key exchange: Rust learns our key and registers services that trust it.
const control = await server.getService(controlId, { encryption_public_key: rustKey });
const [rustTrustedId, rustOtherId] = await control.hello(jsKey);

const open = await server.getService(rustOpenId, { encryption_public_key: rustKey });
const openClear = await server.getService(rustOpenId);
const trusted = await server.getService(rustTrustedId, { encryption_public_key: rustKey });
const trustedClear = await server.getService(rustTrustedId);
const other = await server.getService(rustOtherId, { encryption_public_key: rustKey });

results.js_key = { ok: true, value: jsKey };
// Round trips through an encrypted call: positional values of every msgpack kind, keyword
// arguments (`with_kwargs` travels inside the ciphertext), results back.
await run("add", () => open.add(2, 40));
await run("echo", () =>
  open.echo("s", 7, -2.5, null, true, [1, "a"], { k: { n: 1 } }, new Uint8Array([1, 2, 3])),
);
await run("echo_kwargs", () => open.echo("pos", { _rkwargs: true, name: "Ada", n: 3 }));
// The Rust callee sees our key; in clear it sees none.
await run("whoami", () => open.whoami());
await run("whoami_clear", () => openClear.whoami());
// 2 MB each way inside encrypted calls (chunked after sealing).
await run("sha_big", () => open.sha(pattern(2_000_000)));
await run("make_bytes_big", async () => {
  const b = await open.make_bytes(2_500_000);
  return { ctor: b.constructor.name, length: b.length, sum: sum(b) };
});
// A JS callback, called by Rust inside the encrypted session.
await run("callback", () => open.twice((x) => x * 3, 5));
await run("error", () => open.fail("boom"));
// trusted_keys on the Rust side.
await run("trusted", () => trusted.whoami());
await run("trusted_clear", () => trustedClear.whoami());
await run("other", () => other.whoami());

// A second client bringing its own key pair (`encryption_private_key`/`encryption_public_key`,
// raw 32-byte Uint8Arrays), with a 3 s method timeout for the wrong-key case.
await run("byo", async () => {
  const byo = await connect({
    encryption_private_key: fromHex(BYO_SECRET),
    encryption_public_key: fromHex(BYO_PUBLIC),
    method_timeout: 3,
  });
  try {
    const key = byo.rpc.getPublicKey();
    const svc = await byo.getService(rustOpenId, { encryption_public_key: rustKey });
    const whoami = await svc.whoami();
    // A wrong key: Rust cannot open the request, so nothing comes back.
    const bad = await byo.getService(rustOpenId, { encryption_public_key: "ab".repeat(32) });
    const t = Date.now();
    let wrong;
    try {
      wrong = { ok: true, value: await bad.whoami() };
    } catch (e) {
      wrong = { ok: false, error: String(e && e.message ? e.message : e) };
    }
    wrong.ms = Date.now() - t;
    return { key, whoami, wrong };
  } finally {
    await Promise.race([byo.disconnect(), new Promise((r) => setTimeout(r, 3000))]);
  }
});

// Now Rust calls our services; it says when it is done by calling `finish`.
await control.ready(jsKey, [jsOpen.id, jsTrusted.id, jsOther.id]);
await finish;
clearTimeout(watchdog);

console.log("RESULT " + JSON.stringify({ results, observed, sealing: sealing() }));
// Do not let a slow goodbye hold the process (the Rust side kills it after its timeout).
await Promise.race([server.disconnect(), new Promise((resolve) => setTimeout(resolve, 5000))]);
process.exit(0);
