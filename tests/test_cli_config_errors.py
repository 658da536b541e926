"""Configuration mistakes reach the operator as one line each, never a traceback, from the real
`geopush` command (contract §12); `check` refuses whatever `serve` would, with the same lines."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.test_cli import GEOPUSH, REPO, STORES

KEYS = '[{"name": "app", "key": "0123456789abcdef-key", "scopes": ["ingest"]}]'
GOOD_SECRET = "a-real-random-pseudonym-secret-0123"


def _run(*args: str | Path, env: dict[str, str] | None = None,
         cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GEOPUSH_")}
    return subprocess.run([str(GEOPUSH), *map(str, args)], cwd=cwd, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=60, check=False)


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


@pytest.fixture
def world(tmp_path: Path) -> Path:
    (tmp_path / "stores.geojson").write_text(json.dumps(STORES))
    (tmp_path / "rules").mkdir()
    (tmp_path / "pings.csv").write_text("device_id,ts,lat,lon,accuracy_m,speed_mps\n")
    config = tmp_path / "geopush.yaml"
    config.write_text("stores_file: stores.geojson\nrules_dir: rules\nserver: {port: 0}\n")
    return config


MISTAKES = [
    # (environment, config file text or None, what the line must name)
    ({"GEOPUSH_AUTH__KEYS": '[{"name": "app", "key": '}, None,
     "environment GEOPUSH_AUTH__KEYS: auth.keys: not valid JSON"),
    ({"GEOPUSH_STORAGE__REDIS_URL": "http://x"}, None,
     "environment GEOPUSH_STORAGE__REDIS_URL: storage.redis_url = 'http://x'; expected a "
     "redis://, rediss:// or unix:// URL"),
    ({"GEOPUSH_STORAGE_BACKEND": "redis"}, None,
     "environment GEOPUSH_STORAGE_BACKEND: matches no setting; did you mean "
     "GEOPUSH_STORAGE__BACKEND?"),
    ({"GEOPUSH_SERVER__PORT": "eighty"}, None,
     "environment GEOPUSH_SERVER__PORT: server.port = 'eighty'; expected a whole number"),
    ({}, "stores_file: stores.geojson\nserver:\n  port: [\n", "geopush.yaml:4: not valid YAML"),
    ({}, "stores_file: &s stores.geojson\nrules_dir: *s\n",
     "geopush.yaml:1: anchor &s is not allowed"),
    ({}, "stores_file: stores.geojson\npolicy:\n  min_gap: 1h\npolicy: {}\n",
     "geopush.yaml:4: duplicate key 'policy' (first given on line 2)"),
    ({}, "stores_file: stores.geojson\nauth:\n  device_tokens: required\n",
     "geopush.yaml:2: auth: device_tokens: required needs auth.device_token_secret"),
    # a static provider with no value would make every weather condition false, silently
    ({}, "stores_file: stores.geojson\nweather:\n  provider: static\n  static: {}\n",
     "geopush.yaml:2: weather: provider static needs weather.static"),
    ({}, "stores_file: stores.geojson\ndelivery:\n  send_lease: 5s\n",
     "geopush.yaml:2: delivery: delivery.send_lease (5 s) must be longer than delivery.timeout"),
]


@pytest.mark.parametrize("command", ["check", "serve", "replay"])
@pytest.mark.parametrize(("env", "text", "line"), MISTAKES)
def test_a_config_mistake_is_one_line_and_exit_1(world: Path, command: str, env: dict[str, str],
                                                 text: str | None, line: str) -> None:
    if text is not None:
        world.write_text(text)
    args: list[str | Path] = [command, "-c", world]
    if command == "replay":
        args = ["replay", world.parent / "pings.csv", "-c", world]
    result = _run(*args, env=env)
    assert result.returncode == 1, result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    [error] = _errors(output)
    assert line in error


DEPLOYMENT_MISTAKES = [
    ({"GEOPUSH_AUTH__KEYS": KEYS}, "", "logging.pseudonym_key is the published default"),
    ({"GEOPUSH_AUTH__KEYS": KEYS, "GEOPUSH_LOGGING__PSEUDONYM_KEY": "short"}, "",
     "environment GEOPUSH_LOGGING__PSEUDONYM_KEY: logging.pseudonym_key = *** is shorter"),
    ({"GEOPUSH_STORES_FILE": "missing.geojson"}, "",
     "environment GEOPUSH_STORES_FILE: stores_file = "),
    # the project's number (or its display name) where its id goes: every send would fail
    ({}, "delivery:\n  sender: fcm\n  fcm: {project_id: 123456789012, static_token: t}\n",
     "geopush.yaml:7: delivery.fcm.project_id = '123456789012'; expected the Firebase "
     "project id"),
    ({}, "delivery:\n  sender: fcm\n  fcm: {project_id: shop-app, service_account_file: sa.json}\n",
     "geopush.yaml:7: delivery.fcm.service_account_file = "),
    # a file that is there but is no service account key: serve would fail at its first push
    ({}, "delivery:\n  sender: fcm\n  fcm: {project_id: shop-app, service_account_file: "
         "stores.geojson}\n",
     "delivery.fcm.service_account_file = "),
    ({}, "storage:\n  snapshot_path: stores.geojson/state.json\n",
     "geopush.yaml:6: storage.snapshot_path = "),
    ({}, "storage:\n  snapshot_path: broken.json\n", "cannot read the state snapshot"),
    # pushes older than retention.history are forgotten: a longer window would not hold
    ({}, "policy:\n  max_per_device: [{max: 1, per: 400d}]\n",
     "geopush.yaml:6: policy.max_per_device.0.per = 400d is longer than retention.history "
     "(180d)"),
    ({}, "policy:\n  min_gap: 30d\nretention:\n  history: 20d\n",
     "geopush.yaml:6: policy.min_gap = 30d is longer than retention.history (20d)"),

    ({"GEOPUSH_LOGGING__PSEUDONYM_KEY": GOOD_SECRET},
     f"auth:\n  device_token_secret: [{GOOD_SECRET}]\n",
     "geopush.yaml:6: auth.device_token_secret holds logging.pseudonym_key"),
]


@pytest.mark.parametrize(("env", "extra", "line"), DEPLOYMENT_MISTAKES)
def test_check_refuses_what_serve_refuses_with_the_same_lines(
        world: Path, env: dict[str, str], extra: str, line: str) -> None:
    world.write_text(world.read_text() + "\n" + extra)
    (world.parent / "broken.json").write_text("{not json")
    checked = _run("check", "-c", world, env=env)
    served = _run("serve", "-c", world, env=env)
    assert (checked.returncode, served.returncode) == (1, 1), served.stderr
    assert "Traceback" not in checked.stdout + checked.stderr + served.stdout + served.stderr
    [error] = _errors(checked.stdout)
    assert line in error
    assert _errors(served.stderr) == [error]
    assert "0123456789abcdef-key" not in checked.stdout + served.stderr


def test_serve_refuses_the_default_pseudonym_key_with_auth_keys(world: Path) -> None:
    result = _run("serve", "-c", world, env={"GEOPUSH_AUTH__KEYS": KEYS})
    assert result.returncode == 1
    [error] = _errors(result.stderr)
    assert error.startswith(f"error: {world}:") and "logging.pseudonym_key" in error
    ok = _run("check", "-c", world, env={"GEOPUSH_AUTH__KEYS": KEYS,
                                         "GEOPUSH_LOGGING__PSEUDONYM_KEY": GOOD_SECRET})
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1].startswith("ok: "), ok.stdout


def test_secrets_are_never_echoed_by_check(world: Path) -> None:
    result = _run("check", "-c", world, env={
        "GEOPUSH_AUTH__KEYS": '[{"name": "app", "key": "SHORT-S3CRET", "scopes": ["ingest"]}]',
        "GEOPUSH_STORAGE__REDIS_URL": "http://:REDIS-S3CRET@r:1",
        "GEOPUSH_DELIVERY__WEBHOOK": '{"url": "ftp://h", "secret": ["HOOK-S3CRET"]}',
    })
    assert result.returncode == 1
    assert len(_errors(result.stdout)) == 4
    assert "S3CRET" not in result.stdout + result.stderr
    assert result.stdout.count("***") == 3


def test_device_token_secrets_are_never_echoed(world: Path) -> None:
    result = _run("check", "-c", world, env={
        "GEOPUSH_AUTH__DEVICE_TOKEN_SECRET": '["DTS-S3CRET", "x"]',
        "GEOPUSH_AUTH__DEVICE_TOKENS": "always",
    })
    assert result.returncode == 1
    errors = _errors(result.stdout)
    assert len(errors) == 3, result.stdout
    assert "S3CRET" not in result.stdout + result.stderr
    assert sum("auth.device_token_secret.0 = ***; expected at least 32 characters" in e or
               "auth.device_token_secret.1 = ***; expected at least 32 characters" in e
               for e in errors) == 2
    assert any("auth.device_tokens = 'always'" in e for e in errors)


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    result = _run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"geopush {version('geopush')}"


@pytest.mark.parametrize("command", ["check", "serve", "replay"])
def test_a_stores_file_that_is_not_utf8_is_one_line_naming_the_byte(world: Path,
                                                                     command: str) -> None:
    (world.parent / "latin1.geojson").write_bytes(
        b'{"type": "FeatureCollection", "name": "Caf\xe9", "features": []}')
    world.write_text(world.read_text().replace("stores.geojson", "latin1.geojson"))
    args: list[str | Path] = [command, "-c", world]
    if command == "replay":
        args = ["replay", world.parent / "pings.csv", "-c", world]
    result = _run(*args)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    [error] = _errors(output)
    assert "latin1.geojson: stores file: not UTF-8 text (byte 42 is 0xe9)" in error
