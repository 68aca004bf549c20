"""Admission by bytes: what the gRPC and HTTP requests in flight may hold in memory (the forward
port bounds itself: two connections read at a time, forward_max_message_bytes; servers/forward.py).

A request is charged, before it is decoded, for its bytes on the wire (held by the
transport, the parsed message and the decoded text: ``WIRE_COPIES`` times), and while
it is decoded, ``VALUE_BYTES`` for each value it turns out to hold (a Python object
and its slot in a list or map). So a request of many tiny values costs what it
really takes, not what it weighs on the wire: 3-byte JSON values expand about 20
times once decoded. A request that would take the total over the limit is refused
(Overloaded: RESOURCE_EXHAUSTED / 429, retry later) and frees what it held; one that
alone exceeds the limit, which no wait would let in, is refused as invalid (INVALID_ARGUMENT /
400). The limit and the measured worst cases are in docs/operations.md ("Memory").
"""

from __future__ import annotations

from typing import Optional

from .errors import InvalidRequest, Overloaded

WIRE_COPIES = 3
VALUE_BYTES = 80
# In the refusal of a request too large for max_inflight_bytes alone (`logscore client` sends it again in halves)
ALONE_OVER_LIMIT = "even with nothing else in flight"


class Admission:
    """The in-flight budget; used from the event loop only (no lock)."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.in_flight_bytes = 0

    def admit(self, wire_bytes: int) -> "Ticket":
        """A ticket charged for a request of ``wire_bytes``; Overloaded when it does not fit."""
        ticket = Ticket(self)
        ticket.charge_wire(wire_bytes)
        return ticket


class Ticket:
    """What one request holds; given back by ``release`` (or at the end of a with-block)."""

    def __init__(self, admission: Optional[Admission] = None):
        self.admission = admission
        self.bytes = 0

    def charge(self, nbytes: int) -> None:
        admission = self.admission
        if admission is None:
            return
        if not self.fits(nbytes):
            needed, others = self.bytes + nbytes, admission.in_flight_bytes - self.bytes
            self.release()
            if needed > admission.limit_bytes:  # never fits, however long the caller waits: retrying cannot help
                raise InvalidRequest(f"this request needs about {needed} bytes once decoded, more than "
                                     f"max_inflight_bytes ({admission.limit_bytes}) {ALONE_OVER_LIMIT}; send "
                                     "smaller batches, or raise max_inflight_bytes")
            raise Overloaded(f"this request needs about {needed} bytes once decoded, other requests in flight "
                             f"hold {others}, and max_inflight_bytes is {admission.limit_bytes}; retry later, "
                             "send smaller batches, or raise max_inflight_bytes")
        admission.in_flight_bytes += nbytes
        self.bytes += nbytes

    def fits(self, nbytes: int) -> bool:
        """Whether charging ``nbytes`` more would be admitted now."""
        admission = self.admission
        return admission is None or admission.in_flight_bytes + nbytes <= admission.limit_bytes

    def charge_wire(self, nbytes: int) -> None:
        """For bytes that arrive after admission (a chunked HTTP body)."""
        self.charge(WIRE_COPIES * nbytes)

    def charge_values(self, count: int) -> None:
        self.charge(count * VALUE_BYTES)

    def release(self) -> None:
        if self.admission is not None:
            self.admission.in_flight_bytes -= self.bytes
        self.bytes = 0

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


UNLIMITED = Ticket()  # for callers outside the sidecar (tests, tools): charges nothing
