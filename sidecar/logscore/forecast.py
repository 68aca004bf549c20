"""Forecasting counts (or any values) per key and per time slot, online, and how improbable an
observation is given the forecast.

One model, vectorized over many keys: the windows of the sidecar (counts of a route, a status
class, a URL template per minute) and `logscore evaluate --series` (one series) use it alike.

    y = transform(value)                     counts: sqrt(count + 3/8), whose noise is near
                                             constant (Anscombe); other values: as they are
    expected = level + hour[hour of day] + weekday[day of week]
    residual = y - expected,  z = residual / scale
    deviation = max(|z|, |mean of the last `run` residuals| / (scale / sqrt(run)))

The second term sees a shift that lasts (a flattened daily peak, a latency step) before any
single point is extreme. Updates use residuals clipped at ``CLIP`` scales, so an anomaly moves
the forecast little: the level, the seasonal offsets and the scale (a mean absolute residual)
follow the data with rates ``LEVEL_RATE`` (per window), ``SEASON_RATE_PER_PERIOD`` (per day for
the hour of day, per week for the day of week, whatever the window length) and ``SCALE_RATE``.

``ForecastState`` is the state of K keys as numpy arrays; ``step`` advances all of them by one
window with a handful of numpy operations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

HOURS, WEEKDAYS = 24, 7
LEVEL_RATE = 0.08
SEASON_RATE_PER_PERIOD = 0.3  # the hour-of-day offsets learn this much per day, day-of-week ones per week
SCALE_RATE = 0.02
CLIP = 3.0
RUN = 6  # windows averaged for the sustained-shift term
MIN_SCALE = 0.05  # on the transformed scale: a perfectly flat series still has some noise


def count_transform(counts: np.ndarray) -> np.ndarray:
    """Anscombe's variance-stabilizing transform of Poisson counts."""
    return np.sqrt(np.maximum(counts, 0.0) + 0.375)


def count_inverse(y: np.ndarray) -> np.ndarray:
    return np.maximum(np.square(np.maximum(y, 0.0)) - 0.375, 0.0)


def slots(seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hour of day, day of week) of Unix times (UTC)."""
    whole = np.floor(np.asarray(seconds, dtype=np.float64)).astype(np.int64)
    hour = (whole // 3600) % HOURS
    weekday = (whole // 86400 + 3) % WEEKDAYS  # 1970-01-01 was a Thursday: Monday = 0
    return hour, weekday


@dataclass
class ForecastState:
    """The forecast of K keys; every array has K rows."""

    level: np.ndarray  # float64 [K]
    hour: np.ndarray  # float64 [K, 24]
    weekday: np.ndarray  # float64 [K, 7]
    scale: np.ndarray  # float64 [K]
    recent: np.ndarray  # float64 [K, RUN]: the last residuals, newest at [:, step % RUN]
    seen: np.ndarray  # int64 [K]: windows observed
    window_s: float = 3600.0  # the length of a step (sets the seasonal learning rates)
    min_scale: float = MIN_SCALE

    @classmethod
    def empty(cls, keys: int, window_s: float = 3600.0, min_scale: float = MIN_SCALE) -> "ForecastState":
        return cls(np.zeros(keys), np.zeros((keys, HOURS)), np.zeros((keys, WEEKDAYS)),
                   np.full(keys, np.nan), np.zeros((keys, RUN)), np.zeros(keys, dtype=np.int64), window_s, min_scale)

    def season_rates(self) -> tuple[float, float]:
        """(hour-of-day, day-of-week) learning rates per observation of a slot."""
        keep = 1.0 - SEASON_RATE_PER_PERIOD
        return (1.0 - keep ** (min(self.window_s, 3600.0) / 3600.0),
                1.0 - keep ** (min(self.window_s, 86400.0) / 86400.0))

    def __len__(self) -> int:
        return len(self.level)

    def expected(self, hour: np.ndarray, weekday: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
        rows = np.arange(len(self)) if rows is None else rows
        return self.level[rows] + self.hour[rows, hour] + self.weekday[rows, weekday]

    def spread(self, rows: Optional[np.ndarray] = None) -> np.ndarray:
        scale = self.scale if rows is None else self.scale[rows]
        return np.maximum(np.nan_to_num(scale, nan=self.min_scale), self.min_scale)

    def step(self, y: np.ndarray, hour: np.ndarray, weekday: np.ndarray,
             rows: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """Observe one window of keys ``rows`` (default all): (expected, deviation) before updating.

        A key's first observation sets its level (deviation 0)."""
        rows = np.arange(len(self)) if rows is None else rows
        expected = self.expected(hour, weekday, rows)
        fresh = self.seen[rows] == 0
        expected = np.where(fresh, y, expected)
        scale = self.spread(rows)
        residual = y - expected
        position = self.seen[rows] % RUN
        self.recent[rows, position] = residual
        filled = np.minimum(self.seen[rows] + 1, RUN)
        run_mean = self.recent[rows].sum(axis=1) / filled
        deviation = np.maximum(np.abs(residual) / scale, np.abs(run_mean) / (scale / np.sqrt(filled)))
        deviation = np.where(fresh, 0.0, deviation)
        self._update(rows, residual, scale, hour, weekday, fresh, y)
        return expected, deviation

    def _update(self, rows, residual, scale, hour, weekday, fresh, y) -> None:
        clipped = np.clip(residual, -CLIP * scale, CLIP * scale)
        self.level[rows] = np.where(fresh, y, self.level[rows] + LEVEL_RATE * clipped)
        hourly, daily = self.season_rates()
        self.hour[rows, hour] += hourly * clipped
        self.weekday[rows, weekday] += daily * clipped
        # The seasonal offsets average zero: what they share belongs to the level.
        shared = self.hour[rows].mean(axis=1) + self.weekday[rows].mean(axis=1)
        self.hour[rows] -= self.hour[rows].mean(axis=1, keepdims=True)
        self.weekday[rows] -= self.weekday[rows].mean(axis=1, keepdims=True)
        self.level[rows] += shared
        absolute = np.abs(clipped) * 1.25  # mean absolute residual x 1.25 ≈ standard deviation
        old = self.scale[rows]
        self.scale[rows] = np.where(np.isnan(old), np.maximum(absolute, self.min_scale),
                                    (1 - SCALE_RATE) * np.nan_to_num(old) + SCALE_RATE * absolute)
        self.seen[rows] += 1
