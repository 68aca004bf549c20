"""Text from logs and from operators, made safe to show: on a terminal and in the HTML pages
(the review page, `logscore report --html`).

Control characters (C0, DEL, C1) and invisible formatting characters are shown as escapes
(``\\x1b``, ``\\u202e``): a log line's escape sequence printed as it is retitles or clears the
operator's terminal, a ``\\r\\n`` forges a line of the report, a bidirectional override (U+202E)
shows a URL or a reason reversed (``/files/\\u202etxt.exe`` reads ``/files/exe.txt``), and a
zero-width character makes two different values look the same, on the page where an operator
decides what is normal.
"""

from __future__ import annotations

import re
from html import escape

INVISIBLE = "\x7f-\x9f\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
UNPRINTABLE = re.compile(f"[\x00-\x1f{INVISIBLE}]")
# A page shows a multi-line record (a stack trace) as its lines: tabs and line feeds stay.
UNPRINTABLE_IN_HTML = re.compile(f"[\x00-\x08\x0b-\x1f{INVISIBLE}]")


def as_escape(match: re.Match) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def printable(text: object) -> str:
    """Text from the logs, safe to print to a terminal: unprintable characters as escapes (\\x1b)."""
    return UNPRINTABLE.sub(as_escape, str(text))


def html_text(text: object) -> str:
    """Text from the logs or an operator, safe inside an HTML element or a quoted attribute."""
    return escape(UNPRINTABLE_IN_HTML.sub(as_escape, str(text)))
