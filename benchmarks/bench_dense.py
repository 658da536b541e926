"""A dense city: `geopush replay` (the whole command) against a pipelined Redis GEOSEARCH lookup.

    python benchmarks/bench_dense.py [--fences F] [--towns T] [--phones P] [--fixes N]
                                     [--repeat R] [--redis-url URL] [--json]

Writes to a temporary folder: F (20,000) circular geofences of 50–300 m (tagged
`shop:supermarket`, half with opening hours) around T (30) towns of Slovenia and Austria, and
a CSV of P (50,000) phones, each N (10) fixes 30 s apart (500,000 pings), walking (1.4 m/s,
two thirds) or driving (8–14 m/s) from a point near a random store of its town, every device's
fixes interleaved in time order as an export would be, on a weekday around noon local time.
Near the stores about one fence is within reach of each ping.

Then, R (3) times each, alternating:
- GEOSEARCH: the fences in a Redis GEO set (GEOADD), one `GEOSEARCH key FROMLONLAT lon lat
  BYRADIUS 300 m` per ping (the largest radius; a real geofencing check would then compare
  each hit's own radius, not counted here), pipelined 1,000 at a time from this process: the
  lookup alone, pings/s, the CSV already parsed;
- `geopush replay CSV --assume-consent --summary-only --json` without rules;
- the same with the rule library of `rules/` (weather, opening hours, local time, speed, visits,
  caps, holdout, dwell) and `--weather temperature_c=31,condition=clear`.
The replay figures are whole commands as a user runs them (start-up, reading the stores and the
CSV, output). It prints medians, pings/s and the ratios to GEOSEARCH (targets: ≥ 3× without
rules, ≥ 2× with the rules, and ≥ 100,000 pings/s with the rules).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import redis

ROOT = Path(__file__).resolve().parent.parent
GEOPUSH = Path(sys.executable).parent / "geopush"
RULES = ROOT / "rules"
EARTH_M = 6_371_008.8
# towns of Slovenia and Austria (lat, lon): a country's worth of stores, each town dense
TOWNS = [
    (46.0569, 14.5058), (46.5547, 15.6459), (46.2397, 14.3556), (45.5469, 13.7294),
    (46.3683, 14.1146), (46.2309, 15.2604), (45.8011, 15.1711), (46.4222, 15.8700),
    (46.6625, 16.1664), (45.9560, 13.6477), (46.0613, 14.2970), (46.1512, 14.9927),
    (48.2082, 16.3738), (47.0707, 15.4395), (48.3069, 14.2858), (47.8095, 13.0550),
    (47.2692, 11.4041), (46.6247, 14.3053), (48.2047, 15.6256), (47.4125, 9.7417),
    (46.6103, 13.8558), (48.1653, 14.0366), (47.5162, 14.5501), (48.0433, 14.4181),
    (47.8600, 16.5200), (47.3919, 15.0950), (46.7200, 14.0950), (48.0200, 16.2300),
    (47.2500, 11.6000), (47.9500, 12.9500),
]
TOWN_RADIUS_M = 5_000.0
START = datetime(2026, 6, 3, 11, 30, tzinfo=ZoneInfo("Europe/Ljubljana")).timestamp()  # a Wed


def _offset(lat: float, lon: float, north_m: float, east_m: float) -> tuple[float, float]:
    return (lat + math.degrees(north_m / EARTH_M),
            lon + math.degrees(east_m / (EARTH_M * math.cos(math.radians(lat)))))


def _write(folder: Path, fences: int, towns: int, phones: int, fixes: int, seed: int
           ) -> tuple[list[tuple[float, float, float]], int]:
    rng = random.Random(seed)
    where = TOWNS[:towns]
    stores: list[tuple[float, float, float]] = []  # lat, lon, radius
    features = []
    for n in range(fences):
        town = where[n % len(where)]
        r = TOWN_RADIUS_M * math.sqrt(rng.random())
        a = rng.uniform(0, 2 * math.pi)
        lat, lon = _offset(*town, r * math.cos(a), r * math.sin(a))
        radius = rng.uniform(50, 300)
        stores.append((lat, lon, radius))
        props: dict[str, object] = {"name": f"Store {n}", "shop": "supermarket",
                                    "radius_m": round(radius, 1)}
        if n % 2:
            props["opening_hours"] = "Mo-Sa 07:00-21:00; Su 08:00-13:00"
        features.append({"type": "Feature", "id": f"node/{n}", "properties": props,
                         "geometry": {"type": "Point", "coordinates": [lon, lat]}})
    (folder / "stores.geojson").write_text(json.dumps({"type": "FeatureCollection",
                                                       "features": features}))
    rows: list[tuple[float, str, float, float, float, float]] = []
    for p in range(phones):
        lat0, lon0, _ = stores[rng.randrange(len(stores))]
        lat, lon = _offset(lat0, lon0, rng.uniform(-150, 150), rng.uniform(-150, 150))
        speed = 1.4 if rng.random() < 2 / 3 else rng.uniform(8, 14)
        heading = rng.uniform(0, 2 * math.pi)
        t = START + rng.uniform(0, 1800)
        for _ in range(fixes):
            rows.append((t, f"p{p}", lat, lon, round(rng.uniform(5, 30), 1), speed))
            heading += rng.gauss(0, 0.3)
            lat, lon = _offset(lat, lon, speed * 30 * math.cos(heading),
                               speed * 30 * math.sin(heading))
            t += 30
    rows.sort()
    with (folder / "pings.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["device_id", "ts", "lat", "lon", "accuracy_m", "speed_mps"])
        for t, device, lat, lon, acc, speed in rows:
            out.writerow([device, round(t * 1000), f"{lat:.6f}", f"{lon:.6f}", acc,
                          f"{speed:.1f}"])
    (folder / "empty").mkdir(exist_ok=True)
    return stores, len(rows)


def _replay(folder: Path, rules: Path, weather: bool) -> tuple[float, dict[str, object]]:
    config = folder / "geopush.yaml"
    config.write_text(f"stores_file: stores.geojson\nrules_dir: {rules}\n")
    args = [str(GEOPUSH), "replay", str(folder / "pings.csv"), "-c", str(config),
            "--assume-consent", "--summary-only", "--json"]
    if weather:
        args += ["--weather", "temperature_c=31,condition=clear"]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - started
    summary: dict[str, object] = json.loads(done.stdout)["summary"]
    return elapsed, summary


def _geosearch(url: str, stores: list[tuple[float, float, float]],
               pings: list[tuple[float, float]]) -> float:
    client = redis.Redis.from_url(url)
    key = f"bench-dense:{time.monotonic_ns()}"
    try:
        members = []
        for n, (lat, lon, _) in enumerate(stores):
            members += [lon, lat, f"node/{n}"]
        for i in range(0, len(members), 3000):
            client.execute_command("GEOADD", key, *members[i:i + 3000])
        started = time.perf_counter()
        replies: list[object] = []
        for i in range(0, len(pings), 1000):
            pipe = client.pipeline(transaction=False)
            for lat, lon in pings[i:i + 1000]:
                pipe.execute_command("GEOSEARCH", key, "FROMLONLAT", lon, lat, "BYRADIUS",
                                     300, "m", "WITHDIST")
            replies += pipe.execute()
        elapsed = time.perf_counter() - started
        # not timed: how many fences each ping is within the radius of (the workload's density)
        within = sum(1 for reply in replies for name, dist in reply  # type: ignore[attr-defined]
                     if float(dist) <= stores[int(name.split(b"/")[1])][2])
        print(f"  (fences within reach of a ping: {within / len(pings):.2f} on average)",
              file=sys.stderr)
        return elapsed
    finally:
        client.delete(key)
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--fences", type=int, default=20_000)
    parser.add_argument("--towns", type=int, default=30)
    parser.add_argument("--phones", type=int, default=50_000)
    parser.add_argument("--fixes", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="geopush-dense-") as tmp:
        folder = Path(tmp)
        stores, count = _write(folder, args.fences, args.towns, args.phones, args.fixes,
                               args.seed)
        with (folder / "pings.csv").open() as f:
            next(f)
            pings = [(float(r[2]), float(r[3])) for r in csv.reader(f)]
        runs: dict[str, list[float]] = {"geosearch": [], "replay": [], "replay+rules": []}
        summaries: dict[str, dict[str, object]] = {}
        for _ in range(args.repeat):
            runs["geosearch"].append(_geosearch(args.redis_url, stores, pings))
            elapsed, summaries["replay"] = _replay(folder, folder / "empty", False)
            runs["replay"].append(elapsed)
            elapsed, summaries["replay+rules"] = _replay(folder, RULES, True)
            runs["replay+rules"].append(elapsed)
    medians = {name: statistics.median(times) for name, times in runs.items()}
    rate = {name: count / m for name, m in medians.items()}
    result = {"pings": count, "fences": args.fences, "seconds": runs,
              "pings_per_s": {k: round(v) for k, v in rate.items()},
              "ratio_to_geosearch": {k: round(rate[k] / rate["geosearch"], 2)
                                     for k in ("replay", "replay+rules")},
              "summaries": summaries}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"dense city: {args.fences:,} fences of 50-300 m around {args.towns} towns, "
          f"{count:,} pings of {args.phones:,} phones (median of {args.repeat})")
    for name, target in (("geosearch", ""), ("replay", "≥ 3× GEOSEARCH"),
                         ("replay+rules", "≥ 2× GEOSEARCH, ≥ 100,000 pings/s")):
        ratio = rate[name] / rate["geosearch"]
        print(f"  {name:<13} {medians[name]:6.2f} s  {rate[name]:>9,.0f} pings/s  "
              f"{ratio:4.2f}× GEOSEARCH  {target}")
    for name in ("replay", "replay+rules"):
        s = summaries[name]
        print(f"  {name}: events {s['events']}, visits {s['visits']}, pushes {s['pushes']}, "
              f"holdouts {s.get('holdouts')}, suppressed {s['suppressed']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
