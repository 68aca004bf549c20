"""Forecasting counts (or any values) per key and per time slot, online, and how improbable an
observation is given the forecast.

One model, vectorized over many keys: the windows of the sidecar (counts of a route, a status
class, a URL template per minute) and `logscore evaluate --series` (one series) use it alike.

    y = transform(value)                     counts: sqrt(count + 3/8), whose noise is near
                                             constant (Anscombe); other non-negative values
                                             (measurements: CPU %, latency, bytes): sqrt(value),
                                             with no offset, so their scale is theirs to set;
                                             values that go negative: as they are
    expected = level + hour[hour of day] + week[hour of week]
    residual = y - expected,  z = residual / scale
    deviation = max(|z|, |mean of the last `run` residuals| / (scale / sqrt(run)))

The second term sees a shift that lasts (a flattened daily peak, a latency step) before any
single point is extreme. Updates use residuals clipped at ``CLIP`` scales, so an anomaly moves
the forecast little: the level, the seasonal offsets and the scale (a mean absolute residual)
follow the data with rates set in real time, whatever the window length: half-lives
``LEVEL_HALF_LIFE_S`` and ``SCALE_HALF_LIFE_S``, and ``SEASON_RATE_PER_PERIOD`` (per day for the
hour of day, per week for the hour of week: what sets a Sunday afternoon apart). The scale learns
at least ``MIN_SCALE_RATE`` of each window, so with windows shorter than about 42 minutes its
half-life is 69 windows, not two days (69 minutes of 1-minute windows, 5.75 hours of NAB's
5-minute steps): measured on NAB, a true two-day memory scores lower (76.1 against 79.5).
The scale never falls below ``min_scale``: ``COUNT_MIN_SCALE`` for counts (Poisson noise). A
measurement has no such unit: its spread never falls below ``min_share`` of its level instead
(``MEASURE_MIN_SHARE``), so the same measurements in other units (dollars or euros, percent or
a fraction) get the same deviations. NOTE: which a series is, is read from its values (for
`evaluate --series`, from its first day's, widened later by a fraction or a negative: series.py): one written
in whole numbers (bytes, cents, milliseconds) is taken for counts, with Poisson's floor; in bytes a
3 % step of a 2 MB series stands 29 spreads out, in megabytes 0.75.

``ForecastState`` is the state of K keys as numpy arrays; ``step`` advances all of them by one
window with a handful of numpy operations.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Optional

import numpy as np

HOURS, WEEK_HOURS = 24, 168
LEVEL_HALF_LIFE_S = 6 * 3600.0  # the level forgets half of what it knew in six hours
SEASON_RATE_PER_PERIOD = 0.3  # a seasonal offset learns this much from each hour of data it sees
DAY_S = 86400.0
SCALE_HALF_LIFE_S = 2 * DAY_S
MIN_SCALE_RATE = 0.01  # the scale learns at least this much of each window (see above)
CLIP = 3.0
RUN = 6  # windows averaged for the sustained-shift term
MIN_SCALE = 0.05  # on the transformed scale: a perfectly flat series still has some noise
# Counts are Poisson at the least: after Anscombe's transform their noise has a standard deviation
# of 1/2 whatever the rate. Below it, a key that is mostly zeros (a rare status, a quiet hour) would
# learn a spread near 0, and a count of 2 would stand 18 spreads out (NAB's Twitter_volume_CVS).
COUNT_MIN_SCALE = 0.5
# A measurement's spread is at least this share of its level (on the square-root scale: about 4 % of
# the value), and MEASURE_MIN_SCALE only keeps a series of zeros from dividing by zero. Measured on
# the 48 NAB series no parameter was chosen on, shares of 0.3-10 % all beat the absolute 0.05 with
# the 3/8 offset (fixed in whatever unit the series is written in), and no floor at all loses badly
# (docs/accuracy.md).
MEASURE_MIN_SHARE = 0.02
MEASURE_MIN_SCALE = 1e-9


def count_transform(counts: np.ndarray) -> np.ndarray:
    """Anscombe's variance-stabilizing transform of Poisson counts."""
    return np.sqrt(np.maximum(counts, 0.0) + 0.375)


def measure_transform(values: np.ndarray) -> np.ndarray:
    """Non-negative measurements: the square root without an offset, so scaling a series by c scales
    its transform (and so its level, residuals and spread) by sqrt(c) and leaves deviations alone."""
    return np.sqrt(np.maximum(values, 0.0))


def count_inverse(y: np.ndarray) -> np.ndarray:
    return np.maximum(np.square(np.maximum(y, 0.0)) - 0.375, 0.0)


def slots(seconds: np.ndarray, zone: Optional[datetime.tzinfo] = None) -> tuple[np.ndarray, np.ndarray]:
    """(hour of day, hour of week) of Unix times on the wall clock of ``zone`` (None: UTC); the week
    starts on Monday 00:00.

    People follow their local clock: on UTC slots a site in a daylight-saving zone had its whole
    daily pattern move an hour twice a year, and the ramp hours were forecast an hour off for days
    (docs/accuracy.md). On the wall clock the hour skipped in spring is no slot that day (01:59 is
    followed by slot 3) and the hour repeated in autumn is slot 2 twice (two hours of updates)."""
    whole = np.floor(np.asarray(seconds, dtype=np.float64)).astype(np.int64)
    if zone is not None:
        whole = whole + zone_offsets(whole, zone)
    hour = (whole // 3600) % HOURS
    weekday = (whole // 86400 + 3) % 7  # 1970-01-01 was a Thursday: Monday = 0
    return hour, weekday * HOURS + hour


def zone_offsets(whole: np.ndarray, zone: datetime.tzinfo) -> np.ndarray:
    """Seconds ``zone`` is ahead of UTC at each Unix time: looked up once per distinct quarter hour
    (zones change their offset on a quarter hour), so a window close costs one lookup."""
    quarters, inverse = np.unique(whole // 900, return_inverse=True)
    offsets = [datetime.datetime.fromtimestamp(q * 900, datetime.timezone.utc).astimezone(zone).utcoffset()
               for q in quarters.tolist()]
    return np.asarray([o.total_seconds() for o in offsets], dtype=np.int64)[inverse.reshape(whole.shape)]


@dataclass
class ForecastState:
    """The forecast of K keys; every array has K rows."""

    level: np.ndarray  # float64 [K]
    hour: np.ndarray  # float64 [K, 24]
    week: np.ndarray  # float64 [K, 168]: what each hour of the week adds to its hour of day
    scale: np.ndarray  # float64 [K]
    recent: np.ndarray  # float64 [K, RUN]: the last residuals, newest at [:, step % RUN]
    seen: np.ndarray  # int64 [K]: windows observed
    window_s: float = 3600.0  # the length of a step (sets the seasonal learning rates)
    min_scale: float = MIN_SCALE
    min_share: float = 0.0  # the spread is at least this share of |level| too (measurements)

    @classmethod
    def empty(cls, keys: int, window_s: float = 3600.0, min_scale: float = MIN_SCALE,
              min_share: float = 0.0) -> "ForecastState":
        return cls(np.zeros(keys), np.zeros((keys, HOURS)), np.zeros((keys, WEEK_HOURS)),
                   np.full(keys, np.nan), np.zeros((keys, RUN)), np.zeros(keys, dtype=np.int64), window_s, min_scale,
                   min_share)

    def rate(self, half_life_s: float) -> float:
        """The per-window update rate of a half-life in seconds."""
        return 1.0 - 0.5 ** (self.window_s / half_life_s)

    def season_rates(self) -> tuple[float, float]:
        """(hour-of-day, hour-of-week) learning rates per observation of a slot: each slot is
        observed once a day (a week) for an hour's worth of windows."""
        rate = 1.0 - (1.0 - SEASON_RATE_PER_PERIOD) ** (min(self.window_s, 3600.0) / 3600.0)
        return rate, rate

    def __len__(self) -> int:
        return len(self.level)

    def expected(self, hour: np.ndarray, week: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
        rows = np.arange(len(self)) if rows is None else rows
        return self.level[rows] + self.hour[rows, hour] + self.week[rows, week]

    def spread(self, rows: Optional[np.ndarray] = None) -> np.ndarray:
        scale = self.scale if rows is None else self.scale[rows]
        spread = np.maximum(np.nan_to_num(scale, nan=self.min_scale), self.min_scale)
        if self.min_share:
            level = self.level if rows is None else self.level[rows]
            spread = np.maximum(spread, self.min_share * np.abs(level))
        return spread

    def step(self, y: np.ndarray, hour: np.ndarray, week: np.ndarray,
             rows: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """Observe one window of keys ``rows`` (default all): (expected, deviation) before updating.

        A key's first observation sets its level (deviation 0)."""
        expected, single, sustained, _, _ = self.step_terms(y, hour, week, rows)
        return expected, np.maximum(single, sustained)

    def step_terms(self, y: np.ndarray, hour: np.ndarray, week: np.ndarray, rows: Optional[np.ndarray] = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``step``'s deviation in its two terms, for explaining which raised it: (expected, this
        window's deviation, the sustained shift's (the mean residual of the last ``filled`` windows
        against its own spread), that mean residual, ``filled``)."""
        rows = np.arange(len(self)) if rows is None else rows
        expected = self.expected(hour, week, rows)
        fresh = self.seen[rows] == 0
        expected = np.where(fresh, y, expected)
        scale = self.spread(rows)
        residual = y - expected
        position = self.seen[rows] % RUN
        self.recent[rows, position] = residual
        filled = np.minimum(self.seen[rows] + 1, RUN)
        run_mean = self.recent[rows].sum(axis=1) / filled
        single = np.where(fresh, 0.0, np.abs(residual) / scale)
        sustained = np.where(fresh, 0.0, np.abs(run_mean) / (scale / np.sqrt(filled)))
        self._update(rows, residual, scale, hour, week, fresh, y)
        return expected, single, sustained, run_mean, filled

    def _update(self, rows, residual, scale, hour, week, fresh, y) -> None:
        clipped = np.clip(residual, -CLIP * scale, CLIP * scale)
        self.level[rows] = np.where(fresh, y, self.level[rows] + self.rate(LEVEL_HALF_LIFE_S) * clipped)
        hourly, weekly = self.season_rates()
        self.hour[rows, hour] += hourly * clipped
        self.week[rows, week] += weekly * clipped
        # The seasonal offsets average zero: what they share belongs to the level.
        shared = self.hour[rows].mean(axis=1) + self.week[rows].mean(axis=1)
        self.hour[rows] -= self.hour[rows].mean(axis=1, keepdims=True)
        self.week[rows] -= self.week[rows].mean(axis=1, keepdims=True)
        self.level[rows] += shared
        absolute = np.abs(clipped) * 1.25  # mean absolute residual x 1.25 ≈ standard deviation
        old = self.scale[rows]
        scale_rate = max(self.rate(SCALE_HALF_LIFE_S), MIN_SCALE_RATE)
        self.scale[rows] = np.where(np.isnan(old), np.maximum(absolute, self.min_scale),
                                    (1 - scale_rate) * np.nan_to_num(old) + scale_rate * absolute)
        self.seen[rows] += 1
