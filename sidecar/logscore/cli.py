"""``logscore``: the one command-line entry point.

    logscore train    learn normal traffic from log files, export one ONNX model
    logscore score    score log lines offline with a model (JSON lines out)
    logscore inspect  show what a model file holds
    logscore evaluate measure a model on labeled data (ROC-AUC, TPR at low FPR, F1, per type)
    logscore serve    run the sidecar (gRPC + HTTP) on a directory of models
    logscore client   send log lines to a running sidecar and print the scores
    logscore feedback mark anomalies normal or keep, list and undo feedback (through a sidecar)
    logscore report   groups, timelines and histograms of scored output (text and HTML)
"""

from __future__ import annotations

import signal
import sys

if sys.argv[1:2] == ["serve"]:
    # NOTE: first of all: a SIGHUP (a reload) while the sidecar starts would end the process
    # before its handler is in place. Ignored until then: the start loads the newest models anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

import argparse  # noqa: E402 (after the guard above)
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from itertools import islice
from typing import Iterator, NamedTuple, Optional, Sequence

from .errors import ConfigError, LogscoreError
from .inputs import NumberedRecord, numbered_records, read_json_records, read_lines, sendable
from .records import DEFAULT_MAX_LINE_CHARS
from .timestamps import read_zoneless_in


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args) or 0
    except LogscoreError as error:
        print(f"logscore {args.command}: error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `logscore score ... | head`
        return 0
    except KeyboardInterrupt:  # Ctrl-C: said in a line, not a traceback (train writes a model whole or not at all)
        print(f"logscore {args.command}: interrupted", file=sys.stderr)
        return 130


class CommandParser(argparse.ArgumentParser):
    """The parser of `logscore` and of each of its commands (add_subparsers makes theirs of this class).

    An unknown flag is refused by the command that was given it, with that command's usage and the
    flag it most resembles: argparse let it rise to `logscore` itself, whose usage names no flag of
    any command (`logscore serve --model-dir models` got `usage: logscore [-h] COMMAND ...`)."""

    def parse_known_args(self, args=None, namespace=None):
        if self._subparsers is None:  # a command's own parser: its flags are all it takes
            # (before argparse's checks: `train --inptu F` was told only that --input is required)
            unknown = [flag for flag in self.flags(sys.argv[1:] if args is None else args)
                       if not any(option.startswith(flag) for option in self.options())]
            if unknown:
                self.error(f"unrecognized arguments: {' '.join(unknown)}{self.suggestion(unknown)}")
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{self.suggestion(extras)}")
        return namespace, extras

    @staticmethod
    def flags(args: Sequence[str]) -> list[str]:
        """The long flags among ``args`` (without an ``=value``), up to a ``--`` ending them. One holding
        a space is a value, as argparse reads it (login's syslog lines start "-- root[2421]:")."""
        found = []
        for arg in args:
            if arg == "--":
                break
            if arg.startswith("--") and " " not in arg:
                found.append(arg.split("=", 1)[0])
        return found

    def options(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings]

    def suggestion(self, extras: Sequence[str]) -> str:
        """'; did you mean --models-dir?' for the first unknown flag close to one of this parser's
        (as a mistyped setting's name is: settings.likely_meant)."""
        from .settings import likely_meant

        for flag in self.flags(extras):
            meant = likely_meant(flag, self.options())
            if meant:
                return f"; did you mean {meant}?"
        return ""


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="logscore", description="Anomaly scores for log records.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="learn normal traffic and export one ONNX model",
                                description="Learn normal traffic from log files (normal records only) "
                                "and export a self-describing ONNX model.")
    train.add_argument("--input", "-i", nargs="+", action="extend", required=True, metavar="FILE",
                       help="log files (plain or gzip; zstd, xz, bzip2: decompress into '-'); '-' reads stdin; given "
                       "again, adds files")
    train.add_argument("--format", "-f", default="access", choices=["access", "syslog", "jsonl", "plain"],
                       help="how to parse lines (default: access = Apache/nginx combined/common)")
    train.add_argument("--config", "-c", metavar="FILE",
                       help="converter config (YAML/JSON) naming fields and converters; "
                       "default: the built-in one for --format (see docs/converters.md)")
    train.add_argument("--session-key", metavar="REGEX", type=session_key,
                       help="learn sessions: records sharing this regex's match (e.g. 'blk_-?\\d+') form one "
                       "sequence of events; the sidecar then scores each record as its session so far")
    train.add_argument("--session-field", default="message",
                       help="field holding the text of field-map records, for --session-key (default message)")
    train.add_argument("--detectors", "-d", default="rarity",
                       help="comma-separated detectors: rarity, isolation_forest, pca, autoencoder, som, "
                       "lof; several make an ensemble (default: rarity)")
    train.add_argument("--max-records", type=int, default=1_000_000,
                       help="train on all records, or a uniform sample of at most this many (default 1000000)")
    train.add_argument("--target-fpr", type=finite_number, default=0.001,
                       help="fraction of normal records allowed above the threshold (default 0.001)")
    train.add_argument("--threshold-rule", choices=["fpr", "sigma"], default="fpr",
                       help="fpr: from --target-fpr; sigma: mean + k·σ of calibrated scores")
    train.add_argument("--sigma", type=finite_number, default=3.0, help="k for --threshold-rule sigma (default 3)")
    train.add_argument("--folds", type=int, default=5, help="cross-fitting folds for calibration (default 5)")
    train.add_argument("--support", type=finite_number,
                       help="a feature seen in this many records counts as fully normal "
                       "(default: max(5, 0.05%% of records))")
    train.add_argument("--name", help="model name (default: --previous-model's, else the output file's stem)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", "-o", required=True, metavar="FILE.onnx", help="where to write the model")
    add_robustness_flags(train)
    add_behaviour_flags(train)
    train.set_defaults(run=run_train)

    score = commands.add_parser("score", help="score log lines offline (JSON lines out)",
                                description="Score log lines with a model; one JSON object per line out.")
    score.add_argument("--model", "-m", required=True, metavar="FILE.onnx")
    score.add_argument("inputs", nargs="*", default=["-"], metavar="FILE",
                       help="log files (plain or gzip); default stdin")
    score.add_argument("--json-records", action="store_true",
                       help="each input line is a JSON field map (as a shipper sends), not a raw line; "
                       "lines of Fluentd's out_file and Fluent Bit's file output give their records")
    score.add_argument("--explain", type=int, default=0, metavar="K",
                       help="name the K features that made each record unusual")
    score.add_argument("--only-anomalies", action="store_true", help="print only records over the threshold")
    score.add_argument("--record", action="store_true", help="add each record to its output line (`logscore "
                       "report` then shows examples, entities and times)")
    score.add_argument("--batch", type=count_of_records, default=1000, metavar="N",
                       help="records per batch, at least 1 (default 1000)")
    score.add_argument("--max-record-bytes", type=int, default=DEFAULT_MAX_LINE_CHARS, metavar="N",
                       help="cut a longer raw line before parsing, noted `truncated` (the sidecar's setting of the "
                       f"same name; default {DEFAULT_MAX_LINE_CHARS})")
    score.set_defaults(run=run_score)

    inspect = commands.add_parser("inspect", help="show a model's metadata",
                                  description="Show what a model file holds: featurizer, detectors, "
                                  "calibration, training summary.")
    inspect.add_argument("model", metavar="FILE.onnx")
    inspect.add_argument("--json", action="store_true", help="the full metadata as JSON")
    inspect.set_defaults(run=run_inspect)

    evaluate = commands.add_parser(
        "evaluate", help="measure a model on labeled data",
        description="Score labeled records and report ROC-AUC, PR-AUC, TPR at FPR 1 % and 0.1 %, "
        "precision/recall/F1 at the model's threshold and at the best one, confusion counts and recall "
        "per attack type; optionally per session, as JSON and PNG plots.")
    evaluate.add_argument("--model", "-m", metavar="FILE.onnx", help="the model to evaluate (or --train)")
    # NOTE: action="extend" on every flag taking several files: a flag given twice kept its last files only
    # (`train -i access.log -i a500.log` trained on 500 lines, without a word)
    evaluate.add_argument("--normal", nargs="+", action="extend", default=[], metavar="FILE",
                          help="files of normal lines (given again, adds files)")
    evaluate.add_argument("--anomalous", nargs="+", action="extend", default=[], metavar="FILE",
                          help="files of anomalous lines (given again, adds files)")
    evaluate.add_argument("--labeled", metavar="FILE", help="CSV (a name ending in .csv or .csv.gz, in any case) "
                          "or JSON lines with a label column; the other columns are the record's fields. Rows that "
                          "do not parse are left out with a warning; more than 1 %% of them is refused")
    evaluate.add_argument("--label-column", default="label")
    evaluate.add_argument("--anomalous-values", default="anomalous,anomaly,1,true,attack",
                          help="label values that mean anomalous (case-insensitive; comma-separated)")
    evaluate.add_argument("--type-column", help="column naming the attack type, for recall per type (one no row "
                          "holds is refused)")
    evaluate.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE", type=column_value,
                          help="keep only rows where COLUMN equals VALUE (e.g. split=test); a COLUMN no row holds, or "
                          "a --where leaving no row, is refused naming the columns and values the rows hold")
    evaluate.add_argument("--session-key", metavar="REGEX", type=session_key,
                          help="evaluate per session: records grouped by this regex's first match, whole, in the "
                          "text train and the sidecar read (a field map's session field, else message; e.g. "
                          "'blk_-?\\d+'; an empty match is no session); a session scores its most anomalous record")
    evaluate.add_argument("--session-labels", metavar="FILE.csv",
                          help="CSV of session id, label (else a session is anomalous if any record is)")
    evaluate.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    evaluate.add_argument("--plots", metavar="PREFIX", help="write PREFIX_histogram.png and PREFIX_roc.png "
                          "(needs matplotlib)")
    evaluate.add_argument("--batch", type=count_of_records, default=2048, metavar="N",
                          help="records scored at a time (default 2048)")
    add_evaluation_training_flags(evaluate)
    add_series_flags(evaluate)
    evaluate.set_defaults(run=run_evaluate)

    serve = commands.add_parser("serve", help="run the sidecar",
                                description="Serve the models of a directory over gRPC (Unix socket and/or "
                                "TCP) and HTTP. Settings: flags > LOGSCORE_* environment > --config YAML > "
                                "defaults (docs/operations.md).")
    serve.add_argument("--config", metavar="FILE.yaml", help="settings file")
    add_settings_flags(serve)
    serve.set_defaults(run=run_serve)

    client = commands.add_parser("client", help="score lines through a running sidecar",
                                 description="Send log lines (or JSON field maps) to a sidecar over gRPC "
                                 "and print one JSON object per line.")
    client.add_argument("inputs", nargs="*", default=["-"], metavar="FILE")
    client.add_argument("--model", default="", help="model name (default: the sidecar routes)")
    client.add_argument("--tag", default="", help="tag for the sidecar's tag routes")
    client.add_argument("--json-records", action="store_true", help="input lines are JSON field maps (or "
                        "Fluentd out_file / Fluent Bit file output lines, their records)")
    client.add_argument("--explain", type=int, default=0, metavar="K")
    client.add_argument("--batch", type=count_of_records, default=1000, metavar="N",
                        help="records per call, at least 1 (fewer when they would pass 1 MiB: the sidecar takes "
                        "2 MiB; a call refused for its size (max_message_bytes, or max_inflight_bytes once "
                        "decoded) is sent again in halves, and a record too large alone is printed unscored with a "
                        "note)")
    client.add_argument("--max-record-bytes", type=int, default=DEFAULT_MAX_LINE_CHARS, metavar="N",
                        help="the sidecar's setting of the same name: longer lines are sent cut just past it "
                             "(the sidecar cuts and notes them; one it would keep whole, its own limit being "
                             "higher, is noted `truncated` by the client); default %(default)s")
    add_connection_flags(client)
    client.set_defaults(run=run_client)

    from .feedback_cli import add_feedback_command
    from .report import add_report_command

    add_feedback_command(commands)
    add_report_command(commands)
    return parser


def column_value(text: str) -> tuple[str, str]:
    """evaluate's --where COLUMN=VALUE, as (column, value); argparse says what is wrong with another."""
    column, equals, value = text.partition("=")
    if not equals or not column:
        raise argparse.ArgumentTypeError(f"{text!r}: give COLUMN=VALUE, e.g. split=test")
    return column, value


def whole_number(minimum: int, unit: str):
    """An argparse type: a whole number of ``unit``, at least ``minimum`` (--batch, report's --top).
    NOTE: evaluate --batch 0 died in range(), -1 in concatenate; score and client took 0 or -3 as 1
    without a word; report --top -1 showed every group but the last (probes, review)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of {unit}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: give at least {minimum}")
        return value

    return parse


count_of_records = whole_number(1, "records")


def session_key(text: str) -> str:
    """A --session-key, checked before any record is read: a regular expression that matches no empty
    text (one that does gives every record lacking the key one session, keyed '').
    NOTE: evaluate compiled it only after scoring every record, and died of re.error (probe)."""
    import re

    try:
        pattern = re.compile(text)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"'{text}' is not a regular expression ({error}); give one matching the "
                                         "session's id, e.g. 'blk_-?\\d+'") from None
    if pattern.search("") is not None:
        raise argparse.ArgumentTypeError(f"'{text}' matches an empty text, which would make one session of every "
                                         "record without a key; give one matching the id itself, e.g. 'blk_-?\\d+'")
    return text


def finite_number(text: str) -> float:
    """A number flag's value, nan and inf refused. NOTE: float() takes them, and they passed the range
    checks (`nan <= 0` is false): --window-s nan ended in a traceback after the record model was
    trained, --half-life-s nan wrote a client detector scoring every client 0 (probe)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return value


def positive_number(text: str) -> float:
    """A number flag's value that must be finite and above 0 (seconds: a window, a half-life, a timeout)."""
    value = finite_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number above 0")
    return value


# NOTE: gRPC takes a deadline of 1e10 s or more as already past: `client --timeout 1e10`, typed to mean no
# limit, failed every call at once with DEADLINE_EXCEEDED (review, session 27).
MAX_CALL_TIMEOUT_S = 1e6


def call_timeout(text: str) -> float:
    """A --timeout: above 0 and at most MAX_CALL_TIMEOUT_S."""
    value = positive_number(text)
    if value > MAX_CALL_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"{text!r}: give at most {MAX_CALL_TIMEOUT_S:,.0f} seconds (gRPC takes "
                                         "a longer deadline as already past); there is no setting for none")
    return value


def add_connection_flags(parser: argparse.ArgumentParser, timeout: float = 10.0) -> None:
    """How a command reaches a running sidecar over gRPC (client, feedback); ``timeout``: --timeout's default."""
    parser.add_argument("--socket", default="/tmp/logscore.sock", help="sidecar Unix socket")
    parser.add_argument("--tcp", help="host:port instead of the socket")
    parser.add_argument("--timeout", type=call_timeout, default=timeout,
                        help=f"seconds per call, above 0 and at most {MAX_CALL_TIMEOUT_S:,.0f} (about 11 days); "
                        f"default {timeout:g}")
    parser.add_argument("--token-file", metavar="FILE", help="file holding the sidecar's bearer token "
                        "(its --token-file)")
    parser.add_argument("--tls-ca", metavar="FILE", help="PEM CA bundle to trust: TLS to --tcp")
    parser.add_argument("--tls-cert", metavar="FILE", help="PEM client certificate for mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")


def add_robustness_flags(parser: argparse.ArgumentParser) -> None:
    """Training flags of issue #11: input as field maps, contamination screening, the learner's route."""
    parser.add_argument("--json-records", action="store_true",
                        help="each input line is a JSON field map (as a shipper sends), not a raw line; "
                       "lines of Fluentd's out_file and Fluent Bit's file output give their records")
    parser.add_argument("--keep-outliers", action="store_true",
                        help="learn every record as normal; by default records that stand far above the rest "
                        "(attacks in the training data) are set aside and listed by `logscore inspect`")
    parser.add_argument("--injection-share", type=finite_number, metavar="FRACTION",
                        help="the injection prior: a request feature holding a quote, <, >, `, |, \\, .., --, "
                        "/*, ${ or a NUL counts as the site's own only when this share of the records holds it; "
                        "records holding one seen less often are set aside as screening sets attacks aside (a "
                        "payload family in a few percent of the log stays unseen); 0 turns it off, as "
                        "--keep-outliers does (default 0.01)")
    parser.add_argument("--learned-route", metavar="ROUTE", help=argparse.SUPPRESS)  # set by the sidecar's learner
    parser.add_argument("--learner-pid", type=int, help=argparse.SUPPRESS)  # the sidecar that started this training
    parser.add_argument("--feedback", metavar="STORE",
                        help="fold in operators' feedback (a SQLite file or postgresql:// URL, as the sidecar's "
                        "--feedback-store; 'env' reads it from LOGSCORE_FEEDBACK_STORE, keeping a password out of "
                        "the process list): records marked normal are learned as normal, records marked keep are "
                        "left out and must be flagged by the new model")
    parser.add_argument("--previous-model", metavar="MODEL",
                        help="the model this one replaces (the one serving now): records it flags, after the "
                        "--feedback rules, are left out (flags nobody marked normal are not learned as normal); "
                        "ignored, with a warning, if it flags more than a tenth of the records")


def robustness_options(args) -> dict:
    """TrainOptions of add_robustness_flags' screening flags (unset ones keep TrainOptions' defaults)."""
    options = {"set_aside": not args.keep_outliers}
    if args.injection_share is not None:
        options["injection_share"] = args.injection_share
    return options


def add_behaviour_flags(parser: argparse.ArgumentParser) -> None:
    """Training flags of issue #15: window forecasters and the client detector (learned from timestamps)."""
    group = parser.add_argument_group("behaviour over time (learned from the records' timestamps)")
    group.add_argument("--windows", action="store_true",
                       help="learn a forecaster per key (route, status class, host, level, URL and message "
                       "template) of counts per window; the sidecar reports improbable windows as events")
    group.add_argument("--window-s", type=positive_number, default=60.0, metavar="SECONDS",
                       help="window length (default 60)")
    group.add_argument("--window-max-keys", type=int, default=500, metavar="N",
                       help="keys learned at most, the busiest first (default 500)")
    group.add_argument("--window-target-fpr", type=finite_number, default=1e-4, metavar="FRACTION",
                       help="share of normal key-windows allowed over the threshold (default 0.0001)")
    group.add_argument("--entities", action="store_true",
                       help="learn normal clients' behaviour (rate, errors, distinct paths, novelty, mean score); "
                       "the sidecar adds entity_score to each record and reports clients crossing the threshold")
    group.add_argument("--entity-key", default="remote_addr", metavar="FIELD",
                       help="the field naming a client (default remote_addr)")
    group.add_argument("--half-life-s", type=positive_number, default=60.0, metavar="SECONDS",
                       help="how fast a client's features forget (default 60)")
    group.add_argument("--client-target-fpr", type=finite_number, default=0.005, metavar="FRACTION",
                       help="share of normal clients allowed to cross the threshold (default 0.005)")
    group.add_argument("--base", metavar="MODEL.onnx",
                       help="keep this model's record detector and learn only --windows/--entities into --out")
    group.add_argument("--behaviour-from", metavar="MODEL.onnx",
                       help="keep this model's window forecasters and client detector as they were trained and "
                       "learn only the record model from --input (the sidecar's --learn does: a window of recent "
                       "records cannot teach seasonality)")
    group.add_argument("--time-zone", default="local", metavar="ZONE",
                       help="zone of timestamps written without one (syslog's, ISO 8601 without an offset), "
                       "and whose wall clock the windows' hours of day follow: 'local' (this machine's, the "
                       "default), 'UTC', or a name such as Europe/Berlin; give the zone of the hosts that wrote "
                       "the logs, as their sidecars' --time-zone")


def behaviour_options(args):
    """The behaviour options of `logscore train`, or None when neither --windows nor --entities is asked."""
    from .errors import ConfigError

    if args.behaviour_from and (args.windows or args.entities or args.base):
        raise ConfigError("--behaviour-from keeps a model's windows and clients, --windows/--entities learn them "
                          "and --base keeps a record model: give --behaviour-from alone")
    if not (args.windows or args.entities):
        if args.base:
            raise ConfigError("--base learns behaviour onto a model: add --windows and/or --entities")
        return None
    if args.window_max_keys < 1:  # (--window-s and --half-life-s: positive_number)
        raise ConfigError(f"--window-max-keys {args.window_max_keys}: give at least 1")
    if not (0 < args.window_target_fpr < 0.5 and 0 < args.client_target_fpr < 0.5):
        raise ConfigError("--window-target-fpr and --client-target-fpr must be fractions between 0 and 0.5")
    from .timestamps import SEASONS_UTC
    from .training.behaviour import BehaviourOptions

    return BehaviourOptions(windows=args.windows, window_s=args.window_s, max_keys=args.window_max_keys,
                            window_target_fpr=args.window_target_fpr, entities=args.entities,
                            entity_key=args.entity_key, half_life_s=args.half_life_s,
                            client_target_fpr=args.client_target_fpr,
                            season_zone=seasons_of(args.time_zone) if args.windows else SEASONS_UTC)


def seasons_of(time_zone: str) -> str:
    """The zone whose wall clock the windows learn hours in: --time-zone's (the sites' zone); UTC, said
    so, when 'local' is a zone without a name zoneinfo loads."""
    from .timestamps import SEASONS_UTC, season_zone_name

    name = season_zone_name(time_zone)
    if name is None:
        print_warning("this machine's time zone has no IANA name (TZ is a POSIX rule?): windows learn hours of day "
                      "on UTC, and a daylight-saving change moves their pattern an hour; give --time-zone "
                      "Europe/Berlin (the sites' zone)")
        return SEASONS_UTC
    return name


def behaviour_source(path: str, spec: dict):
    """The artifact whose windows and clients --behaviour-from keeps, checked before any training."""
    from .artifact import read_artifact
    from .training.behaviour import check_behaviour_source

    artifact = read_artifact(path)
    check_behaviour_source(artifact.metadata, spec)
    return artifact


def base_model(path: str):
    """(ModelProto, metadata) of an existing model, for --base."""
    import onnx

    from .artifact import read_artifact

    artifact = read_artifact(path)
    return onnx.ModelProto.FromString(artifact.model_bytes), dict(artifact.metadata)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; unset flags fall through to env, file and defaults."""
    from dataclasses import MISSING, fields

    from .settings import Settings

    for spec in fields(Settings):
        flag = "--" + spec.name.replace("_", "-")
        default = spec.default if spec.default is not MISSING else None
        text = spec.metadata.get("help", "")
        if default not in (None, ""):
            text += f" (default: {default})"
        switch = {"nargs": "?", "const": "true"} if spec.type in (bool, "bool") else {}  # `--learn` = true
        parser.add_argument(flag, dest=f"setting_{spec.name}", default=None, metavar=setting_metavar(spec.name),
                            help=text.replace("%", "%%"), **switch)


def setting_metavar(name: str) -> str:
    """What a setting's flag takes, from its name (serve --help)."""
    if name in ("tcp", "http", "forward", "forward_to"):
        return "HOST:PORT"
    named = {"forward_when_busy": "wait|pass", "learn": "true|false", "learn_window": "N", "windows": "true|false",
             "window_max_keys": "N", "entity_max_clients": "N", "anomaly_recent": "N", "anomaly_watcher_queue": "N",
             "forward_events_tag": "TAG", "entity_key": "FIELD", "learn_max_routes": "N",
             "learn_max_flag_ratio": "RATIO", "learn_max_first_flagged": "FRACTION",
             "feedback_store": "PATH|postgresql://...", "scoring_processes": "N",
             "max_connections": "N", "max_grpc_calls": "N", "max_grpc_connections": "N", "time_zone": "ZONE",
             "forward_explain": "N",
             "review_inspect_per_s": "N"}  # a rate, not a duration (its name ends in _s)
    if name in named:
        return named[name]
    by_suffix = (("_dir", "DIR"), ("_file", "FILE"), ("_cert", "FILE"), ("_key", "FILE"), ("_ca", "FILE"),
                 ("_ms", "MS"), ("_s", "SECONDS"), ("_bytes", "BYTES"), ("_records", "N"), ("_request", "N"),
                 ("_mode", "MODE"), ("_level", "LEVEL"), ("_model", "NAME"), ("_field", "FIELD"),
                 ("_routes", "GLOB=MODEL,..."), ("_entries", "N"))
    for suffix, metavar in by_suffix:
        if name.endswith(suffix):
            return metavar
    return "PATH" if name == "socket" else "VALUE"


def run_serve(args) -> int:
    from .serve import main as serve_main
    from .settings import Settings

    flags = {k[len("setting_"):]: v for k, v in vars(args).items() if k.startswith("setting_")}
    return serve_main(Settings.load(args.config, flags))


def run_client(args) -> int:
    import grpc

    from .generated.logscore.v1 import scorer_pb2_grpc as pb_grpc

    check_scoring_flags(args)
    target = args.tcp or f"unix:{args.socket}"
    channel, metadata = client_channel(args, target)
    limit, several = args.max_record_bytes, len(args.inputs) > 1
    records = (cut_past(numbered, limit) for numbered in numbered_records(args.inputs, args.json_records))
    tally, unscored = RecordTally(), 0
    with channel:
        stub = pb_grpc.ScorerStub(channel)
        call = ScoreCall(stub, args, metadata)
        for chunk in batched(records, records_per_call(args.batch, args.explain), CLIENT_CALL_BYTES,
                             measure=lambda cut: record_chars(cut.record)):
            printed = 0
            try:
                for part, response in call.in_parts(chunk):
                    unscored += print_scored(part, response, several, limit, tally, args.model)
                    printed += len(part)
            except grpc.RpcError as error:
                print(f"logscore client: {call_failure(target, error)}; {not_scored_from(chunk[printed].numbered)}",
                      file=sys.stderr)
                return 1
        warn_of_floods(stub, metadata, args.timeout, tally)
    tally.warn_unparsed("client")
    if unscored:
        print(f"logscore client: warning: {unscored:,} record{'s' if unscored != 1 else ''} larger than the "
              "sidecar takes printed unscored (\"unscored\": true; the note says what to do)", file=sys.stderr,
              flush=True)
    return 0


# gRPC's words for a message past the receiver's limit: "Received message larger than max (2500091 vs. 2097152)"
MESSAGE_TOO_LARGE = "larger than max"


def too_large(error) -> bool:
    """Whether the sidecar refused a call for its size: past max_message_bytes (gRPC's own refusal), or
    alone over max_inflight_bytes once decoded (many values: its admission's)."""
    import grpc

    from .admission import ALONE_OVER_LIMIT

    details = error.details() or ""
    return ((error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and MESSAGE_TOO_LARGE in details)
            or (error.code() == grpc.StatusCode.INVALID_ARGUMENT and ALONE_OVER_LIMIT in details))


class ScoreCall:
    """`logscore client`'s Score calls. NOTE: one record larger than the sidecar's max_message_bytes
    failed its whole call with RESOURCE_EXHAUSTED, and the client stopped there: every record from
    that batch on was lost (probe). A call refused as too large is sent again in halves; a record
    too large alone is given back unscored, to be printed with a note saying what to do."""

    def __init__(self, stub, args, metadata: list):
        self.stub, self.args, self.metadata = stub, args, metadata

    def in_parts(self, chunk: list) -> Iterator[tuple[list, object]]:
        """(records, the sidecar's response, or its refusal of a record too large to send alone) covering chunk."""
        import grpc

        try:
            yield chunk, self.score(chunk)
            return
        except grpc.RpcError as error:
            if not too_large(error):
                raise
            refusal = error
        if len(chunk) == 1:
            yield chunk, TooLarge(refusal.code().name, refusal.details() or "")
            return
        half = len(chunk) // 2
        yield from self.in_parts(chunk[:half])
        yield from self.in_parts(chunk[half:])

    def score(self, chunk: list):
        from .generated.logscore.v1 import scorer_pb2 as pb

        request = pb.ScoreRequest(model=self.args.model, tag=self.args.tag, explain=self.args.explain)
        fill_records(request, [cut.record for cut in chunk], self.args.json_records)
        return self.stub.Score(request, timeout=self.args.timeout, metadata=self.metadata)


class TooLarge(NamedTuple):
    """The sidecar's refusal of a record too large to send alone: its status and words."""

    code: str
    details: str


def print_scored(chunk: list, response, several: bool, limit: int, tally: "RecordTally", model: str) -> int:
    """One JSON line per record of a call; a record the sidecar would not take (response TooLarge) unscored.
    The records printed unscored."""
    from .decide import notes_by_record

    if isinstance(response, TooLarge):
        for cut in chunk:
            entry = {"file": cut.numbered.file} if several else {}
            print(json.dumps(entry | unscored_entry(cut, model, response)))
        return len(chunk)
    notes = notes_by_record([(n.index, n.description) for n in response.notes], len(chunk))
    for i, cut in enumerate(chunk):
        if cut.was_cut:
            note_client_cut(notes[i], limit)
        note_reader_cut(notes[i], cut.numbered.record)
        scored_by = response.models[response.model_index[i]]
        explanation = list(response.explanations[i].features) if response.explanations else None
        print(json.dumps(result_entry(cut.numbered, several, response.scores[i], response.is_anomaly[i],
                                      scored_by.name, scored_by.version, notes[i], explanation)))
        tally.add(scored_by.name, cut.record, notes[i], flagged=response.is_anomaly[i])
    return 0


# The note of a record printed unscored for its size: fixed texts, so `logscore report` counts them as one
# reason (the size and --max-record-bytes were in the text: 3 records gave 3 reasons); the size, and the
# sidecar's own words, are keys of their own.
MESSAGE_TOO_LARGE_NOTE = (
    "unscored: the record is larger than the sidecar's largest message (its max_message_bytes, 2 MiB by "
    "default), and it refused it; give the client a --max-record-bytes below that (it sends lines cut just past "
    "it), or raise the sidecar's max_message_bytes above the record (record_chars; sidecar_error)")
VALUES_TOO_LARGE_NOTE = (
    "unscored: the record holds more values than the sidecar's max_inflight_bytes takes once decoded, even "
    "alone, and it refused it; send fewer fields, or raise the sidecar's max_inflight_bytes above the record "
    "(record_chars; sidecar_error)")


def unscored_entry(cut, model: str, refusal: TooLarge) -> dict:
    """The JSON line of a record the sidecar refused for its size; "model" as the client asked (null: routed)."""
    from .admission import ALONE_OVER_LIMIT

    note = VALUES_TOO_LARGE_NOTE if ALONE_OVER_LIMIT in refusal.details else MESSAGE_TOO_LARGE_NOTE
    return {"line": cut.numbered.line, "unscored": True, "model": model or None, "notes": [note],
            "record_chars": record_chars(cut.record), "sidecar_error": f"{refusal.code}: {refusal.details}"}


def not_scored_from(numbered: NumberedRecord) -> str:
    """What a client that stopped at a failed call left unscored, and how to score just that. A gzip
    file is decompressed before tail (`tail -n +N big.log.gz | logscore client` piped its compressed
    bytes from a line of them: review, session 27); the resumed lines are numbered from 1 again."""
    import shlex

    from .inputs import is_gzip

    renumbered = f"(its lines are numbered from 1 again: line 1 is line {numbered.line})"
    if numbered.file == "-":
        return (f"stdin's records from line {numbered.line} on were not scored (those before were printed): "
                f"once fixed, send them again from there (tail -n +{numbered.line}) {renumbered}")
    path = shlex.quote(numbered.file)
    from_line = (f"gzip -dc {path} | tail -n +{numbered.line}" if is_gzip(numbered.file)
                 else f"tail -n +{numbered.line} {path}")
    return (f"the records from {numbered.file} line {numbered.line} on were not scored (those before were "
            f"printed): once fixed, score them with {from_line} | logscore client ... - {renumbered} (then any "
            "later files)")


def warn_of_floods(stub, metadata: list, timeout: float, tally: "RecordTally") -> None:
    """`logscore score`'s warning, for a model that flagged far more of the records than it was
    trained to (its target FPR from ListModels; a sidecar too old to say is not asked further)."""
    import grpc

    from .flood import flood_warning
    from .generated.logscore.v1 import scorer_pb2 as pb

    if not any(counts["flagged"] for counts in tally.models.values()):
        return
    try:
        models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=timeout, metadata=metadata).models}
    except grpc.RpcError:
        return
    for name, counts in sorted(tally.models.items()):
        info = models.get(name)
        warning = (flood_warning(name, info.log_format, info.target_fpr, counts["flagged"], counts["scored"])
                   if info else None)
        if warning and info.target_fpr:  # (0: a sidecar from before target_fpr said none)
            print(f"logscore client: warning: {warning}", file=sys.stderr, flush=True)


def records_per_call(batch: int, explain: int) -> int:
    """--batch, made small enough that a call asks for no more feature names than the sidecar answers."""
    from .scoring import MAX_EXPLANATIONS  # the serving modules load only for the commands that use them

    most = MAX_EXPLANATIONS // explain if explain else batch
    return max(1, min(batch, most))


def fill_records(request, records: list, as_fields: bool) -> None:
    """Put records into a request's ``structured`` (field maps) or ``lines`` (raw lines) field, a lone
    surrogate as U+FFFD (inputs.sendable: a request holds UTF-8 only)."""
    if as_fields:
        for record in records:
            fields = record if isinstance(record, dict) else {"message": record}
            request.structured.records.add(fields={sendable(str(k)): sendable(str(v)) for k, v in fields.items()})
    else:
        request.lines.lines.extend(sendable(line).encode("utf-8") for line in records)


def call_failure(target: str, error) -> str:
    """A failed call to the sidecar in one line; one that reached no sidecar says what to do, and
    one naming a request's field (no default model: name one), its size or the HTTP list of feedback
    names the flag or the command that does it here."""
    import grpc

    from .feedback_store import LIST_FEEDBACK
    from .registry import REQUEST_MODEL
    from .scoring import SPLIT_BATCH

    details = error.details() or ""
    for sidecars, ours in ((REQUEST_MODEL, "--model"), (SPLIT_BATCH, "(give a smaller --batch)"),
                           (LIST_FEEDBACK, "list them with `logscore feedback list`")):
        details = details.replace(sidecars, ours)
    said = f"{error.code().name}: {details}"
    if error.code() != grpc.StatusCode.UNAVAILABLE or "failed to connect" not in details:
        return f"{target}: {said}"  # (a sidecar that answers may say UNAVAILABLE too: its feedback store is down)
    # gRPC's own words say which: nothing listens, TLS disagrees, or the sidecar closed the connection
    if "Connection refused" in details or "No such file or directory" in details:
        return (f"{target}: no sidecar answers there ({said}); start one (logscore serve) or give the --socket "
                f"or --tcp of the one running (its log's \"serving\" line names its listeners)")
    if "Permission denied" in details:
        return (f"{target}: this user may not open the sidecar's socket ({said}); check the socket's owner and mode "
                "(the sidecar's --socket-mode, 0660 by default: join its group) or run as its user")
    if "handshake" in details.lower():
        return (f"{target}: the TLS handshake failed ({said}); give the sidecar's CA with --tls-ca (and --tls-cert "
                "and --tls-key where it asks for client certificates), or none where it serves plain gRPC")
    if "Socket closed" in details or "reset" in details:
        return (f"{target}: the sidecar closed the connection at once ({said}): its gRPC listener is full "
                "(max_grpc_connections; its log says \"gRPC listener full\"), or it serves TLS (give --tls-ca)")
    return f"{target}: {said}"


def client_channel(args, target: str):
    """The channel and call metadata `logscore client` needs: plain, TLS or mutual TLS; a bearer token."""
    import grpc
    from pathlib import Path

    from .errors import ConfigError

    def read(path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise ConfigError(f"{path}: cannot read ({error.strerror})") from None

    metadata = []
    if args.token_file:
        token = read(args.token_file).decode("utf-8", "replace").strip()
        if not token:
            raise ConfigError(f"--token-file {args.token_file} is empty")
        metadata.append(("authorization", f"Bearer {token}"))
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    # The sidecar bounds what it sends by its own max_message_bytes (a page of feedback entries is
    # filled up to it): grpcio's default 4 MiB here refused a page from a sidecar allowing more.
    options = [("grpc.max_receive_message_length", -1)]
    if not (args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(target, options=options), metadata
    if not args.tcp:
        raise ConfigError("TLS needs --tcp HOST:PORT (the Unix socket is never TLS)")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.tls_ca) if args.tls_ca else None,
        private_key=read(args.tls_key) if args.tls_key else None,
        certificate_chain=read(args.tls_cert) if args.tls_cert else None)
    return grpc.secure_channel(target, credentials, options=options), metadata


class ProgressPrinter:
    """Progress on stderr, at most twice a second, so long training is never silent."""

    def __init__(self, command: str = "train"):
        self.command = command
        self.last = 0.0
        self.stage = ""

    def __call__(self, stage: str, done: int, total: Optional[int], unit: str = "records") -> None:
        now = time.monotonic()
        # A new stage is always said: "learning windows" came 0.1 s after the last record scored,
        # was dropped, and half a minute of learning windows looked like scoring.
        if now - self.last < 0.5 and stage == self.stage and (total is None or done < total):
            return
        self.last, self.stage = now, stage
        amount = f"{done}/{total}" if total else f"{done}"
        print(f"[{self.command}] {stage}: {amount} {unit}", file=sys.stderr, flush=True)


def end_with_learner(sidecar_pid: int) -> None:
    """A training the sidecar's learner started ends when that sidecar does (Linux: the kernel sends
    SIGTERM). NOTE: a SIGKILLed sidecar left its child training on, while the restarted sidecar's
    learner wrote the same route's files (syslog field trial)."""
    import ctypes
    import ctypes.util
    import os
    import signal

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass  # (not Linux: the sidecar's own stop still ends it)
    if os.getppid() != sidecar_pid:  # gone before the line above took hold
        raise SystemExit("logscore train: error: the sidecar that started this training has stopped")


def learned_route_kept(previous):
    """The route a model retrained by hand from a learned one (--previous-model, whose name the new
    model must have: check_previous) stays learned for.
    NOTE: not carried, a route's retrained model was no longer its own to the sidecar: its flags were
    held again and the learner replaced the operator's model with a first model of its own (probe)."""
    return None if previous is None else previous.metadata.get("training", {}).get("learned_route")


def run_train(args) -> int:
    from pathlib import Path

    if args.learner_pid:
        end_with_learner(args.learner_pid)
    try:
        from .features import load_spec
        from .features.featurizer import SESSION_FIELDS
        from .training.train import TrainOptions, save_model, train
    except ImportError as error:
        print(f"logscore train: error: {missing_training_extra(error)}", file=sys.stderr)
        return 1
    # NOTE: --base, --previous-model and --behaviour-from may name --out: each model is read whole before
    # the new one is written beside it and renamed onto it, so a served model can be replaced in place.
    check_writable(args.out, "--out", input_flags("--input", args.input) + [
        ("--config", args.config), ("--feedback", args.feedback)])
    read_zoneless_in(args.time_zone)  # the records' timestamps, for --windows and --entities
    spec = load_spec(args.config, args.format)
    if args.session_key:
        if not args.config:
            spec = {"format": args.format, "fields": SESSION_FIELDS}
        spec["sessions"] = {"key": args.session_key, "field": args.session_field}
    previous = None
    if args.previous_model:
        from .model import Model

        previous = Model.load(args.previous_model)
    options = TrainOptions(
        spec=spec,
        detectors=[d.strip() for d in args.detectors.split(",") if d.strip()],
        target_fpr=args.target_fpr, threshold_rule=args.threshold_rule, sigma=args.sigma,
        folds=args.folds, max_records=args.max_records, support=args.support, seed=args.seed,
        name=args.name or (previous.name if previous is not None else Path(args.out).stem), inputs=args.input,
        learned_route=args.learned_route or learned_route_kept(previous),
        **robustness_options(args))
    options.validate()  # (train validates again: here, before any record is read)
    records = read_json_records(args.input) if args.json_records else read_lines(args.input)
    if args.feedback:
        from .training.feedback import load_feedback

        location = os.environ.get("LOGSCORE_FEEDBACK_STORE", "") if args.feedback == "env" else args.feedback
        if not location:
            raise ConfigError("--feedback env: LOGSCORE_FEEDBACK_STORE is not set; give the store's location")
        options.feedback = load_feedback(location, options.name, must_exist=args.feedback != "env")
        # (the learner's store, `env`, holds no entry until an operator gives one: no typo to warn of)
        if not options.feedback.entries and args.feedback != "env":
            others = ", ".join(f"{m or '(any)'} ({n})" for m, n in options.feedback.other_models.most_common())
            expired = options.feedback.expired
            print_warning(f"--feedback {options.feedback.store}: no active entry for model {options.name!r}"
                          + (f" ({expired} past their expiry, left out)" if expired else "")
                          + (f"; it holds entries for {others} (--name sets the model's name)" if others else ""))
    if previous is not None:
        from .training.feedback import check_previous

        options.previous = previous
        check_previous(previous, spec, options.name)
    behaviour = behaviour_options(args)
    if behaviour is not None:
        records = list(records)  # read twice: the record model, then behaviour in file order
        if not args.base and not spec.get("sessions"):
            from .training.behaviour import check_timestamps

            check_timestamps(records, spec, behaviour)
    kept = behaviour_source(args.behaviour_from, spec) if args.behaviour_from else None
    if args.base:
        model, metadata = base_model(args.base)
    else:
        model, metadata = train(records, options, ProgressPrinter(), print_warning)
    if kept is not None:
        from .training.behaviour import carry_behaviour

        model, metadata = carry_behaviour(model, metadata, kept)
    if behaviour is not None:
        from .training.behaviour import learn_behaviour

        model, metadata = learn_behaviour(model, metadata, records, behaviour, ProgressPrinter(), print_warning)
    save_model(model, args.out)
    print_training_summary(args.out, metadata)
    return 0


def check_writable(path: str, flag: str, inputs: Sequence[tuple[str, Optional[str]]] = ()) -> None:
    """Fail before a long run, not after it, when its output cannot be written or would overwrite one
    of its ``inputs`` ((flag, path) pairs: every file the command reads).

    NOTE: `train --input v.log --out v.log` ran to the end and replaced the log with the model; `report
    s.jsonl --html s.jsonl` replaced the scored file with HTML."""
    import os
    from pathlib import Path

    from .errors import ConfigError

    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; give a file name inside it")
    if target.exists() and not target.is_file():
        # NOTE: the model is written beside the path and renamed onto it: as root, `--out /dev/null`
        # replaced the machine's /dev/null with a regular file.
        raise ConfigError(f"{flag} {path}: is not a regular file (a device, a pipe or a socket), and the output "
                          "would replace it; give a file name")
    for input_flag, input_path in inputs:
        if input_path and input_path != "-" and same_file(path, input_path):
            raise ConfigError(f"{flag} {path}: is the same file as {input_flag} {input_path}, which writing it "
                              f"would destroy; give {flag} another file name")
    probe = target.with_name(f".{target.name}.check")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(f"{flag} {path}: cannot write there ({error.strerror or error}); choose a path in a "
                          "directory you may write") from None


def same_file(first: str, second: str) -> bool:
    """Whether two paths name one file: through links (samefile) when both exist, else by real path."""
    try:
        return os.path.samefile(first, second)
    except OSError:
        return os.path.realpath(first) == os.path.realpath(second)


def input_flags(flag: str, paths: Optional[Sequence[str]]) -> list[tuple[str, Optional[str]]]:
    """(flag, path) pairs of a flag taking files, for check_writable."""
    return [(flag, path) for path in paths or ()]


def missing_training_extra(error: ImportError) -> str:
    return f"{error.name} is missing; install the training extra: pip install 'logscore[train]'"


TRAIN_WARNING = "logscore train: warning: "  # (the learner relays its child's lines starting so)


def print_warning(message: str) -> None:
    print(f"{TRAIN_WARNING}{message}", file=sys.stderr, flush=True)


def print_training_summary(path: str, metadata: dict) -> None:
    training, calibration = metadata["training"], metadata["calibration"]
    print(f"wrote {path}")
    print(f"  records: {training['records_read']} read, {training['records_used']} used, "
          f"{training['unparsed_records']} unparsed, {training['truncated_records']} cut before scoring")
    print(f"  features: {training['distinct_features']} distinct keys, dense width {training['dense_width']}")
    print(f"  detectors: {', '.join(d['kind'] for d in metadata['detectors'])}")
    print(f"  fit time: {training['fit_seconds']} s")
    print(f"  calibrated score quantiles (out-of-fold): {training['calibrated_score_quantiles']}")
    with_aside = calibration.get("expected_alerts_per_10k_with_set_aside")
    print(f"  threshold: {calibration['threshold']:.4f} ({calibration['rule']}); expected alerts per "
          f"10,000 normal records: {calibration['expected_alerts_per_10k']}"
          + (f" ({with_aside} were the records set aside normal)" if with_aside is not None else ""))
    print(f"  {describe_realized_fpr(calibration)}")
    print(f"  {describe_set_aside(training)}")
    if training.get("injection_prior"):
        print(f"  {describe_injection_prior(training['injection_prior'])}")
    feedback = training.get("feedback")
    if feedback:
        expired = (f"; {feedback['expired_entries']} past their expiry left out" if feedback.get("expired_entries")
                   else "")
        print(f"  feedback ({feedback['store']}, {feedback['entries']} entries{expired}): "
              f"{feedback['normal_records']} records learned as normal ({feedback['normal_flagged']} still flagged), "
              f"{feedback['keep_records']} kept out as true anomalies ({feedback['keep_flagged']} flagged by the new "
              "model)")
    if training.get("left_out_flagged"):
        print(f"  {describe_left_out(training['left_out_flagged'])}")


def describe_left_out(left_out: dict) -> str:
    said = (f"left out as flagged by the previous model {left_out['model']} ({left_out['version']}): "
            f"{left_out['records']} records")
    if left_out.get("ignored"):
        clients = left_out.get("clients") or []
        return (f"{said}: it flags {left_out['fraction']:.1%} of them, more than {left_out['limit']:.0%}, so its "
                "flags were not used" + (f", but for every record of the {left_out['client_count']} clients it flags "
                                         f"{left_out['client_flags']} times or more and far above that share (an "
                                         f"attack or a scanner: {', '.join(clients)})" if clients else ""))
    learned = left_out.get("learned_widespread")
    also = (f"; {learned['records']} flagged records learned all the same, what made them unusual flagged "
            f"across {learned['min_clients']} clients or more (a new kind of normal traffic)" if learned else "")
    if left_out.get("vouched_by_feedback"):
        also += (f"; {left_out['vouched_by_feedback']} flagged records learned as normal, the feedback's normal "
                 "entries suppressing their flags (never set aside)")
    return f"{said} ({left_out['fraction']:.3%} flagged){also}; `logscore inspect` lists examples"


def describe_injection_prior(prior: dict) -> str:
    return (f"set aside by the injection prior: {prior['records']} records ({prior['fraction']:.3%}) holding an "
            f"injection-like request feature seen in fewer than {prior['support']:g} records "
            f"(--injection-share {prior['share']:g})")


def describe_realized_fpr(calibration: dict) -> str:
    held = calibration.get("held_back") or {}
    if not held.get("records"):
        return f"target false-positive rate {calibration.get('target_fpr')} (no held-back figure in this model)"
    said = (f"false-positive rate: target {calibration.get('target_fpr')}, realized {held['fpr']} on held-back "
            f"folds ({held['flagged']} of {held['records']} records)")
    if held.get("set_aside"):
        said += (f"; {held['fpr_with_set_aside']} counting the {held['set_aside']} records set aside, were they "
                 f"normal ({held['set_aside_flagged']} of them over the threshold)")
    return said


def describe_set_aside(training: dict) -> str:
    aside = training.get("set_aside")
    if aside is None:
        return "set aside: nothing (every record learned as normal)"
    return (f"set aside as likely attacks: {aside['records']} records ({aside['fraction']:.3%}); "
            "`logscore inspect` lists examples")


CLIENT_CALL_BYTES = 1024 * 1024  # half the sidecar's default max_message_bytes


def batched(items, size: int, max_chars: Optional[int] = None, measure=None) -> Iterator[list]:
    """Lists of at most ``size`` items and, when given, about ``max_chars`` characters (one item at least;
    an item's characters are ``measure(item)``, record_chars by default)."""
    if max_chars is None:
        iterator = iter(items)
        while chunk := list(islice(iterator, size)):
            yield chunk
        return
    measure = measure or record_chars
    chunk, chars = [], 0
    for item in items:
        length = measure(item)
        if chunk and (len(chunk) >= size or chars + length > max_chars):
            yield chunk
            chunk, chars = [], 0
        chunk.append(item)
        chars += length
    if chunk:
        yield chunk


def record_chars(record) -> int:
    """The characters a record (a line or a field map) takes in a call, about."""
    return len(record) if isinstance(record, str) else sum(len(str(v)) + len(k) for k, v in record.items())


class CutRecord(NamedTuple):
    numbered: NumberedRecord  # the record as read, with its file and line
    record: object  # as sent: cut just past the client's --max-record-bytes
    was_cut: bool


def cut_past(numbered: NumberedRecord, limit: int) -> CutRecord:
    """A line (or each field) cut to limit + 1 characters: the sidecar, cutting at limit, scores it
    exactly as it would the whole and notes it truncated; the call stays small.

    NOTE: a sidecar whose --max-record-bytes is higher than the client's scored the cut line as sent,
    unparsed and flagged, with no `truncated` note. Sending lines whole instead would let one 4 MiB line
    fail a whole call (the sidecar takes 2 MiB), so the client keeps cutting and notes the cut itself
    (note_client_cut) where the sidecar did not."""
    record = numbered.record
    if isinstance(record, str):
        return CutRecord(numbered, record[: limit + 1], len(record) > limit + 1)
    if isinstance(record, dict):
        cut = {k: v[: limit + 1] if isinstance(v, str) else v for k, v in record.items()}
        return CutRecord(numbered, cut, any(isinstance(v, str) and len(v) > limit + 1 for v in record.values()))
    return CutRecord(numbered, record, False)


def note_reader_cut(notes: list[str], record: object) -> None:
    """A `truncated` note on a line the reader cut (inputs.MAX_LINE_BYTES), unless one is there.
    NOTE: with --max-record-bytes above 4 MiB, the reader's cut line was scored as whole, with no
    `truncated` note, only a warning at the end (probe)."""
    from .inputs import MAX_LINE_BYTES, cut_by_reader

    if cut_by_reader(record) and not any(note.startswith("truncated") for note in notes):
        notes.append(f"truncated: the line was read only to its first {MAX_LINE_BYTES:,} bytes (the most logscore "
                     "reads of a line) and scored as cut; split such records before scoring")


def note_client_cut(notes: list[str], limit: int) -> None:
    """The client's `truncated` note on a record it cut, unless the sidecar noted cutting its line too
    (not any `truncated` note: a session model's "the session was cut" hid the client's)."""
    from .decide import TRUNCATED
    from .sessions import LINE_CUT_NOTE

    line_cut = tuple(note.partition("{")[0] for note in (TRUNCATED, LINE_CUT_NOTE))  # (their fixed start)
    if not any(note.startswith(line_cut) for note in notes):
        notes.append(f"truncated: logscore client cut a raw line or a field to {limit + 1} characters (its "
                     f"--max-record-bytes {limit}) before sending, and the sidecar scored it as cut; give the "
                     "sidecar's --max-record-bytes to the client")


def check_scoring_flags(args) -> None:
    """--explain and --max-record-bytes, as `logscore score` and `logscore client` both take them."""
    from .scoring import MAX_EXPLAIN

    if not 0 <= args.explain <= MAX_EXPLAIN:
        raise ConfigError(f"--explain {args.explain}: name 0 to {MAX_EXPLAIN} features per record")
    if args.max_record_bytes < 1:
        raise ConfigError(f"--max-record-bytes {args.max_record_bytes}: give at least 1 (the characters of a raw "
                          f"line or a field scored; default {DEFAULT_MAX_LINE_CHARS})")


def run_score(args) -> int:
    from .decide import decide, notes_by_record
    from .model import Model

    check_scoring_flags(args)
    model = Model.load(args.model, max_line_chars=args.max_record_bytes)
    several = len(args.inputs) > 1
    out = sys.stdout
    tally = RecordTally()
    for chunk in batched(numbered_records(args.inputs, args.json_records), args.batch):
        records = [numbered.record for numbered in chunk]
        result = model.score(records, explain=args.explain)
        decision = decide(model, result)
        notes = notes_by_record([(i, text) for i, _, text in decision.notes], len(chunk))
        for i, numbered in enumerate(chunk):
            note_reader_cut(notes[i], records[i])
            tally.add(model.name, records[i], notes[i], flagged=decision.is_anomaly[i])
            if args.only_anomalies and not decision.is_anomaly[i]:
                continue
            explanation = result.explanations[i] if result.explanations is not None else None
            entry = result_entry(numbered, several, result.scores[i], decision.is_anomaly[i], model.name,
                                 model.version, notes[i], explanation)
            if args.record:
                entry["record"] = records[i]
            out.write(json.dumps(entry) + "\n")
    out.flush()
    from .flood import flood_warning, target_fpr

    counts = tally.models.get(model.name, {"flagged": 0, "scored": 0})
    warning = flood_warning(model.name, model.featurizer.log_format, target_fpr(model), counts["flagged"],
                            counts["scored"],
                            model.metadata.get("training", {}).get("inputs") or ["its training files"])
    if warning:
        print(f"logscore score: warning: {warning}", file=sys.stderr, flush=True)
    tally.warn_unparsed("score")
    return 0


class RecordTally:
    """Per model, the records scored, flagged (`logscore client`'s flood warning) and not parsing as
    the model's format, from the notes each record's output line carries: `logscore score` and
    `logscore client` say the same of those at the end.

    NOTE: a line that does not parse is noted per record (`unparsed`), and flagged when the model's
    training data parsed: a log of another layout (Apache's vhost_combined, HAProxy's) was all
    flagged, and the only summary said to check the model, not that the lines did not parse; through
    a sidecar (`logscore client`) nothing was said at all."""

    def __init__(self):
        from .decide import UNPARSED_NOTE
        from .parsers import SUGGEST_SAMPLE

        self.models: dict[str, dict] = {}  # name -> scored, flagged, unparsed, note, examples
        # (imported here, once, not per record: the CLI imports what a command needs when it runs)
        self.note_prefix, self.examples_kept = UNPARSED_NOTE, SUGGEST_SAMPLE

    def add(self, model: str, record: object, notes: list[str], flagged: bool) -> None:
        """Count a record of ``model`` with its notes (per record of every output: kept cheap)."""
        counts = self.models.get(model)
        if counts is None:
            counts = self.models[model] = {"scored": 0, "flagged": 0, "unparsed": 0, "note": "", "examples": []}
        counts["scored"] += 1
        counts["flagged"] += bool(flagged)
        note = next((n for n in notes if n.startswith(self.note_prefix)), None)
        if note is not None:
            counts["unparsed"] += 1
            counts["note"] = note
            if len(counts["examples"]) < self.examples_kept:  # for the format they may be
                counts["examples"].append(record)

    def warn_unparsed(self, command: str) -> None:
        from .parsers import WARN_UNPARSED_SHARE

        for name, counts in sorted(self.models.items()):
            if counts["unparsed"] > WARN_UNPARSED_SHARE * counts["scored"]:
                warning = unparsed_warning(name, counts["scored"], counts["unparsed"], counts["note"],
                                           counts["examples"])
                print(f"logscore {command}: warning: {warning}", file=sys.stderr, flush=True)


def unparsed_warning(name: str, scored: int, unparsed: int, note: str, examples: list) -> str:
    """What `logscore score` and `logscore client` say of a model's records that did not parse."""
    from .decide import UNPARSED_NOTE
    from .feedback import record_text
    from .parsers import suggest_format

    log_format, _, fate = note[len(UNPARSED_NOTE):].partition("; ")
    advice = suggest_format(examples, log_format)
    if "--format" in advice or "--config" in advice:
        # `logscore score` reads lines as its model's format: "try --format syslog" sent an operator
        # to a flag score does not have
        advice += (" (--format and --config are logscore train's: train a model on this log, then score with it: "
                   "logscore train --input FILE --format FORMAT --out M.onnx)")
    return (f"{unparsed:,} of {scored:,} records ({unparsed / scored:.1%}) did not parse as {log_format} "
            f"(e.g. {record_text(examples[0])[:120]!r}), the format of {name}: they are {fate}. {advice}")


def result_entry(numbered: NumberedRecord, several_files: bool, score: float, is_anomaly: bool, model: str,
                 version: str, notes: list[str], explanation: Optional[list[str]]) -> dict:
    """One JSON line of `logscore score` and `logscore client` (the same keys either way): `line` is the
    record's line number in its file, `file` names that file when several were given.

    NOTE: `line` counted records (blank lines skipped, on across files): the 3rd line of a file with
    a blank 2nd was "line": 2."""
    from .decide import note_flags

    entry = {"file": numbered.file} if several_files else {}
    entry |= {"line": numbered.line, "score": round(float(score), 6), "is_anomaly": bool(is_anomaly),
             "model": model, "version": version}
    if notes:
        entry.update(note_flags(notes))
        entry["notes"] = notes
    if explanation is not None:
        entry["explanation"] = explanation
    return entry


def read_labeled(args) -> tuple[list, list[int], Optional[list[str]]]:
    """Records, labels (1 anomalous) and attack types from the evaluate command's inputs."""
    from .errors import InputError

    records: list = []
    labels: list[int] = []
    types: Optional[list[str]] = [] if args.type_column else None
    for paths, label in ((args.normal, 0), (args.anomalous, 1)):
        for line in read_lines(paths):
            records.append(line)
            labels.append(label)
            if types is not None:
                types.append("anomalous" if label else "")
    if args.labeled:
        anomalous = {v.strip().lower() for v in args.anomalous_values.split(",")}
        rows, seen = LabeledRows(args.labeled), LabeledColumns(args.where)
        for row in rows:
            seen.add(row)
            if any(str(row.get(column)) != value for column, value in args.where):
                continue
            if args.label_column not in row:
                raise InputError(f"{args.labeled}: no column {args.label_column!r}; use --label-column")
            label = int(str(row.pop(args.label_column)).strip().lower() in anomalous)
            kind = str(row.pop(args.type_column, "") or "") if args.type_column else None
            records.append({k: v for k, v in row.items() if v not in (None, "")})
            labels.append(label)
            if types is not None:
                types.append(kind if label else "")
            seen.kept += 1
        rows.check()
        seen.check(args)
    if not records:
        raise InputError("no records: give --normal/--anomalous files or --labeled FILE")
    # NOTE: session labels (--session-labels) label sessions, not lines: a log given whole as
    # --normal is checked once its sessions are grouped
    if len(set(labels)) < 2 and not args.session_labels:
        raise InputError("the data has one class only; evaluation needs normal and anomalous records")
    return records, labels, types


class LabeledColumns:
    """The columns of evaluate's --labeled rows, and the values of its --where columns, to name what a
    column given by mistake missed.

    NOTE: `--where splot=test` or `--where split=nope` were told "no records: give --normal/--anomalous
    files or --labeled FILE", --labeled given; `--type-column metod` gave an empty recall per type (probe)."""

    VALUES_SHOWN = 20

    def __init__(self, where: Sequence[tuple[str, str]]):
        self.columns: dict[str, None] = {}  # in the order first seen
        self.values: dict[str, dict[str, None]] = {column: {} for column, _ in where}
        self.kept = 0

    def add(self, row: dict) -> None:
        if len(row) != len(self.columns) or not self.columns.keys() >= row.keys():
            self.columns.update(dict.fromkeys(row))
        for column, values in self.values.items():
            if column in row and len(values) <= self.VALUES_SHOWN:
                values[str(row[column])] = None

    def check(self, args) -> None:
        """Refuse a named column no row holds, and a --where that left no row, naming what the rows hold."""
        from .errors import InputError

        if not self.columns:
            return  # (no row: said by the caller)
        named = [("--where", column) for column in self.values] + [("--type-column", args.type_column)]
        missing = [f"{flag} {column}" for flag, column in named if column and column not in self.columns]
        if missing:
            raise InputError(f"--labeled {args.labeled}: no column named by {', '.join(missing)}; its columns are "
                             f"{', '.join(self.columns)}")
        if not self.kept and self.values:
            said = "; ".join(f"{column} holds {', '.join(repr(v) for v in list(values)[:self.VALUES_SHOWN])}"
                             + (", ..." if len(values) > self.VALUES_SHOWN else "")
                             for column, values in self.values.items())
            raise InputError(f"--labeled {args.labeled}: no row matches "
                             f"{' and '.join(f'{c}={v}' for c, v in args.where)} (--where); {said}")


LABELED_UNPARSED_LIMIT = 0.01  # share of --labeled rows that may fail to parse: left out, with a warning


class LabeledRows:
    """The rows of evaluate's --labeled file as field maps: CSV when its name ends in .csv (before any .gz,
    in any case), else JSON lines; rows that do not parse are counted, with the first one's line number.

    NOTE: a JSON line cut short or holding a list was dropped without a word, and lab.csv.gz or lab.CSV
    was read as JSON lines (every row dropped: "no records")."""

    def __init__(self, path: str):
        name = path.lower()
        self.path, self.is_csv = path, name.removesuffix(".gz").endswith(".csv")
        self.rows = self.unparsed = 0
        self.first_unparsed: Optional[int] = None

    def __iter__(self) -> Iterator[dict]:
        for line_number, row in (self.csv_rows() if self.is_csv else self.json_rows()):
            self.rows += 1
            if row is None:
                self.unparsed += 1
                self.first_unparsed = self.first_unparsed or line_number
            else:
                yield row

    def csv_rows(self) -> Iterator[tuple[int, Optional[dict]]]:
        """(line number, row, or None for one whose field count is not the header's)."""
        import csv

        csv.field_size_limit(16 * 1024 * 1024)
        reader = csv.DictReader(line + "\n" for line in read_lines([self.path], blank_lines=True))
        for row in reader:
            fits = None not in row and None not in row.values()  # (DictReader's marks of too many, too few)
            yield reader.line_num, row if fits else None

    def json_rows(self) -> Iterator[tuple[int, Optional[dict]]]:
        """(line number, the line's JSON object, or None for a line holding none)."""
        for numbered in numbered_records([self.path], as_json=True):
            yield numbered.line, numbered.record if isinstance(numbered.record, dict) else None

    def check(self) -> None:
        """Say how many rows were left out for not parsing; refuse past LABELED_UNPARSED_LIMIT of them."""
        from .errors import InputError

        if not self.unparsed:
            return
        kind = "CSV rows with the header's number of columns" if self.is_csv else "JSON objects"
        said = (f"--labeled {self.path}: {self.unparsed:,} of {self.rows:,} rows ({self.unparsed / self.rows:.1%}) "
                f"are not {kind} (the first at line {self.first_unparsed})")
        if self.unparsed > LABELED_UNPARSED_LIMIT * self.rows:
            raise InputError(f"{said}: more than {LABELED_UNPARSED_LIMIT:.0%}; fix or remove them (a file cut "
                             "while written, or of another format: a name ending in .csv, or .csv.gz, is read as "
                             "CSV, any other as JSON lines)")
        print(f"logscore evaluate: warning: {said}: they are left out", file=sys.stderr, flush=True)


def add_series_flags(evaluate: argparse.ArgumentParser) -> None:
    """`logscore evaluate --series`: one time series scored online, in NAB's results format (issue #15)."""
    group = evaluate.add_argument_group("a time series (instead of records)")
    group.add_argument("--series", metavar="FILE.csv", help="timestamp,value rows: score each point from the "
                       "past only (the windows' forecaster) and write timestamp,value,anomaly_score,label")
    group.add_argument("--series-out", metavar="FILE.csv", help="where to write the scored series (default stdout)")
    group.add_argument("--series-windows", metavar="FILE.json",
                       help="labeled windows ({series path: [[start, end], ...]}, NAB's combined_windows.json): "
                       "label 1 inside them, for the series whose path ends like --series")


def run_series(args) -> int:
    from pathlib import Path

    from .errors import InputError
    from .series import WARM_UP_S, labels_from_windows, read_series, score_series, write_results

    series = read_series(args.series)
    span = series.times[-1] - series.times[0]
    if span <= WARM_UP_S:
        print(f"logscore evaluate: warning: the series spans {span / 3600:.1f} h; the first "
              f"{WARM_UP_S / 3600:.0f} h only teach the forecaster, so every score is 0", file=sys.stderr)
    labels = None
    if args.series_windows:
        try:
            windows = json.loads(Path(args.series_windows).read_text())
        except (OSError, ValueError) as error:
            raise InputError(f"--series-windows {args.series_windows}: {error}") from None
        path = Path(args.series).as_posix()
        matches = [name for name in windows if path.endswith(name)]
        if not matches:
            names = ", ".join(sorted(windows))[:200]
            raise InputError(f"--series-windows: no entry for {args.series} (names: {names})")
        labels = labels_from_windows(series, windows[matches[0]])
    progress = ProgressPrinter("evaluate")
    scores = score_series(series.times, series.values, lambda done, total: progress("scoring", done, total, "points"))
    import numpy as np

    write_results(args.series_out, series, scores, labels if labels is not None else np.zeros(len(scores), int),
                  sys.stdout)
    return 0


def check_evaluation_outputs(args) -> None:
    """--report, --plots' files and --series-out: writable and none of evaluate's inputs, before any scoring."""
    from .evaluation import PLOT_SUFFIXES

    inputs = (input_flags("--normal", args.normal) + input_flags("--anomalous", args.anomalous)
              + input_flags("--train", args.train) + [
                  ("--model", args.model), ("--labeled", args.labeled), ("--session-labels", args.session_labels),
                  ("--config", args.config), ("--series", args.series), ("--series-windows", args.series_windows)])
    outputs = [("--report", args.report), ("--series-out", args.series_out)]
    outputs += [("--plots", args.plots + suffix) for suffix in PLOT_SUFFIXES] if args.plots else []
    for flag, path in outputs:
        if path:
            check_writable(path, flag, inputs)


def run_evaluate(args) -> int:
    import numpy as np

    check_evaluation_outputs(args)
    if args.series:
        return run_series(args)

    from .decide import decide
    from .errors import InputError
    from .evaluation import Evaluation, group_sessions, plot, session_texts

    records, labels, types = read_labeled(args)
    model, training = evaluation_model(args, records, labels, types)
    progress = ProgressPrinter("evaluate")
    scores, flags = [], []
    for start in range(0, len(records), args.batch):
        result = model.score(records[start: start + args.batch])
        scores.append(result.scores)
        flags.append(decide(model, result).is_anomaly)
        progress("scoring", min(start + args.batch, len(records)), len(records))
    score_array, label_array = np.concatenate(scores).astype(np.float64), np.asarray(labels)
    flag_array = np.concatenate(flags)
    report = {"model": model.name, "version": model.version}
    if training is not None:
        report["training"] = training
    if args.session_key:
        texts = session_texts(model, records, args.session_key)
        session_labels = None
        if args.session_labels:
            session_labels = {}
            anomalous = {v.strip().lower() for v in args.anomalous_values.split(",")}
            for line in list(read_lines([args.session_labels]))[1:]:
                session, _, value = line.partition(",")
                session_labels[session.strip()] = int(value.split(",")[0].strip().lower() in anomalous)
        ids, score_array, label_array = group_sessions(texts, score_array, label_array, args.session_key,
                                                       session_labels)
        if len(set(label_array.tolist())) < 2:
            raise InputError(f"the sessions have one class only ({len(ids):,} sessions matched --session-key): "
                             "evaluation needs normal and anomalous ones; check --session-labels' ids and "
                             "--anomalous-values")
        types, flag_array = None, None  # a session is flagged by its most anomalous record's score
        report["unit"] = "session"
    else:
        report["unit"] = "record"
    calibration = model.metadata.get("calibration", {})
    report.update(Evaluation(label_array, score_array, model.threshold, types, flag_array,
                             calibration.get("target_fpr")).report())
    report["held_back_fpr"] = (calibration.get("held_back") or {}).get("fpr")
    if args.plots:
        try:
            report["plots"] = plot(label_array, score_array, args.plots, model.name)
        except ImportError:
            print("logscore evaluate: matplotlib is not installed; no plots (pip install matplotlib)",
                  file=sys.stderr)
    text = strict_json(report)
    if args.report:
        from pathlib import Path

        Path(args.report).write_text(text + "\n")
    print(text)
    return 0


def add_evaluation_training_flags(evaluate: argparse.ArgumentParser) -> None:
    """`logscore evaluate --train`: train here (the `logscore train` code), optionally on data
    contaminated with some of the anomalous records, then evaluate on the rest."""
    group = evaluate.add_argument_group("training a model to evaluate (instead of --model)")
    group.add_argument("--train", nargs="+", action="extend", metavar="FILE",
                       help="normal training lines (plain or gzip; given again, adds files)")
    group.add_argument("--format", "-f", default="access", choices=["access", "syslog", "jsonl", "plain"],
                       help="how to parse the training lines (default: access)")
    group.add_argument("--config", "-c", metavar="FILE", help="converter config, as for `logscore train`")
    group.add_argument("--detectors", "-d", default="rarity", help="as for `logscore train` (default: rarity)")
    group.add_argument("--target-fpr", type=finite_number, default=0.001,
                       help="as for `logscore train` (default 0.001)")
    group.add_argument("--keep-outliers", action="store_true", help="as for `logscore train`")
    group.add_argument("--injection-share", type=finite_number, metavar="FRACTION",
                       help="as for `logscore train` (default 0.01)")
    group.add_argument("--contaminate", type=finite_number, default=0.0, metavar="FRACTION",
                       help="move this fraction of the anomalous records (chosen at random) into the training "
                       "data, as attacks hide in real logs; they are left out of the evaluation")
    group.add_argument("--seed", type=int, default=0, help="for --contaminate and training (default 0)")


def evaluation_model(args, records: list, labels: list, types: Optional[list]):
    """(model, training summary or None): the model given, or one trained on --train files plus the
    --contaminate fraction of the anomalous records (removed from records, labels, types in place)."""
    import random
    import tempfile
    from pathlib import Path

    from .errors import ConfigError
    from .model import Model

    if bool(args.model) == bool(args.train):
        raise ConfigError("give --model FILE.onnx, or --train FILE... to train one here")
    if args.model:
        if args.contaminate:
            raise ConfigError("--contaminate mixes anomalies into training: it needs --train, not --model")
        return Model.load(args.model), None
    if not 0.0 <= args.contaminate < 1.0:
        raise ConfigError(f"--contaminate must be a fraction in [0, 1), not {args.contaminate}")
    anomalous = [i for i, label in enumerate(labels) if label]
    moved = set(random.Random(args.seed).sample(anomalous, round(args.contaminate * len(anomalous))))
    training_records = list(read_lines(args.train)) + [records[i] for i in sorted(moved)]
    for store in (records, labels, types):
        if store is not None:
            store[:] = [value for i, value in enumerate(store) if i not in moved]
    model_proto, metadata = train_for_evaluation(args, training_records)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "evaluated.onnx"
        path.write_bytes(model_proto.SerializeToString())
        model = Model.load(path)
    set_aside = metadata["training"].get("set_aside") or {}
    return model, {"records": len(training_records), "anomalous_mixed_in": len(moved),
                   "contamination": round(len(moved) / len(training_records), 6),
                   "set_aside": set_aside.get("records", 0), "target_fpr": args.target_fpr}


def train_for_evaluation(args, records: list):
    from .errors import ConfigError
    from .features import load_spec

    try:
        from .training.train import TrainOptions, train
    except ImportError as error:
        raise ConfigError(f"--train: {missing_training_extra(error)}") from None

    options = TrainOptions(spec=load_spec(args.config, args.format),
                           detectors=[d.strip() for d in args.detectors.split(",") if d.strip()],
                           target_fpr=args.target_fpr, seed=args.seed, name="evaluated", inputs=args.train,
                           **robustness_options(args))
    return train(records, options, ProgressPrinter(), print_warning)


def strict_json(value) -> str:
    """JSON (indented) that strict parsers read: NaN and ±Infinity, which Python writes by default and
    JSON.parse refuses (evaluate's threshold_at_fpr_0.1pct could be Infinity, a model's metadata NaN), as null."""
    return json.dumps(without_non_finite(value), indent=2, allow_nan=False)


def without_non_finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: without_non_finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_non_finite(item) for item in value]
    return value


def run_inspect(args) -> int:
    from .artifact import read_artifact
    from .training.shortfall import calibration_shortfall, describe_shortfall

    artifact = read_artifact(args.model)
    meta = artifact.metadata
    if args.json:
        print(strict_json({"path": artifact.path, "version": artifact.version,
                           "content_hash": artifact.content_hash, "metadata": meta}))
        return 0
    from .model import Model

    # NOTE: metadata whose hash is right but which lacks `featurizer` (or holds it malformed) raised a
    # KeyError traceback here, where score refused it in a line: the same check (--json still shows it)
    Model(artifact)
    training, calibration = meta.get("training", {}), meta.get("calibration", {})
    print(f"{artifact.path}")
    print(f"  name: {meta.get('name')}   version: {artifact.version}   format: {meta.get('format_version')}")
    print(f"  log format: {meta['featurizer']['format']}{describe_layout(meta['featurizer'])}")
    from .parsers import FIELD_ALIASES

    shippers = FIELD_ALIASES.get(meta["featurizer"]["format"], {})
    for field in meta["featurizer"]["fields"]:
        kinds = ", ".join(c["kind"] for c in field["converters"])
        # The names records read: the format's (other shippers' parsers: Fluentd's path, code, agent),
        # then the model's own, in the order RecordNormalizer tries them.
        names = list(dict.fromkeys((*shippers.get(field["field"], ()), *field.get("aliases", ()))))
        also = f" (also read as {', '.join(names)})" if names else ""
        print(f"    field {field['field']}{also}: {kinds}")
    print(f"  detectors: {', '.join(d['kind'] for d in meta.get('detectors', []))}")
    print(f"  threshold: {calibration.get('threshold')} (rule {calibration.get('rule')}, target FPR "
          f"{calibration.get('target_fpr')}, expected alerts per 10k normal: "
          f"{calibration.get('expected_alerts_per_10k')})")
    print(f"  trained: {training.get('date')} on {training.get('records_used')} records from "
          f"{', '.join(training.get('inputs', [])) or 'stdin'}; {training.get('distinct_features')} "
          "distinct features")
    print(f"  {describe_realized_fpr(calibration)}")
    shortfall = calibration_shortfall(calibration)
    if shortfall is not None:
        print(f"  warning: {describe_shortfall(shortfall)}")
    print(f"  {describe_set_aside(training)}")
    if (training.get("set_aside") or {}).get("rule"):
        print(f"    rule: {training['set_aside']['rule']}")
    if (training.get("set_aside") or {}).get("unusual_not_vouching") is not None:
        print(f"    kept but not vouching for their features (the data holds attacks): "
              f"{training['set_aside']['unusual_not_vouching']} unusual records")
    for example in (training.get("set_aside") or {}).get("examples", []):
        print(f"    {example['record']}")
    if training.get("injection_prior"):
        print(f"  {describe_injection_prior(training['injection_prior'])}")
        for example in training["injection_prior"]["examples"]:
            print(f"    {example}")
    if training.get("left_out_flagged"):
        print(f"  {describe_left_out(training['left_out_flagged'])}")
        for example in training["left_out_flagged"].get("examples", []):
            print(f"    {example}")
    for warning in training.get("warnings", []):
        print(f"  warning: {warning}")
    if training.get("learned_route"):
        print(f"  learned by the sidecar for route {training['learned_route']}")
    for line in describe_behaviour(meta):
        print(f"  {line}")
    return 0


def describe_layout(spec: dict) -> str:
    """An access model's layout: how the null referer and agent of Fluentd's apache2 parser read."""
    if spec.get("format") != "access":
        return ""
    layout = spec.get("access_layout")
    if layout is None:  # (trained before training recorded it)
        return (", layout not recorded: a record's null referer and agent read as a common-format line's "
                "(retrain it, or record it with scripts/set_access_layout.py)")
    return f", {layout} layout: a record's null referer and agent read as " + (
        'the line\'s "-" "-"' if layout == "combined" else "a common-format line's (none), and lines and records "
        "that carry them are scored without them")


def season_clock(windows: dict) -> str:
    zone = windows.get("season_zone")
    if zone is None:
        return "hours of day and week on UTC (trained before windows recorded their zone)"
    return f"hours of day and week on the {zone} wall clock"


def window_coverage(learned: dict) -> str:
    """What of the day and the week the windows' training log covered (models trained before it
    was recorded: nothing said)."""
    from .training.behaviour import DAY_NAMES, hour_ranges

    hours, days = learned.get("hours_of_day"), learned.get("days_of_week")
    if hours is None:
        return ""
    said = "every hour of day" if len(hours) == 24 else f"hours {hour_ranges(hours) or 'none'} only"
    week = "every day of the week" if len(days) == 7 else ", ".join(DAY_NAMES[d] for d in days) or "no whole day"
    return f"; the log covered {said}, {week}"


def describe_behaviour(meta: dict) -> list[str]:
    """What `logscore inspect` says of a model's window and client detectors."""
    lines = []
    windows, clients = meta.get("windows"), meta.get("entities")
    if windows:
        learned = windows.get("training", {})
        keys = ", ".join(windows["keys"][:4]) + (", ..." if len(windows["keys"]) > 4 else "")
        lines.append(f"windows: {windows['window_s']:g} s, {len(windows['keys'])} keys ({keys}), shares "
                     f"{', '.join(windows['shares']) or 'none'}; "
                     f"learned from {learned.get('windows')} windows; threshold {windows['threshold']:.4f} "
                     f"(target FPR {windows['target_fpr']} of key-windows); {season_clock(windows)}"
                     f"{window_coverage(learned)}")
    if clients:
        learned = clients.get("training", {})
        lines.append(f"clients: by {clients['key']}, half-life {clients['half_life_s']:g} s, features "
                     f"{', '.join(clients['features'])}; learned from {learned.get('clients')} clients; threshold "
                     f"{clients['threshold']:.4f} ({learned.get('clients_over_threshold')} training clients reach it)")
    kept = meta.get("training", {}).get("behaviour_from")
    if kept and (windows or clients):
        lines.append(f"windows and clients kept from model {kept['model']} ({kept['version']}): only the record "
                     "model was learned from this training's records")
    return lines


if __name__ == "__main__":
    sys.exit(main())
