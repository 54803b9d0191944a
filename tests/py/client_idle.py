# An idle connected Python client, for the idle-RSS figure of tests/examples/client_bench.rs.
"""Usage: python client_idle.py SERVER_URL  (prints READY, exits when stdin closes)"""
import asyncio
import sys

from hypha_rpc import connect_to_server


async def main(url):
    server = await connect_to_server({"server_url": url})
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await server.disconnect()


asyncio.run(main(sys.argv[1]))
