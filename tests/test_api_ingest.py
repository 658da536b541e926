"""The Ingestor: concurrent requests grouped into one `track` call get exactly the answers they
would get alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

from geopush.devices import Consent, DeviceProfile
from geopush.engine import DeviceOutcome
from geopush.geo.stores import load_stores
from geopush.metrics import Metrics
from geopush.service.active import build_geofencing
from geopush.service.ingest import Ingestor
from geopush.state.base import Compute, StateUnavailable
from geopush.state.memory import MemoryStore
from tests.api_support import load_trace, ping, settings_for

NOW = 1_800_000_000.0


class _CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []
        self.fail = False

    async def track(self, device_ids: Collection[str], compute: Compute
                    ) -> dict[str, DeviceOutcome]:
        self.calls.append(list(device_ids))
        if self.fail:
            raise StateUnavailable("down")
        return await super().track(device_ids, compute)


async def _ingestor(tmp_path: Path, devices: list[str]) -> tuple[Ingestor, _CountingStore]:
    settings = settings_for(tmp_path)
    geo = build_geofencing(load_stores(settings.stores_file), settings)
    store = _CountingStore()
    for d in devices:
        await store.put_profile(DeviceProfile(device_id=d, consent=Consent(location=True)), None)
    return Ingestor(store, lambda: geo.engine, Metrics()), store


async def test_concurrent_requests_are_grouped_and_answered_as_if_alone(tmp_path: Path) -> None:
    devices = [f"d{i}" for i in range(20)]
    grouped, store = await _ingestor(tmp_path, devices)
    alone, _ = await _ingestor(tmp_path, devices)
    trace = load_trace()
    requests: list[list[dict[str, Any]]] = []
    for i, d in enumerate(devices):
        pings = [ping(d, p) for p in trace[290 + i:310 + i]]
        pings.insert(3, {"device_id": d, "lat": 95})  # a rejection at index 3 of each
        requests.append(pings)
    now = time.time()
    answers = await asyncio.gather(*(grouped.ingest(r, now) for r in requests))
    assert len(store.calls) == 1 and sorted(store.calls[0]) == sorted(devices)
    for request, answer in zip(requests, answers, strict=True):
        expected = await alone.ingest(request, now)
        assert answer.as_json() == expected.as_json()
        assert [r.index for r in answer.rejected] == [3]


async def test_requests_sharing_a_device_go_in_separate_groups_in_order(tmp_path: Path
                                                                         ) -> None:
    ingestor, store = await _ingestor(tmp_path, ["a", "b"])
    trace = load_trace()
    first = [ping("a", p) for p in trace[290:300]]
    second = [ping("a", p) for p in trace[300:400]] + [ping("b", trace[0])]
    now = time.time()
    one, two = await asyncio.gather(ingestor.ingest(first, now), ingestor.ingest(second, now))
    assert len(store.calls) == 2
    assert one.accepted == 10 and two.accepted == 101
    assert [e.type for e in one.events + two.events] == ["enter", "exit"]


async def test_a_failed_group_fails_every_request_in_it(tmp_path: Path) -> None:
    ingestor, store = await _ingestor(tmp_path, ["a", "b"])
    store.fail = True
    p = load_trace()[0]
    results = await asyncio.gather(ingestor.ingest([ping("a", p)], time.time()),
                                   ingestor.ingest([ping("b", p)], time.time()),
                                   return_exceptions=True)
    assert len(store.calls) == 1
    assert all(isinstance(r, StateUnavailable) for r in results)
    # and the next group works again
    store.fail = False
    assert (await ingestor.ingest([ping("a", p)], time.time())).accepted == 1


@pytest.mark.parametrize("first_fails", [False, True])
async def test_requests_arriving_while_a_group_is_in_the_store_form_one_next_group(
        tmp_path: Path, first_fails: bool) -> None:
    devices = [f"d{i}" for i in range(6)]
    ingestor, store = await _ingestor(tmp_path, devices)
    release = asyncio.Event()
    inner_track = store.track

    async def slow_track(device_ids: Collection[str], compute: Compute
                         ) -> dict[str, DeviceOutcome]:
        if len(store.calls) == 0:  # the first group waits in the "store"
            store.fail = first_fails
            store.calls.append(list(device_ids))
            await release.wait()
            store.fail = False
            if first_fails:
                raise StateUnavailable("down")
            return await MemoryStore.track(store, device_ids, compute)
        return await inner_track(device_ids, compute)

    store.track = slow_track  # type: ignore[method-assign]
    p = load_trace()[0]
    first = asyncio.ensure_future(ingestor.ingest([ping("d0", p)], time.time()))
    await asyncio.sleep(0.01)
    later = []
    for d in devices[1:]:  # one a loop iteration: each would have been a group of its own
        later.append(asyncio.ensure_future(ingestor.ingest([ping(d, p)], time.time())))
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert store.calls == [["d0"]]  # none started while the first is in the store
    release.set()
    answers = await asyncio.gather(*later)
    assert [a.accepted for a in answers] == [1] * 5
    assert len(store.calls) == 2 and sorted(store.calls[1]) == devices[1:]
    if first_fails:
        with pytest.raises(StateUnavailable):
            await first
    else:
        assert (await first).accepted == 1


async def test_while_the_store_fails_queued_groups_do_not_wait_for_each_other(
        tmp_path: Path) -> None:
    ingestor, store = await _ingestor(tmp_path, ["a", "b"])
    release = asyncio.Event()
    started: list[list[str]] = []

    async def hanging_track(device_ids: Collection[str], compute: Compute
                            ) -> dict[str, DeviceOutcome]:
        started.append(sorted(device_ids))
        await release.wait()  # a store that answers only after its timeout
        raise StateUnavailable("timed out")

    store.track = hanging_track  # type: ignore[method-assign]
    p = load_trace()[0]
    first = asyncio.ensure_future(ingestor.ingest([ping("b", p)], time.time()))
    await asyncio.sleep(0.01)
    # two groups queue behind it (they share device "a")
    queued = [asyncio.ensure_future(ingestor.ingest([ping("a", p)], time.time())),
              asyncio.ensure_future(ingestor.ingest([ping("a", p)], time.time()))]
    await asyncio.sleep(0.01)
    assert started == [["b"]]
    release.set()  # the first times out: the store is failing ...
    release = asyncio.Event()
    await asyncio.sleep(0.01)
    assert started == [["b"], ["a"], ["a"]]  # ... so both queued groups started at once
    release.set()
    for task in [first, *queued]:
        with pytest.raises(StateUnavailable):
            await task
