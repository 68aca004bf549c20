"""`logscore report SCORED.jsonl… [--html OUT.html]`: what is anomalous in scored output, and why.

Reads the JSON lines that shippers and `logscore score` write (Fluentd records with
``anomaly_score`` / ``is_anomaly`` / an explanation key, Logstash events with ``[logscore]``,
`logscore score` lines, Fluentd out_file's ``time<TAB>tag<TAB>{json}``), and groups the anomalies
as the review page does (review.Groups, over the explanation's feature names): per group a count,
first and last seen, top entities and examples; overall a timeline of the anomaly rate and the
score histogram. A text summary on stdout; with --html, one self-contained HTML file (inline SVG).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from typing import Optional

import numpy as np

from .errors import ConfigError, InputError
from .feedback import strip_rarity
from .decide import UNPARSED_NOTE
from .flood import is_flood
from .inputs import read_lines, shipper_line
from .metrics import SCORE_BUCKETS
from .records import RAW_LINE_KEYS
from .shown import html_text, named_first, printable
from .review import TOP_ENTITIES, Example, Groups, render_group_examples
from .parsers import FIELD_ALIASES, WARN_UNPARSED_SHARE, line_head, parse_access, parse_syslog
from .timestamps import epoch_seconds, parse_time
from .svg import bars, timeline

# The client's names first and host last, as the sidecar reads them (parsers.FIELD_ALIASES), and a
# plain "client": the nginx parsers of Fluentd and Fluent Bit name the client remote and the ident
# field host, always "-" (a report of their records named one entity, "-"); Fluentd's apache2 parser
# and syslog name theirs host.
ENTITY_FIELDS = ("remote_addr", "client", *FIELD_ALIASES["access"]["remote_addr"])
RECORD_KEYS = ("message", "log", "record")
# NOTE: a forward-mode sidecar's next hop is often Fluent Bit writing a file (inputs.shipper_line
# reads its lines): they were refused ("no scored records") though every one held a score.
FLUENT_BIT_TIME = re.compile(r"\d+\.\d+")
ACCESS_TIME = re.compile(r"\[(\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4})\]")
TIMELINE_BINS = 60
# Records whose times lie far out (further than FAR_OUT_STRETCH times the span of all but a
# FAR_OUT_SHARE at either end, one at least, beyond it) are left out of the charts (chart_span).
FAR_OUT_SHARE = 0.001
FAR_OUT_STRETCH = 0.5
PROGRESS_EVERY = 200_000
DAILY_MAX_DAYS = 62  # a report spanning more days has no per-day lines (its HTML timeline still draws them)
MAX_GROUPS = 100_000  # groups a report keeps (memory: about 2 KB each with their examples)
EVENTS_LISTED = 20  # the latest anomaly events the summary lists (all are counted)
FILES_NAMED = 3  # files without a time the summary names (a report over 30 such files wrote a 1,452-character line)
EVENT_KINDS = ("window", "client")
LOGSTASH_UNSCORED = "_logscore_unscored"  # the tag logstash-config's pipelines give an event left unscored


def add_report_command(commands) -> None:
    from .cli import whole_number

    report = commands.add_parser("report", help="groups, timeline and histogram of scored output",
                                 description="Summarize scored output (JSON lines from Fluentd, Logstash, Fluent "
                                 "Bit's file output or "
                                 "`logscore score --record`): anomalies grouped by model, route and what made them "
                                 "unusual, first/last seen, top entities, the anomaly rate over time, the score "
                                 "histogram. Text on stdout; --html writes a self-contained page.")
    report.add_argument("inputs", nargs="+", metavar="SCORED.jsonl", help="files (plain or gzip); '-' reads stdin")
    report.add_argument("--html", metavar="OUT.html", help="also write the report as one HTML file (inline SVG)")
    report.add_argument("--entity", metavar="FIELD", help="the field naming an entity (client, host); default: the "
                        f"first present of {', '.join(ENTITY_FIELDS)}")
    report.add_argument("--top", type=whole_number(0, "groups"), default=20, metavar="N",
                        help="groups shown, 0 or more (default 20)")
    report.set_defaults(run=run_report)


@dataclass
class Totals:
    records: int = 0
    anomalies: int = 0
    suppressed: int = 0
    unreadable: int = 0
    # records passed on without a score, per (route, the reason its note gives): a route to no model shows here
    unscored: Counter = field(default_factory=Counter)
    events: int = 0  # anomaly events (forward mode's and the Fluentd filter's anomaly_tag records)
    latest_events: list = field(default_factory=list)  # the last EVENTS_LISTED of them, as read
    held: int = 0  # records scored while their route learned its own model: not flagged (note `learning: …`)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORE_BUCKETS) + 1, dtype=np.int64))
    times: array = field(default_factory=lambda: array("d"))  # per record: its own time, NaN when it holds none
    lines: array = field(default_factory=lambda: array("I"))  # per record: its line in its file
    flags: array = field(default_factory=lambda: array("b"))
    files: list = field(default_factory=list)  # InputFile, in the order read
    anomaly_records: array = field(default_factory=lambda: array("q"))  # per anomaly: its record's index
    anomaly_groups: array = field(default_factory=lambda: array("q"))  # per anomaly: its group's number
    placement: Optional["Placement"] = None  # once every file is read (place_records)
    bare: int = 0  # lines of `logscore score` or `client` output without --record: a score, no record or time
    entities: Counter = field(default_factory=Counter)
    models: Counter = field(default_factory=Counter)
    # (model, route) -> records scored and flagged: which model floods which route (the operator's
    # --tag-routes needs it)
    route_records: Counter = field(default_factory=Counter)
    route_anomalies: Counter = field(default_factory=Counter)
    route_unparsed: Counter = field(default_factory=Counter)  # (model, route) -> records noted "did not parse"


@dataclass
class InputFile:
    name: str
    first: int  # the index of its first record in Totals' per-record arrays
    end: int = 0  # past its last record


@dataclass
class Placement:
    """Where each record goes on the report's two axes. A record without a time in a file that holds
    times takes the time of the record before it in that file (the file's first time, before it): a
    line a parser could not read, or whose time field is missing or unreadable, was written between its
    neighbours. The records of a file holding no time at all are on an axis of their own, by position
    (file, line), shown apart: no time of another file says when they were written."""
    times: np.ndarray  # per record: its time, its neighbour's when it has none; NaN on the position axis
    by_position: np.ndarray  # per record: True when its file holds no time (the position axis)
    placed: int  # records without a time placed at a neighbour's
    positioned: np.ndarray  # the indices of the records on the position axis, as read (its x: their rank)


def lookup(record: dict, *names: str):
    """The first of ``names`` present in the record, top level, under ``logscore`` or dotted."""
    for name in names:
        if name in record:
            return record[name]
        nested = record.get("logscore")
        if isinstance(nested, dict) and name in nested:
            return nested[name]
        if "." in name:
            value = record
            for part in name.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None:
                return value
    return None


def parse_line(line: str) -> Optional[tuple[str, dict, str]]:
    """(route, record, the time written before it) of one scored line (inputs.shipper_line: a JSON
    object, Fluentd out_file's or Fluent Bit's file output); None when it holds no record."""
    parsed = shipper_line(line)
    if parsed is None:
        return None
    route, record, written = parsed
    return str(record.get("tag") or route), record, written


def explanation_of(record: dict) -> list[str]:
    value = lookup(record, "explanation", "anomaly_explanation")
    if value is None:
        value = next((v for k, v in record.items() if "explanation" in k and isinstance(v, list)), None)
    return [str(v) for v in value] if isinstance(value, list) else []


def time_of(record: dict, text: str, written: str = "") -> Optional[float]:
    """The record's time: its own field, else an access line's, else the time at the head of an
    application or syslog line (as the sidecar's windows read it first: a shipper that did not parse
    the line wrote the moment it read it), else the time its line begins with (Fluentd's out_file:
    its event time, which its records do not hold)."""
    value = lookup(record, "@timestamp", "timestamp", "time")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return epoch_seconds(float(value))
    if isinstance(value, str):
        # ISO 8601 (out_file's inject as the docs give it), else any time the sidecar reads: the access
        # log's own (Fluent Bit's nginx parser with Time_Keep, an inject in the log's format), syslog's
        when = iso_seconds(value)
        when = parse_time(value) if when is None else when
        if when is not None:
            return when
    match = ACCESS_TIME.search(text)
    if match:
        try:
            return datetime.strptime(match.group(1), "%d/%b/%Y:%H:%M:%S %z").timestamp()
        except ValueError:
            return None
    head = line_head(text).get("time")
    if head is not None and (when := parse_time(head)) is not None:
        return when
    if FLUENT_BIT_TIME.fullmatch(written):
        return epoch_seconds(float(written))
    return iso_seconds(written) if written else None


def iso_seconds(text: str) -> Optional[float]:
    try:
        return epoch_seconds(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None


def notes_of(record: dict) -> list:
    value = lookup(record, "notes", "anomaly_notes")  # the Fluentd filter's notes_key
    return value if isinstance(value, list) else [value] if isinstance(value, str) else []


SCORE_OUTPUT_KEYS = ("logscore", "anomaly_score", "is_anomaly", "explanation", "notes", "score", "line", "model",
                     "version")  # what scoring added to a record: not its text


def text_of(record: dict) -> str:
    value = lookup(record, *RECORD_KEYS)
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    # `logscore score` writes where a line was ("line", "file"); a shipper's record may hold its own "file"
    ours = SCORE_OUTPUT_KEYS + (("file",) if "score" in record and "line" in record else ())
    plain = {k: v for k, v in record.items() if k not in ours}
    return json.dumps(plain, ensure_ascii=False, default=str)


def entity_of(record: dict, name: Optional[str]) -> Optional[str]:
    value = lookup(record, name) if name else client_in(record)
    if value is None and not name:
        inner = lookup(record, "record")
        if isinstance(inner, dict):
            value = client_in(inner)
            line = lookup(inner, *RAW_LINE_KEYS) if value is None else None
            value = line_entity(line) if isinstance(line, str) else value
        elif isinstance(inner, str):
            value = line_entity(inner)
        if value is None:  # (a shipper's record with its fields at the top, a raw line among them)
            line = lookup(record, *RAW_LINE_KEYS)
            value = line_entity(line) if isinstance(line, str) else None
    return str(value) if value is not None else None


def client_in(record: dict):
    """The first of ENTITY_FIELDS holding a value, not a map: ECS's ``client`` is a map whose ``ip``
    is the client (a plain ``client`` named the map itself)."""
    for name in ENTITY_FIELDS:
        value = lookup(record, name)
        if value is not None and not isinstance(value, (dict, list)):
            return value
    return None


def line_entity(line: str) -> Optional[str]:
    """A raw line's entity: an access line's client, a syslog line's host. NOTE: a shipper that tails
    syslog whole (Fluent Bit without a parser: {"log": ...}) left `top entities` empty."""
    fields, parsed = parse_syslog(line)  # (first: a syslog message may quote an access line)
    if parsed:
        return fields.get("host")
    fields, parsed = parse_access(line)
    return fields.get("remote_addr") if parsed else None


def is_flagged(value) -> bool:
    """is_anomaly as written: a boolean, or text (a pipeline that turned fields into strings wrote
    "false", which as any non-empty text counted as an anomaly)."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    return bool(value)


def read_scored(paths, entity_field: Optional[str], progress=None) -> tuple[Totals, Groups]:
    totals = Totals()
    # A file: its whole span, and its biggest groups (one of 50,000 records outlives 150,000 of one).
    # "r": a report's groups are numbered on their own, not the review page's (feedback add --group takes those)
    # Members are counted on the groups, not placed (Group.count_member): the report places records once
    # each file is read (Placement), and group_spans its groups' members.
    groups = Groups(max_groups=MAX_GROUPS, prefix="r", keep_largest=True)
    lines_read = 0
    for path in paths:
        totals.files.append(InputFile("stdin" if path == "-" else str(path), len(totals.flags)))
        # (blank lines given too: a record's place is its line in its file)
        for line_number, line in enumerate(read_lines([path], blank_lines=True), start=1):
            lines_read += 1
            if progress is not None and lines_read % PROGRESS_EVERY == 0:
                progress(lines_read)
            read_scored_line(totals, groups, line, line_number, entity_field)
        totals.files[-1].end = len(totals.flags)
    if totals.records == 0 and totals.unscored:
        raise InputError(f"no scored records in {', '.join(map(str, paths))}, only records passed on unscored "
                         "(was the sidecar running? its log and the shipper's say why): "
                         + "; ".join(unscored_lines(totals)))
    if totals.records == 0:
        raise InputError(f"no scored records in {', '.join(map(str, paths))}: expected JSON lines with "
                         "anomaly_score (or score) and is_anomaly, as Fluentd, Logstash, Fluent Bit or "
                         "`logscore score` write")
    totals.placement = place_records(totals)
    return totals, groups


def read_scored_line(totals: Totals, groups: Groups, line: str, line_number: int,
                     entity_field: Optional[str]) -> None:
    parsed = parse_line(line.strip()) if line.strip() else None
    if parsed is not None and count_unscored_or_event(totals, parsed[0], parsed[1]):
        return
    score = lookup(parsed[1], "anomaly_score", "score") if parsed else None
    if parsed is None or not isinstance(score, (int, float)):
        totals.unreadable += bool(line.strip())
        return
    route, record, written = parsed
    flag = is_flagged(lookup(record, "is_anomaly"))
    notes = notes_of(record)
    text = text_of(record)
    when = time_of(record, text, written)
    totals.records += 1
    totals.bare += "line" in record and "score" in record and "record" not in record
    totals.times.append(when if when is not None else math.nan)
    totals.lines.append(line_number)
    totals.flags.append(flag)
    totals.histogram[int(np.searchsorted(SCORE_BUCKETS, float(score), side="left"))] += 1
    model = str(lookup(record, "model", "anomaly_model") or "(model not recorded)")
    totals.models[model] += 1
    totals.route_records[model, route] += 1
    totals.route_anomalies[model, route] += flag
    if record.get("unparsed") is True or any(str(n).startswith(UNPARSED_NOTE) for n in notes):
        totals.route_unparsed[model, route] += 1
    suppressed = any(str(n).startswith("suppressed by feedback") for n in notes)
    totals.suppressed += suppressed
    totals.held += any(str(n).startswith("learning:") for n in notes)
    if not flag:
        return
    totals.anomalies += 1
    entity = entity_of(record, entity_field)
    if entity:
        totals.entities[entity] += 1
    names = [strip_rarity(n) for n in explanation_of(record)]
    # (the group's own first/last seen are not used: group_spans places its members once all is read)
    group = groups.assign(model, route, frozenset(names), lambda names=names: names, 0.0)
    group.count_member(entity)
    totals.anomaly_records.append(totals.records - 1)
    totals.anomaly_groups.append(group.number)
    if len(group.examples) < group.examples.maxlen:
        group.examples.append(Example(when or 0.0, text[:2000], float(score)))


def place_records(totals: Totals) -> Placement:
    """Place every record on the time axis or, in a file holding no time, the position axis (Placement)."""
    times = np.frombuffer(totals.times, dtype=np.float64).copy()
    untimed = int(np.isnan(times).sum())
    by_position = np.zeros(len(times), dtype=bool)
    for file in totals.files:
        own = times[file.first:file.end]  # (a view: filled in place)
        known = ~np.isnan(own)
        if not known.any():
            by_position[file.first:file.end] = True
            continue
        # each record's latest timed record at or before it; before the file's first time, that time's
        latest = np.maximum.accumulate(np.where(known, np.arange(len(own)), -1))
        latest[latest < 0] = int(np.argmax(known))
        own[:] = own[latest]
    return Placement(times, by_position, untimed - int(by_position.sum()), np.flatnonzero(by_position))


def is_anomaly_event(record: dict) -> bool:
    """An anomaly event (a window or a client, events.py) as forward mode and the Fluentd filter's
    anomaly_tag pass it on: no record of a log, though it holds a score and a model."""
    return record.get("kind") in EVENT_KINDS and "key" in record and isinstance(record.get("explanation"), str)


def count_unscored_or_event(totals: Totals, route: str, record: dict) -> bool:
    """Count a record passed on unscored, or an anomaly event, in their own place; False for others."""
    if is_anomaly_event(record):
        totals.events += 1
        totals.latest_events.append(record)
        del totals.latest_events[:-EVENTS_LISTED]
        return True
    tags = record.get("tags") if isinstance(record.get("tags"), list) else []
    if lookup(record, "anomaly_unscored", "unscored") is not True and LOGSTASH_UNSCORED not in tags:
        return False
    reason = next((str(n).removeprefix("unscored: ") for n in notes_of(record) if str(n).startswith("unscored")),
                  ", ".join(str(t) for t in tags if t != LOGSTASH_UNSCORED))  # Logstash's failure tags say why
    totals.unscored[route, reason] += 1
    return True


def unscored_lines(totals: Totals) -> list[str]:
    lines = []
    for (route, reason), count in totals.unscored.most_common():
        where = (f"{count:,} record{'s' if count != 1 else ''} of route {printable(route or '(none)')} "
                 "passed on unscored")
        lines.append(f"{where}: {printable(reason)}" if reason else
                     f"{where} (no reason in the output: the shipper's log or the sidecar's names it)")
    return lines


def event_lines(totals: Totals) -> list[str]:
    if not totals.events:
        return []
    lines = [f"{totals.events:,} anomaly event{'s' if totals.events != 1 else ''}"
             + (f" (the last {len(totals.latest_events)}):" if totals.events > len(totals.latest_events) else ":")]
    for event in totals.latest_events:
        start = event.get("start")
        when = when_text(float(start)) if isinstance(start, (int, float)) else "(no time)"
        lines.append(f"  {when} {printable(event.get('model', ''))} {event['kind']}: "
                     f"{printable(event['explanation'])}")  # (the explanation names the key)
    if len(lines) == 2:
        return [lines[0].rstrip(":") + ": " + lines[1].strip()]
    return lines


def run_report(args) -> int:
    started = time.monotonic()

    def progress(lines: int) -> None:
        print(f"[report] {lines:,} lines read ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)

    if args.html:
        from .cli import check_writable, input_flags

        check_writable(args.html, "--html", input_flags("SCORED.jsonl", args.inputs))
    totals, groups = read_scored(args.inputs, args.entity, progress)
    print(text_summary(totals, groups, args.top))
    if args.html:
        try:
            with open(args.html, "w", encoding="utf-8") as out:
                out.write(html_report(totals, groups, args.top, args.inputs))
        except OSError as error:
            raise ConfigError(f"--html {args.html}: cannot write it ({error.strerror})") from None
        print(f"wrote {args.html}")
    return 0


def when_text(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def position_text(totals: Totals, low: int, high: int) -> str:
    """Where the records of ranks ``low`` to ``high`` on the position axis are: file and line."""
    placement = totals.placement
    first, last = (int(placement.positioned[rank]) for rank in (low, high))
    first_file, last_file = file_of(totals, first), file_of(totals, last)
    start = f"{printable(first_file.name)} line {totals.lines[first]:,}"
    if first_file is last_file:
        return start if first == last else f"{start} .. {totals.lines[last]:,}"
    return f"{start} .. {printable(last_file.name)} line {totals.lines[last]:,}"


def file_of(totals: Totals, record: int) -> InputFile:
    return next(file for file in totals.files if file.first <= record < file.end)


@dataclass
class GroupSpan:
    times: np.ndarray  # its members' times on the time axis (Placement)
    ranks: np.ndarray  # its members' ranks on the position axis


def group_spans(totals: Totals, shown: list) -> dict[int, GroupSpan]:
    """Per group shown (by number): where its members are on the report's two axes."""
    placement = totals.placement
    records = np.frombuffer(totals.anomaly_records, dtype=np.int64)
    numbers = np.frombuffer(totals.anomaly_groups, dtype=np.int64)
    spans = {}
    for group in shown:
        members = records[numbers == group.number]
        apart = placement.by_position[members]
        spans[group.number] = GroupSpan(placement.times[members[~apart]],
                                        np.searchsorted(placement.positioned, members[apart]))
    return spans


def span_text(totals: Totals, span: GroupSpan) -> str:
    """A group's first and last seen: in time, and (apart) by position for its members without a time."""
    parts = []
    if span.times.size:
        parts.append(f"{when_text(span.times.min())} .. {when_text(span.times.max())}")
    if span.ranks.size:
        where = position_text(totals, int(span.ranks.min()), int(span.ranks.max()))
        parts.append(f"and {span.ranks.size:,} without a time: {where}" if parts else where)
    return " ".join(parts)


def untimed_lines(totals: Totals) -> list[str]:
    placement = totals.placement
    lines = []
    if placement.placed:
        lines.append(f"{placement.placed:,} of {totals.records:,} records hold no time of their own (a time "
                     "field missing or unreadable, a line its parser could not read) in files that hold times: "
                     "each is placed at the time of the record before it in its file (before the file's first "
                     "time, at that time)")
    positioned = len(placement.positioned)
    if positioned:
        names = named_first([printable(f.name) for f in totals.files
                             if f.end > f.first and placement.by_position[f.first]], FILES_NAMED)
        # (`logscore score` output was told to fix a Fluentd output it did not come from)
        fix = ("`logscore score` writes no record unless asked, `logscore client` none: score with "
               "`logscore score --record`, and --explain 3 to group by the features named"
               if totals.bare >= positioned else
               "Fluentd's `<format> @type json` leaves the event time out: add `<inject> time_key time time_type "
               "string time_format %Y-%m-%dT%H:%M:%S%z </inject>` to the output, or keep out_file's default "
               "format; `logscore score` writes a line's time with --record only")
        lines.append(f"{positioned:,} of {totals.records:,} records hold no time, in files holding none ({names}): "
                     f"shown apart, by their file and line ({fix})")
    return lines


def text_summary(totals: Totals, groups: Groups, top: int) -> str:
    rate = totals.anomalies / totals.records
    lines = [f"{totals.records:,} scored records, {totals.anomalies:,} anomalies ({rate:.3%}) in "
             f"{len(groups.by_id):,} groups; {totals.suppressed:,} suppressed by feedback"
             + (f"; {totals.unreadable:,} lines not scored output (skipped)" if totals.unreadable else "")]
    if groups.dropped_groups:
        lines.append(f"more than {groups.max_groups:,} groups: the {groups.dropped_groups:,} smallest "
                     f"({groups.dropped_records:,} anomalies) are left out of the groups below")
    if totals.held:
        lines.append(f"{totals.held:,} records scored while their route learned its own model (note `learning`): "
                     "none of them flagged")
    lines += untimed_lines(totals)
    lines.append("models: " + ", ".join(f"{printable(m)} ({c:,})" for m, c in totals.models.most_common()))
    lines += flood_lines(totals)
    lines += unparsed_lines(totals)
    lines += unscored_lines(totals)
    lines += event_lines(totals)
    if totals.entities:
        lines.append("top entities: " + ", ".join(f"{printable(e)} ({c:,})"
                                                  for e, c in totals.entities.most_common(TOP_ENTITIES)))
    lines += daily_lines(totals)
    lines.append("")
    shown = groups.largest()[:top]
    spans = group_spans(totals, shown)
    for group in shown:
        entities = ", ".join(f"{printable(e)} ({c})" for e, c in group.entities.most_common(3))
        route = f" · {printable(group.route)}" if group.route else ""
        lines.append(f"{group.count:>8,}  {group.id}  {printable(group.model)}{route}  "
                     f"{span_text(totals, spans[group.number])}"
                     + (f"  entities: {entities}" if entities else ""))
        for name in group.names or ["(no explanation in the output: score with explanations to group by them)"]:
            lines.append(f"          {printable(name)}")
    return "\n".join(lines)


def daily_lines(totals: Totals) -> list[str]:
    """Records and anomalies per UTC day, where the records on the time axis span 2 to DAILY_MAX_DAYS
    days: the text told a week by its groups alone (a new section's flags from its day on, the day of
    an attack: only the HTML's timeline drew them)."""
    times, flags = time_axis(totals)
    if not len(times):
        return []
    start, end = chart_span(times)  # (a record of time 0 among a week's is no 56 years of days)
    near = (times >= start) & (times <= end)
    days = (times[near] // 86400).astype(np.int64)
    first = int(days.min())
    if not 1 <= int(days.max()) - first < DAILY_MAX_DAYS:
        return []
    records = np.bincount(days - first)
    anomalies = np.bincount(days - first, weights=flags[near])
    positioned = len(totals.placement.positioned)
    lines = ["per day (UTC" + (f"; not the {positioned:,} records of files holding no time):" if positioned else "):")]
    for offset, (count, flagged) in enumerate(zip(records.tolist(), anomalies.tolist())):
        day = time.strftime("%Y-%m-%d", time.gmtime((first + offset) * 86400))
        lines.append(f"  {day}  {count:>10,} records  {int(flagged):>8,} anomalies"
                     + (f" ({flagged / count:.2%})" if count else ""))
    return lines


def flood_lines(totals: Totals) -> list[str]:
    """A line per model and route flagging far more than any model is trained to: the output holds no
    model's target, so the rule is the sidecar's for any target under 1 % (a fifth of the records)."""
    lines = []
    for (model, route), records in totals.route_records.most_common():
        flagged = totals.route_anomalies[model, route]
        if is_flood(0.0, flagged, records):
            where = f" of route {printable(route)}" if route else ""
            lines.append(f"{printable(model)} flagged {flagged:,} of {records:,} records{where} "
                         f"({flagged / records:.1%}): "
                         f"unless an attack fills them, it is not a model of this log; train one on it "
                         f"(logscore train --input FILE --format FORMAT) and send "
                         f"{'this route' if route else 'them'} to it (--tag-routes, --default-model or the "
                         f"Fluentd filter's `model NAME`)")
    return lines


# NOTE: each record of another layout is noted "did not parse as FORMAT", but the report said only
# that the model flagged them all (a vhost_combined or HAProxy log under the access model).
def unparsed_lines(totals: Totals) -> list[str]:
    """A line per model and route where more than WARN_UNPARSED_SHARE of the records did not parse as the
    model's format."""
    lines = []
    for (model, route), unparsed in totals.route_unparsed.most_common():
        records = totals.route_records[model, route]
        if unparsed > WARN_UNPARSED_SHARE * records:
            where = f" of route {printable(route)}" if route else ""
            lines.append(f"{printable(model)}: {unparsed:,} of {records:,} records{where} ({unparsed / records:.1%}) "
                         f"did not parse as its format (note 'did not parse as ...'): they are another log's or "
                         f"another layout's; `logscore score` on a few of their lines says what they parse as "
                         f"(docs/converters.md: access log layouts)")
    return lines


def chart_span(times: np.ndarray) -> tuple[float, float]:
    """The span the charts cover: all the records' times, but where a few lie far out (a time field
    of 0, a wrong year), only the span of the rest; one such record put every other record of a
    week's log into a single one of the 60 bins."""
    ordered = np.sort(times)
    start, end = float(ordered[0]), float(ordered[-1])
    cut = max(1, int(len(ordered) * FAR_OUT_SHARE))
    if len(ordered) > 2 * cut + 1:
        # (records' own times, not an interpolated quantile: among 300, one of time 0 pulled that far out)
        core_low, core_high = float(ordered[cut]), float(ordered[-1 - cut])
        reach = max(core_high - core_low, 1.0) * FAR_OUT_STRETCH
        near = ordered[(ordered >= core_low - reach) & (ordered <= core_high + reach)]
        start, end = float(near[0]), float(near[-1])
    return start, end if end > start else start + 1


def time_axis(totals: Totals) -> tuple[np.ndarray, np.ndarray]:
    """The times and flags (0/1) of the records on the time axis."""
    on_time = ~totals.placement.by_position
    return totals.placement.times[on_time], np.frombuffer(totals.flags, dtype=np.int8)[on_time].astype(np.float64)


def position_axis(totals: Totals) -> tuple[np.ndarray, np.ndarray]:
    """The ranks and flags (0/1) of the records on the position axis."""
    positioned = totals.placement.positioned
    flags = np.frombuffer(totals.flags, dtype=np.int8)[positioned].astype(np.float64)
    return np.arange(len(positioned), dtype=np.float64), flags


def rate_timeline(times: np.ndarray, flags: np.ndarray) -> tuple[list[tuple[float, float]], float, float, int]:
    """The share of records flagged over the chart's span, the span, and how many records lie outside it."""
    start, end = chart_span(times)
    edges = np.linspace(start, end, TIMELINE_BINS + 1)
    counts, _ = np.histogram(times, edges)
    anomalies, _ = np.histogram(times, edges, weights=flags)
    rates = np.divide(anomalies, counts, out=np.zeros_like(anomalies), where=counts > 0)
    centres = (edges[:-1] + edges[1:]) / 2
    return list(zip(centres.tolist(), rates.tolist())), start, end, len(times) - int(counts.sum())


@dataclass
class ChartAxis:
    heading: str
    points: list  # (x, share of records flagged) per bin
    start: float
    end: float
    outside: int  # records left out of the charts: far outside the span (chart_span)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.start, self.end, TIMELINE_BINS + 1)


def chart_axes(totals: Totals) -> dict[str, ChartAxis]:
    """The charts' axes the records are on: "time", and "position" for files holding no time."""
    axes = {}
    times, flags = time_axis(totals)
    if len(times):
        axes["time"] = ChartAxis("Anomaly rate over time", *rate_timeline(times, flags))
    ranks, flags = position_axis(totals)
    if len(ranks):
        axes["position"] = ChartAxis("Anomaly rate by position (records of files holding no time, apart)",
                                     *rate_timeline(ranks, flags))
    return axes


def span_paragraph(totals: Totals, axes: dict[str, ChartAxis], inputs) -> str:
    parts = [html_text(", ".join(map(str, inputs)))]
    if "time" in axes:
        axis = axes["time"]
        parts.append(f"{when_text(axis.start)} .. {when_text(axis.end)}"
                     + (f"; {axis.outside:,} records lie far outside this span and are left out of the charts "
                        "(check their time fields: a time of 0 or a wrong year)" if axis.outside else ""))
    if "position" in axes:
        positioned = len(totals.placement.positioned)
        parts.append(f"{positioned:,} records without a time, charted apart by their position: "
                     f"{escape(position_text(totals, 0, positioned - 1))}")
    return f"<p class=muted>{'; '.join(parts)}</p>"


def group_sparkline(values: np.ndarray, axis: ChartAxis, label: str) -> str:
    counts, edges = np.histogram(values, axis.edges)
    points = list(zip(((edges[:-1] + edges[1:]) / 2).tolist(), counts.tolist()))
    return timeline(points, axis.start, axis.end, label=label)


def html_report(totals: Totals, groups: Groups, top: int, inputs) -> str:
    from .review import STYLE

    axes = chart_axes(totals)
    labels = [f"≤{edge:g}" for edge in SCORE_BUCKETS]
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>logscore report</title>"
             f"<style>{STYLE}</style></head><body><h1>logscore report</h1>",
             # (wrapped: a long line, an unscored route's reason, widened the whole page)
             f"<pre style='white-space:pre-wrap'>{escape(text_summary(totals, groups, 0))}</pre>",
             span_paragraph(totals, axes, inputs)]
    for name, axis in axes.items():
        parts += [f"<h2>{axis.heading}</h2>",
                  timeline(axis.points, axis.start, axis.end, width=900, height=160,
                           label=f"share of records flagged, by {name}", colour="#c0392b", as_rate=True)]
    parts += ["<h2>Score histogram</h2>",
              bars(labels, [int(c) for c in totals.histogram[:len(labels)]], width=700, title="scores"),
              f"<h2>Groups ({len(groups.by_id):,}; the {min(top, len(groups.by_id))} largest)</h2>"]
    shown = groups.largest()[:top]
    spans = group_spans(totals, shown)
    for group in shown:
        span = spans[group.number]
        entities = ", ".join(f"{html_text(e)} ({c:,})" for e, c in group.entities.most_common(TOP_ENTITIES))
        names = "".join(f"<li>{html_text(n)}</li>" for n in group.names) or "<li>(no explanation)</li>"
        sparklines = ""
        if "time" in axes:
            sparklines += group_sparkline(span.times, axes["time"], f"{group.id} over the whole report, by time")
        if "position" in axes:
            sparklines += group_sparkline(span.ranks, axes["position"],
                                          f"{group.id} over the whole report, by position")
        parts.append(f'<div class=group id="{group.id}"><div class=head><span class=count>{group.count:,}</span>'
                     f'<span><b>{html_text(group.model)}</b>'
                     f'{" · route " + html_text(group.route) if group.route else ""}'
                     f' · <span class=muted>seen {escape(span_text(totals, span))}</span>'
                     f'{"<br>top entities: " + entities if entities else ""}</span>{sparklines}'
                     f'</div><ul class=features>{names}</ul>{render_group_examples(group)}</div>')
    parts.append("</body></html>")
    return "".join(parts)
