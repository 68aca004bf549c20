"""The injection prior: a request holding what injections need, where the site's requests rarely
do, is not learned as normal.

An operator's first training log holds its attacks. Screening (robust.py) sets aside attacks
that are rare and far out, but a family of payloads spread over a few percent of the lines
shares its characters and shapes: each of its features is seen in more than ``support``
records, so a plain fit learns them, and their copies sit at the top of the calibration scores,
where the threshold lands among them. So a feature of a request (what the ``url`` converters and
the URL-decoding ``ngrams`` emit) whose text holds an injection mark (``INJECTION_MARKS``: a
quote, an angle bracket, ``..``, a comment marker, a NUL, a shell metacharacter) counts as the
site's own only when ``share`` of the records hold it; a record holding one seen in fewer is set
aside like screening's: neither learned nor calibrated on (kept in the calibration, the family's
copies put the threshold among them again). A payload family in a few percent of the lines stays
unseen; a site whose requests carry a quote everywhere still learns it. The exported graph is
built as before (no new input); the metadata lists what was set aside.

Marks are read in context (``injection_like``, in injection.py: the review page reads them too).
Measured in docs/accuracy.md ("A first training log holding attacks: the injection prior").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..features import FeatureBatch
from ..feedback import among
from ..injection import INJECTION_MARKS, injection_like
from .robust import EXAMPLES, example_text
from .streaming import KeyPairs

DEFAULT_SHARE = 0.01  # of the training records: a feature seen in fewer is not the site's own


def reads_requests(converter) -> bool:
    """Converters whose features are parts of a request: ``url`` and ``ngrams`` that URL-decode."""
    return converter is not None and (converter.kind == "url"
                                      or (converter.kind == "ngrams" and bool(converter.config["decode"])))


class KeyMarker:
    """Marks feature keys by what they are; each key is looked at once, from one record holding it."""

    def __init__(self):
        self._marked: set[int] = set()
        self._looked_at = np.zeros(0, np.int64)  # sorted

    def marks(self, entry, key: int) -> bool:
        """Whether ``key``, a feature of ``entry``'s value, is one to mark."""
        raise NotImplementedError

    def observe(self, batch: FeatureBatch) -> None:
        """Look at the keys of ``batch`` not seen before (each named once, from one record)."""
        keys, first = np.unique(batch.keys, return_index=True)
        looked_at = self._looked_at
        fresh = ~among(keys, looked_at)
        if not fresh.any():
            return
        # Merged in place of a sort of all of them (np.union1d: 40 % of training on novel URLs).
        self._looked_at = np.insert(looked_at, np.searchsorted(looked_at, keys[fresh]), keys[fresh])
        origins = batch.origins.resolve()
        keys, first = keys[fresh], first[fresh]
        # A value's keys one after the other: naming a key featurizes its value again unless the last
        # key named was of the same value (in key order, a value each time: 42 of 49 s of training
        # 60,000 lines of novel URLs).
        entries = origins.entry_of_key[first]
        for at in np.argsort(entries, kind="stable").tolist():
            key = int(keys[at])
            if self.marks(origins.entries[int(entries[at])], key):
                self._marked.add(key)

    def marked_keys(self) -> np.ndarray:
        return np.fromiter(self._marked, dtype=np.int64, count=len(self._marked))


class InjectionPrior(KeyMarker):
    """Which training records hold an injection-like request feature the site rarely shows."""

    def __init__(self, share: float = DEFAULT_SHARE):
        super().__init__()
        self.share = share

    def marks(self, entry, key: int) -> bool:
        return reads_requests(entry.converter) and injection_like(entry.converter.feature_text(entry.value, key))

    def support(self, records: int) -> float:
        return self.share * records

    def set_aside(self, pairs: KeyPairs) -> np.ndarray:
        """bool [records]: holding an injection-like key seen in fewer than ``support`` records
        (``pairs``: each record's distinct keys, all of them observed)."""
        rare = np.isin(pairs.distinct, self.marked_keys()) & (pairs.holders < self.support(pairs.records))
        return pairs.holding(rare)

    def describe(self, sample: Sequence[object], aside: np.ndarray) -> dict:
        return {"share": self.share, "support": round(self.support(len(sample)), 2),
                "marks": list(INJECTION_MARKS), "records": int(aside.sum()),
                "fraction": round(float(aside.mean()), 6) if len(aside) else 0.0,
                "examples": [example_text(sample[i]) for i in np.flatnonzero(aside)[:EXAMPLES]]}


class AlarmVocabulary(KeyMarker):
    """In a log of messages, screening sets aside only records holding alarm vocabulary.

    Screening (robust.py) was made for requests: an attack stands far out, a normal request rarely
    does. In syslog and application logs a one-off normal line stands as far out (a service's
    startup sequence, a configuration dump), and set aside it is flagged whenever it comes again:
    the models of loghub_2k's 15 systems flagged 133 of their 21,000 training lines (Zookeeper 29,
    Spark 25), and a replayed Spark restart every line of it. What must not be learned there is an
    incident (an OOM, a crash, a stack trace's header), and incidents speak in failure words. So
    where the features hold no request (``reads_requests``) but those of the ``alarms`` converter,
    a record that screening finds far out is set aside only when it holds an alarm feature, as the
    injection prior sets aside a request only for an injection mark; the other far-out records are
    learned and calibrated on (the threshold may rise among them). The frames of a stack trace
    shipped one line per record hold no failure word: they are learned, the trace's header is not."""

    @staticmethod
    def applies(converters: Sequence) -> bool:
        """Features of messages with alarm vocabulary, none of a request (those keep plain screening)."""
        return (any(c.kind == "alarms" for c in converters)
                and not any(reads_requests(c) for c in converters))

    def marks(self, entry, key: int) -> bool:
        return entry.converter.kind == "alarms"

    def holders(self, pairs: KeyPairs) -> np.ndarray:
        """bool [records]: holding an alarm key (``pairs``: each record's distinct keys, all observed)."""
        return pairs.holding(np.isin(pairs.distinct, self.marked_keys()))
