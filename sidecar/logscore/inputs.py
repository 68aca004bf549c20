"""Reading log lines from files, gzip files and stdin, as text that never fails to decode."""

from __future__ import annotations

import gzip
import json
import sys
from typing import Iterable, Iterator

from .errors import InputError

GZIP_MAGIC = b"\x1f\x8b"


def read_lines(paths: Iterable[str]) -> Iterator[str]:
    """Lines of every file in order ('-' is stdin); gzip is recognised by its magic bytes.

    Invalid UTF-8 becomes U+FFFD; empty lines are skipped.
    """
    for path in paths:
        try:
            if path == "-":
                yield from _lines(sys.stdin.buffer)
                continue
            with open(path, "rb") as raw:
                magic = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
                stream = gzip.GzipFile(fileobj=raw) if magic == GZIP_MAGIC else raw
                yield from _lines(stream)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except (OSError, EOFError) as error:
            raise InputError(f"{path}: cannot read: {error}") from None


def _lines(stream) -> Iterator[str]:
    for raw_line in stream:
        line = raw_line.rstrip(b"\r\n").decode("utf-8", errors="replace")
        if line:
            yield line


def read_json_records(paths: Iterable[str]) -> Iterator[object]:
    """Each line a JSON object (a field map, as a shipper would send); other lines stay raw text."""
    for line in read_lines(paths):
        yield json_record(line)


def json_record(line: str) -> object:
    """A line holding a JSON object as that field map; any other line as raw text."""
    try:
        value = json.loads(line)
    except ValueError:
        return line
    return value if isinstance(value, dict) else line
