"""Scoring in worker processes (setting scoring_processes): the same answers as scoring in the
sidecar's own process, and a worker that dies costs only its chunk."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import platform
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from logscore.batching import Batcher
from logscore.errors import ScorerUnavailable
from logscore.generated.logscore.v1 import scorer_pb2 as pb
from logscore.model import SCORE_CHUNK, Model, Scored
from logscore.scoring_processes import ScoringProcesses, pack_request

from benchmarks.common import child_pids, cpu_seconds

from .generate import attack_lines, shop_lines, timed_shop_lines
from .sidecar_process import ROOT, SidecarProcess
from .worst_inputs import flood, worst_payloads

DEFAULT_MODEL = ROOT / "models" / "apache-access.onnx"


def assert_same(got: Scored, expected: Scored) -> None:
    for name in ("scores", "is_anomaly", "raw_scores", "truncated", "unparsed", "novelty"):
        a, b = getattr(got, name), getattr(expected, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert (got.explanations, got.columns, got.fields) == (expected.explanations, expected.columns, expected.fields)


def wait_dead(pid: int, timeout: float = 10.0) -> None:
    """Until the killed process is a zombie of one thread (or reaped): its parent's next poll() sees
    it gone (its other threads, onnxruntime's, exit after the main one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            if "State:\tZ" in status and "Threads:\t1\n" in status:
                return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not die")


def hostile_records() -> list:
    """Odd but legal records: what the surfaces hand the scoring path."""
    return ["", "\ufffd\x00 broken \udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
            "x" * 70_000, {"message": "GET /a?b=1"}, {"message": b"raw bytes", "n": 3, "nested": {"k": [1, 2.5]}},
            {}, {"request": None}, "GET /" + "%41" * 5000 + " HTTP/1.1"]


@pytest.fixture(scope="module")
def processes():
    pool = ScoringProcesses(2, max_line_chars=65_536)
    yield pool
    pool.close()


def test_a_worker_returns_what_the_model_returns(processes, shop_model_path, behaviour_model):
    normal = shop_lines(300, seed=50)
    records = normal + [line for _, line in attack_lines(normal, 100, seed=51)] + hostile_records()
    for path in (DEFAULT_MODEL, shop_model_path, behaviour_model):  # the last: windows' columns, clients' novelty
        model = Model.load(path)
        for explain in (0, 3):
            assert_same(processes.score(model, records, explain), model.score(records, explain))
    timed = timed_shop_lines(20, 5.0, seed=9)
    model = Model.load(behaviour_model)
    assert model.score(timed).columns["remote_addr"][0]  # the columns come back filled
    assert_same(processes.score(model, timed, 2), model.score(timed, 2))


def test_records_msgpack_cannot_carry_are_scored_in_the_sidecar(processes, shop_model_path):
    model = Model.load(shop_model_path)
    # JSON allows both: numbers of any size, and "\udcff" escapes (a lone surrogate, no UTF-8 for it)
    records = [{"message": "GET / HTTP/1.1", "count": 10 ** 30}, "GET /x HTTP/1.1", "GET /\udcff HTTP/1.1"]
    assert_same(processes.score(model, records, 1), model.score(records, 1))


def test_a_changed_model_file_is_scored_with_the_version_the_sidecar_serves(processes, shop_model_path, tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(shop_model_path, path)
    serving = Model.load(path)
    lines = shop_lines(50, seed=52)
    assert_same(processes.score(serving, lines, 1), serving.score(lines, 1))
    shutil.copy(DEFAULT_MODEL, path)  # replaced on disk; the sidecar has not reloaded yet
    assert Model.load(path).version != serving.version
    assert_same(processes.score(serving, lines, 1), serving.score(lines, 1))


@pytest.mark.parametrize("fault", ["broken", "another version"])
def test_a_new_worker_facing_a_changed_model_file_leaves_the_chunks_to_the_sidecar_counted_and_said_once(
        shop_model_path, tmp_path, caplog, fault):
    """The file broke (or was being written) after the sidecar loaded it, and a worker started
    since: it failed every chunk it got (76,386 of 200,000 records unscored in a probe), instead of
    leaving them to the version the sidecar serves. Nothing told those chunks went to one core."""
    path = tmp_path / "m.onnx"
    shutil.copy(shop_model_path, path)
    serving = Model.load(path)
    if fault == "broken":
        path.write_bytes(os.urandom(4096))  # the sidecar rejects it and keeps serving what it had
    else:
        shutil.copy(DEFAULT_MODEL, path)  # not reloaded yet, or rejected at the probe
    seen = []
    pool = ScoringProcesses(1, max_line_chars=65_536, on_stale=seen.append)  # a worker started after that
    try:
        lines = shop_lines(20, seed=54)
        for _ in range(3):
            assert_same(pool.score(serving, lines, 1), serving.score(lines, 1))
    finally:
        pool.close()
    assert pool.stale_chunks == 3 and seen == [serving] * 3
    assert sum("holds another version" in r.getMessage() for r in caplog.records) == 1


def test_a_worker_reads_no_model_file_over_max_model_bytes(shop_model_path, tmp_path):
    """A worker (re)started while an oversized file sat at a served model's path read it whole (the
    sidecar refuses such a file before reading it): a 1.5 GB file, under the same memory limit."""
    from logscore.scoring_processes import ModelCache

    path = tmp_path / "m.onnx"
    shutil.copy(shop_model_path, path)
    version = Model.load(path).version
    size = path.stat().st_size
    assert ModelCache(65_536, None, max_model_bytes=size - 1).get(str(path), version) is None
    assert ModelCache(65_536, None, max_model_bytes=size).get(str(path), version).version == version


def test_a_worker_reads_a_file_swapped_at_the_same_size_and_mtime_after_one_that_did_not_load(shop_model_path,
                                                                                              tmp_path):
    """The file a worker could not load was told by its size and mtime: a fix of the same size and
    mtime (a symlink or rename swap; reproducible builds set mtimes) was never read, and the worker
    answered "stale" for good (its chunks scored in the sidecar's process, unlogged)."""
    from logscore.scoring_processes import ModelCache

    path = tmp_path / "m.onnx"
    good = tmp_path / "good.onnx"
    shutil.copy(shop_model_path, good)
    version = Model.load(good).version
    path.write_bytes(os.urandom(good.stat().st_size))  # broken, of the same size
    stamp = good.stat().st_mtime_ns
    os.utime(path, ns=(stamp, stamp))
    cache = ModelCache(65_536, None)
    assert cache.get(str(path), version) is None
    os.replace(good, path)  # the fix: same size, same mtime, another inode
    assert cache.get(str(path), version).version == version


def test_a_worker_reads_a_file_of_another_version_once_per_state_of_the_file(shop_model_path, tmp_path):
    """A loadable file of another version than the one served (one the sidecar rejected at its probe)
    was read again for every chunk: -76 % calls/s until the file was fixed (probe-registry)."""
    from logscore.scoring_processes import ModelCache

    path = tmp_path / "m.onnx"
    shutil.copy(shop_model_path, path)
    served = Model.load(path).version
    shutil.copy(DEFAULT_MODEL, tmp_path / ".new")
    os.replace(tmp_path / ".new", path)  # another version, which the sidecar does not serve
    cache = ModelCache(65_536, None)
    assert [cache.get(str(path), served) for _ in range(4)] == [None] * 4
    assert cache.loads == 1
    shutil.copy(shop_model_path, tmp_path / ".new")
    os.replace(tmp_path / ".new", path)  # the served version is back: read again, and scored
    assert cache.get(str(path), served).version == served
    assert cache.loads == 2


def test_a_worker_reads_a_model_file_again_after_a_read_that_failed_unexpectedly(shop_model_path, tmp_path,
                                                                               monkeypatch):
    """A read that failed with an error that is no LogscoreError (MemoryError under the worker's memory
    limit) was recorded as done: every later chunk of that file went to the sidecar's own process
    ("stale") until the file changed (review, session 28)."""
    from logscore import scoring_processes

    path = tmp_path / "m.onnx"
    shutil.copy(shop_model_path, path)
    version = Model.load(path).version
    real_load, reads = Model.load, []

    def fails_once(*args, **kwargs):
        reads.append(args[0])
        if len(reads) == 1:
            raise MemoryError("cannot allocate")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(scoring_processes.Model, "load", fails_once)
    cache = scoring_processes.ModelCache(65_536, None)
    request = [str(path), version, 0, 0, shop_lines(5, seed=57)]
    assert "MemoryError" in scoring_processes.answer(cache, request)["error"]
    assert "scored" in scoring_processes.answer(cache, request)  # read again, and scored
    assert "scored" in scoring_processes.answer(cache, request) and len(reads) == 2


def test_a_reload_has_workers_read_again_the_files_that_did_not_load(shop_model_path, tmp_path):
    """A fix outside the file (a parent directory's permissions) leaves it unchanged: SIGHUP retries it
    in the sidecar, and its keep_only has the workers forget that the file did not load."""
    from logscore.scoring_processes import ModelCache

    path = tmp_path / "m.onnx"
    shutil.copy(shop_model_path, path)
    version = Model.load(path).version
    cache = ModelCache(65_536, None, max_model_bytes=1)  # refused, as an unreadable file is
    assert cache.get(str(path), version) is None and cache.get(str(path), version) is None
    assert cache.loads == 1
    cache.max_model_bytes = path.stat().st_size  # the fix, outside the file
    cache.keep_only([str(path)])
    assert cache.get(str(path), version).version == version and cache.loads == 2


def test_a_worker_that_fails_to_drop_models_says_why_and_serves_on(shop_model_path):
    """An error handling the keep message ended the worker with a traceback (it was outside answer's try)."""
    from logscore.scoring_processes import ModelCache, answer

    cache = ModelCache(65_536, None)
    assert "TypeError" in answer(cache, {"keep": 3})["error"]  # (not a list of paths: what older code may send)
    version = Model.load(shop_model_path).version
    assert "scored" in answer(cache, [str(shop_model_path), version, 0, 0, ["GET / HTTP/1.1"]])


def test_chunks_left_to_the_sidecar_are_said_again_after_a_reload(shop_model_path, tmp_path, caplog):
    """Said once per file and version served for the life of the process: a file that broke again, the
    same version served, was never logged again (review, session 28)."""
    path = tmp_path / "m.onnx"
    shutil.copy(shop_model_path, path)
    serving = Model.load(path)
    path.write_bytes(os.urandom(4096))
    pool = ScoringProcesses(1, max_line_chars=65_536)
    try:
        lines = shop_lines(5, seed=65)
        for _ in range(2):
            pool.score(serving, lines, 0)
            pool.score(serving, lines, 0)
            pool.keep_only({str(path)})  # a reload that changed the models (it rejected the file)
    finally:
        pool.close()
    assert pool.stale_chunks == 4
    assert sum("holds another version" in r.getMessage() for r in caplog.records) == 2


def test_chunks_of_a_hot_swapped_version_draining_are_neither_counted_nor_warned_of(shop_model_path, tmp_path,
                                                                                    caplog):
    """At every hot swap under load, the old version's batcher drained while the workers had the new one:
    its chunks were counted stale and logged "holds another version … fix or restore it" (review, session 28)."""
    from logscore.metrics import Metrics
    from logscore.registry import ModelRegistry
    from logscore.scoring import ScoringService
    from logscore.settings import Settings

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(shop_model_path, models / "m.onnx")
    registry = ModelRegistry(str(models))
    registry.reload()
    old = registry.snapshot.models["m"]
    settings = Settings.load(flags={"models_dir": str(models), "scoring_processes": 1}, environ={})
    service = ScoringService(registry, settings, Metrics())
    service.start_processes()
    try:
        shutil.copy(DEFAULT_MODEL, models / ".new")
        os.replace(models / ".new", models / "m.onnx")
        registry.reload()  # the new version serves; the old one's chunks still come
        new, lines = registry.snapshot.models["m"], shop_lines(10, seed=64)
        for model in (new, old, new, old):
            assert_same(service.processes.score(model, lines, 0), model.score(lines, 0))
        assert service.processes.stale_chunks == 0
        assert not any("holds another version" in r.getMessage() for r in caplog.records)
        assert service._serves(new) and not service._serves(old)  # (the served model's chunks count: above)
    finally:
        service.close_processes()


def test_after_a_reload_workers_drop_the_models_no_longer_served_and_trim_memory(shop_model_path, tmp_path,
                                                                                   monkeypatch):
    """Removed models stayed in every worker until it next missed its cache, and glibc kept what they
    freed: 30 models added, scored and removed left each worker at 212 MiB instead of 87."""
    from logscore import scoring_processes
    from logscore.metrics import Metrics
    from logscore.registry import ModelRegistry
    from logscore.scoring import ScoringService
    from logscore.settings import Settings

    models = tmp_path / "models"
    models.mkdir()
    for name in ("kept", "removed"):
        shutil.copy(shop_model_path, models / f"{name}.onnx")
    registry = ModelRegistry(str(models))
    registry.reload()
    settings = Settings.load(flags={"models_dir": str(models), "scoring_processes": 1}, environ={})
    service = ScoringService(registry, settings, Metrics())
    service.start_processes()  # loads both in its worker
    try:
        both = sorted(str(models / f"{name}.onnx") for name in ("kept", "removed"))
        assert service.processes.keep_only(set(both)) == [both]  # held, before
        (models / "removed.onnx").unlink()
        registry.reload()
        held = []
        monkeypatch.setattr(service.processes, "keep_only",
                            lambda paths, keep=service.processes.keep_only: held.append(keep(paths)) or held[-1])
        asyncio.run(service.prune())
        assert held == [[[str(models / "kept.onnx")]]]
    finally:
        service.close_processes()
    trims = []
    monkeypatch.setattr(scoring_processes, "give_memory_back", lambda: trims.append(1))
    cache = scoring_processes.ModelCache(65_536, None)
    version = Model.load(shop_model_path).version
    cache.get(str(shop_model_path), version)
    assert cache.keep_only([]) == [] and trims == [1]
    if platform.libc_ver()[0] == "glibc":  # the trim that give_memory_back calls, where there is one
        assert ctypes.CDLL(None).malloc_trim(0) in (0, 1)
        monkeypatch.undo()
        scoring_processes.give_memory_back()


def test_dropping_removed_models_holds_no_worker_while_another_is_busy(processes, shop_model_path, monkeypatch):
    """keep_only took every worker and held them until the last came idle: one busy or hung worker stopped
    all scoring (3 chunks failed in 14 s with one of 2 hung; review, session 28)."""
    from logscore import scoring_processes

    monkeypatch.setattr(scoring_processes, "CHUNK_TIMEOUT_S", 2.0)  # (the old code failed after it)
    model = Model.load(shop_model_path)
    lines = shop_lines(10, seed=62)
    busy = processes._idle.get()  # a worker scoring a chunk, as far as keep_only can tell
    held = []
    telling = threading.Thread(target=lambda: held.append(processes.keep_only(set())))
    telling.start()
    try:
        assert_same(processes.score(model, lines, 0), model.score(lines, 0))  # the idle one scores meanwhile
        assert telling.is_alive()  # still waiting for the busy one
    finally:
        processes._idle.put(busy)
        telling.join()
    assert held == [[[], []]]


def test_dropping_removed_models_replaces_a_worker_that_fails_the_call_and_counts_no_failure(shop_model_path,
                                                                                            monkeypatch):
    """A worker that failed the call was left to the next chunk; with a worker short (a replacement that
    could not start) every reload waited 5 s, counted a readiness failure and told no worker."""
    from logscore import scoring_processes

    monkeypatch.setattr(scoring_processes, "CHUNK_TIMEOUT_S", 0.5)  # (the old code's wait for the one missing)
    restarts = []
    pool = ScoringProcesses(1, max_line_chars=65_536, on_restart=restarts.append)
    try:
        dead = pool.pids[0]
        os.kill(dead, signal.SIGKILL)
        wait_dead(dead)
        assert pool.keep_only(set()) == [[]]  # the replacement, told in its place
        assert len(restarts) == 1 and pool.pids != [dead]
        model = Model.load(shop_model_path)
        lines = shop_lines(10, seed=63)
        assert_same(pool.score(model, lines, 0), model.score(lines, 0))
        pool.count = 2  # two wanted, one runs: the other could not be started again
        assert pool.keep_only({str(shop_model_path)}) == [[str(shop_model_path)]]
        assert pool.status()["failed_in_row"] == 0 and pool.not_answering_reason() is None
    finally:
        pool.close()


def test_a_worker_that_cannot_start_is_not_restarted_every_readiness_check_and_makes_the_sidecar_unready():
    """A worker found dead while idle is replaced at the next readiness check; one that cannot start (a
    broken install) was restarted at every check, each logged, with /readyz ready all along (review).
    Its death, before it ever answered, counts as a failure once; it is left to the next chunk."""
    restarts = []
    pool = ScoringProcesses(1, max_line_chars=65_536, on_restart=restarts.append)
    try:
        killed = pool.pids[0]
        pool._arguments = ["--no-such-option"]  # from now on, a worker exits at once (argparse)
        os.kill(killed, signal.SIGKILL)
        wait_dead(killed)
        pool.replace_dead_idle()  # the killed one: replaced
        assert len(restarts) == 1 and pool.status()["failed_in_row"] == 0
        broken = pool.pids[0]
        wait_dead(broken)
        for _ in range(3):  # three readiness checks
            pool.replace_dead_idle()
        assert len(restarts) == 1 and pool.pids == [broken]
        assert pool.status()["failed_in_row"] == 1 and "no scoring process answers" in pool.not_answering_reason()
    finally:
        pool.close()


def test_a_lone_worker_hung_as_it_drops_models_is_replaced_in_time_for_the_chunk_waiting(shop_model_path,
                                                                                        monkeypatch):
    """The keep call waited as long as a chunk waits for an idle worker: with --scoring-processes 1, a worker
    hung (SIGSTOP) as a reload told it failed the chunk waiting for it ("no scoring process is running")."""
    from logscore import scoring_processes

    # (the chunk waits its real CHUNK_TIMEOUT_S for an idle worker: at 2 s, a replacement started under CI's
    # load came idle too late; the keep call's is cut short, well below it)
    monkeypatch.setattr(scoring_processes, "KEEP_TIMEOUT_S", 0.3, raising=False)
    pool = ScoringProcesses(1, max_line_chars=65_536)
    try:
        model = Model.load(shop_model_path)
        lines = shop_lines(10, seed=66)
        hung = pool.pids[0]
        os.kill(hung, signal.SIGSTOP)
        telling = threading.Thread(target=pool.keep_only, args=(set(),))
        telling.start()
        while pool._idle.qsize() and telling.is_alive():  # until keep_only holds it
            time.sleep(0.001)
        assert_same(pool.score(model, lines, 0), model.score(lines, 0))  # by its replacement
        telling.join()
        assert hung not in pool.pids and pool.status()["failed_in_row"] == 0
    finally:
        pool.close()


def test_dropping_removed_models_during_shutdown_tells_no_closed_worker(caplog):
    """A prune during shutdown called the workers whose connections close() had shut, and logged that
    they failed (review, session 28)."""
    pool = ScoringProcesses(1, max_line_chars=65_536)
    pool.close()
    assert pool.keep_only(set()) == []
    assert not [r for r in caplog.records if r.name == "logscore.scoring_processes"]


def test_a_worker_that_dies_costs_at_most_its_chunk_and_is_replaced(shop_model_path):
    restarts = []
    pool = ScoringProcesses(1, max_line_chars=65_536, on_restart=restarts.append)
    try:
        model = Model.load(shop_model_path)
        lines = shop_lines(40, seed=53)
        first, = pool.pids
        assert_same(pool.score(model, lines, 0), model.score(lines, 0))
        os.kill(first, signal.SIGKILL)  # while idle: found before a chunk is sent, nothing fails
        wait_dead(first)
        assert_same(pool.score(model, lines, 0), model.score(lines, 0))
        assert restarts == ["exited while idle (killed by signal 9)"]
        second, = pool.pids
        assert second != first
        # Killed but not yet reaped (poll() still says running): its closed end of the socket tells, no chunk lost.
        worker = pool._idle.queue[0]
        worker.process.poll = lambda: None
        os.kill(second, signal.SIGKILL)
        wait_dead(second)
        assert_same(pool.score(model, lines, 0), model.score(lines, 0))
        assert restarts[1] == "exited while idle (killed by signal 9)"
        third, = pool.pids
        assert third not in (first, second)
        # Dying while scoring: the chunk is sent, then the process dies; the call says retry. (Stopped first:
        # a worker quicker than the kill answered its chunk, and the call succeeded: CI met it once.)
        worker = pool._idle.queue[0]
        send = worker.connection.send_bytes
        worker.connection.send_bytes = lambda packed: (os.kill(third, signal.SIGSTOP), send(packed),
                                                       os.kill(third, signal.SIGKILL), wait_dead(third))
        with pytest.raises(ScorerUnavailable, match="killed by signal 9.*restarted: retry"):
            pool.score(model, lines, 0)
        assert restarts[2] == "killed by signal 9"
        fourth, = pool.pids
        assert fourth not in (first, second, third)
        assert_same(pool.score(model, lines, 0), model.score(lines, 0))
    finally:
        pool.close()
    assert all(not Path(f"/proc/{pid}").exists() for pid in (first, second, third, fourth))


def test_a_live_worker_that_wrote_while_idle_is_replaced_and_said_to_be_running_not_to_have_exited(shop_model_path):
    """A reply come after its call gave up (a warm() timeout) leaves an idle worker's socket readable:
    it was replaced as 'exited while idle (connection lost)', though it never exited (review A)."""
    restarts = []
    pool = ScoringProcesses(1, max_line_chars=65_536, on_restart=restarts.append)
    try:
        model = Model.load(shop_model_path)
        lines = shop_lines(40, seed=54)
        worker = pool._idle.queue[0]
        worker.connection.send_bytes(pack_request(model, lines, 0))  # a call whose reply is never read
        assert worker.connection.poll(30), "the worker never replied"
        assert_same(pool.score(model, lines, 0), model.score(lines, 0))  # on the worker started in its place
        assert restarts == ["still running, yet it wrote while idle (a reply come after its call gave up on it)"]
        # killed while idle, it is said to have exited, as before
        second, = pool.pids
        os.kill(second, signal.SIGKILL)
        wait_dead(second)
        assert_same(pool.score(model, lines, 0), model.score(lines, 0))
        assert restarts[1] == "exited while idle (killed by signal 9)"
    finally:
        pool.close()


def test_the_batcher_scores_parallel_chunks_at_once_and_answers_in_order():
    """Two chunks must be in flight together to pass the barrier; each caller gets its own records."""
    barrier = threading.Barrier(2, timeout=30)
    model = type("FakeModel", (), {"name": "fake"})()

    def score_chunk(records, explain, explain_flagged):
        if len(records) == SCORE_CHUNK:
            barrier.wait()  # the first two chunks meet here, or the test fails
        values = np.array(records, dtype=np.float32)
        flags = np.zeros(len(records), dtype=bool)
        return Scored(values, flags, values[:, None], flags, flags)

    async def scenario():
        executor = ThreadPoolExecutor(2)
        batcher = Batcher(model, executor, max_batch_records=4096, max_queued_records=10_000, inline_max_records=0,
                          score_chunk=score_chunk, parallel=2)
        calls = [list(range(0, 700)), list(range(700, 1200)), list(range(1200, 1300))]
        results = await asyncio.gather(*(batcher.score(records, 0, None) for records in calls))
        await batcher.close()
        executor.shutdown()
        return calls, results

    calls, results = asyncio.run(scenario())
    for records, result in zip(calls, results):
        assert result.scores.tolist() == records


def novel_lines(count: int) -> list[str]:
    """Shop lines whose paths are all new: every chunk is featurized from scratch (slow enough to be caught)."""
    return [line.replace("GET /", f"GET /n{i}x{i * 7919 % 10007}/", 1) for i, line in enumerate(shop_lines(count, 56))]


def call_status(sidecar: SidecarProcess, request) -> str:
    try:
        sidecar.stub().Score(request, timeout=60)
        return "OK"
    except grpc.RpcError as error:
        shown = "restarted: retry" if error.details().endswith("restarted: retry") else error.details()
        return f"{error.code().name}: {shown}"


def sidecar_workers(sidecar: SidecarProcess) -> set[int]:
    """The sidecar's scoring processes."""
    return set(child_pids(sidecar.process.pid))


def test_the_sidecar_with_scoring_processes_scores_as_without_and_survives_a_dead_one(tmp_path, shop_model_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(shop_model_path, models / "shop.onnx")
    sidecar = SidecarProcess(models, tmp_path, scoring_processes=2, max_message_bytes=8 * 2**20,
                             max_inflight_bytes=64 * 2**20).start()
    normal = shop_lines(1500, seed=54)
    lines = normal + [line for _, line in attack_lines(normal, 500, seed=55)]
    request = pb.ScoreRequest(explain=2)
    request.lines.lines.extend(line.encode() for line in lines)
    try:
        workers = sidecar_workers(sidecar)
        assert len(workers) == 2
        expected = Model.load(shop_model_path).score(lines, 2)
        answer = sidecar.stub().Score(request, timeout=60)
        np.testing.assert_array_equal(np.array(answer.scores, dtype=np.float32), expected.scores)
        assert [list(e.features) for e in answer.explanations] == expected.explanations
        os.kill(min(workers), signal.SIGKILL)  # while idle: replaced before a chunk is sent to it, no call fails
        wait_dead(min(workers))
        for _ in range(3):
            answer = sidecar.stub().Score(request, timeout=60)
            np.testing.assert_array_equal(np.array(answer.scores, dtype=np.float32), expected.scores)
        # While scoring: a big request keeps both busy; the call meets the death as a status shippers retry.
        big = pb.ScoreRequest(lines=pb.RawLines(lines=[line.encode() for line in novel_lines(20_000)]))
        busy = sidecar_workers(sidecar)
        outcome = []
        victim = min(busy)
        started = cpu_seconds(victim)
        caller = threading.Thread(target=lambda: outcome.append(call_status(sidecar, big)))
        caller.start()
        deadline = time.monotonic() + 30
        while cpu_seconds(victim) < started + 0.05 and time.monotonic() < deadline:  # it is scoring the call
            time.sleep(0.002)
        os.kill(victim, signal.SIGKILL)
        caller.join(60)
        assert outcome[0] in ("OK", "UNAVAILABLE: restarted: retry"), outcome
        workers |= busy
        # A victim killed after its last chunk of the call (outcome OK) is found dead when the next chunk
        # is due: a call that reaches both processes (the wait below once ran out without one). The kill may
        # still be under way when that chunk is sent (CI met it once): then that call is told to retry.
        assert call_status(sidecar, request) in ("OK", "UNAVAILABLE: restarted: retry")
        deadline = time.monotonic() + 30
        # A replacement started, and the victim reaped (under load it was seen a moment as a zombie child).
        while (len(sidecar_workers(sidecar) - workers) < 1 or victim in sidecar_workers(sidecar)) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        now = sidecar_workers(sidecar)
        assert len(now) == 2 and victim not in now
        assert sidecar.metric("logscore_scoring_process_restarts_total") == 2
        status, ready = sidecar.http_get("/readyz")
        processes = json.loads(ready)["scoring_processes"]
        assert status == 200 and processes["answering"] is True and processes["failed_in_row"] <= 1
        assert {key: processes[key] for key in ("wanted", "running", "replaced")} == \
            {"wanted": 2, "running": 2, "replaced": 2}
        assert sidecar.stub().Score(request, timeout=60).scores == answer.scores
        workers |= sidecar_workers(sidecar)
    finally:
        assert sidecar.stop() == 0, sidecar.log()
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # no scoring process outlives the sidecar


def test_a_scoring_process_that_dies_idle_is_replaced_while_requests_are_scored_inline(tmp_path, shop_model_path):
    """Single events (Logstash's http filter) are scored in the sidecar's own process: a worker killed
    while idle was seen dead only when a chunk came, and /readyz said running 0 meanwhile (25 s, until a
    batch). It is replaced within about a second of readiness checks, with no chunk sent."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(shop_model_path, models / "shop.onnx")
    sidecar = SidecarProcess(models, tmp_path, scoring_processes=1).start()
    try:
        (victim,) = sidecar_workers(sidecar)
        os.kill(victim, signal.SIGKILL)
        one = pb.ScoreRequest(lines=pb.RawLines(lines=[b"GET / HTTP/1.1"]))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (victim in sidecar_workers(sidecar) or not sidecar_workers(sidecar)):
            assert len(sidecar.stub().Score(one, timeout=10).scores) == 1  # scored inline all along
            time.sleep(0.1)
        (replacement,) = sidecar_workers(sidecar)
        assert replacement != victim
        processes = json.loads(sidecar.http_get("/readyz")[1])["scoring_processes"]
        assert {key: processes[key] for key in ("running", "replaced")} == {"running": 1, "replaced": 1}
        assert "exited while idle (killed by signal 9" in sidecar.log()
    finally:
        assert sidecar.stop() == 0


def test_the_worst_input_through_a_scoring_process_leaves_it_serving(tmp_path):
    sidecar = SidecarProcess(ROOT / "models", tmp_path, scoring_processes=1).start()
    try:
        outcomes = flood(sidecar, worst_payloads(2 * 1024 * 1024), calls_per_connection=1, grpc_connections=1)
        refusals = {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "429", "400"}
        for name, results in outcomes.items():
            assert set(results) <= {"OK", "200"} | refusals, (name, results)
        assert "OK" in outcomes["grpc_long_lines"] + outcomes["grpc_short_lines"]  # scored by the process
        request = pb.ScoreRequest(lines=pb.RawLines(lines=[b"GET / HTTP/1.1"]))
        assert len(sidecar.stub().Score(request, timeout=10).scores) == 1
        assert sidecar.metric("logscore_scoring_process_restarts_total") == 0
        assert '"level": "error"' not in sidecar.log()
    finally:
        assert sidecar.stop() == 0, sidecar.log()


def test_a_worker_running_other_code_than_the_sidecar_scores_nothing(tmp_path, monkeypatch, behaviour_model, caplog):
    """logscore upgraded in place while the sidecar runs: a worker started since (replacing one
    that crashed) imports what is on disk, and its answers differed from the sidecar's without any
    error (here: an older model.py, whose models read no record times: lateness would quietly stop).
    The sidecar scores such a worker's chunks itself, and says to restart it."""
    import logging

    import logscore

    copy = tmp_path / "logscore"
    shutil.copytree(Path(logscore.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    source = (copy / "model.py").read_text()
    (copy / "model.py").write_text(source.replace("names + list(TIME_FIELDS)", "names"))  # the older version
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # what a worker started now imports
    pool = ScoringProcesses(1, max_line_chars=65_536)
    try:
        model = Model.load(behaviour_model)
        records = timed_shop_lines(20, 5.0, seed=9)
        with caplog.at_level(logging.ERROR, logger="logscore.scoring_processes"):
            assert_same(pool.score(model, records, 0), model.score(records, 0))
            assert_same(pool.score(model, records, 2), model.score(records, 2))
        assert caplog.text.count("restart the sidecar") == 1  # said once
    finally:
        pool.close()


def fail_next_chunk(pool: ScoringProcesses) -> None:
    """The idle worker's next chunk is sent, then the worker is killed: the call fails. (Stopped first: a
    worker quicker than the kill answered its chunk.)"""
    worker = pool._idle.queue[0]
    pid = worker.process.pid
    send = worker.connection.send_bytes
    worker.connection.send_bytes = lambda packed: (os.kill(pid, signal.SIGSTOP), send(packed),
                                                   os.kill(pid, signal.SIGKILL), wait_dead(pid))


def test_workers_that_fail_every_chunk_count_as_not_running_until_one_answers(shop_model_path):
    """With every worker hung, each call failed while /readyz said ready with `running: 2`: a live
    process was counted as a working one (probe-observe). Now once the replacements too fail, as many
    in a row as workers, none answered since, none counts as running, with a reason; an answer, or a
    quiet spell (no traffic can succeed once a balancer stops sending), ends it."""
    pool = ScoringProcesses(2, max_line_chars=65_536)
    try:
        model = Model.load(shop_model_path)
        lines = shop_lines(10, seed=59)
        assert_same(pool.score(model, lines, 0), model.score(lines, 0))
        for failure in range(4):  # the two first workers, then their two replacements
            assert pool.status()["running"] == 2 and pool.not_answering_reason() is None
            fail_next_chunk(pool)
            with pytest.raises(ScorerUnavailable):
                pool.score(model, lines, 0)
        status = pool.status()
        assert status["running"] == 0 and status["answering"] is False and status["failed_in_row"] == 2
        assert "no scoring process answers" in pool.not_answering_reason()
        assert "--scoring-processes 0" in pool.not_answering_reason()
        failed_at = pool.clock()
        pool.clock = lambda: failed_at + 11.0  # past NOT_ANSWERING_HOLD_S with nothing sent
        assert pool.status()["running"] == 2 and pool.not_answering_reason() is None
        pool.clock = lambda: failed_at
        assert pool.not_answering_reason() is not None
        assert_same(pool.score(model, lines, 0), model.score(lines, 0))  # a replaced worker answers
        assert pool.status() == {"wanted": 2, "running": 2, "replaced": 4, "failed_in_row": 0, "answering": True}
    finally:
        pool.close()


def test_one_worker_killed_mid_chunk_leaves_the_sidecar_ready_while_its_replacement_is_untried(shop_model_path):
    """With --scoring-processes 1, one worker killed while scoring (OOM, a record that crashes the
    featurizer) made the sidecar not ready for 10 s, its replacement idle and untried (review, session 27)."""
    pool = ScoringProcesses(1, max_line_chars=65_536)
    try:
        model = Model.load(shop_model_path)
        lines = shop_lines(10, seed=60)
        assert_same(pool.score(model, lines, 0), model.score(lines, 0))
        fail_next_chunk(pool)
        with pytest.raises(ScorerUnavailable):
            pool.score(model, lines, 0)
        assert pool.not_answering_reason() is None and pool.status()["running"] == 1
        assert_same(pool.score(model, lines, 0), model.score(lines, 0))  # the replacement answers
        assert pool.not_answering_reason() is None
        fail_next_chunk(pool)  # a second worker killed: it was tried and answered, so still no reason
        with pytest.raises(ScorerUnavailable):
            pool.score(model, lines, 0)
        assert pool.not_answering_reason() is None
        fail_next_chunk(pool)  # its replacement fails too, before answering anything: replacing does not help
        with pytest.raises(ScorerUnavailable):
            pool.score(model, lines, 0)
        assert "no scoring process answers" in pool.not_answering_reason()
    finally:
        pool.close()


def test_with_no_worker_startable_the_sidecar_is_not_ready_and_stays_so_after_the_hold(shop_model_path,
                                                                                       monkeypatch):
    """A replacement that could not be started (OSError) left no worker; after the 10 s hold /readyz said
    ready again with `running: 0` while every call waited 5 s and failed (review, session 27)."""
    import logscore.scoring_processes as scoring_processes

    pool = ScoringProcesses(1, max_line_chars=65_536)
    try:
        model = Model.load(shop_model_path)
        lines = shop_lines(10, seed=61)

        def cannot_start(arguments):
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(scoring_processes, "Worker", cannot_start)
        monkeypatch.setattr(scoring_processes, "CHUNK_TIMEOUT_S", 0.2)  # the wait for an idle worker
        fail_next_chunk(pool)
        with pytest.raises(ScorerUnavailable):
            pool.score(model, lines, 0)
        assert "no scoring process is running" in pool.not_answering_reason()
        with pytest.raises(ScorerUnavailable, match="no scoring process is running"):
            pool.score(model, lines, 0)
        assert pool.status()["failed_in_row"] == 1  # the wait that ran out counts
        failed_at = pool.clock()
        pool.clock = lambda: failed_at + 11.0  # past NOT_ANSWERING_HOLD_S
        status = pool.status()
        assert status["answering"] is False and status["running"] == 0
        assert "no scoring process is running" in pool.not_answering_reason()
    finally:
        pool.close()
