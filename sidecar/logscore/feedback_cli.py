"""`logscore feedback add|list|remove`: feedback through a running sidecar (gRPC), which makes the
pattern with its model and writes it to its store (so every sidecar sharing the store applies it)."""

from __future__ import annotations

import argparse
import getpass
import json
import re
import time

from .errors import ConfigError, InvalidRequest

DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def add_feedback_command(commands) -> None:
    from .cli import add_connection_flags

    feedback = commands.add_parser("feedback", help="mark anomalies normal or keep (through a sidecar)",
                                   description="Feedback on anomalies, through a running sidecar: its model turns "
                                   "marked records into a pattern of what made them unusual; every sidecar sharing "
                                   "the feedback store applies it to later records at once.")
    actions = feedback.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="mark records, a review group or a field value",
                             description="Mark records (lines), a review group (--group, see /ui/) or a field "
                             "value (--field NAME=VALUE) normal (a false positive) or keep (a true anomaly).")
    add.add_argument("verdict", choices=["normal", "keep"])
    target = add.add_mutually_exclusive_group(required=True)
    target.add_argument("--line", nargs="+", action="extend", metavar="LINE",
                        help="log lines to mark (quote each; given again, adds lines)")
    target.add_argument("--file", metavar="FILE", help="a file of log lines to mark (at most 100; '-': stdin)")
    target.add_argument("--group", metavar="ID", help="a group of the review page (e.g. g3-5f0c2a)")
    target.add_argument("--field", metavar="NAME=VALUE", help="a field's value (e.g. user_agent=curl/8.0)")
    add.add_argument("--json-records", action="store_true", help="--line/--file hold JSON field maps")
    add.add_argument("--author", default=None, help="who gives the feedback (default: your login name)")
    add.add_argument("--reason", default="", help="why")
    add.add_argument("--model", default="", help="the model (default: the sidecar routes, as for scoring)")
    add.add_argument("--route", default="", help="only records sent with this tag")
    add.add_argument("--entity", default="", help="only records whose entity field (the sidecar's --entity-field) "
                     "holds this value")
    add.add_argument("--expires", metavar="WHEN", help="stop applying after a duration (30m, 12h, 7d, 2w) or at a "
                     "UTC date/time (2026-12-31 or 2026-12-31T18:00:00Z)")
    add_connection_flags(add, timeout=WRITE_TIMEOUT_S)
    add.set_defaults(run=run_feedback_add)

    listing = actions.add_parser("list", help="the feedback entries")
    listing.add_argument("--all", action="store_true", help="removed entries too")
    listing.add_argument("--json", action="store_true", help="one JSON object per entry")
    add_connection_flags(listing)
    listing.set_defaults(run=run_feedback_list)

    remove = actions.add_parser("remove", help="undo an entry by its id")
    remove.add_argument("id", type=entry_id, help="the entry's number (feedback list shows it)")
    remove.add_argument("--author", default=None, help="who undoes it (default: your login name)")
    add_connection_flags(remove, timeout=WRITE_TIMEOUT_S)
    remove.set_defaults(run=run_feedback_remove)


# A write's default --timeout: longer than the sidecar waits for its store, so that the sidecar's own
# answer (saved, or a 503 saying it was not) arrives first. With 10 s, SQLite's 10 s wait for another
# writer's lock, the caller always got a bare DEADLINE_EXCEEDED, and the mark was often saved. A write
# waits on the store twice (the write, then the reload that applies it): 2 x PostgreSQL's 8 s call
# deadline, or SQLite's 10 s lock wait and a read, plus room for making the pattern.
WRITE_TIMEOUT_S = 30.0
# What a write the caller stopped waiting for may have done, by RPC
UNCONFIRMED = {
    "Feedback": "the mark may have been saved all the same: see whether it was with `logscore feedback list` "
                "before running the same command again (a mark made again with the same expiry makes no second "
                "entry, but with --expires a duration such as 7d, run a minute later it asks another expiry: a "
                "second entry)",
    "DeleteFeedback": "the entry may have been removed all the same: see whether it was with `logscore feedback "
                      "list --all`, or run the same command again (one already removed says so)",
}


STORE_DOWN = "feedback store "  # how the sidecar's StoreUnavailable answers begin (feedback_store.py)


def entry_id(text: str) -> int:
    """An entry's number as argparse takes it (a clear error, not a traceback, for what is none)."""
    from .feedback_store import LIST_FEEDBACK, entry_number

    try:
        return entry_number(text)
    except InvalidRequest as error:
        raise argparse.ArgumentTypeError(str(error).replace(LIST_FEEDBACK, "feedback list shows them")) from None


def expiry(text: str, now: float) -> float:
    """Unix seconds from a duration (7d) or a UTC date/time."""
    from .servers.feedback_http import parse_expiry

    match = DURATION.match(text.strip())
    if match:
        return now + float(match.group(1)) * UNITS[match.group(2)]
    try:
        return parse_expiry(text)
    except Exception:
        raise ConfigError(f"--expires {text!r}: give a duration (30m, 12h, 7d, 2w) or a UTC date such as "
                          "2026-12-31") from None


def login() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "cli"


def call(args, method: str, request):
    """One gRPC call to the sidecar; a clear one-line error when it fails."""
    import grpc

    from .cli import client_channel
    from .generated.logscore.v1 import scorer_pb2_grpc as pb_grpc

    target = args.tcp or f"unix:{args.socket}"
    channel, metadata = client_channel(args, target)
    with channel:
        try:
            return getattr(pb_grpc.ScorerStub(channel), method)(request, timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise ConfigError(failure(target, method, error, args.timeout)) from None


def failure(target: str, method: str, error, timeout: float) -> str:
    """A failed feedback call in one line, saying what it means for the change asked and what to do."""
    import grpc

    from .cli import MESSAGE_TOO_LARGE, call_failure

    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and method in UNCONFIRMED:
        return (f"{target}: no answer within --timeout {timeout:g} s (DEADLINE_EXCEEDED); {UNCONFIRMED[method]}; "
                "a slow store (its log says so) may need a longer --timeout")
    said = call_failure(target, error)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and MESSAGE_TOO_LARGE in details and method == "Feedback":
        return (f"{said}: the mark is larger than the sidecar takes in one message; mark fewer or shorter lines "
                "(split the file: a review group, --group, covers more), or raise the sidecar's max_message_bytes")
    if code == grpc.StatusCode.UNAVAILABLE and details.startswith(STORE_DOWN) and method == "ListFeedback":
        # (the sidecar answered: its store is down; the list is read from the store, never from memory.
        # Not another UNAVAILABLE: a sidecar shutting down, or none reached)
        return (f"{said}; meanwhile the sidecar applies the entries it last loaded (its /readyz `feedback` "
                "says how many)")
    return said


def run_feedback_add(args) -> int:
    from .cli import fill_records
    from .generated.logscore.v1 import scorer_pb2 as pb
    from .inputs import json_record

    request = pb.FeedbackRequest(verdict=pb.NORMAL if args.verdict == "normal" else pb.KEEP,
                                 author=args.author or login(), reason=args.reason, model=args.model,
                                 route=args.route, entity=args.entity,
                                 expires_at=expiry(args.expires, time.time()) if args.expires else 0.0)
    if args.group:
        request.group = args.group
    elif args.field:
        name, equals, value = args.field.partition("=")
        if not equals or not name:
            raise ConfigError(f"--field {args.field!r}: give NAME=VALUE, e.g. user_agent=curl/8.0")
        request.field.field, request.field.value = name, value
    else:
        if args.line:
            records = [json_record(line) for line in args.line] if args.json_records else list(args.line)
        else:
            records = file_records(args.file, args.json_records)
        fill_records(request, records, args.json_records)
    entry = call(args, "Feedback", request)
    print(f"already marked: {describe(entry)}" if entry.existing else describe(entry))
    return 0


def file_records(path: str, json_records: bool) -> list:
    """The lines of --file, read no further than the most a mark takes (a log of millions of lines
    given by mistake was read whole into memory, then refused)."""
    from itertools import islice

    from .feedback_store import MAX_MARKED_RECORDS
    from .inputs import read_json_records, read_lines

    records = list(islice((read_json_records if json_records else read_lines)([path]), MAX_MARKED_RECORDS + 1))
    if not records:
        raise ConfigError(f"--file {path}: it holds no lines to mark")
    if len(records) > MAX_MARKED_RECORDS:
        raise ConfigError(f"--file {path}: it holds more than {MAX_MARKED_RECORDS} lines; mark at most "
                          f"{MAX_MARKED_RECORDS} (the unusual ones: a review group, --group, covers more)")
    return records


def run_feedback_list(args) -> int:
    from .generated.logscore.v1 import scorer_pb2 as pb

    after, listed = 0, 0
    while True:  # a page at a time: 10,000 entries outgrow a gRPC message (max_message_bytes)
        response = call(args, "ListFeedback", pb.ListFeedbackRequest(include_removed=args.all, after_id=after,
                                                                     limit=LIST_PAGE))
        for entry in response.entries:
            print(json.dumps(as_json(entry)) if args.json else describe(entry))
        listed += len(response.entries)
        after = response.next_after_id
        if not after:
            break
    if not listed and not args.json:
        print(f"no feedback entries in {response.store}")
    return 0


LIST_PAGE = 1000  # entries a `feedback list` call asks for at once


def run_feedback_remove(args) -> int:
    from .generated.logscore.v1 import scorer_pb2 as pb

    entry = call(args, "DeleteFeedback", pb.DeleteFeedbackRequest(id=args.id, author=args.author or login()))
    print(f"removed {describe(entry)}")
    return 0


def as_json(entry) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(entry, preserving_proto_field_name=True)


def expiry_word(expires_at: float) -> str:
    """'expired' once past (the entry no longer applies, though listed until removed), else 'expires'."""
    return "expired" if expires_at <= time.time() else "expires"


def describe(entry) -> str:
    from .feedback import iso_time
    from .shown import printable
    from .generated.logscore.v1 import scorer_pb2 as pb

    verdict = pb.Verdict.Name(entry.verdict).lower()
    if entry.HasField("field"):
        pattern = f"{entry.field.field} = {entry.field.value!r}"
    else:
        pattern = "; ".join(entry.features[:3]) + f" ({entry.feature_count} features)"
    scope = ", ".join(f"{k} {getattr(entry, k)}" for k in ("model", "route", "entity") if getattr(entry, k)) or "all"
    state = f"removed by {entry.removed_by} {iso_time(entry.removed_at)}" if entry.removed_at else (
        f"{expiry_word(entry.expires_at)} {iso_time(entry.expires_at)}" if entry.expires_at else "no expiry")
    reason = f" ({entry.reason})" if entry.reason else ""
    cut = (f"; cut to fit the sidecar's max_message_bytes (GET /v1/feedback?after={entry.id - 1}&limit=1&all=1 shows "
           "it whole)" if entry.cut else "")
    return printable(f"#{entry.id} {verdict} [{scope}] {pattern}; by {entry.author} {iso_time(entry.created_at)}"
                     f"{reason}; {state}{cut}")
