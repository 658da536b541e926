"""Sends from a process of their own (delivery.process, geopush.delivery.process): with Redis,
`geopush serve` starts a child that sends while the serving loop answers pings. Real `geopush
serve` processes and a fake FCM: the push goes out from the child, its metrics show on the
parent's /metrics, a child that dies is started again, a shutdown stops it, and a crash of the
serving process takes it down at once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from geopush.metrics import Metrics
from tests.fakefcm import FakeFcmProcess, Reply
from tests.test_faults_delivery import (
    HANG_S,
    FcmServe,
    _drive,
    _redis,
    _register,
    _requested,
    _sent_once_under_one_id,
    _until,
)

GEOPUSH = Path(sys.executable).parent / "geopush"


def _children(serve: FcmServe) -> list[int]:
    """The pids of the delivery processes this run of serve started, in order."""
    pids = []
    for line in serve.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "delivery_process_started":
            pids.append(int(record["pid"]))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose (its parent has not reaped it yet)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


async def _gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _sends_metric(session: aiohttp.ClientSession, url: str) -> float:
    text = await (await session.get(f"{url}/metrics")).text()
    for family in text_string_to_metric_families(text):
        if family.name == "geopush_push_sends":
            return sum(s.value for s in family.samples
                       if s.name.endswith("_total") and s.labels.get("result") == "sent")
    return 0.0


async def test_on_redis_pushes_go_out_from_a_process_of_their_own(
        tmp_path: Path, redis_url: str) -> None:
    fake = FakeFcmProcess(tmp_path / "sends.ndjson")
    serve = FcmServe(tmp_path, fake, _redis(redis_url))
    try:
        await serve.start()
        assert serve.proc is not None
        async with aiohttp.ClientSession() as session:
            await _until(lambda: _started(serve, 1), "the delivery process")
            [child] = _children(serve)
            assert child != serve.proc.pid and _alive(child)
            token = await _register(session, serve.url, "first")
            await _drive(session, serve.url, "first", token)
            await _sent_once_under_one_id(session, serve.url, fake, "first")
            # the child's counters, on the serving process's one endpoint (written each second)
            await _until(lambda: _counted(session, serve.url, 1), "the send in /metrics")

            # a delivery process that dies is started again, and sends
            os.kill(child, signal.SIGKILL)
            await _until(lambda: _started(serve, 2), "a new delivery process", timeout_s=10)
            assert "delivery_process_died" in serve.log()
            token = await _register(session, serve.url, "second")
            await _drive(session, serve.url, "second", token)
            await _sent_once_under_one_id(session, serve.url, fake, "second")
            replacement = _children(serve)[-1]
        serve.stop()  # SIGTERM: exits 0 once its delivery process has stopped
        assert await _gone(replacement, timeout_s=1.0)
    finally:
        serve.close()
        fake.stop()


async def test_a_crash_of_the_serving_process_ends_its_delivery_process(
        tmp_path: Path, redis_url: str) -> None:
    """An orphan would go on claiming and sending the pushes that the restarted instance
    sends too."""
    fake = FakeFcmProcess(tmp_path / "sends.ndjson")
    serve = FcmServe(tmp_path, fake, _redis(redis_url))
    try:
        fake.then(Reply.hang(HANG_S), token="fcm-in-flight")
        await serve.start()
        await _until(lambda: _started(serve, 1), "the delivery process")
        [child] = _children(serve)
        async with aiohttp.ClientSession() as session:
            token = await _register(session, serve.url, "in-flight")
            await _drive(session, serve.url, "in-flight", token)
            await _until(lambda: _requested(fake, "in-flight"), "the send to reach FCM")
        serve.kill()  # while the send hangs: a shutdown would wait for it, a crash does not
        assert await _gone(child, timeout_s=1.0), \
            "the delivery process outlived its serving process"
    finally:
        serve.close()
        fake.stop()


async def _started(serve: FcmServe, n: int) -> bool:
    return len(_children(serve)) >= n


async def _counted(session: aiohttp.ClientSession, url: str, n: int) -> bool:
    return await _sends_metric(session, url) >= n


def test_the_delivery_process_metrics_add_to_the_serving_ones(tmp_path: Path) -> None:
    serving, sending = Metrics(), Metrics()
    serving.state_unavailable.labels("track").inc(2)
    sending.state_unavailable.labels("deliver").inc(3)
    sending.sends.labels("sent", "").inc(5)
    sending.send_seconds.observe(0.03)
    sending.outbox_depth.set(7)
    path = tmp_path / "metrics.prom"
    path.write_bytes(sending.render())
    serving.added_from = path
    families = {f.name: f for f in text_string_to_metric_families(serving.render().decode())}

    def value(family: str, sample: str, **labels: str) -> float:
        return next(s.value for s in families[family].samples
                    if s.name == sample and s.labels == labels)

    assert value("geopush_state_unavailable", "geopush_state_unavailable_total",
                 operation="track") == 2
    assert value("geopush_state_unavailable", "geopush_state_unavailable_total",
                 operation="deliver") == 3
    assert value("geopush_push_sends", "geopush_push_sends_total", result="sent", code="") == 5
    assert value("geopush_outbox_pending", "geopush_outbox_pending") == 7
    assert value("geopush_push_send_duration_seconds", "geopush_push_send_duration_seconds_count") == 1
    # one family per name: the exposition stays valid
    names = [line.split()[2] for line in serving.render().decode().splitlines()
             if line.startswith("# TYPE")]
    assert len(names) == len(set(names))
    # before the child wrote anything: the serving metrics alone
    path.unlink()
    assert b"operation=\"deliver\"" not in serving.render()


def test_separate_delivery_needs_redis(tmp_path: Path) -> None:
    config = tmp_path / "geopush.yaml"
    config.write_text("stores_file: stores.geojson\ndelivery:\n  process: separate\n")
    (tmp_path / "stores.geojson").write_text(json.dumps({
        "type": "FeatureCollection", "features": [{
            "type": "Feature", "id": "node/1", "properties": {"name": "Shop"},
            "geometry": {"type": "Point", "coordinates": [14.0, 46.0]}}]}))
    (tmp_path / "rules").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOPUSH_")}
    for command in (["check"], ["serve"]):
        done = subprocess.run([str(GEOPUSH), *command, "-c", str(config), "--rules",
                               str(tmp_path / "rules")] if command == ["check"] else
                              [str(GEOPUSH), *command, "-c", str(config)],
                              cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        said = done.stdout + done.stderr  # check reports on stdout, serve on stderr
        assert done.returncode == 1, said
        lines = [line for line in said.splitlines() if "delivery.process" in line]
        assert len(lines) == 1 and "needs storage.backend: redis" in lines[0], said
        assert "Traceback" not in said


@pytest.mark.parametrize("process,backend,separate", [
    ("auto", "redis", True), ("auto", "memory", False), ("inline", "redis", False),
    ("separate", "redis", True)])
def test_where_pushes_are_sent_from(process: str, backend: str, separate: bool) -> None:
    from geopush.config import Settings
    from geopush.delivery.process import separate_delivery

    settings = Settings(storage={"backend": backend}, delivery={"process": process})
    assert separate_delivery(settings) is separate
