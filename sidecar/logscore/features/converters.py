"""Field converters: each turns one field's values into hashed features.

Configured per field, as data (YAML/JSON), like Jubatus's converter:

    fields:
      - field: url
        converters: [{kind: url}, {kind: ngrams, n: [3, 3], decode: true}]

Choose a converter by its ``kind`` in CONVERTERS. A converter that learns from
the training data (``url`` learns which parameters take only a few values)
returns that state from ``learned()``; it is stored in the model artifact and
passed back as options when the model is loaded.
"""

from __future__ import annotations

import math
import re
import weakref
from collections import Counter
from typing import Iterable, Iterator, Optional, Sequence
from urllib.parse import unquote_plus

import numpy as np

from ..errors import ConfigError
from ..masking import mask_variables
from ..sizes import text_bytes
from .batch import WEIGHTINGS, FeatureSink, ValueFeatures, term_weights, text_key, text_seed

Values = Sequence[Optional[str]]
MISSING = "(missing)"
CACHE_SIZE = 16_384  # distinct values remembered per cache, at most
# Bytes each cache may hold (keys and features, estimated): a long URL's n-grams take ≈ 3 KB,
# so entries alone would not bound memory. A converter has one to two caches.
CACHE_BYTES = 4 << 20
# Feature names remembered per converter for explanations: at most this many, of at most this many
# bytes in all (key_bytes of each name, plus its key and its slot). NOTE: counted in names only, names
# of CJK or emoji values (4 bytes a character as Python holds them) took 7 MiB a converter (probe).
MAX_NAMES = 16_384
MAX_NAMES_BYTES = 4 * 1024 * 1024  # 16,384 names of about 100 ASCII characters (the cut: MAX_NAME_CHARS)
NAME_ENTRY_BYTES = 100  # a remembered name's key (an int) and its slot in the dict
# A name is cut to this many characters: a 5,000-character path segment, named whole, made each of
# its record's explanations 5 KB (and the names remembered above 80 MiB).
MAX_NAME_CHARS = 120
# UrlConverter's flags of an evasion (the review page reads them: review.plain_parameter)
PATH_ENCODED_TWICE, VALUE_ENCODED_TWICE = "path encoded more than once", "value encoded more than once"


def key_bytes(key) -> int:
    """Memory a cache key takes, estimated (the compiled Cache uses the same formula for str and bytes)."""
    if isinstance(key, str):
        return 49 + text_bytes(key)
    if isinstance(key, bytes):
        return 33 + len(key)
    if isinstance(key, tuple):
        return 56 + sum(8 + key_bytes(item) for item in key)
    return 64


def held_bytes(key, entry) -> int:
    """Memory of the value an entry names its features by (``entry.value``), unless that value is its
    key: the URL converter's structure cache keys an entry by a URL's structure, and the entry keeps
    the first URL of that structure, up to 8,192 characters that the key does not count (probe: 40,000
    such URLs held 530 MiB in caches counted at 2.8 MiB). The compiled Cache counts it the same way."""
    held = getattr(entry, "value", None)
    if held is None or held is key or (type(held) is type(key) and type(held) in (str, bytes) and held == key):
        return 0
    return key_bytes(held)


class ValueCache:
    """Features of recently seen values, in two generations of at most ``size // 2`` entries
    and ``max_bytes // 2`` bytes each (keys, entries and the values entries hold: ``held_bytes``).

    A value found in the older generation moves to the newer; when the newer is full it
    becomes the older and the older is dropped. So memory stays bounded, values in steady
    use stay cached, and a busy cache never empties all at once (which stalled batches).
    The compiled featurizer has a twin of this class (``_native.Cache``).
    """

    def __init__(self, size: int = CACHE_SIZE, max_bytes: int = CACHE_BYTES):
        self._half = max(size // 2, 1)
        self._half_bytes = max(max_bytes // 2, 1)
        self._new: dict = {}
        self._old: dict = {}
        self._new_bytes = self._old_bytes = 0

    def __len__(self) -> int:
        return len(self._new) + len(self._old)

    @property
    def nbytes(self) -> int:
        return self._new_bytes + self._old_bytes

    def get(self, value):
        entry = self._new.get(value)
        if entry is None:
            entry = self._old.get(value)
            if entry is not None:
                self.put(value, entry)
        return entry

    def put(self, value, entry) -> None:
        if len(self._new) >= self._half or self._new_bytes >= self._half_bytes:
            self._old, self._new = self._new, {}
            self._old_bytes, self._new_bytes = self._new_bytes, 0
        self._new[value] = entry
        self._new_bytes += key_bytes(value) + entry.nbytes + held_bytes(value, entry)

    def clear(self) -> None:
        self._new, self._old = {}, {}
        self._new_bytes = self._old_bytes = 0

    def lookup(self, values: Sequence, keys: Sequence, compute) -> list[ValueFeatures]:
        """The features of each value, looked up by its key; values whose key is not cached
        are computed once per key, by ``compute(values, keys)``, from one value holding it."""
        found = [self.get(key) for key in keys]
        if all(found):  # the usual case: every value seen recently
            return found
        todo: dict = {}  # key -> a value holding it
        for value, key, entry in zip(values, keys, found):
            if entry is None and key not in todo:
                todo[key] = value
        computed = dict(zip(todo, compute(list(todo.values()), list(todo))))
        for key, entry in computed.items():
            self.put(key, entry)
        return [entry if entry is not None else computed[key] for entry, key in zip(found, keys)]

    def lookup_distinct(self, keys: Sequence, compute) -> list[ValueFeatures]:
        """``lookup`` for keys given once each (a field's distinct values): the entries of the
        keys not cached are ``compute(those keys)``. A key given twice is computed twice."""
        found = [self.get(key) for key in keys]
        misses = [i for i, entry in enumerate(found) if entry is None]
        if not misses:
            return found
        computed = list(compute([keys[i] for i in misses]))
        if len(computed) != len(misses):
            raise ValueError("compute returned a different number of entries")
        for i, entry in zip(misses, computed):
            found[i] = entry
            self.put(keys[i], entry)
        return found


def value_features(converter, values: Sequence[Optional[str]], keys: np.ndarray, weights: np.ndarray,
                   bounds) -> list[ValueFeatures]:
    """One entry per value from its slice of the batch's keys and weights. NOTE: copies, so a
    cached entry holds its own bytes, not its whole batch's arrays (the caches' bound counts them)."""
    return [ValueFeatures(keys[a:b].copy(), weights[a:b].copy(), converter, value)
            for value, a, b in zip(values, bounds[:-1], bounds[1:])]


class Converter:
    """Base class. ``weight`` scales every feature this converter emits."""

    kind = ""
    options: dict[str, object] = {}

    def __init__(self, field: str, weight: float = 1.0, weighting: str = "binary", **options):
        unknown = set(options) - set(self.options)
        if unknown:
            raise ConfigError(
                f"converter {self.kind!r} on field {field!r}: unknown option(s) "
                f"{', '.join(sorted(unknown))}; known: {', '.join(sorted(self.options)) or 'none'}")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"converter {self.kind!r} on field {field!r}: weighting must be one of "
                              f"{', '.join(WEIGHTINGS)}, not {weighting!r}")
        self.field = field
        self.weight = float(weight)
        self.weighting = weighting
        self.config = {**self.options, **options}
        self.seed = text_seed(field, self.kind)
        # "url: shape ..." rather than "url url: shape ..." when the converter is named after its field
        self.label = field if field == self.kind else f"{field} {self.kind}"
        # The compiled twins of this converter's work (features/native.py), or None.
        self._native = None
        self._weigher = None
        self._names: dict[int, str] = {}  # key -> readable name, for explanations (describe)
        self._names_bytes = 0  # what _names holds, estimated (MAX_NAMES_BYTES)
        self._new_caches()

    def accelerate(self, native) -> None:
        """Compute features with the compiled module ``native`` (None: the Python reference)."""
        self._native = native
        if native is not None:
            self._ref = weakref.ref(self)  # what compiled features name keys through
            # How the compiled code weighs counts: binary and tf in C; log_tf by numpy, as here.
            self._weigher = {"binary": 0, "tf": 1}.get(self.weighting, self._weigh)
        self._new_caches()

    def _weigh(self, counts: np.ndarray) -> np.ndarray:
        return (term_weights(counts, self.weighting) * np.float32(self.weight)).astype(np.float32)

    def _new_cache(self):
        # NOTE: the compiled caches store a computed value the second time it is computed in a while
        # (their doorkeeper, _native.c): on novel traffic storing every value cost more than caching saved.
        # The Python path is the reference; its caches store every value.
        if self._native is None:
            return ValueCache()
        try:
            return self._native.Cache(CACHE_SIZE, CACHE_BYTES, doorkeeper=True)
        except TypeError:  # an extension built before the doorkeeper, not rebuilt since: it stores every value
            return self._native.Cache(CACHE_SIZE, CACHE_BYTES)

    def _new_caches(self) -> None:
        self._cache = self._new_cache()
        self._last_texts: Optional[tuple] = None  # (value, its texts by key) for feature_text; fit changes them

    def spec(self) -> dict:
        return {"kind": self.kind, "weight": self.weight, "weighting": self.weighting,
                **self.config, **self.learned()}

    def fit(self, values: Values) -> None:
        """Learn from training values (``fit_plan``)."""
        self.apply(self.fit_plan(values).learned())

    def fit_plan(self, values: Values) -> "ConverterFitPlan":
        """What ``fit`` learns from any subset of ``values`` (training fits a model on each fold);
        most converters learn nothing."""
        return NOTHING_LEARNED

    def apply(self, learned: dict) -> None:
        """Take on a state ``learned()`` returned (of this converter or a twin)."""

    def learned(self) -> dict:
        return {}

    def transform(self, ids: np.ndarray, distinct: list[Optional[str]], values: Values,
                  sink: FeatureSink) -> None:
        """Record r holds ``distinct[ids[r]]`` (= ``values[r]``)."""
        sink.add_values(ids, self._featurize_distinct(distinct))

    def _featurize_distinct(self, values: list[Optional[str]]) -> list[ValueFeatures]:
        """Features of each distinct value, from the cache where possible."""
        return self._cache.lookup_distinct(values, self.featurize)

    def forget(self) -> None:
        """Drop cached features (after fit changes what a value's features are)."""
        self._new_caches()

    def featurize(self, values: Sequence[Optional[str]]) -> list[ValueFeatures]:
        """Features of distinct values: the texts ``features`` yields, hashed."""
        return self._hash(values, [self._texts(v) for v in values])

    def _hash(self, values: Sequence[Optional[str]], texts: Sequence[Iterable[str]]) -> list[ValueFeatures]:
        """Each value's texts hashed, counted and weighted, all values at once (numpy calls per
        value would cost more than the work)."""
        if self._native is not None:
            return self._native.text_features(list(values), list(texts), self.seed, self.weight,
                                              self._weigher, self._ref)
        counted = [Counter(t) for t in texts]
        seed = self.seed
        keys = np.fromiter((text_key(seed, text) for counts in counted for text in counts), dtype=np.int64)
        counts = np.fromiter((n for counts in counted for n in counts.values()), dtype=np.float32,
                             count=len(keys))
        weights = self._weigh(counts)
        bounds = np.cumsum([0] + [len(c) for c in counted]).tolist()
        return value_features(self, values, keys, weights, bounds)

    def _texts(self, value: Optional[str]) -> Iterable[str]:
        return (MISSING,) if value is None else self.features(value)

    def describe(self, value: Optional[str], key: int) -> str:
        """The readable name of feature ``key`` of ``value`` (for explanations: worked out again
        when asked, so cached features hold no names).

        NOTE: a key is the hash of its text, so its name does not depend on the value: names
        found are remembered by key (working one out featurizes the value again in Python, ≈ 20 µs).
        """
        name = self._names.get(key)
        if name is None:
            name = cut_name(self._describe(value, key))
            size = key_bytes(name) + NAME_ENTRY_BYTES
            if len(self._names) >= MAX_NAMES or self._names_bytes + size > MAX_NAMES_BYTES:
                self._names.clear()
                self._names_bytes = 0
            self._names[key] = name
            self._names_bytes += size
        return name

    def _describe(self, value: Optional[str], key: int) -> str:
        text = self.feature_text(value, key)
        return f"{self.label}: {text if text is not None else f'feature #{key}'}"

    def feature_text(self, value: Optional[str], key: int) -> Optional[str]:
        """The text feature ``key`` of ``value`` was hashed from (None: no text of it was).

        NOTE: the texts of the last value asked about are kept by key: explanations name a
        record's features one after the other, mostly several of the same value."""
        last = self._last_texts
        if last is None or last[0] != value:
            texts: dict[int, str] = {}
            for text in self._texts(value):
                texts.setdefault(text_key(self.seed, text), text)
            last = self._last_texts = (value, texts)
        return last[1].get(key)

    def features(self, value: str) -> Iterable[str]:
        raise NotImplementedError


_ASCII_SHAPE = str.maketrans(
    {**{c: "a" for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"},
     **{c: "9" for c in "0123456789"}})
# A character followed by the same one: deleting these collapses runs ("aaa9" → "a9"); an
# empty replacement is ~3x faster than substituting a backreference.
_REPEATED = re.compile(r"(.)(?=\1)", re.DOTALL)
_MAX_SHAPE = 48


def value_shape(value: str) -> str:
    """Character classes with runs collapsed: ``"abc123"`` → ``"a9"``, ``"1' OR 1=1"`` → ``"9' a 9=9"``."""
    return _REPEATED.sub("", value.translate(_ASCII_SHAPE))[:_MAX_SHAPE]


ID_SEGMENT = re.compile(
    r"\d+|[0-9a-fA-F]{8,}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


_PARAMETER_SEPARATOR = re.compile(r"[&;]")
MAX_EXACT_SHAPE = 12  # longer value shapes are described by their characters only


def mask_segment(segment: str) -> str:
    return "{id}" if ID_SEGMENT.fullmatch(segment) else segment


def percent_decode(text: str, max_rounds: int) -> tuple[str, int]:
    """Decode repeatedly (double encoding hides attacks) at most max_rounds times."""
    rounds = 0
    while rounds < max_rounds and ("%" in text or "+" in text):
        decoded = unquote_plus(text, errors="replace")
        if decoded == text:
            break
        text, rounds = decoded, rounds + 1
    return text, rounds


def length_bucket(length: int) -> int:
    return length.bit_length()


def cut_name(name: str) -> str:
    return name if len(name) <= MAX_NAME_CHARS else name[:MAX_NAME_CHARS - 1] + "…"


class ConverterFitPlan:
    """What a converter learns from the records of any mask over the values it was made from."""

    def learned(self, mask: Optional[np.ndarray] = None) -> dict:
        """``Converter.learned()`` after fitting on the values where ``mask`` (all when None)."""
        return {}

    def touched(self, first: dict, second: dict) -> np.ndarray:
        """Positions (ascending) of the values whose features differ between two learned states."""
        return np.zeros(0, dtype=np.int64)


NOTHING_LEARNED = ConverterFitPlan()


class EnumerationPlan(ConverterFitPlan):
    """``UrlConverter``'s fit for any subset of its values: each distinct URL is split once, into
    (URL, slot, parameter value) triples, so a fold's enumerations are a few array operations
    (splitting 800,000 URLs for each of ten fold models was a fifth of training 1M records).

    A slot ``{template}?{name}`` is an enumeration when it takes at most ``max_enum_values``
    distinct values and is used at least ``min_enum_support`` times per value."""

    def __init__(self, values: Values, split, max_values: int, min_support: float):
        """``split(url)`` → (template, [(name, value)], flags), as ``UrlConverter`` reads a URL."""
        index: dict = {}
        self.value_ids = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64,
                                     count=len(values))
        slots: dict[str, int] = {}
        params: dict[str, int] = {}
        triples: list[tuple[int, int, int]] = []
        for url_id, value in enumerate(index):
            if value is None:
                continue
            template, pairs, _ = split(value)
            for name, param_value in pairs:
                slot = slots.setdefault(f"{template}?{name}", len(slots))
                triples.append((url_id, slot, params.setdefault(param_value, len(params))))
        self.slots = list(slots)
        url, slot, param = np.array(triples, dtype=np.int64).reshape(-1, 3).T
        self.url, self.slot, self.param = url, slot, param
        self.distinct_values, self.distinct_params = len(index), len(params)
        self.max_values, self.min_support = int(max_values), float(min_support)

    def learned(self, mask: Optional[np.ndarray] = None) -> dict:
        ids = self.value_ids if mask is None else self.value_ids[mask]
        records = np.bincount(ids, minlength=self.distinct_values)[self.url]  # per triple: records holding it
        present = records > 0
        slot = self.slot[present]
        uses = np.bincount(slot, weights=records[present], minlength=len(self.slots))
        slot_values = np.unique(slot * self.distinct_params + self.param[present])
        distinct = np.bincount(slot_values // max(self.distinct_params, 1), minlength=len(self.slots))
        chosen = (distinct > 0) & (distinct <= self.max_values) & (uses >= self.min_support * distinct)
        return {"enumerated": sorted(self.slots[s] for s in np.flatnonzero(chosen))}

    def touched(self, first: dict, second: dict) -> np.ndarray:
        changed = set(first["enumerated"]).symmetric_difference(second["enumerated"])
        if not changed:
            return np.zeros(0, dtype=np.int64)
        slots = np.array([s in changed for s in self.slots], dtype=bool)
        urls = np.unique(self.url[slots[self.slot]])
        return np.flatnonzero(np.isin(self.value_ids, urls))


class UrlConverter(Converter):
    """Structure of a request URL (or a form body, with ``part: query``).

    Per path template (numeric/hex ids masked): the parameter names and their
    set; per parameter: value shape, length bucket, and the value itself when
    training saw only a few distinct values (an enumeration).
    """

    kind = "url"
    options = {"part": "full", "decode_rounds": 3, "max_enum_values": 8, "min_enum_support": 5,
               "enumerated": []}

    def __init__(self, field: str, **options):
        super().__init__(field, **options)
        if self.config["part"] not in ("full", "query"):
            raise ConfigError(f"url converter on {field!r}: part must be 'full' or 'query'")
        self.enumerated = frozenset(self.config["enumerated"])

    @property
    def enumerated(self) -> frozenset:
        return self._enumerated

    @enumerated.setter
    def enumerated(self, slots: frozenset) -> None:
        self._enumerated = slots
        # Every "{template}" some slot "{template}?{name}" may start with (templates and names
        # can hold "?" once decoded): the compiled path checks a URL's template once.
        self._enumerated_templates = frozenset(
            slot[:i] for slot in slots for i, char in enumerate(slot) if char == "?")
        self._template_set = None  # the compiled table of them, made on first use

    def _new_caches(self) -> None:
        super()._new_caches()
        self._by_structure = self._new_cache()

    def learned(self) -> dict:
        return {"enumerated": sorted(self.enumerated)}

    def apply(self, learned: dict) -> None:
        self.enumerated = frozenset(learned["enumerated"])

    def fit_plan(self, values: Values) -> "EnumerationPlan":
        return EnumerationPlan(values, self._split, self.config["max_enum_values"], self.config["min_enum_support"])

    def _split(self, value: str) -> tuple[str, list[tuple[str, str]], list[str]]:
        flags = []
        if self.config["part"] == "query":
            path, query = "", value
        else:
            path, _, query = value.partition("?")
            if "://" in path[:12]:
                path = "/" + path.split("://", 1)[1].partition("/")[2]
            path, rounds = percent_decode(path, self.config["decode_rounds"])
            if rounds > 1:
                flags.append(PATH_ENCODED_TWICE)
        template = "/".join(mask_segment(s) for s in path.split("/"))
        params = []
        for pair in filter(None, _PARAMETER_SEPARATOR.split(query)):
            name, has_value, raw_value = pair.partition("=")
            decoded, rounds = percent_decode(raw_value, self.config["decode_rounds"])
            if rounds > 1:
                flags.append(f"{VALUE_ENCODED_TWICE}: {name}")
            if not has_value:
                flags.append(f"parameter without '=': {value_shape(name)}")
            params.append((percent_decode(name, 1)[0][:64], decoded))
        return template, params, flags

    def featurize(self, values: Sequence[Optional[str]]) -> list[ValueFeatures]:
        # NOTE: distinct URLs mostly differ where no feature looks (an id in the path, other
        # digits of the same length): each structure is featurized once, then shared.
        if self._native is not None:
            # The same, compiled: each structure is a bytes key holding what the tuple holds.
            full = self.config["part"] == "full"
            if self._template_set is None:
                self._template_set = self._native.template_set(self._enumerated_templates)
            structures = self._native.url_structures(list(values), full, int(self.config["decode_rounds"]),
                                                     self.enumerated, self._template_set)
            return self._by_structure.lookup(list(values), structures, lambda todo, keys: self._native.url_features(
                todo, keys, full, self.seed, self.weight, self._weigher, self._ref))
        structures = [self.structure(v) if v is not None else None for v in values]
        return self._by_structure.lookup(values, structures, lambda todo, keys: self._hash(
            todo, [self._structure_features(k) if k is not None else (MISSING,) for k in keys]))

    def structure(self, value: str) -> tuple:
        """All a URL's features depend on: flags, path template, and per parameter its name,
        value shape, enumerated value (else None) and length bucket."""
        template, params, flags = self._split(value)
        return (tuple(flags), template, tuple(
            (name, value_shape(param_value),
             param_value[:64] if f"{template}?{name}" in self.enumerated else None,
             length_bucket(len(param_value)))
            for name, param_value in params))

    def features(self, value: str) -> Iterator[str]:
        return self._structure_features(self.structure(value))

    def _structure_features(self, structure: tuple) -> Iterator[str]:
        # Most telling first: explanations keep this order among equally rare features.
        flags, template, params = structure
        yield from flags
        for name, shape, enumerated_value, length in params:
            slot = f"{template}?{name}"
            # Characters this parameter never held ("'" in an id, "<" in a name) are the
            # strongest signal; a long value's exact shape is too specific to be seen twice.
            if len(shape) <= MAX_EXACT_SHAPE:
                yield f"shape {name}={shape}"
                yield f"shape {slot}={shape}"
            for symbol in dict.fromkeys(shape):
                yield f"character {name}={symbol}"
            if enumerated_value is not None:
                yield f"value {slot}={enumerated_value}"
            yield f"length {slot}={length}"
            yield f"parameter {slot}"
        if self.config["part"] == "full":
            yield f"path {template}"
            for segment in dict.fromkeys(template.split("/")):
                yield f"segment {segment}"
        yield f"parameters {template}?{'&'.join(sorted({name for name, *_ in params}))}"


_TOKEN = re.compile(r"<\w+>|[^\W\d][\w.\-]*|[^\w\s]")


class TokensConverter(Converter):
    """Words after masking variable parts, plus the whole masked line as a template.

    ``hosts``, ``macs``: host names, MAC addresses are variable parts too (messages of syslog and
    applications; off in models from before each option, which learned them as words)."""

    kind = "tokens"
    options = {"template": True, "lowercase": False, "max_chars": 2048, "hosts": False, "macs": False}

    def features(self, value: str) -> Iterator[str]:
        masked = mask_variables(value[: self.config["max_chars"]], self.config["hosts"], self.config["macs"])
        if self.config["lowercase"]:
            masked = masked.lower()
        for token in _TOKEN.findall(masked):
            yield f"token {token}"
        if self.config["template"]:
            yield f"template {' '.join(masked.split())[:256]}"


# Words of failure in any program's messages (severity, failure, refusal, corruption, crash): a
# word holding one (``OutOfMemoryError``, ``segfault``, ``Deadlock``) is alarm vocabulary. Matched
# at the start of a word's pieces (camelCase and non-letters split them), so ``debug`` holds no
# ``bug``; the short ones only as a whole piece (``errno`` is no ``err``).
ALARM_STEMS = ("error", "fail", "fatal", "panic", "exception", "segfault", "segmentation", "killed",
               "outofmemory", "denied", "corrupt", "abort", "crash", "timeout", "refused", "invalid", "unable",
               "cannot", "unreachable", "overflow", "deadlock", "violation", "traceback", "assert", "critical",
               "emerg", "severe", "expired", "lockup", "stuck", "unhandled", "illegal", "malformed", "mismatch",
               "rejected", "lost")
ALARM_WORDS = frozenset(("err", "oom", "bug", "kill"))
_WORD_PIECE = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])")


class AlarmVocabulary:
    """One word list: its stems, and what a message must hold (lowercased) to hold an alarm."""

    def __init__(self, stems: tuple[str, ...]):
        self.pattern = re.compile("|".join(stems))
        # (the stems and words no other one starts with)
        every = stems + tuple(ALARM_WORDS)
        self.marks = tuple(sorted({s for s in every if not any(o != s and s.startswith(o) for o in every)}))

    def stems(self, word: str) -> list[str]:
        """The alarm stems ``word``'s pieces start with, in order (``LedgerCorruptedException`` →
        corrupt, exception)."""
        found = []
        for piece in _WORD_PIECE.findall(word):
            piece = piece.lower()
            if piece in ALARM_WORDS:
                found.append(piece)
            else:
                match = self.pattern.match(piece)
                if match is not None:
                    found.append(match.group())
        return found


# The word lists, by the alarms option `words`: a model keeps the list it learned with (a stem it
# never knew would give never-seen alarms in its normal lines). 2 adds the macOS sandbox's
# "deny file-read-data" and launchd's "exited due to SIGSEGV" (syslog trial).
ALARM_LISTS = {1: AlarmVocabulary(ALARM_STEMS), 2: AlarmVocabulary(ALARM_STEMS + ("sigsegv", "deny"))}


class AlarmsConverter(Converter):
    """Alarm vocabulary of a message: each alarm stem it holds (``alarm fail``) and each masked word
    holding one (``alarm word java.lang.OutOfMemoryError``).

    Beside ``tokens`` with a weight above 1, a never-seen word of failure counts as that many
    never-seen words: one new error message stands out from long normal lines holding many rare
    words, while alarm words the log shows every day (its own ``ERROR`` level) are seen and add
    nothing. The threshold still comes from out-of-fold scores, so a log whose normal lines keep
    bringing new alarm words raises it."""

    kind = "alarms"
    # (``macs`` changes no alarm word, a MAC holding no alarm stem: it masks as its message's tokens
    # converter does, whose masked text is remembered. ``words``: the word list, ALARM_LISTS; 1 in
    # models from before the option.)
    options = {"max_chars": 2048, "hosts": True, "macs": False, "words": 1}

    def __init__(self, field: str, **options):
        super().__init__(field, **options)
        words = self.config["words"]
        if words not in ALARM_LISTS:
            raise ConfigError(f"converter 'alarms' on field {field!r}: no word list {words!r}; this logscore "
                              f"knows {', '.join(map(str, sorted(ALARM_LISTS)))} (a model made by a newer "
                              "logscore needs that version)")
        self._vocabulary = ALARM_LISTS[words]

    def features(self, value: str) -> Iterator[str]:
        text = value[: self.config["max_chars"]]
        lowered = text.lower()
        if not any(mark in lowered for mark in self._vocabulary.marks):  # most messages: nothing to mask
            return
        for token in _TOKEN.findall(mask_variables(text, self.config["hosts"], self.config["macs"])):
            stems = self._vocabulary.stems(token)
            if stems:
                yield f"alarm word {token}"
                for stem in stems:
                    yield f"alarm {stem}"


class SequenceConverter(Converter):
    """A session as a sequence of events ("22 5 5 11 9" or template ids): the events,
    their n-grams in order (an unseen transition is what DeepLog-style detectors catch),
    the first and last event, and the length. Use ``weighting: log_tf`` to let vector
    detectors see the counts (a missing replication step is a count anomaly)."""

    kind = "sequence"
    options = {"n": [1, 3], "separator": None, "max_events": 2048}

    def features(self, value: str) -> Iterator[str]:
        events = value.split(self.config["separator"])[: self.config["max_events"]]
        low, high = self.config["n"]
        for n in range(int(low), int(high) + 1):
            for i in range(len(events) - n + 1):
                yield f"{n}-gram {' '.join(events[i: i + n])}"
        if events:
            yield f"first {events[0]}"
            yield f"last {events[-1]}"
        yield f"length {length_bucket(len(events))}"


class CategoricalConverter(Converter):
    """The value itself; ``transform: status_class`` keeps only the first digit (``4xx``)."""

    kind = "categorical"
    options = {"transform": "none"}

    def features(self, value: str) -> Iterator[str]:
        if self.config["transform"] == "status_class" and value[:1].isdigit():
            yield f"{value[0]}xx"
        else:
            yield value[:128]


class NumericConverter(Converter):
    """A log-scaled dense column, plus its magnitude (log2 bucket) as a feature."""

    kind = "numeric"

    def features(self, value: str) -> Iterator[str]:
        yield value  # the bucket label made by transform

    def transform(self, ids, distinct, values: Values, sink: FeatureSink) -> None:
        # NOTE: numbers rarely repeat but their buckets do: featurize (and cache) by bucket.
        if self._native is not None:
            label_ids, labels, column = self._native.numeric_labels(list(values), MISSING)
            sink.add_values(np.frombuffer(label_ids, dtype=np.int64), self._featurize_distinct(labels))
            sink.add_numeric(np.frombuffer(column, dtype=np.float64))
            return
        numbers = [parse_number(v) if v is not None else None for v in values]
        labels = [MISSING if v is None else "not a number" if x is None else f"magnitude {int(x).bit_length()}"
                  for v, x in zip(values, numbers)]
        index: dict[str, int] = {}
        label_ids = np.fromiter((index.setdefault(label, len(index)) for label in labels), dtype=np.int64,
                                count=len(labels))
        sink.add_values(label_ids, self._featurize_distinct(list(index)))
        sink.add_numeric(np.array([math.log1p(x) if x is not None else 0.0 for x in numbers]))


def parse_number(value: str) -> Optional[float]:
    try:
        number = float(value)
    except ValueError:
        return None
    return max(number, 0.0) if math.isfinite(number) else None


MAX_NGRAM_BYTES = 65_536  # of a value, n-grammed (the default is 1,024)


class NgramConverter(Converter):
    """Character n-grams, hashed over the whole batch at once with numpy.

    The value is framed by start/end bytes so prefixes and suffixes are
    features too. ``decode`` percent-decodes first (for URLs); ``shape`` takes
    n-grams of the character-class shape instead (``/blog/x?id=1'--`` →
    ``/a/a?a=9'-``), which generalizes across paths: a new page has familiar
    shapes, an injected payload does not.
    """

    kind = "ngrams"
    options = {"n": [3, 3], "decode": False, "shape": False, "lowercase": False, "max_bytes": 1024}
    _PRIME = np.uint64(0x100000001B3)
    _SENTINEL = np.uint64(1 << 63)

    def __init__(self, field: str, **options):
        super().__init__(field, **options)
        low, high = self.config["n"]
        if not 1 <= low <= high <= 8:
            raise ConfigError(f"ngrams on {field!r}: n must be [min, max] with 1 <= min <= max <= 8")
        max_bytes = self.config["max_bytes"]
        # NOTE: checked here, as a model loads: the compiled encoder sorts a value's n-grams in time
        # growing with the square of its length (0.16 s for one 64 KiB value)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 1 <= max_bytes <= MAX_NGRAM_BYTES:
            raise ConfigError(f"ngrams on {field!r}: max_bytes {max_bytes!r} must be a whole number from 1 to "
                              f"{MAX_NGRAM_BYTES}")
        self.sizes = range(int(low), int(high) + 1)

    def _new_caches(self) -> None:
        super()._new_caches()
        self._by_encoding = self._new_cache() if self.config["shape"] else None  # see featurize
        self._last_windows: Optional[tuple] = None  # (value, its encoding, its n-gram keys) for _ngram

    def _encode(self, value: Optional[str]) -> bytes:
        if value is None:
            return b"\x02\x00\x03"
        if self.config["decode"]:
            value = percent_decode(value, 3)[0]
        if self.config["lowercase"]:
            value = value.lower()
        if self.config["shape"]:
            value = _REPEATED.sub("", value.translate(_ASCII_SHAPE))
        return b"\x02" + value.encode("utf-8", "surrogatepass")[: self.config["max_bytes"]] + b"\x03"

    def _windows(self, encoded: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Keys of every window, [N, positions]; windows past a value's end hold the sentinel."""
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        width = int(lengths.max(initial=1))
        matrix = np.zeros((len(encoded), width), dtype=np.uint64)
        matrix[np.arange(width) < lengths[:, None]] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        blocks = []
        for n in self.sizes:
            positions = width - n + 1
            if positions <= 0:
                continue
            hashed = np.full((len(encoded), positions), np.uint64(self.seed * 8 + n), dtype=np.uint64)
            for offset in range(n):
                hashed = hashed * self._PRIME + matrix[:, offset: offset + positions]
            hashed ^= hashed >> np.uint64(29)
            hashed *= np.uint64(0xBF58476D1CE4E5B9)
            keys = hashed >> np.uint64(32)
            keys[np.arange(positions) + n > lengths[:, None]] = self._SENTINEL
            blocks.append(keys)
        if not blocks:
            return np.full((len(encoded), 0), self._SENTINEL, dtype=np.uint64), lengths
        return np.concatenate(blocks, axis=1), lengths

    def featurize(self, values: Sequence[Optional[str]]) -> list[ValueFeatures]:
        # Values with the same encoding (the same shape) share their n-grams.
        if self._native is not None:
            encoded = self._native.ngram_encode(list(values), bool(self.config["decode"]),
                                                bool(self.config["lowercase"]), bool(self.config["shape"]),
                                                int(self.config["max_bytes"]))
        else:
            encoded = [self._encode(v) for v in values]
        if not self.config["shape"]:
            # NOTE: distinct values almost never share an encoding without shapes (only spellings
            # of one decoded text): a cache by encoding would cost a lookup per new value, not save.
            return self._featurize_encoded(values, encoded)
        return self._by_encoding.lookup(list(values), encoded, self._featurize_encoded)

    def _featurize_encoded(self, values: Sequence[Optional[str]], encoded: list[bytes]) -> list[ValueFeatures]:
        if self._native is not None:
            return self._native.ngram_features(list(values), list(encoded), self.seed, self.sizes.start,
                                               self.sizes.stop - 1, self.weight, self._weigher, self._ref)
        windows, _ = self._windows(encoded)
        windows.sort(axis=1)
        is_new = np.ones(windows.shape, dtype=bool)
        is_new[:, 1:] = windows[:, 1:] != windows[:, :-1]
        keep = is_new & (windows != self._SENTINEL)
        rows, cols = np.nonzero(keep)
        counts = self._run_lengths(rows, cols, (windows != self._SENTINEL).sum(axis=1))
        keys = windows[rows, cols].astype(np.int64)
        weights = self._weigh(counts)
        bounds = np.searchsorted(rows, np.arange(len(values) + 1))
        return value_features(self, values, keys, weights, bounds)

    @staticmethod
    def _run_lengths(rows: np.ndarray, cols: np.ndarray, valid_per_row: np.ndarray) -> np.ndarray:
        """How often each kept key occurs in its row: distance to the next distinct key."""
        ends = np.empty_like(cols)
        ends[:-1] = cols[1:]
        last_of_row = np.ones(len(rows), dtype=bool)
        last_of_row[:-1] = rows[1:] != rows[:-1]
        ends[last_of_row] = valid_per_row[rows[last_of_row]]
        return (ends - cols).astype(np.float32)

    def _describe(self, value: Optional[str], key: int) -> str:
        found = self._ngram(value, key)
        if found is None:
            return f"{self.field} n-gram #{key}"
        n, text = found
        return f"{self.field} {'shape ' if self.config['shape'] else ''}{n}-gram {text!r}"

    def feature_text(self, value: Optional[str], key: int) -> Optional[str]:
        found = self._ngram(value, key)
        return None if found is None else found[1]

    def _ngram(self, value: Optional[str], key: int) -> Optional[tuple[int, str]]:
        """(n, the n-gram hashed to ``key``, the value's start and end shown as ^ and $), or None.
        NOTE: the last value's n-gram keys are kept: the keys of one value are named one after the other."""
        last = self._last_windows
        if last is None or last[0] != value:
            encoded = self._encode(value)
            last = self._last_windows = (value, encoded, self._windows([encoded])[0])
        _, encoded, windows = last
        offset = 0
        for n in self.sizes:
            positions = max(len(encoded) - n + 1, 0)
            hits = np.nonzero(windows[0, offset: offset + positions] == key)[0]
            if len(hits):
                start = int(hits[0])
                text = encoded[start: start + n].decode("utf-8", "replace")
                return n, text.replace("\x02", "^").replace("\x03", "$")
            offset += positions
        return None


CONVERTERS: dict[str, type[Converter]] = {
    cls.kind: cls
    for cls in (UrlConverter, TokensConverter, AlarmsConverter, SequenceConverter, CategoricalConverter,
                NumericConverter, NgramConverter)
}


def make_converter(field: str, spec: dict) -> Converter:
    options = dict(spec)
    kind = options.pop("kind", None)
    if kind not in CONVERTERS:
        raise ConfigError(f"field {field!r}: unknown converter kind {kind!r}; "
                          f"use one of: {', '.join(sorted(CONVERTERS))}")
    return CONVERTERS[kind](field, **options)
