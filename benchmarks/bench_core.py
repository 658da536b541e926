"""Throughput of the pure core: geofence lookup, and lookup + transitions, in one process.

    python benchmarks/bench_core.py [--fences N] [--pings P] [--devices D] [--big-fences M]
                                    [--repeat R] [--chunk C] [--seed S]
                                    [--gc-threshold T0,T1,T2 | --cpython-gc]

Synthetic but shaped like production: N geofences (circles of 50–300 m, 2 % polygons) clustered
around towns at latitudes from the equator to Svalbard and across the antimeridian; P pings from
D devices, in time order, about half of them near a store (walking in, staying, leaving), with a
realistic mix of accuracies (some too coarse to count) and of reported speeds. Every fence has a
5-minute dwell, so dwell timers are exercised too.

Prints the median of R runs of (a) GeofenceIndex.query alone and (b) process_batch (lookup +
transitions, device states carried from chunk to chunk as the service does), peak RSS, and the
build time and RSS growth of an index of M geofences; targets are printed next to the figures.
The garbage collector is tuned as `geopush serve` tunes it (start-up objects frozen, thresholds
geopush.collector.THRESHOLDS) unless --gc-threshold or --cpython-gc says otherwise.
See benchmarks/README.md for measured figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import shapely

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from geopush.collector import THRESHOLDS as GC_THRESHOLDS
from geopush.config import LimitsSettings
from geopush.geo.index import EARTH_RADIUS_M, GeofenceIndex
from geopush.geo.model import DeviceState, Ping
from geopush.geo.transitions import Tracker, process_batch

TARGET_LOOKUP_PPS = 300_000
TARGET_TRANSITIONS_PPS = 150_000
TARGET_BUILD_S = 10.0
TARGET_BUILD_MB = 1536.0

# (lat, lon) of town centres: equator, mid and high latitudes, both hemispheres, the antimeridian
TOWNS = [
    (0.3, 32.6), (-1.3, 36.8), (1.35, 103.8), (-33.9, 151.2), (-41.3, 174.8), (-54.8, -68.3),
    (40.4, -3.7), (45.5, 9.2), (48.9, 2.35), (52.5, 13.4), (46.37, 14.11), (51.5, -0.1),
    (59.9, 10.7), (60.2, 24.9), (64.1, -21.9), (69.6, 18.9), (70.7, 23.7), (78.2, 15.6),
    (64.8, -147.7), (-16.5, 179.95), (-16.5, -179.95), (35.7, 139.7), (19.4, -99.1), (37.8, -122.4),
]
TOWNS_PER_REGION = 12  # towns scattered up to 60 km around each centre above
TOWN_RADIUS_M = 5_000.0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.only_build:
        print(json.dumps(measure_build(np.random.default_rng(args.seed), args.big_fences)))
        return 0
    rng = np.random.default_rng(args.seed)
    print(f"geopush core benchmark: {args.fences:,} fences, {args.pings:,} pings from "
          f"{args.devices:,} devices, chunks of {args.chunk:,}, median of {args.repeat}")
    index = build_index(rng, args.fences)
    pings = make_pings(rng, index, args.pings, args.devices)
    # the per-device ping rate limit on, at the service's default (it never cuts these pings)
    tracker = Tracker(index, dwell_plan=lambda _fid: (300.0,),
                      pings_per_minute=LimitsSettings().device_pings_per_minute)
    # A million input pings held at once is an artefact of the benchmark (the service sees
    # batches of at most 1000): keep them out of the garbage collector's full passes.
    gc.collect()
    gc.freeze()
    if args.gc_threshold:
        gc.set_threshold(*args.gc_threshold)
        how = "set with --gc-threshold"
    elif args.cpython_gc:
        how = "CPython's defaults, --cpython-gc"
    else:
        gc.set_threshold(*GC_THRESHOLDS)
        how = "as `geopush serve` sets them: geopush.collector.THRESHOLDS"
    print(f"garbage collector thresholds {gc.get_threshold()} ({how})")

    lookup = [_time(lambda: run_lookup(index, pings, args.chunk)) for _ in range(args.repeat)]
    pairs = run_lookup(index, pings, args.chunk)
    transition_runs = [_time(lambda: run_transitions(tracker, pings, args.chunk))
                       for _ in range(args.repeat)]
    counts = count_events(tracker, pings, args.chunk)  # outside the timed runs
    peak_mb = _peak_rss_mb()

    build_s, build_mb = (math.nan, math.nan)
    if args.big_fences:
        build_s, build_mb = _build_in_child(args.big_fences, args.seed)

    p = len(pings)
    rows = [
        ("(a) lookup: GeofenceIndex.query", f"{p / statistics.median(lookup):,.0f} pings/s",
         f">= {TARGET_LOOKUP_PPS:,}", p / statistics.median(lookup) >= TARGET_LOOKUP_PPS),
        ("(b) lookup + transitions: process_batch",
         f"{p / statistics.median(transition_runs):,.0f} pings/s",
         f">= {TARGET_TRANSITIONS_PPS:,}",
         p / statistics.median(transition_runs) >= TARGET_TRANSITIONS_PPS),
        ("peak RSS of (a) and (b)", f"{peak_mb:,.0f} MB", "", None),
    ]
    if args.big_fences:
        rows += [
            (f"build index of {args.big_fences:,} fences", f"{build_s:.2f} s",
             f"< {TARGET_BUILD_S:g} s", build_s < TARGET_BUILD_S),
            ("  RSS growth of that build", f"{build_mb:,.0f} MB", f"< {TARGET_BUILD_MB:,.0f} MB",
             build_mb < TARGET_BUILD_MB),
        ]
    print()
    print(f"{'measure':<42} {'median':>18}  {'target':>12}  ok")
    print("-" * 80)
    for name, value, target, ok in rows:
        mark = "" if ok is None else ("yes" if ok else "NO")
        print(f"{name:<42} {value:>18}  {target:>12}  {mark}")
    print()
    print("runs (s): lookup " + ", ".join(f"{t:.2f}" for t in lookup)
          + " | transitions " + ", ".join(f"{t:.2f}" for t in transition_runs))
    print(f"per run: {pairs:,} (ping, fence) pairs within reach; events "
          + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
    return 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--fences", type=int, default=20_000, help="geofences (default 20,000)")
    parser.add_argument("--pings", type=int, default=1_000_000, help="pings (default 1,000,000)")
    parser.add_argument("--devices", type=int, default=100_000, help="devices (default 100,000)")
    parser.add_argument("--big-fences", type=int, default=1_000_000,
                        help="fences of the build measurement (default 1,000,000; 0 skips it)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measure (median)")
    parser.add_argument("--chunk", type=int, default=10_000, help="pings per batch")
    parser.add_argument("--seed", type=int, default=7)
    gc_choice = parser.add_mutually_exclusive_group()
    gc_choice.add_argument("--gc-threshold", type=_thresholds, default=None, metavar="T0,T1,T2",
                           help="gc.set_threshold for the timed runs (default: the service's, "
                                f"{','.join(map(str, GC_THRESHOLDS))})")
    gc_choice.add_argument("--cpython-gc", action="store_true",
                           help="keep CPython's default thresholds (700,10,10)")
    parser.add_argument("--only-build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("fences", "pings", "devices", "repeat", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} = {getattr(args, name)}: expected >= 1")
    if args.big_fences < 0:
        parser.error(f"--big-fences = {args.big_fences}: expected >= 0")
    return args


# -- data -----------------------------------------------------------------------------------

def _offset(lat: np.ndarray, lon: np.ndarray, north_m: np.ndarray, east_m: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Move points by metres (local flat approximation; fine for a few km), wrapping longitude."""
    new_lat = np.clip(lat + np.degrees(north_m / EARTH_RADIUS_M), -89.9, 89.9)
    new_lon = lon + np.degrees(east_m / (EARTH_RADIUS_M * np.cos(np.radians(new_lat))))
    return new_lat, (new_lon + 180.0) % 360.0 - 180.0


def _towns() -> np.ndarray:
    """Town centres around the regions of TOWNS; the same for every call (own seed)."""
    rng = np.random.default_rng(2026)
    centres = np.repeat(np.array(TOWNS), TOWNS_PER_REGION, axis=0)
    dist = rng.uniform(0.0, 60_000.0, len(centres))
    angle = rng.random(len(centres)) * 2 * np.pi
    lat, lon = _offset(centres[:, 0], centres[:, 1], dist * np.cos(angle), dist * np.sin(angle))
    return np.column_stack([lat, lon])


def _fence_columns(rng: np.random.Generator, n: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[shapely.Geometry | None]]:
    towns = _towns()
    town = rng.integers(0, len(towns), n)
    dist = TOWN_RADIUS_M * np.sqrt(rng.random(n))
    angle = rng.random(n) * 2 * np.pi
    lat, lon = _offset(towns[town, 0], towns[town, 1], dist * np.cos(angle), dist * np.sin(angle))
    inside = rng.uniform(50.0, 300.0, n)
    polygons: list[shapely.Geometry | None] = [None] * n
    for i in np.flatnonzero(rng.random(n) < 0.02).tolist():
        # a building-sized rectangle (40–160 m sides) around the centre, buffered 0–20 m
        half_n, half_e = rng.uniform(20.0, 80.0, 2)
        corners_n = np.array([-half_n, -half_n, half_n, half_n])
        corners_e = np.array([-half_e, half_e, half_e, -half_e])
        clat, clon = _offset(np.full(4, lat[i]), np.full(4, lon[i]), corners_n, corners_e)
        polygons[i] = shapely.Polygon(np.column_stack([clon, clat]))
        inside[i] = rng.uniform(0.0, 20.0)
    return lat, lon, inside, polygons


def build_index(rng: np.random.Generator, n: int) -> GeofenceIndex:
    lat, lon, inside, polygons = _fence_columns(rng, n)
    return GeofenceIndex(lat, lon, inside, polygons, hysteresis_m=25.0)


def make_pings(rng: np.random.Generator, index: GeofenceIndex, n: int, devices: int) -> list[Ping]:
    """Each device sends ~n/devices pings 20–120 s apart; a shopper's pings walk into a fence,
    stay a while and leave, a passer-by's scatter around its town."""
    device = np.sort(rng.integers(0, devices, n))
    first = np.searchsorted(device, device, side="left")
    k = np.arange(n) - first  # ping number within its device
    start = rng.uniform(0.0, 3600.0, devices)[device]
    elapsed = np.cumsum(rng.uniform(20.0, 120.0, n))
    ts = 1_780_000_000.0 + start + elapsed - elapsed[first]  # each device starts at its own time

    shopper = (rng.random(devices) < 0.5)[device]
    fence = rng.integers(0, len(index), devices)[device]
    # shoppers: pings 0–1 approach, 2–6 inside, 7+ leave; distance from the fence centre
    radius = index.inside_m[fence]
    along = np.where(k < 2, radius + 150.0 - 60.0 * k,
                     np.where(k < 7, radius * rng.random(n) * 0.8, radius + 60.0 * (k - 6)))
    angle = rng.random(n) * 2 * np.pi
    near_lat, near_lon = _offset(index.lat[fence], index.lon[fence],
                                 along * np.cos(angle), along * np.sin(angle))
    towns = _towns()
    home = rng.integers(0, len(towns), devices)[device]
    dist = TOWN_RADIUS_M * np.sqrt(rng.random(n))
    far_lat, far_lon = _offset(towns[home, 0], towns[home, 1], dist * np.cos(angle),
                               dist * np.sin(angle))
    lat = np.where(shopper, near_lat, far_lat)
    lon = np.where(shopper, near_lon, far_lon)

    accuracy = rng.choice([5.0, 10.0, 20.0, 40.0, 150.0, math.nan], n,
                          p=[0.3, 0.3, 0.15, 0.1, 0.1, 0.05])
    speed = np.where(rng.random(n) < 0.5, rng.uniform(0.0, 2.0, n), math.nan)
    order = np.argsort(ts, kind="stable")  # the service sees all devices interleaved in time
    names = [f"device-{d:06d}" for d in range(devices)]
    return [
        Ping(names[d], t, la, lo, None if a != a else a, None if s != s else s)
        for d, t, la, lo, a, s in zip(
            device[order].tolist(), ts[order].tolist(), lat[order].tolist(),
            lon[order].tolist(), accuracy[order].tolist(), speed[order].tolist(), strict=True,
        )
    ]


# -- measures -------------------------------------------------------------------------------

def run_lookup(index: GeofenceIndex, pings: Sequence[Ping], chunk: int) -> int:
    lat = [p.lat for p in pings]
    lon = [p.lon for p in pings]
    pairs = 0
    for start in range(0, len(pings), chunk):
        pairs += len(index.query(lat[start:start + chunk], lon[start:start + chunk]))
    return pairs


def run_transitions(tracker: Tracker, pings: Sequence[Ping], chunk: int) -> None:
    """Batch after batch, each device's state carried to its next batch as a store would
    (process_batch leaves every device's new state in `states`)."""
    states: dict[str, DeviceState | None] = {}
    for start in range(0, len(pings), chunk):
        process_batch(tracker, pings[start:start + chunk], states)


def count_events(tracker: Tracker, pings: Sequence[Ping], chunk: int) -> dict[str, int]:
    states: dict[str, DeviceState | None] = {}
    counts: dict[str, int] = {}
    for start in range(0, len(pings), chunk):
        for step in process_batch(tracker, pings[start:start + chunk], states).values():
            for event in step.events:
                counts[event.type] = counts.get(event.type, 0) + 1
    return counts


def measure_build(rng: np.random.Generator, n: int) -> tuple[float, float]:
    lat, lon, inside, polygons = _fence_columns(rng, n)
    gc.collect()
    before = _current_rss_mb()
    started = time.perf_counter()
    index = GeofenceIndex(lat, lon, inside, polygons, hysteresis_m=25.0)
    elapsed = time.perf_counter() - started
    grown = _peak_rss_mb() - before  # the peak: the build's temporaries count too
    assert len(index) == n
    return elapsed, grown


def _thresholds(text: str) -> tuple[int, int, int]:
    try:
        t0, t1, t2 = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected three integers like 100000,50,100") from None
    return t0, t1, t2


def _build_in_child(n: int, seed: int) -> tuple[float, float]:
    """A fresh process, so the RSS growth is the build's alone, not this process's history."""
    out = subprocess.run(
        [sys.executable, __file__, "--only-build", "--big-fences", str(n), "--seed", str(seed)],
        check=True, capture_output=True, text=True,
    ).stdout
    build_s, build_mb = json.loads(out.strip().splitlines()[-1])
    return float(build_s), float(build_mb)


def _time(run: Callable[[], object]) -> float:
    gc.collect()
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


if __name__ == "__main__":
    raise SystemExit(main())
