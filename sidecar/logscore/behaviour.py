"""Behaviour over time, on the serving path: the decide step's observing side.

    ScoringService.score ─► decide ─► Behaviour.observe ─► windows (counts of the open window)
                                                       └─► clients (entity_score per record)
    Behaviour.run (the clock) ─► windows closed ─► events ─► EventHub ─► every surface

A model carries these detectors when it was trained with ``logscore train --windows`` and/or
``--entities`` (metadata ``windows`` / ``entities``, tensors in its graph). Each loaded model
has its live state (the open window's counts, forecasters moved on online, episodes under way,
clients, lateness). A model replacing one of its name whose detectors are the same ones
(``detectors_fingerprint``: a learned model keeps its predecessor's, ``train --behaviour-from``;
a file reloaded unchanged) takes over that live state; one with other detectors starts from its
trained state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .entities import ClientWatch, EntitySpec
from .errors import ConfigError
from .events import EventHub
from .model import Model, carries_behaviour
from .records import event_times
from .timestamps import column_times, season_zone
from .windows import KeyNamer, WindowCounter, WindowSpec

log = logging.getLogger("logscore.behaviour")

ENTITY_CHUNK = 512  # records whose client features go through the detector graph at once
# Lateness: a record counts in windows and clients when it arrives at most this long after the
# least delay lately seen from its source (lateness_sources): the grace covers a shipper's buffering.
LATE_GRACE_WINDOWS = 2
MIN_LATE_GRACE_S = 60.0
# The least delay rises by this many seconds a second when nothing arrives sooner, so a backlog
# caught up at several times real speed stays late...
DELAY_FLOOR_RISE = 0.5
# ... and a source all of whose records have been late this long is a shipper whose clock is off
# (a backlog is caught up sooner): its least delay becomes what it sends.
CLOCK_SETTLE_S = 300.0
LATE_LOG_INTERVAL_S = 60.0
# A record time further ahead of the clock than this is unknown (a syslog time read in the wrong
# year, a clock far ahead): it would hold its source's least delay down and make the rest late.
MAX_AHEAD_S = 3600.0
MAX_LOGGED_SOURCE_CHARS = 200  # a source (tag and host) named in a log line is cut to this
MAX_SOURCES = 1024  # sources (tags) whose delay is tracked apart; past it, untracked tags share one
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

    # NOTE: a zone this machine cannot load turns off the windows alone (ModelBehaviour logs it): it
    # refused the whole model at load, `logscore score` too, which reads no window.
    return WindowSpec.from_model(meta, tensors, calibrate, season_zone(meta.get("season_zone")))


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


def detectors_fingerprint(model: Model, spec: Optional[WindowSpec], clients: Optional[EntitySpec]) -> Optional[str]:
    """What defines a model's window and client detectors, hashed (None: it has neither): their
    metadata, the forecasters' trained state, and the client detector's answers to fixed features
    (its tables are graph constants no session hands out; its answers are what they define)."""
    if spec is None and clients is None:
        return None
    digest = hashlib.sha256()
    for entry in ("windows", "entities"):
        digest.update(json.dumps(model.metadata.get(entry), sort_keys=True).encode())
    if spec is not None:
        for array in (spec.state.level, spec.state.hour, spec.state.week, spec.state.scale, spec.share_expected,
                      spec.share_dispersion):
            digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    if clients is not None:
        probe = np.outer([0.0, 0.5, 1.0, 2.0, 4.0], clients.typical).astype(np.float32)
        digest.update(np.asarray(clients.score(probe), dtype=np.float64).tobytes())
    return digest.hexdigest()


def own_times(columns: dict, size: int, carried: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Each record's own time in Unix seconds (NaN: unknown): the time it holds (a line's
    timestamp, a map's time field: what was written when it happened), else the event time its
    shipper sent (a shipper that did not parse the time sends the moment it read the line, which
    is no record's time in a backlog); None when neither is there."""
    written = column_times(columns, size)
    if written is None or carried is None:
        return written if carried is None else carried
    return np.where(np.isnan(written), carried, written)


def lateness_sources(columns: dict, tags: Optional[Sequence[str]]) -> Optional[Sequence[str]]:
    """Where each record comes from, for Lateness: its tag, and its host where the model's windows
    count per host (records naming their sender: syslog's host, a hostname field). Behind an
    aggregator one tag carries many senders, each with its own clock: one whose clock lags the
    others by more than the grace was late for good, as a source of its own it settles."""
    if "host" not in columns:
        return tags
    hosts = KeyNamer.column("host", columns)
    if tags is None:
        return [host or "" for host in hosts]
    return [f"{tag} {host}" if host else tag for tag, host in zip(tags, hosts)]


class Lateness:
    """Which records arrive long after their own time (a backlog being caught up, a replayed log).

    Windows count, and clients are tracked, by arrival: a shipper's backlog after an outage would
    be a burst of traffic and a crowd of fast clients. Records whose own time (``own_times``) is
    older than the least delay lately seen from their source (lateness_sources) plus a grace are
    late: scored as ever, but left out of windows and clients. A new source's least delay is 0
    (clocks agree), so a backlog met first (the sidecar restarted while shippers held their
    buffers) is late too; a source late for CLOCK_SETTLE_S has a clock that is off, and its offset
    becomes its least delay. Records without a time are never late. A record stamped ahead of the
    clock (a sender whose clock runs ahead) does not lower its source's least delay below 0: one
    such record held the floor down and left every on-time record of its tag out for minutes, and
    behind an aggregator a sender ahead left the others out for good. It is counted on arrival;
    the source farthest ahead by more than the grace (an hour or more too) is kept in ``ahead`` (for the log).
    """

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        # source -> [least delay, when it was last seen, since when all its records were late (or None)]
        self._sources: dict[str, list] = {}
        self.ahead: Optional[tuple[str, float]] = None  # (source, seconds ahead) seen since last taken

    def take_ahead(self) -> Optional[tuple[str, float]]:
        """The source seen farthest (and more than the grace) ahead of the clock since last taken, and how far
        (None: none), once."""
        ahead, self.ahead = self.ahead, None
        return ahead

    def _saw_ahead(self, source: str, seconds: float) -> None:
        """Keep the source farthest ahead since last taken (a sender a year ahead, the worst case, was
        never named: its times were dropped as unknown before this)."""
        if self.ahead is None or seconds > self.ahead[1]:
            self.ahead = (source, seconds)

    def late(self, times: np.ndarray, sources: Optional[Sequence[str]], now: float) -> Optional[np.ndarray]:
        """A mask of the late records (None: none is), ``times`` in Unix seconds (NaN: unknown)."""
        delays = now - times
        far = delays < -MAX_AHEAD_S
        if far.any():  # a time far ahead of the clock is none we can use; its sender is named all the same
            first = int(np.flatnonzero(far)[np.argmin(delays[far])])  # (argmin of all picked an unknown time: NaN)
            self._saw_ahead(sources[first] if sources else "", float(-delays[first]))
            delays[far] = np.nan
        known = ~np.isnan(delays)
        if not known.any():
            return None
        if sources is None or len(set(sources)) == 1:
            late = self._late_from(sources[0] if sources else "", delays, now)
        else:
            late = np.zeros(len(times), dtype=bool)
            by_source: dict[str, list[int]] = {}
            for i, source in enumerate(sources):
                by_source.setdefault(source, []).append(i)
            for source, positions in by_source.items():
                late[positions] = self._late_from(source, delays[positions], now)
        return late if late.any() else None

    def _late_from(self, source: str, delays: np.ndarray, now: float) -> np.ndarray:
        """Which of one source's records are late (NaN delays are not); its least delay moves on."""
        known = delays[~np.isnan(delays)]
        if not len(known):
            return np.zeros(len(delays), dtype=bool)
        if source not in self._sources and len(self._sources) >= MAX_SOURCES:
            source = ""
        state = self._sources.setdefault(source, [0.0, now, None])
        least = float(known.min())
        if least < -self.grace_s:
            self._saw_ahead(source, -least)
        # (clamped: a time ahead says the sender's clock is off, not that its records come sooner)
        least = max(least, 0.0)
        floor = state[0] = min(least, state[0] + DELAY_FLOOR_RISE * max(now - state[1], 0.0))
        state[1] = now
        if least <= floor + self.grace_s:
            state[2] = None
        elif state[2] is None:
            state[2] = now
        elif now - state[2] >= CLOCK_SETTLE_S:
            floor = state[0] = least  # late all along: not a backlog, a clock that is off
            state[2] = None
        return delays > floor + self.grace_s


class EpisodeFile:
    """The window episodes under way, per model, kept in a small file so that a restarted sidecar
    goes on with them instead of raising them again (a 5xx burst under way at a restart was
    announced twice). Each entry: the model's detectors (``detectors_fingerprint``: a model
    trained again starts afresh), the subjects improbable in its last closed window (at most
    MAX_SAVED_SUBJECTS) and when that window ended. Written when they change (at a window close);
    a missing file is no episode, an unreadable one is warned about and replaced."""

    VERSION = 1

    def __init__(self, path: Optional[str], models_dir: str = "."):
        """``path``: settings.episodes_file (relative: in ``models_dir``; None: none kept)."""
        self.path = Path(models_dir) / path if path else None
        self._written: Optional[dict] = {}
        self._refused: Optional[dict] = None  # what a failed write held (_waited_for); warned once

    def load(self) -> dict[str, dict]:
        """Model name -> its saved episodes (empty: none, or no file)."""
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            models = data["models"] if data.get("version") == self.VERSION else None
            if not isinstance(models, dict) or not all(isinstance(e, dict) for e in models.values()):
                raise ValueError(f"not a version {self.VERSION} episodes file")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            self._written = None  # (written anew at the next window close, episodes or not)
            log.warning("the file of window episodes under way cannot be read; starting without it (an episode "
                        "under way may be announced again) and writing it anew",
                        extra={"path": str(self.path), "error": f"{type(error).__name__}: {error}"})
            return {}
        self._written = models
        return models

    def save(self, models: dict[str, dict]) -> None:
        """Write the episodes under way when they changed (atomically: a crash mid-write leaves the last)."""
        if self.path is None or models == self._written or self._waited_for(models) == self._refused:
            return
        staging = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            staging.write_text(json.dumps({"version": self.VERSION, "models": models}), encoding="utf-8")
            os.replace(staging, self.path)
        except OSError as error:
            with contextlib.suppress(OSError):  # (a half-written copy, or a whole one not put in place)
                staging.unlink(missing_ok=True)
            if self._refused is None:
                log.warning("window episodes under way cannot be kept over a restart (a restart may announce "
                            "them again); set --episodes-file to a writable path, or empty to keep none",
                            extra={"path": str(self.path), "error": str(error)})
            self._refused = self._waited_for(models)
            return
        self._written = models
        self._refused = None

    @staticmethod
    def _waited_for(models: dict[str, dict]) -> dict:
        """What must change before a write that failed is tried again: each model's subjects (the end of
        its last window moves on every window while an episode lasts: a read-only models directory was
        written to on every tick for as long)."""
        return {name: entry.get("subjects") for name, entry in models.items()}


class ModelBehaviour:
    """The windows and clients of one loaded model: its own, or those of the model it replaced."""

    def __init__(self, model: Optional[Model], settings, metrics=None, replaced: Optional["ModelBehaviour"] = None):
        """``replaced``: the state of the model of this name served before (None: none is). No
        ``settings``: no state (for models retired whose state no successor took over)."""
        self.model = model
        self.windows: Optional[WindowCounter] = None
        self.clients: Optional[ClientWatch] = None
        self.lateness: Optional[Lateness] = None
        self.fingerprint: Optional[str] = None  # detectors_fingerprint
        if settings is None or not settings.windows:
            return
        try:
            clients = entity_spec(model)
            try:
                spec = window_spec(model)
            except ConfigError as error:  # its zone cannot be loaded here: the clients need none
                log.error("this model's windows cannot be used here; its records and clients are scored as ever",
                          extra={"model": model.name, "error": str(error)})
                spec = None
            self.fingerprint = detectors_fingerprint(model, spec, clients)
        except Exception as error:  # the record model serves on; its behaviour detectors cannot
            log.error("window/client detectors of this model cannot be used; it scores records as ever",
                      extra={"model": model.name, "error": f"{type(error).__name__}: {error}"})
            return
        if self.fingerprint is not None and replaced is not None and replaced.fingerprint == self.fingerprint:
            self._take_over(replaced, spec, clients)
            return
        if spec is not None:
            gauges = metrics.observe_window if metrics is not None else None
            self.windows = WindowCounter(spec, model.name, KeyNamer(spec.dimensions, levels_read=spec.levels_read),
                                         settings.window_max_keys, observe_gauges=gauges)
        if clients is not None:
            self.clients = ClientWatch(clients, model.name, settings.entity_key, settings.entity_max_clients)
        if spec is not None or clients is not None:
            window_s = spec.window_s if spec is not None else 0.0
            self.lateness = Lateness(max(LATE_GRACE_WINDOWS * window_s, MIN_LATE_GRACE_S))

    def _take_over(self, replaced: "ModelBehaviour", spec: Optional[WindowSpec],
                   clients: Optional[EntitySpec]) -> None:
        """Go on with the live state of the model replaced, whose detectors are these: the open
        window, the forecasters, episodes under way, clients and sources' delays. Learned models are
        swapped in about once a minute (learn_retrain_records): each fresh start lost the open window
        (every window was counted in part, so no drop was ever seen), raised ongoing episodes again,
        and forgot every client. The detectors are now called through this model's graph (so the
        replaced model can go)."""
        # NOTE: the counter and the watch read from their spec at construction only what the
        # fingerprint covers (keys, window length, route): they can go on under the new spec.
        self.windows, self.clients, self.lateness = replaced.windows, replaced.clients, replaced.lateness
        if self.windows is not None:
            self.windows.spec = spec
        if self.clients is not None:
            self.clients.spec = clients
        log.info("model replaced by one with the same window and client detectors: their live state carries over",
                 extra={"model": self.model.name, "version": self.model.version})


class Behaviour:
    """Windows and clients of every loaded model, and the events they raise."""

    def __init__(self, settings, hub: EventHub, metrics=None):
        self.settings = settings
        self.hub = hub
        self.metrics = metrics
        self._models: dict[Model, ModelBehaviour] = {}
        # Models no longer loaded whose scored batches may still come (a big request observed in the
        # scoring thread after the reload): their records count in their successor's state when it
        # took theirs over, else nowhere. NOTE: looked up as any model, a retired one was watched
        # again and, the latest of its name, handed its stale state to the next swap.
        self._retired: "weakref.WeakKeyDictionary[Model, ModelBehaviour]" = weakref.WeakKeyDictionary()
        self._nothing = ModelBehaviour(None, None)  # (holds no model: a value holding its key would keep it)
        # NOTE: big requests are observed in the scoring thread while the clock closes windows
        # on the event loop: one lock keeps the counters consistent.
        self._lock = threading.Lock()
        self._late_said: dict[str, float] = {}  # model -> when late records were last logged
        self._ahead_said: dict[str, float] = {}  # model -> when records ahead of the clock were last logged
        self.episodes = EpisodeFile(settings.episodes_file if settings.windows else None, settings.models_dir)
        self._saved = self.episodes.load()  # model name -> episodes under way before a restart (_resume_episodes)

    def of(self, model: Model) -> ModelBehaviour:
        with self._lock:
            return self._watched(model)

    def _watched(self, model: Model) -> ModelBehaviour:
        """The model's state, made at its first sight (the lock held)."""
        found = self._models.get(model) or self._retired.get(model)
        if found is None:
            found = self._models[model] = ModelBehaviour(model, self.settings, self.metrics, self._replaced(model))
            self._resume_episodes(found)
        return found

    def _resume_episodes(self, watched: ModelBehaviour) -> None:
        """A model's first sight since the start: its windows go on with the episodes the sidecar had
        under way before its restart, when its detectors are the same ones and they are recent."""
        saved = self._saved.pop(watched.model.name, None)
        if saved is None or watched.windows is None or saved.get("fingerprint") != watched.fingerprint:
            return
        if watched.windows.resume(saved):
            log.info("window episodes under way before the restart go on (not announced again)",
                     extra={"model": watched.model.name, "subjects": sorted(watched.windows.alarmed)})

    def _episodes_under_way(self) -> dict[str, dict]:
        """Model name -> its episodes under way, as EpisodeFile keeps them (the lock held)."""
        models = {}
        for watched in self._models.values():
            under_way = watched.windows.episodes() if watched.windows is not None else None
            if under_way is not None:
                models[watched.model.name] = {"fingerprint": watched.fingerprint, **under_way}
        return models

    def _replaced(self, model: Model) -> Optional[ModelBehaviour]:
        """The state of the model of this name watched before this one, the latest (None: none)."""
        return next((watched for other, watched in reversed(self._models.items())
                     if other.name == model.name and other is not model), None)

    def observe(self, groups: dict, results: list, count: int, tags: Optional[Sequence[str]],
                now: Optional[float] = None, times: Optional[Sequence[object]] = None) -> Optional[np.ndarray]:
        """Count a scored request in its models' windows; entity scores per record (None: no model
        of this request watches clients, NaN: a late record's). ``times``: each record's own time
        as the shipper sent it (``records.event_times``), when it sent one. A failure here is logged
        and counted, never the request's."""
        try:
            with self._lock:
                return self._observe(groups, results, count, tags, time.time() if now is None else now, times)
        except Exception:
            log.exception("observing windows and clients failed; the records are scored as ever")
            if self.metrics is not None:
                self.metrics.errors.labels("behaviour", "any").inc()
            return None

    def _observe(self, groups: dict, results: list, count: int, tags: Optional[Sequence[str]],
                 now: float, times: Optional[Sequence[object]]) -> Optional[np.ndarray]:
        entity: Optional[np.ndarray] = None
        events = []
        carried: Optional[np.ndarray] = None  # the times the shipper sent, read once a model needs them
        for (model, positions), scored in zip(groups.items(), results):
            watched = self._watched(model)
            if watched.windows is None and watched.clients is None:
                continue
            if watched.windows is not None:
                events += watched.windows.close_due(now)
            # No columns: the model's windows count routes and tags only (records without other fields).
            columns = scored.columns if scored.columns is not None else {}
            size = len(scored.scores)
            mine = tags if tags is None or len(groups) == 1 else [tags[i] for i in positions]
            novelty = scored.novelty if scored.novelty is not None else np.zeros(size)
            record_scores = scored.scores
            if times is not None and carried is None:
                carried = event_times(times)
            # (intp: positions of an empty request are an empty list, which numpy reads as floats)
            own = own_times(columns, size, None if carried is None else carried[np.asarray(positions, np.intp)])
            late = None if own is None else watched.lateness.late(own, lateness_sources(columns, mine), now)
            if own is not None:
                self._say_ahead(model.name, watched.lateness.take_ahead(), now)
            live = np.arange(size)
            if late is not None:
                self._left_out_late(model.name, own[late], now)
                live = np.flatnonzero(~late)
                columns = {name: [values[i] for i in live.tolist()] for name, values in columns.items()}
                mine = None if mine is None else [mine[i] for i in live.tolist()]
                novelty, record_scores, size = novelty[live], record_scores[live], len(live)
            if watched.windows is not None and size:
                watched.windows.observe(columns, size, mine)
            if watched.clients is not None:
                if entity is None:
                    entity = np.full(count, np.nan, dtype=np.float32)
                if size:
                    scores, raised = watched.clients.observe(columns, np.full(size, now), novelty, record_scores)
                    events += raised
                    entity[np.asarray(positions)[live]] = scores
        self._publish(events)
        return entity

    def _left_out_late(self, model: str, times: np.ndarray, now: float) -> None:
        if self.metrics is not None:
            self.metrics.child(self.metrics.late_records, model).inc(len(times))
        if now - self._late_said.get(model, -math.inf) >= LATE_LOG_INTERVAL_S:
            self._late_said[model] = now
            log.warning("records arriving long after their own time are scored, and left out of windows and "
                        "clients (a backlog being caught up, a replayed log, or a sender whose clock is behind "
                        "the others of its tag: set its clock right): they are no burst of traffic",
                        extra={"model": model, "records": len(times),
                               "delay_s": round(float(np.median(now - times)), 1)})

    def _say_ahead(self, model: str, ahead: Optional[tuple[str, float]], now: float) -> None:
        """Log (at most once a minute a model) a source whose records are stamped ahead of the clock."""
        if ahead is None or now - self._ahead_said.get(model, -math.inf) < LATE_LOG_INTERVAL_S:
            return
        self._ahead_said[model] = now
        source, seconds = ahead
        log.warning("records stamped ahead of the sidecar's clock: a sender whose clock is ahead (set its clock "
                    "right, or the sidecar's if it is behind); they are counted on arrival and leave the others "
                    "of their source on time",
                    extra={"model": model, "source": source[:MAX_LOGGED_SOURCE_CHARS], "ahead_s": round(seconds, 1)})

    def tick(self, now: Optional[float] = None) -> None:
        """Close the windows that ended (also when no records arrive: a drop to zero is news)."""
        events = []
        with self._lock:
            now = time.time() if now is None else now  # (read under the lock: observe closes windows too)
            # (a model and the one replacing it share their windows until the reload prunes it:
            # closed once, the second close finds nothing due)
            for watched in list(self._models.values()):
                if watched.windows is not None:
                    events += watched.windows.close_due(now)
            under_way = self._episodes_under_way()
        self.episodes.save(under_way)  # (when they changed: at a window close)
        self._publish(events)

    def _publish(self, events: list) -> None:
        if events and self.metrics is not None:
            self.metrics.observe_events(events)
        self.hub.publish(events)

    def follow(self, loaded) -> None:
        """The loaded models, after a (re)load: those that carry windows or clients are watched (their
        windows close even before traffic; one replacing a model of its name takes over its state
        when their detectors are the same), then the state of models no longer loaded goes."""
        loaded = set(loaded)
        with self._lock:
            for model in loaded:
                if carries_behaviour(model.metadata):
                    self._watched(model)
            for model in [m for m in self._models if m not in loaded]:
                self._retired[model] = self._successor(self._models.pop(model)) or self._nothing

    def _successor(self, state: ModelBehaviour) -> Optional[ModelBehaviour]:
        """The loaded model's state that took ``state`` over (None: none did)."""
        if state.windows is None and state.clients is None:
            return None
        return next((other for other in self._models.values()
                     if other.windows is state.windows and other.clients is state.clients), None)

    def tick_seconds(self) -> float:
        with self._lock:  # (the scoring thread may be adding a model)
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
