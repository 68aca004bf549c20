"""What injections need, read from a feature's text: used by the injection prior of training
(training/prior.py); what is attack-like (``attack_like``, the feedback step's rule: it suppresses no
attack-like record under a mark of its section); and what may be an attack (``may_be_attack``: wider, the
review page promotes no such group for marking, review.py ``reached``). A serving module: the sidecar
does not import the training package.

Marks are read in context (``injection_like``): an apostrophe after a letter is language, and
a parameter's per-page features are as rare as the page. ``;`` is not a mark: Apache's
directory listings (``?C=M;O=D``) and ``;jsessionid=`` put it in ordinary requests (0.8 % of the
blog log of models/apache-access.onnx).
"""

from __future__ import annotations

import re
from typing import Optional

from .features.converters import PATH_ENCODED_TWICE, VALUE_ENCODED_TWICE

# Substrings of a feature's text (an n-gram, a parameter's value shape, a path template) that
# injections need: SQL quoting and comments, markup, shell metacharacters, traversal, NUL, ${...}.
INJECTION_MARKS = ("'", '"', "<", ">", "`", "|", "\\", "\x00", "..", "--", "/*", "*/", "${", "$(")
# (one search for any of them: the review page reads a new group's features on the scoring path)
ANY_MARK = re.compile("|".join(re.escape(mark) for mark in INJECTION_MARKS))
# Quotes of the feature names themselves (UrlConverter's flag "parameter without '=': ...").
FEATURE_QUOTES = ("'='",)
# An apostrophe after a letter is language (O'Brien, L'Hospitalet: 0.3 % of CSIC 2010's normal
# requests); at the start of a text (an n-gram, one character of a value) its context is unknown.
LANGUAGE_APOSTROPHE = re.compile(r"(?:(?<=[^\W\d_])|^)'")


def injection_like(text: Optional[str]) -> bool:
    """Whether a feature's text (a converter's feature_text, no field name) holds an injection mark."""
    if text is None:
        return False
    for quoted in FEATURE_QUOTES:
        text = text.replace(quoted, "")
    if text.startswith("value ") or (text.startswith("shape ") and "?" in text.partition("=")[0]):
        # UrlConverter's twins, per page, of a parameter's features ("value {template}?{name}=...") are
        # as rare as the page: the parameter's own features tell whether the site uses the mark.
        return False
    if text.startswith("character "):  # UrlConverter: one character of a parameter's values
        text = text.rpartition("=")[2]
    return ANY_MARK.search(LANGUAGE_APOSTROPHE.sub("", text)) is not None


# UrlConverter's feature texts attack_like does not read (it reads path, segment, shape and character
# ones): they name a template, a slot or a class, nothing an attack alone sets
URL_UNREAD = ("parameters ", "parameter ", "length ", "value ")
# In a path, ".." and "--" inside a name are ordinary ("v1.2...v1.3-notes", "c--intro"): a traversal
# is a whole segment, read below.
PATH_MARKS = re.compile("|".join(re.escape(mark) for mark in INJECTION_MARKS if mark not in ("..", "--")))
ALLOWED_DOT_SEGMENTS = (".well-known",)  # RFC 8615: ACME challenges, security.txt
LEFT_ESCAPE = re.compile(r"%[a9]")  # a value's shape with an escape left after decoding (%u, or thrice encoded)


def attack_like(text: Optional[str]) -> bool:
    """Whether a feature's text names what an attack may be. For a URL (UrlConverter) only its path,
    segment, shape and character features are read: a path encoded more than once; a path or segment
    holding an injection mark other than ``..`` and ``--``, an empty segment (``/blog//etc/passwd``) or
    one starting with a dot (``..``, ``..;``, ``.git``, ``.env``; not ``.well-known``); a parameter's shape
    or character holding an injection mark (``injection_like``), a traversal (a ``.`` part: the shape of
    ``../..``) or an escape left after decoding. A value encoded more than once alone is not (a login's
    ``next=%252Faccount``). Another converter's feature: an injection mark."""
    if text is None:
        return False
    if text.startswith(PATH_ENCODED_TWICE):
        return True
    if text.startswith(("path ", "segment ")):
        return odd_path(text)
    if text.startswith(("shape ", "character ")):
        value = text.partition("=")[2]
        return injection_like(text) or (text.startswith("shape ") and (
            "." in value.split("/") or LEFT_ESCAPE.search(value) is not None))
    if text.startswith(URL_UNREAD + (VALUE_ENCODED_TWICE,)):
        return False
    return injection_like(text)


PLAIN_VALUE_SYMBOLS = frozenset("a9.-_")  # a parameter value's characters in a plain name or version


def may_be_attack(text: Optional[str]) -> bool:
    """What the review page keeps from offering as a saving (review.py ``reached``): ``attack_like``, or a
    parameter value that is no plain name or version (a character other than letters, digits, ``.``,
    ``-``, ``_``, or a value encoded more than once: fuzzdb's encoded traversals and quotes read
    "character file=/", "value encoded more than once: q"). Wider than ``attack_like`` on purpose: there
    a false alarm keeps an ordinary page flagged under its section's mark (``next=%252Faccount``); here
    it only loses a saving, while a miss lists an attack first for a normal mark (28 of 40 draws before
    the page read kinds: docs/accuracy.md)."""
    if text is None:
        return False
    if attack_like(text) or text.startswith(VALUE_ENCODED_TWICE):
        return True
    return text.startswith("character ") and text.partition("=")[2] not in PLAIN_VALUE_SYMBOLS


def odd_path(text: str) -> bool:
    """A path or segment feature naming a mark, an empty segment or one starting with a dot."""
    if text.startswith("path "):
        segments = text[len("path "):].split("/")
        inner = segments[1:-1]  # (the empty text before the leading "/", and after a trailing one, are no segments)
    else:  # (an empty segment feature is every path's first: "/x" is "", "x")
        segments, inner = [text[len("segment "):]], []
    if PATH_MARKS.search(LANGUAGE_APOSTROPHE.sub("", text)) is not None:
        return True
    return "" in inner or any(s.startswith(".") and s not in ALLOWED_DOT_SEGMENTS for s in segments)
