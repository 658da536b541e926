"""Prometheus metrics of one service instance, every one named `geopush_…` (contract §6).

Each app gets its own CollectorRegistry, so tests (and two apps in one process) never share
counters. Label children are looked up once: the ping path increments them per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from geopush.engine import Rejected
from geopush.geo.model import Event
from geopush.rules.decide import Decision

__all__ = ["PROMETHEUS_CONTENT_TYPE", "Metrics"]

REJECT_CODES = ("invalid", "no_consent", "out_of_order", "forbidden", "rate_limited",
                "unavailable")
EVENT_TYPES = ("enter", "dwell", "exit")
EVENT_SOURCES = ("ping", "timer")
# Request latency buckets: the promise is p99 ≤ 20 ms for single pings.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SEND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TIMER_LAG_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # another process's metrics to add to ours (geopush.delivery.process)
        self.added_from: Path | None = None
        r = self.registry
        self.pings_accepted = Counter(
            "geopush_pings_accepted", "Pings taken into device state", registry=r)
        self.pings_rejected = Counter(
            "geopush_pings_rejected", "Pings rejected, by code", ["code"], registry=r)
        self.events = Counter(
            "geopush_events", "Geofence events, by type and by what produced them (a ping or "
            "a timer)", ["type", "source"], registry=r)
        self.request_seconds = Histogram(
            "geopush_request_duration_seconds", "HTTP request latency, by route and method",
            ["route", "method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.responses = Counter(
            "geopush_http_responses", "HTTP responses, by route and status", ["route", "status"],
            registry=r)
        self.state_unavailable = Counter(
            "geopush_state_unavailable", "Operations that failed because the state store was "
            "unreachable", ["operation"], registry=r)
        self.timer_devices = Counter(
            "geopush_timer_devices", "Devices whose due timers were claimed and run", registry=r)
        self.timer_lag_seconds = Histogram(
            "geopush_timer_lag_seconds", "How long after its due time a timer event fired",
            buckets=_TIMER_LAG_BUCKETS, registry=r)
        self.websockets = Gauge(
            "geopush_websocket_connections", "Open /v1/stream connections", registry=r)
        self.connections = Gauge(
            "geopush_http_connections", "Open HTTP connections, WebSockets included",
            registry=r)
        self.connections_refused = Counter(
            "geopush_http_connections_refused", "Connections answered 503 and closed at once: "
            "server.max_connections were open", registry=r)
        self.slow_clients = Counter(
            "geopush_http_slow_clients", "Connections closed because a client was too slow to "
            "send its request headers or body (server.header_timeout, server.body_timeout)",
            ["phase"], registry=r)
        self.bad_requests = Counter(
            "geopush_http_bad_requests", "Requests the HTTP parser refused (400) before they "
            "reached the app: malformed request lines, headers or bodies", registry=r)
        self.geofences = Gauge(
            "geopush_geofences_loaded", "Geofences in the active stores set", registry=r)
        self.stores_loaded_at = Gauge(
            "geopush_stores_loaded_timestamp_seconds", "When the active stores set was loaded "
            "(epoch s): its age is time() - this", registry=r)
        self.decisions = Counter(
            "geopush_decisions", "Decisions on candidate rules, by outcome (push, suppressed, "
            "holdout) and the reason a candidate was suppressed ('' for push and holdout)",
            ["outcome", "reason"], registry=r)
        self.opens = Counter(
            "geopush_pushes_opened", "Opens reported by apps (POST /v1/pushes/{id}/opened)",
            registry=r)
        self.sends = Counter(
            "geopush_push_sends", "Attempts to send a push, by result (sent, retry, failed) and "
            "the sender's error code ('' when sent)", ["result", "code"], registry=r)
        self.push_final = Counter(
            "geopush_pushes_final", "Pushes that reached a final state (sent, failed, expired, "
            "cancelled)", ["state"], registry=r)
        self.send_seconds = Histogram(
            "geopush_push_send_duration_seconds", "How long one attempt to send took",
            buckets=_SEND_BUCKETS, registry=r)
        self.outbox_depth = Gauge(
            "geopush_outbox_pending", "Pushes queued or being sent (every instance's)",
            registry=r)
        self.outbox_oldest = Gauge(
            "geopush_outbox_oldest_age_seconds", "Age of the oldest push not sent yet, from "
            "its event (0 when none)", registry=r)
        self.tokens_removed = Counter(
            "geopush_push_tokens_removed", "Push tokens removed because the sender called "
            "them dead (UNREGISTERED, SENDER_ID_MISMATCH, an invalid token)", registry=r)
        self.sender_alerts = Counter(
            "geopush_sender_alerts", "Sender answers that need ops (credentials, not tokens)",
            ["code"], registry=r)
        self.jobs = Counter(
            "geopush_jobs", "Periodic jobs run by this instance (under their cluster lease)",
            ["job", "result"], registry=r)
        self._rejected = {code: self.pings_rejected.labels(code) for code in REJECT_CODES}
        self._events = {(t, s): self.events.labels(t, s)
                        for t in EVENT_TYPES for s in EVENT_SOURCES}
        for child in self._rejected.values():
            child.inc(0)
        self.slow_headers = self.slow_clients.labels("headers")
        self.slow_bodies = self.slow_clients.labels("body")
        self._latency: dict[tuple[str, str], Any] = {}
        self._responses: dict[tuple[str, int], Any] = {}

    def count_decisions(self, decisions: Iterable[Decision]) -> None:
        for decision in decisions:
            self.decisions.labels(decision.outcome, decision.reason or "").inc()

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Label children cached: `labels()` costs more than the observation itself."""
        latency = self._latency.get((route, method))
        if latency is None:
            latency = self._latency[(route, method)] = self.request_seconds.labels(route, method)
        latency.observe(seconds)
        responses = self._responses.get((route, status))
        if responses is None:
            responses = self._responses[(route, status)] = self.responses.labels(route,
                                                                                 str(status))
        responses.inc()

    def count_pings(self, accepted: int, rejected: Iterable[Rejected]) -> None:
        if accepted:
            self.pings_accepted.inc(accepted)
        for r in rejected:
            self._rejected[r.code].inc()

    def count_events(self, events: Iterable[Event], source: str) -> None:
        for e in events:
            self._events[(e.type, source)].inc()

    def render(self) -> bytes:
        """The exposition text, with the delivery process's metrics added when it writes them
        (geopush.delivery.process): ops scrape one endpoint."""
        if self.added_from is not None:
            try:
                text = self.added_from.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                text = ""  # not written yet
            if text:
                return generate_latest(_Summed(self.registry, text))
        return generate_latest(self.registry)


class _Summed:
    """A registry's metrics plus those of another process's exposition text: samples with the
    same name and labels are added (the serving process's delivery metrics stay at zero when
    another process sends), the others listed; `_created` stamps are the registry's."""

    def __init__(self, registry: CollectorRegistry, text: str) -> None:
        self._registry = registry
        self._text = text

    def collect(self) -> Iterator[Metric]:
        families = {family.name: family for family in self._registry.collect()}
        try:
            others = list(text_string_to_metric_families(self._text))
        except ValueError:  # a file cut short cannot be: it is replaced whole
            others = []
        for other in others:
            if other.name.endswith("_created"):
                continue  # the text form lists a counter's `_created` apart: ours stands
            mine = families.get(other.name)
            if mine is None or mine.type != other.type:
                families.setdefault(other.name, other)
                continue
            at = {(s.name, tuple(sorted(s.labels.items()))): i
                  for i, s in enumerate(mine.samples)}
            for sample in other.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                i = at.get(key)
                if sample.name.endswith("_created"):
                    continue
                if i is None:
                    mine.samples.append(sample)
                else:
                    mine.samples[i] = mine.samples[i]._replace(
                        value=mine.samples[i].value + sample.value)
        yield from families.values()
