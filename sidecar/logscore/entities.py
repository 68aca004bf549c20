"""Per-client behaviour: sliding-window features per client, scored by a detector of normal clients.

    scored batch ─► ClientTracker.observe ─► per record, its client's features so far
                                          ─► the model graph's entity detector ─► entity_score
                                          ─► a client crossing the threshold ─► AnomalyEvent

A client is the value of a field (``remote_addr`` by default; setting ``entity_key``). Its
features decay with a half-life (``half_life_s``), so they describe the last minutes:

    rate          requests, decayed
    error_ratio   share of 4xx/5xx answers
    new_paths     distinct paths, decayed (a path whose bit is not yet set in the client's
                  64-bit path sketch counts as new; the sketch is cleared every 4 half-lives)
    novelty       mean share of a record's features never seen in training
    mean_score    mean record anomaly score

Ratios start from a small prior (one request of weight ``PRIOR``), so a client's first request
cannot look extreme on its own. Everything is per batch in numpy: records are grouped by
client and the decayed sums are cumulative sums within each group.

State is bounded: ``max_clients`` slots (about 100 bytes each with the index); when full, the
eighth least recently seen clients are evicted.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .events import AnomalyEvent

FEATURES = ("rate", "error_ratio", "new_paths", "novelty", "mean_score")
PRIOR = 1.0  # pseudo-requests every client starts with
MIN_EVENT_REQUESTS = 5  # requests a client has made (that this sidecar saw) before it can be an event
PRIOR_SCORE = 0.5  # their record score (the median of normal records)
PRIOR_SHARE = 0.05  # their error and novelty share
SKETCH_BITS = 64
# A client id longer than this is cut in the event naming it, with a hash of the whole id (so two
# ids alike in their first characters stay apart): 300 scanner clients with 200 KB ids made a
# 60 MB answer to /v1/anomalies, and the recent list of 1,000 events could hold GBs.
MAX_CLIENT_CHARS = 200
SPAN_TAUS = 16  # a batch spanning more decay times is observed in parts (see ClientTracker.observe)
DESCRIPTIONS = {"rate": "{:.0f} requests recently", "error_ratio": "errors {:.0%}",
                "new_paths": "{:.0f} distinct paths", "novelty": "never-seen features {:.0%}",
                "mean_score": "mean record score {:.2f}"}


@dataclass
class ClientBatch:
    """What a batch says about each record's client."""

    clients: list  # client ids (str; None: no client)
    times: np.ndarray  # float64 [N] Unix seconds
    errors: np.ndarray  # float64 [N] 1 for a 4xx/5xx answer
    paths: np.ndarray  # int64 [N] a hash of the path (path_hash)
    novelty: np.ndarray  # float64 [N] share of features never seen in training
    scores: np.ndarray  # float64 [N] record scores


CLIENT_FIELDS = ("status", "url")  # read besides the client's own field


def client_batch(columns: dict[str, list], key: str, times: np.ndarray, novelty: np.ndarray,
                 scores: np.ndarray) -> ClientBatch:
    """What a batch says about each record's client; ``columns``: the fields as text (``text_columns``)."""
    errors = np.fromiter(((status or "")[:1] in ("4", "5") for status in columns["status"]), dtype=np.float64,
                         count=len(times))
    paths = np.fromiter((path_hash(url) for url in columns["url"]), dtype=np.int64, count=len(times))
    return ClientBatch(columns[key], times, errors, paths, np.asarray(novelty, dtype=np.float64),
                       np.asarray(scores, dtype=np.float64))


def path_hash(url: Optional[str]) -> int:
    """The URL's path hashed the same in every process: Python's ``hash`` of a str is seeded per
    process, so the paths sharing a sketch bit, hence ``new_paths`` and the client detector trained
    on it, changed from one ``logscore train --entities`` run to the next."""
    return zlib.crc32((url or "").partition("?")[0].encode("utf-8", "surrogatepass"))


def shown_client(client: str) -> str:
    """A client id as events name it: whole up to MAX_CLIENT_CHARS, else cut there and followed by
    ``…#`` and 16 hex digits of the whole id's SHA-256."""
    if len(client) <= MAX_CLIENT_CHARS:
        return client
    digest = hashlib.sha256(client.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{client[:MAX_CLIENT_CHARS]}…#{digest}"


def segment_starts(groups: np.ndarray) -> np.ndarray:
    """Index of the first element of each run of equal values (``groups`` sorted)."""
    return np.flatnonzero(np.concatenate([[True], groups[1:] != groups[:-1]]))


class HashIndex:
    """Client hash -> slot, in numpy arrays (open addressing, linear probing): no Python object per
    client, so a million clients passing through leave no fragmented heap behind."""

    EMPTY = 0

    def __init__(self, capacity: int):
        size = 1 << max(4, (2 * capacity - 1).bit_length())  # at most half full
        self.mask = size - 1
        self.keys = np.zeros(size, dtype=np.int64)
        self.values = np.zeros(size, dtype=np.int64)
        self.count = 0

    @staticmethod
    def keyed(hashes: np.ndarray) -> np.ndarray:
        return np.where(hashes == HashIndex.EMPTY, 1, hashes)  # 0 marks an empty place

    def find(self, hashes: np.ndarray) -> np.ndarray:
        """The slot of each (distinct, keyed) hash, -1 when absent."""
        found = np.full(len(hashes), -1, dtype=np.int64)
        place = hashes & self.mask
        pending = np.arange(len(hashes))
        while len(pending):
            held = self.keys[place]
            hit = held == hashes[pending]
            found[pending[hit]] = self.values[place[hit]]
            going = ~hit & (held != self.EMPTY)
            pending, place = pending[going], (place[going] + 1) & self.mask
        return found

    def insert(self, hashes: np.ndarray, slots: np.ndarray) -> None:
        """Add distinct, absent, keyed hashes."""
        place = hashes & self.mask
        pending = np.arange(len(hashes))
        while len(pending):
            free = self.keys[place] == self.EMPTY
            # Of several hashes probing the same free place, the first takes it; the others move on.
            chosen = np.flatnonzero(free)
            _, first = np.unique(place[chosen], return_index=True)
            taking = chosen[first]
            self.keys[place[taking]] = hashes[pending[taking]]
            self.values[place[taking]] = slots[pending[taking]]
            going = np.ones(len(pending), dtype=bool)
            going[taking] = False
            pending, place = pending[going], (place[going] + (~free[going])) & self.mask
        self.count += len(hashes)

    def rebuild(self, hashes: np.ndarray) -> None:
        """Only these (distinct, keyed) hashes, at slots 0..len-1."""
        self.keys[:] = self.EMPTY
        self.count = 0
        self.insert(hashes, np.arange(len(hashes), dtype=np.int64))


class ClientTracker:
    """The state of up to ``max_clients`` clients in arrays, updated per batch."""

    SUMS = ("count", "errors", "novel", "score", "new_paths")

    def __init__(self, half_life_s: float = 60.0, max_clients: int = 65_536):
        self.tau = half_life_s / math.log(2)
        self.max_clients = max_clients
        self.index = HashIndex(max_clients)
        self.owner = np.zeros(max_clients, dtype=np.int64)  # client hash of each slot
        self.sums = {name: np.zeros(max_clients, dtype=np.float32) for name in self.SUMS}
        self.last = np.zeros(max_clients)
        self.first = np.zeros(max_clients)
        self.sketch = np.zeros(max_clients, dtype=np.uint64)
        self.sketch_since = np.zeros(max_clients)
        self.requests = np.zeros(max_clients, dtype=np.int64)
        self.flagged = np.zeros(max_clients, dtype=bool)
        self.used = 0
        self.evicted = 0

    def __len__(self) -> int:
        return self.used

    def _slots(self, hashes: np.ndarray, now: float) -> np.ndarray:
        distinct, inverse = np.unique(HashIndex.keyed(hashes), return_inverse=True)
        slots = self.index.find(distinct)
        missing = slots < 0
        if missing.any():
            self._make_room(int(missing.sum()), slots[~missing])
            slots = self.index.find(distinct)  # compacted
            new = np.flatnonzero(slots < 0)
            fresh = np.arange(self.used, self.used + len(new))
            self.used += len(new)
            self.index.insert(distinct[new], fresh)
            self.owner[fresh] = distinct[new]
            for array in self.sums.values():
                array[fresh] = 0.0
            self.last[fresh] = self.first[fresh] = self.sketch_since[fresh] = now
            self.sketch[fresh] = 0
            self.requests[fresh] = 0
            self.flagged[fresh] = False
            slots[new] = fresh
        return slots[inverse]

    def _make_room(self, needed: int, protected: np.ndarray) -> None:
        """Evict the least recently seen clients (not those of the batch at hand) until ``needed`` fit."""
        if self.used + needed <= self.max_clients:
            return
        if needed > self.max_clients:
            raise ValueError(f"{needed} clients in one batch; entity_max_clients is {self.max_clients}")
        count = min(max(needed - (self.max_clients - self.used), self.max_clients // 8), self.used)
        last = self.last[: self.used].copy()
        last[protected] = np.inf
        oldest = np.argpartition(last, count - 1)[:count]
        keep = np.setdiff1d(np.arange(self.used), oldest)
        size = len(keep)
        arrays = [self.owner, self.last, self.first, self.sketch, self.sketch_since, self.requests, self.flagged,
                  *self.sums.values()]
        for array in arrays:
            array[:size] = array[keep]
        self.index.rebuild(self.owner[:size])
        self.evicted += self.used - size
        self.used = size

    def observe(self, batch: ClientBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features [N, 5], slot [N], requests so far [N]) of each record's client after the record
        (records without a client: NaN features, slot -1)."""
        span = SPAN_TAUS * self.tau
        if len(batch.times) and batch.times.max() - batch.times.min() > span:
            # NOTE: decayed sums are cumulative sums of weight x exp(time / tau) (relative to each
            # client's first time in the batch); a batch spanning many decay times (a replayed log)
            # goes in parts, so that those factors stay below e^16 and the sums keep their precision.
            order = np.argsort(batch.times, kind="stable")
            part = np.floor((batch.times[order] - batch.times[order[0]]) / span).astype(np.int64)
            results = [self._observe_part(batch, order[part == p]) for p in np.unique(part)]
            features = np.zeros((len(batch.times), len(FEATURES)), dtype=np.float32)
            slot_of = np.zeros(len(batch.times), dtype=np.int64)
            requests = np.zeros(len(batch.times), dtype=np.int64)
            for chosen, (f, s, r) in results:
                features[chosen], slot_of[chosen], requests[chosen] = f, s, r
            return features, slot_of, requests
        return self._observe(batch)

    def _observe_part(self, batch: ClientBatch, chosen: np.ndarray):
        part = ClientBatch([batch.clients[i] for i in chosen.tolist()], batch.times[chosen], batch.errors[chosen],
                           batch.paths[chosen], batch.novelty[chosen], batch.scores[chosen])
        return chosen, self._observe(part)

    def _observe(self, batch: ClientBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(batch.clients)
        features = np.full((n, len(FEATURES)), np.nan, dtype=np.float32)
        slot_of = np.full(n, -1, dtype=np.int64)
        requests = np.zeros(n, dtype=np.int64)
        present = np.fromiter((c is not None and c != "" for c in batch.clients), dtype=bool, count=n)
        positions = np.flatnonzero(present)
        if len(positions) == 0:
            return features, slot_of, requests
        clients = batch.clients
        hashes = np.fromiter((hash(clients[i]) for i in positions.tolist()), dtype=np.int64, count=len(positions))
        times = batch.times[positions]
        slots = self._slots(hashes, float(times.min()))
        # Clients grouped in the order the batch first names them, not by slot: slots follow the
        # clients' hashes (Python's, seeded per process), and the groups' order sets the rounding of
        # the cumulative sums below (train --entities differed from run to run by it).
        _, first_seen, slot_of_row = np.unique(slots, return_index=True, return_inverse=True)
        order = np.lexsort((times, first_seen[slot_of_row]))
        slots, times, rows = slots[order], times[order], positions[order]
        starts = segment_starts(slots)
        group = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(slots))))
        first_slot = slots[starts]
        reference = times[starts][group]
        grow = np.exp((times - reference) / self.tau)
        carry = np.exp(np.minimum((self.last[first_slot][group] - reference) / self.tau, 0.0))
        new_paths = self._new_paths(slots, starts, group, batch.paths[rows], times)
        weights = {"count": np.ones(len(rows)), "errors": batch.errors[rows], "novel": batch.novelty[rows],
                   "score": batch.scores[rows], "new_paths": new_paths}
        values = {}
        for name, weight in weights.items():
            running = np.cumsum(weight * grow)
            before = np.concatenate([[0.0], running])[starts][group]
            decayed = (running - before + self.sums[name][first_slot][group].astype(np.float64) * carry) / grow
            values[name] = decayed
            ends = np.append(starts[1:], len(slots)) - 1
            self.sums[name][first_slot] = decayed[ends]
        ends = np.append(starts[1:], len(slots)) - 1
        self.last[first_slot] = times[ends]
        counts_in_batch = np.arange(len(slots)) - starts[group] + 1
        requests[rows] = self.requests[slots] + counts_in_batch
        self.requests[first_slot] += np.diff(np.append(starts, len(slots)))
        features[rows] = client_features(values)
        slot_of[rows] = slots
        return features, slot_of, requests

    def _new_paths(self, slots, starts, group, paths, times) -> np.ndarray:
        """1 where a record's path bit was not yet set in its client's sketch (then set it)."""
        first_slot = slots[starts]
        stale = times[starts] - self.sketch_since[first_slot] > 4 * self.tau * math.log(2)
        self.sketch[first_slot[stale]] = 0
        self.sketch_since[first_slot[stale]] = times[starts][stale]
        bits = (paths % SKETCH_BITS).astype(np.uint64)
        combined = slots * SKETCH_BITS + bits.astype(np.int64)
        _, first = np.unique(combined, return_index=True)
        is_first = np.zeros(len(slots), dtype=bool)
        is_first[first] = True
        mask = np.left_shift(np.uint64(1), bits)
        already = (self.sketch[slots] & mask) != 0
        np.bitwise_or.at(self.sketch, slots, mask)
        return (is_first & ~already).astype(np.float64)


def client_features(sums: dict[str, np.ndarray]) -> np.ndarray:
    """The feature matrix [N, 5] from decayed sums (with the prior request)."""
    count = sums["count"] + PRIOR
    return np.column_stack([
        sums["count"],
        (sums["errors"] + PRIOR * PRIOR_SHARE) / count,
        sums["new_paths"],
        (sums["novel"] + PRIOR * PRIOR_SHARE) / count,
        (sums["score"] + PRIOR * PRIOR_SCORE) / count,
    ]).astype(np.float32)


def describe_client(features: np.ndarray, typical: Optional[np.ndarray] = None) -> str:
    """``errors 85 % (normal clients: up to 3 %), 37 distinct paths (...), ...``

    ``typical`` is the 99th percentile of each feature over normal clients: an upper bound, not a
    typical value (shown bare, "errors 10 % (normal clients: 52 %)" read as if normal clients had
    52 % errors). A client can cross with every feature under it (the detector weighs them
    together): then the explanation says so, or it reads as no reason at all."""
    parts = []
    beyond = 0
    for j, name in enumerate(FEATURES):
        text = DESCRIPTIONS[name].format(float(features[j]))
        if typical is not None:
            bound = DESCRIPTIONS[name].format(float(typical[j])).split(" ")
            text += f" (normal clients: up to {bound[0] if name in ('rate', 'new_paths') else bound[-1]})"
            beyond += bool(features[j] > typical[j])
        parts.append(text)
    described = ", ".join(parts)
    if typical is not None and not beyond:
        described += "; each within what 99 % of normal clients show: their combination is what is rare"
    return described


@dataclass
class EntitySpec:
    """The trained client detector of one artifact (metadata ``entities`` + graph)."""

    key: str
    half_life_s: float
    threshold: float
    typical: np.ndarray  # [5] p99 of each feature over normal clients' records
    score: Callable[[np.ndarray], np.ndarray]  # features [N, 5] -> entity_score [N] (the graph)

    @classmethod
    def from_model(cls, metadata: dict, score) -> "EntitySpec":
        return cls(str(metadata["key"]), float(metadata["half_life_s"]), float(metadata["threshold"]),
                   np.asarray(metadata["typical"], dtype=np.float32), score)


class ClientWatch:
    """A model's client tracker and detector: entity scores per record, crossing events."""

    def __init__(self, spec: EntitySpec, model_name: str, key: Optional[str] = None,
                 max_clients: int = 65_536):
        self.spec = spec
        self.model_name = model_name
        self.key = key or spec.key
        self.tracker = ClientTracker(spec.half_life_s, max_clients)

    def observe(self, columns: dict[str, list], times: np.ndarray, novelty: np.ndarray,
                scores: np.ndarray) -> tuple[np.ndarray, list[AnomalyEvent]]:
        """(entity_score per record (NaN without a client), events of clients crossing the threshold);
        ``columns``: the records' fields as text (the key, status and url: Model.behaviour_fields)."""
        batch = client_batch(columns, self.key, times, novelty, scores)
        features, slots, requests = self.tracker.observe(batch)
        known = slots >= 0
        entity = np.full(len(times), np.nan, dtype=np.float32)
        if known.any():
            entity[known] = self.spec.score(features[known])
        # NOTE: no verdict on a client of a request or two: a fresh sidecar sees every client
        # anew, and one error then reads as an error ratio of 50-100 % (an event flood after
        # each restart). Its records carry their entity_score all the same.
        crossing = known & (entity >= self.spec.threshold) & (requests >= MIN_EVENT_REQUESTS)
        events = []
        if crossing.any():
            tracker = self.tracker
            for i in np.flatnonzero(crossing).tolist():
                slot = slots[i]
                if tracker.flagged[slot]:
                    continue
                tracker.flagged[slot] = True
                client = shown_client(str(batch.clients[i]))
                events.append(AnomalyEvent(
                    "client", self.model_name, f"{self.key}={client}", float(entity[i]), float(requests[i]),
                    0.0, float(self.spec.threshold), describe_client(features[i], self.spec.typical),
                    float(tracker.first[slot]), float(times[i]),
                    features={name: round(float(v), 4) for name, v in zip(FEATURES, features[i])}))
        return entity, events
