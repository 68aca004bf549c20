"""The gRPC surface: decode ScoreRequest, call the scoring core, encode ScoreResponse."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from typing import Optional

import grpc

from ..admission import UNLIMITED, Ticket
from ..errors import (DeadlineExceeded, FeedbackNotFound, InvalidRequest, LogscoreError, ModelNotFound, Overloaded,
                      ScorerUnavailable, ShuttingDown, StoreUnavailable, Unauthenticated)
from ..generated.logscore.v1 import scorer_pb2 as pb
from ..metrics import OncePerInterval
from ..events import KINDS
from ..flood import target_fpr
from ..records import MAX_NAME_CHARS, cut_text, decode_event_stream
from ..scoring import ScoreCall, ScoreOutcome, ScoringService, check_record_count
from ..settings import bearer_matches
from .answers import explanations_kept, left_out_note, say_left_out
from .feedback_grpc import FeedbackServicer
from .grpc_requests import parse_message, parsed_or_refused, parsed_unary, refusal

log = logging.getLogger("logscore.grpc")

# One mapping table from our errors to status codes (HTTP has its twin).
STATUS_CODES: dict[type, grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    FeedbackNotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    ScorerUnavailable: grpc.StatusCode.UNAVAILABLE,
}
SERVICE_NAME = "logscore.v1.Scorer"
STREAM_STOPPED = "the sidecar is shutting down; retry on another instance"


def decode_request(request: pb.ScoreRequest, deadline: Optional[float], ticket: Ticket = UNLIMITED,
                   max_records: Optional[int] = None) -> ScoreCall:
    """The ScoreCall of a request; its count is checked and its values charged to ``ticket`` first."""
    kind = request.WhichOneof("records")
    limit = max_records if max_records is not None else math.inf
    times, notes = None, ()
    if kind == "structured":
        structured = request.structured.records
        check_record_count(len(structured), limit)
        ticket.charge_values(len(structured) + 2 * sum(len(r.fields) for r in structured))
        records: list = [dict(r.fields) for r in structured]
    elif kind == "lines":
        check_record_count(len(request.lines.lines), limit)
        ticket.charge_values(len(request.lines.lines))
        records = [line.decode("utf-8", "replace") for line in request.lines.lines]
    elif kind == "event_stream":
        records, times, notes = decode_event_stream(request.event_stream, limit, ticket)
    else:
        raise InvalidRequest("the request has no records: set one of structured, lines or event_stream")
    return ScoreCall(records, request.model, request.tag, request.explain, deadline, "grpc", times=times, notes=notes)


def encode_response(outcome: ScoreOutcome, request_id: str) -> pb.ScoreResponse:
    response = pb.ScoreResponse(request_id=request_id)
    response.scores.extend(outcome.scores.tolist())
    response.is_anomaly.extend(outcome.is_anomaly.tolist())
    response.model_index.extend(outcome.model_index.tolist())
    for model in outcome.models:
        response.models.add(name=model.name, version=model.version)
    if outcome.explanations is not None:
        for features in outcome.explanations:
            response.explanations.add(features=features)
    for index, field, description in outcome.notes:
        response.notes.add(index=index, field=field, description=description)
    if outcome.entity_scores is not None:
        response.entity_scores.extend(outcome.entity_scores.tolist())
    return response


def answer_bytes(response: pb.ScoreResponse, max_bytes: int) -> tuple[bytes, int]:
    """``response`` serialized in at most ``max_bytes`` (gRPC refuses to send more), and how many of
    its records' explanations were left out to fit (answers.explanations_kept: those of its last
    records, one note on the first of them). Raises InvalidRequest when it does not fit even without
    any explanation."""
    data = response.SerializeToString()  # (once: the handler sends these bytes as they are)
    if len(data) <= max_bytes:
        return data, 0
    growths = [framed(e.ByteSize()) - framed(0) for e in response.explanations]
    count = len(growths)
    note = framed(pb.RecordNote(index=count, field="explain",  # (the largest numbers it may hold)
                                description=left_out_note(0, count)).ByteSize())
    keep = explanations_kept(max_bytes - (len(data) - sum(growths)), growths, note, max_bytes)
    keep = count if keep is None else keep  # (None only when it fit whole: not here)
    leave_out(response, keep)
    return response.SerializeToString(), count - keep


def leave_out(response: pb.ScoreResponse, keep: int) -> None:
    """Empty the explanations from record ``keep`` on, noted on record ``keep``; notes stay in record order."""
    count = len(response.explanations)
    for i in range(keep, count):
        del response.explanations[i].features[:]
    notes = [(n.index, n.field, n.description) for n in response.notes]
    notes.append((keep, "explain", left_out_note(keep, count)))
    del response.notes[:]
    for index, field, description in sorted(notes, key=lambda note: note[0]):
        response.notes.add(index=index, field=field, description=description)


def framed(length: int) -> int:
    """Bytes an embedded message of ``length`` bytes takes in a repeated field numbered under 16."""
    return 1 + max(1, (length.bit_length() + 6) // 7) + length


def encode_event(event) -> pb.AnomalyEvent:
    """An events.AnomalyEvent as the proto message."""
    return pb.AnomalyEvent(id=event.id, kind=event.kind, model=event.model, key=event.key, score=event.score,
                           observed=event.observed, expected_low=event.expected_low,
                           expected_high=event.expected_high, explanation=event.explanation, start=event.start,
                           end=event.end, dropped_before=event.dropped_before, features=event.features)


def event_bytes(event) -> bytes:
    return encode_event(event).SerializeToString()


async def sent(context, message: bytes, stream: str) -> bool:
    """Write one message of a server stream (``stream``: which, for the log); False when the caller
    went away meanwhile. The one way every server stream (ScoreStream, WatchAnomalies) writes.

    NOTE: written, not yielded: a slow watcher's window is full, so the sidecar is always in the
    middle of a write when it leaves, and a yielded message failing so is logged by grpc as an
    error with a traceback (ExecuteBatchError); so was a shipper cancelling (or killed) while its
    ScoreStream answers were written. Here it is the end of the stream, said at debug."""
    try:
        await context.write(message)
        return True
    except asyncio.CancelledError:
        raise
    except Exception as error:  # grpc's own (private) error type for a call that is over
        log.debug("stream ended: its caller went away", extra={"stream": stream,
                                                                "error": f"{type(error).__name__}: {error}"})
        return False


class ScorerServicer:
    """The Scorer service. Requests arrive as bytes and are parsed here, so that a
    malformed protobuf is answered INVALID_ARGUMENT (grpc's own decoding says UNKNOWN)."""

    def __init__(self, service: ScoringService):
        self.service = service
        self.watchers = 0
        # NOTE: watchers hold their call for hours; a quarter of max_grpc_calls at most, so that
        # scoring always finds a place (the HTTP port keeps its streams apart alike; health checks
        # take none: CallLimitInterceptor)
        self.max_watchers = max(1, service.settings.max_grpc_calls // 4)
        self._request_seconds = service.metrics.child(service.metrics.request_seconds, "grpc")
        self._left_out_said = OncePerInterval()
        self.stopping = False  # set by end_streams
        self._waiting_streams: set[asyncio.Task] = set()  # ScoreStream calls waiting for their next message

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            # NOTE: _score itself, not Score (which awaits it): one coroutine less a call. Its answers
            # come serialized (answer_bytes: their size is checked before they are sent)
            "Score": grpc.unary_unary_rpc_method_handler(self._score, response_serializer=None),
            "ScoreStream": grpc.stream_stream_rpc_method_handler(self.ScoreStream, response_serializer=None),
            "ListModels": parsed_unary(self.ListModels, pb.ListModelsRequest, pb.ListModelsResponse,
                                       self.service.metrics),
            **FeedbackServicer(self.service, STATUS_CODES).methods(),
            "WatchAnomalies": grpc.unary_stream_rpc_method_handler(
                self.WatchAnomalies, response_serializer=None),  # the events come serialized (event_bytes)
        })

    async def ScoreStream(self, request_iterator, context):
        """Each message answered in order; once the sidecar stops, the stream ends after its current
        answer, UNAVAILABLE, whether a message comes or not.

        NOTE: a shipper keeps its stream open between batches: its handler waiting for the next
        message held the whole shutdown_grace_s (10 s by default) and then ended with grpc's own
        'Cancelling all calls', and messages sent after SIGTERM were still scored. A stream waiting
        is cancelled by end_streams (nothing of it is under way); one scoring finishes first."""
        messages = request_iterator.__aiter__()
        task = asyncio.current_task()
        while not self.stopping:
            self._waiting_streams.add(task)
            try:
                data = await messages.__anext__()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not self.stopping:
                    raise  # the caller went away, or grpc ends the call
                task.uncancel()  # ours: ended below, with a status that says why
                break
            finally:
                self._waiting_streams.discard(task)
            if not await sent(context, await self._score(data, context), "ScoreStream"):
                return
        await context.abort(grpc.StatusCode.UNAVAILABLE, STREAM_STOPPED)

    def end_streams(self) -> None:
        """The sidecar stops: ScoreStream calls end after their current answer (see ScoreStream)."""
        self.stopping = True
        for task in list(self._waiting_streams):
            task.cancel()

    async def ListModels(self, request, context):
        response = pb.ListModelsResponse()
        for name, model in sorted(self.service.registry.snapshot.models.items()):
            response.models.add(name=name, version=model.version, log_format=model.featurizer.log_format,
                                threshold=model.threshold, detectors=model.detectors, path=model.artifact.path,
                                target_fpr=target_fpr(model))
        return response

    async def WatchAnomalies(self, data: bytes, context):
        """Events as they are published, until the caller cancels or the sidecar stops."""
        request = await parsed_or_refused(pb.WatchAnomaliesRequest, data, context, self.service.metrics)
        behaviour = self.service.behaviour
        unknown = set(request.kinds) - set(KINDS)
        if unknown:
            # (cut: echoed whole, 20,000 characters overflowed gRPC's metadata, RESOURCE_EXHAUSTED to the caller)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown kind(s) "
                                f"{cut_text(', '.join(sorted(unknown)), MAX_NAME_CHARS)}; use {', '.join(KINDS)}")
        if behaviour is None:
            return
        if self.watchers >= self.max_watchers:
            self.service.metrics.refused("too_many_streams", "grpc", f"{self.watchers} watchers open")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.watchers} anomaly watchers are open, the limit (max_grpc_calls / 4); close "
                                "some, or poll GET /v1/anomalies")
        watcher = behaviour.hub.watch(request.kinds, min(int(request.replay), behaviour.hub.recent.maxlen))
        self.watchers += 1
        try:
            await context.send_initial_metadata(())  # the caller knows the watch is in place
            while True:
                event = await watcher.next()
                if event is None or not await sent(context, event.encoded_for("grpc", event_bytes), "WatchAnomalies"):
                    return  # (serialized once for every watcher)
        finally:
            self.watchers -= 1
            behaviour.hub.unwatch(watcher)

    async def _score(self, data: bytes, context) -> bytes:
        started = time.perf_counter()
        metrics = self.service.metrics
        try:
            with self.service.admission.admit(len(data)) as ticket:
                call, request_id = self._decode(data, context, ticket)
                outcome = await self.service.score(call)
                response = encode_response(outcome, request_id)
                answer, left_out = answer_bytes(response, self.service.settings.max_message_bytes)
                if left_out:
                    say_left_out(metrics, self._left_out_said, "grpc", left_out, len(response.scores),
                                 self.service.settings.max_message_bytes)
                return answer
        except LogscoreError as error:
            failure = refusal(error, metrics, STATUS_CODES)
        except Exception:
            failure = grpc.StatusCode.INTERNAL, "internal error in the sidecar (logged)"
            metrics.errors.labels("internal", "grpc").inc()
            log.exception("internal error while scoring")
        finally:
            self._request_seconds.observe(time.perf_counter() - started)
        # NOTE: aborted outside the except clause, so that the exception's traceback (and with it
        # the decoded request) is freed before this call yields to others.
        await context.abort(*failure)

    def _decode(self, data: bytes, context, ticket: Ticket) -> tuple[ScoreCall, str]:
        request = parse_message(pb.ScoreRequest, data)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        call = decode_request(request, deadline, ticket, self.service.settings.max_records_per_request)
        return call, request.request_id


DENIED = "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"
SCORING_METHODS = frozenset(f"/{SERVICE_NAME}/{name}" for name in ("Score", "ScoreStream"))
STREAM_METHOD, WATCH_METHOD = f"/{SERVICE_NAME}/ScoreStream", f"/{SERVICE_NAME}/WatchAnomalies"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"  # not Health/Watch: an endless stream, it holds a place


class CallLimitInterceptor(grpc.aio.ServerInterceptor):
    """At most ``max_calls`` gRPC calls in progress; past it a call is refused RESOURCE_EXHAUSTED
    without its message being read, counted and logged like every other refusal.

    NOTE: in place of grpcio's own maximum_concurrent_rpcs, whose refusals reached none of our
    code (neither counted nor logged). A call counts from when its handler is looked up (before its
    message is read) until its handler's task ends: grpcio runs the interceptors inside that task,
    so one done-callback per call is all it costs, nothing wraps the handler.

    Health checks (Health/Check) take no place: idle ScoreStreams (a shipper's, held open between
    batches) filled the cap and an orchestrator's health check was refused with the scoring (probe:
    64 streams). Health/Watch counts: it is a stream held open for good, as WatchAnomalies is."""

    def __init__(self, max_calls: int, metrics):
        self.max_calls = max_calls
        self.metrics = metrics
        self.calls = 0  # every method but health checks, event watchers included
        self.scoring_calls = 0  # Score and ScoreStream: the in-flight gauge
        self.streams = 0  # ScoreStream calls open, idle or not: named when the cap refuses a call
        self.watchers = 0  # WatchAnomalies calls open
        metrics.calls_in_flight.watch("grpc", lambda: self.scoring_calls)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method == HEALTH_CHECK:  # (no such method: UNIMPLEMENTED at once)
            return handler
        if self.calls >= self.max_calls:
            reason = self.refusal()
            self.metrics.refused("too_many_calls", "grpc", reason)
            return refusing(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
        method = details.method
        scoring, stream, watcher = method in SCORING_METHODS, method == STREAM_METHOD, method == WATCH_METHOD
        self.calls += 1
        self.scoring_calls += scoring
        self.streams += stream
        self.watchers += watcher
        asyncio.current_task().add_done_callback(functools.partial(self._call_ended, scoring, stream, watcher))
        return handler

    def refusal(self) -> str:
        """Why a call is refused at the cap: what holds the places, and what to do."""
        return (f"{self.calls} gRPC calls are in progress, the limit (max_grpc_calls): {self.streams} ScoreStream "
                f"and {self.watchers} WatchAnomalies calls among them, each holding its place while open, idle or "
                "not; retry, close idle streams (a shipper needs one ScoreStream, not one per batch) and watchers, "
                "or raise max_grpc_calls")

    def _call_ended(self, scoring: bool, stream: bool, watcher: bool, _task) -> None:
        self.calls -= 1
        self.scoring_calls -= scoring
        self.streams -= stream
        self.watchers -= watcher


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health checks must carry ``authorization: Bearer <token>``; calls without it
    are counted and logged as every refusal (HTTP's 401s are: a shipper with a stale token must
    show in the sidecar's metrics, not only in its own log)."""

    def __init__(self, token: str, metrics):
        self._token = token
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc.health.v1.Health/"):
            return handler
        presented = dict(details.invocation_metadata or ()).get("authorization", "")
        if bearer_matches(str(presented), self._token):
            return handler
        self.metrics.refused("Unauthenticated", "grpc", f"{DENIED} ({details.method})")
        return refusing(handler, grpc.StatusCode.UNAUTHENTICATED, DENIED)


def refusing(handler, code: grpc.StatusCode, details: str):
    """A handler answering ``code`` without reading the request: gRPC reads a whole unary
    message before calling its handler, so calls without the token, each sending all but the
    last byte of a 2 MiB message, held hundreds of MiB. A request-streaming handler reads nothing
    until it asks."""
    async def refuse(request_iterator, context):
        await context.abort(code, details)

    async def refuse_streaming(request_iterator, context):
        await context.abort(code, details)
        yield  # unreachable; makes this an async generator

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_streaming,
                                                     response_serializer=handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=handler.response_serializer)


class ConnectionWatch:
    """Counts the connections open on each gRPC listener, and says when one is full.

    NOTE: gRPC's core closes a connection past max_grpc_connections ("grpc.max_allowed_incoming_connections",
    a limit of each listener) as soon as it accepts it, where none of our code runs; grpcio reports no
    such refusal. What the sidecar can see is the connections open (channelz, which grpc keeps on by
    default): the gauge, and a warning once an interval while a listener is full. Not an error count:
    clients holding exactly the limit are served, and a full listener refuses only what comes next."""

    INTERVAL_S = 1.0
    LISTENERS = ("tcp", "unix")

    def __init__(self, limit: int, metrics):
        self.limit = limit
        self.metrics = metrics
        self._said = OncePerInterval()

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            while not stopping.is_set():
                try:
                    counts = open_connections()
                except Exception as error:  # channelz gone from a later grpcio: the limit itself still holds
                    log.warning("gRPC connections cannot be counted; the limit (max_grpc_connections) still "
                                "holds, unwatched", extra={"error": f"{type(error).__name__}: {error}"})
                    return
                self.check(counts)
                try:
                    await asyncio.wait_for(stopping.wait(), self.INTERVAL_S)
                except asyncio.TimeoutError:
                    pass
        finally:  # a count no longer taken is no count: a frozen gauge would read as live
            for listener in self.LISTENERS:
                try:
                    self.metrics.grpc_connections.remove(listener)
                except KeyError:
                    pass

    def check(self, counts: dict[str, int]) -> None:
        for listener in self.LISTENERS:
            count = counts.get(listener, 0)
            self.metrics.grpc_connections.labels(listener).set(count)
            if count >= self.limit and self._said.due(listener) is not None:
                log.warning("gRPC listener full", extra={
                    "listener": listener, "connections": count, "limit": self.limit,
                    "reason": "gRPC closes new connections at once (their clients see UNAVAILABLE 'Socket "
                              "closed'): clients open connections without closing them (one channel per "
                              "client is enough), or raise max_grpc_connections"})


def open_connections() -> dict[str, int]:
    """Connections open on the process's gRPC server, by listener kind ("tcp", "unix"), from channelz.

    NOTE: grpcio-channelz's servicer reads the same functions (it is not a dependency of ours). They are
    grpcio's private module: imported here, so that a grpcio without them fails this count (the watch
    stops, saying so), not the sidecar's start."""
    from grpc._cython import cygrpc

    counts: dict[str, int] = {}
    for server in json.loads(cygrpc.channelz_get_servers(0)).get("server", []):
        server_id, start = int(server["ref"]["serverId"]), 0
        while True:
            page = json.loads(cygrpc.channelz_get_server_sockets(server_id, start, 0))
            for socket in page.get("socketRef", []):
                kind = "unix" if " unix" in socket.get("name", "") else "tcp"  # "chttp2 unix:", "chttp2 ipv4:..."
                counts[kind] = counts.get(kind, 0) + 1
                start = int(socket["socketId"]) + 1
            if page.get("end", True) or not page.get("socketRef"):
                break
    return counts
