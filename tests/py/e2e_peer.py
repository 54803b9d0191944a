# A real Python hypha-rpc peer with end-to-end encryption, for tests/tests/client_e2e_python.rs.
"""Usage: python e2e_peer.py SERVER_URL WORKSPACE TOKEN

Joins WORKSPACE as client "py-e2e" with {"encryption": True} (method_timeout 20 s) and
registers "py-enc" (public, require_context): `echo`, `whoami` (what the context says about
encryption), `call_cb` (calls the caller's callback), `digest` (length and SHA-256 of bytes)
and the async generator `count`. Then prints {"event": "ready", "workspace", "public_key",
"service_id"} and serves commands, one JSON object per stdin line, each with an "id"; every
answer is one stdout line with the same "id". Commands run concurrently:

- {"cmd": "register", "service_id": S, "trusted_keys": [hex, ...]}: registers `whoami` and
  `echo` as service S with config.trusted_keys; answers {"ok": full service id};
- {"cmd": "get", "alias": A, "service": ID, "key": hex or null, "short": bool}: get_service
  with {"encryption_public_key": key} when a key is given, kept as A; "short" uses a second
  encrypted client "py-e2e-short" whose method_timeout is 3 s;
- {"cmd": "call", "alias": A, "method": M, "args": [...]}: calls it and answers {"ok": result}
  or {"error": text, "type": class}, with "elapsed" seconds either way. In args,
  {"$pattern": N} becomes N bytes (i % 251) and {"$cb": "triple"} a callback returning 3x
  (its calls are counted in {"cmd": "cb_calls"}). Bytes in results come back as
  {"$len": n, "$sha256": hex};
- {"cmd": "leave"}: disconnects and exits 0.
"""
import asyncio
import hashlib
import sys
import time

from hypha_rpc import connect_to_server

from peer_util import CALLS, decode_arg, emit, pattern, plain, serve_lines  # noqa: E402,F401


# ---- the Python service (Rust calls Python) -----------------------------------------------


def echo(x, context=None):
    """Return the argument unchanged."""
    return x


def whoami(context=None):
    """What the context says about the caller and encryption."""
    return {
        "from": context["from"],
        "encryption": context.get("encryption", False),
        "caller_public_key": context.get("caller_public_key"),
    }


async def call_cb(cb, x, context=None):
    """Call the caller's callback with x."""
    return await cb(x)


def digest(b, context=None):
    """Length and SHA-256 of bytes."""
    return {"len": len(b), "sha256": hashlib.sha256(bytes(b)).hexdigest()}


async def count(n, context=None):
    """Async generator yielding 0..n-1."""
    for i in range(n):
        await asyncio.sleep(0)
        yield i


# ---- commands -------------------------------------------------------------------------------


async def capture(coro):
    start = time.monotonic()
    try:
        r = await coro
        return {"ok": plain(r), "elapsed": time.monotonic() - start}
    except Exception as e:  # noqa: BLE001 - the test asserts on the text
        return {"error": str(e), "type": type(e).__name__, "elapsed": time.monotonic() - start}


async def handle(ctx, msg):
    cmd = msg["cmd"]
    if cmd == "register":
        # Fresh function objects: hypha-rpc keys a function's config (trusted_keys included) by
        # the function object, so sharing `whoami` with "py-enc" would change "py-enc" too.
        def whoami_here(context=None):
            return whoami(context)

        def echo_here(x, context=None):
            return x

        svc = await ctx["peer"].register_service(
            {
                "id": msg["service_id"],
                "config": {
                    "visibility": "public",
                    "require_context": True,
                    "trusted_keys": msg["trusted_keys"],
                },
                "whoami": whoami_here,
                "echo": echo_here,
            }
        )
        return {"ok": svc["id"]}
    if cmd == "get":
        client = ctx["peer"]
        if msg.get("short"):
            if "short" not in ctx:
                ctx["short"] = await connect_to_server(
                    {**ctx["base"], "client_id": "py-e2e-short", "method_timeout": 3, "encryption": True}
                )
            client = ctx["short"]
        config = {"encryption_public_key": msg["key"]} if msg.get("key") else {}
        ctx["remote"][msg["alias"]] = await client.get_service(msg["service"], config)
        return {"ok": True}
    if cmd == "call":
        fn = getattr(ctx["remote"][msg["alias"]], msg["method"])
        return await capture(fn(*decode_arg(msg.get("args", []))))
    if cmd == "cb_calls":
        return {"ok": CALLS["cb_calls"]}
    raise ValueError(f"unknown command {cmd}")


async def run_one(ctx, msg):
    try:
        out = await handle(ctx, msg)
    except Exception as e:  # noqa: BLE001 - reported to the Rust test
        out = {"exception": f"{type(e).__name__}: {e}"}
    emit({"id": msg["id"], **out})


async def main(url, workspace, token):
    base = {"server_url": url, "workspace": workspace, "token": token}
    peer = await connect_to_server({**base, "client_id": "py-e2e", "method_timeout": 20, "encryption": True})
    svc = await peer.register_service(
        {
            "id": "py-enc",
            "config": {"visibility": "public", "require_context": True},
            "echo": echo,
            "whoami": whoami,
            "call_cb": call_cb,
            "digest": digest,
            "count": count,
        }
    )
    emit(
        {
            "event": "ready",
            "workspace": peer.config.workspace,
            "public_key": peer.rpc.get_public_key(),
            "service_id": svc["id"],
        }
    )
    ctx = {"peer": peer, "base": base, "remote": {}}

    async def leave():
        if "short" in ctx:
            await ctx["short"].disconnect()
        await peer.disconnect()

    await serve_lines(lambda msg: run_one(ctx, msg), leave)

if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
