"""Decide: turn a model's scores into the decision users route on, and say why.

    Model.score ─► decide ─► (is_anomaly, notes) ─► every surface

The one step after scoring, on every path (the sidecar's ScoringService, `logscore score`,
`logscore evaluate`); surfaces never decide. It applies, in order:

- the threshold (already compared by ``Model.score``, which may take a per-call threshold);
- records that did not parse: flagged when the model's training data parsed (a line its
  parser cannot read is then itself anomalous; no feedback unflags it), noted either way;
- truncation (the cut is in ``records.RecordNormalizer`` and the featurizer: one rule everywhere):
  flagged when the model's training held no record that long (what lies past the cut is never
  scored: an attack placed there passed), noted either way;
- learning: while a route's own model is being learned (sidecar/logscore/learning.py), its
  records keep their score but are not flagged, and say so;
- feedback (sidecar/logscore/feedback.py): a flagged record whose unusual features an operator
  marked normal is scored again without them; under the threshold it is not flagged, keeps the
  lowered score and says `suppressed by feedback #id`. The review page sees flagged records here.

Later rules plug in here. Behaviour over time observes what was decided, right after this step:
windows and clients (sidecar/logscore/behaviour.py, called by the ScoringService) add
``entity_score`` and raise their own events; they never change a record's flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from .model import Model, Scored

if TYPE_CHECKING:
    from .feedback import FeedbackStep

# Note descriptions start with one of these; clients turn them into flags (`unparsed: true`).
UNPARSED_NOTE = "did not parse as "  # + "FORMAT; what was done with it" (`logscore score` and client read it back)
NOTE_KINDS = {UNPARSED_NOTE.strip(): "unparsed", "truncated": "truncated", "learning": "learning",
              "suppressed by feedback": "suppressed", "kept by feedback": "kept",
              "session restarted": "session_restarted", "no text": "no_text"}
TRUNCATED = ("truncated: a raw line was cut to {line} characters or a field to {field} characters "
             "before scoring")
# why a cut record is flagged and what to do (a log whose normal records run that long: retrain on it)
TRUNCATED_FLAGGED = ("; flagged: the rest was not scored and the model's training held no record that long "
                     "(a log whose records are that long: train on it, `logscore train` counts them)")
TRUNCATED_WHILE_LEARNING = "; not flagged while its route learns (flagged after: the rest was not scored)"
# Why a record is flagged whatever the feedback (decide's ``held``, kept by the review page): each
# has its own remedy, so a refused normal mark names the right one.
HELD_UNPARSED = "unparsed"  # the line did not parse: another log, to route to a model of its own
HELD_CUT = "cut"  # cut before scoring: a log whose records run that long, to train on or read further


@dataclass
class Decision:
    is_anomaly: np.ndarray  # bool [N]
    notes: list[tuple[int, str, str]]  # (record index in the batch, field, description)
    scores: Optional[np.ndarray] = None  # float32 [N] when feedback lowered some, else the model's


def flags_unparsed(model: Model) -> bool:
    """Whether a record that does not parse is flagged: when the training data parsed, i.e.
    unparsed records were rarer in training than the false-positive rate the model allows."""
    meta = model.metadata
    training, calibration = meta.get("training", {}), meta.get("calibration", {})
    used = training.get("records_used") or 0
    if not used or model.featurizer.sessions is not None:
        return False  # session models read every record's text; nothing is unparsed
    return training.get("unparsed_records", 0) / used <= float(calibration.get("target_fpr") or 0.001)


def flags_truncated(model: Model) -> bool:
    """Whether a record cut before scoring is flagged: when its training held cut records more
    rarely than the false-positive rate the model allows (as ``flags_unparsed``). A model trained
    before the count was kept: flagged for access logs only (Apache refuses a request line or
    header over 8,190 bytes by default, so no served request is that long), else not."""
    meta = model.metadata
    training, calibration = meta.get("training", {}), meta.get("calibration", {})
    used = training.get("records_used") or 0
    if not used or model.featurizer.sessions is not None:
        return False  # session models: each record is its session so far, cut by design
    cut = training.get("truncated_records")
    if cut is None:
        return model.featurizer.log_format == "access"
    return cut / used <= float(calibration.get("target_fpr") or 0.001)


def decide(model: Model, scored: Scored, learning: Optional[Sequence[Optional[str]]] = None,
           feedback: Optional["FeedbackStep"] = None) -> Decision:
    """The decision for one batch scored by ``model``; ``learning`` holds, per record, why its
    flag is held (the route is still learning its model) or None; ``feedback`` applies the
    operators' feedback to the batch's records."""
    flags = scored.is_anomaly.copy()
    notes: list[tuple[int, str, str]] = []
    # Lines flagged for not parsing stay flagged: their unusual features are the fields they lack, and a
    # mark of those (the review page's group of such lines) suppressed every line the model cannot read.
    held = None  # per record why it is flagged whatever the feedback: HELD_UNPARSED, HELD_CUT or ""
    # NOTE: count_nonzero, not any(): ~1 µs less a call on a few records (any() is a ufunc reduction)
    if np.count_nonzero(scored.unparsed):
        log_format = model.featurizer.log_format
        if flags_unparsed(model):
            flags |= scored.unparsed
            held = np.where(scored.unparsed, HELD_UNPARSED, "")
            text = f"{UNPARSED_NOTE}{log_format}; flagged: the model's training data parsed"
            # NOTE: a route still learning holds this flag too (below): "flagged" beside is_anomaly false
            # (an empty syslog line behind Fluent Bit, syslog field trial) said the opposite of the decision
            while_learning = (f"{UNPARSED_NOTE}{log_format}; not flagged while its route learns (flagged after: "
                              "the model's training data parsed)")
        else:
            text = while_learning = f"{UNPARSED_NOTE}{log_format}; scored with its fields missing"
        notes += [(int(i), "record", while_learning if learning is not None and learning[i] else text)
                  for i in np.flatnonzero(scored.unparsed)]
    if np.count_nonzero(scored.truncated):
        text = while_learning = TRUNCATED.format(line=model.featurizer.normalizer.max_line_chars,
                                                 field=model.featurizer.max_field_chars)
        if flags_truncated(model):
            # held like unparsed records: a mark of the part that was scored says nothing of the rest
            flags |= scored.truncated
            # (cut wins: a line cut short may fail to parse for the cut, and its remedy is the cut's)
            held = np.where(scored.truncated, HELD_CUT, "" if held is None else held)
            text, while_learning = text + TRUNCATED_FLAGGED, text + TRUNCATED_WHILE_LEARNING
        notes += [(int(i), "record", while_learning if learning is not None and learning[i] else text)
                  for i in np.flatnonzero(scored.truncated)]
    if scored.session_notes is not None:  # session models: a cut session, one restarted, a record without text
        notes += [(i, "record", text) for i, texts in enumerate(scored.session_notes) for text in texts]
    if learning is not None:
        for i, why in enumerate(learning):
            if why is not None:
                flags[i] = False
                notes.append((i, "record", f"learning: {why}"))
    scores = None
    if feedback is not None:
        candidates = np.flatnonzero(flags & scored.is_anomaly)  # flagged by their score
        scores = feedback.apply(model, candidates, scored.scores, flags, notes, held)
        notes.sort(key=lambda note: note[0])
    return Decision(flags, notes, scores)


def note_flags(descriptions: Sequence[str]) -> dict[str, bool]:
    """``{"unparsed": True, ...}`` for the kinds of notes a record has (for JSON output)."""
    return {flag: True for prefix, flag in NOTE_KINDS.items() if any(d.startswith(prefix) for d in descriptions)}


def notes_by_record(notes: Sequence[tuple[int, str]], count: int) -> list[list[str]]:
    """(record index, description) pairs → each record's descriptions, in order."""
    grouped: list[list[str]] = [[] for _ in range(count)]
    for index, description in notes:
        grouped[index].append(description)
    return grouped
