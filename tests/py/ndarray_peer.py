# A real Python hypha-rpc peer for tests/tests/client_ndarray.rs (feature `ndarray`).
"""Usage: python ndarray_peer.py SERVER_URL WORKSPACE TOKEN RUST_SERVICE_ID

Joins WORKSPACE as client "py-nd", registers the service "py-nd" (for Rust to call) and prints
{"event": "ready", "service_id": ...}. Then reads commands, one per stdin line:

- "call_rust": calls the Rust service RUST_SERVICE_ID with numpy arrays of every supported
  dtype and many shapes and layouts, checks the arrays it returns, and prints
  {"event": "results", "results": [{"case": ..., "ok": bool, "detail": ...}, ...]};
- "leave" (or end of input): disconnects and exits.

The service "py-nd":
- check(arr, dtype, shape, flat): whether `arr` is a numpy array of `dtype` and `shape` whose
  elements in C order are `flat`; returns {"ok", "detail", "back": arr.T};
- check_frame(frame): a dict with an ndarray field, as sent by `serde_array`.
"""
import asyncio
import json
import os
import sys

import numpy as np
from hypha_rpc import connect_to_server

DTYPES = [
    "bool",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float32",
    "float64",
]


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def samples(dtype, n):
    """n values of dtype: the extremes first, then a pattern (same as `samples` in Rust)."""
    dt = np.dtype(dtype)
    if dt.kind == "b":
        vals = [i % 3 == 0 for i in range(n)]
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        special = [int(info.min), int(info.max), 0, 1, int(info.max) - 1]
        shift = 100 if dt.kind == "i" else 0
        vals = [special[i] if i < len(special) else (i * 37) % 200 - shift for i in range(n)]
    else:
        fi = np.finfo(dt)
        special = [0.0, -0.0, 1.5, -2.25, float(fi.max), float(fi.tiny), np.inf, -np.inf, np.nan]
        vals = [special[i] if i < len(special) else (i - 50) / 8 for i in range(n)]
    return np.array(vals, dtype=dt)


def bump(a):
    """What the Rust service applies before transposing: not, +1 (wrapping), or *2."""
    a = np.asarray(a)
    with np.errstate(all="ignore"):
        if a.dtype.kind == "b":
            return np.logical_not(a)
        if a.dtype.kind in "iu":
            return np.asarray(a + a.dtype.type(1), dtype=a.dtype)
        return np.asarray(a * a.dtype.type(2), dtype=a.dtype)


def same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f")


def describe(x):
    if isinstance(x, np.ndarray):
        return f"ndarray {x.dtype} {x.shape}"
    return f"{type(x).__name__}: {x!r}"[:200]


def cases(dtype):
    """(name, array) pairs: 0-d, numpy scalar, 1-d, 3-d, empty, sliced, reversed, Fortran, >."""
    dt = np.dtype(dtype)
    big = samples(dtype, 120).reshape(6, 20)
    out = [
        ("0d", samples(dtype, 2)[1:].reshape(())),
        ("1d", samples(dtype, 11)),
        ("3d", samples(dtype, 24).reshape(2, 3, 4)),
        ("empty", samples(dtype, 0)),
        ("empty3d", samples(dtype, 0).reshape(2, 0, 3)),
        ("slice", big[::2, 1::3]),
        ("reversed", big[::-1, ::-3]),
        ("fortran", np.asfortranarray(samples(dtype, 12).reshape(3, 4))),
        ("column", big[:, 4]),
    ]
    assert not out[5][1].flags.c_contiguous and out[7][1].flags.f_contiguous
    scalar = samples(dtype, 3)[2]  # a numpy scalar (np.generic), sent with shape []
    if not isinstance(scalar, float):  # but np.float64 is a Python float, sent as a plain float
        out.append(("scalar", scalar))
    if dt.itemsize > 1:
        out.append(("bigendian", samples(dtype, 6).reshape(2, 3).astype(dt.newbyteorder(">"))))
    return out


async def call_rust(peer, rust_id):
    rust = await peer.get_service(rust_id)
    results = []

    def record(case, ok, detail=""):
        results.append({"case": case, "ok": bool(ok), "detail": detail})

    for dtype in DTYPES:
        for name, arr in cases(dtype):
            case = f"{dtype}/{name}"
            flat = np.asarray(arr).ravel().tolist()
            shape = list(np.shape(arr))
            want = bump(np.asarray(arr).astype(dtype)).T
            try:
                back = await getattr(rust, f"echo_{dtype}")(arr, flat, shape)
            except Exception as e:  # noqa: BLE001 - reported to the Rust test
                record(case, False, f"raised {e}")
                continue
            ok = isinstance(back, np.ndarray) and str(back.dtype) == dtype and same(back, want)
            record(case, ok, f"sent {describe(arr)}, got {describe(back)}, want {describe(want)}")

    # Any dtype, through AnyNdArray.
    for dtype in DTYPES:
        arr = samples(dtype, 6).reshape(2, 3)
        for a in [arr] + ([arr.astype(arr.dtype.newbyteorder(">"))] if arr.dtype.itemsize > 1 else []):
            got = await rust.describe_any(a)
            record(f"any/{a.dtype.str}", list(got) == [str(a.dtype), [2, 3]], f"got {got!r}")

    # Not numpy: plain bytes (what a JS Uint8Array is) and a JS-style typed array map.
    back = await rust.echo_uint8(b"\x00\x01\xfe\xff", [0, 1, 254, 255], [4])
    record("bytes/uint8", same(back, np.array([1, 2, 255, 0], dtype="uint8")), describe(back))
    typed = {"_rtype": "typedarray", "_rvalue": np.arange(4, dtype="<f4").tobytes(), "_rdtype": "float32"}
    back = await rust.echo_float32(typed, [0.0, 1.0, 2.0, 3.0], [4])
    record("typedarray/float32", same(back, np.arange(4, dtype="float32") * 2), describe(back))

    # A larger array (4 MiB) both ways.
    large = np.arange(1 << 20, dtype="float32").reshape(1024, 1024)
    got = await rust.large(large)
    record("large/sum", got["sum"] == float(large.sum(dtype="float64")), f"got {got!r}")
    record("large/back", same(got["back"], large.T), describe(got["back"]))

    # Errors, reported to the caller.
    bad = [
        ("complex64", "echo_float32", np.array([1 + 2j], dtype="complex64"), 'unsupported dtype "complex64"'),
        ("complex128", "echo_float64", np.array([1 + 2j]), 'unsupported dtype "complex128"'),
        ("float16", "echo_float32", np.array([1.5], dtype="float16"), 'unsupported dtype "float16"'),
        ("str", "echo_uint8", np.array(["ab"]), 'unsupported dtype "<U2"'),
        ("mismatch", "echo_int32", np.arange(3, dtype="int64"), "expected an array of int32, received int64"),
        # np.float64 subclasses float, so Python sends it as a plain float, not an ndarray.
        ("np_float64", "echo_float64", np.float64(1.5), "found a msgpack float64"),
        ("not_array", "echo_int32", [1, 2, 3], "expected a numpy ndarray, a typed array or bytes, found a msgpack array"),
    ]
    for name, fn, arr, want in bad:
        try:
            got = await getattr(rust, fn)(arr, [], [1])
            record(f"error/{name}", False, f"no error, got {describe(got)}")
        except Exception as e:  # noqa: BLE001 - the expected outcome
            record(f"error/{name}", want in str(e), str(e)[:300])
    bad_len = {"_rtype": "ndarray", "_rvalue": b"\x00" * 10, "_rshape": [3], "_rdtype": "float32"}
    try:
        await rust.echo_float32(bad_len, [], [3])
        record("error/length", False, "no error")
    except Exception as e:  # noqa: BLE001 - the expected outcome
        record("error/length", "10 bytes do not hold shape [3] of float32" in str(e), str(e)[:300])
    return results


# ---- the Python service (Rust calls it) ---------------------------------------------------------


def check(arr, dtype, shape, flat):
    """Is `arr` a numpy array of `dtype`/`shape` holding `flat` in C order? Echo it transposed."""
    if not isinstance(arr, np.ndarray):
        return {"ok": False, "detail": describe(arr), "back": None}
    want = np.array(flat, dtype=dtype).reshape(tuple(shape))
    ok = str(arr.dtype) == dtype and same(arr, want)
    return {"ok": bool(ok), "detail": f"got {describe(arr)}, want {describe(want)}", "back": arr.T}


def check_frame(frame):
    pixels = frame["pixels"]
    return {
        "label": frame["label"],
        "is_ndarray": isinstance(pixels, np.ndarray),
        "dtype": str(pixels.dtype),
        "shape": list(pixels.shape),
        "sum": int(pixels.sum()),
    }


async def main(url, workspace, token, rust_id):
    peer = await connect_to_server(
        {"server_url": url, "workspace": workspace, "token": token, "client_id": "py-nd", "method_timeout": 60}
    )
    svc = await peer.register_service(
        {"id": "py-nd", "config": {"visibility": "public"}, "check": check, "check_frame": check_frame}
    )
    emit({"event": "ready", "service_id": svc["id"]})
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line == "call_rust":
            try:
                emit({"event": "results", "results": await call_rust(peer, rust_id)})
            except Exception as e:  # noqa: BLE001 - reported to the Rust test
                emit({"event": "results", "error": f"{type(e).__name__}: {e}"})
        elif line in ("leave", ""):
            break
    await peer.disconnect()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
