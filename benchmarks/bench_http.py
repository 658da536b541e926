"""HTTP throughput and latency of `geopush serve`, memory and Redis backends.

    python benchmarks/bench_http.py [--backend memory|redis|both] [--duration S]
                                    [--clients N] [--redis-url URL] [--rules DIR]

Each backend runs in its own `geopush serve` process (a temp config on a free port, API keys
on, 305 real Lidl stores plus geofences placed on a real Munich drive so pings make real enter
and exit events); the load comes from SEPARATE processes (aiohttp clients):

- batches: 1000-ping requests from 2 connections → accepted pings/s;
- single pings: one ping a request over 64 concurrent connections → requests/s, p50/p99.

Devices are registered with consent first; each device's pings move along the trace in time
order, so nothing is rejected. Figures are printed next to the targets. The machine's cores are
shared by server and load generator: read the figures as a floor. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT / "tests" / "fixtures" / "traces" / "barefoot_munich_x0001-001.csv"
LIDL = ROOT / "tests" / "fixtures" / "germany_lidl_centers_slice.geojson"
KEY = "bench-key-0123456789abcdef"
DEVICES = 2000
BATCH = 1000
BATCH_CONNECTIONS = 2
SINGLE_CONNECTIONS = 64
PING_SPACING_MS = 1000  # 1 Hz per device, as phones report while moving
WARMUP_S = 1.5

TARGETS = {
    ("memory", "batch_pings_per_s"): 100_000,
    ("redis", "batch_pings_per_s"): 50_000,
    ("memory", "single_requests_per_s"): 5_000,
    ("redis", "single_requests_per_s"): 5_000,
}
TARGET_P99_MS = 20.0


# -- the load generator (runs in its own process) ----------------------------------------------


def _trace() -> list[tuple[float, float]]:
    with TRACE.open(newline="") as f:
        return [(float(r["lat"]), float(r["lon"])) for r in csv.DictReader(f)]


class _Walkers:
    """Devices moving along the trace, each from its own start, time always going forward."""

    def __init__(self, first: int, count: int, start_ms: int) -> None:
        self.trace = _trace()
        self.ids = [f"bench-{i}" for i in range(first, first + count)]
        self.step = dict.fromkeys(self.ids, 0)
        self.offset = {d: (i * 37) % len(self.trace) for i, d in enumerate(self.ids)}
        self.start_ms = start_ms

    def next(self, device: str) -> dict[str, Any]:
        n = self.step[device]
        self.step[device] = n + 1
        lat, lon = self.trace[(self.offset[device] + n) % len(self.trace)]
        return {"device_id": device, "lat": lat, "lon": lon,
                "ts": self.start_ms + n * PING_SPACING_MS, "accuracy_m": 10.0}


async def _run_load(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    import orjson

    url, headers = args.url, {"Authorization": f"Bearer {KEY}",
                              "Content-Type": "application/json"}
    walkers = _Walkers(args.first_device, args.devices, args.start_ms)
    latencies: list[float] = []
    counted = {"requests": 0, "pings": 0, "errors": 0}
    total = {"requests": 0, "pings": 0}  # warm-up included: to divide the server's CPU time
    measuring = False
    stop = False

    async def batch_worker(session: aiohttp.ClientSession, devices: list[str]) -> None:
        # 100 devices × 10 s of pings a batch, the connection's devices taken in turn, so
        # each device's clock moves slowly and stays in the past
        per_batch = 100
        turn = 0
        while not stop:
            first = (turn * per_batch) % len(devices)
            turn += 1
            chosen = devices[first:first + per_batch]
            pings = [walkers.next(d) for d in chosen for _ in range(BATCH // len(chosen))]
            async with session.post(f"{url}/v1/pings", data=orjson.dumps({"pings": pings}),
                                    headers=headers) as resp:
                body = orjson.loads(await resp.read())
            total["requests"] += 1
            total["pings"] += body.get("accepted", 0)
            if measuring:
                if resp.status != 200 or body["rejected"]:
                    counted["errors"] += 1
                counted["requests"] += 1
                counted["pings"] += body.get("accepted", 0)

    async def single_worker(session: aiohttp.ClientSession, devices: list[str]) -> None:
        i = 0
        while not stop:
            data = orjson.dumps(walkers.next(devices[i % len(devices)]))
            i += 1
            started = time.perf_counter()
            async with session.post(f"{url}/v1/pings", data=data, headers=headers) as resp:
                await resp.read()
            total["requests"] += 1
            if measuring:
                latencies.append(time.perf_counter() - started)
                counted["requests"] += 1
                counted["errors"] += resp.status != 200

    async def raw_single_worker(_session: aiohttp.ClientSession, devices: list[str]) -> None:
        """The same requests written on a bare keep-alive connection: a client that costs
        a fraction of aiohttp's, so the server, not the load generator, is what is measured."""
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head = (f"POST /v1/pings HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
                "Content-Length: ").encode()
        i = 0
        try:
            while not stop:
                data = orjson.dumps(walkers.next(devices[i % len(devices)]))
                i += 1
                started = time.perf_counter()
                writer.write(head + str(len(data)).encode() + b"\r\n\r\n" + data)
                status_and_headers = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in status_and_headers.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                total["requests"] += 1
                if measuring:
                    latencies.append(time.perf_counter() - started)
                    counted["requests"] += 1
                    counted["errors"] += status_and_headers[9:12] != b"200"
        finally:
            writer.close()

    connections = args.connections
    groups = [walkers.ids[i::connections] for i in range(connections)]
    worker = {"batch": batch_worker, "single": single_worker,
              "raw-single": raw_single_worker}[args.mode]
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(worker(session, g)) for g in groups]
        await asyncio.sleep(WARMUP_S)
        measuring = True
        began = time.perf_counter()
        await asyncio.sleep(args.duration)
        measuring = False
        elapsed = time.perf_counter() - began
        stop = True
        await asyncio.gather(*tasks)
    return {"elapsed_s": elapsed, **counted, "latencies": latencies,
            "total_requests": total["requests"], "total_pings": total["pings"]}


# -- the orchestrator --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _stores_file(directory: Path) -> Path:
    collection = json.loads(LIDL.read_text())
    trace = _trace()
    for i in range(0, len(trace), 60):  # a geofence every minute of the drive
        lat, lon = trace[i]
        collection["features"].append({
            "type": "Feature", "id": f"route-{i}",
            "properties": {"radius_m": 60, "shop": "supermarket"},  # what the rules select
            "geometry": {"type": "Point", "coordinates": [lon, lat]}})
    path = directory / "stores.geojson"
    path.write_text(json.dumps(collection))
    return path


def _empty(directory: Path) -> Path:
    folder = directory / "no-rules"
    folder.mkdir(exist_ok=True)
    return folder


class _Server:
    def __init__(self, backend: str, directory: Path, redis_url: str,
                 journal: bool = True, extra: dict[str, Any] | None = None) -> None:
        import yaml

        self.backend = backend
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = f"geopush-bench-{os.getpid()}-{backend}"
        config = {
            "stores_file": str(_stores_file(directory)),
            "server": {"host": "127.0.0.1", "port": self.port},
            "storage": {"backend": backend, "redis_url": redis_url, "key_prefix": self.prefix,
                        # the memory backend as the embedded default runs it: with its journal
                        "snapshot_path": (str(directory / "state.json") if journal else None)},
            "auth": {"keys": [{"name": "bench", "key": KEY,
                               "scopes": ["ingest", "devices", "admin"]}]},
            # with auth keys, serve refuses the default pseudonym key
            "logging": {"level": "WARNING", "pseudonym_key": f"bench-{os.urandom(16).hex()}"},
        }
        config.update(extra or {})  # whole sections, replaced (bench_fairness.py)
        self.config = directory / f"geopush-{backend}.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = directory / f"serve-{backend}.log"
        self.redis_url = redis_url
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GEOPUSH_")}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from geopush.cli.main import main; "
                 "sys.exit(main(sys.argv[1:]))", "serve", "-c", str(self.config)],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        asyncio.run(self._wait_ready())
        return self

    async def _wait_ready(self) -> None:
        import aiohttp

        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as session:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise SystemExit(f"geopush serve exited:\n{self.log.read_text()}")
                try:
                    async with session.get(f"{self.url}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"geopush serve not ready:\n{self.log.read_text()}")
                await asyncio.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.backend == "redis":
            import redis

            client = redis.Redis.from_url(self.redis_url)
            keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i:i + 500])
            client.close()


async def _register(url: str, count: int) -> None:
    import aiohttp

    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"platform": "android", "push_token": "t",
            "consent": {"location": True, "marketing": True}}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
        async def put(i: int) -> None:
            async with session.put(f"{url}/v1/devices/bench-{i}", json=body,
                                   headers=headers) as resp:
                assert resp.status == 200, await resp.text()

        await asyncio.gather(*(put(i) for i in range(count)))


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load(url: str, mode: str, duration: float, clients: int, connections: int,
          start_ms: int, server_pid: int) -> dict[str, Any]:
    per_client = DEVICES // clients
    cpu_before = _cpu_s(server_pid)
    procs = [subprocess.Popen(
        [sys.executable, __file__, "_load", "--url", url, "--mode", mode,
         "--duration", str(duration), "--connections", str(max(1, connections // clients)),
         "--first-device", str(c * per_client), "--devices", str(per_client),
         "--start-ms", str(start_ms)],
        stdout=subprocess.PIPE, cwd=ROOT) for c in range(clients)]
    results = [json.loads(p.communicate()[0]) for p in procs]
    server_cpu = _cpu_s(server_pid) - cpu_before
    elapsed = max(r["elapsed_s"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies"])
    out: dict[str, Any] = {
        "requests": sum(r["requests"] for r in results),
        "pings": sum(r["pings"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "elapsed_s": elapsed,
    }
    # the server's own CPU time per request: what a whole core would do, however busy the
    # machine (other processes, the load generator) was while measuring
    out["server_cpu_us_per_request"] = 1e6 * server_cpu / sum(r["total_requests"]
                                                             for r in results)
    out["server_cpu_us_per_ping"] = 1e6 * server_cpu / max(1, sum(r["total_pings"]
                                                                 for r in results))
    out["requests_per_s"] = out["requests"] / elapsed
    out["pings_per_s"] = out["pings"] / elapsed
    if latencies:
        out["p50_ms"] = 1000 * statistics.median(latencies)
        out["p99_ms"] = 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return out


_BARE_SERVER = """
import sys
import orjson
from aiohttp import web

async def pings(request):
    orjson.loads(await request.read())
    return web.Response(body=orjson.dumps({"accepted": 1, "rejected": [], "events": []}),
                        content_type="application/json")

app = web.Application()
app.router.add_post("/v1/pings", pings)
app.router.add_get("/readyz", lambda request: web.json_response({}))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def _calibrate(args: argparse.Namespace) -> dict[str, Any]:
    """The same single-ping load against a bare aiohttp JSON handler: the ceiling that this
    machine, as busy as it is right now, and this load generator allow."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", _BARE_SERVER, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = _Server.__new__(_Server)
        server.proc, server.url = proc, f"http://127.0.0.1:{port}"
        server.log = Path(os.devnull)
        asyncio.run(server._wait_ready())
        mode = "raw-single" if args.client == "raw" else "single"
        return _load(server.url, mode, args.duration, args.clients, SINGLE_CONNECTIONS, 0,
                     proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def _measure(backend: str, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    extra: dict[str, Any] = {"rules_dir": str(args.rules) if args.rules else
                             str(_empty(directory))}
    if args.rules:
        # the pings are an hour old: decide on them as if they were fresh (not `late`), at
        # any time of day (no quiet hours), so every candidate goes through the whole policy
        extra["policy"] = {"quiet_hours": None, "max_event_lag": "2h"}
    with _Server(backend, directory, args.redis_url, not args.no_journal, extra) as server:
        asyncio.run(_register(server.url, DEVICES))
        start_ms = int((time.time() - 3600) * 1000)
        assert server.proc is not None
        pid = server.proc.pid
        batch = _load(server.url, "batch", args.duration, 1, BATCH_CONNECTIONS, start_ms, pid)
        # the single-ping devices continue after where the batches left them
        start_ms += 900_000
        mode = "raw-single" if args.client == "raw" else "single"
        single = _load(server.url, mode, args.duration, args.clients, SINGLE_CONNECTIONS,
                       start_ms, pid)
    return {
        "backend": backend,
        "batch_pings_per_s": batch["pings_per_s"],
        "batch_errors": batch["errors"],
        "batch_server_cpu_us_per_ping": batch["server_cpu_us_per_ping"],
        "single_requests_per_s": single["requests_per_s"],
        "single_p50_ms": single.get("p50_ms"),
        "single_p99_ms": single.get("p99_ms"),
        "single_errors": single["errors"],
        "single_server_cpu_us_per_request": single["server_cpu_us_per_request"],
    }


def _report(rows: list[dict[str, Any]], bare: dict[str, Any] | None) -> None:
    def mark(ok: bool) -> str:
        return "ok " if ok else "MISS"

    print(f"\ngeopush serve over HTTP ({os.cpu_count()} CPUs shared by server and load)")
    if bare is not None:
        print(f"  ceiling now: a bare aiohttp JSON handler takes {bare['requests_per_s']:,.0f} "
              f"single-ping req/s (p99 {bare['p99_ms']:.1f} ms), "
              f"{bare['server_cpu_us_per_request']:.0f} µs CPU a request")
    for r in rows:
        b = r["backend"]
        target = TARGETS[(b, "batch_pings_per_s")]
        print(f"  {b:6} batches of {BATCH}: {r['batch_pings_per_s']:>10,.0f} pings/s   "
              f"target ≥ {target:,}  {mark(r['batch_pings_per_s'] >= target)}"
              + (f"  ({r['batch_errors']} bad answers)" if r["batch_errors"] else ""))
        cpu = r["batch_server_cpu_us_per_ping"]
        print(f"  {'':6}   server CPU {cpu:.1f} µs a ping → {1e6 / cpu:>10,.0f} pings/s "
              "per core")
        target = TARGETS[(b, "single_requests_per_s")]
        p99 = r["single_p99_ms"] or float("inf")
        print(f"  {b:6} single pings ×{SINGLE_CONNECTIONS}: {r['single_requests_per_s']:>8,.0f} "
              f"req/s  p50 {r['single_p50_ms']:.1f} ms  p99 {p99:.1f} ms   "
              f"target ≥ {target:,} req/s, p99 ≤ {TARGET_P99_MS:g} ms  "
              f"{mark(r['single_requests_per_s'] >= target and p99 <= TARGET_P99_MS)}"
              + (f"  ({r['single_errors']} errors)" if r["single_errors"] else ""))
        cpu = r["single_server_cpu_us_per_request"]
        print(f"  {'':6}   server CPU {cpu:.0f} µs a request → {1e6 / cpu:>8,.0f} req/s per core")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_load"]:
        load = argparse.ArgumentParser()
        for name in ("--url", "--mode"):
            load.add_argument(name, required=True)
        load.add_argument("--duration", type=float, required=True)
        for name in ("--connections", "--first-device", "--devices", "--start-ms"):
            load.add_argument(name, type=int, required=True)
        print(json.dumps(asyncio.run(_run_load(load.parse_args(argv[1:])))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["memory", "redis", "both"], default="both")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds measured per figure (after a short warm-up)")
    parser.add_argument("--clients", type=int, default=1,
                        help="load-generator processes for the single-ping test")
    parser.add_argument("--client", choices=["raw", "aiohttp"], default="raw",
                        help="single-ping load generator: bare keep-alive connections (raw) "
                             "or aiohttp's client, which itself tops out near 4,000 req/s on "
                             "the 2-core benchmark machine")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15",
                        help="the benchmark writes under its own key prefix and removes it")
    parser.add_argument("--no-journal", action="store_true",
                        help="memory backend without a snapshot path (no journal): what the "
                        "journal costs is the difference")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--rules", type=Path, default=None,
                        help="a rules folder to load (e.g. rules/, the library); default none")
    parser.add_argument("--no-calibration", action="store_true",
                        help="skip the run against a bare aiohttp handler")
    args = parser.parse_args(argv)
    backends = ["memory", "redis"] if args.backend == "both" else [args.backend]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            rows.append(_measure(backend, args, Path(tmp)))
    bare = None if args.no_calibration else _calibrate(args)
    _report(rows, bare)
    if args.json:
        if bare is not None:
            bare.pop("latencies", None)
        print(json.dumps({"rows": rows, "bare_aiohttp": bare}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
