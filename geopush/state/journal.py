"""The memory backend's files: a snapshot, an append-only journal beside it, a lock.

Redis's AOF is the model. `<snapshot>` is the state at some point; `<snapshot>.journal.<gen>`
holds, one line each, what changed since: `<crc32 of the JSON, 8 hex> <JSON>\\n`. The snapshot
names the first journal generation it does not cover; older generations are deleted. A line is
always a whole record on its own, so a crash can only tear the last line of the newest journal:
it is cut off at start. A bad line followed by good ones is damage, not a torn write, and the
service refuses to start rather than drop what follows (it may hold erasures).

One thread writes: the event loop hands it encoded lines and never waits on the disk, except
for the writes it must not answer before they are on disk (consent changes, erasures), which
await a future the thread resolves after its fsync. Everything else is written and fsynced at
most `fsync_every` after it was handed over; lines handed over together are written with one
write() and one fsync() (group commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from geopush.errors import GeopushError
from geopush.logs import fields
from geopush.state.base import StateUnavailable

log = logging.getLogger("geopush.state.journal")

FLUSH_BYTES = 4 << 20  # handed-over lines that wake the writer before its timer runs out


class SnapshotError(GeopushError):
    """The memory backend's files cannot be used; the service refuses to start."""

    code = "snapshot_error"


class JournalFailed(StateUnavailable):
    """The journal cannot be written: nothing more is acknowledged until a restart."""


def frame(payload: bytes) -> bytes:
    """One journal line; orjson never writes a raw newline, so the payload has none."""
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


@dataclass(slots=True)
class Frames:
    payloads: list[bytes]
    good_end: int  # offset just past the last whole, intact line
    size: int


def read_frames(path: Path, *, tail_may_tear: bool) -> Frames:
    """The intact lines of `path`. A bad or cut-off last line is left out when the tail may
    tear (the newest journal); anywhere else, or with good lines after it, it is an error."""
    data = path.read_bytes()
    payloads: list[bytes] = []
    at = 0
    size = len(data)
    while at < size:
        end = data.find(b"\n", at)
        line = data[at:end] if end >= 0 else data[at:]
        payload = _check(line)
        if payload is None or end < 0:
            if tail_may_tear and not _any_good_line(data, end + 1 if end >= 0 else size):
                return Frames(payloads, at, size)
            raise SnapshotError(
                f"{path}: damaged record at byte {at} (line {len(payloads) + 1}) with intact "
                "records after it; refusing to drop them. Move the file away to start from "
                "the snapshot and the other journal files")
        payloads.append(payload)
        at = end + 1
    return Frames(payloads, at, size)


def _check(line: bytes) -> bytes | None:
    if len(line) < 10 or line[8:9] != b" ":
        return None
    try:
        crc = int(line[:8], 16)
    except ValueError:
        return None
    payload = line[9:]
    return payload if zlib.crc32(payload) == crc else None


def _any_good_line(data: bytes, at: int) -> bool:
    while at < len(data):
        end = data.find(b"\n", at)
        if end < 0:
            return False
        if _check(data[at:end]) is not None:
            return True
        at = end + 1
    return False


class StateFiles:
    """The snapshot's path and what lives beside it: journals, the lock, temporary files."""

    def __init__(self, snapshot: Path) -> None:
        self.snapshot = snapshot
        self.dir = snapshot.parent
        self.lock_path = snapshot.with_name(snapshot.name + ".lock")
        self._journal_re = re.compile(re.escape(snapshot.name) + r"\.journal\.([0-9]+)")
        self._lock_fd: int | None = None

    def journal(self, gen: int) -> Path:
        return self.snapshot.with_name(f"{self.snapshot.name}.journal.{gen}")

    def journal_gens(self) -> list[int]:
        gens = []
        for entry in self.dir.iterdir():
            match = self._journal_re.fullmatch(entry.name)
            if match:
                gens.append(int(match.group(1)))
        return sorted(gens)

    def temporary(self) -> Path:
        return self.snapshot.with_name(f".{self.snapshot.name}.{os.getpid()}.tmp")

    def lock(self) -> None:
        """Only one process may use these files: two would each write their own history."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SnapshotError(
                f"{self.snapshot}: in use by another geopush process (pid {holder}); the "
                "memory backend allows one process per storage.snapshot_path") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        # the lock file stays: deleting it would let two processes lock two different files
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove_temporaries(self) -> None:
        """Snapshots a crash left half-written: they may hold erased devices."""
        prefix = f".{self.snapshot.name}."
        for entry in self.dir.iterdir():
            if entry.name.startswith(prefix) and entry.name.endswith(".tmp"):
                entry.unlink(missing_ok=True)

    def sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(slots=True)
class _Rotate:
    gen: int
    done: asyncio.Future[None]


class JournalWriter:
    """Appends lines to the current journal file from one thread (see the module docstring)."""

    def __init__(self, files: StateFiles, gen: int, fsync_every: float,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.files = files
        self.gen = gen
        self._loop = loop
        # half the window: the other half is for the write and the fsync themselves
        self._delay = fsync_every / 2
        self._fd = os.open(files.journal(gen), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._cond = threading.Condition()
        self._pending: list[bytes | _Rotate] = []
        self._pending_bytes = 0
        self._pending_since: float | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._urgent = False
        self._closing = False
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="geopush-journal", daemon=True)
        self._thread.start()

    # -- the event loop's side ---------------------------------------------------------------

    def append(self, line: bytes) -> None:
        """Hand `line` over; on disk within fsync_every. Never blocks on the disk."""
        with self._cond:
            self._raise_if_failed()
            self._pending.append(line)
            self._pending_bytes += len(line)
            if self._pending_since is None:
                self._pending_since = time.monotonic()
                self._cond.notify()
            elif self._pending_bytes > FLUSH_BYTES:
                self._cond.notify()

    def append_durable(self, line: bytes) -> asyncio.Future[None]:
        """Hand `line` over; the future is done once it (and all before it) is fsynced."""
        done: asyncio.Future[None] = self._loop.create_future()
        with self._cond:
            self._raise_if_failed()
            if line:
                self._pending.append(line)
                self._pending_bytes += len(line)
            self._waiters.append(done)
            self._urgent = True
            self._cond.notify()
        return done

    async def rotate(self) -> int:
        """Lines handed over from now on go to a new generation; returns its number once the
        old file is fsynced and closed."""
        done: asyncio.Future[None] = self._loop.create_future()
        with self._cond:
            self._raise_if_failed()
            self.gen += 1
            gen = self.gen
            self._pending.append(_Rotate(gen, done))
            self._urgent = True
            self._cond.notify()
        await done
        return gen

    async def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)
        os.close(self._fd)

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise JournalFailed(f"the state journal cannot be written ({self.error}); "
                                "restart geopush once the disk is writable")

    # -- the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._urgent or self._closing):
                    if self._pending_since is None:
                        self._cond.wait()
                        continue
                    left = self._pending_since + self._delay - time.monotonic()
                    if left <= 0 or self._pending_bytes > FLUSH_BYTES:
                        break
                    self._cond.wait(left)
                items, self._pending = self._pending, []
                waiters, self._waiters = self._waiters, []
                self._pending_bytes, self._pending_since, self._urgent = 0, None, False
                closing = self._closing
            try:
                self._write(items)
            except OSError as exc:
                log.error("journal_write_failed", extra=fields(reason=str(exc)))
                with self._cond:
                    self.error = exc
                    waiters += self._waiters
                    self._waiters = []
                    waiters += [item.done for item in self._pending if isinstance(item, _Rotate)]
                    waiters += [item.done for item in items if isinstance(item, _Rotate)]
                self._resolve(waiters, exc)
                return
            self._resolve(waiters + [i.done for i in items if isinstance(i, _Rotate)], None)
            if closing:
                return

    def _write(self, items: list[bytes | _Rotate]) -> None:
        chunk: list[bytes] = []
        for item in items:
            if isinstance(item, bytes):
                chunk.append(item)
                continue
            self._write_all(b"".join(chunk))
            chunk = []
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = os.open(self.files.journal(item.gen),
                               os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self.files.sync_dir()
        if chunk:
            self._write_all(b"".join(chunk))
        if items:
            os.fsync(self._fd)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _resolve(self, futures: list[asyncio.Future[None]], exc: OSError | None) -> None:
        if not futures:
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            self._loop.call_soon_threadsafe(_settle, futures, exc)


def _settle(futures: list[asyncio.Future[None]], exc: OSError | None) -> None:
    for future in futures:
        if future.done():
            continue
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(JournalFailed(f"the state journal cannot be written ({exc})"))
