"""Feedback: an operator's verdict on anomalies, applied at once to later records.

    mark records or a review group  (HTTP /v1/feedback, gRPC Feedback, `logscore feedback add`, /ui/)
      ─► pattern_from_records / the group's pattern: the unusual features the model named
      ─► the store (feedback_store.py: SQLite or PostgreSQL) ─► every sidecar reloads ─► RuleSet
    decide ─► FeedbackStep.apply (flagged records only)
      ─► a record of a kind marked normal (normal entries name every token of its kind: its unusual
         structural features, a URL's new path as one path-kind token) is scored again as if its
         unusual features had been seen in training; under the threshold it is not flagged, keeps the
         lowered score and says `suppressed by feedback #id`; unless it holds an attack-like url
         feature they do not name (``injection.attack_like``: ``//etc/passwd``, ``.git`` under a section marked
         normal): then, as for a record of another kind, only what they name goes
      ─► a record of another kind loses only the unusual features entries name: an attack on a page
         marked normal keeps its payload's, and stays flagged
      ─► "keep" (a true anomaly): its own features (those no normal entry names) are never treated as
         normal, and records of its kind say `kept by feedback #id`, as do records they keep flagged

A pattern is made of what the featurizer already names: the hashed keys of features (URL template
and parameter shapes, path segments, n-grams, tokens, field values) and the kinds they make, or one
field's value. Matching costs a set lookup per unusual feature or kind token: marking records normal
teaches at once, for their kind, what retraining with them would (`logscore train --feedback`
then makes them part of the model).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .errors import InvalidRequest
from .features import FeatureBatch
from .features.batch import text_key
from .features.converters import ValueCache, value_shape
from .injection import attack_like
from .model import SCORE_CHUNK, Model
from .records import cut_nesting, event_seconds, field_map_json, to_text
from .shown import named_first

NORMAL, KEEP = "normal", "keep"
VERDICTS = (NORMAL, KEEP)
KIND_SIZE = 64  # unusual structural features making a record's kind (review groups, rules)
SHORT_KIND = 4  # a record unusual in details only: its kind is its most unusual details
MAX_KIND_TOKENS = 256  # a pattern's kinds
SIMILARITY = 0.5  # records whose kinds share at least this share of their features (Jaccard) are alike
MAX_RECORD_KEYS = 512  # unusual features a pattern takes from one record
MAX_PATTERN_KEYS = 4096
DETAIL_KINDS = ("ngrams", "numeric")  # converters whose features differ for nearly every value
NAMED = 5  # features named in a pattern, for people
EXAMPLE_CHARS = 2000
EXAMPLES = 5  # records a pattern keeps, for people and for training (`logscore train --feedback`)
NO_KEYS = np.zeros(0, dtype=np.int64)
UNREADABLE = "unreadable"  # a stored pattern this logscore cannot read: {"unreadable": why} (never applied)


@dataclass
class Entry:
    """One stored feedback entry. ``pattern``: {"keys", "kind", "features", "examples"} or {"field", "value"}."""

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
    existing: bool = field(default=False, compare=False)  # a mark answered with the entry already saying it

    def rule(self) -> dict:
        """What the entry matches: its pattern without the example records it keeps for training."""
        return {k: v for k, v in self.pattern.items() if k != "examples"}

    def active(self, now: float) -> bool:
        return self.removed_at is None and (self.expires_at is None or self.expires_at > now)

    def describe(self) -> str:
        """The pattern in a few words, for lists and notes."""
        if UNREADABLE in self.pattern:
            return f"unreadable pattern ({self.pattern[UNREADABLE]}): not applied; remove it"
        if "field" in self.pattern:
            return f"{self.pattern['field']} = {self.pattern['value']!r}"
        return "; ".join(self.pattern.get("features", [])[:3]) or f"{len(self.pattern.get('keys', []))} features"

    def examples(self) -> list[object]:
        """The records the entry was made from (field maps back as dicts), for training."""
        texts = self.pattern.get("examples") or ([self.example] if self.example else [])
        return [record_from_text(text) for text in texts]

    def as_json(self) -> dict:
        pattern = {k: v for k, v in self.pattern.items() if k not in ("keys", "kind", "examples")}
        if "keys" in self.pattern:
            pattern["feature_count"] = len(self.pattern["keys"])
        return {"id": self.id, "verdict": self.verdict, "model": self.model, "route": self.route,
                "entity": self.entity, "pattern": pattern, "author": self.author, "reason": self.reason,
                "created_at": iso_time(self.created_at), "expires_at": iso_time(self.expires_at),
                "removed_at": iso_time(self.removed_at), "removed_by": self.removed_by, "example": self.example}


def iso_time(seconds: Optional[float]) -> Optional[str]:
    if seconds is None:
        return None
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):  # stored before expiries were checked: shown, not fatal
        return f"(not a time: {seconds!r})"


def record_text(record: object) -> str:
    """A record as one line of text (raw lines as they are, field maps as JSON), cut for display."""
    if isinstance(record, str):
        return record[:EXAMPLE_CHARS]
    try:
        text = json.dumps(record, default=to_text, ensure_ascii=False)
    except TypeError:  # a binary map key (Fluentd's regexp parsers on a non-ASCII line): INTERNAL before
        text = field_map_json(record)
    except RecursionError:  # nested past what json.dumps recurses (msgpack decodes 1,024 levels): INTERNAL before
        text = field_map_json(cut_nesting(record))
    return text[:EXAMPLE_CHARS]


def record_from_text(text: str) -> object:
    """A record back from ``record_text``: a field map's JSON as a dict, a line as it is."""
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


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
    records: Sequence[object]
    _ranked: Optional[tuple] = None  # every record's unusual features at once (see unusual)
    _keys_of: dict = field(default_factory=dict)  # converter -> its keys in the batch, each record's first
    _values: Optional[dict] = None  # field -> [N] values, parsed again only for field-value entries

    def unusual(self, row: int, limit: int = MAX_RECORD_KEYS) -> np.ndarray:
        """Batch indices of the record's unusual features: structural ones first, each kind most
        unusual first."""
        if self._ranked is None:
            # All records in one sort (a sort per record cost more than the work): by record,
            # structural first, most unusual first; what adds nothing left out.
            order = np.lexsort((-self.contribution, self.detail, self.batch.rows))
            order = order[self.contribution[order] > 0]
            self._ranked = order, np.searchsorted(self.batch.rows[order], np.arange(self.batch.size + 1))
        order, starts = self._ranked
        first = int(starts[row])
        return order[first: min(int(starts[row + 1]), first + MAX_RECORD_KEYS, first + limit)]

    def kind(self, row: int) -> frozenset:
        """What kind of unusual the record is: its unusual structural features, where a URL's
        template-level ones (its path, segments, and the parameter slots of its template) become one
        token, its path kind (``path_kind``: new pages of a section and file type are one kind), while
        a parameter's shape and characters stay themselves. A record unusual in details only
        (n-grams) is of the kind of its most unusual details."""
        unusual = self.unusual(row, KIND_SIZE)
        structural = [int(k) for k in self.batch.keys[unusual[~self.detail[unusual]]]]
        if not structural:
            return frozenset(int(k) for k in self.batch.keys[unusual[:SHORT_KIND]])
        tokens: set = set(structural)
        for converter in self.model.featurizer.converters:
            value = self.value_of(converter, row) if converter.kind == "url" else None
            if value is not None:
                tokens = url_kind(converter, value, tokens)
        return frozenset(tokens)

    def page_keys(self, row: int) -> set[int]:
        """The keys a path kind stands for (``url_kind``): each URL's template-level features and
        length classes (a normal entry naming the kind names them for this record)."""
        found: set[int] = set()
        for converter in self.model.featurizer.converters:
            value = self.value_of(converter, row) if converter.kind == "url" else None
            if value is not None:
                _, template_level, lengths, _ = url_features(converter, value)
                found |= template_level | lengths
        return found

    def names(self, row: int, limit: int = NAMED) -> "FeatureNames":
        """The names of the record's most unusual features, worked out when first asked for."""
        return self.named(self.unusual(row, limit))

    def kind_features(self, row: int) -> list[tuple[str, str]]:
        """(converter label, feature text) of each structural feature its kind is made of (``kind``;
        none when unusual in details only), as their converters tell them: "url", "shape q=<a>a(9)</a>"."""
        unusual = self.unusual(row, KIND_SIZE)
        origins = self.batch.origins.resolve()
        found = []
        for i in unusual[~self.detail[unusual]].tolist():
            entry = origins.entries[int(origins.entry_of_key[i])]
            converter = entry.converter  # (None once a compiled feature's converter is gone: nothing to tell)
            if converter is not None:
                text = converter.feature_text(entry.value, int(self.batch.keys[i]))
                found.append((converter.label, text if text is not None else ""))
        return found

    def attack_like(self, row: int, among_keys: np.ndarray) -> list[str]:
        """The texts of the record's url features at ``among_keys`` (bool over its keys) that are
        attack-like (``injection.attack_like``): what a mark of its section does not vouch for."""
        start = int(self.bounds[row])
        keys = self.batch.keys[start + np.flatnonzero(among_keys)].tolist()
        found = []
        for converter in self.model.featurizer.converters:
            value = self.value_of(converter, row) if converter.kind == "url" and keys else None
            texts = url_features(converter, value)[3] if value is not None else None
            if texts:
                found += [texts[key] for key in keys if key in texts]
        return found

    def named(self, unusual: np.ndarray) -> "FeatureNames":
        origins = self.batch.origins.resolve()
        return FeatureNames(self.model, [(origins.entries[int(origins.entry_of_key[i])], int(origins.position[i]),
                                          float(self.surprise[i])) for i in unusual])

    def value_of(self, converter, row: int) -> Optional[str]:
        """The value ``converter`` featurized for the record (its features keep it: nothing is parsed):
        that of the record's first key from ``converter``."""
        origins = self.batch.origins.resolve()
        found = self._keys_of.get(converter)
        if found is None:  # for all records at once
            mine = np.fromiter((e.converter is converter for e in origins.entries), dtype=bool,
                               count=len(origins.entries))
            keys = np.flatnonzero(mine[origins.entry_of_key]) if len(mine) else np.zeros(0, dtype=np.int64)
            found = self._keys_of[converter] = keys, np.searchsorted(keys, self.bounds[:-1])
        keys, first = found
        at = int(first[row])
        if at == len(keys) or keys[at] >= self.bounds[row + 1]:
            return None
        return origins.entries[int(origins.entry_of_key[keys[at]])].value

    @property
    def values(self) -> dict:
        """Each field's values as the featurizer reads them (for field-value entries)."""
        if self._values is None:
            self._values = self.model.featurizer.field_values(self.records)[0]
        return self._values

    def key_fields(self) -> list[str]:
        origins = self.batch.origins.resolve()
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


class UrlFeatures(tuple):
    """(template, keys of its template-level features, keys of its length classes, key -> text of its
    attack-like features (``injection.attack_like``; mostly none)) of a URL."""

    @property
    def nbytes(self) -> int:
        """Memory held, estimated (for the cache's bound)."""
        return 200 + len(self[0]) + 40 * (len(self[1]) + len(self[2])) + sum(60 + len(t) for t in self[3].values())


def url_features(converter, value: str) -> UrlFeatures:
    """(template, keys of its template-level features, keys of its length classes, attack-like texts by
    key) of a URL; cached, as flagged URLs repeat (a page marked normal, a scanner's probes)."""
    # NOTE: the cache lives on the converter: it goes with its model when that is unloaded.
    cache = converter.__dict__.get("_feedback_urls")
    if cache is None:
        cache = converter.__dict__.setdefault("_feedback_urls", ValueCache(URL_CACHE_SIZE))
    found = cache.get(value)
    if found is None:
        texts = list(converter.features(value))
        template = next((t[len("parameters "):].rpartition("?")[0] for t in texts if t.startswith("parameters ")), "")
        slot = f"{template}?"
        template_level = frozenset(text_key(converter.seed, t) for t in texts if t.startswith(TEMPLATE_FEATURES) or
                                   (t.startswith(SLOT_FEATURES) and t.split(" ", 1)[1].startswith(slot)))
        lengths = frozenset(text_key(converter.seed, t) for t in texts if t.startswith("length "))
        attacks: dict[int, str] = {}
        for text in texts:
            if attack_like(text):
                attacks.setdefault(text_key(converter.seed, text), text)
        found = UrlFeatures((template, template_level, lengths, attacks))
        cache.put(value, found)
    return found


URL_CACHE_SIZE = 4096  # URLs of flagged records per converter (they repeat: a page marked normal, a scanner)


def url_kind(converter, value: str, tokens: set) -> set:
    """The kind tokens of a record with its URL's template-level features (of ``tokens``, the unusual
    structural ones) replaced by its path kind, and its length classes (details) left out."""
    template, template_level, lengths, _ = url_features(converter, value)
    seed = converter.seed
    found = tokens & template_level
    kept = tokens - template_level - lengths
    if found:
        new = {s for s in template.split("/") if text_key(seed, f"segment {s}") in tokens}
        if new:
            kept.add(path_kind(template, new))
        elif text_key(seed, f"path {template}") in tokens:  # known segments in a new order
            kept.add(f"path {template}")
        elif not kept:  # a known page with a new set of parameters of known shapes
            kept.add(f"parameters {template}")
    return kept


PLAIN_SHAPE = frozenset("a9_-.")  # a segment shaped only of these is a plain name (a page, a file, a version)


def path_kind(template: str, new: set) -> str:
    """A path with segments never seen, as a kind: its section (first segment), the file type of its last
    segment, and the shape of every new segment that is no plain name (``..``, quotes, ``$``, spaces):
    ``path /files/…deb``, ``path /scripts/…<"a:>``. So new pages of a section and type are one kind,
    while odd segments (a traversal, an injection in the path) keep it apart."""
    segments = template.split("/")
    section = segments[1] if len(segments) > 1 else ""
    last = segments[-1] if len(segments) > 2 else ""
    extension = last.rpartition(".")[2].lower() if "." in last else ""
    odd = [f"<{value_shape(s)}>" for s in segments[2:] if s in new
           and (s in (".", "..") or not set(value_shape(s)) <= PLAIN_SHAPE)]
    kind = f"{NEW_PATH}{section}/…" + (extension if extension.isalnum() and len(extension) <= 6 else "")
    return kind + "".join(odd)


NEW_PATH = "path /"  # path kinds start so: "path /<section>/…<file type><shapes of odd segments>"


def path_family(token: object) -> object:
    """A kind token with a plain new path's file type left out (``path /files/…deb`` → ``path /files/…``);
    any other token, an odd path's included (``path /scripts/…<"a:>``), as it is. The review page
    groups by families: new plain files of a section are one group whatever their type."""
    if not isinstance(token, str) or not token.startswith(NEW_PATH):
        return token
    head, ellipsis, extension = token.partition("/…")
    return head + ellipsis if ellipsis and extension.isalnum() else token


TEMPLATE_FEATURES = ("path ", "segment ", "parameters ")  # the url converter's features of a template
SLOT_FEATURES = ("parameter ", "shape ", "value ")  # ...and of a parameter of a template ("shape T?name=S")


def inspect(model: Model, records: Sequence[object]) -> Inspection:
    """Featurize ``records`` (not session models: their records are sessions) and run the graph."""
    batch = model.featurizer.transform(records, dense=True)  # dense: KeyOrigins name every key's field
    if not model.needs_dense:
        batch = dataclasses.replace(batch, dense=np.zeros((batch.size, 0), dtype=np.float32))
    scores, _, surprise = model.run_graph(batch)
    bounds = np.searchsorted(batch.rows, np.arange(batch.size + 1))
    origins = batch.origins.resolve()  # every key's converter, whatever built the batch
    detail_entries = np.fromiter((e.converter.kind in DETAIL_KINDS for e in origins.entries), dtype=bool,
                                 count=len(origins.entries))
    return Inspection(model, batch, batch.weights * surprise, surprise, scores, bounds,
                      detail_entries[origins.entry_of_key] if len(origins.entries) else np.zeros(0, dtype=bool),
                      records)


def rescore_without(model: Model, batch: FeatureBatch, drop: np.ndarray) -> np.ndarray:
    """Scores of the batch's records with the ``drop``ped keys taken out (features deemed normal)."""
    keep = ~drop
    dense = batch.dense
    if model.needs_dense:
        dense = batch.without_keys(keep, model.featurizer.dense_dims)
    kept = FeatureBatch(batch.rows[keep], batch.keys[keep], batch.weights[keep], dense, batch.truncated,
                        batch.unparsed)
    scores, _, _ = model.run_graph(kept)
    return scores


def pattern_from_records(model: Model, records: Sequence[object]) -> dict:
    """The pattern of marked records: their unusual features (keys, kinds, names)."""
    refuse_sessions(model)
    found = inspect(model, records)
    keys: dict[int, None] = {}
    kinds: dict = {}
    for row in range(found.batch.size):
        for index in found.unusual(row):
            keys.setdefault(int(found.batch.keys[index]), None)
        kinds.update(dict.fromkeys(sorted(found.kind(row), key=str)))
    if not keys:
        scores = ", ".join(f"{s:.4f}" for s in found.scores[:5])
        raise InvalidRequest(f"the records hold no unusual feature for model {model.name!r} (scores {scores}); "
                             "nothing to mark")
    row = max(range(found.batch.size), key=lambda r: found.scores[r])  # named after the strangest
    return {"keys": list(keys)[:MAX_PATTERN_KEYS], "kind": list(kinds)[:MAX_KIND_TOKENS],
            "features": [strip_rarity(n) for n in found.names(row)()],
            "examples": [record_text(r) for r in records[:EXAMPLES]]}


def refuse_unparsed(model: Model, records: Sequence[object]) -> None:
    """Marking normal a record that does not parse, or one cut to the sidecar's limits, for a model
    that flags such records whatever the feedback (its training data held none), made an entry that
    never applied: refused, saying why."""
    from .decide import flags_truncated, flags_unparsed

    unparsed, truncated = flags_unparsed(model), flags_truncated(model)
    if not (unparsed or truncated):
        return
    _, parsed, cut = model.featurizer.field_values(records)
    for row, (ok, shortened) in enumerate(zip(parsed, cut)):
        what = f"record {row + 1} ({record_text(records[row])[:80]!r})"
        if truncated and shortened:  # (first, as decide holds it: the cut may be why it does not parse)
            raise cut_refusal(f"{what} was cut before scoring", model)
        if unparsed and not ok:
            raise unparsed_refusal(f"{what} does not parse as {model.featurizer.log_format}", model.name)


def refuse_unflagged(model: Model, records: Sequence[object]) -> None:
    """A record marked normal must be one its model flags, for what names a kind: a record under the
    threshold, or flagged for its n-grams only (details: different for nearly every value), made an
    entry of n-grams, which then unflagged records sharing half of them whatever else was unusual in
    them (probe: ``/products/3782/…``, score 0.60, made an entry of '782' and '378' that suppressed
    ``/products/978278278/…``, score 0.998). Refused, as a review group unusual in details only is."""
    from .decide import decide

    refuse_sessions(model)  # (first: scoring a session model's records would join them to its sessions)
    scored = model.score(records)
    quiet = np.flatnonzero(~decide(model, scored).is_anomaly)
    if len(quiet):
        row = int(quiet[0])
        raise InvalidRequest(f"record {row + 1} ({record_text(records[row])[:80]!r}) is not flagged by model "
                             f"{model.name!r} (score {scored.scores[row]:.4f}, threshold {model.threshold:.4f}): "
                             "mark normal only records it flags; to let a value through, mark a field value")
    found = inspect(model, records)
    for row in range(found.batch.size):
        unusual = found.unusual(row, KIND_SIZE)
        if len(unusual) and found.detail[unusual].all():
            raise InvalidRequest(f"record {row + 1} ({record_text(records[row])[:80]!r}) is unusual in details only "
                                 "(n-grams of its values): it names no kind to mark, and its n-grams would let "
                                 "through other records sharing them; mark a field value")


def unparsed_refusal(what: str, model_name: str) -> InvalidRequest:
    """The refusal of a mark of lines the model could not read (``what``: which, and how it failed)."""
    return InvalidRequest(f"{what}: model {model_name!r} flags such records whatever the feedback (its training "
                          "data held none), so marking them normal would change nothing; send that log to a model of "
                          "its own (a route: --tag-routes), or mark a field value")


def cut_refusal(what: str, model: Model) -> InvalidRequest:
    """The refusal of a mark of records cut before scoring (``what``: which): the rest of them was
    never scored, so the remedy is to read or train on records that long, not to route them away."""
    line, field = model.featurizer.normalizer.max_line_chars, model.featurizer.max_field_chars
    return InvalidRequest(f"{what}: model {model.name!r} flags records cut before scoring whatever the feedback "
                          "(its training held none that long: the rest of them was never scored), so marking them "
                          "normal would change nothing; if that log's normal records are that long, train the model "
                          "on it (`logscore train` counts them), or raise the limit that cut it: the sidecar's "
                          f"max_record_bytes ({line:,} characters of a raw line) or the model's max_field_chars "
                          f"({field:,} characters of a field; set in the training --config); or mark a field value")


# A session model scores each record as its session so far: a mark of its features would name a
# path of events, and scoring a record again joins it to its session a second time.
SESSIONS_REFUSAL = "feedback does not apply to session models; retrain (logscore train --session-key ...)"


def refuse_sessions(model: Model) -> None:
    if model.sessions is not None:
        raise InvalidRequest(f"model {model.name!r} scores each record as its session so far: {SESSIONS_REFUSAL}")


def pattern_from_field(model: Model, name: str, value: str) -> dict:
    refuse_sessions(model)
    if name not in model.featurizer.fields:
        raise InvalidRequest(f"model {model.name!r} reads no field {name!r}; its fields: "
                             f"{', '.join(model.featurizer.fields)}")
    return {"field": name, "value": value}


def strip_rarity(name: str) -> str:
    """A feature's name without " (never seen in training)" or " (rare: ...)"."""
    head, paren, tail = name.rpartition(" (")
    return head if paren and (tail.startswith("never seen") or tail.startswith("rare")) else name


# --- rules in memory ---------------------------------------------------------------------------

class Index:
    """Item (a feature key, a kind token) -> the entries naming it, by scope: entries without a route
    or entity (the usual ones) as one set of ids, scoped ones per (route, entity), so a lookup costs
    a few dictionary lookups however many entries name the item (thousands do name a common one: a
    method, a bot's user agent) or are scoped. Built whole (``of``), never changed."""

    def __init__(self):
        # item -> the ids of the entries naming it: a set, or an id alone (integer_groups)
        self.unscoped: dict[object, set[int] | int] = {}
        self.scoped: dict[object, dict[tuple[str, str], set[int] | int]] = {}
        self.entries: dict[int, Entry] = {}
        # of an index of integers (numeric): every item, and those of unscoped entries, sorted unique
        # (the feedback step finds a call's named keys in them by binary search: ``among``)
        self.keys = self.unscoped_keys = NO_KEYS

    @classmethod
    def of(cls, entries: list[Entry], items_of: Callable[[Entry], Iterable], numeric: bool = False) -> "Index":
        """The index of ``entries`` by their ``items_of``; ``numeric``: the items are integers (feature
        keys), grouped with numpy (10,000 entries name 400,000 keys: one set operation each cost a
        sidecar most of a second on every feedback change)."""
        index = cls()
        by_scope: dict[tuple[str, str], list[Entry]] = {}
        for entry in entries:
            index.entries[entry.id] = entry
            by_scope.setdefault((entry.route, entry.entity), []).append(entry)
        if numeric:
            index.unscoped, index.scoped, index.keys, index.unscoped_keys = integer_groups(by_scope, items_of)
            return index
        for scope, members in by_scope.items():
            sets = item_sets(members, items_of)
            if scope == UNSCOPED:
                index.unscoped = sets
                continue
            for item, ids in sets.items():
                index.scoped.setdefault(item, {})[scope] = ids
        return index

    def __bool__(self) -> bool:
        return bool(self.entries)

    def present(self, items: set) -> set:
        """Those of ``items`` some entry names, in or out of scope (set operations in C: a record's
        keys are many, the entries' few)."""
        return (items & self.unscoped.keys()) | (items & self.scoped.keys())

    def groups(self, item, route: str, entity: Optional[str]) -> list[set[int]]:
        """The ids of the entries naming ``item`` in scope of a record sent with ``route`` and
        ``entity``, as the index's own sets (not copied: a caller joins them only when it needs the
        ids, for a note). Empty when none is."""
        ids = self.unscoped.get(item)
        found = [] if ids is None else [ids if isinstance(ids, set) else {ids}]
        scoped = self.scoped.get(item)
        if scoped:
            # an entry is in scope when each of its route and entity is unset or the record's
            for scope in dict.fromkeys(((route, ""), ("", entity), (route, entity))):
                ids = scoped.get(scope)
                if ids is not None:
                    found.append(ids if isinstance(ids, set) else {ids})
        return found

    def ids(self, item, route: str, entity: Optional[str]) -> set[int]:
        return set().union(*self.groups(item, route, entity))


def item_sets(entries: list[Entry], items_of: Callable[[Entry], Iterable]) -> dict[object, set[int]]:
    """Item -> ids of the entries naming it."""
    sets: dict[object, set[int]] = {}
    for entry in entries:
        for item in items_of(entry):
            ids = sets.get(item)
            if ids is None:
                sets[item] = {entry.id}
            else:
                ids.add(entry.id)
    return sets


def integer_groups(by_scope: dict[tuple[str, str], list[Entry]], items_of: Callable[[Entry], Iterable]):
    """``Index.of`` for integer items, every scope's grouped by one sort: (unscoped item -> ids, scoped
    item -> scope -> ids, every item sorted, the unscoped ones sorted). An item only one entry of a
    scope names (most: a page's own keys) maps to its id, not a set (300,000 sets took a reload most
    of a second); the sorted items come from the same sort (sorting the dictionaries' keys again in
    Python took a reload of 10,000 entries 15 ms more)."""
    scopes = list(by_scope)
    members = [entry for scope in scopes for entry in by_scope[scope]]
    lists = [list(items_of(entry)) for entry in members]
    lengths = list(map(len, lists))
    items = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=sum(lengths))
    ids = np.repeat(np.fromiter((e.id for e in members), dtype=np.int64, count=len(members)), lengths)
    scope_of = np.repeat(np.repeat(np.arange(len(scopes)), [len(by_scope[scope]) for scope in scopes]), lengths)
    # by item, then scope: the entries come scope by scope, and a stable sort keeps that order
    order = np.argsort(items, kind="stable")
    items, ids, scope_of = items[order], ids[order], scope_of[order]
    if len(items):
        starts = np.flatnonzero(np.r_[True, (items[1:] != items[:-1]) | (scope_of[1:] != scope_of[:-1])])
    else:
        starts = NO_KEYS
    bounds = np.r_[starts, len(items)]
    group_items, group_scopes = items[starts], scope_of[starts]
    unscoped_code = scopes.index(UNSCOPED) if UNSCOPED in scopes else -1
    single, of_unscoped = np.diff(bounds) == 1, group_scopes == unscoped_code
    alone = single & of_unscoped  # most groups: made in C (a loop over them cost what the sort saved)
    unscoped: dict = dict(zip(group_items[alone].tolist(), ids[starts[alone]].tolist()))
    scoped: dict = {}
    ids = ids.tolist()
    rest = np.flatnonzero(~alone)
    for item, code, a, b in zip(group_items[rest].tolist(), group_scopes[rest].tolist(), bounds[rest].tolist(),
                                bounds[rest + 1].tolist()):
        named = ids[a] if b - a == 1 else set(ids[a:b])
        if code == unscoped_code:
            unscoped[item] = named
        else:
            scoped.setdefault(item, {})[scopes[code]] = named
    every = group_items[np.r_[True, group_items[1:] != group_items[:-1]]] if len(group_items) else NO_KEYS
    return unscoped, scoped, every, group_items[group_scopes == unscoped_code]


UNSCOPED = ("", "")  # (route, entity) of an entry applying to every record


@dataclass
class ModelRules:
    """The active rules of one model name: lookups from a feature key, a kind token or a field value
    to the entries naming it."""

    normal_by_key: Index = field(default_factory=Index)
    normal_by_kind: Index = field(default_factory=Index)
    keep_by_key: Index = field(default_factory=Index)
    keep_kinds: "AlikeKinds" = field(default_factory=lambda: AlikeKinds([]))
    normal_entries: list[Entry] = field(default_factory=list)  # of patterns of features (what the indexes are of)
    keep_entries: list[Entry] = field(default_factory=list)
    # field -> value -> entries: a record's value is looked up, not compared with every entry's (a
    # thousand field entries cost a thousand comparisons per flagged record)
    by_field: dict[str, dict[str, list[Entry]]] = field(default_factory=dict)

    def add(self, entry: Entry) -> None:
        """Take an entry in (indexed by ``finish``)."""
        pattern = entry.pattern
        if "field" in pattern:
            self.by_field.setdefault(pattern["field"], {}).setdefault(pattern["value"], []).append(entry)
        elif entry.verdict == NORMAL:
            self.normal_entries.append(entry)
        else:
            self.keep_entries.append(entry)

    def field_entries(self, found: "Inspection", row: int) -> list[Entry]:
        """The field-value entries naming one of the record's values."""
        return [entry for name, by_value in self.by_field.items()
                for entry in by_value.get(found.values[name][row], ())]

    def finish(self) -> "ModelRules":
        keys = lambda entry: entry.pattern["keys"]  # noqa: E731
        self.normal_by_key = Index.of(self.normal_entries, keys, numeric=True)
        self.normal_by_kind = Index.of(self.normal_entries, lambda entry: entry.pattern.get("kind", []))
        self.keep_by_key = Index.of(self.keep_entries, keys, numeric=True)
        self.keep_kinds = AlikeKinds(self.keep_entries)
        return self


class AlikeKinds:
    """Entries found by a kind alike theirs (``similar_counts``) without comparing it with every entry sharing
    one of its tokens (a common token is in thousands): by prefix filtering. Tokens are ordered rarest
    first (by how many entries name them); two kinds sharing at least SIMILARITY of their union share
    a token among the first ``len - ceil(SIMILARITY * len) + 1`` of each, so entries are indexed by
    those of their kind only, and a record looks up those of its own, then compares the few found."""

    def __init__(self, entries: list[Entry]):
        self.counts: dict[object, int] = {}
        kinds = [(entry, set(entry.pattern.get("kind", []))) for entry in entries]
        for _, kind in kinds:
            for token in kind:
                self.counts[token] = self.counts.get(token, 0) + 1
        self.by_token: dict[object, list[tuple[Entry, set]]] = {}
        for entry, kind in kinds:
            for token in self.prefix(kind):
                self.by_token.setdefault(token, []).append((entry, kind))

    def __bool__(self) -> bool:
        return bool(self.by_token)

    def prefix(self, kind: set) -> list:
        # (repr: one order for ints and strings alike; the rarest first keeps the lists looked up short)
        ordered = sorted(kind, key=lambda token: (self.counts.get(token, 0), repr(token)))
        return ordered[:len(ordered) - math.ceil(SIMILARITY * len(ordered)) + 1]

    def alike(self, kind: frozenset) -> list[Entry]:
        """The entries whose kind is alike ``kind`` (whatever their scope)."""
        if not self.by_token or not kind:
            return []
        seen: set[int] = set()
        found = []
        for token in self.prefix(kind):
            for entry, theirs in self.by_token.get(token, ()):
                if entry.id not in seen:
                    seen.add(entry.id)
                    shared = len(kind & theirs)
                    if similar_counts(shared, len(kind) + len(theirs) - shared):
                        found.append(entry)
        return found


class RuleSet:
    """The active entries, indexed per model name; immutable once built (swapped whole on reload)."""

    def __init__(self, entries: Iterable[Entry] = (), now: Optional[float] = None):
        now = time.time() if now is None else now
        self.entries = [e for e in entries if e.active(now) and UNREADABLE not in e.pattern]
        self.by_model: dict[str, ModelRules] = {}
        for entry in self.entries:
            rules = self.by_model.get(entry.model)
            if rules is None:  # (not setdefault: its default, built for every entry, took 26 ms of a reload of 10,000)
                rules = self.by_model[entry.model] = ModelRules()
            rules.add(entry)
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
    kind: frozenset
    unusual_keys: np.ndarray  # int64: its unusual features' keys
    names: Callable[[], list[str]]  # the most unusual features' names
    kind_features: Callable[[], list[tuple[str, str]]] = list  # (label, text) of its kind's structural features
    suppressed_by: list[int] = field(default_factory=list)
    kept_by: list[int] = field(default_factory=list)
    held: str = ""  # why flagged whatever the feedback: decide's HELD_UNPARSED or HELD_CUT ("": not held)
    # what the feedback said of a record it left flagged ("not suppressed by feedback #19: attack-like, ..."):
    # the review page shows it on the group's example, as it shows "kept by" and "suppressed by"
    left_flagged: str = ""



def is_held(held: Optional[np.ndarray], index: int) -> str:
    """Why record ``index`` is held (decide's ``held``), "" when it is not."""
    return "" if held is None else str(held[index])


# A flagged record counts against review_inspect_per_s as one record per this many characters: inspecting
# grows with the line (a URL of 2,400 segments took 4.5 ms, an ordinary line about 0.15), and 200 such
# lines a second would have taken most of a core.
INSPECT_CHARS = 1000


# Past this many flagged records in one batch their weight is estimated from this many spaced evenly: the
# budget admits a few hundred a second, and weighing each of a flood's (three in four records of a new
# site's traffic) cost more than inspecting those it admits.
WEIGHED = 1024


def inspect_cost(records: Sequence[object]) -> int:
    """What ``records`` weigh against the inspection budget (a field map: one record)."""
    return sum(1 + len(record) // INSPECT_CHARS if record.__class__ is str else 1 for record in records)


def flagged_cost(records: Sequence[object], candidates: np.ndarray) -> int:
    """What the records at ``candidates`` weigh (``inspect_cost``), estimated past WEIGHED of them."""
    if len(candidates) <= WEIGHED:
        return inspect_cost([records[i] for i in candidates.tolist()])
    sample = candidates[np.linspace(0, len(candidates) - 1, WEIGHED).astype(np.int64)].tolist()
    return -(-inspect_cost([records[i] for i in sample]) * len(candidates) // WEIGHED)


@dataclass
class FeedbackStep:
    """What decide needs to apply feedback to one model's batch: the rules, the records and, per
    record, the route (tag) and entity value they were sent with. ``observe`` (the review page's
    ring) sees every flagged record with what made it unusual."""

    rules: RuleSet
    records: Sequence[object]
    routes: Sequence[str] = ()
    entities: Sequence[Optional[str]] = ()
    observe: Optional[object] = None  # callable(model, records, [Flagged], step) or None
    inspect_always: bool = False  # inspect flagged records even without rules (the review page is on)
    # callable(model name, n) -> how many of n flagged records the review page may inspect now (it
    # counts the rest as not grouped); None: all
    admit: Optional[Callable[[str, int], int]] = None
    # Per record, its time as the shipper sent it (forward mode's entries, the Fluentd filter's event
    # streams: records.event_seconds reads it); empty: none was sent.
    times: Sequence[object] = ()

    def route(self, i: int) -> str:
        return self.routes[i] if self.routes else ""

    def entity(self, i: int) -> Optional[str]:
        return self.entities[i] if self.entities else None

    def time(self, i: int) -> float:
        """Record i's own time in Unix seconds as its shipper sent it, NaN when it sent none."""
        return event_seconds(self.times[i]) if self.times else math.nan

    def apply(self, model: Model, candidates: np.ndarray, scores: np.ndarray,
              flags: np.ndarray, notes: list, held: Optional[np.ndarray] = None) -> np.ndarray:
        """Suppress what normal rules explain among ``candidates`` (indices of records flagged by their
        score); clears their flags and adds notes in place; returns the scores (lowered ones replaced).
        ``held``: per record why it is flagged whatever the feedback (decide's HELD_UNPARSED or
        HELD_CUT, "" when not), still inspected for the review page."""
        model_rules = self.rules.for_model(model.name) if len(self.rules) else []
        if not len(candidates) or not (model_rules or self.inspect_always) or model.sessions is not None:
            if self.observe is not None and len(candidates):
                self.observe(model, self.records, [Flagged(int(i), float(scores[i]), float(scores[i]), frozenset(),
                                                           NO_KEYS, list, held=is_held(held, i))
                                                   for i in candidates], self)
            return scores
        if not model_rules and self.admit is not None:
            # Only the review page wants them inspected: within its budget, a flood sampled evenly.
            allowed = self.admit(model.name, len(candidates), flagged_cost(self.records, candidates))
            if allowed < len(candidates):
                candidates = candidates[np.linspace(0, len(candidates) - 1, allowed).astype(np.int64)]
        for start in range(0, len(candidates), SCORE_CHUNK):  # bounded working memory, as Model.score
            scores = self._apply(model, candidates[start: start + SCORE_CHUNK], scores, flags, notes, model_rules,
                                 held)
        return scores

    def _apply(self, model: Model, candidates: np.ndarray, scores: np.ndarray, flags: np.ndarray, notes: list,
               model_rules: list, held: Optional[np.ndarray]) -> np.ndarray:
        found = inspect(model, [self.records[i] for i in candidates])
        kinds = [found.kind(row) for row in range(len(candidates))]
        drop, suppressors, keepers, withheld = self._matches(found, candidates, kinds, model_rules)
        rescored = rescore_without(model, found.batch, drop) if drop.any() else None
        flagged = []
        scores = scores.copy() if rescored is not None else scores
        for row, i in enumerate(candidates.tolist()):
            unusual = found.unusual(row)
            item = Flagged(i, float(scores[i]), float(scores[i]), kinds[row], found.batch.keys[unusual],
                           found.names(row, SHORT_KIND), lambda row=row: found.kind_features(row),
                           held=is_held(held, i))  # (kind features: read only when the record starts a group)
            if keepers[row]:
                item.kept_by = keepers[row]
                notes.append((i, "record", f"kept by feedback {rule_list(keepers[row])}"))
            elif rescored is not None and suppressors[row] and rescored[row] < model.threshold and not item.held:
                scores[i] = rescored[row]
                flags[i] = False
                item.score, item.suppressed_by = float(rescored[row]), suppressors[row].ids()
                notes.append((i, "record", f"suppressed by feedback {rule_list(item.suppressed_by)}"))
            elif withheld[row]:
                note, item.kept_by = withheld[row]
                item.left_flagged = note
                notes.append((i, "record", note))
            flagged.append(item)
        if self.observe is not None:
            self.observe(model, self.records, flagged, self)
        return scores

    def _matches(self, found: Inspection, candidates: np.ndarray, kinds: list[frozenset],
                 model_rules: list[ModelRules]):
        """(keys to drop [nnz], per record the normal entries that dropped some (a ``Naming``: looked
        up only for the records they suppress, as thousands of entries may name a common feature), the
        keep entries it falls under, per record what was held back from a drop, said if it stays flagged:
        (note, ids of the keep entries that held it back), or ()).

        A record of kinds marked normal (every token of its kind named by in-scope normal entries)
        loses all its unusual features: it is scored as if they had been seen in training, unless it
        holds an attack-like url feature the entries do not name (``injection.attack_like``: a mark of a
        section vouches for its pages, not for ``//etc/passwd`` or ``.git`` under it). Otherwise
        only the unusual features the entries name go (an attack on a page marked normal keeps its
        payload's). A keep entry's own features (those no normal entry in the record's scope names) never
        go, and records of its kind are kept: a keep of an attack on a page marked normal holds the
        page's features too, and protecting those flagged the page's ordinary records again."""
        keys = found.batch.keys
        drop = np.zeros(len(keys), dtype=bool)
        suppressors: list = [[] for _ in candidates]  # a Naming where something was dropped
        keepers: list[list[int]] = [[] for _ in candidates]
        withheld: list[tuple] = [() for _ in candidates]  # (note, ids of keep entries it names)
        if not model_rules:
            return drop, suppressors, keepers, withheld
        unusual = found.contribution > 0
        hits = np.zeros(len(keys), dtype=bool)
        everywhere = np.zeros(len(keys), dtype=bool)  # named by an entry of no scope: in every record's
        for rules in model_rules:
            hits |= among(keys, rules.normal_by_key.keys)
        hits &= unusual
        at = np.flatnonzero(hits)  # (only these are read below: unscoped keys are among the normal ones)
        for rules in model_rules:
            everywhere[at] |= among(keys[at], rules.normal_by_key.unscoped_keys)
        fields = found.key_fields() if any(r.by_field for r in model_rules) else None
        for row, i in enumerate(candidates.tolist()):
            route, entity = self.route(i), self.entity(i)
            start, stop = int(found.bounds[row]), int(found.bounds[row + 1])
            protected, kept = self._kept(found, row, kinds[row], model_rules, route, entity)
            if kept:
                keepers[row] = sorted(kept)
                continue
            mine = unusual[start:stop]
            guarded = None  # bool over the record's keys: unusual ones a keep entry protects
            if protected:
                guarded = mine & np.isin(keys[start:stop], np.fromiter(protected, dtype=np.int64))
                mine = mine & ~guarded
            named = everywhere[start:stop] & mine
            for offset in np.flatnonzero(hits[start:stop] & mine & ~named).tolist():  # scoped entries' keys
                key = int(keys[start + offset])
                named[offset] = any(rules.normal_by_key.groups(key, route, entity) for rules in model_rules)
            naming = Naming(model_rules, keys[start:stop][named], route, entity)  # (before field values')
            naming.sets += self._marked_kind(found, row, kinds[row], model_rules, route, entity)
            whole = bool(naming.sets)
            if whole:
                attacks = found.attack_like(row, mine & ~named)
                if attacks:  # (then only what the entries name goes, as for a record of another kind)
                    whole = False
                    withheld[row] = (f"not suppressed by feedback {rule_list(sorted(set().union(*naming.sets)))}: "
                                     f"attack-like, which it does not name: {shown_feature(attacks[0])}", [])
                    naming.sets = []
            if fields is not None:
                by_field = self._field_values(found, row, start, stop, fields, model_rules, route, entity)
                named |= by_field[0] & mine
                if by_field[1]:
                    naming.sets.append(by_field[1])
            drop[start:stop] = mine if whole else named
            if whole and guarded is not None and guarded.any():
                released, withheld[row] = self._held_by_keeps(found, row, guarded, model_rules, route, entity)
                drop[start:stop] |= released
            suppressors[row] = naming if drop[start:stop].any() else []
        return drop, suppressors, keepers, withheld

    @staticmethod
    def _held_by_keeps(found: Inspection, row: int, guarded: np.ndarray, model_rules, route, entity):
        """For a record of a kind marked normal: (those of ``guarded``, its unusual keys keep entries
        protect, that the kind stands for, what the rest says if the record stays flagged: (note, ids of
        the keep entries) or ()).

        The kind stands for the page's own features (its template, slots and length classes: a keep of an
        attack on the page holds them too) and for its details, in which its records differ (n-grams of
        an id: "8&v" of "with=2058&view", shared by chance with a kept attack's "with=2938&view", flagged
        an ordinary line again). The keep protects the rest."""
        start, stop = int(found.bounds[row]), int(found.bounds[row + 1])
        keys = found.batch.keys[start:stop]
        page = np.isin(keys, np.fromiter(found.page_keys(row), dtype=np.int64))
        released = guarded & (page | found.detail[start:stop])
        held = guarded & ~released
        if not held.any():
            return released, ()
        ids = sorted(set().union(*(ids for key in keys[held].tolist() for rules in model_rules
                                   for ids in rules.keep_by_key.groups(key, route, entity))))
        return released, (f"kept by feedback {rule_list(ids)}", ids)

    def _marked_kind(self, found: Inspection, row: int, kind: frozenset, model_rules, route,
                     entity) -> list[set[int]]:
        """The normal entries the record is of the kind of (as sets of ids, empty if none): they name
        every token of its kind; or, for a record unusual in details only, it holds most of an entry's
        kind (after retraining, a kind's features are seen, only new details of it stay unusual)."""
        named: list[set[int]] = []
        for token in kind:
            ids = [found for rules in model_rules for found in rules.normal_by_kind.groups(token, route, entity)]
            if not ids:
                named = []
                break
            named += ids
        if named or any(not found.detail[i] for i in found.unusual(row, KIND_SIZE)):
            return named
        start, stop = int(found.bounds[row]), int(found.bounds[row + 1])
        counts: dict[int, int] = {}
        entries: dict[int, Entry] = {}
        keys = set(found.batch.keys[start:stop].tolist())
        for rules in model_rules:
            for key in rules.normal_by_kind.present(keys):
                for i in rules.normal_by_kind.ids(key, route, entity):
                    counts[i] = counts.get(i, 0) + 1
                    entries[i] = rules.normal_by_kind.entries[i]
        alike = {i for i, count in counts.items()
                 if count >= SIMILARITY * sum(isinstance(t, int) for t in entries[i].pattern["kind"])}
        return [alike] if alike else []

    def _field_values(self, found: Inspection, row, start, stop, fields, model_rules, route, entity):
        """(keys of fields whose value normal entries name [stop - start], those entries)."""
        named = np.zeros(stop - start, dtype=bool)
        used: set[int] = set()
        names: set[str] = set()
        for rules in model_rules:
            for entry in rules.field_entries(found, row):
                if entry.verdict == NORMAL and in_scope(entry, route, entity):
                    names.add(entry.pattern["field"])
                    used.add(entry.id)
        for name in names:
            named |= np.fromiter((f == name for f in fields[start:stop]), dtype=bool, count=stop - start)
        return named, used

    def _kept(self, found: Inspection, row: int, kind: frozenset, model_rules, route, entity):
        """(keys no normal entry may drop: keep entries' keys no normal entry in scope names, ids of keep
        entries the record falls under: alike kinds, or a field value marked keep)."""
        start, stop = int(found.bounds[row]), int(found.bounds[row + 1])
        protected: set[int] = set()
        kept: set[int] = set()
        keys: Optional[set] = None  # the record's keys, read once if any rules protect keys
        for rules in model_rules:
            if not (rules.keep_by_key or rules.keep_kinds or rules.by_field):
                continue
            alike = [e for e in rules.keep_kinds.alike(kind) if in_scope(e, route, entity)]
            if alike and self._kind_marked_normal(kind, model_rules, route, entity):
                # A keep never outranks a normal entry naming the same kind: a keep of a probe of a
                # section marked normal is of the section's kind (``path /blog/…``), and kept all its
                # ordinary pages flagged. Of that kind, it keeps only records alike the kept ones by keys.
                alike = [e for e in alike if alike_by_keys(found, row, e)]
            kept.update(e.id for e in alike)
            if rules.keep_by_key:
                keys = set(found.batch.keys[start:stop].tolist()) if keys is None else keys
                protected.update(k for k in rules.keep_by_key.present(keys)
                                 if rules.keep_by_key.groups(k, route, entity))
            kept.update(e.id for e in rules.field_entries(found, row)
                        if e.verdict == KEEP and in_scope(e, route, entity))
        # A key a normal entry in force names is the marked page's as much as the kept attack's (a keep
        # takes every unusual feature of its records): the keep protects only its own.
        if not protected:
            return protected, kept
        keys = np.fromiter(protected, dtype=np.int64, count=len(protected))
        everywhere = np.zeros(len(keys), dtype=bool)  # named by an unscoped normal entry: in every scope
        for rules in model_rules:
            everywhere |= among(keys, rules.normal_by_key.unscoped_keys)
        return {k for k in keys[~everywhere].tolist() if not any(rules.normal_by_key.groups(k, route, entity)
                                                                 for rules in model_rules)}, kept


    @staticmethod
    def _kind_marked_normal(kind: frozenset, model_rules, route, entity) -> bool:
        """Whether in-scope normal entries name every token of ``kind``."""
        return bool(kind) and all(any(rules.normal_by_kind.groups(token, route, entity) for rules in model_rules)
                                  for token in kind)


def alike_by_keys(found: Inspection, row: int, entry: Entry) -> bool:
    """Whether the record's unusual features and the ``entry``'s keys share SIMILARITY of their union."""
    mine = set(found.batch.keys[found.unusual(row)].tolist())
    theirs = set(entry.pattern["keys"])
    shared = len(mine & theirs)
    return similar_counts(shared, len(mine) + len(theirs) - shared)


class Naming:
    """The normal entries that dropped features of a record: those naming its ``keys`` in its scope,
    and ``sets`` of ids (of its kind, its field values). Worked out only for a record they suppress:
    most flagged records hold features common entries name, and are not suppressed."""

    def __init__(self, model_rules: list[ModelRules], keys: np.ndarray, route: str, entity: Optional[str]):
        self.model_rules, self.keys, self.route, self.entity = model_rules, keys, route, entity
        self.sets: list[set[int]] = []

    def ids(self) -> list[int]:
        found = [ids for key in self.keys.tolist() for rules in self.model_rules
                 for ids in rules.normal_by_key.groups(key, self.route, self.entity)]
        return sorted(set().union(*found, *self.sets))


SHOWN_FEATURE_CHARS = 120  # of a feature's text in a note (a path of thousands of segments is one feature)


def shown_feature(text: str) -> str:
    return text if len(text) <= SHOWN_FEATURE_CHARS else text[:SHOWN_FEATURE_CHARS - 1] + "…"


def among(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """``np.isin(keys, sorted_keys)`` for sorted unique ``sorted_keys``, by binary search (isin
    sorts both: most of the cost of matching a call's keys against a few entries')."""
    if not len(sorted_keys):
        return np.zeros(len(keys), dtype=bool)
    return sorted_keys[np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)] == keys


def similar_counts(shared: int, union: int) -> bool:
    """Two kinds (sets of features) are alike when they share at least SIMILARITY of their union:
    decided from the sizes of their intersection (``shared``) and union, which callers count as
    they go (an index's hits), never building the sets."""
    return union > 0 and shared >= SIMILARITY * union


RULES_NAMED = 5  # entries a note names; the rest are counted


def rule_list(ids: Sequence[int]) -> str:
    """"#3, #9" — at most RULES_NAMED of them, then how many more: with thousands of entries sharing a
    common unusual feature, every suppressed record's note named thousands (25 KB a record)."""
    return named_first(ids, RULES_NAMED, lambda i: f"#{i}")
