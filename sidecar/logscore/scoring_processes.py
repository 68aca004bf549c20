"""Scoring in worker processes: featurizing and the graph on more than one core.

One sidecar process scores on one core at a time: featurizing holds Python's GIL. With
``scoring_processes: N`` the batcher hands its chunks to N worker processes instead of its
scoring thread, N chunks at once, while the sidecar's own process decodes, batches, decides and
encodes. Each worker loads the same model files (``Model.load``) and returns what
``Model.score`` returns; the sidecar keeps its own copy of every model for the rest (small
requests scored on the event loop, routing, explanations' wording, the probe).

What stays in the sidecar's process: models that follow sessions (their state is the order of
records), a chunk whose model file changed on disk since the sidecar loaded it (the worker would
score another version) or no longer loads (broken, or being written, when a worker starts),
records msgpack cannot carry, and every chunk of a worker that runs other code than the sidecar
(logscore upgraded in place while it ran: a worker started since imports what is on disk).

A worker found dead before a chunk is sent to it is replaced first, and so is one found dead
while idle by the sidecar's readiness check (every second: small requests, scored in the
sidecar's own process, send no chunk). One that exits or hangs
while scoring costs only that chunk: its callers get ``ScorerUnavailable`` (gRPC UNAVAILABLE,
HTTP 503; shipper stages pass the records on marked unscored) and the worker is replaced.
Records that crash a worker never reach the sidecar's own process.

Messages are msgpack over a socket pair, one request and one reply at a time per worker.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Optional, Sequence

import msgpack
import numpy as np

from .artifact import DEFAULT_MAX_MODEL_BYTES
from .errors import ConfigError, LogscoreError, ScorerUnavailable
from .model import Model, Scored
from .registry import FileState

log = logging.getLogger("logscore.scoring_processes")

# A chunk is at most SCORE_CHUNK records of at most max_record_bytes each: milliseconds of work
# (a second or two with a model to load first, on a loaded machine). A worker silent this long is
# stuck (a bug, a SIGSTOP): it is killed so its chunk's callers hear of it. NOTE: a batch waits for
# all its chunks, so this is also how long one stuck worker can hold scoring up (it was 30 s).
CHUNK_TIMEOUT_S = 5.0
# NOTE: a live process is not a working one: with every worker hung (SIGSTOP), each call failed
# while /readyz said ready with `running: 2` (probe-observe). As many chunks failed in a row as there
# are workers, none answered since: none counts as running, and the sidecar is not ready. Held that
# long after the last failure only: with no traffic (a balancer that stopped sending) nothing could
# ever succeed, so readiness comes back, and the next chunks tell again.
# Counted are failures of replacements (workers started after a failure, none answered since) and
# waits for an idle worker that ran out: one worker killed mid-chunk (OOM, a record that crashes the
# featurizer) made a sidecar of --scoring-processes 1 not ready for 10 s while its replacement, not
# yet tried, sat idle (review, session 27).
NOT_ANSWERING_HOLD_S = 2 * CHUNK_TIMEOUT_S
# keep_only, having told the only idle worker(s), waits this long before looking for busy ones again.
KEEP_RETAKE_PAUSE_S = 0.005
# How long a worker may take to drop models and trim (10-30 ms measured for 10 models): shorter than a chunk's
# wait for an idle worker, so that a worker hung as it was told is replaced in time for the chunk waiting for
# it (with the chunk's timeout, the lone worker of --scoring-processes 1 failed that chunk; review, session 28).
KEEP_TIMEOUT_S = CHUNK_TIMEOUT_S / 2
ARRAYS = ("scores", "is_anomaly", "raw_scores", "truncated", "unparsed", "novelty")


def code_fingerprint() -> str:
    """A digest of the logscore code on disk (its Python sources and compiled extension), taken
    by the sidecar and by each worker when they start: the code each of them imported."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted([*package.rglob("*.py"), *package.rglob("*.so")]):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class WorkerFailed(Exception):
    """The worker process exited, hung, or sent something unreadable."""


def pack_array(array: Optional[np.ndarray]):
    if array is None:
        return None
    return [array.dtype.str, list(array.shape), np.ascontiguousarray(array).tobytes()]


def unpack_array(packed) -> Optional[np.ndarray]:
    if packed is None:
        return None
    dtype, shape, data = packed
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()  # writable, as in-process


def pack_scored(scored: Scored) -> dict:
    packed = {name: pack_array(getattr(scored, name)) for name in ARRAYS}
    packed.update(explanations=scored.explanations, fields=scored.fields, columns=scored.columns)
    return packed


def unpack_scored(packed: dict) -> Scored:
    arrays = {name: unpack_array(packed[name]) for name in ARRAYS}
    return Scored(explanations=packed["explanations"], fields=packed["fields"], columns=packed["columns"], **arrays)


def pack_request(model: Model, records: Sequence[object], explain: int, explain_flagged: int = 0) -> bytes:
    records = records if isinstance(records, (list, tuple)) else list(records)
    return msgpack.packb([str(model.artifact.path), model.version, explain, explain_flagged, records],
                         use_bin_type=True)


def pack_keep(paths: set[str]) -> bytes:
    """The message telling a worker which model files the sidecar serves: it drops the others."""
    return msgpack.packb({"keep": sorted(paths)}, use_bin_type=True)


def describe_exit(code: int) -> str:
    return f"exit code {code}" if code >= 0 else f"killed by signal {-code}"


def checked(reply: dict) -> dict:
    if "error" in reply:
        raise RuntimeError(f"scoring process: {reply['error']}")  # a bug in scoring, reported as in-process
    return reply


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Worker:
    """One worker process and the sidecar's end of its socket pair."""

    def __init__(self, arguments: list[str]):
        ours, theirs = socket.socketpair()
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "logscore.scoring_processes", "--fd", str(theirs.fileno()), *arguments],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        self.connection = Connection(ours.detach())
        # Started after a chunk failed with none answered since: its failure tells that replacing does not help.
        self.replaces_a_failure = False
        self.answers_before = 0  # chunks answered by the pool when it started
        self.death_counted = False  # found dead while idle, counted as a failure (replace_dead_idle)

    def idle_and_alive(self) -> bool:
        """Whether an idle worker can take a chunk. An idle worker never writes, so anything readable is its end
        of the socket closing: a killed process closes it before it can be reaped, so this sees a death that
        ``poll()`` would not see yet (a chunk sent then was lost)."""
        try:
            return self.process.poll() is None and not self.connection.poll(0)
        except OSError:
            return False

    def call(self, packed: bytes, timeout: Optional[float] = None) -> dict:
        """Send one packed request, wait for its reply (WorkerFailed: the worker is gone or stuck) at most
        ``timeout`` seconds (CHUNK_TIMEOUT_S when None)."""
        timeout = CHUNK_TIMEOUT_S if timeout is None else timeout
        try:
            self.connection.send_bytes(packed)
            if not self.connection.poll(timeout):
                raise WorkerFailed(f"no answer in {timeout:g} s")
            return unpack(self.connection.recv_bytes())
        except (OSError, EOFError) as error:
            raise WorkerFailed(self.exit_description(error)) from None
        except (ValueError, msgpack.UnpackException) as error:
            raise WorkerFailed(f"unreadable reply ({error})") from None

    def exit_description(self, error: Exception) -> str:
        """How it ended (waiting a moment for a dying process), or how its socket failed."""
        try:
            return describe_exit(self.process.wait(timeout=1.0))
        except subprocess.TimeoutExpired:
            return f"connection lost ({type(error).__name__})"

    def idle_failure(self) -> str:
        """Why an idle worker cannot take a chunk (idle_and_alive was False): it exited (waited for
        a moment: a killed process closes its socket before it is reaped), or, still running, it
        wrote while idle (a reply come too late for its call): said as such, not as an exit."""
        try:
            return f"exited while idle ({describe_exit(self.process.wait(timeout=1.0))})"
        except subprocess.TimeoutExpired:
            return "still running, yet it wrote while idle (a reply come after its call gave up on it)"

    def close(self, timeout: float = 5.0) -> None:
        """Ask it to exit (end of its input), kill it if it does not."""
        self.connection.close()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ScoringProcesses:
    """N worker processes; ``score`` (blocking, in ``executor``'s threads) sends a chunk to an idle one."""

    def __init__(self, count: int, max_line_chars: int, client_key: Optional[str] = None, on_restart=None,
                 max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES, on_stale=None, serves=None):
        self.count = count
        self._code = code_fingerprint()  # the code this process imported (workers check theirs against it)
        self._arguments = ["--max-line-chars", str(max_line_chars), "--max-model-bytes", str(max_model_bytes),
                           "--code", self._code] + (["--client-key", client_key] if client_key else [])
        self._other_code_said = False
        self._on_restart = on_restart or (lambda reason: None)
        self._on_stale = on_stale or (lambda model: None)
        self._serves = serves or (lambda model: True)  # whether the sidecar still serves this model
        self.stale_chunks = 0  # chunks a worker left to the sidecar: the file holds another version, or none
        # (path, version served) already logged since the last reload that changed the models (keep_only).
        # NOTE: kept for the life of the process, a file that broke again at the same version served was
        # never logged again, and the set only grew (review, session 28).
        self._stale_said: set[tuple[str, str]] = set()
        self._idle: queue.Queue[Worker] = queue.Queue()
        self._workers: list[Worker] = []
        self._lock = threading.Lock()
        self._maintenance = threading.Lock()  # replace_dead_idle against close()
        self._closed = False
        self.replaced = 0
        self._failed_in_row = 0  # chunks failed (as counted, see NOT_ANSWERING_HOLD_S) since one was last answered
        self._unanswered = 0  # chunks failed since one was last answered, counted or not
        self._answers = 0  # chunks answered
        self._last_failure = 0.0  # time.monotonic() of the last chunk failed
        self.clock = time.monotonic
        for _ in range(count):
            self._add(Worker(self._arguments))
        self.executor = ThreadPoolExecutor(max_workers=count, thread_name_prefix="scoring-process")

    def _add(self, worker: Worker) -> None:
        with self._lock:
            self._workers.append(worker)
        self._idle.put(worker)

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers]

    def status(self) -> dict:
        """For /readyz: how many are wanted, how many run (and answer), how many were replaced."""
        with self._lock:
            running = sum(w.process.poll() is None for w in self._workers)
        answering = self.answering()
        return {"wanted": self.count, "running": running if answering else 0, "replaced": self.replaced,
                "failed_in_row": self._failed_in_row, "answering": answering}

    def answering(self) -> bool:
        """False while no worker runs (none could be started again), or while the last ``count`` chunks
        or more counted as failed (see NOT_ANSWERING_HOLD_S), none answered since, the last of them
        within NOT_ANSWERING_HOLD_S."""
        with self._lock:
            if not self._workers and not self._closed:
                return False
        return (self._failed_in_row < self.count
                or self.clock() - self._last_failure > NOT_ANSWERING_HOLD_S)

    def not_answering_reason(self) -> Optional[str]:
        """Why the sidecar is not ready because of its scoring processes, or None."""
        if self.answering():
            return None
        with self._lock:
            none_running = not self._workers
        if none_running:
            return ("no scoring process is running: none could be started again (see 'cannot start a scoring "
                    "process' in the log); restart the sidecar or run it with --scoring-processes 0")
        return (f"no scoring process answers: the last {self._failed_in_row} chunks failed (hung or exited; "
                "see 'scoring process failed' in the log) and none was scored since; they are being replaced: "
                "if this lasts, restart the sidecar or run it with --scoring-processes 0")

    @staticmethod
    def takes(model: Model) -> bool:
        """Whether a worker can score this model: sessions keep their order in one place."""
        return model.sessions is None and Path(model.artifact.path).is_file()

    def warm(self, models: Sequence[Model]) -> None:
        """Load the models in every worker now (their first chunk would otherwise wait for it), or
        say why a worker cannot (ConfigError: the sidecar does not start)."""
        workers = [self._take_idle() for _ in range(self.count)]
        try:
            for worker in workers:
                for model in models:
                    if self.takes(model):
                        checked(worker.call(pack_request(model, ["probe"], 0)))
        except (WorkerFailed, RuntimeError) as error:
            raise ConfigError(f"a scoring process cannot score the models ({error}); see the log above, "
                              "or run with --scoring-processes 0") from None
        finally:
            for worker in workers:
                self._idle.put(worker)

    def score(self, model: Model, records: Sequence[object], explain: int, explain_flagged: int = 0) -> Scored:
        try:
            packed = pack_request(model, records, explain, explain_flagged)
        except (TypeError, ValueError, OverflowError):  # a value msgpack cannot carry: score it here
            return model.score(records, explain, explain_flagged)
        worker = self._take_idle()
        while not worker.idle_and_alive():  # it died while idle (say, the OOM killer): no chunk lost
            self._replace(worker, worker.idle_failure())
            worker = self._take_idle()
        try:
            reply = worker.call(packed)
        except WorkerFailed as error:
            with self._lock:  # (count threads update the counts at once)
                self._unanswered += 1
                counted = worker.replaces_a_failure and worker.answers_before == self._answers
            if counted:
                self._count_failure()
            self._replace(worker, str(error))
            raise ScorerUnavailable(f"a scoring process failed while scoring {len(records)} records ({error}); "
                                    "they are unscored and the process is being restarted: retry") from None
        self._idle.put(worker)
        with self._lock:
            self._failed_in_row = self._unanswered = 0
            self._answers += 1
        if "stale" in checked(reply):  # the file changed since the sidecar loaded it: score the version it serves
            # NOTE: a model no longer served is a hot swap's old version, its batcher draining: no fault to
            # count or warn of (it said "fix or restore it" at every normal swap under load; review, session 28)
            if self._serves(model):
                self._stale(model)
            return model.score(records, explain, explain_flagged)
        if "other_code" in reply:
            self._say_other_code(reply["other_code"])
            return model.score(records, explain, explain_flagged)
        return unpack_scored(reply["scored"])

    def keep_only(self, paths: set[str]) -> list[list[str]]:
        """Have every worker drop the models of files not in ``paths`` (the sidecar's, after a reload) and
        give their memory back; returns the paths each worker visited holds then. NOTE: removed models were
        dropped only when a worker next missed its cache, and glibc kept what they freed: 30 models added,
        scored and removed left each worker at 212 MiB instead of 87 (probe-registry).

        Workers are visited one at a time as they come idle, each put back at once: holding every worker
        until the last came idle stopped scoring while one was busy or hung (review, session 28). One that
        fails the call (or takes more than KEEP_TIMEOUT_S) is replaced; one that does not come idle within
        CHUNK_TIMEOUT_S is left as it is (its own chunk tells if it hangs): no chunk failed, so readiness
        counts nothing."""
        with self._lock:  # (the reload also logged why a file was rejected: its stale chunks are said again)
            self._stale_said = set()
            if self._closed:  # a prune during shutdown: the workers' connections are closed, nothing to tell
                return []
        held: list[list[str]] = []
        visited: set[Worker] = set()  # the workers told (by identity: a replacement is another)
        deadline = time.monotonic() + CHUNK_TIMEOUT_S
        while self._unvisited(visited) and time.monotonic() < deadline:
            try:
                worker = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if worker in visited:  # told already; the others are busy: give it back, let them finish
                self._idle.put(worker)
                time.sleep(KEEP_RETAKE_PAUSE_S)
                continue
            visited.add(worker)
            self._tell_keep(worker, paths, held)
        return held

    def _unvisited(self, visited: set[Worker]) -> bool:
        with self._lock:
            return not self._closed and any(w not in visited for w in self._workers)

    def _tell_keep(self, worker: Worker, paths: set[str], held: list[list[str]]) -> None:
        """Send one idle worker the keep message and put it back; replace it if the call fails."""
        if not worker.idle_and_alive():  # dead, or a late reply waits in its socket: it would answer for this call
            self._replace(worker, worker.idle_failure())
            return
        try:
            reply = worker.call(pack_keep(paths), KEEP_TIMEOUT_S)
        except WorkerFailed as error:
            self._replace(worker, f"while dropping removed models: {error}")
            return
        self._idle.put(worker)
        if "error" in reply:
            log.warning("a scoring process did not drop removed models; it keeps them until it next misses "
                        "its cache", extra={"pid": worker.process.pid, "reason": reply["error"]})
        else:
            held.append(reply.get("held", []))

    def _stale(self, model: Model) -> None:
        """Count a chunk left to the sidecar's process because its model file holds another version (or
        none that loads); say so once per file and version served, and again after a reload. NOTE: nothing
        told it before: a file the sidecar rejected at its probe left every chunk to one core, unseen
        (probe-registry)."""
        with self._lock:
            self.stale_chunks += 1
            key = (str(model.artifact.path), model.version)
            first = key not in self._stale_said
            self._stale_said.add(key)
        self._on_stale(model)
        if first:
            log.warning("a model file holds another version than the one served (or none that loads): its chunks "
                        "are scored in the sidecar's own process, on one core, until the file loads or the version "
                        "served is back; see 'rejected' in the log for that file, and fix or restore it",
                        extra={"model": model.name, "path": key[0], "version": model.version})

    def _say_other_code(self, theirs: str) -> None:
        if not self._other_code_said:
            self._other_code_said = True
            log.error("the logscore code on disk changed since the sidecar started (upgraded in place?): its "
                      "scoring processes would run other code, so the sidecar scores in its own process; restart "
                      "the sidecar to use them again", extra={"sidecar_code": self._code, "worker_code": theirs})

    def replace_dead_idle(self) -> None:
        """Replace the idle workers that died (killed, the OOM killer) now, unless a worker died before
        it ever answered, started after a failure: that one waits for the next chunk, as before.

        NOTE: a death was seen only when the next chunk was due: while requests are small enough to be
        scored in the sidecar's own process (Batcher.inline_max_records: single events from Logstash),
        no chunk came, and /readyz said `running: 0` for as long (25 s in a probe, until a batch). A
        worker that cannot start (a broken install) was restarted every second here (review): its
        death is counted once as a failure (/readyz then says why) and it is left to the next chunk."""
        with self._maintenance:  # close() waits: nothing is started, or taken for dead, while it closes
            if self._closed:
                return
            idle = []
            while True:
                try:
                    idle.append(self._idle.get_nowait())
                except queue.Empty:
                    break
            dead = [worker for worker in idle if not worker.idle_and_alive()]
            for worker in idle:
                if worker not in dead:
                    self._idle.put(worker)
            for worker in dead:
                with self._lock:
                    never_answered = worker.replaces_a_failure and worker.answers_before == self._answers
                if never_answered:
                    if not worker.death_counted:
                        worker.death_counted = True
                        self._count_failure()
                    self._idle.put(worker)
                else:
                    self._replace(worker, worker.idle_failure(), after_failure=True)

    def _take_idle(self) -> Worker:
        try:
            return self._idle.get(timeout=CHUNK_TIMEOUT_S)
        except queue.Empty:  # every worker failed and none could be started again
            self._count_failure()
            raise ScorerUnavailable("no scoring process is running (see the sidecar's log); restart the sidecar "
                                    "or run it with --scoring-processes 0") from None

    def _count_failure(self) -> None:
        with self._lock:
            self._failed_in_row += 1
            self._last_failure = self.clock()

    def _replace(self, worker: Worker, reason: str, after_failure: bool = False) -> None:
        """A new worker for ``worker``, which is killed. ``after_failure``: the replacement starts after a
        failure even with no chunk failed (a death while idle)."""
        log.error("scoring process failed; starting another", extra={"pid": worker.process.pid, "reason": reason})
        worker.process.kill()
        worker.close(timeout=1.0)
        with self._lock:
            self._workers.remove(worker)
            if self._closed:
                return
        self.replaced += 1
        self._on_restart(reason)
        try:
            replacement = Worker(self._arguments)
            with self._lock:
                replacement.replaces_a_failure = after_failure or self._unanswered > 0
                replacement.answers_before = self._answers
            self._add(replacement)
        except OSError as error:
            log.error("cannot start a scoring process", extra={"error": str(error)})

    def close(self) -> None:
        with self._maintenance, self._lock:
            self._closed = True
            workers = list(self._workers)
        self.executor.shutdown(wait=True)
        for worker in workers:
            worker.close()


# --- the worker process -------------------------------------------------------------------------

class ModelCache:
    """The worker's models, by path; a path is reloaded when the sidecar asks for another version."""

    def __init__(self, max_line_chars: int, client_key: Optional[str], max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES):
        self.max_line_chars = max_line_chars
        self.client_key = client_key
        # NOTE: the sidecar's bound too: a worker (re)started while an oversized file sat at a served
        # model's path read it whole, under the same memory limit, at every restart.
        self.max_model_bytes = max_model_bytes
        self.models: dict[str, Model] = {}
        # path -> the state of the file when it was last read (loaded or not): a file read in that state
        # is not read again. Its inode and ctime tell a same-size, same-mtime swap (size and mtime alone
        # left such a fix unread: "stale" for good). NOTE: only files that failed to load were remembered:
        # a loadable file of another version than the one served (one the sidecar rejected at its probe)
        # was read again for every chunk: -76 % calls/s until the file was fixed (probe-registry).
        self.read_in: dict[str, FileState] = {}
        self.loads = 0  # files read (Model.load calls)

    def get(self, path: str, version: str) -> Optional[Model]:
        """The model of that file at that version, or None when the file now holds another, or
        one that does not load (being written, or broken: the sidecar serves the version it had)."""
        model = self.models.get(path)
        if model is None or model.version != version:
            self.forget_removed()
            model = self._load(path)
            if model is None:
                return None
            self.models[path] = model
        return model if model.version == version else None

    def forget_removed(self) -> None:
        """Drop the models whose files are gone (the sidecar unloads them too)."""
        for gone in [p for p in self.models if not Path(p).is_file()]:
            del self.models[gone]
            self.read_in.pop(gone, None)

    def keep_only(self, paths: Sequence[str]) -> list[str]:
        """Drop the models of files not in ``paths`` and hand the freed memory back to the system;
        returns the paths held."""
        wanted = set(paths)
        for path in [p for p in self.models if p not in wanted]:
            del self.models[path]
        # (files that did not load are forgotten too: a reload, SIGHUP's among them, has them read again)
        self.read_in = {p: state for p, state in self.read_in.items() if p in self.models}
        gc.collect()  # (a model's objects may hold cycles: freed now, before the trim)
        give_memory_back()
        return sorted(self.models)

    def _load(self, path: str) -> Optional[Model]:
        """The model the file holds now; the one held already while the file is as when last read
        (None if it did not load then)."""
        try:
            state = FileState.of(os.stat(path))
        except OSError:
            return None
        if self.read_in.get(path) == state:
            return self.models.get(path)  # read in this state already: not read again for every chunk
        self.loads += 1
        try:
            model = Model.load(path, max_line_chars=self.max_line_chars, client_key=self.client_key,
                               max_bytes=self.max_model_bytes)
        except LogscoreError:  # the sidecar says what is wrong with it, where it rejects it
            self.read_in[path] = state
            self.models.pop(path, None)  # (an older version held: the file no longer holds it)
            return None
        # NOTE: recorded only now: a read that failed otherwise (a MemoryError under the worker's memory
        # limit) was recorded too, and every later chunk of that file went to the sidecar's own process
        # until the file changed (review, session 28). Such a failure is the chunk's error; the next reads again.
        self.read_in[path] = state
        return model


def give_memory_back() -> None:
    """glibc keeps the memory freed by dropped models for the process (265 MiB after dropping 50 models;
    malloc_trim: 84): trim it. Skipped where the C library has no malloc_trim (musl, macOS)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def answer(cache: ModelCache, message, other_code: Optional[str] = None) -> dict:
    """The reply to one request; ``other_code``: this worker's code fingerprint when it is not the
    sidecar's (then it scores nothing)."""
    try:
        # (inside the try: an error here ended the worker with a traceback, and after an in-place rollback
        # to older code, every reload killed the replacements; review, session 28)
        if isinstance(message, dict):  # pack_keep
            return {"held": cache.keep_only(message["keep"])}
        if other_code is not None:
            return {"other_code": other_code}
        path, version, explain, explain_flagged, records = message
        model = cache.get(path, version)
        if model is None:
            return {"stale": True}
        return {"scored": pack_scored(model.score(records, explain, explain_flagged))}
    except Exception as error:  # reported to the sidecar, which logs it as a scoring failure
        return {"error": f"{type(error).__name__}: {error}"}


def serve_worker(connection: Connection, cache: ModelCache, other_code: Optional[str] = None) -> None:
    while True:
        try:
            message = unpack(connection.recv_bytes())
            connection.send_bytes(msgpack.packb(answer(cache, message, other_code), use_bin_type=True))
        except (EOFError, OSError):  # the sidecar closed its end (shutdown) or is gone
            return


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="a logscore scoring process (started by `logscore serve`)")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--max-line-chars", type=int, required=True)
    parser.add_argument("--client-key", default=None)
    parser.add_argument("--max-model-bytes", type=int, default=DEFAULT_MAX_MODEL_BYTES)
    parser.add_argument("--code", default=None, help="the sidecar's code_fingerprint()")
    args = parser.parse_args(argv)
    mine = code_fingerprint()
    # Ctrl-C (the process group) or a service manager's SIGTERM to every process reaches the sidecar
    # too: it drains its calls, then closes our connection, which ends us.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    os.set_blocking(args.fd, True)
    serve_worker(Connection(args.fd), ModelCache(args.max_line_chars, args.client_key, args.max_model_bytes),
                 mine if args.code not in (None, mine) else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
