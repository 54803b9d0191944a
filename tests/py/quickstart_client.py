# The Python half of the quickstart: calls the Rust service, then serves one for Rust to call.
"""Usage: python quickstart_client.py SERVER_URL WORKSPACE TOKEN RUST_SERVICE_ID"""
import asyncio
import sys

from hypha_rpc import connect_to_server


async def main(url, workspace, token, rust_service):
    server = await connect_to_server(
        {"server_url": url, "workspace": workspace, "token": token, "client_id": "quickstart-python"}
    )
    rust = await server.get_service(rust_service)
    print(f"python: greet('Python') -> {await rust.greet('Python')!r}", flush=True)
    print(f"python: add(40, b=2) -> {await rust.add(40, b=2)!r}", flush=True)
    items = [i async for i in await rust.count(3)]
    print(f"python: [i async for i in count(3)] -> {items!r}", flush=True)

    def shout(text):
        """Upper-cases its argument."""
        return text.upper() + "!"

    info = await server.register_service({"id": "py-hello", "config": {"visibility": "public"}, "shout": shout})
    print(f"READY {info['id']}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await server.disconnect()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
