// The JavaScript peer of tests/tests/client_js.rs: the npm `hypha-rpc` client (with `ws` as
// its WebSocket) calls a service that our Rust async client registered, and prints one line
// `RESULT <json>` with what it saw, for the Rust test to assert.
//
// Usage: node tests/js/call_rust.mjs <server_url> <workspace> <token> <service_id>
//
// Every case runs in its own try/catch, so one failure does not hide the others; the script
// exits 0 once the RESULT line is printed, non-zero if it cannot connect or get the service.
import { hyphaWebsocketClient } from "hypha-rpc";
import WebSocket from "ws";

const [serverUrl, workspace, token, serviceId] = process.argv.slice(2);
if (!serviceId) {
  console.error("usage: call_rust.mjs <server_url> <workspace> <token> <service_id>");
  process.exit(2);
}

// Node 20 has no global WebSocket, and the client reads `WebSocket.OPEN` from the global even
// when given `WebSocketClass`, so set both.
globalThis.WebSocket ??= WebSocket;

// The client logs to the logger it is given; keep stdout for the RESULT line.
const quiet = () => {};
const logger = { log: quiet, debug: quiet, info: quiet, warn: console.error, error: console.error };

/** A typed array, ArrayBuffer or anything else, described as plain JSON. */
function describe(x) {
  if (x instanceof ArrayBuffer) return { ctor: "ArrayBuffer", values: Array.from(new Uint8Array(x)) };
  if (ArrayBuffer.isView(x)) return { ctor: x.constructor.name, values: Array.from(x) };
  return { ctor: x === null ? "null" : typeof x === "object" ? x.constructor.name : typeof x, value: x };
}

const results = {};
async function run(name, f) {
  try {
    results[name] = { ok: true, value: await f() };
  } catch (e) {
    results[name] = { ok: false, error: String(e && e.message ? e.message : e) };
  }
}

const server = await hyphaWebsocketClient.connectToServer({
  server_url: serverUrl,
  workspace,
  token,
  WebSocketClass: WebSocket,
  method_timeout: 30,
  logger,
});
const svc = await server.getService(serviceId);

// Plain positional call.
await run("positional", () => svc.add(2, 40));
// A positional object without `_rkwargs` stays positional.
await run("positional_object", () => svc.describe("pos", { a: 1 }));
// Keyword arguments: the last argument is an object with `_rkwargs: true`.
await run("kwargs", () => svc.describe("pos", { _rkwargs: true, name: "Ada", count: 3 }));
// Keyword arguments into a typed Rust function (they arrive as one trailing map).
// `_rkwargs` alone: no positional and no keyword arguments, but still a kwargs call.
await run("kwargs_empty", () => svc.describe({ _rkwargs: true }));
await run("kwargs_typed", () => svc.scale(2, { _rkwargs: true, factor: 3, offset: 0.5 }));
// A typed array inside keyword arguments.
await run("kwargs_typedarray", () =>
  svc.describe({ _rkwargs: true, label: "kw", data: new Float32Array([0.5, -4]) }),
);

// Typed arrays as arguments: Rust decodes each and returns what it saw.
const typed = {
  f32: new Float32Array([1.5, -2.25, 0.1, 3e38]),
  f64: new Float64Array([0.1, -1e300, 2.5]),
  i8: new Int8Array([-128, -1, 0, 127]),
  i16: new Int16Array([-32768, 1234, 32767]),
  i32: new Int32Array([-2147483648, -1, 0, 2147483647]),
  u8: new Uint8Array([0, 1, 254, 255]),
  u16: new Uint16Array([0, 513, 65535]),
  u32: new Uint32Array([0, 1, 4294967295]),
  // A view on part of a buffer: [2, 3] of [1, 2, 3, 4].
  f32_sub: new Float32Array([1, 2, 3, 4]).subarray(1, 3),
  // A plain ArrayBuffer (`memoryview` on the wire).
  buffer: new Uint8Array([9, 8, 7]).buffer,
  f32_empty: new Float32Array(0),
};
for (const [label, arr] of Object.entries(typed)) {
  await run(`inspect_${label}`, () => svc.inspect(arr, label));
}

// A 4 MB Float64Array (the message is sent in chunks); Rust checks every byte.
await run("inspect_large", async () => {
  const a = new Float64Array(500000).map((_, i) => i * 0.5);
  const r = await svc.inspect(a, "large");
  return { kind: r.kind, dtype: r.dtype, nbytes: r.nbytes, n: r.values.length, last: r.values.at(-1) };
});

// Rust returns arrays and bytes.
await run("double_f32", async () => describe(await svc.double_f32(new Float32Array([1.25, -3, 1e-3]))));
await run("make_bytes", async () => describe(await svc.make_bytes(5)));
// 3 MB back from Rust (chunked the other way): its length and a checksum.
await run("make_bytes_large", async () => {
  const b = await svc.make_bytes(3000000);
  let sum = 0;
  for (const x of b) sum += x;
  return { ctor: b.constructor.name, length: b.length, sum };
});
await run("make_typed", async () => {
  const r = await svc.make_typed();
  return Object.fromEntries(Object.entries(r).map(([k, v]) => [k, describe(v)]));
});
await run("make_ndarray", async () => {
  const r = await svc.make_ndarray();
  // Without numjs or tfjs loaded, the client hands the ndarray over as the raw typed map.
  const raw = r._rvalue;
  const bytes = raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength);
  return {
    rtype: r._rtype,
    shape: r._rshape,
    dtype: r._rdtype,
    rvalue_ctor: raw.constructor.name,
    values: Array.from(new Float32Array(bytes)),
  };
});
await run("make_memoryview", async () => describe(await svc.make_memoryview()));

// Errors from Rust.
await run("error", () => svc.fail("too cold"));
await run("error_decode", () => svc.add("x", 1));

console.log("RESULT " + JSON.stringify(results));
// Do not let a slow goodbye hold the process (the Rust side kills it after its timeout).
await Promise.race([server.disconnect(), new Promise((resolve) => setTimeout(resolve, 5000))]);
process.exit(0);
