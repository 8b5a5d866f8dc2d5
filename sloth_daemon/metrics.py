"""Prometheus metrics for `GET /metrics` (the Prometheus text exposition format), through `prometheus-client`.

Contract:
- `DaemonMetrics(parts)` owns one `CollectorRegistry` (never the process-global one, so several daemons in one
  process do not collide). Front ends report what they see through `observe_http`, `turn_started`/`turn_first_token`
  /`turn_done`/`turn_ended`; everything about the daemon's state (pending examples, served version, updates, the
  last update's measurements) is read from its parts at scrape time, so it is never stale and costs nothing between
  scrapes. The replay store's figures are read first by the caller, on the store's reader thread
  (`store_figures(store)`), and handed to `render(figures)`, which returns `(body bytes, content type)`.
- Names follow https://prometheus.io/docs/practices/naming/: a `sloth_` prefix, base units (`_seconds`), `_total`
  for counters, `_info` for a constant-1 gauge whose labels carry the value.

Series (labels in braces):
    sloth_http_requests_total{route,status,adapter_version}   counter  HTTP requests answered (route = path template)
    sloth_http_request_duration_seconds{route}                histogram time to the response's headers
    sloth_zmq_requests_total{op,outcome,adapter_version}      counter  ZeroMQ requests answered (op = the op, or
                                                                       "invalid"; outcome = ok or the error code)
    sloth_turns_total{route,finish_reason,adapter_version}    counter  generations finished (HTTP and ZeroMQ)
    sloth_tokens_total{route,type,adapter_version}            counter  tokens, type = prompt | completion
    sloth_turn_latency_seconds{route}                         histogram request start to last token
    sloth_time_to_first_token_seconds{route}                  histogram request start to first token
    sloth_requests_in_flight                                  gauge    generations started and not yet ended
    sloth_requests_queued                                     gauge    of those, the ones still waiting for a first token
    sloth_pending_examples                                    gauge    training examples waiting for an update
    sloth_journaled_turns                                     gauge    answered turns waiting in the journal for the store
    sloth_admission_limit                                     gauge    max_queued_requests: the bound on queued + running
    sloth_admission_in_flight                                 gauge    generation requests holding an admission ticket
    sloth_admission_refused_total                             counter  generation requests refused (HTTP 429, ZeroMQ busy)
    sloth_served_adapter_info{version}                        gauge    1; version "base" = no adapter
    sloth_updates_total{outcome}                              counter  finished updates: promoted | rejected | failed
    sloth_update_running                                      gauge    1 while an update runs
    sloth_update_progress_ratio                               gauge    the running update's step / steps
    sloth_last_update_timestamp_seconds                       gauge    when the last finished update ended
    sloth_last_update_promoted                                gauge    1 promoted, 0 not
    sloth_last_update_eval_loss{set,model}                    gauge    gate measurements: set = new | anchor | recall,
                                                                       model = parent | candidate
    sloth_last_update_gate_measured{check}                    gauge    each gate check's measurement (check = its name:
    sloth_last_update_gate_bound{check}                       gauge    new, anchor_kl, recall_answers, ...), its bound
    sloth_last_update_gate_passed{check}                      gauge    and its result (1 passed, 0 failed)
    sloth_last_update_train_loss{step}                        gauge    step = first | last
    sloth_last_update_tokens_per_second                       gauge    training throughput of the last update
    sloth_last_update_duration_seconds                        gauge    its wall time

`route` for ZeroMQ turns is `zmq:chat` / `zmq:complete`; for HTTP the path (`/v1/chat/completions`).
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .progress import train_tokens_per_s

if TYPE_CHECKING:
    from .operations import DaemonParts

disable_created_metrics()  # no `*_created` series: Prometheus does not use them, and they double the output

# Generation latency spans milliseconds (a cached short answer) to minutes (a long answer on CPU).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def _label(version: str | None) -> str:
    return version or "base"


def store_figures(store: Any) -> dict[str, Any]:
    """What the metrics read from the replay store (`ReplayStore`), in one call on the store's reader thread."""
    return {"pending": store.count_pending(), "updates": store.stats()["updates"],
            "recent_updates": store.list_updates(limit=10)}


class _StateCollector(Collector):
    """Reads the daemon's state at scrape time."""

    def __init__(self, parts: "DaemonParts"):
        self.parts = parts
        self.figures: dict[str, Any] | None = None  # `store_figures`, set by `DaemonMetrics.render`

    def collect(self) -> Iterator[Any]:
        d, figures = self.parts, self.figures
        if figures is None or not hasattr(d, "engine"):  # not started yet: nothing to say
            return
        g = GaugeMetricFamily("sloth_pending_examples", "Training examples waiting for an update")
        g.add_metric([], figures["pending"])
        yield g
        g = GaugeMetricFamily("sloth_journaled_turns", "Answered turns waiting in the journal for the replay store")
        g.add_metric([], len(d.store.journal.pending_ids))
        yield g
        admission = d.admission.snapshot()
        g = GaugeMetricFamily("sloth_admission_limit", "The bound on generation requests queued or running "
                              "(max_queued_requests)")
        g.add_metric([], admission["limit"])
        yield g
        g = GaugeMetricFamily("sloth_admission_in_flight", "Generation requests queued or running (admitted)")
        g.add_metric([], admission["in_flight"])
        yield g
        c = CounterMetricFamily("sloth_admission_refused", "Generation requests refused by admission control "
                                "(HTTP 429, ZeroMQ busy)")
        c.add_metric([], admission["refused_total"])
        yield c
        g = GaugeMetricFamily("sloth_served_adapter_info", "The adapter version being served (base = none)",
                              labels=["version"])
        g.add_metric([_label(d.engine.current_adapter)], 1)
        yield g
        stats = figures["updates"]
        c = CounterMetricFamily("sloth_updates", "Finished updates by outcome", labels=["outcome"])
        for outcome in ("promoted", "rejected", "failed"):
            c.add_metric([outcome], stats.get(outcome, 0))
        yield c
        progress = d.updater.progress
        g = GaugeMetricFamily("sloth_update_running", "1 while an update runs")
        g.add_metric([], 1 if progress else 0)
        yield g
        g = GaugeMetricFamily("sloth_update_progress_ratio", "The running update's step / steps (0 when none)")
        g.add_metric([], float(progress["progress"]) if progress else 0.0)
        yield g
        yield from self._last_update(figures["recent_updates"])

    @staticmethod
    def _last_update(recent: list[dict]) -> Iterator[Any]:
        last = next((u for u in recent if u["status"] != "running"), None)
        if last is None:
            return
        metrics = last.get("metrics") or {}
        train = metrics.get("train") or {}
        if last.get("finished_at"):
            g = GaugeMetricFamily("sloth_last_update_timestamp_seconds", "When the last finished update ended")
            g.add_metric([], datetime.fromisoformat(last["finished_at"]).timestamp())
            yield g
        g = GaugeMetricFamily("sloth_last_update_promoted", "1 if the last finished update was promoted, else 0")
        g.add_metric([], 1 if last["status"] == "promoted" else 0)
        yield g
        g = GaugeMetricFamily("sloth_last_update_eval_loss", "The last update's gate measurements: mean answer-token "
                              "loss per eval set, before (parent) and after (candidate)", labels=["set", "model"])
        for name, scores in (metrics.get("eval") or {}).items():
            for model in ("parent", "candidate"):
                if scores.get(model) is not None:
                    g.add_metric([name, model], scores[model])
        yield g
        checks = (metrics.get("gate") or {}).get("checks") or []
        for suffix, key, doc in (("measured", "measured", "measurement"), ("bound", "bound", "bound"),
                                 ("passed", "passed", "result (1 passed, 0 failed)")):
            g = GaugeMetricFamily(f"sloth_last_update_gate_{suffix}",
                                  f"The last update's gate checks: each one's {doc}", labels=["check"])
            for c in checks:
                if isinstance(c.get(key), (int, float)):  # a check that measured nothing (none held out) has null
                    g.add_metric([c["name"]], float(c[key]))
            yield g
        g = GaugeMetricFamily("sloth_last_update_train_loss", "The last update's training loss at its first and last "
                              "step", labels=["step"])
        for step, key in (("first", "first_loss"), ("last", "last_loss")):
            if train.get(key) is not None:
                g.add_metric([step], train[key])
        yield g
        if (tokens_per_s := train_tokens_per_s(train)) is not None:
            g = GaugeMetricFamily("sloth_last_update_tokens_per_second", "The last update's training tokens per "
                                  "second (of its training loop)")
            g.add_metric([], tokens_per_s)
            yield g
        if metrics.get("seconds") is not None:
            g = GaugeMetricFamily("sloth_last_update_duration_seconds", "The last update's wall time")
            g.add_metric([], metrics["seconds"])
            yield g


class DaemonMetrics:
    """The daemon's metrics: request-side series observed by the front ends, state read at scrape time."""

    def __init__(self, parts: "DaemonParts"):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter("sloth_http_requests", "HTTP requests answered",
                                     ["route", "status", "adapter_version"], registry=r)
        self.zmq_requests = Counter("sloth_zmq_requests", "ZeroMQ requests answered",
                                    ["op", "outcome", "adapter_version"], registry=r)
        self.http_duration = Histogram("sloth_http_request_duration_seconds", "Time to the response's headers",
                                       ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.turns = Counter("sloth_turns", "Generations finished", ["route", "finish_reason", "adapter_version"],
                             registry=r)
        self.tokens = Counter("sloth_tokens", "Tokens of finished generations", ["route", "type", "adapter_version"],
                              registry=r)
        self.latency = Histogram("sloth_turn_latency_seconds", "Generation time, request start to last token",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("sloth_time_to_first_token_seconds", "Request start to first token", ["route"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.in_flight = Gauge("sloth_requests_in_flight", "Generations started and not yet ended", registry=r)
        self.queued = Gauge("sloth_requests_queued", "Generations waiting for their first token", registry=r)
        self._lock = threading.Lock()
        self._state = _StateCollector(parts)
        r.register(self._state)

    # -- observed by the front ends -------------------------------------------------------------------------------
    def observe_http(self, route: str, status: int, seconds: float, adapter_version: str | None) -> None:
        self.http_requests.labels(route, str(status), _label(adapter_version)).inc()
        self.http_duration.labels(route).observe(seconds)

    def observe_zmq(self, op: str, outcome: str, adapter_version: str | None) -> None:
        self.zmq_requests.labels(op, outcome, _label(adapter_version)).inc()

    def turn_started(self) -> None:
        self.in_flight.inc()
        self.queued.inc()

    def turn_first_token(self, route: str, seconds: float) -> None:
        self.queued.dec()
        self.ttft.labels(route).observe(seconds)

    def turn_done(self, route: str, seconds: float, finish_reason: str, adapter_version: str | None,
                  prompt_tokens: int, completion_tokens: int) -> None:
        v = _label(adapter_version)
        self.turns.labels(route, finish_reason, v).inc()
        self.tokens.labels(route, "prompt", v).inc(prompt_tokens)
        self.tokens.labels(route, "completion", v).inc(completion_tokens)
        self.latency.labels(route).observe(seconds)

    def turn_ended(self, got_first_token: bool) -> None:
        """Always called once per `turn_started`, however the turn ended (finished, failed, cancelled)."""
        self.in_flight.dec()
        if not got_first_token:
            self.queued.dec()

    def render(self, figures: dict[str, Any]) -> tuple[bytes, str]:
        """The exposition, with `figures` (`store_figures`) as the store's state."""
        with self._lock:  # one scrape at a time: the collector reads the figures of its own scrape
            self._state.figures = figures
            try:
                return generate_latest(self.registry), CONTENT_TYPE_LATEST
            finally:
                self._state.figures = None
