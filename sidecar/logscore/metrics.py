"""Prometheus metrics of the sidecar (served on the HTTP port at /metrics)."""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter as Counter_of
from typing import Callable, Optional, Sequence, Union

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .flood import FloodWatch

SCORE_BUCKETS = (0.5, 0.9, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999, 1.0)
REFUSAL_LOG_INTERVAL_S = 10.0  # one log line per kind of refusal and surface at most this often

log = logging.getLogger("logscore.requests")


class ScoreHistogram:
    """Per-model histogram of calibrated scores, counted with numpy per batch.

    (prometheus_client's Histogram takes one value per call: too slow for
    thousands of records per batch.) Drift shows as a shift against training,
    where by construction 10 % of normal records score above 0.9.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, np.ndarray] = {}
        self._sums: dict[str, float] = {}

    def observe(self, model: str, scores: np.ndarray) -> None:
        if len(scores) <= 8:  # a few records: plain Python is faster than numpy's call overhead
            with self._lock:
                counts = self._counts.get(model)
                if counts is None:
                    counts = self._counts[model] = np.zeros(len(SCORE_BUCKETS) + 1, dtype=np.int64)
                total = self._sums.get(model, 0.0)
                for value in scores.tolist():
                    counts[bisect.bisect_left(SCORE_BUCKETS, value)] += 1
                    total += value
                self._sums[model] = total
            return
        positions = np.searchsorted(SCORE_BUCKETS, scores, side="left")
        counts = np.bincount(positions, minlength=len(SCORE_BUCKETS) + 1)
        with self._lock:
            self._counts[model] = self._counts.get(model, 0) + counts
            self._sums[model] = self._sums.get(model, 0.0) + float(scores.sum())

    def counts(self) -> dict[str, np.ndarray]:
        with self._lock:
            return {model: np.array(counts) for model, counts in self._counts.items()}

    def collect(self):
        family = HistogramMetricFamily("logscore_score", "Calibrated scores per model", labels=["model"])
        with self._lock:
            for model, counts in self._counts.items():
                cumulative = np.cumsum(counts)
                buckets = [(str(edge), int(c)) for edge, c in zip(SCORE_BUCKETS, cumulative)]
                buckets.append(("+Inf", int(cumulative[-1])))
                family.add_metric([model], buckets, self._sums[model])
        yield family


class CallsInFlight:
    """Scoring calls under way per surface, read from the surfaces' own counts when scraped
    (nothing is updated per call for the metric itself)."""

    def __init__(self):
        self._counts: dict[str, Callable[[], int]] = {}

    def watch(self, surface: str, count: Callable[[], int]) -> None:
        self._counts[surface] = count

    def collect(self):
        family = GaugeMetricFamily("logscore_calls_in_flight", "Scoring calls under way: gRPC Score and "
                                   "ScoreStream calls in progress, HTTP POST /v1/score requests from their "
                                   "first line to their answer", labels=["surface"])
        for surface, count in self._counts.items():
            family.add_metric([surface], count())
        yield family


class SessionCollector:
    """What session models' trackers did that changes scores, read from the trackers when scraped
    (sessions.SessionCounts; a reloaded model starts its sessions, and these counts, afresh)."""

    FAMILIES = (("evicted", "logscore_session_evictions", "Open sessions forgotten to make room (over the "
                 "model's max_sessions): a record of one is then scored as a new session"),
                ("restarted", "logscore_session_restarts", "Records whose session had been evicted, scored as a "
                 "new session (noted 'session restarted')"),
                ("without_text", "logscore_session_records_without_text", "Records of a session model with no "
                 "text, scored as an empty event (noted 'no text')"))

    def __init__(self):
        self._models: dict = {}

    def set_models(self, models: dict) -> None:
        self._models = {name: model.sessions.counts for name, model in models.items()
                        if getattr(model, "sessions", None) is not None}

    def collect(self):
        models = self._models
        for attribute, name, documentation in self.FAMILIES:
            family = CounterMetricFamily(name, documentation, labels=["model"])
            for model, counts in models.items():
                family.add_metric([model], getattr(counts, attribute))
            yield family


class OncePerInterval:
    """Whether to say a thing now: per key at most once an interval, with what went unsaid since
    (a refusal, records passed on unscored: the same warning a chunk or a call was a flood).
    Keys may be the senders' to choose (tags): past ``max_keys`` the keys said are forgotten."""

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S, max_keys: int = 1000):
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._said: dict = {}  # key -> (when last said, the amounts unsaid since)

    def due(self, key, *amounts: int) -> Optional[tuple[int, ...]]:
        """None while ``key`` was said within the interval (``amounts`` add to what goes unsaid);
        else the amounts unsaid since it was last said (zeros the first time)."""
        now = time.monotonic()
        with self._lock:
            said = self._said.get(key)
            if said is not None and now - said[0] < self.interval_s:
                self._said[key] = (said[0], tuple(a + b for a, b in zip(said[1], amounts)))
                return None
            if said is None and len(self._said) >= self.max_keys:
                self._said.clear()
            self._said[key] = (now, (0,) * len(amounts))
        return said[1] if said is not None else (0,) * len(amounts)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.records = Counter("logscore_records_scored", "Records scored", ["model", "surface"], registry=r)
        self.anomalies = Counter("logscore_anomalies", "Records over their model's threshold", ["model"],
                                 registry=r)
        self.errors = Counter("logscore_errors", "Failed calls by kind", ["kind", "surface"], registry=r)
        self.request_seconds = Histogram("logscore_request_seconds", "Time to answer a scoring call",
                                         ["surface"], registry=r,
                                         buckets=(.0002, .0005, .001, .002, .005, .01, .025, .05, .1, .25, 1))
        self.batch_records = Histogram("logscore_batch_records", "Records per model call", ["model"],
                                       registry=r, buckets=(1, 2, 8, 32, 128, 512, 2048, 8192, 32768))
        self.batch_seconds = Histogram("logscore_batch_seconds", "Time of one model call", ["model"],
                                       registry=r, buckets=(.0001, .0005, .001, .005, .01, .05, .1, .5, 1))
        self.scores = ScoreHistogram()
        r.register(self.scores)
        self.floods = FloodWatch()
        # NOTE: no file path label: /metrics answers without the token, paths stay behind it (ListModels).
        self.model_info = Gauge("logscore_model_loaded", "1 for each loaded model version",
                                ["model", "version"], registry=r)
        self.model_rejections = Counter("logscore_model_load_errors", "Model files rejected on (re)load",
                                        ["file"], registry=r)
        self.abandoned = Counter("logscore_abandoned_records", "Records not scored because their caller had "
                                 "gone (cancelled, or its deadline passed)", ["model", "reason"], registry=r)
        self.scoring_process_restarts = Counter("logscore_scoring_process_restarts", "Scoring processes "
                                                "replaced: exited or hung while scoring, or unusable while idle "
                                                "(exited, or still running but wrote a late reply) "
                                                "(scoring_processes)",
                                                registry=r)
        self.scoring_process_stale_chunks = Counter(
            "logscore_scoring_process_stale_chunks", "Chunks a scoring process left to the sidecar's own process "
            "because the model's file holds another version than the one served, or none that loads "
            "(scoring_processes)", ["model"], registry=r)
        self.grpc_connections = Gauge("logscore_grpc_connections", "Connections open on each gRPC listener "
                                      "(tcp, unix; checked every second)", ["listener"], registry=r)
        self.calls_in_flight = CallsInFlight()
        r.register(self.calls_in_flight)
        self.sessions = SessionCollector()
        r.register(self.sessions)
        self.model_checks = Counter("logscore_model_checks", "Checks of the models directory for new, changed "
                                    "and removed files (every reload_interval_s, and on SIGHUP)", registry=r)
        self.queued = Gauge("logscore_queued_records", "Records waiting to be scored", registry=r)
        self.learning_outcomes = Counter("logscore_learning_candidates", "Models learned on arrival, by outcome: "
                                         "swapped, kept_aside, failed", ["route", "outcome"], registry=r)
        self.feedback_suppressed = Counter("logscore_feedback_suppressed", "Flagged records not flagged because "
                                           "feedback marked what made them unusual normal", ["model"], registry=r)
        self.feedback_kept = Counter("logscore_feedback_kept", "Flagged records of a kind marked a true anomaly "
                                     "(keep)", ["model"], registry=r)
        self.feedback_writes = Counter("logscore_feedback_writes", "Feedback entries added or removed through this "
                                       "sidecar (action existing: a mark an active entry already made)",
                                       ["action", "verdict"], registry=r)
        self.feedback_entries = Gauge("logscore_feedback_entries", "Active feedback entries", ["verdict"], registry=r)
        self.feedback_store_up = Gauge("logscore_feedback_store_up", "1 while the feedback store is reachable; "
                                       "0: the entries last loaded stay in force", registry=r)
        self.feedback_reload_age = Gauge("logscore_feedback_loaded_timestamp_seconds", "When the feedback entries "
                                         "in force were loaded (Unix time)", registry=r)
        self.review_groups = Counter("logscore_review_groups", "Groups of anomalies started on the review page "
                                     "(a new kind of anomaly)", ["model"], registry=r)
        self.review_not_grouped = Counter("logscore_review_not_grouped", "Flagged records the review page did not "
                                          "inspect: over review_inspect_per_s (a flood is sampled)", ["model"],
                                          registry=r)
        self.late_records = Counter("logscore_late_records", "Records scored but left out of windows and clients: "
                                    "they arrived long after their own time (a backlog, a replayed log)",
                                    ["model"], registry=r)
        self._children: dict = {}
        self._refusals = OncePerInterval()
        self.window_observed = Gauge("logscore_window_observed", "Records in the last closed window per key "
                                     "(models with window detectors)", ["model", "key"], registry=r)
        self.window_expected = Gauge("logscore_window_expected", "Forecast of the same window per key",
                                     ["model", "key"], registry=r)
        self.anomaly_events = Counter("logscore_anomaly_events", "Window and client anomaly events",
                                      ["model", "kind"], registry=r)
        self.anomaly_events_dropped = Counter("logscore_anomaly_events_dropped", "Events a slow watcher lost "
                                              "(its queue was full)", registry=r)
        self._window_keys: dict[str, set] = {}

    def refused(self, kind: str, surface: str, reason: str) -> None:
        """Count a request refused for the caller's fault (bad input, no token, overload) and say why
        in the log, once per interval per kind and surface: the caller sees the reason, the
        operator of a shipper that marks records unscored needs it too, without a flood."""
        self.child(self.errors, kind, surface).inc()
        unsaid = self._refusals.due((kind, surface), 1)
        if unsaid is not None:
            log.warning("request refused", extra={"kind": kind, "surface": surface, "reason": reason[:500],
                                                  "refused_since_last_logged": unsaid[0]})

    def child(self, metric, *labels):
        """metric.labels(*labels), remembered: the lookup costs more than the update."""
        key = (id(metric), labels)
        bound = self._children.get(key)
        if bound is None:
            bound = self._children[key] = metric.labels(*labels)
        return bound

    def observe_batch(self, model, records: int, seconds: float) -> None:
        self.child(self.batch_records, model.name).observe(records)
        self.child(self.batch_seconds, model.name).observe(seconds)

    def observe_abandoned(self, model, records: int, reason: str) -> None:
        self.child(self.abandoned, model.name, reason).inc(records)

    def observe_outcome(self, outcome, surface: str, routes: Union[str, Sequence[str]] = "") -> None:
        """``routes``: the records' tag, or a tag per record (forward Message mode)."""
        if outcome.notes:
            self._observe_feedback_notes(outcome)
        if len(outcome.models) == 1:  # the usual case: no selection (~3 µs of numpy calls on one record)
            self._observe_model(outcome.models[0], surface, outcome.scores, outcome.is_anomaly, routes)
            return
        for position, model in enumerate(outcome.models):
            mine = outcome.model_index == position
            model_routes = routes if isinstance(routes, str) else [routes[i] for i in np.flatnonzero(mine)]
            self._observe_model(model, surface, outcome.scores[mine], outcome.is_anomaly[mine], model_routes)

    def _observe_model(self, model, surface: str, scores: np.ndarray, flags: np.ndarray,
                       routes: Union[str, Sequence[str]]) -> None:
        name = model.name
        self.child(self.records, name, surface).inc(len(scores))
        anomalies = int(np.count_nonzero(flags))
        if anomalies:
            self.child(self.anomalies, name).inc(anomalies)
        self.scores.observe(name, scores)
        if isinstance(routes, str):
            self.floods.observe(model, len(scores), anomalies, routes)
            return
        routes = np.asarray(routes, dtype=object)
        for route in set(routes):
            mine = routes == route
            self.floods.observe(model, int(np.count_nonzero(mine)), int(np.count_nonzero(flags[mine])), route)

    def _observe_feedback_notes(self, outcome) -> None:
        for index, _, description in outcome.notes:
            if description.startswith(("suppressed by feedback", "kept by feedback")):
                model = outcome.models[int(outcome.model_index[index])].name
                counter = self.feedback_suppressed if description[0] == "s" else self.feedback_kept
                self.child(counter, model).inc()

    def observe_feedback(self, service) -> None:
        """Gauges of the feedback store after each (re)load or failure (feedback_store.FeedbackService)."""
        verdicts = Counter_of(e.verdict for e in service.rules.entries)
        for verdict in ("normal", "keep"):
            self.feedback_entries.labels(verdict).set(verdicts.get(verdict, 0))
        self.feedback_store_up.set(1 if service.reachable else 0)
        if service.loaded_at:
            self.feedback_reload_age.set(service.loaded_at)

    def histograms(self) -> dict:
        """Per model, the counts of the score histogram's buckets (SCORE_BUCKETS, then above 1.0)."""
        return self.scores.counts()
    def observe_window(self, model: str, keys: list, observed, expected) -> None:
        """Observed vs expected per key of a closed window; keys evicted since lose their series."""
        current = set(keys)
        for key in self._window_keys.get(model, set()) - current:
            for gauge in (self.window_observed, self.window_expected):
                try:
                    gauge.remove(model, key)
                except KeyError:
                    pass
        self._window_keys[model] = current
        for key, seen, forecast in zip(keys, observed.tolist(), expected.tolist()):
            self.window_observed.labels(model, key).set(seen)
            self.window_expected.labels(model, key).set(round(forecast, 3))

    def observe_events(self, events) -> None:
        for event in events:
            self.child(self.anomaly_events, event.model, event.kind).inc()

    def set_models(self, models: dict) -> None:
        self.sessions.set_models(models)
        self.model_info.clear()
        for name, model in models.items():
            self.model_info.labels(name, model.version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)

