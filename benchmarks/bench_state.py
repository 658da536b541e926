"""Store-level throughput of `StateStore.track`, memory and Redis backends, in one process.

    python benchmarks/bench_state.py [--devices D] [--pings-per-device K] [--batches B]
                                     [--repeat R] [--redis-url URL] [--backend memory|redis|both]
                                     [--journal]

Shaped like HTTP batch ingestion: D devices, all with location consent, each batch K pings per
device (default 1: one batch = D devices = D pings, the store's hardest case; bench_http.py
sends 100 devices x 10 pings), B batches in time order walking among three shops (entering,
dwelling, leaving: stays, timers and visits are all written). The compute is the real
engine; its time is measured inside `track` and reported apart, so "store overhead" is what the
backend itself costs per device (reads, decoding, encoding, commits, round trips).

Runs with the garbage collector tuned as `geopush serve` tunes it (start-up objects frozen, a
larger young generation: geopush.collector.THRESHOLDS); --default-gc keeps CPython's defaults.

Prints the median of R runs. Redis keys use a prefix of their own (removed afterwards), in the
database of --redis-url (default 15; never database 0). This is a diagnostic, with no target
of its own: the promised figures are end to end over HTTP (bench_http.py: ≥ 50,000 pings/s in
1000-ping batches with Redis). It shows how the store's cost splits into the engine's compute
and the backend's own work, and how it grows with devices per batch (--pings-per-device 1 is
the worst case: every ping a device of its own to read, decode, encode and commit).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from geopush.collector import THRESHOLDS as GC_THRESHOLDS
from geopush.devices import Consent, DeviceProfile
from geopush.engine import DeviceOutcome, DeviceSnapshot, Engine
from geopush.geo.index import GeofenceIndex
from geopush.geo.model import Ping
from geopush.geo.transitions import Tracker
from geopush.state.base import StateStore
from geopush.state.memory import MemoryStore

DEFAULT_GC_THRESHOLDS = gc.get_threshold()
T0 = 1_780_000_000.0
SHOPS = [(48.1374, 11.5755 + i * 0.004) for i in range(3)]  # 300 m apart
ELSEWHERE = (48.14, 11.60)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    backends = ["memory", "redis"] if args.backend == "both" else [args.backend]
    pings = args.devices * args.pings_per_device * args.batches
    devices = args.devices * args.batches
    for backend in backends:
        runs = [asyncio.run(_one_run(backend, args, seed)) for seed in range(args.repeat)]
        total = statistics.median(r.total for r in runs)
        compute = statistics.median(r.compute for r in runs)
        overhead = statistics.median(r.total - r.compute for r in runs)
        cpu_overhead = statistics.median(r.total_cpu - r.compute_cpu for r in runs)
        print(f"{backend:6s}: {pings / total:9,.0f} pings/s through track "
              f"({total / args.batches * 1e3:6.1f} ms per batch of {args.devices} devices x "
              f"{args.pings_per_device}; compute {compute / args.batches * 1e3:5.1f} ms)\n"
              f"        store overhead {overhead / args.batches * 1e3:5.1f} ms per batch = "
              f"{devices / overhead:9,.0f} devices/s "
              f"(this process's CPU: {cpu_overhead / args.batches * 1e3:5.1f} ms = "
              f"{devices / cpu_overhead:9,.0f} devices/s)")
    print(f"(median of {args.repeat} runs of {args.batches} batches. Wall time includes Redis's "
          "own work and waiting for a core: on a shared 2-core machine it varies a lot.)")
    return 0


@dataclass(frozen=True, slots=True)
class _Run:
    total: float  # wall seconds in track, over all batches
    compute: float  # of which in compute
    total_cpu: float  # the same in this process's CPU seconds
    compute_cpu: float


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--pings-per-device", type=int, default=1)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--backend", choices=["memory", "redis", "both"], default="both")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--journal", action="store_true",
                        help="memory backend with a snapshot path, so every track batch is "
                        "also appended to the journal (the embedded default)")
    parser.add_argument("--default-gc", action="store_true",
                        help="CPython's garbage collector settings instead of the service's")
    args = parser.parse_args(argv)
    if args.redis_url.rstrip("/").endswith(":6379") or args.redis_url.endswith("/0"):
        parser.error("--redis-url: give a database other than 0, e.g. redis://127.0.0.1:6379/15")
    return args


def _engine() -> Engine:
    index = GeofenceIndex([s[0] for s in SHOPS], [s[1] for s in SHOPS], [80.0] * 3,
                          ids=[f"node/{i}" for i in range(3)],
                          store_ids=[f"store-{i}" for i in range(3)])
    return Engine(Tracker(index, stale_after_s=900.0, min_visit_s=120.0,
                          dwell_plan=lambda _fid: (180.0,)))


def _batches(devices: int, per_device: int, batches: int, seed: int) -> list[list[Ping]]:
    rng = random.Random(seed)
    where = [rng.randrange(4) for _ in range(devices)]
    out: list[list[Ping]] = []
    for b in range(batches * per_device):
        if b % per_device == 0:
            out.append([])
        for d in range(devices):
            if rng.random() < 0.2:  # a fifth of the devices move on each round
                where[d] = rng.randrange(4)
            lat, lon = SHOPS[where[d]] if where[d] < 3 else ELSEWHERE
            out[-1].append(Ping(f"bench-dev-{d}", T0 + 60.0 * b + d * 0.001, lat, lon,
                                accuracy_m=rng.choice([None, 10.0, 25.0])))
    return out


async def _one_run(backend: str, args: argparse.Namespace, seed: int) -> _Run:
    engine = _engine()
    batches = _batches(args.devices, args.pings_per_device, args.batches, seed)
    ids = list(dict.fromkeys(p.device_id for p in batches[0]))
    store: StateStore
    prefix = f"geopush-bench-{os.getpid()}-{seed}"
    if backend == "redis":
        from geopush.state.redis import RedisStore

        store = RedisStore(args.redis_url, key_prefix=prefix)
    else:
        # --journal: as the embedded default runs, a snapshot path and so a journal beside it
        store = MemoryStore(Path(tempfile.mkdtemp(prefix="geopush-bench-")) / "state.json"
                            if args.journal else None)
    await store.open()
    try:
        for device_id in ids:
            await store.put_profile(DeviceProfile(
                device_id=device_id, push_token="t" * 150, platform="android",
                locale="de-DE", timezone="Europe/Berlin",
                consent=Consent(location=True, marketing=True)), None)
        if not args.default_gc:
            gc.collect()
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
        computing = computing_cpu = total = total_cpu = 0.0
        for batch in batches:
            def compute(snaps: Mapping[str, DeviceSnapshot], batch: list[Ping] = batch
                        ) -> Mapping[str, DeviceOutcome]:
                nonlocal computing, computing_cpu
                started, started_cpu = time.perf_counter(), time.process_time()
                try:
                    return engine.ingest([p for p in batch if p.device_id in snaps], snaps)
                finally:
                    computing += time.perf_counter() - started
                    computing_cpu += time.process_time() - started_cpu

            started, started_cpu = time.perf_counter(), time.process_time()
            await store.track(ids, compute)
            total += time.perf_counter() - started
            total_cpu += time.process_time() - started_cpu
        return _Run(total, computing, total_cpu, computing_cpu)
    finally:
        gc.set_threshold(*DEFAULT_GC_THRESHOLDS)
        gc.unfreeze()
        if backend == "redis":
            await _drop_prefix(args.redis_url, prefix)
        await store.close()


async def _drop_prefix(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i:i + 500])
    finally:
        await client.aclose()


if __name__ == "__main__":
    raise SystemExit(main())
