"""Settings: embedded defaults, environment overrides, errors at file:line (contract §11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from geopush.config import Settings, config_json_schema, load_settings
from geopush.errors import ConfigError
from geopush.yamlspots import YamlError, load_yaml

REPO = Path(__file__).parent.parent
EMBEDDED = REPO / "config" / "geopush.yaml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the environment they set."""
    import os

    for name in list(os.environ):
        if name.startswith("GEOPUSH_"):
            monkeypatch.delenv(name)


def _write(tmp_path: Path, text: str, name: str = "geopush.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_embedded_config_loads_with_the_contract_defaults() -> None:
    settings = load_settings(EMBEDDED)
    assert settings.stores_file == (REPO / "stores.geojson").resolve()
    assert settings.rules_dir == (REPO / "rules").resolve()
    assert settings.storage.backend == "memory"
    assert settings.geofence.default_radius_m == 100
    assert settings.geofence.max_accuracy_m == 100
    assert settings.geofence.exit_hysteresis_m == 25
    assert settings.geofence.stale_after == 7200
    assert settings.visits.min_dwell == 300
    assert settings.policy.max_event_lag == 600
    assert settings.stores_file.exists()


def test_an_empty_file_gives_the_same_defaults(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, ""))
    assert settings.geofence == Settings.model_fields["geofence"].default
    assert settings.storage.backend == "memory"


def test_environment_overrides_a_nested_key(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "storage:\n  backend: redis\n  redis_url: redis://file:6379/1\n")
    monkeypatch.setenv("GEOPUSH_STORAGE__REDIS_URL", "redis://env:6380/2")
    settings = load_settings(path)
    assert settings.storage.redis_url == "redis://env:6380/2"
    assert settings.storage.backend == "redis"  # the rest of the section stays from the file


def test_environment_override_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOPUSH_GEOFENCE__STALE_AFTER", "soon")
    with pytest.raises(ConfigError) as raised:
        load_settings(EMBEDDED)
    [problem] = raised.value.details
    assert problem.field == "geofence.stale_after" and problem.value == "soon"
    assert problem.where == "environment GEOPUSH_GEOFENCE__STALE_AFTER"  # not the file


def test_config_path_comes_from_geopush_config(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "server:\n  port: 9999\n")
    monkeypatch.setenv("GEOPUSH_CONFIG", str(path))
    assert load_settings().server.port == 9999


def test_a_named_config_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.yaml")


def test_unknown_key_is_an_error_at_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "server:\n  port: 8080\ngeofence:\n  default_radius_m: 50\n"
                            "  radius: 10\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    [problem] = raised.value.details
    assert problem.where == f"{path}:5"
    assert problem.field == "geofence.radius"
    assert "unknown key" in problem.message


def test_unknown_top_level_section_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "stores_file: s.geojson\nweathr:\n  provider: none\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    assert [(p.where, p.field) for p in raised.value.details] == [(f"{path}:2", "weathr")]


@pytest.mark.parametrize(
    ("text", "field", "value", "line"),
    [
        ("geofence:\n  stale_after: two hours\n", "geofence.stale_after", "two hours", 2),
        ("visits:\n  min_dwell: -5\n", "visits.min_dwell", -5, 2),
        ("geofence:\n  default_radius_m: -1\n", "geofence.default_radius_m", -1, 2),
        ("storage:\n  backend: mongo\n", "storage.backend", "mongo", 2),
        ("\n\nserver:\n  port: 70000\n", "server.port", 70000, 4),
        ("policy:\n  quiet_hours:\n    from: '25:00'\n", "policy.quiet_hours.from", "25:00",
         3),
        ("policy:\n  max_per_device:\n    - {max: 0, per: 1d}\n",
         "policy.max_per_device.0.max", 0, 3),
        ("weather:\n  static:\n    condition: sunny\n", "weather.static.condition", "sunny", 3),
        ("logging:\n  delivery_rate_alert: 1.5\n", "logging.delivery_rate_alert", 1.5, 2),
        ("delivery:\n  sender: pigeon\n", "delivery.sender", "pigeon", 2),
    ],
)
def test_bad_values_name_file_line_field_and_value(tmp_path: Path, text: str, field: str,
                                                   value: object, line: int) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    [problem] = raised.value.details
    assert (problem.where, problem.field, problem.value) == (f"{path}:{line}", field, value)
    assert problem.expected


def test_every_bad_key_is_listed(tmp_path: Path) -> None:
    path = _write(tmp_path, "geofence:\n  stale_after: x\n  max_accuracy_m: -3\nfoo: 1\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    assert sorted(p.field or "" for p in raised.value.details) == [
        "foo", "geofence.max_accuracy_m", "geofence.stale_after"]


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("5m", 300), ("2h", 7200),
                                               ("1h30m", 5400), ("7d", 604800), (90, 90)])
def test_durations_are_read_in_their_usual_spellings(tmp_path: Path, text: object,
                                                     seconds: float) -> None:
    settings = load_settings(_write(tmp_path, f"geofence:\n  stale_after: {text}\n"))
    assert settings.geofence.stale_after == seconds


def test_paths_are_relative_to_the_config_file(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    path = _write(conf, "stores_file: ../data/stores.geojson\nrules_dir: rules\n"
                        "storage:\n  snapshot_path: /var/lib/geopush/state.json\n")
    monkeypatch.chdir(REPO)  # the working directory plays no part
    settings = load_settings(path)
    assert settings.stores_file == (tmp_path / "data" / "stores.geojson").resolve()
    assert settings.rules_dir == (conf / "rules").resolve()
    assert settings.storage.snapshot_path == Path("/var/lib/geopush/state.json")


def test_not_yaml_and_not_a_mapping_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(_write(tmp_path, "server: [\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_settings(_write(tmp_path, "- a\n- b\n", name="list.yaml"))


def test_json_schema_describes_the_fixed_keys() -> None:
    schema = config_json_schema()
    assert {"stores_file", "rules_dir", "server", "storage", "geofence"} <= set(schema["properties"])
    assert schema.get("additionalProperties") is False


# Every key of contract §11, as a deployment would write them: they all load today, with the
# features still to come (policy, delivery, weather, attribution, retention) validated already.
EVERY_CONTRACT_KEY = """\
stores_file: ../stores.geojson
rules_dir: ../rules
server: {host: 127.0.0.1, port: 9090}
storage: {backend: redis, redis_url: "redis://r:6379/2", snapshot_path: state.json}
geofence: {default_radius_m: 80, max_accuracy_m: 50, exit_hysteresis_m: 20, stale_after: 1h}
visits: {min_dwell: 10m}
policy:
  quiet_hours: {from: "22:00", to: "08:30"}
  max_per_device: [{max: 2, per: 1d}, {max: 5, per: 7d}]
  min_gap: 2h
  fatigue: {ignored_in_a_row: 4, pause: 7d}
  max_event_lag: 5m
delivery:
  sender: fcm
  fcm:
    project_id: shop-app
    service_account_file: secrets/sa.json
    endpoint: http://127.0.0.1:9099/v1/projects
    static_token: test-token
    android_channels: {marketing: offers, service: orders}
  webhook: {url: "https://hooks.example/geopush", secret: s3cret}
weather:
  provider: open-meteo
  base_url: http://127.0.0.1:9098/v1/forecast
  api_key: k
  refresh: 10m
  static: {temperature_c: 31, condition: clear}
attribution: {window: 3d}
retention: {history: 90d}
auth: {keys: [{name: app, key: "0123456789abcdef", scopes: [ingest]}]}
logging:
  format: json
  pseudonym_key: p
  delivery_report_every: 30s
  delivery_rate_alert: 0.8
"""


def test_every_key_of_the_contract_loads(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, EVERY_CONTRACT_KEY))
    assert (settings.policy.quiet_hours is not None
            and (settings.policy.quiet_hours.start, settings.policy.quiet_hours.end)
            == ("22:00", "08:30"))
    assert [(c.max, c.per) for c in settings.policy.max_per_device] == [(2, 86400),
                                                                         (5, 604800)]
    assert (settings.policy.min_gap, settings.policy.fatigue.pause) == (7200, 604800)
    fcm = settings.delivery.fcm
    assert (settings.delivery.sender, fcm.project_id, fcm.static_token) == (
        "fcm", "shop-app", "test-token")
    assert fcm.service_account_file == (tmp_path / "secrets" / "sa.json").resolve()
    assert fcm.android_channels == {"marketing": "offers", "service": "orders"}
    assert settings.weather.static is not None and settings.weather.static.condition == "clear"
    assert (settings.weather.refresh, settings.attribution.window,
            settings.retention.history) == (600, 3 * 86400, 90 * 86400)
    assert (settings.logging.delivery_report_every,
            settings.logging.delivery_rate_alert) == (30, 0.8)


def test_the_not_yet_built_features_default_to_the_contract(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, ""))
    policy = settings.policy
    assert policy.quiet_hours is not None
    assert (policy.quiet_hours.start, policy.quiet_hours.end) == ("21:00", "09:00")
    assert [(c.max, c.per) for c in policy.max_per_device] == [(1, 86400), (3, 7 * 86400)]
    assert (policy.min_gap, policy.store_cooldown) == (4 * 3600, 86400)
    assert (policy.fatigue.ignored_in_a_row, policy.fatigue.pause) == (3, 14 * 86400)
    assert settings.delivery.sender == "log"
    assert settings.delivery.fcm.endpoint == "https://fcm.googleapis.com/v1/projects"
    assert (settings.weather.provider, settings.weather.refresh) == ("none", 900)
    assert (settings.logging.delivery_report_every,
            settings.logging.delivery_rate_alert) == (60, 0.9)


@pytest.mark.parametrize(("text", "missing"), [
    ("delivery:\n  sender: fcm\n", "delivery.fcm.project_id"),
    ("delivery:\n  sender: fcm\n  fcm: {project_id: shop-app}\n", "service_account_file"),
    ("delivery:\n  sender: webhook\n", "delivery.webhook.url"),
])
def test_a_sender_without_what_it_needs_is_an_error(tmp_path: Path, text: str,
                                                    missing: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    [problem] = raised.value.details
    assert problem.field == "delivery" and missing in problem.message
    assert problem.where == f"{path}:1"


def test_nested_keys_are_overridden_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOPUSH_DELIVERY__SENDER", "webhook")
    monkeypatch.setenv("GEOPUSH_DELIVERY__WEBHOOK__URL", "https://hooks.example/x")
    monkeypatch.setenv("GEOPUSH_POLICY__QUIET_HOURS__FROM", "20:00")
    settings = load_settings(_write(tmp_path, ""))
    assert settings.delivery.sender == "webhook"
    assert settings.delivery.webhook.url == "https://hooks.example/x"
    assert settings.policy.quiet_hours is not None
    assert settings.policy.quiet_hours.start == "20:00"


# -- issue #8: the ground holds --------------------------------------------------------------


@pytest.mark.parametrize(("text", "line"), [
    ("server: &s {port: 1}\nother: *s\n", 1),
    ("server:\n  port: 8080\nlogging:\n  format: &f json\n", 4),
    ("a: &a [x, x]\nb: [*a, *a]\n", 1),
    ("policy:\n  max_per_device:\n    - {max: 1, per: 1d}\n    - *one\n", 4),
])
def test_anchors_and_aliases_are_refused_at_file_and_line(tmp_path: Path, text: str,
                                                          line: int) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    [problem] = raised.value.details
    assert problem.where == f"{path}:{line}"
    assert "not allowed" in problem.message and ("anchor" in problem.message
                                                 or "alias" in problem.message)


def test_billion_laughs_is_refused_before_anything_expands() -> None:
    lol = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n"
        for i in range(8))
    with pytest.raises(YamlError) as raised:
        load_yaml(lol, "lol.yaml")
    assert raised.value.problem.where == "lol.yaml:1"


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "server:\n  port: 8080\n  host: [\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    [problem] = raised.value.details
    assert problem.where == f"{path}:4"
    assert "<unicode string>" not in str(raised.value)
    assert "\n" not in problem.message


def test_a_misspelt_variable_is_an_error_with_a_did_you_mean(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOPUSH_STORAGE_BACKEND", "redis")  # one underscore, not two
    monkeypatch.setenv("GEOPUSH_GEOFENCE__STALE_AFTR", "1h")
    monkeypatch.setenv("GEOPUSH_NOTHING_LIKE_IT", "1")
    with pytest.raises(ConfigError) as raised:
        load_settings(EMBEDDED)
    lines = {p.where: p.message for p in raised.value.details}
    assert lines == {
        "environment GEOPUSH_GEOFENCE__STALE_AFTR":
            "matches no setting; did you mean GEOPUSH_GEOFENCE__STALE_AFTER?",
        "environment GEOPUSH_NOTHING_LIKE_IT": "matches no setting",
        "environment GEOPUSH_STORAGE_BACKEND":
            "matches no setting; did you mean GEOPUSH_STORAGE__BACKEND?",
    }


def test_geopush_config_and_other_prefixes_are_not_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOPUSH_CONFIG", str(EMBEDDED))
    monkeypatch.setenv("TEST_REDIS_HOST", "127.0.0.1")
    monkeypatch.setenv("GEOPUSHY", "1")
    assert load_settings().storage.backend == "memory"


def test_invalid_json_in_a_variable_is_one_problem_naming_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOPUSH_AUTH__KEYS", '[{"name": "app", "key": "s3cret-in-json-0123"')
    with pytest.raises(ConfigError) as raised:
        load_settings(EMBEDDED)
    [problem] = raised.value.details
    assert problem.where == "environment GEOPUSH_AUTH__KEYS"
    assert problem.field == "auth.keys" and "not valid JSON" in problem.message
    assert "s3cret-in-json" not in str(raised.value) + str(problem.as_dict())


@pytest.mark.parametrize(("text", "field"), [
    ("storage:\n  redis_url: http://x\n", "storage.redis_url"),
    ("storage:\n  redis_url: redis-host:6379\n", "storage.redis_url"),
    ("storage:\n  redis_cluster: true\n  redis_url: unix:///run/redis.sock\n", "storage"),
    ("delivery:\n  webhook: {url: 'ftp://hooks.example/x'}\n", "delivery.webhook.url"),
    ("delivery:\n  fcm: {endpoint: 'fcm.googleapis.com/v1/projects'}\n",
     "delivery.fcm.endpoint"),
    ("weather:\n  base_url: 'file:///etc/passwd'\n", "weather.base_url"),
    ("weather:\n  provider: static\n", "weather"),
])
def test_urls_and_keys_set_together_are_checked_on_load(tmp_path: Path, text: str,
                                                        field: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    [problem] = raised.value.details
    assert problem.field == field and problem.where.startswith(f"{path}:")


@pytest.mark.parametrize("url", ["redis://r:6379/0", "rediss://:pw@r:6380/1",
                                 "unix:///run/redis.sock?db=2"])
def test_every_redis_url_scheme_loads(tmp_path: Path, url: str) -> None:
    settings = load_settings(_write(tmp_path, f"storage:\n  redis_url: '{url}'\n"))
    assert settings.storage.redis_url == url


@pytest.mark.parametrize(("text", "expected"), [
    ("server:\n  port: eighty\n", "a whole number"),
    ("geofence:\n  default_radius_m: -1\n", "a number greater than 0"),
    ("server:\n  port: 70000\n", "a number of at most 65535"),
    ("storage:\n  backend: mongo\n", "one of 'memory' or 'redis'"),
    ("storage:\n  key_prefix: 'a b'\n", "letters, digits and _ . : - only"),
    ("policy:\n  quiet_hours: {from: '25:00'}\n", "a time of day HH:MM"),
    ("geofence:\n  stale_after: soon\n", "a duration like 30s, 5m, 2h or 7d"),
    ("auth:\n  keys: [{name: a, key: '0123456789abcdef', scopes: [root]}]\n",
     "one of 'ingest', 'devices', 'admin' or 'relay'"),
])
def test_messages_say_what_to_write_not_pydantic_s_words(tmp_path: Path, text: str,
                                                          expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    [problem] = raised.value.details
    assert problem.expected is not None and problem.expected.startswith(expected)
    line = f"{problem.message}; expected {problem.expected}"
    assert "Input should" not in line and "String should" not in line
    assert "^" not in line and "[0-9]" not in line and "Value error" not in line


SECRETS = ("SHORTKEY", "PSEUDO-S3CRET", "WEBHOOK-S3CRET", "FCM-S3CRET", "API-S3CRET",
           "REDIS-PW-S3CRET", "ENV-S3CRET")


def test_secrets_are_never_echoed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, """\
auth:
  keys: [{name: app, key: SHORTKEY, scopes: [ingest]}]
logging:
  pseudonym_key: [PSEUDO-S3CRET]
delivery:
  webhook: {url: 'https://h.example', secret: {x: WEBHOOK-S3CRET}}
  fcm: {static_token: [FCM-S3CRET], endpoint: 'fcm://:FCM-S3CRET@x'}
weather:
  api_key: [API-S3CRET]
storage:
  redis_url: 'http://:REDIS-PW-S3CRET@r:6379'
""")
    monkeypatch.setenv("GEOPUSH_AUTH_KEYS", '[{"key": "ENV-S3CRET"}]')  # misspelt, not shown
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    problems = raised.value.details
    assert len(problems) == 8
    shown = str(raised.value) + "".join(str(p.as_dict()) for p in problems)
    for secret in SECRETS:
        assert secret not in shown
    assert shown.count("***") >= 6


def test_the_schema_validates_the_bundled_config_and_every_contract_key() -> None:
    import jsonschema
    import yaml

    validator = jsonschema.Draft202012Validator(config_json_schema())
    for doc in (yaml.safe_load(EMBEDDED.read_text()), yaml.safe_load(EVERY_CONTRACT_KEY)):
        assert [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)] == []
    assert not validator.is_valid({"geofence": {"stale_after": "soon"}})
    assert not validator.is_valid({"storage": {"backend": "mongo"}})
