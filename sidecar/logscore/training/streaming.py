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

    def __init__(self, known: Optional[np.ndarray] = None):
        """``known``: keys (ascending) most of those to count are among, merged from the start."""
        self._keys: list[np.ndarray] = []  # the merged keys first (ascending), then new ones per chunk
        self._counts: list[np.ndarray] = []
        self._pending = 0
        self._merged = 0
        if known is not None and len(known):
            self._keys, self._counts, self._merged = [known], [np.zeros(len(known), np.int64)], len(known)

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
        keys, counts = self.merged(np.concatenate(self._keys), np.concatenate(self._counts))
        self._keys, self._counts = [keys], [counts]
        self._merged, self._pending = len(keys), 0

    @staticmethod
    def merged(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distinct ``keys`` ascending, each with the sum of its ``counts``."""
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]])) if len(keys) else np.zeros(0, int)
        return keys[starts], (np.add.reduceat(counts, starts) if len(keys) else counts)

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
    every_key: np.ndarray  # int64, ascending: every key the records hold, however common
    occurrences: np.ndarray  # int64: how often each of every_key occurs (a key two converters share
    #                          counts twice in a record): what a rarity table of all the records counts

    def holding(self, chosen: np.ndarray) -> np.ndarray:
        """bool [records]: the records holding a key of ``chosen`` (bool per key of ``distinct``)."""
        held = np.zeros(self.records, dtype=bool)
        held[self.rows[chosen[self.key_index]]] = True
        return held


COMPACT_PAIRS = 4_000_000  # pairs held before those of keys already too common are dropped (≈ 64 MB)


def record_key_pairs(featurizer: Featurizer, records: Sequence[object], chunk: int, bound: float,
                     marked: Callable[[], np.ndarray],
                     observe: Optional[Callable[[FeatureBatch], None]] = None) -> KeyPairs:
    """Each record's distinct keys held by fewer than ``bound`` records, or in ``marked()`` (sorted
    keys, known once ``observe`` has seen the chunk holding them), chunk by chunk. Every
    ``COMPACT_PAIRS`` new pairs lose those of keys already known common; the pairs kept so far are
    filtered again each time they double (so each pair is looked at a few times, not once per
    compaction)."""
    counter, repeated = KeyCounter(), KeyCounter()
    fresh_rows: list[np.ndarray] = []
    fresh_keys: list[np.ndarray] = []
    fresh = 0
    kept_parts: list[tuple[np.ndarray, np.ndarray]] = []
    kept, filtered_whole = 0, 0
    for start in range(0, len(records), chunk):
        batch = featurizer.transform(records[start: start + chunk], dense=False)
        if observe is not None:
            observe(batch)
        chunk_rows, chunk_keys, repeated_keys = distinct_pairs(batch.rows, batch.keys)
        counter.add(chunk_keys)  # a record's keys are distinct: counts are holders
        repeated.add(repeated_keys)
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
    # Numbered through the counted keys (a sort of every pair took 3 s on 1M records).
    position = np.searchsorted(all_keys, keys)
    used = np.zeros(len(all_keys), dtype=bool)
    used[position] = True
    distinct, key_index = all_keys[used], (np.cumsum(used) - 1)[position]
    occurrences = counts.copy()
    repeats, repeat_counts = repeated.totals()
    occurrences[np.searchsorted(all_keys, repeats)] += repeat_counts
    return KeyPairs(rows, keys, key_index, distinct, counts[used], len(records),
                    all_keys, occurrences)


def common_keys(keys: np.ndarray, counts: np.ndarray, bound: float, marked: np.ndarray) -> np.ndarray:
    """Keys (ascending) held by ``bound`` records or more so far, less the marked ones: counts only
    grow, so they are common in the end too."""
    return np.setdiff1d(keys[counts >= bound], marked, assume_unique=True)


KEY_BITS = 32  # feature keys are CRC-32s (features/batch.py: text_key)


def distinct_pairs(rows: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, keys) without repeats, sorted by row, then key; and the keys of the repeats. (One sort
    of row and key in one int64, not ``np.lexsort`` of two: the sort was a seventh of training.)"""
    if len(keys) and (int(keys.min()) < 0 or int(keys.max()) >> KEY_BITS):
        raise ValueError(f"feature keys must be {KEY_BITS}-bit (CRC-32s); got {int(keys.min())}..{int(keys.max())}")
    pairs = np.sort((rows.astype(np.int64) << KEY_BITS) | keys.astype(np.int64), kind="stable")
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = pairs[1:] != pairs[:-1]
    key_mask = (1 << KEY_BITS) - 1
    return pairs[first] >> KEY_BITS, pairs[first] & key_mask, pairs[~first] & key_mask


def _joined(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate([r for r, _ in parts]), np.concatenate([k for _, k in parts])


def _without(common: np.ndarray, rows: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs whose key is not in ``common`` (ascending)."""
    if not len(common) or not len(keys):
        return rows, keys
    keep = ~KeySet(common).holds(keys)
    return rows[keep], keys[keep]


class KeySet:
    """Membership of many keys in a set of a few thousand: a table indexed by a key's low bits holds
    the set's key there, and the few keys sharing their low bits with another are looked up apart
    (a binary search per pair, ``np.searchsorted``, was a tenth of training 1M records)."""

    SLOT_BITS = 18  # 2 MB; 2,500 keys leave about 10 sharing a slot

    def __init__(self, keys: np.ndarray):
        mask = (1 << self.SLOT_BITS) - 1
        self.table = np.full(1 << self.SLOT_BITS, -1, dtype=np.int64)
        self.table[keys & mask] = keys
        self.apart = keys[self.table[keys & mask] != keys]

    def holds(self, keys: np.ndarray) -> np.ndarray:
        held = self.table[keys & ((1 << self.SLOT_BITS) - 1)] == keys
        if len(self.apart):
            held |= np.isin(keys, self.apart)
        return held
