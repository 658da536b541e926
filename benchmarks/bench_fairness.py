"""Fairness: other clients' single-ping latency while one credential floods (contract §13).

    python benchmarks/bench_fairness.py [--rounds M] [--duration S] [--victims N]
                                        [--victim-rate R] [--flood-streams F] [--key-rate K]
                                        [--impatient] [--json]

One real `geopush serve` (memory backend with its journal, API keys on, the stores of
bench_http.py) on a loopback port, `limits.key_requests_per_second: K` (default 10: 10,000
pings/s, about a tenth of what the server takes in batches on a core). Load from
SEPARATE processes:

- victims: N (50) connections, each its own API key, each sending one ping a request at R (8)
  requests/s on a fixed schedule; a request's latency is counted from when it was due, not from
  when it was written, so a stalled connection cannot hide its backlog (no coordinated omission);
- the flood: F (8) concurrent connections of one API key, each posting 1000-ping batches back to
  back (100 devices × 10 s of 1 Hz pings, so the per-device limit passes them); a 429 is waited
  out for its Retry-After (`--impatient`: sent again at once, the worst a client can do).

It measures the victims' latency alone (unloaded), then with the flood, each for `--duration`
(5) s after a 1.5 s warm-up, `--rounds` (3) times in turn, and pools each condition's requests:
on a shared machine other jobs come and go, and alternating spreads them over both conditions.
It prints p50/p99 of both, the ratio of the p99s (target ≤ 2), each round's p99s, and what the
flood got through (accepted pings/s, batches answered 200 and 429). The run takes about a
minute. The cores are shared by server, load generators and whatever else runs: see
benchmarks/README.md for how to read the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_http import ROOT, _cpu_s, _register, _Server, _Walkers

TARGET_RATIO = 2.0
WARMUP_S = 1.5
BATCH = 1000
FLOOD_KEY = "flood-key-0123456789abcdef"
FLOOD_DEVICES = 1000
VICTIM_DEVICES = 1000
PHASE_STEP_MS = 240_000


def _victim_key(i: int) -> str:
    return f"victim-{i:03d}-key-0123456789"


# -- load generators (each in its own process) ---------------------------------------------------


async def _victims(args: argparse.Namespace) -> dict[str, Any]:
    """Paced single pings on bare keep-alive connections (as bench_http's raw client)."""
    import orjson

    walkers = _Walkers(FLOOD_DEVICES, VICTIM_DEVICES, args.start_ms)
    host, port = args.url.removeprefix("http://").split(":")
    latencies: list[float] = []
    bad = {"answers": 0}
    began = time.perf_counter() + WARMUP_S
    ends = began + args.duration
    interval = 1.0 / args.rate

    async def connection(k: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        head = (f"POST /v1/pings HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {_victim_key(k)}\r\nContent-Type: application/json\r\n"
                "Content-Length: ").encode()
        devices = walkers.ids[k::args.victims]
        due = time.perf_counter() + interval * k / args.victims  # spread the connections
        n = 0
        try:
            while due < ends:
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                data = orjson.dumps(walkers.next(devices[n % len(devices)]))
                n += 1
                writer.write(head + str(len(data)).encode() + b"\r\n\r\n" + data)
                status_and_headers = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in status_and_headers.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length)
                if due >= began:
                    latencies.append(time.perf_counter() - due)
                    if status_and_headers[9:12] != b"200" or b'"rejected":[]' not in body:
                        bad["answers"] += 1
                due += interval
        finally:
            writer.close()

    await asyncio.gather(*(connection(k) for k in range(args.victims)))
    return {"latencies": latencies, "bad": bad["answers"]}


async def _flood(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    import orjson

    walkers = _Walkers(0, FLOOD_DEVICES, args.start_ms)
    headers = {"Authorization": f"Bearer {FLOOD_KEY}", "Content-Type": "application/json"}
    counted = {"ok": 0, "limited": 0, "other": 0, "accepted": 0}
    stop_at = time.perf_counter() + args.duration + 2 * WARMUP_S

    async def stream(session: aiohttp.ClientSession, k: int) -> None:
        devices = walkers.ids[k::args.streams]
        turn = 0
        body = b""
        while time.perf_counter() < stop_at:
            if not body:  # a refused batch is sent again as it was
                first = (turn * 100) % len(devices)
                turn += 1
                chosen = devices[first:first + 100]
                body = orjson.dumps({"pings": [walkers.next(d) for d in chosen
                                               for _ in range(BATCH // len(chosen))]})
            async with session.post(f"{args.url}/v1/pings", data=body,
                                    headers=headers) as resp:
                answer = orjson.loads(await resp.read())
                if resp.status == 429:
                    counted["limited"] += 1
                    if not args.impatient:
                        retry = float(resp.headers.get("Retry-After", "1"))
                        await asyncio.sleep(min(retry, stop_at - time.perf_counter()))
                    continue
            body = b""
            if resp.status == 200:
                counted["ok"] += 1
                counted["accepted"] += answer["accepted"]
            else:
                counted["other"] += 1

    connector = aiohttp.TCPConnector(limit=args.streams)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(stream(session, k) for k in range(args.streams)))
    return counted


# -- the orchestrator ----------------------------------------------------------------------------


def _spawn(role: str, url: str, args: argparse.Namespace, start_ms: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, __file__, f"_{role}", "--url", url, "--duration", str(args.duration),
           "--start-ms", str(start_ms), "--victims", str(args.victims),
           "--rate", str(args.victim_rate), "--streams", str(args.flood_streams)]
    if args.impatient:
        cmd.append("--impatient")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT)


def _percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"requests": len(ordered),
            "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "max_ms": 1000 * ordered[-1]}


def _phase(server: _Server, args: argparse.Namespace, start_ms: int, flood: bool
           ) -> dict[str, Any]:
    assert server.proc is not None
    cpu_before, wall_before = _cpu_s(server.proc.pid), time.perf_counter()
    flooder = _spawn("flood", server.url, args, start_ms) if flood else None
    victims = _spawn("victims", server.url, args, start_ms)
    out: dict[str, Any] = json.loads(victims.communicate()[0])
    if flooder is not None:
        out["flood"] = json.loads(flooder.communicate()[0])
    out["cpu_s"] = _cpu_s(server.proc.pid) - cpu_before
    out["wall_s"] = time.perf_counter() - wall_before
    return out


def _pooled(phases: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        **_percentiles([x for p in phases for x in p["latencies"]]),
        "bad": sum(p["bad"] for p in phases),
        "round_p99_ms": [_percentiles(p["latencies"])["p99_ms"] for p in phases],
        "server_cpu_share": sum(p["cpu_s"] for p in phases) / sum(p["wall_s"] for p in phases)}
    if "flood" in phases[0]:
        out["flood"] = {k: sum(p["flood"][k] for p in phases) for k in phases[0]["flood"]}
        out["flood_pings_per_s"] = out["flood"]["accepted"] / (
            len(phases) * (args.duration + 2 * WARMUP_S))
    return out


def _keys(args: argparse.Namespace) -> list[dict[str, Any]]:
    keys = [{"name": f"victim-{i}", "key": _victim_key(i), "scopes": ["ingest"]}
            for i in range(args.victims)]
    return [{"name": "bench", "key": "bench-key-0123456789abcdef",
             "scopes": ["ingest", "devices", "admin"]},
            {"name": "flood", "key": FLOOD_KEY, "scopes": ["ingest"]}, *keys]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["_victims"], ["_flood"]):
        load = argparse.ArgumentParser()
        load.add_argument("--url", required=True)
        load.add_argument("--duration", type=float, required=True)
        load.add_argument("--rate", type=float, required=True)
        for name in ("--start-ms", "--victims", "--streams"):
            load.add_argument(name, type=int, required=True)
        load.add_argument("--impatient", action="store_true")
        run = _victims if argv[0] == "_victims" else _flood
        print(json.dumps(asyncio.run(run(load.parse_args(argv[1:])))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3,
                        help="unloaded and flooded phases, in turn")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds measured per phase (after a 1.5 s warm-up)")
    parser.add_argument("--victims", type=int, default=50,
                        help="single-ping connections, each with its own key")
    parser.add_argument("--victim-rate", type=float, default=8.0,
                        help="requests/s of each victim connection")
    parser.add_argument("--flood-streams", type=int, default=8,
                        help="concurrent connections of the flooding key")
    parser.add_argument("--key-rate", type=float, default=10.0,
                        help="limits.key_requests_per_second (0: off)")
    parser.add_argument("--impatient", action="store_true",
                        help="the flood sends a refused batch again at once")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.victim_rate > args.key_rate > 0:
        parser.error("--victim-rate above --key-rate: the victims would be limited themselves")
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"limits": {"key_requests_per_second": args.key_rate or None},
                 "auth": {"keys": _keys(args)}}
        with _Server("memory", Path(tmp), "redis://127.0.0.1:6379/15", extra=extra) as server:
            asyncio.run(_register(server.url, FLOOD_DEVICES + VICTIM_DEVICES))
            # Recent pings, as phones send them: stays opened hours ago would all go stale at
            # once and the timer claimer would fire them in bursts, which is not what is
            # measured here. Each phase's devices go on PHASE_STEP_MS after where the last
            # phase began (a flood phase moves its devices' clocks by ~100 s at 10 req/s).
            start_ms = int(time.time() * 1000) - (2 * args.rounds + 2) * PHASE_STEP_MS
            alone, shared = [], []
            for _ in range(args.rounds):
                alone.append(_phase(server, args, start_ms, flood=False))
                shared.append(_phase(server, args, start_ms + PHASE_STEP_MS, flood=True))
                start_ms += 2 * PHASE_STEP_MS
            unloaded, flooded = _pooled(alone, args), _pooled(shared, args)
    ratio = flooded["p99_ms"] / unloaded["p99_ms"]
    flood = flooded["flood"]
    print(f"\ngeopush fairness ({os.cpu_count()} CPUs shared by server and load): "
          f"{args.victims} victims × {args.victim_rate:g} single pings/s, each its own key; "
          f"flood: {args.flood_streams} streams of {BATCH}-ping batches from one key, "
          f"limits.key_requests_per_second {args.key_rate:g}"
          + (", impatient" if args.impatient else ""))
    for name, r in (("unloaded", unloaded), ("flooded", flooded)):
        bad = f", {r['bad']} bad answers" if r["bad"] else ""
        print(f"  {name:9} victims' single pings: p50 {r['p50_ms']:6.1f} ms  p99 "
              f"{r['p99_ms']:6.1f} ms  max {r['max_ms']:6.1f} ms  ({r['requests']:,} requests"
              f"{bad}; server CPU "
              f"{100 * r['server_cpu_share']:.0f} % of a core)")
        print(f"  {'':9} p99 of each round: "
              + ", ".join(f"{x:.1f}" for x in r["round_p99_ms"]) + " ms")
    print(f"  flood got {flooded['flood_pings_per_s']:,.0f} pings/s accepted: {flood['ok']} "
          f"batches 200, {flood['limited']} answered 429, {flood['other']} other")
    print(f"  p99 flooded / unloaded: {ratio:.2f}   target ≤ {TARGET_RATIO:g}  "
          f"{'ok' if ratio <= TARGET_RATIO else 'MISS'}")
    if args.json:
        for r in (unloaded, flooded):
            r.pop("latencies", None)
        print(json.dumps({"unloaded": unloaded, "flooded": flooded, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
