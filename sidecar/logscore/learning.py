"""Learning on arrival: each route learns its own model from the traffic it sees.

    ScoringService ─► Learner.observe(routes, records)       a bounded window of recent records per route
                  ◄─ Learner.holds(model, routes)            decide: flag held, note `learning`
    Learner.run() (a task of the sidecar), one route at a time:
        a route without a model of its own has ``learn_records`` records, or a learned route has
        ``learn_retrain_records`` new ones (drift) or a window 1.5 times what its model learned from
        ─► the window, but for its most recent tenth (kept for validation), goes to a file
        ─► `logscore train` in a child process: the same code as the command, niced, one thread;
           a retrain passes the route's learned model as --previous-model (what it flags, feedback
           applied, is not learned: attacks in the window are not learned as normal); a serving
           model with windows or clients (trained from history) passes them on, --behaviour-from
        ─► validation: candidate and serving model score the held-back recent records; a candidate
           flagging more than ``learn_max_flag_ratio`` × max(serving model's share, target FPR) is
           kept aside in the work directory and reported, not swapped
        ─► a validated candidate is refit on the whole window (same command), then
        ─► os.replace into the models directory: the registry's hot reload loads, probes and swaps it

A route is the name of the model a record resolves to, or ``<model>@<value>`` of the
``entity_field`` (the per-entity models the registry already routes to). A learned model
carries ``training.learned_route`` in its metadata; until one serves a route, the route is
learning. Work files live in ``<models_dir>/.learning/<route>/`` (the registry ignores dot
directories).
"""

from __future__ import annotations

import asyncio
import codecs
import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .decide import decide
from .errors import ConfigError, LogscoreError
from .flood import target_fpr
from .metrics import OncePerInterval
from .model import Model, carries_behaviour
from .records import field_map_json, to_text
from .registry import ModelRegistry
from .resources import default_models_dir
from .settings import Settings

log = logging.getLogger("logscore.learning")

WORK_DIR = ".learning"
# In WORK_DIR, held by the one sidecar learning into the models directory (a dot: no route's directory
# is named so, where "lock" was a model lock.onnx's)
LOCK_FILE = ".lock"
# Validation scores the held-back records on fresh trackers, each session seen from its middle: a
# serving model's share so measured was 70.9 % where in order it flags 4.4 % (probe, session 26),
# so any candidate passed. Until the window is replayed in order, session models are not learned.
SESSIONS_NOT_LEARNED = ("a session model is not learned on arrival (its candidate could not be checked: the "
                        "records held back would be scored without their sessions' beginnings); its flags are "
                        "not held; retrain it by hand: logscore train --session-key ...")
HOLDOUT = 0.1  # the most recent share of a window, scored to validate a candidate
OUTGROWN = 1.5  # a learned route retrains once its window holds this many times the records its model
#               learned from (once: a model learned from a full window never has more to learn from)
MAX_RECORD_CHARS = 16_384  # longer records are not kept in windows (memory stays bounded)
TRAIN_TIMEOUT_S = 3600.0
CHECK_INTERVAL_S = 0.5
KEPT_ASIDE = 3  # rejected candidates kept per route for review
# After a failed training the next try waits twice as many records (up to 32 times learn_records);
# after this many failures in a row the route's flags are no longer held: its records are flagged
# by the model it falls back to, as if learning were off (a full disk held every flag for good).
MAX_HELD_FAILURES = 3
# Routes said not to be learned one by one; past these, one line an interval with a count and an example
# (12,000 distinct IPv6 hosts, fit for no file name, made 12,000 lines in 25 s: one a record, soak probe).
NOT_LEARNED_NAMED = 1000
NOT_LEARNED_LOG_INTERVAL_S = 60.0
# Per-entity routes that gave up their slot (too quiet, see Learner._free_quiet_slots) are remembered, up to
# this many, so as not to take a slot again at once; past it the oldest are forgotten.
GAVE_UP_REMEMBERED = 10_000
# A slot holder gives up (when others wait) once its model has seen this many times learn_records ×
# learn_max_routes records with the entity field since it took the slot: it keeps the slot with a quarter
# of its even share. At 1× (an even share), 20 hosts of equal traffic on 8 slots all gave up and none
# learned (review, session 27); at 4×, entities with 1/32 of their model's traffic learn (defaults).
PATIENCE_SHARES = 4


def learning_unavailable(settings: Settings) -> Optional[str]:
    """Why learning cannot run with these settings, or None."""
    for module in ("sklearn", "onnx"):
        try:
            missing = importlib.util.find_spec(module) is None
        except (ImportError, ValueError):
            missing = True
        if missing:
            return (f"the train extra is not installed ({module} is missing); "
                    "install it in the sidecar's environment: pip install 'logscore[train]'")
    directory = Path(settings.models_dir).resolve()
    if directory == default_models_dir().resolve():
        return ("the models directory is logscore's own (the shipped default model); learned models go to "
                "a directory of yours: set --models-dir and copy the starting model there")
    if not os.access(directory, os.W_OK):
        return f"the models directory {directory} is not writable"
    return None


@dataclass
class Route:
    name: str
    window: deque
    seen: int = 0
    sizes: deque = field(default_factory=deque)  # each window record's estimated memory (record_bytes)
    window_bytes: int = 0  # their sum, kept within learn_window_bytes
    short_of_bytes: bool = False  # the window's bytes hold fewer than learn_records records (cannot learn)
    trained_at: int = 0  # records seen when the last training started
    training: bool = False
    last: Optional[dict] = None  # the last training's outcome, for status and logs
    held: int = 0  # records whose flag was held
    failures: int = 0  # trainings failed in a row
    learned_from: int = 0  # window records the model it last swapped in was trained on
    admitted_at: int = 0  # its model's records with the entity field seen when the route took its slot
    refusals_at: int = 0  # entity values refused a slot (the slots full) when the route took its slot
    warned: tuple = ()  # what the training of the last model swapped in (or kept aside) warned of
    # Its last first candidate was kept aside (learned from a window of attacks, flagging far more than
    # the serving model, or missing keep-marked records): its flags are not held, the model it falls
    # back to flags them, until a later first candidate passes. (Held, they stayed held for good.)
    first_kept_aside: bool = False

    def drop_oldest(self) -> None:
        self.window.popleft()
        self.window_bytes -= self.sizes.popleft()

    def releases_flags(self) -> bool:
        """Whether the route's flags are no longer held although it has no model of its own."""
        return self.failures >= MAX_HELD_FAILURES or self.first_kept_aside or self.short_of_bytes


class Learner:
    def __init__(self, settings: Settings, registry: ModelRegistry, request_reload: Callable[[], None],
                 metrics=None):
        self.settings = settings
        self.registry = registry
        self.request_reload = request_reload
        self.metrics = metrics
        self.work = Path(settings.models_dir) / WORK_DIR
        self.routes_by_name: dict[str, Route] = {}
        self._refused: set[str] = set()  # routes said not to be learned by name (bounded)
        self._refused_past_named = OncePerInterval(NOT_LEARNED_LOG_INTERVAL_S)  # the rest: by reason
        # Per model, its records with the entity field seen: the clock of a slot's patience.
        self._entity_records: dict[str, int] = {}
        self._refusals = 0  # entity values refused a slot because every slot was taken
        # Per-entity routes that gave up their slot (oldest first, bounded), with their model's
        # _entity_records then: they may take a slot again once patience has passed since.
        self._gave_up: dict[str, int] = {}
        self._gave_up_said = OncePerInterval(NOT_LEARNED_LOG_INTERVAL_S)
        self._said_short: set[str] = set()  # routes said to be too big to learn (once each)
        self._child: Optional[asyncio.subprocess.Process] = None
        self._stopping = asyncio.Event()
        self._lock: Optional[int] = None  # the lock file's descriptor, held for the process's life

    def claim_models_dir(self) -> None:
        """Take the models directory's learning lock, or refuse (ConfigError naming the holder, or what
        keeps the lock from being taken).
        NOTE: two sidecars learning into one models directory wrote the same work files and swapped
        into the same <route>.onnx: each served the model learned from the other's traffic (probe)."""
        path = self.work / LOCK_FILE
        descriptor = None
        try:
            self.work.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process holds it
            holder = os.read(descriptor, 32).decode("ascii", "replace").strip()
            os.close(descriptor)
            raise ConfigError(
                f"--learn: another sidecar{f' (pid {holder})' if holder.isdigit() else ''} learns into the "
                f"models directory {self.settings.models_dir} (it holds {path}); give each learning sidecar "
                "a --models-dir of its own, or learn on one only (--learn false on the others: they serve "
                "the models it learns)") from None
        except OSError as error:  # an unwritable directory, a full disk, no locks on this file system
            if descriptor is not None:
                os.close(descriptor)
            raise ConfigError(f"--learn: cannot take the learning lock {path} ({error.strerror or error}); "
                              "learning needs a models directory it may write: fix its permissions or free "
                              "space, or serve without --learn") from None
        try:  # the holder's pid, for the message above: best effort
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
        except OSError:
            pass
        self._lock = descriptor

    # --- on the scoring path (cheap) ---------------------------------------------
    def routes(self, model: Model, records: Sequence[object]) -> list[Optional[str]]:
        """Each record's route; None for records not learned (entities beyond learn_max_routes or
        with names unfit for a file)."""
        if model.sessions is not None:
            self._not_learned(model.name, SESSIONS_NOT_LEARNED)
            return [None] * len(records)
        entity = self.registry.entity_field
        # NOTE: a model with windows is learned as one route from all of its records: its windows
        # forecast its whole traffic, which models per entity would split (a drop every window); and
        # that one model goes on scoring every entity's records, so it learns from them all.
        if not entity or model.metadata.get("windows"):
            return [model.name] * len(records)
        names = []
        for record in records:
            value = record.get(entity) if isinstance(record, dict) else None
            if value is not None:
                self._entity_records[model.name] = self._entity_records.get(model.name, 0) + 1
            names.append(self._admit(model.name if value is None else f"{model.name}@{to_text(value)}"))
        return names

    def _admit(self, name: str) -> Optional[str]:
        """Every model's own route; per-entity routes up to learn_max_routes, named fit for a file."""
        if name not in self.routes_by_name and "@" in name:
            if not SAFE_ROUTE.fullmatch(name.partition("@")[2]):
                self._not_learned(name[:80], "the entity value is not a plain name (letters, digits, . _ -)")
                return None
            if name in self._gave_up:
                if self._model_clock(name) - self._gave_up[name] < self._patience():
                    return None  # gave up lately: a slot it takes again would be given up again
                del self._gave_up[name]
            if self._slots_taken() >= self.settings.learn_max_routes:
                self._refusals += 1
                return None
        self._route(name)
        return name

    def _slots_taken(self) -> int:
        return sum("@" in n for n in self.routes_by_name)

    def _patience(self) -> int:
        return PATIENCE_SHARES * self.settings.learn_records * self.settings.learn_max_routes

    def _model_clock(self, name: str) -> int:
        """Records with the entity field seen so far by the model of the per-entity route ``name``."""
        return self._entity_records.get(name.partition("@")[0], 0)

    def _not_learned(self, name: str, why: str) -> None:
        """Say once per route why it is not learned; past NOT_LEARNED_NAMED routes, once an interval
        per reason, with the records not learned since and the route at hand as an example."""
        if name in self._refused:
            return
        if len(self._refused) < NOT_LEARNED_NAMED:
            self._refused.add(name)
            log.warning("learning: route not learned", extra={"route": name, "reason": why})
            return
        unsaid = self._refused_past_named.due(why, 1)
        if unsaid is not None:
            log.warning(f"learning: routes not learned (past the first {NOT_LEARNED_NAMED:,} named, said once "
                        f"per {NOT_LEARNED_LOG_INTERVAL_S:.0f} s)",
                        extra={"route": name[:80], "reason": why, "not_learned_since_last_logged": unsaid[0]})

    def holds(self, model: Model, routes: Sequence[Optional[str]]) -> Optional[list[Optional[str]]]:
        """Per record, why its flag is held (its route has no model of its own yet), or None."""
        reasons: dict[Optional[str], Optional[str]] = {None: None}
        held = []
        for name in routes:
            if name not in reasons:
                route = self.routes_by_name.get(name)
                released = route is not None and route.releases_flags()
                reasons[name] = None if released or learned_for(model, name) else self._reason(name)
            held.append(reasons[name])
        if not any(held):
            return None
        for name, reason in reasons.items():
            if reason is not None:
                self.routes_by_name[name].held += sum(1 for n in routes if n == name)
        return held

    def _reason(self, name: str) -> str:
        route = self._route(name)
        if route.training:
            return f"route {name} is training its own model on {route.trained_at} records"
        if route.failures:
            return f"route {name} is learning its own model (its last training failed; the next try after " \
                   f"{self._retry_after(route)} more records)"
        return f"route {name} is learning its own model ({min(route.seen, self.settings.learn_records)} of " \
               f"{self.settings.learn_records} records seen)"

    def _records_due(self, route: Route) -> int:
        """New records before the route's first training, or its next try after failures (doubling)."""
        return self.settings.learn_records * 2 ** min(route.failures, 5)

    def _retry_after(self, route: Route) -> int:
        return max(self._records_due(route) - (route.seen - route.trained_at), 0)

    def observe(self, routes: Sequence[Optional[str]], records: Sequence[object]) -> None:
        """Keep each route's recent records (bounded); records too long or multi-line are skipped."""
        if len(set(routes)) == 1:
            self._keep(routes[0], records)
        else:
            by_route: dict[str, list] = {}
            for name, record in zip(routes, records):
                if name is not None:
                    by_route.setdefault(name, []).append(record)
            for name, kept in by_route.items():
                self._keep(name, kept)
        self._free_quiet_slots()

    def _free_quiet_slots(self) -> None:
        """While every slot is taken and some entity value was refused one since a per-entity route took
        its slot, the route gives the slot up if it has not seen learn_records of its own within
        PATIENCE_SHARES × learn_records × learn_max_routes of its model's records with the entity field:
        its records are then flagged by the model they resolve to, as past learn_max_routes, until that
        patience has passed again (then it may take a free slot anew).
        NOTE: slots went to the first entity values seen and were held for good: with 5,000 hosts, 8
        quiet ones (13 records a minute) held their flags for about 6 h, and an SQLi naming one of
        them as its host was not flagged (soak probe, session 27). Counted in every record of every
        model and checked with slots free, giving up stopped learning that worked: 20 hosts of equal
        traffic on 8 slots, or 4 hosts at 10 % with 4 slots free, all gave up (review, session 27)."""
        if self._slots_taken() < self.settings.learn_max_routes:
            return
        patience = self._patience()
        for route in [r for n, r in self.routes_by_name.items() if "@" in n]:
            if route.refusals_at == self._refusals or self._model_clock(route.name) - route.admitted_at < patience \
                    or route.seen >= self.settings.learn_records or route.training \
                    or self._serving_learned(route.name):
                continue
            del self.routes_by_name[route.name]
            self._gave_up[route.name] = self._model_clock(route.name)
            if len(self._gave_up) > GAVE_UP_REMEMBERED:
                del self._gave_up[next(iter(self._gave_up))]
            unsaid = self._gave_up_said.due("gave up", 1)
            if unsaid is not None:
                log.warning("learning: a per-entity route gave up its slot: too quiet to learn its own model "
                            "soon; its records are flagged by the model they resolve to",
                            extra={"route": route.name, "records_seen": route.seen,
                                   "model_records_since_admitted": self._model_clock(route.name) - route.admitted_at,
                                   "gave_up_since_last_logged": unsaid[0]})

    def _keep(self, name: Optional[str], records: Sequence[object]) -> None:
        if name is None or name in self._gave_up:  # not learned, or it gave its slot up since it was routed
            return
        route = self._route(name)
        route.seen += len(records)
        budget, window, sizes = self.settings.learn_window_bytes, route.window, route.sizes
        for record in records:
            size = record_bytes(record)
            if size is None:
                continue
            if len(window) == window.maxlen:
                route.drop_oldest()
            # A copy: forward mode adds its scores to the records it passes on, after this.
            window.append(dict(record) if isinstance(record, dict) else record)
            sizes.append(size)
            route.window_bytes += size
            while route.window_bytes > budget:
                route.drop_oldest()
                self._short_of_bytes(route)
        if route.short_of_bytes and len(window) >= self.settings.learn_records:
            route.short_of_bytes = False  # smaller records since: it can learn again

    def _short_of_bytes(self, route: Route) -> None:
        """Records left the window for its bytes: if fewer than learn_records remain, the route cannot
        learn (its window never holds enough): say so once, and release its flags meanwhile (held, they
        would stay held for good). NOTE: windows were bounded by records only, and 9,900 maps of 740
        numbers grew a sidecar from 98 to 1,022 MiB for one route (probe, session 30)."""
        s = self.settings
        if route.short_of_bytes or len(route.window) >= s.learn_records:
            return
        route.short_of_bytes = True
        if route.name not in self._said_short:
            self._said_short.add(route.name)
            log.warning("learning: a route's records are too big for its window to hold learn_records of them; "
                        "it cannot learn, and its flags are not held (the model it falls back to flags them): "
                        "raise learn_window_bytes, lower learn_records, or send smaller records",
                        extra={"route": route.name, "window_records": len(route.window),
                               "learn_records": s.learn_records, "learn_window_bytes": s.learn_window_bytes,
                               "average_record_bytes": route.window_bytes // max(len(route.window), 1)})

    def _route(self, name: str) -> Route:
        route = self.routes_by_name.get(name)
        if route is None:
            route = self.routes_by_name[name] = Route(name, deque(maxlen=self.settings.learn_window),
                                                      admitted_at=self._model_clock(name),
                                                      refusals_at=self._refusals)
        return route

    # --- the background task ---------------------------------------------------------
    async def run(self) -> None:
        """Train one route at a time, whenever one is due, until stopped."""
        while not self._stopping.is_set():
            route = self._due()
            if route is None:
                try:
                    await asyncio.wait_for(self._stopping.wait(), CHECK_INTERVAL_S)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                await self._learn(route)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a bug or an I/O error: report, keep serving, retry later
                log.exception("learning failed", extra={"route": route.name})
                self._failed(route, f"{type(error).__name__}: {error}")

    def _due(self) -> Optional[Route]:
        s = self.settings
        for route in self.routes_by_name.values():
            if route.training or len(route.window) < min(s.learn_records, s.learn_window):
                continue
            new = route.seen - route.trained_at
            if self._serving_learned(route.name):
                if s.learn_retrain_records and (new >= s.learn_retrain_records or self._outgrown(route)):
                    return route
            elif new >= self._records_due(route):  # the first model, or a retry
                return route
        return None

    def _outgrown(self, route: Route) -> bool:
        """The window holds ``OUTGROWN`` times the records the learned model was trained on: a first
        model learns from ``learn_records`` (5,000), and waited for ``learn_retrain_records`` more
        (100,000) while a full window (10,000) would have taught it more (a new shop's injected
        attacks: 86 % flagged with 5,000 records learned, 93 % with 10,000)."""
        # (what it swapped in last, too: the registry serves it only after its next reload)
        used = max(self._serving_model(route.name).metadata.get("training", {}).get("records_used") or 0,
                   route.learned_from)
        return 0 < used and len(route.window) >= OUTGROWN * used

    def _serving_learned(self, name: str) -> bool:
        model = self.registry.snapshot.models.get(name)
        return model is not None and learned_for(model, name)

    def _serving_model(self, name: str) -> Model:
        """The model scoring the route now: its own, else the one it falls back to."""
        models = self.registry.snapshot.models
        if name in models:
            return models[name]
        return models[name.partition("@")[0]]

    async def _learn(self, route: Route) -> None:
        route.training, route.trained_at = True, route.seen
        serving = self._serving_model(route.name)
        records = list(route.window)
        holdout = max(int(len(records) * HOLDOUT), 1)
        directory = self.work / route.name
        log.info("learning: training a candidate", extra={"route": route.name, "records": len(records) - holdout})
        loop = asyncio.get_running_loop()
        candidate_path = directory / "candidate.onnx"
        error, warnings = await self._train(route.name, directory, records[:-holdout], serving, candidate_path)
        if error is not None:
            self._failed(route, error)
            return
        first = not learned_for(serving, route.name)
        kept_marked = await loop.run_in_executor(None, self._marked_keep, route.name, records)
        detail = {"records": len(records) - holdout, "validated_on": holdout, "serving_model": serving.name,
                  **await loop.run_in_executor(None, self._validate, candidate_path, serving, records[-holdout:],
                                               records[:-holdout] if first else [], kept_marked)}
        rejected = self._rejection(route, serving, detail)
        if rejected is not None:
            reason, why = rejected
            kept = keep_aside(directory, candidate_path)
            self._relay(route, warnings)
            route.first_kept_aside = first
            if first:
                why += ("; it was the route's first model, so the route's flags are no longer held: the model "
                        "it falls back to flags its records until a later first model passes (tried after "
                        f"{self.settings.learn_records} more records)")
            log.warning(f"learning: candidate kept aside, not swapped: {why}",
                        extra={"route": route.name, "kept_as": str(kept), "reason": reason, **detail})
            self._finish(route, "kept_aside", {**detail, "reason": reason, "kept_as": str(kept)})
            return
        route.first_kept_aside = False
        # Validated, the candidate is refit on the whole window, its recent tenth too: a tenth more
        # traffic measurably helps (a shop's first 5,000 lines: injected attacks flagged 90.0 % →
        # 91.7 %; a blog's following lines flagged 0.62 % → 0.44 %). Should the refit fail, the
        # validated candidate serves.
        refit_path = directory / "refit.onnx"
        error, refit_warnings = await self._train(route.name, directory, records, serving, refit_path)
        if error is None:
            os.replace(refit_path, candidate_path)
            detail["records"] = len(records)
            warnings = refit_warnings
        else:
            refit_path.unlink(missing_ok=True)
            log.warning("learning: refit on the whole window failed; the validated candidate serves",
                        extra={"route": route.name, "error": error})
        self._relay(route, warnings)
        target = Path(self.settings.models_dir) / f"{route.name}.onnx"
        try:
            await loop.run_in_executor(None, swap_in, candidate_path, target, directory)
        except OSError as error:  # a full disk: what this cycle wrote goes, not to keep it full
            remove_cycle_files(directory)
            self._failed(route, f"cannot swap the learned model in: {error}; the serving model is unchanged: free "
                         f"space on (or fix the permissions of) {target.parent}", stage="swap")
            return
        route.learned_from = detail["records"]
        log.info("learning: learned model swapped in", extra={"route": route.name, "file": str(target), **detail})
        self._finish(route, "swapped", {**detail, "file": str(target)})
        self.request_reload()

    async def _train(self, name: str, directory: Path, records: list, serving: Model,
                     out: Path) -> tuple[Optional[str], list[str]]:
        """Write the records and train on them in a child process: (the error text or None, what it warned of)."""
        try:
            inputs = await asyncio.get_running_loop().run_in_executor(None, write_inputs, directory, records,
                                                                      serving)
        except OSError as error:  # a full or vanished work directory: what was written goes, not to fill it
            for partial in ("records.jsonl", "spec.json"):
                (directory / partial).unlink(missing_ok=True)
            return f"cannot write the training records: {error}", []
        return await self._train_child(name, inputs, serving, out)

    async def _train_child(self, name: str, inputs: dict, serving: Model,
                           out: Path) -> tuple[Optional[str], list[str]]:
        """`logscore train` in a niced, single-threaded child process: (the error text or None, its warnings)."""
        command = [sys.executable, "-m", "logscore", "train", "--input", str(inputs["records"]), "--json-records",
                   "--config", str(inputs["spec"]), "--detectors", ",".join(serving.detectors),
                   "--target-fpr", str(target_fpr(serving)), "--name", name, "--learned-route", name,
                   "--out", str(out), "--feedback", "env", "--learner-pid", str(os.getpid())]
        if learned_for(serving, name):  # retraining the route's own model: what it flags is not learned
            command += ["--previous-model", str(serving.artifact.path)]
        if carries_behaviour(serving.metadata):
            # Trained from history with its timestamps: a window of recent records cannot teach them again.
            command += ["--behaviour-from", str(serving.artifact.path)]
        # The store's location (a URL may hold a password) goes by environment, not the process list.
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                       "LOGSCORE_FEEDBACK_STORE": feedback_location(self.settings)}
        self._child = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                           stderr=asyncio.subprocess.PIPE, env=environment)
        try:
            # NOTE: niced after it started (preexec_fn is unsafe with threads); serving keeps its core.
            os.setpriority(os.PRIO_PROCESS, self._child.pid, 10)
        except OSError:
            pass
        try:
            _, stderr = await asyncio.wait_for(self._child.communicate(), TRAIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._child.kill()
            await self._child.wait()
            return f"training took longer than {TRAIN_TIMEOUT_S:.0f} s", []
        finally:
            code, self._child = self._child.returncode, None
        from .cli import TRAIN_WARNING

        lines = stderr.decode("utf-8", "replace").strip().splitlines()
        if code != 0:
            return (lines[-1] if lines else f"logscore train exited with {code}"), []
        return None, [line[len(TRAIN_WARNING):] for line in lines if line.startswith(TRAIN_WARNING)]

    def _relay(self, route: Route, warnings: list[str]) -> None:
        """Log what the training of the model swapped in (or kept aside) warned of, each warning once
        while its trainings go on saying it.
        NOTE: what `logscore train` warns an operator of by hand (the previous model's flags not used,
        attacks set aside, records that did not parse) went nowhere: a retrain that learned a whole
        window, an attack's day among it, looked like any other (weekone trial). Relayed from both of a
        cycle's trainings (the candidate and its refit) and at every cycle, a keep entry the new models
        did not flag was warned of 354 times in a 65-minute soak."""
        for warning in warnings:
            if warning not in route.warned:
                log.warning("learning: the training warned", extra={"route": route.name, "warning": warning})
        route.warned = tuple(warnings)

    def _validate(self, path: Path, serving: Model, recent: list, learned: list, kept_marked: list) -> dict:
        """The shares of the held-back recent records flagged by the candidate and by the serving model,
        of the records ``learned`` (a first model's) by the serving model, and how many of the window's
        records marked keep each flags (fresh instances of both: no caches or sessions shared with the
        scoring thread)."""
        candidate = Model.load(path, max_line_chars=self.registry.max_line_chars)
        current = Model(serving.artifact, max_line_chars=self.registry.max_line_chars)
        found = {"candidate_flagged": round(flagged_share(candidate, recent), 5),
                 "serving_flagged": round(flagged_share(current, recent), 5)}
        if learned:
            found["window_flagged"] = round(flagged_share(current, learned), 5)
        if kept_marked:
            found["keep_records"] = len(kept_marked)
            found["keep_flagged_candidate"] = round(flagged_share(candidate, kept_marked) * len(kept_marked))
            found["keep_flagged_serving"] = round(flagged_share(current, kept_marked) * len(kept_marked))
        return found

    def _marked_keep(self, route_name: str, records: list) -> list:
        """The window's records an operator marked keep (true anomalies) for the route's model."""
        from .feedback import record_text
        from .training.feedback import load_feedback

        location = feedback_location(self.settings)
        if "://" not in location and not os.path.isfile(location):
            return []  # no feedback given yet
        try:
            marked = {record_text(r) for r in load_feedback(location, route_name, must_exist=False).keep}
        except (LogscoreError, OSError) as error:  # (the training read it a moment ago: seldom)
            log.warning("learning: cannot read the records marked keep; the candidate is validated without them",
                        extra={"route": route_name, "error": str(error)})
            return []
        return [r for r in records if record_text(r) in marked] if marked else []

    def _rejection(self, route: Route, serving: Model, detail: dict) -> Optional[tuple[str, str]]:
        """Why the validated candidate must not serve (a reason for /readyz, a sentence for the log), or None."""
        s = self.settings
        if detail.get("window_flagged", 0.0) > s.learn_max_first_flagged:
            return "first_window_flagged", (
                f"the serving model flags {detail['window_flagged']:.0%} of the records the route's first model "
                f"would learn from (over learn_max_first_flagged {s.learn_max_first_flagged:g}): such a window "
                "looks like an attack, not the site's own traffic. If "
                f"the traffic is the site's, copy the kept-aside model to {s.models_dir}/{route.name}.onnx (it "
                "serves as the route's own), or raise learn_max_first_flagged (1: never kept aside)")
        limit = s.learn_max_flag_ratio * max(detail["serving_flagged"], target_fpr(serving))
        if detail["candidate_flagged"] > limit:
            return "flags_recent_traffic", "it flags far more of recent traffic than the serving model"
        # Fewer than the serving model, not fewer than all: a keep record no model flags would stop the
        # route's learning for good, and the candidate is then no worse than what serves.
        if detail.get("keep_flagged_candidate", 0) < detail.get("keep_flagged_serving", 0):
            return "keep_records_missed", (
                f"it flags {detail['keep_flagged_candidate']} of the window's {detail['keep_records']} records "
                f"marked keep, the serving model {detail['keep_flagged_serving']}: it would let through "
                "what an operator marked as true anomalies. Check those entries (logscore feedback list); "
                f"to serve it anyway, copy the kept-aside model to {s.models_dir}/{route.name}.onnx")
        return None

    def _failed(self, route: Route, error: str, stage: str = "training") -> None:
        route.failures += 1
        self._finish(route, "failed", {"error": error})
        holding = route.failures < MAX_HELD_FAILURES
        log.warning(f"learning: {stage} failed; " + ("the route's flags stay held" if holding else
                    "the route's flags are no longer held: the model it falls back to flags its records"),
                    extra={"route": route.name, "error": error, "failures_in_a_row": route.failures,
                           "next_try_after_records": self._retry_after(route)})

    def _finish(self, route: Route, outcome: str, detail: dict) -> None:
        if outcome != "failed":
            route.failures = 0
        route.training = False
        route.last = {"outcome": outcome, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **detail}
        if self.metrics is not None:
            self.metrics.learning_outcomes.labels(route.name, outcome).inc()

    async def stop(self) -> None:
        self._stopping.set()
        if self._child is not None and self._child.returncode is None:
            self._child.kill()
        if self._lock is not None:  # (the process ends next; in process, a sidecar started again may learn)
            os.close(self._lock)
            self._lock = None

    def status(self) -> dict:
        """Per route: learning, training or learned, with counts and the last outcome (for /readyz)."""
        return {name: {"state": "training" if r.training else "learned" if self._serving_learned(name)
                       else "learning",
                       "records_seen": r.seen, "window": len(r.window), "window_bytes": r.window_bytes,
                       "window_short_of_bytes": r.short_of_bytes, "flags_held": r.held,
                       "holding_flags": not (self._serving_learned(name) or r.releases_flags()),
                       "last": r.last}
                for name, r in sorted(self.routes_by_name.items())}


SAFE_ROUTE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # an entity value that may name a file


def feedback_location(settings: Settings) -> str:
    """The sidecar's feedback store: retraining folds its entries in, as `logscore train --feedback` does."""
    from .feedback_store import default_location

    return settings.feedback_store or default_location(settings.models_dir)


def flagged_share(model: Model, records: list) -> float:
    return float(decide(model, model.score(records)).is_anomaly.mean())


def learned_for(model: Model, route: Optional[str]) -> bool:
    return model.metadata.get("training", {}).get("learned_route") == route


def record_bytes(record: object) -> Optional[int]:
    """The memory a record takes in a window, estimated, or None if it may not join one: a line without
    line breaks, or a field map, of at most MAX_RECORD_CHARS as the training file holds it (field_map_json).
    NOTE: only top-level texts were counted: maps nested in a field (a 90 KB blob under "meta") were
    kept whole, and a probe grew a sidecar from 113 to 454 MiB with 4,000 of a window's 10,000.
    Characters are not bytes either: a map of 740 numbers written in 14.8k characters takes 85-93 KiB,
    hence the bytes counted here and the window's learn_window_bytes (probe, session 30)."""
    if isinstance(record, str):
        if len(record) > MAX_RECORD_CHARS or "\n" in record or "\r" in record:
            return None
        return record.__sizeof__()
    if isinstance(record, dict):
        size = flat_map_bytes(record)
        if size is not None:
            return size
        if serialized_fits(record):
            return nested_bytes(record)
    return None


JSON_CHARS_PER_CHAR = 6  # the most a character grows in field_map_json ("\u0001"; ensure_ascii=False)
JSON_CHARS_PER_ITEM = 40  # quotes, ": ", ", " and a number (a 64-bit integer or a float's repr: under 32)
FLAT_VALUES = (str, bytes, int, float, bool, type(None))


def flat_map_bytes(record: dict) -> Optional[int]:
    """A flat map's memory (the map, its keys and values, each as __sizeof__ gives it: exact, and a
    call costs a third of sys.getsizeof's), if a cheap proof shows it fits (about 2 µs a record, where
    serializing a Fluentd access record takes about 10 µs on the scoring path): each character grows
    six-fold at most. None means "measure it", not "too long"."""
    if len(record) * JSON_CHARS_PER_ITEM > MAX_RECORD_CHARS:
        return None  # (the proof cannot hold: no need to walk the map)
    chars = 0
    size = record.__sizeof__() + GC_HEADER_BYTES
    for key, value in record.items():
        if not isinstance(value, FLAT_VALUES) or (isinstance(value, int) and value.bit_length() > 64):
            return None
        chars += (len(key) if isinstance(key, (str, bytes)) else JSON_CHARS_PER_ITEM) + \
            (len(value) if isinstance(value, (str, bytes)) else 0)
        size += key.__sizeof__() + value.__sizeof__()
    if chars * JSON_CHARS_PER_CHAR + len(record) * JSON_CHARS_PER_ITEM > MAX_RECORD_CHARS:
        return None
    return size


GC_HEADER_BYTES = 16  # what a container takes besides its __sizeof__ (sys.getsizeof counts it)


def nested_bytes(value: object) -> int:
    """The memory of a value and all it holds (its JSON already checked short: the walk is short too).
    NOTE: walked with a list, not by recursion: a record nested 495 levels deep (JSON writes 990)
    raised RecursionError out of observe, and with --learn its scoring call answered 500 (review)."""
    size, pending = 0, [value]
    while pending:
        item = pending.pop()
        size += item.__sizeof__()
        if isinstance(item, dict):
            size += GC_HEADER_BYTES
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            size += GC_HEADER_BYTES
            pending.extend(item)
    return size


def serialized_fits(record: dict) -> bool:
    """The map's size as written for training, nested maps and lists included."""
    try:
        return len(field_map_json(record)) <= MAX_RECORD_CHARS
    except (TypeError, ValueError, RecursionError):  # nested past what JSON can write: not learned
        return False


def write_inputs(directory: Path, records: list, serving: Model) -> dict:
    """The training records (JSON lines: field maps as JSON, raw lines as they are) and the serving
    model's featurizer spec, for `logscore train --json-records --config`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"records": directory / "records.jsonl", "spec": directory / "spec.json"}
    with open(paths["records"], "wb") as out:
        for record in records:
            # NOTE: binary strings as text: written "b'GET'", a route learned behind the Fluentd filter
            # flagged every record it then scored
            out.write(storable((field_map_json(record) if isinstance(record, dict) else record) + "\n"))
    spec = serving.featurizer.spec()
    # NOTE: an access log's layout is the site's, not the featurizer's: kept, a common-format site
    # learning from the shipped model (combined) got a model reading its records' null referer and
    # agent as a "-" "-" its lines never hold. Training sets it from the records learned.
    spec.pop("access_layout", None)
    paths["spec"].write_text(json.dumps(spec), encoding="utf-8")
    return paths


def storable(text: str) -> bytes:
    """A record's line for the training file. NOTE: forward mode reads bytes that are not UTF-8 as lone
    surrogates (passed on as they came); written as UTF-8 they raised, and one such syslog line in a
    route's window failed every training of it (syslog field trial). They go as their own bytes, which
    training reads as it reads them in a log file (U+FFFD); any other lone surrogate (a JSON escape of
    half a pair) as '?'."""
    return text.encode("utf-8", "logscore-own-bytes")


def own_bytes_or_question_mark(error: UnicodeEncodeError) -> tuple[bytes, int]:
    """Each unencodable character of ``error``: a byte that was not UTF-8 (U+DC80-U+DCFF) as itself,
    any other lone surrogate as '?' (per character: one of each in a line kept the byte too)."""
    bad = error.object[error.start:error.end]
    return bytes(ord(c) - 0xDC00 if 0xDC80 <= ord(c) <= 0xDCFF else ord("?") for c in bad), error.end


codecs.register_error("logscore-own-bytes", own_bytes_or_question_mark)


BACKUP_PARTIAL = "previous.onnx.partial"


def swap_in(candidate: Path, target: Path, directory: Path) -> None:
    """The previous file is kept as previous.onnx in the work directory; the swap is one rename.
    NOTE: copied straight onto previous.onnx, a full disk left it truncated (77,824 of 152,279 bytes)
    in place of the last good backup: it is written beside it and renamed, or removed."""
    if target.exists():
        partial = directory / BACKUP_PARTIAL
        try:
            shutil.copy2(target, partial)
            os.replace(partial, directory / "previous.onnx")
        except OSError:
            partial.unlink(missing_ok=True)
            raise
    os.replace(candidate, target)


def remove_cycle_files(directory: Path) -> None:
    """What a learning cycle writes to its route's work directory (kept-aside candidates and the
    last complete previous.onnx stay)."""
    for name in ("candidate.onnx", "refit.onnx", "records.jsonl", "spec.json", BACKUP_PARTIAL):
        try:
            (directory / name).unlink(missing_ok=True)
        except OSError:  # (a directory made read-only: the failure's warning says what to fix)
            pass


def keep_aside(directory: Path, candidate: Path) -> Path:
    kept = directory / f"kept-aside-{time.strftime('%Y%m%dT%H%M%S')}.onnx"
    os.replace(candidate, kept)
    for old in sorted(directory.glob("kept-aside-*.onnx"))[:-KEPT_ASIDE]:
        old.unlink()
    return kept
