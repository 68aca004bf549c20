"""The HTTP routes of feedback and the review page (on the sidecar's HTTP port, behind its token).

  POST   /v1/feedback        mark records, a review group or a field value normal / keep (JSON)
  GET    /v1/feedback        the entries (?all=1: removed ones too) and the store's state
  DELETE /v1/feedback?id=N   undo an entry
  GET    /ui/                the review page (server-rendered HTML, inline SVG, no script)
  POST   /ui/feedback        the page's "normal" / "keep" buttons (a form), then back to the page
  POST   /ui/feedback/remove the page's "undo" buttons

A browser cannot send a bearer header: with a token set, /ui/?token=… (or the page's token form)
sets an HttpOnly, SameSite=Strict cookie holding it. Changes asked from another web page (its
Origin) are refused, with or without a token, and POST /v1/feedback takes application/json only.
"""

from __future__ import annotations

import calendar
import hmac
import json
import secrets
import time
from collections import OrderedDict
from typing import Optional
from urllib.parse import parse_qs, quote, unquote, urlsplit

from ..errors import FeedbackFull, GroupOutOfDate, InvalidRequest, LogscoreError, Unauthenticated
from ..feedback_store import LIST_FEEDBACK, Mark, entry_number
from ..shown import html_text
from ..timestamps import LATEST_TIME
from .feedback_grpc import count_mark, off_loop
from .http import STATUS_CODES, HttpError, Request, Response, check_utf8, json_error, json_text, query_count

COOKIE = "logscore_token"
PAGE_AUTHOR = "review page"
# Errors of feedback alone, beside servers.http.STATUS_CODES: a group of a page shown before a
# restart is a conflict with what the sidecar holds now, not a malformed request.
FEEDBACK_STATUS_CODES = {**STATUS_CODES, GroupOutOfDate: 409, FeedbackFull: 409}


class FeedbackHttp:
    def __init__(self, sidecar_http):
        self.http = sidecar_http  # servers.http.SidecarHttp: its service, token and bearer check
        self.service = sidecar_http.service
        self.notes = PageNotes()

    def routes(self) -> dict:
        return {("POST", "/v1/feedback"): self.add, ("GET", "/v1/feedback"): self.list,
                ("DELETE", "/v1/feedback"): self.remove, ("GET", "/ui/"): self.page, ("GET", "/ui"): self.to_page,
                ("POST", "/ui/feedback"): self.page_mark, ("POST", "/ui/feedback/remove"): self.page_remove}

    # --- JSON API ---------------------------------------------------------------------------
    async def add(self, request: Request) -> Response:
        async def work():
            self.http._authorize(request)
            check_json_from_here(request)
            mark = decode_mark(request.body)
            entry = await off_loop(self._feedback().mark, mark)
            count_mark(self.service.metrics, entry)
            return Response.json({"feedback": entry.as_json(), "existing": entry.existing})
        return await self._answer(work)

    async def list(self, request: Request) -> Response:
        async def work():
            self.http._authorize(request)
            feedback = self._feedback()
            after, limit = (query_count(request.query, name, 0, PAGE_HINT) for name in ("after", "limit"))

            def listing() -> dict:  # off the event loop: 10,000 entries take 100 ms to describe
                entries, following = feedback.page(request.query.get("all") in ("1", "true"), after, limit)
                return {"feedback": [e.as_json() for e in entries], "next_after": following or None}
            return Response.json({**await off_loop(listing), "store": feedback.status()})
        return await self._answer(work)

    async def remove(self, request: Request) -> Response:
        async def work():
            self.http._authorize(request)
            check_same_origin(request)
            entry_id = entry_number(request.query.get("id", ""))
            entry = await off_loop(self._feedback().remove, entry_id, request.query.get("author", "") or "http")
            self.service.metrics.feedback_writes.labels("removed", entry.verdict).inc()
            return Response.json({"feedback": entry.as_json()})
        return await self._answer(work)

    # --- the page -----------------------------------------------------------------------------
    async def to_page(self, request: Request) -> Response:
        return redirect("/ui/")

    async def page(self, request: Request) -> Response:
        token = self.http.token
        presented = request.query.get("token")
        if token is not None and presented is not None:
            if not hmac.compare_digest(presented.encode(), token.encode()):
                return self._token_form("That token is not the sidecar's.", 401)
            response = redirect("/ui/" + place_query(request.query.get("from", ""), "?"))
            response.headers["Set-Cookie"] = f"{COOKIE}={quote(token)}; HttpOnly; SameSite=Strict; Path=/"
            return response
        if not self.page_allowed(request):
            return self._token_form("This sidecar asks for its token.", 401)
        from ..review import FEEDBACK_ROWS, render_page

        feedback = self.service.feedback
        entries, total = [], 0
        status = {"store": "(none)", "reachable": False, "error": "feedback is off"}
        if feedback is not None:
            status = feedback.status()
            try:
                entries, total = await off_loop(feedback.latest, FEEDBACK_ROWS)
            except LogscoreError as error:
                status = {**status, "reachable": False, "error": str(error)}
        if self.service.review is None:
            return Response.error(404, "the review page is off (review_records is 0)")
        try:
            first = query_count(request.query, "from", 0, " (the number of groups to pass over: the page's "
                                "next and previous links give it)")
        except InvalidRequest as error:
            return Response.error(400, str(error))
        models = self.service.registry.snapshot.models
        html = render_page(self.service.review, entries, total, self.service.metrics.histograms(),
                           {name: m.threshold for name, m in models.items()}, status,
                           self.notes.get(request.query.get("note", "")),
                           flooding=self.service.metrics.floods.status(),
                           learning_on=self.service.metrics.floods.learner is not None, first=first)
        return Response.html(html, headers={"Cache-Control": "no-store"})

    async def page_mark(self, request: Request) -> Response:
        async def work():
            form = self._page_form(request)
            mark = Mark(verdict=form.get("verdict", ""), author=form.get("author") or PAGE_AUTHOR,
                        reason=form.get("reason", ""), group=form.get("group", ""))
            entry = await off_loop(self._feedback().mark, mark)
            count_mark(self.service.metrics, entry)
            if entry.existing:
                return self._back(f"Group {mark.group} was already marked {entry.verdict}: feedback #{entry.id} "
                                  f"by {entry.author}", request)
            return self._back(f"Group {mark.group} marked {entry.verdict}: feedback #{entry.id}", request)
        return await self._answer(work, page=request)

    async def page_remove(self, request: Request) -> Response:
        async def work():
            form = self._page_form(request)
            entry = await off_loop(self._feedback().remove, entry_number(form.get("id", "")), PAGE_AUTHOR)
            self.service.metrics.feedback_writes.labels("removed", entry.verdict).inc()
            return self._back(f"Feedback #{entry.id} undone", request)
        return await self._answer(work, page=request)

    # --- helpers ------------------------------------------------------------------------------
    def _back(self, message: str, request: Request) -> Response:
        """Back to the page, which shows what was done, at the place the form was posted from (its
        hidden ``from``: a mark from the second page of groups went back to the first)."""
        fields = parse_qs(request.body.decode("utf-8", "replace"))
        return redirect(f"/ui/?note={self.notes.add(message)}" + place_query((fields.get("from") or [""])[-1], "&"))

    def _feedback(self):
        if self.service.feedback is None:
            raise InvalidRequest("feedback is off in this sidecar")
        return self.service.feedback

    async def _answer(self, work, page: Optional[Request] = None) -> Response:
        metrics = self.service.metrics
        try:
            return await work()
        except HttpError as error:  # (a body in another charset than UTF-8: as /v1/score answers it)
            metrics.refused(error.kind, "http", str(error))
            return Response.error(error.status, str(error))
        except LogscoreError as error:
            said = http_words(str(error))
            metrics.refused(type(error).__name__, "http", said)
            status = FEEDBACK_STATUS_CODES.get(type(error), 400)
            # (out of date: back to the page would show it anew; say so, with a link)
            if page is not None and isinstance(error, GroupOutOfDate):
                return self._out_of_date(said)
            if page is not None and status != 401:
                return self._back(f"Not done: {said}", page)
            return Response.error(status, said)

    def page_allowed(self, request: Request) -> bool:
        token = self.http.token
        if token is None:
            return True
        try:
            self.http._authorize(request)
            return True
        except Unauthenticated:
            pass
        return hmac.compare_digest(cookies(request).get(COOKIE, "").encode(), token.encode())

    def _page_form(self, request: Request) -> dict[str, str]:
        """The fields of a form post from the page itself (token checked, other origins refused)."""
        if not self.page_allowed(request):
            raise Unauthenticated("open /ui/ and give the sidecar's token first")
        check_same_origin(request)
        return {k: v[-1] for k, v in parse_qs(request.body.decode("utf-8", "replace")).items()}

    @staticmethod
    def _out_of_date(said: str) -> Response:
        html = ("<!doctype html><html lang=en><head><meta charset=utf-8><title>logscore review</title></head>"
                f"<body style='font:14px system-ui;margin:24px'><p id=out-of-date>Not done: {html_text(said)}</p>"
                "<p><a href='/ui/'>reload /ui/</a></p></body></html>")
        return Response.html(html, 409)

    @staticmethod
    def _token_form(message: str, status: int) -> Response:
        html = ("<!doctype html><html lang=en><head><meta charset=utf-8><title>logscore review</title></head>"
                f"<body style='font:14px system-ui;margin:24px'><p>{message}</p><form method=get action='/ui/'>"
                "<input type=password name=token placeholder=token aria-label=token> <button>open</button>"
                "</form></body></html>")
        return Response.html(html, status)


class PageNotes:
    """What the page says after a button, kept here and named in the redirect by a random key: a
    link cannot make the page say anything else (a ``?message=`` link could show any text in the
    sidecar's own page, such as where to paste its token)."""

    KEPT = 64

    def __init__(self):
        self._notes: OrderedDict[str, str] = OrderedDict()

    def add(self, message: str) -> str:
        key = secrets.token_urlsafe(9)
        self._notes[key] = message
        while len(self._notes) > self.KEPT:
            self._notes.popitem(last=False)
        return key

    def get(self, key: str) -> str:
        return self._notes.get(key, "")


def check_same_origin(request: Request) -> None:
    """Refuse a change asked from another web page: a browser names the page's origin (``null``
    from a sandboxed frame); non-browser clients send none. Without a token (the default), any
    page an operator opens could otherwise mark scanners normal."""
    origin = request.headers.get("origin")
    host = request.headers.get("host", "")
    if origin is not None and urlsplit(origin).netloc != host:
        raise Unauthenticated(f"a request from the web page {origin} may not change feedback here "
                              f"(only the review page on {host} and non-browser clients may)")


def check_json_from_here(request: Request) -> None:
    """JSON only: a page of another origin can post text/plain without asking, not application/json."""
    check_same_origin(request)
    declared = request.headers.get("content-type", "")
    content_type = declared.split(";")[0].strip().lower()
    if content_type != "application/json":
        raise InvalidRequest(f"Content-Type {content_type or '(none)'!r}: send the feedback as application/json")
    check_utf8(declared)


MAX_PLACE_DIGITS = 9  # of a page's ``from`` carried back (groups passed over; more than the ring holds)


def place_query(value: str, separator: str) -> str:
    """``from=N`` for the redirect back to the page (after ``separator``), or "" if ``value`` is no
    positive count (it is sent back into a URL: only digits pass)."""
    if value.isascii() and value.isdigit() and len(value) <= MAX_PLACE_DIGITS and int(value) > 0:
        return f"{separator}from={int(value)}"
    return ""


def redirect(location: str) -> Response:
    return Response(303, b"", "text/plain", {"Location": location})


def cookies(request: Request) -> dict[str, str]:
    found = {}
    for part in request.headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            found[name] = value
    return {k: unquote(v) for k, v in found.items()}


# A page's ``after`` (an entry's id) or ``limit`` (0 or none: all)
PAGE_HINT = (" (after: the id the last page ended with, its next_after; limit: how many entries a page holds, "
             "0 for all)")


def parse_expiry(value) -> Optional[float]:
    """Unix seconds from a number, an ISO 8601 UTC time (2026-12-31T00:00:00Z or a date), or None."""
    if value in (None, "", 0):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, int) and value < -LATEST_TIME:  # (float() of -10**400 raised OverflowError too)
            raise InvalidRequest("expires_at is in the past; give a future time, or none to keep the entry")
        if isinstance(value, int) and value > LATEST_TIME:  # float() of 10**400 raised OverflowError: a 500
            digits = str(abs(value))
            shown = digits if len(digits) <= 20 else f"{digits[:12]}…({len(digits):,} digits)"
            raise InvalidRequest(f"expires_at {shown} is no time before 9999-12-31; give "
                                 "Unix seconds or a UTC time such as 2026-12-31T00:00:00Z, or none to keep the entry")
        return float(value)
    if isinstance(value, str):
        text = value.strip().rstrip("Z")
        for pattern in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
            try:
                return float(calendar.timegm(time.strptime(text, pattern)))
            except ValueError:
                continue
    raise InvalidRequest(f"expires_at {value!r}: give Unix seconds or a UTC time such as 2026-12-31T00:00:00Z")


def decode_mark(body: bytes) -> Mark:
    """A Mark from POST /v1/feedback's JSON body (see docs/openapi.json)."""
    try:
        data = json.loads(json_text(body)[0] or "null")  # (invalid UTF-8 as U+FFFD: as the records were scored)
    except ValueError as error:
        raise InvalidRequest(f"body is not valid JSON: {json_error(error)}") from None
    except RecursionError:  # a hostile body of a hundred thousand '[': a 400, not an internal error
        raise InvalidRequest("body is JSON nested too deeply; send a flat object such as "
                             '{"verdict": "normal", "author": "ana", "records": ["<a log line>"]}') from None
    if not isinstance(data, dict):
        raise InvalidRequest('body must be a JSON object such as {"verdict": "normal", "author": "ana", '
                             '"records": ["<a log line>"]}')
    known = {"verdict", "author", "reason", "model", "route", "entity", "expires_at", "records", "group", "field",
             "value"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    records = data.get("records") or []
    if not isinstance(records, list) or not all(isinstance(r, (str, dict)) for r in records):
        raise InvalidRequest("records must be an array of log lines (strings) or events (objects)")
    for name in ("verdict", "author", "reason", "model", "route", "entity", "group", "field"):
        if not isinstance(data.get(name, ""), str):
            raise InvalidRequest(f"{name} must be a string")
    value = data.get("value")
    if value is not None and not isinstance(value, str):
        value = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return Mark(verdict=data.get("verdict", ""), author=data.get("author", ""), reason=data.get("reason", ""),
                model=data.get("model", ""), route=data.get("route", ""), entity=data.get("entity", ""),
                expires_at=parse_expiry(data.get("expires_at")), records=records, group=data.get("group", ""),
                field=data.get("field", ""), value=value)


def http_words(said: str) -> str:
    """An error of the feedback store as HTTP callers get it: the list is theirs, not gRPC's ListFeedback."""
    return said.replace(LIST_FEEDBACK, "list them with GET /v1/feedback")
