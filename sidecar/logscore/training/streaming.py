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
PENDING_KEYS = 4_000_000  # per-chunk key counts held before they are merged (≈ 48 MB)


class KeyCounter:
    """How often each key occurs (as RarityTable counts a batch's keys), merged now and then
    (merging every chunk would cost O(distinct keys) each time)."""

    def __init__(self):
        self._keys: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._pending = 0

    def add(self, keys: np.ndarray) -> None:
        unique, counts = np.unique(keys, return_counts=True)
        self._keys.append(unique)
        self._counts.append(counts)
        self._pending += len(unique)
        if self._pending > PENDING_KEYS:
            self._merge()

    def _merge(self) -> None:
        keys, counts = np.concatenate(self._keys), np.concatenate(self._counts)
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]])) if len(keys) else np.zeros(0, int)
        self._keys, self._counts = [keys[starts]], [np.add.reduceat(counts, starts) if len(keys) else counts]
        self._pending = len(self._keys[0])

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct keys ascending, how often each occurred)."""
        if not self._keys:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
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


def record_key_pairs(featurizer: Featurizer, records: Sequence[object], chunk: int,
                     observe: Optional[Callable[[FeatureBatch], None]] = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, keys): each record's distinct feature keys, sorted by record, chunk by chunk
    (about 30 pairs, 0.2 KB, a record: no weights, no dense block); ``observe`` sees each chunk's batch."""
    rows, keys = [], []
    for start in range(0, len(records), chunk):
        batch = featurizer.transform(records[start: start + chunk], dense=False)
        if observe is not None:
            observe(batch)
        pairs = np.unique(np.stack([batch.rows.astype(np.int64) + start, batch.keys.astype(np.int64)]), axis=1)
        rows.append(pairs[0])
        keys.append(pairs[1])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(keys)

