"""The Fluentd forward protocol: receive, score, pass on to a next hop, then acknowledge.

For shippers that cannot load a plugin (Fluent Bit, Docker's fluentd logging
driver, a locked-down Fluentd): point their forward output at the sidecar, and
the sidecar's forward output at the real aggregator.

    sender ──forward──► sidecar (adds anomaly_score, is_anomaly) ──forward──► next hop

Modes received: Message ``[tag, time, record(, option)]``, Forward
``[tag, [[time, record], ...](, option)]`` (Fluent Bit's ``[[time, metadata],
record]`` entries too), PackedForward ``[tag, bytes(, option)]`` and
CompressedPackedForward (``option.compressed == "gzip"``).

At-least-once: a chunk (``option.chunk``) is acknowledged to the sender only
after the next hop acknowledged it; if the next hop is down the sender gets no
ack and resends, so nothing is lost if the sidecar or the next hop restarts.
Scoring failures never hold records: they go on marked ``anomaly_unscored``.
Shared-key handshakes are not supported (use TLS/loopback; see docs/operations.md).
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import msgpack

from ..errors import LogscoreError
from ..scoring import ScoreCall, ScoringService
from .streams import StreamServer

log = logging.getLogger("logscore.forward")

SCORE_KEY, FLAG_KEY, MODEL_KEY, UNSCORED_KEY = "anomaly_score", "is_anomaly", "anomaly_model", "anomaly_unscored"
# NOTE: Fluentd's out_forward packs the entries of PackedForward as a msgpack *str*, and
# records may hold invalid UTF-8: strings are decoded with surrogateescape (and encoded
# back the same way) so every byte reaches the next hop as it came.
EXACT = "surrogateescape"


class ForwardProtocolError(ValueError):
    """The sender's bytes are not a forward-protocol message; the connection is closed."""


@dataclass
class Message:
    tag: str
    entries: list  # [time, record] pairs; time kept as received (int, float or EventTime ExtType)
    chunk: Optional[str]


def decode_message(message) -> Message:
    if not isinstance(message, (list, tuple)) or len(message) < 2 or not isinstance(message[0], str):
        raise ForwardProtocolError(f"expected [tag, ...], got {type(message).__name__}")
    tag, payload = message[0], message[1]
    option = message[-1] if len(message) >= 3 and isinstance(message[-1], dict) else {}
    if isinstance(payload, (bytes, str)):  # PackedForward (str when the sender packed it as str)
        data = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else payload
        if option.get("compressed") == "gzip":
            data = gzip.decompress(data)  # handles concatenated gzip members too
        unpacker = msgpack.Unpacker(raw=False, unicode_errors=EXACT, strict_map_key=False)
        unpacker.feed(data)
        entries = [_entry(e) for e in unpacker]
    elif isinstance(payload, (list, tuple)) and (not payload or isinstance(payload[0], (list, tuple))):
        entries = [_entry(e) for e in payload]  # Forward
    elif len(message) >= 3 and isinstance(message[2], dict):  # Message: [tag, time, record(, option)]
        option = message[3] if len(message) >= 4 and isinstance(message[3], dict) else {}
        entries = [[payload, message[2]]]
    else:
        raise ForwardProtocolError("not a Message, Forward or PackedForward message")
    chunk = option.get("chunk")
    return Message(tag, entries, chunk if isinstance(chunk, str) else None)


def _entry(entry) -> list:
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)):
        raise ForwardProtocolError("an entry is not [time, record]")
    moment = entry[0]
    if isinstance(moment, (list, tuple)):  # Fluent Bit: [[time, metadata], record]
        moment = moment[0]
    return [moment, entry[1]]


class NextHop:
    """One connection to the next forward receiver; each chunk waits for its ack."""

    def __init__(self, address: str, ack_timeout_s: float = 10.0):
        host, _, port = address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.ack_timeout_s = ack_timeout_s
        self._lock = asyncio.Lock()
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._unpacker = msgpack.Unpacker(raw=False)

    async def send(self, tag: str, entries: list) -> None:
        """PackedForward with a chunk id; returns once acknowledged, raises otherwise."""
        chunk = uuid.uuid4().hex
        packer = msgpack.Packer(use_bin_type=True, unicode_errors=EXACT)
        packed = b"".join(packer.pack(e) for e in entries)
        frame = packer.pack([tag, packed, {"size": len(entries), "chunk": chunk}])
        async with self._lock:
            try:
                if self._writer is None:
                    self._reader, self._writer = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port), self.ack_timeout_s)
                    self._unpacker = msgpack.Unpacker(raw=False)
                self._writer.write(frame)
                await self._writer.drain()
                await asyncio.wait_for(self._await_ack(chunk), self.ack_timeout_s)
            except BaseException:
                self._close()
                raise

    async def _await_ack(self, chunk: str) -> None:
        while True:
            for answer in self._unpacker:
                if isinstance(answer, dict) and answer.get("ack") == chunk:
                    return
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError("next hop closed the connection before acknowledging")
            self._unpacker.feed(data)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def close(self) -> None:
        async with self._lock:
            self._close()


class ForwardServer(StreamServer):
    def __init__(self, service: ScoringService, next_hop: NextHop, max_message_bytes: int):
        super().__init__()
        self.service = service
        self.next_hop = next_hop
        self.max_message_bytes = max_message_bytes

    async def stop(self) -> None:
        await super().stop()
        await self.next_hop.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        unpacker = msgpack.Unpacker(raw=False, unicode_errors=EXACT, strict_map_key=False,
                                    max_buffer_size=self.max_message_bytes)
        try:
            while data := await reader.read(256 * 1024):
                unpacker.feed(data)
                for message in unpacker:
                    await self._handle(message, writer)
        except (ForwardProtocolError, ValueError, msgpack.UnpackException, OSError) as error:
            # Not forward protocol (or a broken gzip chunk): close; an acking sender resends.
            log.warning("forward connection closed",
                        extra={"peer": str(writer.get_extra_info("peername")), "error": str(error)})
            self.service.metrics.child(self.service.metrics.errors, "forward_protocol", "forward").inc()

    async def _handle(self, raw, writer: asyncio.StreamWriter) -> None:
        message = decode_message(raw)
        if message.entries:
            await self._score(message)
            await self.next_hop.send(message.tag, message.entries)  # raises: no ack to the sender
        if message.chunk is not None:
            writer.write(msgpack.packb({"ack": message.chunk}, use_bin_type=True))
            await writer.drain()

    async def _score(self, message: Message) -> None:
        records = [record for _, record in message.entries]
        started = time.perf_counter()
        try:
            outcome = await self.service.score(ScoreCall(records, tag=message.tag, surface="forward"))
        except LogscoreError as error:
            log.warning("forwarding records unscored", extra={"tag": message.tag, "records": len(records),
                                                               "error": str(error)})
            for record in records:
                record[UNSCORED_KEY] = True
            return
        finally:
            metrics = self.service.metrics
            metrics.child(metrics.request_seconds, "forward").observe(time.perf_counter() - started)
        names = [m.name for m in outcome.models]
        for i, record in enumerate(records):
            record[SCORE_KEY] = round(float(outcome.scores[i]), 6)
            record[FLAG_KEY] = bool(outcome.is_anomaly[i])
            record[MODEL_KEY] = names[int(outcome.model_index[i])]
