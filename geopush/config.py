"""The one settings object, read once from `config/geopush.yaml` and passed down.

Any key can be overridden by `GEOPUSH_<SECTION>__<KEY>`; unknown keys are errors; paths are
relative to the config file. Every key of contract §11 is here with the contract's default,
validated from the start, including those of features still to come (delivery, weather
providers, attribution; the policy decides in `geopush replay` before the service does): a
configuration written against the contract loads today and keeps its meaning when they land.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from geopush.config_problems import PATTERN_MEANINGS, SECRET_MARK, validation_problems
from geopush.config_sources import ENV_PREFIX, Origin, deep_merge, read_environment
from geopush.durations import Duration
from geopush.errors import ConfigError
from geopush.tokens import PREFIX as TOKEN_PREFIX
from geopush.tokens import looks_like_token
from geopush.yamlspots import YamlError, load_yaml

DEFAULT_CONFIG_PATH = Path("config/geopush.yaml")
DEFAULT_PSEUDONYM_KEY = "change-me"
# marks a secret: never shown in an error, `writeOnly` for editors reading the schema
SECRET: dict[str, Any] = {SECRET_MARK: True, "writeOnly": True}


def _url_check(schemes: tuple[str, ...], what: str) -> AfterValidator:
    def check(url: str | None) -> str | None:
        if url is None:
            return url
        try:
            parts = urlsplit(url)
        except ValueError:
            parts = None
        if parts is None or parts.scheme.lower() not in schemes \
                or not (parts.netloc or (parts.scheme == "unix" and parts.path)):
            raise ValueError(f"expected {what}")
        return url

    return AfterValidator(check)


RedisUrl = Annotated[str, _url_check(("redis", "rediss", "unix"),
                                     "a redis://, rediss:// or unix:// URL")]
HttpUrl = Annotated[str, _url_check(("http", "https"), "an http:// or https:// URL")]
_KEY_PREFIX = r"^[A-Za-z0-9_.:-]+$"
PATTERN_MEANINGS[_KEY_PREFIX] = "letters, digits and _ . : - only"
# Google's rule for project ids (an old domain-scoped project has `example.com:` before it): a
# project's number or display name here would make every send fail, one push at a time
_FIREBASE_PROJECT = r"^(?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$"
PATTERN_MEANINGS[_FIREBASE_PROJECT] = (
    "the Firebase project id (Project settings > General > Project ID): 6-30 lower-case "
    "letters, digits and -, starting with a letter; not the project's number or name")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = Field("0.0.0.0", description="Interface to listen on (loopback only without keys)")
    port: int = Field(8080, ge=0, le=65535)
    shutdown_timeout: Duration = Field(10.0, description="Grace period for in-flight requests")
    max_batch: int = Field(1000, ge=1, le=1000, description="Pings per request at most")
    # Slow clients (contract §12): without these a client holds a connection for an hour.
    header_timeout: Duration = Field(
        10.0, gt=0, description="A new connection's request line and headers must be in within "
        "this; a slower client is answered 408 and closed")
    body_timeout: Duration = Field(
        30.0, gt=0, description="A request body must be in whole within this after its headers "
        "(1 MiB in 30 s is 35 KB/s); else 408 and the connection is closed")
    keepalive_timeout: Duration = Field(
        15.0, gt=0, description="An idle keep-alive connection is closed after this; the next "
        "request's headers must be in by then. Open WebSockets are not idle")
    max_connections: int = Field(
        10_000, ge=1, description="Open connections at most, WebSockets included; more are "
        "answered 503 and closed. Lowered at start to fit the open-files limit (RLIMIT_NOFILE)")


class StorageSettings(_Section):
    backend: Literal["memory", "redis"] = "memory"
    redis_url: RedisUrl = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = Field(
        False, description="redis_url names a node of a Redis Cluster (the client finds the "
        "others); a device's keys share a hash tag, so each device lives on one node")
    snapshot_path: Path | None = Field(
        None, description="memory backend: the state's snapshot; its journal and lock file are "
        "written beside it (None: nothing is kept across restarts)")
    fsync_every: Duration = Field(
        1.0, ge=0, le=60, description="memory backend: pings are on disk at most this long "
        "after they were acknowledged (consent changes and erasures before their answer)")
    key_prefix: str = Field("geopush", pattern=_KEY_PREFIX)
    redis_timeout: Duration = Field(
        2.0, gt=0, le=60, description="how long a Redis call may take before it counts as "
        "failed; a write whose answer is lost is resolved within about twice this, or 503")

    @model_validator(mode="after")
    def _cluster_over_tcp(self) -> StorageSettings:
        if self.redis_cluster and self.redis_url.lower().startswith("unix:"):
            raise ValueError("redis_cluster needs a redis:// or rediss:// node address, "
                             "not a unix:// socket")
        return self


class GeofenceSettings(_Section):
    default_radius_m: float = Field(100.0, gt=0, le=100_000)
    max_accuracy_m: float = Field(100.0, gt=0)
    exit_hysteresis_m: float = Field(25.0, ge=0, le=10_000)
    stale_after: Duration = Field(7200.0, gt=0)


class VisitSettings(_Section):
    min_dwell: Duration = 300.0


class LimitsSettings(_Section):
    """Contract §13. 0 or null turns a limit off."""

    device_pings_per_minute: int | None = Field(
        120, ge=0, le=3600, description="accepted pings per device per 60 s of ping timestamps (a token "
        "bucket kept in the device's state, so it holds across instances); more are rejected "
        "rate_limited. 0 or null: no limit")
    key_requests_per_second: float | None = Field(
        None, ge=0, description="requests per credential and instance (a WebSocket message is "
        "one), burst one second's worth; more are answered 429 with Retry-After. 0 or null: "
        "no limit")


_CLOCK_TIME = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"
PATTERN_MEANINGS[_CLOCK_TIME] = "a time of day HH:MM, 00:00 to 23:59 (quoted: \"21:00\")"
WeatherCondition = Literal["clear", "partly_cloudy", "cloudy", "fog", "drizzle", "rain", "snow",
                           "showers", "thunderstorm"]
Category = Literal["marketing", "service"]
DAY = 86_400.0


class QuietHours(_Section):
    """Local time at the store (where the phone is); `from` after `to` wraps midnight."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    start: str = Field("21:00", alias="from", pattern=_CLOCK_TIME, description="HH:MM")
    end: str = Field("09:00", alias="to", pattern=_CLOCK_TIME, description="HH:MM")


class Cap(_Section):
    max: int = Field(ge=1, description="pushes at most...")
    per: Duration = Field(gt=0, description="...in any rolling window this long")


class Fatigue(_Section):
    ignored_in_a_row: int = Field(3, ge=1, description="pushes not opened within 24 h, in a row")
    pause: Duration = Field(14 * DAY, gt=0)


class PolicySettings(_Section):
    """Push without being pushy (contract §4); marketing pushes only."""

    quiet_hours: QuietHours | None = Field(QuietHours(), description="null: no quiet hours")
    max_per_device: list[Cap] = Field(
        default_factory=lambda: [Cap(max=1, per=DAY), Cap(max=3, per=7 * DAY)])
    min_gap: Duration = Field(4 * 3600.0, ge=0, description="between two marketing pushes")
    fatigue: Fatigue = Fatigue()
    store_cooldown: Duration = Field(
        DAY, ge=0, description="no other marketing push for a store to a device after one")
    max_event_lag: Duration = Field(600.0, gt=0)


MIN_DEVICE_TOKEN_SECRET_CHARS = 32


class AuthKey(_Section):
    name: str = Field(min_length=1)
    key: str = Field(min_length=16, description="Bearer token; at least 16 characters",
                     json_schema_extra=SECRET)
    scopes: list[Literal["ingest", "devices", "admin", "relay"]] = Field(
        min_length=1, description="relay: pings of any device on /v1/pings and /v1/stream, "
        "also with auth.device_tokens: required (a backend relaying its phones' pings)")

    @field_validator("key")
    @classmethod
    def _not_a_device_token(cls, key: str) -> str:
        if looks_like_token(key):
            # it would be read as a device token, never as this key
            raise ValueError(f"a server key may not start with {TOKEN_PREFIX + '.'!r}, the "
                             "prefix of device tokens")
        return key


def _one_or_many(value: Any) -> Any:
    """A single secret (e.g. from one environment variable) is a list of one."""
    return [value] if isinstance(value, str) else value


class AuthSettings(_Section):
    keys: list[AuthKey] = Field(default_factory=list)
    device_tokens: Literal["optional", "required"] = Field(
        "optional", description="required: server keys with only the ingest scope are refused "
        "on every ping endpoint; phones use device tokens, backends relay with the relay scope")
    device_token_secret: Annotated[
        list[Annotated[str, Field(min_length=MIN_DEVICE_TOKEN_SECRET_CHARS)]],
        BeforeValidator(_one_or_many),
    ] = Field(
        default_factory=list, json_schema_extra=SECRET,
        description="The MAC keys of device tokens, newest first: tokens are issued with the "
        "first and verified with any, so a secret is rotated by putting a new one first and "
        "dropping the old one once its tokens are replaced. Separate from "
        "logging.pseudonym_key. Empty: device tokens are off")
    query_tokens: bool = Field(
        False, description="GET|POST /v1/clients/osmand may carry the device token as `key` in "
        "the query string (it ends up in proxies' access logs; Bearer is preferred)")

    @field_validator("keys")
    @classmethod
    def _unique(cls, keys: list[AuthKey]) -> list[AuthKey]:
        seen: set[str] = set()
        for k in keys:
            if k.name in seen:
                raise ValueError(f"duplicate key name {k.name!r}")
            seen.add(k.name)
        return keys

    @model_validator(mode="after")
    def _required_has_a_secret(self) -> AuthSettings:
        if self.device_tokens == "required" and not self.device_token_secret:
            raise ValueError("device_tokens: required needs auth.device_token_secret (a list "
                             f"of secrets of {MIN_DEVICE_TOKEN_SECRET_CHARS}+ characters, "
                             "newest first) to issue and check device tokens")
        return self


class LoggingSettings(_Section):
    format: Literal["json", "text"] = "json"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    pseudonym_key: str = Field(
        DEFAULT_PSEUDONYM_KEY, json_schema_extra=SECRET,
        description="The secret the keys of log pseudonyms and of erasure records are derived "
                    "from (docs/security.md); with auth keys, a random one of 16+ characters")
    delivery_report_every: Duration = Field(60.0, ge=1, description="at least 1s")
    delivery_rate_alert: float = Field(0.9, ge=0, le=1)


def _default_channels() -> dict[Category, str]:
    return {"marketing": "marketing", "service": "service"}


class FcmSettings(_Section):
    project_id: str | None = Field(None, pattern=_FIREBASE_PROJECT)
    service_account_file: Path | None = None
    endpoint: HttpUrl = Field("https://fcm.googleapis.com/v1/projects",
                          description="base URL; an emulator's for tests")
    static_token: str | None = Field(None, description="replaces OAuth (emulators, tests)",
                                     json_schema_extra=SECRET)
    android_channels: dict[Category, str] = Field(
        default_factory=_default_channels,
        description="Android notification channel per rule category")

    @field_validator("project_id", mode="before")
    @classmethod
    def _a_number_is_read_as_text(cls, value: Any) -> Any:
        # a project's number, unquoted in YAML, is then told to be the wrong id, not "text"
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class WebhookSettings(_Section):
    url: HttpUrl | None = None
    secret: str | None = Field(None, description="HMAC-SHA256 key of X-Geopush-Signature",
                               json_schema_extra=SECRET)


class DeliverySettings(_Section):
    sender: Literal["log", "fcm", "webhook"] = "log"
    fcm: FcmSettings = FcmSettings()
    webhook: WebhookSettings = WebhookSettings()
    timeout: Duration = Field(10.0, gt=0, le=120, description="one attempt to send, at most")
    send_lease: Duration = Field(
        60.0, gt=0, description="a push being sent is another instance's to send again after "
        "this (its sender died mid-send); keep it above `timeout`")
    max_in_flight: int = Field(200, ge=1, le=10_000,
                               description="attempts in flight at once per instance")
    process: Literal["auto", "inline", "separate"] = Field(
        "auto", description="where pushes are sent from: `separate`, a process of its own "
        "beside each `geopush serve` (needs storage.backend redis), keeps sends off the event "
        "loop that answers pings; `inline`, in the serving process; `auto`: separate with "
        "redis, inline with memory")

    @model_validator(mode="after")
    def _sender_is_configured(self) -> DeliverySettings:
        if self.sender == "fcm" and not self.fcm.project_id:
            raise ValueError("sender fcm needs delivery.fcm.project_id")
        if self.sender == "fcm" and not (self.fcm.service_account_file or self.fcm.static_token):
            raise ValueError("sender fcm needs delivery.fcm.service_account_file "
                             "(or delivery.fcm.static_token for an emulator)")
        if self.sender == "webhook" and not self.webhook.url:
            raise ValueError("sender webhook needs delivery.webhook.url")
        if self.send_lease <= self.timeout:
            raise ValueError(f"delivery.send_lease ({self.send_lease:g} s) must be longer than "
                             f"delivery.timeout ({self.timeout:g} s): else a push still being "
                             "sent is sent again by another instance")
        return self


class StaticWeather(_Section):
    temperature_c: float | None = None
    condition: WeatherCondition | None = None


class WeatherSettings(_Section):
    provider: Literal["none", "static", "open-meteo"] = "none"
    base_url: HttpUrl = "https://api.open-meteo.com/v1/forecast"
    api_key: str | None = Field(None, description="Open-Meteo's commercial tier",
                                json_schema_extra=SECRET)
    refresh: Duration = Field(900.0, gt=0, description="per ~0.1° cell with recent events")
    static: StaticWeather | None = None

    @model_validator(mode="after")
    def _static_is_given(self) -> WeatherSettings:
        if self.provider == "static" and (self.static is None or (
                self.static.temperature_c is None and self.static.condition is None)):
            raise ValueError("provider static needs weather.static {temperature_c, condition}")
        return self


class AttributionSettings(_Section):
    window: Duration = Field(DAY, gt=0, description="a visit this soon after a push counts")


class RetentionSettings(_Section):
    history: Duration = Field(180 * DAY, gt=0, description="visits, pushes and decisions kept")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    stores_file: Path = Path("../stores.geojson")
    rules_dir: Path = Path("../rules")
    server: ServerSettings = ServerSettings()
    storage: StorageSettings = StorageSettings()
    geofence: GeofenceSettings = GeofenceSettings()
    visits: VisitSettings = VisitSettings()
    limits: LimitsSettings = LimitsSettings()
    policy: PolicySettings = PolicySettings()
    auth: AuthSettings = AuthSettings()
    logging: LoggingSettings = LoggingSettings()
    weather: WeatherSettings = WeatherSettings()
    delivery: DeliverySettings = DeliverySettings()
    attribution: AttributionSettings = AttributionSettings()
    retention: RetentionSettings = RetentionSettings()

    # where each key was written, for errors found after loading (geopush.preflight)
    _origin: Origin | None = PrivateAttr(None)

    @property
    def origin(self) -> Origin:
        return self._origin if self._origin is not None else Origin()

    def with_origin(self, origin: Origin) -> Settings:
        copy = self.model_copy()
        copy._origin = origin
        return copy

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings merges the file and the environment (geopush.config_sources reads the
        # GEOPUSH_* variables, so that each one is accounted for); the constructor takes
        # only what it is given
        return (init_settings,)


def config_path_from_env(explicit: str | Path | None) -> Path:
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get("GEOPUSH_CONFIG", str(DEFAULT_CONFIG_PATH)))


def load_settings(path: str | Path | None = None, *, overrides: dict[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Read, validate and resolve the settings: the file, then GEOPUSH_* variables over it.
    Raise ConfigError listing every problem, each naming file:line or the variable, the key,
    the value (never a secret's) and what was expected."""
    environ = os.environ if environ is None else environ
    config_path = config_path_from_env(path)
    text = ""
    if config_path.exists():
        try:
            text = config_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{config_path}: cannot read config file: {reason}") from None
    elif path is not None or "GEOPUSH_CONFIG" in environ:
        raise ConfigError(f"{config_path}: config file not found")
    try:
        document = load_yaml(text, str(config_path))
    except YamlError as exc:
        raise ConfigError(f"{config_path}: not valid YAML", [exc.problem]) from None
    raw = document.data if document.data is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: expected a mapping of settings, got {type(raw).__name__}")
    env = read_environment(Settings, environ)
    raw = deep_merge(deep_merge(raw, env.values), overrides or {})
    origin = Origin(config_path, document.tree, env.labels)
    try:
        settings = Settings(**raw)
    except ValidationError as exc:
        raise ConfigError(f"{config_path}: invalid settings",
                          env.problems + validation_problems(exc, Settings, origin)) from None
    if env.problems:
        raise ConfigError(f"{config_path}: invalid settings", env.problems)
    return _resolve_paths(settings, config_path.parent).with_origin(origin)


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    def resolve(p: Path | None) -> Path | None:
        if p is None or p.is_absolute():
            return p
        return (base / p).resolve()

    storage = settings.storage.model_copy(update={"snapshot_path": resolve(settings.storage.snapshot_path)})
    fcm = settings.delivery.fcm.model_copy(
        update={"service_account_file": resolve(settings.delivery.fcm.service_account_file)})
    return settings.model_copy(
        update={
            "stores_file": resolve(settings.stores_file),
            "rules_dir": resolve(settings.rules_dir),
            "storage": storage,
            "delivery": settings.delivery.model_copy(update={"fcm": fcm}),
        }
    )


def config_json_schema() -> dict[str, Any]:
    return Settings.model_json_schema()
