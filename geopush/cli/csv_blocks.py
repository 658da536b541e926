"""Reading a CSV of pings a block of bytes at a time, with array operations instead of a Python
step for each line: which lines are a shard's (a replay split across processes), and the numbers
of the usual row parsed all at once.

Only for what these operations read exactly as the line-by-line reader does (ping_files): a
file without quotes (a line is a record) whose lines are ASCII. A block holding anything else (a
byte past ASCII, a carriage return not before a line feed, a device id with spaces at its ends or
over 128 bytes), and every line after it, goes line by line; a row whose fields are not the
plain numbers below goes to the row parser. So the result is the same either way, and
tests/test_replay_shards.py holds it so.

A plain number is an optional minus, then digits with at most one point: numpy's conversion
of such text to a double is correctly rounded, as float() is, so the values are float()'s.
Anything else (exponents, signs, spaces, underscores, inf, nan) is the row parser's.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from geopush.geo.model import Ping
from geopush.timeutil import END_EPOCH_MS, MIN_EPOCH_MS

Array = np.ndarray[Any, Any]


class RowParser(Protocol):
    """ping_files' parser of CSV rows, for what the array operations do not read."""

    good_devices: set[str]  # ids known to be well formed

    def __call__(self, lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, Any]]:
        """Numbered text lines (this shard's) → their records, blank lines skipped."""

    def device_is_good(self, device: str) -> bool:
        """Whether an id is well formed (added to good_devices if so)."""

BLOCK_BYTES = 4 * 2**20  # read and told this much at a time (its arrays: a few times that)
_ROWS = 2**14  # device ids hashed at a time: a matrix of at most _ROWS × 128 bytes
# what str.strip() takes off an ASCII device id: a block with an id that begins or ends with
# one of these is read line by line, which strips it as the parse does
_ASCII_SPACE = np.array([chr(b).isspace() for b in range(128)] + [False] * 128)


# -- shards -----------------------------------------------------------------------------------


def shard_of(device_id: str, shards: int) -> int:
    """The shard of a split replay (geopush.cli.replay_shards) that replays a device: the same
    in every process (str's hash() is not). A weighted sum of the id's UTF-8 bytes, so that a
    whole block's ids can be worked out at once (`_shards_of`)."""
    total = 0
    for j, byte in enumerate(device_id.encode("utf-8", "surrogatepass")):
        total += byte * _WEIGHT_OF[j % _WEIGHTED]
    return ((total & _MASK64) >> 32) % shards


def _splitmix64(n: int) -> int:
    z = (n * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


_MASK64 = 2**64 - 1
_WEIGHTED = 128  # byte positions with weights of their own; longer ids reuse them
_WEIGHT_OF = [_splitmix64(j) for j in range(_WEIGHTED)]
_WEIGHTS = np.array(_WEIGHT_OF, dtype=np.uint64)


def lines_one_by_one(lines: Iterable[tuple[int, str]], mine: int, shards: int, width: int,
                     dev_at: int | None, device_id: str | None) -> Iterator[tuple[int, str]]:
    """The lines of a file without quotes that shard `mine` reads: its devices', and, in shard
    0, those that are not a record of `width` fields (blank or malformed), each said once."""
    commas = width - 1
    shard_of_device: dict[str, int] = {}  # a device pings again and again
    limit = csv.field_size_limit()
    for number, text in lines:
        if text.count(",") != commas or (len(text) > limit and _too_long(text, limit)):
            if mine == 0:  # malformed: said once
                yield number, text
            continue
        dev = (text.split(",", dev_at + 1)[dev_at].strip() if dev_at is not None else "") \
            or device_id or ""
        shard = shard_of_device.get(dev)
        if shard is None:
            shard = shard_of_device[dev] = shard_of(dev, shards)
        if shard == mine:
            yield number, text


def _too_long(text: str, limit: int) -> bool:
    """Whether csv refuses the line (a field over its size limit): no device can be told."""
    return max(len(field) for field in text.split(",")) > limit


# -- blocks -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where each column is (None: the file has no such column)."""

    width: int
    dev_at: int
    ts_at: int
    lat_at: int
    lon_at: int
    acc_at: int | None
    speed_at: int | None


def read_blocks(path: Path, header_line: int, layout: Layout, mine: int, shards: int,
                rows: RowParser) -> Iterator[tuple[int, Any]]:
    """(line number, Ping or what `rows` makes of the line) for each line of shard `mine` of
    `shards` after the header, in file order."""
    with path.open("rb") as f:
        for _ in range(header_line):  # as the text reader numbered them
            skipped = f.readline()
            if b"\r" in skipped.replace(b"\r\n", b""):
                f.seek(0)
                yield from _line_by_line(f, 1, header_line, layout, mine, shards, rows)
                return
        number = header_line + 1  # of the block's first line
        carry = b""
        while True:
            offset = f.tell() - len(carry)
            chunk = f.read(BLOCK_BYTES)
            data = carry + chunk if carry else chunk
            if not data:
                return
            carry = b""
            whole = True  # the block holds whole lines (at the end of the file, it does)
            if chunk:  # the block ends at a line's end; the rest goes with the next one
                cut = data.rfind(b"\n") + 1
                if cut == 0 and len(data) < 4 * BLOCK_BYTES:
                    carry = data
                    continue
                if cut:
                    data, carry = data[:cut], data[cut:]
                whole = cut > 0  # else a line of megabytes: not a file of pings
            block = _Block.of(data, layout, mine, shards) if whole else None
            if block is None:
                f.seek(offset)
                yield from _line_by_line(f, number, 0, layout, mine, shards, rows)
                return
            yield from block.records(number, layout, rows)
            number += block.lines


def _line_by_line(f: BinaryIO, number: int, skip: int, layout: Layout, mine: int, shards: int,
                  rows: RowParser) -> Iterator[tuple[int, Any]]:
    """From where `f` stands, line `number` on: the text reader's lines, `skip` of them left
    out first (the header), told and parsed one by one."""
    text = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")
    lines: Iterable[tuple[int, str]] = enumerate(text, start=number)
    for _ in range(skip):
        next(lines, None)  # type: ignore[call-overload]
    if shards > 1:
        lines = lines_one_by_one(lines, mine, shards, layout.width, layout.dev_at, None)
    try:
        yield from rows(lines)
    finally:
        text.detach()  # the caller closes the file


class _Block:
    """Whole lines of ASCII bytes, told and parsed at once."""

    def __init__(self, data: bytes, array: Array, starts: Array, ends: Array, commas: Array,
                 first_comma: Array, mine: Array, full: Array) -> None:
        self.data = data
        self.array = array
        self.starts = starts  # of each line
        self.ends = ends  # of each line: its line feed, or the end of the data
        self.commas = commas
        self.first_comma = first_comma  # of each line: the index of its first comma in commas
        self.mine = mine  # of each line: this shard reads it
        self.full = full  # of each line: it has the header's number of fields
        self.lines = len(starts)

    @classmethod
    def of(cls, data: bytes, layout: Layout, mine: int, shards: int) -> _Block | None:
        """None when the block must be read line by line."""
        array = np.frombuffer(data, dtype=np.uint8)
        if (array >= 128).any() or (array == 0).any():  # a NUL: `_decimals` pads with them
            return None
        ends = np.flatnonzero(array == 10)
        returns = np.flatnonzero(array == 13)
        if len(returns) and (returns[-1] + 1 >= len(array)
                             or (array[returns + 1] != 10).any()):
            return None  # a lone \r ends a line for the text reader
        if not len(ends) or ends[-1] != len(array) - 1:
            ends = np.append(ends, len(array))  # the file's last line, without a line feed
        starts = np.concatenate(([0], ends[:-1] + 1))
        if (ends - starts).max() > csv.field_size_limit():
            return None  # a field may be over csv's limit: the line-by-line path tells
        commas = np.flatnonzero(array == 44)
        first_comma = np.searchsorted(commas, starts)
        full = np.searchsorted(commas, ends) - first_comma == layout.width - 1
        block = cls(data, array, starts, ends, commas, first_comma,
                    np.ones(len(starts), dtype=bool), full)
        start, end = block.field(layout.dev_at, layout.width, full)
        length = end - start
        if len(length) and length.max() > _WEIGHTED:
            return None
        filled = length > 0
        if _ASCII_SPACE[array[start[filled]]].any() or _ASCII_SPACE[array[end[filled] - 1]].any():
            return None
        if shards > 1:
            block.mine[full] = _shards_of(array, start, length, shards) == mine
            if mine != 0:  # blank or malformed lines are shard 0's, said once
                block.mine[~full] = False
        return block

    def field(self, k: int, width: int, lines: Array) -> tuple[Array, Array]:
        """First byte and end of field k of the given records (a mask or indexes)."""
        first = self.first_comma[lines]
        if k < width - 1:
            end = self.commas[first + k]
        else:  # the last field ends at the line's end, or before a \r\n's \r
            end = self.ends[lines]
            end = end - (self.array[np.maximum(end - 1, 0)] == 13)
        start = self.starts[lines] if k == 0 else self.commas[first + k - 1] + 1
        return start, end

    def records(self, number: int, layout: Layout, rows: RowParser
                ) -> Iterator[tuple[int, Any]]:
        """This shard's lines of the block, in order: a Ping for each plain row, the rest as
        the row parser reads them."""
        picked = np.flatnonzero(self.mine)
        plain = picked[self.full[picked]]
        width = layout.width
        ts, ok = _decimals(self.array, *self.field(layout.ts_at, width, plain), whole=True)
        ok &= (ts >= MIN_EPOCH_MS) & (ts < END_EPOCH_MS)
        lat, good = _decimals(self.array, *self.field(layout.lat_at, width, plain))
        ok &= good & (lat >= -90.0) & (lat <= 90.0)
        lon, good = _decimals(self.array, *self.field(layout.lon_at, width, plain))
        ok &= good & (lon >= -180.0) & (lon <= 180.0)
        optional = []
        for at in (layout.acc_at, layout.speed_at):
            if at is None:
                optional.append(np.full(len(plain), np.nan))
                continue
            start, end = self.field(at, width, plain)
            value, good = _decimals(self.array, start, end)
            empty = start == end
            ok &= (good & (value >= 0.0)) | empty
            optional.append(np.where(empty, np.nan, value))
        dev_start, dev_end = self.field(layout.dev_at, width, plain)
        text = self.data.decode("ascii")
        starts, ends = self.starts, self.ends
        known, device_ok = rows.good_devices, rows.device_is_good
        rows_of = zip(plain[ok].tolist(), dev_start[ok].tolist(), dev_end[ok].tolist(),
                      (ts[ok] / 1000.0).tolist(), lat[ok].tolist(), lon[ok].tolist(),
                      optional[0][ok].tolist(), optional[1][ok].tolist(), strict=True)
        if len(plain) == len(picked) and ok.all():  # the usual block: every line a plain row
            for line, dev_from, dev_to, t, y, x, acc, speed in rows_of:
                dev = text[dev_from:dev_to]
                if dev in known or device_ok(dev):
                    # NaN (a missing optional field) is the one value not equal to itself
                    yield number + line, Ping(dev, t, y, x, None if acc != acc else acc,
                                              None if speed != speed else speed)
                else:  # the row parser says what is wrong with the id
                    yield from rows([(number + line, text[starts[line]:ends[line] + 1])])
            return
        fast: dict[int, Ping] = {}
        for line, dev_from, dev_to, t, y, x, acc, speed in rows_of:
            dev = text[dev_from:dev_to]
            if dev in known or device_ok(dev):
                fast[line] = Ping(dev, t, y, x, None if acc != acc else acc,
                                  None if speed != speed else speed)
        others = [(number + i, text[starts[i]:ends[i] + 1])
                  for i in picked.tolist() if i not in fast]
        parsed = iter(rows(others))
        upcoming = next(parsed, None)
        for i in picked.tolist():
            ping = fast.get(i)
            if ping is not None:
                yield number + i, ping
                continue
            # the row parser's records, in order (it skips blank lines)
            while upcoming is not None and upcoming[0] == number + i:
                yield upcoming
                upcoming = next(parsed, None)


def _shards_of(block: Array, field_start: Array, length: Array, shards: int) -> Array:
    """shard_of of each device id (`length` bytes from `field_start` in `block`), at once."""
    found = np.empty(len(field_start), dtype=np.int64)
    widest = int(length.max()) if len(length) else 0
    if widest == 0:  # every id empty: its shard is 0
        found[:] = 0
        return found
    offsets = np.arange(widest)
    windows = np.lib.stride_tricks.sliding_window_view(
        np.concatenate((block, np.zeros(widest, dtype=np.uint8))), widest)
    for lo in range(0, len(field_start), _ROWS):  # a bounded matrix of bytes at a time
        begin, count = field_start[lo:lo + _ROWS], length[lo:lo + _ROWS]
        byte = windows[begin]  # a copy
        byte[offsets >= count[:, None]] = 0
        total = (byte * _WEIGHTS[:widest]).sum(axis=1, dtype=np.uint64)  # modulo 2**64
        found[lo:lo + _ROWS] = (total >> np.uint64(32)) % np.uint64(shards)
    return found


def _decimals(block: Array, start: Array, end: Array, *, whole: bool = False
              ) -> tuple[Array, Array]:
    """(value, readable) of each field: `readable` for a plain number (an optional minus,
    digits with at most one point; `whole`: digits only), and then `value` is float() of its
    text: numpy's conversion of text to a double is correctly rounded, as float() is."""
    length = end - start
    n = len(start)
    widest = int(min(length.max(), _PLAIN_WIDTH)) if n else 0
    if widest == 0:  # no rows, or only empty fields
        return np.zeros(n), np.zeros(n, dtype=bool)
    padded = np.concatenate((block, np.zeros(widest, dtype=np.uint8)))
    byte = np.lib.stride_tricks.sliding_window_view(padded, widest)[start]  # a copy
    byte[np.arange(widest) >= length[:, None]] = 0  # zeros past the field (a block has no NUL)
    # one sum a field counts its digits, points, minuses and other bytes (5 bits each: a
    # field is at most 24 bytes)
    score = _SCORE[byte].sum(axis=1, dtype=np.int32)
    digits, points, minuses = score & 31, (score >> 5) & 31, (score >> 10) & 31
    readable = (length > 0) & (length <= widest) & (score >> 15 == 0) & (digits >= 1)
    if whole:
        readable &= (points == 0) & (minuses == 0)
    else:
        readable &= (points <= 1) & ((minuses == 0) | ((minuses == 1) & (byte[:, 0] == 45)))
    byte[~readable, 0] = ord("0")  # numpy refuses empty text: a zero for the unreadable
    byte[~readable, 1:] = 0
    value = byte.view(f"S{widest}").ravel().astype(np.float64)
    return value, readable


_PLAIN_WIDTH = 24  # longer fields are the row parser's
_SCORE = np.full(256, 1 << 15, dtype=np.int32)  # any other byte
_SCORE[0] = 0  # past the field's end
_SCORE[ord("0"):ord("9") + 1] = 1
_SCORE[ord(".")] = 1 << 5
_SCORE[ord("-")] = 1 << 10
