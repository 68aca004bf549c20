"""One settings object for `logscore serve`: flags > LOGSCORE_* environment > YAML file > defaults.

Each field's docstring-like help (the ``help`` metadata) is what `logscore serve --help`
prints and what docs/operations.md lists.
"""

from __future__ import annotations

import difflib
import hmac
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from .admission import WIRE_COPIES
from .artifact import DEFAULT_MAX_MODEL_BYTES
from .errors import ConfigError
from .resources import default_models_dir

ENV_PREFIX = "LOGSCORE_"
DEFAULT_MODELS_DIR = str(default_models_dir())


def setting(default: Any, help: str, **extra) -> Any:
    factory = extra.pop("factory", None)
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def likely_meant(name: str, known: Iterable[str]) -> Optional[str]:
    """The known name a mistyped one most likely meant, if any is close (TOKENFILE: TOKEN_FILE; FOO:
    none, though a few of its letters are FORWARD's)."""
    return next(iter(difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)), None)


def unknown_settings(unknown: list[str], known: list[str], file: Optional[str]) -> str:
    """What was not understood, the setting each most likely meant (a typo is the usual cause), and
    the other causes: a key of a newer logscore's documentation."""
    guesses = []
    for name in unknown:
        meant = likely_meant(name, known)
        guesses.append(f"{name} (did you mean {meant}?)" if meant else name)
    where = f" in {file}" if file else ""
    return (f"unknown setting(s){where}: {', '.join(guesses)}; `logscore serve --help` and docs/operations.md "
            "list this version's settings (a setting of a newer logscore needs that version)")


MIN_MESSAGE_BYTES = 16 * 1024
MIN_LEARN_WINDOW_BYTES = 1024 * 1024


@dataclass
class Settings:
    models_dir: str = setting(DEFAULT_MODELS_DIR, "directory of .onnx models to load and watch")
    socket: Optional[str] = setting("/tmp/logscore.sock", "Unix socket path for gRPC; empty to disable (then set "
                                    "--tcp: every sidecar serves gRPC, which logscore client and feedback use, "
                                    "forward mode too)")
    socket_mode: str = setting("0660", "file mode of the Unix socket (octal)")
    tcp: Optional[str] = setting(None, "host:port for gRPC over TCP (e.g. 127.0.0.1:50051); off by default")
    http: Optional[str] = setting("127.0.0.1:9095", "host:port for HTTP: /metrics, /healthz, /readyz; empty to disable")
    forward: Optional[str] = setting(None, "host:port to receive the Fluentd forward protocol (Fluent Bit, "
                                     "Docker's fluentd driver); needs --forward-to")
    forward_to: Optional[str] = setting(None, "host:port of the next forward receiver; scored records go "
                                        "there and senders are acked only after it acked")
    forward_ack_timeout_s: float = setting(10.0, "how long the next hop may make no progress (no ack, none of "
                                           "the bytes sent read) while something is outstanding; after a failure "
                                           "the next hop counts as down for a backoff (0.5 s doubling to 30 s, once "
                                           "per attempt)")
    forward_idle_timeout_s: float = setting(60.0, "a forward connection that sends nothing this long is closed")
    forward_max_message_bytes: int = setting(16 * 1024 * 1024, "largest forward message accepted (a sender's "
                                             "chunk: keep its chunk_limit_size below); compressed payloads may "
                                             "inflate to 64 times this")
    forward_when_busy: str = setting("wait", "when the scoring queue is full: 'wait' (hold the sender, whose "
                                     "buffer keeps the backlog) or 'pass' (pass records on marked unscored)")
    forward_explain: int = setting(3, "features forward mode names in anomaly_explanation of each flagged record "
                                   "(unflagged records get none, and cost nothing for it); 0: none")
    tls_cert: Optional[str] = setting(None, "PEM certificate for TLS on the TCP and HTTP listeners")
    tls_key: Optional[str] = setting(None, "PEM private key for --tls-cert")
    tls_client_ca: Optional[str] = setting(None, "PEM CA bundle: require client certificates signed by it (mutual TLS)")
    token_file: Optional[str] = setting(None, "file holding a bearer token that every call must present")
    default_model: Optional[str] = setting(None, "model for requests naming none and matching no tag route "
                                           "(default: apache-access if loaded, else the only model)")
    tag_routes: dict = setting(None, "tag glob -> model name, first match wins (YAML mapping; "
                               "env/flag: 'web.*=apache-access,sys.*=syslog')", factory=dict)
    entity_field: Optional[str] = setting(None, "record field selecting per-entity models "
                                          "'<model>@<value>' (e.g. host)")
    max_batch_records: int = setting(4096, "most records scored in one model call")
    max_wait_ms: float = setting(0.0, "extra wait to fill a batch when the model is idle (0: none; "
                                 "requests arriving while a batch runs are coalesced anyway)")
    inline_max_records: int = setting(8, "a request of at most this many records that finds its model idle "
                                      "is scored on the event loop (faster than a thread hand-off); 0: never")
    scoring_processes: int = setting(0, "worker processes that featurize and score (each loads the models: about "
                                     "90 MiB more apiece); 0: score in the sidecar's own process, on one core at "
                                     "a time. 2 gave 1.3-1.5x the records/s of novel traffic on a shared 2-core "
                                     "machine, nothing on repetitive traffic (docs/performance.md)")
    max_queued_records: int = setting(200_000, "records waiting per model before RESOURCE_EXHAUSTED")
    max_records_per_request: int = setting(20_000, "records in one request before INVALID_ARGUMENT")
    max_record_bytes: int = setting(65_536, "a longer raw line is cut to this many characters before it is parsed "
                                    "and noted `truncated` (`logscore score --max-record-bytes`: the same rule)")
    max_message_bytes: int = setting(2 * 1024 * 1024, "largest gRPC message or HTTP body accepted")
    max_inflight_bytes: int = setting(32 * 1024 * 1024, "memory the requests being decoded, queued or scored "
                                      "may hold, estimated from their size and number of values (gRPC and HTTP; the "
                                      "forward port has its own bounds: two connections read at a time, "
                                      "forward_max_message_bytes); "
                                      "past it a request is refused RESOURCE_EXHAUSTED / 429 (one alone over it, "
                                      "which no wait lets in: INVALID_ARGUMENT / 400)")
    max_connections: int = setting(512, "connections open at once on each of the HTTP and forward ports (about "
                                   "28 KiB each while idle); past it a new one is closed at once, counted and logged")
    max_grpc_connections: int = setting(32, "connections open at once on each gRPC listener (TCP, Unix socket); "
                                        "past it gRPC closes a new one at once (its client sees UNAVAILABLE 'Socket "
                                        "closed'), and the sidecar warns, at most every 10 s, while a listener is full. "
                                        "Each connection may hold about 2.4 MiB of messages its calls have not "
                                        "been admitted for yet")
    max_grpc_calls: int = setting(64, "gRPC calls in progress at once, event watchers included (at most a quarter "
                                  "of them: WatchAnomalies past that is refused) and each ScoreStream for as long "
                                  "as it is open, idle or not; health checks (Health/Check) take no place, a "
                                  "Health/Watch stream one; past it a call is refused RESOURCE_EXHAUSTED at once, "
                                  "before its message is read, counted and logged (gRPC holds each call's "
                                  "message, up to max_message_bytes, while it arrives, before the in-flight "
                                  "budget sees it)")
    max_model_bytes: int = setting(DEFAULT_MAX_MODEL_BYTES, "a model file larger than this is refused before it "
                                   "is read (files are read whole into memory; logscore's models are a few MB)")
    reload_interval_s: float = setting(2.0, "how often the models directory is checked for changes (0: "
                                       "only on SIGHUP)")
    shutdown_grace_s: float = setting(10.0, "on SIGTERM, time given to in-flight calls")
    log_level: str = setting("info", "debug, info, warning or error")
    learn: bool = setting(False, "learn each route's own model from the traffic it sees (needs the train extra and "
                          "a writable --models-dir of yours); until it is ready, records are scored but not flagged "
                          "(note `learning`)")
    learn_records: int = setting(5000, "records a route collects before its first learned model is trained")
    learn_window: int = setting(10_000, "recent records kept per route for learning and retraining, within "
                                "learn_window_bytes")
    learn_window_bytes: int = setting(32 * 1024 * 1024, "memory each route's window may take, as estimated "
                                      "(an access line about 0.3 KB, a map of 8 short fields about 1.1 KB, of 740 "
                                      "numbers about 85 KB); past it the oldest records go. A route whose window "
                                      "holds fewer than learn_records within it cannot learn: it says so once, "
                                      "/readyz shows it, and its flags are no longer held")
    learn_retrain_records: int = setting(100_000, "retrain a learned route on its recent window after this many "
                                         "new records (drift), and once its window holds 1.5 times what its "
                                         "model learned from; 0: never")
    learn_max_flag_ratio: float = setting(3.0, "a candidate flagging more than this many times the serving "
                                          "model's share of recent records (or of its target FPR) is kept aside "
                                          "and reported, not swapped")
    learn_max_first_flagged: float = setting(0.7, "a route's first candidate is kept aside, and the route's flags "
                                             "no longer held, when the serving model flags more than this share "
                                             "of the records it learned from (a window of attacks, not the site's "
                                             "traffic); 1: never")
    feedback_store: Optional[str] = setting(None, "where feedback lives: a SQLite file path, or a postgresql:// URL "
                                            "shared by a fleet (needs the postgres extra); default: "
                                            "feedback.sqlite3 in --models-dir")
    feedback_poll_s: float = setting(0.5, "how often the feedback store is checked for changes (PostgreSQL "
                                     "pushes them at once with LISTEN/NOTIFY, and is checked every 5 s while "
                                     "it does, or at an entry's expiry)")
    feedback_max_entries: int = setting(10_000, "feedback entries in force the store may hold: a new mark past it is "
                                        "refused (409 / FAILED_PRECONDITION) saying what to do, and each reload "
                                        "warns past 90 %; every sidecar keeps every entry in memory and reads them "
                                        "all again on each change")
    review_records: int = setting(2000, "recent flagged records the review page (/ui/) keeps and groups; "
                                  "0: no review page")
    review_inspect_per_s: float = setting(200.0, "flagged records per second the review page inspects and groups "
                                          "at most (about 150 µs each); in a flood the rest are counted as not "
                                          "grouped. A model with feedback entries in force has every flagged "
                                          "record inspected")
    learn_max_routes: int = setting(8, "per-entity routes learned at most (with --entity-field); records of further "
                                    "entities are neither kept nor held. While entities wait for a slot, a route "
                                    "without learn_records of its own within 4 × learn_records × learn_max_routes "
                                    "of its model's records with the entity field gives its slot up")
    # Behaviour over time (issue #15): models trained with --windows / --entities.
    windows: bool = setting(True, "watch windows and clients of models that carry window or client detectors "
                            "(logscore train --windows/--entities); events on /v1/anomalies and WatchAnomalies")
    window_max_keys: int = setting(1000, "keys counted per model at most (trained keys kept; when full, a new "
                                   "key with records of its own evicts the least busy quarter of the others, "
                                   "whose counts go to their dimension=(other))")
    entity_key: Optional[str] = setting(None, "record field naming a client (default: the model's, as trained, "
                                        "e.g. remote_addr)")
    entity_max_clients: int = setting(65_536, "clients tracked per model at most (about 100 bytes each); the least "
                                      "recently seen are evicted")
    episodes_file: Optional[str] = setting(".episodes.json", "file keeping the window episodes under way over a "
                                           "restart, so that one is not announced again (a relative path is in "
                                           "--models-dir); empty: none kept")
    anomaly_recent: int = setting(1000, "anomaly events kept of each kind (window, client) for GET /v1/anomalies "
                                        "and WatchAnomalies' replay")
    anomaly_watcher_queue: int = setting(1000, "events a slow watcher may have waiting; past it its oldest are "
                                         "dropped and the next one it gets says how many (dropped_before)")
    time_zone: str = setting("local", "zone of record times written without one (syslog's, ISO 8601 without an "
                             "offset, Python's and Java's default log times): 'local' (this machine's, as "
                             "Fluentd's parsers read them), 'UTC', or a name such as Europe/Berlin")
    forward_events_tag: Optional[str] = setting("logscore.anomaly", "forward mode passes anomaly events on to the "
                                                "next hop as records of this tag; empty: not")

    @classmethod
    def load(cls, file: Optional[str] = None, flags: Optional[Mapping[str, Any]] = None,
             environ: Optional[Mapping[str, str]] = None) -> "Settings":
        values: dict[str, Any] = {}
        if file:
            values.update(_read_yaml(file))
        environ = os.environ if environ is None else environ
        for spec in fields(cls):
            name = ENV_PREFIX + spec.name.upper()
            if name in environ:
                values[spec.name] = environ[name]
        values.update({k: v for k, v in (flags or {}).items() if v is not None})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(unknown_settings(sorted(unknown), [f.name for f in fields(cls)], file))
        settings = cls()
        for spec in fields(cls):
            if spec.name in values:
                setattr(settings, spec.name, _coerce(spec, values[spec.name]))
        settings.validate()
        return settings

    def _validate_forward_explain(self) -> None:
        from .scoring import MAX_EXPLAIN  # here, not at the top: scoring imports this module

        if not 0 <= self.forward_explain <= MAX_EXPLAIN:
            raise ConfigError(f"forward_explain {self.forward_explain}: name 0 to {MAX_EXPLAIN} features "
                              "per flagged record")

    def validate(self) -> None:
        if not Path(self.models_dir).is_dir():
            # a model's own path given for its directory (--models-dir models/apache-access.onnx) was
            # reported as a directory that "does not exist", beside the file the operator could see
            if Path(self.models_dir).exists():
                raise ConfigError(f"models directory {self.models_dir!r} is a file, not a directory; set "
                                  "--models-dir to the directory holding the .onnx models")
            raise ConfigError(f"models directory {self.models_dir!r} does not exist; set --models-dir")
        if not (self.socket or self.tcp):
            raise ConfigError("no gRPC listener: set --socket and/or --tcp (forward mode needs one too: "
                              "`logscore feedback` and `logscore client` reach the sidecar through it)")
        if bool(self.forward) != bool(self.forward_to):
            raise ConfigError("--forward (receive) and --forward-to (next hop) go together")
        if self.forward_when_busy not in ("wait", "pass"):
            raise ConfigError(f"forward_when_busy: {self.forward_when_busy!r}; use 'wait' or 'pass'")
        self._validate_forward_explain()
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "token_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"{name.replace('_', '-')}: {path!r} is not a readable file")
        for name in ("max_batch_records", "max_queued_records", "max_records_per_request", "max_record_bytes",
                     "forward_max_message_bytes", "max_grpc_calls", "max_grpc_connections", "max_model_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.max_message_bytes < MIN_MESSAGE_BYTES:
            # (a feedback entry's scope, sent whole even when the entry is cut down, needs up to ~9 kB)
            raise ConfigError(f"max_message_bytes must be at least {MIN_MESSAGE_BYTES} (16 KiB), not "
                              f"{self.max_message_bytes}")
        if self.max_message_bytes * WIRE_COPIES > self.max_inflight_bytes:
            raise ConfigError(f"max_inflight_bytes {self.max_inflight_bytes} cannot admit a message of "
                              f"max_message_bytes {self.max_message_bytes} ({WIRE_COPIES} copies once decoded); "
                              f"raise it to at least {self.max_message_bytes * WIRE_COPIES}")
        if not 0 <= self.scoring_processes <= 64:
            raise ConfigError(f"scoring_processes must be 0 (score in the sidecar itself) to 64, "
                              f"not {self.scoring_processes}")
        self._validate_durations()
        if self.feedback_poll_s <= 0 or self.review_records < 0:
            raise ConfigError("feedback_poll_s must be above 0 and review_records at least 0")
        if self.feedback_max_entries < 1:
            raise ConfigError(f"feedback_max_entries must be at least 1, not {self.feedback_max_entries}")
        if self.review_inspect_per_s < 1:
            raise ConfigError(f"review_inspect_per_s must be at least 1, not {self.review_inspect_per_s:g} "
                              "(the review page would group nothing); 0 review_records turns the page off")
        self._validate_listeners()
        self._validate_tls()
        self.validate_behaviour()
        self.validate_learning()
        if self.token_file:
            try:
                token = self.token()
            except (OSError, UnicodeError) as error:
                raise ConfigError(f"--token-file {self.token_file}: cannot read it ({error})") from None
            if not token:
                raise ConfigError(f"--token-file {self.token_file}: the file is empty; write the token into it, "
                                  "or drop --token-file to run without authentication")

    # Waits that 0 turns off (no reload but on SIGHUP, no wait to fill a batch, no grace), and the forward
    # timeouts, after which a next hop or a sender counts as gone: 0 would fail every one at once.
    MAY_BE_ZERO = ("reload_interval_s", "max_wait_ms", "shutdown_grace_s")
    ABOVE_ZERO = ("forward_ack_timeout_s", "forward_idle_timeout_s")

    def _validate_durations(self) -> None:
        """NOTE: reload_interval_s -1 was taken: the sidecar checked its models in a busy loop (45,000
        checks in 8 s, 65 % of a core). `not value >= 0` refuses NaN too."""
        for name in self.MAY_BE_ZERO + self.ABOVE_ZERO:
            value, least = getattr(self, name), "above 0" if name in self.ABOVE_ZERO else "0 or more"
            if not (value > 0 if name in self.ABOVE_ZERO else value >= 0):
                unit = "milliseconds" if name.endswith("_ms") else "seconds"
                raise ConfigError(f"{name} {value:g}: give {least} {unit} (--{name.replace('_', '-')})")

    def _validate_listeners(self) -> None:
        """Syntax of addresses, modes and levels: wrong ones are refused before anything binds."""
        for name in ("tcp", "http", "forward", "forward_to"):
            address = getattr(self, name)
            if address:
                split_host_port(address, "--" + name.replace("_", "-"))
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"--log-level {self.log_level!r}: use one of {', '.join(LOG_LEVELS)}")
        try:
            mode = int(self.socket_mode, 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o777:
            raise ConfigError(f"--socket-mode {self.socket_mode!r}: give an octal file mode such as 0660")

    def _validate_tls(self) -> None:
        if not self.tls_cert:
            return
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.tls_cert, self.tls_key)
        except (ssl.SSLError, OSError) as error:
            raise ConfigError(f"--tls-cert {self.tls_cert} / --tls-key {self.tls_key}: cannot be used together "
                              f"({getattr(error, 'reason', None) or error}); give the PEM certificate and the "
                              "private key it was made for") from None
        if self.tls_client_ca:
            try:
                ssl.create_default_context(cafile=self.tls_client_ca)
            except (ssl.SSLError, OSError) as error:
                raise ConfigError(f"--tls-client-ca {self.tls_client_ca}: not a PEM CA bundle ({error})") from None

    def validate_learning(self) -> None:
        if self.learn_records < 100:
            raise ConfigError(f"learn_records must be at least 100 (a model needs some traffic), "
                              f"not {self.learn_records}")
        if self.learn_window < self.learn_records:
            raise ConfigError(f"learn_window ({self.learn_window}) must hold at least learn_records "
                              f"({self.learn_records})")
        if self.learn_window_bytes < MIN_LEARN_WINDOW_BYTES:
            raise ConfigError(f"learn_window_bytes must be at least {MIN_LEARN_WINDOW_BYTES} (1 MiB; a window's "
                              f"records take up to a few hundred KB each), not {self.learn_window_bytes}")
        if not 0.0 < self.learn_max_first_flagged <= 1.0:
            raise ConfigError(f"learn_max_first_flagged is a share of records, above 0 and at most 1 (1: never "
                              f"kept aside), not {self.learn_max_first_flagged}")
        if self.learn_max_flag_ratio <= 1.0 or self.learn_max_routes < 1 or self.learn_retrain_records < 0:
            raise ConfigError("learn_max_flag_ratio must be above 1, learn_max_routes at least 1 and "
                              "learn_retrain_records at least 0")

    def validate_behaviour(self) -> None:
        from .timestamps import zone_named

        zone_named(self.time_zone)  # a ConfigError naming what to give
        for name in ("window_max_keys", "entity_max_clients", "anomaly_recent", "anomaly_watcher_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.entity_max_clients < self.max_records_per_request:
            raise ConfigError(f"entity_max_clients ({self.entity_max_clients}) must hold at least one request's "
                              f"clients: max_records_per_request is {self.max_records_per_request}")

    def token(self) -> Optional[str]:
        return Path(self.token_file).read_text().strip() if self.token_file else None


def bearer_matches(presented: str, token: str) -> bool:
    """Whether an Authorization value (HTTP header, gRPC metadata) carries the token; the scheme's
    case does not matter (RFC 9110), the comparison takes the same time whatever matches."""
    scheme, _, credentials = presented.strip().partition(" ")
    return hmac.compare_digest(f"{scheme.lower()} {credentials.strip()}".encode(), f"bearer {token}".encode())


LOG_LEVELS = ("debug", "info", "warning", "error")


# LOGSCORE_* variables that are not settings: read by the featurizer, the setup and test scripts.
# Kubernetes sets these in every pod of a namespace holding a Service named logscore.
KUBERNETES_SERVICE_VARIABLES = ("LOGSCORE_SERVICE_", "LOGSCORE_PORT")
OTHER_VARIABLES = {"LOGSCORE_PURE_PYTHON", "LOGSCORE_PYTHON", "LOGSCORE_FUZZ_EXAMPLES", "LOGSCORE_BENCH_TRAINING",
                   "LOGSCORE_WITH_RUBY", "LOGSCORE_WITH_BROWSER_AND_DB", "LOGSCORE_WITH_SHIPPERS"}


def unknown_variables(environ: Optional[Mapping[str, str]] = None) -> list[tuple[str, Optional[str]]]:
    """LOGSCORE_* variables that name no setting, each with the setting's variable it likely meant:
    a typo in a unit's or manifest's environment (LOGSCORE_TOKENFILE) was ignored without a word, and the
    sidecar ran without what it asked for (a token, here)."""
    environ = os.environ if environ is None else environ
    known = {spec.name.upper() for spec in fields(Settings)}
    unknown = sorted(name for name in environ if name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX):] not in known
                     and name not in OTHER_VARIABLES and not name.startswith(KUBERNETES_SERVICE_VARIABLES))
    # (names compared past the prefix they share: with it, every name was close to some setting's)
    meant = [likely_meant(name[len(ENV_PREFIX):], known) for name in unknown]
    return [(name, ENV_PREFIX + guess if guess else None) for name, guess in zip(unknown, meant)]


def split_host_port(address: str, flag: str) -> tuple[str, int]:
    """(host, port) of 'host:port'; a ConfigError naming ``flag`` otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{flag} {address!r}: give host:port, e.g. 127.0.0.1:9095 (port 0-65535)")
    return host.strip("[]"), int(port)


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"settings file {path}: {error}") from None
    except UnicodeDecodeError as error:  # (a model's path given for --config: a traceback)
        raise ConfigError(f"settings file {path}: not UTF-8 text (byte {error.start}: {error.reason}); give "
                          "the YAML settings file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"settings file {path}: expected a mapping of setting: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"setting {name}: {value!r} is not true or false")


def _mapping(name: str, value: Any) -> dict:
    """A YAML mapping, or 'glob=model,glob=model' from a flag or the environment (tag routes)."""
    if not isinstance(value, str):
        return dict(value)
    pairs = [[part.strip() for part in item.split("=", 1)] for item in value.split(",") if item.strip()]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise ConfigError(f"setting {name}: {value!r} is not a list of GLOB=MODEL pairs, e.g. "
                          "'web.*=apache-access,sys.*=syslog'")
    return dict(pairs)


def _coerce(spec, value: Any) -> Any:
    kind = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", "")
    try:
        if kind == "bool":
            return _boolean(spec.name, value)
        if "dict" in kind:
            return _mapping(spec.name, value)
        if "int" in kind:
            return int(value)
        if "float" in kind:
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {spec.name}: {value!r} is not a valid {kind}") from None
    if value == "" and "Optional" in kind:
        return None
    return str(value) if value is not None else None
