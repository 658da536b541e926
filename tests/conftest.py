"""Shared fixtures. Redis tests use a real server: one database per test run, flushed
(TEST_REDIS_HOST, TEST_REDIS_PORT; default 127.0.0.1:6379).

With CI=true a test that needs Redis fails when Redis is missing; elsewhere it is skipped.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
# not GEOPUSH_*: every GEOPUSH_ variable must name a setting, or geopush refuses to start
REDIS_HOST = os.environ.get("TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("TEST_REDIS_PORT", "6379"))
_CLAIM_TTL_S = 3600


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def redis_db() -> Iterator[int]:
    """A Redis database number this test run owns (claimed in db 0, so parallel runs on one
    server never share a database), flushed before and after the run."""
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        message = f"Redis not reachable at {REDIS_HOST}:{REDIS_PORT}: {exc}"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    token = f"pid-{os.getpid()}"
    db = None
    for candidate in range(1, 16):
        if client.set(f"geopush-test-claim:{candidate}", token, nx=True, ex=_CLAIM_TTL_S):
            db = candidate
            break
    if db is None:
        pytest.fail("every Redis database 1-15 is claimed by another test run")
    owned = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    owned.flushdb()
    try:
        yield db
    finally:
        owned.flushdb()
        owned.close()
        if client.get(f"geopush-test-claim:{db}") == token.encode():
            client.delete(f"geopush-test-claim:{db}")
        client.close()


@pytest.fixture
def redis_url(redis_db: int) -> Iterator[str]:
    """URL of this run's database, flushed after each test."""
    import redis

    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}"
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=redis_db)
    client.flushdb()
    client.close()


class PrivateRedis:
    """A throwaway redis-server on its own free port that a test may stop and start (faults,
    recovery); nobody else uses it. Not started until the test says so."""

    def __init__(self, workdir: Path, *extra_args: str, cluster_bus: bool = False) -> None:
        self.port: int = _free_port(with_cluster_bus=cluster_bus)
        self.workdir = workdir
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/1"

    def start(self) -> None:
        import redis

        server = shutil.which("redis-server")
        assert server is not None
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 20
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    assert self.proc.poll() is None, "redis-server exited"
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def _free_port(*, with_cluster_bus: bool = False) -> int:
    """A free local port; with_cluster_bus, one whose cluster bus port (+10000) is free too,
    which Redis requires to be at most 65535."""
    if not with_cluster_bus:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            return port
    for port in random.sample(range(20000, 55000), 200):
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _need_redis_server() -> None:
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A PrivateRedis, stopped at the end; with CI=true a missing redis-server fails the test."""
    _need_redis_server()
    server = PrivateRedis(tmp_path)
    try:
        yield server
    finally:
        server.stop()


CLUSTER_SLOTS = 16384


class PrivateRedisCluster:
    """Three throwaway redis-server nodes formed into a Redis Cluster (slots split evenly, no
    replicas). A node stopped and started again keeps its nodes.conf, so it rejoins with its
    slots."""

    def __init__(self, workdirs: list[Path]) -> None:
        self.nodes = [PrivateRedis(d, "--cluster-enabled", "yes",
                                   "--cluster-config-file", str(d / "nodes.conf"),
                                   cluster_bus=True) for d in workdirs]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        import redis

        for node in self.nodes:
            node.start()
        clients = [redis.Redis(port=node.port) for node in self.nodes]
        share = CLUSTER_SLOTS // len(self.nodes)
        for n, client in enumerate(clients):
            last = CLUSTER_SLOTS - 1 if n == len(self.nodes) - 1 else (n + 1) * share - 1
            client.execute_command("CLUSTER ADDSLOTSRANGE", n * share, last)
            if n:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[n].port)
        self.wait_until_formed(clients)
        for client in clients:
            client.close()

    def wait_until_formed(self, clients: list[Any] | None = None, timeout_s: float = 30) -> None:
        import redis

        own = clients is None
        clients = clients or [redis.Redis(port=node.port) for node in self.nodes]

        def formed(client: redis.Redis) -> bool:
            info = client.execute_command("CLUSTER INFO")  # parsed into a dict by redis-py
            return bool(info["cluster_state"] == "ok"
                        and int(info["cluster_known_nodes"]) == len(self.nodes))

        deadline = time.monotonic() + timeout_s
        try:
            while not all(formed(c) for c in clients):
                assert time.monotonic() < deadline, "the test Redis Cluster did not form"
                time.sleep(0.1)
        finally:
            if own:
                for client in clients:
                    client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def private_redis_cluster(tmp_path: Path) -> Iterator[PrivateRedisCluster]:
    """A PrivateRedisCluster of this test alone (not started), stopped at the end."""
    _need_redis_server()
    cluster = PrivateRedisCluster([tmp_path / f"node-{n}" for n in range(3)])
    for node in cluster.nodes:
        node.workdir.mkdir()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[PrivateRedis]]:
    """A private three-node Redis Cluster shared by this test run; with CI=true a missing
    redis-server fails the tests that use it."""
    _need_redis_server()
    cluster = PrivateRedisCluster([tmp_path_factory.mktemp(f"cluster-node-{n}")
                                   for n in range(3)])
    try:
        cluster.start()
        yield cluster.nodes
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster_nodes: list[PrivateRedis]) -> Iterator[str]:
    """URL of one node of the private cluster, every node flushed after each test."""
    import redis

    yield f"redis://127.0.0.1:{redis_cluster_nodes[0].port}/0"
    for node in redis_cluster_nodes:
        client = redis.Redis(port=node.port)
        client.flushall()
        client.close()


@pytest.fixture(params=["redis", "redis-cluster"])
def shared_redis(request: pytest.FixtureRequest) -> dict[str, Any]:
    """`storage` settings for app instances sharing state: one Redis (this run's database),
    or the private three-node Redis Cluster."""
    if request.param == "redis":
        return {"backend": "redis", "redis_url": request.getfixturevalue("redis_url")}
    return {"backend": "redis", "redis_url": request.getfixturevalue("redis_cluster_url"),
            "redis_cluster": True}


# -- every state backend ------------------------------------------------------------------


def _store_settings(backend: str, tmp_path: Path, redis_url: str | None, *,
                    cluster: bool = False) -> Any:
    from geopush.config import Settings, StorageSettings

    storage = StorageSettings(backend=backend, snapshot_path=tmp_path / "state.json",
                              redis_cluster=cluster,
                              **({"redis_url": redis_url} if redis_url else {}))
    return Settings(storage=storage)


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """Every backend the state store contract holds for: memory, one Redis, a three-node Redis
    Cluster (opened; closed after the test)."""
    from geopush.state.factory import make_store

    if request.param == "memory":
        state = make_store(_store_settings("memory", tmp_path, None))
    elif request.param == "redis":
        state = make_store(_store_settings("redis", tmp_path,
                                           request.getfixturevalue("redis_url")))
    else:
        state = make_store(_store_settings("redis", tmp_path,
                                           request.getfixturevalue("redis_cluster_url"),
                                           cluster=True))
    await state.open()
    try:
        yield state
    finally:
        await state.close()
