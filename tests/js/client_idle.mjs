// An idle connected JavaScript client (npm hypha-rpc under node), for the idle-RSS figure of
// tests/examples/client_bench.rs.
//
// Usage: node tests/js/client_idle.mjs SERVER_URL  (prints READY, exits when stdin closes)
import WebSocket from "ws";

// Node 20 has no global WebSocket, and the client reads `WebSocket.OPEN` from the global.
globalThis.WebSocket ??= WebSocket;
const { hyphaWebsocketClient } = await import("hypha-rpc");

const quiet = () => {};
const logger = { log: quiet, debug: quiet, info: quiet, warn: console.error, error: console.error };
const server = await hyphaWebsocketClient.connectToServer({
  server_url: process.argv[2],
  WebSocketClass: WebSocket,
  logger,
});
console.log("READY");
// A line or EOF on stdin ends it.
let finishing = false;
const finish = async () => {
  if (finishing) return;
  finishing = true;
  await server.disconnect();
  process.exit(0);
};
process.stdin.once("data", finish);
process.stdin.once("end", finish);
