// Browser WebRTC harness: drives Debian's headless Chromium (via playwright-core, which never
// downloads a browser here) running the npm hypha-rpc browser bundle, to reach a service over a
// WebRTC data channel the way a web page would.
//
// Usage: node tests/js/rtc_browser.mjs SERVER_URL WORKSPACE TOKEN RTC_SERVICE_ID SERVICE_NAME
//   RTC_SERVICE_ID  "<ws>/<client>-rtc", the answering peer's WebRTC offer service
//   SERVICE_NAME    the service to get over the channel ("py-rtc"; a full "<ws>/<client>:name"
//                   is cut to the name). WORKSPACE/TOKEN may be "" (anonymous).
// Needs: scripts/js-deps.sh (playwright-core, hypha-rpc) and scripts/chromium.sh.
// Env: CHROMIUM (default /usr/bin/chromium), RTC_BROWSER_TIMEOUT (whole scenario, s, default
//   300), RTC_BROWSER_CALL_TIMEOUT (one call, s, default 120), RTC_BROWSER_DEBUG=1 (page
//   console to stderr), RTC_BROWSER_CHUNK_SIZE (the page's long_message_chunk_size over the
//   channel; hypha-rpc's default 256 KiB chunks exceed Chromium's 262 144-byte message limit,
//   so without it the browser cannot send more than about 256 KiB to anyone).
//
// The page (rtc_page.html, served with the bundle from a throwaway http server on 127.0.0.1)
// connects to SERVER_URL over websocket, calls getRTCService(server, RTC_SERVICE_ID,
// {ice_servers: []}) (no STUN), gets SERVICE_NAME over the channel and runs the checks. Each
// check prints one stdout line {"check", "ok", "detail", "ms"}, in this order:
//   connect_ms  getRTCService -> getService -> first successful echo ("ms" is that time;
//               detail.rtc_ms includes hypha-rpc's fixed 1 s wait after the channel opens)
//   sdp         the candidates Chromium gathered and sent, the answer's, max-message-size,
//               ICE pairs and the selected one (ok when everything offered and used is loopback)
//   echo        a string and a small object
//   callback    call_cb(cb, 7) with cb = x => 3x, expects 21
//   generator   count(5) -> [0, 1, 2, 3, 4]
//   whoami      whatever whoami() returns (ok unless it throws)
//   bytes_probe digest() of 16 KiB .. 300 KiB, around the data channel's message-size limits
//   bytes_1mb, bytes_20mb   digest(pattern) -> {len, sha256} and make_bytes(n) (i % 251)
// then {"done": true}. Exit 0 once all checks ran (failed checks are reported, not fatal);
// on a fatal error a {"done": false, "error"} line and exit 2 (browser/page did not start),
// 3 (could not connect to the server, open the WebRTC channel or make a first call) or 4
// (RTC_BROWSER_TIMEOUT passed before the checks finished); 64 for bad usage.
//
// Only loopback is used: Chromium gets --allow-loopback-in-peer-connection and camera/
// microphone permission for the page origin (without both it offers only mDNS ".local" or
// non-loopback host candidates), and the page strips every candidate but UDP 127.0.0.0/8 from
// the offer before the answerer sees it. Chromium still gathers the machine's other
// interfaces, and given the answer's 127.0.0.1 candidate it probes it from every local socket
// (and may select e.g. eth0-address -> 127.0.0.1, so the answerer replies to the eth0
// address). So by default (RTC_BROWSER_ANSWER_CANDIDATES=drop) the answer's candidate lines
// are removed before setRemoteDescription: the answerer (a full ICE agent) must send the
// connectivity checks to the offer's 127.0.0.1 candidate, and Chromium answers them and
// nominates on that loopback socket only. RTC_BROWSER_ANSWER_CANDIDATES=keep passes the
// answer unchanged (needed for an ICE-lite answerer that never sends checks itself).
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const BUNDLE = path.join(HERE, "node_modules", "hypha-rpc", "dist", "hypha-rpc-websocket.min.js");
const PAGE = path.join(HERE, "rtc_page.html");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const TIMEOUT_S = Number(process.env.RTC_BROWSER_TIMEOUT || 300);
const CALL_TIMEOUT_S = Number(process.env.RTC_BROWSER_CALL_TIMEOUT || 120);
const DEBUG = process.env.RTC_BROWSER_DEBUG === "1";

export const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--allow-loopback-in-peer-connection",
];

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function serve() {
  const files = {
    "/": ["text/html; charset=utf-8", PAGE],
    "/rtc_page.html": ["text/html; charset=utf-8", PAGE],
    "/hypha-rpc-websocket.min.js": ["text/javascript; charset=utf-8", BUNDLE],
  };
  const server = http.createServer((req, res) => {
    const f = files[new URL(req.url, "http://x").pathname];
    if (req.url === "/favicon.ico") {
      res.writeHead(204).end();
      return;
    }
    if (!f) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": f[0], "cache-control": "no-store" });
    fs.createReadStream(f[1]).pipe(res);
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve(server));
  });
}

async function main(argv) {
  if (argv.length !== 5) {
    process.stderr.write(
      "usage: node rtc_browser.mjs SERVER_URL WORKSPACE TOKEN RTC_SERVICE_ID SERVICE_NAME\n",
    );
    return 64;
  }
  const [server_url, workspace, token, rtc_service_id, service_name] = argv;
  for (const f of [BUNDLE, PAGE, CHROMIUM]) {
    if (!fs.existsSync(f)) {
      emit({ done: false, error: `missing ${f} (run scripts/js-deps.sh and scripts/chromium.sh)` });
      return 2;
    }
  }

  const httpServer = await serve();
  const origin = `http://127.0.0.1:${httpServer.address().port}`;
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "rtc-browser-profile-"));
  let context = null;
  const repeats = new Map();
  const cleanup = async () => {
    for (const [text, n] of repeats) {
      if (n > 1) process.stderr.write(`${text} (x${n})\n`);
    }
    repeats.clear();
    if (context) await context.close().catch(() => {});
    context = null;
    httpServer.close();
    fs.rmSync(profile, { recursive: true, force: true });
  };
  const onSignal = () => cleanup().finally(() => process.exit(130));
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);

  try {
    let page;
    try {
      context = await chromium.launchPersistentContext(profile, {
        executablePath: CHROMIUM,
        headless: true,
        args: CHROMIUM_ARGS,
        timeout: 60_000,
      });
      await context.grantPermissions(["camera", "microphone"], { origin });
      page = context.pages()[0] || (await context.newPage());
      page.on("console", (m) => {
        if (!DEBUG && m.type() !== "error") return;
        const text = `[page ${m.type()}] ${m.text()}`;
        // hypha-rpc logs one error per failed chunk: print each text once, count repeats.
        const n = (repeats.get(text) || 0) + 1;
        repeats.set(text, n);
        if (n === 1) process.stderr.write(`${text}\n`);
      });
      page.on("pageerror", (e) => process.stderr.write(`[page error] ${e}\n`));
      await page.exposeFunction("__report", (obj) => emit(obj));
      await page.goto(`${origin}/rtc_page.html`, { timeout: 30_000 });
      await page.waitForFunction(() => typeof window.runScenario === "function", null, {
        timeout: 30_000,
      });
    } catch (e) {
      emit({ done: false, error: `browser: ${e.message.split("\n")[0]}` });
      process.stderr.write(`${e.stack || e}\n`);
      return 2;
    }

    let out;
    try {
      const args = {
        server_url,
        workspace,
        token,
        rtc_service_id,
        service_name,
        method_timeout: CALL_TIMEOUT_S,
        call_timeout: CALL_TIMEOUT_S,
        answer_candidates: process.env.RTC_BROWSER_ANSWER_CANDIDATES || "drop",
        chunk_size: process.env.RTC_BROWSER_CHUNK_SIZE ? Number(process.env.RTC_BROWSER_CHUNK_SIZE) : null,
      };
      let timer;
      out = await Promise.race([
        page.evaluate((a) => window.runScenario(a, window.__report), args),
        new Promise((resolve) => {
          timer = setTimeout(
            () => resolve({ fatal: `scenario did not finish in ${TIMEOUT_S} s`, timeout: true }),
            TIMEOUT_S * 1000,
          );
        }),
      ]);
      clearTimeout(timer);
    } catch (e) {
      out = { fatal: `page: ${e.message.split("\n")[0]}` };
    }
    if (out && out.fatal) {
      emit({ done: false, error: out.fatal });
      return out.timeout ? 4 : 3;
    }
    emit({ done: true });
    return 0;
  } finally {
    await cleanup();
  }
}

process.exitCode = await main(process.argv.slice(2));
