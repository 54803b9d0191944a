# A real Python hypha-rpc peer for real_server_engine.rs: serves "interop", then calls the Rust side.
"""Usage: python engine_peer.py SERVER_URL

1. Connects as "py-peer", registers the public service "interop", prints one JSON line
   {"workspace", "token", "service_id"} so the Rust client can join the same workspace.
2. Waits for a line "call <rust service id>" on stdin, calls every function of that Rust
   service, prints one JSON line {"results": ...} and exits.
"""
import asyncio
import json
import sys

from hypha_rpc import connect_to_server


def echo(x):
    """Return the argument unchanged."""
    return x


def add(a, b):
    """Add two values."""
    return a + b


def kwfunc(a, b=2, c=None):
    """Return the received positional/keyword arguments."""
    return {"a": a, "b": b, "c": c}


def raise_error(msg):
    """Raise an exception with a specific message."""
    raise Exception(f"interop-error: {msg}")


async def call_callback(cb, n):
    """Call the callback n times and collect its results."""
    return [await cb(i) for i in range(n)]


def sync_gen(n):
    """Sync generator yielding 0..n-1."""
    for i in range(n):
        yield i


async def async_gen(n):
    """Async generator yielding i*i."""
    for i in range(n):
        await asyncio.sleep(0)
        yield i * i


def whoami(context=None):
    """Return who called, from the server-set context."""
    return {"from": context["from"], "ws": context["ws"], "user_id": context["user"]["id"]}


def plain(x):
    if isinstance(x, dict):
        return {k: plain(v) for k, v in dict.items(x)}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, bytes):
        return {"bytes": list(x)}
    return x


async def main(url):
    peer = await connect_to_server({"server_url": url, "client_id": "py-peer", "method_timeout": 20})
    info = await peer.register_service(
        {
            "id": "interop",
            "config": {"visibility": "public", "require_context": ["whoami"]},
            "echo": echo,
            "add": add,
            "kwfunc": kwfunc,
            "raise_error": raise_error,
            "call_callback": call_callback,
            "whoami": whoami,
            "sync_gen": sync_gen,
            "async_gen": async_gen,
        }
    )
    token = await peer.generate_token()
    print(json.dumps({"workspace": peer.config.workspace, "token": token, "service_id": info["id"]}), flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    rust_id = line.split()[1]
    svc = await peer.get_service(rust_id)
    results = {}
    results["echo"] = plain(await svc.echo({"a": [1, 2.5, None, "x"], "b": b"\x00\x01"}))
    big = bytes(i % 251 for i in range(600_000))
    back = await svc.echo(big)
    results["big_echo_ok"] = back == big
    results["add"] = await svc.add(40, 2)
    results["count"] = [x async for x in await svc.count(4)]
    early = []
    async for x in await svc.count(100):
        early.append(x)
        if len(early) == 2:
            break
    results["count_early"] = early
    results["greet"] = await svc.greet(name="Ada")
    results["whoami"] = plain(await svc.whoami())
    try:
        await svc.fail("boom")
        results["fail"] = "no error"
    except Exception as e:  # noqa: BLE001 - we want the text
        results["fail"] = str(e)
    print(json.dumps({"results": results}), flush=True)
    await peer.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
