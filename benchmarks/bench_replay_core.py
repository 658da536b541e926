"""`geopush replay` (the whole command) on bench_core.py's 1,000,000-ping workload, with and
without the rule library.

    python benchmarks/bench_replay_core.py [--fences N] [--pings P] [--devices D] [--repeat R]

Writes bench_core's workload to a temporary folder as a user would have it: N (20,000)
geofences (circles of 50–300 m, 2 % buffered polygons, clustered around towns from the equator
to Svalbard and across the antimeridian; tagged `shop:supermarket`, half with opening hours) as
GeoJSON, and P (1,000,000) pings of D (100,000) devices as CSV, in time order. Then runs
`geopush replay --assume-consent --summary-only --json` R (3) times without rules and R times
with the rule library of `rules/` on a hot, clear day (`--weather temperature_c=31,
condition=clear`), alternating, and prints the median wall time of each (start-up, stores, CSV,
output: what a user waits for) and pings/s. Target (the rules issue): ≥ 100,000 pings/s with the
rule library. The CSV is 57 MB, so replay splits it over the CPUs by default (`--jobs`).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import _fence_columns, build_index, make_pings

ROOT = Path(__file__).resolve().parent.parent
GEOPUSH = Path(sys.executable).parent / "geopush"
LIBRARY = ROOT / "rules"


def _write(folder: Path, fences: int, pings: int, devices: int, seed: int) -> int:
    lat, lon, inside, polygons = _fence_columns(np.random.default_rng(seed), fences)
    features = []
    for i in range(fences):
        props: dict[str, object] = {"name": f"Store {i}", "shop": "supermarket"}
        if i % 2:
            props["opening_hours"] = "Mo-Sa 07:00-21:00; Su 08:00-13:00"
        polygon = polygons[i]
        if polygon is None:
            props["radius_m"] = round(float(inside[i]), 1)
            geometry = {"type": "Point", "coordinates": [float(lon[i]), float(lat[i])]}
        else:
            props["buffer_m"] = round(float(inside[i]), 1)
            geometry = json.loads(shapely.to_geojson(polygon))
        features.append({"type": "Feature", "id": f"f{i}", "properties": props,
                         "geometry": geometry})
    (folder / "stores.geojson").write_text(json.dumps({"type": "FeatureCollection",
                                                       "features": features}))
    rng = np.random.default_rng(seed)
    index = build_index(rng, fences)  # the same fences, as bench_core builds them
    rows = make_pings(rng, index, pings, devices)
    with (folder / "pings.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["device_id", "ts", "lat", "lon", "accuracy_m", "speed_mps"])
        for p in rows:
            out.writerow([p.device_id, round(p.ts * 1000), f"{p.lat:.6f}", f"{p.lon:.6f}",
                          "" if p.accuracy_m is None else p.accuracy_m,
                          "" if p.speed_mps is None else f"{p.speed_mps:.2f}"])
    (folder / "no-rules").mkdir(exist_ok=True)
    return len(rows)


def _replay(folder: Path, rules: Path) -> tuple[float, dict[str, object]]:
    config = folder / "geopush.yaml"
    config.write_text(f"stores_file: stores.geojson\nrules_dir: {rules}\n")
    args = [str(GEOPUSH), "replay", str(folder / "pings.csv"), "-c", str(config),
            "--assume-consent", "--summary-only", "--json"]
    if rules == LIBRARY:
        args += ["--weather", "temperature_c=31,condition=clear"]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    summary: dict[str, object] = json.loads(done.stdout)["summary"]
    return time.perf_counter() - started, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--fences", type=int, default=20_000)
    parser.add_argument("--pings", type=int, default=1_000_000)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="geopush-replay-core-") as tmp:
        folder = Path(tmp)
        count = _write(folder, args.fences, args.pings, args.devices, args.seed)
        runs: dict[str, list[float]] = {"no rules": [], "the rule library": []}
        summaries: dict[str, dict[str, object]] = {}
        for _ in range(args.repeat):
            for name, rules in (("no rules", folder / "no-rules"),
                                ("the rule library", LIBRARY)):
                elapsed, summaries[name] = _replay(folder, rules)
                runs[name].append(elapsed)
    print(f"geopush replay, bench_core's workload: {count:,} pings of {args.devices:,} devices, "
          f"{args.fences:,} fences (median of {args.repeat} whole commands)")
    for name, times in runs.items():
        median = statistics.median(times)
        s = summaries[name]
        target = "  target ≥ 100,000" if name == "the rule library" else ""
        print(f"  {name:<17} {median:6.2f} s  {count / median:>9,.0f} pings/s{target}  "
              f"events {s['events']}  pushes {s['pushes']}  holdouts {s.get('holdouts')}  "
              f"suppressed {s['suppressed']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
