# A real Python hypha-rpc peer speaking WebRTC (aiortc), for the Rust WebRTC interop tests.
"""Usage: python rtc_peer.py SERVER_URL [ROLE] [--workspace WS] [--token T] [--client-id ID]
                             [--visibility V] [--method-timeout S] [--rtc-config JSON]

ROLE is "serve" (default) or "client". Both connect with
{"webrtc": True, "webrtc_config": {"ice_servers": [{"urls": []}]}}, so both register the
answering service "<client_id>-rtc" (its one function `offer({sdp, type})` answers
{sdp, type: "answer", workspace}). Without --workspace/--token the connection is anonymous.
"serve" also registers "py-rtc" (visibility from --visibility, default "protected";
require_context) with `echo(x)`, `whoami()` (the context it received, JSON-safe), `call_cb(cb,
x)` (calls the caller's callback), `count(n)` (async generator 0..n-1), `digest(b)` (length and
SHA-256 of bytes) and `make_bytes(n)` (n bytes, i % 251).

hypha-rpc 0.21.47 registers "<client_id>-rtc" with webrtc_config itself as the service config,
so with the ice_servers this peer must pass, that service is "protected" and not
require_context unless --rtc-config adds them, e.g. '{"visibility": "public",
"require_context": true}' (merged into webrtc_config).

Only 127.0.0.1 ICE host candidates are gathered (aioice.ice.get_host_addresses is patched) and
no STUN/TURN server is configured, so nothing leaves loopback.

The first stdout line is {"event": "ready", "workspace", "client_id", "rtc_service_id",
"service_id" (null for "client")}. Then one JSON command per stdin line, each with an "id";
each gets exactly one stdout answer line with the same "id" (commands run concurrently):

- {"cmd": "get", "alias": A, "service": ID, "name": N, "via": V, "config": {...}, "nested": B}
    V = "rtc" (default): get_rtc_service(ws, ID, {"ice_servers": [{"urls": []}],
        "method_timeout": --method-timeout, **config}) (config may also set e.g.
        "long_message_chunk_size" or "peer_id", the data channel label)
        where ID is "<ws>/<client>-rtc", then peer.get_service(N) (N default "py-rtc"). ws is
        the websocket-only manager (one peer connection, as get_service({"webrtc": True})
        does); with "nested": true it is the WebRTC-wrapped server, so `offer` itself is
        called over a first WebRTC connection (see websocket_only);
    V = "get_service": server.get_service(ID, {"webrtc": True, "webrtc_config": that}) with
        ID the full "<ws>/<client>:py-rtc" (hypha-rpc derives the -rtc service from it);
    V = "ws": a plain websocket get_service(ID, config) (for comparison).
  The service is kept as A (a "get" that fails keeps nothing). Answers {"ok": {"service_id", "webrtc": bool, "connect_elapsed"
  (seconds to an open data channel, "rtc" only), "elapsed" (total)}} or {"error", "type",
  "elapsed"}.
- {"cmd": "call", "alias": A, "method": M, "args": [...], "timeout": S (optional)}: calls it;
  answers {"ok": result, "elapsed"} or {"error": text, "type": class, "elapsed"}. In args
  {"$pattern": N} becomes N bytes (i % 251) and {"$cb": "triple"} a callback returning 3x.
  Bytes in results come back as {"$len": n, "$sha256": hex}; an async generator result is
  drained into {"$items": [...]}.
- {"cmd": "token", "config": {...}}: {"ok": server.generate_token(config)} (a token for this
  peer's workspace, e.g. to let another peer join it).
- {"cmd": "cb_calls"}: {"ok": number of "triple" callback calls so far}.
- {"cmd": "sdp"}: {"ok": [{"dir": "local"|"remote", "type": "offer"|"answer", "sdp": text}, ...]}
  every session description this process set so far (both roles).
- {"cmd": "close", "alias": A}: closes that WebRTC peer connection; {"ok": true}.
- {"cmd": "leave"}: disconnects and exits 0 after answering {"left": true}.
Malformed/failed commands answer {"exception": "Type: text"}.

With RTC_PEER_DEBUG=1 every SDP set locally/remotely is printed to stderr.
"""
import argparse
import asyncio
import functools
import hashlib
import json
import logging
import os
import sys
import time

import aioice.ice
import aiortc

# hypha_rpc.webrtc_client calls logging.basicConfig(stream=sys.stdout); claim the root logger
# for stderr first so stdout carries only JSON lines.
logging.basicConfig(level=os.environ.get("RTC_PEER_LOGLEVEL", "WARNING").upper(), stream=sys.stderr)

# Loopback only: no interface other than 127.0.0.1 is offered as an ICE host candidate.
aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=False: ["127.0.0.1"] if use_ipv4 else []

from hypha_rpc import connect_to_server  # noqa: E402
from hypha_rpc.webrtc_client import get_rtc_service  # noqa: E402

ICE = {"ice_servers": [{"urls": []}]}
DEBUG = os.environ.get("RTC_PEER_DEBUG") == "1"
from peer_util import CALLS, decode_arg, emit, pattern, plain, serve_lines  # noqa: E402,F401

STATE = {"sdp": []}


def _log_sdp(direction, desc):
    STATE["sdp"].append({"dir": direction, "type": desc.type, "sdp": desc.sdp})
    if DEBUG:
        sys.stderr.write(f"---- {direction} {desc.type} ----\n{desc.sdp}\n")
        sys.stderr.flush()


_orig_set_local = aiortc.RTCPeerConnection.setLocalDescription
_orig_set_remote = aiortc.RTCPeerConnection.setRemoteDescription


async def _set_local(self, description=None):
    r = await _orig_set_local(self, description)
    _log_sdp("local", self.localDescription)
    return r


async def _set_remote(self, description):
    _log_sdp("remote", description)
    return await _orig_set_remote(self, description)


aiortc.RTCPeerConnection.setLocalDescription = _set_local
aiortc.RTCPeerConnection.setRemoteDescription = _set_remote


# ---- the Python service ---------------------------------------------------------------------


def echo(x, context=None):
    """Return the argument unchanged."""
    return x


def whoami(context=None):
    """The context this call arrived with, JSON-safe."""
    return plain(context)


async def call_cb(cb, x, context=None):
    """Call the caller's callback with x."""
    return await cb(x)


async def count(n, context=None):
    """Async generator yielding 0..n-1."""
    for i in range(n):
        await asyncio.sleep(0)
        yield i


def digest(b, context=None):
    """Length and SHA-256 of bytes."""
    return {"len": len(b), "sha256": hashlib.sha256(bytes(b)).hexdigest()}


def make_bytes(n, context=None):
    """n bytes, i % 251."""
    return pattern(n)


def websocket_only(server):
    """The workspace manager without the WebRTC get_service wrapper.

    With {"webrtc": True}, connect_to_server replaces server.get_service with
    partial(webrtc_get_service, original) and that wrapper tries WebRTC for every service with
    a client id, even with {"webrtc": False}. Passing the wrapped server to get_rtc_service
    therefore fetches "<client>-rtc" over a first, nested WebRTC connection and calls `offer`
    over it before opening the second (used) one.
    """
    f = server.get_service
    if isinstance(f, functools.partial) and f.args:
        return f.args[0]
    return server


# ---- commands -------------------------------------------------------------------------------


async def capture(coro, timeout=None):
    start = time.monotonic()
    try:
        r = await asyncio.wait_for(coro, timeout) if timeout else await coro
        if hasattr(r, "__anext__"):
            r = {"$items": [v async for v in r]}
        return {"ok": plain(r), "elapsed": time.monotonic() - start}
    except Exception as e:  # noqa: BLE001 - the test asserts on the text
        return {"error": str(e), "type": type(e).__name__, "elapsed": time.monotonic() - start}


async def do_get(ctx, msg):
    server = ctx["server"]
    via = msg.get("via", "rtc")
    # The data-channel RPC hypha-rpc builds defaults to a 10 s method_timeout; use ours.
    config = {**ICE, "method_timeout": ctx["method_timeout"], **(msg.get("config") or {})}
    start = time.monotonic()
    out = {}
    try:
        if via == "rtc":
            base = server if msg.get("nested") else websocket_only(server)
            peer = await get_rtc_service(base, msg["service"], config)
            out["connect_elapsed"] = time.monotonic() - start
            ctx["peers"][msg["alias"]] = peer
            svc = await peer.get_service(msg.get("name", "py-rtc"))
            webrtc = True
        elif via == "get_service":
            svc = await server.get_service(
                msg["service"], {"webrtc": True, "webrtc_config": config}
            )
            webrtc = bool(getattr(svc, "_webrtc", False))
            if webrtc:
                ctx["peers"][msg["alias"]] = svc._peer
        elif via == "ws":
            svc = await websocket_only(server).get_service(msg["service"], config)
            webrtc = False
        else:
            raise ValueError(f"unknown via {via}")
    except Exception as e:  # noqa: BLE001
        return {"error": str(e), "type": type(e).__name__, "elapsed": time.monotonic() - start}
    ctx["remote"][msg["alias"]] = svc
    out.update({"service_id": svc["id"], "webrtc": webrtc, "elapsed": time.monotonic() - start})
    return {"ok": out}


async def handle(ctx, msg):
    cmd = msg["cmd"]
    if cmd == "get":
        return await do_get(ctx, msg)
    if cmd == "call":
        fn = getattr(ctx["remote"][msg["alias"]], msg["method"])
        return await capture(fn(*decode_arg(msg.get("args", []))), msg.get("timeout"))
    if cmd == "token":
        return {"ok": await ctx["server"].generate_token(msg.get("config") or {})}
    if cmd == "cb_calls":
        return {"ok": CALLS["cb_calls"]}
    if cmd == "sdp":
        return {"ok": STATE["sdp"]}
    if cmd == "close":
        peer = ctx["peers"].pop(msg["alias"])
        await peer.close()
        return {"ok": True}
    raise ValueError(f"unknown command {cmd}")


async def run_one(ctx, msg):
    try:
        out = await handle(ctx, msg)
    except Exception as e:  # noqa: BLE001 - reported to the Rust test
        out = {"exception": f"{type(e).__name__}: {e}"}
    emit({"id": msg.get("id"), **out})


async def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("role", nargs="?", default="serve", choices=["serve", "client"])
    ap.add_argument("--workspace")
    ap.add_argument("--token")
    ap.add_argument("--client-id")
    ap.add_argument("--visibility", default="protected")
    ap.add_argument("--method-timeout", type=float, default=30)
    ap.add_argument("--rtc-config", default="{}")
    a = ap.parse_args(argv)
    conf = {
        "server_url": a.url,
        "method_timeout": a.method_timeout,
        "webrtc": True,
        "webrtc_config": {**ICE, **json.loads(a.rtc_config)},
    }
    if a.workspace:
        conf["workspace"] = a.workspace
    if a.token:
        conf["token"] = a.token
    if a.client_id:
        conf["client_id"] = a.client_id
    server = await connect_to_server(conf)
    service_id = None
    if a.role == "serve":
        svc = await server.register_service(
            {
                "id": "py-rtc",
                "config": {"visibility": a.visibility, "require_context": True},
                "echo": echo,
                "whoami": whoami,
                "call_cb": call_cb,
                "count": count,
                "digest": digest,
                "make_bytes": make_bytes,
            }
        )
        service_id = svc["id"]
    ws = server.config.workspace
    cid = server.config.client_id
    emit(
        {
            "event": "ready",
            "workspace": ws,
            "client_id": cid,
            "rtc_service_id": f"{ws}/{cid}-rtc",
            "service_id": service_id,
        }
    )
    ctx = {"server": server, "remote": {}, "peers": {}, "method_timeout": a.method_timeout}

    async def leave():
        for peer in list(ctx["peers"].values()):
            try:
                await asyncio.wait_for(peer.close(), 5)
            except Exception:  # noqa: BLE001
                pass
        try:
            await asyncio.wait_for(server.disconnect(), 5)
        except Exception:  # noqa: BLE001
            pass

    await serve_lines(lambda msg: run_one(ctx, msg), leave)

if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
