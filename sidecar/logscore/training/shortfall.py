"""Whether a model's calibration can be trusted to its target false-positive rate.

Read from the calibration metadata alone (no numpy, no training extra), so `logscore train` warns
of it and `logscore inspect` shows it, for models trained before this check as well.

Two ways a calibration falls short (docs/operations.md#models):

- too few records to place the target's quantile: the threshold is the ECDF level 1 - target of
  the out-of-fold scores of N calibration records, whose levels step by 1/N. Under 1/target - 1
  records (999 for 0.001) no level between the top record's and 1.0 reaches it: only records
  scoring above every calibration record are flagged, at best 1/(N + 1) of normal ones, whatever
  the target (403 access lines: 2.0 % of held-back records flagged against 0.1 %, and
  `/../../etc/passwd` scored 0.98, not flagged);
- a realized rate on the held-back folds far above the target: WORSE_RATIO times it, with at
  least WORSE_FLAGS records flagged (a model truly at its target flags 5 or more of 1,000
  held-back records by chance once in 270 trainings: Poisson, mean 1).
"""

from __future__ import annotations

import math
from typing import Optional

WORSE_RATIO = 3.0
WORSE_FLAGS = 5


def best_fpr(records: int) -> float:
    """The lowest false-positive rate a threshold calibrated on ``records`` records can give: flagging
    only what scores above all of them (a new normal record does so with chance 1/(N + 1))."""
    return 1.0 / (records + 1)


def records_needed(target_fpr: float) -> int:
    """The fewest calibration records whose best rate meets ``target_fpr`` (999 for 0.001)."""
    return max(math.ceil(1.0 / target_fpr - 1.0 - 1e-9), 1)


def calibration_shortfall(calibration: dict) -> Optional[dict]:
    """What falls short in a model's calibration (its metadata's ``calibration``), or None.
    Only the FPR rule has a quantile to place (the sigma rule's threshold is mean + k·σ)."""
    target = calibration.get("target_fpr")
    records = calibration.get("records")
    if calibration.get("rule", "fpr") != "fpr" or not target or records is None:
        return None
    held = calibration.get("held_back") or {}
    needed = records_needed(float(target))
    too_few = records < needed
    worse = (held.get("fpr") is not None and held["fpr"] >= WORSE_RATIO * target
             and held.get("flagged", 0) >= WORSE_FLAGS)
    if not (too_few or worse):
        return None
    return {"target_fpr": target, "records": records, "records_needed": needed,
            "too_few_records": too_few, "realized_fpr": held.get("fpr"), "held_back_flagged": held.get("flagged"),
            "held_back_records": held.get("records")}


def rounded_up(value: float) -> float:
    """``value`` rounded up to two significant digits (a --target-fpr to suggest)."""
    scale = 10.0 ** (math.floor(math.log10(value)) - 1)
    return round(math.ceil(value / scale - 1e-9) * scale, 12)


def describe_shortfall(shortfall: dict) -> str:
    """The warning `logscore train` gives and `logscore inspect` shows: what was measured, what to do."""
    target, records, needed = shortfall["target_fpr"], shortfall["records"], shortfall["records_needed"]
    plenty = 10 * (needed + 1)  # records that place the target's quantile well
    measured = (f"realized false-positive rate {shortfall['realized_fpr']} on held-back folds "
                f"({shortfall['held_back_flagged']} of {shortfall['held_back_records']} records) against a target "
                f"of {target}" if shortfall["realized_fpr"] is not None else f"target false-positive rate {target}")
    if shortfall["too_few_records"]:
        return (f"weak calibration: {measured}; calibrated on {records} records, fewer than the {needed:,} a target "
                f"of {target} needs: the threshold can only sit above all of them, flagging at best "
                f"{best_fpr(records):.2%} of normal records, and attacks scoring just under are missed. Train on more "
                f"lines (a longer log: {needed:,} normal records at least, better {plenty:,}), or raise "
                f"--target-fpr to {rounded_up(max(best_fpr(records), shortfall['realized_fpr'] or 0.0)):g} or more "
                "(what this log measures), before serving this model")
    # (with records enough, a rate far above the target is no sample's size: more lines would not help)
    remedy = (f"Train on more lines (a longer log, {plenty:,} normal records or more) before serving this model"
              if records < plenty else
              "The folds disagree: the log changes over its span (train on a stretch of one kind of traffic) or "
              "holds attacks or bursts of one kind (look at the held-back records flagged); or raise --target-fpr "
              f"to {rounded_up(shortfall['realized_fpr']):g}")
    return (f"weak calibration: {measured}, {shortfall['realized_fpr'] / target:.0f} times the target, calibrated on "
            f"{records:,} records. {remedy}, or expect that many false positives")
