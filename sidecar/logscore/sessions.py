"""Sessions: records that share a key (an HDFS ``blk_`` id, a request id) scored as one sequence.

A session model's featurizer reads one field, ``events``: the session's events in
order, one per line. ``SessionTracker`` keeps each open session's events so far
(bounded) and turns every record into its session up to that record; training runs
the same tracker over its input, so the model knows unfinished sessions, and a
session that goes wrong stands out at the record where it does.

An event is the record's text with the key and the variable parts masked
(numbers, ids, IPs), so ``Receiving block blk_7 src: /10.0.0.1:5001`` and the
same message for another block are the same event.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

from .errors import ConfigError
from .masking import mask_variables
from .parsers import Fields
from .records import RAW_LINE_KEYS, to_text

EVENTS_FIELD = "events"


@dataclass(frozen=True)
class SessionSpec:
    key: str  # regex; its first match in the record's text is the session id
    field: str = "message"  # the field holding the text (raw lines are their own text)
    max_sessions: int = 100_000  # open sessions remembered by the sidecar (least recently seen go first)
    max_events: int = 1024  # events kept per session

    @classmethod
    def from_dict(cls, data: dict) -> "SessionSpec":
        try:
            spec = cls(**data)
            re.compile(spec.key)
        except (TypeError, re.error) as error:
            raise ConfigError(f"invalid sessions spec {data!r}: {error}") from None
        return spec

    def as_dict(self) -> dict:
        return {"key": self.key, "field": self.field, "max_sessions": self.max_sessions,
                "max_events": self.max_events}


class SessionKeys:
    """The session id and event of a record, the same in training and serving."""

    def __init__(self, spec: SessionSpec):
        self.spec = spec
        self._key = re.compile(spec.key)

    def text(self, record: object) -> str:
        if isinstance(record, dict):
            for name in (self.spec.field, *RAW_LINE_KEYS):
                if record.get(name) is not None:
                    return to_text(record[name])
            return ""
        return to_text(record)

    def key_and_event(self, record: object) -> tuple[Optional[str], str]:
        text = self.text(record)
        match = self._key.search(text)
        key = match.group(0) if match else None
        event = mask_variables(self._key.sub("<session>", text)) if key else mask_variables(text)
        return key, " ".join(event.split())


class SessionTracker:
    """Open sessions of a serving model: each record becomes its session so far."""

    def __init__(self, spec: SessionSpec):
        self.spec = spec
        self.keys = SessionKeys(spec)
        self._sessions: OrderedDict[str, list[str]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def track(self, records: Sequence[object]) -> list[Fields]:
        with self._lock:
            return [self._track_one(record) for record in records]

    def track_each(self, records: Iterable[object]) -> Iterator[Fields]:
        """``track``, one record at a time as they are read: training keeps a sample of them, and a
        list of every line of a large log (and of every session so far) held them all."""
        for record in records:
            with self._lock:
                tracked = self._track_one(record)
            yield tracked

    def _track_one(self, record: object) -> Fields:
        key, event = self.keys.key_and_event(record)
        if key is None:  # no session: the record is a session of one event
            return {EVENTS_FIELD: event}
        events = self._sessions.pop(key, None) or []
        if len(events) < self.spec.max_events:
            events.append(event)
        self._sessions[key] = events  # most recently seen last
        if len(self._sessions) > self.spec.max_sessions:
            self._sessions.popitem(last=False)
        return {EVENTS_FIELD: "\n".join(events)}
