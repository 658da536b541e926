"""The per-credential request bucket (geopush.service.limits), as tables of times."""

from __future__ import annotations

import pytest

from geopush.service.limits import RequestLimiter, retry_after_s


def waits(per_second: float | None, times: list[float], credential: str = "app") -> list[float]:
    limiter = RequestLimiter(per_second)
    return [round(limiter.admit(credential, t), 6) for t in times]


@pytest.mark.parametrize(("per_second", "times", "expected"), [
    # a burst of one second's worth, then one request every 1/rate s
    pytest.param(2, [0, 0, 0], [0, 0, 0.5], id="burst-of-one-seconds-worth"),
    pytest.param(2, [0, 0, 0.25, 0.5, 0.5], [0, 0, 0.25, 0, 0.5], id="refill"),
    pytest.param(2, [0, 0, 10, 10, 10], [0, 0, 0, 0, 0.5], id="refills-to-the-burst-only"),
    pytest.param(10, [0] * 11, [0] * 10 + [0.1], id="ten-a-second"),
    pytest.param(10, [86_400.0] * 11, [0] * 10 + [0.1], id="ten-a-second-a-day-after-boot"),
    # refused requests take nothing
    pytest.param(1, [0, 0.1, 0.2, 0.9, 1.0], [0, 0.9, 0.8, 0.1, 0], id="refusals-take-nothing"),
    # under one a second, the burst is still one request
    pytest.param(0.2, [0, 1, 5], [0, 4, 0], id="slower-than-one-a-second"),
    pytest.param(None, [0] * 100, [0] * 100, id="off-none"),
    pytest.param(0, [0] * 100, [0] * 100, id="off-zero"),
])
def test_the_bucket_waits(per_second: float | None, times: list[float],
                          expected: list[float]) -> None:
    assert waits(per_second, times) == expected


def test_credentials_have_buckets_of_their_own() -> None:
    limiter = RequestLimiter(1)
    assert [limiter.admit(c, 0.0) for c in ("a", "b", "a", "")] == [0, 0, 1.0, 0]


def test_the_table_of_buckets_stays_bounded_by_the_credentials_in_use() -> None:
    # device tokens make a credential per device: full buckets must not pile up
    limiter = RequestLimiter(10)
    for i in range(100_000):
        assert limiter.admit(f"device-{i}", i * 0.01) == 0
    assert len(limiter) < 3000
    # a recent one still counts: it has nine of its ten left
    assert [limiter.admit("device-99999", 999.99) > 0 for _ in range(10)] == [False] * 9 + [True]


@pytest.mark.parametrize(("wait", "header"), [(0.01, 1), (1.0, 1), (1.2, 2), (4.9999, 5)])
def test_retry_after_is_whole_seconds_rounded_up(wait: float, header: int) -> None:
    assert retry_after_s(wait) == header
