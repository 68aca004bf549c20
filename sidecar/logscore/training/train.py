"""Train on normal records, calibrate on held-out ones, export one ONNX artifact.

    records ─► reservoir sample ─► check they parse ─► k folds (records sharing
               rare features in one fold: robust.py)
    each fold: fit on the others (featurizer.fit ─► featurize ─► key frequencies
               + detectors.fit) ─► raw scores of the fold through the ONNX graph
               (the same onnxruntime path as serving)
    screening: set aside the records standing far above the rest, refit, repeat
               (robust.py: attacks in the training data are not learned as normal)
    out-of-fold raw scores of the kept records ─► empirical CDF per detector (+ one
               over their max for ensembles) ─► threshold; realized FPR on held-back folds
    kept records ─► the final fit ─► graph + calibration + metadata
"""

from __future__ import annotations

import datetime
import json
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from .. import __version__
from ..artifact import FORMAT_VERSION, HASH_KEY, METADATA_KEY, content_hash
from ..errors import ConfigError, InputError
from ..parsers import WARN_UNPARSED_SHARE, suggest_format
from ..features import Featurizer
from ..features.featurizer import DEFAULT_MAX_FIELD_CHARS
from ..model import make_session, run_graph
from ..sessions import SessionSpec, SessionTracker
from .detectors import DETECTORS, Detector, Features, RarityTable, default_support
from .graph import GraphBuilder
from .prior import DEFAULT_SHARE, AlarmVocabulary, InjectionPrior
from .crossfit import CrossFit
from .robust import cluster_mates, example_text, screen, screening_bound, signature_folds
from .shortfall import calibration_shortfall, describe_shortfall
from .streaming import KeyPairs, featurize_for_fit, raw_scores, record_key_pairs

Progress = Callable[[str, int, Optional[int], str], None]  # stage, done, total, unit
Warn = Callable[[str], None]

REFUSE_UNPARSED = 0.5  # most records do not parse: wrong --format, refuse


def quiet(stage: str, done: int, total: Optional[int], unit: str = "records") -> None:
    """The default progress callback: says nothing."""


def ignore(message: str) -> None:
    """The default warning callback: keeps the warning in the metadata only."""


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
    set_aside: bool = True  # screen out records that look like attacks (robust.py)
    injection_share: float = DEFAULT_SHARE  # with set_aside: the injection prior (prior.py); 0 turns it off
    set_aside_factor: float = 2.5
    contaminated_factor: float = 1.75  # the level when the data evidently holds attacks (robust.py)
    screening_rounds: int = 3  # refits without the set-aside records, while they change
    learned_route: Optional[str] = None  # set by the sidecar's learner (sidecar/logscore/learning.py)
    feedback: Optional[object] = None  # training.feedback.TrainingFeedback: operators' verdicts to fold in
    previous: Optional[object] = None  # model.Model serving now: what it flags (feedback applied) is not learned

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
        if not 0.0 <= self.injection_share < 0.5:
            raise ConfigError(f"injection share must be between 0 (off) and 0.5, not {self.injection_share}")
        self.validate_counts()
        if not 1.0 < self.contaminated_factor <= self.set_aside_factor:
            raise ConfigError(f"set-aside factors must be above 1, the contaminated one ({self.contaminated_factor}) "
                              f"at most the first ({self.set_aside_factor})")

    def validate_counts(self) -> None:
        """--support, --sigma and --max-records, named as `logscore train` takes them.

        NOTE: --support -1 died of a math domain error after reading every record, --support 0 meant the
        default without a word, and --sigma -5 wrote a model flagging every record."""
        if self.support is not None and not self.support > 0:
            raise ConfigError(f"--support {self.support:g}: give a number of records above 0, or leave --support "
                              "out for the default (max(5, 0.05 % of the records))")
        if not self.sigma >= 0:
            raise ConfigError(f"--sigma {self.sigma:g}: give 0 or more (the threshold is the mean plus this many "
                              "standard deviations of the calibrated scores: below the mean it flags most records)")
        if self.max_records < 10 * self.folds:
            raise ConfigError(f"--max-records {self.max_records}: train on at least {10 * self.folds} records "
                              f"(10 per fold, --folds {self.folds}; thousands are better)")


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

    def graph(self, calibration: Optional[dict] = None, metadata: Optional[dict] = None):
        return assemble_graph(self.featurizer.width, self.table, self.detectors, calibration, metadata)


def detector_progress(progress: Progress, stage: str) -> Callable[[int, int], None]:
    return lambda step, steps: progress(stage, step, steps, "epochs")


def fit(records: Sequence[object], options: TrainOptions, progress: Progress, stage: str,
        featurizer_records: Optional[Sequence[object]] = None, vouching: Optional[np.ndarray] = None) -> Fitted:
    """Fit on ``records``; the featurizer learns from ``featurizer_records`` when given (feedback's
    repeated records must not make a parameter look like an enumeration); with ``vouching`` (bool
    per record), features none of the vouching records hold stay never seen (robust.py)."""
    featurizer = Featurizer(options.spec)
    featurizer.fit(records if featurizer_records is None else featurizer_records)
    # Bounded memory: key counts and (for vector detectors) the dense block, not every key.
    streamed = featurize_for_fit(featurizer, records, options.chunk, reads_vectors(options),
                                 options.support, progress, f"{stage}: featurizing", vouching)
    return fit_detectors(featurizer, streamed.features, options, progress, stage)


def reads_vectors(options: TrainOptions) -> bool:
    """Whether a detector reads the dense block (else the key counts are the whole model: crossfit.py)."""
    return any(DETECTORS[kind].uses_dense for kind in options.detectors)


def fit_detectors(featurizer: Featurizer, data: Features, options: TrainOptions, progress: Progress,
                  stage: str) -> Fitted:
    detectors = [DETECTORS[kind](seed=options.seed, **dict(options.detector_params.get(kind, {})))
                 for kind in options.detectors]
    for done, detector in enumerate(detectors, start=1):
        detector.progress = detector_progress(progress, f"{stage}: fitting {detector.kind}")
        detector.fit(data)
        progress(f"{stage}: fitted {detector.kind}", done, len(detectors), "detectors")
    return Fitted(featurizer, data.table, detectors)


def fit_masked(sample: Sequence[object], mask: np.ndarray, options: TrainOptions, progress: Progress, stage: str,
             vouching: Optional[np.ndarray], crossfit: Optional[CrossFit],
             held_out: Optional[np.ndarray] = None) -> Fitted:
    """``fit`` on the records of ``mask`` (``vouching``: bool per record of the sample), from the
    sample's key counts when ``crossfit`` is given (``held_out``: as ``CrossFit.features`` takes it)."""
    if crossfit is not None:
        return fit_detectors(*crossfit.features(mask, progress, stage, vouching, held_out), options, progress,
                             stage)
    return fit([r for r, use in zip(sample, mask) if use], options, progress, stage,
               vouching=None if vouching is None else vouching[mask])


def out_of_fold_raw_scores(sample: Sequence[object], options: TrainOptions, progress: Progress,
                           folds: Optional[np.ndarray] = None, fit_mask: Optional[np.ndarray] = None,
                           stage: str = "", vouching: Optional[np.ndarray] = None,
                           crossfit: Optional[CrossFit] = None) -> np.ndarray:
    """Raw scores of every record from a model that never saw it (k-fold cross-fitting);
    the fold models are fit on the records of ``fit_mask`` only (default: all), with ``vouching``
    (bool per record) as ``fit`` takes it, from the sample's key counts with ``crossfit``.

    Calibrating on all records instead of one small held-out split puts the
    threshold on a 5x larger sample: the 99.9th percentile of 10,000 records
    is estimated from 10 of them, not 2.
    """
    folds = np.arange(len(sample)) % options.folds if folds is None else folds
    fit_mask = np.ones(len(sample), dtype=bool) if fit_mask is None else fit_mask
    raw = np.zeros((len(sample), len(options.detectors)), dtype=np.float32)
    for fold in range(options.folds):
        outside = [r for r, f in zip(sample, folds) if f == fold]
        fitted = fit_masked(sample, fit_mask & (folds != fold), options, progress,
                            f"{stage}fold {fold + 1}/{options.folds}", vouching, crossfit, folds == fold)
        raw[folds == fold] = scores_with_progress(make_session(fitted.graph().SerializeToString()), fitted, outside,
                                                  options.chunk, progress,
                                                  f"{stage}fold {fold + 1}/{options.folds}: scoring held-out records")
    return raw


SCORING_BLOCK_CHUNKS = 16  # chunks scored between two progress reports


def scores_with_progress(session, fitted: Fitted, records: Sequence[object], chunk: int, progress: Progress,
                         stage: str) -> np.ndarray:
    """``raw_scores`` of ``records``, block by block of whole chunks (the same chunks, the same
    scores), saying how far: a fold's 200,000 held-out records took 10 s of silence."""
    block = chunk * SCORING_BLOCK_CHUNKS
    if len(records) <= block:
        return raw_scores(session, fitted.featurizer, records, chunk)
    parts = []
    for start in range(0, len(records), block):
        parts.append(raw_scores(session, fitted.featurizer, records[start: start + block], chunk))
        progress(stage, min(start + block, len(records)), len(records), "records")
    return np.concatenate(parts)


CHECK_BLOCK = 50_000  # records normalized at a time to count those that parse
AGENT = {"user_agent"}  # the field of lines counted there: whether the log is in the combined format


COMBINED_AGENT_SHARE = 0.01  # of parsed records holding a user agent, from which an access log is combined


def count_unparsed(sample: Sequence[object], options: TrainOptions, warn: Warn,
                   progress: Progress = quiet) -> tuple[int, int, dict]:
    """(the number of records that do not parse, of those cut before scoring (decide.flags_truncated),
    the featurizer spec with the access layout they show); refuses input that is mostly unparsed (a
    wrong --format, a binary file) and warns when more than a few records do not parse. Block by
    block, saying how far (11 s of silence on 1M JSON records)."""
    featurizer = Featurizer(options.spec)
    normalizer = featurizer.normalizer
    field_maps = normalizer.log_format == "jsonl" or any(isinstance(record, dict) for record in sample[:100])
    parsed = np.zeros(len(sample), dtype=bool)
    truncated = 0
    present = dict.fromkeys(normalizer.wanted, 0)  # parsed records holding each field the model reads
    for start in range(0, len(sample), CHECK_BLOCK):
        block = sample[start: start + CHECK_BLOCK]
        if not field_maps:  # lines: the compiled parser where there is one (the Python one took 5 s on 1M)
            columns, parsed[start: start + len(block)], cut = featurizer.field_values(block)
            truncated += sum(cut)
            for name in present.keys() & AGENT:
                present[name] += sum(value is not None for value in columns[name])
        else:
            _, parsed[start: start + len(block)], cut, fields, _ = featurizer.normalized_values(block)
            truncated += sum(cut)
            for one in (one for one, ok in zip(fields, parsed[start: start + len(block)]) if ok):
                for name in present:
                    present[name] += one.get(name) is not None
        progress("checking the records parse", min(start + CHECK_BLOCK, len(sample)), len(sample), "records")
    if field_maps:  # (records naming their own fields)
        warn_missing_fields(present, int(parsed.sum()), normalizer, warn)
    spec = options.spec
    if normalizer.log_format == "access" and "user_agent" in present and "access_layout" not in spec:
        # (records.RecordNormalizer: a shipper's null referer and agent read as "-" "-" in a combined log).
        # NOTE: a common-format log holds no agent at all, while a combined one's may be mostly null
        # (API clients sending none: Fluentd's "-"): "most records" called such a log common, and a
        # common model reads no agent (featurizer.py), so a scanner's agent went unread.
        combined = present["user_agent"] >= max(1, COMBINED_AGENT_SHARE * int(parsed.sum()))
        spec = {**spec, "access_layout": "combined" if combined else "common"}
    unparsed = len(parsed) - int(parsed.sum())
    if unparsed <= WARN_UNPARSED_SHARE * len(sample):
        return unparsed, truncated, spec
    log_format = normalizer.log_format
    example = example_text(sample[int(np.argmin(parsed))])[:120]
    summary = (f"{unparsed:,} of {len(sample):,} records ({unparsed / len(sample):.1%}) do not parse as {log_format} "
               f"(e.g. {example!r})")
    if unparsed > REFUSE_UNPARSED * len(sample):
        raise InputError(f"{summary}: this is not {log_format} input. {suggest_format(sample, log_format)}")
    warn(f"{summary}; they are learned with their fields missing, and records that do not parse "
         "will not be flagged for it")
    return unparsed, truncated, spec


def warn_missing_fields(present: dict[str, int], held: int, normalizer, warn: Warn) -> None:
    """A field the model reads that (almost) no parsed record holds is one it cannot see: a JSON
    logger naming its message otherwise gave a model of the level alone, and said nothing.
    ``present``: how many of the ``held`` parsed records hold each field."""
    for name, count in present.items():
        if held and count <= WARN_UNPARSED_SHARE * held:
            names = ", ".join((name, *normalizer.aliases.get(name, ())))
            warn(f"field {name!r} is in {count:,} of {held:,} parsed records (read under {names}): the "
                 "model cannot see it; name the field your records use in a --config (docs/converters.md)")


def held_back_fpr(raw: np.ndarray, folds: np.ndarray, kept: np.ndarray, options: TrainOptions) -> dict:
    """The false-positive rate realized on held-back records: each fold's kept records, scored by
    a model fit without them, against a threshold calibrated without them (on the other folds).

    The records set aside (screening, injection prior) are left out of that figure: were they
    attacks, it is the rate to expect. Were they normal after all (a clean log's long tail), new
    normal records like them are flagged too: ``fpr_with_set_aside`` counts them, by their own
    out-of-fold scores against the same fold thresholds (CSIC 2010 as access lines, clean: 92
    records set aside, 0.10 % kept-only, 0.32 % with them, 0.37 % realized on its test normals)."""
    flagged = records = aside_flagged = 0
    for fold in range(options.folds):
        calibrating, held = kept & (folds != fold), kept & (folds == fold)
        if not calibrating.any() or not held.any():
            continue
        tables, calibrated = calibrate(raw[calibrating])
        threshold = choose_threshold(calibrated, options)
        flagged += int((apply_calibration(raw[held], tables) >= threshold).sum())
        records += int(held.sum())
        aside = ~kept & (folds == fold)
        if aside.any():
            aside_flagged += int((apply_calibration(raw[aside], tables) >= threshold).sum())
    set_aside = int((~kept).sum())
    result = {"records": records, "flagged": flagged, "fpr": round(flagged / records, 6) if records else None}
    if set_aside and records:
        result.update({"set_aside": set_aside, "set_aside_flagged": aside_flagged,
                       "fpr_with_set_aside": round((flagged + aside_flagged) / (records + set_aside), 6)})
    return result


def apply_calibration(raw: np.ndarray, calibration: dict) -> np.ndarray:
    """Numpy twin of the graph's calibration: per-detector ECDF, then (ensembles) the ECDF of the max."""
    calibrated = np.column_stack([apply_ecdf(raw[:, i], c["knots"], c["levels"])
                                  for i, c in enumerate(calibration["detectors"])])
    if "combined" in calibration:
        return apply_ecdf(calibrated.max(axis=1), *calibration["combined"])
    return calibrated[:, 0]


WARN_KEYED_SHARE = 0.5  # a session model whose key fewer records hold than this is mostly one-event sessions


def check_session_keys(tracker: SessionTracker, warn: Warn) -> None:
    """Refuse a session key no record holds; warn when few do. NOTE: `--session-key zzz_nomatch` wrote a
    "session model" of one-event sessions without a word, and a key matching an empty text put every
    record in one session (probe)."""
    key, field = tracker.spec.key, tracker.spec.field
    keyed, total = tracker.counts.keyed, tracker.counts.keyed + tracker.counts.unkeyed
    where = f"the text of {total:,} records (raw lines, or the field {field!r} of field maps)"
    if total and not keyed:
        field_hint = ("--session-field names the field" if field != "message"
                      else "give --session-field when the text is in another field")
        raise InputError(f"session key {key!r}: it matches none of {where} (or only an empty text): no record "
                         "would join a session; check it against the log (grep -cP 'KEY' FILE counts the lines "
                         f"holding it), or train without --session-key; {field_hint}")
    if total and keyed < WARN_KEYED_SHARE * total:
        warn(f"session key {key!r}: only {keyed:,} of {where} ({keyed / total:.1%}) hold it; the others are "
             "sessions of one event each; check the key, or train without --session-key")


def train(records: Iterable[object], options: TrainOptions,
          progress: Progress = quiet, warn: Warn = ignore) -> tuple[object, dict]:
    """Fit on the kept records, calibrate on out-of-fold scores; returns (onnx.ModelProto, metadata)."""
    options.validate()
    started = time.perf_counter()
    tracker = None
    if options.spec.get("sessions"):
        # A session model learns what the sidecar will see: each record as its session so far,
        # built by the same tracker (sidecar/logscore/sessions.py), so unfinished sessions are normal.
        # Cut as the sidecar cuts (its default max_record_bytes, the model's max_field_chars).
        max_chars = int(options.spec.get("max_field_chars", DEFAULT_MAX_FIELD_CHARS))
        tracker = SessionTracker(SessionSpec.from_dict(options.spec["sessions"]), max_chars)
        records = tracker.track_each(records)
    if options.feedback is not None and options.feedback.keep:
        records = without_kept(records, options.feedback.keep_texts())
    sample, read = reservoir_sample(records, options.max_records, options.seed, progress)
    warnings: list[str] = []

    def keep_warning(message: str) -> None:
        warnings.append(message)
        warn(message)

    if tracker is not None:
        check_session_keys(tracker, keep_warning)
    left_out, vouched = None, np.zeros(len(sample), dtype=bool)
    if options.previous is not None:
        from .feedback import leave_out_flagged

        sample, left_out, vouched = leave_out_flagged(sample, options.previous, options.feedback, keep_warning,
                                                      progress)
    if len(sample) < 10 * options.folds:
        raise InputError(too_few_records(len(sample), options, left_out))
    order = list(range(len(sample)))
    random.Random(options.seed).shuffle(order)
    sample, vouched = [sample[i] for i in order], vouched[order]

    unparsed, truncated, spec = count_unparsed(sample, options, keep_warning, progress)
    options = replace(options, spec=spec)  # (the caller's options stay as given: a second log may differ)
    # Rare = seen in fewer records than a feature needs to count as normal (screening's grouping).
    support = options.support or default_support(len(sample))
    if options.support and options.support > len(sample):
        # NOTE: accepted without a word: no feature can be seen that often, so none counts as fully normal
        keep_warning(f"--support {options.support:g} is more than the {len(sample):,} records trained on: no feature "
                     "can be seen that often, so every one counts as rare; give fewer, or leave --support out for "
                     f"the default ({default_support(len(sample)):g} here)")
    prior = InjectionPrior(options.injection_share) if options.set_aside and options.injection_share else None
    screening_on = options.set_aside and "rarity" in options.detectors
    alarms = (AlarmVocabulary() if screening_on and AlarmVocabulary.applies(Featurizer(options.spec).converters)
              else None)
    markers = [marker for marker in (prior, alarms) if marker is not None]

    def observe(batch) -> None:
        for marker in markers:
            marker.observe(batch)

    def marked() -> np.ndarray:
        return np.unique(np.concatenate([np.zeros(0, np.int64)] + [m.marked_keys() for m in markers]))

    pairs, crossfit = None, None
    if prior is not None or screening_on:
        progress("grouping similar records", 0, len(sample), "records")
        grouped = 0

        def observe_and_report(batch) -> None:  # a minute of silence on 1M records otherwise
            nonlocal grouped
            observe(batch)
            grouped += batch.size
            progress("grouping similar records", grouped, len(sample), "records")

        bound = max(support, screening_bound(len(sample), options.target_fpr),
                    prior.support(len(sample)) if prior is not None else 0.0)
        reference = Featurizer(options.spec)
        plan = reference.fit_plan(sample)
        reference.apply(plan.learned())
        pairs = record_key_pairs(reference, sample, options.chunk, bound, marked, observe_and_report)
        if not reads_vectors(options):
            crossfit = CrossFit(sample, options.spec, plan, reference, pairs.every_key, pairs.occurrences,
                                options.chunk, options.support)
    injection = prior.set_aside(pairs) if prior is not None else np.zeros(len(sample), dtype=bool)
    eligible = alarms.holders(pairs) if alarms is not None else None
    # An operator's verdict vouches for the records its rule suppresses (training/feedback.py), but for
    # those the injection prior marks: a payload a rule let through is not learned for it.
    vouched &= ~injection
    if vouched.any():
        eligible = ~vouched if eligible is None else eligible & ~vouched
    folds, screening = screen_sample(sample, options, support, progress, pairs, eligible, crossfit)
    # Neither learned nor calibrated on (kept in the calibration, a payload family's copies put the
    # threshold among them; docs/accuracy.md measures both).
    kept = ~screening.set_aside & ~injection
    raw = screening.raw[kept]
    calibration, calibrated = calibrate(raw)
    threshold = choose_threshold(calibrated, options)
    flagged = float((calibrated >= threshold).mean())
    held_back = held_back_fpr(screening.raw, folds, kept, options)
    vouching = None if screening.vouching is None else screening.vouching | vouched
    if options.feedback is None:
        final = fit_masked(sample, kept, options, progress, "final model", vouching, crossfit)
    else:  # learned as normal, left out of calibration (training/feedback.py)
        copies = options.feedback.copies(support, options.spec)
        kept_records = [r for r, keep in zip(sample, kept) if keep]
        vouching = None if vouching is None else vouching[kept]
        if vouching is not None:  # an operator's verdict vouches for its records
            vouching = np.concatenate([vouching, np.ones(len(copies), dtype=bool)])
        final = fit(kept_records + copies, options, progress, "final model",
                    kept_records + options.feedback.normal, vouching)

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
            "records": int(kept.sum()),
            "rule": options.threshold_rule,
            "target_fpr": options.target_fpr,
            "sigma": options.sigma if options.threshold_rule == "sigma" else None,
            "threshold": threshold,
            "flagged_fraction": flagged,
            # NOTE: from the held-back folds when there are some: ties at the top of the training
            # scores can leave none at the threshold (0.0 expected) while 0.4 % of new records pass it
            "expected_alerts_per_10k": round((held_back["fpr"] if held_back["fpr"] is not None else flagged)
                                             * 10_000, 1),
            # were the set-aside records normal (a clean log's long tail), this many instead
            "expected_alerts_per_10k_with_set_aside": (round(held_back["fpr_with_set_aside"] * 10_000, 1)
                                                       if "fpr_with_set_aside" in held_back else None),
            "held_back": held_back,
        },
        "training": {
            "inputs": [os.path.basename(i) for i in options.inputs],
            "records_read": read,
            "records_used": len(sample),
            "unparsed_records": unparsed,
            "truncated_records": truncated,  # decide.flags_truncated
            "set_aside": screening.describe(sample) if screening_on else None,
            "set_aside_only_alarms": (None if alarms is None else  # prior.AlarmVocabulary
                                      {"eligible_records": int(eligible.sum())}),
            "injection_prior": prior.describe(sample, injection) if prior is not None else None,
            "warnings": warnings,
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
    shortfall = calibration_shortfall(metadata["calibration"])
    if shortfall is not None:  # (not kept in the warnings: `logscore inspect` tells it from the calibration)
        warn(describe_shortfall(shortfall))
    if options.learned_route:
        metadata["training"]["learned_route"] = options.learned_route
    if left_out is not None:
        metadata["training"]["left_out_flagged"] = left_out
    if options.feedback is not None:
        metadata["training"]["feedback"] = check_feedback(final, calibration, threshold, options, keep_warning)
    return final.graph(calibration, metadata), metadata


def too_few_records(count: int, options: TrainOptions, left_out: Optional[dict]) -> str:
    """Why training stops for too few records, naming --previous-model when its flags left them out."""
    needed = f"give at least {10 * options.folds} (thousands are better)"
    if not left_out or not left_out.get("records"):
        return f"only {count} records to train on; {needed}"
    return (f"only {count} records to train on: --previous-model {left_out['model']!r} left out "
            f"{left_out['records']:,} of {count + left_out['records']:,} as flagged; train without "
            f"--previous-model (a model of another site or of traffic since changed), or {needed}")


def without_kept(records: Iterable[object], kept: set[str]) -> Iterator[object]:
    """The records, but those marked keep (true anomalies): never learned as normal."""
    from ..feedback import record_text

    return (r for r in records if record_text(r) not in kept)


def check_feedback(final: Fitted, calibration: dict, threshold: float, options: TrainOptions, warn: Warn) -> dict:
    """How the new model scores the records of the feedback: normal ones under the threshold, keep ones over."""
    feedback = options.feedback
    session = make_session(final.graph(calibration).SerializeToString())

    def flagged(records: list) -> int:
        if not records:
            return 0
        scores, _, _ = run_graph(session, final.featurizer.transform(records))  # a few examples per entry
        return int((scores >= threshold).sum())

    normal_flagged, keep_flagged = flagged(feedback.normal), flagged(feedback.keep)
    if normal_flagged:
        warn(f"{normal_flagged} of {len(feedback.normal)} records marked normal are still over the threshold")
    if keep_flagged < len(feedback.keep):
        warn(f"{len(feedback.keep) - keep_flagged} of {len(feedback.keep)} records marked keep (true anomalies) "
             "are not flagged by the new model")
    summary = {"store": feedback.store, "entries": feedback.entries, "normal_records": len(feedback.normal),
               "normal_flagged": normal_flagged, "keep_records": len(feedback.keep), "keep_flagged": keep_flagged}
    if feedback.expired:  # (left out as removed ones are: a mark for a while is not learned for good)
        summary["expired_entries"] = feedback.expired
    return summary


def screen_sample(sample: Sequence[object], options: TrainOptions, support: float, progress: Progress,
                  pairs: Optional[KeyPairs], eligible: Optional[np.ndarray] = None,
                  crossfit: Optional[CrossFit] = None):
    """(folds, Screening): out-of-fold raw scores, with what looks like attacks set aside
    (``pairs``: the records' distinct keys, ``record_key_pairs``; needed when screening; ``eligible``:
    the records that may be set aside, all when None; ``crossfit``: fold models from the sample's
    key counts)."""
    if not options.set_aside or "rarity" not in options.detectors:
        folds = np.arange(len(sample)) % options.folds
        raw = out_of_fold_raw_scores(sample, options, progress, folds)
        return folds, screen(lambda *_: raw, len(sample), options.target_fpr, options.set_aside_factor, 0)
    folds = signature_folds(sample, pairs, options.folds, support)
    rounds = iter(range(1, options.screening_rounds + 2))

    def score_out_of_fold(fit_mask: np.ndarray, vouching: Optional[np.ndarray] = None) -> np.ndarray:
        if vouching is not None:
            stage = "unusual records vouching for nothing, "
        else:
            stage = f"screening round {next(rounds)}, " if not fit_mask.all() else ""
        return out_of_fold_raw_scores(sample, options, progress, folds, fit_mask, stage, vouching, crossfit)

    return folds, screen(score_out_of_fold, len(sample), options.target_fpr, options.set_aside_factor,
                         options.screening_rounds,
                         lambda found, raw: cluster_mates(found, raw, pairs, options.target_fpr),
                         [options.detectors.index("rarity")], options.contaminated_factor, eligible)


def save_model(model, path: str | Path) -> None:
    """Write atomically, so a sidecar watching the directory never loads half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_bytes(model.SerializeToString())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ConfigError(f"{path}: cannot write the model ({error.strerror or error})") from None
    except BaseException:  # Ctrl-C while writing: no half-written file left beside the model
        temporary.unlink(missing_ok=True)
        raise
