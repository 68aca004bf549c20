"""Grouping anomalies by what made them unusual, and the review page (/ui/) over recent ones.

    decide's feedback step ─► ReviewRing.observe(flagged records)    bounded: recent records, groups
    GET /ui/ ─► render_page: groups (count, timeline, examples, "normal" / "keep" buttons),
                the score histogram, the feedback list with undo          (servers/feedback_http.py)

A group is a kind of anomaly: records of one model and route whose unusual structural features
(URL template, parameter shapes and characters, tokens: their kind) are alike (feedback.similar_counts:
half of their union shared, and at most one token of their own) with the group's first record's,
new plain files of a section being alike whatever their file type (feedback.path_family: an
operator calls `config.xsl` and `config.xml` of a new project one kind). Assigning a record costs
a dictionary lookup per feature of its kind (no clustering pass).
`logscore report` groups scored files with the same ``Groups``, by feature names instead of keys.

Whenever the feedback changes, the ring checks the groups no one has marked: a group whose recent
examples the feedback now suppresses is *covered* (by an entry made otherwise: another group's
mark whose pattern names its kind, a field value, an entry sent through the API), and the page
lists it after the groups still awaiting a verdict, so an operator's next mark goes to a group
that needs one (ReviewRing.offered); a group whose every member arrives suppressed is covered as
they arrive (ReviewRing.observe). Before that, the page orders the groups awaiting a verdict by
the records a mark would make normal (``reaches``): a group whose members' kinds another's pattern
names whole counts for that one too, so the mark that covers both comes first and one mark does,
and its entry keeps the covered group's examples, which `logscore train --feedback` learns. A
group whose kind names what an attack may be reaches none (``kind_reading``): an attack on a new
path holds that path's kind, and must not be offered first as a saving.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
import weakref
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .decide import decide
from .errors import GroupOutOfDate
from .feedback import (EXAMPLE_CHARS, MAX_KIND_TOKENS, NO_KEYS, NORMAL, SESSIONS_REFUSAL, FeedbackStep, Flagged,
                       RuleSet, base_name, path_family, record_from_text, record_text, rule_list, similar_counts,
                       strip_rarity)
from .flood import flood_advice_on_page
from .injection import may_be_attack
from .shown import html_text
from .svg import bars, timeline

EXAMPLES = 5
MARK_EXAMPLES = 4 * EXAMPLES  # a normal mark's examples: its group's and those of the groups it reaches
NEW_TOKENS = 1  # a record joins a group when alike and adding at most this many tokens to its kind
NAME_CHARS = 240
GROUP_KEYS = 512  # unusual features a group gathers for its pattern (bounded: 500 groups live at once)
# What a parameter value of a plain variant (a version, a name, a number) holds, by its shape's symbols
# (letters are "a", digits "9"): a group adding a parameter holding any other reaches no other group.
TIMELINE_BUCKETS = 180  # per group: counts per bucket, the most recent kept
TOP_ENTITIES = 5
FEEDBACK_ROWS = 200  # entries the page lists, the most recent
PAGE_GROUPS = 50  # groups a page shows (a page of 500 was 1 MB); /ui/?from=N shows the next
# A review group's id: its number, then the tag of the sidecar process that made it ("g3-5f0c2a").
# Numbers start again at g1 in each process: a page (or `feedback add --group`) from before a
# restart named whatever group now had its number, and marked a group the operator never saw.
GROUP_ID = re.compile(r"g(\d+)-([0-9a-f]+)")
RUN_TAG_BYTES = 3  # six hex digits: a restart reuses a tag once in 16 million


@dataclass
class Example:
    time: float
    text: str
    score: float
    note: str = ""  # suppressed by / kept by
    held: str = ""  # why its model flagged it whatever the feedback when scored: HELD_UNPARSED, HELD_CUT or ""


@dataclass
class Group:
    id: str
    model: str
    route: str
    kind: frozenset  # the first record's kind (feedback.Inspection.kind), by families (grouping_kind)
    names: list[str]  # the first record's most unusual features (cut to NAME_CHARS each)
    first_seen: float
    last_seen: float
    count: int = 0
    suppressed: int = 0
    kept: int = 0
    timeline: "OrderedDict[int, int]" = field(default_factory=OrderedDict)  # bucket start -> count
    examples: deque = field(default_factory=lambda: deque(maxlen=EXAMPLES))
    entities: Counter = field(default_factory=Counter)
    # The union of the members' unusual features (bounded): int64, no Python object per key (500
    # groups of 512 keys held 12 MiB as dicts of ints).
    unusual_keys: np.ndarray = field(default_factory=lambda: NO_KEYS)
    kinds: dict = field(default_factory=dict)  # union of the members' kinds (bounded)
    feedback: list = field(default_factory=list)  # (entry id, verdict) given on this group
    covered_by: list = field(default_factory=list)  # normal entries that suppress its examples (not marked itself)
    number: int = 0  # in order of creation: of groups of one count, the one seen first is listed first
    reach: int = 0  # the records a mark of it would make normal, as the page was last ordered (reaches)
    attack_like: bool = False  # its first record's kind names what an attack may be (kind_reading)
    kind_fields: frozenset = frozenset()  # the fields its first record's kind names features of (kind_reading)
    sessions: bool = False  # a session model's: feedback does not apply to it (no marks offered)
    # The rule (keys, kind, features) of the pattern its mark last took: marked again, it is given again,
    # so the store answers the entry made (records the mark suppressed go on joining, widening the pattern).
    marked_rule: Optional[dict] = None

    def add(self, when: float, bucket_s: float, entity: Optional[str] = None) -> None:
        self.count_member(entity)
        self.first_seen, self.last_seen = min(self.first_seen, when), max(self.last_seen, when)
        bucket = int(when // bucket_s * bucket_s)
        self.timeline[bucket] = self.timeline.get(bucket, 0) + 1
        if len(self.timeline) > TIMELINE_BUCKETS:
            # The earliest bucket goes, not the first added: records come with their own times, a
            # backlog's after later ones.
            del self.timeline[min(self.timeline)]

    def count_member(self, entity: Optional[str]) -> None:
        """Count a member and its entity, not its time (`logscore report` places its records once
        each file is read whole: a record without a time takes its neighbours')."""
        self.count += 1
        if entity:
            self.entities[entity] += 1
            if len(self.entities) > 10 * TOP_ENTITIES:  # keep the heavy hitters, bounded
                self.entities = Counter(dict(self.entities.most_common(TOP_ENTITIES * 5)))

    def pattern(self) -> dict:
        """The feedback pattern of the whole group: every member's unusual features."""
        return {"keys": self.unusual_keys.tolist(), "kind": list(self.kinds)[:MAX_KIND_TOKENS],
                "features": [strip_rarity(n) for n in self.names], "examples": [e.text for e in self.examples]}


def record_time(sent: float, arrival: float) -> float:
    """When a flagged record happened, for its group's timeline, first and last seen and example: the
    time its shipper sent with it (NaN: none), or its arrival when there is none or it is later (a
    sender's clock ahead would keep a group "last seen" in the future)."""
    return sent if 0 < sent <= arrival else arrival


def with_new_keys(keys: np.ndarray, more: np.ndarray, room: int) -> np.ndarray:
    """``keys`` and then, in their order, at most ``room`` of ``more`` not among them yet."""
    # NOTE: sets, not np.isin and np.unique: on a record's few dozen keys numpy's fixed costs were most
    # of the review page's grouping under a flood (docs/performance.md).
    known = set(keys.tolist())
    fresh = []
    for key in more.tolist():
        if key not in known:
            known.add(key)
            fresh.append(key)
            if len(fresh) == room:
                break
    return np.concatenate([keys, np.array(fresh, dtype=np.int64)]) if fresh else keys


def grouping_kind(kind: frozenset) -> frozenset:
    """What a record is grouped by: its kind with plain new paths by family (feedback.path_family)."""
    return frozenset(path_family(token) for token in kind)


def marked_normal(group: Group) -> bool:
    return any(verdict == "normal" for _, verdict in group.feedback)


def awaiting_verdict(group: Group) -> bool:
    """Neither marked nor covered by a mark of another group: what an operator still has to judge."""
    return not group.feedback and not group.covered_by


class Groups:
    """Leader grouping: a record joins the most alike group of its scope (model, route) when alike
    enough (feedback.similar_counts), else it starts a new group. At most ``max_groups``: the group seen
    least recently goes first, or with ``keep_largest`` (a report over a whole file) the smallest
    go, a tenth of them at a time, and are counted in ``dropped_groups`` / ``dropped_records``."""

    def __init__(self, max_groups: int = 500, prefix: str = "g", keep_largest: bool = False, suffix: str = ""):
        self.max_groups = max_groups
        self.keep_largest = keep_largest
        self.dropped_groups = self.dropped_records = 0
        self.prefix, self.suffix = prefix, suffix  # a group's id: prefix, number, suffix
        self.by_id: OrderedDict[str, Group] = OrderedDict()  # least recently seen first
        self._index: dict[tuple, set[str]] = {}  # (scope..., a feature of its kind) -> group ids
        self._next = 1
        self.created = 0

    def assign(self, model: str, route: str, kind: frozenset, names: Callable[[], list[str]], when: float,
               avoid: Optional[Callable[[Group], bool]] = None) -> Group:
        scope = (model, route)
        lists = sorted((self._index.get((*scope, item), ()) for item in kind or (None,)), key=len)
        # A group alike lacks at most NEW_TOKENS of the kind's tokens, so it holds one of any
        # NEW_TOKENS + 1 of them: the groups of the rarest few are all there is to compare (a novel
        # URL's kind shares a common token with most of 500 groups: comparing with every group that
        # shares a token took 0.42 ms a record, these 0.09 ms; docs/performance.md).
        candidates = set().union(*lists[:NEW_TOKENS + 1])
        size = len(kind)
        alike = {}  # group id -> the share of the union its kind and this one share
        for group_id in candidates:
            other = self.by_id[group_id].kind
            common = len(other & kind)
            union = len(other) + size - common
            if common == size == len(other) or (size - common <= NEW_TOKENS and similar_counts(common, union)):
                alike[group_id] = common / max(union, 1)
        best, best_share = None, -1.0
        for group_id in sorted(alike):  # of equal shares, the first id in text order
            group = self.by_id[group_id]
            if avoid is not None and avoid(group):
                continue
            if alike[group_id] > best_share:
                best, best_share = group, alike[group_id]
        if best is not None:
            self.by_id.move_to_end(best.id)
            return best
        # NOTE: named now, and cut: a name can hold a whole value (a 64 KiB URL), and a group lives long.
        named = [n if len(n) <= NAME_CHARS else n[:NAME_CHARS] + "…" for n in names()]
        group = Group(f"{self.prefix}{self._next}{self.suffix}", model, route, kind, named, when, when,
                      number=self._next)
        self._next += 1
        self.created += 1
        self.by_id[group.id] = group
        for item in kind or (None,):
            self._index.setdefault((*scope, item), set()).add(group.id)
        if len(self.by_id) > self.max_groups:
            self._make_room(group)
        return group

    def _make_room(self, new: Group) -> None:
        if not self.keep_largest:
            while len(self.by_id) > self.max_groups:
                self._forget(self.by_id.popitem(last=False)[1])
            return
        # NOTE: one sort per tenth of max_groups new groups; of equal counts the least recent go first.
        smallest = sorted((g for g in self.by_id.values() if g is not new), key=lambda g: g.count)
        for group in smallest[: len(self.by_id) - self.max_groups + self.max_groups // 10]:
            del self.by_id[group.id]
            self._forget(group)
            self.dropped_groups += 1
            self.dropped_records += group.count

    def _forget(self, group: Group) -> None:
        for item in group.kind or (None,):
            ids = self._index.get((group.model, group.route, item))
            if ids is not None:
                ids.discard(group.id)
                if not ids:
                    del self._index[(group.model, group.route, item)]

    def largest(self) -> list[Group]:
        # NOTE: by number, not id: "g10" sorts before "g9".
        return sorted(self.by_id.values(), key=lambda g: (-g.count, g.number))


class ReviewRing:
    """Recent flagged records of the sidecar, grouped; bounded in records and groups. Thread-safe:
    observed on the scoring path, read by the page."""

    def __init__(self, max_records: int = 2000, max_groups: int = 500, bucket_s: float = 60.0,
                 entity_field: Optional[str] = None, on_new_group: Optional[Callable[[str], None]] = None,
                 inspect_per_s: float = 200.0, on_not_grouped: Optional[Callable[[str, int], None]] = None):
        self.run = secrets.token_hex(RUN_TAG_BYTES)  # this process's: in every group id (GROUP_ID)
        self.groups = Groups(max_groups, suffix=f"-{self.run}")
        self.recent: deque = deque(maxlen=max_records)  # (time, group id)
        self.bucket_s = bucket_s
        self.entity_field = entity_field
        self.on_new_group = on_new_group or (lambda model: None)
        self.lock = threading.Lock()
        self.started = time.time()
        # Inspecting a flagged record costs about 150 µs: a model flooding a new site would spend
        # more on the page than on scoring. A token bucket (a second's worth at most) bounds it.
        self.inspect_per_s = inspect_per_s
        self._tokens, self._refilled = inspect_per_s, time.monotonic()
        self.not_grouped: Counter = Counter()  # model -> flagged records over the budget
        self.on_not_grouped = on_not_grouped or (lambda model, n: None)
        # Per base name (a group's model), the model of that name that last sent records, to check
        # groups against new feedback (a weak reference: an unloaded model goes; its groups are then
        # not checked). Not an entity's model (base@entity): its tables are its own.
        self._models: dict[str, weakref.ref] = {}
        self._rechecking = threading.Lock()  # one recheck at a time: the last rules' result stays

    def admit(self, model_name: str, wanted: int, cost: Optional[int] = None) -> int:
        """How many of ``wanted`` flagged records may be inspected now; the rest are counted. ``cost``:
        what the ``wanted`` weigh together, in records of up to feedback.INSPECT_CHARS (``feedback.inspect_cost``);
        those admitted are taken to weigh their share of it."""
        cost = wanted if cost is None else max(cost, wanted)
        with self.lock:
            now = time.monotonic()
            self._tokens = min(self.inspect_per_s, self._tokens + (now - self._refilled) * self.inspect_per_s)
            self._refilled = now
            allowed = wanted if cost <= self._tokens else int(wanted * max(self._tokens, 0) / cost)
            if not allowed and wanted and self._tokens >= self.inspect_per_s:
                allowed = 1  # one line weighing more than the whole bucket was never admitted: it runs a debt
            self._tokens -= allowed * cost / wanted if wanted else 0
            if wanted > allowed:
                self.not_grouped[base_name(model_name)] += wanted - allowed
        if wanted > allowed:
            self.on_not_grouped(model_name, wanted - allowed)
        return allowed

    def observe(self, model, records: Sequence[object], flagged: list[Flagged], step: FeedbackStep) -> None:
        now = time.time()
        when = [record_time(step.time(item.index), now) for item in flagged]
        with self.lock:
            if model.name == base_name(model.name):
                self._models[model.name] = weakref.ref(model)
            for item, moment in zip(flagged, when):
                route = step.route(item.index)
                created = self.groups.created
                # A record still flagged is not of a kind marked normal: it does not join such a group.
                kind = grouping_kind(item.kind)
                group = self.groups.assign(base_name(model.name), route, kind, item.names, moment,
                                           avoid=None if item.suppressed_by else marked_normal)
                if self.groups.created != created:
                    group.attack_like, group.kind_fields = kind_reading(item.kind_features())
                    group.sessions = getattr(model, "sessions", None) is not None
                    self.on_new_group(model.name)
                group.add(moment, self.bucket_s, step.entity(item.index))
                # The group's pattern (what a mark makes normal) takes only members of the first one's
                # kind exactly (a plain new file's type aside): a member adding a token of its own (an
                # attack's character) adds nothing; a member of another file type adds that type too.
                room = GROUP_KEYS - len(group.unusual_keys)
                if room > 0 and kind <= group.kind:
                    group.unusual_keys = with_new_keys(group.unusual_keys, item.unusual_keys, room)
                    group.kinds.update(dict.fromkeys(item.kind))
                note = ""
                if not item.suppressed_by:  # the feedback leaves it flagged: its group needs a verdict again
                    group.covered_by = []
                if item.suppressed_by:
                    group.suppressed += 1
                    note = f"suppressed by feedback {rule_list(item.suppressed_by)}"
                    # Every member so far suppressed (or covered when the feedback last changed): covered
                    # now, not at the next feedback change (a group made after a mark sat at the top,
                    # awaiting a verdict the feedback had already given).
                    if not group.feedback and (group.covered_by or group.suppressed == group.count):
                        group.covered_by = sorted(set(group.covered_by).union(item.suppressed_by))
                elif item.kept_by:
                    group.kept += 1
                    note = f"kept by feedback {rule_list(item.kept_by)}"
                elif item.left_flagged:  # (a probe under a section marked normal: why it was not suppressed)
                    note = item.left_flagged
                group.examples.append(Example(moment, record_text(records[item.index]), item.score, note,
                                              held=item.held))
                self.recent.append((now, group.id))

    def group(self, group_id: str) -> Optional[Group]:
        """The group of that id; None when there is none (never made, or forgotten since). An id of
        another process (a page from before a restart, or from another sidecar of a fleet) is refused:
        its number is another group here."""
        with self.lock:
            found = self.groups.by_id.get(group_id)
        parts = GROUP_ID.fullmatch(group_id)
        if found is None and parts is not None and parts.group(2) != self.run:
            raise GroupOutOfDate(
                f"group {group_id} is from another sidecar process (a restart, or another sidecar of the "
                f"fleet): this one numbers its groups g<N>-{self.run}, and g{parts.group(1)}-{self.run} may be "
                "another group; the page is out of date: reload /ui/ (on a fleet, send the mark to the sidecar "
                "whose page you read; with `logscore feedback add --group`, list the groups at /ui/ again and "
                "give an id from there)")
        return found

    def pattern(self, group: Group, verdict: str) -> dict:
        """What a mark of ``group`` stores: the group's pattern (a group marked already: the rule of that
        mark, so that a second operator's mark is answered with its entry); a normal mark's examples are joined by
        those of the groups awaiting a verdict it reaches (``reached``), at most MARK_EXAMPLES: its
        rule makes their kinds normal, and `logscore train --feedback` learns an entry's kinds from its
        examples (a versioned fonts group's mark taught no new plain font it covered)."""
        with self.lock:
            pattern = group.pattern()
            if group.feedback and group.marked_rule is not None:
                pattern.update(group.marked_rule)
            else:
                group.marked_rule = {name: pattern[name] for name in ("keys", "kind", "features")}
            if verdict == NORMAL:
                # (the group may have been evicted since the page was fetched: then it reaches none)
                awaiting = [g for g in self.groups.largest() if g is not group and awaiting_verdict(g)]
                pattern["examples"] += [e.text for other in reached([group, *awaiting])[group.id]
                                        for e in other.examples]
                pattern["examples"] = pattern["examples"][:MARK_EXAMPLES]
        return pattern

    def marked(self, group_id: str, entry_id: int, verdict: str) -> None:
        with self.lock:
            group = self.groups.by_id.get(group_id)
            if group is not None:
                group.feedback.append((entry_id, verdict))

    def unmarked(self, entry_id: int) -> None:
        """An entry was undone: its groups are no longer marked by it."""
        with self.lock:
            for group in self.groups.by_id.values():
                group.feedback = [(i, v) for i, v in group.feedback if i != entry_id]

    def snapshot(self) -> list[Group]:
        with self.lock:
            return self.groups.largest()

    def offered(self) -> list[Group]:
        """The groups in the page's order: those awaiting a verdict first, the one whose mark would
        reach the most records first (``reach``); then the others, largest first."""
        with self.lock:  # (observe changes the groups' kinds)
            groups = self.groups.largest()
            reach = reaches([group for group in groups if awaiting_verdict(group)])
            for group in groups:
                group.reach = reach.get(group.id, group.count)
        return sorted(groups, key=lambda group: (not awaiting_verdict(group), -group.reach))

    def recheck(self, rules: RuleSet) -> None:
        """Which unmarked groups the feedback now covers: every example of theirs, scored again with
        ``rules`` in force, is no longer flagged, some suppressed by an entry. Examples are the
        group's most recent records, without their entity (entity-scoped entries cover none); one
        cut for display is not the record it was, and its group is not covered."""
        with self._rechecking:
            self._recheck(rules)

    def _recheck(self, rules: RuleSet) -> None:
        with self.lock:
            every = [(group, group.count) for group in self.groups.by_id.values()]
            pending = [(group, [e.text for e in group.examples]) for group, _ in every if not group.feedback]
            models = {name: ref() for name, ref in self._models.items()}
        covered: dict[str, list[int]] = {}
        by_model: dict[str, list] = {}
        for group, texts in pending:
            whole = texts and all(len(text) < EXAMPLE_CHARS for text in texts)
            model = models.get(group.model)
            # (a session model's records are its sessions so far: scored again, they would join them)
            if whole and len(rules) and model is not None and model.sessions is None:
                by_model.setdefault(group.model, []).append((group, texts))
        for name, groups in by_model.items():
            covered.update(covered_by_rules(models[name], groups, rules))
        with self.lock:
            for group, count in every:
                if group.count == count:  # (a record that joined meanwhile was not checked)
                    group.covered_by = covered.get(group.id, [])


def kind_reading(kind_features: list[tuple[str, str]]) -> tuple[bool, frozenset]:
    """(whether a record's kind names what an attack may be, the fields it names features of), from
    its structural features' (converter label, text) (``Inspection.kind_features``): any feature that
    ``injection.may_be_attack`` (the feedback step's attack-like rule, and a parameter value no plain
    name or version: here a false alarm only loses a saving)."""
    return (any(may_be_attack(text) for _, text in kind_features),
            frozenset(label for label, _ in kind_features))


def reached(groups: list[Group]) -> dict[str, list[Group]]:
    """Group id -> the other ``groups`` of its model and route a mark of it would make normal: those
    whose members' kinds its pattern names whole (a group of new fonts under a section, and one of
    fonts with a version parameter that held such a font: the second's mark covers the first, so
    marking it first spares a mark). Found by kind tokens, as the feedback step matches a marked
    kind, without scoring. An attack-like group reaches none and is reached by none: an attack on a
    new path holds that path's kind, and listing it first as a saving would ask an operator to mark
    an attack normal (and its examples would teach `logscore train --feedback` the attack). Nor does
    a group reach one unusual in fewer fields (a new path, and the path with a scanner's user agent,
    which no mark tells): what a mark of it adds lies in the fields the other is unusual in. A group
    unusual in details only names no field (nothing to read): it neither reaches nor is reached."""
    found: dict[str, list[Group]] = {group.id: [] for group in groups}
    groups = [group for group in groups if group.kind_fields and not group.attack_like]
    holding: dict[tuple, list[Group]] = {}  # (model, route, kind token) -> the groups whose kinds hold it
    for group in groups:
        for token in group.kinds:
            holding.setdefault((group.model, group.route, token), []).append(group)
    for covered in groups:
        if not covered.kinds:  # unusual in details only, or a session model's: no kind to name
            continue
        rarest = min(covered.kinds, key=lambda token: len(holding[(covered.model, covered.route, token)]))
        for group in holding[(covered.model, covered.route, rarest)]:
            if (group is not covered and covered.kinds.keys() <= group.kinds.keys()
                    and group.kind_fields <= covered.kind_fields):
                found[group.id].append(covered)
    return found


def reaches(groups: list[Group]) -> dict[str, int]:
    """Group id -> the records a mark of it would make normal: its own and those of the ``groups``
    it reaches (``reached``)."""
    found = reached(groups)
    return {group.id: group.count + sum(other.count for other in found[group.id]) for group in groups}


def covered_by_rules(model, groups: list[tuple[Group, list[str]]], rules: RuleSet) -> dict[str, list[int]]:
    """Group id -> the normal entries suppressing every one of its examples, for the groups they cover."""
    records = [record_from_text(text) for _, texts in groups for text in texts]
    routes = [group.route for group, texts in groups for _ in texts]
    suppressors: dict[int, list[int]] = {}

    def seen(model, records, flagged: list[Flagged], step) -> None:
        suppressors.update((item.index, item.suppressed_by) for item in flagged if item.suppressed_by)

    step = FeedbackStep(rules, records, routes, observe=seen)
    flags = decide(model, model.score(records), feedback=step).is_anomaly
    found, start = {}, 0
    for group, texts in groups:
        span = range(start, start + len(texts))
        start += len(texts)
        ids = sorted({i for row in span for i in suppressors.get(row, ())})
        if ids and not flags[span.start: span.stop].any():
            found[group.id] = ids
    return found


# --- the page ------------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 24px 40px;color:#222;max-width:1200px}
h1{font-size:20px;margin:16px 0 4px}h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid #ddd}
.muted{color:#666}.group{border:1px solid #ddd;border-radius:6px;padding:10px 12px;margin:10px 0}
.group.suppressed{background:#f3f8f3}.head{display:flex;gap:16px;align-items:center;flex-wrap:wrap}
.count{font-size:22px;font-weight:600;min-width:60px}.features{margin:4px 0;padding-left:18px}
.example{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;word-break:break-all;
background:#f7f7f7;padding:4px 6px;margin:3px 0;border-radius:4px}
form.inline{display:inline}button{font:inherit;padding:3px 10px;border-radius:4px;border:1px solid #888;
background:#fff;cursor:pointer}button.normal{border-color:#2e7d32;color:#2e7d32}
button.keep{border-color:#b71c1c;color:#b71c1c}input[type=text]{font:inherit;padding:2px 6px;width:220px}
table{border-collapse:collapse}td,th{border-bottom:1px solid #eee;padding:4px 8px;text-align:left;
vertical-align:top}.badge{font-size:12px;padding:1px 6px;border-radius:8px;background:#eee}
.badge.normal{background:#e3f1e4}.badge.keep{background:#fbe3e3}.flash{background:#fff8d6;padding:6px 10px;
border-radius:4px}
"""


def render_page(ring: ReviewRing, entries: list, total_entries: int, histograms: dict, thresholds: dict,
                status: dict, message: str = "", max_groups: int = PAGE_GROUPS, flooding: Optional[dict] = None,
                learning_on: bool = False, first: int = 0) -> str:
    """The review page: groups of recent anomalies (``max_groups`` of them, from number ``first`` in
    the page's order), the score histogram per model, the feedback list (``entries``, ``total_entries``:
    as ``render_feedback``); ``flooding``: the models flagging far more than trained to
    (``FloodWatch.status``); ``learning_on``: serve --learn (the advice differs)."""
    from .metrics import SCORE_BUCKETS

    groups = ring.offered()
    now = time.time()
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>logscore review</title>"
             f"<style>{STYLE}</style></head><body>",
             "<h1>logscore: recent anomalies</h1>",
             f"<p class=muted>{sum(g.count for g in groups):,} flagged records in {len(groups)} groups since "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(ring.started))} (the most recent "
             f"{ring.recent.maxlen:,} records and {ring.groups.max_groups} groups are kept). "
             f"Feedback store: {html_text(str(status.get('store')))}, "
             f"{'reachable' if status.get('reachable') else 'UNREACHABLE: ' + html_text(str(status.get('error')))}, "
             f"{status.get('active_entries', 0)} active entries.</p>"]
    if ring.not_grouped:
        counts = ", ".join(f"{html_text(model)}: {n:,}" for model, n in sorted(ring.not_grouped.items()))
        advice = "see /readyz `learning`" if learning_on else "retrain it, or serve it with --learn"
        parts.append(f"<p class=flash id=not-grouped>Flagged but not grouped ({counts}): more were flagged than "
                     f"the page inspects ({ring.inspect_per_s:g} a second, review_inspect_per_s), so the groups "
                     "below are a sample. A model flagging this much is likely meeting traffic it was not "
                     f"trained on: {advice}.</p>")
    for model, block in sorted((flooding or {}).items()):
        tagged = [route for route in block["routes"] if route]
        records = f"records tagged {', '.join(map(html_text, tagged))}" if tagged else "records"
        parts.append(f"<p class=flash id=flooding>{html_text(model)} flagged {block['flagged']:,} of its last "
                     f"{block['of_records']:,} {records}, where it expects about {block['expected_share']:.1%}: "
                     f"{flood_advice_on_page(block['learned_here'], learning_on)}</p>")
    if message:
        parts.append(f"<p class=flash id=message>{html_text(message)}</p>")
    parts.append("<h2>Groups</h2>")
    if not groups:
        parts.append("<p class=muted id=no-groups>No anomalies yet.</p>")
    shown = groups[first:first + max_groups]
    if len(shown) < len(groups):
        parts.append(render_groups_shown(len(shown), len(groups), first, max_groups))
    for group in shown:
        parts.append(render_group(group, now, ring.bucket_s, first))
    parts.append("<h2>Score histogram</h2>")
    labels = [f"≤{edge:g}" for edge in SCORE_BUCKETS]  # bucket i: (edge i-1, edge i]
    for model, counts in sorted(histograms.items()):
        threshold = thresholds.get(model)
        first_alert = next((i + 1 for i, edge in enumerate(SCORE_BUCKETS) if threshold is not None
                            and edge >= threshold), None)
        parts.append(f"<p>{html_text(model)} (threshold {threshold}; red: over it)</p>")
        parts.append(bars(labels, [int(c) for c in counts[:len(labels)]], highlight_from=first_alert,
                          title=f"scores of {model}"))
    parts.append("<h2 id=feedback-list>Feedback</h2>")
    parts.append(render_feedback(entries, total_entries, first) if entries or status.get("reachable")
                 else render_feedback_unread(status))
    parts.append("</body></html>")
    return "".join(parts)


def render_groups_shown(shown: int, total: int, first: int, per_page: int) -> str:
    """Which groups the page shows of how many, with links to the others: 50 of 500 were listed, the
    rest unsaid and their ids (what `feedback add --group` takes) nowhere to be read."""
    where = f"{first + 1:,}–{first + shown:,}" if shown else f"none from {first + 1:,}"
    links = []
    if first > 0:
        links.append(f'<a href="/ui/?from={max(0, min(first, total) - per_page)}">previous {per_page}</a>')
    if first + per_page < total:
        links.append(f'<a href="/ui/?from={first + per_page}">next {min(per_page, total - first - per_page)}</a>')
    return (f"<p class=muted id=groups-shown>{shown:,} of {total:,} groups shown ({where}, in the page's order: "
            f"those awaiting a verdict first; the order moves as records arrive). {' · '.join(links)}</p>")


def render_group(group: Group, now: float, bucket_s: float, first: int = 0) -> str:
    marks = "".join(f' <span class="badge {html_text(v)}">marked {html_text(v)} #{i}</span>'
                    for i, v in group.feedback)
    if group.covered_by and not group.feedback:
        marks += f' <span class="badge normal">covered by {rule_list(group.covered_by)}</span>'
    share = f"{group.suppressed:,} suppressed" + (f", {group.kept:,} kept" if group.kept else "")
    if group.reach > group.count:  # why a smaller group comes first: its mark covers groups of its kind too
        share += f"; a mark also covers {group.reach - group.count:,} records of other groups"
    start = now - TIMELINE_BUCKETS * bucket_s
    end = now + bucket_s
    points = [(start, 0)]
    for bucket, count in sorted(group.timeline.items()):  # a step per bucket: zero between them
        if bucket >= start:
            points += [(bucket, 0), (bucket, count), (bucket + bucket_s, count), (bucket + bucket_s, 0)]
    points.append((end, 0))
    # records timed before the timeline (a shipper replaying old logs) leave it flat: it says so
    recent = timeline(points, start, end, label=f"{group.id}: records per minute, last 3 hours",
                      empty_text="none in the last 3 hours")
    names = ("".join(f"<li>{html_text(n)}</li>" for n in group.names)
             or "<li>(no feature named: a session model)</li>")
    css = "group suppressed" if (group.feedback[-1][1] == "normal" if group.feedback else group.covered_by) else "group"
    return (f'<div class="{css}" id="{group.id}" data-group="{group.id}"><div class=head>'
            f'<span class=count>{group.count:,}</span>'
            # the id `logscore feedback add --group` takes: it was only in the timeline's tooltip
            f'<span><span class=gid>{group.id}</span> · '
            f'<b>{html_text(group.model)}</b>{" · route " + html_text(group.route) if group.route else ""}'
            f' · <span class=muted>{share}; first {utc_text(group.first_seen)}, last {utc_text(group.last_seen)} UTC'
            f'</span>{marks}</span>'
            f'{recent}{render_marks(group, first)}</div>'
            f'<ul class=features>{names}</ul>{render_group_examples(group)}</div>')


def render_marks(group: Group, first: int = 0) -> str:
    """The group's normal/keep buttons; none for a session model's, whose marks are refused. ``first``:
    the groups the page passed over, posted back so that the page returns to the same place."""
    if group.sessions:
        return f'<span class="muted no-marks">{html_text(SESSIONS_REFUSAL)}</span>'
    return (f'<form class=inline method=post action="/ui/feedback">'
            f'<input type=hidden name=group value="{group.id}">{place_field(first)}'
            f'<input type=text name=reason placeholder="why (optional)" aria-label="reason"> '
            f'<button class=normal name=verdict value=normal>normal</button> '
            f'<button class=keep name=verdict value=keep>keep</button></form>')


def place_field(first: int) -> str:
    """A form's hidden ``from`` (the groups the page passed over), so that its answer returns there."""
    return f'<input type=hidden name=from value="{int(first)}">' if first > 0 else ""


def utc_text(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def render_group_examples(group: Group) -> str:
    return "".join(
        f"<div class=example>{html_text(e.text)}\n<span class=muted>score {e.score:.4f}"
        f"{' · ' + html_text(e.note) if e.note else ''}"
        f"{' · ' + utc_text(e.time) if e.time else ''}</span></div>"
        for e in reversed(group.examples))


def expiry_cell(entry) -> str:
    """An entry's expiry; one past says so: it no longer applies, though listed (with undo) until removed."""
    if entry.expires_at is None:
        return "never"
    when = entry.as_json()["expires_at"]
    return f"<span class=muted>expired {when}</span>" if entry.expires_at <= time.time() else when


def render_feedback_unread(status: dict) -> str:
    """In place of the feedback table when the store could not be read: "No feedback yet." was shown
    under "N active entries" while the store was down, the entries in force unlisted."""
    active = status.get("active_entries", 0)
    kept = f"; the {active:,} entries last loaded stay in force" if active else ""
    return (f"<p class=muted id=feedback-unread>The feedback entries cannot be listed: "
            f"{html_text(str(status.get('error')))}{kept}.</p>")


def render_feedback(entries: list, total_entries: int, first: int = 0) -> str:
    """The feedback table: ``entries``, the most recent first (``FeedbackService.latest``: at most
    FEEDBACK_ROWS, as a fleet's months of marks made a 5 MB page, 10,000 rows, built on the event
    loop), of ``total_entries`` in the store, removed ones included."""
    if not entries:
        return "<p class=muted id=no-feedback>No feedback yet.</p>"
    rows = ["<table id=feedback><tr><th>#</th><th>verdict</th><th>pattern</th><th>scope</th><th>who, when, why</th>"
            "<th>expires</th><th></th></tr>"]
    for entry in entries:
        data = entry.as_json()
        scope = " · ".join(f"{k} {html_text(str(data[k]))}" for k in ("model", "route", "entity") if data[k]) or "all"
        undo = ("<span class=muted>removed by " + html_text(str(entry.removed_by)) + "</span>"
                if entry.removed_at is not None else
                f'<form class=inline method=post action="/ui/feedback/remove"><input type=hidden name=id '
                f'value="{entry.id}">{place_field(first)}<button name=undo value="{entry.id}">undo</button></form>')
        verdict = html_text(entry.verdict)
        rows.append(f'<tr id="feedback-{entry.id}"><td>{entry.id}</td><td><span class="badge {verdict}">'
                    f'{verdict}</span></td><td>{html_text(entry.describe())}</td><td>{scope}</td>'
                    f'<td>{html_text(entry.author)}, {data["created_at"]}<br>'
                    f'<span class=muted>{html_text(entry.reason)}</span></td><td>{expiry_cell(entry)}</td>'
                    f'<td>{undo}</td></tr>')
    rows.append("</table>")
    if total_entries > len(entries):
        rows.append(f"<p class=muted id=feedback-more>The {len(entries):,} most recent of {total_entries:,} entries "
                    "(removed ones included); all of them: <code>logscore feedback list --all</code> or "
                    "<code>GET /v1/feedback?all=1</code>, a page at a time.</p>")
    return "".join(rows)
