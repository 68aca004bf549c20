"""Windows: counts per key per window, forecast per key, improbable windows as events.

    scored batch ─► WindowCounter.observe (counts of the open window; a few C-level passes)
    clock ticks  ─► WindowCounter.close_due ─► forecast.step per key ─► deviation
                 ─► the model graph's window calibration ─► score in [0, 1] ─► AnomalyEvent

Keys are ``dimension=value``: the route (model), the shipper's tag, the status class, the host,
the level, the URL template, the message template. Besides counts, the share of 5xx and 4xx
among a route's records and of error levels are watched (one-sided: a rising share).

The trained forecasters (the state of each key after the training logs: level, hour-of-day and
hour-of-week offsets, scale; expected shares and their dispersion) are tensors of the model's
ONNX graph, read once at load; online they move on with the traffic. Keys not trained get the
prior of a never-seen key (expected count about zero). State is bounded: at most ``max_keys``
keys; untrained keys with the least traffic are evicted, and keys past the bound count as
``dimension=(other)``.

Windows use the sidecar's clock (arrival time): live streams arrive as they are written; records
arriving long after their own time are left out before they get here (``behaviour.Lateness``). A
clock stepped back to before the open window's start restarts the open window (``WindowCounter._restart_at``).
Training uses the records' own timestamps (``timestamps.py``). Hours of day and of week are read
on the wall clock of the model's zone (metadata ``season_zone``, from training's ``--time-zone``;
UTC for models trained before it was recorded): ``forecast.slots``.
"""

from __future__ import annotations

import datetime
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .events import AnomalyEvent
from .features import native as compiled
from .features.converters import ID_SEGMENT
from .forecast import COUNT_MIN_SCALE, ForecastState, count_inverse, count_transform, slots
from .masking import mask_variables
from .sizes import text_bytes

log = logging.getLogger("logscore.windows")

DIMENSIONS = ("route", "tag", "status_class", "host", "level", "url_template", "message_template")
SHARES = (("status_class", "5xx"), ("status_class", "4xx"), ("level", "error"))
OTHER = "(other)"
# Dimensions of many keys that move in and out of improbability within one incident (a burst over
# a shop's URLs): their keys crossing while an episode is under way join it (_join_ongoing).
CHURNING_DIMENSIONS = frozenset({"url_template", "message_template"})
ERROR_LEVELS = {"error", "err", "crit", "critical", "fatal", "alert", "emerg", "emergency", "severe", "panic"}
SYSLOG_SEVERITIES = ("emerg", "alert", "crit", "error", "warning", "notice", "info", "debug")
# bunyan's and pino's levels are numbers (their JSON logs write "level": 50 for an error)
NUMBERED_LEVELS = {"10": "trace", "20": "debug", "30": "info", "40": "warn", "50": "error", "60": "fatal"}
# How a model's windows read a record (metadata windows.levels_read, named when it was levels
# alone): 1, its level or severity field or syslog priority; 2, also bunyan's and pino's numbers and
# a syslog message's own word (records.RecordNormalizer); 3 (models trained since), also host names
# masked in message templates (<host>), as the message's tokens mask them: each reverse-DNS peer
# was a template of its own ("connection from <ip> (host8.topspot.net)": 28 of the 64 templates
# learned from loghub's Linux log, 6 once masked), and a burst of one message from many hosts was
# no key's burst; 4 (models trained since), also MAC addresses masked (<mac>), as the message's
# tokens mask them: each device in a DHCP server's or a Wi-Fi access point's log was a template of
# its own. A model keeps the reading it was trained with: its trained keys (level=30) and
# shares would not meet the others'; an older logscore refuses a newer reading
# (model.trained_levels_read).
LEVELS_READ = 4
MAX_TEMPLATE_CHARS = 160
MAX_NAMED = 4  # improbable keys named in one window event
MAX_CATCH_UP = 60  # after a pause, the windows older than this many are skipped (so 1 + 60 close at most)
STEP_BACK_TOLERANCE = 0.25  # of a window: a clock this little behind the open window's start is no step back
SHARE_ADAPT_IN_EPISODE = 0.1  # how fast an improbable share becomes the expected one, against a usual one
# Episodes under way when the sidecar stopped go on after its restart when the last window it
# closed ended at most this long before the first one it opens (EpisodeFile): a restart takes seconds.
EPISODE_RESUME_S = 60.0
EPISODE_RESUME_WINDOWS = 2
NEAR_SILENCE = 0.1  # a route's window of at most this share of its least expected count is silent (silence_score)
MAX_SAVED_SUBJECTS = 64  # subjects of episodes under way kept per model over a restart
# Distinct field values remembered per dimension (their key names). 65,536 with the byte rule below
# allowed 48 MiB a dimension: a syslog model's three dimensions alone took 144 of the shipped 350 MiB.
VALUE_CACHE = 32_768
# A value is remembered with its key when the two texts take at most this many bytes (text_bytes);
# a longer one is named each time: long values rarely repeat, and naming one costs its length anyway.
# Bytes, not characters: a str of emoji takes 4 bytes a character, and 65,536 never-seen values of
# 256 emoji held 117 MiB where 256 ASCII characters held 34.5 MiB (before that, 65,536 never-seen
# 8,000-character messages held 500 MiB). So a dimension's cache holds at most VALUE_CACHE ×
# (CACHED_ENTRY_BYTES + CACHE_ENTRY_OVERHEAD) bytes = CACHE_BYTES_BOUND, 24 MiB.
CACHED_ENTRY_BYTES = 512
# What Python 3.11 adds to an entry's texts: two str headers (at most 72 bytes and a terminating
# character each), the allocator's rounding of each (at most 23 bytes), and a dict slot (a 4-byte
# index and 24 bytes of entry, the table at least 2/3 full after it grows): 238 bytes at most.
CACHE_ENTRY_OVERHEAD = 256
CACHE_BYTES_BOUND = VALUE_CACHE * (CACHED_ENTRY_BYTES + CACHE_ENTRY_OVERHEAD)
TAG_WARM_UP_S = 3600.0  # see tag_warm_up
# An hour of day the training log never covered is forecast at the level of the hours it did, and
# learns 0.3 of its own each day: a model trained on 15:00-03:00 raised 6 drops at 03:00 the first
# night, 3 the second (docs/accuracy.md). Until it has been seen on this many days (its forecast
# then two thirds of the way) its counts' spread is UNSEEN_HOUR_SPREAD times wider: what the level
# cannot tell (a night's tenth of the day's traffic) raises nothing, a flood or a silence still
# does; shares do not depend on the hour and are watched as always.
UNSEEN_HOUR_DAYS = 3
UNSEEN_HOUR_SPREAD = 3.0


def tag_warm_up(window_s: float) -> int:
    """Windows a tag never seen in training is learned before it may raise an event: an hour's.
    Training files carry no tags, so every tag a shipper sends is new to its model; a new tag is a
    source the operator set up, and its traffic's volume is watched as the route's meanwhile."""
    return max(1, math.ceil(TAG_WARM_UP_S / window_s))


def status_class(value: object) -> Optional[str]:
    text = str(value)
    return f"{text[0]}xx" if len(text) == 3 and text.isdigit() and text[0] in "12345" else None


def level_name(level: Optional[str], severity: Optional[str], pri: Optional[str],
               numbered: bool = True) -> Optional[str]:
    """A record's level: its ``level``/``severity`` field (``numbered``: bunyan's numbers named),
    or the severity of a syslog priority."""
    value = level or severity
    if value is None and pri is not None:
        try:
            return SYSLOG_SEVERITIES[int(pri) % 8]
        except ValueError:
            return None
    if value is None:
        return None
    name = value.strip().lower()
    if numbered:
        name = NUMBERED_LEVELS.get(name, name)
    return "error" if name in ERROR_LEVELS else name[:32]


# A path segment that is an id (the url converter's rule: digits, long hex, a uuid) becomes {id}.
_ID_SEGMENTS = re.compile(rf"(?<=/)(?:{ID_SEGMENT.pattern})(?=/|$)")
# Where each dimension's value is read: the first of these fields a record has.
SOURCES = {"status_class": ("status",), "host": ("host", "hostname"), "url_template": ("url",),
           "message_template": ("message",), "level": ("level", "severity", "pri")}
# Dimensions the compiled key_counts names itself (others call KeyNamer._name back).
NATIVE_NAMING = {"status_class": 1, "url_template": 2}


def fields_read(dimensions: Iterable[str]) -> tuple[str, ...]:
    """The record fields a window model of these dimensions reads (route and tag come with the request)."""
    return tuple(dict.fromkeys(name for d in dimensions for name in SOURCES.get(d, ())))


def url_template(url: str) -> str:
    """``/users/123/posts?x=1`` -> ``/users/{id}/posts``."""
    path = url.split("?", 1)[0]
    if "://" in path[:12]:
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    return _ID_SEGMENTS.sub("{id}", path)


def counts_bytes(native) -> bool:
    """Whether the compiled key_counts bounds its cache in bytes (its max_bytes). An extension built
    before it and not rebuilt since takes no max_bytes and keeps values by characters (emoji ones
    held 4 times the bytes): KeyNamer then names the dimensions it caches in Python."""
    try:
        native.key_counts([], 0, "", {}, 1, None, -1, -1)
    except TypeError:  # "takes at most 7 arguments"
        return False
    return True


class KeyNamer:
    """Each record's value of each dimension (``url_template=/users/{id}``), cached per distinct value.

    Records arrive as text columns (``text_columns``: None where a record lacks the field).
    Counting a batch costs one pass per dimension and a dictionary lookup per record, the key
    worked out once per distinct value: in C when the compiled featurizer is built
    (``key_counts`` in features/_native.c: status classes and URL templates; other dimensions
    call ``_name``), else in Python (``_key_counts``, the reference). Both give the same
    counts, keys in the same order, and keep the same values (tests/test_native.py); an extension
    built before the cache's byte bound leaves the dimensions it names by call to Python.
    """

    def __init__(self, dimensions: Sequence[str], native: Optional[bool] = None, levels_read: int = LEVELS_READ):
        """``native``: True/False forces the compiled or the Python counting; None follows the featurizer's
        switch. ``levels_read``: the model's (LEVELS_READ)."""
        self.dimensions = [d for d in dimensions if d not in ("route", "tag")]
        self.numbered_levels = levels_read >= 2
        self.hosts_in_templates = levels_read >= 3
        self.macs_in_templates = levels_read >= 4
        self._cache: dict[str, dict] = {d: {} for d in self.dimensions}
        self._native = compiled.module(native)
        self._native_counts_bytes = self._native is not None and counts_bytes(self._native)
        self._namers = {d: partial(self._name, d) for d in self.dimensions}

    @staticmethod
    def column(dimension: str, columns: dict[str, list], numbered_levels: bool = True) -> list:
        """Values of the field behind a dimension (None where absent)."""
        if dimension == "level":
            return [level_name(level, severity, pri, numbered_levels)
                    for level, severity, pri in zip(columns["level"], columns["severity"], columns["pri"])]
        if dimension == "host":
            return [host or other for host, other in zip(columns["host"], columns["hostname"])]
        return columns[SOURCES[dimension][0]]

    def name(self, dimension: str, value: Optional[str]) -> Optional[str]:
        """The key of one value, or None when the value says nothing."""
        if value is None:
            return None
        value_bytes = text_bytes(value)
        if value_bytes > CACHED_ENTRY_BYTES:  # (its entry could not fit)
            return self._name(dimension, value) or None
        cache = self._cache[dimension]
        key = cache.get(value)
        if key is None:
            key = self._name(dimension, value)
            if value_bytes + text_bytes(key) <= CACHED_ENTRY_BYTES:
                if len(cache) >= VALUE_CACHE:
                    cache.clear()
                cache[value] = key
        return key or None

    def _name(self, dimension: str, value: str) -> str:
        if dimension == "status_class":
            text = status_class(value)
        elif dimension == "url_template":
            text = url_template(value)[:MAX_TEMPLATE_CHARS]
        elif dimension == "message_template":
            text = mask_variables(value, self.hosts_in_templates, self.macs_in_templates)[:MAX_TEMPLATE_CHARS]
        else:
            text = value[:MAX_TEMPLATE_CHARS]
        return f"{dimension}={text}" if text else ""

    def key_counts(self, dimension: str, values: list) -> dict[str, int]:
        """Records per key of one dimension, keys in the order their first value appears."""
        code = NATIVE_NAMING.get(dimension, 0)
        if self._native is None or (code == 0 and not self._native_counts_bytes):
            return self._key_counts(dimension, values)
        limits = (-1, CACHED_ENTRY_BYTES) if self._native_counts_bytes else ()  # (max_chars: none)
        return self._native.key_counts(values, code, f"{dimension}=", self._cache[dimension], VALUE_CACHE,
                                       self._namers[dimension], *limits)

    def _key_counts(self, dimension: str, values: list) -> dict[str, int]:
        counts: dict[str, int] = {}
        name = self.name
        for value, n in Counter(values).items():
            key = name(dimension, value)
            if key is not None:
                counts[key] = counts.get(key, 0) + n
        return counts

    def count(self, columns: dict[str, list], records: int, route: str, tags: Optional[Sequence[str]]) -> dict:
        """Records per key in one batch of ``records`` records."""
        counts: dict[str, int] = {f"route={route}": records}
        if tags is not None:
            for tag, n in Counter(tags).items():
                if tag:
                    counts[f"tag={tag}"] = n
        for dimension in self.dimensions:
            # NOTE: keys of different dimensions never meet (each starts with its dimension).
            counts.update(self.key_counts(dimension, self.column(dimension, columns, self.numbered_levels)))
        return counts


def share_name(dimension: str, value: str) -> str:
    return f"{dimension}={value} share"


def dimension_of(key: str) -> str:
    """The dimension of a key, event key or subject: ``status_class`` of ``status_class=5xx share``."""
    return key.split("=", 1)[0]


def subject(event_key: str) -> str:
    """What an event key is about: a 5xx burst read first as an improbable share, then as an
    improbable count too, is one episode of ``status_class=5xx`` (and one event)."""
    return event_key.rsplit(" ", 1)[0]


@dataclass
class WindowSpec:
    """The trained window models of one artifact: metadata ``windows`` + graph tensors."""

    window_s: float
    route: str  # the model's name as trained: keys say route=<it>
    dimensions: list[str]
    keys: list[str]  # key names, in the order of the state tensors' rows
    state: ForecastState
    shares: list[str]  # share names ("status_class=5xx share")
    share_expected: np.ndarray  # float64 [S]
    share_dispersion: np.ndarray  # float64 [S]
    new_key_level: float
    new_key_scale: float
    threshold: float
    min_change: float  # a window is reported only if its count differs this much from the expected
    calibrate: Callable[[np.ndarray], np.ndarray]  # deviation -> calibrated score (the graph)
    levels_read: int = 1  # LEVELS_READ as trained (1: models from before it)
    season_zone: Optional[datetime.tzinfo] = None  # whose wall clock the hours follow (None: UTC)
    hours_unseen: frozenset = frozenset()  # hours of day the training log never covered (none: older models)

    @classmethod
    def from_model(cls, metadata: dict, tensors: dict[str, np.ndarray], calibrate,
                   season_zone: Optional[datetime.tzinfo] = None) -> "WindowSpec":
        """``season_zone``: the zone of the model's metadata ``season_zone`` (timestamps.season_zone)."""
        state = ForecastState.empty(len(metadata["keys"]), float(metadata["window_s"]), COUNT_MIN_SCALE)
        state.level[:] = tensors["window_level"]
        state.hour[:] = tensors["window_hour"]
        state.week[:] = tensors["window_week"]
        state.scale[:] = tensors["window_scale"]
        state.seen[:] = np.asarray(metadata.get("seen", [1] * len(state)), dtype=np.int64)
        return cls(float(metadata["window_s"]), str(metadata["route"]), list(metadata["dimensions"]),
                   list(metadata["keys"]), state,
                   list(metadata["shares"]), tensors["window_share_expected"].astype(np.float64),
                   tensors["window_share_dispersion"].astype(np.float64), float(metadata["new_key"]["level"]),
                   float(metadata["new_key"]["scale"]), float(metadata["threshold"]),
                   float(metadata.get("min_change", 5)), calibrate, int(metadata.get("levels_read", 1)),
                   season_zone, hours_unseen(metadata))


def hours_unseen(metadata: dict) -> frozenset:
    """The hours of day a model's training log never covered (its windows' ``training.hours_of_day``;
    models trained before it was recorded: none). A log covering under two hours learned no hour of
    day: its forecast is the level at every hour, as at the one it covered (train says so)."""
    covered = metadata.get("training", {}).get("hours_of_day")
    if covered is None or len(covered) < 2:
        return frozenset()
    return frozenset(range(24)) - frozenset(int(h) for h in covered)


def share_deviation(count: np.ndarray, total: np.ndarray, expected: np.ndarray,
                    dispersion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(deviation, spread of the share): how many spreads a share lies above its expected value
    (binomial variance times the trained dispersion; one-sided)."""
    total = np.maximum(total, 1.0)
    p = np.clip(expected, 1e-4, 1 - 1e-4)
    spread = np.sqrt(dispersion * p * (1 - p) / total)
    observed = count / total
    return np.maximum(observed - p, 0.0) / np.maximum(spread, 1e-9) * (count >= 1), spread


def describe_share(name: str, observed: float, low: float, high: float) -> str:
    what = name.split("=", 1)[1].replace(" share", "")
    return f"{what} share {percent(observed)}, expected {percent(low)}–{percent(high)}"


def percent(share: float) -> str:
    value = 100 * share
    return f"{value:.2g} %" if value < 10 else f"{value:.0f} %"


def silence_score(count: float, low: float) -> float:
    """How improbable a window of a route without any record, or with at most a tenth of the least
    expected (``low``: its forecast less two spreads), is: 1 - Chernoff's bound on Poisson's odds
    of so few, e^-low (low e / count)^count (0 for more records). A trickle counts as silence:
    health checks or a scanner still logged while the service is down.
    NOTE: beside the calibrated score, which rises only as far as the training windows' deviations
    reach: on a shop trained from 4 hours, a route that fell from about 240 records a minute to
    none deviated 21 spreads and scored 0.9995, under the 0.9999 threshold, until its 4th silent
    window. A route expected near zero (a quiet night) scores near zero here."""
    if count > NEAR_SILENCE * low:
        return 0.0
    log_odds = -low + (count * (1.0 + math.log(low / count)) if count > 0 else 0.0)
    return -math.expm1(log_odds)


def describe_count(key: str, observed: float, low: float, high: float, window_s: float) -> str:
    per = f"{window_s:g} s" if window_s < 60 or window_s % 60 else f"{window_s / 60:g} min"
    return f"{key}: {observed:g} records in {per}, expected {low:.3g}–{high:.3g}"


def describe_sustained(windows: int, mean: float, low: float, high: float) -> str:
    """What a sustained shift adds to a count's explanation: the typical count of the last windows
    (their mean residual about the forecast, read back as a count) and the band for such a mean."""
    return f"; the last {windows} windows about {mean:.3g} a window, expected {low:.3g}–{high:.3g} for their mean"


class WindowCounter:
    """The open window's counts for one model, and closing windows into events.

    ``observe`` runs on the scoring path (per batch); ``close_due`` on the sidecar's clock.
    Thread-safety: both are called from the event loop.
    """

    def __init__(self, spec: WindowSpec, model_name: str, namer: KeyNamer, max_keys: int,
                 now: Optional[float] = None, observe_gauges=None):
        self.spec = spec
        self.model_name = model_name  # as served (events, gauges); keys name the route as trained
        self.route = spec.route
        self.namer = namer
        # NOTE: the forecasts are counts per trained window: the window length is the model's.
        self.window_s = float(spec.window_s)
        self.tag_warm_up = tag_warm_up(self.window_s)
        trained = len(spec.keys)
        # Trained keys always keep their rows; one (other) row per dimension always fits beside them.
        self.max_keys = max(max_keys, trained + len(spec.dimensions) + 1)
        self.keys: list[str] = list(spec.keys)
        self.row: dict[str, int] = {k: i for i, k in enumerate(self.keys)}
        self.trained = np.zeros(self.max_keys, dtype=bool)
        self.trained[:trained] = True
        self.state = ForecastState.empty(self.max_keys, self.window_s, COUNT_MIN_SCALE)
        for name in ("level", "scale", "seen"):
            getattr(self.state, name)[:trained] = getattr(spec.state, name)
        self.state.hour[:trained] = spec.state.hour
        self.state.week[:trained] = spec.state.week
        self.counts = np.zeros(self.max_keys)
        self.activity = np.zeros(self.max_keys)  # windows' counts, decayed: who is evicted
        self.share_counts = np.zeros(len(spec.shares))
        self.share_totals = np.zeros(len(spec.shares))
        self.share_expected = spec.share_expected.copy()
        now_value = time.time() if now is None else now
        self.start = self._window_start(now_value)
        self.observe_gauges = observe_gauges  # metrics: observed vs expected per key
        self.candidates: dict[str, int] = {}  # keys seen once in the open window (not yet a row)
        self.max_candidates = 4 * self.max_keys
        self.alarmed: set[str] = set()  # subjects improbable in the last closed window (an episode under way)
        # NOTE: the window the sidecar (or this model) started in is counted only in part: a count
        # under its forecast there is no drop (a rise still is, and shares hold).
        self.first_whole = self.start if now_value == self.start else self.start + self.window_s
        # NOTE: no drop before the first record since the start: a sidecar that starts on a host
        # without the model's service (one config for a fleet) raised "0 records in 1 min, expected
        # 122-191" about 3 minutes after each start, and it cannot tell that host from one whose
        # service stopped before it started (appday trial).
        self.heard = False
        # hour of day never covered in training -> windows of it closed since the start (see UNSEEN_HOUR_DAYS)
        self.unlearned_hours = {hour: 0 for hour in spec.hours_unseen}
        self.unlearned_windows = UNSEEN_HOUR_DAYS * max(1, math.ceil(3600.0 / self.window_s))

    def episodes(self) -> Optional[dict]:
        """The episodes under way (None: none), as ``resume`` takes them after a restart."""
        if not self.alarmed:
            return None
        return {"subjects": sorted(self.alarmed)[:MAX_SAVED_SUBJECTS], "until": self.start}

    def resume(self, saved: dict) -> bool:
        """Go on with the episodes of the process before this one (``episodes``), when the last window
        it closed ended shortly before this one's open window: the first windows after a restart
        raised a burst under way again (its share; a count too, the window counted in part). False:
        they are too old to be going on, or ``saved`` is not what ``episodes`` gives."""
        try:
            until, subjects = float(saved["until"]), [str(s) for s in saved["subjects"]][:MAX_SAVED_SUBJECTS]
        except (KeyError, TypeError, ValueError):
            return False
        if not 0 <= self.start - until <= max(EPISODE_RESUME_WINDOWS * self.window_s, EPISODE_RESUME_S):
            return False
        self.alarmed = set(subjects)
        return True

    def _window_start(self, now: float) -> float:
        return math.floor(now / self.window_s) * self.window_s

    def observe(self, columns: dict[str, list], records: int, tags: Optional[Sequence[str]] = None) -> None:
        """Count a batch: its fields as text columns (``text_columns``), ``records`` long."""
        self.add(self.namer.count(columns, records, self.route, tags), records)

    def add(self, counts: dict, records: int) -> None:
        self.heard = self.heard or records > 0
        candidates = self.candidates
        rows: list[int] = []
        amounts: list[int] = []
        others: dict[str, int] = {}  # dimension -> its (other) row, while no row moves
        for key, n in counts.items():
            index = self.row.get(key)  # NOTE: self.row, not a local: an eviction replaces the dict
            if index is None:
                if n == 1 and key not in candidates:
                    # The common new key (every URL new): a single record, counted as (other).
                    # Same as _place_new, without moving any row.
                    if len(candidates) < self.max_candidates:
                        candidates[key] = 1
                    dimension = key.partition("=")[0]
                    index = others.get(dimension)
                    if index is None:
                        self._flush(rows, amounts)  # _other may add a row, and evict: rows move
                        others.clear()
                        index = others[dimension] = self._other(key)
                else:
                    self._flush(rows, amounts)  # rows may move below
                    others.clear()
                    index = self._place_new(key, n)
            rows.append(index)
            amounts.append(n)
        self._flush(rows, amounts)
        for i, name in enumerate(self.spec.shares):
            self.share_counts[i] += counts.get(name[: -len(" share")], 0)
            self.share_totals[i] += records

    def _flush(self, rows: list, amounts: list) -> None:
        """Add counts gathered for rows (before a row may move)."""
        if rows:
            self.counts += np.bincount(rows, amounts, minlength=len(self.counts))
            rows.clear()
            amounts.clear()

    def _place_new(self, key: str, n: int) -> int:
        """The row of a key new to the table. NOTE: it gets a row of its own at its second record in
        the open window (a flooding template has many; a shipper may send one record per request);
        until then it counts as dimension=(other), so traffic whose every URL is new costs no row
        per record. A bounded set of such single keys is remembered for the open window."""
        before = self.candidates.pop(key, 0)
        if before + n < 2:
            if len(self.candidates) < self.max_candidates:
                self.candidates[key] = before + n
            return self._other(key)
        index = self._new_key(key)
        if before:  # its earlier records move from (other) to its own row
            other = self.row.get(f"{key.split('=', 1)[0]}={OTHER}")  # looked up after: rows may have moved
            if other is not None and other != index:
                self.counts[other] -= before
            self.counts[index] += before
        return index

    def _new_key(self, key: str) -> int:
        """A row for a key with records of its own; when the table is full the least busy keys
        go first (a table filled by keys long gone must not leave a new flood anonymous)."""
        self._other(key)  # NOTE: made first: evictions move what they drop to it
        if len(self.keys) >= self.max_keys:
            self._evict()
            if len(self.keys) >= self.max_keys:  # trained keys and (other) rows only: no room
                return self._other(key)
        return self._slot(key)

    def _other(self, key: str) -> int:
        other = f"{key.split('=', 1)[0]}={OTHER}"
        index = self.row.get(other)
        return index if index is not None else self._slot(other)

    def _slot(self, key: str) -> int:
        if len(self.keys) >= self.max_keys:
            self._evict()
        index = len(self.keys)
        self.keys.append(key)
        self.row[key] = index
        state = self.state
        state.level[index] = self.spec.new_key_level
        state.scale[index] = self.spec.new_key_scale
        state.hour[index] = 0.0
        state.week[index] = 0.0
        state.recent[index] = 0.0
        state.seen[index] = 1
        self.counts[index] = 0.0
        self.activity[index] = 0.0
        return index

    def _evict(self) -> None:
        """Drop the quarter of untrained keys with the least traffic, decayed past windows and the
        open one together (rows are compacted); the open window's counts of the dropped keys
        move to their dimension's (other) row, which is never dropped."""
        size = len(self.keys)
        others = np.array([key.endswith(f"={OTHER}") for key in self.keys])
        candidates = np.flatnonzero(~self.trained[:size] & ~others)
        if len(candidates) == 0:
            return
        busy = self.activity[candidates] + self.counts[candidates]
        drop = candidates[np.argsort(busy, kind="stable")[: max(1, len(candidates) // 4)]]
        for i in drop[self.counts[drop] > 0].tolist():
            other = self.row.get(f"{self.keys[i].partition('=')[0]}={OTHER}")
            if other is not None:
                self.counts[other] += self.counts[i]
        keep = np.setdiff1d(np.arange(size), drop)
        self.keys = [self.keys[i] for i in keep]
        self.row = {k: i for i, k in enumerate(self.keys)}
        size = len(keep)
        for name in ("level", "scale", "seen", "hour", "week", "recent"):
            array = getattr(self.state, name)
            array[:size] = array[keep]
        for array in (self.counts, self.activity, self.trained):
            array[:size] = array[keep]
            array[size:] = 0

    def close_due(self, now: float) -> list[AnomalyEvent]:
        """Close every window that ended by ``now``; the events of improbable ones."""
        # (the clock never goes back in use: closing moves start to at most now. A little behind is not a
        # step: a tick whose clock was read just before a record closed the window meets a start a few ms
        # ahead of it, and restarting there dropped the open window's counts and closed one twice.)
        if now < self.start - STEP_BACK_TOLERANCE * self.window_s:
            self._restart_at(now)
        events: list[AnomalyEvent] = []
        while now >= self.start + self.window_s:
            events += self._close(self.start)
            self.start += self.window_s
            if now - self.start > MAX_CATCH_UP * self.window_s:
                # NOTE: the process was stopped or starved for long: the empty windows in between
                # are skipped (one closed empty window already says the traffic dropped).
                self.start = self._window_start(now) - MAX_CATCH_UP * self.window_s
        return events

    def _restart_at(self, now: float) -> None:
        """The sidecar's clock stepped back (an NTP step, a VM restored) to before the open window's
        start: the open window restarts at ``now``'s window, without an event. Left open, no window
        closed until the clock caught up again (an outage meanwhile went unseen), and the one that
        then closed held all those minutes' records: a false burst (a step of 0.9 of a window too:
        456 records in a window of 240 expected). Its counts so far go (they are of a window cut
        short), so the restarted window is counted in part: a rise there is news, a drop is not.
        Episodes under way go on."""
        log.warning("the sidecar's clock stepped back: the open window restarts at the clock's time (no event); "
                    "keep the clock slewed (NTP) rather than stepped",
                    extra={"model": self.model_name, "back_s": round(self.start - now, 1)})
        self.start = self._window_start(now)
        self.first_whole = self.start + self.window_s
        self.counts[:] = 0.0
        self.candidates.clear()
        self.share_counts[:] = 0.0
        self.share_totals[:] = 0.0

    def _close(self, start: float) -> list[AnomalyEvent]:
        """One event at most per window: its most improbable key, when no key was improbable in the
        window before (one event an episode: a burst, or traffic stopped, may last many windows;
        template keys crossing meanwhile join it, ``_join_ongoing``), the other
        improbable ones named."""
        size = len(self.keys)
        counts = self.counts[:size].copy()
        hour, week = slots(np.array([start]), self.spec.season_zone)  # (once a window: off the record path)
        hour, week = np.full(size, hour[0]), np.full(size, week[0])
        y = count_transform(counts)
        expected_y, single, sustained, run_mean, filled = self.state.step_terms(y, hour, week, np.arange(size))
        widen = UNSEEN_HOUR_SPREAD if self._hour_unlearned(int(hour[0])) else 1.0
        # (the forecaster's deviation with a spread `widen` times its own)
        deviation = np.maximum(single, sustained) / widen
        scale = self.state.spread(np.arange(size)) * widen
        expected = count_inverse(expected_y)
        low, high = count_inverse(expected_y - 2 * scale), count_inverse(expected_y + 2 * scale)
        scores = self.spec.calibrate(deviation)
        route = self.row.get(f"route={self.route}")
        if route is not None:  # (the model's whole traffic: a key of its own falling silent is no outage)
            scores[route] = max(scores[route], silence_score(counts[route], low[route]))
        change = np.abs(counts - expected)
        found = []  # (score, deviation, key, observed, low, high, explanation)
        for i in np.flatnonzero((scores >= self.spec.threshold) & (change >= self.spec.min_change)).tolist():
            if self._learning_tag(i):
                continue
            text = describe_count(self.keys[i], counts[i], low[i], high[i], self.window_s)
            if sustained[i] > single[i]:  # the shift of the last windows raised it, not this one's count
                spread = 2 * scale[i] / math.sqrt(filled[i])
                text += describe_sustained(int(filled[i]), count_inverse(expected_y[i] + run_mean[i]),
                                           count_inverse(expected_y[i] - spread), count_inverse(expected_y[i] + spread))
            found.append((float(scores[i]), float(deviation[i]), f"{self.keys[i]} count", float(counts[i]),
                          float(low[i]), float(high[i]), text))
        held: set[str] = set()  # subjects of episodes under way that this window cannot tell of
        if start < self.first_whole or not self.heard:
            # Rises only: counted in part, or nothing heard yet. Every episode under way goes on
            # through such a window, which can end none: an outage at a restart was announced again
            # one window later, and a 5xx burst whose first window after the restart was counted for
            # a moment only (too few records to stand out) ended there and was announced again.
            held = self.alarmed
            found = [f for f in found if f[3] > f[5]]
        found += self._close_shares()
        if self.observe_gauges is not None:
            self.observe_gauges(self.model_name, self.keys, counts, expected)
        self.activity[:size] = 0.9 * self.activity[:size] + counts
        self.counts[:] = 0.0
        self.candidates.clear()
        episodes = self._episodes(found)
        ongoing, self.alarmed = self.alarmed, set().union(held, *episodes.values())
        known = {key: bool(subjects & ongoing) for key, subjects in episodes.items()}
        if ongoing:
            known = self._join_ongoing(found, known, ongoing)
        if all(known.values()):
            return []
        # (scores saturate at 1: the route's drop names the outage better than its keys' drops)
        found.sort(key=lambda f: (known[f[2]], -f[0], not self._route_drop(f), -f[1]))
        score, _, key, observed, low_, high_, text = found[0]
        if len(found) > 1:
            others = "; ".join(f[6] for f in found[1:MAX_NAMED])
            more = f" and {len(found) - MAX_NAMED} more" if len(found) > MAX_NAMED else ""
            text = f"{text}; also {others}{more}"
        return [AnomalyEvent("window", self.model_name, key, score, observed, low_, high_, text, start,
                             start + self.window_s)]

    def _join_ongoing(self, found: list[tuple], known: dict[str, bool], ongoing: set[str]) -> dict[str, bool]:
        """While an episode of the model is under way, a key's count newly crossing joins it (logged,
        no event) if it is of a dimension whose keys churn within one incident: a template
        (CHURNING_DIMENSIONS). The keys of a burst or
        storm move in and out of improbability, and each move was announced as news (a 12-s 503
        burst over a shop's URLs raised 5 events). Still news: the route's drop (an outage is
        another incident than the burst it may follow), a share crossing (a 5xx burst coming back
        after quiet windows, in a flood of traffic that went on), and the count of a route, tag,
        host, status class or level (joined, a flood 5x the traffic during a 5xx-share episode raised
        nothing; joined for being of a dimension in the episode, a host's flood during another
        host's went unsaid: review)."""
        joining = [f[2] for f in found
                   if not known[f[2]] and f[2].endswith(" count") and not self._route_drop(f)
                   and dimension_of(f[2]) in CHURNING_DIMENSIONS]
        if joining:
            log.info("keys crossing while an episode is under way join it (no new event)",
                     extra={"model": self.model_name, "keys": joining[:MAX_NAMED], "joined": len(joining),
                            "episode": sorted(ongoing)[:MAX_NAMED]})
        return {key: was or key in joining for key, was in known.items()}

    def _episodes(self, found: list[tuple]) -> dict[str, set[str]]:
        """The subjects of each improbable key's episode: its own, and while the route's count drops,
        the route's for every drop (an outage took every key down, and each key crossing the
        threshold in a later window raised an event of its own: ``status_class=2xx`` after
        ``route=shop``). A key goes on in its own episode after the route's ends: after traffic
        comes back its recent windows' mean still lies far below."""
        route = subject(f"route={self.route} count")
        dropping = any(self._route_drop(f) for f in found)
        return {f[2]: {subject(f[2]), route} if dropping and f[3] < f[4] and f[2].endswith(" count")
                else {subject(f[2])} for f in found}

    def _route_drop(self, found: tuple) -> bool:
        """Whether an improbable key of ``_close`` is the route's count below its expected low."""
        return found[2] == f"route={self.route} count" and found[3] < found[4]

    def _hour_unlearned(self, hour: int) -> bool:
        """Whether ``hour`` (of day) is still learned (see UNSEEN_HOUR_DAYS), counting this window as seen."""
        if hour not in self.unlearned_hours:
            return False
        self.unlearned_hours[hour] += 1
        if self.unlearned_hours[hour] >= self.unlearned_windows:
            del self.unlearned_hours[hour]
        return True

    def _learning_tag(self, row: int) -> bool:
        return (not self.trained[row] and self.state.seen[row] <= self.tag_warm_up
                and self.keys[row].startswith("tag="))

    def _close_shares(self) -> list[tuple]:
        if not len(self.spec.shares):
            return []
        counts, totals = self.share_counts, self.share_totals
        deviation, spread = share_deviation(counts, totals, self.share_expected, self.spec.share_dispersion)
        scores = self.spec.calibrate(deviation)
        found = []
        observed = counts / np.maximum(totals, 1.0)
        improbable = (scores >= self.spec.threshold) & (counts >= self.spec.min_change)
        for i in np.flatnonzero(improbable).tolist():
            low = max(self.share_expected[i] - 2 * spread[i], 0.0)
            high = min(self.share_expected[i] + 2 * spread[i], 1.0)
            name = self.spec.shares[i]
            found.append((float(scores[i]), float(deviation[i]), name, float(observed[i]), float(low), float(high),
                          describe_share(name, observed[i], low, high)))
        # The expected share follows the traffic slowly, weighted by the window's records; while
        # it is improbable, ten times slower: at full speed a burst became the expected share within
        # ten windows, and the next burst soon after went unseen.
        weight = np.minimum(totals / (totals + 200.0), 0.5) * np.where(improbable, SHARE_ADAPT_IN_EPISODE, 1.0)
        clipped = np.minimum(observed, self.share_expected + 3 * spread)
        self.share_expected = np.where(totals > 0, (1 - weight) * self.share_expected + weight * clipped,
                                       self.share_expected)
        counts[:] = 0.0
        totals[:] = 0.0
        return found
