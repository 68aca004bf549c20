"""The Fluentd forward protocol: receive, score, pass on to a next hop, then acknowledge.

For shippers that cannot load a plugin (Fluent Bit, Docker's fluentd logging
driver, a locked-down Fluentd): point their forward output at the sidecar, and
the sidecar's forward output at the real aggregator.

    sender ──forward──► sidecar (adds anomaly_score, is_anomaly) ──forward──► next hop

Modes received: Message ``[tag, time, record(, option)]``, Forward
``[tag, [[time, record], ...](, option)]`` (Fluent Bit's ``[[time, metadata],
record]`` entries too), PackedForward ``[tag, bytes(, option)]`` and
CompressedPackedForward (``option.compressed == "gzip"``; any compression but gzip and "text" is
refused, naming the fix). Each entry's time
goes on exactly as it came (integer, float, EventTime, Fluent Bit's
``[time, metadata]`` pair). The next hop receives PackedForward.

- **At-least-once.** A sender's chunk (``option.chunk``) is acknowledged only
  after the next hop acknowledged every record of it. If the next hop fails, the
  sender gets no ack (its connection is closed) and resends. A sender that asks
  for no acks cannot resend, so its records are held and retried until the next
  hop takes them.
- **Bounded memory, backpressure.** At most ``ACTIVE_CONNECTIONS`` connections are
  read past a message's first ``UNADMITTED_BYTES`` at a time; the others wait unread
  past that, so a backlog stays in the senders' buffers. A message's bytes are read whole (``MessageFramer``: msgpack
  skips over them, building nothing) before any of it is decoded. A big chunk is then decoded,
  scored and passed on in slices (Forward and PackedForward entries are decoded as they are
  needed; compressed payloads are inflated in steps, refused past ``INFLATION`` times
  ``forward_max_message_bytes``), and at most ``RELAY_WINDOW`` messages' worth of scored frames
  wait for the next hop's acks. What a slice decodes into is bounded too: a slice ends at
  ``SLICE_VALUES`` values, and past ``MAX_DECODED_VALUES`` arrays, maps and items (``ValueBudget``)
  an entry is skipped (any other value: the message is refused), since tiny msgpack values cost
  30-90 bytes each as Python objects.
- **The event loop is not held long.** Decoding goes ``DECODE_STEP`` bytes at a time and lets
  the loop run between steps (``SteppedDecoder``): a huge or hostile message holds it for a step
  (about 10 ms) or a full garbage collection over what it decoded (up to about 100 ms at the
  cap), not for the second its decoding takes.
- **Coalescing.** Messages that arrive together (Fluent Bit's Message mode sends
  one per record) are scored in one call and passed on together.
- Scoring failures never hold records: they go on marked ``anomaly_unscored``, the reason
  in ``anomaly_notes`` (where scored records carry the sidecar's notes). Fluent Bit's group
  markers (OpenTelemetry resource and scope) go on untouched, unscored.
  When the scoring queue is full the default is to wait (backpressure);
  ``forward_when_busy: pass`` passes such records on unscored instead.
- Entries that are not ``[time, record]`` are skipped with a warning (as Fluentd's
  in_forward does), and so are entries whose time no receiver reads or whose record nests
  past ``MAX_RECORD_DEPTH`` (a Fluent Bit next hop drops a whole chunk holding one), and
  entries msgpack cannot decode (nested past its 1,024 levels too), by their bytes, in every mode;
  bytes that are not the forward protocol close the connection.
  Shared-key handshakes are not supported (keep the port on loopback; docs/operations.md).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import hashlib
import logging
import re
import struct
import termios
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterable, Iterator, Optional, Union

import msgpack

from ..decide import notes_by_record
from ..errors import LogscoreError, ModelNotFound, Overloaded, TagTooLong
from ..features import native
from ..metrics import OncePerInterval
from ..records import (MAX_RECORD_DEPTH, MSGPACK_MAX_DEPTH, MSGPACK_TOO_DEEP, cut_text, describe_entry,
                       nested_deeper_than, type_name, value_counting_hooks)
from ..scoring import ScoreCall, ScoringService
from .streams import StreamServer

log = logging.getLogger("logscore.forward")

SCORE_KEY, FLAG_KEY, MODEL_KEY, UNSCORED_KEY = "anomaly_score", "is_anomaly", "anomaly_model", "anomaly_unscored"
ENTITY_KEY = "entity_score"
EXPLANATION_KEY = "anomaly_explanation"  # what made a flagged record unusual, as the Fluentd filter's explanation_key
NOTES_KEY = "anomaly_notes"  # the sidecar's notes on a record, as the Fluentd filter's notes_key; why one is unscored
# NOTE: Fluent Bit 2+ frames a group of records (OpenTelemetry's resource and scope) by two
# entries of its own whose time's seconds are -1 (start) and -2 (end); they hold the group's
# attributes, not a log record.
GROUP_MARKER_SECONDS = (-1, -2)
GROUP_MARKER_EVENT_SECONDS = tuple(second.to_bytes(4, "big", signed=True) for second in GROUP_MARKER_SECONDS)
MAX_NANOSECONDS_BYTES = (10**9).to_bytes(4, "big")  # an EventTime's nanoseconds, compared as bytes
# NOTE: Fluentd's out_forward packs the entries of PackedForward as a msgpack *str*, and
# records may hold invalid UTF-8: strings are decoded with surrogateescape (and encoded
# back the same way) so every byte reaches the next hop as it came.
EXACT = "surrogateescape"
READ_BYTES = 256 * 1024  # what an admitted connection reads at a time
# What a connection may hold of a message before it is admitted: held twice (the framer's buffer and
# msgpack's skipper), as much as one unframed read of READ_BYTES held before
UNADMITTED_BYTES = READ_BYTES // 2
SKIPPER_START_BYTES = 16 * 1024  # a connection's message framer's first buffer (it grows as needed)
ACTIVE_CONNECTIONS = 2  # read, scored and relayed at once; the rest wait unread (backpressure)
INFLATE_STEP = 1024 * 1024
PARTIAL_MESSAGE_TIMEOUT_S = 10.0  # an admitted connection must finish the message it started (and read its acks)
REFUSED_CHUNKS_KEPT = 1024  # chunk ids refused as read into, acknowledged when they come again as they were
SILENT_SENDER_S = 5.0  # a new connection sending nothing this long is noted in the log (info: idle is normal)
TLS_HANDSHAKE = b"\x16\x03"  # a TLS record of type handshake, version 3.x: a ClientHello (no msgpack array)
MAX_INVALID_ENTRIES = 1000  # skipped like Fluentd's in_forward does; this many means it is not a chunk
MAX_REFUSALS = 5  # a reachable next hop that drops held records this often refuses them: give up
# A next hop that takes connections and bytes but acks nothing (paused, overloaded, or answering no
# acks) is held for this many forward_ack_timeout_s (5 minutes by default), then given up on: it was
# given up on after 5 tries (a 40-s pause lost records it would have taken), then never (a hop that
# answers no acks got a sender's records again on every try, for good).
STALLED_HOLD_ACK_TIMEOUTS = 30
# NOTE: a payload is inflated once to count it (so a refused one relays nothing), then again in
# steps as it is decoded; memory stays bounded either way. Access logs inflate 8-12 times and
# repetitive ones far more, while gzip's own limit is about 1,000: a lower cap refuses real
# chunks, and a refused chunk stalls its sender for good (it is resent on every retry).
INFLATION = 64  # a compressed payload may inflate to this many times forward_max_message_bytes
RELAY_WINDOW = 2  # scored frames sent and not yet acked, per relay, in forward_max_message_bytes
# NOTE: a decoded value costs 30-90 bytes of Python objects however small its msgpack: one 16 MiB
# record of nested empty arrays decoded to 1.1 GiB (blocking the event loop 5-10 s). Past this many
# values held at once a message is refused: at most about 60 MiB decoded (short strings, 60 bytes a
# value). It is the only bound on a message's shape: msgpack's caps on one array or map apply at
# every depth, and a record they refused (10,001 keys) could not be relayed, so its chunk was resent
# for ever. It was 3,000,000 while Forward-mode messages were decoded whole (100,000 entries of 14
# fields); entries now come slice by slice (SLICE_VALUES), so only one record of 700,000 values or
# more reaches it. Lower, a refused bomb costs less: 0.5 s of CPU instead of 1.4 s, and a third of
# the full garbage collections, each of which holds the event loop 50-90 ms at the cap.
MAX_DECODED_VALUES = 1_000_000  # values decoded and held at once: per connection, per slice of entries
# NOTE: a Forward-mode message was decoded whole: 90,000 entries of 14 fields held 2,900,000 values
# (+160 MiB RSS for one connection, +313 MiB for the two read at once). Slices end here too,
# whatever their records: about 20 MiB of objects.
SLICE_VALUES = 300_000
# NOTE: msgpack decodes what it is fed in one call, holding the event loop: a 16 MiB message of
# empty arrays took 0.1-0.25 s per 256 KiB read and stalled other connections' requests (each
# needs a few turns of the loop) for 0.9-1.2 s. Fed this much at a time, a step decodes at most
# 16,000 values (about 10 ms at worst), then the loop runs others.
DECODE_STEP = 16 * 1024
YIELD_AFTER_S = 0.005  # decoding lets the loop run once it has held it this long
INLINE_CHECK_BYTES = 64 * 1024  # a plain PackedForward payload checked on the event loop: under ~3 ms skipped


class ForwardProtocolError(ValueError):
    """The sender's bytes are not a forward-protocol message; the connection is closed."""


class SpeaksTls(ForwardProtocolError):
    """The sender opened with a TLS ClientHello: it was set up for TLS; forward mode speaks plain forward."""


class InvalidEntry(ValueError):
    """One entry is not ``[time, record]``; it is skipped."""


class UndecodableValue(ForwardProtocolError):
    """A value msgpack could not decode (a reserved ext type, an array as a map key) or that holds
    more than MAX_DECODED_VALUES values (``over_budget``: with what the budget held before it)."""

    def __init__(self, text: str, over_budget: bool = False):
        super().__init__(text)
        self.over_budget = over_budget


class OverBudget(ForwardProtocolError):
    """A ValueBudget's limit was passed."""


class DecodeAfterRelay(Exception):
    """A message went over the connection's value budget that messages read before it still hold:
    those go on first and let their values go, then it is decoded again."""


class NextHopError(ConnectionError):
    """The next hop is down, refused, or did not acknowledge in time."""


class _HopStalled(Exception):
    """The next hop's connection made no progress at all for ack_timeout_s."""


class _RelayStalled(Exception):
    """One relay's frames made no progress for ack_timeout_s while others' did."""


# --- decoding -------------------------------------------------------------------------

@dataclass
class Message:
    tag: str
    entries: Union[list, AsyncIterator]  # [time, record] arrays; decoded as consumed (Forward, PackedForward)
    chunk: object  # the sender's chunk id, any msgpack value (None: no ack wanted)
    raw: object = None  # the message as received, kept for those passed on untouched
    is_log: bool = True  # Fluent Bit also forwards metrics and traces (option fluent_signal)
    packed: Optional[bytes] = None  # a PackedForward payload, to be checked before it is decoded
    gzipped: bool = False
    budget: Optional["ValueBudget"] = None  # what lazily decoded entries may hold (Forward, PackedForward)
    size: Optional[int] = None  # the entries its sender says the chunk holds (option size), if it says
    entries_read: int = 0  # entries taken from it so far, skipped ones too
    entries_skipped: int = 0

    def read_into(self) -> bool:
        """Bytes of another message were read as this one's: some of its entries were broken and
        their number is not the one its option gives.

        NOTE: a message cut short swallows the bytes after it until its own structure is complete,
        and may end with the next message's option: the next chunk's id acked, its records skipped
        as broken entries of this one (a fuzz trial: valid records acked, never passed on). A sender
        counts every entry it packs, broken ones too, so a broken entry alone changes nothing. About
        half of such merged messages are caught so; the rest look valid (operations.md, the limit)."""
        return self.entries_skipped > 0 and self.size is not None and self.size != self.entries_read

    async def check_payload(self, max_message_bytes: int) -> None:
        """Refuse, before any of its entries go on, a PackedForward log payload that decoding would refuse
        once slices of it went on (``check_packed``). A plain payload of at most INLINE_CHECK_BYTES is
        skipped through on the event loop; a thread is taken only for a gzip or bigger one, or once an
        entry needs walking by its headers.

        NOTE: every PackedForward chunk went to a thread, about 50 µs a hop: a one-record chunk was read
        and decoded in 71-77 µs of CPU instead of 10 (now 14)."""
        if self.packed is None or not self.is_log:  # (one that is not logs is passed on as it came)
            return
        if not self.gzipped and len(self.packed) <= INLINE_CHECK_BYTES:
            payload = PackedPayload(iter((self.packed,)), len(self.packed))
            if _skipped_to_walk(payload, 0, packed_buffer_size(max_message_bytes), InvalidEntries()) is None:
                return
        await asyncio.to_thread(check_packed, self.packed, self.gzipped, max_message_bytes)


# Secure forward's answers to a HELO: PING (6 items), PONG (5); no log message has more than 4. NOTE:
# read as a log message, a PING's hostname was taken for PackedForward entries: skipped with a
# warning about entries, unacknowledged, the connection left open until the sender gave up.
HANDSHAKE_MESSAGES = ("PING", "PONG")


def describe_message(message) -> str:
    """What a message that is not [tag, ...] is, for the error that names it."""
    if not isinstance(message, (list, tuple)):
        return type_name(message)
    if len(message) < 2:
        return f"an array of {len(message)} item{'s' if len(message) != 1 else ''}"
    return f"an array whose first item is {type_name(message[0])}, not a tag string"


def decode_message(message, max_message_bytes: int) -> Message:
    """A message decoded whole (all but Forward mode's entries, see ``read_message``)."""
    if not isinstance(message, (list, tuple)) or len(message) < 2 or not isinstance(message[0], str):
        raise ForwardProtocolError(f"expected [tag, ...], got {describe_message(message)}")
    tag, payload = message[0], message[1]
    if tag in HANDSHAKE_MESSAGES and len(message) > 4:
        raise ForwardProtocolError(f"a secure-forward {tag} (the sender has a shared_key), which the sidecar does not "
                                   "speak (it sends no HELO): remove the shared_key towards the sidecar")
    option = message[-1] if len(message) >= 3 and isinstance(message[-1], dict) else {}
    data, gzipped, budget = None, False, None
    if isinstance(payload, (bytes, str)):  # PackedForward (str when the sender packed it as str)
        data = payload.encode("utf-8", EXACT) if isinstance(payload, str) else payload
        budget = ValueBudget(MAX_DECODED_VALUES, "a slice of PackedForward entries")
        gzipped = _compression(option) == "gzip"
        entries: Union[list, AsyncIterator] = packed_entries(data, gzipped, max_message_bytes, budget)
    elif _is_array(payload) and not _is_time(payload) and len(message) <= 3:
        entries = payload  # Forward (entries that are not [time, record] are skipped and counted)
    elif len(message) in (3, 4):  # Message: [tag, time, record(, option)], its entry checked like any
        option = message[3] if len(message) == 4 and isinstance(message[3], dict) else {}
        entries = [[payload, message[2]]]
    else:
        raise ForwardProtocolError("not a Message, Forward or PackedForward message")
    return Message(tag, entries, _chunk(option), message, _is_log(option), data, gzipped, budget, _size(option))


# What option.compressed may say: Fluentd's out_forward sends "text" or "gzip" (and "zstd" since 1.19:
# read as plain entries, its chunks were refused as entries cut short, or acked with none of their
# records passed on); Fluent Bit sends "gzip" or nothing.
READABLE_COMPRESSION = (None, "text", "gzip")


def _compression(option: dict) -> Optional[str]:
    """The PackedForward payload's compression; refused, naming the fix, if the sidecar cannot read it."""
    compressed = option.get("compressed")
    if compressed not in READABLE_COMPRESSION:
        raise ForwardProtocolError(f"a PackedForward payload compressed as {cut_text(repr(compressed), 64)}, which the "
                                   "sidecar cannot read (it reads gzip): set `compress gzip` (or `compress text`) "
                                   "on the sender's forward output towards the sidecar")
    return compressed


def _chunk(option: dict) -> object:
    # NOTE: like Fluentd's in_forward, any chunk id but nil (and false) asks for an ack, echoed as it came
    chunk = option.get("chunk")
    return None if chunk is False else chunk


def _size(option: dict) -> Optional[int]:
    # NOTE: 0 is no count: Fluentd's file buffer chunk restored without its metadata says size 0
    size = option.get("size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _is_log(option: dict) -> bool:
    return option.get("fluent_signal", 0) in (0, None)


async def read_message(data: memoryview, max_message_bytes: int, budget: "ValueBudget",
                       small: "SmallDecoder") -> Message:
    """A complete message's bytes as a Message; DecodeAfterRelay if it went over the budget only with
    what messages read before it hold (decoded alone, it may fit).

    NOTE: skipped as undecodable then, a valid record was acknowledged and never relayed (one record
    of 999,980 values and 100 small ones in one write: two small ones lost)."""
    charged = budget.count
    try:
        return await _read_message(data, max_message_bytes, budget, small)
    except UndecodableValue as error:
        if error.over_budget and charged:
            budget.release(budget.count - charged)
            raise DecodeAfterRelay() from None
        raise


async def _read_message(data: memoryview, max_message_bytes: int, budget: "ValueBudget",
                        small: "SmallDecoder") -> Message:
    """A complete message's bytes as a Message. Forward mode's entries are left in the bytes and
    decoded as they are consumed (``forward_entries``); any other message is decoded whole, in steps.

    NOTE: Forward mode is told by its bytes, as decode_message tells it by its values: two or
    three items, a str tag, then an array whose first item is an array (an entry), not a time."""
    items, tag_at = _array_header(data, 0) or (0, 0)
    payload_at = _str_end(data, tag_at) if items in (2, 3) else None
    entries = _array_header(data, payload_at) if payload_at is not None else None
    if entries is not None and entries[0] and _array_header(data, entries[1]) is not None:
        option, walked_ends = {}, {}
        if items == 3:
            option_at = await _values_end(data, entries[1], entries[0], walked_ends)
            option = await SteppedDecoder(data, option_at, max_message_bytes, budget).next()
            option = option if isinstance(option, dict) else {}
        if _is_log(option):
            tag = str(data[tag_at + value_header(data, tag_at)[0]:payload_at], "utf-8", EXACT)
            slice_budget = ValueBudget(MAX_DECODED_VALUES, "a slice of Forward entries")
            entries_read = forward_entries(data, entries[1], entries[0], max_message_bytes, slice_budget,
                                           walked_ends)
            return Message(tag, entries_read, _chunk(option), budget=slice_budget, size=_size(option))
    charged = budget.count
    try:
        if len(data) <= DECODE_STEP:
            raw = small.decode(data)
        else:
            raw = await SteppedDecoder(data, 0, max_message_bytes, budget).next()
    except UndecodableValue as error:
        budget.release(budget.count - charged)  # what the failed decoding built is let go
        if error.over_budget and charged:
            raise
        return await message_mode_entry_skipped(data, items, tag_at, max_message_bytes, budget, error)
    return decode_message(raw, max_message_bytes)


async def message_mode_entry_skipped(data: memoryview, items: int, tag_at: int, max_message_bytes: int,
                                     budget: "ValueBudget", error: UndecodableValue) -> Message:
    """A Message-mode message (``[tag, time, record(, option)]``) whose time or record msgpack cannot
    decode, as a Message whose one entry is skipped by its bytes (its chunk is acknowledged); any other
    message that cannot be decoded raises ``error`` (the connection is closed).

    NOTE: refused whole, such a record closed the connection: every record sent after it on the
    connection was lost (a sender taking no acks: 1 of 102 arrived), and a sender taking acks resent
    it for ever. Forward and PackedForward skip such entries; so does Message mode now."""
    time_at = _str_end(data, tag_at) if items in (3, 4) else None
    if time_at is None or not await _may_be_message_mode_time(data, time_at, items):
        raise error
    option: object = {}
    if items == 4:
        option_at = await _skipped(data, await _skipped(data, time_at))
        charged = budget.count
        option = await SteppedDecoder(data, option_at, max_message_bytes, budget).next()  # undecodable: refused
        budget.release(budget.count - charged)  # read once, not held with the records
    option = option if isinstance(option, dict) else {}
    if not _is_log(option):  # passed on as it came, which cannot be done without decoding it
        raise error
    tag = str(data[tag_at + value_header(data, tag_at)[0]:time_at], "utf-8", EXACT)
    return Message(tag, [undecoded_entry(error)], _chunk(option), size=_size(option))


async def _may_be_message_mode_time(data: memoryview, at: int, items: int) -> bool:
    """Whether the value at ``at`` (a message's second item) may be a Message-mode time: not a
    PackedForward payload (str, bin) and, in a message of three items, not Forward mode's array of
    entries (an array is a time there only as Fluent Bit's ``[time, metadata]``)."""
    if at >= len(data) or _str_end(data, at) is not None or data[at] in (0xC4, 0xC5, 0xC6):
        return False
    entries = _array_header(data, at)
    if items == 4 or entries is None:
        return True
    if entries[0] != 2:
        return False
    metadata_at = await _skipped(data, entries[1])
    return metadata_at < len(data) and (0x80 <= data[metadata_at] <= 0x8F or data[metadata_at] in (0xDE, 0xDF))


_STR_KINDS = (0xD9, 0xDA, 0xDB)  # str 8, 16, 32 (and fixstr: 0xA0-0xBF)


def _str_end(data: memoryview, at: int) -> Optional[int]:
    """Where the msgpack str starting at ``at`` ends, or None if none starts there."""
    if at >= len(data) or not (0xA0 <= data[at] <= 0xBF or data[at] in _STR_KINDS):
        return None
    header = value_header(data, at)
    return None if header is None else at + header[0] + header[1]


SKIP_STEP = 16 * DECODE_STEP  # msgpack skips this much in about 1 ms (it builds nothing)


StepsFrom = Callable[[int, int], Iterable[memoryview]]  # (where, step size): the bytes from there, in steps


def steps_of(data: memoryview) -> StepsFrom:
    """Bytes in memory, read in steps from any position."""
    return lambda at, size: (data[start:start + size] for start in range(at, len(data), size))


async def _skipped(data: memoryview, at: int, allowance: Optional[WalkAllowance] = None) -> int:
    """Where the value starting at ``at`` ends (a walk by headers paid from ``allowance``, the
    message's, or bounded by the bytes after ``at`` only)."""
    length = await _value_length(steps_of(data), at, allowance or bytes_bound(len(data) - at))
    if length is None:
        raise ForwardProtocolError("a message ends in the middle of a value")
    return at + length


async def _value_length(steps_from: StepsFrom, at: int, allowance: WalkAllowance,
                        max_buffer_size: int = 0) -> Optional[int]:
    """How many bytes the value at ``at`` takes (None if the bytes end first): msgpack skips it step
    by step, building nothing, and the event loop runs between steps (let_loop_run). Any length of
    array or map is skipped (nothing is built); one nested deeper than msgpack reads, or holding a
    string past ``max_buffer_size``, is walked by its headers (``walked_length``, paid from
    ``allowance``); a byte no type starts with raises as msgpack does."""
    skipper = _skipper(max_buffer_size)
    held_since = time.perf_counter()
    for step in steps_from(at, SKIP_STEP):
        try:
            skipper.feed(step)
            skipper.skip()
            return skipper.tell()
        except msgpack.OutOfData:
            held_since = await let_loop_run(held_since)
        except (msgpack.StackError, msgpack.BufferFull):
            # too deep for msgpack, or a string past its buffer: walked by its headers, each byte once.
            # NOTE: BufferFull closed the connection ("not valid msgpack/gzip") after slices of its
            # chunk were relayed, and each resend relayed them again
            return await walked_length(steps_from(at, DECODE_STEP), allowance)
    return None


async def _values_end(data: memoryview, at: int, count: int, walked_ends: dict) -> int:
    """Where the ``count`` values from ``at`` end: msgpack skips them, one nested past its limit is
    walked by its headers (``_skipped``; where it ends noted in ``walked_ends`` by where it starts).

    NOTE: skipped as one array, a Forward chunk holding one deep record was walked by its headers
    whole, its 60,000 other records too (421,111 headers), after the framer had walked it so."""
    while count:
        skipped, count = await _skipped_values(data, at, count)
        at += skipped
        if count:  # the value at ``at`` nests past msgpack's limit
            start, at, count = at, await _skipped(data, at), count - 1
            walked_ends[start] = at
    return at


async def _skipped_values(data: memoryview, at: int, count: int) -> tuple[int, int]:
    """(bytes, values left): msgpack skips up to ``count`` values from ``at``, stopping at one nested
    past its limit; the event loop runs between steps."""
    skipper, skipped = _skipper(0), 0
    held_since = time.perf_counter()
    for step in steps_of(data)(at, SKIP_STEP):
        skipper.feed(step)
        try:
            while count:
                skipper.skip()
                count, skipped = count - 1, skipper.tell()
            return skipped, 0
        except msgpack.OutOfData:
            held_since = await let_loop_run(held_since)
        except msgpack.StackError:
            return skipped, count
    raise ForwardProtocolError("a message ends in the middle of a value")


def _skipper(max_buffer_size: int) -> msgpack.Unpacker:
    read_size = min(SKIP_STEP, max_buffer_size) if max_buffer_size else SKIP_STEP
    return msgpack.Unpacker(max_buffer_size=max_buffer_size, max_array_len=2**31 - 1, max_map_len=2**31 - 1,
                            read_size=read_size)


# NOTE: the framer walks a message nested past msgpack's limit by its headers, holding the event loop:
# 63 ms for a read of READ_BYTES one-byte values, 270-310 ms (/healthz) for the 1.4 MB held when a
# 60,000-record chunk's deep record showed. It walks this much (about 8 ms) between turns of the loop.
WALKED_READ_BYTES = 2 * DECODE_STEP
# Arrays and maps open at once that a walk by headers (ValueWalker) follows: deeper is no log record
# but bytes built to stall a reader.
MAX_WALK_DEPTH = MSGPACK_MAX_DEPTH + 10_000


class WalkAllowance:
    """The values one message's walks by headers (ValueWalker, about 0.3 µs of Python each) may take
    in all; past it the message is refused. A PackedForward payload's walks pay MAX_DECODED_VALUES (it
    may inflate to INFLATION times the message size), all others its bytes (``bytes_bound``).

    NOTE: walked again from the first byte on every read, one 11-byte read after a 122 KB deep prefix
    cost 60-110 ms of the event loop; entered one container at a time with a new msgpack skipper for
    each, 20 gzip entries nested 10,000 deep (293 bytes sent) cost 1.3 s. A walk now reads each byte
    once, and a message pays for at most this many values of it."""

    def __init__(self, values: int = MAX_DECODED_VALUES):
        self.values = values


def bytes_bound(size: int) -> WalkAllowance:
    """An allowance no walk of ``size`` bytes runs out of (each value takes a byte at least): for a whole
    message, which the message size limit bounds already.

    NOTE: one allowance of 1,000,000 values for the framer's walk refused a valid 90,000-record Forward
    chunk holding one deep record (1.17M values, 5.1 MB) as "not log records", and it was resent for ever."""
    return WalkAllowance(size)


async def walked_length(steps: Iterable[memoryview], allowance: WalkAllowance) -> Optional[int]:
    """How many bytes the value the steps start with takes, walked by its headers (None if the steps
    end first); the event loop runs between steps."""
    walker = ValueWalker(allowance)
    held_since = time.perf_counter()
    for step in steps:
        if walker.feed(step):
            return walker.position
        held_since = await let_loop_run(held_since)
    return None


async def forward_entries(data: memoryview, at: int, count: int, max_message_bytes: int,
                          budget: "ValueBudget", walked_ends: Optional[dict] = None) -> AsyncIterator:
    """The ``count`` entries of a Forward-mode array starting at ``at``, decoded one at a time; one that
    cannot be decoded is skipped to where ``walked_ends`` says it ends (walked already), else walked.

    NOTE: a deep entry was walked again here after the search for the chunk's option walked it: a 4 MiB
    chunk of 3,792 entries nested 1,100 deep cost 1.7 s of CPU there and 2.3 s here (review 3)."""
    decoder = SteppedDecoder(data, at, max_message_bytes, budget)
    # NOTE: bounded by the message's bytes, as the framer's walk of it: 1,000,000 values ran out after
    # slices were relayed (101 entries nested 10,000 deep), and each resend relayed them again
    allowance = bytes_bound(len(data))
    for _ in range(count):
        slice_ended = False  # END_SLICE comes once an entry: a consumer that lets nothing go gets it skipped
        while True:
            start, charged = decoder.position, budget.count
            try:
                # NOTE: an awaited call per entry cost about 0.1 µs of the 4.3 an entry takes here (a
                # coroutine built and run): most entries' bytes are fed already, and are taken at once
                entry = decoder.fed_value()
                if entry is NOT_FED:
                    entry = await decoder.next()
                break
            except UndecodableValue as error:
                budget.release(budget.count - charged)
                if error.over_budget and charged and not slice_ended:  # it may fit alone: decoded again
                    yield END_SLICE
                    slice_ended = True
                    decoder = SteppedDecoder(data, start, max_message_bytes, budget)
                    continue
                # NOTE: skipped by its bytes and counted, like an entry that is not [time, record]:
                # refusing the chunk once slices of it were relayed made every resend relay them again.
                end = walked_ends.get(start) if walked_ends else None
                end = end if end is not None else await _skipped(data, start, allowance)
                decoder = SteppedDecoder(data, end, max_message_bytes, budget)
                entry = undecoded_entry(error)
                break
        yield entry


# Yielded by lazily decoded entries before an entry that went over the value budget only with the
# slice under way: the consumer sends the slice on and lets its values go, then the entry is decoded
# again. NOTE: skipped as undecodable, a valid entry was acknowledged and never relayed. Once an entry:
# a consumer that let nothing go got it again for ever; over the budget again, the entry is skipped.
END_SLICE = object()


def undecodable(error: Exception) -> UndecodableValue:
    """What msgpack could not decode, named: the value budget's refusal as it is, else the error's
    type and message. TypeError: a list as a map key; ValueError: a reserved ext type."""
    if isinstance(error, OverBudget):
        return UndecodableValue(str(error), over_budget=True)
    if isinstance(error, ForwardProtocolError):
        return UndecodableValue(str(error))
    if isinstance(error, msgpack.StackError):  # (it says nothing itself)
        return UndecodableValue(MSGPACK_TOO_DEEP)
    return UndecodableValue(f"{type(error).__name__} {error}".rstrip())


def undecoded_entry(error: UndecodableValue) -> InvalidEntry:
    """An entry that could not be decoded, skipped by its bytes: counted as one that is not [time, record]."""
    return InvalidEntry(f"an entry could not be decoded ({error})")


def _array_header(data: memoryview, at: int) -> Optional[tuple[int, int]]:
    """(items, where the first item starts) if a msgpack array starts at ``at``, else None."""
    if at >= len(data) or not (0x90 <= data[at] <= 0x9F or data[at] in (0xDC, 0xDD)):
        return None
    header = value_header(data, at)
    return None if header is None else (header[2], at + header[0])


async def let_loop_run(held_since: float) -> float:
    """Lets the event loop run if decoding has held it YIELD_AFTER_S since ``held_since``; when
    decoding holds it from now on."""
    if time.perf_counter() - held_since < YIELD_AFTER_S:
        return held_since
    await asyncio.sleep(0)
    return time.perf_counter()


NOT_FED = object()  # SteppedDecoder.fed_value: the next value's bytes are not all fed yet


class SteppedDecoder:
    """Values decoded from bytes in memory, fed to msgpack DECODE_STEP bytes at a time; once
    decoding has held the event loop YIELD_AFTER_S (across calls: a slice is many of them), it
    lets the loop run before the next step."""

    def __init__(self, data: memoryview, at: int, max_message_bytes: int, budget: "ValueBudget"):
        self._data, self._at, self._origin = data, at, at
        self._held_since = time.perf_counter()
        self._unpacker = forward_unpacker(max(max_message_bytes, 1024) + DECODE_STEP, budget,
                                          max_array_len=MAX_DECODED_VALUES, max_map_len=MAX_DECODED_VALUES)

    @property
    def position(self) -> int:
        """Where the next value starts in the data (between calls of next)."""
        return self._origin + self._unpacker.tell()

    def fed_value(self) -> object:
        """The next value if its bytes were all fed already, else NOT_FED (``next`` feeds on); raises as
        ``next`` does."""
        try:
            return self._unpacker.unpack()
        except msgpack.OutOfData:
            return NOT_FED
        except (TypeError, ValueError, msgpack.UnpackException) as error:  # the budget's too
            raise undecodable(error) from None

    async def next(self) -> object:
        while True:
            value = self.fed_value()
            if value is not NOT_FED:
                return value
            if self._at >= len(self._data):
                raise ForwardProtocolError("a message ends in the middle of a value")
            self._unpacker.feed(self._data[self._at:self._at + DECODE_STEP])
            self._at += DECODE_STEP
            self._held_since = await let_loop_run(self._held_since)


def ext_value(code: int, data: bytes) -> msgpack.ExtType:
    """An ext value as msgpack's ExtType. Fluentd's EventTime (code 0, one an entry) skips ExtType's
    argument checks in Python (half a µs): msgpack hands over an int and bytes. Other codes are
    checked as ever (a reserved negative code is not forward-protocol data). The reference of the
    compiled hook (``ext_hook``)."""
    if code == 0:
        return tuple.__new__(msgpack.ExtType, (code, data))
    return msgpack.ExtType(code, data)


def ext_hook() -> Callable[[int, bytes], msgpack.ExtType]:
    """msgpack's ext_hook for forward mode: ext_value, compiled when the featurizer is (the same
    switch, LOGSCORE_PURE_PYTHON). NOTE: called once an entry, the Python one cost about 0.2 µs of
    the 4 an entry takes here (its call, and a tuple built twice)."""
    # (getattr: an extension built before ExtHook existed, not rebuilt since, still serves)
    compiled = getattr(native.module(), "ExtHook", None)
    return ext_value if compiled is None else compiled(msgpack.ExtType, ext_value)


class ValueBudget:
    """Counts the values msgpack decodes (each array and map, and each item of them) through the
    hooks event streams are charged by, as they are built; past ``limit`` the decoding stops with
    ForwardProtocolError, before the memory is spent. ``release`` gives back what was decoded
    and has been let go."""

    def __init__(self, limit: int, holder: str):
        self.limit = limit
        self.holder = holder  # what holds the values, for the error
        self.count = 0

    def release(self, count: int) -> None:
        self.count -= count

    def charge(self, values: int) -> None:
        self.count += values
        if self.count > self.limit:
            raise OverBudget(f"{self.holder} holds more than {self.limit:,} values (arrays, maps and "
                                       "their items; decoded, that many take up to 200 MiB): log records "
                                       "hold far fewer per byte; send smaller chunks")


def forward_unpacker(max_buffer_size: int, budget: Optional[ValueBudget] = None, **limits) -> msgpack.Unpacker:
    """How forward mode reads msgpack: text exact to the byte, any map key, ext values as ExtType,
    and (given a budget) a bound on the values decoded."""
    if budget is not None:
        limits.update(value_counting_hooks(budget.charge))
    # NOTE: msgpack allocates read_size up front (1 MiB by default): a step's worth is enough
    return msgpack.Unpacker(raw=False, unicode_errors=EXACT, strict_map_key=False, ext_hook=ext_hook(),
                            max_buffer_size=max_buffer_size, read_size=min(max_buffer_size, 4 * DECODE_STEP),
                            **limits)


class SmallDecoder:
    """One per connection, for whole messages of at most DECODE_STEP bytes, decoded in one call each
    (Fluent Bit's Message mode sends one per record: a fresh decoder each cost 10 µs, five times the
    decoding)."""

    def __init__(self, budget: ValueBudget):
        self._budget = budget
        self._unpacker = self._new_unpacker()

    def _new_unpacker(self) -> msgpack.Unpacker:
        return forward_unpacker(DECODE_STEP, self._budget, max_array_len=MAX_DECODED_VALUES,
                                max_map_len=MAX_DECODED_VALUES)

    def decode(self, data: memoryview) -> object:
        self._unpacker.feed(data)
        try:
            return self._unpacker.unpack()
        except (TypeError, ValueError, msgpack.UnpackException) as error:  # the budget's too
            # NOTE: msgpack keeps the rest of the failed message's bytes and would read them as the
            # next message's: a new decoder starts clean (the connection now goes on after such a message)
            self._unpacker = self._new_unpacker()
            raise undecodable(error) from None


def _is_array(value) -> bool:
    # NOTE: msgpack's ExtType (an EventTime) is a namedtuple: not an array.
    return isinstance(value, (list, tuple)) and not isinstance(value, msgpack.ExtType)


def _is_time(value) -> bool:
    """An event time: a number, an EventTime, or Fluent Bit's [time, metadata] (two items, the second a map).

    NOTE: any array whose first item was a time counted: a Forward chunk whose first entry was a bare
    number (["web", [5, [time, record]], option]) was read as one Message-mode record, its option
    map, whose time was skipped; its good entries were dropped and the chunk never acknowledged."""
    if _is_array(value):
        if len(value) != 2 or not isinstance(value[1], dict):
            return False
        value = value[0]
    return isinstance(value, (int, float, msgpack.ExtType, msgpack.Timestamp)) and not isinstance(value, bool)


async def packed_entries(data: bytes, compressed: bool, max_message_bytes: int,
                         budget: ValueBudget) -> AsyncIterator:
    """The entries of a PackedForward payload, decoded as they are consumed, DECODE_STEP bytes
    at a time (the event loop runs between steps once one call held it YIELD_AFTER_S).

    One entry may be as big as a message; a compressed payload inflates to at most
    INFLATION x max_message_bytes in all. The budget bounds the values decoded (the consumer
    releases them slice by slice). An entry msgpack cannot decode is skipped by its bytes and
    comes as an InvalidEntry, as in Forward mode (``forward_entries``); decoding starts again
    after it."""
    buffer_size = packed_buffer_size(max_message_bytes)
    payload = packed_payload(iter_payload(data, compressed, max_message_bytes), buffer_size)
    held_since = time.perf_counter()
    allowance = WalkAllowance()
    at = 0  # where decoding (re)starts in the payload
    slice_ended_at = -1  # where the last END_SLICE came: once an entry (a consumer may let nothing go)
    try:
        while True:
            payload.keep_from = at
            unpacker = forward_unpacker(buffer_size, budget)
            fed = consumed = 0  # bytes from ``at``. NOTE: tell() counts the bytes of a partly decoded entry too
            charged, error = budget.count, None
            oversized = False
            for step in payload.steps(at, DECODE_STEP):
                try:
                    unpacker.feed(step)
                except msgpack.BufferFull:  # the entry under way holds more than buffer_size bytes
                    error, oversized = UndecodableValue(
                        f"an entry inflates to more than {buffer_size:,} bytes (forward_max_message_bytes + "
                        f"{INFLATE_STEP // 1024 // 1024} MiB): send smaller records, or raise "
                        "forward_max_message_bytes"), True
                    break
                fed += len(step)
                try:
                    for entry in unpacker:
                        consumed = unpacker.tell()
                        yield entry
                        charged = budget.count  # what the consumer holds (it releases a slice's once sent)
                except (TypeError, ValueError, msgpack.UnpackException) as raised:  # the budget's too
                    error = undecodable(raised)
                    break
                payload.keep_from = at + consumed
                held_since = await let_loop_run(held_since)
            if error is None:
                if consumed != fed:
                    raise cut_mid_entry(f"{fed - consumed} bytes left over")
                return
            # NOTE: skipped by its bytes and counted, as in Forward mode: refusing the chunk once
            # slices of it were relayed made every resend relay them again (and its sender drop
            # every record of it at its retry limit).
            budget.release(budget.count - charged)
            if error.over_budget and charged and at + consumed != slice_ended_at:  # it may fit alone
                yield END_SLICE
                at = slice_ended_at = at + consumed
                continue
            at = await undecoded_entry_end(payload, at + consumed, error, allowance,
                                           None if oversized else buffer_size)
            yield undecoded_entry(error)
    except ForwardProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, zlib.error) as error:  # TypeError: a list as map key
        raise ForwardProtocolError(f"PackedForward entries are not valid msgpack/gzip: "
                                   f"{type(error).__name__} {error}".rstrip()) from None


async def undecoded_entry_end(payload: "PackedPayload", start: int, error: UndecodableValue,
                              allowance: WalkAllowance, buffer_size: Optional[int]) -> int:
    """Where the entry starting at ``start``, which could not be decoded, ends in the payload: msgpack
    skips it, or (``buffer_size`` None: too big for msgpack's buffer) its headers are walked at once.
    A ForwardProtocolError if its bytes are no longer held or end before it does, or the message's
    walks by headers went past their allowance.

    NOTE: such an entry (one msgpack cannot decode; a gzip chunk's record past forward_max_message_bytes
    + 1 MiB inflated) refused its chunk once slices of it were relayed: each resend relayed them again
    (4,096 records delivered 3 times), and the chunk was never acknowledged."""
    def steps_from(at: int, size: int) -> Iterator[memoryview]:
        return payload.steps_held(at, size, error)

    if buffer_size is None:
        length = await walked_length(steps_from(start, DECODE_STEP), allowance)
    else:
        length = await _value_length(steps_from, start, allowance, buffer_size)
    if length is None:
        raise cut_mid_entry(f"one that could not be decoded: {error}")
    return start + length


# bytes after the first that a msgpack value's header takes, by its first byte, and how its length reads
_FIXED_BYTES = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1,
                0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}
_SIZED_BYTES = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),
                0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}  # (length bytes, type bytes) before the body
_CONTAINER_BYTES = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # (count bytes, values per item)


def value_header(data: memoryview, at: int) -> Optional[tuple[int, int, int]]:
    """(header bytes, body bytes, values inside) of the msgpack value starting at ``at``; None if its
    header ends past the data. The one reader of msgpack headers here."""
    kind = data[at]
    if kind <= 0x7F or kind >= 0xE0:
        return 1, 0, 0
    if kind <= 0x8F:
        return 1, 0, 2 * (kind & 0x0F)
    if kind <= 0x9F:
        return 1, 0, kind & 0x0F
    if kind <= 0xBF:
        return 1, kind & 0x1F, 0
    if kind in _FIXED_BYTES:
        return 1, _FIXED_BYTES[kind], 0
    sized = kind in _SIZED_BYTES
    length_bytes, per_item = _SIZED_BYTES[kind] if sized else _CONTAINER_BYTES.get(kind, (None, 0))
    if length_bytes is None:
        raise ForwardProtocolError(f"forward bytes hold byte 0x{kind:02x}, which starts no msgpack value")
    if at + 1 + length_bytes > len(data):
        return None
    length = int.from_bytes(data[at + 1:at + 1 + length_bytes], "big")
    return (1 + length_bytes, length + per_item, 0) if sized else (1 + length_bytes, 0, per_item * length)


class ValueWalker:
    """Walks one msgpack value by its headers as its bytes are fed, in any pieces, passing over the
    bodies of strings, binaries and ext values without holding them: for a value too big to buffer or
    nested deeper than msgpack reads. Each byte is read once (Python, about 0.3 µs a value); the
    values walked are paid from a WalkAllowance, and the depth is bounded by MAX_WALK_DEPTH."""

    def __init__(self, allowance: WalkAllowance):
        self._allowance = allowance
        self._open = [1]  # values still to walk in each array or map open, innermost last
        self._carry = b""  # the start of a header cut by the end of the last piece
        self._body_left = 0  # bytes of the last body still to come
        self.fed = 0  # bytes fed so far
        self.position = 0  # once done: the value's length in bytes

    def feed(self, piece: memoryview) -> bool:
        """Walk on through the next bytes; True once the value ended (``position``; fed no more then)."""
        start = self.fed - len(self._carry)  # where data starts in the value's bytes
        data = memoryview(self._carry + bytes(piece)) if self._carry else piece
        self.fed += len(piece)
        self._carry = b""
        at = min(self._body_left, len(data))
        self._body_left -= at
        if self._body_left:
            return False
        at = self._walk(data, at)
        if at is None:
            return False
        self.position = start + at
        return True

    def _walk(self, data: memoryview, at: int) -> Optional[int]:
        """Where the value ends in data, or None if data ends first (what is left noted)."""
        open_items, allowance = self._open, self._allowance
        while True:
            while open_items and not open_items[-1]:
                open_items.pop()
            if not open_items:
                return at
            if at >= len(data):
                return None
            header = value_header(data, at)
            if header is None:
                self._carry = bytes(data[at:])
                return None
            header_bytes, body_bytes, inside = header
            open_items[-1] -= 1
            allowance.values -= 1
            if allowance.values < 0:
                raise ForwardProtocolError(f"a message walked by its headers (nested past msgpack's "
                                           f"{MSGPACK_MAX_DEPTH:,} levels, or an entry too big to buffer) holds "
                                           f"more than {MAX_DECODED_VALUES:,} values: not log records; send "
                                           "smaller, flatter records")
            if inside:
                open_items.append(inside)
                if len(open_items) > MAX_WALK_DEPTH + 1:  # (the first holds the value itself)
                    raise ForwardProtocolError(f"a value nested more than {MAX_WALK_DEPTH:,} arrays and maps "
                                               "deep: not log records; send flatter records")
            at += header_bytes + body_bytes
            if at > len(data):
                self._body_left = at - len(data)
                return None


class PackedPayload:
    """A PackedForward payload's bytes in steps, from an offset: a compressed one inflated block by
    block, once. The blocks from ``keep_from`` on (the entry being decoded) are kept, at most
    ``keep_bytes`` of them behind the newest, so decoding can go back to an entry it could not
    decode and skip it by its bytes. An uncompressed payload is one block, in memory anyway."""

    def __init__(self, blocks: Iterator[bytes], keep_bytes: int):
        self._blocks = blocks
        self._kept: list[memoryview] = []  # the blocks pulled and still held, in order
        self._kept_at = 0  # where the first of them starts in the payload
        self._kept_bytes = 0
        self.keep_bytes = keep_bytes
        self.keep_from = 0  # moved on by the decoder: bytes before it are not read again

    def holds(self, at: int) -> bool:
        return at >= self._kept_at

    def steps_held(self, at: int, size: int, cause: Exception) -> Iterator[memoryview]:
        """``steps`` from a position still held, to skip an entry that could not be decoded for
        ``cause`` (a ForwardProtocolError naming both if it is not held)."""
        if not self.holds(at):
            raise ForwardProtocolError(f"a PackedForward entry of more than {self.keep_bytes:,} bytes inflated "
                                       f"could not be decoded ({cause}); send smaller records")
        return self.steps(at, size)

    def steps(self, at: int, size: int) -> Iterator[memoryview]:
        """The payload from ``at`` (held, or not pulled yet) on, at most ``size`` bytes a step."""
        while (found := self._block_holding(at)) is not None:
            block, start = found
            for offset in range(at - start, len(block), size):
                yield block[offset:offset + size]
            at = start + len(block)

    def _block_holding(self, at: int) -> Optional[tuple[memoryview, int]]:
        """The block holding the byte at ``at`` and where it starts, pulling blocks as needed;
        None past the end."""
        while True:
            start = self._kept_at
            for block in self._kept:
                if at < start + len(block):
                    return block, start
                start += len(block)
            block = next(self._blocks, None)
            if block is None:
                return None
            self._kept.append(memoryview(block))
            self._kept_bytes += len(block)
            self._let_go()

    def _let_go(self) -> None:
        """Drop the blocks before keep_from, and those more than keep_bytes behind the newest."""
        while len(self._kept) > 1:
            first = len(self._kept[0])
            if self._kept_at + first > self.keep_from and self._kept_bytes - first < self.keep_bytes:
                return
            self._kept.pop(0)
            self._kept_at += first
            self._kept_bytes -= first


def packed_buffer_size(max_message_bytes: int) -> int:
    """The bytes msgpack may buffer for one PackedForward entry."""
    return max(max_message_bytes, 1024) + INFLATE_STEP


def iter_payload(data: bytes, compressed: bool, max_message_bytes: int) -> Iterator[bytes]:
    """A PackedForward payload's blocks: inflated in steps (at most INFLATION x max_message_bytes), or as it is."""
    return _inflate(data, INFLATION * max_message_bytes) if compressed else iter((data,))


def packed_payload(blocks: Iterator[bytes], buffer_size: int) -> PackedPayload:
    # (kept: 2 inflated blocks more than the decoder holds, so an entry too big for it is still held
    # from its start when that shows, and is skipped by its bytes: undecoded_entry_end)
    return PackedPayload(blocks, buffer_size + 2 * INFLATE_STEP)


def check_packed(data: bytes, compressed: bool, max_message_bytes: int) -> None:
    """ForwardProtocolError, as packed_entries would raise it once slices of the chunk went on, if a
    PackedForward payload inflates past INFLATION x max_message_bytes or is not valid gzip, holds
    bytes msgpack cannot read or ends in the middle of an entry, holds MAX_INVALID_ENTRIES entries
    that are not [time, record], or its entries nested past msgpack's limit or too big for its buffer
    (those packed_entries walks by their headers) pass one WalkAllowance. msgpack skips the others.

    NOTE: found while decoding, after slices of the chunk were relayed, these closed the connection
    and each resend relayed the same 4,096 records again; refused here, none of it has gone on yet.
    Stopping at MAX_INVALID_ENTRIES as decoding does: a 65 KB gzip chunk of zeros cost 5.2 s here."""
    blocks = iter_payload(data, compressed, max_message_bytes)
    try:
        buffer_size = packed_buffer_size(max_message_bytes)
        _walk_entries(packed_payload(blocks, buffer_size), buffer_size)
        for _ in blocks:  # (the rest inflated: its size checked)
            pass
    except zlib.error as error:
        raise ForwardProtocolError(f"compressed chunk is not valid gzip: {error}") from None


class InvalidEntries:
    """Counts a payload's entries that decoding will skip as not [time, record]; at MAX_INVALID_ENTRIES
    the refusal the relay gives (``ForwardServer._took``)."""

    def __init__(self):
        self.count = 0
        self.last_at = -1  # where the last one counted starts (in the payload): counted once

    def add(self, why: str, at: int) -> None:
        if at == self.last_at:
            return
        self.count, self.last_at = self.count + 1, at
        if self.count >= MAX_INVALID_ENTRIES:
            raise too_many_invalid(self.count, why)


def too_many_invalid(count: int, why) -> ForwardProtocolError:
    """The refusal of a chunk past MAX_INVALID_ENTRIES (the check before relaying says what the relay would)."""
    return ForwardProtocolError(f"{count} entries are not [time, record] (the last: {why}): not forward-protocol data")


def cut_mid_entry(detail: str) -> ForwardProtocolError:
    return ForwardProtocolError(f"PackedForward entries end in the middle of an entry ({detail})")


# first bytes of a msgpack array that may hold two items (fixarray of 2, array 16, array 32)
_PAIR_STARTS = frozenset((0x92, 0xDC, 0xDD))


def _walk_entries(payload: PackedPayload, buffer_size: int) -> None:
    """Skip a payload's entries as packed_entries decodes them, walking by its headers each that msgpack
    cannot skip, paid from one WalkAllowance; raise what packed_entries would (``check_packed``)."""
    allowance, invalid, at = WalkAllowance(), InvalidEntries(), 0
    while (start := _skipped_to_walk(payload, at, buffer_size, invalid)) is not None and payload.holds(start):
        walker = ValueWalker(allowance)
        if not any(walker.feed(step) for step in payload.steps(start, DECODE_STEP)):
            raise cut_mid_entry("one that could not be decoded")
        invalid.add("an entry msgpack could not decode", start)
        at = start + walker.position


def _skipped_to_walk(payload: PackedPayload, at: int, buffer_size: int, invalid: InvalidEntries) -> Optional[int]:
    """Where, from ``at``, the first entry that msgpack cannot skip starts (nested past its limit, too
    big for ``buffer_size`` or past the decoder's lengths, or holding a byte no value starts with: its
    walk raises); None if there is none. Entries that do not start as a two-item array are counted in
    ``invalid``; a ForwardProtocolError if the bytes end in the middle of an entry."""
    payload.keep_from = at
    skipper = msgpack.Unpacker(max_buffer_size=buffer_size, read_size=min(DECODE_STEP, buffer_size))  # decoder's
    skipped = fed = 0  # (lengths: msgpack's defaults, as packed_entries' decoder)
    judged = -1  # where the last entry whose first byte was looked at starts
    for step in payload.steps(at, DECODE_STEP):
        step_at, fed = fed, fed + len(step)
        try:
            skipper.feed(step)
            while True:
                if skipped != judged and skipped < fed:  # a new entry, starting in this step
                    judged = skipped
                    if step[skipped - step_at] not in _PAIR_STARTS:
                        invalid.add(f"an entry starting with byte 0x{step[skipped - step_at]:02x}, not an array "
                                    "of two items", at + skipped)
                skipper.skip()
                skipped = skipper.tell()
        except msgpack.OutOfData:
            payload.keep_from = at + skipped  # (before the next block is pulled: once a step, not an entry)
            continue
        except ForwardProtocolError:  # (too many invalid entries)
            raise
        except (msgpack.StackError, msgpack.BufferFull, ValueError, msgpack.UnpackException):
            return at + skipped
    if skipped != fed:
        raise cut_mid_entry(f"{fed - skipped} bytes left over")
    return None


def _inflate(data: bytes, max_bytes: int) -> Iterator[bytes]:
    """Gzip members (one or several, back to back) inflated in steps, at most ``max_bytes`` in all."""
    total = 0
    while data:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        pending = data
        while pending:
            block = inflater.decompress(pending, INFLATE_STEP)
            total += len(block)
            if total > max_bytes:
                raise ForwardProtocolError(f"compressed chunk inflates past {max_bytes} bytes "
                                           f"({INFLATION} x forward_max_message_bytes); "
                                           "send smaller chunks")
            if block:
                yield block
            pending = inflater.unconsumed_tail
        if not inflater.eof:
            raise ForwardProtocolError("compressed chunk is truncated (gzip stream ends early)")
        data = inflater.unused_data


def address_text(peername) -> str:
    """A socket's peer as host:port ([host]:port for IPv6), as the log names it."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername)


def is_group_marker(moment) -> bool:
    """Whether an entry's time marks the start or end of a Fluent Bit group (not a record): only
    in the [time, metadata] form Fluent Bit frames groups with; a plain -1 is a bad time."""
    kind = moment.__class__
    if kind is not list and kind is not tuple:
        return False
    moment = moment[0] if moment else None
    kind = moment.__class__
    if kind is msgpack.ExtType:
        return moment.code == 0 and moment.data[:4] in GROUP_MARKER_EVENT_SECONDS
    return kind is int and moment in GROUP_MARKER_SECONDS


def _indexes_by_tag(tags: list[str]) -> list[list[int]]:
    """The positions of each tag's records, tags in the order first seen."""
    by_tag: dict[str, list[int]] = {}
    for i, tag in enumerate(tags):
        by_tag.setdefault(tag, []).append(i)
    return list(by_tag.values())


def checked_entry(entry) -> list:
    """``[time, record]`` as received (the time is never rewritten), or InvalidEntry.

    NOTE: the usual entry (a list, an EventTime or an integer time, a map) is told apart by classes
    first, as time_problem would accept it (held to it by a test): the checks below cost about
    0.15 µs an entry more."""
    if entry.__class__ is list and len(entry) == 2:
        moment, record = entry
        kind = moment.__class__
        if record.__class__ is dict and (
                (kind is msgpack.ExtType and moment.code == 0 and len(moment.data) == 8
                 and moment.data[4:] < MAX_NANOSECONDS_BYTES) or (kind is int and 0 <= moment < 2**32)):
            if nested_deeper_than(record, MAX_RECORD_DEPTH):
                raise InvalidEntry(f"a record nests maps and arrays more than {MAX_RECORD_DEPTH} deep")
            return entry
    return _checked_unusual_entry(entry)


def _checked_unusual_entry(entry) -> list:
    if isinstance(entry, InvalidEntry):  # one that could not be decoded (forward_entries)
        raise entry
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)):
        raise InvalidEntry(f"an entry is not [time, record] but {describe_entry(entry)}")
    if (problem := time_problem(entry[0])) is not None:
        raise InvalidEntry(f"an entry's time {problem}")
    if nested_deeper_than(entry[1], MAX_RECORD_DEPTH):
        raise InvalidEntry(f"a record nests maps and arrays more than {MAX_RECORD_DEPTH} deep")
    return entry if isinstance(entry, list) else list(entry)


def time_problem(moment) -> Optional[str]:
    """What is wrong with an entry's time that no forward receiver reads as a time, or None.

    NOTE: Fluent Bit as the next hop acknowledges a chunk holding one (a negative or non-finite
    number, seconds past 2**32 - milliseconds, say -, an EventTime not of 8 bytes or with 10**9
    nanoseconds or more, metadata that is no map) and drops every record of it: passed on, one
    such entry lost the up to max_batch_records records sent with it, without a word. Fluentd's
    in_forward skips them (and floats, which Fluent Bit reads). Checked per record: the usual
    forms are told apart by their class first."""
    kind = moment.__class__
    if kind is list or kind is tuple:
        if len(moment) != 2 or moment[1].__class__ is not dict:
            return "is [time, metadata] with metadata that is no map"
        if is_group_marker(moment):
            return None
        moment = moment[0]
        kind = moment.__class__
    if kind is msgpack.ExtType:
        if moment.code == 0 and len(moment.data) == 8 and moment.data[4:] < MAX_NANOSECONDS_BYTES:
            return None
        if moment.code == 0 and len(moment.data) == 8:
            return "is an EventTime of 10**9 nanoseconds or more"
        return f"is an ext value of type {moment.code} and {len(moment.data)} bytes, not an EventTime"
    if (kind is int or kind is float) and 0 <= moment < 2**32:  # NaN: False
        return None
    if kind is msgpack.Timestamp and 0 <= moment.seconds < 2**32:  # msgpack's own timestamp type, accepted before
        return None
    return f"{moment!r} is no time in seconds (0 to 2**32 - 1)"


# --- the next hop -----------------------------------------------------------------------

@dataclass
class Frame:
    chunk: str
    data: bytes


def packed_frames(piece: list[tuple[str, list]]) -> list[Frame]:
    """PackedForward frames of (tag, entry) pairs: one per tag, entries in their order."""
    by_tag: dict[str, list] = {}
    for tag, entry in piece:
        by_tag.setdefault(tag, []).append(entry)
    packer = msgpack.Packer(use_bin_type=True, unicode_errors=EXACT)
    frames = []
    for tag, entries in by_tag.items():
        packed = b"".join([packer.pack(e) for e in entries])
        chunk = uuid.uuid4().hex
        frames.append(Frame(chunk, packer.pack([tag, packed, {"size": len(entries), "chunk": chunk}])))
    return frames


def raw_frame(message) -> Frame:
    """A message passed on as it came, with a chunk id of our own (so the next hop acks it)."""
    message = list(message)
    chunk = uuid.uuid4().hex
    if isinstance(message[-1], dict) and len(message) >= 3:
        message[-1] = {**message[-1], "chunk": chunk}
    else:
        message.append({"chunk": chunk})
    return Frame(chunk, msgpack.packb(message, use_bin_type=True, unicode_errors=EXACT))


class Ack(asyncio.Future):
    """A frame's ack, and where the frame ends in its connection's byte stream."""

    sent_until = 0  # bytes written on the connection once this frame was


@dataclass
class RelayProgress:
    """When the frames one relay waits for last moved: an ack for one of them, or bytes of the
    connection read by the next hop while some of theirs were still unread.

    NOTE: the connection is one byte stream shared by every relay. Bytes ahead of this relay's
    frames count as its progress too: they are the way to its frames (a slow reader is slow for
    all). Once all of its bytes are read, only its own acks count.
    """

    acks: list[Ack]
    progress_at: float
    taken: int  # bytes of the connection the next hop had read when last looked
    acked: int = 0
    others_read_at: float = float("-inf")  # the last time bytes written after this relay's were read

    def look(self, now: float, taken: int) -> None:
        acked = sum(ack.done() for ack in self.acks)
        own_end = max(ack.sent_until for ack in self.acks)
        if acked > self.acked or (taken > self.taken and self.taken < own_end):
            self.progress_at = now
        if taken > max(self.taken, own_end):
            self.others_read_at = now
        self.acked, self.taken = acked, taken


# A next hop whose forward input has a shared_key greets with a HELO and waits for a PING: it was
# logged as "connection failed: UnicodeDecodeError ..." (the HELO's nonce), naming neither.
SECURE_FORWARD_HOP = ("it asks for secure forward (its HELO: a shared_key on its forward input), which the "
                      "sidecar does not speak: remove the shared_key there and keep that port on a private network")


HOP_CLOSED = "closed the connection"


def _is_helo(answer) -> bool:
    return isinstance(answer, (list, tuple)) and len(answer) > 0 and answer[0] == "HELO"


class NextHop:
    """One connection to the next forward receiver; frames are pipelined, each waits for its ack.

    The next hop fails when it makes no progress (no ack comes, none of the bytes written leave)
    for ``ack_timeout_s`` while something is outstanding: a hop that reads slowly is slow, not
    down (a fixed wait over a whole window failed one reading 16 KB/s for good, every resend
    delivering nothing, and one reading 64 KB/s duplicated 41 % of its records). After a failure
    the next hop counts as down for a backoff (0.5 s doubling to 30 s, once per attempt): senders
    are refused at once instead of each waiting ``ack_timeout_s``. A clean close while no frame
    waits for an ack is no failure (hops and proxies close idle connections): the next send
    reconnects.

    Progress is also judged per relay (the frames one ``acknowledged`` call waits for): a relay
    whose frames get no ack and whose bytes are all read for ``ack_timeout_s`` fails on its own,
    however busy the connection is with other relays' acks (a dropped ack was otherwise waited
    for as long as another sender kept the connection busy). The connection and the other
    relays on it go on: the next hop is up, it just lost those frames.
    """

    MIN_BACKOFF_S, MAX_BACKOFF_S = 0.5, 30.0
    PROGRESS_CHECK_S = 0.5  # how often a wait looks for progress

    def __init__(self, address: str, ack_timeout_s: float = 10.0):
        host, _, port = address.rpartition(":")
        self.address = address
        self.host, self.port = host.strip("[]"), int(port)
        self.ack_timeout_s = ack_timeout_s
        self._lock = asyncio.Lock()
        self._writer: Optional[asyncio.StreamWriter] = None
        self._reader_task: Optional[asyncio.Task] = None
        self._pending: dict[str, asyncio.Future] = {}
        self._backoff = self.MIN_BACKOFF_S
        self._progress_at = 0.0  # the last ack, drained bytes, or start of waiting
        self._written = 0  # bytes written on this connection
        self._acked_at = float("-inf")  # the last ack, whoever's
        self._taken = 0  # of those, read by the next hop when last looked at
        self.down_until = 0.0
        self.last_error = ""
        self.reachable = False  # the last connection attempt succeeded
        # The hop's last failure, whichever relay met it, was making no progress though it took
        # connections and bytes (paused, overloaded, no acks): no refusal of the frames it held,
        # which it may well take once it moves again (ForwardServer._retry holds them a while).
        self.stalled = False
        self._greeted = False  # the last connection's next hop sent a HELO (the reset that follows says less)

    async def send(self, frames: list[Frame]) -> list[asyncio.Future]:
        """Write frames; each returned future completes when the next hop acked its frame."""
        self._refuse_while_down()
        async with self._lock:
            self._refuse_while_down()  # another relay may have failed while this one waited
            try:
                if self._writer is None:
                    # (a new attempt: a HELO names the connection it came on and its reset, not a
                    # refusal of the next, which said "secure forward" of a hop since replaced)
                    self.reachable, self._greeted = False, False
                    reader, self._writer = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port), self.ack_timeout_s)
                    self.reachable = True
                    self._written = self._taken = 0
                    self._reader_task = asyncio.create_task(self._read_acks(reader, self._writer))
                loop = asyncio.get_running_loop()
                if not self._pending:
                    self._progress_at = time.monotonic()  # the clock runs while something is outstanding
                acks = []
                for frame in frames:
                    ack = self._pending.setdefault(frame.chunk, Ack(loop=loop))
                    self._writer.write(frame.data)
                    self._written += len(frame.data)
                    ack.sent_until = self._written
                    acks.append(ack)
                await self._while_progressing(asyncio.ensure_future(self._writer.drain()))
                return acks
            except (OSError, asyncio.TimeoutError) as error:
                raise self.failed(f"cannot send: {type(error).__name__} {error}".rstrip()) from None

    async def acknowledged(self, acks: list[Ack]) -> None:
        """Wait for the acks of frames sent; raises NextHopError once the next hop makes no
        progress for ack_timeout_s, or none on these frames while it makes some on others."""
        if not acks:
            return
        relay = RelayProgress(acks, time.monotonic(), self._bytes_taken())
        try:
            for ack in acks:
                await self._while_progressing(ack, relay)
        except _RelayStalled:
            now = time.monotonic()
            if now - self._acked_at < self.ack_timeout_s:
                raise self._dropped(acks, "while it acked others: it dropped them") from None
            if now - relay.others_read_at < self.ack_timeout_s:
                # Its socket takes bytes but nobody is acked: paused (its kernel still reads), or
                # no acks at all. Said apart from a dropped ack ("acked others" sent operators
                # looking for a lost frame), and no refusal of these frames either.
                raise self._dropped(acks, "though its connection took them and frames sent after them, and it "
                                          "acked none: it is paused or overloaded, or does not answer acks "
                                          "(the forward `chunk` option)", stalled=True) from None
            raise self._stalled() from None  # it serves nobody: down
        except _HopStalled:
            raise self._stalled() from None
        self._backoff = self.MIN_BACKOFF_S

    async def _while_progressing(self, waited: asyncio.Future, relay: Optional[RelayProgress] = None) -> None:
        """Wait for ``waited`` as long as the next hop makes progress (and, given a relay, as long
        as that relay's frames do); _HopStalled or _RelayStalled after ack_timeout_s without."""
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(waited), self.PROGRESS_CHECK_S)
                except asyncio.TimeoutError:
                    now = time.monotonic()
                    taken = self._bytes_taken()
                    if taken > self._taken:  # the next hop read some of what was written
                        self._progress_at = now
                    self._taken = taken
                    if now - self._progress_at >= self.ack_timeout_s:
                        raise _HopStalled() from None
                    if relay is not None:
                        relay.look(now, taken)
                        if now - relay.progress_at >= self.ack_timeout_s:
                            raise _RelayStalled() from None
        finally:
            if not waited.done():
                waited.cancel()

    def _stalled(self) -> NextHopError:
        return self.failed(f"no progress (acks, bytes read) for {self.ack_timeout_s:g} s (forward_ack_timeout_s)",
                           stalled=True)

    def _dropped(self, acks: list[Ack], why: str, stalled: bool = False) -> NextHopError:
        """Fail one relay's frames (their acks will not come) and leave the connection to the
        relays it serves: the next hop acked or read others meanwhile, so it is up. ``stalled``:
        it read them but acked nobody (``self.stalled``)."""
        missing = [ack for ack in acks if ack.cancelled() or not ack.done()]  # the one waited for is cancelled
        reason = (f"no ack for {len(missing)} of {len(acks)} frames for {self.ack_timeout_s:g} s "
                  f"(forward_ack_timeout_s) {why}")
        self.last_error, self.stalled = reason, stalled
        error = NextHopError(f"next hop {self.address}: {reason}")
        failing = set(map(id, missing))
        for chunk in [chunk for chunk, ack in self._pending.items() if id(ack) in failing]:
            del self._pending[chunk]  # a late ack for them is ignored
        for ack in missing:
            if not ack.done():
                ack.set_exception(error)
                ack.exception()  # retrieved: the caller gets the error raised instead
        return error

    def _bytes_taken(self) -> int:
        """Bytes of this connection the next hop has read (its kernel took them)."""
        return self._written - self._outstanding_bytes()

    def _outstanding_bytes(self) -> int:
        """Bytes written that the next hop has not taken: the transport's buffer and the socket's
        send queue (on loopback a whole window fits in the kernel's buffers)."""
        if self._writer is None:
            return 0
        queued = 0
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            try:
                queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                pass
        return self._writer.transport.get_write_buffer_size() + queued

    def _refuse_while_down(self) -> None:
        now = time.monotonic()
        if now < self.down_until:
            raise NextHopError(f"next hop {self.address} is down ({self.last_error}); next try in "
                               f"{self.down_until - now:.1f} s")

    def failed(self, reason: str, stalled: bool = False) -> NextHopError:
        """Close the connection, fail every frame waiting for an ack, count the hop down for a while
        (the backoff doubles once per attempt, not once per relay that saw the failure). ``stalled``:
        it made no progress though it took connections and bytes (``self.stalled``)."""
        reason = SECURE_FORWARD_HOP if self._greeted else reason
        self.last_error, self.stalled = reason, stalled
        now = time.monotonic()
        if now >= self.down_until:
            self.down_until = now + self._backoff
            self._backoff = min(self._backoff * 2, self.MAX_BACKOFF_S)
        error = NextHopError(f"next hop {self.address}: {reason}")
        self._close(error)
        return error

    async def _read_acks(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # NOTE: surrogateescape: a HELO's nonce comes as a msgpack str of random bytes
        unpacker = msgpack.Unpacker(raw=False, unicode_errors=EXACT, max_buffer_size=1024 * 1024)
        try:
            while not self._greeted and (data := await reader.read(65536)):
                unpacker.feed(data)
                for answer in unpacker:
                    if _is_helo(answer):
                        self._greeted = True  # (failed() names it)
                        break
                    acked = self._acked_frame(answer)
                    if acked is not None and not acked.done():
                        acked.set_result(None)
                        self._progress_at = self._acked_at = time.monotonic()
            reason = HOP_CLOSED
        except (OSError, ValueError, msgpack.UnpackException) as error:
            reason = f"connection failed: {type(error).__name__} {error}".rstrip()
        except Exception as error:
            # NOTE: anything else ended this task unsaid, the hop never marked failed: its relays
            # waited forward_ack_timeout_s and were told "no progress", its later acks unread
            log.exception("reading the next hop's acks failed", extra={"next_hop": self.address})
            reason = f"reading its acks failed: {type(error).__name__} {error}".rstrip()
        if writer is not self._writer:  # a connection already replaced
            return
        if reason == HOP_CLOSED and not self._pending and not self._greeted:
            # NOTE: a next hop (or a proxy or load balancer before it) closes idle connections: counted
            # as down, it turned senders away for the backoff though nothing was lost (a hop closing
            # connections idle for 1 s refused 4 of 8 chunks sent every 1.2 s). The next send reconnects.
            self._close(NextHopError(f"next hop {self.address}: {HOP_CLOSED}"))
            return
        self.failed(reason)

    def _acked_frame(self, answer) -> Optional[Ack]:
        """The frame waiting for the ack this answer holds; None if it holds none (an ack whose
        value is an array or a map, which no frame's chunk id is, is skipped)."""
        if not isinstance(answer, dict):
            return None
        try:
            return self._pending.pop(answer.get("ack"), None)
        except TypeError:  # unhashable: no chunk id this sidecar sent
            return None

    def _close(self, error: Exception) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
        self._writer = self._reader_task = None
        self._written = self._taken = 0
        for acked in self._pending.values():
            if not acked.done():
                acked.set_exception(error)
                acked.exception()  # retrieved: nobody may be waiting for it any more
        self._pending.clear()

    async def close(self) -> None:
        async with self._lock:
            self._close(NextHopError(f"next hop {self.address}: the sidecar is stopping"))


# --- the server -----------------------------------------------------------------------

def new_skipper() -> msgpack.Unpacker:
    """An Unpacker that only skips over messages. NOTE: max_buffer_size 0 is no limit (_pending has
    one); its buffer starts at read_size, by default 1 MiB then (msgpack's min(max_buffer_size,
    1 MiB)): each forward connection held 1 MiB from its first byte (soak trial: 470 connections of
    a Fluent Bit waiting for acks from a saturated sidecar, ~500 MiB). It grows as a message needs."""
    return msgpack.Unpacker(max_buffer_size=0, read_size=SKIPPER_START_BYTES)


class MessageFramer:
    """Cuts a connection's bytes into complete messages without decoding them: msgpack skips over
    each, building no Python objects, so what a message decodes into is only built later, slice
    by slice. A message's bytes wait here until all have come (at most max_message_bytes)."""

    def __init__(self, max_message_bytes: int):
        self.max_message_bytes = max_message_bytes
        self.fed = 0  # bytes of the connection fed so far
        self._skipper = new_skipper()
        self._pending = bytearray()  # the bytes of the message under way (and any after it)
        self._start = 0  # where _pending starts in the bytes fed to the skipper
        self.began = 0.0  # when the time for the message under way to arrive started (its first byte, admission
        # or last relay: restart_clock; time.monotonic())
        self._broken: Optional[ForwardProtocolError] = None  # bad bytes met after messages handed out
        self._walker: Optional[ValueWalker] = None  # the message under way nests deeper than msgpack skips
        self._walk_left = WALKED_READ_BYTES  # bytes the framing call under way may still walk by headers

    def raise_if_broken(self) -> None:
        """Raise the error of bad bytes found after the messages the last feed returned (which
        go on first)."""
        if self._broken is not None:
            raise self._broken

    @property
    def partial(self) -> bool:
        """Bytes of a message not complete yet are held."""
        return bool(self._pending)

    def feed(self, data: bytes, handed: bool = False) -> list[memoryview]:
        """The messages these bytes complete, in order (no bytes: the next piece of a walk by headers,
        ``walk_behind``); ForwardProtocolError if they are not msgpack or one grows past
        max_message_bytes.

        NOTE: bad bytes after complete messages of the same read raise only once those messages are
        handed out (raise_if_broken, or the next feed): raised at once, they were lost with them (a
        sender taking no acks lost 30,000 records sent just before one bad byte). ``handed``: messages
        of earlier calls of the same read are still to go on, so bad bytes wait for them too."""
        self.raise_if_broken()
        messages: list[memoryview] = []
        try:
            self._frame(data, messages)
        except ForwardProtocolError as error:
            if not messages and not handed:
                raise
            self._broken = error
        return messages

    def _frame(self, data: bytes, messages: list[memoryview]) -> None:
        """Append the messages these bytes complete to ``messages`` (as they are found, so they
        are kept whatever is raised after them)."""
        if not self._pending:
            self.began = time.monotonic()
        self._walk_left = WALKED_READ_BYTES  # across the messages of this call (many small deep ones too)
        self._pending += data
        self.fed += len(data)
        if self._walker is None:  # (its skipper is out of step: a new one takes the bytes after that message)
            self._skipper.feed(data)
        begin = 0
        held = memoryview(self._pending)
        try:
            while (end := self._skip_message(held, begin)) is not None:
                messages.append(held[begin:end])
                begin = end
        finally:
            held.release()  # NOTE: a bytearray with a view cannot grow
        if begin:
            # NOTE: once per feed, not per message: Fluent Bit's Message mode sends a message per
            # record, and cutting each off the buffer copied the rest (2.1 s of CPU per 20,000)
            self._pending = self._pending[begin:]  # a new buffer: the messages' views keep the old
            self._start += begin
            self.began = time.monotonic()  # what is left began in these bytes
        if not self._pending and self._start > READ_BYTES:
            # NOTE: msgpack's buffer keeps the size of the biggest str or bin it waited for whole
            # (a PackedForward payload): a new skipper lets it go
            self._skipper = new_skipper()
            self._start = 0
        if len(self._pending) > self.max_message_bytes:
            raise ForwardProtocolError(f"a forward message exceeds {self.max_message_bytes} bytes "
                                       "(forward_max_message_bytes); send smaller chunks")

    def restart_clock(self) -> None:
        """The message under way gets its PARTIAL_MESSAGE_TIMEOUT_S again from now: the sidecar read
        none of it meanwhile (it waited for admission, or relayed the messages before it).

        NOTE: counted from its first byte, a correct sender's 2.1 MB chunk sent while two others'
        relays waited 12 s for their next hop's acks was cut off as "incomplete for 10 s" the moment
        it was admitted. A trickling sender stays bounded: 10 s from its first byte while unadmitted,
        10 s from admission (or from the end of a relay) once it holds a place."""
        if self.partial:
            self.began = time.monotonic()

    @property
    def held_bytes(self) -> int:
        """Bytes of the message under way (and any after it) held so far."""
        return len(self._pending)

    @property
    def walking(self) -> bool:
        """The message under way nests past msgpack's limit: it is walked by its headers as it comes."""
        return self._walker is not None

    def _skip_message(self, held: memoryview, begin: int) -> Optional[int]:
        """Where the message under way (from ``begin`` in _pending) ends, once all of it is here."""
        if self._walker is not None:
            return self._walked_message_end(held, begin)
        try:
            self._skipper.skip()
        except msgpack.OutOfData:
            return None
        except msgpack.StackError:  # a record nested deeper than msgpack skips: skipped by its bytes later
            self._walker = ValueWalker(bytes_bound(self.max_message_bytes + READ_BYTES))
            return self._walked_message_end(held, begin)
        except (ValueError, msgpack.UnpackException) as error:
            raise undecodable(error) from None
        return self._skipper.tell() - self._start

    @property
    def walk_behind(self) -> bool:
        """Bytes held of a message walked by its headers are not walked yet (``framed_by`` feeds on)."""
        return self._walker is not None and self._broken is None and self._walker.fed < len(self._pending)

    def _walked_message_end(self, held: memoryview, begin: int) -> Optional[int]:
        """Where a message nesting deeper than msgpack skips ends, walked by its headers as its bytes
        come, at most WALKED_READ_BYTES a call across the messages it frames (each byte once: the walk
        goes on where it stopped); once found, a new skipper goes on from there.

        NOTE: bounded per message, a read of 256 KiB of 1.1 KB Message-mode records nested 1,100 deep
        was walked in one call: 110 ms of the event loop (2 senders: /healthz p50 1.4 s)."""
        walked = begin + self._walker.fed
        piece = held[walked:walked + self._walk_left]
        self._walk_left -= len(piece)
        if not piece or not self._walker.feed(piece):
            return None
        end = begin + self._walker.position
        self._walker = None
        self._skipper = new_skipper()
        self._skipper.feed(held[end:])
        self._start = -end  # _pending[end] is the new skipper's first byte
        return end


async def framed_by(framer: MessageFramer, data: bytes) -> list[memoryview]:
    """The messages ``data`` completes (``MessageFramer.feed``), the event loop let run between the
    pieces of a walk by headers."""
    messages = framer.feed(data)
    while framer.walk_behind:
        await asyncio.sleep(0)
        messages += framer.feed(b"", handed=bool(messages))
    return messages


async def read_more(reader: asyncio.StreamReader, framer: MessageFramer, limit: int = READ_BYTES) -> bytes:
    """Up to ``limit`` more bytes of the message under way (WALKED_READ_BYTES while the framer walks it
    by its headers), which must be whole within PARTIAL_MESSAGE_TIMEOUT_S of its first byte, or of its
    admission or the end of the last relay on its connection if later (``MessageFramer.restart_clock``),
    however many reads in between."""
    try:
        async with asyncio.timeout(framer.began + PARTIAL_MESSAGE_TIMEOUT_S - time.monotonic()):
            data = await reader.read(min(limit, WALKED_READ_BYTES) if framer.walking else limit)
    except asyncio.TimeoutError:
        raise ForwardProtocolError(f"a message stayed incomplete for {PARTIAL_MESSAGE_TIMEOUT_S:g} s") from None
    if not data:
        raise ForwardProtocolError("the connection closed in the middle of a message")
    return data


class Slice(list):
    """(tag, entry) pairs scored and passed on together; ``markers``: how many of them are Fluent Bit
    group markers (NOTE: most slices hold none, and a pass looking for them cost about 0.1 µs an entry)."""

    markers = 0


@dataclass
class Relay:
    """What one group of messages became: frames for the next hop and, once sent, their acks."""

    wants_acks: bool  # every sender chunk asks for an ack: on failure the sender resends
    sent: list[tuple[Frame, Optional[asyncio.Future]]] = field(default_factory=list)  # not yet settled
    skipped: int = 0  # invalid entries
    skipped_why: str = ""  # what the last of them was
    skipped_tag: str = ""  # and its message's tag

    def held_bytes(self) -> int:
        return sum(len(frame.data) for frame, _ in self.sent)

    def unacknowledged(self) -> list[Frame]:
        return [frame for frame, ack in self.sent
                if ack is None or not ack.done() or ack.cancelled() or ack.exception() is not None]


class RefusedChunks:
    """The chunk ids refused as read into, the latest REFUSED_CHUNKS_KEPT of them, each kept as a
    16-byte digest: a sender picks its ids, and kept whole 1024 ids of 16 MiB could hold 16 GiB
    (probe: 80 refused chunks with distinct 15 MiB ids took the sidecar from 204 MiB to 1.41 GiB)."""

    def __init__(self, kept: int = REFUSED_CHUNKS_KEPT):
        self.kept = kept
        self._digests: collections.OrderedDict[bytes, bool] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._digests)

    def first_refusal(self, chunk) -> bool:
        """Whether this chunk id was not refused as read into before. NOTE: resent alone, a chunk
        that was read into arrives whole and matches its size; one that comes again as it was is the
        sender's own (broken entries it miscounted): acknowledged then, its broken entries skipped,
        rather than refused at every resend, a sender stalled for good."""
        digest = chunk_digest(chunk)
        if digest in self._digests:
            del self._digests[digest]
            return False
        self._digests[digest] = True
        if len(self._digests) > self.kept:
            self._digests.popitem(last=False)
        return True


def chunk_digest(chunk) -> bytes:
    """A chunk id (any msgpack value) as 16 bytes; ids of other types or values differ."""
    packed = msgpack.packb(chunk, use_bin_type=True, unicode_errors=EXACT)
    return hashlib.blake2b(packed, digest_size=16).digest()


class ForwardServer(StreamServer):
    surface = "forward"

    def __init__(self, service: ScoringService, next_hop: NextHop, max_message_bytes: int,
                 idle_timeout_s: float = 60.0, when_busy: str = "wait", events_tag: Optional[str] = None,
                 max_connections: int = 512, explain: int = 3):
        super().__init__(max_connections, service.metrics)
        self.explain = explain  # features named on each flagged record (settings.forward_explain)
        self.events_tag = events_tag  # anomaly events go on to the next hop under this tag
        self._injector: Optional[asyncio.Task] = None
        self._events = None  # the injector's watcher of the event hub
        self.service = service
        self.next_hop = next_hop
        self.max_message_bytes = max_message_bytes
        self.idle_timeout_s = idle_timeout_s
        self.when_busy = when_busy
        self.slice_records = service.settings.max_batch_records
        self._admission = asyncio.Semaphore(ACTIVE_CONNECTIONS)
        # NOTE: these throttles are keyed on fixed texts (the kind of failure), never on what a sender
        # chooses: keyed per tag, 3,000 distinct tags logged 3,000 lines in 2 s (probe-observe)
        self._unscored_said = OncePerInterval()  # per kind of error: records and chunks passed on unscored
        self._skipped_said = OncePerInterval()  # entries that are not [time, record]: a line per message was
        self._lost_said = OncePerInterval()  # connections reset: 1,000 RSTs were 1,000 lines
        # NOTE: while the next hop is down every sender's every chunk fails: one line per interval and
        # kind of failure (a 60 s outage behind one Fluent Bit retrying its chunks logged 1,090 lines)
        self._unacknowledged_said = OncePerInterval()
        self._refused_read_into = RefusedChunks()

    async def start(self, host: str, port: int, ssl=None) -> None:
        await super().start(host, port, ssl)
        behaviour = self.service.behaviour
        if self.events_tag and behaviour is not None:
            self._events = behaviour.hub.watch()
            self._injector = asyncio.create_task(self._inject_events(behaviour.hub, self._events))

    async def stop(self, grace_s: float = 10.0) -> None:
        """Take no new connections or messages; let relays under way finish (up to grace_s), then
        the anomaly events raised until then go on to the next hop (in what is left of grace_s).

        Connections idle or waiting unread are closed: their senders resend what they sent.
        """
        started = time.monotonic()
        await super().stop(grace_s)
        if self._injector is not None:
            # NOTE: cancelled at once, the events raised just before a stop (a burst's, as the
            # shipper's last chunks came) were lost to the next hop (soak trial). A closed watcher
            # hands out what it holds, then ends the injector; a next hop down cuts it at grace_s.
            self._events.close()
            try:
                await asyncio.wait_for(self._injector, max(0.1, grace_s - (time.monotonic() - started)))
            except asyncio.TimeoutError:
                log.warning("anomaly events not passed on at shutdown: the next hop did not take them in time",
                            extra={"grace_s": grace_s})
        await self.next_hop.close()

    async def _inject_events(self, hub, watcher) -> None:
        """Pass anomaly events on to the next hop as records of ``events_tag``, as they happen.

        While the next hop is down they wait in this watcher's bounded queue (the oldest are
        dropped past anomaly_watcher_queue, and counted); sent ones are retried until acked.
        """
        try:
            while True:
                event = await watcher.next()
                if event is None:
                    return
                events = [event] + watcher.take_ready(1000)
                frames = packed_frames([(self.events_tag, [int(e.end), e.as_dict()]) for e in events])
                while True:
                    try:
                        await self.next_hop.acknowledged(await self.next_hop.send(frames))
                        break
                    except NextHopError as error:
                        self._count("forward_events_next_hop")
                        log.warning("anomaly events not passed on yet; retrying", extra={
                            "events": len(events), "error": str(error)})
                        await asyncio.sleep(max(0.05, self.next_hop.down_until - time.monotonic()))
        finally:
            hub.unwatch(watcher)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        budget = ValueBudget(MAX_DECODED_VALUES, "a forward message")
        framer = MessageFramer(self.max_message_bytes)
        small = SmallDecoder(budget)
        peer = address_text(writer.get_extra_info("peername"))
        try:
            data = await self._first_bytes(reader, peer)
            while not self.draining:
                if data is None and framer.partial:  # the rest of a message begun with the last messages
                    data = await read_more(reader, framer, UNADMITTED_BYTES - framer.held_bytes)
                if data is None:
                    try:
                        async with asyncio.timeout(self.idle_timeout_s):
                            data = await reader.read(UNADMITTED_BYTES)
                    except asyncio.TimeoutError:
                        log.info("forward connection idle; closed", extra={"peer": peer,
                                                                           "idle_timeout_s": self.idle_timeout_s})
                        return
                if not data:
                    return
                if framer.fed == 0 and data.startswith(TLS_HANDSHAKE):
                    raise SpeaksTls("it opened with a TLS ClientHello; forward mode speaks the plain forward "
                                    "protocol: turn TLS off on the sender towards the sidecar, put a TLS "
                                    "terminator in front of the forward port, or use the gRPC surface with TLS")
                framed = await self._whole_messages_unadmitted(reader, framer, data)
                async with self._admission:
                    framer.restart_clock()  # the wait for a place is not the sender's time
                    task = asyncio.current_task()
                    self.busy.add(task)
                    try:
                        await self._take_messages(reader, writer, peer, framer, budget, small, framed)
                    finally:
                        self.busy.discard(task)
                data = None
        except SpeaksTls as error:  # counted and logged apart: the fix is the sender's setup, not its data
            self.service.metrics.refused("forward_tls", "forward", f"connection from {peer} closed: {error}")
        except (ForwardProtocolError, ValueError, TypeError, msgpack.UnpackException) as error:
            # counted and logged at most every few seconds: a port scanner or a misconfigured
            # shipper reconnecting in a loop would otherwise flood the log, a line per connection
            self.service.metrics.refused("forward_protocol", "forward", f"connection from {peer} closed: not the "
                                         f"forward protocol ({type(error).__name__}: {error})".replace(": )", ")"))
        except NextHopError as error:
            self._count("forward_next_hop")
            # (per kind of failure: its text without the numbers, which name ports and backoffs)
            unsaid = self._unacknowledged_said.due(re.sub(r"\d+(\.\d+)?", "N", str(error))[:200], 1)
            if unsaid is not None:
                log.warning("next hop failed; the sender was not acknowledged and will resend",
                            extra={"peer": peer, "error": str(error), "failed_since_last_logged": unsaid[0]})
        except (OSError, asyncio.TimeoutError) as error:
            unsaid = self._lost_said.due("forward connection lost", 1)
            if unsaid is not None:
                log.info("forward connection lost", extra={"peer": peer, "error": f"{type(error).__name__} {error}",
                                                           "lost_since_last_logged": unsaid[0]})

    async def _first_bytes(self, reader: asyncio.StreamReader, peer: str) -> Optional[bytes]:
        """The connection's first bytes, if they come within SILENT_SENDER_S; a sender quiet that
        long is noted at info level. Quiet is normal (Docker's fluentd driver and Fluent Bit's
        keep-alive connections idle between records); it is also all a secure-forward sender
        (shared_key without TLS) ever shows: it waits for a HELO the sidecar never sends, and both
        sides only time out, a minute later. A TLS sender speaks first and is told apart (serve)."""
        try:
            async with asyncio.timeout(min(SILENT_SENDER_S, self.idle_timeout_s)):
                return await reader.read(UNADMITTED_BYTES)
        except asyncio.TimeoutError:
            log.info("forward connection quiet since it opened: normal for an idle sender; a sender set "
                     "up for secure forward (shared_key, Shared_Key) would wait here for a HELO the sidecar "
                     "does not send (turn it off towards the sidecar)",
                     extra={"peer": peer, "quiet_s": SILENT_SENDER_S})
            return None

    @staticmethod
    async def _whole_messages_unadmitted(reader, framer: MessageFramer, data: bytes) -> list[memoryview]:
        """The messages ``data`` completes; while it completes none, read on before admission until
        one is whole or UNADMITTED_BYTES of it are held (then the rest is read once admitted).

        NOTE: admitted with a message's first bytes, a sender trickling the rest held one of the
        ACTIVE_CONNECTIONS places for PARTIAL_MESSAGE_TIMEOUT_S: twenty such connections, a byte
        every 2 s each, held a valid sender's ack back 99 s. Unadmitted, they hold no place."""
        messages = await framed_by(framer, data)
        while not messages and framer.partial and framer.held_bytes < UNADMITTED_BYTES:
            messages = await framed_by(framer, await read_more(reader, framer, UNADMITTED_BYTES - framer.held_bytes))
        return messages

    async def _take_messages(self, reader, writer, peer: str, framer: MessageFramer, budget: ValueBudget,
                             small: SmallDecoder, framed: list[memoryview]) -> None:
        """Relay the complete messages framed so far; read on while UNADMITTED_BYTES or more of one
        are here (less is read on unadmitted: _whole_messages_unadmitted).

        NOTE: the time a message may take to arrive counts from its admission (or the end of the last
        relay), not per read: a sender trickling a byte every few seconds would otherwise hold its
        admission for good."""
        while True:
            while framed:
                messages, refused, framed = await self._read_messages(framed, budget, small)
                if messages:
                    await self._relay(messages, writer, peer)
                    framer.restart_clock()  # nor is the relay's (waiting for the next hop's acks)
                budget.release(budget.count)  # relayed (or none read): let go
                if refused is not None:
                    raise refused
            framer.raise_if_broken()  # bad bytes after them: refused now that they went on
            if framer.held_bytes < UNADMITTED_BYTES:
                return
            framed = await framed_by(framer, await read_more(reader, framer))

    async def _read_messages(self, framed: list[memoryview], budget: ValueBudget,
                             small: SmallDecoder) -> tuple[list[Message], Optional[Exception], list[memoryview]]:
        """The messages to relay together, the error that refused the one after them (raised once they
        went on: they were lost with it), and the framed messages left to read after this relay (from one
        that did not fit the budget with them)."""
        messages: list[Message] = []
        held_since = time.perf_counter()
        for index, one in enumerate(framed):
            # NOTE: the loop runs between messages too: 230 small ones each walked by its headers (nested
            # past msgpack's limit) held it about 70 ms, each walk short of YIELD_AFTER_S alone
            held_since = await let_loop_run(held_since)
            try:
                message = await read_message(one, self.max_message_bytes, budget, small)
                await message.check_payload(self.max_message_bytes)
            except DecodeAfterRelay:
                return messages, None, framed[index:]
            except (ForwardProtocolError, ValueError, TypeError, msgpack.UnpackException) as error:
                return messages, error, []
            messages.append(message)
        return messages, None, []

    async def _relay(self, messages: list[Message], writer: asyncio.StreamWriter, peer: str) -> None:
        """Score and pass on a group of messages, then acknowledge the sender's chunks."""
        relay = Relay(wants_acks=all(m.chunk is not None for m in messages))
        async for piece in self._pieces(messages, relay):
            if isinstance(piece, Message):
                await self._send(relay, [raw_frame(piece.raw)])
                continue
            records = piece if not piece.markers else [
                (tag, entry) for tag, entry in piece if not is_group_marker(entry[0])]
            if records:
                await self._score([entry[1] for _, entry in records], [tag for tag, _ in records],
                                  [entry[0] for _, entry in records], peer)
            await self._send(relay, packed_frames(piece))  # group markers go on untouched, in their place
            if relay.held_bytes() > RELAY_WINDOW * self.max_message_bytes:
                await self._settle(relay)  # a big chunk inflated: keep only a window of it in memory
        await self._settle(relay)
        if relay.skipped:
            self._count("forward_invalid_entry", relay.skipped)
            self._say_skipped(relay, peer, len(messages))
        chunks = [m for m in messages if m.chunk is not None]
        read_into = [m for m in chunks if m.read_into() and self._refused_read_into.first_refusal(m.chunk)]
        refused = {id(m) for m in read_into}
        acks = [msgpack.packb({"ack": m.chunk}, use_bin_type=True, unicode_errors=EXACT)
                for m in chunks if id(m) not in refused]
        if acks:
            writer.write(b"".join(acks))
            try:
                async with asyncio.timeout(PARTIAL_MESSAGE_TIMEOUT_S):
                    await writer.drain()
            except asyncio.TimeoutError:
                raise ForwardProtocolError(f"the sender read no acks for {PARTIAL_MESSAGE_TIMEOUT_S:g} s") from None
        if read_into:  # the stream is out of step: what follows cannot be trusted either
            first = read_into[0]
            raise ForwardProtocolError(
                f"a chunk whose option gives size {first.size} came with {first.entries_read} entries, "
                f"{first.entries_skipped} of them broken: the message before it was cut short and read "
                "this one's bytes; not acknowledged, the sender resends it")

    async def _pieces(self, messages: list[Message], relay: Relay) -> AsyncIterator:
        """In order: slices of (tag, entry) pairs to score, and non-log messages to pass on as they are.
        A slice ends at slice_records records, or once its entries hold SLICE_VALUES values."""
        piece = Slice()
        for message in messages:
            if not message.is_log:
                if piece:
                    yield piece
                    piece = Slice()
                yield message
                continue
            if isinstance(message.entries, list):  # decoded whole: a list (no generator per record)
                for entry in message.entries:
                    if self._took(piece, message, entry, relay):
                        yield piece
                        piece = Slice()
                continue
            async for entry in message.entries:
                if entry is END_SLICE:
                    if piece:
                        yield piece
                        piece = Slice()
                    message.budget.release(message.budget.count)  # sent: let go
                    continue
                if self._took(piece, message, entry, relay):
                    yield piece
                    piece = Slice()
                    message.budget.release(message.budget.count)  # scored and sent: let go
        if piece:
            yield piece

    def _took(self, piece: Slice, message: Message, entry, relay: Relay) -> bool:
        """Add an entry to the slice (one that is not [time, record] is skipped and counted); True
        once the slice is full."""
        message.entries_read += 1
        try:
            entry = checked_entry(entry)
            piece.append((message.tag, entry))
            moment = entry[0]
            # (the class first, as is_group_marker does: a call an entry saved, most times are no pair)
            if (moment.__class__ is list or moment.__class__ is tuple) and is_group_marker(moment):
                piece.markers += 1
        except InvalidEntry as error:
            message.entries_skipped += 1
            relay.skipped += 1
            relay.skipped_why = str(error)
            relay.skipped_tag = message.tag
            if relay.skipped >= MAX_INVALID_ENTRIES:
                raise too_many_invalid(relay.skipped, error) from None
            return False
        return len(piece) >= self.slice_records or (message.budget is not None
                                                     and message.budget.count >= SLICE_VALUES)

    async def _settle(self, relay: Relay) -> None:
        """Wait until the next hop acked every frame sent so far, then let them go."""
        try:
            await self.next_hop.acknowledged([ack for _, ack in relay.sent if ack is not None])
        except NextHopError:
            if relay.wants_acks:
                raise  # no ack: the sender resends
        if relay.unacknowledged():
            await self._retry(relay)  # a sender that takes no acks cannot resend: hold and retry
        relay.sent.clear()

    async def _send(self, relay: Relay, frames: list[Frame]) -> None:
        try:
            relay.sent.extend(zip(frames, await self.next_hop.send(frames)))
        except NextHopError:
            if relay.wants_acks:
                raise
            relay.sent.extend((frame, None) for frame in frames)  # sent again by _retry

    async def _retry(self, relay: Relay) -> None:
        """Resend the frames not yet acknowledged until the next hop takes them all."""
        pending = relay.unacknowledged()
        refusals, stalled_since = 0, None
        hold_s = STALLED_HOLD_ACK_TIMEOUTS * self.next_hop.ack_timeout_s
        try:
            while pending:
                self._count("forward_next_hop")
                # A refusal is a hop that is up and turns these frames away (closes the connection
                # on them, acks others but not them); a stalled one may take them once it moves again.
                up, stalled = self.next_hop.reachable, self.next_hop.stalled
                refusals = refusals + 1 if up and not stalled else 0
                stalled_since = (stalled_since or time.monotonic()) if up and stalled else None
                if refusals >= MAX_REFUSALS:
                    self._give_up(pending, "the next hop takes connections but drops these records; giving up on them",
                                  attempts=refusals)
                    return
                if stalled_since is not None and time.monotonic() - stalled_since >= hold_s:
                    self._give_up(pending, f"the next hop took these records' bytes but acked none for {hold_s:g} s "
                                           "(paused, overloaded, or answering no acks); giving up on them")
                    return
                log.warning("next hop failed; holding records for a sender that takes no acks",
                            extra={"frames": len(pending), "error": self.next_hop.last_error})
                await asyncio.sleep(max(0.05, self.next_hop.down_until - time.monotonic()))
                retry = Relay(wants_acks=True)
                try:
                    await self._send(retry, pending)
                    await self.next_hop.acknowledged([ack for _, ack in retry.sent])
                except NextHopError:
                    pass
                pending = retry.unacknowledged() + pending[len(retry.sent):]
        except asyncio.CancelledError:
            log.error("stopped while the next hop was down: records of a sender that takes no acks are lost",
                      extra={"frames": len(pending), "error": self.next_hop.last_error})
            raise

    def _give_up(self, pending: list, message: str, **details) -> None:
        self._count("forward_refused", len(pending))
        log.error(message, extra={"frames": len(pending), **details, "error": self.next_hop.last_error})

    async def _score(self, records: list[dict], tags: list[str], times: list, peer: str = "") -> None:
        """Add the score (and the sidecar's notes) to each record in place; records that cannot be
        scored go on marked unscored, with the reason. ``times``: the entries' times as sent
        (windows and clients leave late records out)."""
        started = time.perf_counter()
        try:
            error = await self._scored(records, tags, times)
            if isinstance(error, (ModelNotFound, TagTooLong)) and len(set(tags)) > 1:
                # NOTE: messages read together are scored in one call: one tag routed to a model
                # that is not loaded (or too long) sent every record read with it on unscored. Each
                # tag alone (only then: after any other failure another call would fail the same way):
                for indexes in _indexes_by_tag(tags):
                    part = [records[i] for i in indexes]
                    error = await self._scored(part, [tags[i] for i in indexes], [times[i] for i in indexes])
                    if error is not None:
                        self._unscored(part, tags[indexes[0]], error, peer)
            elif error is not None:
                self._unscored(records, tags[0], error, peer)
        finally:
            metrics = self.service.metrics
            metrics.child(metrics.request_seconds, "forward").observe(time.perf_counter() - started)

    async def _scored(self, records: list[dict], tags: list[str], times: list) -> Optional[LogscoreError]:
        """Score the records in place: None, or why they could not be scored (left as they are)."""
        try:
            while True:
                try:
                    outcome = await self.service.score(ScoreCall(records, surface="forward", tags=tags, times=times,
                                                                explain_flagged=self.explain))
                    break
                except Overloaded:
                    if self.when_busy == "pass":
                        raise
                    await asyncio.sleep(0.02)  # wait: the queue drains, the sender's buffer holds the rest
        except LogscoreError as error:
            return error
        except Exception:  # a bug in scoring: the records still go on (a resend would fail again)
            log.exception("internal error while scoring; forwarding the records unscored",
                          extra={"tag": cut_text(tags[0]), "records": len(records)})
            return LogscoreError("internal error in the sidecar (logged there)")  # counted as kind internal
        names = [m.name for m in outcome.models]
        scores, flags, index = outcome.scores.tolist(), outcome.is_anomaly.tolist(), outcome.model_index.tolist()
        notes = notes_by_record([(i, text) for i, _, text in outcome.notes], len(records)) if outcome.notes else None
        explanations = outcome.explanations
        for i, record in enumerate(records):
            record[SCORE_KEY] = round(scores[i], 6)
            record[FLAG_KEY] = flags[i]
            record[MODEL_KEY] = names[index[i]]
            record.pop(UNSCORED_KEY, None)  # marks left by an earlier hop no longer hold
            record.pop(ENTITY_KEY, None)  # this hop's, set below when its model watches the record's client
            if notes is not None and notes[i]:
                record[NOTES_KEY] = notes[i]
            else:
                record.pop(NOTES_KEY, None)
            # Flagged records only: the model named features of records the feedback then unflagged too.
            if flags[i] and explanations is not None and explanations[i]:
                record[EXPLANATION_KEY] = explanations[i]
            else:
                record.pop(EXPLANATION_KEY, None)
        if outcome.entity_scores is not None:
            for record, value in zip(records, outcome.entity_scores.tolist()):
                if value == value:  # not NaN: the record names a client
                    record[ENTITY_KEY] = round(value, 6)
        return None

    def _unscored(self, records: list[dict], tag: str, error: LogscoreError, peer: str) -> None:
        reason = str(error)
        self._count("internal" if type(error) is LogscoreError else type(error).__name__)
        self._say_unscored(tag, error, len(records), peer)
        for record in records:
            for earlier_hop in (SCORE_KEY, FLAG_KEY, MODEL_KEY, ENTITY_KEY, EXPLANATION_KEY):  # not this hop's
                record.pop(earlier_hop, None)
            record[UNSCORED_KEY] = True
            record[NOTES_KEY] = [f"unscored: {reason}"]

    def _say_unscored(self, tag: str, error: LogscoreError, records: int, peer: str) -> None:
        """Log records passed on unscored once per kind of error an interval, with what came since
        and this chunk's sender and tag as the example: a tag routed to no model sends a chunk a
        second, and each was a warning; a fleet with a tag per pod has thousands of tags."""
        unsaid = self._unscored_said.due(type(error).__name__, records, 1)
        if unsaid is not None:
            log.warning("forwarding records unscored", extra={
                "peer": peer, "tag": cut_text(tag), "records": records, "error": str(error)[:500],
                "records_since_last_logged": unsaid[0], "chunks_since_last_logged": unsaid[1]})

    def _say_skipped(self, relay: Relay, peer: str, messages: int) -> None:
        """Log entries skipped (not [time, record]) once an interval, with how many came since, and in
        how many messages (one relay is every message framed in one read: counted one, a pipelining
        sender's 3,000 messages were a few, review, session 27)."""
        unsaid = self._skipped_said.due("skipped entries", relay.skipped, messages)
        if unsaid is not None:
            log.warning("skipped entries that are not [time, record] or could not be decoded", extra={
                "peer": peer, "tag": cut_text(relay.skipped_tag), "entries": relay.skipped,
                "last": relay.skipped_why[:500], "entries_since_last_logged": unsaid[0],
                "messages_since_last_logged": unsaid[1]})

    def _count(self, kind: str, amount: int = 1) -> None:
        metrics = self.service.metrics
        metrics.child(metrics.errors, kind, "forward").inc(amount)
