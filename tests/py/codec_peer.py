# Python side of tests/tests/client_codec.rs: registers a codec for its own Point class and
# serves functions that take and return Points; then calls a Rust service with Points.
"""Usage: python codec_peer.py SERVER_URL WORKSPACE TOKEN RUST_SERVICE_ID

Prints READY <service id>, waits for a stdin line, calls the Rust service, prints one JSON
line of results and exits.
"""
import asyncio
import json
import math
import sys

from hypha_rpc import connect_to_server


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y


def norm(p):
    assert isinstance(p, Point), f"not decoded by the codec: {type(p)}"
    return math.hypot(p.x, p.y)


def make(x, y):
    return Point(x, y)


def kinds(items):
    return [type(i).__name__ for i in items]


async def main(url, workspace, token, rust_id):
    server = await connect_to_server(
        {"server_url": url, "workspace": workspace, "token": token, "client_id": "codec-peer"}
    )
    server.register_codec(
        {
            "name": "Point",
            "type": Point,
            "encoder": lambda p: {"x": p.x, "y": p.y},
            "decoder": lambda d: Point(d["x"], d["y"]),
        }
    )
    info = await server.register_service(
        {"id": "geometry", "config": {"visibility": "public"}, "norm": norm, "make": make, "kinds": kinds}
    )
    print(f"READY {info['id']}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    rust = await server.get_service(rust_id)
    moved = await rust.shift(Point(1.5, -2.0), 10.0)
    out = {
        "shift_type": type(moved).__name__,
        "shift": [moved.x, moved.y],
        "line": [[p.x, p.y] for p in await rust.line(3)],
    }
    print(json.dumps(out), flush=True)
    await server.disconnect()


asyncio.run(main(*sys.argv[1:5]))
