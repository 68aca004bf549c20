"""Loaded models, routing, and hot reload with validation and atomic swap.

Routing is data: an explicit model name wins; else the first tag glob that
matches; else the default model. Per entity, a record whose ``entity_field``
holds V is scored by ``<model>@V`` when such a model is loaded (per-host models).
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .artifact import DEFAULT_MAX_MODEL_BYTES, UnreadableModelFile
from .errors import InvalidRequest, ModelLoadError, ModelNotFound
from .model import Model
from .records import DEFAULT_MAX_LINE_CHARS, MAX_NAME_CHARS, cut_text, is_utf8, to_text
from .sessions import SessionCounts

log = logging.getLogger("logscore.registry")

# Scored after loading, before a model may serve: it must not fail on odd input.
PROBE_RECORDS = ["", "probe line", "\ufffd\x00", {"message": "probe"}]
# NOTE: a served model whose file went away serves on this long when the directory is watched:
# `rm m.onnx; cp new.onnx m.onnx` (instead of a rename) must not leave its records unscored until
# the next check.
UNLOAD_GRACE_S = 5.0


@dataclass(frozen=True)
class FileState:
    """What tells a changed file. NOTE: mtime and size alone missed a symlink swap to a file of the same
    size and mtime (reproducible builds set mtimes), and a fix by chmod: the inode and ctime tell them."""
    mtime_ns: int
    size: int
    inode: int = 0
    device: int = 0
    ctime_ns: int = 0
    refusal: str = ""  # why the entry cannot be loaded before it is read (an unusable link); "" when readable

    @classmethod
    def of(cls, stat: os.stat_result) -> "FileState":
        return cls(stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_dev, stat.st_ctime_ns)


NOT_UTF8_NAME = ("{path}: the file name is not UTF-8, and a model is named after its file (metrics, ListModels, "
                 "routes); rename the file to a UTF-8 name")


def not_a_file(entry: os.DirEntry) -> Optional[FileState]:
    """A `*.onnx` entry that is no file: refused, said once (it was skipped without a word, and a models
    directory holding only such entries failed the start saying "no .onnx files"); None when gone."""
    if not os.path.lexists(entry.path):  # deleted since the listing
        return None
    if entry.is_dir():
        why = ("a directory, not a model file (Docker makes one where it bind-mounts a file that does not "
               "exist on the host); mount the model file by its real path, or remove the directory")
    elif entry.is_symlink():
        why = f"a symbolic link to {os.readlink(entry.path)!r}, which does not exist; fix or remove the link"
    else:
        why = "not a regular file (a socket, a FIFO or a device); remove it"
    return FileState(0, 0, refusal=f"{entry.path}: {why}")


def shown_path(path: str) -> str:
    """A path as UTF-8 text, its other bytes as \\xNN: for logs, metrics' labels and /readyz."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# Said once per entry when a look at it fails (a symbolic link loop, a link the sidecar may not follow).
UNUSABLE_ENTRY = "{path}: cannot look at this entry of the models directory ({reason}); fix or remove it"


@dataclass
class Snapshot:
    """An immutable view of the loaded models; replaced whole on reload."""

    models: dict[str, Model] = field(default_factory=dict)
    files: dict[str, FileState] = field(default_factory=dict)  # path -> state when loaded or rejected
    errors: dict[str, str] = field(default_factory=dict)  # path -> why it was rejected
    # Paths of loaded models whose files are gone, serving out the unload grace.
    leaving: frozenset[str] = frozenset()
    # The path of the default model before those files went ("" when there was none): only when it is
    # among them do they give way to the one model staying (see ModelRegistry.default).
    leaving_default: str = ""


# How a caller names a model: the gRPC field and HTTP parameter `model` (the Fluentd filter's `model`
# too); `logscore client` and `logscore feedback` say their flag, --model, in its place (cli.call_failure).
REQUEST_MODEL = "the request's `model` (gRPC and HTTP; the Fluentd filter's `model` setting)"


class ModelRegistry:
    def __init__(self, models_dir: str, default_model: Optional[str] = None,
                 tag_routes: Optional[dict] = None, entity_field: Optional[str] = None,
                 on_change=None, max_line_chars: int = DEFAULT_MAX_LINE_CHARS, client_key: Optional[str] = None,
                 unload_grace_s: float = 0.0, max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES):
        self.models_dir = Path(models_dir)
        self.max_model_bytes = max_model_bytes
        self.max_line_chars = max_line_chars
        self.client_key = client_key  # the field naming a client, when not the models' own (entity_key)
        self.default_model = default_model
        self.tag_routes = list((tag_routes or {}).items())
        self.entity_field = entity_field
        self.snapshot = Snapshot()
        self._reload_lock = threading.Lock()
        self.unload_grace_s = unload_grace_s
        self._unlisted_because: Optional[str] = None  # why the directory could not be listed, as last said
        self._missing_since: dict[str, float] = {}  # loaded models' files found missing: since when
        self._on_change = on_change or (lambda event, name, detail: None)

    # --- loading ---------------------------------------------------------------
    def reload(self, retry_rejected: bool = False) -> bool:
        """Load new and changed files, drop removed ones; returns whether anything changed.

        A file that fails to load or to score the probe is reported and leaves
        the model it would replace serving. ``retry_rejected`` (SIGHUP) tries rejected files again
        though they look unchanged: what failed may lie outside the file (a read error, a parent
        directory's permissions).
        """
        with self._reload_lock:
            old = self.snapshot
            current = self._scan()
            by_path = {m.artifact.path: name for name, m in old.models.items()}
            serving_on = self._within_grace(set(old.files) - set(current), by_path)
            current.update({path: old.files[path] for path in serving_on})
            retried = set(old.errors) & set(current) if retry_rejected else set()
            if current == old.files and not retried and serving_on == old.leaving:
                return False
            models = dict(old.models)
            errors = {p: e for p, e in old.errors.items() if p in current}
            for path in set(old.files) - set(current):
                name = by_path.get(path)
                if name is not None and models.get(name) is old.models[name]:
                    del models[name]
                    self._on_change("unloaded", name, path)
                errors.pop(path, None)
            for path, state in list(current.items()):
                if old.files.get(path) == state and path not in retried:
                    continue
                name = Path(path).stem
                if state.refusal:
                    errors[path] = state.refusal
                    self._on_change("rejected", name, state.refusal)
                    continue
                try:
                    model = Model.load(path, max_line_chars=self.max_line_chars, client_key=self.client_key,
                                       max_bytes=self.max_model_bytes)
                    serving = old.models.get(by_path.get(path, ""))
                    if serving is not None and serving.version == model.version:
                        # NOTE: the file's state changed, not its content (a chmod or chown: ctime only):
                        # it serves on. A new Model started a session model's open sessions afresh.
                        errors.pop(path, None)
                        continue
                    model.name = name  # the file name routes, whatever name the model was trained with
                    model.score(PROBE_RECORDS, explain=1)
                except UnreadableModelFile as error:
                    if error.errno == errno.ENOENT:  # removed since the scan: gone, not rejected
                        self._gone_before_read(path, old, current, errors)
                        continue
                    errors[path] = f"{error} (a fix that leaves the file unchanged, as of its directory: send SIGHUP)"
                    self._on_change("rejected", name, errors[path])
                    continue
                except ModelLoadError as error:
                    errors[path] = str(error)
                    self._on_change("rejected", name, str(error))
                    continue
                except Exception as error:  # the probe failed: a broken graph or featurizer
                    errors[path] = (f"{path}: failed the probe batch: {type(error).__name__}: {error}; re-export it "
                                    "with `logscore train`, or serve it with the logscore version that made it")
                    self._on_change("rejected", name, errors[path])
                    continue
                if model.sessions is not None:  # the probe is no traffic: its empty record is not counted
                    model.sessions.counts = SessionCounts()
                errors.pop(path, None)
                models[name] = model
                self._on_change("loaded", name, f"{path} version {model.version}")
            self.snapshot = Snapshot(models, current, errors, frozenset(serving_on),
                                     self._default_before(old, serving_on))  # the atomic swap
            return True

    def _default_before(self, old: Snapshot, serving_on: set[str]) -> str:
        """The path of the default model before the files of the models serving out their grace went."""
        if not serving_on:
            return ""
        if old.leaving:  # some went before: the default from before the first went
            return old.leaving_default
        try:
            return self.default(old.models, frozenset(), "").artifact.path
        except ModelNotFound:
            return ""

    @staticmethod
    def _gone_before_read(path: str, old: "Snapshot", current: dict[str, FileState], errors: dict[str, str]) -> None:
        """A file removed between the scan and its open: as the scan had found it then (its model, if
        any, serves on; the next check finds it missing and unloads it, after the grace). It was
        rejected: an ERROR, a load error counted, and a remedy of permissions."""
        log.info("model file removed as it was read; the next check sees it gone", extra={"path": path})
        if path in old.files:
            current[path] = old.files[path]
        else:
            del current[path]
            errors.pop(path, None)

    def _within_grace(self, missing: set[str], by_path: dict[str, str]) -> set[str]:
        """The loaded models' files found missing that serve on: missing for less than the grace."""
        now = time.monotonic()
        for path in missing - set(self._missing_since):
            if path in by_path and self.unload_grace_s > 0:
                log.warning("model file gone; it serves on unless the file is back within the grace",
                            extra={"model": by_path[path], "path": path, "grace_s": self.unload_grace_s})
        self._missing_since = {p: self._missing_since.get(p, now) for p in missing if p in by_path}
        return {p for p, since in self._missing_since.items() if now - since < self.unload_grace_s}

    def _scan(self) -> dict[str, FileState]:
        states = {}
        try:
            entries = list(os.scandir(self.models_dir))
        except OSError as error:
            self._listed(error)
            return dict(self.snapshot.files)
        self._listed(None)
        for entry in entries:
            if entry.name.endswith(".onnx") and not entry.name.startswith("."):
                if not is_utf8(entry.name):
                    # NOTE: its name, a model's name, broke /metrics (500 until restart) and ListModels
                    shown = shown_path(entry.path)
                    states[shown] = FileState(0, 0, refusal=NOT_UTF8_NAME.format(path=shown))
                    continue
                state = self._entry_state(entry)
                if state is not None:
                    states[entry.path] = state
        return states

    @staticmethod
    def _entry_state(entry: os.DirEntry) -> Optional[FileState]:
        """The entry's state; None when it is no file to load or is gone since the listing.

        NOTE: an OSError here (a symlink loop, a link into a directory the sidecar may not enter, a file
        deleted between the listing and its stat) used to end hot reload for good, unlogged; it now
        concerns that entry alone, which is refused (said once) while the others load."""
        try:
            if not entry.is_file():
                return not_a_file(entry)
            stat = entry.stat()
        except FileNotFoundError:  # deleted since the listing: as if not listed
            return None
        except OSError as error:
            return FileState(0, 0, refusal=UNUSABLE_ENTRY.format(path=entry.path, reason=error.strerror or error))
        return FileState.of(stat)

    def _listed(self, error: Optional[OSError]) -> None:
        """Say once that the directory cannot be listed (it was every check: 1,800 lines an hour), and
        once when it can be again."""
        said = self._unlisted_because
        if error is not None and str(error) != said:
            log.error("cannot list models directory; the models loaded serve on and hot reload waits for it: "
                      "restore the directory (or make it readable by the sidecar's user)",
                      extra={"dir": str(self.models_dir), "error": str(error)})
        elif error is None and said is not None:
            log.info("models directory listed again; hot reload goes on", extra={"dir": str(self.models_dir)})
        self._unlisted_because = str(error) if error is not None else None

    # --- routing ---------------------------------------------------------------
    def resolve(self, name: str = "", tag: str = "") -> Model:
        """The model for a request (before per-entity routing)."""
        snapshot = self.snapshot
        models = snapshot.models
        if name:
            model = models.get(name)
            if model is None:
                # NOTE: echoed whole, a name of 9,000 characters made the error longer than gRPC's
                # metadata takes: the caller got RESOURCE_EXHAUSTED ("retry later") for a wrong name
                if len(name) > MAX_NAME_CHARS:
                    raise InvalidRequest(f"model {cut_text(name)!r}: no model is named so long (at most "
                                         f"{MAX_NAME_CHARS} characters); loaded: {self._names(models)}")
                raise ModelNotFound(f"model {name!r} is not loaded; loaded: {self._names(models)}")
            return model
        if tag:
            for pattern, target in self.tag_routes:
                if fnmatch.fnmatchcase(tag, pattern):
                    model = models.get(target)
                    if model is None:
                        raise ModelNotFound(f"tag {cut_text(tag)!r} routes to model {target!r}, which is not loaded; "
                                            f"loaded: {self._names(models)}; add {target}.onnx to the models "
                                            "directory, or change the sidecar's tag_routes (--tag-routes)")
                    return model
        return self.default(models, snapshot.leaving, snapshot.leaving_default)

    def unloaded_routes(self) -> dict[str, str]:
        """Tag routes (glob: model) naming a model that is not loaded: their records are refused NOT_FOUND."""
        models = self.snapshot.models
        return {pattern: name for pattern, name in self.tag_routes if name not in models}

    def default(self, models: dict[str, Model], leaving: Optional[frozenset[str]] = None,
                leaving_default: Optional[str] = None) -> Model:
        """The model of requests naming none and matching no tag route. ``leaving``: paths of models
        serving out the unload grace, ``leaving_default``: the default's path before they went (the
        snapshot's when None)."""
        if self.default_model:
            model = models.get(self.default_model)
            if model is None:
                raise ModelNotFound(f"default model {self.default_model!r} is not loaded; "
                                    f"loaded: {self._names(models)}; add {self.default_model}.onnx to the models "
                                    "directory, or change the sidecar's default_model (--default-model)")
            return model
        if "apache-access" in models:
            return models["apache-access"]
        global_models = [m for n, m in models.items() if "@" not in n]
        # NOTE: the default serving out its grace gives way to the one model staying: `mv m.onnx
        # renamed.onnx`, the only model, loaded `renamed` while `m` served on, and no default for 5 s
        # (5,992 calls NOT_FOUND). Only the default does: with `a` and `b` and no default, `rm a.onnx;
        # cp new a.onnx` made `b` the default for the grace (review, session 28).
        leaving = self.snapshot.leaving if leaving is None else leaving
        leaving_default = self.snapshot.leaving_default if leaving_default is None else leaving_default
        staying = [m for m in global_models if m.artifact.path not in leaving]
        if leaving_default in leaving and len(staying) == 1:
            return staying[0]
        if len(global_models) == 1:  # (its file gone: `rm m.onnx; cp new.onnx m.onnx` leaves no gap)
            return global_models[0]
        # (forward mode has no model field: its records are routed by tag)
        raise ModelNotFound(f"no model named in the request and no default model: give {REQUEST_MODEL} one of: "
                            f"{self._names(models)}; or route tags to them (tag_routes: forward mode), or set the "
                            "sidecar's default_model")

    def for_entity(self, model: Model, value: object) -> Model:
        """``<model>@<value>`` when loaded, else the model itself. NOTE: the value as text: Fluentd
        sends what in_tail read as binary strings (bytes), and `<model>@b'web1'` was never found."""
        entity_model = self.snapshot.models.get(f"{model.name}@{to_text(value)}")
        return entity_model if entity_model is not None else model

    @staticmethod
    def _names(models: dict) -> str:
        return ", ".join(sorted(models)) or "(none)"
