"""Behaviour over time, on the serving path: the decide step's observing side.

    ScoringService.score ─► decide ─► Behaviour.observe ─► windows (counts of the open window)
                                                       └─► clients (entity_score per record)
    Behaviour.run (the clock) ─► windows closed ─► events ─► EventHub ─► every surface

A model carries these detectors when it was trained with ``logscore train --windows`` and/or
``--entities`` (metadata ``windows`` / ``entities``, tensors in its graph). Each loaded model
version has its own state; a reloaded model starts from its trained state.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Optional, Sequence

import numpy as np

from .entities import ClientWatch, EntitySpec
from .events import EventHub
from .model import Model
from .windows import KeyNamer, WindowCounter, WindowSpec

log = logging.getLogger("logscore.behaviour")

ENTITY_CHUNK = 512  # records whose client features go through the detector graph at once
WINDOW_TENSORS = ("window_level", "window_hour", "window_week", "window_scale", "window_share_expected",
                  "window_share_dispersion")


def empty_record_inputs(model: Model) -> dict[str, np.ndarray]:
    """The record inputs of a graph fed with no records (to run only its window or client part)."""
    return {"keys": np.zeros(0, np.int64), "key_weights": np.zeros(0, np.float32), "rows": np.zeros(0, np.int64),
            "dense": np.zeros((0, model.featurizer.width if model.needs_dense else 0), np.float32)}


def window_spec(model: Model) -> Optional[WindowSpec]:
    meta = model.metadata.get("windows")
    if not meta:
        return None
    feeds = empty_record_inputs(model)
    tensors = dict(zip(WINDOW_TENSORS, model.session.run(list(WINDOW_TENSORS), feeds)))

    def calibrate(deviation: np.ndarray) -> np.ndarray:
        if len(deviation) == 0:
            return np.zeros(0, np.float32)
        return model.session.run(["window_score"], {**feeds, "window_deviation": deviation.astype(np.float32)})[0]

    return WindowSpec.from_model(meta, tensors, calibrate)


def entity_spec(model: Model) -> Optional[EntitySpec]:
    meta = model.metadata.get("entities")
    if not meta:
        return None
    feeds = empty_record_inputs(model)

    def score(features: np.ndarray) -> np.ndarray:
        # In chunks: the graph's comparisons take [records, knots] per feature (bounded memory).
        parts = [model.session.run(["entity_score"], {**feeds, "entity_features": features[i: i + ENTITY_CHUNK]})[0]
                 for i in range(0, len(features), ENTITY_CHUNK)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    return EntitySpec.from_model(meta, score)


class ModelBehaviour:
    """The windows and clients of one loaded model."""

    def __init__(self, model: Model, settings, metrics=None):
        self.model = model
        self.windows: Optional[WindowCounter] = None
        self.clients: Optional[ClientWatch] = None
        if not settings.windows:
            return
        try:
            spec = window_spec(model)
            clients = entity_spec(model)
        except Exception as error:  # the record model serves on; its behaviour detectors cannot
            log.error("window/client detectors of this model cannot be used; it scores records as ever",
                      extra={"model": model.name, "error": f"{type(error).__name__}: {error}"})
            return
        if spec is not None:
            gauges = metrics.observe_window if metrics is not None else None
            self.windows = WindowCounter(spec, model.name, KeyNamer(spec.dimensions),
                                         settings.window_max_keys, observe_gauges=gauges)
        if clients is not None:
            self.clients = ClientWatch(clients, model.name, settings.entity_key, settings.entity_max_clients)


class Behaviour:
    """Windows and clients of every loaded model, and the events they raise."""

    def __init__(self, settings, hub: EventHub, metrics=None):
        self.settings = settings
        self.hub = hub
        self.metrics = metrics
        self._models: dict[Model, ModelBehaviour] = {}
        # NOTE: big requests are observed in the scoring thread while the clock closes windows
        # on the event loop: one lock keeps the counters consistent.
        self._lock = threading.Lock()

    def of(self, model: Model) -> ModelBehaviour:
        found = self._models.get(model)
        if found is None:
            found = self._models[model] = ModelBehaviour(model, self.settings, self.metrics)
        return found

    def observe(self, groups: dict, results: list, count: int, tags: Optional[Sequence[str]],
                now: Optional[float] = None) -> Optional[np.ndarray]:
        """Count a scored request in its models' windows; entity scores per record (None: no model
        of this request watches clients). A failure here is logged and counted, never the request's."""
        try:
            with self._lock:
                return self._observe(groups, results, count, tags, time.time() if now is None else now)
        except Exception:
            log.exception("observing windows and clients failed; the records are scored as ever")
            if self.metrics is not None:
                self.metrics.errors.labels("behaviour", "any").inc()
            return None

    def _observe(self, groups: dict, results: list, count: int, tags: Optional[Sequence[str]],
                 now: float) -> Optional[np.ndarray]:
        entity: Optional[np.ndarray] = None
        events = []
        for (model, positions), scored in zip(groups.items(), results):
            watched = self.of(model)
            if watched.windows is None and watched.clients is None:
                continue
            # No columns: the model's windows count routes and tags only (records without other fields).
            columns = scored.columns if scored.columns is not None else {}
            size = len(scored.scores)
            if watched.windows is not None:
                events += watched.windows.close_due(now)
                mine = tags if tags is None or len(groups) == 1 else [tags[i] for i in positions]
                watched.windows.observe(columns, size, mine)
            if watched.clients is not None:
                novelty = scored.novelty if scored.novelty is not None else np.zeros(size)
                scores, raised = watched.clients.observe(columns, np.full(size, now), novelty, scored.scores)
                events += raised
                if entity is None:
                    entity = np.full(count, np.nan, dtype=np.float32)
                entity[np.asarray(positions)] = scores
        self._publish(events)
        return entity

    def tick(self, now: Optional[float] = None) -> None:
        """Close the windows that ended (also when no records arrive: a drop to zero is news)."""
        now = time.time() if now is None else now
        events = []
        with self._lock:
            for watched in list(self._models.values()):
                if watched.windows is not None:
                    events += watched.windows.close_due(now)
        self._publish(events)

    def _publish(self, events: list) -> None:
        if events and self.metrics is not None:
            self.metrics.observe_events(events)
        self.hub.publish(events)

    def prune(self, loaded: set) -> None:
        for model in [m for m in self._models if m not in loaded]:
            del self._models[model]

    def watch_models(self, models) -> None:
        """Start watching models that carry window models (so their windows close even before traffic)."""
        for model in models:
            if model.metadata.get("windows") or model.metadata.get("entities"):
                self.of(model)

    def tick_seconds(self) -> float:
        lengths = [w.windows.window_s for w in self._models.values() if w.windows is not None]
        return max(0.05, min(lengths + [4.0]) / 4)

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), self.tick_seconds())
            except asyncio.TimeoutError:
                pass
            try:
                self.tick()
            except Exception:  # never let the clock die; say so once per failure
                log.exception("closing windows failed")
