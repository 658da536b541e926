"""Crashes of the embedded default (contract §10): a real `geopush serve` on the memory backend,
killed with SIGKILL at several moments. An acknowledged erasure or consent revocation is never
undone, devices registered since the start survive, acknowledged pings older than
`storage.fsync_every` (+ a margin) are all kept, and a second process on the same state files
refuses to start."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.api_support import DEVICES, INGEST, KEYS, free_port, load_trace, ping, write_stores

GEOPUSH = str(Path(sys.executable).with_name("geopush"))
FSYNC_EVERY_S = 1.0  # the default: the config below leaves storage.fsync_every out
MARGIN_S = 0.5
SECRET = "pistachio-7f3a9c"  # a distinctive attribute value, searched for in the state files


class Serve:
    """One `geopush serve` (the memory backend unless `storage` says otherwise), started and
    killed as the test says."""

    def __init__(self, tmp_path: Path, storage: dict[str, Any] | None = None) -> None:
        self.port = free_port()
        self.state_dir = tmp_path / "var"
        self.config = tmp_path / "geopush.yaml"
        self.config.write_text(yaml.safe_dump({
            "stores_file": str(write_stores(tmp_path / "stores.geojson", load_trace())),
            "rules_dir": str(tmp_path / "rules"),
            "server": {"host": "127.0.0.1", "port": self.port},
            "storage": storage or {"backend": "memory",
                                   "snapshot_path": str(self.state_dir / "state.json")},
            "auth": {"keys": KEYS},
            "logging": {"pseudonym_key": "test-pseudonym-key"},
        }))
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0
        self.log_path = tmp_path / "serve-0.log"

    async def start(self) -> None:
        # the log goes to a file: a pipe nobody reads until the end fills up (64 KB of audit
        # lines) and blocks the server in its next log write, whatever the test is about
        self.starts += 1
        self.log_path = self.config.with_name(f"serve-{self.starts}.log")
        with self.log_path.open("w") as log:  # the child keeps its own descriptor
            self.proc = _popen(self.config, log=log)
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60
            while True:
                if self.proc.poll() is not None:
                    self.proc.communicate()
                    raise AssertionError(f"geopush serve exited: {self.log()}")
                try:
                    if (await session.get(f"{self.url}/readyz")).status == 200:
                        return
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "geopush serve did not become ready"
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=30)
        self.proc = None

    def stop(self) -> str:
        """SIGTERM; the log of this run."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=60)
        stderr = self.log()
        assert self.proc.returncode == 0, stderr
        self.proc = None
        return stderr

    def log(self) -> str:
        """What the current (or last) run wrote."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def state_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in sorted(self.state_dir.iterdir()) if p.is_file())


def _popen(config: Path, log: Any = subprocess.PIPE, **env: str) -> subprocess.Popen[str]:
    """`log`: where stdout and stderr go (a pipe: read it, or the server blocks once it is
    full)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GEOPUSH_")}
    return subprocess.Popen([GEOPUSH, "serve", "-c", str(config)], env={**clean, **env},
                            stdout=log, stderr=log, text=True)


async def _put(session: aiohttp.ClientSession, url: str, device_id: str,
               **body: Any) -> None:
    body.setdefault("consent", {"location": True, "marketing": True})
    resp = await session.put(f"{url}/v1/devices/{device_id}", headers=DEVICES, json=body)
    assert resp.status == 200, await resp.text()


async def _pings(session: aiohttp.ClientSession, url: str, batch: list[dict[str, Any]]
                 ) -> dict[str, Any]:
    resp = await session.post(f"{url}/v1/pings", headers=INGEST, json={"pings": batch})
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def test_an_erasure_is_never_undone_by_a_sigkill(tmp_path: Path) -> None:
    serve = Serve(tmp_path)
    trace = load_trace()
    try:
        await serve.start()
        async with aiohttp.ClientSession() as session:
            await _put(session, serve.url, "gone-1", attributes={"flavour": SECRET})
            await _put(session, serve.url, "kept-1")
            await _pings(session, serve.url, [ping("gone-1", p) for p in trace[290:301]])
        serve.stop()  # a clean stop: the snapshot holds the device
        assert SECRET.encode() in serve.state_bytes()

        await serve.start()
        async with aiohttp.ClientSession() as session:
            resp = await session.delete(f"{serve.url}/v1/devices/gone-1", headers=DEVICES)
            assert resp.status == 204
        serve.kill()  # right after the 204

        await serve.start()
        async with aiohttp.ClientSession() as session:
            for path in ("", "/export"):
                resp = await session.get(f"{serve.url}/v1/devices/gone-1{path}",
                                         headers=DEVICES)
                assert resp.status == 404, f"GET{path}: the erased device came back"
            resp = await session.get(f"{serve.url}/v1/devices/kept-1", headers=DEVICES)
            assert resp.status == 200
            # soon after (the replayed erasure compacts the files), nothing of it is on disk
            deadline = time.monotonic() + 15
            while SECRET.encode() in serve.state_bytes() or b"gone-1" in serve.state_bytes():
                assert time.monotonic() < deadline, "the erased device's data is still on disk"
                await asyncio.sleep(0.2)
        serve.kill()
        await serve.start()
        async with aiohttp.ClientSession() as session:
            resp = await session.get(f"{serve.url}/v1/devices/gone-1", headers=DEVICES)
            assert resp.status == 404
            resp = await session.get(f"{serve.url}/v1/devices/kept-1", headers=DEVICES)
            assert resp.status == 200
    finally:
        serve.close()


async def test_a_consent_revocation_is_never_undone_by_a_sigkill(tmp_path: Path) -> None:
    serve = Serve(tmp_path)
    trace = load_trace()
    try:
        await serve.start()
        async with aiohttp.ClientSession() as session:
            await _put(session, serve.url, "phone-1")
        serve.stop()

        await serve.start()
        async with aiohttp.ClientSession() as session:
            resp = await session.patch(f"{serve.url}/v1/devices/phone-1", headers=DEVICES,
                                       json={"consent": {"location": False, "marketing": False}})
            assert resp.status == 200
        serve.kill()  # right after the 200

        await serve.start()
        async with aiohttp.ClientSession() as session:
            body = await _pings(session, serve.url, [ping("phone-1", trace[300])])
            assert body["accepted"] == 0
            assert [r["code"] for r in body["rejected"]] == ["no_consent"]
            resp = await session.get(f"{serve.url}/v1/devices/phone-1/export", headers=DEVICES)
            history = (await resp.json())["consent_history"]
            assert [c["location"] for c in history] == [True, False]
    finally:
        serve.close()


async def test_acknowledged_pings_and_new_devices_survive_a_sigkill(tmp_path: Path) -> None:
    serve = Serve(tmp_path)
    trace = load_trace()
    devices = [f"walker-{i}" for i in range(40)]
    acked: list[tuple[float, int]] = []  # (monotonic time of the 200, trace index)
    try:
        await serve.start()  # no clean stop before the kill: every device is new since start
        async with aiohttp.ClientSession() as session:
            for device_id in devices:
                await _put(session, serve.url, device_id)
            for at in range(200, 200 + 40):
                body = await _pings(session, serve.url,
                                    [ping(d, trace[at]) for d in devices])
                assert body["accepted"] == len(devices)
                acked.append((time.monotonic(), at))
                await asyncio.sleep(0.05)
            serve.kill()
            killed_at = time.monotonic()

        await serve.start()
        async with aiohttp.ClientSession() as session:
            lost = 0
            for device_id in devices:
                resp = await session.get(f"{serve.url}/v1/devices/{device_id}/export",
                                         headers=DEVICES)
                assert resp.status == 200, f"{device_id} registered since start is gone"
                last_ping = (await resp.json())["tracking"]["last_ping"]
                assert last_ping is not None
                from geopush.timeutil import parse_ts

                kept_until = parse_ts(last_ping)
                lost += sum(1 for t, at in acked
                            if t < killed_at - FSYNC_EVERY_S - MARGIN_S
                            and trace[at].ts > kept_until + 1e-6)
            assert lost == 0, f"{lost} acknowledged pings older than the fsync window lost"
    finally:
        serve.close()


async def test_sigkill_at_random_moments_of_a_storm_never_undoes_an_answer(
        tmp_path: Path) -> None:
    """Registrations, revocations and erasures racing pings; killed at three moments."""
    serve = Serve(tmp_path)
    trace = load_trace()
    rng = random.Random(8)
    erased: set[str] = set()
    revoked: set[str] = set()
    registered: set[str] = set()
    unanswered: set[str] = set()  # a request in flight at the kill may or may not be done
    try:
        for round_no in range(3):
            await serve.start()
            async with aiohttp.ClientSession() as session:
                async def storm(worker: int, session: aiohttp.ClientSession = session,
                                round_no: int = round_no) -> None:
                    for n in range(1000):
                        device_id = f"s{round_no}-{worker}-{n}"
                        await _put(session, serve.url, device_id,
                                   attributes={"flavour": SECRET})
                        registered.add(device_id)
                        await _pings(session, serve.url, [ping(device_id, trace[300])])
                        action = n % 3
                        unanswered.add(device_id)
                        if action == 0:
                            resp = await session.delete(
                                f"{serve.url}/v1/devices/{device_id}", headers=DEVICES)
                            assert resp.status == 204
                            erased.add(device_id)
                        elif action == 1:
                            resp = await session.patch(
                                f"{serve.url}/v1/devices/{device_id}", headers=DEVICES,
                                json={"consent": {"location": False}})
                            assert resp.status == 200
                            revoked.add(device_id)
                        unanswered.discard(device_id)

                tasks = [asyncio.create_task(storm(w)) for w in range(4)]
                await asyncio.sleep(0.5 + rng.random())
                serve.kill()
                await asyncio.gather(*tasks, return_exceptions=True)

        await serve.start()
        assert erased and revoked
        async with aiohttp.ClientSession() as session:
            for device_id in sorted(registered - unanswered):
                resp = await session.get(f"{serve.url}/v1/devices/{device_id}",
                                         headers=DEVICES)
                if device_id in erased:
                    assert resp.status == 404, f"{device_id}: erasure undone"
                    continue
                assert resp.status == 200, f"{device_id}: acknowledged registration lost"
                consent = (await resp.json())["consent"]
                assert consent["location"] is (device_id not in revoked), device_id
    finally:
        serve.close()


async def test_a_second_process_on_the_same_state_files_refuses_to_start(
        tmp_path: Path) -> None:
    serve = Serve(tmp_path)
    try:
        await serve.start()
        second = _popen(serve.config, GEOPUSH_SERVER__PORT=str(free_port()))
        _, stderr = second.communicate(timeout=60)
        assert second.returncode == 1
        lines = [line for line in stderr.splitlines() if not line.startswith("{")]
        assert len(lines) == 1, stderr
        assert "state.json" in lines[0] and "another geopush process" in lines[0]
        assert f"pid {serve.proc.pid if serve.proc else '?'}" in lines[0]
        async with aiohttp.ClientSession() as session:
            assert (await session.get(f"{serve.url}/readyz")).status == 200
    finally:
        serve.close()
