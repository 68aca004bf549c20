"""A TCP server base for the surfaces written on asyncio streams (HTTP, forward)."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ..metrics import Metrics


class StreamServer:
    """Serves each connection with ``serve(reader, writer)``; ``stop`` drains, then ends them all.

    A connection in the middle of some work (a request being answered, a chunk being
    relayed) is in ``busy``; ``serve`` takes no new work once ``draining`` is set. Past
    ``max_connections`` open at once, a new connection is closed at once (counted and logged
    through ``metrics``): each costs memory (about 28 KiB idle), and the sidecar's is capped.
    """

    read_limit = 64 * 1024  # longest line StreamReader.readline accepts
    surface = ""  # its name in metrics and logs
    first_byte_timeout_s = 60.0  # a TLS port waits this long for a connection's first byte (asyncio's handshake's)

    def __init__(self, max_connections: int, metrics: Optional["Metrics"] = None):
        self._server: Optional[asyncio.base_events.Server] = None
        self._connections: set[asyncio.Task] = set()
        self.busy: set[asyncio.Task] = set()
        self.draining = False
        self.max_connections = max_connections
        self.metrics = metrics
        self._unsorted: set[asyncio.Task] = set()  # TLS port: connections before their first byte, or refused

    async def start(self, host: str, port: int, ssl=None) -> None:
        if ssl is None:
            self._server = await asyncio.start_server(self._connection, host, port, limit=self.read_limit)
            return
        # NOTE: asyncio's own TLS (start_server(ssl=...)) closed a plain-text client at its first
        # bytes without a word to it or the log. A connection's first byte is read first: a TLS
        # record starts the handshake, anything else is refused (refuse_plain_on_tls).
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _FirstByteProtocol(self, ssl), host, port)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop listening, close idle connections, give busy ones up to grace_s to finish their work."""
        self.draining = True
        if self._server is None:
            return
        self._server.close()
        for task in self._connections - self.busy | self._unsorted:
            task.cancel()
        if self.busy:
            await asyncio.wait(set(self.busy), timeout=grace_s)
        for task in list(self._connections):
            task.cancel()
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) - self.long_lived() >= self.max_connections:
            writer.close()
            if self.metrics is not None:
                self.metrics.refused("too_many_connections", self.surface,
                                     f"{len(self._connections)} connections open, the limit (max_connections); "
                                     "a client opens connections without closing them, or raise the limit")
            return
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await self.serve(reader, writer)
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    def long_lived(self) -> int:
        """Connections counted apart from max_connections (with a cap of their own)."""
        return 0

    async def refuse_plain_on_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection on a TLS port whose first byte opens no TLS handshake: counted, logged, closed."""
        if self.metrics is not None:
            self.metrics.refused("plain_on_tls", self.surface, "a connection without TLS on a TLS port: "
                                 "give the sender TLS and the sidecar's CA")

    async def _sort(self, transport: asyncio.Transport, context) -> None:
        """Read a TLS port's connection's first byte without taking it, then hand the connection on:
        to the TLS handshake and ``_connection``, or to ``refuse_plain_on_tls``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.first_byte_timeout_s  # (one for the first byte and the handshake)
        try:
            first = await asyncio.wait_for(peek_first_byte(transport), self.first_byte_timeout_s)
            reader = asyncio.StreamReader(limit=self.read_limit, loop=loop)
            if first == TLS_HANDSHAKE_RECORD:
                protocol = asyncio.StreamReaderProtocol(reader, self._connection, loop=loop)
                # (start_tls leaves connection_made to its caller: it calls the client_connected_cb)
                protocol.connection_made(await loop.start_tls(
                    transport, protocol, context, server_side=True,
                    ssl_handshake_timeout=max(0.1, deadline - loop.time())))
            elif first:
                protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
                transport.set_protocol(protocol)
                protocol.connection_made(transport)
                transport.resume_reading()
                writer = asyncio.StreamWriter(transport, protocol, reader, loop)
                try:
                    await self.refuse_plain_on_tls(reader, writer)
                finally:
                    writer.close()
            else:
                transport.close()
        except (asyncio.TimeoutError, asyncio.CancelledError, OSError):
            # (silent, as asyncio's handshake was: a client that sent nothing, left, or failed the handshake)
            transport.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


TLS_HANDSHAKE_RECORD = b"\x16"  # the content type of the TLS record that opens a connection (ClientHello)


async def peek_first_byte(transport: asyncio.Transport) -> bytes:
    """The connection's first byte, left unread for whoever reads next (b"" when it closed first).
    ``transport`` must not be reading: its socket is watched through a duplicate of its descriptor."""
    loop = asyncio.get_running_loop()
    probe = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
    try:
        readable = loop.create_future()
        loop.add_reader(probe.fileno(), lambda: readable.done() or readable.set_result(None))
        try:
            await readable
        finally:
            loop.remove_reader(probe.fileno())
        return probe.recv(1, socket.MSG_PEEK)
    finally:
        probe.close()  # the duplicate only: the connection stays open


class _FirstByteProtocol(asyncio.Protocol):
    """A TLS port's connection until its first byte says whether it speaks TLS (StreamServer._sort)."""

    def __init__(self, server: StreamServer, context):
        self.server = server
        self.context = context

    def connection_made(self, transport: asyncio.Transport) -> None:
        server = self.server
        if len(server._unsorted) >= server.max_connections:  # (each holds two descriptors while it waits)
            if server.metrics is not None:
                server.metrics.refused("too_many_connections", server.surface,
                                       f"{len(server._unsorted)} connections waiting for their first byte, "
                                       "the limit (max_connections); retry later")
            transport.abort()
            return
        transport.pause_reading()  # before asyncio reads anything: the first byte is peeked at, not taken
        task = asyncio.get_running_loop().create_task(self.server._sort(transport, self.context))
        self.server._unsorted.add(task)
        task.add_done_callback(self.server._unsorted.discard)
