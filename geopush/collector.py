"""The cyclic garbage collector, tuned for a heap of long-lived objects: the device states of
`geopush serve`, the stores, states and histories a replay builds.

With CPython's defaults full collections walk that heap every few batches (benchmarks/README.md,
bench_core and bench_replay_core: a third of a replay's time). The young generation is
collected a hundred times less often; the few reference cycles are still found, and the peak
memory measured the same.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

THRESHOLDS = (100_000, 50, 100)
# A batch command (replay) has no request waiting on a pause, so its young generation is ten
# times larger again: a collection of it walks up to a million objects (~10 ms, too long a
# pause for serve's loop) ten times less often. bench_replay_core: the collector's share of a
# replay fell from ~10 % (as measured against no collector at all) to within the noise, and
# the peak memory stayed the same (420 MB): the replay loop makes no cycles to collect.
BATCH_THRESHOLDS = (1_000_000, 20, 100)


def tune_for_service() -> None:
    """What start-up loaded (stores, index, snapshot) is frozen out of collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


@contextmanager
def tuned_for_batch() -> Iterator[None]:
    """The thresholds for a batch command, as they were afterwards."""
    before = gc.get_threshold()
    gc.set_threshold(*BATCH_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)
