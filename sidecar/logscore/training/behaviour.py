"""Learning behaviour over time from historical logs: window forecasters and the client detector.

    records (in file order) ─► normalized fields + timestamps (timestamps.py)
        windows: counts per key per window ─► forecast.py replayed over every window
                 (online, as the sidecar will run it) ─► deviations of the key-windows the
                 sidecar could report, once the seasonal offsets settled ─► empirical CDF
                 (calibration) ─► threshold from --window-target-fpr
        clients: the record model scores every record ─► entities.ClientTracker replayed in
                 time order ─► per-feature empirical CDFs ─► summed log tails ─► calibration
                 ─► threshold: at most --client-target-fpr of normal clients ever cross it
    ─► attach_behaviour: tensors and small subgraphs added to the record model's graph,
       descriptions to its metadata (``windows``, ``entities``), content hash renewed.

The sidecar's side of the same models: sidecar/logscore/windows.py, entities.py, behaviour.py.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..artifact import HASH_KEY, METADATA_KEY, Artifact, content_hash
from ..entities import CLIENT_FIELDS, FEATURES, ClientTracker, client_batch
from ..errors import ConfigError, InputError
from ..forecast import COUNT_MIN_SCALE, DAY_S, ForecastState, count_inverse, count_transform, slots
from ..timestamps import SEASONS_UTC, TIME_FIELDS, record_times, season_zone
from ..records import text_columns
from ..windows import DIMENSIONS, LEVELS_READ, OTHER, SHARES, KeyNamer, fields_read, share_deviation, share_name
from .graph import GraphBuilder
from .train import Warn, apply_ecdf, ecdf_table, ignore

MAX_WINDOWS = 2_000_000
ENTITY_KNOTS, ENTITY_EXACT_TAIL = 256, 64  # knots of the client detector's per-feature empirical CDFs
NEW_KEY_SCALE = 0.35  # a never-seen key's spread on the transformed scale (~Poisson noise of small counts)


@dataclass
class BehaviourOptions:
    windows: bool = False
    window_s: float = 60.0
    max_keys: int = 500
    window_target_fpr: float = 1e-4  # of key-windows
    min_change: float = 5.0
    entities: bool = False
    entity_key: str = "remote_addr"
    half_life_s: float = 60.0
    client_target_fpr: float = 0.005  # of normal clients
    dimensions: Sequence[str] = DIMENSIONS
    season_zone: str = SEASONS_UTC  # whose wall clock hours of day and week follow (timestamps.season_zone_name)


@dataclass
class Learned:
    metadata: dict = field(default_factory=dict)  # "windows" / "entities" entries
    tensors: dict = field(default_factory=dict)  # name -> array, read back by the sidecar
    window_calibration: Optional[tuple] = None
    entity_tables: Optional[list] = None
    entity_calibration: Optional[tuple] = None


def time_ordered(fields: Sequence[dict], what: str) -> tuple[np.ndarray, np.ndarray]:
    """(order of the records with a time, their times), refusing input without timestamps."""
    times = record_times(fields)
    known = np.flatnonzero(~np.isnan(times))
    if len(known) < max(10, 0.5 * len(fields)):
        raise InputError(f"{what}: only {len(known)} of {len(fields)} records carry a readable timestamp "
                         "(a time, timestamp, @timestamp, @t or asctime field; in a plain line, near its start, "
                         "ISO 8601 or log4j's 2015-10-18 18:01:47,978, nginx's 2015/10/18 18:01:47, syslog's or C's "
                         "ctime; where it starts, HDFS's 081109 203615, Android's 03-17 16:13:38.811, glog's "
                         "I1223 22:15:29.606, Spark's 17/06/09 20:10:40 INFO (yy/MM/dd, a level after it), "
                         "HealthApp's 20171223-22:15:29:606 or Proxifier's [10.30 16:49:06]); learning over time "
                         "needs them")
    order = known[np.argsort(times[known], kind="stable")]
    return order, times[order]


TIME_PROBE = 2000  # records, evenly spread, read for their timestamps before any training


def check_timestamps(records: Sequence[object], spec: dict, options: BehaviourOptions) -> None:
    """Refuse input without timestamps before the record model is trained, not after: on 1M
    lines that was ten minutes of training, then the refusal. An even sample of the records is
    read as the behaviour learners will read them (the same rule, on the sample)."""
    from ..features import Featurizer

    step = max(1, len(records) // TIME_PROBE)
    probe = records[::step][:TIME_PROBE]
    fields = Featurizer(spec, also_fields=TIME_FIELDS).normalizer.normalize(probe).fields
    time_ordered(fields, "--windows" if options.windows else "--entities")


def dimensions_of(fields: Sequence[dict], order: np.ndarray, dimensions: Sequence[str]) -> list[str]:
    """The dimensions, but ``host`` where it names the client (Fluentd's apache2 parser calls the
    client host): a window per client repeats the client detector, with a new key for every new
    address. (Logstash's host, the server beside grok's clientip, stays a dimension.)"""
    sample = [fields[i] for i in order[:1000].tolist()]
    pairs = [(record["host"], record.get("remote_addr")) for record in sample if record.get("host") is not None]
    if pairs and sum(host == client for host, client in pairs) >= 0.9 * len(pairs):
        return [d for d in dimensions if d != "host"]
    return list(dimensions)


def ranked_keys(by_key: dict[str, list], dimensions: Sequence[str], max_keys: int) -> list[str]:
    """The keys trained: the route, the busiest keys, and per dimension an ``(other)`` key.

    The sidecar counts a key it has no row for, seen once in a window, as ``dimension=(other)``.
    Untrained, that row was forecast as a new key (about zero): on a real site's long tail of
    URLs (1,348 templates in 10,000 lines of a real access log, 500 kept) it held 9 records a
    minute of ordinary traffic and raised an event. Trained, it counts what the sidecar will:
    per window, the records of keys left out that appear there once."""
    order = sorted(by_key, key=lambda k: (not k.startswith("route="), -len(by_key[k]), k))
    if len(order) <= max_keys:
        return order
    ranked = order[: max(1, max_keys - len(dimensions))]  # room for the (other) keys
    kept = set(ranked)
    for dimension in dimensions:
        singles = [w for key in order if key not in kept and key.startswith(dimension + "=")
                   for w, n in zip(*np.unique(by_key[key], return_counts=True)) if n == 1]
        if singles:
            other = f"{dimension}={OTHER}"
            by_key[other] = [int(w) for w in singles]
            ranked.append(other)
    return ranked


def fit_windows(fields: Sequence[dict], route: str, options: BehaviourOptions, warn: Warn = ignore) -> Learned:
    order, times = time_ordered(fields, "--windows")
    window_s = float(options.window_s)
    first = np.floor(times[0] / window_s) * window_s
    window_of = ((times - first) // window_s).astype(np.int64)
    windows = int(window_of[-1]) + 1
    if windows > MAX_WINDOWS:
        raise InputError(f"--window-s {window_s:g} over {(times[-1] - times[0]) / DAY_S:.0f} days makes {windows:,} "
                         f"windows; use longer windows (at most {MAX_WINDOWS:,})")
    namer = KeyNamer(dimensions_of(fields, order, options.dimensions))
    by_key: dict[str, list] = {f"route={route}": window_of.tolist()}
    columns = text_columns([fields[i] for i in order.tolist()], fields_read(namer.dimensions))
    for dimension in namer.dimensions:
        for w, value in zip(window_of.tolist(), namer.column(dimension, columns)):
            key = namer.name(dimension, value)
            if key is not None:
                by_key.setdefault(key, []).append(w)
    ranked = ranked_keys(by_key, namer.dimensions, options.max_keys)
    counts = np.stack([np.bincount(by_key[k], minlength=windows) for k in ranked]).astype(np.float64)
    zone = season_zone(options.season_zone)
    hours, weeks = slots(first + window_s * np.arange(windows), zone)
    hours_covered, days_covered = covered_hours_and_days(first + window_s * np.arange(windows), window_s, zone)
    said = coverage_warning(windows, window_s, hours_covered, days_covered, options.season_zone)
    if said:  # (a field trial's 6,580 lines made 4 windows, and nothing said so)
        warn(said)
    state = ForecastState.empty(len(ranked), window_s, COUNT_MIN_SCALE)
    seasonal_start(state, counts, hours, weeks)
    first_day = min(windows // 4, int(DAY_S // window_s))  # never calibrated on: the level is still set
    deviations, reportable = [], []  # per kind (counts, then each share): [windows after the first day, ...]
    for w in range(windows):
        expected, deviation = state.step(count_transform(counts[:, w]), np.full(len(ranked), hours[w]),
                                         np.full(len(ranked), weeks[w]))
        if w >= first_day:
            deviations.append(deviation)
            reportable.append(np.abs(counts[:, w] - count_inverse(expected)) >= options.min_change)
    deviations, reportable = [np.stack(deviations)], [np.stack(reportable)]
    route_counts = counts[0]
    shares, expected, dispersion = [], [], []
    for dimension, value in SHARES:
        key = f"{dimension}={value}"
        if not any(k.startswith(f"{dimension}=") for k in by_key):
            continue  # the records never carry this dimension (no status, no level)
        share_counts = np.bincount(by_key.get(key, []), minlength=windows).astype(np.float64)
        p, phi = share_model(share_counts, route_counts)
        deviation, _ = share_deviation(share_counts[first_day:], route_counts[first_day:],
                                       np.full(windows - first_day, p), np.full(windows - first_day, phi))
        deviations.append(deviation[:, None])
        reportable.append(share_counts[first_day:, None] >= options.min_change)
        shares.append(share_name(dimension, value))
        expected.append(p)
        dispersion.append(phi)
    deviations, reportable = np.concatenate(deviations, axis=1), np.concatenate(reportable, axis=1)
    settled = calibration_warm_up(windows, window_s) - first_day
    start = calibration_start(reportable.sum(axis=1), settled, options.window_target_fpr)
    pooled, pool_kind = calibration_pool(deviations[start:], reportable[start:], deviations[settled:],
                                         options.window_target_fpr)
    warm_up = first_day + (settled if pool_kind == "all" else start)
    knots, levels = (tail_table(pooled, options.window_target_fpr) if pool_kind == "tail" else ecdf_table(pooled))
    threshold = float(1.0 - options.window_target_fpr)
    state.seen -= 1  # (the seasonal start counted as a window: the sidecar reads how many were seen)
    learned = Learned()
    learned.window_calibration = (knots, levels)
    learned.tensors.update({
        "window_level": state.level, "window_hour": state.hour, "window_week": state.week,
        "window_scale": state.spread(), "window_share_expected": np.asarray(expected, dtype=np.float64),
        "window_share_dispersion": np.asarray(dispersion, dtype=np.float64)})
    flagged = float((apply_ecdf(pooled, knots, levels) >= threshold).mean())
    learned.metadata["windows"] = {
        "window_s": window_s, "route": route, "keys": ranked,
        # the dimensions these records carry (a dimension they never had costs time and says nothing)
        "dimensions": ["route", "tag"] + [d for d in namer.dimensions if any(k.startswith(d + "=") for k in by_key)],
        "seen": state.seen.tolist(), "shares": shares, "threshold": threshold,
        "target_fpr": options.window_target_fpr, "min_change": options.min_change, "levels_read": LEVELS_READ,
        "season_zone": options.season_zone,
        "new_key": {"level": float(count_transform(np.zeros(1))[0]), "scale": NEW_KEY_SCALE},
        "calibration": calibration_description(pool_kind, len(pooled), int(reportable[start:].sum()),
                                               options.window_target_fpr, warm_up),
        "training": {"records": int(len(order)), "windows": windows, "start": float(first),
                     "end": float(first + windows * window_s), "keys_seen": len(by_key), "keys_kept": len(ranked),
                     "hours_of_day": hours_covered, "days_of_week": days_covered,
                     "flagged_fraction": round(flagged, 6),
                     "threshold_deviation": round(threshold_deviation(knots, levels, threshold), 3)},
    }
    return learned


def seasonal_start(state: ForecastState, counts: np.ndarray, hours: np.ndarray, weeks: np.ndarray) -> None:
    """Start the replay from the log's own seasonal means: each key's level at its mean, each hour
    of day (of week) the log covers offset by its mean's difference (hours it never covers: at the
    level, as before). The online offsets learn 0.3 of a residual per visit: from zero, a day's log
    taught its hours a third of their level (an office site forecast 11.5-19.7 records a minute for
    hours holding 2.5-31), the spread doubled on the lag, and a 60 % drop of the next days and a
    5-minute outage stood under a threshold placed among those lagging deviations
    (docs/accuracy.md). A long log ends elsewhere than it would have from zero, nearer its truth:
    on a 4-week shop log the hour-of-week offsets moved by up to 0.85 (square-root scale), the
    weekend's forecast error went from +49 % to -7 % (over the hours of the week 21.6 % -> 5.8 %
    on average), its threshold and events unchanged: retraining a site changes its forecasts.

    ``counts``: [keys, windows]; the state's windows seen start at 1 (not fresh: a fresh key's
    first window would set its level to that window's count)."""
    hour_mean, hour_covered = slot_means(counts, hours, 24)
    week_mean, week_covered = slot_means(counts, weeks, 168)
    level = (hour_mean * np.bincount(hours, minlength=24)).sum(axis=1) / len(hours)
    state.level[:] = level
    state.hour[:, hour_covered] = hour_mean[:, hour_covered] - level[:, None]
    within_day = hour_mean[:, np.arange(168) % 24]
    state.week[:, week_covered] = week_mean[:, week_covered] - within_day[:, week_covered]
    # The offsets average zero over all slots, as the online update keeps them.
    state.level += state.hour.mean(axis=1) + state.week.mean(axis=1)
    state.hour -= state.hour.mean(axis=1, keepdims=True)
    state.week -= state.week.mean(axis=1, keepdims=True)
    state.seen[:] = 1


def slot_means(counts: np.ndarray, slot_of: np.ndarray, slots_in_period: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean of each key's transformed counts per slot [keys, slots], whether the log covers each
    slot); a row at a time (the counts of a long log are the largest array training holds)."""
    windows = np.bincount(slot_of, minlength=slots_in_period)
    sums = np.stack([np.bincount(slot_of, weights=count_transform(row), minlength=slots_in_period)
                     for row in counts])
    covered = windows > 0
    return sums / np.maximum(windows, 1), covered


DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def coverage_warning(windows: int, window_s: float, hours: list[int], days: list[int], zone: str) -> Optional[str]:
    """What windows learned from a log of under a week cannot know (None: a week or more)."""
    span = windows * window_s
    if span < DAY_S:
        covered = f"hours {hour_ranges(hours)} of the {zone} day" if len(hours) >= 2 else "no whole hour of day"
        return (f"--windows: the logs span {windows:,} windows of {window_s:g} s ({span / 3600:.1f} h), {covered}: "
                "the other hours are forecast at the level of these (a night's tenth of the day's traffic would read "
                "as a drop), so for their first 3 days their counts' spread is 3 times wider (a flood or a silence "
                "is still seen there, a drop of half is not), and no day of the week is known; train on a day of logs "
                "or more (a week teaches the days of the week)")
    if span < 7 * DAY_S:
        missing = [DAY_NAMES[d] for d in range(7) if d not in days]
        return (f"--windows: the logs span {span / DAY_S:.1f} days: every hour of day is learned from them, but "
                f"{', '.join(missing)} are forecast as the days they cover (a weekend's lower traffic may read as a "
                "drop until the sidecar has seen it); a week of logs or more teaches the days of the week")
    return None


def hour_ranges(hours: list[int]) -> str:
    """Hours of day as ranges of the clock: [9, 10, 11, 14] -> '09:00-12:00, 14:00-15:00'."""
    ranges, start = [], None
    for hour in range(25):
        inside = hour < 24 and hour in hours
        if inside and start is None:
            start = hour
        elif not inside and start is not None:
            ranges.append(f"{start:02d}:00-{hour:02d}:00")
            start = None
    return ", ".join(ranges)


COVERAGE_STEP_S = 900.0  # windows longer than this are split in steps of at most this to tell what they cover


def covered_hours_and_days(window_starts: np.ndarray, window_s: float,
                           zone: Optional[datetime.tzinfo]) -> tuple[list[int], list[int]]:
    """(the hours of day holding half an hour of the log's windows or more, the days of the week
    (Monday 0) holding half a day or more) on the season zone's wall clock: what the sidecar and
    `logscore inspect` call the hours and days the log covered. A window counts toward every hour
    it overlaps: counted at its start, 2-hour windows of 8 days covered the even hours only (the
    odd ones got the spread of hours never seen)."""
    steps = max(1, math.ceil(window_s / COVERAGE_STEP_S))
    step_s = window_s / steps
    points = (np.asarray(window_starts, dtype=np.float64)[:, None] + step_s * np.arange(steps)).ravel()
    hours, weeks = slots(points, zone)
    hour_s = np.bincount(hours, minlength=24) * step_s
    day_s = np.bincount(weeks // 24, minlength=7) * step_s
    return np.flatnonzero(hour_s >= 1800.0).tolist(), np.flatnonzero(day_s >= DAY_S / 2).tolist()


SETTLING_WEEKS = 2  # visits of each hour-of-week slot before the replay's deviations calibrate


def threshold_deviation(knots: np.ndarray, levels: np.ndarray, threshold: float) -> float:
    """The deviation a window must exceed to reach the threshold (the knot below the first one
    that reaches it)."""
    reached = np.flatnonzero(apply_ecdf(knots, knots, levels) >= threshold)
    first = int(reached[0]) if len(reached) else len(knots)
    return float(knots[first - 1]) if first else 0.0


def calibration_warm_up(windows: int, window_s: float) -> int:
    """Windows of the training replay before its seasonal offsets have settled: until each
    hour-of-week slot has been seen twice, but never more than half the log (a short log keeps its
    second half) and at least its first day (or quarter). While the offsets are still learned (0.3
    of a residual per visit: a site's weekend mornings were forecast as its weekdays' for two
    weeks), deviations are larger than a trained model's: on an office site of hourly windows they
    set the threshold at 11.8, a trained model's own deviations reached 4.8 (docs/accuracy.md)."""
    settling = int(SETTLING_WEEKS * 7 * DAY_S // window_s)
    first_day = min(windows // 4, int(DAY_S // window_s))
    return max(first_day, min(settling, windows // 2))


def calibration_start(reportable: np.ndarray, settled: int, target_fpr: float) -> int:
    """The window the calibration starts at, given the reportable key-windows of each window: the
    settled one, or earlier where the settled part holds fewer than 1/target_fpr reportable
    key-windows, the least that places the target's quantile among them rather than at their
    maximum (on an office site 6,022 after two weeks: its threshold was the maximum, and ramp hours
    of ordinary days crossed it, 0.3-0.4 events a day)."""
    held_from = np.cumsum(reportable[::-1])[::-1]  # reportable key-windows from each window on
    enough = np.flatnonzero(held_from >= 1.0 / target_fpr)
    return min(settled, int(enough[-1])) if len(enough) else 0


def calibration_pool(deviations: np.ndarray, reportable: np.ndarray, settled: np.ndarray,
                     target_fpr: float) -> tuple[np.ndarray, str]:
    """(deviations the threshold is placed among, their kind: "reportable", "tail" or "all"): the
    key-windows the sidecar could report, those whose count differs from its forecast by ``min_change`` records or more
    (a share: whose count reaches it). Pooled with the rest, the top of the training deviations
    was windows never reported — a share of one 5xx among two night-time records stands 10-14
    spreads out — and a 60 % drop of a site's traffic stood under the threshold (a deviation of 8
    was needed on a shop site; 6 among its reportable windows). With fewer than 1/target_fpr such
    windows the target's quantile is beyond them (the threshold would be their maximum, crossed
    every few days: a short log's): every key-window once the offsets settled (``settled``) is
    pooled instead, a higher threshold, as before. Between the two (``MIN_TAIL_WINDOWS`` or more),
    the reportable ones' tail is extrapolated ("tail": ``tail_table``)."""
    chosen = deviations[reportable]
    if len(chosen) >= 1.0 / target_fpr:
        return chosen, "reportable"
    if len(chosen) >= MIN_TAIL_WINDOWS:
        return chosen, "tail"
    values = np.ravel(settled)
    return (values if len(values) else np.zeros(1)), "all"


def calibration_description(pool_kind: str, pooled: int, reportable: int, target_fpr: float, warm_up: int) -> str:
    """The model metadata's account of how the window threshold was placed (for people: nothing parses it)."""
    needed = f"{1.0 / target_fpr:,.0f}"
    if pool_kind == "reportable":
        how = f"empirical CDF of {pooled:,} reportable key-window deviations"
    elif pool_kind == "tail":
        top = "tenth" if tail_share(pooled) == TAIL_SHARE else f"{TAIL_WINDOWS}"
        how = (f"exponential tail above the top {top} of {pooled:,} reportable key-window deviations "
               f"(fewer than the {needed} the target needs)")
    else:
        how = (f"empirical CDF of all {pooled:,} key-window deviations once the offsets settled (only {reportable:,} "
               f"reportable, under {MIN_TAIL_WINDOWS} to extrapolate from)")
    return f"{how} after a warm-up of {warm_up} windows"


MIN_TAIL_WINDOWS = 100  # reportable key-windows a tail is fitted to: fewer, every key-window is pooled
TAIL_SHARE = 0.1  # the top share of them whose mean excess sets the exponential tail ...
TAIL_WINDOWS = 50  # ... but at most this many values: from more, the fit sits nearer the target


def tail_share(values: int) -> float:
    """The top share of ``values`` deviations the tail is fitted to."""
    return min(TAIL_SHARE, TAIL_WINDOWS / values)


def tail_threshold(values: np.ndarray, target_fpr: float) -> float:
    """The deviation ``target_fpr`` of key-windows exceed, from fewer than 1/target_fpr of them:
    an exponential tail fitted to the values above their top tenth's start (its mean excess; above
    the top ``TAIL_WINDOWS`` values' start where they are fewer than a tenth), extrapolated to the
    target; never under their maximum. The deviations are near |Gaussian|, lighter tailed than an
    exponential, so an exponential fitted far below the target overstates it: from the top tenth
    of 9,218 an office site's threshold lay at 7.94, 1.3 past their maximum (6.65), and a 60 %
    drop (7.40) stood under it; from their top 50, 6.81 (docs/accuracy.md). From a few hundred
    values it scatters both ways (100 |Gaussian| values: 3.3-6.2 for a true 3.9, 5-95 %)."""
    start = float(np.quantile(values, 1.0 - tail_share(len(values))))
    if not (values > start).any():
        # The top share is one value repeated: the tail starts at the next lower value (all equal: none).
        lower = values[values < start]
        if not len(lower):
            return start
        start = float(lower.max())
    above = values[values > start]
    share = len(above) / len(values)  # about tail_share (more where the top is tied)
    mean_excess = float((above - start).mean())
    return max(start + mean_excess * float(np.log(share / target_fpr)), float(values.max()))


def tail_table(values: np.ndarray, target_fpr: float) -> tuple[np.ndarray, np.ndarray]:
    """The calibration of a short log's reportable key-windows: their empirical CDF, kept under
    the threshold (scaled to 1 - 2 x target_fpr), then 1 past the extrapolated tail's deviation
    (``tail_threshold``). Their own ECDF put the threshold at their maximum (crossed every few
    days); every key-window's, at a night's lone 5xx share (10-14 spreads, never reported), and a
    short log's model missed a 60 % drop of traffic (docs/accuracy.md)."""
    knots, levels = ecdf_table(values)
    threshold = np.nextafter(np.float32(tail_threshold(values, target_fpr)), np.float32(np.inf))
    threshold = max(threshold, np.nextafter(knots[-1], np.float32(np.inf)))
    levels = (levels * (1.0 - 2.0 * target_fpr)).astype(np.float32)
    return np.append(knots, threshold).astype(np.float32), np.append(levels, np.float32(1.0))


def share_model(counts: np.ndarray, totals: np.ndarray) -> tuple[float, float]:
    """(expected share, dispersion): the pooled share and how much more its windows vary than a
    binomial draw would (at least 1)."""
    p = float(np.clip(counts.sum() / max(totals.sum(), 1.0), 1e-4, 1 - 1e-4))
    busy = totals >= 5
    if busy.sum() < 5:
        return p, 2.0
    variance = (counts[busy] - totals[busy] * p) ** 2 / (totals[busy] * p * (1 - p))
    return p, float(max(np.mean(variance), 1.0))


def client_replay(fields: Sequence[dict], scores: np.ndarray, novelty: np.ndarray, key: str, half_life_s: float,
                  batch: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, 5] of each record's client after it, the client's hash [N]): the records
    replayed in time order through the sidecar's ClientTracker, as it will see them."""
    order, times = time_ordered(fields, "--entities")
    if not any(fields[i].get(key) for i in order[:1000].tolist()):
        raise InputError(f"--entities: the records have no {key!r} field; name the field that identifies a client "
                         "with --entity-key")
    tracker = ClientTracker(half_life_s, max_clients=1 << 20)
    features, owners = [], []
    for start in range(0, len(order), batch):
        chosen = order[start: start + batch]
        part = text_columns([fields[i] for i in chosen.tolist()], (key, *CLIENT_FIELDS))
        found, slots_, _ = tracker.observe(client_batch(part, key, times[start: start + batch], novelty[chosen],
                                                        scores[chosen]))
        known = slots_ >= 0
        features.append(found[known])
        owners.append(tracker.owner[slots_[known]])
    return np.concatenate(features).astype(np.float32), np.concatenate(owners)


def client_threshold(entity_scores: np.ndarray, owner: np.ndarray, target_fpr: float) -> tuple[float, int, int]:
    """(threshold, clients, clients reaching it): the threshold at most ``target_fpr`` of the
    clients ever reach, from each client's highest calibrated entity_score: an order statistic of
    the clients (at 0.5 %, the 5th highest of 1,000), so each abnormal client among them moves it up
    a place, and the top places lie far apart (operations.md: why the learner does not set it again)."""
    _, inverse = np.unique(owner, return_inverse=True)
    client_max = np.zeros(inverse.max() + 1)
    np.maximum.at(client_max, inverse, entity_scores)
    threshold = float(min(np.quantile(client_max, 1 - target_fpr, method="higher") + 1e-6, 1.0))
    return threshold, int(len(client_max)), int((client_max >= threshold).sum())


def fit_entities(fields: Sequence[dict], scores: np.ndarray, novelty: np.ndarray,
                 options: BehaviourOptions) -> Learned:
    matrix, owner = client_replay(fields, scores, novelty, options.entity_key, options.half_life_s)
    if len(matrix) < 100:
        raise InputError(f"--entities: only {len(matrix)} records name a client; the detector needs normal "
                         "clients' traffic (thousands of records)")
    # NOTE: the graph compares each value with every knot ([N, knots] per feature): fewer knots keep
    # a 1,000-record batch at about a microsecond a record and a few MB, the tails stay exact.
    tables = [ecdf_table(matrix[:, j], ENTITY_KNOTS, ENTITY_EXACT_TAIL) for j in range(matrix.shape[1])]
    surprise = entity_surprise(matrix, tables)
    calibration = ecdf_table(surprise, 2 * ENTITY_KNOTS, 2 * ENTITY_EXACT_TAIL)
    threshold, clients, over = client_threshold(apply_ecdf(surprise, *calibration), owner, options.client_target_fpr)
    learned = Learned()
    learned.entity_tables = tables
    learned.entity_calibration = calibration
    learned.metadata["entities"] = {
        "key": options.entity_key, "half_life_s": options.half_life_s, "features": list(FEATURES),
        "threshold": threshold, "target_fpr": options.client_target_fpr,
        "typical": [round(float(v), 4) for v in np.quantile(matrix, 0.99, axis=0)],
        "training": {"records": int(len(matrix)), "clients": clients, "clients_over_threshold": over},
    }
    return learned


def entity_surprise(matrix: np.ndarray, tables: list) -> np.ndarray:
    """Numpy twin of the graph: the sum over features of -log(share of normal values at least as high)."""
    total = np.zeros(len(matrix))
    for j, (knots, levels) in enumerate(tables):
        below = apply_ecdf(matrix[:, j], knots, levels)
        total += -np.log(np.maximum(1.0 - below, 1.0 / (len(knots) + 1) / 16))
    return total


class PrefixedBuilder(GraphBuilder):
    """Node and tensor names that cannot collide with the record model's."""

    def name(self, hint: str) -> str:
        return "behaviour_" + super().name(hint)


def window_nodes(g: GraphBuilder, learned: Learned) -> tuple[list, list]:
    """(inputs, outputs): the trained state as outputs; window_deviation -> window_score."""
    outputs = []
    for name in ("window_level", "window_hour", "window_week", "window_scale", "window_share_expected",
                 "window_share_dispersion"):
        value = np.asarray(learned.tensors[name], dtype=np.float32)
        g.nodes.append(helper.make_node("Identity", [g.const(value, name + "_table")], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    g.initializers.append(numpy_helper.from_array(np.zeros(1, np.float32), "window_deviation"))
    score = g.ecdf("window_deviation", *learned.window_calibration)
    g.nodes.append(helper.make_node("Identity", [score], ["window_score"]))
    outputs.append(helper.make_tensor_value_info("window_score", TensorProto.FLOAT, ["W"]))
    return [helper.make_tensor_value_info("window_deviation", TensorProto.FLOAT, ["W"])], outputs


def entity_nodes(g: GraphBuilder, learned: Learned) -> tuple[list, list]:
    """entity_features [N, 5] -> entity_score [N] (per-feature tails, summed log, calibrated)."""
    g.initializers.append(numpy_helper.from_array(np.zeros((1, len(FEATURES)), np.float32), "entity_features"))
    total = None
    for j, (knots, levels) in enumerate(learned.entity_tables):
        column = g.op("Gather", ["entity_features", g.const(j, dtype=np.int64)], axis=1)
        below = g.ecdf(column, knots, levels)
        floor = 1.0 / (len(knots) + 1) / 16
        tail = g.op("Max", [g.op("Sub", [g.const(1.0), below]), g.const(floor)])
        term = g.op("Neg", [g.op("Log", [tail])])
        total = term if total is None else g.op("Add", [total, term])
    score = g.ecdf(total, *learned.entity_calibration)
    g.nodes.append(helper.make_node("Identity", [score], ["entity_score"]))
    return ([helper.make_tensor_value_info("entity_features", TensorProto.FLOAT, ["N", len(FEATURES)])],
            [helper.make_tensor_value_info("entity_score", TensorProto.FLOAT, ["N"])])


BEHAVIOUR_PARTS = {"windows": ("window_",), "entities": ("entity_",)}  # metadata entry -> its graph names' prefixes


def behaviour_subgraph(graph: onnx.GraphProto, prefixes: tuple) -> tuple[list[int], set[str]]:
    """(positions of the nodes computing the graph outputs named with ``prefixes``, the tensors
    those nodes read that no node makes: initializers and inputs). The parts attach_behaviour adds
    read only their own inputs and constants, never a record tensor."""
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output}
    wanted = [output.name for output in graph.output if output.name.startswith(prefixes)]
    positions: set[int] = set()
    read: set[str] = set()
    while wanted:
        name = wanted.pop()
        position = producer.get(name)
        if position is None:
            read.add(name)
        elif position not in positions:
            positions.add(position)
            wanted += [source for source in graph.node[position].input if source]
    return sorted(positions), read


def drop_behaviour(graph: onnx.GraphProto, prefixes: tuple) -> None:
    """Remove the part of the graph computing the outputs named with ``prefixes``: its nodes, the
    constants only they read, its inputs and outputs."""
    positions, read = behaviour_subgraph(graph, prefixes)
    dropped = set(positions)
    kept_nodes = [node for i, node in enumerate(graph.node) if i not in dropped]
    still_read = {name for node in kept_nodes for name in node.input}
    del graph.node[:]
    graph.node.extend(kept_nodes)
    kept = [t for t in graph.initializer if t.name not in read or t.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for collection in (graph.input, graph.output):
        kept_values = [v for v in collection if not v.name.startswith(prefixes)]
        del collection[:]
        collection.extend(kept_values)


def sealed(model: onnx.ModelProto, metadata: dict) -> tuple[onnx.ModelProto, dict]:
    """The model with ``metadata`` written into it and its content hash renewed, checked."""
    text = json.dumps(metadata, sort_keys=True)
    del model.metadata_props[:]
    model.metadata_props.add(key=METADATA_KEY, value=text)
    model.metadata_props.add(key=HASH_KEY, value=content_hash(model.graph.SerializeToString(), text))
    onnx.checker.check_model(model)
    return model, metadata


def last_number(graph: onnx.GraphProto) -> int:
    """The highest number ending a name of the graph's tensors (GraphBuilder names them hint_<n>)."""
    names = [name for node in graph.node for name in node.output] + [t.name for t in graph.initializer]
    numbers = [int(tail) for tail in (name.rsplit("_", 1)[-1] for name in names) if tail.isdigit()]
    return max(numbers, default=0)


def attach_behaviour(model: onnx.ModelProto, metadata: dict, parts: Sequence[Learned]) -> tuple[onnx.ModelProto, dict]:
    """The model with window and/or client detectors added to its graph and metadata (replacing
    any it had), and its content hash renewed."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for part in parts:
        for entry in part.metadata:
            drop_behaviour(graph, BEHAVIOUR_PARTS[entry])
            metadata.pop(entry, None)
    # Learned here: no longer kept from another model (inspect said so of parts just relearned, and a
    # later --behaviour-from passed that origin on).
    metadata.get("training", {}).pop("behaviour_from", None)
    g = PrefixedBuilder(0)
    # Past every name the graph holds: the part kept from before (--base with windows, learning
    # clients) was named by a builder that started where this one would. (Past the count of its
    # nodes was not enough once a relearned part named more tensors than the part it replaced.)
    g._count = max(sum(1 for _ in graph.node) + sum(1 for _ in graph.initializer), last_number(graph)) + 1000
    for part in parts:
        nodes = window_nodes if part.window_calibration is not None else entity_nodes
        inputs, outputs = nodes(g, part)
        graph.input.extend(inputs)
        graph.output.extend(outputs)
        metadata.update(part.metadata)
    graph.node.extend(g.nodes)
    graph.initializer.extend(g.initializers)
    return sealed(model, metadata)


def check_behaviour_source(source: dict, spec: dict, flag: str = "--behaviour-from") -> None:
    """The model whose windows and clients a training keeps must carry some, and read records as
    the training does: its windows count fields (URL, status, level) and its clients read a client
    field of records parsed its way."""
    from ..model import carries_behaviour

    if not carries_behaviour(source):
        raise ConfigError(f"{flag} {source.get('name')!r} carries neither windows nor clients: nothing to keep "
                          "(learn them from timestamped logs with --windows/--entities)")
    featurizer = source.get("featurizer", {})
    if featurizer.get("format") != spec.get("format") or bool(featurizer.get("sessions")) != bool(spec.get("sessions")):
        reads = featurizer.get("format") if not featurizer.get("sessions") else "sessions"
        trains = spec.get("format") if not spec.get("sessions") else "sessions"
        raise ConfigError(f"{flag} {source.get('name')!r} reads {reads} records; this training reads {trains}: "
                          "give a model trained on records of this kind")


def carry_behaviour(model: onnx.ModelProto, metadata: dict, source: Artifact) -> tuple[onnx.ModelProto, dict]:
    """The record model with the window forecasters and client detector of ``source`` as they were
    trained (their graph part and metadata): what the sidecar's learner keeps when it learns a
    route's record model from a window of recent records, too few and too recent to learn
    seasonality or clients from."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    donor = onnx.ModelProto.FromString(source.model_bytes)
    prefixes = tuple(p for entry in BEHAVIOUR_PARTS for p in BEHAVIOUR_PARTS[entry] if source.metadata.get(entry))
    for entry, entry_prefixes in BEHAVIOUR_PARTS.items():  # (a record model carries none: train() makes it)
        drop_behaviour(model.graph, entry_prefixes)
        metadata.pop(entry, None)
    positions, read = behaviour_subgraph(donor.graph, prefixes)
    nodes = [donor.graph.node[i] for i in positions]
    made = {name for node in model.graph.node for name in node.output} | {t.name for t in model.graph.initializer}
    clashing = made & ({name for node in nodes for name in node.output} | read)
    if clashing:
        raise ConfigError(f"--behaviour-from {source.path}: its window/client part names tensors the record model "
                          f"names too ({', '.join(sorted(clashing)[:3])}); retrain it with this logscore")
    model.graph.node.extend(nodes)
    domains = {o.domain for o in model.opset_import}
    model.opset_import.extend(o for o in donor.opset_import if o.domain not in domains)  # (ai.onnx.ml: ECDFs)
    model.graph.initializer.extend(t for t in donor.graph.initializer if t.name in read)
    model.graph.input.extend(v for v in donor.graph.input if v.name.startswith(prefixes))
    model.graph.output.extend(v for v in donor.graph.output if v.name.startswith(prefixes))
    for entry in BEHAVIOUR_PARTS:
        if source.metadata.get(entry):
            metadata[entry] = source.metadata[entry]
    metadata["training"]["behaviour_from"] = source.metadata.get("training", {}).get("behaviour_from") or {
        "model": source.metadata.get("name"), "version": source.version}
    return sealed(model, metadata)


def score_for_behaviour(model_bytes: bytes, metadata: dict, records: Sequence[object], progress, chunk: int = 2048,
                        also: Sequence[str] = ()):
    """(normalized fields, scores, novelty) of every record, by the record model being trained;
    ``also``: the fields windows and clients will read, named as the sidecar names them (Fluentd's
    apache2 parser's ``host`` is the client, ``remote_addr``)."""
    from ..model import Model

    model = Model(Artifact("(training)", model_bytes, metadata, ""), also_fields=also, levels_read=LEVELS_READ)
    model.tracks_novelty = model.needs_fields = True
    fields, scores, novelty = [], [], []
    for start in range(0, len(records), chunk):
        scored = model.score(records[start: start + chunk])
        fields += scored.fields
        scores.append(scored.scores)
        novelty.append(scored.novelty)
        progress("behaviour: scoring records", min(start + chunk, len(records)), len(records), "records")
    return fields, np.concatenate(scores).astype(np.float64), np.concatenate(novelty)


def cross_fitted(records: Sequence[object], metadata: dict, progress) -> tuple[np.ndarray, np.ndarray]:
    """(scores, novelty) of every record from a record model trained without it: the records' two
    halves (in file order) each scored by a model of the other, trained as the model was.

    NOTE: a model scores its own training records lower and finds none of their features new;
    clients learned from those would make every real client look strange. Calibrated scores of
    records the model never saw are what the sidecar will see.
    """
    from .train import TrainOptions, train

    half = len(records) // 2
    parts = [(records[:half], records[half:]), (records[half:], records[:half])]
    scores, novelty = [], []
    calibration = metadata.get("calibration", {})
    for number, (scored, learned) in enumerate(parts, start=1):
        options = TrainOptions(spec=json.loads(json.dumps(metadata["featurizer"])),
                               detectors=[d["kind"] for d in metadata["detectors"]],
                               target_fpr=float(calibration.get("target_fpr") or 0.001),
                               name=f"half-{number}", seed=number)
        proto, meta = train(learned, options, lambda stage, done, total, unit="records": progress(
            f"behaviour: half {number} of 2: {stage}", done, total, unit))
        _, found, new = score_for_behaviour(proto.SerializeToString(), meta, scored, progress)
        scores.append(found)
        novelty.append(new)
    return np.concatenate([scores[1], scores[0]]), np.concatenate([novelty[1], novelty[0]])


def learn_behaviour(model: onnx.ModelProto, metadata: dict, records: Sequence[object], options: BehaviourOptions,
                    progress, warn: Warn = ignore) -> tuple[onnx.ModelProto, dict]:
    """Learn the window and/or client detectors from ``records`` (in file order) and add them to ``model``."""
    # (remote_addr for windows too: dimensions_of tells whether a host is the client)
    read = [*((*fields_read(options.dimensions), "remote_addr") if options.windows else ()),
            *((options.entity_key, *CLIENT_FIELDS) if options.entities else ()), *TIME_FIELDS]
    cross_fit = options.entities and not metadata["featurizer"].get("sessions")
    # Cross-fitted first: the two half models are trained before every record's fields are held
    # (1M access lines: 2.9 GB at the peak with both at once).
    fitted_scores = cross_fitted(records, metadata, progress) if cross_fit else None
    fields, scores, novelty = score_for_behaviour(model.SerializeToString(), metadata, records, progress, also=read)
    if fitted_scores is not None:
        scores, novelty = fitted_scores
    parts = []
    if options.windows:
        progress("behaviour: learning windows", 0, None, "records")
        parts.append(fit_windows(fields, str(metadata.get("name", "model")), options, warn))
    if options.entities:
        progress("behaviour: learning clients", 0, None, "records")
        parts.append(fit_entities(fields, scores, novelty, options))
    return attach_behaviour(model, metadata, parts)
