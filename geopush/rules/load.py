"""Rules files → a validated RuleSet, or every error with file:line, rule id, field, value and
what was expected (contract §3).

Pure: the caller reads the files (`read_rule_files`) and passes their text, so a reload can
publish exactly what it validated. What one rule cannot check alone is checked here: ids unique
across files, a marketing rule's store cooldown no shorter than the policy's, caps no longer than
the retention (a longer window could not be counted), reserved `message.data` keys. Templates are
compiled here, so a template that cannot render is a load error, not a surprise at push time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from geopush.config_problems import validation_problems
from geopush.config_sources import Origin
from geopush.durations import format_duration
from geopush.errors import Problem, Report, RuleLoadError, shortened
from geopush.geo.stores import Geofence, StoreSet
from geopush.rules.schema import Rule, reserved_data_key
from geopush.rules.templates import CompiledTemplate, TemplateProblem, compile_template
from geopush.yamlspots import YamlError, line_of, load_yaml, node_at

RULE_SUFFIXES = (".yaml", ".yml")
MAX_RULE_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class RuleFile:
    """A rules file as text: what a reload validates and publishes."""

    name: str  # as shown in errors: "rules/ice-cream.yaml"
    text: str


@dataclass(frozen=True)
class CompiledMessage:
    title: CompiledTemplate
    body: CompiledTemplate
    data: dict[str, CompiledTemplate]
    locales: dict[str, tuple[CompiledTemplate, CompiledTemplate]]  # locale → (title, body)


@dataclass(frozen=True)
class LoadedRule:
    rule: Rule
    where: str  # file:line of the rule
    message: CompiledMessage

    @property
    def id(self) -> str:
        return self.rule.id

    def selects(self, geofence: Geofence) -> bool:
        """The trigger's selector names the geofence, its store or one of its tags."""
        selector = self.rule.trigger.geofences
        if geofence.id in selector.ids or geofence.store_id in selector.ids:
            return True
        return any(tag in geofence.tags for tag in selector.tags)


@dataclass(frozen=True)
class RuleSet:
    """The validated rules, ordered by id; replaced whole on reload, never edited."""

    rules: tuple[LoadedRule, ...] = ()
    warnings: tuple[Problem, ...] = ()

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def enabled(self) -> tuple[LoadedRule, ...]:
        return tuple(r for r in self.rules if r.rule.enabled)

    def dwell_plan(self, stores: StoreSet) -> Callable[[str], Sequence[float]]:
        """geofence id → the dwell durations enabled rules ask of it (the tracker's plan)."""
        dwell_rules = [r for r in self.enabled if r.rule.trigger.on == "dwell"]
        plan: dict[str, tuple[float, ...]] = {}
        if dwell_rules:
            for geofence in stores.geofences:
                durations = {r.rule.trigger.dwell for r in dwell_rules if r.selects(geofence)}
                if durations:
                    plan[geofence.id] = tuple(sorted(d for d in durations if d is not None))
        return lambda geofence_id: plan.get(geofence_id, ())

    def as_json(self) -> list[dict[str, Any]]:
        return [{**r.rule.model_dump(mode="json", by_alias=True), "where": r.where}
                for r in self.rules]


@dataclass(frozen=True)
class RulePolicy:
    """What of the settings the rules are checked against."""

    store_cooldown_s: float  # policy.store_cooldown
    history_s: float  # retention.history


def read_rule_files(rules_dir: Path, shown_as: str | None = None) -> tuple[RuleFile, ...]:
    """The `*.yaml`/`*.yml` files of the folder, by name; RuleLoadError if one cannot be read.
    A folder that does not exist holds no rules (the caller warns)."""
    if not rules_dir.is_dir():
        return ()
    prefix = shown_as if shown_as is not None else str(rules_dir)
    files = []
    for path in sorted(p for p in rules_dir.iterdir() if p.suffix in RULE_SUFFIXES):
        name = f"{prefix.rstrip('/')}/{path.name}"
        try:
            # read with a bound, not by its size: a link to /dev/zero says 0 bytes
            with path.open("rb") as f:
                raw = f.read(MAX_RULE_FILE_BYTES + 1)
            if len(raw) > MAX_RULE_FILE_BYTES:
                raise RuleLoadError(f"{name}: larger than {MAX_RULE_FILE_BYTES >> 20} MiB; "
                                    "expected a rules file")
            files.append(RuleFile(name, raw.decode("utf-8")))
        except OSError as exc:
            raise RuleLoadError(f"{name}: cannot read rules file: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise RuleLoadError(f"{name}: not UTF-8 text; expected a YAML rules file") from None
    return tuple(files)


def rules_from_files(files: Sequence[RuleFile], policy: RulePolicy,
                     stores: StoreSet | None = None) -> RuleSet:
    """Validate; RuleLoadError lists every error."""
    rules, report = parse_rules(files, policy, stores)
    if rules is None:
        raise RuleLoadError(f"rules: {len(report.errors)} error(s)", report.problems)
    return rules


def parse_rules(files: Sequence[RuleFile], policy: RulePolicy,
                stores: StoreSet | None = None) -> tuple[RuleSet | None, Report]:
    """(rules, report); rules is None when there are errors. With `stores`, a selector that
    matches no geofence is a warning."""
    report = Report()
    loaded: list[LoadedRule] = []
    first_seen: dict[str, str] = {}
    for file in files:
        for rule in _file_rules(file, policy, report):
            if rule.id in first_seen:
                report.error(rule.where, f"rule {rule.id}: id is already used at "
                             f"{first_seen[rule.id]}", field="id", value=rule.id,
                             expected="an id of its own")
                continue
            first_seen[rule.id] = rule.where
            loaded.append(rule)
    if stores is not None:
        for rule in loaded:
            if not any(rule.selects(g) for g in stores.geofences):
                selector = rule.rule.trigger.geofences.model_dump(exclude_defaults=True)
                report.warning(rule.where, f"rule {rule.id}: trigger.geofences {selector} "
                               "matches no geofence of the stores", field="trigger.geofences",
                               value=selector, expected="ids or tags of loaded stores")
    if report.errors:
        return None, report
    loaded.sort(key=lambda r: r.id)
    return RuleSet(tuple(loaded), tuple(report.warnings)), report


# -- one file ------------------------------------------------------------------------------


def _file_rules(file: RuleFile, policy: RulePolicy, report: Report) -> list[LoadedRule]:
    try:
        document = load_yaml(file.text, file.name)
    except YamlError as exc:
        report.problems.append(exc.problem)
        return []
    data, tree = document.data, document.tree
    if data is None:
        report.warning(f"{file.name}:1", "the file holds no rules", expected="a rule, or "
                       "a list of rules under `rules:`")
        return []
    if isinstance(data, dict) and "rules" in data:
        extra = sorted(str(k) for k in data if k != "rules")
        if extra:
            report.error(_where(file, tree, [extra[0]]), f"{extra[0]}: unknown key next to "
                         "`rules:`", field=extra[0], expected="only `rules:` (a list of rules)")
            return []
        items = data["rules"]
        if not isinstance(items, list):
            report.error(_where(file, tree, ["rules"]), f"rules = {_say(items)}",
                         field="rules", value=_say(items), expected="a list of rules")
            return []
        paths: list[list[str | int]] = [["rules", i] for i in range(len(items))]
    elif isinstance(data, dict):
        items, paths = [data], [[]]
    else:
        report.error(f"{file.name}:1", f"the file holds {_say(data)}", value=_say(data),
                     expected="a rule (a mapping with an id), or a list of rules under `rules:`")
        return []
    rules = []
    for item, path in zip(items, paths, strict=True):
        rule = _one_rule(file, tree, path, item, policy, report)
        if rule is not None:
            rules.append(rule)
    return rules


def _one_rule(file: RuleFile, tree: yaml.Node | None, path: list[str | int], item: Any,
              policy: RulePolicy, report: Report) -> LoadedRule | None:
    where = _where(file, tree, path)
    if not isinstance(item, dict):
        report.error(where, f"a rule is {_say(item)}", value=_say(item),
                     expected="a mapping with id, trigger and message")
        return None
    rule_id = item.get("id") if isinstance(item.get("id"), str) else None
    label = f"rule {rule_id}" if rule_id else f"the rule at {where}"
    node = node_at(tree, path)
    origin = Origin(Path(file.name), node)
    errors_before = len(report.errors)

    def problem(loc: Sequence[str | int], message: str, value: Any, expected: str) -> None:
        report.error(origin.where(list(loc)), f"{label}: {message}",
                     field=".".join(map(str, loc)), value=value, expected=expected)

    try:
        rule = Rule.model_validate(item)
    except ValidationError as exc:
        for found in validation_problems(exc, Rule, origin, schema="rules"):
            report.problems.append(replace(found, message=f"{label}: {found.message}"))
        _compile_raw_templates(item.get("message"), problem)  # their errors too, at once
        return None

    cooldown = rule.caps.store_cooldown
    if rule.category == "marketing" and cooldown is not None \
            and cooldown < policy.store_cooldown_s:
        problem(("caps", "store_cooldown"),
                f"caps.store_cooldown = {format_duration(cooldown)} is shorter than "
                f"policy.store_cooldown ({format_duration(policy.store_cooldown_s)})",
                format_duration(cooldown),
                f"at least {format_duration(policy.store_cooldown_s)} (a rule may lengthen "
                "the policy's cooldown, not shorten it)")
    for i, cap in enumerate(rule.caps.per_device):
        if cap.per > policy.history_s:
            problem(("caps", "per_device", i, "per"),
                    f"caps.per_device[{i}].per = {format_duration(cap.per)} is longer than "
                    f"retention.history ({format_duration(policy.history_s)})",
                    format_duration(cap.per),
                    f"at most {format_duration(policy.history_s)}: older pushes are not kept "
                    "to be counted")
    for key in rule.message.data:
        if reserved_data_key(key):
            problem(("message", "data", key), f"message.data key {key!r} is reserved",
                    key, "another key (push_id, from, google.* and gcm.* are FCM's or "
                    "geopush's)")
    message = _compile_message(rule, problem)
    if message is None or len(report.errors) > errors_before:
        return None
    return LoadedRule(rule, where, message)


def _compile_message(rule: Rule, problem: Callable[..., None]) -> CompiledMessage | None:
    msg = rule.message
    title = _compiled(("message", "title"), msg.title, problem)
    body = _compiled(("message", "body"), msg.body, problem)
    data = {k: _compiled(("message", "data", k), v, problem) for k, v in msg.data.items()}
    locales = {loc: (_compiled(("message", "locales", loc, "title"), m.title, problem),
                     _compiled(("message", "locales", loc, "body"), m.body, problem))
               for loc, m in msg.locales.items()}
    compiled_data = {k: t for k, t in data.items() if t is not None}
    compiled_locales = {k: (t, b) for k, (t, b) in locales.items()
                        if t is not None and b is not None}
    if title is None or body is None or len(compiled_data) < len(data) \
            or len(compiled_locales) < len(locales):
        return None  # each failed template was reported
    return CompiledMessage(title, body, compiled_data, compiled_locales)


def _compile_raw_templates(message: Any, problem: Callable[..., None]) -> None:
    """The templates of a rule that did not validate, for their errors."""
    if not isinstance(message, dict):
        return
    sources: list[tuple[tuple[str | int, ...], Any]] = [
        (("message", "title"), message.get("title")), (("message", "body"), message.get("body"))]
    if isinstance(message.get("data"), dict):
        sources += [(("message", "data", k), v) for k, v in message["data"].items()]
    if isinstance(message.get("locales"), dict):
        for loc, texts in message["locales"].items():
            if isinstance(texts, dict):
                sources += [(("message", "locales", loc, part), texts.get(part))
                            for part in ("title", "body")]
    for loc, source in sources:
        if isinstance(source, str):
            _compiled(loc, source, problem)


def _compiled(loc: tuple[str | int, ...], source: str,
              problem: Callable[..., None]) -> CompiledTemplate | None:
    result = compile_template(source)
    if isinstance(result, TemplateProblem):
        line = f" (template line {result.line})" if result.line and "\n" in source else ""
        problem(loc, f"{'.'.join(map(str, loc))}: {result.message}{line}", shortened(source, 80),
                "a message template as docs/rules.md describes")
        return None
    return result


def _where(file: RuleFile, tree: yaml.Node | None, path: Sequence[str | int]) -> str:
    line = line_of(tree, list(path))
    return f"{file.name}:{line}" if line else file.name


def _say(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {shortened(repr(value), 40)}"

