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

import hashlib
import logging
import math
import re
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

from .errors import ConfigError
from .masking import mask_variables
from .parsers import Fields
from .records import DEFAULT_MAX_LINE_CHARS, RAW_LINE_KEYS, to_text

log = logging.getLogger("logscore.sessions")

EVENTS_FIELD = "events"
DEFAULT_SESSION_CHARS = 8192  # = the featurizer's default max_field_chars (what of a session is scored)
EVICTIONS_LOG_INTERVAL_S = 60.0
# Distinct event texts the sessions share one copy of (SessionTracker._shared), and the longest
# shared: at most ≈ 10,000 × 512 characters, however many distinct events a log has.
MAX_SHARED_EVENTS = 10_000
MAX_SHARED_EVENT_CHARS = 512
# An open session is held by its id, one longer than this by a 16-byte digest of it: an id is whatever
# the key's pattern matches, and lines whose blk_ id ran to 60,000 digits held 58 KiB a session beside
# the events the bound counts (a sidecar went from 96 to 388 MiB with 5,000 of them: probe, session 30).
MAX_HELD_ID_CHARS = 128
# Notes (decide.NOTE_KINDS turns their first words into flags: truncated, session_restarted, no_text)
LINE_CUT_NOTE = "truncated: a line was cut to {line} characters before it joined its session"
EVENT_CUT_NOTE = "truncated: its event was cut to the {chars} characters a session keeps"
SESSION_CUT_NOTE = ("truncated: the session was cut: scored on its last events that fit in {chars} characters "
                    "(at most {events}); its older events were left out")
RESTARTED_NOTE = ("session restarted: its earlier events were forgotten (over {sessions} open sessions, the least "
                  "recently seen were evicted: raise max_sessions, or look for a flood of new ids); scored as new")
NO_TEXT_NOTE = ("no text: the record has no {fields} field (or it is null or empty); scored as an empty event "
                "of a session of its own")


class SessionCounts:
    """What a tracker did that changes scores, for /metrics (metrics.SessionCollector reads them)."""

    __slots__ = ("evicted", "restarted", "without_text", "keyed", "unkeyed")

    def __init__(self):
        self.evicted = 0  # open sessions forgotten to make room (max_sessions)
        self.restarted = 0  # records whose session had been evicted: scored as a new session
        self.without_text = 0  # records with no text: scored as an empty event
        # records whose text held the key (an empty match counting as none), and the others (training checks them)
        self.keyed = 0
        self.unkeyed = 0


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


def held_id(session: str) -> str | bytes:
    """What the tracker holds a session by: its id, or a digest of an id over MAX_HELD_ID_CHARS."""
    if len(session) <= MAX_HELD_ID_CHARS:
        return session
    return hashlib.blake2b(session.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def session_id(key: re.Pattern, text: str) -> Optional[str]:
    """The session id in ``text``: the key's first match, whole (capture groups do not narrow it), or
    None when there is none or it is empty. Training, the sidecar and evaluate all take it from here
    (an empty match used as an id made one session of every record lacking the key, and evaluate's
    findall grouped by the capture groups, so its ids never met the tracker's: review, session 27)."""
    match = key.search(text)
    return (match.group(0) or None) if match else None


class SessionKeys:
    """The session id and event of a record, the same in training and serving."""

    def __init__(self, spec: SessionSpec):
        self.spec = spec
        self._key = re.compile(spec.key)

    def text(self, record: object) -> Optional[str]:
        """The record's text; None when it has none (a map without the field, null, or empty)."""
        if isinstance(record, dict):
            for name in dict.fromkeys((self.spec.field, *RAW_LINE_KEYS)):
                value = record.get(name)
                text = to_text(value) if value is not None else ""
                if text:  # (an empty field is none: the next name may hold the line)
                    return text
            return None
        return to_text(record) or None

    def no_text_note(self) -> str:
        return NO_TEXT_NOTE.format(fields=" / ".join(dict.fromkeys((self.spec.field, *RAW_LINE_KEYS))))

    def key_and_event(self, text: str) -> tuple[Optional[str], str]:
        key = session_id(self._key, text)
        event = mask_variables(self._key.sub("<session>", text)) if key else mask_variables(text)
        return key, " ".join(event.split())


class Session:
    """One open session's kept events, the newest last, and their length joined (what the featurizer reads)."""

    __slots__ = ("events", "chars", "cut")

    def __init__(self):
        self.events: deque[str] = deque()
        self.chars = 0  # len("\n".join(events))
        self.cut = False  # older events were left out: what is scored is its end, not the whole

    def add(self, event: str, max_events: int, max_chars: int) -> None:
        """Keep the last events that fit, so a new event always counts (cutting the joined text at
        its head instead left every event past ~8,192 characters unscored: probe, session 26)."""
        event = event[:max_chars]  # one event longer than the limit: its start, as a cut field
        self.events.append(event)
        self.chars += len(event) + (1 if len(self.events) > 1 else 0)
        while len(self.events) > max_events or (self.chars > max_chars and len(self.events) > 1):
            self.chars -= len(self.events.popleft()) + 1
            self.cut = True


class SessionTracker:
    """Open sessions of a serving model: each record becomes its session so far.

    Bounded in bytes, not only in counts: a record's text is cut to ``max_line_chars`` (the
    sidecar's max_record_bytes) before it is masked, and a session keeps its last events that fit
    in ``max_chars`` (the featurizer's max_field_chars). So the sidecar holds at most
    max_sessions × max_chars characters of events, plus a pointer a kept event and an id of at most
    MAX_HELD_ID_CHARS characters a session (before: 142 records of 1.9 MB in one session took it from
    156 to 377 MiB; docs/operations.md has the sizing)."""

    def __init__(self, spec: SessionSpec, max_chars: int = DEFAULT_SESSION_CHARS,
                 max_line_chars: int = DEFAULT_MAX_LINE_CHARS):
        self.spec = spec
        self.keys = SessionKeys(spec)
        self.max_chars = max_chars
        self.max_line_chars = max_line_chars
        self._sessions: OrderedDict[str | bytes, Session] = OrderedDict()  # by held_id
        # Hashes of the sessions evicted last (as many as max_sessions): a record of one of them is
        # noted, its session starting afresh (a flood of new ids turned every open session into alerts).
        self._evicted: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()
        self.counts = SessionCounts()
        # One copy of each event text shared by the sessions holding it (a log has few distinct
        # events once masked: HDFS 15): a session then costs little more than a pointer an event.
        self._event_texts: dict[str, str] = {}
        self._session_cut_note = SESSION_CUT_NOTE.format(events=spec.max_events, chars=max_chars)
        self._line_cut_note = LINE_CUT_NOTE.format(line=max_line_chars)
        self._event_cut_note = EVENT_CUT_NOTE.format(chars=max_chars)
        self._evictions_said = 0
        self._evictions_said_at = -math.inf

    def __len__(self) -> int:
        return len(self._sessions)

    def track(self, records: Sequence[object]) -> list[Fields]:
        return self.track_noting(records)[0]

    def track_noting(self, records: Sequence[object]) -> tuple[list[Fields], list[tuple[str, ...]]]:
        """Each record as its session so far, and what to note of each (cut, restarted, no text)."""
        with self._lock:
            tracked = [self._track_one(record) for record in records]
            self._say_evictions()  # (under the lock: two scoring threads logged twice)
        return [fields for fields, _ in tracked], [notes for _, notes in tracked]

    def track_each(self, records: Iterable[object]) -> Iterator[Fields]:
        """``track``, one record at a time as they are read: training keeps a sample of them, and a
        list of every line of a large log (and of every session so far) held them all."""
        for record in records:
            with self._lock:
                tracked, _ = self._track_one(record)
            yield tracked

    def _track_one(self, record: object) -> tuple[Fields, tuple[str, ...]]:
        text = self.keys.text(record)
        notes: tuple[str, ...] = ()
        if text is None:
            self.counts.without_text += 1
            notes += (self.keys.no_text_note(),)
            text = ""
        elif len(text) > self.max_line_chars:
            text = text[: self.max_line_chars]
            notes += (self._line_cut_note,)
        key, event = self.keys.key_and_event(text)
        if len(event) > self.max_chars:  # (cut to what a session keeps: its tail goes unscored, so said)
            notes += (self._event_cut_note,)
        if not key:
            self.counts.unkeyed += 1
        else:
            self.counts.keyed += 1
        if key is None:  # no session: the record is a session of one event
            return {EVENTS_FIELD: event[: self.max_chars]}, notes
        key = held_id(key)
        session = self._sessions.pop(key, None)
        if session is None:
            session = Session()
            if self._evicted:
                notes += self._restarted(key)
        session.add(self._shared(event), self.spec.max_events, self.max_chars)
        self._sessions[key] = session  # most recently seen last
        if len(self._sessions) > self.spec.max_sessions:
            self._evict()
        if session.cut:
            notes += (self._session_cut_note,)
        return {EVENTS_FIELD: "\n".join(session.events)}, notes

    def _shared(self, event: str) -> str:
        event = event[: self.max_chars]
        if len(event) > MAX_SHARED_EVENT_CHARS:
            return event
        shared = self._event_texts.setdefault(event, event)
        if len(self._event_texts) > MAX_SHARED_EVENTS:  # many distinct events: start the table afresh
            self._event_texts = {event: event}
        return shared

    def _evict(self) -> None:
        key, _ = self._sessions.popitem(last=False)
        self._evicted[hash(key)] = None
        if len(self._evicted) > self.spec.max_sessions:
            self._evicted.popitem(last=False)
        self.counts.evicted += 1

    def _restarted(self, key: str | bytes) -> tuple[str, ...]:
        evicted = hash(key)
        if evicted not in self._evicted:
            return ()
        del self._evicted[evicted]
        self.counts.restarted += 1
        return (RESTARTED_NOTE.format(sessions=self.spec.max_sessions),)

    def _say_evictions(self) -> None:
        """One log line an interval while sessions are evicted, with how many since the last."""
        evicted, now = self.counts.evicted, time.monotonic()
        if evicted == self._evictions_said or now - self._evictions_said_at < EVICTIONS_LOG_INTERVAL_S:
            return
        log.warning("open sessions evicted: more than max_sessions open; a record of an evicted session is "
                    "scored as a new session and noted 'session restarted'",
                    extra={"evicted_since_last_logged": evicted - self._evictions_said,
                           "max_sessions": self.spec.max_sessions, "open_sessions": len(self._sessions)})
        self._evictions_said, self._evictions_said_at = evicted, now
