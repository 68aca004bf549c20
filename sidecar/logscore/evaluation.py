"""Accuracy of a model on labeled data: metrics, per-type recall, sessions, a JSON report and plots.

Scores: higher = more anomalous. Labels: 1 anomalous, 0 normal. Metrics are
computed with numpy (ties handled) so the serving environment can evaluate too.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .records import DEFAULT_MAX_LINE_CHARS
from .sessions import SessionKeys, SessionSpec, session_id


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that an anomaly outscores a normal record (ties count half): Mann-Whitney U."""
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0  # 1-based average rank of the tie group
    return ranks


def operating_points(labels: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    """For each distinct score s (descending): the counts when flagging score >= s."""
    labels = np.asarray(labels, dtype=bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    sorted_scores = np.asarray(scores, dtype=np.float64)[order]
    true_positives = np.cumsum(labels[order])
    false_positives = np.cumsum(~labels[order])
    last_of_group = np.concatenate([np.flatnonzero(np.diff(sorted_scores)), [len(sorted_scores) - 1]])
    return {"threshold": sorted_scores[last_of_group], "tp": true_positives[last_of_group],
            "fp": false_positives[last_of_group]}


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    points = operating_points(labels, scores)
    positives = int(np.asarray(labels, dtype=bool).sum())
    if positives == 0:
        return float("nan")
    precision = points["tp"] / (points["tp"] + points["fp"])
    recall_steps = np.diff(np.concatenate([[0], points["tp"]])) / positives
    return float((precision * recall_steps).sum())


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, max_fpr: float) -> tuple[float, float]:
    """(best TPR, its threshold) among thresholds whose FPR is at most max_fpr."""
    labels = np.asarray(labels, dtype=bool)
    points = operating_points(labels, scores)
    fpr = points["fp"] / max(int((~labels).sum()), 1)
    tpr = points["tp"] / max(int(labels.sum()), 1)
    allowed = np.flatnonzero(fpr <= max_fpr)
    if len(allowed) == 0:
        return 0.0, float("inf")
    best = allowed[np.argmax(tpr[allowed])]
    return float(tpr[best]), float(points["threshold"][best])


def confusion(labels: np.ndarray, flagged: np.ndarray) -> dict:
    labels, flagged = np.asarray(labels, dtype=bool), np.asarray(flagged, dtype=bool)
    tp, fp = int((labels & flagged).sum()), int((~labels & flagged).sum())
    fn, tn = int((labels & ~flagged).sum()), int((~labels & ~flagged).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": round(precision, 4),
            "recall": round(recall, 4), "f1": round(f1, 4),
            "fpr": round(fp / (fp + tn), 6) if fp + tn else 0.0}


def best_f1(labels: np.ndarray, scores: np.ndarray) -> dict:
    points = operating_points(labels, scores)
    positives = max(int(np.asarray(labels, dtype=bool).sum()), 1)
    precision = points["tp"] / (points["tp"] + points["fp"])
    recall = points["tp"] / positives
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    best = int(np.argmax(f1))
    threshold = float(points["threshold"][best])
    return {"threshold": threshold, **confusion(labels, np.asarray(scores) >= threshold)}


@dataclass
class Evaluation:
    labels: np.ndarray
    scores: np.ndarray
    threshold: float
    types: Optional[Sequence[str]] = None
    flags: Optional[np.ndarray] = None  # the decided flags (decide.py); default: scores >= threshold
    target_fpr: Optional[float] = None  # the model's target, reported beside the realized rate

    def flagged(self) -> np.ndarray:
        return self.scores >= self.threshold if self.flags is None else np.asarray(self.flags, dtype=bool)

    def report(self) -> dict:
        labels, scores = self.labels.astype(bool), self.scores
        at_threshold = confusion(labels, self.flagged())
        tpr1, threshold1 = tpr_at_fpr(labels, scores, 0.01)
        tpr01, threshold01 = tpr_at_fpr(labels, scores, 0.001)
        report = {
            "records": int(len(labels)), "anomalous": int(labels.sum()), "normal": int((~labels).sum()),
            "roc_auc": round(roc_auc(labels, scores), 4),
            "pr_auc": round(average_precision(labels, scores), 4),
            "tpr_at_fpr_1pct": round(tpr1, 4), "threshold_at_fpr_1pct": threshold1,
            "tpr_at_fpr_0.1pct": round(tpr01, 4), "threshold_at_fpr_0.1pct": threshold01,
            "recall_at_threshold": at_threshold["recall"], "fpr_at_threshold": at_threshold["fpr"],
            "target_fpr": self.target_fpr,
            "at_model_threshold": {"threshold": self.threshold, **at_threshold},
            "at_best_f1": best_f1(labels, scores),
        }
        if self.types is not None:
            report["recall_by_type"] = self.recall_by_type()
        return report

    def recall_by_type(self) -> dict:
        flagged = self.flagged()
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for kind, label, hit in zip(self.types, self.labels, flagged):
            if label and kind:
                totals[kind][0] += int(hit)
                totals[kind][1] += 1
        return {kind: {"recall": round(hits / count, 4), "count": count}
                for kind, (hits, count) in sorted(totals.items())}


def session_texts(model, records: Sequence[object], key: str) -> list[str]:
    """Each record's text as the session tracker reads it (the model's session field, else `message` and the
    raw-line keys; cut to its line limit): a field map was read whole as JSON, so evaluate's ids were not the
    tracker's (a `host` field's id found first, non-ASCII escaped: review, session 27)."""
    tracker = getattr(model, "sessions", None)
    keys = tracker.keys if tracker is not None else SessionKeys(SessionSpec(key))
    limit = tracker.max_line_chars if tracker is not None else DEFAULT_MAX_LINE_CHARS
    return [(keys.text(record) or "")[:limit] for record in records]


def group_sessions(texts: Sequence[str], scores: np.ndarray, labels: np.ndarray, key: str,
                   session_labels: Optional[dict[str, int]] = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per session (its id as the session tracker takes it: the first whole, non-empty match of regex
    ``key`` in each record): max score, and the label.

    A session is anomalous if ``session_labels`` says so, else if any of its records is.
    Records without a key are left out.
    """
    pattern = re.compile(key)
    best: dict[str, float] = {}
    anomalous: dict[str, int] = {}
    for text, score, label in zip(texts, scores, labels):
        session = session_id(pattern, text)
        if session is None:
            continue
        best[session] = max(best.get(session, 0.0), float(score))
        anomalous[session] = max(anomalous.get(session, 0), int(label))
    ids = sorted(best)
    session_scores = np.array([best[i] for i in ids], dtype=np.float64)
    if session_labels is not None:
        session_truth = np.array([session_labels.get(i, 0) for i in ids], dtype=np.int64)
    else:
        session_truth = np.array([anomalous[i] for i in ids], dtype=np.int64)
    return ids, session_scores, session_truth


def sequence_ceiling(sessions: Sequence[tuple], labels: Sequence[int],
                     normal_sessions: Sequence[tuple]) -> dict:
    """The best any detector that sees only a session's event sequence could do on this test set.

    Identical sequences get the same score from any such detector, so the best it can do is
    rank each distinct sequence by its share of anomalies in the test (an oracle that knows
    the labels): its best F1 and ROC-AUC bound every real method. Also counts the anomalous
    sessions whose sequence occurs among ``normal_sessions`` (those no method can tell apart).
    """
    totals: dict[tuple, int] = defaultdict(int)
    anomalies: dict[tuple, int] = defaultdict(int)
    for session, label in zip(sessions, labels):
        totals[session] += 1
        anomalies[session] += int(label)
    truth = np.asarray(labels, dtype=bool)
    oracle = np.array([anomalies[s] / totals[s] for s in sessions], dtype=np.float64)
    normal = set(normal_sessions)
    return {"best_f1": best_f1(truth, oracle)["f1"], "roc_auc": round(roc_auc(truth, oracle), 4),
            "anomalies": int(truth.sum()),
            "anomalies_like_a_normal_session": sum(1 for s, label in zip(sessions, truth) if label and s in normal)}


PLOT_SUFFIXES = ("_histogram.png", "_roc.png")  # the files --plots PREFIX writes


def plot(labels: np.ndarray, scores: np.ndarray, path_prefix: str, title: str) -> list[str]:
    """Score histograms (normal vs anomalous) and the ROC curve as PNG; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(labels, dtype=bool)
    written = []
    figure, axes = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(float(np.min(scores)), float(np.max(scores)) + 1e-9, 60)
    axes.hist(scores[~labels], bins=bins, alpha=0.6, label="normal", density=True)
    axes.hist(scores[labels], bins=bins, alpha=0.6, label="anomalous", density=True)
    axes.set_xlabel("score")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path_prefix + PLOT_SUFFIXES[0], dpi=90)
    written.append(path_prefix + PLOT_SUFFIXES[0])
    plt.close(figure)
    points = operating_points(labels, scores)
    fpr = np.concatenate([[0], points["fp"] / max(int((~labels).sum()), 1)])
    tpr = np.concatenate([[0], points["tp"] / max(int(labels.sum()), 1)])
    figure, axes = plt.subplots(figsize=(4, 4))
    axes.plot(fpr, tpr)
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set_xscale("symlog", linthresh=0.001)
    axes.set_xlabel("false-positive rate")
    axes.set_ylabel("true-positive rate")
    axes.set_title(f"ROC — {title}")
    figure.tight_layout()
    figure.savefig(path_prefix + PLOT_SUFFIXES[1], dpi=90)
    written.append(path_prefix + PLOT_SUFFIXES[1])
    plt.close(figure)
    return written
