"""Training that holds when the training data holds attacks.

Every real log holds some attacks (scanners, exploit probes). Learned as normal, they
teach the model their features and sit at the top of the calibration scores, so the
threshold lands among them. Screening sets them aside before the model is fit:

    folds: records that share their rare features (the same odd request sent several
           times) go to the same fold, so copies never vouch for each other
    round: out-of-fold raw scores from models fit on the records kept so far
           ─► set aside the records that stand far above the rest (below), with the
              unusual records sharing their rare features (a cluster of similar attacks)
           ─► refit without them (``max_rounds`` times at most, until nothing changes)

"Far above": the rarity detector's raw score (units of never-seen features) exceeds its
median by more than ``factor`` times as much as the reference score does, the reference
being the score at 1 - max(target FPR, 2 %) among the records kept: attacks may make up
2 % of the data without moving it. Computed to a fixed point, as the reference moves down
while outliers leave. Models without rarity are not screened (the heavy-tailed errors of
pca or an autoencoder set aside normal records). On clean data this sets aside a handful
of records (CSIC 2010: 2 of 36,000; BGL and a blog's log: 0.11 %); the rest of the tail
stays, so the threshold keeps its meaning.

When more than ``EVIDENT`` of the records stand that far out, the data holds attacks, and
the same attacks, sent with other values, stand out less: the first round's level drops
to ``contaminated_factor``, and the records above it are set aside too, as long as the
records it adds (and later rounds add) stay within the target FPR's share of the data —
were they normal after all, the realized FPR would at most double — or within ``ALONGSIDE``
times the records far out: attacks far out come with about as many of their kind that stand
out less (CSIC 2010 with 0.35-1.4 % of its records attacks: 0.8-1.5 times as many), where a
long normal tail adds more than twice as many (the blog below: 51 to 23). The target FPR then
applies to the records believed normal (CSIC 2010 with 0.7 % of its attacks mixed in: 138
records far out in the first round; at the lower level 276 set aside, 197 of them attacks,
and recall at the threshold rises from 0.703 to 0.896 at a realized FPR of 0.50 %). Clean
data keeps the first level: lowered there, the set-aside normal records took rare normal
patterns along (BGL's realized FPR rose from 22 % to 27 %). So does a real log whose tail is
long: the blog of models/apache-access.onnx has 23 of 8,000 lines far out (0.29 %), but
the lower level would add 51 more, over the 16 its 0.2 % target allows (lowered, 1.75 % of
its held-back lines were flagged instead of 0.2 %). What was set aside, and at which
level, is listed in the model's metadata.

Where the level dropped, some attacks still stay among the kept records: a probe for a page
that does not exist scores like the normal tail (CSIC 2010: three never-seen features, the
score of the most unusual half percent of normal requests). Learned, its path or method counts
as seen and hides its copies. So the records at or above the top ``UNUSUAL_SHARES`` x target
FPR share of the kept scores vouch for nothing: a rare feature (seen in fewer than ``support``
records) that only they hold stays never seen, in the fold models (scored once more) and the
final model alike, while they stay in the calibration. CSIC 2010 + 0.7 % attacks: recall at
the threshold 0.896 → 0.945, the realized FPR 0.50 → 0.49 % (all three draws of the mixed-in
attacks meet recall ≥ 0.9 at FPR ≤ 0.5 %). Past a few shares of the target FPR the
unusual records take in the whole normal tail (at 4x, CSIC's ties at the 98th percentile), its
features stay unseen, the calibration's tail rises above the probes, and recall falls (0.77).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .streaming import KeyPairs

EXAMPLES = 10  # set-aside records named in the metadata, most anomalous first
MAX_CONTAMINATION = 0.02  # the share of attacks the reference score is computed past
EVIDENT = 0.0015  # records far out beyond this share: the data holds attacks (clean data: 0.11 % at most;
#                   CSIC 2010 with 0.35 % of its records attacks: 0.17 %)
ALONGSIDE = 1.5  # the lower level may add this many records per record far out (the target's share at least)
UNUSUAL_SHARES = 2.0  # unusual records: the top share of kept scores this many times the target FPR
#                        (CSIC 2010: 3x holds too; 1x misses FPR 0.5 % on one draw, 4x takes in the tail)
EXAMPLE_CHARS = 300
# Screening reads only keys held by fewer records than screening_bound (and the rarity support and
# the injection prior's): the common ones, most of some 130 keys a record, say nothing of clusters
# or rare signatures, and holding all of them took 5 GB on 1M records.
CLUSTER_MARGIN = 2.5


def screening_bound(records: int, target_fpr: float) -> float:
    """Records holding a key past which the key plays no part in screening. ``outliers`` flags only
    records above the reference quantile, at most ``max(target_fpr, MAX_CONTAMINATION)`` of them,
    and ``cluster_mates`` takes a key for a cluster's when more than half its holders are flagged:
    a key held by twice that share never is (``CLUSTER_MARGIN``: 2.5 times, a margin)."""
    return CLUSTER_MARGIN * max(target_fpr, MAX_CONTAMINATION) * records


def signature_folds(sample: Sequence[object], pairs: KeyPairs, folds: int, support: float) -> np.ndarray:
    """Fold of each record: records with the same non-empty set of rare keys (seen in fewer
    than ``support`` records) share a fold; every other record is dealt round-robin."""
    rare = pairs.holders[pairs.key_index] < support
    rows, rare_keys = pairs.rows[rare], pairs.keys[rare]
    signature = np.zeros(len(sample), dtype=np.uint32)
    starts = np.searchsorted(rows, np.arange(len(sample) + 1))
    for record in np.flatnonzero(np.diff(starts)):
        signature[record] = zlib.crc32(rare_keys[starts[record]: starts[record + 1]].tobytes()) or 1
    assigned = np.arange(len(sample)) % folds
    _, group, sizes = np.unique(signature, return_inverse=True, return_counts=True)
    shared = (signature != 0) & (sizes[group] > 1)
    assigned[shared] = signature[shared] % folds
    return assigned


def cluster_mates(set_aside: np.ndarray, raw: np.ndarray, pairs: KeyPairs, target_fpr: float) -> np.ndarray:
    """Unusual records (above the reference score on a screened detector) holding a key that is held
    by two records or more, most of them set aside: the rest of a cluster of similar attacks.
    (``pairs`` holds no key past ``screening_bound``: none of those is a cluster's.)"""
    holders = pairs.holders
    aside = np.bincount(pairs.key_index, weights=set_aside[pairs.rows], minlength=len(holders))
    tainted = (holders >= 2) & (aside * 2 > holders)
    mates = pairs.holding(tainted)
    reference = 1.0 - max(target_fpr, MAX_CONTAMINATION)
    return mates & (raw >= np.quantile(raw, reference, axis=0)).any(axis=1)


def outliers(raw: np.ndarray, target_fpr: float, factor: float) -> np.ndarray:
    """Records standing far above the rest on any of ``raw``'s columns (see the module docstring)."""
    flagged = np.zeros(len(raw), dtype=bool)
    reference = 1.0 - max(target_fpr, MAX_CONTAMINATION)
    for column in raw.T.astype(np.float64):
        keep = np.ones(len(column), dtype=bool)
        for _ in range(50):  # a fixed point in a few steps; bounded all the same
            median = float(np.median(column[keep]))
            level = float(np.quantile(column[keep], reference))
            if level <= median:
                break
            new_keep = column - median < factor * (level - median)
            if (new_keep == keep).all():
                break
            keep = new_keep
        flagged |= ~keep
    return flagged


@dataclass
class Screening:
    raw: np.ndarray  # float32 [N, detectors]: out-of-fold raw scores of every record, from models
    #                  fit without the records set aside
    set_aside: np.ndarray  # bool [N]
    rounds: int
    factor: float  # the level used: the first, or the contaminated one
    vouching: Optional[np.ndarray] = None  # bool [N] when the data holds attacks: the records whose
    #                                        features are learned as seen (``unusual_records``)

    def describe(self, sample: Sequence[object]) -> dict:
        """For the metadata: how many, by which rule, and the most anomalous examples."""
        chosen = np.flatnonzero(self.set_aside)
        chosen = chosen[np.argsort(-self.raw[chosen].max(axis=1), kind="stable")][:EXAMPLES]
        described = {
            "records": int(self.set_aside.sum()),
            "fraction": round(float(self.set_aside.mean()), 6),
            "rounds": self.rounds,
            "factor": self.factor,
            "rule": (f"out-of-fold raw score above its median by more than {self.factor}x the score at the "
                     f"{1 - MAX_CONTAMINATION:.0%} level"),
            "examples": [{"record": example_text(sample[i]), "raw_scores": [round(float(v), 4) for v in self.raw[i]]}
                         for i in chosen],
        }
        if self.vouching is not None:
            described["unusual_not_vouching"] = int((~self.vouching & ~self.set_aside).sum())
        return described


def example_text(record: object) -> str:
    text = record if isinstance(record, str) else json.dumps(record, sort_keys=True, default=str)
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "…"


def unusual_records(raw: np.ndarray, set_aside: np.ndarray, target_fpr: float) -> np.ndarray:
    """Records scoring at or above the top ``UNUSUAL_SHARES`` x target FPR share of the kept
    records' out-of-fold scores (on any of ``raw``'s columns): those the model would nearly flag."""
    level = np.quantile(raw[~set_aside], 1.0 - UNUSUAL_SHARES * target_fpr, axis=0)
    return (raw >= level).any(axis=1)


def screen(score_out_of_fold, records: int, target_fpr: float, factor: float, max_rounds: int,
           expand=None, columns: Sequence[int] = (0,), contaminated_factor: Optional[float] = None,
           eligible: Optional[np.ndarray] = None) -> Screening:
    """``score_out_of_fold(fit_mask, vouching=None)`` → out-of-fold raw scores of all records from
    models fit on the masked ones (``vouching``: as training.train.fit takes it); ``expand(set_aside,
    raw)`` → records to set aside with them (their cluster); ``columns``: the detectors screened on;
    ``contaminated_factor``: the level when the first round finds more than ``EVIDENT`` of the
    records far out; ``eligible``: the records that may be set aside (all when None; prior.AlarmVocabulary).
    Rounds until the set-aside records stop changing."""
    set_aside = np.zeros(records, dtype=bool)
    raw = score_out_of_fold(~set_aside)

    def found_at(level: float) -> np.ndarray:
        screened = raw[:, list(columns)]
        found = outliers(screened, target_fpr, level)
        if expand is not None and found.any():
            found |= expand(found, screened)
        return found if eligible is None else found & eligible

    def finished(rounds: int) -> Screening:
        if factor != contaminated_factor:
            return Screening(raw, set_aside, rounds, factor)
        # The data holds attacks, and some stay among the kept records, looking like the normal
        # tail (a probe for a page that does not exist). Learned, their features would hide their
        # copies: a feature that only unusual records hold is not vouched for, and stays never seen.
        vouching = ~unusual_records(raw[:, list(columns)], set_aside, target_fpr)
        return Screening(score_out_of_fold(~set_aside, vouching), set_aside, rounds, factor, vouching)

    limit = records
    for rounds in range(1, max_rounds + 1):
        found = found_at(factor)
        if rounds == 1 and contaminated_factor is not None and found.mean() > EVIDENT:
            lowered = found_at(contaminated_factor)
            # Were the records the lower level adds normal after all, the realized FPR would
            # grow by their share: the level drops only while that share is within the target,
            # or within ``ALONGSIDE`` x the records far out: attacks that stand far out come with
            # about as many of their kind that stand out less (CSIC 2010: 0.8-1.5x at every share
            # mixed in), a long normal tail with more than twice as many (a blog's log: 51 to 23).
            budget = found.sum() + max(target_fpr * records, ALONGSIDE * found.sum())
            if lowered.sum() <= budget:
                factor, found, limit = contaminated_factor, lowered, budget
        if (found == set_aside).all() or found.sum() > limit:
            return finished(rounds - 1)
        set_aside = found
        raw = score_out_of_fold(~set_aside)
    return finished(max_rounds)
