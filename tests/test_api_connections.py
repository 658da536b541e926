"""Slow and numerous clients (contract §12): header and body read timeouts, a keep-alive of
seconds, a connection cap with one log line, WebSockets spared by the timeouts. Real sockets
against the real app on a loopback port, with timeouts of a fraction of a second; the last test
runs `geopush serve` with 256 file descriptors, as in the finding that prompted all this."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import resource
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from geopush.api.connections import (
    BACKLOG,
    FD_HEADROOM,
    LOG_EVERY_S,
    HttpServer,
    accept_backlog,
    connection_cap,
)
from geopush.app import create_app
from tests.api_support import INGEST, INGEST_KEY, free_port, load_trace, ping, settings_for
from tests.test_app_lifecycle import GEOPUSH, _env

LOOPBACK = "127.0.0.1"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: geopush\r\n\r\n"


@asynccontextmanager
async def _serving(tmp_path: Path, **server: Any) -> AsyncIterator[tuple[HttpServer, int]]:
    http = HttpServer(create_app(settings_for(tmp_path, server=server)), LOOPBACK, 0)
    await http.start()
    try:
        yield http, http.addresses[0][1]
    finally:
        await http.stop()


def _split(answer: bytes) -> tuple[str, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.decode("latin-1"), json.loads(body)


async def _status(port: int, within_s: float = 3.0) -> int | str:
    """GET /healthz on a new connection: the status, or how the connection ended without one."""
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
    except OSError as exc:
        return f"connect failed: {exc}"
    try:
        writer.write(HEALTHZ)
        line = await asyncio.wait_for(reader.readline(), within_s)
    except ConnectionResetError:
        return "reset"
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()
    return int(line.split()[1]) if line else "closed"


async def _until(condition: Callable[[], Any], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not await condition():
        assert time.monotonic() < deadline, f"not within {within_s} s"
        await asyncio.sleep(0.05)


async def test_a_slowloris_client_is_closed_within_the_header_timeout_while_others_are_served(
        tmp_path: Path) -> None:
    async with _serving(tmp_path, header_timeout="0.5s") as (_, port):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        started = time.monotonic()

        async def dribble() -> None:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: geopush\r\nX-Slow: " + b"z" * 200:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.05)

        dribbling = asyncio.create_task(dribble())
        closed = asyncio.create_task(reader.read())  # to EOF
        served = 0
        while not closed.done():
            assert time.monotonic() - started < 5, "the slow client is still connected"
            assert await _status(port) == 200
            served += 1
            await asyncio.sleep(0.05)
        held_s = time.monotonic() - started
        dribbling.cancel()
        writer.close()
    assert 0.45 <= held_s < 2.0
    assert served >= 3
    head, body = _split(closed.result())
    assert head.startswith("HTTP/1.1 408") and "Connection: close" in head
    assert body["error"]["code"] == "timeout" and "server.header_timeout" in body["error"]["message"]


async def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(
        tmp_path: Path) -> None:
    async with _serving(tmp_path, keepalive_timeout="0.5s") as (_, port):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        for _ in range(3):  # reused within the timeout: served on the same connection
            writer.write(HEALTHZ)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
            assert head.startswith(b"HTTP/1.1 200")
            length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
            assert length is not None
            await reader.readexactly(int(length[1]))
            idle_from = time.monotonic()
            await asyncio.sleep(0.3)
        rest = await asyncio.wait_for(reader.read(), 3)
        idle_s = time.monotonic() - idle_from
        writer.close()
    assert rest == b""
    assert 0.45 <= idle_s < 1.5  # asyncio may fire a timer a tick early


async def test_a_stalled_body_is_answered_408_in_the_error_envelope_and_closed(
        tmp_path: Path) -> None:
    async with _serving(tmp_path, body_timeout="0.5s") as (_, port):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"POST /v1/pings HTTP/1.1\r\nHost: geopush\r\n"
                     b"Authorization: Bearer " + INGEST_KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     b'{"pings": [')
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.read(), 5)  # the answer, then EOF
        waited_s = time.monotonic() - started
        writer.close()
        async with aiohttp.ClientSession() as session:
            metrics = await (await session.get(f"http://{LOOPBACK}:{port}/metrics")).text()
    assert 0.45 <= waited_s < 2.0
    head, body = _split(answer)
    assert head.startswith("HTTP/1.1 408") and "Connection: close" in head
    assert body["error"]["code"] == "timeout" and "server.body_timeout" in body["error"]["message"]
    assert 'geopush_http_slow_clients_total{phase="body"} 1.0' in metrics


async def test_above_the_cap_connections_are_refused_at_once_with_one_log_line_and_served_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="geopush.http")
    async with _serving(tmp_path, max_connections=4, header_timeout="30s") as (server, port):
        holders = [await asyncio.open_connection(LOOPBACK, port) for _ in range(4)]

        async def all_held() -> bool:
            return server.guard.open == 4

        await _until(all_held)
        started = time.monotonic()
        refused = await asyncio.gather(*(_status(port) for _ in range(40)))
        refused_in_s = time.monotonic() - started
        for _, writer in holders:
            writer.close()

        async def served() -> bool:
            return await _status(port) == 200

        await _until(served)
        assert await _status(port) == 200
    assert set(refused) <= {503, "reset"} and 503 in refused, refused
    assert refused_in_s < 3.0
    lines = [r for r in caplog.records if r.name == "geopush.http"]
    events = [r.getMessage() for r in lines]
    assert events == ["connection_limit_reached", "connection_limit_cleared"]
    logged = [vars(r)["geopush_fields"] for r in lines]
    assert logged[0]["limit"] == 4 and logged[0]["open"] == 4
    # together the lines count every refusal (and the polls refused before the holders left)
    assert logged[0]["refused"] + logged[1]["refused"] == server.guard.refused >= 40


async def test_a_websocket_outlives_the_header_and_keepalive_timeouts_and_counts_to_the_cap(
        tmp_path: Path) -> None:
    async with _serving(tmp_path, header_timeout="0.3s", keepalive_timeout="0.3s",
                        max_connections=2) as (_, port), aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"http://{LOOPBACK}:{port}/v1/stream", headers=INGEST)
        await asyncio.sleep(1.2)  # four times either timeout, not a byte sent
        await ws.send_json(ping("phone-1", load_trace()[0]))
        answer = await ws.receive_json(timeout=5)
        assert answer["seq"] == 1  # rejected no_consent: the device is unknown; answered all the same
        other = await session.ws_connect(f"http://{LOOPBACK}:{port}/v1/stream", headers=INGEST)
        assert await _status(port) in (503, "reset")
        await other.close()

        async def served() -> bool:
            return await _status(port) == 200

        await _until(served)
        assert not ws.closed
        await ws.close()


async def test_failed_accepts_are_logged_once_a_while_not_once_each(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    loop = asyncio.get_running_loop()
    async with _serving(tmp_path) as _:
        for _ in range(1000):  # what asyncio reports when accept() meets EMFILE
            loop.call_exception_handler({
                "message": "socket.accept() out of system resource",
                "exception": OSError(errno.EMFILE, "Too many open files")})
    lines = [r for r in caplog.records if "accept" in r.getMessage()]
    assert [r.getMessage() for r in lines] == ["accept_failed"]
    assert vars(lines[0])["geopush_fields"]["error"] == "EMFILE"


MALFORMED = [
    # a header line without a colon, carrying what looks like a device token
    b"GET /v1/clients/osmand?id=victim-1&key=gpd1.victim-1.n0nce.m4c HTTP/1.1\r\nHost: x\r\n"
    b"Authorization Bearer gpd1.victim-1.n0nce.m4c\r\n\r\n",
    b"GET /v1/devices/victim-2 HTTP/1.1\r\nHost: x\r\nContent-Length: victim-2\r\n\r\n",
    b"POST /v1/pings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nvictim-3\r\n",
    b"\x16\x03\x01\x02\x00 not HTTP at all\r\n\r\n",
]


async def test_requests_the_parser_refuses_are_one_quiet_line_each_without_their_bytes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A client's malformed request is its mistake: a 400, a debug line and a metric, never an
    error-level traceback per request (anyone could flood the log) nor the refused bytes (a
    header may hold a token)."""
    caplog.set_level(logging.DEBUG)
    async with _serving(tmp_path) as (http, port):
        for raw in MALFORMED:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(raw)
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.split(b" ", 2)[1] == b"400", answer[:80]
        assert await _status(port) == 200
        metrics = http.guard._metrics
        assert metrics is not None
        assert metrics.bad_requests._value.get() == len(MALFORMED)
    logged = [r for r in caplog.records if r.name.startswith("aiohttp")
              or "refused" in r.getMessage()]
    assert [r.getMessage() for r in logged] == ["request_refused"] * len(MALFORMED), [
        (r.name, r.levelname, r.getMessage()) for r in logged]
    assert all(r.levelno == logging.DEBUG and not r.exc_info for r in logged)
    text = caplog.text + "".join(str(vars(r)) for r in caplog.records)
    assert "victim" not in text and "n0nce" not in text


@pytest.mark.parametrize(("configured", "open_files", "cap"), [
    (10_000, 1_048_576, 10_000),  # a container's usual limit: the setting holds
    (10_000, 8_192, 8_192 - 64 - 3 * BACKLOG),  # three passes of refused sockets in flight
    (10_000, 1_024, 1_024 - FD_HEADROOM),
    (10_000, 256, 128),  # few descriptors: half of them for connections
    (50, 256, 50),
    (10_000, 1, 1),
    (10_000, resource.RLIM_INFINITY, 10_000),
])
def test_the_connection_cap_stays_below_the_open_files_limit(
        configured: int, open_files: int, cap: int) -> None:
    assert connection_cap(configured, open_files) == cap
    if open_files != resource.RLIM_INFINITY and open_files > 64:
        # what the process holds at worst: its connections, three passes of refused ones
        # and its own descriptors
        assert cap + 3 * accept_backlog(open_files) + 64 <= open_files


@pytest.mark.parametrize(("open_files", "backlog"), [
    (1_048_576, BACKLOG), (8_192, BACKLOG), (1_024, 32), (256, 8), (16, 8),
    (resource.RLIM_INFINITY, BACKLOG)])
def test_the_backlog_shrinks_with_few_descriptors(open_files: int, backlog: int) -> None:
    assert accept_backlog(open_files) == backlog


# -- the real process with 256 file descriptors ------------------------------------------------


def _limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


async def _open_slow(port: int) -> asyncio.StreamWriter | None:
    with suppress(OSError, asyncio.TimeoutError):
        _, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 5)
        writer.write(b"G")
        return writer
    return None


@pytest.mark.parametrize("stalled", [False, True], ids=["steady", "stalled"])
async def test_serve_with_256_descriptors_refuses_300_slow_clients_and_logs_one_line(
        tmp_path: Path, stalled: bool) -> None:
    """`stalled`: the process is stopped (SIGSTOP, as a busy machine deschedules it) while
    the clients connect, so the kernel completes a backlog's worth of connections that one
    loop pass then accepts at once: the refused ones hold descriptors too until closed."""
    port = free_port()
    config = tmp_path / "geopush.yaml"
    settings = settings_for(tmp_path)  # writes the stores file
    config.write_text(yaml.safe_dump({
        "stores_file": str(settings.stores_file),
        "server": {"host": LOOPBACK, "port": port, "header_timeout": "120s"},
        "storage": {"backend": "memory"},
    }))
    proc = subprocess.Popen([GEOPUSH, "serve", "-c", str(config)], env=_env(),
                            preexec_fn=_limit_open_files, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    slow: list[asyncio.StreamWriter] = []
    try:
        async def ready() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            return await _status(port) == 200

        await _until(ready, 60)
        # the finding: 300 sockets sending their headers a byte at a time
        flood_started = time.monotonic()
        for _ in range(4 if stalled else 300):
            if stalled:
                proc.send_signal(signal.SIGSTOP)
                burst = asyncio.gather(*(_open_slow(port) for _ in range(BACKLOG + 2)))
                await asyncio.sleep(0.5)
                proc.send_signal(signal.SIGCONT)
                opened = await burst
            else:
                opened = [await _open_slow(port)]
            slow += [writer for writer in opened if writer is not None]
        for byte in b"ET / HTTP/1.1\r\n":
            for writer in slow:
                writer.write(bytes([byte]))
            await asyncio.sleep(0.05)
        started = time.monotonic()
        flood_s = started - flood_started  # longer when connects wait out SYN retries
        assert await _status(port) in (503, "reset")  # answered, not left waiting
        assert time.monotonic() - started < 2.0
        for writer in slow:
            writer.close()

        async def served() -> bool:
            return await _status(port) == 200

        await _until(served, 10)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        for writer in slow:
            writer.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert len(stderr.splitlines()) < 20, stderr[:2000]
    assert "out of system resource" not in stderr and "accept_failed" not in events, stderr[-3000:]
    limits = lines[events.index("open_files_limit")]
    assert limits["soft"] == 256 and limits["max_connections"] == 128
    assert limits["backlog"] == 8
    # one line per episode, and one more for every LOG_EVERY_S it lasts
    assert 1 <= events.count("connection_limit_reached") <= 2 + flood_s // LOG_EVERY_S
    assert events.count("connection_limit_cleared") == 1
