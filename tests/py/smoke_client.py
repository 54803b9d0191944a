# Drives two real Python hypha-rpc clients through a given server URL for real_server_smoke.rs.
"""Usage: python smoke_client.py SERVER_URL

Client "smoke-provider" registers service "smoke" (nested dict, bytes echo, raising function);
client "smoke-caller" fetches it with get_service and calls every function, positionally,
with kwargs, and into the error. Prints one JSON object with the results on the last stdout
line; exits non-zero on any unexpected failure.
"""
import asyncio
import base64
import json
import sys

from hypha_rpc import connect_to_server

ECHO_BYTES = bytes(range(256)) + b"\x00\xff" * 8


def nested(name, n=2):
    """Returns a dict with nested lists and maps (and the arguments it got)."""
    return {
        "name": name,
        "n": n,
        "items": [1, -2, 2.5, "three", None, True, False],
        "inner": {"list": [[1, 2], [3], []], "map": {"a": {"b": name}}, "empty": {}},
        "big": 2**40,
    }


def echo_bytes(data):
    """Returns its bytes argument unchanged."""
    return data


def fail(message):
    """Always raises."""
    raise ValueError(f"smoke failure: {message}")


def plain(x):
    """Converts hypha-rpc's ObjectProxy results to plain JSON-able values.

    An ObjectProxy is a dict whose keys are also attributes, so a key named "items" shadows
    dict.items; hence the unbound dict methods.
    """
    if isinstance(x, dict):
        return {k: plain(v) for k, v in dict.items(x)}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


async def run(url):
    provider = await connect_to_server(
        {"server_url": url, "client_id": "smoke-provider", "method_timeout": 20}
    )
    caller = None
    try:
        info = await provider.register_service(
            {
                "id": "smoke",
                "name": "Smoke test service",
                "config": {"visibility": "public"},
                "nested": nested,
                "echo_bytes": echo_bytes,
                "fail": fail,
            }
        )
        token = await provider.generate_token()
        caller = await connect_to_server(
            {
                "server_url": url,
                "client_id": "smoke-caller",
                "workspace": provider.config.workspace,
                "token": token,
                "method_timeout": 20,
            }
        )
        svc = await caller.get_service(info["id"])
        positional = await svc.nested("hypha")
        kwargs = await svc.nested(name="kw", n=5)
        echoed = await svc.echo_bytes(ECHO_BYTES)
        try:
            await svc.fail("boom")
            error = None
        except Exception as e:  # the remote ValueError arrives as a plain Exception
            error = str(e)
        return {
            "service_id": info["id"],
            "workspace": provider.config.workspace,
            "positional": plain(positional),
            "kwargs": plain(kwargs),
            "echo_ok": isinstance(echoed, bytes) and echoed == ECHO_BYTES,
            "echo_b64": base64.b64encode(echoed).decode() if isinstance(echoed, bytes) else repr(echoed),
            "error": error,
        }
    finally:
        if caller is not None:
            await caller.disconnect()
        await provider.disconnect()


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    result = asyncio.run(asyncio.wait_for(run(sys.argv[1]), timeout=45))
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
