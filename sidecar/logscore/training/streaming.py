"""Featurizing training records in bounded memory: chunk by chunk, keeping only what fitting and
calibration need.

A featurized record takes ≈ 3 KB as keys, weights and rows; fitting needs only how often each key
occurs (the rarity table: a few bytes per *distinct* key) and, when a detector reads
vectors, the dense block (4 bytes a column). Calibration needs each record's raw scores, which
are computed chunk by chunk and the features dropped. So memory grows by ≈ 0.5 KB per record
with a vector detector and a few bytes without (the records themselves aside).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ..features import FeatureBatch, Featurizer
from ..model import run_graph
from .detectors import Features, RarityTable, default_support

Progress = Callable[[str, int, Optional[int], str], None]
PENDING_KEYS = 65_536  # new keys' counts held before they are merged (while fewer are merged)


class KeyCounter:
    """How often each key occurs (as RarityTable counts a batch's keys). Keys merged before are
    counted in place (a binary search and np.bincount: a log's keys repeat, and sorting each chunk's
    keys was a fifth of training); new ones are held per chunk and merged once they outnumber the
    merged keys (or ``PENDING_KEYS``), so merging costs O(1) a key however many keys there are."""

    def __init__(self):
        self._keys: list[np.ndarray] = []  # the merged keys first (ascending), then new ones per chunk
        self._counts: list[np.ndarray] = []
        self._pending = 0
        self._merged = 0

    def add(self, keys: np.ndarray) -> None:
        if self._merged and len(keys):
            merged = self._keys[0]
            at = np.minimum(np.searchsorted(merged, keys), self._merged - 1)
            known = merged[at] == keys
            self._counts[0] += np.bincount(at[known], minlength=self._merged)
            keys = keys[~known]
        if not len(keys):
            return
        unique, counts = np.unique(keys, return_counts=True)
        self._keys.append(unique)
        self._counts.append(counts)
        self._pending += len(unique)
        if self._pending > max(PENDING_KEYS, self._merged):
            self._merge()

    def _merge(self) -> None:
        keys, counts = np.concatenate(self._keys), np.concatenate(self._counts)
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]])) if len(keys) else np.zeros(0, int)
        self._keys, self._counts = [keys[starts]], [np.add.reduceat(counts, starts) if len(keys) else counts]
        self._merged, self._pending = len(self._keys[0]), 0

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct keys ascending, how often each occurred): valid until the next ``add``."""
        if not self._keys:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if len(self._keys) > 1:  # (one array is merged already: the merged keys, or a first chunk's unique ones)
            self._merge()
        return self._keys[0], self._counts[0]


@dataclass
class Streamed:
    """What fitting needs from featurized records."""

    features: Features  # the dense block (empty when no detector reads it) and the rarity table


def featurize_for_fit(featurizer: Featurizer, records: Sequence[object], chunk: int, with_dense: bool,
                      support: Optional[float], progress: Progress, stage: str,
                      vouching: Optional[np.ndarray] = None) -> Streamed:
    """Featurize ``records`` chunk by chunk: key counts for the rarity table, and the dense block
    only when ``with_dense``. With ``vouching`` (bool per record), a rare key that none of the
    vouching records holds counts as never seen (robust.py: ``unusual_records``)."""
    counter, vouched = KeyCounter(), KeyCounter()
    dense = np.zeros((len(records), featurizer.width if with_dense else 0), dtype=np.float32)
    for start in range(0, len(records), chunk):
        batch = featurizer.transform(records[start: start + chunk], dense=with_dense)
        # Keys are unique within a record and converter; a key two converters share counts twice,
        # as RarityTable(batch.keys, ...) counts it over a whole batch.
        counter.add(batch.keys)
        if vouching is not None:
            vouched.add(batch.keys[vouching[start + batch.rows]])
        if with_dense:
            dense[start: start + batch.size] = batch.dense
        progress(stage, min(start + chunk, len(records)), len(records), "records")
    keys, counts = counter.totals()
    if vouching is not None:  # only rare keys: a key seen in ``support`` records is normal whoever holds it
        support = support if support is not None else default_support(len(records))
        held = np.isin(keys, vouched.totals()[0]) | (counts >= support)
        keys, counts = keys[held], counts[held]
    table = RarityTable.from_counts(keys, counts, len(records), support)
    empty = np.zeros(0, np.int64)
    batch = FeatureBatch(empty, empty, np.zeros(0, np.float32), dense, np.zeros(len(records), bool),
                         np.zeros(len(records), bool))
    return Streamed(Features(batch, table))


def raw_scores(session, featurizer: Featurizer, records: Sequence[object], chunk: int,
               with_dense: bool = True) -> np.ndarray:
    """Raw detector scores [N, M] of ``records`` through the graph, chunk by chunk."""
    parts = [run_graph(session, featurizer.transform(records[start: start + chunk], dense=with_dense))[1]
             for start in range(0, len(records), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


@dataclass
class KeyPairs:
    """Each record's distinct feature keys (``rows`` ascending, keys ascending within a record),
    as screening reads them (robust.py, prior.py): only keys held by fewer records than the bound
    ``record_key_pairs`` was given, and marked ones. Each key is numbered once (``key_index`` into
    ``distinct``; ``holders``: how many records hold it, among all): every screening step asks how
    many records hold a key, and sorting all the pairs for each question cost minutes on 1M records
    (about 130 pairs a record on access lines, most of them keys every record holds)."""

    rows: np.ndarray  # int64 [pairs]
    keys: np.ndarray  # int64 [pairs]
    key_index: np.ndarray  # intp [pairs]: the key's position in distinct
    distinct: np.ndarray  # int64 [keys], ascending
    holders: np.ndarray  # int64 [keys]: records holding each key
    records: int


COMPACT_PAIRS = 4_000_000  # pairs held before those of keys already too common are dropped (≈ 64 MB)


def record_key_pairs(featurizer: Featurizer, records: Sequence[object], chunk: int, bound: float,
                     marked: Callable[[], np.ndarray],
                     observe: Optional[Callable[[FeatureBatch], None]] = None) -> KeyPairs:
    """Each record's distinct keys held by fewer than ``bound`` records, or in ``marked()`` (sorted
    keys, known once ``observe`` has seen the chunk holding them), chunk by chunk. Every
    ``COMPACT_PAIRS`` new pairs lose those of keys already known common; the pairs kept so far are
    filtered again each time they double (so each pair is looked at a few times, not once per
    compaction)."""
    counter = KeyCounter()
    fresh_rows: list[np.ndarray] = []
    fresh_keys: list[np.ndarray] = []
    fresh = 0
    kept_parts: list[tuple[np.ndarray, np.ndarray]] = []
    kept, filtered_whole = 0, 0
    for start in range(0, len(records), chunk):
        batch = featurizer.transform(records[start: start + chunk], dense=False)
        if observe is not None:
            observe(batch)
        chunk_rows, chunk_keys = distinct_pairs(batch.rows, batch.keys)
        counter.add(chunk_keys)  # a record's keys are distinct: counts are holders
        fresh_rows.append(chunk_rows + start)
        fresh_keys.append(chunk_keys)
        fresh += len(chunk_keys)
        if fresh > COMPACT_PAIRS:
            common = common_keys(*counter.totals(), bound, marked())
            kept_parts.append(_without(common, np.concatenate(fresh_rows), np.concatenate(fresh_keys)))
            kept += len(kept_parts[-1][1])
            fresh_rows, fresh_keys, fresh = [], [], 0
            if kept > 2 * max(filtered_whole, COMPACT_PAIRS):
                kept_parts = [_without(common, *_joined(kept_parts))]
                kept = filtered_whole = len(kept_parts[0][1])
    all_keys, counts = counter.totals()
    if fresh_rows:
        kept_parts.append((np.concatenate(fresh_rows), np.concatenate(fresh_keys)))
    rows, keys = _without(common_keys(all_keys, counts, bound, marked()), *_joined(kept_parts))
    distinct, key_index = np.unique(keys, return_inverse=True)
    return KeyPairs(rows, keys, key_index, distinct, counts[np.searchsorted(all_keys, distinct)], len(records))


def common_keys(keys: np.ndarray, counts: np.ndarray, bound: float, marked: np.ndarray) -> np.ndarray:
    """Keys (ascending) held by ``bound`` records or more so far, less the marked ones: counts only
    grow, so they are common in the end too."""
    return np.setdiff1d(keys[counts >= bound], marked, assume_unique=True)


def distinct_pairs(rows: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, keys) without repeats, sorted by row, then key."""
    order = np.lexsort((keys, rows))
    rows, keys = rows[order].astype(np.int64), keys[order].astype(np.int64)
    first = np.ones(len(rows), dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (keys[1:] != keys[:-1])
    return rows[first], keys[first]


def _joined(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate([r for r, _ in parts]), np.concatenate([k for _, k in parts])


def _without(common: np.ndarray, rows: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs whose key is not in ``common`` (ascending)."""
    if not len(common) or not len(keys):
        return rows, keys
    keep = common[np.minimum(np.searchsorted(common, keys), len(common) - 1)] != keys
    return rows[keep], keys[keep]
