"""The batcher's queue: deadlines told when they pass, not when the queue reaches them."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from logscore.batching import Batcher
from logscore.errors import DeadlineExceeded
from logscore.model import Scored

GUARD_S = 30  # only so that a broken batcher fails the test instead of hanging it
HELD_S = 2 * GUARD_S  # the scorer's own bound: longer than any wait of the test, so that it never decides it


class HeldScorer:
    """Scores records (their values as scores) in the executor; a chunk holding ``held`` waits
    for ``release``. Keeps every chunk it was given."""

    def __init__(self, held):
        self.held = held
        self.started = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()  # the held chunk's scores were returned
        self.chunks: list[list] = []

    def __call__(self, records, explain, explain_flagged) -> Scored:
        self.chunks.append(list(records))
        if self.held in records:
            self.started.set()
            self.release.wait(HELD_S)
            self.returned.set()
        values = np.array(records, dtype=np.float32)
        flags = np.zeros(len(records), dtype=bool)
        return Scored(values, flags, values[:, None], flags, flags)


class HeldBatcher:
    """A batcher (one scoring thread, nothing scored inline) whose scorer holds the chunk with
    record 0 until released; what it abandoned, and why."""

    def __init__(self):
        self.scorer = HeldScorer(held=0)
        self.abandoned: list[tuple[int, str]] = []
        self.executor = ThreadPoolExecutor(1)
        self.batcher = Batcher(type("FakeModel", (), {"name": "fake"})(), self.executor, max_batch_records=4096,
                               max_queued_records=10_000, inline_max_records=0, score_chunk=self.scorer,
                               abandon=lambda _, records, reason: self.abandoned.append((records, reason)))

    def score(self, records, seconds_left: float | None = None) -> asyncio.Future:
        deadline = None if seconds_left is None else time.monotonic() + seconds_left
        return asyncio.ensure_future(self.batcher.score(records, 0, deadline))

    async def holding(self, records) -> asyncio.Future:
        """A call whose batch is now being scored, and held."""
        call = self.score(records)
        await asyncio.get_running_loop().run_in_executor(None, self.scorer.started.wait, GUARD_S)
        return call

    async def close(self) -> None:
        self.scorer.release.set()
        await self.batcher.close()
        self.executor.shutdown()


def test_a_queued_call_is_told_of_its_deadline_while_the_batch_before_it_is_still_being_scored():
    """The deadline was checked only when the job reached the head of the queue: a 504 for
    timeout_ms=500 came behind a busy queue at 0.75–1.1 s, and its records could still be scored."""
    held = HeldBatcher()

    async def scenario():
        first = await held.holding(list(range(0, 10)))
        late = held.score(list(range(100, 105)), seconds_left=0.05)
        await asyncio.sleep(0)  # (the call reaches the queue)
        queued_then = held.batcher.queued_records
        with pytest.raises(DeadlineExceeded, match="deadline passed while queued"):
            await asyncio.wait_for(late, GUARD_S)
        first_held = not first.done()  # told while the batch before it was still being scored
        queued_after = held.batcher.queued_records
        held.scorer.release.set()
        scored = await asyncio.wait_for(first, GUARD_S)
        await held.close()
        return first_held, queued_then, queued_after, scored

    first_held, queued_then, queued_after, scored = asyncio.run(scenario())
    assert first_held
    assert (queued_then, queued_after) == (5, 0)  # its place under max_queued_records freed at once
    assert scored.scores.tolist() == list(range(10))
    assert all(record < 100 for chunk in held.scorer.chunks for record in chunk), held.scorer.chunks  # never scored
    assert held.abandoned == [(5, "deadline")]  # counted once, as a deadline (not as a caller that cancelled)


def test_a_deadline_passing_while_its_batch_is_scored_is_told_then_and_the_rest_of_the_batch_answered():
    held = HeldBatcher()

    async def scenario():
        late = held.score(list(range(0, 10)), seconds_left=0.05)
        with pytest.raises(DeadlineExceeded, match="deadline passed while scoring"):
            await asyncio.wait_for(late, GUARD_S)
        still_held = held.scorer.started.is_set() and not held.scorer.returned.is_set()
        held.scorer.release.set()
        after = await asyncio.wait_for(held.score(list(range(20, 30))), GUARD_S)
        await held.close()
        return still_held, after

    still_held, after = asyncio.run(scenario())
    assert still_held and after.scores.tolist() == list(range(20, 30))
    assert held.abandoned == [(10, "deadline")]


class CountedRecord(float):
    """A record that counts how often it is compared with another record."""
    compared = 0

    def __eq__(self, other):
        if isinstance(other, CountedRecord):
            CountedRecord.compared += 1
        return float.__eq__(self, other)

    __hash__ = float.__hash__


def test_a_queued_call_leaving_at_its_deadline_is_found_without_comparing_records():
    """The queue found the expiring job by value: each job before it compared their records lists
    (7.8-11 ms of event-loop CPU an expiry behind 399 jobs of 500 alike records; review A)."""
    held = HeldBatcher()
    CountedRecord.compared = 0

    async def scenario():
        first = await held.holding(list(range(0, 10)))
        ahead = held.score([CountedRecord(100 + i) for i in range(5)])
        late = held.score([CountedRecord(200 + i) for i in range(5)], seconds_left=0.05)
        with pytest.raises(DeadlineExceeded, match="deadline passed while queued"):
            await asyncio.wait_for(late, GUARD_S)
        compared = CountedRecord.compared
        held.scorer.release.set()
        await asyncio.wait_for(asyncio.gather(first, ahead), GUARD_S)
        await held.close()
        return compared

    assert asyncio.run(scenario()) == 0


def test_a_call_handed_to_a_batcher_after_it_closed_is_still_scored():
    """A request routed to several models takes each model's batcher before it waits: had prune closed
    one in between (its model unloaded by a reload), its job sat in a queue no worker read, until its
    deadline, or for ever without one."""
    held = HeldBatcher()

    async def scenario():
        held.scorer.release.set()
        await asyncio.wait_for(held.score([1, 2, 3]), GUARD_S)  # the batcher's worker ran
        await held.batcher.close()  # prune: its model was unloaded
        late = await asyncio.wait_for(held.score([4, 5]), GUARD_S)
        await held.close()
        return late

    assert asyncio.run(scenario()).scores.tolist() == [4, 5]
