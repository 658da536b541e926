"""Reading a file of pings for `geopush replay`: CSV (`device_id,ts,lat,lon,accuracy_m,speed_mps`)
or NDJSON of ping objects, line by line, each line a Ping or what is wrong with it (a BadLine),
and, for a replay split across processes (geopush.cli.replay_shards), only one shard's devices.

A good CSV row takes a fast path that is only ever stricter than the API's parser; anything
else goes to that parser, which names the field, the value and what was expected. A shard of a
split replay reads a CSV without quotes a block of bytes at a time (geopush.cli.csv_blocks),
which gives the same.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geopush.cli.csv_blocks import Layout, lines_one_by_one, read_blocks, shard_of
from geopush.errors import InvalidInput, Problem
from geopush.geo.model import Ping
from geopush.pings import DEVICE_ID, PingError, parse_ping
from geopush.timeutil import END_EPOCH_MS, MIN_EPOCH_MS, parse_ts

CSV_COLUMNS = ("device_id", "ts", "lat", "lon", "accuracy_m", "speed_mps")
_COLUMN_ALIASES = {"ts_iso": "ts"}  # the trace CSVs of shared/data
_EPOCH_MS = re.compile(r"^\d+(?:\.\d+)?$")


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line of the pings file that is not a valid ping: rejected `invalid`, the rest goes on."""

    line: int
    message: str


def read_pings(path: Path, *, device_id: str | None = None, shard: tuple[int, int] | None = None
               ) -> Generator[tuple[int, Ping | BadLine], None, None]:
    """(line number, ping or what is wrong with the line) for each record of a CSV or NDJSON
    file. Raises InvalidInput when the file as a whole cannot be read (no header, unknown
    column, no device id).

    `shard` (k, n): only the records of devices in shard k of n (replay_shards.shard_of), and
    the malformed lines that name no device if k is 0."""
    try:
        # bytes that are not UTF-8 become U+FFFD: their lines are reported `invalid` one by
        # one, as any malformed line is, and the rest is replayed
        # a byte order mark (Excel's "CSV UTF-8") is not part of the header
        handle = path.open(encoding="utf-8-sig", errors="replace", newline="")
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read pings file: {exc.strerror}") from None
    with handle:
        lines = enumerate(handle, start=1)
        first = _first_content(lines)
        if first is None:
            return
        if _is_ndjson(path, first[1]):
            records = _ndjson([first], lines, device_id)
            yield from records if shard is None else _only(shard, records)
        else:
            yield from _csv(path, first, lines, device_id, shard)


def is_ndjson_file(path: Path) -> bool:
    """Whether read_pings reads `path` as NDJSON (False when it cannot be read)."""
    try:
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
            first = _first_content(enumerate(handle, start=1))
    except OSError:
        return False
    return first is not None and _is_ndjson(path, first[1])


def _only(shard: tuple[int, int], records: Iterable[tuple[int, Ping | BadLine]]
          ) -> Iterator[tuple[int, Ping | BadLine]]:
    mine, shards = shard
    for number, record in records:
        if isinstance(record, BadLine):
            if mine == 0:
                yield number, record
        elif shard_of(record.device_id, shards) == mine:
            yield number, record


def _first_content(lines: Iterator[tuple[int, str]]) -> tuple[int, str] | None:
    for number, text in lines:
        if text.strip():
            return number, text
    return None


def _is_ndjson(path: Path, first: str) -> bool:
    return path.suffix.lower() in (".ndjson", ".jsonl") or first.lstrip().startswith("{")


def _ndjson(
    head: list[tuple[int, str]], rest: Iterable[tuple[int, str]], device_id: str | None
) -> Iterator[tuple[int, Ping | BadLine]]:
    for lines in (head, rest):
        for number, text in lines:
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, BadLine(number, f"not valid JSON: {exc.msg} (column {exc.colno}); "
                                      "expected one ping object per line")
                continue
            yield number, _ping(number, obj, device_id)


def _csv(
    path: Path, header: tuple[int, str], rest: Iterable[tuple[int, str]], device_id: str | None,
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[int, Ping | BadLine]]:
    columns = [c.strip().lower() for c in next(csv.reader([header[1]]))]
    columns = [_COLUMN_ALIASES.get(c, c) for c in columns]
    expected = "a header naming the columns device_id,ts,lat,lon,accuracy_m,speed_mps"
    unknown = [c for c in columns if c not in CSV_COLUMNS]
    if unknown:
        raise InvalidInput(
            f"{path}:{header[0]}: unknown column {unknown[0]!r}; expected {expected} "
            "(ts_iso is accepted for ts)",
            [Problem(f"{path}:{header[0]}", f"unknown column {unknown[0]!r}", field="header",
                     value=unknown[0], expected=expected)],
        )
    missing = [c for c in ("ts", "lat", "lon") if c not in columns]
    if missing:
        raise InvalidInput(f"{path}:{header[0]}: header has no {missing[0]!r} column; "
                           f"expected {expected}")
    if len(set(columns)) != len(columns):
        raise InvalidInput(f"{path}:{header[0]}: a column is named twice in {header[1].strip()!r}")
    if "device_id" not in columns and device_id is None:
        raise NoDeviceColumn(f"{path}: the CSV has no device_id column; give --device ID")
    mine, shards = shard if shard is not None else (0, 1)
    rows = _RowParser(columns, device_id, mine)
    width, at = rows.width, rows.at
    dev_at, ts_at, lat_at, lon_at = at["device_id"], at["ts"], at["lat"], at["lon"]
    assert ts_at is not None and lat_at is not None and lon_at is not None
    if shards > 1 and not _has_quotes(path):  # every line is one record
        if dev_at is not None and device_id is None:
            # a block of bytes at a time, the other shards' lines left out and the usual rows
            # parsed with array operations (csv_blocks). One process reads as fast line by
            # line: the array work pays where most lines are another's.
            layout = Layout(width, dev_at, ts_at, lat_at, lon_at, at["accuracy_m"],
                            at["speed_mps"])
            yield from read_blocks(path, header[0], layout, mine, shards, rows)
            return
        # the other shards' lines are left out before the CSV parse
        rest = lines_one_by_one(rest, mine, shards, width, dev_at, device_id)
        shards = 1  # what is left is this shard's
    yield from rows(rest, split=(mine, shards) if shards > 1 else None)


class _RowParser:
    """The CSV rows of numbered lines → (line number, Ping or BadLine), blank lines skipped:
    the fast path for a good row, else the full parser, which names what is wrong."""

    def __init__(self, columns: list[str], device_id: str | None, mine: int) -> None:
        self.columns = columns
        self.width = len(columns)
        at = {name: columns.index(name) if name in columns else None for name in CSV_COLUMNS}
        self.at = at
        self.device_id = device_id  # --device: for rows without one
        self.mine = mine  # malformed rows are said by shard 0 only
        self.good_devices: set[str] = set()  # those that passed DEVICE_ID: they ping again

    def device_is_good(self, device: str) -> bool:
        if device in self.good_devices:
            return True
        if DEVICE_ID.match(device):
            self.good_devices.add(device)
            return True
        return False

    def __call__(self, lines: Iterable[tuple[int, str]], split: tuple[int, int] | None = None
                 ) -> Iterator[tuple[int, Ping | BadLine]]:
        """`split` (k, n): only the rows of shard k's devices (a file with quotes)."""
        at, width, device_id = self.at, self.width, self.device_id
        dev_at, ts_at, lat_at, lon_at = at["device_id"], at["ts"], at["lat"], at["lon"]
        acc_at, speed_at = at["accuracy_m"], at["speed_mps"]
        assert ts_at is not None and lat_at is not None and lon_at is not None
        line = [0]  # the number of the last line the reader took
        # one reader over all the lines: a reader per line costs more than the ping itself
        reader = csv.reader(_numbered(lines, line))
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # a field over csv's size limit: the reader goes on after
                if self.mine == 0:  # a line a shard cannot tell the device of (csv_blocks)
                    yield line[0], BadLine(line[0], f"not a CSV record: {exc}")
                continue
            number = line[0]
            if len(row) != width:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line
                if self.mine == 0:
                    yield number, BadLine(number, f"{len(row)} fields: expected {width} "
                                          f"({','.join(self.columns)})")
                continue
            dev = (row[dev_at].strip() if dev_at is not None else "") or device_id
            if split is not None and shard_of(dev or "", split[1]) != split[0]:
                continue
            ts = row[ts_at].strip()
            accuracy = row[acc_at].strip() if acc_at is not None else ""
            speed = row[speed_at].strip() if speed_at is not None else ""
            ping = None
            if dev is not None and self.device_is_good(dev):
                ping = _well_formed(dev, ts, row[lat_at], row[lon_at], accuracy, speed)
            if ping is not None:
                yield number, ping
                continue
            # something is off: the full parser says what, naming the field and the value
            obj: dict[str, Any] = {"ts": _number(ts) if _EPOCH_MS.match(ts) else ts,
                                   "lat": _number(row[lat_at]), "lon": _number(row[lon_at])}
            if dev_at is not None and row[dev_at].strip():
                obj["device_id"] = row[dev_at].strip()
            if accuracy:
                obj["accuracy_m"] = _number(accuracy)
            if speed:
                obj["speed_mps"] = _number(speed)
            yield number, _ping(number, obj, device_id)


def _well_formed(device: str, ts: str, lat_text: str, lon_text: str, accuracy_text: str,
                 speed_text: str) -> Ping | None:
    """The fast path for a good CSV row of a well-formed device id: the Ping parse_ping would
    give, or None to let parse_ping explain the problem. Only ever stricter than parse_ping,
    never looser."""
    try:
        lat = float(lat_text)
        lon = float(lon_text)
        accuracy = float(accuracy_text) if accuracy_text else None
        speed = float(speed_text) if speed_text else None
        if ts.isdigit():  # epoch milliseconds, the usual case: parse_ts's test, inline
            ms = float(ts)
            if not MIN_EPOCH_MS <= ms < END_EPOCH_MS:
                return None
            epoch = ms / 1000.0
        else:
            epoch = parse_ts(float(ts) if _EPOCH_MS.match(ts) else ts, naive_is_utc=True)
    except ValueError:
        return None
    # comparisons with NaN are false, so NaN falls through to parse_ping too
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        return None
    if accuracy is not None and not 0.0 <= accuracy < math.inf:
        return None
    if speed is not None and not 0.0 <= speed < math.inf:
        return None
    return Ping(device, epoch, lat, lon, accuracy, speed)


def _numbered(lines: Iterable[tuple[int, str]], last: list[int]) -> Iterator[str]:
    """The lines' text, keeping in `last` the number of the latest one given (a quoted field
    may span lines: a record's number is that of its last line, as csv's line_num counts)."""
    for number, text in lines:
        last[0] = number
        yield text


def _has_quotes(path: Path) -> bool:
    """Whether the file holds a double quote anywhere (then a record may span lines). Read, not
    mapped: a file cut short while mapped would kill the process (SIGBUS)."""
    try:
        if not path.is_file():
            return True  # a pipe or a device: say it may have some
        with path.open("rb") as f:
            while chunk := f.read(2**20):
                if b'"' in chunk:
                    return True
            return False
    except OSError:
        return True


class NoDeviceColumn(InvalidInput):
    """A CSV without device_id and no --device: a usage error."""


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text.strip()  # parse_ping names the field and what was expected


def _ping(number: int, obj: Any, device_id: str | None) -> Ping | BadLine:
    try:
        return parse_ping(obj, now=None, naive_is_utc=True, device_id=device_id)
    except PingError as exc:
        return BadLine(number, exc.message)
