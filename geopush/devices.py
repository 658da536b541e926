"""Device profiles and consent (contract §6): what a phone's app tells geopush about its user.

Consent is explicit and revocable: every change is kept with its time (audit trail, GDPR
art. 7(1)); an erasure leaves only a keyed hash of the id (`erasure_hash`), the time and the last
consent.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic_core import PydanticCustomError

Platform = Literal["android", "ios", "web"]

# Profile bounds (contract §6). A profile is read with every ping of its device and written
# whole with every change, so its size is a cost on the hot path; and JSON nested deeper than
# orjson writes (255) could be stored but never answered, exported or snapshotted again.
MAX_ATTRIBUTE_DEPTH = 4  # `attributes` itself is level 1
MAX_ATTRIBUTE_KEYS = 64  # the keys of every object inside, all levels together
MAX_ATTRIBUTE_BYTES = 8 * 1024  # as compact JSON
MAX_SEGMENTS = 32
MAX_SEGMENT_CHARS = 64
PROFILE_BOUND = "profile_bound"  # the pydantic error type of a bound that is hit

Segment = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SEGMENT_CHARS)]


class Consent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    location: bool = False
    marketing: bool = False


class DeviceProfile(BaseModel):
    """The stored profile, as PUT and GET /v1/devices/{device_id} show it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str
    push_token: str | None = Field(None, max_length=4096)
    platform: Platform | None = None
    locale: str | None = Field(None, max_length=35, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")
    timezone: str | None = Field(None, max_length=64)
    attributes: dict[str, Any] = Field(default_factory=dict)
    segments: list[str] = Field(default_factory=list)
    consent: Consent = Consent()
    created_at: float | None = None
    updated_at: float | None = None


class DeviceUpdate(BaseModel):
    """Body of PUT (all fields) and PATCH (given fields) /v1/devices/{device_id}."""

    model_config = ConfigDict(extra="forbid")

    push_token: str | None = Field(None, max_length=4096)
    platform: Platform | None = None
    locale: str | None = Field(None, max_length=35, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")
    timezone: str | None = Field(None, max_length=64)
    attributes: dict[str, Any] | None = None
    segments: list[Segment] | None = Field(None, max_length=MAX_SEGMENTS)
    consent: Consent | None = None

    @field_validator("attributes")
    @classmethod
    def _attributes_within_bounds(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_attributes(value)
        return value


def check_attributes(attributes: dict[str, Any]) -> None:
    """Raise PydanticCustomError PROFILE_BOUND, its context naming the bound, a summary of the
    value and what was expected, when the attributes exceed a bound.

    Depth and keys are counted walking down no further than the bounds allow, so a body of
    10,000 nested objects costs no more than one of five; the size comes last, when orjson
    can be trusted to write it."""
    keys = 0
    pending: list[tuple[Any, int, str]] = [(attributes, 1, "attributes")]
    while pending:
        node, depth, where = pending.pop()
        if depth > MAX_ATTRIBUTE_DEPTH:
            raise _bound("depth", f"{where}: nested more than {MAX_ATTRIBUTE_DEPTH} levels deep",
                         f"attributes at most {MAX_ATTRIBUTE_DEPTH} levels deep (objects and "
                         "lists)")
        if type(node) is dict:
            keys += len(node)
            if keys > MAX_ATTRIBUTE_KEYS:
                # counting stops here: the true number may be higher still
                raise _bound("keys", f"at least {keys} keys, counting nested objects",
                             f"at most {MAX_ATTRIBUTE_KEYS} keys in attributes, counting the "
                             "keys of nested objects")
            children: Any = node.items()
        else:
            children = enumerate(node)
        for key, child in children:
            if type(child) is dict or type(child) is list:
                pending.append((child, depth + 1, f"{where}.{key}"))
    size = len(orjson.dumps(attributes))
    if size > MAX_ATTRIBUTE_BYTES:
        raise _bound("size", f"{size} bytes as JSON",
                     f"attributes of at most {MAX_ATTRIBUTE_BYTES} bytes as JSON")


def _bound(bound: str, summary: str, expected: str) -> PydanticCustomError:
    return PydanticCustomError(PROFILE_BOUND, "{summary}: expected {expected}",
                               {"bound": bound, "summary": summary, "expected": expected})


class ConsentChange(BaseModel):
    """One entry of the consent audit trail."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: float  # epoch seconds
    location: bool
    marketing: bool
    source: str = "api"  # which request changed it (PUT, PATCH)


class ErasureRecord(BaseModel):
    """What stays after DELETE: proof of the last consent without the identity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_hash: str
    erased_at: float
    last_consent: Consent | None


def device_hash(device_id: str, key: str) -> str:
    """Keyed hash (HMAC-SHA256) of a device id, hex."""
    return hmac.new(key.encode(), device_id.encode(), hashlib.sha256).hexdigest()


# One secret (`logging.pseudonym_key`), two keys derived from it for two purposes, so a log
# pseudonym is not a prefix of the erasure hash: logs and erasure records cannot be joined
# without the secret (docs/security.md).
LOG_PURPOSE = "geopush log pseudonym v1"
ERASURE_PURPOSE = "geopush erasure record v1"
PUSH_ID_PURPOSE = "geopush push id v1"


def derived_key(secret: str, purpose: str) -> str:
    """HMAC-SHA256(secret, purpose), hex: the key of one purpose."""
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def erasure_hash(device_id: str, secret: str) -> str:
    """Identity of the device's erasure record: HMAC-SHA256(derived_key(secret, ERASURE_PURPOSE),
    device_id), hex. `geopush erasure-hash DEVICE_ID` prints it for an art. 7(1) request."""
    return device_hash(device_id, derived_key(secret, ERASURE_PURPOSE))


def has_location_consent(profile: DeviceProfile | None) -> bool:
    return profile is not None and profile.consent.location
