"""The `geopush` command, run as users run it: check, schema, serve, replay (contract §9)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from geopush.cli.main import main
from geopush.yamlspots import load_yaml

REPO = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
MUNICH = FIXTURES / "traces" / "barefoot_munich_x0001-001.csv"
# the console script installed with the package, next to this Python (a venv) or on the PATH
GEOPUSH = Path(sys.executable).parent / "geopush"
if not GEOPUSH.exists():
    GEOPUSH = Path(shutil.which("geopush") or "geopush")

STORES = {"type": "FeatureCollection", "features": [
    {"type": "Feature", "id": "node/1", "properties": {"name": "Corner Shop", "shop": "kiosk"},
     "geometry": {"type": "Point", "coordinates": [14.0, 46.0]}},
]}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("GEOPUSH_"):
            monkeypatch.delenv(name)


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """A config with one store and an empty rules folder; returns the config path."""
    (tmp_path / "stores.geojson").write_text(json.dumps(STORES, indent=1))
    (tmp_path / "rules").mkdir()
    config = tmp_path / "geopush.yaml"
    config.write_text("stores_file: stores.geojson\nrules_dir: rules\n")
    return config


def _geopush(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOPUSH_")}
    return subprocess.run([str(GEOPUSH), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def _main(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# -- check -------------------------------------------------------------------------------------


def test_check_of_the_embedded_default_passes_through_the_console_script() -> None:
    done = _geopush("check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: 30 geofences (30 stores), 5 rule(s), 0 warning(s)" in done.stdout


def test_check_lists_every_config_error_with_file_and_line(
    capsys: pytest.CaptureFixture[str], world: Path
) -> None:
    world.write_text("stores_file: stores.geojson\ngeofence:\n  radius: 10\n"
                     "  stale_after: two hours\n")
    code, out, _ = _main(capsys, "check", "-c", world)
    assert code == 1
    assert f"error: {world}:3: geofence.radius: unknown key" in out
    assert f"error: {world}:4: geofence.stale_after = 'two hours'" in out
    assert "failed: 2 error(s)" in out


def test_check_lists_every_store_error_with_line_feature_field_and_value(
    capsys: pytest.CaptureFixture[str], world: Path
) -> None:
    bad = {"type": "FeatureCollection", "features": [
        STORES["features"][0],
        {"type": "Feature", "id": "node/2", "properties": {"radius_m": -5},
         "geometry": {"type": "Point", "coordinates": [14.0, 46.1]}},
        {"type": "Feature", "properties": {},
         "geometry": {"type": "Point", "coordinates": [14.0, 46.2]}},
        {"type": "Feature", "id": "node/4", "properties": {"opening_hours": "Lu-Sam 10-21"},
         "geometry": {"type": "Point", "coordinates": [14.0, 95.0]}},
    ]}
    stores = world.parent / "bad.geojson"
    text = json.dumps(bad, indent=1)
    stores.write_text(text)
    starts = [n for n, line in enumerate(text.splitlines(), start=1) if line == "  {"]
    code, out, _ = _main(capsys, "check", "-c", world, "--stores", stores)
    assert code == 1
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 3, out
    assert f"bad.geojson:{starts[1]}: feature #1 (id 'node/2'): radius_m = -5" in lines[0]
    assert f"bad.geojson:{starts[2]}: feature #2: id: missing" in lines[1]
    assert "feature #3 (id 'node/4'): geometry.coordinates: latitude 95.0 out of range" in lines[2]
    assert "failed: 3 error(s)" in out


def test_check_reports_store_warnings_and_passes(capsys: pytest.CaptureFixture[str],
                                                 world: Path) -> None:
    code, out, _ = _main(capsys, "check", "-c", world, "--stores",
                         FIXTURES / "paris_supermarkets_2014.geojson")
    assert code == 0
    assert out.count("warning:") == 5  # 4 of the stores, and the empty rules folder
    assert "feature #2 (id 'way/54040540'): opening_hours = 'Lu-Sam 10:00-21:00'" in out
    assert out.rstrip().endswith("ok: 597 geofences (597 stores), 0 rule(s), 5 warning(s)")


def test_check_validates_rules_with_file_line_rule_id_field_value_and_expected(
        capsys: pytest.CaptureFixture[str], world: Path) -> None:
    code, out, _ = _main(capsys, "check", "-c", world)
    assert code == 0
    assert "rules: no rules (*.yaml): geopush will notice enters, dwells and exits and push " \
           "nothing" in out  # an empty folder is said so, not taken as fine
    assert "0 rule(s), 1 warning(s)" in out
    (world.parent / "rules" / "hot-day.yaml").write_text(
        "id: hot-day\n"
        "trigger: {on: dwell, geofences: {tags: [shop:supermarket]}}\n"
        "when:\n"
        "  weather: {temperature_c: {min: 25}, condition: [sunny]}\n"
        "message: {title: 'Hi {{ devise.name }}', body: b}\n")
    code, out, _ = _main(capsys, "check", "-c", world)
    assert code == 1
    lines = [line.replace(f"{world.parent}/", "") for line in out.splitlines()
             if line.startswith("error:")]
    assert lines == [
        'error: rules/hot-day.yaml:2: rule hot-day: trigger = {"on": "dwell", "geofences": '
        '{"tags": ["shop:supermarket"]}}; expected trigger.dwell (how long in the geofence, '
        "e.g. 5m) with on: dwell",
        "error: rules/hot-day.yaml:4: rule hot-day: when.weather.condition.0 = 'sunny'; expected "
        "one of 'clear', 'partly_cloudy', 'cloudy', 'fog', 'drizzle', 'rain', 'snow', "
        "'showers' or 'thunderstorm'",
        "error: rules/hot-day.yaml:5: rule hot-day: message.title: unknown name 'devise': "
        "templates see device, distance_m, event, store, visits, weather; expected a message "
        "template as docs/rules.md describes",
    ], out
    assert "failed: 3 error(s)" in out
    other = world.parent / "more-rules"
    other.mkdir()
    (other / "fine.yaml").write_text(
        "rules:\n  - id: fine\n    trigger: {on: enter, geofences: {ids: [nowhere]}}\n"
        "    message: {title: t, body: b}\n")
    code, out, _ = _main(capsys, "check", "-c", world, "--rules", other)
    assert code == 0, out
    assert "more-rules/fine.yaml:2: rule fine: trigger.geofences {'ids': ['nowhere']} " \
           "matches no geofence of the stores" in out
    assert "1 rule(s), 1 warning(s)" in out


def test_check_with_a_missing_config_file_is_an_error(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    code, out, _ = _main(capsys, "check", "-c", tmp_path / "missing.yaml")
    assert code == 1 and "config file not found" in out


def test_config_path_from_the_environment(capsys: pytest.CaptureFixture[str], world: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOPUSH_CONFIG", str(world))
    code, out, _ = _main(capsys, "check")
    assert code == 0 and "ok: 1 geofences" in out


# -- schema --------------------------------------------------------------------------------


def test_schema_config_prints_json_schema_alone_on_stdout(
    capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _main(capsys, "schema", "config")
    assert code == 0 and err == ""
    schema = json.loads(out)
    assert "geofence" in schema["properties"]


def test_python_dash_m_geopush_runs_the_same_command() -> None:
    done = subprocess.run([sys.executable, "-m", "geopush", "schema", "config"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stderr == ""
    assert json.loads(done.stdout)["additionalProperties"] is False


def test_schema_rules_validates_the_bundled_rules_and_refuses_a_misspelt_key(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main(capsys, "schema", "rules")
    assert code == 0 and err == ""
    schema = json.loads(out)
    validator = jsonschema.Draft202012Validator(schema)
    bundled = sorted((REPO / "rules").glob("*.yaml"))
    assert len(bundled) == 5
    for path in bundled:  # read as YAML 1.2, as editors do (`on:` is a key, not True)
        document = load_yaml(path.read_text(), str(path)).data
        assert not list(validator.iter_errors(document)), path
    rule = load_yaml((REPO / "rules" / "welcome-back.yaml").read_text(), "rule").data
    assert not list(validator.iter_errors({"rules": [rule, rule]}))
    rule["message"]["colour"] = "red"
    assert list(validator.iter_errors(rule))


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["schema", "stores"])
    assert raised.value.code == 2
    assert main([]) == 2
    capsys.readouterr()


# -- serve ----------------------------------------------------------------------------------


def test_serve_without_the_service_module_exits_2(capsys: pytest.CaptureFixture[str],
                                                  world: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "geopush.app", None)
    code, _, err = _main(capsys, "serve", "-c", world)
    assert code == 2 and "geopush.app" in err


def test_serve_hands_the_loaded_settings_to_the_app(capsys: pytest.CaptureFixture[str],
                                                    world: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    fake = types.ModuleType("geopush.app")
    fake.run = seen.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "geopush.app", fake)
    code, _, _ = _main(capsys, "serve", "-c", world)
    assert code == 0
    [settings] = seen
    assert settings.stores_file == world.parent / "stores.geojson"


def test_serve_with_a_bad_config_exits_1(capsys: pytest.CaptureFixture[str], world: Path) -> None:
    world.write_text("sever:\n  port: 1\n")
    code, _, err = _main(capsys, "serve", "-c", world)
    assert code == 1 and f"{world}:1: sever: unknown key" in err


# -- replay ---------------------------------------------------------------------------------


def _pings_csv(path: Path, rows: list[str], header: str = "device_id,ts,lat,lon,accuracy_m,speed_mps"
               ) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


VISIT = [  # device a: far, inside for 6 min, far again
    "a,2026-06-01T10:00:00Z,46.01,14.0,,",
    "a,2026-06-01T10:01:00Z,46.0,14.0,8,0.5",
    "a,2026-06-01T10:07:00Z,46.0001,14.0,8,",
    "a,2026-06-01T10:08:00Z,46.01,14.0,,",
]


def test_replay_json_document_on_stdout_only(world: Path) -> None:
    pings = _pings_csv(world.parent / "pings.csv", VISIT)
    done = _geopush("replay", pings, "-c", world, "--assume-consent", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)  # nothing else on stdout
    assert set(doc) == {"summary", "events", "visits", "decisions"}
    assert doc["summary"]["pings"] == 4 and doc["summary"]["rejected"] == 0
    assert doc["summary"]["events"] == {"enter": 1, "dwell": 0, "exit": 1}
    assert (doc["summary"]["pushes"], doc["summary"]["suppressed"]) == (0, {})
    keys = ("ts", "device_id", "geofence_id", "store_id", "type", "store_name", "stale")
    assert [{k: e[k] for k in keys} for e in doc["events"]] == [
        {"ts": "2026-06-01T10:01:00Z", "device_id": "a", "geofence_id": "node/1",
         "store_id": "node/1", "type": "enter", "store_name": "Corner Shop", "stale": False},
        {"ts": "2026-06-01T10:08:00Z", "device_id": "a", "geofence_id": "node/1",
         "store_id": "node/1", "type": "exit", "store_name": "Corner Shop", "stale": False},
    ]
    assert [set(e) - set(keys) for e in doc["events"]] == [{"distance_m", "speed_mps"}] * 2
    assert doc["decisions"] == []


WIN_BACK = """\
id: win-back
trigger: {on: enter, geofences: {ids: [node/1]}}
when: {visits: {last_visit_days: {min: 21}}}
message: {title: "Welcome back", body: "{{ visits.last_visit_days }} days since your last visit"}
"""


def test_replay_previews_a_win_back_rule_with_earlier_visits_from_devices(world: Path) -> None:
    (world.parent / "rules" / "win-back.yaml").write_text(WIN_BACK)
    pings = _pings_csv(world.parent / "pings.csv", VISIT)
    devices = world.parent / "devices.yaml"
    profile = ("- device_id: a\n  push_token: fcm-a\n"
               "  consent: {location: true, marketing: true}\n")
    devices.write_text(profile + "  visits: [{store_id: node/1, start: 2026-05-01T10:00:00Z, "
                       "end: 2026-05-01T10:20:00Z}]\n")
    done = _geopush("replay", pings, "-c", world, "--devices", devices, "--json")
    assert done.returncode == 0, done.stderr
    [decision] = json.loads(done.stdout)["decisions"]
    assert (decision["rule_id"], decision["outcome"], decision["body"]) == (
        "win-back", "push", "30 days since your last visit")
    devices.write_text(profile)  # no earlier visit: last_visit_days unknown, no candidate
    done = _geopush("replay", pings, "-c", world, "--devices", devices, "--json")
    assert json.loads(done.stdout)["decisions"] == []
    devices.write_text(profile + "  visits: [{store_id: node/1, start: 2026-05-02T10:00:00Z, "
                       "end: 2026-05-01T10:20:00Z}]\n")
    done = _geopush("replay", pings, "-c", world, "--devices", devices, "--json")
    assert done.returncode == 1 and done.stdout == ""
    [error] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "devices.yaml:4: device #0: visits.0 = " in error
    assert "expected a list of {store_id, start, end} with RFC 3339 times, start before end" \
           in error


def test_replay_explain_says_why_each_rule_did_or_did_not_fire(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """README's preview, with --explain: the drive past a real Lidl at 06:54 on a hot day."""
    monkeypatch.setenv("GEOPUSH_GEOFENCE__DEFAULT_RADIUS_M", "400")
    args = ["replay", REPO / "tests/fixtures/traces/barefoot_munich_x0001-001.csv", "--device",
            "car", "--assume-consent", "--stores",
            REPO / "tests/fixtures/germany_lidl_centers_slice.geojson", "--rules",
            REPO / "docs/examples/preview-rules", "--weather", "temperature_c=31,condition=clear",
            "--explain"]
    code, out, _ = _main(capsys, *args)
    assert code == 0
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if "  enter  " in line)
    assert lines[at + 1:at + 3] == [
        "    lidl-drive-by: suppressed (quiet_hours)",
        "    lidl-hot-day: not a candidate: when.speed_mps: 13.51 m/s is not at most 3"]
    exit_at = next(i for i, line in enumerate(lines) if "  exit  " in line)
    assert lines[exit_at + 1] == \
        "    lidl-drive-by: not a candidate: trigger.on is enter, the event is exit"
    code, out, _ = _main(capsys, *args, "--json")
    explained = json.loads(out)["explain"]
    assert [(x["event"], x["rule_id"], x["outcome"], x["reason"]) for x in explained] == [
        ("enter", "lidl-drive-by", "suppressed", "quiet_hours"),
        ("enter", "lidl-hot-day", "not_candidate", None),
        ("exit", "lidl-drive-by", "not_candidate", None),
        ("exit", "lidl-hot-day", "not_candidate", None)]


def test_serve_refuses_bad_rules_with_the_lines_check_prints(world: Path) -> None:
    (world.parent / "rules" / "bad.yaml").write_text(
        "id: Bad\ntrigger: {on: enter, geofences: {tags: [x]}}\n"
        "message: {title: t, body: '{{ x }}'}\n")
    checked = _geopush("check", "-c", world, cwd=world.parent)
    served = _geopush("serve", "-c", world, cwd=world.parent)
    assert checked.returncode == 1 and served.returncode == 1

    def errors(text: str) -> list[str]:
        return [line[line.index("bad.yaml"):] for line in text.splitlines()
                if line.startswith("error: ") and "bad.yaml" in line]

    assert len(errors(checked.stdout)) == 2
    assert errors(served.stderr) == errors(checked.stdout)
    assert "id = 'Bad'; expected lower-case letters, digits and -" in served.stderr


def test_replay_ndjson_with_the_timeline(capsys: pytest.CaptureFixture[str], world: Path) -> None:
    pings = world.parent / "pings.ndjson"
    pings.write_text("\n".join(json.dumps(p) for p in [
        {"device_id": "a", "ts": "2026-06-01T10:00:00Z", "lat": 46.01, "lon": 14.0},
        {"device_id": "a", "ts": "2026-06-01T10:01:00Z", "lat": 46.0, "lon": 14.0,
         "speed_mps": 1.25},
        {"device_id": "a", "ts": "2026-06-01T10:02:00Z", "lat": 46.01, "lon": 14.0},
    ]) + "\n")
    code, out, _ = _main(capsys, "replay", pings, "-c", world, "--assume-consent", "--timeline")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["2026-06-01T10:01:00Z", "a", "enter", "node/1", "Corner", "Shop",
                                "0", "m", "1.2", "m/s"]
    assert lines[1].split()[:4] == ["2026-06-01T10:02:00Z", "a", "exit", "node/1"]
    assert lines[2].startswith("pings 3, rejected 0; events: enter 1, dwell 0, exit 1")
    # with --json the timeline goes to stderr, leaving stdout to the document
    code, out, err = _main(capsys, "replay", pings, "-c", world, "--assume-consent", "--json",
                           "--timeline")
    assert json.loads(out)["summary"]["events"]["enter"] == 1
    assert "2026-06-01T10:01:00Z  a  enter" in err


def test_replay_summary_only(capsys: pytest.CaptureFixture[str], world: Path) -> None:
    pings = _pings_csv(world.parent / "pings.csv", VISIT)
    code, out, _ = _main(capsys, "replay", pings, "-c", world, "--assume-consent", "--json",
                         "--summary-only")
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {"summary"} and doc["summary"]["events"]["exit"] == 1
    code, out, _ = _main(capsys, "replay", pings, "-c", world, "--assume-consent",
                         "--summary-only")
    assert out.startswith("pings 4, rejected 0")


def test_replay_reports_each_malformed_line_and_replays_the_rest(
    capsys: pytest.CaptureFixture[str], world: Path
) -> None:
    rows = [VISIT[0], "a,2026-06-01T10:00:30Z,46.0,fourteen,,", VISIT[1],
            "a,2026-06-01T10:02:00Z,46.0", "a,not-a-time,46.0,14.0,,", *VISIT[2:]]
    pings = _pings_csv(world.parent / "pings.csv", rows)
    code, out, err = _main(capsys, "replay", pings, "-c", world, "--assume-consent", "--json")
    assert code == 0
    assert f"{pings}:3: invalid: lon = 'fourteen': expected a number from -180 to 180" in err
    assert f"{pings}:5: invalid: 3 fields: expected 6" in err
    assert f"{pings}:6: invalid: ts = 'not-a-time': expected RFC 3339" in err
    summary = json.loads(out)["summary"]
    assert (summary["pings"], summary["rejected"]) == (7, 3)
    assert summary["rejected_by_code"] == {"invalid": 3}
    assert summary["events"] == {"enter": 1, "dwell": 0, "exit": 1}


def test_replay_consent_from_devices_file(capsys: pytest.CaptureFixture[str], world: Path) -> None:
    rows = [*VISIT, *(r.replace("a,", "b,", 1) for r in VISIT), *(r.replace("a,", "c,", 1)
                                                                   for r in VISIT)]
    pings = _pings_csv(world.parent / "pings.csv", rows)
    devices = world.parent / "devices.yaml"
    devices.write_text("- device_id: a\n  consent: {location: true, marketing: true}\n"
                       "- device_id: b\n  consent: {location: false, marketing: true}\n")

    def run(*extra: str) -> dict[str, Any]:
        code, out, _ = _main(capsys, "replay", pings, "-c", world, "--json", *extra)
        assert code == 0
        return dict(json.loads(out))

    unknown = run()  # no devices at all: everyone is unknown
    assert unknown["summary"]["rejected_by_code"] == {"no_consent": 12}
    assert unknown["events"] == []
    listed = run("--devices", str(devices))
    assert listed["summary"]["rejected_by_code"] == {"no_consent": 8}
    assert {e["device_id"] for e in listed["events"]} == {"a"}
    assumed = run("--devices", str(devices), "--assume-consent")
    assert assumed["summary"]["rejected_by_code"] == {"no_consent": 4}  # b said no
    assert {e["device_id"] for e in assumed["events"]} == {"a", "c"}


def test_replay_bad_devices_file_exits_1(capsys: pytest.CaptureFixture[str], world: Path) -> None:
    pings = _pings_csv(world.parent / "pings.csv", VISIT)
    devices = world.parent / "devices.yaml"
    devices.write_text("- device_id: a\n  platform: symbian\n")
    code, _, err = _main(capsys, "replay", pings, "-c", world, "--devices", devices)
    assert code == 1 and f"{devices}:2: device #0: platform = 'symbian'" in err


def test_replay_ends_stays_with_a_stale_exit_at_the_end_of_input(
    capsys: pytest.CaptureFixture[str], world: Path
) -> None:
    pings = _pings_csv(world.parent / "pings.csv", VISIT[:3])  # the phone goes quiet inside
    code, out, _ = _main(capsys, "replay", pings, "-c", world, "--assume-consent", "--json")
    assert code == 0
    events = json.loads(out)["events"]
    assert [(e["type"], e["ts"]) for e in events] == [
        ("enter", "2026-06-01T10:01:00Z"), ("exit", "2026-06-01T10:07:00Z")]
    code, out, _ = _main(capsys, "replay", pings, "-c", world, "--assume-consent")
    assert code == 0 and "exit (stale)" in out and "visits 1" in out


def test_replay_of_a_trace_csv_needs_a_device(capsys: pytest.CaptureFixture[str],
                                              world: Path) -> None:
    code, _, err = _main(capsys, "replay", MUNICH, "-c", world)
    assert code == 2 and "--device" in err
    code, out, _ = _main(capsys, "replay", MUNICH, "-c", world, "--device", "car",
                         "--assume-consent", "--json", "--summary-only")
    assert code == 0 and json.loads(out)["summary"]["pings"] == 1194


def test_replay_store_and_weather_options(capsys: pytest.CaptureFixture[str], world: Path) -> None:
    pings = _pings_csv(world.parent / "pings.csv", VISIT)
    code, _, err = _main(capsys, "replay", pings, "-c", world, "--weather", "condition=sunny")
    assert code == 2 and "condition = 'sunny'" in err
    code, _, err = _main(capsys, "replay", pings, "-c", world, "--assume-consent",
                         "--weather", "temperature_c=31,condition=clear")
    assert code == 0 and "weather: {'temperature_c': 31.0, 'condition': 'clear'}" in err
    bad = world.parent / "bad.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature"}]}')
    code, _, err = _main(capsys, "replay", pings, "-c", world, "--stores", bad)
    assert code == 1 and "feature #0" in err
    code, _, err = _main(capsys, "replay", world.parent / "none.csv", "-c", world)
    assert code == 1 and "cannot read pings file" in err


def test_check_goes_on_to_the_stores_when_the_config_is_broken(
    capsys: pytest.CaptureFixture[str], world: Path
) -> None:
    world.write_text("geofence: {radius: 10}\n")
    stores = world.parent / "stores.geojson"
    stores.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "x", "properties": {"timezone": "Mars/Olympus"},
         "geometry": {"type": "Point", "coordinates": [14.0, 46.0]}}]}))
    code, out, _ = _main(capsys, "check", "-c", world, "--stores", stores,
                         "--rules", world.parent / "no-such-folder")
    assert code == 1
    assert f"error: {world}:1: geofence.radius: unknown key" in out
    assert "timezone = 'Mars/Olympus'" in out
    assert "no-such-folder: rules folder not found" in out
    assert "failed: 2 error(s), 1 warning(s)" in out


def test_replay_lists_a_sample_of_repeated_rejections_and_counts_the_rest(
    capsys: pytest.CaptureFixture[str], world: Path
) -> None:
    rows = [f"stranger,2026-06-01T10:{m:02d}:00Z,46.0,14.0,," for m in range(30)]
    pings = _pings_csv(world.parent / "pings.csv", rows)
    code, out, err = _main(capsys, "replay", pings, "-c", world, "--json", "--summary-only")
    assert code == 0 and json.loads(out)["summary"]["rejected_by_code"] == {"no_consent": 30}
    assert err.count(": no_consent: device 'stranger' is unknown") == 20
    assert f"{pings}: ... and 10 more no_consent" in err


def test_replay_reports_bytes_that_are_not_utf8_and_never_a_traceback(
        capsys: pytest.CaptureFixture[str], world: Path) -> None:
    pings = world.parent / "latin1.csv"
    pings.write_bytes(b"device_id,ts,lat,lon,accuracy_m,speed_mps\n"
                      b"a,1780308060000,46.3683,14.1146,10,0.5\n"
                      b"caf\xe9,1780308120000,46.3683,14.1146,10,0.5\n")
    code, out, err = _main(capsys, "replay", pings, "-c", world, "--assume-consent")
    assert code == 0
    assert "latin1.csv:3: invalid: " in err  # that line alone; the rest is replayed
    assert "pings 2, rejected 1" in out
    devices = world.parent / "devices.yaml"
    devices.write_bytes(b"- device_id: caf\xe9\n")
    code, out, err = _main(capsys, "replay", pings, "-c", world, "--devices", devices)
    assert code == 1 and out == ""
    assert "devices.yaml: devices file: not UTF-8 text (byte 16 is 0xe9)" in err
