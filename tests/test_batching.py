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


class HeldScorer:
    """Scores records (their values as scores) in the executor; a chunk holding ``held`` waits
    for ``release``. Keeps every chunk it was given."""

    def __init__(self, held):
        self.held = held
        self.started = threading.Event()
        self.release = threading.Event()
        self.chunks: list[list] = []

    def __call__(self, records, explain, explain_flagged) -> Scored:
        self.chunks.append(list(records))
        if self.held in records:
            self.started.set()
            self.release.wait(GUARD_S)
        values = np.array(records, dtype=np.float32)
        flags = np.zeros(len(records), dtype=bool)
        return Scored(values, flags, values[:, None], flags, flags)


def test_a_queued_call_is_told_of_its_deadline_while_the_batch_before_it_is_still_being_scored():
    """The deadline was checked only when the job reached the head of the queue: a 504 for
    timeout_ms=500 came behind a busy queue at 0.75–1.1 s, and its records could still be scored."""
    model = type("FakeModel", (), {"name": "fake"})()
    scorer = HeldScorer(held=0)
    abandoned = []

    async def scenario():
        executor = ThreadPoolExecutor(1)
        batcher = Batcher(model, executor, max_batch_records=4096, max_queued_records=10_000, inline_max_records=0,
                          score_chunk=scorer, abandon=lambda _, records, reason: abandoned.append((records, reason)))
        first = asyncio.ensure_future(batcher.score(list(range(0, 10)), 0, None))
        await asyncio.get_running_loop().run_in_executor(None, scorer.started.wait, GUARD_S)
        late = asyncio.ensure_future(batcher.score(list(range(100, 105)), 0, time.monotonic() + 0.05))
        await asyncio.sleep(0)  # (the call reaches the queue)
        queued_then = batcher.queued_records
        with pytest.raises(DeadlineExceeded, match="deadline passed while queued"):
            await asyncio.wait_for(late, GUARD_S)
        order = ["deadline told", "first batch still held" if not scorer.release.is_set() else "first batch done"]
        queued_after = batcher.queued_records
        scorer.release.set()
        scored = await asyncio.wait_for(first, GUARD_S)
        await batcher.close()
        executor.shutdown()
        return order, queued_then, queued_after, scored

    order, queued_then, queued_after, scored = asyncio.run(scenario())
    assert order == ["deadline told", "first batch still held"]
    assert (queued_then, queued_after) == (5, 0)  # its place under max_queued_records freed at once
    assert scored.scores.tolist() == list(range(10))
    assert all(record < 100 for chunk in scorer.chunks for record in chunk), scorer.chunks  # never scored
    assert abandoned == [(5, "deadline")]  # counted once, as a deadline (not as a caller that cancelled)


def test_a_deadline_passing_while_its_batch_is_scored_is_told_then_and_the_rest_of_the_batch_answered():
    model = type("FakeModel", (), {"name": "fake"})()
    scorer = HeldScorer(held=0)
    abandoned = []

    async def scenario():
        executor = ThreadPoolExecutor(1)
        batcher = Batcher(model, executor, max_batch_records=4096, max_queued_records=10_000, inline_max_records=0,
                          score_chunk=scorer, abandon=lambda _, records, reason: abandoned.append((records, reason)))
        late = asyncio.ensure_future(batcher.score(list(range(0, 10)), 0, time.monotonic() + 0.05))
        with pytest.raises(DeadlineExceeded, match="deadline passed while scoring"):
            await asyncio.wait_for(late, GUARD_S)
        held = not scorer.release.is_set()
        scorer.release.set()
        after = await asyncio.wait_for(batcher.score(list(range(20, 30)), 0, None), GUARD_S)
        await batcher.close()
        executor.shutdown()
        return held, after

    held, after = asyncio.run(scenario())
    assert held and after.scores.tolist() == list(range(20, 30))
    assert abandoned == [(10, "deadline")]


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
    model = type("FakeModel", (), {"name": "fake"})()
    scorer = HeldScorer(held=0)
    CountedRecord.compared = 0

    async def scenario():
        executor = ThreadPoolExecutor(1)
        batcher = Batcher(model, executor, max_batch_records=4096, max_queued_records=10_000, inline_max_records=0,
                          score_chunk=scorer)
        first = asyncio.ensure_future(batcher.score(list(range(0, 10)), 0, None))
        await asyncio.get_running_loop().run_in_executor(None, scorer.started.wait, GUARD_S)
        ahead = asyncio.ensure_future(batcher.score([CountedRecord(100 + i) for i in range(5)], 0, None))
        late = asyncio.ensure_future(batcher.score([CountedRecord(200 + i) for i in range(5)], 0,
                                                   time.monotonic() + 0.05))
        with pytest.raises(DeadlineExceeded, match="deadline passed while queued"):
            await asyncio.wait_for(late, GUARD_S)
        compared = CountedRecord.compared
        scorer.release.set()
        await asyncio.wait_for(asyncio.gather(first, ahead), GUARD_S)
        await batcher.close()
        executor.shutdown()
        return compared

    assert asyncio.run(scenario()) == 0
