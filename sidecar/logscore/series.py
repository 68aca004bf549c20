"""Scoring one time series online (each point from the past only): `logscore evaluate --series`.

The same forecaster the sidecar's windows use (forecast.py), on one key whose windows are the
series' steps; then two questions about each point's deviation, both answered from the past:

    calibrated  the fraction of earlier deviations (after the first day, while the seasons are
                still unknown) that were lower: "stranger than 99.8 % of this series so far"
    record      r / (1 + r), r = deviation / the largest deviation of the previous day:
                0.5 for a point as strange as yesterday's strangest, near 1 for one far beyond

    anomaly_score = calibrated x record

The second factor keeps a long anomaly (or a noisy stretch) from raising an alarm at every
point: after the first strange point, the next ones must beat it. Measured on NAB's series in
docs/accuracy.md (benchmarks/nab_evaluate.py).
"""

from __future__ import annotations

import bisect
import collections
import csv
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .errors import InputError
from .forecast import ForecastState, count_transform, slots
from .inputs import read_lines
from .timestamps import parse_time

WARM_UP_S = 86400.0  # deviations of the first day (seasons unknown) are not scored nor calibrated against
RECORD_S = 86400.0  # "the previous day" of the record factor


@dataclass
class Series:
    timestamps: list[str]  # as written in the file
    times: np.ndarray  # Unix seconds
    values: np.ndarray


def read_series(path: str) -> Series:
    """A CSV of ``timestamp,value`` rows (a header line first); InputError naming the bad row."""
    lines = list(read_lines([path]))
    rows = list(csv.reader(lines))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["timestamp", "value"]:
        raise InputError(f"{path}: expected a header 'timestamp,value' and one row per point")
    stamps, times, values = [], [], []
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        seconds = parse_time(row[0]) if len(row) >= 2 else None
        try:
            value = float(row[1]) if len(row) >= 2 else float("nan")
        except ValueError:
            value = float("nan")
        if seconds is None or value != value:
            raise InputError(f"{path}: line {number} is not 'timestamp,value' ({','.join(row)[:80]!r})")
        stamps.append(row[0])
        times.append(seconds)
        values.append(value)
    if len(values) < 10:
        raise InputError(f"{path}: {len(values)} points; a series needs at least 10")
    times_array = np.asarray(times)
    if np.any(np.diff(times_array) < 0):  # NOTE: equal ones happen (clocks turned back an hour)
        raise InputError(f"{path}: timestamps must not go back from row to row")
    return Series(stamps, times_array, np.asarray(values))


def deviations(times: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each point's deviation from its forecast, the forecast made from the points before it."""
    step = float(np.median(np.diff(times)))
    state = ForecastState.empty(1, step)
    hours, weeks = slots(times)
    y = count_transform(values) if np.all(values >= 0) else values.astype(np.float64)
    found = np.zeros(len(values))
    for i in range(len(values)):
        found[i] = state.step(y[i: i + 1], hours[i: i + 1], weeks[i: i + 1])[1][0]
    return found


def score_series(times: np.ndarray, values: np.ndarray) -> np.ndarray:
    """anomaly_score of each point in [0, 1], online."""
    found = deviations(times, values)
    scores = np.zeros(len(found))
    past: list[float] = []  # sorted deviations after the warm-up
    recent: collections.deque = collections.deque()  # (time, deviation), deviations decreasing: a running max
    for i, deviation in enumerate(found.tolist()):
        moment = times[i] - times[0]
        while recent and recent[0][0] < times[i] - RECORD_S:
            recent.popleft()
        if moment >= WARM_UP_S and past and recent:
            calibrated = bisect.bisect_left(past, deviation) / len(past)
            ratio = deviation / max(recent[0][1], 1e-9)
            scores[i] = calibrated * ratio / (1.0 + ratio)
        if moment >= WARM_UP_S:
            bisect.insort(past, deviation)
        if moment >= WARM_UP_S / 2:
            while recent and recent[-1][1] <= deviation:
                recent.pop()
            recent.append((times[i], deviation))
    return scores


def labels_from_windows(series: Series, windows: Sequence[Sequence[str]]) -> np.ndarray:
    """1 for points inside any labeled window ``[start, end]`` (NAB's combined_windows.json entries)."""
    labels = np.zeros(len(series.times), dtype=np.int64)
    for start, end in windows:
        low, high = parse_time(str(start)), parse_time(str(end))
        labels[(series.times >= low) & (series.times <= high)] = 1
    return labels


def write_results(path: Optional[str], series: Series, scores: np.ndarray, labels: np.ndarray, out) -> None:
    """NAB's results format: ``timestamp,value,anomaly_score,label``."""
    handle = open(path, "w", newline="") if path else out
    try:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["timestamp", "value", "anomaly_score", "label"])
        for stamp, value, score, label in zip(series.timestamps, series.values.tolist(), scores.tolist(),
                                              labels.tolist()):
            writer.writerow([stamp, f"{value:g}", f"{score:.6f}", label])
    finally:
        if path:
            handle.close()
