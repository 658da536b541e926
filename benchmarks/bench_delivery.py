"""Delivery: pushes a second to a fake FCM, and single-ping latency while they go out.

    python benchmarks/bench_delivery.py [--backend memory|redis|both] [--pushes N]
                                        [--repeat R] [--source rules|test-push]
                                        [--batch B] [--probe-rate H] [--quiet-s S]
                                        [--max-in-flight M] [--log-level L] [--redis-url URL]
                                        [--json]

Three processes besides this one: the fake FCM (tests/fakefcm.py, with an arrival time stamped
on each send), a real `geopush serve` (bench_http.py's: temp config on a free port, API keys
on, the 305 real Lidl stores; `delivery.sender: fcm` at the fake with a `static_token`,
`policy.quiet_hours: null` so the hour of the run does not matter, one marketing rule on
`enter` at every `shop:supermarket`), and a probe that sends single pings from other devices.

Each of `--repeat` (3) rounds registers N (20,000) fresh devices with marketing consent and a
push token, then:

- alone: the probe's single pings for `--quiet-s` (5) s with nothing else going on;
- burst: the probe again, and the N devices' first pings, each at a store, posted in batches
  of `--batch` (1000) back to back: the real ingest path enters them, decides the rule and
  queues N pushes, which the delivery worker sends. Timed until geopush counts every push it
  decided final (`geopush_pushes_final_total`; a round gives up after 15 s without progress).
  `--source test-push` queues them instead with N `POST /v1/admin/test-push` (16 at a time),
  for comparison. Bad answers are counted, not retried, and serve's warnings are summed up.

Pushes/s is FCM requests received by the fake a second, from its first to its last. The probe
(its own process) sends one ping a request from 200 devices on 32 keep-alive connections at
`--probe-rate` (100) requests/s in all, on a fixed schedule, latency counted from when each was
due (no coordinated omission). Its p50/p99 during the burst (from the first entering batch
until all are sent) are compared with the same alone. Medians over the rounds; the server's
and the fake's CPU time per push next to them. Targets (delivery issue): ≥ 1,000 pushes/s per
process, and single-ping p99 < 50 ms during the burst. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_http import KEY, LIDL, ROOT, _cpu_s, _Server

TARGET_PUSHES_PER_S = 1000.0
TARGET_P99_MS = 50.0
PROBE_DEVICES = 200  # 0.5 pings/s each at 100 req/s: well under the per-device limit
# phones have a connection each: on 4, a probe's request waited for those before it on its
# connection (at 25 a second each), and the probe measured its own queue more than geopush
PROBE_CONNECTIONS = 32
PROBE_WARMUP_S = 1.0
PROBE_LAT, PROBE_LON = 60.1699, 24.9384  # Helsinki: no store within reach, no events
TEST_PUSH_CONCURRENCY = 16
STALL_S = 15.0  # no push sent for this long: the round is given up

RULE = """\
# bench_delivery.py: a marketing push on entering any supermarket
id: bench-enter-offer
priority: 10
trigger:
  on: enter
  geofences: {tags: [shop:supermarket]}
message:
  title: "Hello from {{ store.name }}"
  body: "Fresh bread 30 % off today, {{ device.first_name | default('friend') }}."
  ttl: 30m
  data: {deep_link: "shop://offers?store={{ store.store_id }}"}
"""


# -- the fake FCM, with arrival times (its own process) ---------------------------------------


def _run_fake() -> int:
    sys.path.insert(0, str(ROOT))
    from aiohttp import web

    from tests.fakefcm import FakeFcm

    class TimedFake(FakeFcm):
        """FakeFcm that stamps each send's arrival and sums them up on `GET requests?summary=1`
        (the whole list of recorded sends would cost more than the sends)."""

        def __init__(self) -> None:
            super().__init__()
            self.arrivals: list[float] = []

        async def _send(self, request: web.Request) -> web.StreamResponse:
            self.arrivals.append(time.time())
            return await super()._send(request)

        def reset(self) -> None:
            super().reset()
            self.arrivals.clear()

        async def _control_requests(self, request: web.Request) -> web.StreamResponse:
            if not request.query.get("summary"):
                return await super()._control_requests(request)
            answers: dict[str, int] = {}
            for r in self.requests:
                answers[str(r.answer)] = answers.get(str(r.answer), 0) + 1
            summary: dict[str, Any] = {
                "count": len(self.arrivals),
                "first": self.arrivals[0] if self.arrivals else None,
                "last": self.arrivals[-1] if self.arrivals else None,
                "answers": answers, "max_in_flight": self.max_in_flight,
                "connections": len({r.peer for r in self.requests})}
            if request.query.get("times"):
                summary["arrivals"] = self.arrivals
            return web.json_response(summary)

    async def serve() -> None:
        fake = TimedFake()
        await fake.start("127.0.0.1", 0)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print(json.dumps({"endpoint": fake.endpoint, "control": fake.control}), flush=True)
        try:
            await stop.wait()
        finally:
            await fake.stop()

    asyncio.run(serve())
    return 0


class _Fake:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "_fake"], cwd=ROOT,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the fake FCM did not start")
        ready = json.loads(line)
        self.endpoint: str = ready["endpoint"]
        self.control: str = ready["control"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the probe: paced single pings (its own process) ------------------------------------------


async def _probe(args: argparse.Namespace) -> dict[str, Any]:
    import orjson

    host, port = args.url.removeprefix("http://").split(":")
    samples: list[tuple[float, float, int]] = []  # (when due, epoch s; latency s; ok)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    interval = PROBE_CONNECTIONS / args.rate
    devices = [f"probe-{i}" for i in range(PROBE_DEVICES)]
    last_ts: dict[str, int] = {}
    # perf_counter for the latencies, the epoch for placing them in the burst's timeline
    offset = time.time() - time.perf_counter()

    async def connection(k: int) -> None:
        head = (f"POST /v1/pings HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
                "Content-Length: ").encode()
        mine = devices[k::PROBE_CONNECTIONS]
        due = time.perf_counter() + interval * k / PROBE_CONNECTIONS
        n = 0
        writer = None
        while not stop.is_set():
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            device = mine[n % len(mine)]
            n += 1
            ts = max(int(time.time() * 1000), last_ts.get(device, 0) + 1)
            last_ts[device] = ts
            data = orjson.dumps({"device_id": device, "lat": PROBE_LAT, "lon": PROBE_LON,
                                 "ts": ts, "accuracy_m": 10.0})
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(head + str(len(data)).encode() + b"\r\n\r\n" + data)
                status_and_headers = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in status_and_headers.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length)
                ok = status_and_headers[9:12] == b"200" and b'"rejected":[]' in body
            except (OSError, asyncio.IncompleteReadError):
                ok = False  # the server closed the connection (an error answer): open another
                if writer is not None:
                    writer.close()
                writer = None
            samples.append((offset + due, time.perf_counter() - due, int(ok)))
            due += interval
        if writer is not None:
            writer.close()

    await asyncio.gather(*(connection(k) for k in range(PROBE_CONNECTIONS)))
    return {"samples": samples}


class _Probe:
    def __init__(self, url: str, rate: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "_probe", "--url", url, "--rate", str(rate)],
            stdout=subprocess.PIPE, cwd=ROOT)

    def stop(self) -> list[tuple[float, float, int]]:
        self.proc.send_signal(signal.SIGTERM)
        out = json.loads(self.proc.communicate(timeout=30)[0])
        return [(float(due), float(latency), int(ok)) for due, latency, ok in out["samples"]]


def _latency(samples: list[tuple[float, float, int]], start: float, end: float
             ) -> dict[str, Any]:
    chosen = sorted(lat for due, lat, _ in samples if start <= due <= end)
    if not chosen:
        return {"requests": 0, "p50_ms": float("nan"), "p99_ms": float("nan"),
                "max_ms": float("nan"), "bad": 0}
    return {"requests": len(chosen),
            "p50_ms": 1000 * statistics.median(chosen),
            "p99_ms": 1000 * chosen[min(len(chosen) - 1, int(0.99 * len(chosen)))],
            "max_ms": 1000 * chosen[-1],
            "bad": sum(1 for due, _, ok in samples if start <= due <= end and not ok)}


# -- the orchestrator ---------------------------------------------------------------------------


def _stores() -> list[tuple[str, float, float]]:
    features = json.loads(LIDL.read_text())["features"]
    return [(str(f["id"]), f["geometry"]["coordinates"][1], f["geometry"]["coordinates"][0])
            for f in features]


async def _register(url: str, ids: list[str]) -> None:
    import aiohttp

    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
        queue = iter(ids)

        async def worker() -> None:
            for device in queue:
                body = {"platform": "android", "push_token": f"fcm-token-{device}",
                        "locale": "en", "consent": {"location": True, "marketing": True}}
                async with session.put(f"{url}/v1/devices/{device}", json=body,
                                       headers=headers) as resp:
                    if resp.status != 200:
                        raise SystemExit(f"PUT device {device}: {resp.status} "
                                         f"{await resp.text()}")

        await asyncio.gather(*(worker() for _ in range(32)))


async def _enter(url: str, ids: list[str], batch: int) -> dict[str, int]:
    """Each device's first ping, at a store (within 15 m of its centre), batches back to back
    on one connection as a relaying backend would post them."""
    import aiohttp
    import orjson

    stores = _stores()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    counted: dict[str, int] = {"accepted": 0, "rejected": 0, "enters": 0}
    async with aiohttp.ClientSession() as session:
        for start in range(0, len(ids), batch):
            now_ms = int(time.time() * 1000)
            pings = []
            for i, device in enumerate(ids[start:start + batch], start):
                _, lat, lon = stores[i % len(stores)]
                pings.append({"device_id": device, "lat": lat + (i % 7 - 3) * 3e-5,
                              "lon": lon + (i % 5 - 2) * 4e-5, "ts": now_ms,
                              "accuracy_m": 10.0})
            async with session.post(f"{url}/v1/pings", data=orjson.dumps({"pings": pings}),
                                    headers=headers) as resp:
                body = orjson.loads(await resp.read())
            if resp.status != 200:  # counted, not sent again: the figures say how many
                counted[f"batches answered {resp.status}"] = counted.get(
                    f"batches answered {resp.status}", 0) + 1
                continue
            counted["accepted"] += body["accepted"]
            counted["rejected"] += len(body["rejected"])
            counted["enters"] += sum(1 for e in body["events"] if e.get("type") == "enter")
    return counted


async def _test_pushes(url: str, ids: list[str]) -> dict[str, int]:
    import aiohttp

    headers = {"Authorization": f"Bearer {KEY}"}
    counted = {"queued": 0}
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=TEST_PUSH_CONCURRENCY)) as session:
        queue = iter(ids)

        async def worker() -> None:
            for device in queue:
                async with session.post(f"{url}/v1/admin/test-push", headers=headers,
                                        json={"device_id": device}) as resp:
                    await resp.read()
                    key = "queued" if resp.status == 202 else f"answered {resp.status}"
                    counted[key] = counted.get(key, 0) + 1

        await asyncio.gather(*(worker() for _ in range(TEST_PUSH_CONCURRENCY)))
    return counted


_SAMPLE = re.compile(r'^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')


def _metrics(url: str) -> dict[tuple[str, str], float]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[(m["name"], m["labels"] or "")] = float(m["value"])
    return out


def _counts(url: str) -> dict[str, float]:
    """Pushes decided (rules) or final (by state) so far, from geopush's own metrics."""
    metrics = _metrics(url)
    out = {"decided": metrics.get(("geopush_decisions_total", 'outcome="push",reason=""'), 0.0)}
    for (name, labels), value in metrics.items():
        if name == "geopush_pushes_final_total":
            out[labels.removeprefix('state="').removesuffix('"')] = value
    return out


def _final(counts: dict[str, float]) -> float:
    return sum(v for k, v in counts.items() if k in ("sent", "failed", "expired", "cancelled"))


def _fake_summary(fake: _Fake, times: bool = False) -> dict[str, Any]:
    import urllib.request

    query = "summary=1" + ("&times=1" if times else "")
    with urllib.request.urlopen(f"{fake.control}/requests?{query}", timeout=30) as answer:
        return dict(json.load(answer))


def _fake_reset(fake: _Fake) -> None:
    import urllib.request

    request = urllib.request.Request(f"{fake.control}/reset", data=b"{}",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        answer.read()


def _burst(server: _Server, fake: _Fake, ids: list[str], args: argparse.Namespace
           ) -> dict[str, Any]:
    assert server.proc is not None
    n = len(ids)
    before = _counts(server.url)
    log_offset = server.log.stat().st_size
    _fake_reset(fake)
    probe = _Probe(server.url, args.probe_rate)
    time.sleep(PROBE_WARMUP_S)
    server_cpu, fake_cpu = _cpu_s(server.proc.pid), _cpu_s(fake.proc.pid)
    began = time.time()
    if args.source == "rules":
        made = asyncio.run(_enter(server.url, ids, args.batch))
    else:
        made = asyncio.run(_test_pushes(server.url, ids))
    queued = time.time()
    # a request's decisions are counted after its answer, a slice at a time
    # (geopush.service.ingest): read the count once it has stopped moving
    after = _counts(server.url)
    while True:
        time.sleep(0.1)
        again = _counts(server.url)
        if again["decided"] == after["decided"]:
            break
        after = again
    expected = (after["decided"] - before["decided"] if args.source == "rules"
                else made.get("queued", 0))
    # the fake is watched (it costs geopush nothing), then geopush's own count of final
    # pushes; given up once nothing moved for STALL_S
    seen: float = -1
    moved = time.monotonic()
    while (count := _fake_summary(fake)["count"]) < expected \
            and time.monotonic() - moved < STALL_S:
        if count != seen:
            seen, moved = count, time.monotonic()
        time.sleep(0.05)
    seen, moved = -1, time.monotonic()
    while (final := _final(_counts(server.url)) - _final(before)) < expected \
            and time.monotonic() - moved < STALL_S:
        if final != seen:
            seen, moved = final, time.monotonic()
        time.sleep(0.02)
    done = time.time()
    after = _counts(server.url)
    outcomes = {k: int(v - before.get(k, 0.0)) for k, v in after.items()
                if v - before.get(k, 0.0)}
    server_cpu = _cpu_s(server.proc.pid) - server_cpu
    fake_cpu = _cpu_s(fake.proc.pid) - fake_cpu
    time.sleep(0.2)
    samples = probe.stop()
    summary = _fake_summary(fake, times=True)
    arrivals = summary.pop("arrivals")
    span = (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else float("nan")
    return {
        "made": made, "expected": int(expected), "outcomes": outcomes, "fake": summary,
        "log": _log_warnings(server.log, log_offset),
        "pushes_per_s": (len(arrivals) - 1) / span if span and span > 0 else float("nan"),
        "send_span_s": span,
        "queue_s": queued - began,  # posting the entering pings (or the test pushes)
        "all_sent_s": done - began,
        "first_send_after_s": arrivals[0] - began if arrivals else float("nan"),
        "server_cpu_us_per_push": 1e6 * server_cpu / max(1, expected),
        "fake_cpu_us_per_push": 1e6 * fake_cpu / max(1, expected),
        "burst": _latency(samples, began, done),
        "sending_only": _latency(samples, queued, done),
        "queueing_only": _latency(samples, began, queued),
        "timed_out": final < expected or expected < n,
    }


def _log_warnings(path: Path, offset: int) -> dict[str, int]:
    """serve's warning and error lines since `offset`, by event."""
    counted: dict[str, int] = {}
    with path.open("rb") as f:
        f.seek(offset)
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("level") in ("warning", "error",
                                                                     "critical"):
                key = f"{record['level']} {record.get('event')}"
                counted[key] = counted.get(key, 0) + 1
    return counted


def _alone(server: _Server, args: argparse.Namespace) -> dict[str, Any]:
    probe = _Probe(server.url, args.probe_rate)
    time.sleep(PROBE_WARMUP_S)
    began = time.time()
    time.sleep(args.quiet_s)
    ended = time.time()
    return _latency(probe.stop(), began, ended)


def _measure(backend: str, args: argparse.Namespace, directory: Path, fake: _Fake
             ) -> dict[str, Any]:
    rules = directory / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "bench-enter-offer.yaml").write_text(RULE)
    delivery: dict[str, Any] = {"sender": "fcm", "fcm": {
        "project_id": "geopush-bench", "endpoint": fake.endpoint,
        "static_token": "ya29.bench-static-token"}}
    if args.max_in_flight is not None:
        delivery["max_in_flight"] = args.max_in_flight
    extra = {
        "rules_dir": str(rules),
        # any hour of the run: no quiet hours; the rest of the policy as shipped
        "policy": {"quiet_hours": None},
        "delivery": delivery,
        "logging": {"level": args.log_level, "pseudonym_key": f"bench-{os.urandom(16).hex()}"},
    }
    runs = []
    with _Server(backend, directory, args.redis_url, extra=extra) as server:
        asyncio.run(_register(server.url, [f"probe-{i}" for i in range(PROBE_DEVICES)]))
        for k in range(args.repeat):
            ids = [f"r{k}-{backend}-{i}" for i in range(args.pushes)]
            asyncio.run(_register(server.url, ids))
            alone = _alone(server, args)
            burst = _burst(server, fake, ids, args)
            burst["alone"] = alone
            burst["p99_ratio"] = burst["burst"]["p99_ms"] / alone["p99_ms"]
            runs.append(burst)
            _print_run(backend, k, burst)
    return {"backend": backend, "runs": runs}


def _print_run(backend: str, k: int, r: dict[str, Any]) -> None:
    made = ", ".join(f"{v:,} {k}" for k, v in r["made"].items())
    made += f"; {r['expected']:,} pushes decided, final: " + ", ".join(
        f"{v:,} {k}" for k, v in r["outcomes"].items() if k != "decided")
    print(f"  [{backend} round {k + 1}] {made}; fake: {r['fake']['count']:,} requests "
          f"{r['fake']['answers']} on {r['fake']['connections']} connections; "
          f"{r['pushes_per_s']:,.0f} pushes/s, "
          f"all final {r['all_sent_s']:.2f} s; probe p99 alone {r['alone']['p99_ms']:.1f} ms, "
          f"burst {r['burst']['p99_ms']:.1f} ms"
          + (" NOT ALL SENT" if r["timed_out"] else ""), flush=True)
    if r["log"]:
        print("      serve logged: " + ", ".join(f"{v:,} {k}" for k, v in
                                                 sorted(r["log"].items(), key=lambda x: -x[1])))


def _report(result: dict[str, Any], args: argparse.Namespace) -> None:
    runs = result["runs"]

    def med(get: Any) -> float:
        return float(statistics.median(get(r) for r in runs))

    def each(get: Any, fmt: str) -> str:
        return ", ".join(format(get(r), fmt) for r in runs)

    def mark(ok: bool) -> str:
        return "ok" if ok else "MISS"

    n = args.pushes
    how = ("rule decisions on entering pings" if args.source == "rules"
           else "POST /v1/admin/test-push")
    print(f"\n{result['backend']} backend: {n:,} pushes a round from {how}, median of "
          f"{len(runs)} ({os.cpu_count()} CPUs shared by geopush, the fake FCM, the probe, "
          "this script and whatever else runs)")
    rows = [
        ("pushes/s at the fake FCM (first → last request)",
         f"{med(lambda r: r['pushes_per_s']):,.0f}", each(lambda r: r["pushes_per_s"], ",.0f"),
         f"≥ {TARGET_PUSHES_PER_S:,.0f} {mark(med(lambda r: r['pushes_per_s']) >= TARGET_PUSHES_PER_S)}"),
        ("queueing them (posting the pings / test pushes)",
         f"{med(lambda r: r['queue_s']):.2f} s", each(lambda r: r["queue_s"], ".2f"), ""),
        ("first request at the fake after",
         f"{med(lambda r: r['first_send_after_s']):.2f} s",
         each(lambda r: r["first_send_after_s"], ".2f"), ""),
        ("every push decided final (sent) after",
         f"{med(lambda r: r['all_sent_s']):.2f} s", each(lambda r: r["all_sent_s"], ".2f"), ""),
        ("geopush CPU a push (ingest + decide + send)",
         f"{med(lambda r: r['server_cpu_us_per_push']):.0f} µs",
         each(lambda r: r["server_cpu_us_per_push"], ".0f"), ""),
        ("fake FCM CPU a push",
         f"{med(lambda r: r['fake_cpu_us_per_push']):.0f} µs",
         each(lambda r: r["fake_cpu_us_per_push"], ".0f"), ""),
        ("single pings alone p50 / p99",
         f"{med(lambda r: r['alone']['p50_ms']):.1f} / {med(lambda r: r['alone']['p99_ms']):.1f} ms",
         each(lambda r: r["alone"]["p99_ms"], ".1f"), ""),
        ("single pings during the burst p50 / p99",
         f"{med(lambda r: r['burst']['p50_ms']):.1f} / {med(lambda r: r['burst']['p99_ms']):.1f} ms",
         each(lambda r: r["burst"]["p99_ms"], ".1f"),
         f"p99 < {TARGET_P99_MS:g} ms {mark(med(lambda r: r['burst']['p99_ms']) < TARGET_P99_MS)}"),
        ("  while queueing / while only sending, p99",
         f"{med(lambda r: r['queueing_only']['p99_ms']):.1f} / "
         f"{med(lambda r: r['sending_only']['p99_ms']):.1f} ms",
         each(lambda r: r["sending_only"]["p99_ms"], ".1f"), ""),
        ("  max during the burst",
         f"{med(lambda r: r['burst']['max_ms']):.1f} ms", each(lambda r: r["burst"]["max_ms"], ".1f"),
         ""),
        ("p99 burst / alone",
         f"{med(lambda r: r['p99_ratio']):.2f}", each(lambda r: r["p99_ratio"], ".2f"), ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"  {'measure':{width}}  {'median':>16}  {'rounds':24}  target")
    for name, value, rounds, target in rows:
        print(f"  {name:{width}}  {value:>16}  {rounds:24}  {target}")
    bad = sum(r["burst"]["bad"] + r["alone"]["bad"] for r in runs)
    short = [r for r in runs if r["timed_out"]]
    if bad or short:
        print(f"  {bad} bad probe answers (not 200, or a ping rejected); {len(short)} rounds "
              f"did not get all {n:,} pushes decided and sent (see each round above)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_fake"]:
        return _run_fake()
    if argv[:1] == ["_probe"]:
        probe = argparse.ArgumentParser()
        probe.add_argument("--url", required=True)
        probe.add_argument("--rate", type=float, required=True)
        print(json.dumps(asyncio.run(_probe(probe.parse_args(argv[1:])))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["memory", "redis", "both"], default="memory")
    parser.add_argument("--pushes", type=int, default=20_000, help="pushes a round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are printed")
    parser.add_argument("--source", choices=["rules", "test-push"], default="rules",
                        help="rules: devices' entering pings decided by a rule (default); "
                             "test-push: the ops endpoint, one push a request")
    parser.add_argument("--batch", type=int, default=1000, help="entering pings a request")
    parser.add_argument("--probe-rate", type=float, default=100.0,
                        help="the probe's single pings a second, in all")
    parser.add_argument("--quiet-s", type=float, default=5.0,
                        help="seconds the probe measures with nothing else going on")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="delivery.max_in_flight (default: geopush's)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging.level of serve (INFO, the default a user runs, writes "
                             "a line a push)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15",
                        help="the benchmark writes under its own key prefix and removes it")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    command = ["python", "benchmarks/bench_delivery.py", "--backend", args.backend,
               "--pushes", str(args.pushes), "--repeat", str(args.repeat), "--source",
               args.source, "--batch", str(args.batch), "--probe-rate", f"{args.probe_rate:g}",
               "--quiet-s", f"{args.quiet_s:g}", "--log-level", args.log_level]
    if args.max_in_flight is not None:
        command += ["--max-in-flight", str(args.max_in_flight)]
    print("$ " + shlex.join(command))
    print(f"  started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    backends = ["memory", "redis"] if args.backend == "both" else [args.backend]
    results = []
    fake = _Fake()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for backend in backends:
                folder = Path(tmp) / backend
                folder.mkdir()
                results.append(_measure(backend, args, folder, fake))
    finally:
        fake.stop()
    print(f"  ended {time.strftime('%H:%M:%S')}, load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    for result in results:
        _report(result, args)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
