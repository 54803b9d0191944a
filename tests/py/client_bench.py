# The Python half of the client benchmark (tests/examples/client_bench.rs): the same measurements
# with the real Python hypha-rpc client on the same server, printed as one JSON line.
"""Usage: python client_bench.py SERVER_URL SECONDS

Measures: connect-to-ready (median of 5), small echo latency between two Python clients
(median and p99), sequential calls/s, calls/s with 16 in flight, and the time of a 50 MB echo.
CPU time of this process per sequential call is reported too (both clients live here).
"""
import asyncio
import json
import os
import statistics
import sys
import time

from hypha_rpc import connect_to_server


def echo(x):
    return x


async def count(n):
    for i in range(n):
        yield i


def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def main(url, seconds):
    out = {}
    conn = []
    for _ in range(5):
        t = time.perf_counter()
        s = await connect_to_server({"server_url": url})
        conn.append(time.perf_counter() - t)
        await s.disconnect()
    out["connect_s"] = statistics.median(conn)

    owner = await connect_to_server({"server_url": url, "method_timeout": 120})
    token = await owner.generate_token()
    info = await owner.register_service(
        {"id": "bench", "config": {"visibility": "public"}, "echo": echo, "count": count}
    )
    caller = await connect_to_server(
        {"server_url": url, "workspace": owner.config.workspace, "token": token, "method_timeout": 120}
    )
    svc = await caller.get_service(info["id"])
    for _ in range(50):
        await svc.echo("warm")

    lat = []
    cpu0 = time.process_time()
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        await svc.echo("hello")
        lat.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu0
    lat.sort()
    out["echo_median_s"] = lat[len(lat) // 2]
    out["echo_p99_s"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    out["seq_calls_per_s"] = len(lat) / sum(lat)
    out["cpu_per_call_s"] = cpu / len(lat)

    done = 0
    t_end = time.perf_counter() + seconds

    async def worker():
        nonlocal done
        while time.perf_counter() < t_end:
            await svc.echo("hello")
            done += 1

    t = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(16)])
    out["par16_calls_per_s"] = done / (time.perf_counter() - t)

    n = 2000
    t = time.perf_counter()
    got = 0
    async for _ in await svc.count(n):
        got += 1
    assert got == n
    out["gen_items_per_s"] = n / (time.perf_counter() - t)

    out["big"] = []
    for mb in [1, 10, 50]:
        big = os.urandom(mb * 1024 * 1024)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = rss_kib()
        t = time.perf_counter()
        back = await svc.echo(big)
        took = time.perf_counter() - t
        assert back == big
        out["big"].append([mb, took, max(0, peak_kib() - base)])
        del back, big
    out["echo_50mb_s"] = out["big"][-1][1]
    await caller.disconnect()
    await owner.disconnect()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
