"""A TCP server base for the surfaces written on asyncio streams (HTTP, forward)."""

from __future__ import annotations

import asyncio
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

    def __init__(self, max_connections: int, metrics: Optional["Metrics"] = None):
        self._server: Optional[asyncio.base_events.Server] = None
        self._connections: set[asyncio.Task] = set()
        self.busy: set[asyncio.Task] = set()
        self.draining = False
        self.max_connections = max_connections
        self.metrics = metrics

    async def start(self, host: str, port: int, ssl=None) -> None:
        self._server = await asyncio.start_server(self._connection, host, port, ssl=ssl, limit=self.read_limit)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop listening, close idle connections, give busy ones up to grace_s to finish their work."""
        self.draining = True
        if self._server is None:
            return
        self._server.close()
        for task in self._connections - self.busy:
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

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError
