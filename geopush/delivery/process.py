"""The delivery worker in a process of its own, beside `geopush serve` (delivery.process).

One event loop cannot both answer pings within milliseconds and send a thousand pushes a
second through Redis: each push costs the loop about a millisecond of Redis and HTTP client
work, and pings wait behind it (benchmarks/bench_delivery.py on Redis: single-ping p99 of two
seconds while the pushes of a burst of decisions go out). With Redis every instance already
shares the outbox, so the worker needs nothing of the serving process but to be woken: it runs
in a child process, on the machine's other cores, and the serving loop only decides.

- The child is spawned (not forked: the parent runs an event loop and threads), builds its own
  state store, sender and metrics from the same settings, and runs DeliveryWorker until told
  to stop.
- A pipe carries one byte per wake-up (a decision queued pushes here, a test push): the
  parent writes without blocking and drops a byte when the pipe is full (the child has wake-ups
  enough). A shutdown closes it: the child stops claiming, finishes its attempts in flight and
  ends. A crash of the serving process (SIGKILL, the OOM killer) kills the child at once, as a
  crash of the instance would (Linux's parent-death signal; elsewhere it stops on the pipe's
  end): what it was sending stays `sending` and is sent again after the lease.
- Every second the child writes its metrics to a file the parent adds to its own /metrics
  (geopush.metrics), so ops scrape one endpoint.
- A child that dies is started again (after 1 s, doubling to 30 s while it keeps dying) and
  the death is logged with its exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

from geopush.config import Settings
from geopush.logs import fields
from geopush.metrics import Metrics

log = logging.getLogger("geopush.delivery.process")

WAKE = b"w"
METRICS_EVERY_S = 1.0
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
STARTED_FOR_S = 60.0  # a child that lived this long was well: the next restart waits 1 s again
JOIN_POLL_S = 0.05


def separate_delivery(settings: Settings) -> bool:
    """Whether `geopush serve` sends from a child process (delivery.process)."""
    process = settings.delivery.process
    return process == "separate" or (process == "auto" and settings.storage.backend == "redis")


class DeliveryProcess:
    """The serving process's side: the child's supervisor, with the worker's `wake`, `run`
    and `stop`."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._folder = Path(tempfile.mkdtemp(prefix="geopush-delivery-"))  # 0700
        self.metrics_file = self._folder / "metrics.prom"
        self._wake_fd: int | None = None
        self._stopping = False
        self._stop: asyncio.Event | None = None

    def wake(self) -> None:
        fd = self._wake_fd
        if fd is None:
            return
        # never blocks the loop: a full pipe holds wake-ups enough
        with contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
            os.write(fd, WAKE)

    def stop(self) -> None:
        self._stopping = True
        if self._stop is not None:
            self._stop.set()

    async def run(self) -> None:
        """Start the child, start it again when it dies, until `stop`; then close its pipe
        (it stops sending, finishes its attempts in flight) and wait for it."""
        self._stop = asyncio.Event()
        if self._stopping:
            self._stop.set()
        backoff = RESTART_FIRST_S
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                process, wake_fd = self._start()
                self._wake_fd = wake_fd
                try:
                    exitcode = await self._wait(process)
                finally:
                    self._wake_fd = None
                    os.close(wake_fd)  # the child's cue to stop
                if exitcode is None:  # stopping: the child finishes what it has in flight
                    await self._join(process, self._settings.delivery.timeout + 5.0)
                    return
                log.error("delivery_process_died", extra=fields(
                    exitcode=exitcode, restart_in_s=backoff,
                    message="the delivery process ended; it is started again (pushes it was "
                            "sending are sent again after delivery.send_lease)"))
                if time.monotonic() - started >= STARTED_FOR_S:
                    backoff = RESTART_FIRST_S
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(backoff * 2, RESTART_MAX_S)
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)

    def _start(self) -> tuple[multiprocessing.process.BaseProcess, int]:
        context = multiprocessing.get_context("spawn")
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        reading = Connection(wake_read)  # sent to the child as a file descriptor
        process = context.Process(target=run_child, name="geopush-delivery",
                                  args=(self._settings, reading, str(self.metrics_file),
                                        os.getpid()),
                                  daemon=False)
        process.start()
        reading.close()
        log.info("delivery_process_started", extra=fields(pid=process.pid))
        return process, wake_write

    async def _wait(self, process: multiprocessing.process.BaseProcess) -> int | None:
        """The child's exit code when it ends, None when asked to stop first."""
        assert self._stop is not None
        while process.is_alive():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), JOIN_POLL_S * 10)
                return None
        process.join()
        return process.exitcode

    async def _join(self, process: multiprocessing.process.BaseProcess, within_s: float) -> None:
        deadline = time.monotonic() + within_s
        while process.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(JOIN_POLL_S)
        if process.is_alive():
            log.warning("delivery_process_stop_timeout", extra=fields(pid=process.pid))
            process.kill()
        process.join()


# -- the child ---------------------------------------------------------------------------------


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def run_child(settings: Settings, wake: Connection, metrics_file: str, parent: int) -> None:
    """The child's main: the delivery worker until the wake pipe ends."""
    from geopush.logs import configure_logging

    _die_with(parent)
    configure_logging(settings.logging)
    # the serving process decides when to stop (closing the pipe); a Ctrl-C in a terminal
    # reaches the whole process group, and the parent's shutdown comes first
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_child(settings, wake, Path(metrics_file)))


def _die_with(parent: int) -> None:
    """SIGKILL when the serving process ends: an orphan would go on sending pushes that
    its instance, restarted, sends again."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the pipe's end stops it
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the signal was asked for
        os._exit(0)


async def _child(settings: Settings, wake: Connection, metrics_file: Path) -> None:
    from geopush.delivery.counts import ReportCounts
    from geopush.delivery.senders.build import build_sender
    from geopush.delivery.worker import DeliveryWorker
    from geopush.state.base import StateUnavailable
    from geopush.state.factory import make_store

    delivery = settings.delivery
    store = make_store(settings)
    try:
        await store.open()
    except StateUnavailable as exc:  # the worker retries: it logs each failed round
        log.warning("state_store_unreachable_at_start", extra=fields(reason=str(exc)))
    metrics = Metrics()
    sender = build_sender(delivery, timeout_s=delivery.timeout,
                          pool_limit=min(delivery.max_in_flight, 1000))
    worker = DeliveryWorker(store, lambda: sender, metrics,
                            ReportCounts(settings.logging.delivery_report_every),
                            lambda: settings.policy, max_in_flight=delivery.max_in_flight,
                            lease_s=delivery.send_lease)
    loop = asyncio.get_running_loop()
    fd = wake.fileno()
    os.set_blocking(fd, False)

    def woken() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        if data:
            worker.wake()
        else:  # the serving process closed the pipe, or ended
            loop.remove_reader(fd)
            worker.stop()

    loop.add_reader(fd, woken)
    task = asyncio.create_task(worker.run(), name="geopush-delivery")
    writing = asyncio.create_task(_write_metrics(metrics, metrics_file))
    try:
        await task
    finally:
        writing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writing
        _write_metrics_once(metrics, metrics_file)
        await sender.close()
        await store.close()
        wake.close()


async def _write_metrics(metrics: Metrics, path: Path) -> None:
    while True:
        _write_metrics_once(metrics, path)
        await asyncio.sleep(METRICS_EVERY_S)


def _write_metrics_once(metrics: Metrics, path: Path) -> None:
    partial = path.with_suffix(".partial")
    try:
        partial.write_bytes(metrics.render())
        os.replace(partial, path)  # the parent reads a whole file, the old or the new
    except OSError as exc:  # the parent's folder went away: it is stopping
        log.debug("delivery_metrics_not_written", extra=fields(reason=str(exc)))
