"""When a model flags far more records than it was trained to, it is likely another site's or
another log's model: `logscore score` says so at the end of a file, the sidecar in its log and
/readyz (the shipped default model flagged 22 % of a shop's requests, and the sidecar said nothing)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional, Sequence

# Past this share of records flagged (and MISMATCH_RATIO times the model's target FPR, up to
# MISMATCH_MOST, with at least MISMATCH_RECORDS scored), the model is no model of this log.
MISMATCH_SHARE = 0.2
MISMATCH_RATIO = 20
MISMATCH_MOST = 0.5  # (a model trained for 5 % false positives or more: never past all records)
MISMATCH_RECORDS = 100

# The sidecar judges each model on blocks of this many records, and logs at most once per interval.
SERVE_BLOCK_RECORDS = 1000
SERVE_LOG_INTERVAL_S = 600.0
IDLE_S = 60.0  # a model sent no records this long no longer floods (its records routed to another)
# Routes judged apart, at most (tags come from shippers, some of them per record): records of
# further tags are judged together, under OTHER_ROUTES.
MAX_ROUTES = 256
OTHER_ROUTES = "*"
# Versions of one model remembered as judged: the old and new score side by side only for a
# moment while a model is replaced, and a learned route swaps in a new version at every retrain.
RECENT_VERSIONS = 4

log = logging.getLogger("logscore.serve")


def target_fpr(model) -> float:
    return float(model.metadata.get("calibration", {}).get("target_fpr") or 0.001)


def mismatch_share(target: float) -> float:
    """The share of flagged records past which a model trained for ``target`` is taken for the wrong one."""
    return max(MISMATCH_SHARE, min(MISMATCH_MOST, MISMATCH_RATIO * target))


def is_flood(target: float, flagged: int, scored: int) -> bool:
    return scored >= MISMATCH_RECORDS and flagged >= scored * mismatch_share(target)


def flood_warning(name: str, log_format: str, target: float, flagged: int, scored: int,
                  trained_on: Sequence[str] = ()) -> Optional[str]:
    """What to check when most records are flagged (`logscore score` and `logscore client`). NOTE: a
    plain model reads any line, so another log scored with it gives no "did not parse" note: 2,942
    of 3,000 access lines were flagged by a Zookeeper model, silently."""
    if not is_flood(target, flagged, scored):
        return None
    inputs = f" (trained on {', '.join(trained_on)}, format {log_format})" if trained_on else f" (format {log_format})"
    return (f"{flagged:,} of {scored:,} records flagged ({flagged / scored:.1%}), where the model expects about "
            f"{target:.1%} of normal records: check that {name}{inputs} is the model for this log, or train "
            f"one on it (logscore train --input FILE --format ...)")


TRAIN_YOUR_OWN = ("model flags far more records than it was trained to: unless an attack or an incident fills this "
                  "traffic (the review page at /ui/ shows what is flagged), it is not a model of it (another site or "
                  "log); train one on your own log (logscore train --input FILE --format FORMAT --out "
                  "MODELS_DIR/NAME.onnx) and send the records to it (the Fluentd filter's `model NAME`, or "
                  "--tag-routes 'TAG=NAME' / --default-model when the sidecar next starts)")
ANOTHER_LOG = TRAIN_YOUR_OWN + ", or serve with --learn (docs/operations.md: Learning on arrival)"
# With --learn on, what applies instead of "serve with --learn" (the route's state: learning.Route)
FIRST_KEPT_ASIDE = ("; --learn is on, but route {route}'s first learned model was kept aside (the serving model "
                    "flagged more of its window than learn_max_first_flagged {limit:g}: it looked like an attack), "
                    "so its flags are no longer held. If this traffic is the site's own, copy the kept-aside model "
                    "{kept} to {models_dir}/{route}.onnx (it serves as the route's own), or raise "
                    "learn_max_first_flagged (1: never kept aside)")
TRAININGS_FAILED = ("; --learn is on, but route {route}'s trainings failed {failures} times in a row, so its flags "
                    "are no longer held: /readyz `learning` says why")
STILL_LEARNING = "; --learn is on: /readyz `learning` says how far route {route} is from a model of its own"
LEARNED_HERE = ("model learned from this traffic flags far more records than it was trained to: an incident, an "
                "attack or a new kind of traffic fills it (the review page at /ui/ shows what is flagged; a burst of "
                "one error also raises a window event); a kind marked normal there is no longer flagged, and is "
                "learned at the next retrain")

# The same two pieces of advice on the review page's banner, below its count of flagged records
OTHER_LOG_FLOODING = ("unless an attack or an incident fills this traffic (the groups below show which), it is not a "
                      "model of it. Train one on your own log and send the records to it, or serve with --learn.")
LEARNED_FLOODING = ("it learned from this traffic, so an incident, an attack or a new kind of traffic fills it (the "
                    "groups below show which); a kind marked normal is no longer flagged, and is learned at the next "
                    "retrain.")


# ... and while --learn is on (it cannot be told to serve with --learn: what FloodWatch's log line says, shorter)
LEARNING_ON_FLOODING = ("unless an attack or an incident fills this traffic (the groups below show which), it is not a "
                        "model of it. --learn is on: /readyz `learning` says how far its route is from a model of "
                        "its own, or why its flags are no longer held.")


def flood_advice_on_page(learned: bool, learning_on: bool = False) -> str:
    if learned:
        return LEARNED_FLOODING
    return LEARNING_ON_FLOODING if learning_on else OTHER_LOG_FLOODING


def flood_message(model, learner=None) -> str:
    """The warning for a flooding block. NOTE: an attack in full swing floods a block too (the review page
    tells the two apart); and a model learned from the route's own traffic is no other site's model: told to
    train on its own log or serve with --learn, the operator of a learned syslog route whose host logged 400
    lines of one error in 10 s (a field trial) was sent to do what the sidecar was already doing. With
    ``learner`` (learning.Learner: --learn on), the route's state says what applies instead (probe s26: a
    first model kept aside, its flags released, the warning said "or serve with --learn")."""
    if learned_here(model):
        return LEARNED_HERE
    return ANOTHER_LOG if learner is None else TRAIN_YOUR_OWN + learning_advice(learner, model)


def learning_advice(learner, model) -> str:
    """What applies to the flooding model's own route while --learn is on (learning.Route's state)."""
    route = learner.routes_by_name.get(model.name)
    if route is not None and route.first_kept_aside:
        settings = learner.settings
        return FIRST_KEPT_ASIDE.format(route=model.name, limit=settings.learn_max_first_flagged,
                                       kept=(route.last or {}).get("kept_as", "(see /readyz `learning`)"),
                                       models_dir=settings.models_dir)
    if route is not None and route.releases_flags():
        return TRAININGS_FAILED.format(route=model.name, failures=route.failures)
    return STILL_LEARNING.format(route=model.name)


def learned_here(model) -> bool:
    """Whether the model was learned from its route's own traffic (serve --learn)."""
    return bool(model.metadata.get("training", {}).get("learned_route"))


class FloodWatch:
    """Per model and route (the records' tag), the flagged share of its last complete block of
    records; a block past the mismatch share is logged (once per SERVE_LOG_INTERVAL_S per model and
    route) and shown on /readyz. Routes are judged apart because one model often serves several
    logs (the default model, every tag): a tag of another log's records flooded unseen when a busy
    tag of the model's own log filled the same block with records it scored well."""

    def __init__(self, block_records: int = SERVE_BLOCK_RECORDS, log_interval_s: float = SERVE_LOG_INTERVAL_S):
        self.block_records = block_records
        self.log_interval_s = log_interval_s
        self._lock = threading.Lock()
        self._counts: dict[tuple, list[int]] = {}  # (model name, route) -> [scored, flagged] of the open block
        self._versions: dict[str, list] = {}  # model name -> the last RECENT_VERSIONS versions judged (old
        #                                       and new score a moment side by side while a model is replaced)
        self._flooding: dict[tuple, dict] = {}  # (model name, route) -> its last block, while that block flooded
        self._logged_at: dict[tuple, float] = {}
        self._seen_at: dict[tuple, float] = {}  # (model name, route) -> when it last scored records
        self.learner = None  # learning.Learner when --learn is on (ScoringService sets it): flood_message

    def observe(self, model, scored: int, flagged: int, route: str = "") -> None:
        """``route``: the records' tag ("" when they came without one)."""
        now = time.monotonic()
        key = (model.name, route)
        with self._lock:
            if model.version not in self._versions.get(model.name, ()):
                self._start_version(model)
            if key not in self._counts and len(self._counts) >= MAX_ROUTES:
                key = (model.name, OTHER_ROUTES)
            self._seen_at[key] = now
            counts = self._counts.setdefault(key, [0, 0])
            counts[0] += scored
            counts[1] += flagged
            if counts[0] < self.block_records:
                return
            block_scored, block_flagged = counts
            counts[0] = counts[1] = 0
            if not is_flood(target_fpr(model), block_flagged, block_scored):
                self._flooding.pop(key, None)
                return
            self._flooding[key] = {"version": model.version, "flagged": block_flagged,
                                   "of_records": block_scored, "expected_share": target_fpr(model),
                                   "learned_here": learned_here(model)}
            if now - self._logged_at.get(key, float("-inf")) < self.log_interval_s:
                return
            self._logged_at[key] = now
        log.warning(flood_message(model, self.learner),
                    extra={"model": model.name, "route": route or None, "version": model.version,
                           "flagged": block_flagged, "of_records": block_scored,
                           "flagged_share": round(block_flagged / block_scored, 4),
                           "expected_share": target_fpr(model)})

    def _start_version(self, model) -> None:
        """A new version (retrained, learned, replaced) is judged afresh: the operator who replaced a
        flooding model hears at once whether the new one floods too, not 10 minutes later."""
        versions = self._versions.setdefault(model.name, [])
        versions.append(model.version)
        del versions[:-RECENT_VERSIONS]
        for judged in (self._counts, self._flooding, self._logged_at, self._seen_at):
            for key in [key for key in judged if key[0] == model.name]:
                del judged[key]

    def status(self) -> dict:
        """Models with a route whose last block of records flooded and that still sends records, for
        /readyz: the blocks of those routes added up, and the routes by name ("" for untagged records)."""
        now = time.monotonic()
        flooding: dict[str, dict] = {}
        with self._lock:
            for (name, route), block in sorted(self._flooding.items()):
                if now - self._seen_at.get((name, route), now) > IDLE_S:
                    continue
                total = flooding.setdefault(name, dict(block, flagged=0, of_records=0, routes=[]))
                total["flagged"] += block["flagged"]
                total["of_records"] += block["of_records"]
                total["routes"].append(route)
        return flooding
