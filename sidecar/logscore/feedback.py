"""Feedback: an operator's verdict on anomalies, applied at once to later records.

    mark records or a review group  (HTTP /v1/feedback, gRPC Feedback, `logscore feedback add`, /ui/)
      ─► pattern_from_records / the group's pattern: the unusual features the model named
      ─► the store (feedback_store.py: SQLite or PostgreSQL) ─► every sidecar reloads ─► RuleSet
    decide ─► FeedbackStep.apply (flagged records only)
      ─► a "normal" rule naming some of a record's unusual features: the record is scored again as if
         those features had been seen in training; under the threshold it is not flagged, its score is
         the lowered one, and it says `suppressed by feedback #id`
      ─► a "keep" rule (a true anomaly): its features are never treated as normal, and records of its
         kind say `kept by feedback #id`

A pattern is made of what the featurizer already names: the hashed keys of features (URL template
and parameter shapes, path segments, n-grams, tokens, field values), or one field's value. So
matching costs a set lookup per unusual feature, and a rule made on one record covers every later
record whose unusualness it explains: marking a record normal teaches, at once, what retraining with
it would (`logscore train --feedback` then makes it part of the model).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .errors import InvalidRequest
from .features import FeatureBatch
from .model import Model, run_graph
from .records import to_text

NORMAL, KEEP = "normal", "keep"
VERDICTS = (NORMAL, KEEP)
STRUCTURE_SIZE = 64  # unusual structural features kept per record: its kind (review groups, keep rules)
SHORT_STRUCTURE = 4  # a record unusual in details only: its kind is its most unusual details
SIMILARITY = 0.5  # records whose kinds share at least this share of their features (Jaccard) are alike
MAX_RECORD_KEYS = 512  # unusual features a pattern takes from one record
MAX_PATTERN_KEYS = 4096
DETAIL_KINDS = ("ngrams", "numeric")  # converters whose features differ for nearly every value
DETAIL_FEATURES = (": length ",)  # and features of others that do (a value's length class)
NAMED = 5  # features named in a pattern, for people
EXAMPLE_CHARS = 2000
EXAMPLES = 5  # records a pattern keeps, for people and for training (`logscore train --feedback`)


@dataclass
class Entry:
    """One stored feedback entry. ``pattern``: {"keys", "structure", "features", "examples"} or {"field", "value"}."""

    id: int
    verdict: str
    pattern: dict
    author: str
    reason: str = ""
    model: str = ""  # scope: a model name ("" any); "<model>@<entity>" models fall under their base
    route: str = ""  # scope: the shipper's tag ("" any)
    entity: str = ""  # scope: the value of the sidecar's entity_field ("" any)
    created_at: float = 0.0
    expires_at: Optional[float] = None
    removed_at: Optional[float] = None
    removed_by: Optional[str] = None
    example: str = ""

    def active(self, now: float) -> bool:
        return self.removed_at is None and (self.expires_at is None or self.expires_at > now)

    def describe(self) -> str:
        """The pattern in a few words, for lists and notes."""
        if "field" in self.pattern:
            return f"{self.pattern['field']} = {self.pattern['value']!r}"
        return "; ".join(self.pattern.get("features", [])[:3]) or f"{len(self.pattern.get('keys', []))} features"

    def examples(self) -> list[object]:
        """The records the entry was made from (field maps back as dicts), for training."""
        found = []
        for text in self.pattern.get("examples") or ([self.example] if self.example else []):
            if text.startswith("{"):
                try:
                    found.append(json.loads(text))
                    continue
                except ValueError:
                    pass
            found.append(text)
        return found

    def as_json(self) -> dict:
        pattern = {k: v for k, v in self.pattern.items() if k not in ("keys", "structure", "examples")}
        if "keys" in self.pattern:
            pattern["feature_count"] = len(self.pattern["keys"])
        return {"id": self.id, "verdict": self.verdict, "model": self.model, "route": self.route,
                "entity": self.entity, "pattern": pattern, "author": self.author, "reason": self.reason,
                "created_at": iso_time(self.created_at), "expires_at": iso_time(self.expires_at),
                "removed_at": iso_time(self.removed_at), "removed_by": self.removed_by, "example": self.example}


def iso_time(seconds: Optional[float]) -> Optional[str]:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def record_text(record: object) -> str:
    """A record as one line of text (raw lines as they are, field maps as JSON), cut for display."""
    text = record if isinstance(record, str) else json.dumps(record, default=to_text, ensure_ascii=False)
    return text[:EXAMPLE_CHARS]


def base_name(model_name: str) -> str:
    return model_name.partition("@")[0]


# --- what made records unusual ---------------------------------------------------------------

@dataclass
class Inspection:
    """Records featurized again and run through their model: which features made each unusual.

    Only flagged records are inspected (a few in a thousand); their values are in the featurizer's
    caches, so this costs a fraction of scoring them. Features are *structural* (URL template,
    parameter names, shapes and characters, path segments, tokens, field values: what a pattern is
    made of) or *detail* (character n-grams: different for nearly every distinct value)."""

    model: Model
    batch: FeatureBatch
    contribution: np.ndarray  # [nnz] weight × surprise: what each key adds to the rarity score
    surprise: np.ndarray
    scores: np.ndarray
    bounds: np.ndarray  # [N + 1]: record r's keys are batch indices bounds[r]:bounds[r + 1]
    detail: np.ndarray  # [nnz] bool: the key is an n-gram

    def unusual(self, row: int, limit: int = MAX_RECORD_KEYS) -> np.ndarray:
        """Batch indices of the record's unusual features: structural ones first, each kind most
        unusual first."""
        start, stop = int(self.bounds[row]), int(self.bounds[row + 1])
        contribution = self.contribution[start:stop]
        order = np.lexsort((-contribution, self.detail[start:stop]))
        order = order[contribution[order] > 0][:limit]
        return order + start

    def structure(self, row: int) -> tuple[int, ...]:
        """The record's kind: its unusual structural features (or, when only details are unusual, the most
        unusual of those)."""
        unusual = self.unusual(row, STRUCTURE_SIZE)
        structural = unusual[~self.detail[unusual]]
        return tuple(int(k) for k in self.batch.keys[structural if len(structural) else unusual[:SHORT_STRUCTURE]])

    def names(self, row: int, limit: int = NAMED) -> "FeatureNames":
        """The names of the record's most unusual features, worked out when first asked for."""
        origins = self.batch.origins
        return FeatureNames(self.model, [(origins.entries[int(origins.entry_of_key[i])], int(origins.position[i]),
                                          float(self.surprise[i])) for i in self.unusual(row, limit)])

    def key_fields(self) -> list[str]:
        origins = self.batch.origins
        return [origins.entries[int(e)].converter.field for e in origins.entry_of_key]


class FeatureNames:
    """Names of features, described on first use (naming costs more than finding them)."""

    def __init__(self, model: Model, found: list[tuple[object, int, float]]):
        self._model, self._found, self._names = model, found, None

    def __call__(self) -> list[str]:
        if self._names is None:
            self._names = [f"{entry.describe(position)} ({self._model.describe_rarity(surprise)})"
                           for entry, position, surprise in self._found]
            self._found = []
        return self._names


def inspect(model: Model, records: Sequence[object]) -> Inspection:
    """Featurize ``records`` (not session models: their records are sessions) and run the graph."""
    batch = model.featurizer.transform(records, dense=True)  # dense: KeyOrigins name every key's field
    if not model.needs_dense:
        batch = dataclasses.replace(batch, dense=np.zeros((batch.size, 0), dtype=np.float32))
    scores, _, surprise = run_graph(model.session, batch)
    bounds = np.searchsorted(batch.rows, np.arange(batch.size + 1))
    origins = batch.origins
    detail_entries = np.fromiter((e.converter.kind in DETAIL_KINDS for e in origins.entries), dtype=bool,
                                 count=len(origins.entries))
    return Inspection(model, batch, batch.weights * surprise, surprise, scores, bounds,
                      detail_entries[origins.entry_of_key] if len(origins.entries) else np.zeros(0, dtype=bool))


def rescore_without(model: Model, batch: FeatureBatch, drop: np.ndarray) -> np.ndarray:
    """Scores of the batch's records with the ``drop``ped keys taken out (features deemed normal)."""
    keep = ~drop
    dense = batch.dense
    if model.needs_dense:
        dense = batch.without_keys(keep, model.featurizer.dense_dims)
    kept = FeatureBatch(batch.rows[keep], batch.keys[keep], batch.weights[keep], dense, batch.truncated,
                        batch.unparsed)
    scores, _, _ = run_graph(model.session, kept)
    return scores


def pattern_from_records(model: Model, records: Sequence[object]) -> dict:
    """The pattern of marked records: their unusual features (keys, structure, names)."""
    if model.sessions is not None:
        raise InvalidRequest(f"model {model.name!r} scores sessions: mark a field value "
                             "(field and value) instead of records")
    found = inspect(model, records)
    keys: dict[int, None] = {}
    for row in range(found.batch.size):
        for index in found.unusual(row):
            keys.setdefault(int(found.batch.keys[index]), None)
    if not keys:
        scores = ", ".join(f"{s:.4f}" for s in found.scores[:5])
        raise InvalidRequest(f"the records hold no unusual feature for model {model.name!r} (scores {scores}); "
                             "nothing to mark")
    row = max(range(found.batch.size), key=lambda r: found.scores[r])  # named after the strangest
    return {"keys": list(keys)[:MAX_PATTERN_KEYS], "structure": list(found.structure(row)),
            "features": [strip_rarity(n) for n in found.names(row)()],
            "examples": [record_text(r) for r in records[:EXAMPLES]]}


def pattern_from_field(model: Model, name: str, value: str) -> dict:
    if name not in model.featurizer.fields:
        raise InvalidRequest(f"model {model.name!r} reads no field {name!r}; its fields: "
                             f"{', '.join(model.featurizer.fields)}")
    return {"field": name, "value": value}


def strip_rarity(name: str) -> str:
    """A feature's name without " (never seen in training)" or " (rare: ...)"."""
    head, paren, tail = name.rpartition(" (")
    return head if paren and (tail.startswith("never seen") or tail.startswith("rare")) else name


# --- rules in memory ---------------------------------------------------------------------------

@dataclass
class ModelRules:
    """The active rules of one model name: lookups from a feature key or a field value to rule ids."""

    normal_by_key: dict[int, list[Entry]] = field(default_factory=dict)
    keep_by_key: dict[int, list[Entry]] = field(default_factory=dict)  # keys of keep rules' patterns
    keep_by_structure_key: dict[int, list[Entry]] = field(default_factory=dict)
    normal_by_structure_key: dict[int, list[Entry]] = field(default_factory=dict)
    by_field: dict[tuple[str, str], list[Entry]] = field(default_factory=dict)
    normal_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # sorted

    def add(self, entry: Entry) -> None:
        pattern = entry.pattern
        if "field" in pattern:
            self.by_field.setdefault((pattern["field"], pattern["value"]), []).append(entry)
            return
        by_key = self.normal_by_key if entry.verdict == NORMAL else self.keep_by_key
        for key in pattern["keys"]:
            by_key.setdefault(int(key), []).append(entry)
        by_structure = self.keep_by_structure_key if entry.verdict == KEEP else self.normal_by_structure_key
        for key in dict.fromkeys(pattern.get("structure", [])):
            by_structure.setdefault(int(key), []).append(entry)

    def finish(self) -> "ModelRules":
        self.normal_keys = np.array(sorted(self.normal_by_key), dtype=np.int64)
        return self


class RuleSet:
    """The active entries, indexed per model name; immutable once built (swapped whole on reload)."""

    def __init__(self, entries: Iterable[Entry] = (), now: Optional[float] = None):
        now = time.time() if now is None else now
        self.entries = [e for e in entries if e.active(now)]
        self.by_model: dict[str, ModelRules] = {}
        for entry in self.entries:
            self.by_model.setdefault(entry.model, ModelRules()).add(entry)
        for rules in self.by_model.values():
            rules.finish()
        expiries = [e.expires_at for e in self.entries if e.expires_at is not None]
        self.next_expiry = min(expiries) if expiries else None  # the rules are rebuilt then

    def __len__(self) -> int:
        return len(self.entries)

    def for_model(self, model_name: str) -> list[ModelRules]:
        found = [self.by_model.get(name) for name in dict.fromkeys((model_name, base_name(model_name), ""))]
        return [rules for rules in found if rules is not None]


def in_scope(entry: Entry, route: str, entity: Optional[str]) -> bool:
    return (not entry.route or entry.route == route) and (not entry.entity or entry.entity == entity)


# --- applying rules to one batch (decide's feedback step) ---------------------------------------

@dataclass
class Flagged:
    """One flagged record after the feedback step, for the review page."""

    index: int  # in the batch
    score: float  # the score it leaves with (lowered when suppressed)
    original_score: float
    structure: tuple[int, ...]
    unusual_keys: list[int]
    names: Callable[[], list[str]]  # the most unusual features' names
    suppressed_by: list[int] = field(default_factory=list)
    kept_by: list[int] = field(default_factory=list)


@dataclass
class FeedbackStep:
    """What decide needs to apply feedback to one model's batch: the rules, the records and, per
    record, the route (tag) and entity value they were sent with. ``observe`` (the review page's
    ring) sees every flagged record with what made it unusual."""

    rules: RuleSet
    records: Sequence[object]
    routes: Sequence[str] = ()
    entities: Sequence[Optional[str]] = ()
    observe: Optional[object] = None  # callable(model, records, [Flagged], scores) or None
    inspect_always: bool = False  # inspect flagged records even without rules (the review page is on)

    def route(self, i: int) -> str:
        return self.routes[i] if self.routes else ""

    def entity(self, i: int) -> Optional[str]:
        return self.entities[i] if self.entities else None

    def apply(self, model: Model, candidates: np.ndarray, scores: np.ndarray,
              flags: np.ndarray, notes: list) -> np.ndarray:
        """Suppress what normal rules explain among ``candidates`` (indices of records flagged by their
        score); clears their flags and adds notes in place; returns the scores (lowered ones replaced)."""
        model_rules = self.rules.for_model(model.name) if len(self.rules) else []
        if not len(candidates) or not (model_rules or self.inspect_always) or model.sessions is not None:
            if self.observe is not None and len(candidates):
                self.observe(model, self.records, [Flagged(int(i), float(scores[i]), float(scores[i]), (), [], list)
                                                   for i in candidates], self)
            return scores
        found = inspect(model, [self.records[i] for i in candidates])
        drop, suppressors, keepers = self._matches(found, candidates, model_rules)
        rescored = rescore_without(model, found.batch, drop) if drop.any() else None
        flagged = []
        scores = scores.copy() if rescored is not None else scores
        for row, i in enumerate(candidates.tolist()):
            unusual = found.unusual(row)
            item = Flagged(i, float(scores[i]), float(scores[i]), found.structure(row),
                           [int(k) for k in found.batch.keys[unusual]], found.names(row, SHORT_STRUCTURE))
            if keepers[row]:
                item.kept_by = keepers[row]
                notes.append((i, "record", f"kept by feedback {rule_list(keepers[row])}"))
            elif rescored is not None and suppressors[row] and rescored[row] < model.threshold:
                scores[i] = rescored[row]
                flags[i] = False
                item.score, item.suppressed_by = float(rescored[row]), suppressors[row]
                notes.append((i, "record", f"suppressed by feedback {rule_list(suppressors[row])}"))
            flagged.append(item)
        if self.observe is not None:
            self.observe(model, self.records, flagged, self)
        return scores

    def _matches(self, found: Inspection, candidates: np.ndarray, model_rules: list[ModelRules]):
        """(keys to drop [nnz], per record the normal rules that dropped some, the keep rules it falls under)."""
        keys = found.batch.keys
        drop = np.zeros(len(keys), dtype=bool)
        suppressors: list[list[int]] = [[] for _ in candidates]
        keepers: list[list[int]] = [[] for _ in candidates]
        if not model_rules:
            return drop, suppressors, keepers
        unusual = found.contribution > 0
        hits = np.zeros(len(keys), dtype=bool)
        for rules in model_rules:
            hits |= np.isin(keys, rules.normal_keys)
        hits &= unusual
        fields = found.key_fields() if any(r.by_field for r in model_rules) else None
        values = None
        if fields is not None:
            values, _, _ = found.model.featurizer.field_values([self.records[i] for i in candidates])
        for row, i in enumerate(candidates.tolist()):
            route, entity = self.route(i), self.entity(i)
            start, stop = int(found.bounds[row]), int(found.bounds[row + 1])
            protected, kept = self._kept(found, row, start, stop, model_rules, route, entity, values, fields)
            keepers[row] = sorted(kept)
            if kept:
                continue
            used: dict[int, None] = {}
            covered = np.zeros(stop - start, dtype=bool)
            for index in np.flatnonzero(hits[start:stop]) + start:
                key = int(keys[index])
                if key in protected:
                    continue
                for rules in model_rules:
                    for entry in rules.normal_by_key.get(key, ()):
                        if in_scope(entry, route, entity):
                            covered[index - start] = True
                            used.setdefault(entry.id, None)
            if values is not None:
                for rules in model_rules:
                    for (name, value), entries in rules.by_field.items():
                        if values[name][row] != value:
                            continue
                        for entry in entries:
                            if entry.verdict == NORMAL and in_scope(entry, route, entity):
                                for index in range(start, stop):
                                    if fields[index] == name and unusual[index] and int(keys[index]) not in protected:
                                        covered[index - start] = True
                                        used.setdefault(entry.id, None)
            kinds = self._kinds(keys[start:stop], model_rules, route, entity)
            structural = (unusual[start:stop] & ~found.detail[start:stop]).any()
            # Whole records go when they are of a marked kind, or when rules name unusual structure of
            # theirs; rules that share a few n-grams with a record only take those n-grams away.
            if kinds or (used and structural):
                whole = self._same_pattern(found, start, stop, covered, protected)
                drop[start:stop] = covered | whole
                if whole.any():
                    used.update(dict.fromkeys(kinds))
            elif used:
                drop[start:stop] = covered
            suppressors[row] = sorted(used)
        return drop, suppressors, keepers

    @staticmethod
    def _kinds(keys: np.ndarray, model_rules: list[ModelRules], route: str, entity: Optional[str]) -> list[int]:
        """Normal rules whose kind the record is of: it holds at least SIMILARITY of the rule's structure
        (seen in training or not: after retraining, a kind's features are no longer unusual)."""
        counts: dict[int, int] = {}
        entries: dict[int, Entry] = {}
        for rules in model_rules:
            if not rules.normal_by_structure_key:
                continue
            for key in keys.tolist():
                for entry in rules.normal_by_structure_key.get(key, ()):
                    counts[entry.id] = counts.get(entry.id, 0) + 1
                    entries[entry.id] = entry
        return [i for i, count in counts.items() if count >= SIMILARITY * len(entries[i].pattern["structure"])
                and in_scope(entries[i], route, entity)]

    @staticmethod
    def _same_pattern(found: Inspection, start: int, stop: int, covered: np.ndarray, protected: set) -> np.ndarray:
        """When rules cover every unusual structural feature of a record (its URL template, parameter
        shapes and characters, ...), it is of a kind marked normal: its unusual n-grams (the details
        of its values) go too. Otherwise only what the rules name is dropped."""
        unusual = found.contribution[start:stop] > 0
        structural = unusual & ~found.detail[start:stop]
        uncovered = np.flatnonzero(structural & ~covered)
        if not all(any(part in found.batch.name(int(i) + start) for part in DETAIL_FEATURES) for i in uncovered):
            return np.zeros(stop - start, dtype=bool)
        free = np.fromiter((int(k) not in protected for k in found.batch.keys[start:stop]), dtype=bool,
                           count=stop - start) if protected else True
        detail = found.detail[start:stop].copy()
        detail[uncovered] = True  # length classes named above
        return unusual & detail & free

    def _kept(self, found, row, start, stop, model_rules, route, entity, values, fields):
        """(keys no normal rule may drop, ids of keep rules the record falls under)."""
        keys = found.batch.keys
        protected: set[int] = set()
        kept: set[int] = set()
        structure = found.structure(row)
        for rules in model_rules:
            if not (rules.keep_by_key or rules.keep_by_structure_key or rules.by_field):
                continue
            candidates = {entry.id: entry for key in structure for entry in rules.keep_by_structure_key.get(key, ())}
            kept.update(i for i, entry in candidates.items()
                        if in_scope(entry, route, entity) and similar(structure, entry.pattern["structure"]))
            for index in range(start, stop):
                for entry in rules.keep_by_key.get(int(keys[index]), ()):
                    if in_scope(entry, route, entity):
                        protected.add(int(keys[index]))
            if values is not None:
                for (name, value), entries in rules.by_field.items():
                    if values[name][row] == value:
                        for entry in entries:
                            if entry.verdict == KEEP and in_scope(entry, route, entity):
                                kept.add(entry.id)
        return protected, kept


def similar(a: Sequence, b: Sequence) -> bool:
    """Two kinds (sets of features) are alike when they share at least SIMILARITY of their union."""
    a, b = set(a), set(b)
    return bool(a | b) and len(a & b) >= SIMILARITY * len(a | b)


def rule_list(ids: Sequence[int]) -> str:
    return ", ".join(f"#{i}" for i in ids)
