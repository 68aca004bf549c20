"""Record timestamps → Unix seconds, for learning windows and clients from historical logs.

Reads Apache's ``17/May/2015:10:05:03 +0000``, ISO 8601 (``2015-05-17T10:05:03Z``, with a
space, fractions, offsets; syslog RFC 5424, JSON logs), syslog RFC 3164's ``May 17 10:05:03``
(no year: the current one) and NAB's ``2015-02-26 21:42:53``. Cached per distinct text.
"""

from __future__ import annotations

import calendar
import datetime
import re
from typing import Optional, Sequence

import numpy as np

TIME_FIELDS = ("time", "timestamp", "@timestamp", "ts", "date")
LATEST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: the latest time every platform can show
MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                                      "Nov", "Dec"), start=1)}
_APACHE = re.compile(r"(\d{1,2})/([A-Z][a-z]{2})/(\d{4}):(\d{2}):(\d{2}):(\d{2})(?: ([+-])(\d{2})(\d{2}))?")
_SYSLOG = re.compile(r"([A-Z][a-z]{2}) +(\d{1,2}) (\d{2}):(\d{2}):(\d{2})")


def epoch_seconds(value: float) -> Optional[float]:
    """Unix seconds from seconds, or from milli-, micro- or nanoseconds as some shippers write them;
    None for what is no time between 1970 and 9999."""
    # Seconds of these years are about 1.7e9: from 1e11 (the year 5138) on, a finer unit.
    for threshold, unit in ((1e17, 1e9), (1e14, 1e6), (1e11, 1e3)):
        if value >= threshold:
            value /= unit
            break
    return value if 0 <= value <= LATEST_TIME else None  # False for NaN


def parse_time(text: object) -> Optional[float]:
    """Unix seconds of one timestamp text (or a number of seconds), None if unreadable."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    value = str(text).strip()
    match = _APACHE.match(value)
    if match:
        day, month, year, hour, minute, second, sign, off_h, off_m = match.groups()
        if month not in MONTHS:
            return None
        seconds = calendar.timegm((int(year), MONTHS[month], int(day), int(hour), int(minute), int(second)))
        if sign:
            offset = int(off_h) * 3600 + int(off_m) * 60
            seconds -= offset if sign == "+" else -offset
        return float(seconds)
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        moment = None
    if moment is not None:
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        return moment.timestamp()
    match = _SYSLOG.match(value)
    if match and match.group(1) in MONTHS:
        month, day, hour, minute, second = match.groups()
        year = datetime.datetime.now(datetime.timezone.utc).year
        return float(calendar.timegm((year, MONTHS[month], int(day), int(hour), int(minute), int(second))))
    return None


def record_times(fields: Sequence[dict]) -> np.ndarray:
    """Each record's time in Unix seconds (NaN where it has none)."""
    cache: dict = {}
    times = np.full(len(fields), np.nan)
    for i, record in enumerate(fields):
        text = next((record[name] for name in TIME_FIELDS if record.get(name) not in (None, "")), None)
        if text is None:
            continue
        key = text if isinstance(text, (str, int, float)) else str(text)
        seconds = cache.get(key)
        if seconds is None and key not in cache:
            seconds = cache[key] = parse_time(text)
        if seconds is not None:
            times[i] = seconds
    return times
