"""A replay split across processes by device (`--jobs`): every row read by one shard, and the
whole command printing what one process prints, on a real trace past real stores."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geopush.cli import csv_blocks
from geopush.cli.ping_files import BadLine, read_pings, shard_of
from geopush.cli.replay_shards import SPLIT_FROM_BYTES, jobs_for
from geopush.timeutil import format_ts, parse_ts

REPO = Path(__file__).resolve().parent.parent
GEOPUSH = Path(sys.executable).parent / "geopush"
TRACE = REPO / "tests/fixtures/traces/barefoot_munich_x0001-001.csv"
STORES = REPO / "tests/fixtures/germany_lidl_centers_slice.geojson"
RULES = REPO / "docs/examples/preview-rules"
DEVICES = 24


def _fleet(path: Path, quoting: int = csv.QUOTE_MINIMAL) -> None:
    """The real Munich drive as driven by 24 phones, each an hour and a minute after the last
    (so some drive by in quiet hours and some do not), and shoppers who stop at a store, in one
    time-ordered file; with malformed rows and a ping older than its device's last."""
    with TRACE.open(newline="") as f:
        trace = list(csv.DictReader(f))
    rows: list[tuple[float, list[str]]] = []
    for k in range(DEVICES):
        for r in trace:
            ts = parse_ts(r["ts_iso"], naive_is_utc=True) + k * 3660.0
            rows.append((ts, [f"phone-{k:02d}", format_ts(ts), r["lat"], r["lon"],
                              r["accuracy_m"], r["speed_mps"]]))
    # and shoppers who stop at the Lidl of Schleißheimer Straße for 20 minutes: visits
    for k in range(6):
        start = rows[0][0] + k * 7200.0
        for minute in range(21):
            rows.append((start + minute * 60, [f"shopper-{k}", format_ts(start + minute * 60),
                                               "48.15794", "11.56231", "10", "0"]))
    rows.sort(key=lambda row: row[0])
    with path.open("w", newline="") as f:
        out = csv.writer(f, quoting=quoting)
        out.writerow(["device_id", "ts", "lat", "lon", "accuracy_m", "speed_mps"])
        for i, (_ts, row) in enumerate(rows):
            out.writerow(row)
            if i == 500:
                out.writerow(["phone-03", "yesterday", "48.1", "11.5", "", ""])
                out.writerow(["phone-00", format_ts(rows[0][0]), "48.1", "11.5", "", ""])
            if i == 900:
                out.writerow(["only", "three"])


def _replay(pings: Path, jobs: int) -> tuple[dict[str, Any], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOPUSH_")}
    env["GEOPUSH_GEOFENCE__DEFAULT_RADIUS_M"] = "400"
    done = subprocess.run(
        [str(GEOPUSH), "replay", str(pings), "--assume-consent", "--stores", str(STORES),
         "--rules", str(RULES), "--weather", "temperature_c=31,condition=clear", "--json",
         "--jobs", str(jobs)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
    doc: dict[str, Any] = json.loads(done.stdout)
    del doc["summary"]["elapsed_s"], doc["summary"]["pings_per_s"]
    return doc, done.stderr


def test_a_split_replay_prints_what_one_process_prints(tmp_path: Path) -> None:
    pings = tmp_path / "fleet.csv"
    _fleet(pings)
    alone, alone_err = _replay(pings, 1)
    split, split_err = _replay(pings, 2)
    summary = alone["summary"]
    # the run is worth comparing: pushes and suppressions, events, visits and rejections
    assert summary["pushes"] > 0 and summary["suppressed"].get("quiet_hours", 0) > 0
    assert summary["events"]["enter"] >= DEVICES and summary["visits"] > 0
    assert summary["rejected_by_code"] == {"invalid": 2, "out_of_order": 1}
    assert split == alone
    assert split_err == alone_err  # each rejected line said once, in line order


@pytest.mark.parametrize("quoting", [csv.QUOTE_MINIMAL, csv.QUOTE_ALL])
def test_every_row_is_read_by_exactly_one_shard(tmp_path: Path, quoting: int) -> None:
    """Without quotes a line is told by its device before the CSV parse; with them (a field
    may span lines) after it: the same partition either way."""
    pings = tmp_path / "fleet.csv"
    _fleet(pings, quoting)
    whole = list(read_pings(pings))
    shards = [list(read_pings(pings, shard=(k, 3))) for k in range(3)]
    assert sum(len(shard) for shard in shards) == len(whole)
    assert {n: r for shard in shards for n, r in shard} == dict(whole)
    for k, shard in enumerate(shards):
        devices = {r.device_id for _, r in shard if not isinstance(r, BadLine)}
        assert devices and all(shard_of(d, 3) == k for d in devices)
    # a row that names no device, once, in shard 0; a bad row of a device, in its shard
    assert [n for n, r in shards[0] if isinstance(r, BadLine) and "fields" in r.message]
    assert sum(isinstance(r, BadLine) for shard in shards for _, r in shard) == 2


_HEADER = "device_id,ts,lat,lon,accuracy_m,speed_mps"


def _rows(n: int) -> list[str]:
    return [f"dev-{i % 37},{1780000000000 + i * 1000},46.{i:04d},14.1,5,1" for i in range(n)]


@pytest.mark.parametrize("block_bytes", [csv_blocks.BLOCK_BYTES, 256])
@pytest.mark.parametrize(("text", "by_bytes"), [
    ("\n".join([_HEADER, *_rows(300)]) + "\n", "all"),
    ("\n".join([_HEADER, *_rows(300)]), "all"),  # no line feed after the last line
    ("\r\n".join([_HEADER, *_rows(300)]) + "\r\n", "all"),
    ("\n\n" + "\n".join([_HEADER, *_rows(50), "", "only,three", " ", *_rows(50)]), "all"),
    ("lat,lon,ts,accuracy_m,speed_mps,device_id\r\n"  # the device last, before a \r
     + "\r\n".join(",".join([*r.split(",")[2:3], "14.1", *r.split(",")[1:2], "5", "1",
                              r.split(",")[0]]) for r in _rows(200)) + "\r\n", "all"),
    # what only the text reader reads exactly goes line by line from its block on: spaces
    # around an id (the same device as without), a lone \r (a line's end), bytes past ASCII
    ("\n".join([_HEADER, *_rows(50), " dev-1 ,1780000900000,46.1,14.1,5,1", *_rows(9)]), "some"),
    ("\n".join([_HEADER, *_rows(50)]) + "\rdev-1,1780000900000,46.1,14.1,5,1\n", "some"),
    ("\n".join([_HEADER, *_rows(50), "gerät-1,1780000900000,46.1,14.1,5,1", *_rows(9)]),
     "some"),
    ("\r\r" + "\n".join([_HEADER, *_rows(50)]), "none"),  # before the header
])
def test_telling_lines_by_their_bytes_picks_what_the_line_by_line_path_picks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, by_bytes: str,
        block_bytes: int) -> None:
    path = tmp_path / "pings.csv"
    path.write_bytes(text.encode())
    monkeypatch.setattr(csv_blocks, "BLOCK_BYTES", block_bytes)
    answers: list[bool] = []
    block_of = csv_blocks._Block.of

    def watched(*args: Any) -> Any:
        block = block_of(*args)
        answers.append(block is not None)
        return block

    monkeypatch.setattr(csv_blocks._Block, "of", watched)
    fast = [list(read_pings(path, shard=(k, 3))) for k in range(3)]
    if by_bytes == "all":
        assert answers and all(answers)
    elif by_bytes == "some":  # by bytes at least until the block that holds it
        assert answers and not all(answers) and (block_bytes > len(text) or answers[0])
    else:
        assert not answers
    monkeypatch.setattr(csv_blocks._Block, "of", lambda *args: None)
    slow = [list(read_pings(path, shard=(k, 3))) for k in range(3)]
    assert fast == slow
    assert sorted(n for shard in fast for n, _ in shard) == [n for n, _ in read_pings(path)]


EDGES = ["46.1", "-0", "-0.0", "46.", ".5", "-.5", "0046.100", "1e3", " 46.1", "46.1 ", "+46.1",
         "4_6", "nan", "inf", "-", ".", "", "46.12345678901234567", "123456789012345",
         "1234567890123456", "90.0000001", "-180", "180.0", "1.2.3", "--1", "9" * 16]


def test_the_usual_rows_parsed_at_once_are_the_rows_parsed_one_by_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every field of a row read as plain numbers (or not) by the array path gives what the
    row parser gives, in one process (shards of 1) and split; and most rows take that path."""
    rows = [_HEADER]
    for i, edge in enumerate(EDGES):
        rows += [f"e-{i},1780000000000,{edge},14.1,5,1", f"f-{i},1780000001000,46.1,{edge},,",
                 f"g-{i},1780000002000,46.1,14.1,{edge},{edge}",
                 f"h-{i},{edge.replace('.', '')},46.1,14.1,,"]
    rows += ["a b,1780000000000,46,14,,", "..,1780000000000,46,14,,",
             "iso,2026-06-01T10:00:00Z,46,14,,", "ms,1780000000000.5,46,14,,",
             "pad,0001780000000000,46,14,,", "late,99999999999999,46,14,,", *_rows(200)]
    path = tmp_path / "pings.csv"
    path.write_text("\n".join(rows) + "\n")
    made: list[int] = []
    ping = csv_blocks.Ping

    def counted(*args: Any) -> Any:
        made.append(1)
        return ping(*args)

    monkeypatch.setattr(csv_blocks, "Ping", counted)
    fast = [list(read_pings(path, shard=shard)) for shard in (None, (0, 2), (1, 2))]
    assert len(made) > 200
    monkeypatch.setattr(csv_blocks._Block, "of", lambda *args: None)
    slow = [list(read_pings(path, shard=shard)) for shard in (None, (0, 2), (1, 2))]
    assert fast == slow
    assert [repr(r) for _, r in fast[0]] == [repr(r) for _, r in slow[0]]  # -0.0 is not 0.0


_FIELDS = st.text(alphabet="ab-0123456789. é\r:", max_size=8)
_NUMBERS = st.text(alphabet="0123456789.-", min_size=1, max_size=9)
_LINES = st.lists(st.one_of(
    st.lists(_FIELDS, min_size=1, max_size=7).map(",".join),  # mostly not a ping
    st.sampled_from(_rows(40)),  # pings
    st.tuples(st.sampled_from(["d-1", "d-2", "d 3"]), st.sampled_from(["1780000000000", "17"]),
              _NUMBERS, _NUMBERS, st.one_of(st.just(""), _NUMBERS),
              st.one_of(st.just(""), _NUMBERS)).map(",".join),  # pings, or nearly
), max_size=12)


@settings(max_examples=300, deadline=None)
@given(_LINES, st.sampled_from(["\n", "\r\n"]), st.sampled_from([None, (0, 2), (1, 2)]),
       st.sampled_from([16, 64, 2**20]))
def test_any_file_without_quotes_reads_alike_by_blocks_and_line_by_line(
        tmp_path_factory: pytest.TempPathFactory, lines: list[str], end: str,
        shard: tuple[int, int] | None, block_bytes: int) -> None:
    """Whatever the lines (stray \r, bytes past ASCII, blank or short lines, odd numbers), the
    block reader gives what the line-by-line reader gives, at any block size."""
    path = tmp_path_factory.mktemp("blocks") / "pings.csv"
    path.write_bytes((end.join([_HEADER, *lines]) + end).encode())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(csv_blocks, "BLOCK_BYTES", block_bytes)
        fast = list(read_pings(path, shard=shard))
        patch.setattr(csv_blocks._Block, "of", lambda *args: None)
        slow = list(read_pings(path, shard=shard))
    assert [(n, repr(r)) for n, r in fast] == [(n, repr(r)) for n, r in slow]


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="-0123456789.e+_ ", max_size=20))
def test_a_plain_number_is_read_as_float_reads_it(text: str) -> None:
    data = np.frombuffer(text.encode(), dtype=np.uint8)
    value, readable = csv_blocks._decimals(data, np.array([0]), np.array([len(text)]))
    if readable[0]:
        assert repr(float(text)) == repr(float(value[0]))


def test_the_shard_of_a_device_is_the_same_worked_out_alone_or_for_a_whole_file() -> None:
    ids = [f"device-{i:06d}" for i in range(0, 100_000, 7)] + ["a", "", "x" * 128, "Z-9_.:@"]
    block = np.frombuffer(",".join(ids).encode(), dtype=np.uint8)
    lengths = np.array([len(i) for i in ids])
    starts = np.concatenate(([0], np.cumsum(lengths + 1)[:-1]))
    for shards in (2, 3, 8):
        assert csv_blocks._shards_of(block, starts, lengths, shards).tolist() == [
            shard_of(i, shards) for i in ids]


def test_a_big_csv_is_split_over_the_cpus_and_a_small_one_is_not(tmp_path: Path) -> None:
    small = tmp_path / "small.csv"
    small.write_text("device_id,ts,lat,lon\na,2026-06-01T10:00:00Z,46,14\n")
    big = tmp_path / "big.csv"
    big.write_text("device_id,ts,lat,lon\n")
    os.truncate(big, SPLIT_FROM_BYTES)
    ndjson = tmp_path / "big.ndjson"
    ndjson.write_text('{"device_id": "a"}\n')
    os.truncate(ndjson, SPLIT_FROM_BYTES)
    cpus = len(os.sched_getaffinity(0))
    assert jobs_for(small, None) == 1
    assert jobs_for(big, None) == min(cpus, 8)
    assert jobs_for(ndjson, None) == 1  # a line's device needs its JSON parse
    assert jobs_for(small, 3) == 3  # --jobs decides


@pytest.mark.parametrize("jobs", ["0", "-1", "two", "65", "١"])
def test_jobs_must_be_a_whole_number_of_processes(tmp_path: Path, jobs: str) -> None:
    done = subprocess.run([str(GEOPUSH), "replay", str(TRACE), "--jobs", jobs],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert f"--jobs: {jobs!r}: expected a whole number of processes from 1 to 64" in done.stderr


def test_a_shard_process_that_dies_is_said_not_hidden(tmp_path: Path) -> None:
    """A child killed (the OOM killer) before it sent its result: the parent says which and
    how it ended, and the command answers with one line, not a traceback or a partial
    result."""
    from geopush.cli.replay import Replay
    from geopush.cli.replay_shards import ShardFailed, replay_split
    from tests.test_replay import _engine

    class Dying(Replay):
        def run(self, records: Any) -> Any:
            os._exit(3)

    pings = tmp_path / "fleet.csv"
    _fleet(pings)
    with pytest.raises(ShardFailed, match="ended with exit code 3 before it sent its result"):
        replay_split(Dying(_engine(), assume_consent=True), pings, device_id=None, jobs=2)
