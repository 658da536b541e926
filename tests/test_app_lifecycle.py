"""The service's life: graceful shutdown (in-flight requests finish, WebSockets get 1001, the
memory snapshot is written), restart from the snapshot, timers firing without pings, and the
real `geopush serve` process (loopback without keys, refusing bad stores, SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from geopush.app import create_app
from geopush.engine import DeviceOutcome
from geopush.state.base import Compute
from geopush.state.memory import MemoryStore
from geopush.timeutil import parse_ts
from tests.api_support import (
    DEVICES,
    INGEST,
    free_port,
    load_trace,
    ping,
    settings_for,
    write_stores,
)

GEOPUSH = str(Path(sys.executable).with_name("geopush"))


class _GatedStore(MemoryStore):
    """track() waits for the test to open the gate: a request held in flight."""

    def __init__(self, snapshot_path: Path) -> None:
        super().__init__(snapshot_path)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def track(self, device_ids: Collection[str], compute: Compute
                    ) -> dict[str, DeviceOutcome]:
        self.entered.set()
        await self.gate.wait()
        return await super().track(device_ids, compute)


async def _start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, shutdown_timeout=10)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def test_graceful_shutdown_finishes_requests_closes_sockets_and_saves(tmp_path: Path
                                                                           ) -> None:
    settings = settings_for(tmp_path)
    snapshot = tmp_path / "state.json"
    store = _GatedStore(snapshot)
    runner, url = await _start(create_app(settings, store=store))
    async with aiohttp.ClientSession() as session:
        resp = await session.put(f"{url}/v1/devices/phone-1", headers=DEVICES,
                                 json={"consent": {"location": True}})
        assert resp.status == 200
        ws = await session.ws_connect(f"{url}/v1/stream", headers=INGEST)
        closing = asyncio.create_task(ws.receive())
        in_flight = asyncio.create_task(session.post(
            f"{url}/v1/pings", headers=INGEST, json=ping("phone-1", load_trace()[300])))
        await asyncio.wait_for(store.entered.wait(), 10)

        shutdown = asyncio.create_task(runner.cleanup())
        message = await asyncio.wait_for(closing, 10)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1001
        assert not in_flight.done()
        assert not snapshot.exists()  # the store closes only after requests finished

        store.gate.set()
        resp = await asyncio.wait_for(in_flight, 10)
        assert resp.status == 200
        body = await resp.json()
        assert body["accepted"] == 1 and [e["type"] for e in body["events"]] == ["enter"]
        await asyncio.wait_for(shutdown, 15)
    saved = json.loads(snapshot.read_text())
    assert "phone-1" in saved["profiles"] and "phone-1" in saved["tracks"]


async def test_a_restart_continues_from_the_memory_snapshot(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    trace = load_trace()
    runner, url = await _start(create_app(settings))
    async with aiohttp.ClientSession() as session:
        await session.put(f"{url}/v1/devices/phone-1", headers=DEVICES,
                          json={"consent": {"location": True}})
        resp = await session.post(f"{url}/v1/pings", headers=INGEST,
                                  json={"pings": [ping("phone-1", p) for p in trace[290:301]]})
        assert [e["type"] for e in (await resp.json())["events"]] == ["enter"]
    await runner.cleanup()

    runner, url = await _start(create_app(settings))
    try:
        async with aiohttp.ClientSession() as session:
            # the stay survived the restart: leaving now is an exit, not nothing
            resp = await session.post(f"{url}/v1/pings", headers=INGEST,
                                      json=ping("phone-1", trace[400]))
            assert [e["type"] for e in (await resp.json())["events"]] == ["exit"]
    finally:
        await runner.cleanup()


def _timer_exits(text: str) -> float:
    for line in text.splitlines():
        if line.startswith('geopush_events_total{source="timer",type="exit"}'):
            return float(line.split()[-1])
    return 0.0


async def test_a_stale_exit_fires_on_the_timer_without_pings(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(tmp_path, geofence={"stale_after": "2s"})
    runner, url = await _start(create_app(settings, timer_interval_s=0.2))
    try:
        async with aiohttp.ClientSession() as session:
            await session.put(f"{url}/v1/devices/phone-1", headers=DEVICES,
                              json={"consent": {"location": True}})
            at = load_trace()[300]
            sent = time.time()
            body = {"device_id": "phone-1", "lat": at.lat, "lon": at.lon,
                    "ts": round(sent * 1000)}
            with caplog.at_level("INFO", logger="geopush.service.timers"):
                resp = await session.post(f"{url}/v1/pings", headers=INGEST, json=body)
                assert [e["type"] for e in (await resp.json())["events"]] == ["enter"]
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    metrics = await (await session.get(f"{url}/metrics")).text()
                    if _timer_exits(metrics) >= 1:
                        break
                    await asyncio.sleep(0.1)
            assert _timer_exits(metrics) == 1
    finally:
        await runner.cleanup()
    lines = [r for r in caplog.records if r.getMessage() == "timer_event"]
    assert len(lines) == 1
    logged: dict[str, Any] = vars(lines[0])["geopush_fields"]
    assert logged["type"] == "exit" and logged["stale"] is True
    assert logged["geofence_id"] == "bakery-300"
    # the event's time has its own field: `ts` is the line's wall clock
    assert "ts" not in logged and parse_ts(logged["event_ts"]) <= time.time()


# -- the real process ---------------------------------------------------------------------------


def _config(tmp_path: Path, *, keys: list[dict[str, Any]], stores: Path | None = None) -> Path:
    port = free_port()
    config = {
        "stores_file": str(stores or write_stores(tmp_path / "stores.geojson", load_trace())),
        "server": {"host": "0.0.0.0", "port": port},
        "storage": {"backend": "memory", "snapshot_path": str(tmp_path / "state.json")},
        "auth": {"keys": keys},
    }
    path = tmp_path / "geopush.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GEOPUSH_")}


def _non_loopback_address() -> str | None:
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            address: str = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


async def test_serve_without_keys_listens_on_loopback_only_and_stops_on_sigterm(
        tmp_path: Path) -> None:
    config = _config(tmp_path, keys=[])
    port = yaml.safe_load(config.read_text())["server"]["port"]
    proc = subprocess.Popen([GEOPUSH, "serve", "-c", str(config)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.communicate()[1]
                try:
                    resp = await session.get(f"http://127.0.0.1:{port}/readyz")
                    if resp.status == 200:
                        break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "geopush serve did not become ready"
                await asyncio.sleep(0.2)
            resp = await session.put(f"http://127.0.0.1:{port}/v1/devices/d1",
                                     json={"consent": {"location": True}})
            assert resp.status == 200
            other = _non_loopback_address()
            if other is not None:
                with pytest.raises(aiohttp.ClientConnectionError):
                    await session.get(f"http://{other}:{port}/healthz",
                                      timeout=aiohttp.ClientTimeout(total=3))
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    warning = lines[events.index("no_auth_keys")]
    assert warning["level"] == "warning" and "127.0.0.1 only" in warning["message"]
    assert "listening" in events and "stopped" in events
    assert "d1" in json.loads((tmp_path / "state.json").read_text())["profiles"]


def test_serve_refuses_to_start_on_store_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.geojson"
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "shop-1", "properties": {"radius_m": -5},
         "geometry": {"type": "Point", "coordinates": [11.5, 48.1]}}]}))
    config = _config(tmp_path, keys=[], stores=bad)
    result = subprocess.run([GEOPUSH, "serve", "-c", str(config)], env=_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot start" in result.stderr
    assert "shop-1" in result.stderr and "radius_m" in result.stderr
    assert not (tmp_path / "state.json").exists()


async def test_serve_says_which_address_it_cannot_listen_on(tmp_path: Path) -> None:
    import socket

    from geopush.app import serve
    from geopush.errors import GeopushError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = settings_for(tmp_path, server={"host": "127.0.0.1", "port": port})
        with pytest.raises(GeopushError, match=f"cannot listen on 127.0.0.1:{port}"):
            await serve(settings)
