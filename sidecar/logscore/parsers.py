"""Turn raw log lines into field maps.

Every parser returns ``(fields, parsed)``. A line that does not match its
declared format never raises: it comes back as ``{"message": line}`` with
``parsed=False`` so it is still scored (as plain text) and marked unparsed.
"""

from __future__ import annotations

import json
import re
from typing import Callable, Optional, Sequence

from .errors import ConfigError

Fields = dict[str, object]
Parser = Callable[[str], tuple[Fields, bool]]

# Apache/nginx "common" and "combined" formats. The request is kept whole first
# (it may hold escaped quotes or garbage from scanners) and split afterwards.
# NOTE: quoted parts use the unrolled form [^"\\]*(?:\\.[^"\\]*)* : same language as
# (?:[^"\\]|\\.)* but several times faster in Python's backtracking engine.
_QUOTED = r'[^"\\]*(?:\\.[^"\\]*)*'
# Apache's vhost_combined (Debian's other_vhosts_access.log) starts with "%v:%p ": the server name
# and port, one token more before the time. Read as the optional `vhost`: the three tokens the
# rest needs before "[" tell it from a client address (an IPv6 one ends in ":digits" too).
_VHOST = r'(?:(?P<vhost>\S+:\d+) )?'
_ACCESS = re.compile(
    rf'{_VHOST}(?P<remote_addr>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>[^\]]*)\] '
    rf'"(?P<request>{_QUOTED})" (?P<status>\d{{3}}|-) (?P<bytes>\d+|-)'
    rf'(?: "(?P<referer>{_QUOTED})" "(?P<user_agent>{_QUOTED})")?'
)
# The common case in one match: a well-formed request line, combined, common or vhost_combined format.
# (features/_native.c match_access is this regex by hand: change both)
_ACCESS_FAST = re.compile(
    rf'(?:(\S+:\d+) )?(\S+) \S+ (\S+) \[([^\]]*)\] "([A-Z]+) ([^ "\\]+) (HTTP/[\d.]+)" (\d{{3}}) (\d+|-)'
    rf'(?: "({_QUOTED})" "({_QUOTED})")?'
)
# Second chance for logs that do not escape quotes inside the request (some
# nginx formats, hand-made lines): the request runs to the last '" status bytes'.
_ACCESS_LENIENT = re.compile(
    _VHOST + r'(?P<remote_addr>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>[^\]]*)\] '
    r'"(?P<request>.*)" (?P<status>\d{3}|-) (?P<bytes>\d+|-)(?: "(?P<referer>.*?)" "(?P<user_agent>.*)")?$'
)
_REQUEST = re.compile(r"(?P<method>[A-Za-z]+) (?P<url>\S+)(?: (?P<protocol>HTTP/[\d.]+))?$")
# A target holding spaces ("GET /a b c HTTP/1.1": nginx and Apache log it as sent, a 400) is what lies
# between the method and the protocol, as Fluentd's and Fluent Bit's apache2 and nginx parsers read it:
# kept whole as the url, such a raw line scored 1.0 where the same line from a shipper's parser scored
# 0.98 (a field trial's nginx log, behind in_tail @type nginx). Split by string operations, not a
# regex: a lazy one retried its spaces quadratically (8,000 spaces: 0.27 s a line; 64 KiB: 14 s).
_METHOD = re.compile(r"[A-Za-z]+")
_PROTOCOL = re.compile(r"HTTP/[\d.]+")


def spaced_request(request: str) -> Optional[Fields]:
    """method, url and protocol of a request whose target holds spaces, or None."""
    method, space, rest = request.removesuffix("\n").partition(" ")  # (as a regex's $ ends before a last \n)
    head, space_before, protocol = rest.lstrip(" ").rpartition(" ")
    url = head.rstrip(" ")
    if not (space and space_before and url and not url[0].isspace() and "\n" not in url
            and _METHOD.fullmatch(method) and _PROTOCOL.fullmatch(protocol)):
        return None
    return {"method": method, "url": url, "protocol": protocol}

# The tag (app[pid]) ends at its colon; sysklogd writes its own with its version ("syslogd 1.4.1:
# restart."), login "-- root[2421]:", so one word may stand between them (dropped, as Fluentd's
# syslog parser drops it); a tag with no colon ends at a space (RFC 3164).
_SYSLOG_3164 = re.compile(
    r"(?:<(?P<pri>\d{1,3})>)?(?P<time>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) "
    r"(?P<host>\S+) +(?P<app>[^\s\[:]+)(?:\[(?P<pid>[^\]]*)\])?(?:: ?| [^\s:]+: ?| )(?P<message>.*)",
    re.DOTALL,
)
# The same with an RFC 3339 time: rsyslog's RSYSLOG_FileFormat, /var/log/syslog's on Debian 12 and
# Ubuntu 24.04 ("2024-01-15T10:23:45.123456+01:00 host app[pid]: ..."), whose lines did not parse at
# all, and `journalctl -o short-iso`'s ("2024-01-15T10:23:45+0100 host app[pid]: ..."). Its tag ends
# at a colon and a space, as both write it, and its host is no level word: else any line starting
# with such a time was syslog (Kubernetes' "...Z stdout F message", "...Z INFO server started",
# Rust tracing's "...Z ERROR my_app::db: refused", host ERROR).
_SYSLOG_3339 = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:?\d\d)) "
    r"(?!(?i:trace|debug|info|notice|warn|warning|error|err|crit|critical|fatal|alert|emerg) )"
    r"(?P<host>\S+) +(?P<app>[^\s\[:]+)(?:\[(?P<pid>[^\]]*)\])?:(?: |$)(?P<message>.*)",
    re.DOTALL,
)
_SYSLOG_5424 = re.compile(
    r"<(?P<pri>\d{1,3})>1 (?P<time>\S+) (?P<host>\S+) (?P<app>\S+) (?P<pid>\S+) "
    r"(?P<msgid>\S+) (?P<sd>-|(?:\[(?:[^\]\\]|\\.)*\])+) ?(?P<message>.*)",
    re.DOTALL,
)


def _unparsed(line: str) -> tuple[Fields, bool]:
    return {"message": line}, False


# An application line's head holds its time and level: log4j's and Python logging's
# "2015-10-18 18:01:47,978 INFO [main] ...", Zookeeper's "... - INFO  [...", Apache's error log
# "[Sun Dec 04 04:47:44 2005] [notice] ...", nginx's "2024/01/15 10:23:45 [error] ...", a syslog
# line, "... sshd[9]: error: ...", HDFS's
# "081109 203615 148 INFO dfs.DataNode: ...", Android's "03-17 16:13:38.811  1702  2395 D ..." (its
# level letter after the ids, named: debug), glog's (and Kubernetes' klog's)
# "I1223 22:15:29.606000  1234 file.cc:12] ..." (its level letter first), PostgreSQL's
# "2024-01-02 10:11:12.345 UTC [123] LOG: ...", Spark's "17/06/09 20:10:40 INFO ...", HealthApp's
# "20171223-22:15:29:606|..." and Proxifier's "[10.30 16:49:06] ...". Windows
# count per level and learn from the time (`logscore train --windows` refused such logs: no
# timestamp). The message stays the whole line: the record's features are those of before.
# (RecordNormalizer reads a head only for models whose windows or clients read it: a few µs a line.)
TIME_WITHIN = 64  # characters from the line's start where its time may begin
LEVEL_WITHIN = 48  # characters after the time (or from the start) where its level may begin
_LEVEL_WORDS = "TRACE|DEBUG|INFO|NOTICE|WARN|WARNING|ERROR|ERR|FATAL|CRIT|CRITICAL|SEVERE|ALERT|EMERG|PANIC"
_HEAD_TIME = re.compile(
    # ISO 8601, log4j; PostgreSQL's %m and %t end in the zone's name: UTC's is read (others are ambiguous)
    r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d{1,9})?(?:Z|[+-]\d{2}:?\d{2}(?![\d:])| UTC(?!\w)| GMT(?!\w))?"
    r"|\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}(?:\.\d{1,9})?"  # nginx's error log, Go's log package
    r"|[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d{2}:\d{2}:\d{2}(?:\.\d{1,9})? \d{4}"  # C's ctime (Apache's errors)
    r"|[A-Z][a-z]{2} {1,2}\d{1,2} \d{2}:\d{2}:\d{2}"  # syslog
    r"|^\d{6} \d{6}(?!\d)"  # HDFS's yyMMdd HHmmss, where a line starts
    r"|^\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d{1,9})?"  # Android logcat's MM-dd, where a line starts
    r"|^[IWEF]\d{4} \d{2}:\d{2}:\d{2}(?:\.\d{1,9})?"  # glog's level letter and MMdd, where a line starts
    # Spark's (log4j's) yy/MM/dd, where a line starts and a level word follows
    rf"|^\d{{2}}/\d{{2}}/\d{{2}} \d{{2}}:\d{{2}}:\d{{2}}(?= (?i:{_LEVEL_WORDS})(?![\w.-]))"
    r"|^\d{8}-\d{1,2}:\d{1,2}:\d{1,2}(?::\d{1,3})?"  # HealthApp's yyyyMMdd-H:m:s:S, where a line starts
    r"|(?<=^\[)\d{2}\.\d{2} \d{2}:\d{2}:\d{2}(?=\])", re.ASCII)  # Proxifier's [MM.dd HH:mm:ss], where a line starts
# NOTE: yy/MM/dd is read only where a line starts and a level word follows, as Spark's and Hadoop's
# log4j layouts write it: a line starting with dd/MM/yy or MM/dd/yy and no level is no time rather
# than a wrong one (17/06/09 is 2017-06-09; 09/06/17 would be 2009-06-17, its records years late).
# yyyy/MM/dd (nginx's error log "2024/01/15 10:23:45 [error] ...", Go's log) is no other date.
# The digit-led formats read only where a line starts: elsewhere in a head, such digits are ids as often.
# Android logcat's level is a letter after the process and thread ids: "03-17 16:13:38.811  1702  2395 E ...";
# glog's is the time's first letter: "E1223 22:15:29.606000  1234 file.cc:12] ...".
_LOGCAT_LEVEL = re.compile(r" +\d+ +\d+ +([VDIWEFA]) ", re.ASCII)
# (A, assert, is logcat's most severe: named fatal, an error level for the windows' error share)
LEVEL_LETTERS = {"V": "verbose", "D": "debug", "I": "info", "W": "warn", "E": "error", "F": "fatal", "A": "fatal"}
_HEAD_LEVEL = re.compile(rf"(?<![\w.-])({_LEVEL_WORDS})(?![\w.-])", re.IGNORECASE | re.ASCII)


def unambiguous(time: str) -> str:
    """A head's time as written, but Spark's yy/MM/dd as ISO 8601 (two-digit years as POSIX's %y reads
    them: 69-99 are 19xx): the head reader is the one place that tells it from dd/MM/yy or MM/dd/yy
    (a level word after it), so a record's time field holding such text is not read as yy/MM/dd."""
    if time[2:3] != "/":
        return time
    year = int(time[:2])
    return f"{1900 + year if year >= 69 else 2000 + year}-{time[3:5]}-{time[6:8]}{time[8:]}"


def line_head(line: str) -> Fields:
    """The ``time`` (as written; Spark's as ISO 8601: ``unambiguous``) and ``level`` an application
    line's first characters hold."""
    found: Fields = {}
    # NOTE: each search ends past the longest match that may begin in its range, and past the
    # character after it (its lookahead must see that character, not the end of the range).
    time = _HEAD_TIME.search(line, 0, TIME_WITHIN + 40)
    start = 0
    if time is not None and time.start() < TIME_WITHIN:
        found["time"] = unambiguous(time.group())
        start = time.end()
        if found["time"][2] == "-":  # logcat's MM-dd
            letter = _LOGCAT_LEVEL.match(line, start, start + LEVEL_WITHIN)
            if letter is not None:
                found["level"] = LEVEL_LETTERS[letter.group(1)]
                return found
        elif found["time"][0] in "IWEF" and found["time"][1].isdigit():  # glog's
            found["level"] = LEVEL_LETTERS[found["time"][0]]
            return found
    level = _HEAD_LEVEL.search(line, start, start + LEVEL_WITHIN + 9)
    if level is not None and level.start() < start + LEVEL_WITHIN:
        found["level"] = level.group()
    return found


def head_reader(native=None) -> Callable[[str], Fields]:
    """line_head, or the compiled one when ``native`` (the compiled featurizer's module) is given:
    the same fields (tests/test_native.py), a few times faster."""
    spans = getattr(native, "line_head", None)  # (a module built before it has none)
    if spans is None:
        return line_head

    def read(line: str) -> Fields:
        time_start, time_end, level_start, level_end = spans(line, TIME_WITHIN, LEVEL_WITHIN)
        found: Fields = {}
        if time_start >= 0:
            found["time"] = unambiguous(line[time_start:time_end])
        if level_start >= 0:
            level = line[level_start:level_end]
            # (a level word has 3 letters or more: one letter is logcat's or glog's)
            found["level"] = LEVEL_LETTERS[level] if level_end - level_start == 1 else level
        return found
    return read


def parse_plain(line: str) -> tuple[Fields, bool]:
    return {"message": line}, True


# What an access line's "-" reads as, per field (parse_access): a field map holding null there (Fluentd's
# apache2 parser turns "-" into nil) reads the same. NOTE: the parser gives null referer and agent to
# a common-format line too, which has neither: those two read as "-" only where the other is there
# (RecordNormalizer), else a common-format log's every record was flagged for an agent "-".
ACCESS_DASHES: dict[str, str] = {"user": "", "referer": "", "bytes": "", "user_agent": "-"}
COMBINED_ONLY = ("referer", "user_agent")


def request_fields(request: str) -> Fields:
    """method, url and protocol of a request line ("GET /a HTTP/1.1", HTTP/0.9's "GET /", a target
    holding spaces "GET /a b HTTP/1.1").
    A scanner's raw bytes, "-" or "" (what servers log for a connection that sent no request) or a
    truncated line stays whole as the url, so the URL features see exactly what was sent."""
    parts = _REQUEST.match(request)
    if parts is not None:
        return {k: v for k, v in parts.groupdict().items() if v is not None}
    return spaced_request(request) or {"url": request}


def parse_access(line: str) -> tuple[Fields, bool]:
    fast = _ACCESS_FAST.match(line)
    if fast is not None:
        vhost, addr, user, time, method, url, protocol, status, size, referer, agent = fast.groups()
        fields: Fields = {"remote_addr": addr, "user": "" if user == "-" else user, "time": time,
                          "request": f"{method} {url} {protocol}", "method": method, "url": url,
                          "protocol": protocol, "status": status, "bytes": "" if size == "-" else size}
        if referer is not None:
            fields["referer"] = "" if referer == "-" else referer
            fields["user_agent"] = agent
        if vhost is not None:
            fields["vhost"] = vhost
        return fields, True
    match = _ACCESS.match(line) or _ACCESS_LENIENT.match(line)
    if match is None:
        return _unparsed(line)
    fields = {k: v for k, v in match.groupdict().items() if v is not None and k != "ident"}
    fields.update(request_fields(match["request"]))
    for name, dash in ACCESS_DASHES.items():
        if fields.get(name) == "-":
            fields[name] = dash
    return fields, True


def parse_syslog(line: str) -> tuple[Fields, bool]:
    for pattern in (_SYSLOG_5424, _SYSLOG_3164, _SYSLOG_3339):
        match = pattern.match(line)
        if match is not None:
            return {k: v for k, v in match.groupdict().items() if v is not None and v != "-"}, True
    return _unparsed(line)


def parse_jsonl(line: str) -> tuple[Fields, bool]:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested thousands deep, as no event is
        return _unparsed(line)
    if not isinstance(value, dict):
        return _unparsed(line)
    return flatten(value), True


FLATTEN_DEPTH = 8  # maps nested deeper stay whole values: field names are never that deep


def flatten(record: dict, prefix: str = "", depth: int = FLATTEN_DEPTH) -> Fields:
    """Nested maps become dotted keys (``{"url": {"original": x}}`` → ``url.original``)."""
    flat: Fields = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and depth > 1:
            flat.update(flatten(value, name + ".", depth - 1))
        else:
            flat[name] = value
    return flat


PARSERS: dict[str, Parser] = {
    "access": parse_access,
    "syslog": parse_syslog,
    "jsonl": parse_jsonl,
    "plain": parse_plain,
}

# Names other shippers give the same field. A field map from Fluentd's apache2
# parser or Logstash's COMBINEDAPACHELOG/ECS grok is scored like a parsed line.
FIELD_ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "access": {
        "url": ("path", "request_uri", "url.original", "uri", "request"),
        "method": ("verb", "http.request.method", "request_method"),
        "status": ("code", "response", "status_code", "http.response.status_code"),
        "bytes": ("size", "body_bytes_sent", "http.response.body.bytes"),
        "referer": ("referrer", "http_referer", "http_referrer", "http.request.referrer"),
        "user_agent": ("agent", "http_user_agent", "user_agent.original"),
        "protocol": ("httpversion", "http.version"),
        # The client (windows and clients read it): nginx's parser names it remote, Logstash's
        # grok clientip, ECS client.ip / source.address; Fluentd's apache2 parser host, last,
        # since nginx's host is the ident field.
        "remote_addr": ("remote", "clientip", "client.ip", "source.address", "source.ip", "remote_ip",
                        "client_ip", "host"),
    },
    "syslog": {
        "message": ("msg", "log"),
        "app": ("ident", "program", "appname", "process.name"),
        "host": ("hostname", "host.name", "logsource"),
    },
    "jsonl": {},
    "plain": {"message": ("log", "msg", "event.original")},
}


WARN_UNPARSED_SHARE = 0.01  # past this share of records not parsing as their format, train, score and report say so
SUGGEST_SAMPLE = 500  # records suggest_format tries other formats on


def suggest_format(sample: Sequence[object], log_format: str) -> str:
    """What to try instead of ``log_format`` for records that do not parse as it: the format most of a
    few of them parse as, if any."""
    if log_format != "jsonl" and any(isinstance(record, dict) for record in sample[:100]):
        # Field maps (--json-records, a shipper's): another line format cannot read them; their names can.
        return (f"They are field maps naming none of the fields the {log_format} format reads, or their "
                f"aliases (docs/converters.md): name yours in a --config, or check the model's format.")
    probe = [r if isinstance(r, str) else json.dumps(r, default=str) for r in sample[:SUGGEST_SAMPLE]]
    shares = {name: sum(parse(line)[1] for line in probe) / max(len(probe), 1)
              for name, parse in PARSERS.items() if name not in (log_format, "plain")}
    best = max(shares, key=shares.get) if shares else None
    if best == "jsonl" and shares[best] >= 0.5:
        # NOTE: a JSON access log (nginx's escape=json, Traefik's, Caddy's) read as lines suggested
        # --format jsonl, whose model reads a message and a level: the access model reads them as maps.
        return (f"They are JSON objects ({shares[best]:.0%}): give --json-records to read each as a field map "
                f"(the {log_format} format finds its fields under the names shippers and servers give them, "
                f"docs/converters.md), or --format jsonl for an application's JSON log.")
    if best is not None and shares[best] >= 0.5:
        return f"They parse as {best} ({shares[best]:.0%}): try --format {best}."
    others = " or ".join(name for name in ("syslog", "jsonl") if name != log_format)
    if log_format == "jsonl":  # JSON lines that name none of the fields the model reads
        return (f"Records that are JSON need a message or level field (or their aliases: docs/converters.md); "
                f"try --format {others} or plain, or --config naming your own fields.")
    if log_format == "access":
        return (f"The access format reads Apache's and nginx's common, combined and vhost_combined lines, with "
                f"anything after the user agent (docs/converters.md); for another layout try --format {others}, "
                f"--format plain to read each line as text, or --config naming your own fields; check the file "
                f"is a text log.")
    return (f"Try --format {others}, --format plain to read each line as text, or --config naming "
            "your own fields (docs/converters.md); check the file is a text log.")


def get_parser(log_format: str) -> Parser:
    try:
        return PARSERS[log_format]
    except KeyError:
        known = ", ".join(sorted(PARSERS))
        raise ConfigError(f"unknown log format {log_format!r}; use one of: {known}") from None
