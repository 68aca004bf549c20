"""Reading log lines (inputs.py): formats told apart on stdin, what the reader cut, JSON records."""

import bz2
import gzip
import io
import sys
from types import SimpleNamespace

import pytest

from logscore.errors import InputError
from logscore.inputs import read_lines


class OneByteAtATime(io.RawIOBase):
    """A pipe whose writer sends a byte at a time (ssh, nc, curl): each read gives one byte."""

    def __init__(self, data: bytes):
        self._data = data

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data, self._data = self._data[:1], self._data[1:]
        buffer[:len(data)] = data
        return len(data)


def stdin_of(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BufferedReader(OneByteAtATime(data))))


def test_stdin_fed_a_byte_at_a_time_is_told_apart_by_all_its_first_bytes(monkeypatch):
    """peek() saw what one read gave: a gzip whose first byte came alone was read as lines of binary (review)."""
    lines = [f"GET /item/{i} HTTP/1.1" for i in range(50)]
    text = ("\n".join(lines) + "\n").encode()
    stdin_of(monkeypatch, gzip.compress(text))
    assert list(read_lines(["-"])) == lines
    stdin_of(monkeypatch, bz2.compress(text))  # (its pattern needs all 10 bytes)
    with pytest.raises(InputError, match="stdin: bzip2-compressed"):
        list(read_lines(["-"]))
    stdin_of(monkeypatch, b"a\n")  # shorter than the magic: read whole
    assert list(read_lines(["-"])) == ["a"]


class LiveLines(OneByteAtATime):
    """A live pipe (tail -f): what was written so far, then a read that would wait for more."""

    def readinto(self, buffer) -> int:
        if not self._data:
            raise AssertionError("read past what was written: a live pipe would wait here")
        return super().readinto(buffer)


def test_a_short_first_line_on_a_live_stdin_is_given_without_waiting_for_more(monkeypatch):
    """The search for the magic read on to 10 bytes: a first line of 3 waited for the next one (review)."""
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BufferedReader(LiveLines(b"ok\n"))))
    assert next(read_lines(["-"])) == "ok"


def test_stdin_is_named_stdin_in_gzip_warnings(monkeypatch, capsys):
    """"-: the gzip stream ends early" (review): stdin is called stdin, as in every other message."""
    packed = gzip.compress(("\n".join(f"line {i}" for i in range(2000)) + "\n").encode())
    stdin_of(monkeypatch, packed[: len(packed) // 2])
    read = list(read_lines(["-"]))
    assert 0 < len(read) < 2000 and read[0] == "line 0"
    assert "logscore: warning: stdin: the gzip stream ends early" in capsys.readouterr().err


def test_only_the_lines_the_reader_cut_are_marked_cut(tmp_path):
    """cut_by_reader guessed from the length: 1.5 MB of 0xff, never cut, read as 4.5 MB of U+FFFD, was
    'cut' and got a false `truncated` note in score and client (review, session 27)."""
    from logscore.inputs import MAX_LINE_BYTES, cut_by_reader

    invalid = b"\xff" * 1_500_000
    too_long = b"b" * (MAX_LINE_BYTES + 10)
    exactly = b"c" * MAX_LINE_BYTES
    (tmp_path / "in.log").write_bytes(b"\n".join([invalid, too_long, exactly, b"short"]) + b"\n")
    lines = list(read_lines([str(tmp_path / "in.log")]))
    assert [len(line) for line in lines] == [1_500_000, MAX_LINE_BYTES, MAX_LINE_BYTES, 5]
    assert [cut_by_reader(line) for line in lines] == [False, True, False, False]


def test_a_lone_surrogate_is_replaced_at_any_depth_of_a_json_record():
    """Only the top level's values were replaced: '\\ud800' stayed in {"k8s": {"pod": ...}} and in ["x\\ud800"],
    so `score` kept it while `client` sent U+FFFD (review, session 27)."""
    from logscore.inputs import json_record
    from logscore.records import is_utf8

    line = ('{"message": "a \\ud800", "k8s": {"pod": "p\\udc80", "\\ud801key": [1, "x\\ud800", {"deep": "\\udfff"}]},'
            ' "tags": ["t\\ud800"], "n": 3, "ok": null}')
    record = json_record(line)
    assert record == {"message": "a \ufffd", "k8s": {"pod": "p\ufffd", "\ufffdkey": [1, "x\ufffd", {"deep": "\ufffd"}]},
                      "tags": ["t\ufffd"], "n": 3, "ok": None}
    assert is_utf8(repr(record))
    assert json_record('{"k8s": {"pod": "p\\u00e9"}}') == {"k8s": {"pod": "p\u00e9"}}  # (a real escape kept)
