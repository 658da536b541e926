"""The cyclic collector tuned for long-lived heaps (geopush.collector): a batch command sets
the thresholds for its run and gives the old ones back."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from geopush.cli.main import main
from geopush.collector import BATCH_THRESHOLDS, tuned_for_batch

REPO = Path(__file__).resolve().parent.parent


def test_a_batch_runs_with_the_thresholds_and_gives_the_old_ones_back() -> None:
    before = gc.get_threshold()
    assert before != BATCH_THRESHOLDS
    with tuned_for_batch():
        assert gc.get_threshold() == BATCH_THRESHOLDS
    assert gc.get_threshold() == before
    with pytest.raises(RuntimeError), tuned_for_batch():
        raise RuntimeError("a replay that fails")
    assert gc.get_threshold() == before


def test_replay_tunes_the_collector_for_its_run_only(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from geopush.cli import replay

    seen: list[tuple[int, ...]] = []
    run = replay.Replay.run

    def watched(self: replay.Replay, records: object) -> replay.ReplayResult:
        seen.append(gc.get_threshold())
        return run(self, records)  # type: ignore[arg-type]

    monkeypatch.setattr(replay.Replay, "run", watched)
    before = gc.get_threshold()
    code = main(["replay", str(REPO / "tests/fixtures/traces/barefoot_munich_x0001-001.csv"),
                 "--device", "car", "--assume-consent", "--summary-only",
                 "--stores", str(REPO / "tests/fixtures/germany_lidl_centers_slice.geojson")])
    capsys.readouterr()
    assert code == 0 and seen == [BATCH_THRESHOLDS] and gc.get_threshold() == before
