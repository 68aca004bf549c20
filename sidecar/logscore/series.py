"""Scoring one time series online (each point from the past only): `logscore evaluate --series`.

The same forecaster the sidecar's windows use (forecast.py), on one key whose windows are the
series' steps; then four questions about each point's deviation, all answered from the past:

    typical   u = deviation / a typical day's strangest (the median of the daily maxima of the
              deviation over the last ``TYPICAL_DAYS`` days): how strange for this series; or, if
              larger, n = the point's novelty of shape / a typical day's largest novelty (the same
              median, of its daily maxima): how new the last hours' shape is (``ShapeNovelty``)
    record    v = deviation / the largest deviation of the previous day: is it beyond anything
              since yesterday (so a long anomaly, or a noisy stretch, raises one alarm, not one
              at every point)
    hold-off  after a score s, the next ``HOLD_S`` seconds (and at least ``HOLD_STEPS`` steps)
              are scored x (1 - HOLD x s): the points that follow an alarm (a burst rising
              over a few steps) are not new alarms
    holds up  a point's score waits for the next ``CONFIRM_STEPS`` points and is scaled by how far
              their mean deviation reaches ``CONFIRM_SHARE`` of its own (at most x 1): a burst that
              lasts keeps its score, a lone spike (one point, then the usual) loses most of it
    the peak  a point whose candidate is below the candidate of one of those next points is written
              as 0: a burst that rises over a few points is one alarm, at its strongest point

    candidate     = m / (1 + m)  x  v^p / (1 + v^p)  x  (1 - HOLD x the highest candidate of the hold-off),
                    m = max(u, n), p = RECORD_POWER
    anomaly_score = the candidate of the point CONFIRM_STEPS back, 0 if a point since had a higher one,
                    else x min(1, the mean deviation since / (CONFIRM_SHARE x its deviation))

The score written for a point is therefore the alarm about the point ``CONFIRM_STEPS`` steps
before it: the alarm comes that many steps late, from the past only.

The first day only learns (its deviations are not scored); the series' usual step (the forecaster's,
the hold-off's and the shape blocks') and its kind (counts, measurements, or values that go negative:
``Kind``) settle from that day's points, and the kind widens from the first later value that
contradicts it. Measured on NAB's series, and why these questions and not others, in docs/accuracy.md
(benchmarks/nab_evaluate.py).
"""

from __future__ import annotations

import collections
import csv
import enum
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .errors import InputError
from .forecast import (COUNT_MIN_SCALE, DAY_S, MEASURE_MIN_SCALE, MEASURE_MIN_SHARE, ForecastState, count_transform,
                       measure_transform, slots)
from .inputs import read_lines
from .timestamps import parse_time

WARM_UP_S = 86400.0  # deviations of the first day (seasons unknown) are not scored
PROGRESS_POINTS = 100_000
TYPICAL_DAYS = 30  # daily maxima remembered for "a typical day's strangest"
RECORD_S = 86400.0  # "the previous day" of the record factor
# How sharply the record factor rises past yesterday's strangest (0.5 at it). 4.5 and HOLD 0.65 since
# session 25: with the peak (a point whose candidate a point it waits for beats is no alarm), these two
# were chosen anew on the 10 NAB series (4 and 0.7 before); both halves of the held-out 48 gain too.
RECORD_POWER = 4.5
RECORD_MOST = 1e12  # the record factor is 1 within float precision long before (v^p / (1 + v^p))
HOLD_S = 3 * 3600.0  # how long an alarm holds the scores after it down ...
HOLD = 0.65  # ... and how far: x (1 - HOLD x the alarm's score)
# ... and over at least this many steps: 3 hours are 36 five-minute steps but 3 hourly ones, too few
# to hold down the rest of an event on an hourly series (ad costs, temperatures). Chosen on the 48 NAB
# series held out from the other settings, where both halves of a split by category gain from 12 to 36
# steps (docs/accuracy.md); series of 5-minute steps or shorter keep their 3 hours.
HOLD_STEPS = 24
CONFIRM_STEPS = 3  # a point's score waits for this many points after it ...
CONFIRM_SHARE = 0.5  # ... whose mean deviation keeps its score whole from this share of its own up
# Novelty of shape (ARTime's idea, written anew): a point's window is its last SHAPE_BLOCKS blocks of
# SHAPE_BLOCK_S (at least a step each), each block the mean of its values, matched against the shapes
# seen before. Blocks are counted in points of the warm-up's step (past only), not in time: across a
# gap, or where the series later samples more sparsely, a window spans more time. Chosen on the 48
# NAB series held out from the other settings (docs/accuracy.md).
SHAPE_BLOCK_S = 1800.0
SHAPE_BLOCKS = 8
SHAPE_PROTOTYPES = 256  # shapes remembered; the least recently matched makes room for a new one
SHAPE_VIGILANCE = 0.1  # a window farther than this share of the range of values from every shape is a new shape
SHAPE_RATE = 0.1  # how far a matched shape moves toward the window that matched it
# A block is SHAPE_BLOCK_S of the warm-up's step, at most this many points: a series of millisecond
# steps made blocks of 1.8 million points (10 us steps: 11.5 GB, 1 us: a 98 GiB allocation)
SHAPE_BLOCK_MOST_POINTS = 256


@dataclass
class Series:
    timestamps: list[str]  # as written in the file
    times: np.ndarray  # Unix seconds
    values: np.ndarray


def read_series(path: str) -> Series:
    """A CSV of ``timestamp,value`` rows (a header line first); InputError naming the bad row.
    A timestamp is a date and time (ISO 8601, UTC unless it says otherwise) or Unix seconds."""
    try:
        rows = list(csv.reader(read_lines([path], blank_lines=True)))  # blank rows kept: errors name file lines
    except csv.Error as error:  # NOTE: lines ending in a lone CR (old Mac files) come here
        raise InputError(f"{path}: not CSV rows ({error}); end lines with LF or CRLF") from None
    header_at = next((index for index, row in enumerate(rows) if row), len(rows))
    first_row = rows[header_at][:2] if header_at < len(rows) else []
    header = [c.strip().lower().lstrip("\ufeff") for c in first_row]  # a BOM: Excel's UTF-8
    if header != ["timestamp", "value"]:
        raise InputError(f"{path}: expected a header 'timestamp,value' and one row per point")
    stamps, times, values, line_numbers = [], [], [], []
    for number, row in enumerate(rows[header_at + 1:], start=header_at + 2):
        if not row:
            continue
        if len(row) != 2:
            raise InputError(f"{path}: line {number} has {len(row)} fields, not 'timestamp,value' "
                             f"({','.join(row)[:80]!r}; a value with a thousands separator?)")
        seconds = unix_seconds(row[0])
        try:
            value = float(row[1])
        except ValueError:
            value = float("nan")
        if seconds is None or not math.isfinite(value):
            raise InputError(f"{path}: line {number} is not 'timestamp,value' with a finite number "
                             f"({','.join(row)[:80]!r})")
        stamps.append(row[0])
        times.append(seconds)
        values.append(value)
        line_numbers.append(number)
    if len(values) < 10:
        raise InputError(f"{path}: {len(values)} points; a series needs at least 10")
    times_array = np.asarray(times)
    back = np.flatnonzero(np.diff(times_array) < 0)  # NOTE: equal ones happen (clocks turned back an hour)
    if len(back):
        row = int(back[0]) + 1
        raise InputError(f"{path}: timestamps must not go back from row to row: line {line_numbers[row]} "
                         f"({stamps[row]}) is earlier than line {line_numbers[row - 1]} ({stamps[row - 1]}); "
                         "sort the rows by time")
    if np.median(np.diff(times_array)) <= 0:
        raise InputError(f"{path}: most points share their timestamp with the one before; give one point a time")
    return Series(stamps, times_array, np.asarray(values))


def unix_seconds(text: str) -> Optional[float]:
    try:
        return float(text) if text.strip().lstrip("-").replace(".", "", 1).isdigit() else parse_time(text)
    except ValueError:
        return None


class Kind(enum.IntEnum):
    """What a series' values are. It settles from the warm-up and only widens (COUNTS → MEASUREMENTS
    → SIGNED) when a later value contradicts it, never narrows back."""

    COUNTS = 0  # whole numbers, none negative: Anscombe's transform, Poisson noise at least
    MEASUREMENTS = 1  # non-negative: the square root without offset, a spread relative to the level
    SIGNED = 2  # some negative: the values as they are, a spread relative to the level


def kinds_of(values: np.ndarray) -> np.ndarray:
    """Each value's narrowest kind (as ints)."""
    whole = np.where(values == np.round(values), Kind.COUNTS, Kind.MEASUREMENTS)
    return np.where(values < 0, Kind.SIGNED, whole)


def transform(kinds: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each value on the scale of its kind."""
    return np.select([kinds == Kind.COUNTS, kinds == Kind.MEASUREMENTS],
                     [count_transform(values), measure_transform(values)], values.astype(np.float64))


def warm_up_points(times: np.ndarray) -> int:
    """How many points the warm-up holds: the first day's (scored 0), and at least 2 (a step)."""
    return max(int(np.searchsorted(times, times[0] + WARM_UP_S)), 2)


def usual_step(times: np.ndarray) -> float:
    """The series' usual step: the median step of the warm-up's points, so online, as every score."""
    return float(np.median(np.diff(times[:warm_up_points(times)]))) if len(times) > 1 else 0.0


class SeriesForecast:
    """One series' forecaster (forecast.py on one key), its step and kind given by the warm-up; its
    kind widens the first time a value contradicts it (a fraction or a negative after a day of counts)."""

    def __init__(self, step_s: float, kind: Kind) -> None:
        self.kind = kind
        self.state = ForecastState.empty(1, step_s, *self.floors(kind))

    @staticmethod
    def floors(kind: Kind) -> tuple[float, float]:
        """(min_scale, min_share): Poisson noise for counts; measurements have no unit of noise, only a
        floor relative to their level (forecast.py)."""
        return (COUNT_MIN_SCALE, 0.0) if kind is Kind.COUNTS else (MEASURE_MIN_SCALE, MEASURE_MIN_SHARE)

    def deviation(self, kind: int, y: np.ndarray, hour: np.ndarray, week: np.ndarray) -> float:
        """The deviation of a value (``y``: on the scale of ``kind``, at least as wide as the series')
        from the forecast made before it; then the forecast learns it."""
        if kind > self.kind:
            self.widen(Kind(kind))
        return float(self.state.step(y, hour, week)[1][0])

    def widen(self, kind: Kind) -> None:
        """Carry what was learned over to the wider kind's scale, at the level: counts to
        measurements keep their square-root scale, only Anscombe's 3/8 leaves the level; to values
        as they are, near a level y on a square-root scale (y = sqrt(value + offset)) a step of the
        root is 2y in value, so the seasonal offsets, the spread and the recent residuals grow 2y."""
        state = self.state
        root = state.level.copy()
        offset = 0.375 if self.kind is Kind.COUNTS else 0.0
        if kind is Kind.MEASUREMENTS:
            state.level = measure_transform(np.square(root) - offset)
        else:
            state.level = np.square(root) - offset
            factor = 2.0 * np.maximum(root, 0.0)
            state.hour *= factor[:, None]
            state.week *= factor[:, None]
            state.recent *= factor[:, None]
            state.scale *= factor
        state.min_scale, state.min_share = self.floors(kind)
        self.kind = kind


def deviations(times: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each point's deviation from its forecast, the forecast made from the points before it.

    The series' step and kind settle from the warm-up (the first day): its points are forecast
    with what the whole warm-up says, and no score depends on them before the warm-up is over
    (its points are scored 0; its daily maximum and record count from the first point after it).
    A later value that contradicts the kind widens it from that point on (``SeriesForecast``);
    nothing after a point changes that point's score."""
    settled = kinds_of(values[:warm_up_points(times)]).max()
    kinds = np.maximum.accumulate(np.maximum(kinds_of(values), settled))  # the widest so far: the past only
    forecast = SeriesForecast(usual_step(times), Kind(settled))
    y = transform(kinds, values)
    hours, weeks = slots(times)
    found = np.zeros(len(values))
    for i, kind in enumerate(kinds.tolist()):
        found[i] = forecast.deviation(kind, y[i: i + 1], hours[i: i + 1], weeks[i: i + 1])
    return found


class RunningMax:
    """The largest value pushed within the last ``span_s`` seconds (a deque of decreasing values)."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self.kept: collections.deque = collections.deque()  # (time, value), values decreasing

    def peek(self, moment: float) -> Optional[float]:
        """The largest value pushed after ``moment - span_s``, or None."""
        while self.kept and self.kept[0][0] < moment - self.span_s:
            self.kept.popleft()
        return self.kept[0][1] if self.kept else None

    def push(self, moment: float, value: float) -> None:
        while self.kept and self.kept[-1][1] <= value:
            self.kept.pop()
        self.kept.append((moment, value))


class ShapeNovelty:
    """How new each point's recent shape is, online and bounded: the window of the last
    ``SHAPE_BLOCKS`` block means against at most ``SHAPE_PROTOTYPES`` shapes seen before (leader
    clustering). The novelty is the largest block difference to the nearest shape, over the range of
    the values so far: a plateau or a flattened day at the usual level and range is far from every
    daily shape the series had, where its deviation from the forecast may stay ordinary."""

    def __init__(self, step_s: float) -> None:
        """``step_s``: the series' usual step from its warm-up, as the forecaster's (a block spans at
        least one)."""
        self.block = min(max(1, int(round(SHAPE_BLOCK_S / step_s))) if step_s > 0 else 1, SHAPE_BLOCK_MOST_POINTS)
        self.last_block = np.zeros(self.block)  # the last ``block`` values, a ring
        self.block_means = np.zeros((SHAPE_BLOCKS - 1) * self.block + 1)  # the mean ending at each recent point
        self.offsets = np.arange(SHAPE_BLOCKS) * self.block  # where the window's blocks end in that ring, oldest first
        self.seen = 0
        self.low, self.high = math.inf, -math.inf
        # One shape a column: the largest difference is then a reduction over rows, 3x faster than over columns
        self.shapes = np.zeros((SHAPE_BLOCKS, SHAPE_PROTOTYPES))
        self.last_matched = np.zeros(SHAPE_PROTOTYPES)
        self.known = 0  # shapes in use

    def novelty(self, value: float) -> float:
        """This point's novelty (0 until a whole window has been seen); then the shapes learn its window.
        A value that is no finite number is passed over: one in a shape made every later match NaN."""
        if not math.isfinite(value):
            return 0.0
        self.low, self.high = min(self.low, value), max(self.high, value)
        self.last_block[self.seen % self.block] = value
        # Summed anew, not a running sum: a flat stretch then gives equal means, never rounding noise
        self.block_means[self.seen % len(self.block_means)] = self.last_block.sum() / self.block
        self.seen += 1
        if self.seen < SHAPE_BLOCKS * self.block:
            return 0.0
        window = self.block_means[(self.seen + self.offsets) % len(self.block_means)]
        if self.known == 0:
            self.remember(window)
            return 0.0
        scale = max(self.high - self.low, 1e-12)
        distances = np.abs(self.shapes[:, :self.known] - window[:, None]).max(axis=0) / scale
        nearest = int(np.argmin(distances))
        found = float(distances[nearest])
        if found > SHAPE_VIGILANCE:
            self.remember(window)
        else:
            self.shapes[:, nearest] += SHAPE_RATE * (window - self.shapes[:, nearest])
            self.last_matched[nearest] = self.seen
        return found

    def remember(self, window: np.ndarray) -> None:
        """A new shape, in place of the least recently matched once the memory is full."""
        slot = self.known if self.known < SHAPE_PROTOTYPES else int(np.argmin(self.last_matched))
        self.known = min(self.known + 1, SHAPE_PROTOTYPES)
        self.shapes[:, slot], self.last_matched[slot] = window, self.seen


class DailyTypical:
    """A typical day's strangest: the median of the last ``TYPICAL_DAYS`` daily maxima of a value."""

    def __init__(self) -> None:
        self.day_max = 0.0
        self.maxima: collections.deque = collections.deque(maxlen=TYPICAL_DAYS)
        self.typical = 0.0

    def push(self, value: float) -> None:
        self.day_max = max(self.day_max, value)

    def close_day(self) -> None:
        self.maxima.append(self.day_max)
        self.typical = float(np.median(self.maxima))
        self.day_max = 0.0


class SeriesScorer:
    """One series' deviations (and novelties of shape) in, anomaly scores out, online; the state is
    bounded (running maxima of a day or of ``HOLD_STEPS`` steps at most, ``TYPICAL_DAYS`` daily maxima
    of each, and the last ``CONFIRM_STEPS`` points)."""

    def __init__(self, start: float, step_s: float = 0.0) -> None:
        """``step_s``: the series' usual step (the hold-off spans at least ``HOLD_STEPS`` of them)."""
        self.start = start
        self.day = 0
        self.deviations, self.novelties = DailyTypical(), DailyTypical()
        self.record = RunningMax(RECORD_S)
        self.held = RunningMax(max(HOLD_S, HOLD_STEPS * step_s))
        self.waiting: collections.deque = collections.deque(maxlen=CONFIRM_STEPS + 1)  # (candidate, deviation)

    def score(self, moment: float, deviation: float, novelty: float = 0.0) -> float:
        """The score of the point ``CONFIRM_STEPS`` back, now that the points after it are known: 0 if one
        of them has a higher candidate, else its candidate scaled by how far they hold up."""
        self.waiting.append((self.candidate(moment, deviation, novelty), deviation))
        if len(self.waiting) <= CONFIRM_STEPS:
            return 0.0
        candidate, its_deviation = self.waiting[0]
        if candidate <= 0.0:
            return 0.0
        later = list(self.waiting)[1:]
        if max(later_candidate for later_candidate, _ in later) > candidate:
            return 0.0  # not the burst's peak: NAB counts every point outside a window, one alarm is enough
        since = sum(later_deviation for _, later_deviation in later) / CONFIRM_STEPS
        return candidate * min(1.0, since / (CONFIRM_SHARE * its_deviation))

    def candidate(self, moment: float, deviation: float, novelty: float = 0.0) -> float:
        """This point's score before it is confirmed (typical x record x hold-off); updates the state.
        ``novelty``: its novelty of shape (``ShapeNovelty``), 0 for none."""
        since = moment - self.start
        self._close_days(int(since // DAY_S))
        strangest = self.record.peek(moment)
        score = 0.0
        if since >= WARM_UP_S and self.deviations.maxima and strangest is not None:
            # A new shape is strange for the day as a large deviation is; only the record factor
            # (a deviation beyond yesterday's) keeps a new shape on an ordinary day from alarming.
            beyond_typical = max(deviation / max(self.deviations.typical, 1e-9),
                                 novelty / max(self.novelties.typical, 1e-9))
            # (bounded before the power: values near 1e300 overflowed it, a traceback)
            beyond_record = min(deviation / max(strangest, 1e-9), RECORD_MOST) ** RECORD_POWER
            held = 1.0 - HOLD * (self.held.peek(moment) or 0.0)
            score = beyond_typical / (1.0 + beyond_typical) * beyond_record / (1.0 + beyond_record) * held
            self.held.push(moment, score)
        self.deviations.push(deviation)
        self.novelties.push(novelty)
        if since >= WARM_UP_S / 2:  # the first hours' forecast is still rough: not a record to beat
            self.record.push(moment, deviation)
        return score

    def _close_days(self, day: int) -> None:
        if day > self.day:
            self.deviations.close_day()
            self.novelties.close_day()
            self.day = day


def score_series(times: np.ndarray, values: np.ndarray, progress=None) -> np.ndarray:
    """anomaly_score of each point in [0, 1], online; ``progress(done, total)`` now and then."""
    found = deviations(times, values)
    step_s = usual_step(times)  # the warm-up's: the forecaster's, the hold-off's and the shapes' blocks
    scorer = SeriesScorer(float(times[0]), step_s)
    shapes = ShapeNovelty(step_s)
    scores = np.zeros(len(times))
    for i, (moment, deviation, value) in enumerate(zip(times.tolist(), found.tolist(), values.tolist())):
        scores[i] = scorer.score(moment, deviation, shapes.novelty(value))
        if progress is not None and i % PROGRESS_POINTS == 0:
            progress(i, len(times))
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
