"""The one scoring core every surface calls: route, batch, score, assemble.

Surfaces (gRPC, HTTP/JSON, forward) only decode their payload into a ScoreCall
and encode the ScoreOutcome back.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .admission import Admission
from .batching import Batcher
from .errors import InvalidRequest, ShuttingDown
from .metrics import Metrics
from .model import Model
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


@dataclass
class ScoreOutcome:
    scores: np.ndarray  # float32 [N]
    is_anomaly: np.ndarray  # bool [N]
    model_index: np.ndarray  # uint32 [N], into models
    models: list[Model]
    explanations: Optional[list[list[str]]]
    notes: list[tuple[int, str, str]] = field(default_factory=list)  # (record, field, description)


def check_record_count(count: int, limit: int) -> None:
    """Surfaces call this as soon as they know a request's size, before decoding its records."""
    if count > limit:
        raise InvalidRequest(f"{count} records in one request; the limit is {limit} (split the batch)")


def record_notes(model: Model, result, positions: Sequence[int]) -> list[tuple[int, str, str]]:
    """Notes for truncated and unparsed records; ``positions`` maps the result's rows to the request's."""
    if not (result.truncated.any() or result.unparsed.any()):
        return []
    notes = [(int(positions[i]), "record", "a field was truncated for scoring")
             for i in np.flatnonzero(result.truncated)]
    notes += [(int(positions[i]), "record", f"did not parse as {model.featurizer.log_format}; "
               "scored with its fields missing") for i in np.flatnonzero(result.unparsed)]
    return notes


class ScoringService:
    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics):
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        # One scoring thread: on 2 cores the other core serves the protocol surfaces.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring")
        self._batchers: dict[Model, Batcher] = {}
        self.accepting = True  # False while draining: /readyz says so; calls already received still score
        self._closed = False
        self.admission = Admission(settings.max_inflight_bytes)

    async def score(self, call: ScoreCall) -> ScoreOutcome:
        if self._closed:
            raise ShuttingDown("the sidecar is shutting down; retry on another instance or later")
        count = len(call.records)
        check_record_count(count, self.settings.max_records_per_request)
        if call.explain > 100:
            raise InvalidRequest(f"explain={call.explain}: name at most 100 features per record")
        records, notes = self._limit_sizes(call.records)
        groups = self._route(call, records)
        if len(groups) == 1:
            model = next(iter(groups))
            results = [await self._batcher(model).score(records, call.explain, call.deadline)]
        else:
            results = await asyncio.gather(*(
                self._batcher(m).score([records[i] for i in idx], call.explain, call.deadline)
                for m, idx in groups.items()))
        outcome = self._assemble(count, groups, results, call.explain > 0, notes)
        self.metrics.observe_outcome(outcome, call.surface)
        return outcome

    def _limit_sizes(self, records: Sequence[object]) -> tuple[Sequence[object], list]:
        """Cut raw lines over max_record_bytes (fields are cut by the featurizer)."""
        limit = self.settings.max_record_bytes
        notes = []
        if any(isinstance(r, str) and len(r) > limit for r in records):
            records = list(records)
            for i, record in enumerate(records):
                if isinstance(record, str) and len(record) > limit:
                    records[i] = record[:limit]
                    notes.append((i, "record", f"truncated to {limit} characters"))
        return records, notes

    def _route(self, call: ScoreCall, records: Sequence[object]) -> dict[Model, Sequence[int]]:
        """The model of each record: by name or tag (per request, or per record), then by entity."""
        if call.tags is None or len(set(call.tags)) == 1:
            tag = call.tags[0] if call.tags else call.tag
            return self._group_by_entity(self.registry.resolve(call.model, tag), records, range(len(records)))
        by_tag: dict[str, list[int]] = {}
        for i, tag in enumerate(call.tags):
            by_tag.setdefault(tag, []).append(i)
        groups: dict[Model, list[int]] = {}
        for tag, positions in by_tag.items():
            for model, idx in self._group_by_entity(self.registry.resolve(call.model, tag), records,
                                                    positions).items():
                groups.setdefault(model, []).extend(idx)
        return {model: sorted(idx) for model, idx in groups.items()}

    def _group_by_entity(self, model: Model, records: Sequence[object],
                         positions: Sequence[int]) -> dict[Model, Sequence[int]]:
        entity = self.registry.entity_field
        if not entity or not any(n.startswith(model.name + "@") for n in self.registry.snapshot.models):
            return {model: positions}
        groups: dict[Model, list[int]] = {}
        for i in positions:
            record = records[i]
            value = record.get(entity) if isinstance(record, dict) else None
            target = self.registry.for_entity(model, value) if value is not None else model
            groups.setdefault(target, []).append(i)
        return groups

    def _batcher(self, model: Model) -> Batcher:
        batcher = self._batchers.get(model)
        if batcher is None:
            s = self.settings
            batcher = self._batchers[model] = Batcher(
                model, self.executor, s.max_batch_records, s.max_queued_records, s.max_wait_ms / 1000.0,
                self.metrics.observe_batch, s.inline_max_records, self.metrics.observe_abandoned)
        return batcher

    @staticmethod
    def _assemble(count, groups, results, explained: bool, notes: list) -> ScoreOutcome:
        models = list(groups)
        for model, result in zip(models, results):
            notes.extend(record_notes(model, result, groups[model]))
        notes.sort()
        if len(groups) == 1:  # the usual case: one model scored every record, in order
            result = results[0]
            return ScoreOutcome(result.scores, result.is_anomaly, np.zeros(count, dtype=np.uint32), models,
                                result.explanations if explained else None, notes)
        scores = np.zeros(count, dtype=np.float32)
        flags = np.zeros(count, dtype=bool)
        model_index = np.zeros(count, dtype=np.uint32)
        explanations: Optional[list] = [[] for _ in range(count)] if explained else None
        for position, (model, result) in enumerate(zip(models, results)):
            idx = np.asarray(groups[model])
            scores[idx] = result.scores
            flags[idx] = result.is_anomaly
            model_index[idx] = position
            if explanations is not None:
                for local, i in enumerate(idx.tolist()):
                    explanations[i] = result.explanations[local]
        return ScoreOutcome(scores, flags, model_index, models, explanations, notes)

    async def prune(self) -> None:
        """Close batchers of models no longer loaded (after their queues drain)."""
        loaded = set(self.registry.snapshot.models.values())
        for model in [m for m in self._batchers if m not in loaded]:
            await self._batchers.pop(model).close()

    def queued_records(self) -> int:
        return sum(b.queued_records for b in self._batchers.values())

    async def close(self) -> None:
        self.accepting = False
        self._closed = True
        for batcher in list(self._batchers.values()):
            await batcher.close()
        self.executor.shutdown(wait=True)
