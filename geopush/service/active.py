"""The active geofencing: stores → index → tracker → engine, built in one place from settings.

The service, `geopush replay` and a reload all build it here, so they cannot drift apart. A
Geofencing is immutable: a reload builds a new one and swaps the reference, so a request in
flight finishes on the set it started with.

What a reload publishes to the other instances is the `ConfigSet` it was built from: the text
of the stores file and the rules files, so every instance builds the same set whatever its own
files say, and a version that names that content.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from geopush.config import Settings
from geopush.devices import PUSH_ID_PURPOSE, derived_key
from geopush.engine import Engine
from geopush.geo.index import GeofenceIndex
from geopush.geo.stores import StoreSet, read_stores_text, stores_from_text
from geopush.geo.transitions import Tracker
from geopush.rules.decide import Decider
from geopush.rules.load import RuleFile, RulePolicy, RuleSet, read_rule_files, rules_from_files


@dataclass(frozen=True)
class ConfigSet:
    """The files a geofencing is built from, as text: what a reload validates and publishes."""

    stores_source: str  # where the stores came from, for messages ("stores.geojson")
    stores_text: str
    rule_files: tuple[RuleFile, ...] = ()
    # when a reload published it (epoch s): its dwell plan holds for stays entered from then
    # on, on every instance alike. Not part of the content, so not of the version.
    published_at: float | None = field(default=None, compare=False)

    @property
    def version(self) -> str:
        """Names the content: equal files give equal versions on every instance."""
        digest = hashlib.sha256(self.stores_text.encode("utf-8"))
        for rule_file in self.rule_files:
            digest.update(b"\0" + rule_file.name.encode("utf-8") + b"\0")
            digest.update(rule_file.text.encode("utf-8"))
        return digest.hexdigest()[:16]

    def to_bytes(self) -> bytes:
        return json.dumps({"version": self.version, "stores_source": self.stores_source,
                           "stores_text": self.stores_text,
                           "rule_files": [[f.name, f.text] for f in self.rule_files],
                           "published_at": self.published_at}).encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes) -> ConfigSet:
        """Raises ValueError on what a publish did not write."""
        try:
            data = json.loads(raw)
            rule_files = tuple(RuleFile(str(name), str(text))
                               for name, text in data.get("rule_files", []))
            published_at = data.get("published_at")
            return cls(str(data["stores_source"]), str(data["stores_text"]), rule_files,
                       float(published_at) if published_at is not None else None)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"not a published configuration: {exc}") from None


NO_RULES = RuleSet()


@dataclass(frozen=True)
class Geofencing:
    """The active stores and what is built from them; replaced whole, never edited."""

    stores: StoreSet
    index: GeofenceIndex
    engine: Engine
    loaded_at: float
    version: str  # of the ConfigSet it was built from
    rules: RuleSet = NO_RULES


def build_engine(settings: Settings, stores: StoreSet, rules: RuleSet | None = None) -> Engine:
    """The engine as the service wires it, from the settings and validated stores and rules."""
    return build_geofencing(stores, settings, rules=rules).engine


def build_geofencing(stores: StoreSet, settings: Settings, version: str = "",
                     rules: RuleSet | None = None, *, after: Geofencing | None = None,
                     since: float | None = None) -> Geofencing:
    """`after`: the set this one replaces at `since`; stays entered before keep its dwells."""
    rules = rules if rules is not None else NO_RULES
    index = GeofenceIndex.from_stores(stores, hysteresis_m=settings.geofence.exit_hysteresis_m)
    tracker = Tracker(
        index,
        max_accuracy_m=settings.geofence.max_accuracy_m,
        stale_after_s=settings.geofence.stale_after,
        min_visit_s=settings.visits.min_dwell,
        pings_per_minute=settings.limits.device_pings_per_minute,
        dwell_plan=rules.dwell_plan(stores),  # dwell timers for exactly what rules ask
        plan_since=since if since is not None else time.time(),
        earlier=after.engine.tracker if after is not None else None,
    )
    decider = Decider(rules, {g.id: g for g in stores.geofences}, settings.policy,
                      history_s=settings.retention.history,
                      push_id_key=derived_key(settings.logging.pseudonym_key,
                                              PUSH_ID_PURPOSE).encode())
    return Geofencing(stores, index, Engine(tracker, decider), time.time(), version, rules)


def rule_policy(settings: Settings) -> RulePolicy:
    return RulePolicy(store_cooldown_s=settings.policy.store_cooldown,
                      history_s=settings.retention.history)


def read_config_set(settings: Settings) -> ConfigSet:
    """The configured files as text; StoreLoadError or RuleLoadError if one cannot be read."""
    path = Path(settings.stores_file)
    return ConfigSet(str(path), read_stores_text(path), read_rule_files(settings.rules_dir))


def geofencing_of(config: ConfigSet, settings: Settings, after: Geofencing | None = None
                  ) -> Geofencing:
    """Validate and build; StoreLoadError or RuleLoadError lists every error (stores first:
    the rules' selectors are checked against them). `after`: the set it replaces, from the
    time the config was published (stays entered before keep that set's dwell durations)."""
    stores = stores_from_text(config.stores_text, source=config.stores_source,
                              default_radius_m=settings.geofence.default_radius_m)
    rules = rules_from_files(config.rule_files, rule_policy(settings), stores)
    return build_geofencing(stores, settings, config.version, rules, after=after,
                            since=config.published_at)


def load_geofencing(settings: Settings) -> Geofencing:
    """Load the stores and the rules and build on them; StoreLoadError or RuleLoadError lists
    every error."""
    return geofencing_of(read_config_set(settings), settings)
