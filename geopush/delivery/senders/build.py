"""The sender `delivery.sender` names, built from the settings at start-up.

The service account key is read and checked here, once, so that a wrong file stops `serve` at
start with one line naming the key and the file, instead of failing every push later with an
OAuth error. `service_account_problem` gives the same verdict without building anything (for
`geopush check`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from google.oauth2 import service_account

from geopush.config import DeliverySettings
from geopush.delivery.senders._http import DEFAULT_POOL_LIMIT, DEFAULT_TIMEOUT_S
from geopush.delivery.senders.base import Sender
from geopush.delivery.senders.fcm import (
    FCM_SCOPE,
    AccessTokens,
    FcmSender,
    OAuthTokens,
    StaticToken,
    payload_builder,
    pyfcm_token_fetch,
)
from geopush.delivery.senders.log import LogSender
from geopush.delivery.senders.webhook import WebhookSender
from geopush.errors import ConfigError

SERVICE_ACCOUNT_KEY = "delivery.fcm.service_account_file"
SERVICE_ACCOUNT_EXPECTED = ('a Google service account JSON key file ("type": "service_account", with '
                            "client_email and private_key; Firebase console > Project settings > "
                            "Service accounts > Generate new private key)")
_REQUIRED_FIELDS = ("client_email", "private_key", "token_uri")


def build_sender(settings: DeliverySettings, *, config_dir: Path | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, pool_limit: int = DEFAULT_POOL_LIMIT) -> Sender:
    """The configured sender. A relative service_account_file is taken from `config_dir`
    (load_settings has already resolved it against the config file's folder).
    Raises ConfigError (one line) when the service account key cannot be used."""
    if settings.sender == "webhook":
        if not settings.webhook.url:  # DeliverySettings refuses this; kept for a hand-made one
            raise ConfigError("delivery.webhook.url: missing; expected the URL pushes are POSTed to "
                              "(sender webhook)")
        return WebhookSender(settings.webhook.url, secret=settings.webhook.secret,
                             timeout_s=timeout_s, pool_limit=pool_limit)
    if settings.sender == "fcm":
        return _fcm_sender(settings, config_dir, timeout_s, pool_limit)
    return LogSender()


def _fcm_sender(settings: DeliverySettings, config_dir: Path | None, timeout_s: float,
                pool_limit: int) -> FcmSender:
    fcm = settings.fcm
    if not fcm.project_id:
        raise ConfigError("delivery.fcm.project_id: missing; expected the Firebase project id "
                          "(sender fcm)")
    tokens: AccessTokens
    if fcm.static_token:
        # an emulator or a test: the Bearer is given, no key is read and no OAuth call is made
        builder = payload_builder(project_id=fcm.project_id)
        tokens = StaticToken(fcm.static_token)
    else:
        if fcm.service_account_file is None:
            raise ConfigError(f"{SERVICE_ACCOUNT_KEY}: missing; expected {SERVICE_ACCOUNT_EXPECTED} "
                              "(or delivery.fcm.static_token for an emulator)")
        path = fcm.service_account_file
        if not path.is_absolute() and config_dir is not None:
            path = config_dir / path
        credentials = load_service_account(path)
        builder = payload_builder(credentials, fcm.project_id)
        tokens = OAuthTokens(pyfcm_token_fetch(builder))
    return FcmSender(fcm.project_id, tokens, endpoint=fcm.endpoint,
                     android_channels={str(k): v for k, v in fcm.android_channels.items()}, builder=builder,
                     timeout_s=timeout_s, pool_limit=pool_limit)


def load_service_account(path: Path) -> service_account.Credentials:
    """The credentials of a service account key file, scoped for FCM.
    Raises ConfigError naming the key, the path and what was expected."""
    info, reason = _read_key(path)
    if info is not None:
        try:
            credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                info, scopes=[FCM_SCOPE])
            return cast(service_account.Credentials, credentials)
        except (ValueError, TypeError):
            # the library's message may quote the key material: never shown
            reason = "its private_key is not a readable PEM private key"
    raise ConfigError(_line(path, reason or "cannot be used"))


def service_account_problem(path: Path) -> str | None:
    """Why the file is not a usable service account key (one line), or None."""
    try:
        load_service_account(path)
    except ConfigError as exc:
        return exc.message
    return None


def _line(path: Path, reason: str) -> str:
    return f"{SERVICE_ACCOUNT_KEY} = {str(path)!r}: {reason}; expected {SERVICE_ACCOUNT_EXPECTED}"


def _read_key(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if path.is_dir():
        return None, "is a folder"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, "not found"
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or type(exc).__name__})"
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"is not JSON (line {exc.lineno}: {exc.msg})"
    if not isinstance(info, dict):
        return None, f"is JSON but not an object (a {type(info).__name__})"
    kind = info.get("type")
    if kind != "service_account":
        # an OAuth client secret or a google-services.json is the usual mix-up
        what = "no \"type\"" if kind is None else f"\"type\": {json.dumps(kind)[:40]}"
        return None, f"is not a service account key ({what})"
    missing = [name for name in _REQUIRED_FIELDS if not isinstance(info.get(name), str) or not info[name]]
    if missing:
        return None, f"lacks {', '.join(missing)}"
    return info, None
