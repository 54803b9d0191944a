# Python side of tests/tests/client_schema.rs: reads the schemas of a Rust service the way
# Python users (and LLM tooling) do, and serves a schema_function for Rust to read.
"""Usage: python schema_peer.py SERVER_URL WORKSPACE TOKEN RUST_SERVICE_ID

Prints one JSON line {"rust": {...what Python saw...}, "py_service": <id>} and waits for stdin
to close before disconnecting (so Rust can read Python's service meanwhile).
"""
import asyncio
import json
import sys

from hypha_rpc import connect_to_server
from hypha_rpc.utils.schema import schema_function


@schema_function
def multiply(a: float, b: float = 2.0) -> float:
    """Multiply two numbers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


async def main(url, workspace, token, rust_id):
    server = await connect_to_server(
        {"server_url": url, "workspace": workspace, "token": token, "client_id": "schema-peer"}
    )
    svc = await server.get_service(rust_id)
    info = await server.get_service_info(rust_id)
    seen = {
        "add_schema": getattr(svc.add, "__schema__", None),
        "custom_schema": getattr(svc.custom, "__schema__", None),
        "plain_schema": getattr(svc.plain, "__schema__", None),
        "add_result": await svc.add(a=40, b=2),
        "service_schema": info.get("service_schema"),
    }
    py = await server.register_service(
        {"id": "py-tools", "config": {"visibility": "public"}, "multiply": multiply}
    )
    print(json.dumps({"rust": seen, "py_service": py["id"]}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await server.disconnect()


asyncio.run(main(*sys.argv[1:5]))
