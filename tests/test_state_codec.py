"""Device state as stored JSON: compact arrays, lossless, earlier tracks still readable."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from geopush.geo.model import DeviceState, Stay
from geopush.state.codec import decode_track, encode_track, track_from_json, track_to_json


def _state() -> DeviceState:
    stays = {
        "g1": Stay("g1", "s1", 1_780_000_000.0, 1_780_000_009.5, 48.1, 11.5, 12.25, 1.5,
                   [300.0]),
        "g2": Stay("g2", "s2", 1_780_000_001.0, 1_780_000_002.0, 48.2, 11.6, 0.0, None, []),
    }
    recent = [(1_780_000_000.0 + i, 48.1 + i * 1e-5, 11.5) for i in range(7)]
    return DeviceState(1_780_000_010.0, stays, recent)


@pytest.mark.parametrize("state", [_state(), DeviceState(), DeviceState(5.0, {}, [(5.0, 1.0, 2.0)])])
@pytest.mark.parametrize("due", [None, 1_780_000_300.0])
def test_a_track_reads_back_as_written(state: DeviceState, due: float | None) -> None:
    assert decode_track(encode_track(state, due)) == (state, due)
    assert track_from_json(orjson.loads(orjson.dumps(track_to_json(state, due)))) == (state, due)


def test_a_track_is_arrays_without_key_names() -> None:
    raw = encode_track(_state(), 7.0)
    assert orjson.loads(raw)[:3] == [2, 1_780_000_010.0, 7.0]
    assert b"geofence_id" not in raw and b"last_ts" not in raw and b"state" not in raw


def test_decoded_states_share_nothing_with_each_other() -> None:
    raw = encode_track(_state(), None)
    first, _ = decode_track(raw)
    second, _ = decode_track(raw)
    first.stays["g1"].dwells_fired.append(600.0)
    first.recent.append((1.0, 2.0, 3.0))
    assert second == _state()


def test_a_track_carries_its_format_number_first() -> None:
    assert orjson.loads(encode_track(DeviceState(), None)) == [2, None, None, [], []]


# What the release before format numbers wrote, byte for byte (a Redis value of
# geopush:{d:<id>}:track then): a rolling upgrade meets these in Redis and snapshots.
_PREVIOUS_RELEASE = (
    b'[1780000010.0,1780000300.0,[["g1","s1",1780000000.0,1780000009.5,48.1,11.5,12.25,1.5,'
    b'[300.0]],["g2","s2",1780000001.0,1780000002.0,48.2,11.6,0.0,null,[]]],'
    b'[[1780000000.0,48.1,11.5],[1780000001.0,48.100010000000005,11.5],'
    b'[1780000002.0,48.10002,11.5],[1780000003.0,48.100030000000004,11.5],'
    b'[1780000004.0,48.10004,11.5],[1780000005.0,48.10005,11.5],[1780000006.0,48.10006,11.5]]]')


def test_tracks_the_previous_release_wrote_are_read() -> None:
    assert decode_track(_PREVIOUS_RELEASE) == (_state(), 1_780_000_300.0)
    assert decode_track(b"[null,null,[],[]]") == (DeviceState(), None)
    # and written back in the current format, which reads back the same
    state, due = decode_track(_PREVIOUS_RELEASE)
    assert orjson.loads(encode_track(state, due))[0] == 2
    assert decode_track(encode_track(state, due)) == (_state(), 1_780_000_300.0)


@pytest.mark.parametrize("data", [[3, None, None, [], []], [2.0, None, None, [], []],
                                  [True, None, None, [], []], [None, 1.0, None, [], []]])
def test_a_track_of_an_unknown_format_is_refused_naming_it(data: Any) -> None:
    with pytest.raises(ValueError, match="track format"):
        track_from_json(data)


def test_tracks_of_the_earlier_object_format_are_still_read() -> None:
    state = _state()
    legacy = orjson.dumps({"state": state.to_dict(), "next_due": 9.5})
    assert decode_track(legacy) == (state, 9.5)


@pytest.mark.parametrize("data", [
    3, None, "x", [], [1.0, None, []], [1.0, None, [["g1", "s1"]], []],
    [1.0, None, [["g1", "s1", 1, 2, 3, 4, 5, 6, 7]], []], [1.0, None, [], [3]],
    {"state": 3}, {"next_due": 1.0},
])
def test_what_is_not_a_track_raises(data: Any) -> None:
    with pytest.raises((ValueError, TypeError, KeyError, IndexError, AttributeError)):
        track_from_json(data)


def test_a_track_with_a_rate_bucket_is_format_3_and_reads_back() -> None:
    state = _state()
    state.bucket_empty_ts = 1_779_999_970.5
    raw = encode_track(state, 7.0)
    assert orjson.loads(raw)[0] == 3 and orjson.loads(raw)[5] == 1_779_999_970.5
    assert decode_track(raw) == (state, 7.0)


def test_a_track_without_a_bucket_is_still_written_as_format_2() -> None:
    # so an upgrade rolled out with the limit off writes what the release before reads
    assert orjson.loads(encode_track(_state(), None))[0] == 2
    assert decode_track(b"[2,5.0,null,[],[]]") == (DeviceState(5.0), None)


@pytest.mark.parametrize("data", [[4, None, None, [], [], 1.0], [2, None, None, [], [], 1.0]])
def test_a_six_element_track_other_than_format_3_is_refused(data: Any) -> None:
    with pytest.raises(ValueError, match="track format"):
        track_from_json(data)
