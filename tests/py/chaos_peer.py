# A Python hypha-rpc peer for tests/tests/chaos.rs: serves "py-chaos" in the Rust client's
# workspace and keeps serving across server restarts (the Python client reconnects by itself).
"""Usage: python chaos_peer.py SERVER_URL WORKSPACE TOKEN  (prints READY <service id>; exits on stdin EOF)"""
import asyncio
import sys

from hypha_rpc import connect_to_server


def echo(x):
    return x


async def call_back(cb, x):
    return await cb(x)


async def count(n):
    for i in range(n):
        yield i


async def main(url, workspace, token):
    server = await connect_to_server(
        {"server_url": url, "workspace": workspace, "token": token, "client_id": "py-chaos-peer"}
    )
    info = await server.register_service(
        {
            "id": "py-chaos",
            "config": {"visibility": "public"},
            "echo": echo,
            "call_back": call_back,
            "count": count,
        }
    )
    print(f"READY {info['id']}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


asyncio.run(main(*sys.argv[1:4]))
