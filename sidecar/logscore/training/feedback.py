"""Folding operators' feedback into training (`logscore train --feedback STORE`, and the sidecar's
learner, which runs the same command).

- Records marked **normal** (the examples each entry keeps) join the final fit, each repeated as
  often as a feature must be seen to count as fully normal (the rarity support): the model learns
  them as ordinary traffic. They are left out of calibration, so the threshold keeps its meaning.
- Records marked **keep** (true anomalies) are left out of training wherever they appear in the
  input, and the new model must flag them: the summary and the metadata say how many it does.
- Field-value entries stay rules: they name no records to learn from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..feedback import KEEP, NORMAL, base_name, record_text


@dataclass
class TrainingFeedback:
    store: str
    normal: list = field(default_factory=list)  # records learned as normal
    keep: list = field(default_factory=list)  # records that must stay flagged
    entries: int = 0

    def keep_texts(self) -> set[str]:
        return {record_text(r) for r in self.keep}

    def copies(self, support: float) -> list:
        """The normal records, each repeated enough times to count as seen."""
        repeat = max(1, math.ceil(support))
        return [record for record in self.normal for _ in range(repeat)]


def load_feedback(location: str, model_name: str) -> TrainingFeedback:
    """The active entries of the store that apply to ``model_name`` (or to every model)."""
    from ..feedback_store import open_store

    store = open_store(location)
    store.migrate()
    entries = [e for e in store.entries() if not e.model or base_name(e.model) == base_name(model_name)]
    found = TrainingFeedback(store.description, entries=len(entries))
    for entry in entries:
        examples = entry.examples()
        if entry.verdict == NORMAL:
            found.normal += examples
        elif entry.verdict == KEEP:
            found.keep += examples
    store.close()
    return found
