"""Records in, field maps out: the one place where input shapes are unified.

A record is a field map (a Fluentd record, a Logstash event, a JSON object) or a
raw line. Raw lines are parsed with the model's log format; field maps are used
as they are, with other shippers' field names mapped to ours, and a raw line
held in ``message``/``log`` parsed when the fields the model needs are absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import InvalidRequest
from .parsers import FIELD_ALIASES, Fields, flatten, get_parser

RAW_LINE_KEYS = ("message", "log")


def to_text(value: object) -> str:
    """Any field value as text; undecodable bytes become U+FFFD, never an error."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


@dataclass
class RecordBatch:
    fields: list[Fields]
    parsed: list[bool]


class RecordNormalizer:
    """Normalizes records for one log format and the fields its featurizer reads."""

    def __init__(self, log_format: str, wanted_fields: Iterable[str]):
        self.log_format = log_format
        self.parse = get_parser(log_format)
        self.wanted = tuple(wanted_fields)
        self.aliases = FIELD_ALIASES.get(log_format, {})

    def normalize(self, records: Sequence[object]) -> RecordBatch:
        fields, parsed = [], []
        for record in records:
            one, ok = self.normalize_one(record)
            fields.append(one)
            parsed.append(ok)
        return RecordBatch(fields, parsed)

    def normalize_one(self, record: object) -> tuple[Fields, bool]:
        if not isinstance(record, dict):
            return self.parse(to_text(record))
        fields = flatten(record) if any(isinstance(v, dict) for v in record.values()) else dict(record)
        for name in self.wanted:
            if name not in fields:
                for alias in self.aliases.get(name, ()):
                    if alias in fields:
                        fields[name] = fields[alias]
                        break
        if all(name in fields for name in self.wanted):
            return fields, True
        for key in RAW_LINE_KEYS:
            raw = fields.get(key)
            if raw is not None:
                parsed_fields, ok = self.parse(to_text(raw))
                if ok:
                    # Fields the shipper already extracted win over re-parsed ones.
                    return {**parsed_fields, **fields}, True
                break
        return fields, True


def decode_event_stream(data: bytes) -> list[dict]:
    """Records of a Fluentd event stream: msgpack ``[time, record]`` arrays back to back.

    Raises InvalidRequest naming the entry that is not ``[time, record]`` or
    where the bytes stop making sense.
    """
    import msgpack

    unpacker = msgpack.Unpacker(raw=False, unicode_errors="replace", strict_map_key=False,
                                max_buffer_size=max(len(data), 1024))
    unpacker.feed(data)
    records: list[dict] = []
    consumed = 0  # NOTE: tell() after the loop counts a partial last entry too
    try:
        for entry in unpacker:
            consumed = unpacker.tell()
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)):
                raise InvalidRequest(f"event_stream entry {len(records)}: expected [time, record], "
                                     f"got {type(entry).__name__}")
            records.append(entry[1])
    except (ValueError, msgpack.UnpackException) as error:
        raise InvalidRequest(f"event_stream: invalid msgpack at entry {len(records)}: "
                             f"{type(error).__name__} {error}".rstrip()) from None
    if consumed != len(data):
        raise InvalidRequest(f"event_stream: truncated after entry {len(records)} "
                             f"({len(data) - consumed} bytes left over)")
    return records
