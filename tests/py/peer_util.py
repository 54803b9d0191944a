# What the line-driven Python test peers share (tests/py/e2e_peer.py, tests/py/rtc_peer.py):
# JSON-line output, the byte pattern every test peer agrees on, JSON-safe results, and the
# argument markers the Rust tests send ({"$pattern": N}, {"$cb": "triple"}).
import asyncio
import hashlib
import json
import os
import sys

# Calls of the "triple" callbacks handed out by decode_arg.
CALLS = {"cb_calls": 0}


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def pattern(n):
    block = bytes(range(251))
    return (block * (n // 251 + 1))[:n]


def plain(x):
    """A JSON-safe form of a value (maps arrive as ObjectProxy, hence dict.items); bytes as
    {"$len", "$sha256"}."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in dict.items(x)}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, (bytes, bytearray, memoryview)):
        b = bytes(x)
        return {"$len": len(b), "$sha256": hashlib.sha256(b).hexdigest()}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)


def decode_arg(x):
    """{"$pattern": N} becomes N bytes, {"$cb": "triple"} a callback returning 3x (counted in
    CALLS), recursively."""
    if isinstance(x, dict):
        if set(x) == {"$pattern"}:
            return pattern(x["$pattern"])
        if set(x) == {"$cb"}:
            assert x["$cb"] == "triple"

            async def triple(v):
                CALLS["cb_calls"] += 1
                return v * 3

            return triple
        return {k: decode_arg(v) for k, v in x.items()}
    if isinstance(x, list):
        return [decode_arg(v) for v in x]
    return x


async def serve_lines(run_one, leave):
    """Reads one JSON command per stdin line and runs each as a task with run_one(msg); on
    {"cmd": "leave"} awaits leave(), answers {"id", "left": true} and exits the process."""
    tasks = set()
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        if not line.strip():
            continue
        msg = json.loads(line)
        if msg.get("cmd") == "leave":
            await leave()
            emit({"id": msg.get("id"), "left": True})
            break
        t = asyncio.create_task(run_one(msg))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    sys.stdout.flush()
    os._exit(0)
