// The JavaScript third of the client benchmark (tests/examples/client_bench.rs): the same
// measurements as tests/py/client_bench.py, with the npm `hypha-rpc` client under node on the
// same server, printed as one JSON line with the same keys.
//
// Usage: node [--expose-gc] tests/js/client_bench.mjs SERVER_URL SECONDS
//
// Measures: connect-to-ready (median of 5), small echo latency between two JS clients (median
// and p99), sequential calls/s, calls/s with 16 in flight, generator items/s, and the time and
// peak RSS growth of 1/10/50 MB echoes. CPU time of this process per sequential call is
// reported too (both clients live here). With --expose-gc, a full GC runs before each big
// echo, so that the peak RSS growth does not carry garbage of the previous steps.
import { randomFillSync } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { performance } from "node:perf_hooks";
import WebSocket from "ws";

// Node 20 has no global WebSocket, and the client reads `WebSocket.OPEN` from the global even
// when given `WebSocketClass`, so set both.
globalThis.WebSocket ??= WebSocket;
const { hyphaWebsocketClient } = await import("hypha-rpc");

const [url, secondsArg] = process.argv.slice(2);
if (!url || !secondsArg) {
  console.error("usage: client_bench.mjs SERVER_URL SECONDS");
  process.exit(2);
}
const seconds = Number(secondsArg);

// The client logs to the logger it is given; keep stdout for the JSON line.
const quiet = () => {};
const logger = { log: quiet, debug: quiet, info: quiet, warn: console.error, error: console.error };

const now = () => performance.now() / 1e3; // seconds
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const cpuS = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};
function statusKib(key) {
  for (const line of readFileSync("/proc/self/status", "utf8").split("\n")) {
    if (line.startsWith(key)) return parseInt(line.split(/\s+/)[1], 10);
  }
  return 0;
}
const connect = (extra = {}) =>
  hyphaWebsocketClient.connectToServer({ server_url: url, WebSocketClass: WebSocket, logger, ...extra });

const out = {};
const conn = [];
for (let i = 0; i < 5; i++) {
  const t = now();
  const s = await connect();
  conn.push(now() - t);
  await s.disconnect();
}
out.connect_s = median(conn);

const owner = await connect({ method_timeout: 120 });
const token = await owner.generateToken();
const info = await owner.registerService({
  id: "bench",
  config: { visibility: "public" },
  echo: (x) => x,
  count: async function* (n) {
    for (let i = 0; i < n; i++) yield i;
  },
});
const caller = await connect({ workspace: owner.config.workspace, token, method_timeout: 120 });
const svc = await caller.getService(info.id);
for (let i = 0; i < 50; i++) await svc.echo("warm");

const lat = [];
const cpu0 = cpuS();
let tEnd = now() + seconds;
while (now() < tEnd) {
  const t = now();
  await svc.echo("hello");
  lat.push(now() - t);
}
const cpu = cpuS() - cpu0;
lat.sort((a, b) => a - b);
out.echo_median_s = lat[lat.length >> 1];
out.echo_p99_s = lat[Math.min(lat.length - 1, Math.floor(lat.length * 0.99))];
out.seq_calls_per_s = lat.length / lat.reduce((a, b) => a + b, 0);
out.cpu_per_call_s = cpu / lat.length;

let done = 0;
tEnd = now() + seconds;
async function worker() {
  while (now() < tEnd) {
    await svc.echo("hello");
    done += 1;
  }
}
let t = now();
await Promise.all(Array.from({ length: 16 }, worker));
out.par16_calls_per_s = done / (now() - t);

const n = 2000;
t = now();
let got = 0;
for await (const _ of await svc.count(n)) got += 1;
if (got !== n) throw new Error(`generator gave ${got} items, expected ${n}`);
out.gen_items_per_s = n / (now() - t);

out.big = [];
for (const mb of [1, 10, 50]) {
  globalThis.gc?.();
  const big = randomFillSync(new Uint8Array(mb * 1024 * 1024));
  writeFileSync("/proc/self/clear_refs", "5");
  const base = statusKib("VmRSS:");
  const t = now();
  const back = await svc.echo(big);
  const took = now() - t;
  const peak = statusKib("VmHWM:");
  if (!(back instanceof Uint8Array) || !Buffer.from(back.buffer, back.byteOffset, back.byteLength).equals(big)) {
    throw new Error(`${mb} MB echo came back different (${back?.constructor?.name})`);
  }
  out.big.push([mb, took, Math.max(0, peak - base)]);
}
out.echo_50mb_s = out.big[out.big.length - 1][1];
await caller.disconnect();
await owner.disconnect();
process.stdout.write(JSON.stringify(out) + "\n", () => process.exit(0));
