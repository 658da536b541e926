"""Reading a file of pings for `geopush replay`: CSV (`device_id,ts,lat,lon,accuracy_m,speed_mps`)
or NDJSON of ping objects, line by line, each line a Ping or what is wrong with it (a BadLine),
and, for a replay split across processes (geopush.cli.replay_shards), only one shard's devices.

A good CSV row takes a fast path that is only ever stricter than the API's parser; anything
else goes to that parser, which names the field, the value and what was expected.
"""

from __future__ import annotations

import csv
import json
import math
import mmap
import re
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
        handle = path.open(encoding="utf-8", errors="replace", newline="")
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
        with path.open(encoding="utf-8", errors="replace", newline="") as handle:
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


def shard_of(device_id: str, shards: int) -> int:
    """The shard of a split replay (geopush.cli.replay_shards) that replays a device: the same
    in every process (str's hash() is not). A weighted sum of the id's UTF-8 bytes, so that
    `_shard_by_bytes` can work it out for a whole file's lines at once."""
    weights = _WEIGHTS
    total = 0
    for j, byte in enumerate(device_id.encode("utf-8", "surrogatepass")):
        total += byte * int(weights[j % _WEIGHTED])
    return ((total & _MASK64) >> 32) % shards


def _splitmix64(n: int) -> int:
    z = (n * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


_MASK64 = 2**64 - 1
_WEIGHTED = 128  # byte positions with weights of their own; longer ids reuse them
_WEIGHTS = np.array([_splitmix64(j) for j in range(_WEIGHTED)], dtype=np.uint64)


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
    width = len(columns)
    at = {name: columns.index(name) if name in columns else None for name in CSV_COLUMNS}
    dev_at, ts_at, lat_at, lon_at = at["device_id"], at["ts"], at["lat"], at["lon"]
    acc_at, speed_at = at["accuracy_m"], at["speed_mps"]
    assert ts_at is not None and lat_at is not None and lon_at is not None
    mine, shards = shard if shard is not None else (0, 1)
    line = [header[0]]  # the number of the last line the reader took
    if shards > 1 and not _has_quotes(path):
        # every line is one record: the other shards' lines are left out before the CSV
        # parse, told by the device alone (a line with another field count goes to shard 0)
        fast = (_shard_by_bytes(path, header[0], mine, shards, width, dev_at)
                if dev_at is not None and device_id is None else None)
        rest = fast if fast is not None else _lines_of_shard(rest, mine, shards, width, dev_at,
                                                             device_id)
        shards = 1  # what is left is this shard's
    # one reader over the whole file: a reader per line costs more than the ping itself
    reader = csv.reader(_numbered(rest, line))
    good_devices: set[str] = set()  # those that passed DEVICE_ID: most devices ping again
    for row in reader:
        number = line[0]
        if len(row) != width:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            if mine == 0:
                yield number, BadLine(number, f"{len(row)} fields: expected {width} "
                                      f"({','.join(columns)})")
            continue
        dev = (row[dev_at].strip() if dev_at is not None else "") or device_id
        if shards > 1 and shard_of(dev or "", shards) != mine:  # a file with quotes
            continue
        ts = row[ts_at].strip()
        accuracy = row[acc_at].strip() if acc_at is not None else ""
        speed = row[speed_at].strip() if speed_at is not None else ""
        ping = None
        if dev is not None and (dev in good_devices or DEVICE_ID.match(dev)):
            good_devices.add(dev)
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


def _lines_of_shard(lines: Iterable[tuple[int, str]], mine: int, shards: int, width: int,
                    dev_at: int | None, device_id: str | None) -> Iterator[tuple[int, str]]:
    """The lines of a file without quotes that shard `mine` reads: its devices', and, in
    shard 0, those that are not a record of `width` fields (blank or malformed)."""
    commas = width - 1
    shard_of_device: dict[str, int] = {}  # a device pings again and again
    for number, text in lines:
        if text.count(",") != commas:
            if mine == 0:
                yield number, text
            continue
        dev = (text.split(",", dev_at + 1)[dev_at].strip() if dev_at is not None else "") \
            or device_id or ""
        shard = shard_of_device.get(dev)
        if shard is None:
            shard = shard_of_device[dev] = shard_of(dev, shards)
        if shard == mine:
            yield number, text


_BLOCK_BYTES = 8 * 2**20  # the file is looked at this much at a time (memory ~20× that)
# what str.strip() takes off an ASCII device id: a field that begins or ends with one of these
# is left to _lines_of_shard, which strips it as the parse does
_ASCII_SPACE = np.array([chr(b).isspace() for b in range(128)] + [False] * 128)


def _shard_by_bytes(path: Path, header_line: int, mine: int, shards: int, width: int,
                    dev_at: int) -> Iterator[tuple[int, str]] | None:
    """`_lines_of_shard` for a file of ASCII lines without quotes, with the lines of every
    other shard left out by array operations on the file's bytes rather than one Python step
    a line: each of N processes reads the whole file, and most of its lines are not its own
    (bench_replay_core: ~a tenth of a shard's time). None when the file holds what only the
    line-by-line path tells exactly (bytes past ASCII, a carriage return not before a line
    feed, a device id with spaces at its ends or over 128 bytes)."""
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            body = 0
            for _ in range(header_line):  # the lines up to the header's, as the text reader
                body = data.find(b"\n", body) + 1
                if body == 0:
                    return iter(())  # nothing after the header
            picked = _picked_lines(np.frombuffer(data, dtype=np.uint8), body, mine, shards,
                                   width, dev_at)
    except (OSError, ValueError):  # not a regular file, or empty
        return None
    if picked is None:
        return None
    return _cut(path, header_line, *picked)


def _picked_lines(data: np.ndarray[Any, Any], body: int, mine: int, shards: int, width: int,
                  dev_at: int
                  ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any],
                             np.ndarray[Any, Any]] | None:
    """(line index after the header, start byte, end byte) of the lines shard `mine` reads."""
    picked: list[tuple[np.ndarray[Any, Any], ...]] = []
    first_line = 0
    start = body
    size = len(data)
    while start < size:
        stop = min(size, start + _BLOCK_BYTES)
        if stop < size:  # end the block at a line's end
            newline = np.flatnonzero(data[stop:min(size, stop + 2**16)] == 10)
            stop = stop + int(newline[0]) + 1 if len(newline) else size
            if not len(newline) and stop - start > 4 * _BLOCK_BYTES:
                return None  # a line of megabytes: not a file of pings
        block = data[start:stop]
        if (block >= 128).any():
            return None
        ends = np.flatnonzero(block == 10)
        returns = np.flatnonzero(block == 13)
        if len(returns) and (returns[-1] + 1 >= len(block)
                             or (block[returns + 1] != 10).any()):
            return None  # a lone \r ends a line for the text reader
        if not len(ends) or ends[-1] != len(block) - 1:
            ends = np.append(ends, len(block))  # the last line, without a line feed
        starts = np.concatenate(([0], ends[:-1] + 1))
        commas = np.flatnonzero(block == 44)
        first_comma = np.searchsorted(commas, starts)
        records = np.searchsorted(commas, ends) - first_comma == width - 1
        lines = np.arange(first_line, first_line + len(starts))
        where = first_comma[records] + dev_at  # the comma after the device id
        field_end = (commas[np.minimum(where, len(commas) - 1)] if dev_at < width - 1
                     else ends[records])
        if dev_at == width - 1:  # the last field ends before a \r\n's \r
            field_end = field_end - (block[np.maximum(field_end - 1, 0)] == 13)
        field_start = starts[records] if dev_at == 0 else commas[where - 1] + 1
        length = field_end - field_start
        if len(length) and length.max() > _WEIGHTED:
            return None
        filled = length > 0
        if (_ASCII_SPACE[block[field_start[filled]]].any()
                or _ASCII_SPACE[block[field_end[filled] - 1]].any()):
            return None
        mask = np.zeros(len(starts), dtype=bool)
        mask[records] = _shards_of(block, field_start, length, shards) == mine
        if mine == 0:  # blank or malformed lines, said once
            mask |= ~records
        picked.append((lines[mask], starts[mask] + start, ends[mask] + start))
        first_line += len(starts)
        start = stop
    if not picked:
        return np.array([], dtype=np.int64), np.array([], dtype=np.int64), \
            np.array([], dtype=np.int64)
    return (np.concatenate([p[0] for p in picked]), np.concatenate([p[1] for p in picked]),
            np.concatenate([p[2] for p in picked]))


def _shards_of(block: np.ndarray[Any, Any], field_start: np.ndarray[Any, Any],
               length: np.ndarray[Any, Any], shards: int) -> np.ndarray[Any, Any]:
    """shard_of of each device id (`length` bytes from `field_start` in `block`), at once."""
    found = np.empty(len(field_start), dtype=np.int64)
    widest = int(length.max()) if len(length) else 0
    offsets = np.arange(widest)
    for lo in range(0, len(field_start), 2**16):  # a bounded matrix of bytes at a time
        begin, count = field_start[lo:lo + 2**16], length[lo:lo + 2**16]
        inside = offsets < count[:, None]
        at = np.where(inside, begin[:, None] + offsets, 0)
        byte = np.where(inside, block[at], 0).astype(np.uint64)
        total = (byte * _WEIGHTS[:widest]).sum(axis=1, dtype=np.uint64)  # modulo 2**64
        found[lo:lo + 2**16] = (total >> np.uint64(32)) % np.uint64(shards)
    return found


def _cut(path: Path, header_line: int, lines: np.ndarray[Any, Any],
         starts: np.ndarray[Any, Any], ends: np.ndarray[Any, Any]
         ) -> Iterator[tuple[int, str]]:
    """(line number, text) of the picked lines, each with its line feed as the text reader
    gives it."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        first = header_line + 1
        for line, begin, end in zip(lines.tolist(), starts.tolist(), ends.tolist(),
                                    strict=True):
            yield first + line, data[begin:end + 1].decode("ascii")


def _has_quotes(path: Path) -> bool:
    """Whether the file holds a double quote anywhere (then a record may span lines)."""
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(b'"') >= 0
    except (OSError, ValueError):  # not a regular file, or empty: say it may have some
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
