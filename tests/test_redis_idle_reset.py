"""A pooled Redis connection the server closed while it sat idle (a Redis restart, its `timeout`,
a proxy dropping idle connections) must be replaced, not written into: on CPython 3.12 (and
3.13.0–3.13.9, 3.14.0) a write into it raises TypeError / AttributeError from asyncio instead of
ConnectionError (redis/redis-py#4287), which no layer of geopush or redis-py would handle. redis-py
8.1 checks a connection as it leaves the pool, so today the next call goes out on a new
connection; this pins that down, on a single Redis and on a cluster, with 3.12's transport
behaviour reproduced on 3.11 (`writelines` into a lost connection raises as 3.12's does)."""

from __future__ import annotations

import asyncio
from asyncio import selector_events
from typing import Any

import pytest
import redis

from geopush.geo.model import Ping
from geopush.state.redis import RedisStore
from tests.test_state_redis import ENGINE, SHOPS, T0, _profile


def _as_on_python_3_12(monkeypatch: pytest.MonkeyPatch) -> None:
    original = selector_events._SelectorSocketTransport.writelines

    def writelines(self: Any, data: Any) -> None:
        if self._conn_lost:  # 3.12 lacks this guard, and _write_ready is None by now
            raise TypeError("'NoneType' object is not callable")
        original(self, data)

    monkeypatch.setattr(selector_events._SelectorSocketTransport, "writelines", writelines)


async def _drop_idle_connections(ports: list[int]) -> None:
    for port in ports:
        admin = redis.Redis(port=port)
        try:
            admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        finally:
            admin.close()
    await asyncio.sleep(0.1)  # the event loop sees the resets


@pytest.mark.parametrize("call", ["read", "commit"])
@pytest.mark.parametrize("backend", ["redis", "redis-cluster"])
async def test_a_connection_reset_while_idle_is_replaced_not_written_into(
        request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, call: str,
        backend: str) -> None:
    if backend == "redis":
        url = request.getfixturevalue("redis_url")
        ports = [int(url.rsplit(":", 1)[1].split("/")[0])]
    else:
        url = request.getfixturevalue("redis_cluster_url")
        ports = [node.port for node in request.getfixturevalue("redis_cluster_nodes")]
    _as_on_python_3_12(monkeypatch)
    store = RedisStore(url, socket_timeout_s=2.0, cluster=backend == "redis-cluster")
    await store.open()
    try:
        await store.put_profile(_profile("phone-1"), None)
        await _drop_idle_connections(ports)
        if call == "read":
            assert (await store.get_profile("phone-1")) is not None
        else:
            lat, lon = SHOPS[0]

            def compute(snapshots: Any) -> Any:
                return ENGINE.ingest([Ping("phone-1", T0, lat, lon)], dict(snapshots))

            outcomes = await store.track(["phone-1"], compute)
            assert [e.type for e in outcomes["phone-1"].events] == ["enter"]
    finally:
        await store.close()
