"""Device tokens: bound to one device and one nonce, verified by any secret of the rotation list,
and nothing else verifies."""

from __future__ import annotations

import pytest

from geopush import tokens

SECRET = "s" * 32
OLD = "o" * 32


def test_a_token_names_its_device_and_nonce() -> None:
    nonce = tokens.new_nonce()
    token = tokens.issue("shop:phone.1", nonce, SECRET)
    assert token.startswith("gpd1.shop:phone.1.")
    assert tokens.verify(token, [SECRET]) == tokens.DeviceToken("shop:phone.1", nonce)


def test_rotation_keeps_tokens_of_an_older_secret_until_it_is_dropped() -> None:
    token = tokens.issue("phone-1", tokens.new_nonce(), OLD)
    assert tokens.verify(token, [SECRET, OLD]) is not None
    assert tokens.verify(token, [SECRET]) is None


def test_nonces_are_random() -> None:
    assert len({tokens.new_nonce() for _ in range(100)}) == 100


@pytest.mark.parametrize("change", [
    lambda t: t.replace("phone-1", "phone-2"),  # another device, same MAC
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # a forged MAC
    lambda t: "gpd2" + t[4:],
    lambda t: t.rsplit(".", 1)[0],  # no MAC
    lambda t: "",
    lambda t: "gpd1...",
    lambda t: "ingest-key-0123456789",  # a server key
])
def test_anything_else_does_not_verify(change: object) -> None:
    token = tokens.issue("phone-1", tokens.new_nonce(), SECRET)
    assert callable(change)
    assert tokens.verify(change(token), [SECRET]) is None


def test_a_token_for_one_device_cannot_be_reshaped_for_another() -> None:
    # the id may hold dots: the MAC covers the whole id, split from the right
    nonce = tokens.new_nonce()
    token = tokens.issue("a.b", nonce, SECRET)
    assert tokens.verify(token, [SECRET]) == tokens.DeviceToken("a.b", nonce)
    mac = token.rsplit(".", 1)[1]
    assert tokens.verify(f"gpd1.a.b.{nonce}.{mac}".replace("a.b", "a"), [SECRET]) is None
