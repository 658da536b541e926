"""`geopush replay` as a marketer runs it: the whole command, with and without rules.

    python benchmarks/bench_replay.py [--stores N] [--devices D] [--minutes M] [--repeat R]

Writes N stores (circles of 80 m, tagged `shop:supermarket`, around Bled) and a CSV of D phones,
each walking at 1 ping every 10 s for M minutes from store to store (in, a few minutes inside,
out), to a temporary folder; then runs `geopush replay --summary-only --assume-consent` on it R
times without rules, R times with a rules folder of five rules (enter, two dwells, exit, with
`when` conditions on local time, opening hours, speed and visits) and R times with the rule
library of `rules/` on a hot, clear day (`--weather`), alternating, and prints the
median wall time of each, pings/s, and the events and decisions counted. The wall time includes
start-up (settings, stores, rules), as a user waits for it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GEOPUSH = Path(sys.executable).parent / "geopush"
LIBRARY = ROOT / "rules"  # the rule library that ships with geopush
RULES = """\
rules:
  - id: welcome
    trigger: {on: enter, geofences: {tags: [shop:supermarket]}}
    when: {local_time: {from: "08:00", to: "20:00"}, speed_mps: {max: 3}}
    message: {title: "Hello", body: "Welcome to {{ store.name }}, {{ distance_m }} m away"}
  - id: browse-3m
    trigger: {on: dwell, dwell: 3m, geofences: {tags: [shop:supermarket]}}
    when: {store_open: true}
    message: {title: "Still looking?", body: "Offers at {{ store.name }}"}
  - id: browse-6m
    priority: 5
    trigger: {on: dwell, dwell: 6m, geofences: {tags: [shop:supermarket]}}
    message: {title: "Coffee?", body: "On us at {{ store.name }}"}
  - id: win-back
    priority: 10
    trigger: {on: enter, geofences: {tags: [shop:supermarket]}}
    when: {visits: {last_visit_days: {min: 21}}}
    message: {title: "Welcome back", body: "{{ visits.last_visit_days }} days"}
  - id: bye
    category: service
    trigger: {on: exit, geofences: {tags: [shop:supermarket]}}
    caps: {per_device: [{max: 1, per: 1d}]}
    message: {title: "Thanks", body: "See you at {{ store.name }}"}
"""


def _stores(n: int, rng: random.Random) -> list[tuple[float, float]]:
    return [(46.37 + rng.uniform(-0.05, 0.05), 14.11 + rng.uniform(-0.07, 0.07))
            for _ in range(n)]


def _write(folder: Path, stores: int, devices: int, minutes: int, seed: int) -> int:
    rng = random.Random(seed)
    places = _stores(stores, rng)
    features = [{"type": "Feature", "id": f"node/{i}",
                 "properties": {"name": f"Store {i}", "shop": "supermarket", "radius_m": 80,
                                "opening_hours": "Mo-Sa 07:00-21:00"},
                 "geometry": {"type": "Point", "coordinates": [lon, lat]}}
                for i, (lat, lon) in enumerate(places)]
    (folder / "stores.geojson").write_text(json.dumps({"type": "FeatureCollection",
                                                      "features": features}))
    (folder / "rules").mkdir()
    (folder / "rules" / "bench.yaml").write_text(RULES)
    (folder / "empty-rules").mkdir()
    start = 1_780_300_800  # 2026-06-01 08:00 UTC, a Monday
    rows = 0
    with (folder / "pings.csv").open("w") as out:
        out.write("device_id,ts,lat,lon,accuracy_m,speed_mps\n")
        for d in range(devices):
            t = start + rng.uniform(0, 600)
            end = start + minutes * 60
            lat, lon = places[rng.randrange(stores)]
            while t < end:
                # inside a store for 1-9 minutes, then walk 2-6 minutes to another
                stay = rng.uniform(60, 540)
                for k in range(int(stay // 10)):
                    jitter = (rng.gauss(0, 15), rng.gauss(0, 15))
                    out.write(_row(d, t + 10 * k, lat, lon, jitter, 0.5))
                    rows += 1
                t += stay
                nlat, nlon = places[rng.randrange(stores)]
                walk = rng.uniform(120, 360)
                steps = int(walk // 10)
                for k in range(1, steps + 1):
                    f = k / steps
                    out.write(_row(d, t + 10 * k, lat + (nlat - lat) * f, lon + (nlon - lon) * f,
                                   (0.0, 0.0), 1.4))
                    rows += 1
                t += walk
                lat, lon = nlat, nlon
    return rows


def _row(d: int, ts: float, lat: float, lon: float, jitter: tuple[float, float],
         speed: float) -> str:
    north, east = jitter
    lat += math.degrees(north / 6_371_000)
    lon += math.degrees(east / (6_371_000 * math.cos(math.radians(lat))))
    return f"phone-{d},{ts * 1000:.0f},{lat:.6f},{lon:.6f},12,{speed}\n"


def _run(folder: Path, rules: str) -> tuple[float, dict[str, object]]:
    """The whole command; the rule library (`rules/`) on a hot, clear day, so its weather rules
    decide too."""
    config = folder / "geopush.yaml"
    config.write_text(f"stores_file: stores.geojson\nrules_dir: {rules}\n"
                      "policy: {quiet_hours: null}\n")
    started = time.perf_counter()
    done = subprocess.run([str(GEOPUSH), "replay", str(folder / "pings.csv"), "-c", str(config),
                           "--assume-consent", "--summary-only", "--json",
                           *(["--weather", "temperature_c=31,condition=clear"]
                             if rules == str(LIBRARY) else [])],
                          capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - started
    summary: dict[str, object] = json.loads(done.stdout)["summary"]
    return elapsed, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--stores", type=int, default=300)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--minutes", type=int, default=120)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pings = _write(folder, args.stores, args.devices, args.minutes, args.seed)
        times: dict[str, list[float]] = {"empty-rules": [], "rules": [], str(LIBRARY): []}
        summaries: dict[str, dict[str, object]] = {}
        for _ in range(args.repeat):
            for rules in times:
                elapsed, summaries[rules] = _run(folder, rules)
                times[rules].append(elapsed)
    print(f"{pings:,} pings of {args.devices:,} phones, {args.stores} stores "
          f"(median of {args.repeat} runs of the whole command)")
    for rules, label in (("empty-rules", "without rules"), ("rules", "with 5 rules"),
                         (str(LIBRARY), "the library")):
        median = statistics.median(times[rules])
        s = summaries[rules]
        print(f"  {label:<14} {median:6.2f} s  {pings / median:>9,.0f} pings/s  events "
              f"{s['events']}  pushes {s['pushes']}  holdouts {s['holdouts']}  "
              f"suppressed {s['suppressed']}")
    ratio = statistics.median(times["rules"]) / statistics.median(times["empty-rules"])
    print(f"  decisions cost: {ratio:.2f}x the wall time without rules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
