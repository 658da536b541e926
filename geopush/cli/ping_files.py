"""Reading a file of pings for `geopush replay`: CSV (`device_id,ts,lat,lon,accuracy_m,speed_mps`)
or NDJSON of ping objects, line by line, each line a Ping or what is wrong with it (a BadLine),
and, for a replay split across processes (geopush.cli.replay_shards), only one shard's devices.

A good CSV row takes a fast path that is only ever stricter than the API's parser; anything
else goes to that parser, which names the field, the value and what was expected.
"""

from __future__ import annotations

import csv
import io
import json
import math
import mmap
import re
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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
        rest = _lines_of_shard(path, header[0], rest, mine, shards, width, dev_at, device_id)
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


def _lines_of_shard(path: Path, header_line: int, lines: Iterable[tuple[int, str]], mine: int,
                    shards: int, width: int, dev_at: int | None, device_id: str | None
                    ) -> Iterator[tuple[int, str]]:
    """The lines of a file without quotes that shard `mine` reads: its devices', and, in
    shard 0, those that are not a record of `width` fields (blank or malformed). Told from the
    file's bytes a block at a time where it can be (`_lines_by_bytes`), else from `lines`,
    one by one. Nothing is read before the first line is asked for (the parent of a split
    replay reads the header only)."""
    if dev_at is not None and device_id is None:
        yield from _lines_by_bytes(path, header_line, mine, shards, width, dev_at)
        return
    yield from _lines_one_by_one(lines, mine, shards, width, dev_at, device_id)


def _lines_one_by_one(lines: Iterable[tuple[int, str]], mine: int, shards: int, width: int,
                      dev_at: int | None, device_id: str | None) -> Iterator[tuple[int, str]]:
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


_BLOCK_BYTES = 4 * 2**20  # read and told this much at a time (its arrays: a few times that)
# what str.strip() takes off an ASCII device id: a block with an id that begins or ends with
# one of these is told line by line, which strips it as the parse does
_ASCII_SPACE = np.array([chr(b).isspace() for b in range(128)] + [False] * 128)


def _lines_by_bytes(path: Path, header_line: int, mine: int, shards: int, width: int,
                    dev_at: int) -> Iterator[tuple[int, str]]:
    """`_lines_one_by_one` on the lines after the header, with the lines of the other shards
    left out by array operations on a block of bytes rather than a Python step a line: each
    of N processes reads the whole file, and most of its lines are not its own. A block
    holding what only the text reader reads exactly (bytes past ASCII, a carriage return not
    before a line feed, a device id with spaces at its ends or over 128 bytes), and all
    after it, go line by line: a device's shard is the same either way."""
    with path.open("rb") as f:
        for _ in range(header_line):  # as the text reader numbered them
            skipped = f.readline()
            if b"\r" in skipped.replace(b"\r\n", b""):
                f.seek(0)
                yield from _text_lines(f, 1, header_line, mine, shards, width, dev_at)
                return
        number = header_line + 1  # of the first line of the block
        carry = b""
        while True:
            offset = f.tell() - len(carry)
            chunk = f.read(_BLOCK_BYTES)
            block = carry + chunk if carry else chunk
            if not block:
                return
            carry = b""
            whole = True  # the block holds whole lines only (at the end of the file, it does)
            if chunk:  # the block ends at a line's end; the rest goes with the next one
                cut = block.rfind(b"\n") + 1
                if cut == 0 and len(block) < 4 * _BLOCK_BYTES:
                    carry = block
                    continue
                if cut:
                    block, carry = block[:cut], block[cut:]
                whole = cut > 0  # else a line of megabytes: not a file of pings
            picked = _picked(block, mine, shards, width, dev_at) if whole else None
            if picked is None:
                f.seek(offset)
                yield from _text_lines(f, number, 0, mine, shards, width, dev_at)
                return
            first, starts, ends, count = picked
            for line, begin, end in zip(first.tolist(), starts.tolist(), ends.tolist(),
                                        strict=True):
                yield number + line, block[begin:end].decode("ascii")
            number += count


def _text_lines(f: BinaryIO, number: int, skip: int, mine: int, shards: int, width: int,
                dev_at: int) -> Iterator[tuple[int, str]]:
    """From where `f` stands, line `number`: the text reader's lines, `skip` of them left
    out first (the header), then told one by one."""
    text = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")
    lines = enumerate(text, start=number)
    for _ in range(skip):
        next(lines, None)
    try:
        yield from _lines_one_by_one(lines, mine, shards, width, dev_at, None)
    finally:
        text.detach()  # the caller closes the file


def _picked(block: bytes, mine: int, shards: int, width: int, dev_at: int
            ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any],
                       int] | None:
    """(index of the line in the block, its first byte, the byte after its line feed) of
    each line of the block shard `mine` reads, and how many lines the block has; None when
    the block must be read line by line."""
    data = np.frombuffer(block, dtype=np.uint8)
    if (data >= 128).any():
        return None
    ends = np.flatnonzero(data == 10)
    returns = np.flatnonzero(data == 13)
    if len(returns) and (returns[-1] + 1 >= len(data) or (data[returns + 1] != 10).any()):
        return None  # a lone \r ends a line for the text reader
    if not len(ends) or ends[-1] != len(data) - 1:
        ends = np.append(ends, len(data))  # the file's last line, without a line feed
    starts = np.concatenate(([0], ends[:-1] + 1))
    commas = np.flatnonzero(data == 44)
    first_comma = np.searchsorted(commas, starts)
    records = np.searchsorted(commas, ends) - first_comma == width - 1
    where = first_comma[records] + dev_at  # the comma after the device id
    if dev_at < width - 1:
        field_end = commas[where]
    else:  # the last field ends at the line's end, or before a \r\n's \r
        field_end = ends[records]
        field_end = field_end - (data[np.maximum(field_end - 1, 0)] == 13)
    field_start = starts[records] if dev_at == 0 else commas[where - 1] + 1
    length = field_end - field_start
    if len(length) and length.max() > _WEIGHTED:
        return None
    filled = length > 0
    if (_ASCII_SPACE[data[field_start[filled]]].any()
            or _ASCII_SPACE[data[field_end[filled] - 1]].any()):
        return None
    mask = np.zeros(len(starts), dtype=bool)
    mask[records] = _shards_of(data, field_start, length, shards) == mine
    if mine == 0:  # blank or malformed lines, said once
        mask |= ~records
    return np.flatnonzero(mask), starts[mask], ends[mask] + 1, len(starts)


_ROWS = 2**14  # device ids hashed at a time: a matrix of at most _ROWS × 128 bytes (16 MB)


def _shards_of(block: np.ndarray[Any, Any], field_start: np.ndarray[Any, Any],
               length: np.ndarray[Any, Any], shards: int) -> np.ndarray[Any, Any]:
    """shard_of of each device id (`length` bytes from `field_start` in `block`), at once."""
    found = np.empty(len(field_start), dtype=np.int64)
    widest = int(length.max()) if len(length) else 0
    offsets = np.arange(widest)
    for lo in range(0, len(field_start), _ROWS):  # a bounded matrix of bytes at a time
        begin, count = field_start[lo:lo + _ROWS], length[lo:lo + _ROWS]
        inside = offsets < count[:, None]
        at = np.where(inside, begin[:, None] + offsets, 0)
        byte = np.where(inside, block[at], 0).astype(np.uint64)
        total = (byte * _WEIGHTS[:widest]).sum(axis=1, dtype=np.uint64)  # modulo 2**64
        found[lo:lo + _ROWS] = (total >> np.uint64(32)) % np.uint64(shards)
    return found


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
