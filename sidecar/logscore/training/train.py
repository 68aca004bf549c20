"""Train on normal records, calibrate on held-out ones, export one ONNX artifact.

    records ─► reservoir sample ─► k folds
    each fold: fit on the others (featurizer.fit ─► featurize ─► key frequencies
               + detectors.fit) ─► raw scores of the fold through the ONNX graph
               (the same onnxruntime path as serving)
    out-of-fold raw scores ─► empirical CDF per detector (+ one over their max
               for ensembles) ─► threshold
    all records ─► the final fit ─► graph + calibration + metadata
"""

from __future__ import annotations

import datetime
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .. import __version__
from ..artifact import FORMAT_VERSION, HASH_KEY, METADATA_KEY, content_hash
from ..errors import ConfigError, InputError
from ..features import Featurizer
from ..model import make_session
from ..sessions import SessionSpec, SessionTracker
from .detectors import DETECTORS, Detector, RarityTable
from .graph import GraphBuilder
from .streaming import featurize_for_fit, raw_scores

Progress = Callable[[str, int, Optional[int], str], None]  # stage, done, total, unit


def quiet(stage: str, done: int, total: Optional[int], unit: str = "records") -> None:
    """The default progress callback: says nothing."""


@dataclass
class TrainOptions:
    spec: dict
    detectors: Sequence[str] = ("rarity",)
    detector_params: dict = field(default_factory=dict)  # kind -> scikit-learn/numpy parameters
    folds: int = 5
    target_fpr: float = 0.001
    threshold_rule: str = "fpr"  # or "sigma": mean + k·σ of held-out scores (AICoE's rule)
    sigma: float = 3.0
    max_records: int = 1_000_000
    support: Optional[float] = None
    seed: int = 0
    name: str = "model"
    inputs: Sequence[str] = ()
    chunk: int = 2048

    def validate(self) -> None:
        unknown = [d for d in self.detectors if d not in DETECTORS]
        if unknown or not self.detectors:
            raise ConfigError(f"unknown detector(s) {', '.join(unknown) or '(none given)'}; "
                              f"use any of: {', '.join(DETECTORS)}")
        if not 2 <= self.folds <= 20:
            raise ConfigError(f"folds must be between 2 and 20, not {self.folds}")
        if not 0.0 < self.target_fpr < 0.5:
            raise ConfigError(f"target false-positive rate must be between 0 and 0.5, not {self.target_fpr}")
        if self.threshold_rule not in ("fpr", "sigma"):
            raise ConfigError(f"threshold rule must be 'fpr' or 'sigma', not {self.threshold_rule!r}")


def reservoir_sample(records: Iterable[object], size: int, seed: int,
                     progress: Progress = quiet) -> tuple[list[object], int]:
    """A uniform sample of at most ``size`` records from a stream of unknown length (Algorithm R)."""
    rng = random.Random(seed)
    sample: list[object] = []
    seen = 0
    for seen, record in enumerate(records, start=1):
        if len(sample) < size:
            sample.append(record)
        else:
            slot = rng.randrange(seen)
            if slot < size:
                sample[slot] = record
        if seen % 50_000 == 0:
            progress("reading", seen, None, "records")
    return sample, seen


def ecdf_table(values: np.ndarray, max_knots: int = 2048, exact_tail: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Knots (sorted distinct values) and levels (fraction of values <= knot), levels[0] = 0.

    Past ``max_knots`` distinct values the top ``exact_tail`` stay exact (the
    threshold lives there) and the body is sampled evenly.
    """
    distinct, counts = np.unique(values.astype(np.float32), return_counts=True)
    levels = np.cumsum(counts) / len(values)
    if len(distinct) > max_knots:
        body = np.linspace(0, len(distinct) - exact_tail - 1, max_knots - exact_tail).round().astype(int)
        keep = np.concatenate([np.unique(body), np.arange(len(distinct) - exact_tail, len(distinct))])
        distinct, levels = distinct[keep], levels[keep]
    return distinct, np.concatenate([[0.0], levels]).astype(np.float32)


def apply_ecdf(values: np.ndarray, knots: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Numpy twin of GraphBuilder.ecdf: levels[number of knots strictly below value]."""
    return levels[np.searchsorted(knots, values.astype(np.float32), side="left")]


def assemble_graph(width: int, table: RarityTable, detectors: Sequence[Detector],
                   calibration: Optional[dict] = None, metadata: Optional[dict] = None):
    """The model graph; without calibration, ``score`` is the first raw score (used to calibrate)."""
    g = GraphBuilder(width)
    surprise = table.build(g)
    raws = [d.build(g, surprise) for d in detectors]
    axis = g.const([1], dtype=np.int64)
    raw_matrix = g.op("Concat", [g.op("Unsqueeze", [r, axis]) for r in raws], axis=1)
    score = raws[0]
    if calibration is not None:
        calibrated = [g.ecdf(r, c["knots"], c["levels"]) for r, c in zip(raws, calibration["detectors"])]
        score = calibrated[0]
        if len(calibrated) > 1:
            stacked = g.op("Concat", [g.op("Unsqueeze", [c, axis]) for c in calibrated], axis=1)
            combined = g.op("ReduceMax", [stacked, axis], keepdims=0)
            score = g.ecdf(combined, *calibration["combined"])
    props = {}
    if metadata is not None:
        props[METADATA_KEY] = json.dumps(metadata, sort_keys=True)
    model = g.finish({"score": score, "raw_scores": raw_matrix, "key_surprise": surprise}, props)
    if metadata is not None:
        model.metadata_props.add(key=HASH_KEY, value=content_hash(model.graph.SerializeToString(),
                                                                 props[METADATA_KEY]))
    return model


def calibrate(raw: np.ndarray) -> tuple[dict, np.ndarray]:
    """ECDF tables from out-of-fold raw scores, and those records' calibrated scores."""
    tables = [ecdf_table(raw[:, i]) for i in range(raw.shape[1])]
    calibrated = np.column_stack([apply_ecdf(raw[:, i], *t) for i, t in enumerate(tables)])
    calibration = {"detectors": [{"knots": k, "levels": lv} for k, lv in tables]}
    if raw.shape[1] > 1:
        combined = calibrated.max(axis=1)
        calibration["combined"] = ecdf_table(combined)
        return calibration, apply_ecdf(combined, *calibration["combined"])
    return calibration, calibrated[:, 0]


def choose_threshold(calibrated: np.ndarray, options: TrainOptions) -> float:
    if options.threshold_rule == "sigma":
        return float(min(calibrated.mean() + options.sigma * calibrated.std(), 1.0))
    return 1.0 - options.target_fpr


@dataclass
class Fitted:
    """Everything fit on one set of records: featurizer state, key frequencies, detectors."""

    featurizer: Featurizer
    table: RarityTable
    detectors: list[Detector]
    unparsed: int

    def graph(self, calibration: Optional[dict] = None, metadata: Optional[dict] = None):
        return assemble_graph(self.featurizer.width, self.table, self.detectors, calibration, metadata)


def fit(records: Sequence[object], options: TrainOptions, progress: Progress, stage: str) -> Fitted:
    featurizer = Featurizer(options.spec)
    featurizer.fit(records)
    detectors = [DETECTORS[kind](seed=options.seed, **dict(options.detector_params.get(kind, {})))
                 for kind in options.detectors]
    # Bounded memory: key counts and (for vector detectors) the dense block, not every key.
    streamed = featurize_for_fit(featurizer, records, options.chunk, any(d.uses_dense for d in detectors),
                                 options.support, progress, f"{stage}: featurizing")
    data = streamed.features
    for done, detector in enumerate(detectors, start=1):
        detector.fit(data)
        progress(f"{stage}: fitted {detector.kind}", done, len(detectors), "detectors")
    return Fitted(featurizer, data.table, detectors, streamed.unparsed)


def out_of_fold_raw_scores(sample: Sequence[object], options: TrainOptions, progress: Progress) -> np.ndarray:
    """Raw scores of every record from a model that never saw it (k-fold cross-fitting).

    Calibrating on all records instead of one small held-out split puts the
    threshold on a 5x larger sample: the 99.9th percentile of 10,000 records
    is estimated from 10 of them, not 2.
    """
    folds = np.arange(len(sample)) % options.folds
    raw = np.zeros((len(sample), len(options.detectors)), dtype=np.float32)
    for fold in range(options.folds):
        inside = [r for r, f in zip(sample, folds) if f != fold]
        outside = [r for r, f in zip(sample, folds) if f == fold]
        fitted = fit(inside, options, progress, f"fold {fold + 1}/{options.folds}")
        raw[folds == fold] = raw_scores(make_session(fitted.graph().SerializeToString()), fitted.featurizer,
                                        outside, options.chunk)
    return raw


def train(records: Iterable[object], options: TrainOptions,
          progress: Progress = quiet) -> tuple[object, dict]:
    """Fit on all records, calibrate on out-of-fold scores; returns (onnx.ModelProto, metadata)."""
    options.validate()
    started = time.perf_counter()
    if options.spec.get("sessions"):
        # A session model learns what the sidecar will see: each record as its session so far,
        # built by the same tracker (sidecar/logscore/sessions.py), so unfinished sessions are normal.
        records = SessionTracker(SessionSpec.from_dict(options.spec["sessions"])).track(list(records))
    sample, read = reservoir_sample(records, options.max_records, options.seed, progress)
    if len(sample) < 10 * options.folds:
        raise InputError(f"only {len(sample)} records to train on; give at least {10 * options.folds} "
                         "(thousands are better)")
    random.Random(options.seed).shuffle(sample)
    raw = out_of_fold_raw_scores(sample, options, progress)
    calibration, calibrated = calibrate(raw)
    threshold = choose_threshold(calibrated, options)
    flagged = float((calibrated >= threshold).mean())
    final = fit(sample, options, progress, "final model")

    metadata = {
        "format_version": FORMAT_VERSION,
        "name": options.name,
        "logscore_version": __version__,
        "featurizer": final.featurizer.spec(),
        "detectors": [d.describe() for d in final.detectors],
        "needs_dense": any(d.uses_dense for d in final.detectors),
        "rarity": {"support": final.table.support, "distinct_keys": int(len(final.table.keys))},
        "calibration": {
            "method": f"empirical CDF of out-of-fold scores ({options.folds}-fold cross-fitting)",
            "records": len(sample),
            "rule": options.threshold_rule,
            "target_fpr": options.target_fpr,
            "sigma": options.sigma if options.threshold_rule == "sigma" else None,
            "threshold": threshold,
            "flagged_fraction": flagged,
            "expected_alerts_per_10k": round(flagged * 10_000, 1),
        },
        "training": {
            "inputs": [os.path.basename(i) for i in options.inputs],
            "records_read": read,
            "records_used": len(sample),
            "unparsed_records": final.unparsed,
            "distinct_features": int(len(final.table.keys)),
            "dense_width": final.featurizer.width,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "fit_seconds": round(time.perf_counter() - started, 2),
            "raw_score_quantiles": {
                f"p{q}": [round(float(v), 4) for v in np.percentile(raw, q, axis=0)]
                for q in (50, 90, 99, 99.9)},
            "calibrated_score_quantiles": {
                f"p{q}": round(float(np.percentile(calibrated, q)), 4) for q in (50, 90, 99, 99.9)},
            "seed": options.seed,
        },
    }
    return final.graph(calibration, metadata), metadata


def save_model(model, path: str | Path) -> None:
    """Write atomically, so a sidecar watching the directory never loads half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(model.SerializeToString())
    os.replace(temporary, path)
