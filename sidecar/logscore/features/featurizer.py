"""The featurizer: one implementation for training and serving.

A spec (stored whole in every model artifact) names the log format, the
fields, and the converters of each field. ``transform`` is vectorized per
converter over the whole batch.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ConfigError
from ..parsers import COMBINED_ONLY
from ..records import DEFAULT_MAX_LINE_CHARS, RecordNormalizer, text_columns, to_text
from ..sessions import SessionSpec
from .batch import FeatureBatch, FeatureSink
from . import native as compiled
from .converters import Converter, ConverterFitPlan, make_converter

# A never-seen word of failure in a message weighs as much as 8 never-seen words (converters.py:
# AlarmsConverter); models from before keep their own spec.
# (a message's two converters mask it alike: the second finds it masked, remembered)
MESSAGE_TOKENS = {"kind": "tokens", "hosts": True, "macs": True}
ALARMS = {"kind": "alarms", "weight": 8.0, "macs": True, "words": 2}

DEFAULT_SPECS: dict[str, dict] = {
    # NOTE: besides the names of parsers.FIELD_ALIASES, the JSON access logs of proxies (`--json-records`):
    # Envoy's (response_code, bytes_sent), Traefik's (RequestPath, DownstreamStatus, ...) and Caddy's
    # (request.uri, request.method, request.headers.*). In the spec: models trained before read
    # what they read then.
    "access": {
        "format": "access",
        "fields": [
            {"field": "url", "aliases": ["RequestPath", "request.uri"], "converters": [
                {"kind": "url"},
                {"kind": "ngrams", "n": [2, 4], "decode": True, "shape": True},
                {"kind": "ngrams", "n": [3, 3], "decode": True, "weight": 0.2}]},
            # NOTE: no protocol: Fluentd's apache2 parser drops it and Logstash writes "1.1", so
            # it would be "missing" or unseen for records that shippers parsed themselves.
            {"field": "method", "aliases": ["RequestMethod", "request.method"],
             "converters": [{"kind": "categorical"}]},
            {"field": "status", "aliases": ["response_code", "DownstreamStatus"],
             "converters": [{"kind": "categorical", "transform": "status_class"}]},
            {"field": "bytes", "aliases": ["bytes_sent", "DownstreamContentSize"],
             "converters": [{"kind": "numeric", "weight": 0.25}]},
            {"field": "user_agent", "aliases": ["request_User-Agent", "request.headers.User-Agent"],
             "converters": [{"kind": "tokens", "template": False, "weight": 0.5}]},
        ],
    },
    "syslog": {
        "format": "syslog",
        "fields": [
            {"field": "app", "converters": [{"kind": "categorical"}]},
            {"field": "message", "converters": [MESSAGE_TOKENS, ALARMS]},
        ],
    },
    # NOTE: JSON loggers name the message and the level their own way (logrus, zap, pino, bunyan
    # and Go's slog: msg; Serilog: @m and @l (CLEF), RenderedMessage and Level; GELF:
    # short_message; Python's json logger: levelname; ECS: log.level; Google Cloud: severity,
    # textPayload). A model reading only `message` scored a pino log by its level alone: a
    # never-seen "segfault" at info was 0.0. The names are in the spec, so models trained before
    # read what they read then. (Docker's `log` holds a raw line, parsed: records.RAW_LINE_KEYS.)
    "jsonl": {
        "format": "jsonl",
        "fields": [
            {"field": "level", "aliases": ["log.level", "levelname", "@l", "lvl", "loglevel", "severity", "Level"],
             "converters": [{"kind": "categorical"}]},
            {"field": "message", "aliases": ["msg", "@m", "@mt", "short_message", "textPayload",
                                             "RenderedMessage"],
             "converters": [MESSAGE_TOKENS, ALARMS]},
        ],
    },
    "plain": {
        "format": "plain",
        "fields": [{"field": "message", "converters": [MESSAGE_TOKENS, ALARMS]}],
    },
}

# A session model reads one field: its session's events in order (see sidecar/logscore/sessions.py).
SESSION_FIELDS = [{"field": "events", "converters": [{"kind": "sequence", "n": [1, 2], "separator": "\n"}]}]

DEFAULT_DENSE_DIMS = 128
ONE_RECORD_IDS = np.zeros(1, dtype=np.int64)  # a one-record batch: record 0 holds distinct value 0
ONE_RECORD_IDS.flags.writeable = False
DEFAULT_MAX_FIELD_CHARS = 8192


def field_aliases(entry: dict) -> tuple[str, ...]:
    """A spec field's ``aliases``: other names records give it, first found first."""
    names = entry["aliases"]
    if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
        raise ConfigError(f"field {entry['field']!r}: 'aliases' must be a list of field names; got {names!r}")
    return tuple(names)


def load_spec(path: Optional[str], log_format: str) -> dict:
    """A converter config file (YAML or JSON), or the default spec of the format."""
    if path is None:
        if log_format not in DEFAULT_SPECS:
            raise ConfigError(f"unknown log format {log_format!r}; use one of: "
                              f"{', '.join(sorted(DEFAULT_SPECS))}")
        return copy.deepcopy(DEFAULT_SPECS[log_format])
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigError(f"--config {path}: cannot read the converter config ({reason})") from None
    try:
        if path.endswith(".json"):
            spec = json.loads(text)
        else:
            import yaml  # only the train command reads YAML

            spec = yaml.safe_load(text)
    except Exception as error:
        raise ConfigError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {error}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("fields"), list):
        raise ConfigError(f"{path}: expected a mapping with a 'fields' list "
                          "(see docs/converters.md)")
    spec.setdefault("format", log_format)
    return spec


class FitPlan:
    """What ``Featurizer.fit`` learns from the records of any mask over the records the plan was made
    from (training fits a model on each fold, and again each screening round)."""

    def __init__(self, converters: list[ConverterFitPlan]):
        self.converters = converters

    def learned(self, mask: Optional[np.ndarray] = None) -> list[dict]:
        return [plan.learned(mask) for plan in self.converters]

    def touched(self, first: list[dict], second: list[dict]) -> np.ndarray:
        """Positions (ascending) of the records whose features differ between two learned states."""
        parts = [plan.touched(a, b) for plan, a, b in zip(self.converters, first, second)]
        return np.unique(np.concatenate([np.zeros(0, np.int64), *parts]))


class Featurizer:
    def __init__(self, spec: dict, max_line_chars: int = DEFAULT_MAX_LINE_CHARS, native: Optional[bool] = None,
                 also_fields: Sequence[str] = (), message_levels: bool = True):
        """``native``: True/False forces the compiled or the Python featurizer (the same
        features); None uses the compiled one when built (see features/native.py). ``also_fields``:
        fields read beside the featurizer's (windows and clients), found under their aliases too;
        ``message_levels``: a syslog message's level word is read for them (models trained since)."""
        self.log_format = spec.get("format", "plain")
        self.dense_dims = int(spec.get("dense_dims", DEFAULT_DENSE_DIMS))
        self.max_field_chars = int(spec.get("max_field_chars", DEFAULT_MAX_FIELD_CHARS))
        self.converters: list[Converter] = []
        self.aliases: dict[str, tuple[str, ...]] = {}  # field -> other names records give it (the spec's own)
        for entry in spec.get("fields", []):
            if not isinstance(entry, dict) or "field" not in entry:
                raise ConfigError(f"each entry of 'fields' needs a 'field' name; got {entry!r}")
            for converter_spec in entry.get("converters", []):
                self.converters.append(make_converter(str(entry["field"]), converter_spec))
            if entry.get("aliases"):
                self.aliases[str(entry["field"])] = field_aliases(entry)
        if not self.converters:
            raise ConfigError("the featurizer spec has no converters; name at least one field")
        self.fields = list(dict.fromkeys(c.field for c in self.converters))
        self.native = compiled.module(native)
        for converter in self.converters:
            converter.accelerate(self.native)
        # NOTE: set by training for access models: "combined" where its records held user agents. Fluentd's
        # apache2 parser sends null for both of a combined line's "-" "-" and for a common line's missing
        # pair; read as the common format, 32 of 2,000 normal combined lines scored up to 0.96 behind
        # Fluentd where their raw lines scored less. Only the model knows which layout its log writes.
        self.access_layout = spec.get("access_layout")
        if self.access_layout not in (None, "combined", "common"):
            raise ConfigError(f"access_layout {self.access_layout!r}: give combined or common, or leave it out "
                              "(train sets it from the log)")
        self.normalizer = RecordNormalizer(self.log_format, self.fields, max_line_chars, also_fields, self.native,
                                           self.aliases, message_levels, combined=self.access_layout == "combined")
        # NOTE: a model of a common-format log learned no referer nor agent: every agent was new to it, and
        # once the site's LogFormat became combined it flagged 102 of 2,000 normal lines (5 as common).
        # It reads them as the lines it learned, without those two; the first such records are logged.
        self._unlearned = tuple(name for name in COMBINED_ONLY if name in self.fields) \
            if self.access_layout == "common" else ()
        self._unlearned_said = False
        self.sessions = SessionSpec.from_dict(spec["sessions"]) if spec.get("sessions") else None

    def spec(self) -> dict:
        fields = [{"field": name, **({"aliases": list(self.aliases[name])} if name in self.aliases else {}),
                   "converters": [c.spec() for c in self.converters if c.field == name]} for name in self.fields]
        spec = {"format": self.log_format, "dense_dims": self.dense_dims,
                "max_field_chars": self.max_field_chars, "fields": fields}
        if self.sessions is not None:
            spec["sessions"] = self.sessions.as_dict()
        if self.access_layout is not None:
            spec["access_layout"] = self.access_layout
        return spec

    @property
    def numeric_columns(self) -> int:
        return sum(1 for c in self.converters if c.kind == "numeric")

    @property
    def width(self) -> int:
        return self.dense_dims + self.numeric_columns

    def field_values(self, records: Sequence[object]) -> tuple[dict[str, list], list[bool], list[bool]]:
        """Each wanted field as a column of text (None where absent), cut to max_field_chars."""
        values, parsed, truncated, _, _ = self.normalized_values(records, with_fields=False)
        return values, parsed, truncated

    def normalized_values(self, records: Sequence[object], with_fields: bool = True, columns: Sequence[str] = ()
                          ) -> tuple[dict[str, list], list[bool], list[bool], Optional[list], Optional[dict]]:
        """field_values; ``with_fields``, the records' normalized field maps; and ``columns``, other
        fields as whole text columns (windows and clients read them: ``records.text_columns`` of
        the field maps). NOTE: the compiled path reads only the fields asked for, without field maps."""
        if self.native is not None and not with_fields:
            normalizer = self.normalizer
            lines = normalizer.carried_lines(records, columns)
            found, parsed, truncated = self.native.access_columns(
                lines, (*self.fields, *columns), self.log_format == "access", self.max_field_chars,
                normalizer.max_line_chars, normalizer.normalize_one, to_text, len(self.fields))
            extra = dict(zip(columns, found[len(self.fields):])) if columns else None
            if extra:
                normalizer.carried_raw_lines(records, lines, extra)
            return self._as_learned(dict(zip(self.fields, found))), parsed, truncated, None, extra
        batch = self.normalizer.normalize(records)
        truncated = batch.truncated
        limit = self.max_field_chars
        values = text_columns(batch.fields, self.fields)
        for column in values.values():
            if any(v is not None and len(v) > limit for v in column):
                for row, value in enumerate(column):
                    if value is not None and len(value) > limit:
                        column[row] = value[:limit]
                        truncated[row] = True
        extra = text_columns(batch.fields, columns) if columns else None
        return self._as_learned(values), batch.parsed, truncated, batch.fields if with_fields else None, extra

    def _as_learned(self, values: dict[str, list]) -> dict[str, list]:
        """The columns as the model's log wrote them: a common-format model's without a referer or agent."""
        for name in self._unlearned:
            column = values[name]
            if not self._unlearned_said and any(value is not None for value in column):
                self._unlearned_said = True
                logging.getLogger("logscore").warning(
                    "records carry %s, which this model's common-format log did not: they are scored without "
                    "them; to score them too, retrain on the log as it is now written (logscore train)",
                    " and ".join(self._unlearned), extra={"fields": list(self._unlearned)})
            values[name] = [None] * len(column)
        return values

    def fit(self, records: Sequence[object]) -> None:
        self.apply(self.fit_plan(records).learned())

    def fit_plan(self, records: Sequence[object]) -> "FitPlan":
        """What ``fit`` learns from any subset of ``records``."""
        values, _, _ = self.field_values(records)
        return FitPlan([converter.fit_plan(values[converter.field]) for converter in self.converters])

    def apply(self, learned: list[dict]) -> None:
        """Take on the converters' states a ``FitPlan`` learned."""
        for converter, state in zip(self.converters, learned):
            converter.apply(state)
            converter.forget()

    def learned(self) -> list[dict]:
        return [converter.learned() for converter in self.converters]

    def transform(self, records: Sequence[object], dense: bool = True, with_fields: bool = False,
                  columns: Sequence[str] = ()) -> FeatureBatch:
        """The records' features; ``with_fields`` keeps their normalized field maps in ``batch.fields``,
        ``columns`` names fields kept as text columns in ``batch.columns`` (see normalized_values)."""
        values, parsed, truncated, fields, extra = self.normalized_values(records, with_fields, tuple(columns))
        sink = FeatureSink(len(records), self.dense_dims, self.native, self.converters)
        sink.truncated[:] = truncated
        sink.unparsed[:] = [not ok for ok in parsed]
        distinct_by_field = {}
        for name, column in values.items():
            # Each field's distinct values are found once and shared by its converters.
            if len(column) == 1:  # one record (a latency-bound call): its value is the one distinct value
                distinct_by_field[name] = (ONE_RECORD_IDS, column)
                continue
            if self.native is not None:
                ids, distinct = self.native.distinct(column)
                distinct_by_field[name] = (np.frombuffer(ids, dtype=np.int64), distinct)
                continue
            index: dict = {}
            ids = np.fromiter((index.setdefault(v, len(index)) for v in column), dtype=np.int64,
                              count=len(column))
            distinct_by_field[name] = (ids, list(index))
        for converter in self.converters:
            ids, distinct = distinct_by_field[converter.field]
            converter.transform(ids, distinct, values[converter.field], sink)
        batch = sink.build(dense)
        batch.fields = fields
        batch.columns = extra
        return batch
