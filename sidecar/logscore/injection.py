"""What injections need, read from a feature's text: used by the injection prior of training
(training/prior.py) and by the review page, which promotes no injection-like group for marking
(review.py ``reached``). A serving module: the sidecar does not import the training package.

Marks are read in context (``injection_like``): an apostrophe after a letter is language, and
a parameter's per-page features are as rare as the page. ``;`` is not a mark: Apache's
directory listings (``?C=M;O=D``) and ``;jsessionid=`` put it in ordinary requests (0.8 % of the
blog log of models/apache-access.onnx).
"""

from __future__ import annotations

import re
from typing import Optional

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
