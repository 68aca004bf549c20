"""Where feedback lives: a SQLite file (default, beside the models) or PostgreSQL (a fleet).

    FeedbackStore (interface): migrate, add, remove, entries, revision
      ├─ SqliteStore     a file; one connection per operation (safe from any thread)
      └─ PostgresStore   postgresql://…; writes NOTIFY logscore_feedback (psycopg, the `postgres` extra)
    FeedbackService (the sidecar's): the active RuleSet, reloaded whenever the store's revision moves
      (PostgreSQL: LISTEN/NOTIFY, else a poll every feedback_poll_s); an unreachable store leaves the
      rules last loaded in force, and says so in /readyz and metrics.

Both stores hold the same schema, created and upgraded by the same numbered migrations; every write
bumps ``feedback_revision`` in its own transaction, which is what sidecars watch.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import shutil
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence
from urllib.parse import unquote

from .decide import HELD_CUT
from .errors import ConfigError, FeedbackFull, FeedbackNotFound, InvalidRequest, StoreUnavailable
from .records import MAX_NAME_CHARS  # a review group's id, a field's or a model's name
from .feedback import (EXAMPLES, SESSIONS_REFUSAL, UNREADABLE, VERDICTS, Entry, RuleSet, cut_refusal,
                       pattern_from_field, pattern_from_records, record_text, refuse_unflagged, refuse_unparsed,
                       unparsed_refusal)
from .timestamps import LATEST_TIME

log = logging.getLogger("logscore.feedback")

DEFAULT_FILE = "feedback.sqlite3"
CHANNEL = "logscore_feedback"

# Numbered migrations: each runs once, in order, in one transaction. {serial} and {real} are the
# dialect's auto-increment key and floating-point types.
# NOTE: a migration may only add (a table, a column with a default): in a rolling upgrade the
# sidecars not yet upgraded go on reading and writing the migrated store, and check its version
# only when they start.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE feedback (
             id {serial} PRIMARY KEY,
             verdict TEXT NOT NULL,
             model TEXT NOT NULL DEFAULT '',
             route TEXT NOT NULL DEFAULT '',
             entity TEXT NOT NULL DEFAULT '',
             pattern TEXT NOT NULL,
             example TEXT NOT NULL DEFAULT '',
             author TEXT NOT NULL,
             reason TEXT NOT NULL DEFAULT '',
             created_at {real} NOT NULL,
             expires_at {real},
             removed_at {real},
             removed_by TEXT)""",
        "CREATE TABLE feedback_revision (revision BIGINT NOT NULL)",
        "INSERT INTO feedback_revision (revision) VALUES (0)",
    ]),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
COLUMNS = ("id", "verdict", "model", "route", "entity", "pattern", "example", "author", "reason", "created_at",
           "expires_at", "removed_at", "removed_by")
PATTERN = COLUMNS.index("pattern")


MAX_AUTHOR_CHARS, MAX_REASON_CHARS = 200, 2000
MAX_SCOPE_CHARS = 1000  # a route (a shipper's tag) or an entity value
MAX_VALUE_CHARS = 2000  # a field value marked (a user agent, say)
# Expiries closer than this are one: a mark retried with the same duration (--expires 7d) asks
# for a time a few seconds later, and is the same decision.
EXPIRY_SAME_WITHIN_S = 60.0
ROOM_TO_WRITE = 16 * 2**20  # free bytes past which a SQLite write that fails is no full disk's doing
STATEMENT_TIMEOUT_MS = 5000  # PostgreSQL: past it a statement fails (StoreUnavailable), a write 503
# PostgreSQL, the client's side (libpq's parameters): statement_timeout is the server's, and a server
# gone (a host down, a network cut) never applies it. Data unacknowledged 10 s, or an idle connection
# whose peer answers no keepalive within 5 + 3 * 2 s, fails (StoreUnavailable) instead of waiting for
# the kernel's defaults (15 minutes, 2 hours). A server whose kernel still acknowledges (its process
# stopped, a proxy gone silent) is not detected by these: CALL_DEADLINE_S is.
DEAD_PEER = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
             "tcp_user_timeout": 10000}
# PostgreSQL, the client's own bound on a call, its connecting included: a server that answers with an
# error does so by the statement timeout, and a call still unanswered this long after it began is cut
# (Watchdog), whatever the kernel acknowledges. (connect_timeout, 3 s, bounds the connecting alone.)
CALL_DEADLINE_S = STATEMENT_TIMEOUT_MS / 1000 + 3.0
# PostgreSQL: while a sidecar LISTENs, changes come as notifications and a poll is only the check for a
# notification lost, so it is made this often (each poll is a new connection: a backend forked and
# authenticated; every 0.5 s that was 2 a second per sidecar, about 1 % of a core of the database's).
LISTENING_POLL_S = 5.0


def entry_from_row(row, read: Optional[dict] = None) -> Entry:
    """The entry of a row; ``read``: patterns parsed before, by their text (used, not changed)."""
    values = dict(zip(COLUMNS, row))
    text = values["pattern"]
    known = read.get(text) if read is not None and isinstance(text, str) else None
    # (a copy: a pattern's examples are replaced when a second mark adds some, and Entry.pattern is its own)
    values["pattern"] = dict(known) if known is not None else read_pattern(text)
    return Entry(**values)


def read_pattern(text) -> dict:
    """A stored pattern; one this logscore cannot read (a row written by hand, by another version,
    or damaged) becomes ``{"unreadable": why}``: listed and removable, never applied. One such row
    once stopped every sidecar sharing the store from starting, and failed every later write."""
    try:
        pattern = json.loads(text)
    except (TypeError, ValueError) as error:
        return {UNREADABLE: f"not JSON ({one_line(error)[:80]})"}
    problem = pattern_problem(pattern)
    return {UNREADABLE: problem} if problem else pattern


def pattern_problem(pattern) -> Optional[str]:
    """What keeps a stored pattern from being applied, or None (see feedback.Entry)."""
    if not isinstance(pattern, dict):
        return f"a JSON {type(pattern).__name__}, not an object"
    if "field" in pattern:
        if not (isinstance(pattern["field"], str) and isinstance(pattern.get("value"), str)):
            return "a field entry whose field or value is no string"
        return None
    keys, kind = pattern.get("keys"), pattern.get("kind")
    if not isinstance(keys, list) or not all(type(k) is int for k in keys):
        return "no 'keys' list of integers"
    if not isinstance(kind, list) or not all(type(t) in (int, str) for t in kind):
        return "no 'kind' list of integers and strings"
    # the rules index keys and kinds as int64: one past it failed every reload (OverflowError)
    if not all(-INT64_LIMIT <= k < INT64_LIMIT for k in keys + [t for t in kind if type(t) is int]):
        return "a key or kind past a 64-bit signed integer (made by no logscore)"
    for name in ("features", "examples"):
        if not isinstance(pattern.get(name, []), list) or not all(isinstance(t, str) for t in pattern.get(name, [])):
            return f"'{name}' is no list of strings"
    return None



def check_entry(entry: Entry) -> None:
    """Refuse, before anything is written, what an entry may not hold: every sidecar sharing the
    store lists and shows each entry it loads."""
    if entry.verdict not in VERDICTS:
        raise InvalidRequest(f"verdict {entry.verdict!r}: use 'normal' (a false positive) or 'keep' (a true anomaly)")
    refuse_unstorable(entry, ("author", "reason", "model", "route", "entity", "example"))
    if not entry.author.strip():
        raise InvalidRequest("say who gives the feedback (author)")
    for name, most in (("author", MAX_AUTHOR_CHARS), ("reason", MAX_REASON_CHARS), ("route", MAX_SCOPE_CHARS),
                       ("entity", MAX_SCOPE_CHARS)):
        if len(getattr(entry, name)) > most:
            raise InvalidRequest(f"{name} holds {len(getattr(entry, name))} characters; at most {most}")
    if len(str(entry.pattern.get("value", ""))) > MAX_VALUE_CHARS:
        raise InvalidRequest(f"the value marked holds {len(entry.pattern['value'])} characters; at most "
                             f"{MAX_VALUE_CHARS}")
    if entry.expires_at is not None:
        if math.isnan(entry.expires_at) or entry.expires_at > LATEST_TIME:  # (-inf: in the past, below)
            raise InvalidRequest(f"expires_at {entry.expires_at!r} is no time before 9999-12-31; give a time "
                                 "such as 2026-12-31T00:00:00Z, or none to keep the entry")
        if entry.expires_at <= time.time():
            raise InvalidRequest("expires_at is in the past; give a future time, or none to keep the entry")


def refuse_unstorable(holder, names: Sequence[str]) -> None:
    """Refuse text either store would fail on (a 503, the store blamed): PostgreSQL's text holds no
    NUL, and neither store's UTF-8 a lone surrogate (a JSON "\\ud800" with no low half after it).
    Checked whatever the store, so that a mark refused on one is refused on all."""
    for name in names:
        problem = unstorable(getattr(holder, name))
        if problem:
            raise InvalidRequest(f"{name} holds {problem}: no feedback store keeps it; remove it and send again")


def unstorable(text: str) -> Optional[str]:
    """What in ``text`` no store can keep, with where it is, or None."""
    found = UNSTORABLE.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return f"a NUL character (0x00) at character {found.start()}"
    return (f"a lone surrogate (U+{ord(found.group()):04X}) at character {found.start()}, which no UTF-8 text "
            "holds (a \\u escape of half a character)")


UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """A copy of a marked record (an entry's example, for display) with what no store keeps as U+FFFD:
    a record is marked as it was logged, NUL and all; its pattern (JSON) keeps it escaped."""
    return UNSTORABLE.sub("\ufffd", text)


# Past a 64-bit signed integer: no key or kind the rules index (int64), no id of either store's
# column (SQLite's INTEGER, PostgreSQL's BIGINT)
INT64_LIMIT = 2**63


# In gRPC's words, as the errors reach gRPC callers; HTTP's feedback routes say GET /v1/feedback
# (feedback_http.http_words), `logscore feedback` its own list command (cli.call_failure).
LIST_FEEDBACK = "list them with ListFeedback"
# What a write the store refused means for its caller, by whether the commit had been asked for: a
# commit unanswered may have been made (and a mark made again makes no second entry: Store.add).
NOT_SAVED = "; the change was not saved: retry once the store is back"
MAYBE_SAVED = ("; the store did not confirm the change, which may have been saved: once the store is back, "
               f"see whether it was ({LIST_FEEDBACK}) before retrying (a mark made again with the same expiry makes "
               "no second entry; one whose expiry is a duration, made later, does)")


def entry_number(text: str) -> int:
    """A feedback entry's number as a person, a query or a form gives it ('12', '#12'); InvalidRequest
    naming the valid range for anything else. NOTE: the digits are counted before int(): past 4,300
    of them it raised ValueError, which DELETE /v1/feedback answered 500 with a traceback."""
    number = text.strip().lstrip("#")
    significant = number.lstrip("0")
    if not (number.isascii() and number.isdigit()) or len(significant) > len(str(INT64_LIMIT)) \
            or not 0 < int(significant or "0") < INT64_LIMIT:
        shown = text if len(text) <= 40 else f"{text[:20]}…({len(text):,} characters)"
        raise InvalidRequest(f"id={shown!r} is no feedback entry number: give a whole number from 1 to "
                             f"{INT64_LIMIT - 1} ({LIST_FEEDBACK})")
    return int(significant)


def check_id(entry_id: int) -> None:
    if not 0 < entry_id < INT64_LIMIT:
        raise FeedbackNotFound(f"no feedback entry #{entry_id}; {LIST_FEEDBACK}")


class FeedbackStore:
    """The interface both stores implement (SQL differs only in placeholders and types)."""

    placeholder = "?"
    types = {"serial": "INTEGER", "real": "REAL"}
    description = ""  # where it is, for logs and the token-protected views
    schema_query = "SELECT max(name) FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    public_name = ""  # ...and for /readyz, which answers without the token
    # The patterns of the last full read, by their text: a sidecar reads every entry on each feedback
    # change, and parsing 10,000 patterns again took 100-170 ms. Replaced whole on each read, never
    # changed (so the class's empty one is shared safely), it holds what the store holds, no more.
    _read: dict[str, dict] = {}

    def _connect(self):  # a DB-API connection (a transaction is open after connect, until commit)
        raise NotImplementedError

    def _after_write(self, cursor) -> None:
        """Say that something changed (PostgreSQL: NOTIFY)."""

    def _lock_for_migration(self, cursor) -> None:
        """Keep two sidecars from migrating at once."""

    def _read_consistently(self, cursor) -> None:
        """Make the transaction's statements read one state (SQLite's WAL transaction does by itself)."""

    def _has_table(self, cursor, name: str) -> bool:
        cursor.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        return cursor.fetchone() is not None

    def _sql(self, text: str) -> str:
        return text.replace("?", self.placeholder)

    def _begin(self, cursor, exclusive: bool) -> None:
        """Open the transaction (PostgreSQL's driver opens one by itself)."""

    def _explain(self, error: Exception) -> str:
        """What failed, in one line, for a 503 and the logs."""
        return one_line(error)

    def _lost(self, connection) -> bool:
        """Whether the connection was lost (a commit's outcome then unknown; SQLite's is never)."""
        return False

    def _deadline(self, connection, started: float) -> "Optional[Watchdog]":
        """A watchdog bounding a call begun at ``started`` (time.monotonic(), before it connected) on
        ``connection`` (stopped after it), or None: no bound needed."""
        return None

    def _run(self, work: Callable, write: bool = False, exclusive: bool = False):
        """``work(cursor)`` in one transaction (``exclusive``: one writer at a time); errors reaching
        the database become StoreUnavailable."""
        started = time.monotonic()
        try:
            connection = self._connect()
        except ConfigError:
            raise
        except StoreUnavailable as error:
            raise StoreUnavailable(str(error) + (NOT_SAVED if write else "")) from None
        except Exception as error:
            raise StoreUnavailable(f"feedback store {self.description}: cannot connect ({self._explain(error)})"
                                   + (NOT_SAVED if write else "")) from None
        watchdog = self._deadline(connection, started)
        committing = False
        try:
            cursor = connection.cursor()
            self._begin(cursor, write or exclusive)
            result = work(cursor)
            if write:
                cursor.execute("UPDATE feedback_revision SET revision = revision + 1")
                self._after_write(cursor)
            committing = True
            connection.commit()
            return result
        except (InvalidRequest, FeedbackNotFound, FeedbackFull, ConfigError):
            connection.rollback()
            raise
        except Exception as error:
            cause = watchdog.failure() if watchdog is not None and watchdog.fired else error
            try:
                connection.rollback()
            except Exception:
                pass
            said = "" if not write else MAYBE_SAVED if committing and self._lost(connection) else NOT_SAVED
            raise StoreUnavailable(f"feedback store {self.description}: {self._explain(cause)}{said}") from None
        finally:
            if watchdog is not None:
                watchdog.stop()
            connection.close()  # (one cut by the watchdog is dead: each call connects anew)

    def migrate(self) -> int:
        """Apply the migrations not yet applied; returns the schema version."""
        def work(cursor):
            self._lock_for_migration(cursor)
            # NOTE: looked for before any CREATE: PostgreSQL checks the right to create in the schema
            # before it sees the table exists, and a role with only SELECT/INSERT/UPDATE on the tables
            # could never use a store that was current
            if not self._has_table(cursor, "schema_migrations"):
                cursor.execute(f"CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
                               f"applied_at {self.types['real']} NOT NULL)")
            cursor.execute("SELECT version FROM schema_migrations")
            applied = {row[0] for row in cursor.fetchall()}
            newer = [v for v in applied if v > SCHEMA_VERSION]
            if newer:
                raise ConfigError(f"feedback store {self.description} has schema version {max(newer)}, newer than "
                                  f"this logscore knows ({SCHEMA_VERSION}); upgrade logscore")
            for version, statements in MIGRATIONS:
                if version in applied:
                    continue
                for statement in statements:
                    cursor.execute(statement.format(**self.types))
                cursor.execute(self._sql("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)"),
                               (version, time.time()))
                log.info("feedback store migrated", extra={"store": self.description, "version": version})
            return SCHEMA_VERSION
        return self._run(work, exclusive=True)

    def add(self, entry: Entry, max_entries: Optional[int] = None) -> Entry:
        """Store an entry, or return the active one that already says the same (``existing`` set):
        a button clicked twice, a retried request or two operators marking one group make one rule.
        ``max_entries``: a new entry is refused (FeedbackFull) once the store holds that many in force,
        counted in the write's transaction (so a fleet's sidecars marking at once cannot pass it)."""
        check_entry(entry)
        problem = pattern_problem(entry.pattern)
        if problem:  # what a sidecar could not apply is not written (it would be listed as unreadable)
            raise InvalidRequest(f"the entry's pattern: {problem}; mark records, a review group or a field value")
        entry.created_at = entry.created_at or time.time()

        def work(cursor):
            same = self._same_active(cursor, entry)
            if same is not None:
                self._add_examples(cursor, same, entry.pattern.get("examples") or [])
                return same
            if max_entries is not None:
                self._refuse_past_cap(cursor, max_entries)
            cursor.execute(self._sql(
                "INSERT INTO feedback (verdict, model, route, entity, pattern, example, author, reason, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id"),
                (entry.verdict, entry.model, entry.route, entry.entity, json.dumps(entry.pattern), entry.example,
                 entry.author, entry.reason, entry.created_at, entry.expires_at))
            entry.id = int(cursor.fetchone()[0])
            return entry
        return self._run(work, write=True)

    def _same_active(self, cursor, entry: Entry) -> Optional[Entry]:
        """An active entry with the entry's verdict, scope, rule and expiry (its examples aside)."""
        cursor.execute(self._sql(f"SELECT {', '.join(COLUMNS)} FROM feedback WHERE verdict = ? AND model = ? "
                                 "AND route = ? AND entity = ? AND removed_at IS NULL ORDER BY id"),
                       (entry.verdict, entry.model, entry.route, entry.entity))
        wanted = json.loads(json.dumps(entry.rule()))  # as stored: tuples read back as lists
        now = time.time()
        for row in cursor.fetchall():
            stored = entry_from_row(row, self._read)
            # (an expired one is no answer: a mark within a minute of its expiry would not apply)
            if stored.active(now) and same_expiry(stored.expires_at, entry.expires_at) and stored.rule() == wanted:
                stored.existing = True
                return stored
        return None

    def _refuse_past_cap(self, cursor, max_entries: int) -> None:
        """FeedbackFull when the store already holds ``max_entries`` entries in force: every sidecar keeps
        and indexes them all, again on each change (100,000 made 2.4 GB a sidecar and a 30 s mark)."""
        cursor.execute(self._sql("SELECT count(*) FROM feedback WHERE removed_at IS NULL AND "
                                 "(expires_at IS NULL OR expires_at > ?)"), (time.time(),))
        active = int(cursor.fetchone()[0])
        if active >= max_entries:
            raise FeedbackFull(f"the feedback store holds {active:,} entries in force, its cap (feedback_max_entries "
                               f"{max_entries:,}): every sidecar keeps them all in memory and reads them all again on "
                               "each change; undo entries no longer needed (logscore feedback remove ID), give new "
                               "marks an expiry, or retrain with the feedback (logscore train --feedback STORE) and "
                               "undo what it learned; or raise feedback_max_entries on every sidecar sharing the store")

    def _add_examples(self, cursor, stored: Entry, examples: list[str]) -> None:
        """A second mark's records join the entry's examples, up to EXAMPLES: training learns from them."""
        kept = stored.pattern.get("examples") or []
        new = [e for e in dict.fromkeys(examples) if e not in kept][:max(0, EXAMPLES - len(kept))]
        if new:
            stored.pattern["examples"] = kept + new
            cursor.execute(self._sql("UPDATE feedback SET pattern = ? WHERE id = ?"),
                           (json.dumps(stored.pattern), stored.id))

    def remove(self, entry_id: int, by: str) -> Entry:
        """Undo: the entry stays (for the record and for training) but no longer applies."""
        check_id(entry_id)
        # kept with the entry, listed by every sidecar sharing the store: checked as a mark's author is
        # (a NUL was stored by SQLite, and answered by PostgreSQL with a 503 "retry" that never succeeded)
        refuse_unstorable(Undo(by), ("author",))
        if len(by) > MAX_AUTHOR_CHARS:
            raise InvalidRequest(f"author holds {len(by)} characters; at most {MAX_AUTHOR_CHARS}")

        def work(cursor):
            cursor.execute(self._sql(f"SELECT {', '.join(COLUMNS)} FROM feedback WHERE id = ?"), (entry_id,))
            row = cursor.fetchone()
            if row is None:
                raise FeedbackNotFound(f"no feedback entry #{entry_id}; {LIST_FEEDBACK}")
            entry = entry_from_row(row)
            if entry.removed_at is not None:
                raise InvalidRequest(f"feedback #{entry_id} was already removed (by {entry.removed_by} at "
                                     f"{entry.as_json()['removed_at']})")
            entry.removed_at, entry.removed_by = time.time(), by or "unknown"
            cursor.execute(self._sql("UPDATE feedback SET removed_at = ?, removed_by = ? WHERE id = ?"),
                           (entry.removed_at, entry.removed_by, entry_id))
            return entry
        return self._run(work, write=True)

    def entries(self, include_removed: bool = False, after: int = 0, limit: Optional[int] = None) -> list[Entry]:
        """The entries in the order of their ids; a page: those numbered after ``after``, ``limit`` at most."""
        rows = self._run(lambda cursor: self._entry_rows(cursor, include_removed, after, limit))
        return self._entries_of(rows, whole=not after and limit is None)

    def loaded(self) -> tuple[int, list[Entry]]:
        """(the revision, the entries in force) of one state of the store: what a sidecar's rules are
        made of, and which revision they are."""
        def work(cursor):
            self._read_consistently(cursor)
            cursor.execute("SELECT revision FROM feedback_revision")
            return int(cursor.fetchone()[0]), self._entry_rows(cursor)
        revision, rows = self._run(work)
        return revision, self._entries_of(rows, whole=True)

    def _entry_rows(self, cursor, include_removed: bool = False, after: int = 0,
                    limit: Optional[int] = None) -> list:
        where = "WHERE id > ?" + ("" if include_removed else " AND removed_at IS NULL")
        page = "" if limit is None else f" LIMIT {int(limit)}"
        cursor.execute(self._sql(f"SELECT {', '.join(COLUMNS)} FROM feedback {where} ORDER BY id{page}"), (after,))
        return cursor.fetchall()

    def _entries_of(self, rows: list, whole: bool) -> list[Entry]:
        """The entries of rows read (``whole``: every entry in force, not a page). Parsed once the
        transaction is over: the call's deadline then bounds the store's time, not ours (a big
        store's parsing was counted against the server, and blamed on it)."""
        with collector_paused():
            entries = [entry_from_row(row, self._read) for row in rows]
        if whole:  # (a page would leave out the others' patterns)
            self._read = {row[PATTERN]: entry.pattern for row, entry in zip(rows, entries)
                          if isinstance(row[PATTERN], str) and UNREADABLE not in entry.pattern}
        return entries

    def latest(self, limit: int) -> tuple[list[Entry], int]:
        """(the ``limit`` entries numbered last, removed ones included, the last first; how many entries
        the store holds), read in one transaction: the review page lists these, and only these are
        read (a fleet's 10,000 entries were all read and parsed for the page's 200)."""
        def work(cursor):
            cursor.execute("SELECT count(*) FROM feedback")
            total = int(cursor.fetchone()[0])
            cursor.execute(self._sql(f"SELECT {', '.join(COLUMNS)} FROM feedback ORDER BY id DESC LIMIT {int(limit)}"))
            return cursor.fetchall(), total
        rows, total = self._run(work)
        return [entry_from_row(row, self._read) for row in rows], total  # (parsed after the transaction)

    def holds_schema(self) -> bool:
        """Whether a logscore made its tables here (readers check: a typo in a URL names an empty database)."""
        def work(cursor):
            cursor.execute(self.schema_query)
            return cursor.fetchone()[0] is not None
        return self._run(work)

    def revision(self) -> int:
        def work(cursor):
            cursor.execute("SELECT revision FROM feedback_revision")
            return int(cursor.fetchone()[0])
        return self._run(work)

    def watch(self, timeout: float, stop: threading.Event, listening_timeout: float = 0.0) -> None:
        """Return when the store may have changed, or after ``timeout`` seconds (a poll); a store that
        pushes changes, after ``listening_timeout`` while it listens."""
        stop.wait(timeout)

    def close(self) -> None:
        """Release what the store holds between operations."""


@dataclass
class Undo:
    """Who undoes an entry, as refuse_unstorable reads it."""

    author: str


def same_expiry(stored: Optional[float], wanted: Optional[float]) -> bool:
    """Whether two expiries say the same: both none, or within EXPIRY_SAME_WITHIN_S of each other.

    `logscore feedback add --expires 7d` turns the duration into a time when it runs: a retried
    command (or a second operator marking the group for as long) asks for an expiry seconds
    later, and exact equality made a second entry of the same rule each time."""
    if stored is None or wanted is None:
        return stored is None and wanted is None
    return abs(stored - wanted) < EXPIRY_SAME_WITHIN_S


class SqliteStore(FeedbackStore):
    lock_wait_s = 10.0  # how long a write waits for another writer's lock

    def __init__(self, path: str):
        self.path = Path(path)
        self.description = str(self.path)
        self.public_name = self.path.name
        # Once opened, the file is never made anew: deleted while serving (rm feedback.sqlite3*), an
        # empty store took its place within a poll, every entry unapplied with only an info log.
        self._opened = False

    def _connect(self):
        if not self.path.parent.is_dir():
            raise ConfigError(f"feedback store {self.path}: the directory {self.path.parent} does not exist")
        if self._opened:
            return self._configured(self._open_existing())
        if not self.path.exists() and not os.access(self.path.parent, os.W_OK):
            raise StoreUnavailable(f"feedback store {self.path}: cannot create it, {self.path.parent} is not "
                                   "writable; set --feedback-store to a file in a directory of yours")
        # (isolation_level None: we begin transactions ourselves)
        connection = self._configured(sqlite3.connect(self.path, timeout=self.lock_wait_s, isolation_level=None))
        self._opened = True
        return connection

    def _open_existing(self):
        """The file, never created (mode=rw: no window between a check that it exists and the open)."""
        try:
            return sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=rw", uri=True, timeout=self.lock_wait_s,
                                   isolation_level=None)
        except sqlite3.OperationalError:
            if self.path.exists():
                raise
            raise StoreUnavailable(f"feedback store {self.path}: the file is gone (deleted or moved since this "
                                   "process opened it); the rules last loaded stay in force, and no empty store is "
                                   "made in its place while serving: put the file back (or restore it from a "
                                   "backup), or restart the sidecar to begin an empty store") from None

    def _configured(self, connection):
        """A connection opened, in WAL mode."""
        try:
            connection.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
        except Exception:
            connection.close()  # it fails on a full disk: each poll would otherwise keep its files open
            raise
        return connection

    def _explain(self, error: Exception) -> str:
        """SQLite says "disk I/O error" or "database or disk is full" whatever the disk's state: say
        how much room the disk holding the file has, and what to do."""
        text = one_line(error)
        if isinstance(error, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
            return (f"{text} (it is no SQLite file, or a damaged one: restore it from a backup, read again at "
                    "the next poll; or move it aside and restart the sidecar to begin an empty store; until then "
                    "the rules last loaded stay in force)")
        if isinstance(error, sqlite3.OperationalError) and "locked" in text:
            return (f"{text} (another process held its write lock for over {self.lock_wait_s:g} s: a sqlite3 "
                    "shell or a backup with a transaction open? Retry once it ends; `fuser FILE` names it)")
        if not isinstance(error, sqlite3.OperationalError) or not any(
                word in text for word in ("disk", "readonly", "read-only")):
            return text
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            return text
        if "readonly" in text and free > ROOM_TO_WRITE:  # room enough: it is the file that may not be written
            return (f"{text} (this process may not write {self.path}, its directory or its -wal/-shm files: a "
                    "read-only or immutable file, or another user's; give it write access, or set "
                    "--feedback-store to a file of this user's)")
        return (f"{text} ({free / 2**20:.1f} MiB free on the disk holding {self.path.parent}; free some room, "
                "or set --feedback-store to a file on another disk)")

    def _begin(self, cursor, exclusive: bool) -> None:
        # NOTE: IMMEDIATE takes the write lock first: two writers (or two sidecars migrating) queue
        # on it instead of one failing at commit.
        cursor.execute("BEGIN IMMEDIATE" if exclusive else "BEGIN")


WRITE_LOCK = 7462033  # PostgreSQL advisory lock key of writes and migrations (any constant of our own)


class PostgresStore(FeedbackStore):
    placeholder = "%s"
    schema_query = "SELECT to_regclass('schema_migrations')"
    types = {"serial": "BIGSERIAL", "real": "DOUBLE PRECISION"}

    def __init__(self, url: str, connect_timeout: float = 3.0, call_deadline_s: float = CALL_DEADLINE_S):
        try:
            import psycopg
        except ImportError:
            raise ConfigError("--feedback-store postgresql://… needs psycopg: pip install 'logscore[postgres]'") from None
        self._psycopg = psycopg
        credentials = url.partition("://")[2].split("/", 1)[0]
        if credentials.count("@") > 1:  # libpq splits at the first: the rest of the password became the host
            raise ConfigError(f"--feedback-store {redact(url)}: its password holds an '@'; write it %40 in the URL, "
                              "or leave it out and put it in ~/.pgpass or PGPASSWORD")
        self.url = url
        self._passwords = url_passwords(url)
        self.connect_timeout = connect_timeout
        self.call_deadline_s = call_deadline_s
        self.description = self.public_name = redact(url)
        self._listener = None

    def _explain(self, error: Exception) -> str:
        """The driver's words, without the password (libpq may quote a part of the URL); a refused
        privilege says which the store's role needs."""
        text = without_passwords(one_line(error), self._passwords)
        if any(words in text for words in ("password authentication failed", "no password supplied")):
            text += ("; give the role's password in PGPASSWORD or ~/.pgpass of the user the sidecar runs as "
                     "(PGPASSFILE names another file), or in the URL: postgresql://USER:PASSWORD@HOST/DATABASE, "
                     "its '@' and '/' written %40 and %2F")
        if isinstance(error, self._psycopg.errors.InsufficientPrivilege):
            text += ("; the role needs SELECT, INSERT and UPDATE on feedback, feedback_revision and "
                     "schema_migrations, USAGE on feedback_id_seq, and CREATE on the schema while it creates or "
                     "migrates them (or start one sidecar once as a role that may)")
        return text

    def _connect(self):
        # NOTE: a statement bounded too: a lock held elsewhere (a DBA's open transaction) would
        # otherwise hold every write and listing for as long, the store reported reachable.
        return self._psycopg.connect(self.url, connect_timeout=max(1, int(self.connect_timeout)),
                                     options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}", **DEAD_PEER)

    def _lost(self, connection) -> bool:
        return connection.broken  # (cut by the watchdog too; a commit the server refused is not lost)

    def _deadline(self, connection, started: float) -> "Watchdog":
        # (counted from before connecting: a call's whole time is bounded, not its time after a slow connect)
        return Watchdog(connection.fileno(), self.call_deadline_s, started)

    def _after_write(self, cursor) -> None:
        cursor.execute(f"NOTIFY {CHANNEL}")

    def _lock_for_migration(self, cursor) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))

    def _begin(self, cursor, exclusive: bool) -> None:
        # NOTE: writes queue here, before the cap's count and the same-mark check: at READ COMMITTED
        # each writer at once counted 9 entries under a cap of 10 (11 to 13 stored) and two made one
        # mark twice. (The driver opens the transaction; statement_timeout bounds the wait.)
        if exclusive:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))

    def _read_consistently(self, cursor) -> None:
        # (READ COMMITTED, the default, gives each statement a state of its own: a write between two
        # would pair a revision with entries of another)
        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")

    def _has_table(self, cursor, name: str) -> bool:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
        return bool(cursor.fetchone()[0])

    def watch(self, timeout: float, stop: threading.Event, listening_timeout: float = 0.0) -> None:
        """LISTEN: returns as soon as another writer notifies, else after ``listening_timeout`` (a
        poll; after ``timeout`` when not listening, and at once on listening anew: what was written
        meanwhile was notified to no one)."""
        try:
            if self._listener is None or self._listener.closed:
                self._listener = self._psycopg.connect(self.url, autocommit=True,
                                                       connect_timeout=max(1, int(self.connect_timeout)), **DEAD_PEER)
                # (a silent server held the watching thread for good)
                watchdog = self._deadline(self._listener, time.monotonic())
                try:
                    self._listener.execute(f"LISTEN {CHANNEL}")
                finally:
                    watchdog.stop()
                return
            deadline = time.monotonic() + max(timeout, listening_timeout)
            while not stop.is_set():  # in slices of ``timeout``: a sidecar stopping is not kept waiting
                left = deadline - time.monotonic()
                if left <= 0 or any(True for _ in self._listener.notifies(timeout=min(timeout, left), stop_after=1)):
                    return
        except Exception:  # the poll that follows says what is wrong
            self.close()
            stop.wait(timeout)

    def close(self) -> None:
        if self._listener is not None:
            try:
                self._listener.close()
            except Exception:
                pass
            self._listener = None


class Watchdog:
    """Cuts a connection's socket (shutdown) if the call on it is still running after ``seconds``:
    libpq waits for an answer for as long as the peer's kernel acknowledges, and a server process
    stopped (SIGSTOP) or a proxy gone silent never answers. The shutdown ends the blocked read with an
    error at once; the connection is dead then, and closed by its caller, after stop().

    NOTE: the descriptor is duplicated when the watchdog is made: libpq may close its own on a lost
    connection, and the number, kept raw, could then name another socket when the deadline fires.
    The duplicate names the connection's socket until stop() or cut() closes it."""

    def __init__(self, fileno: int, seconds: float, started: float):
        self.seconds = seconds
        self.fired = False
        # (a socket object of a descriptor of its own: closing it leaves libpq's open)
        self._socket: Optional[socket.socket] = socket.socket(fileno=os.dup(fileno))
        DEADLINES.add(self, started + seconds)

    def cut(self) -> None:
        """(by DEADLINES, under its lock: never after stop() has returned)"""
        self.fired = True
        if self._socket is None:
            return
        with self._socket as sock:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # (already closed by the peer)
                pass
        self._socket = None

    def stop(self) -> None:
        DEADLINES.discard(self)  # (once it returns, cut() has run or never will: no race on the socket)
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def failure(self) -> Exception:
        return TimeoutError(f"no answer within {self.seconds:g} s (the server's statement timeout is "
                            f"{STATEMENT_TIMEOUT_MS / 1000:g} s, per statement): the database server or a proxy "
                            "on the way is stopped, hung or too slow (a call waiting on another writer's lock, "
                            "then committing) while its machine still accepts; the connection was dropped, and "
                            "the next call connects anew")


class Deadlines:
    """One thread that cuts every watchdog's connection past its time: a timer thread per call cost
    0.4 ms of CPU per call (measured: 1.04 against 0.66 ms for a revision read)."""

    def __init__(self):
        self._due: dict[Watchdog, float] = {}
        self._changed = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._wakes_at = 0.0  # when the thread looks next, unwoken

    def add(self, watchdog: Watchdog, at: float) -> None:
        with self._changed:
            self._due[watchdog] = at
            if self._thread is None or not self._thread.is_alive():  # (none yet, or this is a forked child)
                self._thread = threading.Thread(target=self._cut_when_due, name="store-deadlines", daemon=True)
                self._thread.start()
            elif at < self._wakes_at:  # (rarely: a call's deadline is seconds, past the thread's next look)
                self._changed.notify()

    def discard(self, watchdog: Watchdog) -> None:
        with self._changed:
            self._due.pop(watchdog, None)

    def _cut_when_due(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                for watchdog in [w for w, at in self._due.items() if at <= now]:
                    del self._due[watchdog]
                    watchdog.cut()
                # (idle, it looks every second: waking it for each call cost more than that)
                self._wakes_at = min(self._due.values(), default=now + 1.0)
                self._changed.wait(self._wakes_at - now)


DEADLINES = Deadlines()


def redact(url: str) -> str:
    """A database URL without its password wherever it holds one (for logs, errors and /readyz): after
    ``user:`` up to the last ``@`` of the user part (a password may hold an ``@``, and libpq's split at
    the first one put the rest in the host name), and every ``password=`` of the query."""
    scheme, head, tail = split_url(url)
    credentials, at, host = head.rpartition("@")
    if at and ":" in credentials:
        head = f"{credentials.split(':', 1)[0]}:***@{host}"
    tail = QUERY_PASSWORD.sub(r"\g<1>***", tail)
    return f"{scheme}{head}{tail}"


def split_url(url: str) -> tuple[str, str, str]:
    """(the scheme with its "://"; user, host and database; the query from its "?")"""
    scheme, sep, rest = url.partition("://")
    query = QUERY_START.search(rest)
    head, tail = (rest[:query.start()], rest[query.start():]) if query else (rest, "")
    return scheme + sep, head, tail


# (a query begins at a "?" followed by a parameter's name and "=": a "?" in a password begins none)
QUERY_START = re.compile(r"\?[A-Za-z_]+=")
QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*")


def url_passwords(url: str) -> list[str]:
    """The passwords a URL holds (user part and query), as written and as decoded: an error of the
    driver's may quote either."""
    _, head, tail = split_url(url)
    credentials, at, _ = head.rpartition("@")
    found = [credentials.split(":", 1)[1]] if at and ":" in credentials else []
    found += [m.group(0).split("=", 1)[1] for m in re.finditer(r"(?<=[?&])password=[^&]*", tail)]
    found += [unquote(p) for p in found]
    return sorted({p for p in found if p}, key=len, reverse=True)  # (longest first: one may hold another)


def without_passwords(text: str, passwords: Sequence[str]) -> str:
    for password in passwords:
        text = text.replace(password, "***")
    return text


def one_line(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]


def is_postgresql(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def open_store(location: str, flag: str = "--feedback-store") -> FeedbackStore:
    """A store from ``--feedback-store``: postgresql://… (or postgres://…), else a SQLite file path."""
    if is_postgresql(location):
        return PostgresStore(location)
    if "://" in location:
        raise ConfigError(f"{flag} {redact(location)}: give a file path or a postgresql:// URL")
    return SqliteStore(location)


def default_location(models_dir: str) -> str:
    return str(Path(models_dir) / DEFAULT_FILE)


def left_behind(models_dir: str, location: str) -> Optional[str]:
    """The default store's file when another store is in use and that file holds something: an
    operator who sets --feedback-store on upgrading (the shipped unit and manifest do) starts from an
    empty store while the entries given before stay there, applied by no one."""
    default = Path(default_location(models_dir))
    if not default.is_file():
        return None
    in_use = not is_postgresql(location) and Path(location).exists()
    if in_use and default.samefile(location):
        return None
    return str(default) if holds_entries(default) else None


def holds_entries(path: Path) -> bool:
    """The SQLite store holds an entry in force (read only: a sidecar that once ran with the default
    store left its schema behind, no feedback; one that cannot be read is said to hold some)."""
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            return connection.execute("SELECT 1 FROM feedback WHERE removed_at IS NULL LIMIT 1").fetchone() is not None
        finally:
            connection.close()
    except sqlite3.Error:
        return True


@dataclass
class Mark:
    """A feedback request as every surface decodes it: a verdict on records, a review group or a
    field value, with who, why, scope and an optional expiry."""

    verdict: str
    author: str
    reason: str = ""
    model: str = ""
    route: str = ""
    entity: str = ""
    expires_at: Optional[float] = None
    records: Sequence[object] = field(default_factory=list)
    group: str = ""
    field: str = ""
    value: Optional[str] = None

    def check(self) -> None:
        refuse_unstorable(self, ("author", "reason", "model", "route", "entity", "group", "field"))
        for name in ("group", "field", "model"):
            # (errors name what was asked for: one of a megabyte was more than gRPC's error could carry)
            if len(getattr(self, name)) > MAX_NAME_CHARS:
                raise InvalidRequest(f"{name} holds {len(getattr(self, name))} characters: no {name} is named so "
                                     f"long (at most {MAX_NAME_CHARS})")
        targets = [bool(self.records), bool(self.group), bool(self.field)]
        if sum(targets) != 1:
            raise InvalidRequest("mark exactly one of: records (lines or field maps), a review group (group), "
                                 "or a field value (field and value)")
        if self.field and self.value is None:
            raise InvalidRequest(f"field {self.field!r}: give the value to mark")
        if len(self.records) > MAX_MARKED_RECORDS:
            raise InvalidRequest(f"{len(self.records)} records marked at once; mark at most {MAX_MARKED_RECORDS} "
                                 "(a review group covers more)")


MAX_MARKED_RECORDS = 100


# Entries in force a store may hold (feedback_max_entries' default): each costs every sidecar memory
# and a share of every reload (docs/operations.md: the probe's figures at 100,000).
MAX_ENTRIES = 10_000
NEAR_CAP = 0.9  # past this share of the cap each reload warns


@contextmanager
def collector_paused():
    """Python's cyclic garbage collector off meanwhile: reading and indexing 10,000 entries makes
    hundreds of thousands of objects, none of them garbage, and the collections their making set off
    took 150 of a reload's 400 ms (more in a sidecar, whose heap holds its models too). Never around
    a store's I/O: it is off process-wide, and PostgreSQL's connect and statement timeouts are seconds."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class FeedbackService:
    """The sidecar's feedback: writes go through the store, ``rules`` is what decide applies.

    A thread watches the store and swaps in a new RuleSet whenever its revision moves (or an entry
    expires); the scoring path only reads ``self.rules``."""

    def __init__(self, store: FeedbackStore, poll_s: float, on_reload: Optional[Callable[["FeedbackService"], None]] = None,
                 registry=None, review=None, max_entries: int = MAX_ENTRIES):
        self.store = store
        self.max_entries = max_entries  # entries in force at most: a new one past it is refused (FeedbackFull)
        self.registry = registry  # to resolve models and make patterns (marks)
        self.review = review  # review.ReviewRing: marks of groups
        self.poll_s = poll_s
        self.rules = RuleSet()
        self.revision: Optional[int] = None
        self.loaded_at: Optional[float] = None
        self.reachable = False
        self.error: Optional[str] = None  # why the store is unreachable
        self.on_reload = on_reload or (lambda service: None)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        # Held only to swap the rules in (never while the store is asked: a call stuck on it held up
        # every other reload and mark); reads are numbered so that one begun earlier never replaces
        # the rules of one begun later.
        self._lock = threading.Lock()
        self._reads_begun = 0
        self._applied_read = 0

    def start(self) -> None:
        """Migrate and load once (an unreachable store is reported, not fatal), then watch."""
        try:
            self.store.migrate()
            self.reload()
        except StoreUnavailable as error:
            self._unreachable(error)
        self._thread = threading.Thread(target=self._watch, name="feedback-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.store.close()

    def reload(self, force: bool = False) -> bool:
        """Load the entries if the revision moved (or an entry expired); whether the rules changed."""
        with self._lock:
            self._reads_begun += 1
            read = self._reads_begun
        revision = self.store.revision()
        expired = self.rules.next_expiry is not None and self.rules.next_expiry <= time.time()
        if not (force or expired or revision != self.revision):
            self._reachable()
            return False
        revision, entries = self.store.loaded()  # (pauses the collector while it parses, not while it waits)
        with collector_paused():
            rules = RuleSet(entries)
        with self._lock:
            newer = self._newer(revision, read, force)
            if newer:
                self.rules, self.revision, self.loaded_at, self._applied_read = rules, revision, time.time(), read
        self._reachable()
        if not newer:  # another reload, begun later or reading later, put newer rules in
            return False
        unreadable = [e for e in entries if UNREADABLE in e.pattern]
        if unreadable:
            log.warning("feedback entries not applied: their patterns are unreadable; remove them "
                        "(logscore feedback remove ID) and mark their records again",
                        extra={"store": self.store.description, "ids": [e.id for e in unreadable][:20],
                               "unreadable_entries": len(unreadable), "why": unreadable[0].pattern[UNREADABLE]})
        log.info("feedback loaded", extra={"store": self.store.description, "revision": revision,
                                           "active_entries": len(self.rules)})
        self._warn_near_cap()
        self._recheck_review()
        self.on_reload(self)
        return True

    def _warn_near_cap(self) -> None:
        if len(self.rules) >= NEAR_CAP * self.max_entries:
            log.warning("feedback entries in force near their cap: new marks are refused once it is reached; undo "
                        "entries no longer needed, give marks an expiry, or retrain with the feedback and undo what "
                        "it learned (or raise feedback_max_entries)",
                        extra={"store": self.store.description, "active_entries": len(self.rules),
                               "feedback_max_entries": self.max_entries})

    def _newer(self, revision: int, read: int, force: bool) -> bool:
        """Whether rules read at ``revision`` by read number ``read`` replace those in force. Revisions
        only grow in one store; ``force`` (a store back after an outage: perhaps another database,
        its revisions anew) is taken unless a read begun later was."""
        if self.revision is None or revision > self.revision:
            return True
        return read > self._applied_read and (force or revision == self.revision)

    def _recheck_review(self) -> None:
        if self.review is not None:
            try:
                self.review.recheck(self.rules)
            except Exception:  # a bug: the page's coverage stays as it was; the rules are in force
                log.exception("review groups not checked against the new feedback")

    def _drop_expired(self) -> None:
        """The rules last loaded without the entries expired since: an expiry needs no store, and one
        unreachable kept entries in force past their time (a mark 'for 20 s' for as long as it was down)."""
        with self._lock:  # (held by reloads only to swap rules in, never while they wait for the store)
            if self.rules.next_expiry is None or self.rules.next_expiry > time.time():
                return
            before = len(self.rules)
            with collector_paused():
                self.rules = RuleSet(self.rules.entries)
        log.info("expired feedback entries dropped while the store is unreachable",
                 extra={"store": self.store.description, "expired_entries": before - len(self.rules),
                        "active_entries": len(self.rules)})
        self._recheck_review()

    def _reachable(self) -> None:
        back = not self.reachable and self.error is not None
        self.reachable, self.error = True, None
        if back:
            log.info("feedback store reachable again", extra={"store": self.store.description})
            self.on_reload(self)

    def _unreachable(self, error: Exception) -> None:
        self._drop_expired()
        if self.reachable or self.error is None:
            log.error("feedback store unreachable; the rules last loaded stay in force" if self.loaded_at else
                      "feedback store unreachable; no feedback is applied until it is reached",
                      extra={"store": self.store.description, "error": str(error),
                             "active_entries": len(self.rules)})
        self.reachable, self.error = False, str(error)
        self.on_reload(self)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.store.watch(self.poll_s, self._stop, self._listening_poll_s())
            if self._stop.is_set():
                return
            try:
                if self.revision is None or not self.reachable:
                    # Back after an outage, the store may be another database (dropped and created
                    # again, restored from a backup): make its schema, and load it whatever its revision
                    self.store.migrate()
                    self.reload(force=True)
                else:
                    self.reload()
            except (StoreUnavailable, ConfigError) as error:  # ConfigError: its directory went away, say
                self._unreachable(error)
            except Exception as error:  # a bug: say so, keep the rules, keep watching
                log.exception("feedback reload failed")
                self._unreachable(error)

    def _listening_poll_s(self) -> float:
        """How long a store that pushes its changes is left unasked: up to the next expiry at most."""
        wait = LISTENING_POLL_S
        if self.rules.next_expiry is not None:
            wait = min(wait, self.rules.next_expiry - time.time())
        return max(self.poll_s, wait)

    # --- writes (called from the surfaces, off the event loop) --------------------------
    def mark(self, mark: Mark) -> Entry:
        """Turn a mark into a stored entry: the pattern of its records, group or field value."""
        mark.check()
        # who, why, verdict and expiry first: what is wrong with them is said before the records are read
        check_entry(Entry(0, mark.verdict, {"value": mark.value or ""}, mark.author, mark.reason, route=mark.route,
                          entity=mark.entity, expires_at=mark.expires_at))
        if mark.entity and self.registry is not None and not self.registry.entity_field:
            # (accepted before, and never applied: no record here has an entity to match)
            raise InvalidRequest(f"entity {mark.entity[:100]!r}: this sidecar reads no entity field (--entity-field), "
                                 "so an entry scoped to an entity would never apply here; leave the entity out, or "
                                 "give the mark to a sidecar run with --entity-field (the one whose records hold it)")
        if mark.group:
            group = self.review.group(mark.group) if self.review is not None else None
            if group is None:
                raise FeedbackNotFound(f"no review group {mark.group!r} (groups live in memory: list them at /ui/)")
            if group.sessions:
                raise InvalidRequest(f"group {mark.group} is of session model {group.model!r}: {SESSIONS_REFUSAL}")
            if not group.kind:
                raise InvalidRequest(f"group {mark.group} is unusual in details only (n-grams): it names no "
                                     "kind to mark; mark a field value")
            model_name = mark.model or group.model
            if mark.verdict == "normal":
                self._refuse_unparsed_group(mark.group, group)
            pattern = self.review.pattern(group, mark.verdict)
            example = storable(group.examples[-1].text) if group.examples else ""
            route = mark.route or group.route
        else:
            model = self.registry.resolve(mark.model, mark.route)
            model_name, route = model.name, mark.route
            if mark.field:
                pattern = pattern_from_field(model, mark.field, mark.value)
                example = ""
            else:
                if mark.verdict == "normal":
                    refuse_unparsed(model, mark.records)
                    refuse_unflagged(model, mark.records)
                pattern = pattern_from_records(model, mark.records)
                example = storable(record_text(mark.records[0]))
        entry = self.store.add(Entry(0, mark.verdict, pattern, mark.author, mark.reason, model_name, route,
                                     mark.entity, expires_at=mark.expires_at, example=example), self.max_entries)
        if mark.group and self.review is not None:
            self.review.marked(mark.group, entry.id, entry.verdict)  # first: the others are checked against it
        self._reload_after_write()
        return entry

    def _refuse_unparsed_group(self, group_id: str, group) -> None:
        """A group of lines its model could not read (a binary payload, another log) or cut before
        scoring, which such a model flags whatever the feedback: marked normal, it made an entry that
        never applied. Decided by what was recorded when they were scored, not by parsing the examples
        again: an example is cut to 2,000 characters, and a long ordinary line cut mid-way no longer
        parses. Each reason gets its own remedy (route another log away; train on or read further a
        log whose records run long)."""
        number, example = next(((n, e) for n, e in enumerate(group.examples, 1) if e.held), (0, None))
        if example is None:
            return
        # (the group's own model: what recorded its lines as unread, whatever model the mark names)
        model = self.registry.snapshot.models.get(group.model) if self.registry is not None else None
        what = f"group {group_id}: its record {number} ({example.text[:80]!r})"
        if example.held == HELD_CUT and model is not None:
            raise cut_refusal(f"{what} was cut before scoring", model)
        if example.held == HELD_CUT:  # (its model unloaded since: the limits' values are not known)
            raise InvalidRequest(f"{what} was cut before scoring: model {group.model!r} flags such records "
                                 "whatever the feedback, so marking them normal would change nothing; train it on "
                                 "that log, or raise the sidecar's max_record_bytes or the model's max_field_chars")
        log_format = f" as {model.featurizer.log_format}" if model is not None else ""
        raise unparsed_refusal(f"{what} did not parse{log_format} when scored", group.model)

    def add(self, entry: Entry) -> Entry:
        stored = self.store.add(entry, self.max_entries)
        self._reload_after_write()
        return stored

    def remove(self, entry_id: int, by: str) -> Entry:
        removed = self.store.remove(entry_id, by)
        if self.review is not None:
            self.review.unmarked(entry_id)  # first: the groups are checked against the feedback left
        self._reload_after_write()
        return removed

    def entries(self, include_removed: bool = False, after: int = 0, limit: Optional[int] = None) -> list[Entry]:
        return self.store.entries(include_removed, after, limit)

    def latest(self, limit: int) -> tuple[list[Entry], int]:
        return self.store.latest(limit)

    def page(self, include_removed: bool, after: int, limit: int) -> tuple[list[Entry], int]:
        """(up to ``limit`` entries numbered after ``after``, the ``after`` of the next page: 0 at the end);
        ``limit`` 0: all of them."""
        if after >= INT64_LIMIT:  # no entry is numbered past it: an empty last page, not a store's error (503)
            return [], 0
        if not limit:
            return self.entries(include_removed, after), 0
        entries = self.entries(include_removed, after, limit + 1)  # one more: is there a next page?
        return entries[:limit], entries[limit - 1].id if len(entries) > limit else 0

    def _reload_after_write(self) -> None:
        """So that the next call to this sidecar sees the change (others see it within a poll)."""
        try:
            self.reload()
        except StoreUnavailable as error:
            self._unreachable(error)

    def status(self, public: bool = False) -> dict:
        """Where feedback lives and how it is; ``public`` (/readyz, no token): a file by its name only."""
        if public:
            status = self.status()
            return {k: v.replace(self.store.description, self.store.public_name) if isinstance(v, str) else v
                    for k, v in status.items()}
        return {"store": self.store.description, "reachable": self.reachable, "error": self.error,
                "active_entries": len(self.rules), "max_entries": self.max_entries, "revision": self.revision,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at))
                if self.loaded_at else None}
