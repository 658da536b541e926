"""A replay split across processes by device, for the big files ops measure throughput on.

Devices are independent in a replay (each has its own clock, state, caps and history), so N
processes forked after the stores and rules are loaded each replay the devices whose id hashes
to their shard, reading the whole file but parsing only their own rows, and the parent merges
what they found into the one result a single process would have printed: the same counts and
the same lists, in the same order (replay.py sorts them by time, then device).

Only a CSV file is split: telling an NDJSON line's device needs the JSON parse the shard would
save. Malformed rows and rows without a device go to shard 0, so each is reported once.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import time
from collections.abc import Iterable
from contextlib import closing
from multiprocessing.connection import Connection
from pathlib import Path

from geopush.cli.ping_files import is_ndjson_file, read_pings
from geopush.cli.replay import Replay, ReplayResult, sort_result

# Under this size one process is faster: forking and merging cost more than the split saves
# (benchmarks/bench_replay_core.py: 57 MB of CSV, 1,000,000 pings).
SPLIT_FROM_BYTES = 16 * 2**20
MAX_JOBS = 8  # each reads the whole file: more readers than this only add reading


def jobs_for(path: Path, asked: int | None) -> int:
    """How many processes replay `path`: `--jobs` when given, else one per CPU this process
    may use for a big CSV file, else one."""
    if asked is not None:
        return asked
    try:
        big = path.stat().st_size >= SPLIT_FROM_BYTES
    except OSError:
        return 1  # read_pings says what is wrong with the file
    if not big or is_ndjson_file(path):
        return 1
    return max(1, min(MAX_JOBS, len(os.sched_getaffinity(0))))


def replay_split(replay: Replay, path: Path, *, device_id: str | None,
                 jobs: int) -> ReplayResult:
    """`replay` run on `path` by `jobs` forked processes, one shard of the devices each; the
    merged result. Raises what read_pings raises for the file as a whole, from this process."""
    started = time.perf_counter()
    # the header's errors (unknown column, no device column) are the parent's to raise
    with closing(read_pings(path, device_id=device_id, shard=(0, jobs))) as records:
        next(records, None)
    context = multiprocessing.get_context("fork")
    # the loaded stores and rules are shared with the children page by page until written:
    # a collection in a child would write to every page of them
    gc.freeze()
    children: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        for shard in range(jobs):
            receiving, sending = context.Pipe(duplex=False)
            process = context.Process(  # forked: the arguments are not pickled
                target=_run_shard, name=f"geopush-replay-{shard}",
                args=(sending, replay, path, device_id, (shard, jobs)))
            process.start()
            sending.close()
            children.append((process, receiving))
        results = [_received(child, receiving) for child, receiving in children]
    finally:
        gc.unfreeze()
        for child, receiving in children:
            receiving.close()
            if child.is_alive():
                child.terminate()
            child.join()
    merged = merge(results)
    merged.elapsed_s = time.perf_counter() - started
    return merged


def _run_shard(out: Connection, replay: Replay, path: Path, device_id: str | None,
               shard: tuple[int, int]) -> None:
    try:
        result: object = replay.run(read_pings(path, device_id=device_id, shard=shard))
    except BaseException as exc:  # the parent says what happened
        result = ShardFailed(f"{type(exc).__name__}: {exc}")
    out.send_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    out.close()


class ShardFailed(Exception):
    """A child process of a split replay failed (a bug: the file was checked first)."""


def _received(child: multiprocessing.process.BaseProcess,
              receiving: Connection) -> ReplayResult:
    try:
        result = pickle.loads(receiving.recv_bytes())
    except EOFError:
        child.join()
        raise ShardFailed(f"{child.name} ended with exit code {child.exitcode} "
                          "before it sent its result") from None
    if isinstance(result, ShardFailed):
        raise result
    assert isinstance(result, ReplayResult)
    return result


def merge(results: Iterable[ReplayResult]) -> ReplayResult:
    """The result one process would have given, from those of the shards (but its
    elapsed_s: the caller's wall time)."""
    merged = ReplayResult()
    for part in results:
        merged.pings += part.pings
        merged.rejected.update(part.rejected)
        merged.rejections += part.rejections
        merged.events += part.events
        merged.event_counts.update(part.event_counts)
        merged.visits += part.visits
        merged.visit_count += part.visit_count
        merged.decisions += part.decisions
        merged.explanations += part.explanations
        merged.explained = part.explained
        merged.outcomes.update(part.outcomes)
        merged.suppressed.update(part.suppressed)
    sort_result(merged)
    return merged

