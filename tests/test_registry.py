"""The models directory as the registry sees it: entries it cannot use, and the watch that reloads it."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import time
import tracemalloc
from types import MethodType, SimpleNamespace

import pytest

from logscore import registry as registry_module
from logscore.artifact import DEFAULT_MAX_MODEL_BYTES
from logscore.errors import ModelNotFound
from logscore.metrics import Metrics
from logscore.registry import ModelRegistry
from logscore.serve import Sidecar

from .sidecar_process import ROOT

DEFAULT_MODEL = ROOT / "models" / "apache-access.onnx"


class Events:
    """The registry's on_change calls, as (event, name, detail)."""

    def __init__(self):
        self.seen: list[tuple[str, str, str]] = []

    def __call__(self, event: str, name: str, detail: str) -> None:
        self.seen.append((event, name, detail))

    def of(self, event: str) -> list[tuple[str, str]]:
        return [(name, detail) for kind, name, detail in self.seen if kind == event]


def assert_refused_once(registry: ModelRegistry, events: Events, name: str, *phrases: str) -> str:
    """The one rejection so far is of ``name`` and says each phrase; the next check (nothing changed)
    does not say it again. Returns what it said."""
    [(refused, detail)] = events.of("rejected")
    assert refused == name and all(phrase in detail for phrase in phrases), detail
    assert not registry.reload() and len(events.of("rejected")) == 1  # said once
    return detail


@pytest.fixture()
def models(tmp_path):
    directory = tmp_path / "models"
    directory.mkdir()
    shutil.copy(DEFAULT_MODEL, directory / "apache-access.onnx")
    return directory


def test_a_symlink_loop_is_refused_once_and_the_directory_is_still_watched(models):
    (models / "loop.onnx").symlink_to("loop.onnx")
    events = Events()
    registry = ModelRegistry(str(models), on_change=events)
    assert registry.reload()
    assert set(registry.snapshot.models) == {"apache-access"}
    detail = assert_refused_once(registry, events, "loop", "loop.onnx", "fix or remove it")
    assert registry.snapshot.errors[str(models / "loop.onnx")] == detail
    # Hot reload goes on: the link removed, a new model dropped in is loaded.
    (models / "loop.onnx").unlink()
    shutil.copy(DEFAULT_MODEL, models / "second.onnx")
    assert registry.reload()
    assert set(registry.snapshot.models) == {"apache-access", "second"} and not registry.snapshot.errors


def test_a_file_deleted_between_the_listing_and_its_stat_is_as_if_never_listed(models, monkeypatch):
    shutil.copy(DEFAULT_MODEL, models / "brief.onnx")
    listed = os.scandir

    def listing_then_deleting(path):  # the race: the entry listed, the file gone before it is looked at
        entries = list(listed(path))
        (models / "brief.onnx").unlink()
        return iter(entries)

    monkeypatch.setattr(registry_module.os, "scandir", listing_then_deleting)
    registry = ModelRegistry(str(models))
    assert registry.reload()
    assert set(registry.snapshot.models) == {"apache-access"} and not registry.snapshot.errors


def watching_sidecar(stopping: asyncio.Event, registry, **parts) -> SimpleNamespace:
    """What Sidecar.watch_models needs of a sidecar, with ``registry`` and ``parts`` (service, ...)."""
    sidecar = SimpleNamespace(stopping=stopping, reload_requested=asyncio.Event(), metrics=Metrics(), hangup=False,
                              settings=SimpleNamespace(reload_interval_s=0.001, models_dir="/srv/models"),
                              registry=registry, follow_up_pending=False, check_failure=None, **parts)
    sidecar._check_models = MethodType(Sidecar._check_models, sidecar)
    sidecar._check_failed = MethodType(Sidecar._check_failed, sidecar)
    return sidecar


def test_a_failed_check_is_logged_and_the_watch_goes_on(caplog):
    """One pass that raised ended the watch task: no reload ever again, nothing logged until SIGTERM."""
    stopping = asyncio.Event()
    reloads = []

    def reload(retry_rejected=False):
        reloads.append(len(reloads))
        if len(reloads) == 1:
            raise OSError(40, "Too many levels of symbolic links")
        stopping.set()  # the second pass ran: enough
        return False

    async def check_twice():
        sidecar = watching_sidecar(stopping, SimpleNamespace(reload=reload))
        await asyncio.wait_for(Sidecar.watch_models(sidecar), 10)
        return sidecar

    with caplog.at_level(logging.ERROR, logger="logscore.serve"):
        sidecar = asyncio.run(check_twice())
    assert reloads == [0, 1]
    [logged] = [r for r in caplog.records if r.getMessage().startswith("model check failed")]
    assert "Too many levels" in logged.exc_text and "tries again" in logged.getMessage()
    assert b"logscore_model_checks_total 1.0" in sidecar.metrics.render()


def test_what_follows_a_change_is_done_by_the_next_check_after_one_failing_in_it_logged_once(caplog):
    """A pass failing after a reload changed the models (in the batchers' pruning, say) left what
    follows a change undone for good: the next pass saw no change. And a failure that repeats was
    logged with its traceback at every check (1,800 an hour at the default interval)."""
    stopping = asyncio.Event()
    changes = iter([True, False, False, False, False])
    pruned = []

    def reload(retry_rejected=False):
        changed = next(changes, None)
        if changed is None:
            stopping.set()
            return False
        return changed

    async def prune():
        pruned.append(len(pruned))
        if len(pruned) <= 3:
            raise RuntimeError("the batcher could not be pruned")

    async def watch():
        sidecar = watching_sidecar(stopping, SimpleNamespace(reload=reload, snapshot=SimpleNamespace(models={})),
                                   service=SimpleNamespace(prune=prune), _warn_when_no_default=lambda: None,
                                   _warn_unloaded_routes=lambda: None)
        await asyncio.wait_for(Sidecar.watch_models(sidecar), 10)
        return sidecar

    with caplog.at_level(logging.INFO, logger="logscore.serve"):
        sidecar = asyncio.run(watch())
    assert pruned == [0, 1, 2, 3]  # the change's follow-up was tried until it ran through, then no more
    assert not sidecar.follow_up_pending
    said = [r.getMessage().split(";")[0] for r in caplog.records]
    assert said == ["model check failed", "model check works again"], said


def test_a_file_name_that_is_not_utf8_is_refused_saying_to_rename_it(models):
    """Its name, a model's name, made /metrics answer 500 until restart and ListModels fail UNKNOWN."""
    shutil.copy(DEFAULT_MODEL, os.path.join(os.fsencode(models), b"caf\xe9.onnx"))
    events = Events()
    registry = ModelRegistry(str(models), on_change=events)
    assert registry.reload()
    assert set(registry.snapshot.models) == {"apache-access"}
    assert_refused_once(registry, events, "caf\\xe9", "not UTF-8", "rename the file")
    assert list(registry.snapshot.errors) == [f"{models}/caf\\xe9.onnx"]
    metrics = Metrics()  # the sidecar counts each rejection under its name: /metrics must still render
    metrics.model_rejections.labels("caf\\xe9").inc()
    metrics.set_models(registry.snapshot.models)
    assert 'file="caf\\\\xe9"' in metrics.render().decode()


def test_a_file_over_max_model_bytes_is_refused_before_it_is_read(models):
    """A 1.5 GB file was read whole: the sidecar grew by 1.5 GB, past its shipped memory limit (350 MB)."""
    huge = models / "huge.onnx"
    with open(huge, "wb") as file:  # sparse: no disk used
        file.truncate(DEFAULT_MAX_MODEL_BYTES + 16 * 1024 * 1024)
    events = Events()
    registry = ModelRegistry(str(models), on_change=events)
    tracemalloc.start()
    try:
        registry.reload()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < DEFAULT_MAX_MODEL_BYTES // 4, f"{peak:,} bytes held while checking"
    [(name, detail)] = events.of("rejected")
    assert name == "huge" and f"{huge.stat().st_size:,} bytes" in detail
    assert f"over max_model_bytes ({DEFAULT_MAX_MODEL_BYTES:,})" in detail and "raise max_model_bytes" in detail
    # The limit is the setting's: a real model just over it is refused too, and loads under a higher one.
    size = (models / "apache-access.onnx").stat().st_size
    strict = ModelRegistry(str(models), max_model_bytes=size - 1)
    strict.reload()
    assert not strict.snapshot.models
    assert f"over max_model_bytes ({size - 1:,})" in strict.snapshot.errors[str(models / "apache-access.onnx")]
    relaxed = ModelRegistry(str(models), max_model_bytes=size)
    relaxed.reload()
    assert set(relaxed.snapshot.models) == {"apache-access"}


def test_a_file_growing_as_it_is_read_is_held_once_and_refused_past_the_limit(tmp_path, monkeypatch):
    """A file still being written (a `cp` straight into the models directory) was read a MiB at a time
    into a bytes object copied whole at each MiB: two copies held, twice max_model_bytes before it
    was refused."""
    from logscore import artifact
    from logscore.errors import ModelLoadError

    limit = 8 * 1024 * 1024
    grown = tmp_path / "growing.onnx"
    grown.write_bytes(os.urandom(2 * limit))
    real_fstat, stats = os.fstat, []

    def stat_before_it_grew(fd):  # as if the file held 1,000 bytes when it was opened
        stats.append(fd)
        found = real_fstat(fd)
        return os.stat_result((*found[:6], 1000, *found[7:])) if len(stats) == 1 else found

    monkeypatch.setattr(artifact.os, "fstat", stat_before_it_grew)
    tracemalloc.start()
    try:
        with pytest.raises(ModelLoadError, match=f"{2 * limit:,} bytes, over max_model_bytes"):
            artifact.read_at_most(str(grown), limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * limit, f"{peak:,} bytes held while reading"
    stats.clear()  # under the limit, all of it is read
    assert artifact.read_at_most(str(grown), 2 * limit) == grown.read_bytes()
    monkeypatch.setattr(artifact.os, "fstat", real_fstat)  # a file that does not grow is held once (review: twice)
    tracemalloc.start()
    try:
        read = artifact.read_at_most(str(grown), 2 * limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(read) == 2 * limit and peak < 1.5 * len(read), f"{peak:,} bytes held while reading"


def resaved_with_another_threshold(source, target) -> None:
    """``source`` re-saved to ``target`` with its threshold's last digit changed: another version of
    the same byte length (a build of the same size)."""
    import onnx

    from logscore.artifact import read_artifact
    from logscore.training.behaviour import sealed

    artifact = read_artifact(source)
    metadata = json.loads(json.dumps(artifact.metadata))
    threshold = repr(metadata["calibration"]["threshold"])
    metadata["calibration"]["threshold"] = float(threshold[:-1] + ("1" if threshold[-1] != "1" else "2"))
    target.write_bytes(sealed(onnx.ModelProto.FromString(artifact.model_bytes), metadata)[0].SerializeToString())
    assert target.stat().st_size == os.stat(source).st_size  # (what the swap's test needs)
    assert read_artifact(target).version != artifact.version


def test_a_symlink_swapped_to_a_file_of_the_same_size_and_mtime_is_loaded(models, tmp_path):
    """Reproducible builds give equal mtimes: the swap went unnoticed, the old file's model served on."""
    for build in ("a", "b"):
        (tmp_path / build).mkdir()
    shutil.copy(DEFAULT_MODEL, tmp_path / "a" / "m.onnx")
    resaved_with_another_threshold(DEFAULT_MODEL, tmp_path / "b" / "m.onnx")
    for build in ("a", "b"):
        os.utime(tmp_path / build / "m.onnx", ns=(10**9, 10**9))
    (models / "m.onnx").symlink_to(tmp_path / "a" / "m.onnx")
    events = Events()
    registry = ModelRegistry(str(models), on_change=events)
    registry.reload()
    before = registry.snapshot.models["m"]
    (models / ".m.tmp").symlink_to(tmp_path / "b" / "m.onnx")
    os.replace(models / ".m.tmp", models / "m.onnx")  # the atomic swap `mv -T` makes
    assert registry.reload()
    assert registry.snapshot.models["m"].version != before.version
    assert [n for n, _ in events.of("loaded")].count("m") == 2


def test_a_chmod_of_a_model_file_keeps_its_model_serving_as_it_was(models):
    """A chmod or chown (ctime only) reloaded the unchanged model: a new Model, and with it a session
    model's open sessions started afresh, at every blind chmod of a config management run."""
    events = Events()
    registry = ModelRegistry(str(models), on_change=events)
    registry.reload()
    serving = registry.snapshot.models["apache-access"]
    path = models / "apache-access.onnx"
    before = path.stat().st_ctime_ns
    while path.stat().st_ctime_ns == before:  # (the kernel's clock for ctime moves in ticks)
        os.chmod(path, path.stat().st_mode & 0o777)  # the same mode: only the ctime moves
        time.sleep(0.005)
    assert registry.reload()  # the file's state changed (else this tested nothing: review)
    assert registry.snapshot.models["apache-access"] is serving and len(events.of("loaded")) == 1
    assert not registry.reload()  # its new state stored: not read again


def test_a_rejected_file_is_tried_again_on_sighup_though_it_looks_unchanged(models, monkeypatch):
    """A file refused for a cause outside it (a read error, a parent directory's permissions) and fixed
    there was refused until touched, SIGHUP or not."""
    from logscore.errors import ModelLoadError
    from logscore.model import Model

    real_load, failures = Model.load, [OSError(5, "Input/output error")]

    def load_failing_once(path, **options):
        if failures:
            raise ModelLoadError(f"{path}: cannot read model file: {failures.pop().strerror}")
        return real_load(path, **options)

    monkeypatch.setattr(registry_module.Model, "load", load_failing_once)
    registry = ModelRegistry(str(models))
    registry.reload()
    assert not registry.snapshot.models and registry.snapshot.errors
    assert not registry.reload()  # a check of the interval: unchanged, not read again
    assert registry.reload(retry_rejected=True)  # SIGHUP
    assert set(registry.snapshot.models) == {"apache-access"} and not registry.snapshot.errors


def test_sighup_asks_the_next_check_to_retry_rejected_files_and_the_interval_does_not():
    stopping = asyncio.Event()
    passes = []

    async def watch():
        def reload(retry_rejected=False):
            passes.append(retry_rejected)
            if len(passes) == 1:
                loop.call_soon_threadsafe(Sidecar.on_hangup, sidecar)
            elif len(passes) == 3:
                stopping.set()
            return False

        loop = asyncio.get_running_loop()
        sidecar = watching_sidecar(stopping, SimpleNamespace(reload=reload))
        await asyncio.wait_for(Sidecar.watch_models(sidecar), 10)

    asyncio.run(watch())
    assert passes == [False, True, False]


def test_a_route_left_without_its_model_by_a_reload_is_warned_once_and_listed_in_readyz(models, caplog):
    """A route's model removed later: every record of its tags refused NOT_FOUND, said only per request."""
    from logscore.servers.http import SidecarHttp

    shutil.copy(DEFAULT_MODEL, models / "linux.onnx")
    registry = ModelRegistry(str(models), tag_routes={"syslog.*": "linux", "web.*": "apache-access"})
    registry.reload()
    sidecar = SimpleNamespace(registry=registry, settings=SimpleNamespace(models_dir=str(models)),
                              _unloaded_routes_warned={})
    service = SimpleNamespace(registry=registry, accepting=True, learner=None, feedback=None, processes=None,
                              metrics=SimpleNamespace(floods=SimpleNamespace(status=dict)))
    http = SidecarHttp(service, None)

    def readyz() -> tuple[int, dict]:
        response = asyncio.run(http.readyz(None))
        return response.status, json.loads(response.body)

    def warned_after_a_reload() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="logscore.serve"):
            registry.reload()
            Sidecar._warn_unloaded_routes(sidecar)
        return [f"{r.levelname} {r.getMessage()} {getattr(r, 'route', '')}" for r in caplog.records]

    assert warned_after_a_reload() == [] and "unloaded_routes" not in readyz()[1]
    (models / "linux.onnx").unlink()
    [warning] = warned_after_a_reload()
    assert warning.startswith("WARNING tag route to a model that is not loaded") and warning.endswith("syslog.*")
    status, body = readyz()
    assert status == 200 and body["ready"] and body["unloaded_routes"] == {"syslog.*": "linux"}
    assert warned_after_a_reload() == []  # once per change
    shutil.copy(DEFAULT_MODEL, models / "linux.onnx")
    assert warned_after_a_reload() == ["INFO tag route's model is loaded again syslog.*"]
    assert "unloaded_routes" not in readyz()[1]


@pytest.mark.parametrize("make, said", [
    (lambda path: path.mkdir(), "a directory, not a model file (Docker makes one"),
    (lambda path: path.symlink_to(path.parent / "nowhere.onnx"), "nowhere.onnx', which does not exist; fix or"),
    (lambda path: os.mkfifo(path), "not a regular file"),
])
def test_an_onnx_entry_that_is_no_file_is_refused_once_saying_what_to_do(tmp_path, make, said):
    """Skipped without a word: a directory of Docker's alone made the start say 'no .onnx files'."""
    models = tmp_path / "models"
    models.mkdir()
    make(models / "apache-access.onnx")
    events = Events()
    registry = ModelRegistry(str(models), on_change=events)
    registry.reload()
    assert not registry.snapshot.models  # the start error joins these errors: it names the entry
    detail = assert_refused_once(registry, events, "apache-access", said)
    assert detail.startswith(str(models / "apache-access.onnx"))
    assert list(registry.snapshot.errors.values()) == [detail]


def test_a_models_directory_gone_is_said_once_and_once_when_it_is_back(models, caplog):
    """Said at error level at every check (1,800 lines an hour at the default), nothing when it came back."""
    registry = ModelRegistry(str(models))
    registry.reload()
    with caplog.at_level(logging.INFO, logger="logscore.registry"):
        models.rename(models.with_name("away"))
        for _ in range(3):
            assert not registry.reload()
        assert set(registry.snapshot.models) == {"apache-access"}  # they serve on
        models.with_name("away").rename(models)
        for _ in range(2):
            registry.reload()
    said = [(r.levelname, r.getMessage().split(";")[0]) for r in caplog.records]
    assert said == [("ERROR", "cannot list models directory"), ("INFO", "models directory listed again")]
    assert "restore the directory" in caplog.records[0].getMessage()


@pytest.mark.parametrize("error, said, not_said", [
    (PermissionError(errno.EACCES, "Permission denied"), "readable by this process's user", "check the path"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), "check the path", "readable"),
    (OSError(errno.EIO, "Input/output error"), "Input/output error", "readable"),
])
def test_a_model_file_that_cannot_be_read_is_given_the_remedy_of_its_error(tmp_path, monkeypatch, error, said,
                                                                           not_said):
    """Every OSError got one remedy, and one meant for the sidecar: `logscore inspect no-such.onnx` said
    "No such file or directory; make it readable by the sidecar's user (…: send SIGHUP)"."""
    from logscore import artifact
    from logscore.errors import ModelLoadError

    def failing(path, max_bytes):
        raise error

    monkeypatch.setattr(artifact, "read_at_most", failing)
    with pytest.raises(ModelLoadError) as raised:
        artifact.read_artifact(tmp_path / "m.onnx")
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'm.onnx'}: cannot read model file: {error.strerror}")
    assert said in message and not_said not in message and "SIGHUP" not in message


def test_a_missing_path_is_said_to_be_checked(tmp_path):
    from logscore.artifact import read_artifact
    from logscore.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"No such file or directory; check the path"):
        read_artifact(tmp_path / "no-such.onnx")


def test_an_unreadable_model_file_is_rejected_in_the_registry_with_the_sighup_hint(models, monkeypatch):
    from logscore import artifact

    def denied(path, max_bytes):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(artifact, "read_at_most", denied)
    events = Events()
    ModelRegistry(str(models), on_change=events).reload()
    [(name, detail)] = events.of("rejected")
    assert name == "apache-access" and "readable by this process's user" in detail and "send SIGHUP" in detail


def test_a_file_removed_between_the_scan_and_its_reading_is_gone_not_rejected(models, monkeypatch):
    """It was rejected: an ERROR line, model_load_errors_total + 1, and a remedy of permissions."""
    from logscore.model import Model

    real_load = Model.load

    def removed_first(path, **options):
        if os.path.basename(path) in removing:
            os.remove(path)
        return real_load(path, **options)

    monkeypatch.setattr(registry_module.Model, "load", removed_first)
    removing = {"new.onnx"}
    shutil.copy(DEFAULT_MODEL, models / "new.onnx")
    events = Events()
    registry = ModelRegistry(str(models), on_change=events)
    assert registry.reload()
    assert set(registry.snapshot.models) == {"apache-access"} and not registry.snapshot.errors
    assert not events.of("rejected") and not registry.reload()
    # A served model's file changed, then removed as it was read: it serves on, and goes as a removed file does.
    removing = {"apache-access.onnx"}
    serving = registry.snapshot.models["apache-access"]
    shutil.copy(DEFAULT_MODEL, models / ".tmp")
    os.replace(models / ".tmp", models / "apache-access.onnx")
    registry.reload()
    assert registry.snapshot.models["apache-access"] is serving and not registry.snapshot.errors
    assert registry.reload() and not registry.snapshot.models  # the next check: gone, unloaded (no grace)
    assert not events.of("rejected") and [n for n, _ in events.of("unloaded")] == ["apache-access"]


def test_renaming_the_only_model_leaves_requests_naming_none_a_default(tmp_path):
    """`mv m.onnx renamed.onnx` loaded `renamed` while `m` served out its grace beside it: two models,
    no default, 5,992 calls NOT_FOUND in 6 s (probe-registry). The docs promise no gap."""
    directory = tmp_path / "models"
    directory.mkdir()
    shutil.copy(DEFAULT_MODEL, directory / "m.onnx")
    registry = ModelRegistry(str(directory), unload_grace_s=60.0)
    registry.reload()
    assert registry.resolve().name == "m"
    os.rename(directory / "m.onnx", directory / "renamed.onnx")
    assert registry.reload()
    assert sorted(registry.snapshot.models) == ["m", "renamed"]  # m serves on, for requests naming it
    assert registry.resolve().name == "renamed"
    os.remove(directory / "renamed.onnx")  # every file gone: the models serving out their grace answer
    registry.reload()
    shutil.copy(DEFAULT_MODEL, directory / "other.onnx")
    registry.reload()
    assert registry.resolve().name == "other"


def test_a_model_removed_alone_stays_the_default_through_its_grace(tmp_path):
    directory = tmp_path / "models"
    directory.mkdir()
    shutil.copy(DEFAULT_MODEL, directory / "m.onnx")
    registry = ModelRegistry(str(directory), unload_grace_s=60.0)
    registry.reload()
    os.remove(directory / "m.onnx")  # `rm m.onnx; cp new.onnx m.onnx`: no gap in between
    assert registry.reload() and registry.snapshot.leaving == {str(directory / "m.onnx")}
    assert registry.resolve().name == "m"


def test_a_model_removed_beside_another_makes_no_default_of_it_through_its_grace(tmp_path):
    """With `a` and `b` and no default_model, requests naming none were refused; during `rm a.onnx;
    cp new a.onnx` `b` scored them for the grace (forward mode: every unrouted tag, by the wrong model)."""
    directory = tmp_path / "models"
    directory.mkdir()
    for name in ("a", "b"):
        shutil.copy(DEFAULT_MODEL, directory / f"{name}.onnx")
    registry = ModelRegistry(str(directory), unload_grace_s=60.0)
    registry.reload()
    with pytest.raises(ModelNotFound, match="no default model"):
        registry.resolve()
    os.remove(directory / "a.onnx")
    assert registry.reload() and registry.snapshot.leaving == {str(directory / "a.onnx")}
    with pytest.raises(ModelNotFound, match="no default model"):
        registry.resolve()
    shutil.copy(DEFAULT_MODEL, directory / "a.onnx")
    registry.reload()
    with pytest.raises(ModelNotFound, match="no default model"):
        registry.resolve()


def test_a_file_of_countless_tiny_fields_is_refused_without_scanning_it_whole(models, monkeypatch):
    """60 MiB of bytes `08 00` (a field each) took 18.7 s of CPU to scan at every change and SIGHUP, while
    calls slowed from 8 to 94 ms p50 (probe-registry)."""
    from logscore import artifact

    (models / "junk.onnx").write_bytes(b"\x08\x00" * 500_000)
    read = []
    monkeypatch.setattr(artifact, "wire_field", lambda data, pos, read_one=artifact.wire_field: (
        read.append(pos), read_one(data, pos))[1])
    events = Events()
    registry = ModelRegistry(str(models), on_change=events)
    registry.reload()
    assert sorted(registry.snapshot.models) == ["apache-access"]  # a real model's few fields pass
    assert_refused_once(registry, events, "junk", "over 1,000 fields in the file's top level", "re-export it")
    assert len(read) < 2000  # the 500,000 fields of junk are not all read


def test_a_missing_default_or_route_model_is_refused_saying_what_to_do(models, caplog):
    """NOT_FOUND for a missing default or tag-route model said what was wrong but not what to do; the
    log said "set default_model" though it was set, and the no-model reason named a command,
    `logscore export`, that does not exist."""
    from logscore.errors import ModelNotFound
    from logscore.scoring import not_ready_reason

    registry = ModelRegistry(str(models), default_model="web", tag_routes={"syslog.*": "linux"})
    registry.reload()
    with pytest.raises(ModelNotFound, match=r"add web\.onnx to the models directory, or change the sidecar's "
                                            r"default_model \(--default-model\)"):
        registry.resolve()
    with pytest.raises(ModelNotFound, match=r"add linux\.onnx to the models directory, or change the sidecar's "
                                            r"tag_routes \(--tag-routes\)"):
        registry.resolve(tag="syslog.auth")
    sidecar = SimpleNamespace(registry=registry, settings=SimpleNamespace(models_dir=str(models)),
                              _no_default_warned=None)
    with caplog.at_level(logging.INFO, logger="logscore.serve"):
        Sidecar._warn_when_no_default(sidecar)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("default model not loaded") and "set default_model" not in warning
    (models / "apache-access.onnx").unlink()
    registry.reload()
    reason = not_ready_reason(SimpleNamespace(accepting=True, registry=registry, processes=None))
    assert "`logscore train --out DIR/NAME.onnx`" in reason and "export" not in reason


def configmap_volume(directory, stamp: str, files: dict) -> None:
    """Write ``files`` into ``directory`` as the kubelet updates a ConfigMap volume (its atomic writer):
    a new timestamped directory, the ``..data`` link swapped to it by one rename, a top-level link per
    key into ``..data``, the previous directory removed."""
    new = directory / f"..{stamp}"
    new.mkdir()
    for name, source in files.items():
        shutil.copy(source, new / name)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    (directory / "..data_tmp").symlink_to(new.name)
    os.replace(directory / "..data_tmp", directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")
    for entry in directory.iterdir():
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in files:
            entry.unlink()  # a key taken out of the ConfigMap
    if old is not None:
        shutil.rmtree(directory / old)


def test_models_from_a_kubernetes_configmap_volume_reload_when_it_is_updated(tmp_path):
    """docs/deploy/kubernetes-sidecar.yaml mounts the models from a ConfigMap and says replacing a file
    hot-reloads it: the kubelet changes no model's own path, only where ``..data`` points."""
    models, builds = tmp_path / "models", tmp_path / "builds"
    models.mkdir()
    builds.mkdir()
    resaved_with_another_threshold(DEFAULT_MODEL, builds / "retrained.onnx")
    configmap_volume(models, "2026_12_06_10_00_00.000000001", {"apache-access.onnx": DEFAULT_MODEL})
    events = Events()
    registry = ModelRegistry(str(models), on_change=events)
    registry.reload()
    first = registry.snapshot.models["apache-access"].version
    configmap_volume(models, "2026_12_06_10_01_00.000000001", {"apache-access.onnx": builds / "retrained.onnx"})
    assert registry.reload() and registry.snapshot.models["apache-access"].version != first
    configmap_volume(models, "2026_12_06_10_02_00.000000001", {"apache-access.onnx": builds / "retrained.onnx",
                                                               "shop.onnx": DEFAULT_MODEL})
    assert registry.reload() and set(registry.snapshot.models) == {"apache-access", "shop"}
    configmap_volume(models, "2026_12_06_10_03_00.000000001", {"shop.onnx": DEFAULT_MODEL})
    assert registry.reload() and set(registry.snapshot.models) == {"shop"}
    assert not events.of("rejected") and [n for n, _ in events.of("loaded")] == ["apache-access"] * 2 + ["shop"]
