"""The shape of a rule (contract §3), as marketers write it in `rules/*.yaml`.

Pydantic models with unknown keys forbidden; `geopush schema rules` prints them as JSON Schema
for editors. What one rule cannot say about itself on its own (ids unique across files, caps
within the retention, a cooldown no shorter than the policy's) is checked by the loader, which
knows the settings and the other rules.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from geopush.config import WeatherCondition as ReportedCondition
from geopush.config_problems import PATTERN_MEANINGS
from geopush.durations import Duration
from geopush.geo.model import Activity

RULE_ID = r"^[a-z0-9-]+$"
PATTERN_MEANINGS[RULE_ID] = "lower-case letters, digits and - only (e.g. hot-day-ice-cream)"
CLOCK_TIME = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"
PATTERN_MEANINGS[CLOCK_TIME] = "a time of day HH:MM, 00:00 to 23:59"

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Condition = ReportedCondition  # from WMO codes, as the weather providers report them
Category = Literal["marketing", "service"]
TriggerOn = Literal["enter", "dwell", "exit"]

# message.data keys FCM keeps for itself, and the one geopush sets
RESERVED_DATA_KEYS = frozenset({"push_id", "from"})
RESERVED_DATA_PREFIXES = ("google.", "gcm.")
MAX_TEMPLATE_CHARS = 4096


ClockTime = Annotated[str, Field(pattern=CLOCK_TIME, description="HH:MM")]
Template = Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS,
                                description="a Jinja2 template (sandboxed)")]


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Range(_Part):
    """Bounds, each optional, both inclusive."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounded(self) -> Range:
        if self.min is None and self.max is None:
            raise ValueError("expected min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"expected min ({self.min:g}) at most max ({self.max:g})")
        return self

    def holds(self, value: float | None) -> bool:
        """Unknown never holds."""
        if value is None:
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class GeofenceSelector(_Part):
    """Any of: a geofence or store id, or a tag (`cuisine:ice_cream`) of the geofence."""

    tags: list[Annotated[str, Field(min_length=1)]] = []
    ids: list[Annotated[str, Field(min_length=1)]] = []

    @model_validator(mode="after")
    def _some(self) -> GeofenceSelector:
        if not self.tags and not self.ids:
            raise ValueError("expected at least one selector: tags or ids")
        return self


class Trigger(_Part):
    on: TriggerOn
    dwell: Duration | None = Field(None, gt=0, description="with on: dwell")
    geofences: GeofenceSelector

    @model_validator(mode="after")
    def _dwell_with_dwell(self) -> Trigger:
        if self.on == "dwell" and self.dwell is None:
            raise ValueError("expected trigger.dwell (how long in the geofence, e.g. 5m) "
                             "with on: dwell")
        if self.on != "dwell" and self.dwell is not None:
            raise ValueError(f"expected no trigger.dwell with on: {self.on} (dwell goes "
                             "with on: dwell)")
        return self


class LocalTime(_Part):
    """The store's local time; `from` after `to` wraps midnight."""

    days: list[Day] = Field(default_factory=lambda: list(DAYS), min_length=1)
    start: ClockTime = Field("00:00", alias="from")
    end: ClockTime = Field("23:59", alias="to")

    @model_validator(mode="after")
    def _not_empty(self) -> LocalTime:
        if self.start == self.end:
            raise ValueError(f"expected from and to to differ (both are {self.start}: the "
                             "window would be empty)")
        return self


class Dates(_Part):
    start: date | None = Field(None, alias="from")
    end: date | None = Field(None, alias="to")

    @model_validator(mode="after")
    def _ordered(self) -> Dates:
        if self.start is None and self.end is None:
            raise ValueError("expected from, to or both")
        if self.start is not None and self.end is not None and self.start > self.end:
            raise ValueError(f"expected from ({self.start}) on or before to ({self.end})")
        return self


class WeatherCondition(_Part):
    temperature_c: Range | None = None
    condition: list[Condition] | None = Field(None, min_length=1)


class Segments(_Part):
    any: list[str] = []
    none: list[str] = []


class VisitsCondition(_Part):
    last_visit_days: Range | None = None
    count_90d: Range | None = None


AttributeValue = str | int | float | bool


class When(_Part):
    """All must hold; each is optional."""

    local_time: LocalTime | None = None
    dates: Dates | None = None
    store_open: bool | None = None
    weather: WeatherCondition | None = None
    segments: Segments | None = None
    visits: VisitsCondition | None = None
    speed_mps: Range | None = None
    activity: list[Activity] | None = Field(None, min_length=1)
    attributes: dict[str, list[AttributeValue]] = {}


class Cap(_Part):
    max: int = Field(ge=1, description="pushes of this rule at most...")
    per: Duration = Field(gt=0, description="...to one device in any rolling window this long")


class Caps(_Part):
    per_device: list[Cap] = []
    store_cooldown: Duration | None = Field(
        None, gt=0, description="per device and store, across all rules; at least the policy's")


class LocalMessage(_Part):
    title: Template
    body: Template


class Message(_Part):
    title: Template
    body: Template
    ttl: Duration = Field(1800.0, gt=0, description="never delivered later than this")
    data: dict[str, Template] = {}
    locales: dict[Annotated[str, Field(pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")],
                  LocalMessage] = {}


class Rule(_Part):
    """One rule of `rules/*.yaml`."""

    id: str = Field(pattern=RULE_ID, min_length=1, max_length=64)
    enabled: bool = True
    priority: int = Field(0, description="several rules match: the highest eligible wins")
    category: Category = "marketing"
    trigger: Trigger
    when: When = When()
    caps: Caps = Caps()
    holdout: float = Field(0.0, ge=0, lt=1, description="share of devices held out (control)")
    message: Message

    @model_validator(mode="after")
    def _service_has_no_holdout(self) -> Rule:
        if self.category == "service" and self.holdout:
            raise ValueError("expected no holdout on a category: service rule (a "
                             "transactional push is never held back)")
        return self


def reserved_data_key(key: str) -> bool:
    return key in RESERVED_DATA_KEYS or key.startswith(RESERVED_DATA_PREFIXES)


def rules_json_schema() -> dict[str, Any]:
    """A rules file: one rule, or a list of them under `rules:`."""
    rule = Rule.model_json_schema(by_alias=True)
    definitions = rule.pop("$defs", {})
    definitions["Rule"] = rule
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "geopush rules file",
        "oneOf": [
            {"$ref": "#/$defs/Rule"},
            {"type": "object", "additionalProperties": False, "required": ["rules"],
             "properties": {"rules": {"type": "array", "items": {"$ref": "#/$defs/Rule"}}}},
        ],
        "$defs": definitions,
    }

