"""The rule both scoring surfaces (gRPC's Score/ScoreStream, HTTP's /v1/score) follow for an answer
over max_message_bytes: every score is kept; the last records' explanations are left out (empty),
with one note on the first of them; the answer is counted and warned about.

NOTE: the scores are what the caller cannot do without: a shipper passes a refused batch on unscored,
so refusing a whole scored batch for its explanations (1,000 records of CJK URLs with explain=20 made
2.7 MB of protobuf, 4.6 MB of JSON, from a 900 KB request) loses the most. Left out from the end, so
that the records keeping theirs are one run; one note, not one a record: 20,000 notes took more than
the 2 MiB the explanations they replaced did."""

from __future__ import annotations

import logging
from typing import Iterable, Optional

from ..errors import InvalidRequest
from ..metrics import Metrics, OncePerInterval

log = logging.getLogger("logscore.answers")

# The note on the first record whose explanation did not fit in the answer (its and the later ones' are empty).
EXPLANATIONS_LEFT_OUT = ("explanations left out from this record on ({count} records): the answer reached "
                         "max_message_bytes; ask for fewer features (explain) or send smaller batches")
LEFT_OUT_KIND = "explanations_left_out"  # its kind in logscore_errors_total


def explanations_kept(room: int, growths: Iterable[int], note_bytes: int, max_bytes: int) -> Optional[int]:
    """How many records, from the first, keep their explanation in an answer that leaves ``room``
    bytes under ``max_bytes`` with every explanation empty; None: all of them, no note. ``growths``
    are what each record's explanation adds to its empty one, in record order, read only as far as
    needed (a surface may size them as it encodes them); ``note_bytes`` bounds what the note adds.
    Raises InvalidRequest when the answer does not fit even without any explanation."""
    used = kept_with_note = 0
    for i, growth in enumerate(growths):
        used += growth
        if used <= room - note_bytes:
            kept_with_note = i + 1
        if used > room:  # not all fit: the note goes in too
            if room >= note_bytes:
                return kept_with_note
            break
    else:
        if room >= 0:
            return None
    raise InvalidRequest(f"the answer would be over max_message_bytes ({max_bytes:,}) even without "
                         "explanations: send smaller batches")


def left_out_note(keep: int, count: int) -> str:
    return EXPLANATIONS_LEFT_OUT.format(count=count - keep)


def say_left_out(metrics: Metrics, said: OncePerInterval, surface: str, left_out: int, records: int,
                 max_bytes: int) -> None:
    """Counted as a partial failure of the call, and warned about once an interval per surface."""
    metrics.child(metrics.errors, LEFT_OUT_KIND, surface).inc()
    unsaid = said.due(surface, 1, left_out)
    if unsaid is not None:
        log.warning("explanations left out: the answer reached max_message_bytes; the callers get every score "
                    "and one note on the first record left out: they should ask for fewer features (explain) "
                    "or send smaller batches",
                    extra={"surface": surface, "records": records, "left_out": left_out,
                           "answers_since_last_logged": unsaid[0], "left_out_since_last_logged": unsaid[1],
                           "max_message_bytes": max_bytes})
