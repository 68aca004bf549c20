"""A small HTTP/1.1 server (asyncio streams, keep-alive) and the sidecar's HTTP surface.

Routes:
  POST /v1/score     score one JSON event, an array of events, or {"records": [...]}
  GET  /v1/models    the loaded models
  GET  /openapi.json the OpenAPI document of these routes
  GET  /metrics      Prometheus metrics
  GET  /healthz      the process is up
  GET  /readyz       at least one model is loaded and the sidecar takes work
  /v1/feedback, /ui/ feedback and the review page (servers/feedback_http.py)
  GET  /v1/anomalies recent window and client anomaly events, or server-sent events

Only what the sidecar needs: Content-Length or chunked bodies, keep-alive,
bounded header and body sizes, an idle timeout. Every error is a JSON body
``{"error": "..."}`` with a 4xx/5xx status; the connection survives 4xx
answers whenever the request was read whole.
"""

from __future__ import annotations

import asyncio
import codecs
import ipaddress
import json
import logging
import math
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Optional, Union
from urllib.parse import parse_qs, urlsplit

from ..admission import UNLIMITED, VALUE_BYTES, Admission, Ticket
from ..decide import notes_by_record
from ..errors import (DeadlineExceeded, FeedbackNotFound, InvalidRequest, LogscoreError, ModelNotFound, Overloaded,
                      ScorerUnavailable, ShuttingDown, StoreUnavailable, Unauthenticated)
from ..flood import target_fpr
from ..metrics import Metrics, OncePerInterval
from ..records import JSON_TYPES, type_name
from ..resources import openapi_path
from ..scoring import ScoreCall, ScoreOutcome, ScoringService, not_ready_reason
from ..settings import bearer_matches
from .answers import explanations_kept, left_out_note, say_left_out
from .streams import TLS_HANDSHAKE_RECORD, StreamServer

log = logging.getLogger("logscore.http")

STATUS_CODES: dict[type, int] = {  # the twin of servers.grpc.STATUS_CODES
    InvalidRequest: 400,
    Unauthenticated: 401,
    ModelNotFound: 404,
    FeedbackNotFound: 404,
    Overloaded: 429,
    DeadlineExceeded: 504,
    ShuttingDown: 503,
    StoreUnavailable: 503,
    ScorerUnavailable: 503,
}
REASONS = {200: "OK", 303: "See Other", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 411: "Length Required",
           413: "Payload Too Large", 415: "Unsupported Media Type", 429: "Too Many Requests",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
           503: "Service Unavailable", 504: "Gateway Timeout"}
MAX_HEADER_BYTES = 32 * 1024
IDLE_TIMEOUT_S = 75.0  # a keep-alive connection waits this long for its next request
REQUEST_TIMEOUT_S = 30.0  # from a request line to the last byte of its body, and to write its answer
BODY_PIECE = 64 * 1024  # a body is charged to the in-flight budget as it arrives, a piece at a time
YIELD_EVERY_CHUNKS = 512  # a chunked body gives other connections a turn this often (small chunks only)
LINGER_S, LINGER_BYTES = 2.0, 16 * 2**20  # what is read and dropped, after an error, before closing
HTTP2_PREFACE_LINE = ["PRI", "*", "HTTP/2.0"]  # the first line of RFC 9113's connection preface (gRPC's)
MAX_LENGTH_DIGITS = 18  # a Content-Length's digits, leading zeros aside: more is no body this server reads
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}(;[^\r\n]*)?\r?\n")
SINGLE_HEADERS = ("content-length", "transfer-encoding", "authorization", "host")
# A header's name (and a method): RFC 9110's token, nothing around it (no space before the colon, no folded line)
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# In a header's value: all control characters but tab, C1's too (latin-1 \x85 is whitespace to str.strip)
HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def digits(text: str) -> bool:
    """A whole number in ASCII digits (str.isdigit also takes '²', which int() refuses)."""
    return text.isascii() and text.isdigit()


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    ticket: Ticket = field(default_factory=Ticket)  # what the request holds of the in-flight budget
    version: str = "HTTP/1.1"  # HTTP/1.0: the connection closes after the answer (its client reads to the end)


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    stream: Optional[AsyncIterator[bytes]] = None  # a body written as it comes (server-sent events)
    stop: Optional[Callable[[], None]] = None  # ends the stream (its client went)

    @classmethod
    def json(cls, value, status: int = 200) -> "Response":
        return cls(status, json.dumps(value, separators=(",", ":")).encode())

    @classmethod
    def html(cls, text: str, status: int = 200, headers: Optional[dict[str, str]] = None) -> "Response":
        # NOTE: records may hold invalid UTF-8 (forward mode keeps their bytes as lone surrogates): shown as "?"
        return cls(status, text.encode("utf-8", "replace"), "text/html; charset=utf-8", headers or {})

    @classmethod
    def error(cls, status: int, message: str) -> "Response":
        return cls.json({"error": message}, status)


Handler = Callable[[Request], Awaitable[Response]]


class HttpError(Exception):
    def __init__(self, status: int, message: str, close: bool = False, kind: str = "",
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.close = status, close
        self.kind = kind or f"http_{status}"  # in logscore_errors_total and the log (logged once a kind per interval)
        self.headers = headers or {}  # of the answer (Allow beside a 405)

    def response(self) -> "Response":
        response = Response.error(self.status, str(self))
        response.headers.update(self.headers)
        return response


Gate = Callable[[str, dict[str, str]], None]  # (path, headers): raises HttpError for a caller not let in
ContentCheck = Callable[[str], None]  # (Content-Type): raises HttpError for a body the route cannot read
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class HttpServer(StreamServer):
    read_limit = MAX_HEADER_BYTES
    surface = "http"

    def __init__(self, routes: dict[tuple[str, str], Handler], max_body_bytes: int,
                 admission: Optional[Admission] = None, metrics: Optional[Metrics] = None,
                 max_connections: int = 512, gate: Optional[Gate] = None, scoring_paths: frozenset = frozenset(),
                 content_checks: Optional[dict[str, ContentCheck]] = None):
        super().__init__(max_connections, metrics)  # metrics: requests refused before they reach a route
        self.scoring_paths = frozenset(path.encode() for path in scoring_paths)
        self.scoring_calls = 0  # requests to scoring_paths under way: the in-flight gauge
        if metrics is not None:
            metrics.calls_in_flight.watch("http", lambda: self.scoring_calls)
        self.streams: set[asyncio.Task] = set()  # connections writing a stream (server-sent events)
        self.max_streams = max(1, max_connections // 4)
        self.routes = routes
        self.content_checks = content_checks or {}  # path: what its handler refuses of a Content-Type
        self.max_body_bytes = max_body_bytes
        self.admission = admission
        self.gate = gate  # checked on a request carrying a body, before any of it is read
        self._internal_said = OncePerInterval()
        # connections whose current answer has begun to go out: a bug met then is not answered 500
        # (the bytes would land inside that answer: an event stream's body read a second response)
        self.answer_begun: set[asyncio.StreamWriter] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        try:  # busy: between a request's first byte and its answer
            while not self.draining:
                if not await self._answer_one(reader, writer, task):
                    return
        except Exception as error:
            # NOTE: escaping, it was asyncio's "Unhandled exception in client_connected_cb" with its
            # traceback, for every such request, and its client got no answer
            self.internal_error(error)
            if writer not in self.answer_begun and not writer.is_closing():
                await self._write(writer, Response.error(500, "internal error in the sidecar (logged)"), False)
                await linger(reader, writer)  # (met mid-body: closed at once, the client read a reset)
        finally:
            self.busy.discard(task)
            self.answer_begun.discard(writer)

    def internal_error(self, error: Exception, path: str = "") -> None:
        """A bug met while answering: counted (kind internal), logged in one line (its traceback in
        the line's exception field) once an interval per error and place: a client repeating what
        caused it writes no flood of tracebacks."""
        if self.metrics is not None:
            self.metrics.child(self.metrics.errors, "internal", "http").inc()
        where = sidecar_frame(error)
        unsaid = self._internal_said.due((type(error), where), 1)
        if unsaid is not None:
            log.error("internal error on an HTTP connection", exc_info=error, extra={
                "error": f"{type(error).__name__}: {error}"[:500], "at": where, "path": path,
                "unlogged_since_last_logged": unsaid[0]})

    async def _answer_one(self, reader, writer, task) -> bool:
        """Read one request and answer it; False when the connection is to close."""
        try:
            line = await asyncio.wait_for(read_request_line(reader), IDLE_TIMEOUT_S)
        except HttpError as error:
            return await self._refuse(reader, writer, error)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return False
        if not line:
            return False
        self.answer_begun.discard(writer)  # a new request: nothing of its answer has gone out
        self.busy.add(task)
        scoring = self._is_scoring(line)
        self.scoring_calls += scoring
        try:
            answered = await self._answer_request(line, reader, writer, task)
        finally:
            self.scoring_calls -= scoring
        if isinstance(answered, HttpError):  # refused once no longer counted: the refusal lingers
            return await self._refuse(reader, writer, answered)
        return answered

    def _is_scoring(self, line: bytes) -> bool:
        """Whether a request line posts to a scoring path (counted in flight from here, its body's
        reading included: a slow upload is a call under way)."""
        parts = line.split(b" ", 2)
        return len(parts) == 3 and parts[0] == b"POST" and parts[1].split(b"?", 1)[0] in self.scoring_paths

    async def refuse_plain_on_tls(self, reader, writer) -> None:
        """A plain-HTTP request on the TLS port is answered in plain HTTP, as a TLS client on a plain
        port is (tls_on_plain_http): the client reads why, and the log says so."""
        await self._refuse(reader, writer, HttpError(
            400, "a plain HTTP request on a TLS port: this port speaks HTTPS; use https:// (trusting the "
                 "sidecar's CA), or start the sidecar without --tls-cert", close=True, kind="plain_http_on_tls"))

    async def _refuse(self, reader, writer, error: HttpError) -> bool:
        if self.metrics is not None:
            self.metrics.refused(error.kind, "http", str(error))
        await self._write(writer, error.response(), keep_alive=False)
        await linger(reader, writer)
        return False

    async def _answer_request(self, line: bytes, reader, writer, task) -> Union[bool, HttpError]:
        """Whether the connection stays open once the request is answered, or the error to refuse it with."""
        try:
            request = await asyncio.wait_for(self._read_request(line, reader, writer), REQUEST_TIMEOUT_S)
        except HttpError as error:
            return error
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return False
        with request.ticket:
            response = await self._dispatch(request)
            keep_alive = (request.headers.get("connection", "").lower() != "close" and not self.draining
                          and request.version != "HTTP/1.0")
            if response.stream is not None:
                request.ticket.release()  # a long-lived stream holds no request memory
                await self._write_stream(reader, writer, response, task)
                return False
            if not await self._write(writer, response, keep_alive):
                return False
        self.busy.discard(task)
        return keep_alive

    async def _read_request(self, line: bytes, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> Request:
        # (only the line's end goes: " POST ..." or "\x1cPOST ..." was served, yet not counted in flight)
        parts = line.decode("latin-1").removesuffix("\n").removesuffix("\r").split(" ")
        if parts == HTTP2_PREFACE_LINE:
            # (a kind of its own: logged even when other 400s were, a moment before; it was
            # "malformed request line", and a gRPC client read "Failed parsing HTTP/2")
            raise HttpError(400, "an HTTP/2 connection preface on the HTTP port: this port speaks HTTP/1.1 JSON; "
                            "point gRPC clients at the sidecar's --socket or --tcp address, and HTTP clients "
                            "here without HTTP/2 prior knowledge", close=True, kind="http2_on_http")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1") or not HEADER_NAME.fullmatch(parts[0]):
            raise HttpError(400, "malformed request line; expected 'METHOD /path HTTP/1.1'", close=True)
        method, target, version = parts
        headers = await self._read_headers(reader)
        length = self._check_length(headers)
        try:
            url = urlsplit(target)
        except ValueError as error:  # an unbalanced "[" ("Invalid IPv6 URL")
            raise HttpError(400, f"malformed request target: {error}", close=True) from None
        with_body = bool(length) or "transfer-encoding" in headers
        if self.gate is not None and with_body:
            self.gate(url.path, headers)  # before the body: a caller without the token reads and holds nothing
        # (HTTP/1.0 has no 100 Continue: RFC 9110 has the expectation ignored there)
        if with_body and version != "HTTP/1.0" and headers.get("expect", "").lower() == "100-continue":
            self._ask_for_body(method, url.path, headers, writer)
        ticket = Ticket(self.admission)
        try:
            body = await self._read_body(reader, headers, length, ticket)
        except BaseException:
            ticket.release()
            raise
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        # NOTE: as sent: methods are case-sensitive (RFC 9110); 'post' was served as POST yet not counted
        # as a scoring call (logscore_calls_in_flight): now it is 405, naming the method to use
        return Request(method, url.path, query, headers, body, ticket, version)

    @staticmethod
    async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
        headers: dict[str, str] = {}
        size = 0
        while True:
            header = await read_line(reader, "header line")
            size += len(header)
            if size > MAX_HEADER_BYTES:
                raise HttpError(431, f"headers exceed {MAX_HEADER_BYTES} bytes", close=True)
            if header in (b"\r\n", b"\n"):
                return headers
            text = header.decode("latin-1").removesuffix("\n").removesuffix("\r")  # the line's end only
            name, colon, value = text.partition(":")
            if not colon or not HEADER_NAME.fullmatch(name):
                # NOTE: read leniently (' Transfer-Encoding' as a folded line to a proxy, a header to us),
                # a request's framing differs between the two: how requests are smuggled
                raise HttpError(400, f"malformed header line {text[:60]!r}: send 'Name: value', without "
                                "spaces before the colon or folded lines", close=True)
            control = HEADER_CONTROL.search(value)
            if control:
                # NOTE: read as whitespace, a separator or a line's end by some (str.strip takes \x1c-\x1f
                # and \x85: 'chunked\x85' was framed chunked), as part of the value by others: refused
                raise HttpError(400, f"header {name} holds the control character {control.group()!r}; send "
                                "visible characters, spaces and tabs", close=True)
            name = name.lower()
            if name in headers and name in SINGLE_HEADERS:
                # NOTE: two of these are read differently by different servers (request smuggling
                # behind a proxy, or which token counts): refused, not guessed
                raise HttpError(400, f"{name} given twice", close=True)
            headers[name] = value.strip(" \t")  # what RFC 9110 calls whitespace around a value, no more

    @staticmethod
    def _charge(ticket: Ticket, nbytes: int) -> None:
        """Charge body bytes to the in-flight budget before reading them: 429 (and close) if they do not fit."""
        try:
            ticket.charge_wire(nbytes)
        except Overloaded as error:
            raise HttpError(429, str(error), close=True) from None

    def _ask_for_body(self, method: str, path: str, headers: dict[str, str], writer: asyncio.StreamWriter) -> None:
        """Answer a client that waits before sending its body (Expect: 100-continue, curl's way past
        1 MB): 100 Continue, or the refusal its headers already decide (raised, the connection then
        closed: the body may come or not). Before, 100 came first and a body sent compressed, as
        text, or to a wrong path was uploaded whole to be refused."""
        refusal = (self._encoding_refusal(headers) or self._route_refusal(method, path)
                   or self._content_refusal(path, headers))
        if refusal is not None:
            refusal.close = True
            raise refusal
        writer.write(CONTINUE)

    async def _read_body(self, reader: asyncio.StreamReader, headers: dict[str, str], length: int,
                         ticket: Ticket) -> bytes:
        if "transfer-encoding" not in headers:
            return await self._read_exactly(reader, length, ticket)
        return await self._read_chunked(reader, ticket)

    async def _read_chunked(self, reader: asyncio.StreamReader, ticket: Ticket) -> bytes:
        # NOTE: one buffer, not a list of chunks: 2-byte chunks kept apart cost ~56 bytes of objects
        # each, 8 bodies of them took the sidecar from 221 to 488 MiB while charged 3 × 2 bytes a chunk
        body = bytearray()
        chunks, framing, most_framing = 0, 0, self.max_framing_bytes()
        while True:
            size_line = await read_line(reader, "chunk size line", 400)
            if not CHUNK_SIZE.fullmatch(size_line):
                raise HttpError(400, "malformed chunked body: a chunk size is hexadecimal digits", close=True)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await self._read_trailers(reader)
                return bytes(body)
            if len(body) + size > self.max_body_bytes:
                raise HttpError(413, f"body exceeds {self.max_body_bytes} bytes; send smaller batches", close=True)
            body += await self._read_exactly(reader, size, ticket)
            end = await read_line(reader, "chunk's end", 400)
            if end not in (b"\r\n", b"\n"):
                raise HttpError(400, "malformed chunked body: a chunk's data ends with CRLF", close=True)
            chunks, framing = chunks + 1, framing + len(size_line) + len(end)
            if chunks % YIELD_EVERY_CHUNKS == 0:
                # buffered chunks are read without a turn of the event loop: 64 KiB of 1-byte
                # chunks held every other connection (health checks) for ~50 ms at a time
                await asyncio.sleep(0)
            if framing > most_framing:
                raise HttpError(400, f"chunked body in chunks too small: {chunks} chunks of {len(body) // chunks} "
                                f"bytes on average took over {most_framing} bytes of chunk size lines and line "
                                "ends; send larger chunks (at least 1 KiB), or the body with Content-Length",
                                close=True)

    def max_framing_bytes(self) -> int:
        """What a chunked body's size lines and line ends may take in all (128 KiB for a 2 MiB body:
        chunks of 100 bytes fit). Each chunk costs a few reads on the event loop (≈ 4 µs): 8 bodies
        of 2-byte chunks within the body limit took 29 s of CPU and kept health checks waiting 6 s."""
        return max(MAX_HEADER_BYTES, self.max_body_bytes // 16)

    async def _read_exactly(self, reader: asyncio.StreamReader, length: int, ticket: Ticket) -> bytes:
        """``length`` bytes, charged to the budget as they come (what a sender announced but has not
        sent holds nothing: six connections announcing 2 MiB each and sending none held it all)."""
        pieces = []
        while length > 0:
            piece = min(length, BODY_PIECE)
            self._charge(ticket, piece)
            pieces.append(await reader.readexactly(piece))
            length -= piece
        return b"".join(pieces)

    @staticmethod
    async def _read_trailers(reader: asyncio.StreamReader) -> None:
        size = 0
        while (line := await read_line(reader, "trailer line")) not in (b"\r\n", b"\n"):
            size += len(line)
            if size > MAX_HEADER_BYTES:
                raise HttpError(431, f"trailers exceed {MAX_HEADER_BYTES} bytes", close=True)

    def _check_length(self, headers: dict[str, str]) -> int:
        encoding = headers.get("transfer-encoding")
        if encoding is not None:
            if encoding.lower() != "chunked":
                raise HttpError(501, f"Transfer-Encoding {encoding!r} is not supported; send Content-Length or "
                                "chunked", close=True)
            if "content-length" in headers:
                raise HttpError(400, "both Content-Length and Transfer-Encoding: send one", close=True)
            return 0
        length_text = headers.get("content-length", "0")
        if not digits(length_text):
            raise HttpError(400, "invalid Content-Length", close=True)
        significant = length_text.lstrip("0") or "0"
        if len(significant) > MAX_LENGTH_DIGITS:
            # NOTE: int() of more than 4,300 digits raises ValueError: the request went unanswered, and
            # asyncio logged its traceback each time ('000…015' too: leading zeros count there)
            raise HttpError(400, f"invalid Content-Length: {len(significant):,} digits; give the body's size in "
                            f"bytes (at most {self.max_body_bytes})", close=True)
        length = int(significant)
        if length > self.max_body_bytes:
            raise HttpError(413, f"body of {length} bytes exceeds {self.max_body_bytes}; send smaller batches",
                            close=True)
        return length

    async def _dispatch(self, request: Request) -> Response:
        refusal = self._encoding_refusal(request.headers)
        if refusal is not None:
            # NOTE: answered once the body is read (the client reads the answer, not a reset), as a
            # response: raised while reading, it closed the connection, and a request pipelined after
            # it was never answered
            return self._refusal(refusal)
        refusal = self._route_refusal(request.method, request.path)
        if refusal is not None:
            return refusal.response()  # neither counted nor logged: every browser asks for /favicon.ico
        try:
            return await self.routes[(request.method, request.path)](request)
        except Exception as error:
            self.internal_error(error, request.path)
            return Response.error(500, "internal error in the sidecar (logged)")

    @staticmethod
    def _encoding_refusal(headers: dict[str, str]) -> Optional[HttpError]:
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding in ("", "identity"):
            return None
        return HttpError(415, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed (the "
                         "sidecar runs beside its caller)")

    def _route_refusal(self, method: str, path: str) -> Optional[HttpError]:
        if (method, path) in self.routes:
            return None
        allowed = sorted(m for m, p in self.routes if p == path)
        if allowed:
            case = " (methods are case-sensitive)" if method.upper() in allowed else ""
            return HttpError(405, f"{method} not allowed on {path}; use {', '.join(allowed)}{case}",
                             headers={"Allow": ", ".join(allowed)})
        known = ", ".join(sorted({p for _, p in self.routes}))
        return HttpError(404, f"no such path {path}; known: {known}")

    def _content_refusal(self, path: str, headers: dict[str, str]) -> Optional[HttpError]:
        check = self.content_checks.get(path)
        try:
            if check is not None:
                check(headers.get("content-type", ""))
        except HttpError as error:
            return error
        return None

    def _refusal(self, error: HttpError) -> Response:
        """The answer to a request refused for the caller's fault, counted and logged; the connection goes on."""
        if self.metrics is not None:
            self.metrics.refused(error.kind, "http", str(error))
        return error.response()

    async def _write(self, writer: asyncio.StreamWriter, response: Response, keep_alive: bool) -> bool:
        """Write the answer; False if the client went or did not read it in time (the connection
        is then dropped: an answer left unread held its request's memory for good)."""
        head = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Status')}",
                f"Content-Type: {response.content_type}", f"Content-Length: {len(response.body)}",
                f"Connection: {'keep-alive' if keep_alive else 'close'}"]
        head += [f"{k}: {v}" for k, v in response.headers.items()]
        self.answer_begun.add(writer)
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body)
        try:
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
            return True
        except asyncio.TimeoutError:
            writer.transport.abort()
            return False
        except ConnectionError:
            return False

    async def _write_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: Response,
                            task: asyncio.Task) -> None:
        """Headers, then each piece of the body as it comes, until it ends or the client goes.

        Streams are counted apart from max_connections (at most max_streams of them): watchers
        must not take the connections scoring and health checks need."""
        if len(self.streams) >= self.max_streams:
            if response.stop is not None:
                response.stop()  # NOTE: aclose() of a generator never started runs none of its finally
            await response.stream.aclose()
            if self.metrics is not None:
                self.metrics.refused("too_many_streams", "http", f"{len(self.streams)} streams open")
            await self._write(writer, Response.error(503, f"{len(self.streams)} event streams are open, the "
                                                     "limit (max_connections / 4); close some, or poll the list"),
                              keep_alive=False)
            return
        head = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Status')}",
                f"Content-Type: {response.content_type}", "Cache-Control: no-cache", "Connection: close"]
        head += [f"{k}: {v}" for k, v in response.headers.items()]
        self.answer_begun.add(writer)
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        self.streams.add(task)
        # NOTE: a stream's client sends nothing more; its read ends when it goes, which ends the
        # stream at once instead of at the next write (a heartbeat may be 15 s away).
        gone = asyncio.ensure_future(reader.read(1))
        if response.stop is not None:
            gone.add_done_callback(lambda _: response.stop())
        try:
            await writer.drain()
            async for piece in response.stream:
                writer.write(piece)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.streams.discard(task)
            gone.cancel()
            await response.stream.aclose()

    def long_lived(self) -> int:
        return len(self.streams)


PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # sidecar/logscore/


def sidecar_frame(error: BaseException) -> str:
    """Where the sidecar's own code met ``error``: its innermost frame under sidecar/logscore (the
    innermost of all is often the standard library's, 'encoder.py:180 in default', which says
    nothing of which of the sidecar's calls to look at)."""
    frames = traceback.extract_tb(error.__traceback__)
    own = [frame for frame in frames if os.path.abspath(frame.filename).startswith(PACKAGE_DIR)]
    frame = (own or frames or [None])[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}" if frame else "?"


async def read_request_line(reader: asyncio.StreamReader) -> bytes:
    """A request's first line. Bytes no request line starts with (msgpack's arrays and maps: a Fluent
    Bit or Fluentd forward output given the HTTP port; a TLS handshake record) are refused at once:
    they hold no line end, so the sender waited 75 s for an ack, or for the server's TLS hello, and
    neither log said why."""
    first = await reader.read(1)
    if first and first[0] >= 0x80:
        raise HttpError(400, f"malformed request line: it starts with byte 0x{first[0]:02x}, as the forward "
                             "protocol's messages do; point the sender at the sidecar's --forward port, not --http",
                        close=True)
    if first == TLS_HANDSHAKE_RECORD:
        # (a kind of its own: logged even when other 400s were, a moment before)
        raise HttpError(400, "a TLS handshake on a plain HTTP port: this port speaks plain HTTP; use http:// or "
                             "start the sidecar with --tls-cert", close=True, kind="tls_on_plain_http")
    return first + await read_line(reader, "request line") if first else first


async def read_line(reader: asyncio.StreamReader, what: str, status: int = 431) -> bytes:
    """One line of a request; a line longer than the reader's limit is refused, naming which line it was.
    IncompleteReadError when the connection ends before the line does: its client went away, as one
    that hangs up within a Content-Length body (a hang-up within a chunked body was counted and
    logged as a malformed request, 'a chunk's data ends with CRLF')."""
    try:
        line = await reader.readline()
    except ValueError:  # asyncio's readline raises it for a line over the limit
        raise HttpError(status, f"{what} longer than {MAX_HEADER_BYTES} bytes", close=True) from None
    if not line.endswith(b"\n"):
        raise asyncio.IncompleteReadError(line, None)
    return line


async def linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After an error answer, before closing: say no more will be written and drop what the client
    still sends, for a moment. Closed at once, a connection with unread bytes is reset, and the
    client then reads the reset, not the answer (a 413 for a 10 MB body, a 429)."""
    try:
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_S):
            dropped = 0
            while dropped < LINGER_BYTES and (data := await reader.read(BODY_PIECE)):
                dropped += len(data)
    except (asyncio.TimeoutError, ConnectionError, OSError):
        pass


# --- the sidecar's HTTP surface ---------------------------------------------------

def json_error(error: ValueError) -> str:
    """What is wrong with a JSON body, in the caller's terms: Python's own words for an integer past
    its digit limit tell the caller to call sys.set_int_max_str_digits()."""
    if "integer string conversion" in str(error):
        return (f"a number has more than {sys.get_int_max_str_digits():,} digits; send such a value as a string")
    if str(error).startswith("Extra data"):  # NDJSON: Python said only 'Extra data: line 2 column 1'
        return (f"more than one JSON document ({error}); send one: an array of events [{{...}}, {{...}}] or of "
                'raw lines ["...", "..."], not a document a line (NDJSON)')
    return str(error)


def json_text(body: bytes) -> tuple[str, Optional[int]]:
    """A JSON body's text, and where its first invalid UTF-8 lies (a byte offset; None: valid), read
    as U+FFFD. A UTF-8 byte order mark is ignored, as RFC 8259 lets a parser do (Python said "decode
    using utf-8-sig", words for the server); UTF-16 or UTF-32 sent without a charset is named as such
    (it was "Expecting value: line 1 column 1")."""
    if body[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) or b"\x00" in body[:4]:
        raise HttpError(415, "body is in UTF-16 or UTF-32 (a byte order mark, or NUL bytes among its first "
                        "characters); send it in UTF-8, JSON's encoding")
    try:
        return body.decode("utf-8-sig"), None
    except UnicodeDecodeError as error:
        skipped = len(codecs.BOM_UTF8) if body.startswith(codecs.BOM_UTF8) else 0
        return body.decode("utf-8-sig", "replace"), error.start + skipped


def invalid_utf8_notes(records: list, invalid_at: int) -> list[tuple[int, str, str]]:
    """Notes for the records of a body holding invalid UTF-8: those holding U+FFFD, where it was read.
    NOTE: scored, as raw lines with invalid UTF-8 are on every surface, but no longer unsaid (latin-1
    'caf\\xe9' scored as 'caf\\ufffd' without a word, while the same body declared latin-1 got 415)."""
    note = (f"invalid UTF-8 in the body (first at byte {invalid_at}) read as U+FFFD, this record holding it: "
            "send UTF-8, JSON's encoding (convert text in other charsets before sending)")
    return [(i, "utf8", note) for i, record in enumerate(records)
            if "\ufffd" in (record if isinstance(record, str) else json.dumps(record, ensure_ascii=False))]


def declared_charset(content_type: str) -> Optional[str]:
    """The charset parameter of a Content-Type (unquoted), or None."""
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"')
    return None


def read_as_utf8(charset: str) -> bool:
    """Whether a body in this charset reads right as UTF-8: UTF-8 by any of its names, or US-ASCII (its
    subset, which some clients declare for JSON)."""
    try:
        return codecs.lookup(charset).name in ("utf-8", "ascii")
    except LookupError:  # no charset Python knows
        return False


def check_utf8(content_type: str) -> None:
    """Refuse (415) a JSON body declared in a charset other than UTF-8 (/v1/score, /v1/feedback)."""
    charset = declared_charset(content_type)
    if charset is not None and not read_as_utf8(charset):
        # NOTE: decoded as UTF-8 all the same, 'caf\xe9' sent as latin-1 was scored (or marked) as 'caf\ufffd', unsaid
        raise HttpError(415, f"Content-Type {content_type!r} declares charset {charset!r}; send the body in "
                        "UTF-8 (charset=utf-8, or no charset: JSON is UTF-8)")


# How much of a body json_values_at_most counts outside its strings at a time: the pieces between
# quotes are objects, and a 2 MiB body of short strings, split whole, took 60 MiB for them (review).
OUTSIDE_STRINGS_WINDOW = 64 * 1024
NOT_BACKSLASH = re.compile(rb"[^\\]")


def json_values_at_most(body: bytes, ticket: Ticket = UNLIMITED) -> int:
    """What to charge before json.loads builds a body's values: at most one per comma, bracket and
    brace, counted in the raw bytes; a count the ticket cannot take is counted again outside the
    body's strings, the only ones JSON reads (about 10 ms a MB more).

    NOTE: a 500 KB log line of 500,000 commas (a hostile URL, a CSV payload) was charged 41 MB as
    one event and refused "send smaller batches", passing unscored; 60 KB lines of 20,000 commas
    among other traffic were refused 429 where the same lines of letters were not."""
    rough = _value_separators(body)
    if ticket.fits(rough * VALUE_BYTES):
        return rough
    count, in_string, start = 0, False, 0
    while start < len(body):
        end = start + OUTSIDE_STRINGS_WINDOW
        if end < len(body) and body[end - 1] == 0x5C:  # a window never ends inside a run of backslashes
            after = NOT_BACKSLASH.search(body, end)
            end = after.end() if after else len(body)
        # JSON's escapes pair left to right: with escaped backslashes, then escaped quotes taken out,
        # every quote left opens or closes a string, so every other piece between quotes is outside one.
        pieces = body[start:end].replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')
        count += _value_separators(b"".join(pieces[1 if in_string else 0::2]))
        in_string ^= len(pieces) % 2 == 0  # an odd number of quotes
        start = end
    return count


def _value_separators(json_bytes: bytes) -> int:
    return json_bytes.count(b",") + json_bytes.count(b"[") + json_bytes.count(b"{")


def check_events_content_type(content_type: str) -> None:
    """Refuse (415) a body of events declared as other than JSON, or as JSON in another charset than UTF-8."""
    if content_type and "json" not in content_type.split(";")[0]:
        raise HttpError(415, f"Content-Type {content_type!r} is not JSON; send application/json")
    check_utf8(content_type)


def decode_events(body: bytes, content_type: str, ticket: Ticket = UNLIMITED) -> tuple[list, bool, Optional[int]]:
    """(records, single, where the body's first invalid UTF-8 lies or None): one JSON object, an array
    of them, or {"records": [...]}."""
    check_events_content_type(content_type)
    ticket.charge_values(json_values_at_most(body, ticket))
    try:
        text, invalid_at = json_text(body) if body else ("", None)
        value = json.loads(text) if body else None
    except ValueError as error:
        raise HttpError(400, f"body is not valid JSON: {json_error(error)}") from None
    except RecursionError:
        raise HttpError(400, "body is JSON nested too deeply; send events as flat objects") from None
    if isinstance(value, dict) and "records" in value:
        if not isinstance(value["records"], list):
            raise HttpError(400, "\"records\" must be an array of events, not "
                            f"{type_name(value['records'], JSON_TYPES)} (to send one event that has a field named "
                            "records, wrap it in an array)")
        others = sorted(str(key) for key in value if key != "records")
        if others:
            # NOTE: gRPC's request carries model, tag and explain beside the records: sent in the body
            # here, they were ignored, and the records scored by another model without a word.
            raise HttpError(400, f"{{\"records\": [...]}} holds nothing else; {', '.join(others)[:200]} is not read "
                            "there (model, tag, explain and timeout_ms go in the query: /v1/score?model=NAME; "
                            "to send one event that has a field named records, wrap it in an array)")
        return _check_events(value["records"]), False, invalid_at
    if isinstance(value, dict):
        return _check_events([value]), True, invalid_at
    if isinstance(value, list):
        return _check_events(value), False, invalid_at
    raise HttpError(400, "body must be a JSON object (one event), an array of events, or {\"records\": [...]}")


# Logstash's sprintf leaves "%{[field]}" in place when the event lacks the field.
_UNRESOLVED = re.compile(r"%\{[^}]*\}")


def _check_events(events: list) -> list:
    for i, event in enumerate(events):
        if isinstance(event, dict):
            events[i] = _without_unresolved(event)
        elif not isinstance(event, str):
            raise HttpError(400, f"records[{i}] must be an object (an event) or a string (a raw line), "
                            f"not {type_name(event, JSON_TYPES)}")
    return events


def _without_unresolved(event: dict) -> dict:
    """Fields holding an unresolved Logstash reference are absent, not values."""
    if not any(isinstance(v, str) and _UNRESOLVED.fullmatch(v) for v in event.values()):
        return event
    return {k: v for k, v in event.items() if not (isinstance(v, str) and _UNRESOLVED.fullmatch(v))}


# An absolute path in a message (not a URL's): its directories, then its file name (group 1).
ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/])/(?:[^\s'\"`,;:()\[\]/]+/)*([^\s'\"`,;:()\[\]/]*)")


def without_directories(text: str) -> str:
    """``text`` with each absolute path cut to its file name: /readyz answers without the token, so
    it names no directories (a models directory, a feedback store's state directory in an error)."""
    return ABSOLUTE_PATH.sub(lambda path: path[1], text)


def rejected_without_directories(errors: dict[str, str]) -> dict[str, str]:
    """Rejected files by file name, their errors naming no directory."""
    return {os.path.basename(path): without_directories(error) for path, error in errors.items()}


def learning_without_directories(status: dict) -> dict:
    """Learned routes' last outcomes (the learned model, a candidate kept aside, a failed training's
    error) naming files, not their directories."""
    public = {}
    for route, state in status.items():
        last = state.get("last")
        if last:
            last = {key: without_directories(value) if isinstance(value, str) else value for key, value in last.items()}
        public[route] = {**state, "last": last}
    return public


def deadline_from(timeout_ms: Optional[str]) -> Optional[float]:
    """The time.monotonic() deadline of the ``timeout_ms`` query parameter (None: no deadline)."""
    if not timeout_ms:
        return None
    try:
        milliseconds = float(timeout_ms)
    except ValueError:
        milliseconds = math.nan
    if not 0 < milliseconds < math.inf:
        raise InvalidRequest(f"timeout_ms={timeout_ms!r}: give a positive number of milliseconds")
    return time.monotonic() + milliseconds / 1000


def encode_result(outcome: ScoreOutcome, i: int, notes: list[str]) -> dict:
    """A record's result, its explanation aside (answer_json adds it, sized)."""
    model = outcome.models[int(outcome.model_index[i])]
    result = {"anomaly_score": round(float(outcome.scores[i]), 6), "is_anomaly": bool(outcome.is_anomaly[i]),
              "model": model.name, "model_version": model.version}
    if notes:
        result["notes"] = notes
    if outcome.entity_scores is not None and outcome.entity_scores[i] == outcome.entity_scores[i]:  # not NaN
        result["entity_score"] = round(float(outcome.entity_scores[i]), 6)
    return result


def answer_json(outcome: ScoreOutcome, count: int, single: bool, max_bytes: int) -> tuple[bytes, int]:
    """The /v1/score answer in at most ``max_bytes``, and how many records' explanations were left out
    to fit: gRPC's rule (answers.explanations_kept), the note in its record's notes and in "notes".
    NOTE: encoded whole first, as gRPC's answer is (one json.dumps: encoding result by result took
    1.7 times the CPU for 20,000 records); only an answer over the limit (1,000 lines of CJK URLs
    with explain=20 made 4.6 MB) is encoded again, result by result, its explanations sized as they
    are encoded and those past the last one kept never encoded."""
    by_record = notes_by_record([(i, d) for i, _, d in outcome.notes], count)
    results = [encode_result(outcome, i, by_record[i]) for i in range(count)]
    if outcome.explanations is not None:
        for result, features in zip(results, outcome.explanations):
            result["explanation"] = features
    body = to_json(results[0] if single else {"results": results, "notes": listed(outcome.notes)})
    if len(body) <= max_bytes:
        return body.encode(), 0
    if outcome.explanations is None:
        explanations_kept(max_bytes - len(body), (), 0, max_bytes)  # (raises: the scores alone are over)
    del body, results  # (before the answer is encoded again)
    return answer_within(outcome, by_record, single, max_bytes)


def answer_within(outcome: ScoreOutcome, by_record: list[list[str]], single: bool,
                  max_bytes: int) -> tuple[bytes, int]:
    """answer_json's answer over ``max_bytes``: its last records' explanations left out to fit."""
    count = len(by_record)
    notes = list(outcome.notes)
    results = [to_json(encode_result(outcome, i, by_record[i])) for i in range(count)]
    explained: list[str] = []

    def growths():
        for features in outcome.explanations:
            explained.append(to_json(features))
            yield len(explained[-1]) - len(EMPTY)
    room = max_bytes - len(assembled([with_explanation(r, EMPTY) for r in results], notes, single))
    keep = explanations_kept(room, growths(), note_bytes(count), max_bytes)
    keep = count if keep is None else keep  # (None only when it fit whole: not here)
    note = left_out_note(keep, count)
    notes = sorted(notes + [(keep, "explain", note)], key=lambda n: n[0])  # (stable: after the record's others)
    by_record[keep].append(note)
    results[keep] = to_json(encode_result(outcome, keep, by_record[keep]))
    kept = explained[:keep] + [EMPTY] * (count - keep)
    return assembled([with_explanation(r, e) for r, e in zip(results, kept)], notes, single).encode(), count - keep


EMPTY = "[]"  # a left-out explanation


def to_json(value) -> str:
    """Compact JSON, ASCII only: its length is its size in bytes."""
    return json.dumps(value, separators=(",", ":"))


def with_explanation(result: str, explanation: str) -> str:
    """A result's JSON object with an explanation's JSON as its last member."""
    return f'{result[:-1]},"explanation":{explanation}}}'


def assembled(results: list[str], notes: list[tuple[int, str, str]], single: bool) -> str:
    """The answer's JSON from its results' (a single event's answer is its result alone)."""
    if single:
        return results[0]
    return f'{{"results":[{",".join(results)}],"notes":{to_json(listed(notes))}}}'


def listed(notes: list[tuple[int, str, str]]) -> list[dict]:
    return [{"index": i, "field": f, "description": d} for i, f, d in notes]


def note_bytes(count: int) -> int:
    """At most what the left-out note adds to an answer of ``count`` records: in its record's notes
    (which may have had none) and in "notes"."""
    text = left_out_note(0, count)  # (the largest numbers it may hold)
    return (len(',"notes":[]') + len(to_json(text)) +
            len(",") + len(to_json({"index": count, "field": "explain", "description": text})))


def host_name(request: Request) -> str:
    """The host a request names (its Host header), without port or brackets."""
    try:
        return urlsplit("//" + request.headers.get("host", "")).hostname or ""
    except ValueError:  # an unbalanced '[': no name
        return ""


def is_loopback(host: str) -> bool:
    """Whether a host name or address means this machine only."""
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})  # no token asked (probes, scrapers)
SCORING_PATHS = frozenset({"/v1/score"})  # counted in logscore_calls_in_flight


class SidecarHttp:
    """Routes of the sidecar's HTTP port; scoring goes through the same core as gRPC."""

    def __init__(self, service: ScoringService, token: Optional[str], host: str = ""):
        from .feedback_http import FeedbackHttp

        self.service = service
        self.token = token
        self.host = host  # the address listened on (on loopback without a token: rebinding_refusal)
        self.feedback = FeedbackHttp(self)
        self._left_out_said = OncePerInterval()  # answers whose explanations were left out: warned once an interval

    def routes(self) -> dict[tuple[str, str], Handler]:
        routes = {("POST", "/v1/score"): self.score, ("GET", "/v1/models"): self.models,
                  ("GET", "/openapi.json"): self.openapi, ("GET", "/metrics"): self.metrics,
                  ("GET", "/healthz"): self.healthz, ("GET", "/readyz"): self.readyz,
                  ("GET", "/v1/anomalies"): self.anomalies, **self.feedback.routes()}
        return {key: handler if key[1] in PUBLIC_PATHS else self._by_loopback_name(handler)
                for key, handler in routes.items()}

    @staticmethod
    def content_checks() -> dict[str, ContentCheck]:
        """What each path refuses of a Content-Type, told before its body comes (Expect: 100-continue)."""
        return {"/v1/score": check_events_content_type}

    def _by_loopback_name(self, handler: Handler) -> Handler:
        async def checked(request: Request) -> Response:
            refusal = self.rebinding_refusal(request)
            return Response.error(403, refusal) if refusal is not None else await handler(request)
        return checked

    def rebinding_refusal(self, request: Request) -> Optional[str]:
        """Why a request is refused (counted and logged as a refusal), or None. Without a token, a
        sidecar listening on loopback answers only requests naming a loopback host (the public paths
        aside). DNS rebinding: a web page whose name the attacker points at 127.0.0.1 is of the same
        origin as its own requests (Origin and Host both name it), and read the review page's log
        lines, marked or undid feedback, read the anomaly events and scored records, from any
        browser on the machine."""
        named = request.headers.get("host")  # (a browser always names one)
        if self.token is not None or not is_loopback(self.host) or named is None or is_loopback(host_name(request)):
            return None
        refusal = (f"Host {named!r} names no loopback address, and this sidecar listens on {self.host} without a "
                   "token: open it as http://localhost:PORT/ (a page under another name may be a DNS-rebinding "
                   "attack), or give the sidecar a token (--token-file) to be reached by other names")
        self.service.metrics.refused("Unauthenticated", "http", refusal)
        return refusal

    def gate(self, path: str, headers: dict[str, str]) -> None:
        """A request with a body comes from a holder of the token (the review page's forms: its
        cookie), or is refused before any of its body is read or charged to the budget. Public
        paths answer anyone, body or not, as their handlers do."""
        request = Request("", path, {}, headers)
        if path in PUBLIC_PATHS:
            return
        refusal = self.rebinding_refusal(request)
        if refusal is not None:
            raise HttpError(403, refusal, close=True)
        if self.token is None:
            return
        if path.startswith("/ui/") and self.feedback.page_allowed(request):
            return
        try:
            self._authorize(request)
        except Unauthenticated as error:
            raise HttpError(401, str(error), close=True) from None

    def _authorize(self, request: Request) -> None:
        if self.token is not None and not bearer_matches(request.headers.get("authorization", ""), self.token):
            raise Unauthenticated("missing or wrong bearer token: send 'Authorization: Bearer <token>'")

    async def score(self, request: Request) -> Response:
        started = time.perf_counter()
        metrics = self.service.metrics
        try:
            self._authorize(request)
            records, single, invalid_at = decode_events(request.body, request.headers.get("content-type", ""),
                                                        request.ticket)
            explain = request.query.get("explain", "0")
            if not (digits(explain) and len(explain) < 6):
                raise InvalidRequest(f"explain={explain!r}: give a whole number of features")
            deadline = deadline_from(request.query.get("timeout_ms"))
            notes = invalid_utf8_notes(records, invalid_at) if invalid_at is not None else ()
            call = ScoreCall(records, request.query.get("model", ""), request.query.get("tag", ""),
                             int(explain), deadline, "http", notes=notes)  # (merged as gRPC's decoding notes are)
            outcome = await self.service.score(call)
            max_bytes = self.service.settings.max_message_bytes
            body, left_out = answer_json(outcome, len(records), single, max_bytes)
            if left_out:
                say_left_out(metrics, self._left_out_said, "http", left_out, len(records), max_bytes)
            return Response(200, body)
        except HttpError as error:
            metrics.refused(error.kind, "http", str(error))
            return Response.error(error.status, str(error))
        except LogscoreError as error:
            metrics.refused(type(error).__name__, "http", str(error))
            return Response.error(STATUS_CODES.get(type(error), 400), str(error))
        finally:
            metrics.child(metrics.request_seconds, "http").observe(time.perf_counter() - started)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except Unauthenticated as error:
            return Response.error(401, str(error))
        return Response.json({"models": [
            {"name": name, "version": m.version, "log_format": m.featurizer.log_format,
             "threshold": m.threshold, "detectors": m.detectors, "target_fpr": target_fpr(m)}
            for name, m in sorted(self.service.registry.snapshot.models.items())]})

    async def openapi(self, request: Request) -> Response:
        return Response(200, openapi_path().read_bytes())

    async def metrics(self, request: Request) -> Response:
        self.service.metrics.queued.set(self.service.queued_records())
        return Response(200, self.service.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

    async def healthz(self, request: Request) -> Response:
        return Response.json({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        snapshot = self.service.registry.snapshot
        reason = not_ready_reason(self.service)
        ready = reason is None
        body = {"ready": ready, **({"reason": reason} if reason else {}),
                "models": {n: m.version for n, m in sorted(snapshot.models.items())},
                "rejected_files": rejected_without_directories(snapshot.errors)}
        unloaded_routes = self.service.registry.unloaded_routes()
        if unloaded_routes:  # still ready: other records score; these are refused NOT_FOUND (log: what to do)
            body["unloaded_routes"] = unloaded_routes
        if self.service.learner is not None:
            body["learning"] = learning_without_directories(self.service.learner.status())
        flooding = self.service.metrics.floods.status()
        if flooding:  # still ready: the model works, it is the wrong one for this traffic (log: what to do)
            body["flooding"] = flooding
        if self.service.feedback is not None:  # an unreachable store does not make the sidecar unready
            body["feedback"] = self.service.feedback.status(public=True)
        if self.service.processes is not None:  # nor does one being replaced: the others score meanwhile
            body["scoring_processes"] = self.service.processes.status()
        return Response.json(body, 200 if ready else 503)

    async def anomalies(self, request: Request) -> Response:
        """Recent anomaly events as JSON, or a stream of server-sent events (Accept: text/event-stream,
        or ?stream=1); the stream starts with the events after ?since=ID, if any are still kept."""
        try:
            self._authorize(request)
            kinds, limit, since = anomaly_query(request.query)
        except LogscoreError as error:
            return Response.error(STATUS_CODES.get(type(error), 400), str(error))
        behaviour = self.service.behaviour
        streaming = ("text/event-stream" in request.headers.get("accept", "")
                     or request.query.get("stream") in ("1", "true"))
        if not streaming:
            recent = behaviour.hub.list_recent(kinds, limit, since) if behaviour is not None else []
            return Response.json({"events": [e.as_dict() for e in recent]})
        if behaviour is None:
            return Response.error(404, "no behaviour watching in this sidecar (setting windows is off)")
        watcher = behaviour.hub.watch(kinds)
        for event in behaviour.hub.since(kinds, since, watcher.size) if since else ():
            watcher.offer(event)
        return Response(200, b"", "text/event-stream", stream=server_sent_events(behaviour.hub, watcher),
                        stop=watcher.close)


# --- anomaly events (issue #15) ---------------------------------------------------------

SSE_HEARTBEAT_S = 15.0
SSE_BATCH = 500  # events written at once when they wait (one write and drain for them all)


async def server_sent_events(hub, watcher) -> AsyncIterator[bytes]:
    """``id``/``event``/``data`` lines per event; a comment line as heartbeat while none comes.

    NOTE: each event is encoded once for every watcher (``sse_bytes``), and the events waiting
    go out in one write: 100 watchers of a burst of events each encoding and draining one event
    at a time took the event loop from scoring for seconds."""
    try:
        while not watcher.closed:
            event = await watcher.next(SSE_HEARTBEAT_S)
            if event is None:
                if watcher.closed:
                    return
                yield b": keep-alive\n\n"
                continue
            yield b"".join(sse_bytes(e) for e in [event, *watcher.take_ready(SSE_BATCH)])
    finally:
        hub.unwatch(watcher)


def sse_bytes(event) -> bytes:
    return event.encoded_for("sse", encode_sse)


def encode_sse(event) -> bytes:
    data = json.dumps(event.as_dict(), separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n".encode()


def anomaly_query(query: dict[str, str]) -> tuple[list[str], int, int]:
    """(kinds, limit, since id) of GET /v1/anomalies; InvalidRequest naming a bad parameter."""
    from ..events import KINDS, RECENT_EVENTS

    kinds = [k for k in query.get("kinds", "").split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise InvalidRequest(f"kinds={','.join(sorted(unknown))}: use {', '.join(KINDS)} (comma-separated)")
    limit, since = (query_count(query, name, default) for name, default in (("limit", 100), ("since", 0)))
    return kinds, min(limit, RECENT_EVENTS), since


def query_count(query: dict, name: str, default: int, hint: str = "") -> int:
    """A whole number a query gives (at most 18 digits: whatever a store or a list holds)."""
    text = query.get(name, "").strip() or str(default)
    if not digits(text) or len(text) > 18:
        raise InvalidRequest(f"{name}={query[name]!r}: give a whole number{hint}")
    return int(text)
