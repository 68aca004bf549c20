"""Adaptive batching: concurrent requests for one model share one model call.

While a batch is being scored, new requests queue up; when it finishes, the
worker takes everything queued (up to ``max_batch_records``) as the next batch.
So an idle sidecar answers a lone record at once, and a busy one scores large
batches (one ONNX call per batch instead of per request), with no fixed delay.
Scoring runs in a thread pool: the event loop keeps serving I/O meanwhile. With
``parallel`` > 1 (scoring processes), that many chunks of a batch are scored at once.

NOTE: one exception. A request of at most ``inline_max_records`` records that
finds the model idle is scored on the event loop itself: that takes ~0.1 ms,
less than handing it to a thread and back (measured in docs/performance.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import DeadlineExceeded, LogscoreError, Overloaded
from .model import SCORE_CHUNK, Model, Scored

log = logging.getLogger("logscore.batching")


@dataclass(eq=False)  # a job is itself alone: compared by value, _expire's remove compared records lists
class Job:
    records: Sequence[object]
    explain: int
    deadline: Optional[float]  # time.monotonic()
    future: asyncio.Future
    explain_flagged: int = 0  # features named for the flagged records only (Model.score)
    queued: bool = True  # in the queue (not yet taken into a batch, nor expired there)

    @property
    def named(self) -> int:
        """Features named per record explained."""
        return max(self.explain, self.explain_flagged)


class Batcher:
    def __init__(self, model: Model, executor: Executor, max_batch_records: int,
                 max_queued_records: int, max_wait_s: float = 0.0, observe=None, inline_max_records: int = 8,
                 abandon=None, score_chunk=None, parallel: int = 1):
        """``score_chunk(records, explain, explain_flagged)``: how a chunk is scored in ``executor``
        (default: model.score); ``parallel``: chunks scored at once."""
        self.model = model
        self.executor = executor
        self.score_chunk = score_chunk or model.score
        self.parallel = parallel
        self.max_batch_records = max_batch_records
        self.max_queued_records = max_queued_records
        self.max_wait_s = max_wait_s
        self.observe = observe or (lambda model, records, seconds: None)
        self.abandon = abandon or (lambda model, records, reason: None)  # work dropped: its caller is gone
        self._queue: deque[Job] = deque()
        self._queued_records = 0
        self._wakeup = asyncio.Event()
        self._worker: Optional[asyncio.Task] = None
        self._closing = False
        self._busy = False  # a batch is being scored
        self.inline_max_records = inline_max_records

    @property
    def queued_records(self) -> int:
        return self._queued_records

    async def score(self, records: Sequence[object], explain: int, deadline: Optional[float],
                    explain_flagged: int = 0) -> Scored:
        if not self._busy and not self._queue and len(records) <= self.inline_max_records:
            started = time.perf_counter()
            result = self.model.score(records, explain, explain_flagged)
            self.observe(self.model, len(records), time.perf_counter() - started)
            return result
        if self._queued_records + len(records) > self.max_queued_records and self._queue:
            raise Overloaded(f"model {self.model.name!r} has {self._queued_records} records queued "
                             f"(limit {self.max_queued_records}); retry later or raise max_queued_records")
        loop = asyncio.get_running_loop()
        job = Job(records, explain, deadline, loop.create_future(), explain_flagged)
        self._queue.append(job)
        self._queued_records += len(records)
        # NOTE: also when its worker ended (closed by prune): a call that took this batcher before prune
        # closed it, resumed after, would wait for ever (or its deadline). asyncio's order of ready tasks
        # prevents that in ScoringService.score today (probe-registry found no such case); this does not
        # rely on it. A closed batcher's new worker scores what is queued, then ends.
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(), name=f"batcher:{self.model.name}")
        self._wakeup.set()
        # NOTE: checked only when the job reached the head of the queue or a chunk, the deadline was
        # told late: 504s for timeout_ms=500 came at 0.75 s (p50) to 1.1 s behind a busy queue.
        timer = None if deadline is None else loop.call_later(max(0.0, deadline - time.monotonic()), self._expire, job)
        try:
            return await job.future
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, job: Job) -> None:
        """A job's deadline passed: its caller is told now, and a queued job leaves the queue (its
        records are never scored, and free their place under max_queued_records)."""
        if job.future.done():
            return
        when = "while queued" if job.queued else "while scoring"
        if job.queued:
            # (a scan of the queue: up to max_queued_records records' jobs, but each compared by identity)
            self._queue.remove(job)
            self._queued_records -= len(job.records)
            job.queued = False
        self._fail_late(job, when)

    async def close(self) -> None:
        """Finish what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                if self.max_wait_s > 0 and self._queued_records < self.max_batch_records:
                    await asyncio.sleep(self.max_wait_s)
                jobs = self._take()
                if jobs:
                    await self._score(loop, jobs)
            if self._closing:
                return

    def _take(self) -> list[Job]:
        """Queued jobs up to max_batch_records (always at least one); expired ones fail now."""
        jobs: list[Job] = []
        taken = 0
        now = time.monotonic()
        while self._queue and (not jobs or taken + len(self._queue[0].records) <= self.max_batch_records):
            job = self._queue.popleft()
            self._queued_records -= len(job.records)
            job.queued = False
            if job.future.done():  # the caller went away (cancelled; an expired job left the queue)
                self.abandon(self.model, len(job.records), "cancelled")
                continue
            if job.deadline is not None and now >= job.deadline:
                self._fail_late(job, "while queued")
                continue
            jobs.append(job)
            taken += len(job.records)
        return jobs

    async def _score(self, loop, jobs: list[Job]) -> None:
        """Score the jobs' records in chunks; a chunk whose callers have all gone is skipped.

        NOTE: chunks are handed to the scoring thread one by one (``parallel`` at a time) so
        that work for a caller that cancelled or whose deadline passed stops within one chunk
        (~5 ms), instead of finishing a batch nobody waits for.
        """
        records = [r for job in jobs for r in job.records] if len(jobs) > 1 else list(jobs[0].records)
        # NOTE: a batch names what its most demanding job asks: jobs sharing it may be explained more.
        explain = max(job.explain for job in jobs)
        explain_flagged = max(job.explain_flagged for job in jobs)
        spans = self._spans(jobs)
        slots = asyncio.Semaphore(self.parallel)

        async def score(start: int) -> Optional[tuple[int, Scored]]:
            async with slots:
                stop = min(start + SCORE_CHUNK, len(records))
                if not self._anyone_waiting(jobs, spans, start, stop):
                    return None
                started = time.perf_counter()
                result = await loop.run_in_executor(self.executor, self.score_chunk, records[start:stop], explain,
                                                    explain_flagged)
                self.observe(self.model, stop - start, time.perf_counter() - started)
                return start, result

        self._busy = True
        try:
            scored = await asyncio.gather(*(score(start) for start in range(0, len(records), SCORE_CHUNK)),
                                          return_exceptions=True)  # every chunk finishes before the next batch
            failures = [part for part in scored if isinstance(part, BaseException)]
            if failures:
                raise failures[0]
        except LogscoreError as error:  # scoring is unavailable (a scoring process failed): callers hear why
            log.error("scoring failed", extra={"model": self.model.name, "records": len(records), "error": str(error)})
            self._fail(jobs, error)
            return
        except Exception as error:  # a bug in scoring: every waiting caller hears of it
            log.exception("scoring failed", extra={"model": self.model.name, "records": len(records)})
            self._fail(jobs, error)
            return
        finally:
            self._busy = False
        parts = [part for part in scored if part is not None]
        for job, (first, last) in zip(jobs, spans):
            if job.future.cancelled():  # the caller went away while its records were being scored
                self.abandon(self.model, len(job.records), "cancelled")
            elif not job.future.done():
                pieces = [result.slice(max(first, start) - start, min(last, start + len(result.scores)) - start,
                                       job.named, max(explain, explain_flagged))
                          for start, result in parts if start < last and start + len(result.scores) > first]
                job.future.set_result(Scored.concatenate(pieces, job.named > 0))

    @staticmethod
    def _fail(jobs: list[Job], error: Exception) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    @staticmethod
    def _spans(jobs: list[Job]) -> list[tuple[int, int]]:
        """Where each job's records lie in the batch: [first, last)."""
        spans, start = [], 0
        for job in jobs:
            spans.append((start, start + len(job.records)))
            start += len(job.records)
        return spans

    def _anyone_waiting(self, jobs: list[Job], spans, start: int, stop: int) -> bool:
        """Whether a caller still waits for records start..stop; callers past their deadline are told now."""
        now = time.monotonic()
        waiting = False
        for job, (first, last) in zip(jobs, spans):
            if last <= start or first >= stop or job.future.done():
                continue
            if job.deadline is not None and now >= job.deadline:
                self._fail_late(job, "while scoring")
                continue
            waiting = True
        return waiting

    def _fail_late(self, job: Job, when: str) -> None:
        job.future.set_exception(DeadlineExceeded(f"deadline passed {when}; raise the caller's timeout "
                                                  "or add capacity"))
        self.abandon(self.model, len(job.records), "deadline")
