"""A loaded model: featurize a batch, run the ONNX graph, threshold, explain.

This is the one scoring path. Every surface (CLI, gRPC, HTTP, forward) calls
``Model.score``; training calls ``run_graph`` on the same featurizer output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnxruntime as ort

from .artifact import Artifact, read_artifact
from .errors import ModelLoadError
from .features import FeatureBatch, Featurizer
from .graph_shortcut import MIN_RECORDS as SHORTCUT_MIN_RECORDS, rarity_shortcut
from .records import DEFAULT_MAX_LINE_CHARS
from .entities import CLIENT_FIELDS
from .sessions import SessionTracker
from .timestamps import TIME_FIELDS
from .windows import LEVELS_READ, fields_read


SCORE_CHUNK = 512  # records featurized and run at once (bounds the working memory of big batches)
# Keys an explanation step sorts at once (whole records: a record with more is a step alone). NOTE: 512
# records of 2 KB CJK URLs hold 1.7 million keys; naming them at once took 130 MB of arrays beside the
# batch, and a sidecar on the shipped defaults went past its 350 MiB under such calls with explain=20.
EXPLAIN_SLICE_KEYS = 65_536
# From this share of a batch flagged, its flagged records are named within it rather than featurized
# again on their own (measured break-even 3-4 %, batches of 1,000 of the real log with novel lines mixed in).
FLAGGED_NAMED_IN_BATCH = 1 / 32


def make_session(model_bytes: bytes, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # NOTE: on 2 cores a second intra-op thread gains nothing below batch 16 and
    # takes the core the server needs (see docs/performance.md).
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def graph_inputs(batch: FeatureBatch) -> dict[str, np.ndarray]:
    return {"keys": batch.keys, "key_weights": batch.weights, "rows": batch.rows, "dense": batch.dense}


def run_graph(session: ort.InferenceSession, batch: FeatureBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score [N], raw_scores [N, M], key_surprise [nnz])."""
    score, raw, surprise = session.run(["score", "raw_scores", "key_surprise"], graph_inputs(batch))
    return score, raw, surprise


@dataclass
class Scored:
    """Scores of one batch, in input order."""

    scores: np.ndarray  # float32 [N] in [0, 1]
    is_anomaly: np.ndarray  # bool [N]
    raw_scores: np.ndarray  # float32 [N, detectors]
    truncated: np.ndarray  # bool [N]
    unparsed: np.ndarray  # bool [N]
    explanations: Optional[list[Sequence[str]]] = field(default=None)  # [] or () where none is named
    fields: Optional[list] = None  # normalized field maps (training windows and clients: Model.needs_fields)
    novelty: Optional[np.ndarray] = None  # float [N] share of keys never seen in training (models with clients)
    columns: Optional[dict] = None  # the fields windows and clients read, as text (Model.behaviour_fields)
    session_notes: Optional[list] = None  # session models: per record, what to note (sessions.SessionTracker)

    def slice(self, start: int, stop: int, explain: int, named: int = 0) -> "Scored":
        """Records start..stop, with at most ``explain`` features named each (``named``: the most
        any record holds, when known: a caller asking for as many keeps the lists as they are,
        not a copy of each, 1.1 µs a flagged record in a flood)."""
        explanations = None
        if explain and self.explanations is not None:
            explanations = self.explanations[start:stop]
            if not named or explain < named:
                explanations = [e[:explain] for e in explanations]
        return Scored(self.scores[start:stop], self.is_anomaly[start:stop], self.raw_scores[start:stop],
                      self.truncated[start:stop], self.unparsed[start:stop], explanations,
                      self.fields[start:stop] if self.fields is not None else None,
                      self.novelty[start:stop] if self.novelty is not None else None,
                      {name: column[start:stop] for name, column in self.columns.items()}
                      if self.columns is not None else None,
                      self.session_notes[start:stop] if self.session_notes is not None else None)

    @staticmethod
    def concatenate(parts: Sequence["Scored"], explained: bool) -> "Scored":
        """Consecutive results as one, in order."""
        if len(parts) == 1:
            return parts[0]
        return Scored(*(np.concatenate([getattr(p, name) for p in parts]) for name in
                        ("scores", "is_anomaly", "raw_scores", "truncated", "unparsed")),
                      [e for p in parts for e in p.explanations] if explained else None,
                      [f for p in parts for f in p.fields] if parts[0].fields is not None else None,
                      np.concatenate([p.novelty for p in parts]) if parts[0].novelty is not None else None,
                      {name: [v for p in parts for v in p.columns[name]] for name in parts[0].columns}
                      if parts[0].columns is not None else None,
                      [n for p in parts for n in p.session_notes] if parts[0].session_notes is not None else None)


def carries_behaviour(metadata: dict) -> bool:
    """Whether a model's metadata holds window forecasters or a client detector."""
    return bool(metadata.get("windows") or metadata.get("entities"))


def behaviour_fields(metadata: dict, client_key: Optional[str] = None) -> tuple[str, ...]:
    """The record fields a model's window and client detectors read (none without them): their
    keys, and the record's own time (a late record is left out of both: behaviour.Lateness)."""
    if not carries_behaviour(metadata):
        return ()
    names: list[str] = []
    if metadata.get("windows"):
        names += fields_read(metadata["windows"]["dimensions"])
    if metadata.get("entities"):
        names += [client_key or str(metadata["entities"]["key"]), *CLIENT_FIELDS]
    return tuple(dict.fromkeys(names + list(TIME_FIELDS)))


def trained_levels_read(path: str, metadata: dict) -> int:
    """How the model's windows read levels (windows.LEVELS_READ as trained; 1 before it existed).
    A newer reading than this logscore knows is refused: read the older way, its windows would
    count keys it never learned (level=error against trained level=50), and say nothing of it."""
    levels_read = int((metadata.get("windows") or {}).get("levels_read", 1))
    if levels_read > LEVELS_READ:
        raise ModelLoadError(f"{path}: made by a newer logscore (its windows read records as version {levels_read}; "
                             f"this logscore reads up to {LEVELS_READ}); upgrade logscore here, or serve a model "
                             "this version trained")
    return levels_read


def novelty_shares(batch: FeatureBatch, surprise: np.ndarray) -> np.ndarray:
    """Per record, the share of its feature keys never seen in training (surprise 1)."""
    keys = np.bincount(batch.rows, minlength=batch.size)
    unseen = np.bincount(batch.rows, weights=(surprise >= 1.0), minlength=batch.size)
    return unseen / np.maximum(keys, 1)


class Model:
    """One artifact, ready to score. Thread-safe: onnxruntime sessions are.

    ``max_line_chars``: the truncation rule (raw lines longer than this are cut before
    parsing); every surface scores with the same value (sidecar: max_record_bytes).
    """

    def __init__(self, artifact: Artifact, threads: int = 1, max_line_chars: int = DEFAULT_MAX_LINE_CHARS,
                 client_key: Optional[str] = None, also_fields: Sequence[str] = (), levels_read: Optional[int] = None):
        """``client_key``: the field naming a client when it is not the model's own (setting entity_key).
        ``also_fields``: fields read besides its own (training: the behaviour fields the model is
        about to learn, read as the sidecar will, their aliases applied). ``levels_read``: how
        levels are read (windows.LEVELS_READ; default: as the model was trained)."""
        self.artifact = artifact
        meta = artifact.metadata
        try:
            # Windows and clients (behaviour.py) read a few fields as text columns, read with the
            # rest; whole field maps only for training them (timestamps).
            self.behaviour_fields = behaviour_fields(meta, client_key)
            levels_read = levels_read or trained_levels_read(artifact.path, meta)
            self.featurizer = Featurizer(meta["featurizer"], max_line_chars,
                                         also_fields=(*self.behaviour_fields, *also_fields),
                                         message_levels=levels_read >= 2)
            self.threshold = float(meta["calibration"]["threshold"])
            self.detectors = [d["kind"] for d in meta["detectors"]]
            self._support = float(meta["rarity"]["support"])
            # Models of rarity alone never read the dense block: skip building it.
            self.needs_dense = bool(meta.get("needs_dense", True))
            self.tracks_novelty = bool(meta.get("entities"))  # the client detector reads it
            self.needs_fields = False
            sessions = self.featurizer.sessions
            self.sessions = (SessionTracker(sessions, self.featurizer.max_field_chars, max_line_chars)
                             if sessions is not None else None)
        except ModelLoadError:
            raise
        except Exception as error:  # malformed metadata, or metadata a newer logscore wrote
            # NOTE: a rolling upgrade serves new models on old sidecars for a while: an option this
            # version does not know is most often a newer logscore's, not damage.
            raise ModelLoadError(f"{artifact.path}: logscore metadata is incomplete or invalid "
                                 f"({type(error).__name__}: {error}); a model made by a newer logscore needs "
                                 "that version here (upgrade logscore before copying its models in), else "
                                 "re-export it") from None
        self.name = str(meta.get("name") or Path(artifact.path).stem)
        try:
            self.session = make_session(artifact.model_bytes, threads)
        except Exception as error:
            raise ModelLoadError(f"{artifact.path}: onnxruntime cannot load the graph: {error}") from None
        # The graph's rarity lookup and sums done by the compiled featurizer, same results (None: run whole).
        self.shortcut = rarity_shortcut(artifact.model_bytes)

    @classmethod
    def load(cls, path: str | Path, threads: int = 1, max_line_chars: int = DEFAULT_MAX_LINE_CHARS,
             client_key: Optional[str] = None, max_bytes: Optional[int] = None) -> "Model":
        return cls(read_artifact(path, max_bytes), threads, max_line_chars, client_key)

    def run_graph(self, batch: FeatureBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(score [N], raw_scores [N, M], key_surprise [nnz]) of a featurized batch."""
        if self.shortcut is not None and batch.size >= SHORTCUT_MIN_RECORDS:
            return self.shortcut.run(self.session, batch)
        return run_graph(self.session, batch)

    @property
    def version(self) -> str:
        return self.artifact.version

    @property
    def metadata(self) -> dict:
        return self.artifact.metadata

    def score(self, records: Sequence[object], explain: int = 0, explain_flagged: int = 0,
              threshold: Optional[float] = None) -> Scored:
        """Score records (field maps or raw lines); ``explain`` = features to name per record;
        ``explain_flagged`` = features to name per record over the threshold, none for the others."""
        if len(records) > SCORE_CHUNK:
            # Bounded working memory for big batches; same scores as one call.
            parts = [self.score(records[i: i + SCORE_CHUNK], explain, explain_flagged, threshold)
                     for i in range(0, len(records), SCORE_CHUNK)]
            return Scored.concatenate(parts, explain > 0 or explain_flagged > 0)
        session_notes = None
        if self.sessions is not None:
            records, session_notes = self.sessions.track_noting(records)  # each record as its session so far
        batch = self.featurizer.transform(records, dense=self.needs_dense, with_fields=self.needs_fields,
                                          columns=self.behaviour_fields)
        score, raw, surprise = self.run_graph(batch)
        cut = self.threshold if threshold is None else threshold
        result = Scored(score, score >= cut, raw, batch.truncated, batch.unparsed, fields=batch.fields,
                        columns=batch.columns, session_notes=session_notes)
        if self.tracks_novelty:
            result.novelty = novelty_shares(batch, surprise)
        if explain > 0:
            result.explanations = self._explain(batch, surprise, max(explain, explain_flagged))
        elif explain_flagged > 0:
            result.explanations = self._explain_flagged(records, result.is_anomaly, explain_flagged, batch, surprise)
        return result

    def _explain_flagged(self, records: Sequence[object], flags: np.ndarray, top: int, batch: FeatureBatch,
                         surprise: np.ndarray) -> list[Sequence[str]]:
        """Explanations of the flagged records, none for the others.

        A few flagged records are featurized again on their own (their values mostly in the
        featurizer's caches). Explaining them within their batch cost 1.4 µs a record more of the
        real access log (0.23 % flagged), this 0.25 (1.9 to score), and still 0.1 more once only the
        keys named were traced. From about 3 % flagged (FLAGGED_NAMED_IN_BATCH) the batch scored is
        named as it is: featurizing and running the graph again cost more, the more so as a cache
        that turned over keeps no value computed once (its doorkeeper): docs/performance.md."""
        # NOTE: one empty tuple shared by the records not flagged: a list each made the garbage
        # collector run more often, 0.2 µs a record (about all this cost when nothing was flagged).
        explanations: list[Sequence[str]] = [()] * len(records)
        flagged = np.flatnonzero(flags).tolist()
        if len(flagged) >= FLAGGED_NAMED_IN_BATCH * len(records):  # (none flagged of none: nothing to name)
            for i, named in enumerate(self._explain(batch, surprise, top, only=flags)):
                if flags[i]:
                    explanations[i] = named
        elif flagged:
            batch = self.featurizer.transform([records[i] for i in flagged], dense=self.needs_dense)
            _, _, surprise = self.run_graph(batch)
            for i, named in zip(flagged, self._explain(batch, surprise, top)):
                explanations[i] = named
        return explanations

    def _explain(self, batch: FeatureBatch, surprise: np.ndarray, top: int,
                 only: Optional[np.ndarray] = None) -> list[list[str]]:
        """The features that made each record unusual, most unusual first (``only``: of the records
        true there, the others get an empty list)."""
        explanations: list[list[str]] = [[] for _ in range(batch.size)]
        for start, stop in record_slices(batch.rows, EXPLAIN_SLICE_KEYS):
            self._explain_slice(batch, surprise, top, only, slice(start, stop), explanations)
        return explanations

    def _explain_slice(self, batch: FeatureBatch, surprise: np.ndarray, top: int, only: Optional[np.ndarray],
                       keys: slice, explanations: list[list[str]]) -> None:
        """_explain of the records whose keys are ``keys``."""
        contribution, records = batch.weights[keys] * surprise[keys], batch.rows[keys]
        # Only what contributed is sorted (a NaN too: it is shown, not hidden); in a flood that is
        # under half of the flagged records' features, and sorting was most of this step.
        contributed = ~(contribution <= 0)
        named = np.flatnonzero(contributed if only is None else contributed & only[records])
        order = named[np.lexsort((-contribution[named], records[named]))]  # by record, most unusual first
        # Each record's first ``top`` features, without a Python step per feature: a feature's rank
        # is its place after the first of its record's.
        rows = records[order]
        place = np.arange(rows.size)
        first = np.maximum.accumulate(np.where(np.r_[True, rows[1:] != rows[:-1]], place, 0))
        chosen = order[place - first < top] + keys.start
        if not chosen.size:
            return
        # Each distinct rarity described once (a flood's flagged records share most of theirs), and
        # each record's names taken as one slice: a step per feature was 2 µs a flagged record.
        rarities, which = np.unique(surprise[chosen], return_inverse=True)
        described = [self.describe_rarity(rarity) for rarity in rarities.tolist()]
        texts = [f"{name} ({described[k]})" for name, k in zip(batch.names(chosen), which.ravel().tolist())]
        rows = batch.rows[chosen]
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        for row, start, end in zip(rows[starts].tolist(), starts.tolist(), np.r_[starts[1:], rows.size].tolist()):
            explanations[row] = texts[start:end]

    def describe_rarity(self, surprise: float) -> str:
        if math.isnan(surprise):  # a damaged model's: named all the same, as what stood out
            return "rarity unknown"
        if surprise >= 1.0:
            return "never seen in training"
        # Inverse of surprise = 1 - log1p(count) / log1p(support); see training.rarity.
        count = math.expm1((1.0 - float(surprise)) * math.log1p(self._support))
        return f"rare: in about {max(1, round(count))} training records"


def record_slices(rows: np.ndarray, most_keys: int):
    """Ranges [start, stop) of ``rows`` (a batch's record of each key, in record order) holding whole
    records, each of ``most_keys`` keys or fewer but for a record that alone holds more."""
    start, total = 0, rows.size
    while start < total:
        stop = min(start + most_keys, total)
        if stop < total and rows[stop] == rows[stop - 1]:  # a record cut: end before it, or after it if it began here
            before = int(np.searchsorted(rows, rows[stop], side="left"))
            stop = before if before > start else int(np.searchsorted(rows, rows[stop], side="right"))
        yield start, stop
        start = stop
