"""The gRPC methods of feedback: Feedback, ListFeedback, DeleteFeedback (decode, call, encode)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc

from ..errors import FeedbackFull, GroupOutOfDate, InvalidRequest, LogscoreError
from ..feedback import KEEP, NORMAL, UNREADABLE, Entry
from ..feedback_store import Mark
from ..generated.logscore.v1 import scorer_pb2 as pb
from .grpc_requests import parsed_unary, refusal

log = logging.getLogger("logscore.grpc")

VERDICTS = {pb.NORMAL: NORMAL, pb.KEEP: KEEP}
VERDICT_CODES = {NORMAL: pb.NORMAL, KEEP: pb.KEEP}


def decode_mark(request: pb.FeedbackRequest) -> Mark:
    if request.verdict not in VERDICTS:
        raise InvalidRequest("verdict: set NORMAL (a false positive) or KEEP (a true anomaly)")
    target = request.WhichOneof("target")
    records: list = []
    if target == "lines":
        records = [line.decode("utf-8", "replace") for line in request.lines.lines]
    elif target == "structured":
        records = [dict(r.fields) for r in request.structured.records]
    return Mark(verdict=VERDICTS[request.verdict], author=request.author, reason=request.reason,
                model=request.model, route=request.route, entity=request.entity,
                expires_at=request.expires_at or None, records=records,
                group=request.group if target == "group" else "",
                field=request.field.field if target == "field" else "",
                value=request.field.value if target == "field" else None)


def encode_entry(entry: Entry) -> pb.FeedbackEntry:
    message = pb.FeedbackEntry(
        id=entry.id, verdict=VERDICT_CODES.get(entry.verdict, pb.VERDICT_UNSPECIFIED), author=entry.author,
        reason=entry.reason, model=entry.model, route=entry.route, entity=entry.entity,
        created_at=entry.created_at, expires_at=entry.expires_at or 0.0, removed_at=entry.removed_at or 0.0,
        removed_by=entry.removed_by or "", example=entry.example, existing=entry.existing)
    pattern = entry.pattern
    if UNREADABLE in pattern:  # a row this logscore cannot read: say so where features are listed
        message.features.append(entry.describe())
    elif "field" in pattern:
        message.field.field, message.field.value = pattern["field"], pattern["value"]
    else:
        message.features.extend(pattern.get("features", []))
        message.feature_count = len(pattern.get("keys", []))
    return message


class FeedbackServicer:
    """Methods added to the Scorer service (servers.grpc.ScorerServicer.handler)."""

    def __init__(self, service, status_codes: dict):
        self.service = service  # scoring.ScoringService: its feedback and metrics
        # servers.grpc.STATUS_CODES, and a group of another sidecar process (a restart, a fleet): not this one's
        self.status_codes = {**status_codes, GroupOutOfDate: grpc.StatusCode.FAILED_PRECONDITION,
                             FeedbackFull: grpc.StatusCode.FAILED_PRECONDITION}

    def methods(self) -> dict:
        metrics = self.service.metrics
        return {"Feedback": parsed_unary(self.Feedback, pb.FeedbackRequest, pb.FeedbackEntry, metrics),
                "ListFeedback": parsed_unary(self.ListFeedback, pb.ListFeedbackRequest, pb.ListFeedbackResponse,
                                             metrics),
                "DeleteFeedback": parsed_unary(self.DeleteFeedback, pb.DeleteFeedbackRequest, pb.FeedbackEntry,
                                               metrics)}

    async def Feedback(self, request, context):
        async def work(feedback):
            entry = await off_loop(feedback.mark, decode_mark(request))
            count_mark(self.service.metrics, entry)
            return self._answer_entry(entry)
        return await self._answer(work, context)

    async def ListFeedback(self, request, context):
        async def work(feedback):
            def listing() -> pb.ListFeedbackResponse:  # off the event loop: 10,000 entries take a while
                entries, following = feedback.page(request.include_removed, request.after_id, request.limit)
                status = feedback.status()
                response = pb.ListFeedbackResponse(store=status["store"], store_reachable=status["reachable"],
                                                   store_error=status["error"] or "")
                fill_page(response, entries, following, self.service.settings.max_message_bytes)
                return response
            return await off_loop(listing)
        return await self._answer(work, context)

    async def DeleteFeedback(self, request, context):
        async def work(feedback):
            entry = await off_loop(feedback.remove, request.id, request.author or "grpc")
            self.service.metrics.feedback_writes.labels("removed", entry.verdict).inc()
            return self._answer_entry(entry)
        return await self._answer(work, context)

    def _answer_entry(self, entry: Entry) -> pb.FeedbackEntry:
        """The entry as an answer, cut down when it alone is larger than the sidecar sends."""
        return within(encode_entry(entry), self.service.settings.max_message_bytes)

    async def _answer(self, work, context):
        try:
            if self.service.feedback is None:
                raise InvalidRequest("feedback is off in this sidecar")
            return await work(self.service.feedback)
        except LogscoreError as error:
            failure = refusal(error, self.service.metrics, self.status_codes)
        except Exception:
            failure = grpc.StatusCode.INTERNAL, "internal error in the sidecar (logged)"
            self.service.metrics.errors.labels("internal", "grpc").inc()
            log.exception("internal error in a feedback call")
        await context.abort(*failure)


# NOTE: room left in an answer for what fill_page does not count: each entry's tag and length
# (6 bytes at most for an entry under 2 MiB) and next_after_id (11 bytes).
ENTRY_FRAMING_BYTES, PAGE_FRAMING_BYTES = 6, 16


def fill_page(response: pb.ListFeedbackResponse, entries: list, following: int, max_message_bytes: int) -> None:
    """Add entries to the answer while it stays under max_message_bytes, which the sidecar's gRPC
    server also applies to what it sends: a page of 1,000 entries with 2,000-character reasons and
    examples made 2.1-11.5 MiB (CJK the most) and failed with RESOURCE_EXHAUSTED. A page cut short (with a limit or
    without) ends at the last entry added; its next_after_id says where the next one starts.
    One entry always goes in, so that a page always moves the listing on: one that alone does not
    fit is cut down (flagged ``cut``), else no page could ever carry it and the listing stopped there."""
    room = max_message_bytes - response.ByteSize() - PAGE_FRAMING_BYTES
    for entry in entries:
        encoded = encode_entry(entry)
        size = encoded.ByteSize() + ENTRY_FRAMING_BYTES
        if size > room:
            if len(response.entries):
                response.next_after_id = response.entries[-1].id
                return
            encoded, size = within(encoded, room - ENTRY_FRAMING_BYTES), room  # the page's only entry
        room -= size
        response.entries.append(encoded)
    response.next_after_id = following


CUT_FIRST_CHARS = 4096  # the longest a cut entry's texts are tried at first; a quarter of it at each try more


def within(encoded: pb.FeedbackEntry, room: int) -> pb.FeedbackEntry:
    """The entry when it takes at most ``room`` bytes; else a copy flagged ``cut``, with its free texts
    (reason, example, author, removed_by, field value, feature names) cut to ever fewer characters until
    it does (at worst to none; its id, verdict and scope are always sent whole: 2,200 characters at most)."""
    if encoded.ByteSize() <= room:
        return encoded
    characters = CUT_FIRST_CHARS
    while True:
        cut = pb.FeedbackEntry()
        cut.CopyFrom(encoded)
        cut.cut = True
        for name in ("reason", "example", "author", "removed_by"):
            setattr(cut, name, shortened(getattr(encoded, name), characters))
        if encoded.HasField("field"):
            cut.field.value = shortened(encoded.field.value, characters)
        del cut.features[:]
        cut.features.extend(shortened(feature, characters) for feature in encoded.features[:characters])
        if cut.ByteSize() <= room or not characters:
            return cut
        characters //= 4


def shortened(text: str, characters: int) -> str:
    if len(text) <= characters:
        return text
    return text[:characters] + "…" if characters else ""


def count_mark(metrics, entry: Entry) -> None:
    metrics.feedback_writes.labels("existing" if entry.existing else "added", entry.verdict).inc()


# NOTE: threads of their own: a store that hangs must not take the default executor's threads,
# which model reloads (and forward mode's gzip checks) wait for.
STORE_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="feedback")


async def off_loop(function, *args):
    """Store and pattern work runs in a worker thread, never on the event loop."""
    return await asyncio.get_running_loop().run_in_executor(STORE_THREADS, function, *args)
