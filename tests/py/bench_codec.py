# Times Python hypha-rpc's codec round trip on the payloads of tests/src/payloads.rs, for benches/codec.rs.
"""Python side of the codec benchmark (`cargo bench -p hypha-rpc-tests --bench codec`).

Builds the five payload shapes of hypha-rpc's own `python/tests/bench_rpc_encode_decode.py`
(flat primitives, nested dicts, numpy arrays, tabular rows, mixed), deterministically and with
the same keys and values as `tests/src/payloads.rs`, then times one full round trip per payload
exactly as the upstream benchmark does: `RPC._encode` + `msgpack.packb` + `msgpack.unpackb` +
`RPC._decode`.

Prints one JSON object on stdout:
    {name: {"ns_per_roundtrip": float, "bytes": int, "iterations": int[, "packed_hex": str]}}
`packed_hex` (with --with-bytes) lets the Rust bench check that both sides encode identical bytes.
Progress goes to stderr.

Usage: python bench_codec.py [--with-bytes] [--quick] [--seconds S]
"""

import argparse
import asyncio
import json
import statistics
import sys
import time

import msgpack
import numpy as np
from hypha_rpc.rpc import RPC


# ─── Payloads (mirror tests/src/payloads.rs) ─────────────────────────────


def flat_primitives(n=100):
    d = {}
    for i in range(n):
        d[f"key_{i}"] = i
        d[f"str_{i}"] = f"value_{i}"
        d[f"float_{i}"] = i * 1.1
        d[f"bool_{i}"] = i % 2 == 0
    return d


def nested(depth=4, breadth=4):
    if depth == 0:
        return {"value": 42, "name": "leaf", "active": True}
    return {f"child_{i}": nested(depth - 1, breadth) for i in range(breadth)}


def sample_f32(start, length):
    """Deterministic stand-in for np.random.randn: exact multiples of 1/4096 in [-8, 8)."""
    k = np.arange(start, start + length, dtype=np.int64)
    return ((k * 40503) % 65536).astype(np.float32) / np.float32(4096) - np.float32(8)


def numpy_arrays(n=10, length=1000):
    d = {}
    for i in range(n):
        d[f"array_{i}"] = sample_f32(i * length, length)
        d[f"label_{i}"] = f"data_{i}"
    return d


def tabular(rows=500):
    return [
        {
            "id": i,
            "name": f"item_{i}",
            "value": i * 3.14,
            "active": i % 3 == 0,
            "tags": [f"tag_{j}" for j in range(3)],
        }
        for i in range(rows)
    ]


def mixed():
    return {
        "metadata": {"version": "1.0", "count": 100, "nested": {"a": {"b": {"c": "deep"}}}},
        "items": [{"id": i, "val": i * 2.5} for i in range(50)],
        "matrix": np.eye(100, dtype=np.float32),
        "flags": {f"flag_{i}": i % 2 == 0 for i in range(20)},
    }


PAYLOADS = [
    ("flat_400_keys", flat_primitives),
    ("nested_depth4", nested),
    ("ndarray_10x1000_f32", numpy_arrays),
    ("table_500_rows", tabular),
    ("mixed", mixed),
]


# ─── Timing ──────────────────────────────────────────────────────────────


def make_rpc():
    # No connection: _encode/_decode of plain data and ndarrays need none, and RPC then
    # registers no services and starts no tasks.
    asyncio.set_event_loop(asyncio.new_event_loop())
    return RPC(None, client_id="bench-client", name="bench", workspace="bench-workspace",
               server_base_url="http://localhost", silent=True)


def roundtrip(rpc, payload):
    encoded = rpc._encode(payload, session_id="bench-session")
    packed = msgpack.packb(encoded)
    unpacked = msgpack.unpackb(packed, raw=False)
    return rpc._decode(unpacked)


def time_payload(rpc, payload, seconds, batches):
    """Median over `batches` batches of the mean round-trip time within a batch, in ns."""
    for _ in range(3):
        roundtrip(rpc, payload)
    t0 = time.perf_counter()
    roundtrip(rpc, payload)
    one = max(time.perf_counter() - t0, 1e-7)
    per_batch = max(1, int(seconds / batches / one))
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter_ns()
        for _ in range(per_batch):
            roundtrip(rpc, payload)
        samples.append((time.perf_counter_ns() - t0) / per_batch)
    return statistics.median(samples), per_batch * batches


def check_decoded(name, original, decoded):
    """The round trip must give back the payload (arrays compared by value)."""
    def same(a, b):
        if isinstance(a, np.ndarray):
            return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
        return type(a) is type(b) and a == b

    if not same(original, decoded):
        raise SystemExit(f"bench_codec.py: round trip of {name} changed the payload")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--with-bytes", action="store_true", help="include the packed bytes as hex")
    ap.add_argument("--quick", action="store_true", help="a few iterations only (smoke test)")
    ap.add_argument("--seconds", type=float, default=2.0, help="timing budget per payload")
    args = ap.parse_args()

    seconds, batches = (0.05, 3) if args.quick else (args.seconds, 15)
    rpc = make_rpc()
    out = {}
    for name, build in PAYLOADS:
        payload = build()
        check_decoded(name, payload, roundtrip(rpc, payload))
        packed = msgpack.packb(rpc._encode(payload, session_id="bench-session"))
        ns, iterations = time_payload(rpc, payload, seconds, batches)
        print(f"python {name:<22} {len(packed):>7} B {ns / 1000:>10.1f} us", file=sys.stderr)
        entry = {"ns_per_roundtrip": ns, "bytes": len(packed), "iterations": iterations}
        if args.with_bytes:
            entry["packed_hex"] = packed.hex()
        out[name] = entry
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
