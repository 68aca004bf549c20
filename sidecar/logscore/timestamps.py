"""Record timestamps → Unix seconds, for learning windows and clients from historical logs.

Reads Apache's ``17/May/2015:10:05:03 +0000``, ISO 8601 (``2015-05-17T10:05:03Z``, with a space,
fractions, offsets; syslog RFC 5424, JSON logs, log4j's ``2015-05-17 10:05:03,978``), syslog RFC
3164's ``May 17 10:05:03`` (no year: the latest that is not days ahead), C's ctime ``Sun May 17
10:05:03 2015`` (Apache's error log), nginx's error log's ``2015/05/17 10:05:03``, NAB's
``2015-02-26 21:42:53``, HDFS's ``081109 203615`` (yyMMdd HHmmss), Android logcat's ``03-17
16:13:38.811``, glog's ``I1223 22:15:29.606000`` and Proxifier's ``10.30 16:49:06`` (no year, as
syslog's), HealthApp's ``20171223-22:15:29:606`` (its last number milliseconds),
PostgreSQL's ``2024-01-02 10:11:12.345 UTC`` (a zone named UTC or GMT), and Unix seconds (or milli-,
micro-, nanoseconds) since 2001 as numbers or digits. Times written without a zone are read in the
zone ``read_zoneless_in`` set (``--time-zone``; UTC until it is called). Spark's yy/MM/dd is not read
here (the same text is dd/MM/yy or MM/dd/yy in other fields): a line's head gives it as ISO 8601
(``parsers.unambiguous``). Cached per distinct text.
"""

from __future__ import annotations

import calendar
import datetime
import os
import re
import time
from typing import Optional, Sequence

import numpy as np

from .errors import ConfigError

# (@t: Serilog's compact JSON; asctime: Python's logging in JSON, python-json-logger's default;
# time_local, time_iso8601: nginx's variables, the names its JSON access logs (escape=json) give them:
# without them `logscore train --windows --json-records` refused such a log, "0 of 2000 records carry
# a readable timestamp", and Fluentd's json parser left the time there, unread by windows and clients)
TIME_FIELDS = ("time", "timestamp", "@timestamp", "ts", "date", "@t", "asctime", "time_local", "time_iso8601")
LATEST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: the latest time every platform can show
MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                                      "Nov", "Dec"), start=1)}
_APACHE = re.compile(r"(\d{1,2})/([A-Z][a-z]{2})/(\d{4}):(\d{2}):(\d{2}):(\d{2})(?: ([+-])(\d{2})(\d{2}))?")
_SYSLOG = re.compile(r"([A-Z][a-z]{2}) +(\d{1,2}) (\d{2}):(\d{2}):(\d{2})")
# C's ctime, as Apache's error log writes it: "Sun Dec 04 04:47:44 2005" (2.4: with microseconds)
_CTIME = re.compile(r"[A-Z][a-z]{2} ([A-Z][a-z]{2}) +(\d{1,2}) (\d{2}):(\d{2}):(\d{2})(\.\d{1,9})? (\d{4})$")
# nginx's error log and Go's log package: "2024/01/15 10:23:45" (Go's with microseconds)
_SLASHED = re.compile(r"(\d{4})/(\d{2})/(\d{2}) (\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?$")
# HDFS's (log4j's yyMMdd HHmmss): "081109 203615"
_COMPACT = re.compile(r"(\d{2})(\d{2})(\d{2}) (\d{2})(\d{2})(\d{2})$")
# Android logcat's MM-dd, without a year: "03-17 16:13:38.811"
_MONTH_DAY = re.compile(r"(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?$")
# glog's (klog's) level letter and MMdd, without a year: "I1223 22:15:29.606000"
_GLOG = re.compile(r"[IWEF](\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?$")
# Proxifier's MM.dd, without a year: "10.30 16:49:06"
_DOTTED_MONTH_DAY = re.compile(r"(\d{2})\.(\d{2}) (\d{2}):(\d{2}):(\d{2})$")
# HealthApp's yyyyMMdd-H:m:s:S, every number after the date unpadded (S: milliseconds):
# "20171223-22:15:29:606", "20171223-22:16:0:11"
_DASHED_COMPACT = re.compile(r"(\d{4})(\d{2})(\d{2})-(\d{1,2}):(\d{1,2}):(\d{1,2})(?::(\d{1,3}))?$")
# A time that ends in UTC's name, as PostgreSQL's log writes it: "2024-01-02 10:11:12.345 UTC"
UTC_SUFFIXES = (" UTC", " GMT")


def epoch_seconds(value: float) -> Optional[float]:
    """Unix seconds from seconds, or from milli-, micro- or nanoseconds as some shippers write them;
    None for what is no time between 1970 and 9999."""
    # Seconds of these years are about 1.7e9: from 1e11 (the year 5138) on, a finer unit.
    for threshold, unit in ((1e17, 1e9), (1e14, 1e6), (1e11, 1e3)):
        if value >= threshold:
            value /= unit
            break
    return value if 0 <= value <= LATEST_TIME else None  # False for NaN


# A number is read as a time from 1e9 seconds on (2001-09-09): below that, a field named time
# or ts holds something else (a duration, a count), not a moment.
EARLIEST_NUMBER = 1e9
# RFC 3164 carries no year: a line is of the latest year that does not put it this far ahead
# (December's lines read in January are last year's).
SYSLOG_YEAR_AHEAD_S = 2 * 86400.0


# NOTE: a time written without a zone (syslog's, Python's and Java's default log times, ISO 8601
# without an offset) is the wall clock of the machine that wrote it, most often in its local zone.
# Read as UTC, a host behind UTC looked hours late (left out of windows and clients until its
# "clock" settled) and one ahead looked ahead; training's windows learned hours of day shifted by
# the zone. `logscore serve` and `train` read them in --time-zone: by default the machine's own,
# as Fluentd's parsers (localtime) and Logstash's date filter do; the sidecar runs beside the
# shipper, on the host whose logs it reads.
LOCAL = "local"
_zone: Optional[object] = None  # None: UTC; LOCAL: the machine's zone (the C library's, TZ); else a ZoneInfo
_OFFSETS: dict[int, float] = {}  # quarter hour of wall-clock time -> the zone's offset then, in seconds
OFFSETS_CACHED = 4096


def zone_named(name: str) -> Optional[object]:
    """The zone `read_zoneless_in` takes for ``name``: 'UTC', 'local' or an IANA name (Europe/Berlin);
    a ConfigError saying what to give otherwise."""
    text = str(name).strip()
    if text.upper() in UTC_NAMES:
        return None
    if text.lower() == LOCAL:
        time.tzset()  # TZ as the process has it now
        return None if time.timezone == 0 and not time.daylight else LOCAL
    zone = zone_info(text)
    if zone is None:
        raise ConfigError(f"--time-zone {text!r}: no such time zone; give an IANA name such as Europe/Berlin "
                          "(from Debian's tzdata package), 'UTC', or 'local' (this machine's zone)")
    return zone


UTC_NAMES = ("UTC", "ETC/UTC", "Z", "GMT")  # (upper case)


def zone_info(name: str) -> Optional[datetime.tzinfo]:
    """The IANA zone ``name`` names, or None when this machine has no such zone."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def zone_description(name: str) -> str:
    """What a --time-zone value means here, for the log: 'local (CET/CEST)', 'UTC', 'Europe/Berlin'."""
    zone = zone_named(name)
    shown = "UTC" if zone is None else "/".join(sorted(set(time.tzname))) if zone == LOCAL else str(zone)
    return f"local ({shown})" if str(name).strip().lower() == LOCAL else shown


# The zone whose wall clock a model's windows learn hours of day and of week in (metadata
# windows.season_zone; the sidecar follows the model's). Models trained before it was recorded have
# none: their seasons stay on UTC, as they were learned.
SEASONS_UTC = "UTC"


def season_zone_name(name: str) -> Optional[str]:
    """The IANA name (or 'UTC') of the zone a --time-zone value names, to record in a model: for
    'local', this machine's zone's name (TZ's, or the zone file it or /etc/localtime links to, else
    /etc/timezone's); None when the machine's zone has no name zoneinfo loads (a POSIX TZ string)."""
    zone = zone_named(name)
    if zone is None:
        return SEASONS_UTC
    if zone != LOCAL:
        return str(zone)
    given = os.environ.get("TZ", "").lstrip(":")
    if given and not given.startswith("/"):  # a name (Europe/Berlin), or a POSIX rule
        candidates = [given]
    else:  # a file (systemd units set TZ=:/etc/localtime): the zone it links to, else /etc/timezone's
        candidates = [os.path.realpath(given or "/etc/localtime")]
        if os.path.exists("/etc/timezone"):
            with open("/etc/timezone", encoding="utf-8", errors="replace") as file:
                candidates.append(file.read().strip())
    for text in candidates:
        key = text.split("/zoneinfo/", 1)[-1].removeprefix("posix/")
        if key.upper() in UTC_NAMES:
            return SEASONS_UTC
        if zone_info(key) is not None:
            return key
    return None


def season_zone(name: Optional[str]) -> Optional[datetime.tzinfo]:
    """The zone of a recorded season_zone (None: UTC, and for models trained before it was recorded);
    a ConfigError when this machine cannot load it."""
    if name is None or str(name).upper() in UTC_NAMES:
        return None
    zone = zone_info(str(name))
    if zone is None:
        raise ConfigError(f"time zone {name!r} cannot be loaded here; install the IANA time zone database "
                          "(Debian's tzdata package, or pip install tzdata)")
    return zone


def read_zoneless_in(name: str) -> None:
    """Read times written without a zone in ``name`` (see zone_named), for this process."""
    global _zone
    _zone = zone_named(name)
    _OFFSETS.clear()
    _MINUTES.clear()


def _from_wall_clock(wall: float) -> float:
    """Unix seconds of a time written without a zone, given as if it were UTC (``wall``)."""
    if _zone is None:
        return wall
    quarter = int(wall // 900)  # every zone changes its offset on a quarter hour
    offset = _OFFSETS.get(quarter)
    if offset is None:
        if len(_OFFSETS) >= OFFSETS_CACHED:
            _OFFSETS.clear()
        offset = _OFFSETS[quarter] = _zone_offset(quarter * 900.0)
    return wall - offset


def _zone_offset(wall: float) -> float:
    """Seconds the zone is ahead of UTC at wall-clock time ``wall``. (In an hour a change of
    offset repeats or skips, a named zone takes the offset before the change; the C library's
    local zone may take either.)"""
    if _zone == LOCAL:
        fields = time.gmtime(wall)
        return wall - time.mktime((*fields[:8], -1))
    moment = datetime.datetime.fromtimestamp(wall, datetime.timezone.utc).replace(tzinfo=_zone)
    return moment.utcoffset().total_seconds()


def parse_time(text: object, now: Optional[float] = None) -> Optional[float]:
    """Unix seconds of one timestamp text (or a number of seconds), None if unreadable.
    ``now`` (Unix seconds, default the clock) places a syslog time without a year."""
    if text is None or isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return epoch_seconds(float(text)) if text >= EARLIEST_NUMBER else None
    value = str(text).strip()
    if len(value) >= 20 and value[2] == "/" and value[17] == ":" and value[18:20].isdigit():
        return _apache_by_minute(value, now)
    if value.isdigit() or value.replace(".", "", 1).isdigit():
        return parse_time(float(value))
    return _parsed(value, now)


# NOTE: a backlog holds a different timestamp every second, and reading Apache's whole costs a
# few microseconds (a regex, a calendar): it is read as its minute's start (cached) plus its
# seconds. (ISO 8601 is read whole: datetime.fromisoformat is quicker than any split of it.)
MINUTES_CACHED = 4096
_MINUTES: dict[str, Optional[float]] = {}  # Apache's timestamp with its seconds 00 -> its Unix seconds
_UNSEEN = object()


def _apache_by_minute(value: str, now: Optional[float]) -> Optional[float]:
    """parse_time of ``17/May/2015:10:05:03 +0000``: its minute's start, cached, plus its seconds."""
    seconds = int(value[18:20])
    if seconds > 59:  # (its minute is checked whole below; a second past 59 would roll into the next)
        return None
    minute = f"{value[:18]}00{value[20:]}"
    start = _MINUTES.get(minute, _UNSEEN)
    if start is _UNSEEN:
        if len(_MINUTES) >= MINUTES_CACHED:
            _MINUTES.clear()
        start = _MINUTES[minute] = _parsed(minute, now)
    return None if start is None else start + seconds


def _parsed(value: str, now: Optional[float]) -> Optional[float]:
    """parse_time of a text, read whole; None for a date no calendar holds (year 0, 10000 once
    moved into UTC)."""
    try:
        return _read_whole(value, now)
    except (ValueError, OverflowError, OSError):
        return None


def _read_whole(value: str, now: Optional[float]) -> Optional[float]:
    match = _APACHE.match(value)
    if match:
        day, month, year, hour, minute, second, sign, off_h, off_m = match.groups()
        if month not in MONTHS:
            return None
        seconds = calendar.timegm(_checked((int(year), MONTHS[month], int(day), int(hour), int(minute), int(second))))
        if not sign:
            return _from_wall_clock(float(seconds))
        offset = int(off_h) * 3600 + int(off_m) * 60
        return float(seconds - offset if sign == "+" else seconds + offset)
    match = _DASHED_COMPACT.match(value)
    if match:  # (before ISO's reader, which takes "20171223-22:15:29:6" for 0.6 s, not HealthApp's 6 ms)
        wall = calendar.timegm(_checked(tuple(map(int, match.groups()[:6]))))
        return _from_wall_clock(wall + int(match.group(7) or 0) / 1000)
    iso = value.replace("Z", "+00:00")
    if iso[-4:] in UTC_SUFFIXES:
        iso = iso[:-4] + "+00:00"  # (one with an offset besides is two zones: refused below)
    try:
        moment = datetime.datetime.fromisoformat(iso)
    except ValueError:
        moment = None
    if moment is not None:
        if moment.tzinfo is None:
            return _from_wall_clock(moment.replace(tzinfo=datetime.timezone.utc).timestamp())
        return moment.timestamp()
    match = _CTIME.match(value)
    if match and match.group(1) in MONTHS:
        month, day, hour, minute, second, fraction, year = match.groups()
        wall = calendar.timegm(_checked((int(year), MONTHS[month], int(day), int(hour), int(minute), int(second))))
        return _from_wall_clock(wall + float(fraction or 0))
    match = _SYSLOG.match(value)
    if match and match.group(1) in MONTHS:
        month, day, hour, minute, second = match.groups()
        return _year_less((MONTHS[month], int(day), int(hour), int(minute), int(second)), None, now)
    match = _SLASHED.match(value)
    if match:
        wall = calendar.timegm(_checked(tuple(map(int, match.groups()[:6]))))
        return _from_wall_clock(wall + float(match.group(7) or 0))
    match = _COMPACT.match(value)
    if match:
        year, month, day, hour, minute, second = map(int, match.groups())
        year += 1900 if year >= 69 else 2000  # as POSIX's strptime reads %y
        return _from_wall_clock(float(calendar.timegm(_checked((year, month, day, hour, minute, second)))))
    match = _MONTH_DAY.match(value) or _GLOG.match(value)
    if match:
        return _year_less(tuple(map(int, match.groups()[:5])), match.group(6), now)
    match = _DOTTED_MONTH_DAY.match(value)
    if match:
        return _year_less(tuple(map(int, match.groups())), None, now)
    return None


def _year_less(moment: tuple[int, ...], fraction: Optional[str], now: Optional[float]) -> Optional[float]:
    """Unix seconds of a (month, day, hour, minute, second) and its fraction of a second (".811"),
    written without a year, as syslog's: in the latest year that does not place it days ahead."""
    # (checked in 2000, a leap year: 29 February is a date, placed in a year that has one)
    seconds = _latest_year(_checked((2000, *moment))[1:], now)
    return None if seconds is None else seconds + float(fraction or 0)


def _checked(moment: tuple[int, ...]) -> tuple[int, ...]:
    """A (year, month, day, hour, minute, second) a calendar holds (timegm rolls 13/45 over: ValueError).
    Every format's time is checked so: a line's '31 Feb', day 00, hour 24 or second 60 (a leap second,
    which ISO 8601's reader refuses too) is no time, not a moment days or months away."""
    datetime.datetime(*moment)
    return moment


def _latest_year(moment: tuple[int, ...], now: Optional[float]) -> Optional[float]:
    """Unix seconds of a (month, day, hour, minute, second) written without a year: in the latest
    year that does not place it days ahead of ``now`` (the clock by default)."""
    now = time.time() if now is None else now
    year = time.gmtime(now).tm_year
    # (the next year too: in a zone ahead of UTC, New Year comes before it does in UTC)
    for candidate in (year + 1, year, year - 1):
        if moment[:2] == (2, 29) and not calendar.isleap(candidate):
            continue
        seconds = _from_wall_clock(float(calendar.timegm((candidate, *moment))))
        if seconds <= now + SYSLOG_YEAR_AHEAD_S:
            return seconds
    return None


def record_times(fields: Sequence[dict]) -> np.ndarray:
    """Each record's time in Unix seconds: the first of its TIME_FIELDS that holds a value (NaN
    where it has none, or that value is no time)."""
    return first_times([[record.get(name) for record in fields] for name in TIME_FIELDS], len(fields))


def column_times(columns: dict[str, list], size: int) -> Optional[np.ndarray]:
    """``record_times`` of records read as text columns (``Model.behaviour_fields`` holds
    TIME_FIELDS); None when no column holds a time field."""
    found = [columns[name] for name in TIME_FIELDS if name in columns]
    return first_times(found, size) if found else None


def first_times(columns: Sequence[Sequence[object]], size: int) -> np.ndarray:
    """Per row, the time of the first column holding a value there (NaN: none, or no time)."""
    cache: dict = {}
    times = np.full(size, np.nan)
    settled = [False] * size  # a row whose first value was found (read as a time or not)
    for column in columns:
        if column.count(None) == size:  # most time fields are absent from most records: at C speed
            continue
        for row, text in enumerate(column):
            if settled[row] or text is None or text == "":
                continue
            settled[row] = True
            key = text if isinstance(text, (str, int, float)) else str(text)
            seconds = cache.get(key)
            if seconds is None and key not in cache:
                seconds = cache[key] = parse_time(text)
            if seconds is not None:
                times[row] = seconds
    return times
