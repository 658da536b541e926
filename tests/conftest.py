"""Shared fixtures. Redis tests use a real server: one database per test run, flushed.

With CI=true a test that needs Redis fails when Redis is missing; elsewhere it is skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
REDIS_HOST = os.environ.get("GEOPUSH_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("GEOPUSH_TEST_REDIS_PORT", "6379"))
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

    def __init__(self, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        self.workdir = workdir
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
             "--appendonly", "no", "--dir", str(self.workdir)],
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


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A PrivateRedis, stopped at the end; with CI=true a missing redis-server fails the test."""
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    server = PrivateRedis(tmp_path)
    try:
        yield server
    finally:
        server.stop()
