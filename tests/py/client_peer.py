# A real Python hypha-rpc peer for tests/tests/client_python.rs (the async Rust client).
"""Usage: python client_peer.py SERVER_URL WORKSPACE TOKEN

Joins WORKSPACE as client "py-peer" (method_timeout 20 s) and registers two services:

- "py-svc" (public): every data type and numpy arrays, kwargs, errors, callbacks both ways,
  async generators (plain, closed early, failing, and one passed in by the caller), an
  `_rintf` counter and a user of the caller's `_rintf` object, an async `slow` function (for
  the heartbeat test) and a blocking sync `block` one (which sends no heartbeats), and a
  descriptor of a method that does not exist;
- "py-ctx" (public, require_context: True): `whoami` and a `@schema_function` taking context.

Then prints {"event": "ready", ...} and serves commands, one JSON object per stdin line, each
with an "id"; every answer is one stdout line with the same "id". Commands run concurrently:

- {"cmd": "call_rust", "service": ID}: calls every function of the Rust test service and
  answers {"results": {...}} (also connects "py-hb" with method_timeout 3 s for the
  heartbeat case);
- {"cmd": "get", "service": ID}: get_service, kept as the "remote" proxy;
- {"cmd": "call", "method": NAME, "args": [...]}: calls it on the remote proxy and answers
  {"ok": result} or {"error": text}, with "elapsed" seconds either way;
- {"cmd": "leave"}: disconnects and exits 0.

Out-of-band lines {"event": NAME} report what the Rust test waits for (e.g. "slow_started").
"""
import asyncio
import hashlib
import json
import os
import sys
import time

import numpy as np
from hypha_rpc import connect_to_server
from hypha_rpc.utils.schema import schema_function

STATE = {"tracked_closed": False}


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def plain(x):
    """A JSON form of what arrived: bytes, sets, tuples and arrays are tagged.

    Maps arrive as ObjectProxy (a dict whose keys are attributes), hence dict.items.
    """
    if isinstance(x, np.ndarray):
        return {"$ndarray": {"dtype": str(x.dtype), "shape": list(x.shape)}}
    if isinstance(x, dict):
        return {k: plain(v) for k, v in dict.items(x)}
    if isinstance(x, tuple):
        return {"$tuple": [plain(v) for v in x]}
    if isinstance(x, list):
        return [plain(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return {"$set": sorted(plain(v) for v in x)}
    if isinstance(x, (bytes, bytearray, memoryview)):
        return {"$bytes": bytes(x).hex()}
    if isinstance(x, float) and x != x:
        return "NaN"
    return x


def make_array(dtype, shape):
    """The array both sides agree on: arange over the shape, cast to dtype."""
    n = int(np.prod(shape)) if len(shape) else 1
    return (np.arange(n) % 7 - 3).astype(dtype).reshape(tuple(shape))


# ---- the Python service (part B: Rust calls Python) -------------------------------------


def echo(x):
    """Return the argument unchanged."""
    return x


def describe(x):
    """The Python type of what arrived, and its JSON form."""
    out = {"type": type(x).__name__, "value": plain(x)}
    if isinstance(x, np.ndarray):
        out["dtype"] = str(x.dtype)
        out["shape"] = list(x.shape)
    return out


def make_values():
    """One value of every type of the encoding table."""
    return {
        "none": None,
        "t": True,
        "f": False,
        "zero": 0,
        "neg": -5,
        "min": -(2**63),
        "max": 2**64 - 1,
        "big": 2**32 + 5,
        "float": 1.5,
        "tiny": -2.5e-300,
        "text": "héllo wörld ✓ 日本語 🎉",
        "empty": "",
        "bytes": bytes(range(256)),
        "list": [1, -2, 3],
        "tuple": (7, "seven", True),
        "dict": {"a": 1, "b": 2},
        "nested": {
            "name": "outer",
            "items": [{"x": 1, "tags": ["a", "b"]}, {"x": 2, "tags": []}],
            "child": {"name": "inner", "items": [], "child": None},
        },
        "set": {3, 1, 2},
        "array": make_array("float32", [2, 3]),
    }


def make_nd(dtype, shape):
    """An ndarray of `dtype` and `shape` (see make_array)."""
    return make_array(dtype, shape)


def check_nd(arr, dtype, shape):
    """Whether `arr` is exactly make_array(dtype, shape)."""
    want = make_array(dtype, shape)
    return {
        "is_ndarray": isinstance(arr, np.ndarray),
        "dtype": str(arr.dtype) if isinstance(arr, np.ndarray) else None,
        "shape": list(arr.shape) if isinstance(arr, np.ndarray) else None,
        "equal": bool(isinstance(arr, np.ndarray) and arr.dtype == want.dtype and np.array_equal(arr, want)),
    }


def kwfunc(a, b=2, c=None):
    """Return the received positional/keyword arguments."""
    return {"a": a, "b": b, "c": c}


def raise_error(msg):
    """Raise with a known message."""
    raise ValueError(f"py-failure: {msg}")


async def call_callback(cb, n):
    """Call the callback n times and collect its results."""
    return [await cb(i) for i in range(n)]


async def callback_error(cb):
    """Call a callback that fails; return the error text."""
    try:
        await cb("x")
    except Exception as e:  # noqa: BLE001 - we want the text
        return {"raised": True, "message": str(e)}
    return {"raised": False, "message": ""}


def make_multiplier(k):
    """Return a function multiplying by k."""

    def multiply(x):
        return x * k

    return multiply


async def count(n):
    """Async generator yielding 0..n-1."""
    for i in range(n):
        await asyncio.sleep(0)
        yield i


async def consume(gen):
    """Collect a generator the caller passed."""
    return [x async for x in gen]


async def tracked(n):
    """Async generator that records whether it was closed early."""
    STATE["tracked_closed"] = False
    try:
        for i in range(n):
            yield i
    finally:
        STATE["tracked_closed"] = True


def tracked_closed():
    """Whether `tracked` was closed."""
    return STATE["tracked_closed"]


async def gen_fail(n):
    """Yield 0..n-1, then raise."""
    for i in range(n):
        yield i
    raise ValueError("py-gen-failure")


def make_counter(start):
    """A `_rintf` counter object."""
    state = {"v": start}

    def inc(by=1):
        state["v"] += by
        return state["v"]

    def get():
        return state["v"]

    return {"_rintf": True, "name": "py-counter", "inc": inc, "get": get}


async def use_interface(obj):
    """Use an `_rintf` object the caller passed: call it, dispose of it, call it again."""
    out = {"keys": sorted(k for k in dict.keys(obj) if not k.startswith("_rintf_service"))}
    out["inc"] = await obj.inc(2)
    out["get"] = await obj.get()
    out["name"] = dict.get(obj, "name")
    await obj._dispose()
    start = time.monotonic()
    try:
        await obj.inc(1)
        out["after_dispose"] = None
    except Exception as e:  # noqa: BLE001 - we want the text
        out["after_dispose"] = str(e)
    out["after_dispose_elapsed"] = time.monotonic() - start
    return out


async def slow(seconds):
    """Sleep asynchronously (heartbeats keep the caller waiting), return the seconds."""
    emit({"event": "slow_started"})
    await asyncio.sleep(seconds)
    return seconds


def block(seconds):
    """Block the event loop: a sync function sends no heartbeats while it runs."""
    time.sleep(seconds)
    return seconds


def missing_method():
    """A method descriptor of a function py-svc does not have."""
    return {
        "_rtype": "method",
        "_rtarget": f"{STATE['workspace']}/{STATE['client_id']}",
        "_rmethod": "services.py-svc.does_not_exist",
        "_rpromise": "*",
    }


def whoami(context=None):
    """Who called, from the server-set context."""
    return {"from": context["from"], "ws": context["ws"], "to": context["to"]}


@schema_function
def add_ctx(a: int, b: int, context=None) -> dict:
    """Add two numbers and say who asked."""
    return {"sum": a + b, "from": context["from"] if context else None}


# ---- part A: Python calls the Rust service -------------------------------------------------


async def capture(coro):
    """{"ok": plain(result)} or {"error": text, "type": exception class}, with "elapsed"."""
    start = time.monotonic()
    try:
        r = await coro
        return {"ok": plain(r), "elapsed": time.monotonic() - start}
    except Exception as e:  # noqa: BLE001 - the test asserts on the text
        return {"error": str(e), "type": type(e).__name__, "elapsed": time.monotonic() - start}


ECHO_VALUES = {
    "none": None,
    "true": True,
    "false": False,
    "zero": 0,
    "neg": -1,
    "min_i64": -(2**63),
    "max_u64": 2**64 - 1,
    "big": 2**32 + 5,
    "neg_big": -(2**40),
    "float": 1.5,
    "neg_float": -1e300,
    "text": "héllo wörld ✓ 日本語 🎉",
    "empty_str": "",
    "bytes": bytes(range(256)),
    "empty_bytes": b"",
    "list": [1, "a", None, 2.5],
    "empty_list": [],
    "tuple": (1, 2, "x"),
    "dict": {"a": 1, "b": "two"},
    "empty_dict": {},
    "nested": {"a": [1, {"b": [b"\x00\x01", {"c": None}]}], "d": {"e": {"f": [True, False]}}},
    "set": {1, 2, 3},
}

ALL_TYPES = {
    "none": None,
    "t": True,
    "f": False,
    "neg": -7,
    "min": -(2**63),
    "max": 2**64 - 1,
    "big": 2**32 + 5,
    "float": -0.125,
    "text": "grüße, 世界 🌍",
    "bytes": b"\x00\x01\x02\xff",
    "list": [1, 2, 3],
    "tuple": (4, "four", False),
    "dict": {"x": 1, "y": -2},
    "nested": {
        "name": "outer",
        "items": [{"x": 1, "tags": ["a"]}],
        "child": {"name": "inner", "items": [], "child": None},
    },
    "set": {5, 6},
}

ND_CASES = [
    ("float32", [2, 3]),
    ("float64", [5]),
    ("int8", [3, 2]),
    ("int16", [2, 2, 2]),
    ("int32", [4]),
    ("int64", [2, 3]),
    ("uint8", [16]),
    ("uint16", [3]),
    ("uint32", [1, 4]),
    ("uint64", [2]),
    ("bool", [6]),
    ("complex64", [2]),
    ("complex128", [1, 2]),
    ("float32", []),
    ("float64", [0, 3]),
]


async def call_rust(peer, hb_config, service_id):
    svc = await peer.get_service(service_id)
    r = {}

    # Every data type through an untyped echo.
    echo = {}
    for name, v in ECHO_VALUES.items():
        expected = list(v) if isinstance(v, tuple) else v
        try:
            back = await svc.echo(v)
            echo[name] = {"ok": plain(back), "type": type(back).__name__, "equal": back == expected}
        except Exception as e:  # noqa: BLE001
            echo[name] = {"error": str(e)}
    r["echo"] = echo

    # The same types into typed Rust fields (as keyword arguments to a struct), and back.
    c = await capture(svc.typed_all(**ALL_TYPES))
    r["typed_all"] = c
    # numpy arrays: Rust sees the fields, echoes the typed struct; Python compares.
    nd = []
    for dtype, shape in ND_CASES:
        a = make_array(dtype, shape)
        info = await capture(svc.nd_info(a))
        try:
            back = await svc.nd_echo(a)
            same = bool(
                isinstance(back, np.ndarray)
                and back.dtype == a.dtype
                and back.shape == a.shape
                and np.array_equal(back, a)
            )
            back_desc = plain(back)
        except Exception as e:  # noqa: BLE001
            same, back_desc = False, str(e)
        nd.append({"dtype": dtype, "shape": shape, "info": info, "roundtrip_equal": same, "back": back_desc})
    r["nd"] = nd
    made = await svc.nd_make(6)
    r["nd_make"] = {
        "is_ndarray": isinstance(made, np.ndarray),
        "equal": bool(
            isinstance(made, np.ndarray) and np.array_equal(made, np.arange(6, dtype="float32").reshape(2, 3))
        ),
        "dtype": str(getattr(made, "dtype", None)),
        "shape": list(getattr(made, "shape", [])),
    }
    r["set_from_rust"] = describe(await svc.make_set())

    # Errors.
    r["fail"] = await capture(svc.fail("boom"))
    r["bad_arg"] = await capture(svc.add("not a number", 1))

    # Keyword arguments.
    r["greet_kwargs"] = await capture(svc.greet(name="Ada", punctuation="!"))
    r["greet_kwarg_default"] = await capture(svc.greet(name="Bob"))
    r["scale_mixed"] = await capture(svc.scale(7, factor=6))
    r["raw_args"] = await capture(svc.raw_args(1, "two", x=3, y=[4]))

    # Callbacks: Python's functions called by Rust, Rust's functions called by Python.
    r["apply_sync"] = await capture(svc.apply(lambda x: x * 3, 7))

    async def async_cb(x):
        await asyncio.sleep(0.01)
        return x + 100

    r["apply_async"] = await capture(svc.apply(async_cb, 1))

    def failing_cb(x):
        raise RuntimeError("py-callback-failure")

    r["apply_failing"] = await capture(svc.apply(failing_cb, 1))
    adder = await svc.make_adder(10)
    r["adder"] = [await adder(1), await adder(2)]
    await svc.echo(None)  # another call in between: the returned function must still work
    r["adder_later"] = await capture(adder(5))
    got = []
    r["notify"] = await capture(svc.notify_each(["a", "b", "c"], lambda s: got.append(s) or len(got)))
    r["notify_got"] = got

    r["apply_nested"] = await capture(svc.apply_nested({"f": lambda x: -x, "x": 5}))

    async def squares(n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i * i

    r["sum_gen"] = await capture(svc.collect_gen(squares(5)))
    # Many calls at once.
    r["gather"] = await capture(asyncio.gather(*[svc.add(i, i) for i in range(200)]))

    # require_context: Rust sees who called.
    r["whoami"] = await capture(svc.whoami())

    # Generators: Rust returns a Generator, Python iterates it.
    r["count"] = [x async for x in await svc.count(5)]
    r["count_empty"] = [x async for x in await svc.count(0)]
    r["items"] = plain([x async for x in await svc.items()])
    early = []
    async for x in await svc.endless():
        early.append(x)
        if len(early) == 3:
            break
    r["endless_early"] = early
    got = []
    try:
        async for x in await svc.count_fail(2):
            got.append(x)
        r["count_fail"] = {"items": got, "error": None}
    except Exception as e:  # noqa: BLE001
        r["count_fail"] = {"items": got, "error": str(e)}

    # _rintf: Rust returns an Interface; Python calls it, disposes of it, calls again.
    counter = await svc.counter(10)
    r["rintf_keys"] = sorted(k for k in dict.keys(counter))
    r["rintf_name"] = dict.get(counter, "name")
    r["rintf_inc"] = await capture(counter.inc(5))
    r["rintf_inc2"] = await capture(counter.inc(1))
    r["rintf_get"] = await capture(counter.get())
    r["rintf_dispose"] = await capture(counter._dispose())
    r["rintf_after_dispose"] = await capture(counter.inc(1))
    r["rintf_total"] = await capture(svc.counter_total())

    # 20 MiB of bytes each way.
    big = bytes(i % 251 for i in range(256)) * (20 * 1024 * 1024 // 256)
    start = time.monotonic()
    try:
        back = await svc.echo_bytes(big)
        r["big"] = {"type": type(back).__name__, "equal": back == big, "elapsed": time.monotonic() - start}
    except Exception as e:  # noqa: BLE001
        r["big"] = {"error": str(e), "elapsed": time.monotonic() - start}
    r["big_sha256"] = hashlib.sha256(big).hexdigest()
    r["big_rust_sha256"] = await capture(svc.bytes_sha256(big))

    # A call longer than the caller's method_timeout (3 s), kept alive by Rust's heartbeats.
    hb = await connect_to_server(hb_config)
    try:
        hsvc = await hb.get_service(service_id)
        r["heartbeat"] = await capture(hsvc.sleep(6.0))
        r["heartbeat_timeout"] = hb_config["method_timeout"]
    finally:
        await hb.disconnect()

    # Missing method / service.
    missing = await svc.missing_method()
    r["missing_method"] = await capture(missing())
    r["missing_service"] = await capture(peer.get_service(service_id.rsplit(":", 1)[0] + ":no-such-service"))
    return r


# ---- command loop ---------------------------------------------------------------------------


async def handle(peer, hb_config, remote, msg):
    cmd = msg["cmd"]
    if cmd == "call_rust":
        return {"results": await call_rust(peer, hb_config, msg["service"])}
    if cmd == "get":
        remote["svc"] = await peer.get_service(msg["service"])
        return {"ok": sorted(k for k in dict.keys(remote["svc"]))}
    if cmd == "call":
        return await capture(getattr(remote["svc"], msg["method"])(*msg.get("args", [])))
    raise ValueError(f"unknown command {cmd}")


async def run_one(peer, hb_config, remote, msg):
    try:
        out = await handle(peer, hb_config, remote, msg)
    except Exception as e:  # noqa: BLE001 - reported to the Rust test
        out = {"exception": f"{type(e).__name__}: {e}"}
    emit({"id": msg["id"], **out})


async def main(url, workspace, token):
    base = {"server_url": url, "workspace": workspace, "token": token}
    peer = await connect_to_server({**base, "client_id": "py-peer", "method_timeout": 20})
    STATE["workspace"] = peer.config.workspace
    STATE["client_id"] = "py-peer"
    svc = await peer.register_service(
        {
            "id": "py-svc",
            "config": {"visibility": "public"},
            "echo": echo,
            "describe": describe,
            "make_values": make_values,
            "make_nd": make_nd,
            "check_nd": check_nd,
            "kwfunc": kwfunc,
            "raise_error": raise_error,
            "call_callback": call_callback,
            "callback_error": callback_error,
            "make_multiplier": make_multiplier,
            "count": count,
            "consume": consume,
            "tracked": tracked,
            "tracked_closed": tracked_closed,
            "gen_fail": gen_fail,
            "make_counter": make_counter,
            "use_interface": use_interface,
            "slow": slow,
            "block": block,
            "missing_method": missing_method,
        }
    )
    ctx = await peer.register_service(
        {
            "id": "py-ctx",
            "config": {"visibility": "public", "require_context": True},
            "whoami": whoami,
            "add_ctx": add_ctx,
        }
    )
    hb_config = {**base, "client_id": "py-hb", "method_timeout": 3}
    ready = {"workspace": peer.config.workspace, "service_id": svc["id"], "ctx_service_id": ctx["id"]}
    emit({"event": "ready", **ready})
    remote = {}
    tasks = set()
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        msg = json.loads(line)
        if msg["cmd"] == "leave":
            await peer.disconnect()
            emit({"id": msg["id"], "left": True})
            break
        t = asyncio.create_task(run_one(peer, hb_config, remote, msg))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    # The stdin reader thread may still block; exit without waiting for it.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
