"""Records in, field maps out: the one place where input shapes are unified.

A record is a field map (a Fluentd record, a Logstash event, a JSON object) or a
raw line. Raw lines are parsed with the model's log format; field maps are used
as they are, with other shippers' field names mapped to ours, and a raw line
held in ``message``/``log`` parsed when the fields the model needs are absent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Optional, Sequence

import numpy as np

from .admission import UNLIMITED, Ticket
from .errors import InvalidRequest
from .parsers import (ACCESS_DASHES, COMBINED_ONLY, FIELD_ALIASES, Fields, flatten, get_parser, head_reader,
                      request_fields)
from .timestamps import TIME_FIELDS, parse_time

# NOTE: unmatched_line is where Fluentd's in_tail puts a line its parser could not read
# (emit_unmatched_lines, which the gem's README asks for): it is the raw line too. Read as a map
# without the model's fields, it was flagged for its missing fields whatever the line said.
RAW_LINE_KEYS = ("message", "log", "unmatched_line")
_TIME_KEYS = frozenset(TIME_FIELDS)
NESTED_TOO_DEEP = "(nested too deep)"
# NOTE: the one bound on how deep maps and arrays nest in a record, for every surface that decodes
# msgpack (gRPC's event_stream, forward mode). msgpack decodes 1,024 levels, past Python's recursion
# limit: a record 1,000 levels deep failed its whole gRPC call INTERNAL where json.dumps read it (the
# review page), and a Fluent Bit (5.1) next hop acknowledges a PackedForward chunk holding a record about
# 60 maps deep and drops every record of it (forward mode relays PackedForward: one such record lost
# the records relayed with it). gRPC's event_stream cuts such a record there and notes it; forward
# mode skips it. (HTTP's JSON is bounded by Python's parser: nested too deeply, a body is refused.)
# Real records nest a few levels (the featurizer flattens 8: parsers.FLATTEN_DEPTH).
MAX_RECORD_DEPTH = 48
# One array or map of an event stream holds at most this many values: a container is
# built whole before it is charged (admission.py), so this bounds what one may take.
MAX_CONTAINER_VALUES = 65_536
# The one truncation rule: a raw line (a record, or one held in message/log) longer than this
# is cut before it is parsed, wherever it is scored (sidecar: setting max_record_bytes).
DEFAULT_MAX_LINE_CHARS = 65_536

LOGGED_TAG_CHARACTERS = 100  # what a log line or an error shows of a tag (the sender chose it)
MAX_NAME_CHARS = 200  # the longest name a caller may give: a model's, a review group's id, a field's


def is_utf8(text: str) -> bool:
    """Whether ``text`` can be sent as UTF-8: it holds no lone surrogate (Python keeps the bytes of a
    non-UTF-8 file name that way, and JSON's \\ud800 escapes make them). Encoding 500 characters: 0.8 µs."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def cut_text(text: str, limit: int = LOGGED_TAG_CHARACTERS) -> str:
    """A text the sender chose (a tag, an option's value) as logs and errors show it: at most
    ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def to_text(value: object) -> str:
    """Any field value as text (a plain str); undecodable bytes become U+FFFD, never an error."""
    if isinstance(value, str):
        # NOTE: a str subclass (only a caller of the Python API makes one: JSON, msgpack and protobuf
        # decode to plain str) becomes a plain str: its own methods must not change the features, and
        # the compiled featurizer takes plain str only.
        return value if value.__class__ is str else str.__str__(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    try:
        return str(value)
    except RecursionError:  # a hostile value nested a thousand levels deep
        return NESTED_TOO_DEEP


def nested_deeper_than(record: dict, limit: int) -> bool:
    """Whether maps and arrays nest more than ``limit`` deep in the record (the record is 1).
    A flat record costs one pass over its values."""
    for value in record.values():
        if value.__class__ is dict or value.__class__ is list:
            break
    else:
        return False
    level: list = [record]
    for _ in range(limit):
        level = [inner for outer in level for inner in (outer.values() if outer.__class__ is dict else outer)
                 if inner.__class__ is dict or inner.__class__ is list]
        if not level:
            return False
    return True


def cut_nesting(value: object, limit: int = MAX_RECORD_DEPTH) -> object:
    """``value`` with each map or array nested past ``limit`` levels (``value`` is 1) replaced by
    NESTED_TOO_DEEP; recurses ``limit`` levels at most, so it is safe on any record."""
    if value.__class__ is dict:
        return NESTED_TOO_DEEP if limit <= 0 else {key: cut_nesting(inner, limit - 1) for key, inner in value.items()}
    if value.__class__ is list or value.__class__ is tuple:
        return NESTED_TOO_DEEP if limit <= 0 else [cut_nesting(inner, limit - 1) for inner in value]
    return value


def text_keys(record: dict, depth: int = 8) -> dict:
    """The map with its binary keys (and those of the maps it holds, ``depth`` deep) as text, and any
    other key JSON cannot name (an ext type) as its text; its values as they are."""
    return {(key if key.__class__ is str or isinstance(key, (int, float)) or key is None else to_text(key)):
            (text_keys(value, depth - 1) if depth > 1 and isinstance(value, dict) else value)
            for key, value in record.items()}


def field_map_json(record: dict) -> str:
    """A field map as one JSON text: binary strings, keys too, as the text the sidecar reads (Fluentd
    sends what in_tail read as msgpack bin; json.dumps refuses bytes keys, and str() wrote "b'GET'")."""
    return json.dumps(text_keys(record), default=to_text, ensure_ascii=False, skipkeys=True)


def as_text(value: object) -> Optional[str]:
    """A field's value as text; None stays None (absent)."""
    return value if value is None or value.__class__ is str else to_text(value)


def text_columns(fields: Sequence[dict], names: Iterable[str]) -> dict[str, list]:
    """Each named field of the field maps as a column of text (None where a map lacks it)."""
    return {name: [as_text(one.get(name)) for one in fields] for name in names}


def with_prefixes(names: Iterable[str]) -> frozenset:
    """The names and each of their dotted prefixes (``http.request.method``: also ``http`` and
    ``http.request``): the keys under which a field map may hold them, nested."""
    found = set()
    for name in names:
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(found)


@dataclass
class RecordBatch:
    fields: list[Fields]
    parsed: list[bool]
    truncated: list[bool]  # a raw line was cut to max_line_chars before parsing


class RecordNormalizer:
    """Normalizes records for one log format and the fields its featurizer reads."""

    def __init__(self, log_format: str, wanted_fields: Iterable[str], max_line_chars: int = DEFAULT_MAX_LINE_CHARS,
                 also: Iterable[str] = (), native=None, aliases: Optional[dict] = None, message_levels: bool = True,
                 combined: bool = False):
        """``also``: fields read besides the wanted ones (windows and clients): a field map lacking
        one gets it from an alias, after its raw line was parsed (a line's own value wins).
        ``native``: the compiled featurizer's module, or None (the Python reference). ``aliases``:
        field -> other names, the model's own (its spec's), beside the format's FIELD_ALIASES.
        ``message_levels``: a syslog message's level word counts (windows.LEVELS_READ 2). ``combined``: the
        model's access log is in the combined format, so a null referer and agent are its "-" "-"."""
        self.log_format = log_format
        self.parse = get_parser(log_format)
        self.wanted = tuple(wanted_fields)
        self.aliases = dict(FIELD_ALIASES.get(log_format, {}))
        for name, more in (aliases or {}).items():  # the format's names first, then the model's own
            self.aliases[name] = tuple(dict.fromkeys((*self.aliases.get(name, ()), *more)))
        also = tuple(also)
        self.also = tuple(name for name in also if name not in self.wanted and self.aliases.get(name))
        self.max_line_chars = max_line_chars
        # Keys of a field map that could give a wanted field a value of its own: wanted names, their
        # aliases, and every dotted prefix of them (a nested map flattens to the full name).
        self._own_keys = with_prefixes({*self.wanted, *(alias for name in self.wanted
                                                         for alias in self.aliases.get(name, ()))})
        # An unparsed line gives {"message": line}: then a map holding it would differ.
        self._lines_carried = log_format == "access" and bool(self.wanted) and "message" not in self.wanted
        # A message's head gives its time and level (parsers.line_head) to windows and clients that
        # read them: a plain line's, and a syslog message's level (a file holds no priority).
        self._heads = ((log_format == "plain" or log_format == "syslog" and message_levels)
                       and not {"time", "level"}.isdisjoint(also))
        self._read_head = head_reader(native)
        self._line_aliases = log_format == "jsonl" and bool(self.aliases)
        # NOTE: Fluentd's apache2 parser sends null for a "-" (no agent, no referer, no size): read as
        # missing, every such record held a feature never seen in training ("user_agent tokens:
        # (missing)"), scoring 0.73-0.84 where its raw line scored 0.0 (140 of 3,004 records).
        self._dashes = tuple(ACCESS_DASHES.items()) if log_format == "access" else ()
        self._combined = combined
        self._reads_url = "url" in self.wanted
        # NOTE: nginx's JSON access logs (log_format ... escape=json, as commonly written) name the whole
        # request line `request` ("GET /a?b=1 HTTP/1.1"), with no method or path of their own: read
        # through the url alias, the URL held the method and protocol and the method was missing, and
        # the shipped model flagged 2,000 of 2,000 normal records. Such a line is split as a raw line's is.
        self._url_only_in_request = (tuple(alias for alias in self.aliases.get("url", ()) if alias != "request")
                                     if log_format == "access" and "request" in self.aliases.get("url", ()) else None)

    def _read_dashes(self, fields: dict) -> None:
        """Null fields as the line's "-" reads (ACCESS_DASHES); referer and agent only on a combined line
        (one of them there, or the model's log is combined): both null, the line may be in the common
        format, which has neither."""
        combined = self._combined or any(fields.get(name) is not None for name in COMBINED_ONLY)
        for name, dash in self._dashes:
            if name in fields and fields[name] is None and (combined or name not in COMBINED_ONLY):
                fields[name] = dash

    def normalize(self, records: Sequence[object]) -> RecordBatch:
        fields, parsed, truncated = [], [], []
        for record in records:
            one, ok, cut = self.normalize_one(record)
            fields.append(one)
            parsed.append(ok)
            truncated.append(cut)
        return RecordBatch(fields, parsed, truncated)

    def _parse_line(self, raw: object) -> tuple[Fields, bool, bool]:
        """(fields, parsed, cut): the line parsed after the truncation rule."""
        text = to_text(raw)
        cut = len(text) > self.max_line_chars
        fields, ok = self.parse(text[: self.max_line_chars] if cut else text)
        if self._line_aliases:  # a JSON line names its fields as its logger does
            self._alias(self._alias(fields, self.wanted), self.also)
        return self._with_head(fields), ok, cut

    def carried_lines(self, records: Sequence[object], also: Sequence[str] = ()) -> list:
        """The records, with each field map whose wanted fields (and the fields named in ``also``)
        can only come from the raw line it holds (``message``/``log``: Fluentd's and Fluent Bit's
        tail) replaced by that line. Same fields as normalize_one gives, but for the map's own
        message/log (``carried_raw_lines`` gives them back); the compiled reader parses lines
        itself, where a field map costs it a call back into Python."""
        if not self._lines_carried:
            return list(records)
        own = self._own_keys
        if also:
            # A map holding one of these fields keeps its own value of it. NOTE: not message/log
            # themselves (every carried map holds one), nor its time (Docker's and Logstash's maps
            # carry one): carried_raw_lines gives them back.
            own = own | with_prefixes(set(also) - set(RAW_LINE_KEYS) - set(TIME_FIELDS))
        lines = []
        for record in records:
            if record.__class__ is dict and own.isdisjoint(record):
                for key in RAW_LINE_KEYS:
                    raw = record.get(key)
                    if raw is not None:
                        break
                if raw.__class__ is str:
                    record = raw
                elif raw.__class__ is bytes:  # Fluentd's in_tail reads binary strings: msgpack bin
                    record = to_text(raw)
            lines.append(record)
        return lines

    @staticmethod
    def carried_raw_lines(records: Sequence[object], lines: Sequence[object], columns: dict[str, list]) -> None:
        """Columns named message or log, or a time field, for records carried_lines replaced by
        their line: the map's own value, as normalize_one gives it (its fields win over the
        parsed line's; a parsed line has no message or log of its own)."""
        replaced = [row for row, (record, line) in enumerate(zip(records, lines))
                    if line is not record and record.__class__ is dict]
        # The maps holding a time field of their own, found in one pass (most hold none).
        timed = [row for row in replaced if not _TIME_KEYS.isdisjoint(records[row])]
        for name, rows in [*((name, replaced) for name in RAW_LINE_KEYS), *((name, timed) for name in TIME_FIELDS)]:
            column = columns.get(name)
            if column is None:
                continue
            line_has_one = name in _TIME_KEYS
            for row in rows:
                value = records[row].get(name)
                # A map there is flattened into "name.key" fields (normalize_one): none of its own.
                if line_has_one and (value is None and name not in records[row] or isinstance(value, dict)):
                    continue  # the line's own time stands
                column[row] = None if isinstance(value, dict) else as_text(value)

    def normalize_one(self, record: object) -> tuple[Fields, bool, bool]:
        """(fields, parsed, cut) of one record; the compiled featurizer calls it for what it does not read itself."""
        if not isinstance(record, dict):
            return self._parse_line(record)
        fields = flatten(record) if any(isinstance(v, dict) for v in record.values()) else dict(record)
        if self._url_only_in_request is not None and "url" not in fields:
            self._read_request_line(fields)
        self._alias(fields, self.wanted)
        if self._dashes:
            self._read_dashes(fields)
            if self._reads_url and fields.get("url") is None and fields.get("method") is not None:
                self._read_lone_method(fields)
        if all(name in fields for name in self.wanted):
            return self._alias(self._with_head(fields), self.also), True, False
        if any(key.__class__ is bytes for key in record):
            # NOTE: Fluentd's regexp parsers (regexp, nginx, syslog, ...) name the fields of a line holding
            # a non-ASCII byte with binary strings (msgpack bin): read as bytes, none of them was found,
            # and such a line (Unicode in a message) was flagged as not parsing. Checked only here, so
            # records whose fields are found cost nothing more.
            return self.normalize_one(text_keys(record))
        for key in RAW_LINE_KEYS:
            raw = fields.get(key)
            if raw is not None:
                parsed_fields, ok, cut = self._parse_line(raw)
                if not ok:  # a raw line that does not parse: the record is unparsed, as the line alone
                    return self._alias(fields, self.also), ok, cut
                # Fields the shipper already extracted win over re-parsed ones, but not the raw line
                # itself: a syslog line sent as {"message": line} (Fluentd's in_tail `none`; Fluent
                # Bit's tail: log, aliased) kept the whole line as its message, where the line alone
                # gives the text after `app[pid]:`: a model trained on files flagged all of them.
                extracted = {name: value for name, value in fields.items()
                             if not (value is raw and name in parsed_fields)}
                return self._alias({**parsed_fields, **extracted}, self.also), ok, cut
        # NOTE: a map with none of the model's fields and no raw line is not a record of this
        # format (a shipper's message key renamed, another log routed here): unparsed, as such a
        # line is, not scored quietly as a record with every field missing.
        return self._alias(fields, self.also), any(name in fields for name in self.wanted), False

    @staticmethod
    def _read_lone_method(fields: dict) -> None:
        """A method with no url is a request line with no space: Fluentd's and Fluent Bit's apache2 and
        nginx parsers read it whole as the method ("(?<method>\\S+)", the path optional). The raw
        line keeps it as its url (parsers.request_fields); so does the map."""
        # NOTE: read as a method, a TLS handshake sent to the plain port ("\x16\x03\x01...", 400)
        # or a request that never came ("-", 408) scored 0.98, unflagged, where its raw line scored 1.0.
        fields["url"] = fields.pop("method")

    def _read_request_line(self, fields: dict) -> None:
        """method, url and protocol of a map's request line (``request``) where no other field gives
        the url; a map's own method or protocol wins."""
        request = fields.get("request")
        # (a shipper's null is no field: {"request": "GET /a HTTP/1.1", "path": null} read its url as null)
        if request is None or any(fields.get(alias) is not None for alias in self._url_only_in_request):
            return
        for name, value in request_fields(to_text(request)).items():
            if fields.get(name) is None:
                fields[name] = value

    def _with_head(self, fields: Fields) -> Fields:
        """The time and level a record's message begins with (parsers.line_head), where it has none
        of its own: a plain line, alone or held in a map (Fluentd's in_tail ``none``, Fluent Bit's
        tail); a syslog message's level where no priority gives one (``sshd[9]: error: ...``)."""
        line = fields.get("message") if self._heads else None
        if isinstance(line, (bytes, bytearray)):
            # NOTE: Fluentd's in_tail sends its lines as binary strings (msgpack bin): read as text,
            # as the featurizer reads them. Skipped, a backlog tailed with `none` had no time of
            # its own (counted as a burst: "route=zk: 509 records in 1 min") and no level.
            line = to_text(line)
        elif line.__class__ is not str:
            return fields
        head = self._read_head(line)
        if self.log_format == "syslog":
            level = head.get("level")
            head = {} if level is None or "pri" in fields or "severity" in fields else {"level": level}
        for name, value in head.items():
            fields.setdefault(name, value)
        return fields

    def _alias(self, fields: Fields, names: Sequence[str]) -> Fields:
        """Each of ``names`` the map lacks, from the first of its aliases it holds."""
        for name in names:
            if name not in fields:
                for alias in self.aliases.get(name, ()):
                    if alias in fields:
                        fields[name] = fields[alias]
                        break
        return fields


# A decoded value's type as its sender wrote it (msgpack's words; JSON's where they differ): errors
# named Python's (an event stream entry that was nil: "got a NoneType").
MSGPACK_TYPES = {type(None): "nil", bool: "a boolean", int: "an integer", float: "a float", str: "a string",
                 bytes: "binary", list: "an array", tuple: "an array", dict: "a map"}
JSON_TYPES = {**MSGPACK_TYPES, type(None): "null", int: "a number", float: "a number", dict: "an object"}


def type_name(value: object, names: dict = MSGPACK_TYPES) -> str:
    return names.get(type(value), "an ext value")


def describe_entry(entry: object) -> str:
    """What an event stream entry that is not [time, record] is, for the error that names it."""
    if not isinstance(entry, (list, tuple)):
        return type_name(entry)
    if len(entry) != 2:
        return f"an array of {len(entry)} items"
    return f"{type_name(entry[1])} for its record"


def value_counting_hooks(charge, built: Optional[list[int]] = None) -> dict:
    """msgpack Unpacker hooks that ``charge`` each array and map as it is built with the values it
    holds (itself and its items; a map's keys too), before the next is decoded; ``built[0]`` counts
    the arrays and maps built."""
    built = [0] if built is None else built

    def counted_list(values: list) -> list:
        charge(len(values) + 1)
        built[0] += 1
        return values

    # NOTE: object_hook, not object_pairs_hook: msgpack builds the dict itself, 0.3 µs a record less;
    # a map that names a key twice is charged for the keys it keeps, which is what it holds
    def counted_map(pairs: dict) -> dict:
        charge(2 * len(pairs) + 1)
        built[0] += 1
        return pairs

    return {"list_hook": counted_list, "object_hook": counted_map}


def event_seconds(value: object) -> float:
    """An entry's time as Unix seconds: a number, Fluentd's EventTime (msgpack ext 0: seconds and
    nanoseconds, big-endian), a msgpack Timestamp, Fluent Bit's ``[time, metadata]``, or ISO 8601
    text; NaN for anything else (the record then counts as arriving now)."""
    import msgpack

    if isinstance(value, (list, tuple)) and not isinstance(value, msgpack.ExtType):
        value = value[0] if value else None
    if isinstance(value, bool):
        return math.nan
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:
            return math.nan
    if isinstance(value, msgpack.ExtType) and value.code == 0 and len(value.data) == 8:
        return int.from_bytes(value.data[:4], "big") + int.from_bytes(value.data[4:], "big") / 1e9
    if isinstance(value, msgpack.Timestamp):
        return value.to_unix()
    if isinstance(value, str):  # ISO 8601 and the other texts a record's own time may hold
        seconds = parse_time(value)
        return math.nan if seconds is None else seconds
    return math.nan


def event_times(values: Sequence[object]) -> np.ndarray:
    """Entries' times as Unix seconds (``event_seconds``; plain numbers at numpy's speed)."""
    if set(map(type, values)) <= {int, float}:
        try:
            return np.asarray(values, dtype=np.float64)
        except OverflowError:  # an integer past 64 bits
            pass
    return np.array([event_seconds(v) for v in values], dtype=np.float64)


TOO_DEEP_NOTE = (f"nested more than {MAX_RECORD_DEPTH} maps and arrays deep: scored with what lies deeper read as "
                 f"{NESTED_TOO_DEEP!r}; send flatter records")


class EventStream(NamedTuple):
    records: list[dict]
    times: list[object]  # as sent (``event_times`` reads them)
    notes: list[tuple[int, str, str]]  # (record, field, description): records nested past MAX_RECORD_DEPTH


GZIP_MAGIC = b"\x1f\x8b"


MSGPACK_MAX_DEPTH = 1024  # msgpack decodes, and skips, arrays and maps nested this deep at most (StackError)
MSGPACK_TOO_DEEP = (f"nested more than {MSGPACK_MAX_DEPTH:,} arrays and maps deep (msgpack's limit): send flatter "
                    "records")


def msgpack_problem(error: Exception, data: bytes, offset: int) -> str:
    """What msgpack's ``error`` decoding ``data`` means and what to do; ``offset``: where decoding
    stopped (the unpacker's tell(): the offending byte for a FormatError). msgpack's own errors
    name a class only (StackError, FormatError)."""
    import msgpack

    if isinstance(error, msgpack.StackError):
        return MSGPACK_TOO_DEEP
    if isinstance(error, msgpack.FormatError) and offset < len(data):
        return (f"byte 0x{data[offset]:02x} at offset {offset:,} starts no msgpack value: check the shipper's "
                "msgpack encoder")
    count = str(error).split()[0]
    if "exceeds max_" in str(error) and count.isdigit():  # msgpack: "1048577 exceeds max_array_len(65536)"
        return f"an array or map of {int(count):,} values, more than {MAX_CONTAINER_VALUES:,}: split the record"
    return f"{type(error).__name__} {error}".rstrip() + ": check the shipper's msgpack encoder"


def decode_event_stream(data: bytes, max_records: float = math.inf, ticket: Ticket = UNLIMITED) -> EventStream:
    """Records of a Fluentd event stream (msgpack ``[time, record]`` arrays back to back), their
    times as sent, and a note on each record nested past MAX_RECORD_DEPTH (cut there: ``cut_nesting``).

    Raises InvalidRequest naming the entry that is not ``[time, record]`` or
    where the bytes stop making sense, or past ``max_records`` entries; every
    array and map decoded is charged to ``ticket`` as it appears, so a stream of
    tiny values is refused (Overloaded) before it fills the memory.
    """
    import msgpack

    if data[:2] == GZIP_MAGIC:  # (read as msgpack: "entry 0: ... got an integer", compression unsaid)
        raise InvalidRequest("event_stream is gzip-compressed (Fluentd's CompressedPackedForward): not supported; "
                             "send the msgpack uncompressed (gRPC's own compression, grpc-encoding gzip, is)")
    built = [0]  # arrays and maps decoded: an entry of at most MAX_RECORD_DEPTH nests no deeper
    unpacker = msgpack.Unpacker(raw=False, unicode_errors="replace", strict_map_key=False,
                                max_buffer_size=max(len(data), 1024),
                                **value_counting_hooks(ticket.charge_values, built),
                                max_array_len=MAX_CONTAINER_VALUES, max_map_len=MAX_CONTAINER_VALUES)
    unpacker.feed(data)
    records: list[dict] = []
    times: list[object] = []
    notes: list[tuple[int, str, str]] = []
    consumed = 0  # NOTE: tell() after the loop counts a partial last entry too
    containers_before = 0
    try:
        for entry in unpacker:
            consumed = unpacker.tell()
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)):
                raise InvalidRequest(f"event_stream entry {len(records)}: expected [time, record] (a map), "
                                     f"got {describe_entry(entry)}")
            record = entry[1]
            # NOTE: looked into only when the entry holds enough arrays and maps to nest so deep:
            # looking into every record cost 0.3 µs a flat one, 2 µs one with Kubernetes' metadata
            if built[0] - containers_before > MAX_RECORD_DEPTH and nested_deeper_than(record, MAX_RECORD_DEPTH):
                record = cut_nesting(record)
                notes.append((len(records), "record", TOO_DEEP_NOTE))
            containers_before = built[0]
            records.append(record)
            times.append(entry[0])
            if len(records) > max_records:
                raise InvalidRequest(f"event_stream holds more than {max_records} records, the limit "
                                     "(split the stream)")
    except TypeError:  # an array or a map as a map key (unhashable)
        raise InvalidRequest(f"event_stream: invalid msgpack at entry {len(records)}: "
                             "a map key is an array or a map") from None
    except (ValueError, msgpack.UnpackException) as error:
        raise InvalidRequest(f"event_stream: invalid msgpack at entry {len(records)}: "
                             f"{msgpack_problem(error, data, unpacker.tell())}") from None
    if consumed != len(data):
        raise InvalidRequest(f"event_stream: truncated after entry {len(records)} "
                             f"({len(data) - consumed} bytes left over)")
    return EventStream(records, times, notes)
