"""Device profiles and consent (contract §6): what a phone's app tells geopush about its user.

Consent is explicit and revocable: every change is kept with its time (audit trail, GDPR
art. 7(1)); an erasure leaves only a keyed hash of the id (`erasure_hash`), the time and the last
consent.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Platform = Literal["android", "ios", "web"]


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
    segments: list[str] | None = None
    consent: Consent | None = None


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


def derived_key(secret: str, purpose: str) -> str:
    """HMAC-SHA256(secret, purpose), hex: the key of one purpose."""
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def erasure_hash(device_id: str, secret: str) -> str:
    """Identity of the device's erasure record: HMAC-SHA256(derived_key(secret, ERASURE_PURPOSE),
    device_id), hex. `geopush erasure-hash DEVICE_ID` prints it for an art. 7(1) request."""
    return device_hash(device_id, derived_key(secret, ERASURE_PURPOSE))


def has_location_consent(profile: DeviceProfile | None) -> bool:
    return profile is not None and profile.consent.location
