"""Text from logs and from operators, made safe to show: on a terminal and in the HTML pages
(the review page, `logscore report --html`).

Control characters (C0, DEL, C1) and invisible characters are shown as escapes (``\\x1b``,
``\\u202e``): a log line's escape sequence printed as it is retitles or clears the operator's
terminal, a ``\\r\\n`` forges a line of the report, a bidirectional override (U+202E) shows a URL
or a reason reversed (``/files/\\u202etxt.exe`` reads ``/files/exe.txt``), and a zero-width or
tag character makes two different values look the same, on the page where an operator decides
what is normal. Which characters are invisible is Unicode's say (their category), not a list of
ours: a hand-picked list let the soft hyphen, the tag characters and U+FFF9-FFFB through.
"""

from __future__ import annotations

import re
import unicodedata
from html import escape
from typing import Callable, Sequence

# Control (Cc), format (Cf: bidirectional controls, zero-width, soft hyphen, tags), line and
# paragraph separators (Zl, Zp), and unassigned code points (Cn: no glyph in this Unicode).
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cn"})
# ...and the marks and letters Unicode calls default-ignorable (they show nothing): the combining
# grapheme joiner, the Hangul fillers, Khmer's inherent vowels, the Mongolian and other variation
# selectors ("a\ufe0fb" looked like "ab").
HIDDEN_CHARACTERS = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0").union(
    map(chr, range(0x180b, 0x1810)), map(chr, range(0xfe00, 0xfe10)), map(chr, range(0xe0100, 0xe01f0)))


def hidden(char: str) -> bool:
    return char in HIDDEN_CHARACTERS or unicodedata.category(char) in HIDDEN_CATEGORIES


def ranges_of(chars: list[str]) -> str:
    """A regular expression's character class of these (sorted) characters, as ranges."""
    spans: list[list[int]] = []
    for code in map(ord, chars):
        if spans and spans[-1][1] == code - 1:
            spans[-1][1] = code
        else:
            spans.append([code, code])
    return "".join(f"\\u{first:04x}-\\u{last:04x}" for first, last in spans)


# NOTE: the Basic Multilingual Plane's hidden characters found once (6 ms, 1,566 of them in Unicode 14);
# past it, each character is looked up when met (an emoji, say): asking for each character of a
# 2,000-character reason in Chinese took 290 us a text, against 6 us for a class.
HIDDEN_IN_BMP = [char for char in map(chr, range(0x10000)) if hidden(char)]
LOOKED_UP = re.compile(f"[{ranges_of(HIDDEN_IN_BMP)}\\U00010000-\\U0010ffff]")
# A page shows a multi-line record (a stack trace) as its lines: tabs and line feeds stay.
TAB_AND_LINE_FEED = "\t\n"
LOOKED_UP_IN_HTML = re.compile(f"[{ranges_of([c for c in HIDDEN_IN_BMP if c not in TAB_AND_LINE_FEED])}"
                               "\\U00010000-\\U0010ffff]")


def as_escape(match: re.Match) -> str:
    """A hidden character as its escape (``\\u202e``); any other as it is."""
    char = match.group()
    return char.encode("unicode_escape").decode("ascii") if hidden(char) else char


def printable(text: object) -> str:
    """Text from the logs, safe to print to a terminal: unprintable characters as escapes (\\x1b)."""
    return LOOKED_UP.sub(as_escape, str(text))


def html_text(text: object) -> str:
    """Text from the logs or an operator, safe inside an HTML element or a quoted attribute."""
    return escape(LOOKED_UP_IN_HTML.sub(as_escape, str(text)))


def named_first(items: Sequence, shown: int, name: Callable[[object], str] = str) -> str:
    """The first ``shown`` of ``items``, named, and how many more: "a, b, c and 27 more" (a list of
    thousands is neither named whole nor shown whole)."""
    more = len(items) - shown
    return ", ".join(name(item) for item in items[:shown]) + (f" and {more:,} more" if more > 0 else "")
