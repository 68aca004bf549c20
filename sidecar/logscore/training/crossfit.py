"""Rarity models of any subset of the sample from one count of its keys.

Training fits a model on each of five folds, again in each screening round, then the final
model: each fit featurized four fifths of the sample or more to count its keys (two thirds of
training 1M lines). A record's features depend only on the record and on what the featurizer
learned (``FitPlan``), and a rarity model is its key counts. So the counts over the records of a
mask are the counts over every record (``KeyPairs.occurrences``, from grouping) less those over
the records it leaves out, a fifth of the sample for a fold. Where the mask's featurizer learns
otherwise than the whole sample's (a URL parameter that is an enumeration in four fifths of the
records and not in all of them), the records whose features change are counted with both. The
tables are the same as fitting on the masked records, key for key (tests/test_detectors.py).
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import numpy as np

from ..features import Featurizer
from ..features.batch import FeatureBatch
from ..features.featurizer import FitPlan
from .detectors import Features, RarityTable, default_support
from .streaming import KeyCounter, Progress

Counts = tuple[np.ndarray, np.ndarray]  # (keys ascending, how often each occurs)

# What each count of keys is of, in the progress lines: a fit counts only the records it differs
# by from the whole sample, and "fold 2/5: counting keys: 2/2 records" read as a fold of 2 records.
HELD_OUT = "counting the keys of its held-out records, to take off the sample's counts"
LEFT_OUT = "counting the keys of records it is not fit on (set aside, or read otherwise), to take off"
READ_OTHERWISE = "counting again the records its featurizer reads otherwise"
DOUBTED = "counting the rare keys of unusual records, not to learn them"


class CrossFit:
    def __init__(self, sample: Sequence[object], spec: dict, plan: FitPlan, reference: Featurizer,
                 every_key: np.ndarray, occurrences: np.ndarray, chunk: int, support: Optional[float]):
        """``reference``: the featurizer fit on every record (``plan.learned()``); ``every_key`` and
        ``occurrences``: its key counts over every record; ``support``: as TrainOptions gives it."""
        self.sample, self.spec, self.plan, self.reference = sample, spec, plan, reference
        self.reference_learned = reference.learned()
        self.totals = (every_key, occurrences)
        self.chunk, self.support = chunk, support
        self._blocks: dict[bytes, np.ndarray] = {}  # block_counts

    def features(self, mask: np.ndarray, progress: Progress, stage: str, vouching: Optional[np.ndarray] = None,
                 held_out: Optional[np.ndarray] = None) -> tuple[Featurizer, Features]:
        """The featurizer and rarity table ``fit`` would learn from the records of ``mask``;
        ``vouching`` (bool per record of the sample): as ``featurize_for_fit`` takes it;
        ``held_out``: records outside ``mask`` that other calls leave out too (a fold: its counts
        are kept for the next screening round, at 4 bytes a key)."""
        learned = self.plan.learned(mask)
        featurizer = self.reference
        if learned != self.reference_learned:
            featurizer = Featurizer(self.spec)
            featurizer.apply(learned)
        touched = self.plan.touched(self.reference_learned, learned)
        changed = np.zeros(len(self.sample), dtype=bool)
        changed[touched] = mask[touched]  # the records fit on whose features are not the reference's
        left_out = ~mask | changed
        terms = []
        if held_out is not None:
            terms.append((self.block_counts(held_out, progress, stage), -1))
            left_out &= ~held_out
        terms += [(self.count(self.reference, np.flatnonzero(left_out), progress, f"{stage}: {LEFT_OUT}"), -1),
                  (self.count(featurizer, np.flatnonzero(changed), progress, f"{stage}: {READ_OTHERWISE}"), 1)]
        counts = combined(self.totals, terms)
        records = int(mask.sum())
        support = self.support if self.support is not None else default_support(records)
        if vouching is not None:
            counts = self.vouched_for(counts, mask & ~vouching, changed, featurizer, support, progress, stage)
        table = RarityTable.from_counts(*counts, records, support)
        empty = np.zeros(0, np.int64)
        batch = FeatureBatch(empty, empty, np.zeros(0, np.float32), np.zeros((records, 0), np.float32),
                             np.zeros(records, bool), np.zeros(records, bool))
        return featurizer, Features(batch, table)

    def vouched_for(self, counts: Counts, doubted: np.ndarray, changed: np.ndarray, featurizer: Featurizer,
                    support: float, progress: Progress, stage: str) -> Counts:
        """``counts`` less the rare keys that only ``doubted`` records hold (robust.py:
        ``unusual_records``): a key seen in ``support`` records is normal whoever holds it."""
        stage = f"{stage}: {DOUBTED}"
        vouched = combined(counts, [
            (self.count(self.reference, np.flatnonzero(doubted & ~changed), progress, stage), -1),
            (self.count(featurizer, np.flatnonzero(doubted & changed), progress, stage), -1)])
        keys, occurrences = counts
        held = np.isin(keys, vouched[0]) | (occurrences >= support)
        return keys[held], occurrences[held]

    def block_counts(self, block: np.ndarray, progress: Progress, stage: str) -> Counts:
        """``count`` of the reference featurizer over the records of ``block``, counted once."""
        name = hashlib.blake2b(np.packbits(block).tobytes(), digest_size=16).digest()
        if name not in self._blocks:
            self._blocks[name] = self.count(self.reference, np.flatnonzero(block), progress,
                                            f"{stage}: {HELD_OUT}")[1].astype(np.int32)
        return self.totals[0], self._blocks[name]

    def count(self, featurizer: Featurizer, positions: np.ndarray, progress: Progress, stage: str) -> Counts:
        """Key counts of the sample's records at ``positions``, chunk by chunk (the reference's: of
        every key it counted over all records, zero or not); ``stage`` says which records they are."""
        counter = KeyCounter(self.totals[0] if featurizer is self.reference else None)
        for start in range(0, len(positions), self.chunk):
            chunk = positions[start: start + self.chunk]
            counter.add(featurizer.transform([self.sample[i] for i in chunk], dense=False).keys)
            progress(stage, min(start + self.chunk, len(positions)), len(positions), "records")
        return counter.totals()


def combined(base: Counts, terms: list[tuple[Counts, int]]) -> Counts:
    """``base`` plus each term's counts times its sign (keys unique in each); keys whose count ends
    at zero are dropped."""
    keys, counts = base[0], base[1].copy()
    extra_keys, extra_counts = [], []
    for (term_keys, term_counts), sign in terms:
        at = np.minimum(np.searchsorted(keys, term_keys), max(len(keys) - 1, 0))
        known = keys[at] == term_keys if len(keys) else np.zeros(len(term_keys), dtype=bool)
        counts[at[known]] += sign * term_counts[known]
        extra_keys.append(term_keys[~known])
        extra_counts.append(sign * term_counts[~known])
    if sum(len(k) for k in extra_keys):
        keys, counts = KeyCounter.merged(np.concatenate([keys, *extra_keys]), np.concatenate([counts, *extra_counts]))
    kept = counts > 0
    return keys[kept], counts[kept]
