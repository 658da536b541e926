"""Message templates: sandboxed Jinja2 that cannot hang or exhaust the process (contract §3).

Jinja2's sandbox stops attribute tricks (`__class__`, `mro`) but not work: `9**9**9`,
`'x'*10**9`, a macro that calls itself twice per level, a filter that pads to a billion
characters. Here a template is checked when the rules load, so what it may do is bounded before
it ever renders:

- only the data a rule is given (`store`, `device`, `weather`, `distance_m`, `event`, `visits`)
  and `range`; any other name is a load error;
- filters from an allowlist of ones whose output is no bigger than their input (plus `join`,
  over the given lists); no `set`/`with` (a ~ a per line doubles a string into gigabytes), no
  loop inside a loop, no macros, call blocks, recursive loops, includes or imports;
- `**` and `*` refuse operands whose result would be huge; `range` yields at most
  MAX_RANGE items, and all the ranges of one render together at most MAX_ITERATIONS.

Rendering is bounded too: a render over RENDER_BUDGET_S or an output over MAX_OUTPUT_CHARS
fails with TemplateFailure, which the decision records as `template_error`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# the names a template sees (contract §3), and the one function
CONTEXT_NAMES = frozenset({"store", "device", "weather", "distance_m", "event", "visits"})
ALLOWED_FILTERS = frozenset({
    "abs", "capitalize", "count", "d", "default", "e", "escape", "first", "float", "int",
    "join", "last", "length", "list", "lower", "max", "min", "reverse",
    "round", "sort", "string", "sum", "title", "trim", "truncate", "unique", "upper",
})
MAX_RANGE = 1_000
MAX_ITERATIONS = 10_000
MAX_INT_BITS = 256  # a number in a message needs far fewer
MAX_SEQUENCE = 4_096  # characters (or items) a `*` may make
MAX_OUTPUT_CHARS = 4_096
RENDER_BUDGET_S = 0.050


class TemplateFailure(Exception):
    """A template that did not render within its bounds; the message says why."""


@dataclass(frozen=True)
class TemplateProblem:
    """A template that cannot be loaded: `message` says what, for the loader's error line."""

    message: str
    line: int | None = None  # within the template text


_iterations: ContextVar[list[int]] = ContextVar("geopush_template_iterations")


def _bounded_range(*args: int) -> Iterator[int]:
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise SecurityError(f"range of {len(numbers)} items (at most {MAX_RANGE})")
    budget = _iterations.get(None)
    if budget is not None:
        budget[0] += len(numbers)
        if budget[0] > MAX_ITERATIONS:
            raise SecurityError(f"more than {MAX_ITERATIONS} loop iterations in one render")
    return iter(numbers)


def _sized(value: Any) -> int | None:
    if isinstance(value, str | list | tuple):
        return len(value)
    return None


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"**", "*"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 \
                    and max(abs(left), 1).bit_length() * right > MAX_INT_BITS:
                raise SecurityError(f"{left} ** {right} is too large")
            try:
                return left ** right
            except OverflowError:
                raise SecurityError(f"{left} ** {right} is too large") from None
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                size = _sized(sequence)
                if size is not None and isinstance(times, int) and size * times > MAX_SEQUENCE:
                    raise SecurityError(f"a sequence of {size} * {times} is too long "
                                        f"(at most {MAX_SEQUENCE})")
            if isinstance(left, int) and isinstance(right, int) \
                    and abs(left).bit_length() + abs(right).bit_length() > MAX_INT_BITS:
                raise SecurityError(f"{left} * {right} is too large")
            return left * right
        return super().call_binop(context, operator, left, right)  # pragma: no cover


def _environment() -> _BoundedSandbox:
    env = _BoundedSandbox(undefined=StrictUndefined, autoescape=False,
                          keep_trailing_newline=False)
    env.filters = {name: f for name, f in env.filters.items() if name in ALLOWED_FILTERS}
    env.globals = {"range": _bounded_range}
    return env


ENVIRONMENT = _environment()
_REFUSED_NODES: tuple[tuple[type[nodes.Node], str], ...] = (
    (nodes.Macro, "{% macro %}"), (nodes.CallBlock, "{% call %}"),
    (nodes.Include, "{% include %}"), (nodes.Import, "{% import %}"),
    (nodes.FromImport, "{% from ... import %}"), (nodes.Extends, "{% extends %}"),
    (nodes.Block, "{% block %}"),
    # without variables an expression grows only with the template's own text: `{% set %}`
    # could double a string per line (a ~ a) into gigabytes
    (nodes.Assign, "{% set %}"), (nodes.AssignBlock, "{% set %}"), (nodes.With, "{% with %}"),
)


@dataclass(frozen=True)
class CompiledTemplate:
    source: str
    template: Any  # jinja2.Template

    def render(self, context: Mapping[str, Any]) -> str:
        """The text, or TemplateFailure (undefined data, a bound, a render over budget)."""
        budget = _iterations.set([0])
        # The budget is this thread's CPU time with the collector off: a busy host that
        # deschedules the process, or a collection of a big heap (a replay of a million pings)
        # landing inside a render, must not turn a render of a few µs into a template_error.
        collecting = gc.isenabled()
        gc.disable()
        # this thread's CPU time is a system call (~0.5 µs here), a render a few chunks of a
        # µs each: the wall clock, which is never behind it, is read after each chunk, and the
        # CPU time only once the wall clock says the budget may be spent
        started = time.thread_time()
        wall_started = time.perf_counter()
        try:
            chunks: list[str] = []
            size = 0
            for chunk in self.template.generate(**context):
                size += len(chunk)
                if size > MAX_OUTPUT_CHARS:
                    raise TemplateFailure(f"renders over {MAX_OUTPUT_CHARS} characters")
                if time.perf_counter() - wall_started > RENDER_BUDGET_S \
                        and time.thread_time() - started > RENDER_BUDGET_S:
                    raise TemplateFailure(
                        f"render took over {RENDER_BUDGET_S * 1000:g} ms")
                chunks.append(chunk)
        except TemplateFailure:
            raise
        except (TemplateError, ArithmeticError, TypeError, ValueError, RecursionError,
                LookupError) as exc:
            raise TemplateFailure(f"{type(exc).__name__}: {exc}") from None
        finally:
            _iterations.reset(budget)
            if collecting:
                gc.enable()
        if time.perf_counter() - wall_started > RENDER_BUDGET_S \
                and time.thread_time() - started > RENDER_BUDGET_S:
            raise TemplateFailure(f"render took over {RENDER_BUDGET_S * 1000:g} ms")
        return "".join(chunks)


def compile_template(source: str) -> CompiledTemplate | TemplateProblem:
    """Parse and check a template; a TemplateProblem says why it cannot be used."""
    try:
        tree = ENVIRONMENT.parse(source)
    except TemplateError as exc:
        return TemplateProblem(f"template syntax error: {getattr(exc, 'message', exc)}",
                               getattr(exc, "lineno", None))
    for node_type, what in _REFUSED_NODES:
        found = next(iter(tree.find_all(node_type)), None)
        if found is not None:
            return TemplateProblem(f"{what} is not allowed in a message template",
                                   found.lineno)
    for loop in tree.find_all(nodes.For):
        if loop.recursive:
            return TemplateProblem("recursive loops are not allowed in a message template",
                                   loop.lineno)
        inner = next(iter(loop.find_all(nodes.For)), None)
        if inner is not None:  # loops over given lists multiply: 5 tags, 20 deep, 5**20
            return TemplateProblem("a loop inside a loop is not allowed in a message template",
                                   inner.lineno)
    for used in tree.find_all(nodes.Filter):
        if used.name not in ENVIRONMENT.filters:
            return TemplateProblem(
                f"filter {used.name!r} is not available; use one of "
                f"{', '.join(sorted(ENVIRONMENT.filters))}", used.lineno)
    for test in tree.find_all(nodes.Test):
        if test.name not in ENVIRONMENT.tests:
            return TemplateProblem(f"test {test.name!r} does not exist", test.lineno)
    assigned = {n.name for n in tree.find_all(nodes.Name) if n.ctx == "store"}  # loop targets
    for name in tree.find_all(nodes.Name):
        if name.ctx == "load" and name.name not in CONTEXT_NAMES \
                and name.name not in ENVIRONMENT.globals and name.name not in assigned \
                and name.name != "loop":
            return TemplateProblem(
                f"unknown name {name.name!r}: templates see "
                f"{', '.join(sorted(CONTEXT_NAMES))}", name.lineno)
    try:
        return CompiledTemplate(source, ENVIRONMENT.from_string(tree))
    except TemplateError as exc:  # pragma: no cover - parse already caught syntax errors
        return TemplateProblem(f"template error: {exc}", getattr(exc, "lineno", None))
