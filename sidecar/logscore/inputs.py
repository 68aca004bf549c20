"""Reading log lines from files, gzip files and stdin, as text that never fails to decode."""

from __future__ import annotations

import gzip
import io
import json
import re
import sys
import zlib
from typing import Iterable, Iterator, NamedTuple, Optional

from .errors import InputError
from .records import is_utf8

GZIP_MAGIC = b"\x1f\x8b"
# NOTE: a "line" is read at most this long, the rest of it skipped: a file with no line breaks (the
# NULs copytruncate leaves, a gzip of one endless line) was read whole, without bound. Records
# are cut far shorter anyway (--max-record-bytes, 64 KiB by default, noted `truncated`).
MAX_LINE_BYTES = 4 * 2**20
UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")
# Compressions read_lines does not undo, by their magic bytes, with the command that does.
# NOTE: read as text, a zstd log gave 800 "records" of binary, and train wrote a model of them (probe).
COMPRESSED_MAGIC = (("zstd", re.compile(b"\\x28\\xb5\\x2f\\xfd"), "zstd -dc"),
                    ("xz", re.compile(b"\\xfd7zXZ\\x00"), "xz -dc"),
                    ("bzip2", re.compile(b"BZh[1-9](1AY&SY|\\x17rE8P\\x90)"), "bzip2 -dc"))
MAGIC_BYTES = 10  # the longest start COMPRESSED_MAGIC and GZIP_MAGIC look at
READ_BYTES = 2**16  # read at a time once the start is told apart


def read_lines(paths: Iterable[str], blank_lines: bool = False) -> Iterator[str]:
    """Lines of every file in order ('-' is stdin, read alike); gzip is recognised by its magic bytes.

    Invalid UTF-8 becomes U+FFFD; blank lines are skipped (given as '' with ``blank_lines``, for
    readers that name rows by their line number); a line longer than MAX_LINE_BYTES is
    cut (with a warning); a gzip file that ends early or is damaged gives the lines before its end
    or the damage (with a warning): a log compressed while it was written, or copied half, still counts.
    """
    for path in paths:
        shown = "stdin" if path == "-" else path
        try:
            if path == "-":  # as a file: stdin's compressed text was read as lines of binary
                yield from _file_lines(sys.stdin.buffer, path, blank_lines)
                continue
            with open(path, "rb") as raw:
                yield from _file_lines(raw, path, blank_lines)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except EOFError:
            warn(f"{shown}: the gzip stream ends early (cut off while written or copied?): the lines before "
                 "its end are read, the rest is lost")
        except (zlib.error, gzip.BadGzipFile) as error:  # damaged inside, not cut (zlib's error is no OSError)
            warn(f"{shown}: the gzip stream is damaged ({error}): the lines before the damage are read, the "
                 "rest is lost")
        except OSError as error:
            raise InputError(f"{shown}: cannot read: {error}") from None


def _file_lines(raw, path: str, blank_lines: bool) -> Iterator[str]:
    """The lines of one open file (``path`` '-': stdin), told apart by its first bytes: gzip is read,
    UTF-16 and other compressions are refused saying what to do."""
    start = raw.peek(MAGIC_BYTES)[:MAGIC_BYTES]
    # A pipe gave less in its first read, or the file is short: read on, then replay those bytes (the
    # replay cost 9 % more CPU reading a plain file, so only then: session 27, load 2.0).
    if len(start) < MAGIC_BYTES:
        start = _first_bytes(raw)
        raw = io.BufferedReader(_Replayed(start, raw), buffer_size=READ_BYTES)
    magic = start[:2]
    shown = "stdin" if path == "-" else path
    if magic in UTF16_MARKS:
        raise InputError(f"{shown}: UTF-16 text (it starts with a byte-order mark); convert it first: "
                         f"iconv -f UTF-16 -t UTF-8 {'FILE' if path == '-' else path}")
    refuse_compressed(path, start)
    stream = gzip.GzipFile(fileobj=raw) if magic == GZIP_MAGIC else raw
    yield from _lines(stream, shown, blank_lines)


def is_gzip(path: str) -> bool:
    """Whether the file starts as gzip does (read_lines decompresses it); False for one it cannot open."""
    try:
        with open(path, "rb") as raw:
            return raw.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    except OSError:
        return False


def _first_bytes(raw) -> bytes:
    """Up to MAGIC_BYTES of a stream's start, or all of it when shorter. NOTE: peek() gives what one read
    gave: a pipe fed a byte at a time (ssh, nc, curl) showed one byte, and a gzip was read as binary lines."""
    start = b""
    # (A line break ends the search: no magic holds one, and a short first line fed live, tail -f, waited.)
    while len(start) < MAGIC_BYTES and b"\n" not in start and (chunk := raw.read1(MAGIC_BYTES - len(start))):
        start += chunk
    return start


class _Replayed(io.RawIOBase):
    """A stream whose first bytes were read to tell its format: those bytes, then the rest of it."""

    def __init__(self, head: bytes, rest):
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            data, self._head = self._head[:len(buffer)], self._head[len(buffer):]
        else:
            data = self._rest.read1(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def refuse_compressed(path: str, start: bytes) -> None:
    """Refuse a file compressed otherwise than with gzip, saying how to read it. The advice names no
    command: every command reading log files through read_lines takes '-' as stdin, but each where it
    takes files (`train -i -`, `score -`, `report -`), so it says to put '-' where the file was."""
    for name, magic, decompress in COMPRESSED_MAGIC:
        if magic.match(start):
            if path == "-":
                raise InputError(f"stdin: {name}-compressed, which is read only when decompressed (gzip is read as "
                                 f"it is); decompress it in the pipe, the command as it was: {decompress} FILE | "
                                 "logscore ...")
            raise InputError(f"{path}: {name}-compressed, which is read only when decompressed (gzip is read as it "
                             f"is); decompress it first ({decompress} {path} > FILE) and give FILE, or pipe it in "
                             f"and give '-' (stdin) where {path} was: {decompress} {path} | logscore ... -")


class CutLine(str):
    """A line read_lines cut at MAX_LINE_BYTES, the rest skipped: marked by the reader itself, as a guess
    from its length took 1.5 MB of invalid UTF-8 (each byte 3 once read as U+FFFD) for a cut line (review)."""

    __slots__ = ()


def _lines(stream, name: str, blank_lines: bool) -> Iterator[str]:
    cut, longest = 0, 0
    while raw_line := stream.readline(MAX_LINE_BYTES):
        # (a line of exactly MAX_LINE_BYTES reads so too; only bytes skipped past it make it cut)
        skipped = _skip_to_line_end(stream) if len(raw_line) == MAX_LINE_BYTES and not raw_line.endswith(b"\n") else 0
        was_cut = skipped > 0
        if was_cut:
            cut, longest = cut + 1, max(longest, MAX_LINE_BYTES + skipped)
        line = raw_line.rstrip(b"\r\n").decode("utf-8", errors="replace")
        if line and not line.isspace():
            yield CutLine(line) if was_cut else line
        elif blank_lines:
            yield ""
    if cut:
        warn(f"{name}: {cut:,} line(s) longer than {MAX_LINE_BYTES:,} bytes (the longest {longest:,}): only "
             "their first bytes were read")


def cut_by_reader(record: object) -> bool:
    """Whether ``record`` is a line read_lines cut (MAX_LINE_BYTES), the rest skipped."""
    return isinstance(record, CutLine)


def _skip_to_line_end(stream) -> int:
    """Read past the rest of a line; its length."""
    skipped = 0
    while chunk := stream.readline(MAX_LINE_BYTES):
        if chunk.endswith(b"\n"):
            return skipped + len(chunk.rstrip(b"\r\n"))
        skipped += len(chunk)
    return skipped


# Python's str may hold a surrogate alone (a JSON "\\ud800" with no low half, or bytes that were not
# UTF-8 in a command's arguments); UTF-8, and so protobuf's strings, hold none.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def sendable(text: str) -> str:
    """``text`` with each lone surrogate as U+FFFD, as read_lines reads bytes that are not UTF-8.

    NOTE: `logscore client` and `feedback add --json-records` put records as they were into a request:
    one lone surrogate raised UnicodeEncodeError, a traceback that lost the whole batch and every later one."""
    return text if text.isascii() else LONE_SURROGATE.sub("\ufffd", text)  # (isascii: most logs, 10 times quicker)


def sendable_value(value: object) -> object:
    """``value`` with every text in it sendable, at any depth: names, values, and those of nested maps and
    lists (only the top level's were: `{"k8s": {"pod": "\\ud800"}}` kept it, so `score` and `client`, which
    sends nested values as text, scored it apart: review, session 27)."""
    if isinstance(value, str):
        return sendable(value)
    if isinstance(value, dict):
        return {sendable(str(name)): sendable_value(item) for name, item in value.items()}
    if isinstance(value, list):
        return [sendable_value(item) for item in value]
    return value


def warn(message: str) -> None:
    print(f"logscore: warning: {message}", file=sys.stderr, flush=True)


def read_json_records(paths: Iterable[str]) -> Iterator[object]:
    """Each line a JSON object (a field map, as a shipper would send), or a line of the files
    shippers write (shipper_line); other lines stay raw text."""
    for line in read_lines(paths):
        yield json_record(line)


class NumberedRecord(NamedTuple):
    """A record with where it was read: its file ('-' for stdin) and line number in it (from 1)."""

    file: str
    line: int
    record: object


def numbered_records(paths: Iterable[str], as_json: bool) -> Iterator[NumberedRecord]:
    """The records of read_lines (json_record's of read_json_records when ``as_json``), each with its
    file and its line number in that file, blank lines counted."""
    for path in paths:
        for line_number, line in enumerate(read_lines([path], blank_lines=True), 1):
            if line:
                yield NumberedRecord(path, line_number, json_record(line) if as_json else line)


def json_record(line: str) -> object:
    """A line holding a JSON object, or a shipper's file line, as that field map; any other line as raw text.
    A lone surrogate in its names or text values, nested too (a JSON "\\ud800" without its low half), is read
    as U+FFFD (sendable_value), as a request to the sidecar carries it: `logscore score` and `logscore client`
    score it alike."""
    parsed = shipper_line(line)
    if parsed is None:
        return line
    # (a lone surrogate comes of a \\ud800-\\udfff escape, or was in the line: most lines hold none, and pass as read)
    if "\\ud" not in line and "\\uD" not in line and (line.isascii() or is_utf8(line)):
        return parsed[1]
    try:
        return sendable_value(parsed[1])
    except RecursionError:  # (nested almost as deep as json reads: as raw text, as lines that are no field map)
        return sendable(line)


# Fluent Bit's file output: `tag: [seconds.nanoseconds, {json}]` (a forward-mode sidecar's next hop)
FLUENT_BIT_FILE_LINE = re.compile(r"(?P<tag>[^\s\[]+): \[(?P<time>\d+\.\d+), (?P<record>\{.*\})\]")


def shipper_line(line: str) -> Optional[tuple[str, dict, str]]:
    """(tag, record, the time written before it) of a line holding one record: a JSON object (no tag
    or time of its own), Fluentd out_file's `time<TAB>tag<TAB>{json}` or Fluent Bit's file output
    `tag: [time, {json}]`; None for any other line."""
    tag = written = ""
    if not line.lstrip().startswith("{"):
        if fluent_bit := FLUENT_BIT_FILE_LINE.fullmatch(line):
            tag, written, line = fluent_bit.group("tag", "time", "record")
        else:
            head, brace, rest = line.partition("{")
            parts = head.rstrip("\t ").split("\t")
            if not brace or len(parts) != 2:
                return None
            written, tag = parts
            line = brace + rest
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested thousands deep, as no field map is
        return None
    return (tag, record, written) if isinstance(record, dict) else None
