"""The one scoring core every surface calls: route, batch, score, assemble.

Surfaces (gRPC, HTTP/JSON, forward) only decode their payload into a ScoreCall
and encode the ScoreOutcome back.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .admission import Admission
from .batching import Batcher
from .decide import decide
from .errors import InvalidRequest, ShuttingDown, TagTooLong
from .metrics import Metrics
from .model import Model
from .records import LOGGED_TAG_CHARACTERS, to_text
from .registry import ModelRegistry
from .settings import Settings


@dataclass
class ScoreCall:
    records: Sequence[object]  # field maps or raw lines
    model: str = ""
    tag: str = ""
    explain: int = 0
    deadline: Optional[float] = None  # time.monotonic()
    surface: str = "grpc"
    tags: Optional[Sequence[str]] = None  # a tag per record (forward Message mode); overrides ``tag``
    times: Optional[Sequence[object]] = None  # each record's own time as the shipper sent it (records.event_times)
    explain_flagged: int = 0  # features named for each record its model flags, none for the others (forward mode)
    notes: Sequence[tuple[int, str, str]] = ()  # the surface's own, from decoding (records.EventStream.notes)


@dataclass
class ScoreOutcome:
    scores: np.ndarray  # float32 [N]
    is_anomaly: np.ndarray  # bool [N]
    model_index: np.ndarray  # uint32 [N], into models
    models: list[Model]
    explanations: Optional[list[list[str]]]
    notes: list[tuple[int, str, str]] = field(default_factory=list)  # (record, field, description)
    entity_scores: Optional[np.ndarray] = None  # float32 [N] (NaN: no client) when a model watches clients


INLINE_FLAGGED = 8  # more flagged records than this in a call: the feedback step runs in the scoring thread
BEHAVIOUR_INLINE_RECORDS = 512  # bigger requests are counted into windows and clients in the scoring thread


# NOTE: an answer is built whole before it is sent, outside the in-flight budget: 18,000 records
# with explain=100 made a 34 MiB answer (and 240 MiB of the sidecar's memory). 20,000 names,
# about 60 bytes each, keep an answer near 1 MiB, under gRPC's max_message_bytes.
MAX_EXPLANATIONS = 20_000
MAX_EXPLAIN = 100  # feature names for one record


SPLIT_BATCH = "(split the batch)"  # (`logscore client` names its --batch instead: cli.call_failure)


# NOTE: a sender picks its tags, and each distinct one was kept (per-tag counters, routes, the log's
# once-per-interval keys) and logged whole: 30 tags of 12 MiB took 845 MiB and 755 MB of log (probe).
# Real tags are far shorter: Kubernetes' longest (kube.var.log.containers.<pod 253>_<namespace 63>_
# <container 63>-<id 64>.log) is under 500 characters; Fluentd sets no limit, Fluent Bit cuts at 64 KiB.
MAX_TAG_CHARACTERS = 1024


def check_tags(call: "ScoreCall") -> None:
    """Refuse a call whose tag (or any record's) is longer than MAX_TAG_CHARACTERS, before any of
    it is routed, counted or kept."""
    tags = call.tags if call.tags is not None else (call.tag,)
    longest = max(tags, key=len, default="")
    if len(longest) > MAX_TAG_CHARACTERS:
        raise TagTooLong(f"a tag of {len(longest):,} characters (starting {longest[:LOGGED_TAG_CHARACTERS]!r}); "
                         f"the limit is {MAX_TAG_CHARACTERS:,}: set a shorter tag on the sender")


def check_record_count(count: int, limit: int) -> None:
    """Surfaces call this as soon as they know a request's size, before decoding its records."""
    if count > limit:
        raise InvalidRequest(f"{count} records in one request; the limit is {limit} {SPLIT_BATCH}")


def not_ready_reason(service) -> Optional[str]:
    """Why the sidecar should be sent no work now, or None when it is ready: the one answer both
    /readyz (503) and gRPC health (NOT_SERVING) give. NOTE: health said SERVING with no model loaded
    and with every scoring process hung, while /readyz said 503 or every call failed (probe-observe).
    Names no directory: /readyz answers without the token."""
    if not service.accepting:
        return "shutting down: the calls already received are being answered; send new ones elsewhere"
    if not service.registry.snapshot.models:
        return ("no model loaded: put a model file (.onnx, from `logscore train --out DIR/NAME.onnx`) in the "
                "models directory "
                "(--models-dir; the log names it); files there that did not load are under rejected_files")
    if service.processes is not None:
        return service.processes.not_answering_reason()
    return None


class ScoringService:
    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics, learner=None,
                 feedback=None, review=None, behaviour=None):
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.learner = learner  # learning.Learner when `learn` is on: sees every record, may hold flags
        if learner is not None:
            metrics.floods.learner = learner  # its flood warning says what applies while routes learn
        self.feedback = feedback  # feedback_store.FeedbackService: the rules decide applies
        self.review = review  # review.ReviewRing: sees flagged records (the review page)
        # One scoring thread: on 2 cores the other core serves the protocol surfaces.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring")
        self._batchers: dict[Model, Batcher] = {}
        self.accepting = True  # False while draining: /readyz says so; calls already received still score
        self._closed = False
        self.admission = Admission(settings.max_inflight_bytes)
        self.behaviour = behaviour  # behaviour.Behaviour: windows and clients of the models that carry them
        self.processes = None  # scoring_processes.ScoringProcesses when settings.scoring_processes > 0

    def start_processes(self) -> None:
        """Start the scoring processes (settings.scoring_processes) and load the models in them (blocking)."""
        if self.settings.scoring_processes < 1:
            return
        from .scoring_processes import ScoringProcesses

        self.processes = ScoringProcesses(self.settings.scoring_processes, self.settings.max_record_bytes,
                                          self.registry.client_key,
                                          lambda reason: self.metrics.scoring_process_restarts.inc(),
                                          self.settings.max_model_bytes,
                                          lambda model: self.metrics.scoring_process_stale_chunks.labels(
                                              model=model.name).inc(), self._serves)
        self.processes.warm(list(self.registry.snapshot.models.values()))

    def _serves(self, model: Model) -> bool:
        """Whether the registry serves this very model (not an older version of its file, still draining)."""
        return any(served is model for served in self.registry.snapshot.models.values())

    async def score(self, call: ScoreCall) -> ScoreOutcome:
        if self._closed:
            raise ShuttingDown("the sidecar is shutting down; retry on another instance or later")
        count = len(call.records)
        check_record_count(count, self.settings.max_records_per_request)
        check_tags(call)
        if max(call.explain, call.explain_flagged) > MAX_EXPLAIN:
            raise InvalidRequest(f"explain={max(call.explain, call.explain_flagged)}: name at most {MAX_EXPLAIN} "
                                 "features per record")
        if call.explain * count > MAX_EXPLANATIONS:
            raise InvalidRequest(f"explain={call.explain} on {count} records asks for {call.explain * count:,} "
                                 f"feature names; at most {MAX_EXPLANATIONS:,} a request: ask for fewer, or send "
                                 "smaller batches")
        records = call.records
        bases = self._bases(call)
        groups = self._group_by_entity(bases, records)
        if len(groups) == 1:
            model = next(iter(groups))
            results = [await self._batcher(model).score(records, call.explain, call.deadline, call.explain_flagged)]
        else:
            results = await asyncio.gather(*(
                self._batcher(m).score([records[i] for i in idx], call.explain, call.deadline, call.explain_flagged)
                for m, idx in groups.items()))
        routes = self._learning_routes(bases, records) if self.learner is not None else None
        flagged = [np.count_nonzero(result.is_anomaly) for result in results]
        # NOTE: feedback looks at records flagged by their score only (FeedbackStep.apply): a batch
        # without any (most) needs no step. decide then leaves its notes by kind; _assemble sorts them.
        work = [(m, result, self.learner.holds(m, [routes[i] for i in idx]) if routes else None,
                 self._feedback_step(call, records, idx, len(groups) == 1) if scored_high else None)
                for (m, idx), result, scored_high in zip(groups.items(), results, flagged)]
        if sum(flagged) > INLINE_FLAGGED and (self.feedback or self.review):
            # Feedback inspects flagged records again (~0.1 ms each): many go to the scoring thread.
            decisions = await asyncio.get_running_loop().run_in_executor(
                self.executor, lambda: [decide(*args) for args in work])
        else:
            decisions = [decide(*args) for args in work]
        outcome = self._assemble(count, groups, results, decisions, call.explain > 0 or call.explain_flagged > 0)
        if call.notes:
            outcome.notes = sorted([*outcome.notes, *call.notes], key=lambda note: note[0])
        if routes:
            self.learner.observe(routes, records)
        if self.behaviour is not None:
            tags = call.tags if call.tags is not None else [call.tag] * count if call.tag else None
            if count > BEHAVIOUR_INLINE_RECORDS:  # a big request's windows and clients: off the event loop
                outcome.entity_scores = await asyncio.get_running_loop().run_in_executor(
                    self.executor, lambda: self.behaviour.observe(groups, results, count, tags, times=call.times))
            else:
                outcome.entity_scores = self.behaviour.observe(groups, results, count, tags, times=call.times)
        self.metrics.observe_outcome(outcome, call.surface, call.tags if call.tags is not None else call.tag)
        return outcome

    def _feedback_step(self, call: ScoreCall, records: Sequence[object], positions: Sequence[int], whole: bool):
        """What decide needs to apply feedback to one model's records (None: neither rules nor review page)."""
        if self.feedback is None and self.review is None:
            return None
        from .feedback import FeedbackStep, RuleSet

        mine = records if whole else [records[i] for i in positions]
        routes = ([call.tags[i] for i in positions] if call.tags is not None
                  else [call.tag] * len(mine) if call.tag else ())
        entity = self.registry.entity_field
        # Entity values as text, as routing names them (<model>@<value>) and entries store them.
        entities = [None if v is None else to_text(v) for v in
                    (r.get(entity) if isinstance(r, dict) else None for r in mine)] if entity else ()
        review = self.review
        # (only the review page reads them: no copy per model when it is off)
        times = ((call.times if whole else [call.times[i] for i in positions])
                 if call.times is not None and review is not None else ())
        return FeedbackStep(self.feedback.rules if self.feedback is not None else RuleSet(), mine, routes, entities,
                            review.observe if review is not None else None, review is not None,
                            review.admit if review is not None else None, times)

    def _bases(self, call: ScoreCall) -> dict[Model, Sequence[int]]:
        """The model each record is routed to by name or tag (the request's, or each record's)."""
        if call.tags is None or len(set(call.tags)) == 1:
            tag = call.tags[0] if call.tags else call.tag
            return {self.registry.resolve(call.model, tag): range(len(call.records))}
        by_tag: dict[str, Model] = {}
        bases: dict[Model, list[int]] = {}
        for i, tag in enumerate(call.tags):
            model = by_tag.get(tag) or by_tag.setdefault(tag, self.registry.resolve(call.model, tag))
            bases.setdefault(model, []).append(i)
        return bases

    def _learning_routes(self, bases: dict[Model, Sequence[int]], records: Sequence[object]) -> list:
        """Each record's learning route (see learning.Learner.routes)."""
        if len(bases) == 1:
            base, = bases
            return self.learner.routes(base, records)
        routes: list = [None] * len(records)
        for base, positions in bases.items():
            for i, route in zip(positions, self.learner.routes(base, [records[i] for i in positions])):
                routes[i] = route
        return routes

    def _group_by_entity(self, bases: dict[Model, Sequence[int]],
                         records: Sequence[object]) -> dict[Model, Sequence[int]]:
        """Records by the model that scores them: ``<model>@<value>`` when loaded for their entity."""
        entity = self.registry.entity_field
        loaded = self.registry.snapshot.models
        if not entity or not any(n.startswith(base.name + "@") for base in bases for n in loaded):
            return bases
        groups: dict[Model, list[int]] = {}
        for base, positions in bases.items():
            for i in positions:
                record = records[i]
                value = record.get(entity) if isinstance(record, dict) else None
                target = self.registry.for_entity(base, value) if value is not None else base
                groups.setdefault(target, []).append(i)
        return {model: sorted(idx) for model, idx in groups.items()} if len(bases) > 1 else groups

    def _batcher(self, model: Model) -> Batcher:
        batcher = self._batchers.get(model)
        if batcher is None:
            s = self.settings
            executor, chunks = self.executor, {}
            if self.processes is not None and self.processes.takes(model):
                executor = self.processes.executor
                chunks = dict(score_chunk=functools.partial(self.processes.score, model),
                              parallel=self.processes.count)
            batcher = self._batchers[model] = Batcher(
                model, executor, s.max_batch_records, s.max_queued_records, s.max_wait_ms / 1000.0,
                self.metrics.observe_batch, s.inline_max_records, self.metrics.observe_abandoned, **chunks)
        return batcher

    @staticmethod
    def _assemble(count, groups, results, decisions, explained: bool) -> ScoreOutcome:
        models = list(groups)
        notes = sorted((int(groups[model][i]), field, text) for model, decision in zip(models, decisions)
                       for i, field, text in decision.notes)
        if len(groups) == 1:  # the usual case: one model scored every record, in order
            result = results[0]
            scores = decisions[0].scores if decisions[0].scores is not None else result.scores
            return ScoreOutcome(scores, decisions[0].is_anomaly, np.zeros(count, dtype=np.uint32), models,
                                result.explanations if explained else None, notes)
        scores = np.zeros(count, dtype=np.float32)
        flags = np.zeros(count, dtype=bool)
        model_index = np.zeros(count, dtype=np.uint32)
        explanations: Optional[list] = [[] for _ in range(count)] if explained else None
        for position, (model, result, decision) in enumerate(zip(models, results, decisions)):
            idx = np.asarray(groups[model])
            scores[idx] = decision.scores if decision.scores is not None else result.scores
            flags[idx] = decision.is_anomaly
            model_index[idx] = position
            if explanations is not None:
                for local, i in enumerate(idx.tolist()):
                    explanations[i] = result.explanations[local]
        return ScoreOutcome(scores, flags, model_index, models, explanations, notes)

    async def prune(self) -> None:
        """Close batchers of models no longer loaded (after their queues drain); the scoring processes
        drop the models of files no longer served."""
        loaded = set(self.registry.snapshot.models.values())
        for model in [m for m in self._batchers if m not in loaded]:
            await self._batchers.pop(model).close()
        if self.processes is not None:
            paths = {str(m.artifact.path) for m in loaded if m.sessions is None}
            await asyncio.get_running_loop().run_in_executor(None, self.processes.keep_only, paths)
        if self.behaviour is not None:
            self.behaviour.follow(loaded)

    def queued_records(self) -> int:
        return sum(b.queued_records for b in self._batchers.values())

    async def close(self) -> None:
        self.accepting = False
        self._closed = True
        for batcher in list(self._batchers.values()):
            await batcher.close()
        self.executor.shutdown(wait=True)
        self.close_processes()

    def close_processes(self) -> None:
        if self.processes is not None:
            self.processes.close()
