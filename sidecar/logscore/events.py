"""Anomaly events: a window whose count or share is improbable, a client whose behaviour is.

    windows.py / entities.py ─► EventHub ─► recent events, per kind (GET /v1/anomalies, replay)
                                       └──► watchers (gRPC WatchAnomalies, HTTP server-sent events,
                                            forward mode's injection, the Fluentd plugin via gRPC)

Each surface encodes events its own way; the hub only keeps them. Memory is bounded: the
recent events are the last ``RECENT_EVENTS`` of each kind (a flood of client events does not push
out the rarer window events), each watcher a queue of at most ``WATCHER_QUEUE`` events.
A watcher that falls behind loses its oldest undelivered events, never blocks the sidecar: the
next event it receives says how many it lost (``dropped_before``), and the loss is counted.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import operator
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional

RECENT_EVENTS = 1000
WATCHER_QUEUE = 1000
KINDS = ("window", "client")


@dataclass
class AnomalyEvent:
    kind: str  # "window" (a key's count or share in one window) or "client" (one client's behaviour)
    model: str  # the route's model
    key: str  # what was observed: "status_class=5xx share", "url_template=/login count", "client=10.0.0.9"
    score: float  # calibrated in [0, 1], like record scores
    observed: float  # the count, the share, or (clients) the number of requests seen
    expected_low: float
    expected_high: float
    explanation: str  # "5xx share 31 %, expected 0.4–1.2 %"
    start: float  # Unix time: window start (clients: first request seen)
    end: float  # window end (clients: the request that crossed the threshold)
    id: int = 0  # increasing, over restarts too (EventHub.first_id)
    dropped_before: int = 0  # events this watcher lost just before this one (it fell behind)
    features: dict = field(default_factory=dict)  # clients: the behaviour features
    encoded: dict = field(default_factory=dict, repr=False, compare=False)  # surface -> bytes (encoded_for)

    def encoded_for(self, surface: str, encode: Callable[["AnomalyEvent"], bytes]) -> bytes:
        """The event as ``surface`` sends it, encoded once for all its watchers: 50 watchers of a
        burst each encoding every event took the event loop from scoring. A watcher's own copy,
        saying what it lost (``dropped_before``), is encoded apart."""
        if self.dropped_before:
            return encode(self)
        found = self.encoded.get(surface)
        if found is None:
            found = self.encoded[surface] = encode(self)
        return found

    def as_dict(self) -> dict:
        entry = asdict(self)
        del entry["encoded"]
        if not entry["features"]:
            del entry["features"]
        return entry


class Watcher:
    """One subscriber's bounded queue."""

    def __init__(self, kinds: Iterable[str], size: int):
        self.kinds = frozenset(kinds) or frozenset(KINDS)
        self.size = size
        self._queue: collections.deque = collections.deque()
        self._ready = asyncio.Event()
        self.dropped = 0  # lost since the last delivered event
        self.closed = False

    def offer(self, event: AnomalyEvent) -> bool:
        """Queue an event; False when the oldest had to go to make room."""
        if event.kind not in self.kinds:
            return True
        lost = len(self._queue) >= self.size
        if lost:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)
        self._ready.set()
        return not lost

    async def next(self, timeout: Optional[float] = None) -> Optional[AnomalyEvent]:
        """The next event, or None after ``timeout`` seconds (or when closed)."""
        while not self._queue:
            if self.closed:
                return None
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        event = self._queue.popleft()
        if self.dropped:
            event = AnomalyEvent(**{**event.__dict__, "dropped_before": self.dropped, "encoded": {}})
            self.dropped = 0
        return event

    def take_ready(self, limit: int) -> list[AnomalyEvent]:
        """Up to ``limit`` more events that are already waiting (no wait)."""
        taken = []
        while self._queue and len(taken) < limit:
            taken.append(self._queue.popleft())
        return taken

    def close(self) -> None:
        self.closed = True
        self._ready.set()


class RecentEvents:
    """The last ``maxlen`` events of each kind, read merged in the order they were published.
    NOTE: one list for every kind lost the rarer kinds in a flood of the other: 2.5 minutes into a
    soak with 1 window event (a 5xx burst) and 4,078 client events, ?kinds=window answered none
    (soak probe, session 27)."""

    def __init__(self, maxlen: int):
        self.maxlen = maxlen  # per kind
        self._by_kind: dict[str, collections.deque] = {}
        self._lost: collections.Counter = collections.Counter()  # per kind: events no longer kept
        # Per kind, the ids of its first event and of its newest one no longer kept: a kind's lost
        # events are its oldest, so they all lie between the two.
        self._first_id: dict[str, int] = {}
        self._newest_lost_id: dict[str, int] = {}

    def extend(self, events: Iterable[AnomalyEvent]) -> None:
        for event in events:
            kept = self._by_kind.get(event.kind)
            if kept is None:
                kept = self._by_kind[event.kind] = collections.deque(maxlen=self.maxlen)
                self._first_id[event.kind] = event.id
            if len(kept) == self.maxlen:
                self._lost[event.kind] += 1
                self._newest_lost_id[event.kind] = kept[0].id
            kept.append(event)

    def of(self, kinds: Iterable[str]) -> list[AnomalyEvent]:
        """The kept events of ``kinds``, oldest first (ids increase in publishing order)."""
        rings = [self._by_kind[kind] for kind in set(kinds) if kind in self._by_kind]
        if len(rings) == 1:
            return list(rings[0])
        # (timsort merges the sorted runs: 3.6 times faster than heapq.merge with a key, 1,100 events)
        return sorted(itertools.chain(*rings), key=operator.attrgetter("id"))

    def lost_after(self, kinds: Iterable[str], since_id: int) -> int:
        """Events of ``kinds`` after ``since_id`` no longer kept. Per kind exact when ``since_id`` is
        not among the ids of its lost events (none lost after its newest lost one, all of them before
        its first); else at most the ids from ``since_id`` to its newest lost one, and what it lost.
        NOTE: bounded by the ids up to the oldest kept only, a kind's events lost before since_id were
        counted as lost after it when other kinds' ids lay between (review, session 27)."""
        lost = 0
        for kind in set(kinds):
            newest_lost = self._newest_lost_id.get(kind)
            if newest_lost is None or newest_lost <= since_id:
                continue
            if since_id < self._first_id[kind]:
                lost += self._lost[kind]
            else:
                lost += min(self._lost[kind], newest_lost - since_id)
        return lost

    def __iter__(self):
        return iter(self.of(self._by_kind))

    def __len__(self) -> int:
        return sum(len(kept) for kept in self._by_kind.values())


class EventHub:
    """Publishes anomaly events to the recent list and to every watcher.

    ``publish`` may be called from the scoring thread: delivery to watchers is handed to the
    event loop (``attach``); without a loop (offline use) only the recent list is kept.
    """

    def __init__(self, recent: int = RECENT_EVENTS, watcher_queue: int = WATCHER_QUEUE,
                 on_drop: Optional[Callable[[int], None]] = None):
        self.recent = RecentEvents(recent)
        self.watcher_queue = watcher_queue
        self._watchers: set[Watcher] = set()
        # NOTE: ids start at the microseconds of the sidecar's start, so they keep increasing over a
        # restart: a watcher resuming with ?since=ID of the process before gets every new event.
        self.first_id = int(time.time() * 1e6)
        self._ids = itertools.count(self.first_id)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.on_drop = on_drop
        self.published = 0

    closed = False  # set on shutdown: new watchers end at once

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def publish(self, events: Iterable[AnomalyEvent]) -> None:
        events = list(events)
        if not events:
            return
        for event in events:
            event.id = next(self._ids)
        if self._loop is None:
            self._deliver(events)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._deliver(events)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[AnomalyEvent]) -> None:
        self.recent.extend(events)
        self.published += len(events)
        for watcher in list(self._watchers):
            if watcher.closed:  # closed by its surface without unwatch (a stream refused before it began)
                self._watchers.discard(watcher)
                continue
            lost = sum(not watcher.offer(event) for event in events)
            if lost and self.on_drop is not None:
                self.on_drop(lost)

    def watch(self, kinds: Iterable[str] = (), replay: int = 0) -> Watcher:
        """A new watcher, optionally first given the last ``replay`` recent events of its kinds; once
        the hub is closed (shutting down) the watcher is closed at once, after its replay."""
        watcher = Watcher(kinds, self.watcher_queue)
        for event in self.list_recent(watcher.kinds, replay):
            watcher.offer(event)
        if self.closed:
            watcher.close()
            return watcher
        self._watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        watcher.close()
        self._watchers.discard(watcher)

    def close(self) -> None:
        self.closed = True
        for watcher in list(self._watchers):
            self.unwatch(watcher)

    def since(self, kinds: Iterable[str], since_id: int, limit: Optional[int] = None) -> list[AnomalyEvent]:
        """The kept events after ``since_id`` (a watcher resuming), the newest ``limit`` of them if
        given (what its queue holds); the first carries how many after it are not given
        (``dropped_before``): those of this process no longer kept, and those past ``limit``.
        NOTE: offered all to a watcher whose queue held half of them (each kind keeps anomaly_recent),
        the oldest went, among them the first and its count: a resuming client was told of 999 events
        lost that were still kept (review, session 27)."""
        chosen = self.list_recent(kinds, len(self.recent), since_id)
        left_out = max(len(chosen) - limit, 0) if limit is not None else 0
        chosen = chosen[left_out:]
        lost = left_out
        if chosen and since_id >= self.first_id:
            lost += self.recent.lost_after(frozenset(kinds) or frozenset(KINDS), since_id)
        if chosen and lost > 0:
            chosen[0] = AnomalyEvent(**{**chosen[0].__dict__, "dropped_before": lost})
        return chosen

    def list_recent(self, kinds: Iterable[str] = (), limit: int = 100, since_id: int = 0) -> list[AnomalyEvent]:
        if limit <= 0:
            return []
        chosen = self.recent.of(frozenset(kinds) or frozenset(KINDS))
        if since_id:
            chosen = [e for e in chosen if e.id > since_id]
        return chosen[-limit:]
