"""Feedback at scale (issue #14): the rules are indexed by what they match on, so a flagged record
checks only the entries that can match it. Checked against a matcher that compares every record
with every entry, straight from the definitions: the same flags, scores, notes and entries named."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from logscore import feedback
from logscore.errors import InvalidRequest
from logscore.feedback import (KEEP, NORMAL, SIMILARITY, Entry, FeedbackStep, RuleSet, base_name, in_scope,
                               pattern_from_records, similar_counts)
from logscore.model import Model

from .generate import access_line, attack_lines

ROUTES = ("", "web", "shop")
ENTITIES = (None, "", "tenant-a", "tenant-b")
AGENTS = ("internal-monitor/2.0", "uptime-bot/1.1", "curl/8.0")


def odd_lines(rng: random.Random, count: int) -> list[str]:
    """Requests of pages and agents the shop never saw, of a few kinds that repeat (so entries match)."""
    lines = []
    for _ in range(count):
        section = rng.choice(["compare", "wishlist", "gift", "press"])
        url = rng.choice([f"/{section}/{rng.randint(1, 9)}.html", f"/products/{rng.randint(1, 500)}/{section}?"
                          f"{rng.choice(['with', 'view', 'ref'])}={rng.randint(1, 99)}", f"/api/{section}/..%2f"])
        line = access_line(rng, rng.choice(["GET", "POST"]), url)
        if rng.random() < 0.3:
            line = line.rsplit('"', 2)[0] + f'"{rng.choice(AGENTS)}"'
        lines.append(line)
    return lines


class ReferenceStep(FeedbackStep):
    """The matching done the straightforward way: every in-scope entry of the model checked per record."""

    def _matches(self, found, candidates, kinds, model_rules):
        keys = found.batch.keys
        drop = np.zeros(len(keys), dtype=bool)
        suppressors = [[] for _ in candidates]
        keepers = [[] for _ in candidates]
        withheld = ["" for _ in candidates]
        names = {found.model.name, base_name(found.model.name), ""}
        entries = [e for e in self.rules.entries if e.model in names]
        if not model_rules:
            return drop, suppressors, keepers, withheld
        fields = found.key_fields()
        for row, i in enumerate(candidates.tolist()):
            start, stop = int(found.bounds[row]), int(found.bounds[row + 1])
            mine_keys = keys[start:stop].tolist()
            scope = [e for e in entries if in_scope(e, self.route(i), self.entity(i))]
            by_keys = [e for e in scope if "keys" in e.pattern]
            by_field = [e for e in scope if "field" in e.pattern and found.values[e.pattern["field"]][row]
                        == e.pattern["value"]]
            kind = kinds[row]
            kept = {e.id for e in by_keys if e.verdict == KEEP
                    and similar_counts(len(kind & set(e.pattern["kind"])), len(kind | set(e.pattern["kind"])))}
            kept |= {e.id for e in by_field if e.verdict == KEEP}
            if kept:
                keepers[row] = sorted(kept)
                continue
            normal = [e for e in by_keys if e.verdict == NORMAL]
            # a keep protects its keys no normal entry in scope names
            protected = {k for e in by_keys if e.verdict == KEEP for k in e.pattern["keys"]} - {
                k for e in normal for k in e.pattern["keys"]}
            guarded = (found.contribution[start:stop] > 0) & np.isin(keys[start:stop], list(protected))
            mine = (found.contribution[start:stop] > 0) & ~guarded
            used, named = set(), np.zeros(stop - start, dtype=bool)
            for offset, key in enumerate(mine_keys):
                naming = {e.id for e in normal if key in e.pattern["keys"]}
                if mine[offset] and naming:
                    used |= naming
                    named[offset] = True
            whole = set()
            for token in kinds[row]:
                naming = {e.id for e in normal if token in e.pattern["kind"]}
                if not naming:
                    whole = set()
                    break
                whole |= naming
            if not whole and all(found.detail[k] for k in found.unusual(row, feedback.KIND_SIZE)):
                for e in normal:
                    shared = len(set(mine_keys) & {t for t in e.pattern["kind"] if isinstance(t, int)})
                    if shared and shared >= SIMILARITY * sum(isinstance(t, int) for t in e.pattern["kind"]):
                        whole.add(e.id)
            if whole:  # an attack-like url feature no entry names: only what they name goes
                attacks = found.attack_like(row, mine & ~named)
                if attacks:
                    withheld[row] = (f"not suppressed by feedback {feedback.rule_list(sorted(whole))}: attack-like, "
                                     f"which it does not name: {attacks[0]}", [])
                    whole = set()
            for e in by_field:
                if e.verdict == NORMAL:
                    named |= np.array([f == e.pattern["field"] for f in fields[start:stop]], dtype=bool) & mine
                    used.add(e.id)
            drop[start:stop] = mine if whole else named
            if whole:  # ...except what a kind marked normal stands for: the page's own keys, details
                released = guarded & (np.isin(keys[start:stop], list(found.page_keys(row))) | found.detail[start:stop])
                drop[start:stop] |= released
                held = [k for k in keys[start:stop][guarded & ~released].tolist()]
                ids = sorted({e.id for e in by_keys if e.verdict == KEEP for k in held if k in e.pattern["keys"]})
                if ids:
                    withheld[row] = (f"kept by feedback {feedback.rule_list(ids)}", ids)
            if drop[start:stop].any():
                suppressors[row] = SimpleNamespace(ids=lambda ids=sorted(used | whole): ids)
        return drop, suppressors, keepers, withheld


def random_entries(rng: random.Random, model: Model, normal: list[str], keep: list[str], count: int) -> list[Entry]:
    """Entries of records marked normal (pages and agents) or keep (attacks), of field values; scoped or not."""
    entries = []
    values = model.featurizer.field_values(normal + keep)[0]
    while len(entries) < count:
        verdict = rng.choice([NORMAL] * 4 + [KEEP])
        if rng.random() < 0.1:
            field = rng.choice(["user_agent", "status"])
            pattern = {"field": field, "value": rng.choice(values[field])}
        else:
            try:
                pattern = pattern_from_records(model, rng.sample(normal if verdict == NORMAL else keep,
                                                                 rng.choice([1, 1, 2])))
            except InvalidRequest:  # nothing unusual in them
                continue
        entries.append(Entry(len(entries) + 1, verdict, pattern, "t", model=rng.choice(["shop", "shop", ""]),
                             route=rng.choice(ROUTES + ("", "")), entity=rng.choice(["", "", "", "tenant-a"])))
    return entries


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_indexed_rules_decide_as_a_matcher_comparing_every_entry(shop_model_path, shop_training_lines, seed):
    model = Model.load(shop_model_path)
    rng = random.Random(seed)
    odd = odd_lines(rng, 160)
    attacks = [line for _, line in attack_lines(shop_training_lines, 80, seed=seed)]
    rules = RuleSet(random_entries(rng, model, odd[:60], attacks[:40], 60))
    records = odd[40:] + attacks[20:] + rng.sample(shop_training_lines, 40)
    routes = [rng.choice(ROUTES) for _ in records]
    entities = [rng.choice(ENTITIES) for _ in records]
    scored = model.score(records)
    candidates = np.flatnonzero(scored.is_anomaly)
    assert len(candidates) > 50
    outcomes = []
    for step in (FeedbackStep, ReferenceStep):
        observed, notes, flags = [], [], scored.is_anomaly.copy()
        made = step(rules, records, routes, entities, observe=lambda m, r, flagged, s: observed.extend(flagged))
        scores = made.apply(model, candidates, scored.scores, flags, notes)
        outcomes.append((flags.tolist(), scores.tolist(), notes,
                         [(f.index, f.suppressed_by, f.kept_by) for f in observed]))
    assert outcomes[0] == outcomes[1]
    suppressed = sum("suppressed" in note[2] for note in outcomes[0][2])
    kept = sum("kept" in note[2] for note in outcomes[0][2])
    assert suppressed > 5 and kept > 1, (suppressed, kept)  # both kinds of decision were exercised


def test_a_kind_is_compared_with_few_keep_entries_when_thousands_share_a_token(monkeypatch):
    """A token common to thousands of keep entries (a bot's user agent on pages of every kind): a
    record's kind was compared with every entry naming it (the per-record cost grew with their number)."""
    common = 7
    entries = [Entry(i, KEEP, {"keys": [i + 100], "kind": [common, i + 100, i + 20_000]}, "t", model="m")
               for i in range(1, 3001)]
    rules = RuleSet(entries)
    compared = []
    monkeypatch.setattr(feedback, "similar_counts", lambda shared, union: compared.append(1) or
                        shared >= SIMILARITY * union)
    (model_rules,) = rules.for_model("m")
    found = model_rules.keep_kinds.alike(frozenset([common, 1500 + 100, 99]))
    assert [e.id for e in found] == [1500]
    assert len(compared) <= 3, len(compared)
    assert model_rules.keep_kinds.alike(frozenset([common])) == []


def test_a_reload_parses_only_the_patterns_that_changed(tmp_path, monkeypatch):
    """A sidecar reads every entry on each feedback change: 10,000 patterns were parsed again each time."""
    from logscore import feedback_store
    from logscore.feedback_store import SqliteStore

    store = SqliteStore(str(tmp_path / "feedback.db"))
    store.migrate()
    for i in range(3):
        store.add(Entry(0, NORMAL, {"keys": [i, 10 + i], "kind": [i], "features": [], "examples": [f"a{i}"]}, "t"))
    first = store.entries()
    parsed = []
    reading = feedback_store.read_pattern
    monkeypatch.setattr(feedback_store, "read_pattern", lambda text: parsed.append(text) or reading(text))
    assert store.entries() == first and parsed == []
    # A second mark of entry 1's rule adds its example: that pattern alone is read again.
    again = store.add(Entry(0, NORMAL, {"keys": [0, 10], "kind": [0], "features": [], "examples": ["b0"]}, "t"))
    assert again.existing and again.id == 1
    parsed.clear()
    entries = store.entries()
    assert len(parsed) == 1 and entries[0].pattern["examples"] == ["a0", "b0"]
    assert entries[1:] == first[1:] and entries[1].pattern is not first[1].pattern  # each entry's own


def test_the_review_page_reads_only_the_most_recent_entries_and_says_where_the_rest_are(tmp_path, monkeypatch):
    """The page lists the FEEDBACK_ROWS most recent entries: it read and parsed all of them (10,000 in a
    fleet's store) to show those; now only those are read, and the count it gives is the store's."""
    from logscore import feedback_store
    from logscore.feedback_store import FeedbackService, SqliteStore
    from logscore.review import FEEDBACK_ROWS, render_feedback

    import json
    import sqlite3

    store = SqliteStore(str(tmp_path / "feedback.db"))
    store.migrate()
    with sqlite3.connect(tmp_path / "feedback.db") as connection:  # (one transaction: 1,000 marks take seconds)
        connection.executemany("INSERT INTO feedback (verdict, pattern, author, created_at) VALUES ('normal', ?, "
                               "'t', 0)", [(json.dumps({"field": "status", "value": str(i)}),) for i in range(1000)])
    connection.close()
    service = FeedbackService(store, 1.0)
    service.remove(1000, "ana")  # removed ones are listed too, with who removed them
    read = []
    reading = feedback_store.entry_from_row
    monkeypatch.setattr(feedback_store, "entry_from_row", lambda row, known=None: read.append(1) or reading(row, known))
    entries, total = service.latest(FEEDBACK_ROWS)
    assert len(read) == FEEDBACK_ROWS and total == 1000
    assert [e.id for e in entries] == list(range(1000, 1000 - FEEDBACK_ROWS, -1))
    html = render_feedback(entries, total)
    assert html.count("<tr id=\"feedback-") == FEEDBACK_ROWS and 'id="feedback-1000"' in html
    assert "removed by ana" in html and 'id="feedback-800"' not in html
    assert "The 200 most recent of 1,000 entries" in html
    assert "feedback-more" not in render_feedback(*service.latest(1000))


def test_a_reload_sets_off_no_garbage_collection(tmp_path):
    """Indexing thousands of entries made objects enough to set off collection after collection, of
    the whole heap too: 150-180 of a reload's 450 ms at 10,000 entries."""
    import gc
    import json
    import sqlite3

    from logscore.feedback_store import FeedbackService, SqliteStore

    store = SqliteStore(str(tmp_path / "feedback.db"))
    store.migrate()
    with sqlite3.connect(tmp_path / "feedback.db") as connection:  # (one transaction: 300 marks take seconds)
        connection.executemany("INSERT INTO feedback (verdict, route, pattern, author, created_at) VALUES "
                               "('normal', ?, ?, 't', 0)", [("web" if i % 3 else "", json.dumps(
                                   {"keys": [i, 1000 + i, 7], "kind": [i, "path /x/…"], "features": []}))
                                   for i in range(300)])
    connection.close()
    service = FeedbackService(store, 1.0)
    collections = []
    gc.collect()  # (counts start from nothing)
    gc.callbacks.append(collector := lambda phase, info: phase == "start" and collections.append(info["generation"]))
    try:
        assert service.reload(force=True) and len(service.rules) == 300
    finally:
        gc.callbacks.remove(collector)
    # Young collections only, one at most as the collector comes back from each pause (parsing the
    # rows, indexing them; the store is read unpaused): without the pauses, a dozen, older ones too
    assert collections in ([], [0], [0, 0]) and gc.isenabled(), collections
