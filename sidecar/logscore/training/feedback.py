"""Folding operators' feedback into training (`logscore train --feedback STORE`, and the sidecar's
learner, which runs the same command).

- Records marked **normal** (the examples each entry keeps) join the final fit, each repeated as
  often as a feature must be seen to count as fully normal (the rarity support): the model learns
  them as ordinary traffic. They are left out of calibration, so the threshold keeps its meaning.
  The copies of a record with digits in its URL are variants (``kind_variants``): other digits,
  the URL's structure kept, so the entry teaches its kind, not only its examples' ids.
- Records marked **keep** (true anomalies) are left out of training wherever they appear in the
  input, and the new model must flag them: the summary and the metadata say how many it does.
- Entries past their expiry are left out, as removed ones are: a mark given for a while (a
  migration's traffic, `--expires 2h`) must not become part of the model for good; the summary
  says how many were.
- Field-value entries stay rules: they keep no examples to learn from (with ``--previous-model``, the
  records they unflag in the input are vouched for, as below).
- With the model serving now (``--previous-model``; the learner passes its route's learned model),
  the records it flags, after the feedback's rules, are left out: what an operator saw flagged
  and did not mark normal is not learned as normal. The records it flags that a normal entry's
  rule suppresses are *vouched for* by that verdict: screening never sets them aside, and they
  vouch for their features as the copies do; they are calibrated on as the other records kept (a
  kind marked normal, 30 records of 10,000: screening set 5 aside as a cluster of attacks, and 18 %
  of the kind's later records stayed flagged after the retrain, 11 % with all 30 learned). Not
  those the injection prior marks: a payload that a rule lets through is not learned for it
  (exempted too, 4 more injected lines of 1,125 were missed later over 5 draws of
  benchmarks/feedback_loop.py; 1 without them). But for a new kind of normal traffic: what
  made a flagged record unusual flagged across WIDESPREAD_CLIENTS clients or more (a section
  deployed after the model), neither an injection nor of a client flagged CONCENTRATED_FLAGS
  times (widespread_kinds). Retraining on a log that holds attacks
  otherwise learns them (docs/accuracy.md: 5 % of a real log's lines injected, later recall 0.96 → 0.27).
  Unless that model flags more than PREVIOUS_FLAG_LIMIT of the records: then it is no model of
  this traffic (another site's, a shift since), and its flags are not used, but for those of
  clients it flags CONCENTRATED_FLAGS times or more and far more often than the rest (an attack, a
  scanner): these stay left out. Unless it flags most records: then no client stands out.
"""

from __future__ import annotations

import math
import os
import random
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..decide import decide
from ..errors import ConfigError
from ..feedback import (KEEP, KIND_SIZE, NORMAL, FeedbackStep, RuleSet, base_name, inspect, record_text,
                        url_features)
from ..model import SCORE_CHUNK, Model
from ..records import RAW_LINE_KEYS, RecordNormalizer, as_text
from ..review import grouping_kind
from .prior import InjectionPrior
from .robust import EXAMPLES, example_text

PREVIOUS_FLAG_LIMIT = 0.1  # the previous model flags more of the records: not a model of this traffic
# A client with this many flagged records is an attacker or a scanner, whatever the share flagged: a
# new section's visitors had 1-4 flagged records each, a week's attackers 55-76 and its scanner 137
# (weekone trial), and those put a learned route's window past PREVIOUS_FLAG_LIMIT and were learned.
CONCENTRATED_FLAGS = 10
# Past PREVIOUS_FLAG_LIMIT, a client is left out only when its flagged count stands this many standard
# deviations (binomial, at the overall share) above what that share gives it: counting 10 flags alone
# left out every client with more than 10-23 requests of a new site (probe s26: a CSIC log of 120
# clients, 44.5 % flagged by the shipped model, all 8,000 records). Measured on the probe's cases
# (session 26): real clients under another site's model at 44-47 % flagged stood at most 3.5 above;
# an injected scanner 6.7-15.4; the weekone scanner (137 of 700 at 10.9 %) stands 7.4 above (computed).
FAR_ABOVE_SD = 4.0
# Past this share flagged the model flags most records and every frequent client stands out: the real
# log under a model of a CSIC shop (81 % flagged) put Googlebot and a feed reader 5-9 above.
MOST_FLAGGED = 0.5
# A kind of unusual that the previous model flags in the records of this many distinct clients, each
# flagged fewer than CONCENTRATED_FLAGS times, is a new kind of normal traffic and is learned
# (widespread_kinds). A week's 10,000-record windows (weekone trial): a new shop section's kinds were
# flagged in 13-228 clients' records, long-tail pages in 5-8, the day's attack came from 6 addresses;
# with 5, more long-tail pages were learned and a scanner's later flags fell further (45 of 700 against
# 122 without the rule, 84 with 10).
WIDESPREAD_CLIENTS = 10


@dataclass
class TrainingFeedback:
    store: str
    normal: list = field(default_factory=list)  # records learned as normal
    keep: list = field(default_factory=list)  # records that must stay flagged
    entries: int = 0
    rules: RuleSet = field(default_factory=RuleSet)  # the entries, as the sidecar applies them
    other_models: dict = field(default_factory=dict)  # model name -> active entries this training leaves
    expired: int = 0  # entries of the model past their expiry, left out

    def keep_texts(self) -> set[str]:
        return {record_text(r) for r in self.keep}

    def copies(self, support: float, spec: dict) -> list:
        """The normal records, each repeated enough times to count as seen: the record itself, then
        variants of it with other digits in its URL (``kind_variants``)."""
        return kind_variants(self.normal, spec, max(1, math.ceil(support)))


# Digit runs of a URL that a variant redraws: not those of a percent-encoding ("%2F", "%20").
URL_DIGITS = re.compile(r"(?<!%)(?<!%[0-9A-Fa-f])\d+")
VARIANT_TRIES = 3  # redraws of a variant whose URL structure changed, before the record is repeated as it is
# Copies of a record with digits in its URL, at least: with 5 examples, each digit drawn next to the
# kind's fixed text (``h=7`` of ``with=7…``) is seen in about 10 of 100 (the default support: 5). A
# shop's compare pages, retrained on 20,000 lines without them: 49 % still flagged with the 5
# examples repeated as they were, 6 % with 5 variants each (the support), 0 % with 20.
KIND_VARIANTS = 20


def kind_variants(records: Sequence[object], spec: dict, repeat: int) -> list:
    """Each record ``repeat`` times: itself, then variants whose URL has other digits (each digit run
    redrawn in turn, as long or shorter; KIND_VARIANTS copies at least), its structure kept (flags, template,
    parameter names and value shapes, as an unfitted featurizer reads them: a parameter's enumerated
    values are learned only with the model, after). A kind marked normal is its structure:
    repeated as they were, the examples taught their own ids' n-grams and lengths, and after a
    retrain on a log without the kind half of its other records stayed flagged for those details
    (docs/accuracy.md). Records without digits in a URL are repeated as they are."""
    from ..features import Featurizer

    if not records:
        return []
    featurizer = Featurizer(spec)
    urls = {c.field: c for c in featurizer.converters if c.kind == "url"}
    if not urls:
        return [record for record in records for _ in range(repeat)]
    values = featurizer.field_values(list(records))[0]
    aliases = featurizer.normalizer.aliases
    copies = []
    for row, record in enumerate(records):
        found = {name: values[name][row] for name in urls if values[name][row] and URL_DIGITS.search(values[name][row])}
        rng = random.Random(zlib.crc32(record_text(record).encode("utf-8", "replace")))  # the same model each time
        variants = []
        for _ in range(max(repeat, KIND_VARIANTS) - 1 if found else 0):
            variant = record
            for name, url in found.items():
                variant = with_url(variant, (name, *aliases.get(name, ())), url, url_variant(urls[name], url, rng))
            variants.append(variant)
        if any(variant is not record for variant in variants):
            copies += [record, *variants]
        else:  # (no digits, or none that can change without changing the URL's structure)
            copies += [record] * repeat
    return copies


def url_variant(converter, url: str, rng: random.Random) -> str:
    """``url`` with each digit run redrawn (as long, or shorter) where a draw keeps its structure: one
    run at a time, so a run that cannot change (a version, a hash's digits) leaves the others free."""
    structure = structure_of(converter, url)
    for run in reversed(list(URL_DIGITS.finditer(url))):  # (from the end: the runs before keep their place)
        for _ in range(VARIANT_TRIES):
            # as long half the time: the kind's own lengths stay as common as its examples made them
            length = len(run.group()) if rng.random() < 0.5 else rng.randint(1, len(run.group()))
            digits = "".join(rng.choice("0123456789") for _ in range(length))
            variant = url[:run.start()] + digits + url[run.end():]
            if structure_of(converter, variant) == structure:
                url = variant
                break
    return url


def structure_of(converter, url: str) -> tuple:
    """A URL's structure without its length classes: what a kind of URL is made of."""
    flags, template, params = converter.structure(url)
    return flags, template, tuple((name, shape, enumerated) for name, shape, enumerated, _ in params)


def with_url(record: object, names: Sequence[str], url: str, variant: str) -> object:
    """``record`` with its URL ``url`` replaced by ``variant``: in a raw line, in the field map's URL
    field under one of its ``names`` (Fluentd's apache2 names it ``path``), or in the raw line a
    field map carries (``log``, ``message``: a shipper tailing lines whole)."""
    if variant == url:
        return record
    if isinstance(record, str):  # the URL as a whole word ("/20" is in a timestamp's "/2026" too)
        return re.sub(rf"(?<![\w/]){re.escape(url)}(?=[\s\"']|$)", lambda _: variant, record, count=1)
    if isinstance(record, dict):
        for key in names:
            if record.get(key) == url:
                return {**record, key: variant}
        for key in RAW_LINE_KEYS:
            if isinstance(record.get(key), str):
                return {**record, key: with_url(record[key], names, url, variant)}
    return record


def load_feedback(location: str, model_name: str, must_exist: bool = True,
                  now: Optional[float] = None) -> TrainingFeedback:
    """The active entries of the store that apply to ``model_name`` (or to every model), at ``now``
    (default: the time): neither removed nor expired; ``must_exist``: a store no sidecar made is
    refused (a typo would train with an empty store, and make its tables)."""
    from ..feedback_store import open_store

    if "://" not in location and not os.path.isfile(location):  # a typo would make an empty store
        raise ConfigError(f"--feedback {location}: no such file; a sidecar keeps its feedback beside its models "
                          "(models/feedback.sqlite3) unless --feedback-store says where")
    store = open_store(location, "--feedback")
    if must_exist and not store.holds_schema():
        raise ConfigError(f"--feedback {store.description}: this database holds no logscore feedback (no "
                          "schema_migrations table); check the URL: the sidecars' --feedback-store names it")
    store.migrate()
    now = time.time() if now is None else now
    stored = store.entries()  # (removed ones left out)
    active = [e for e in stored if e.active(now)]
    mine = [e for e in stored if not e.model or base_name(e.model) == base_name(model_name)]
    entries = [e for e in mine if e.active(now)]
    others = Counter(e.model for e in active if e.model and base_name(e.model) != base_name(model_name))
    found = TrainingFeedback(store.description, entries=len(entries), rules=RuleSet(entries, now), other_models=others,
                             expired=len(mine) - len(entries))
    for entry in entries:
        examples = entry.examples()
        if entry.verdict == NORMAL:
            found.normal += examples
        elif entry.verdict == KEEP:
            found.keep += examples
    store.close()
    return found


def leave_out_flagged(sample: list, previous: Model, feedback: Optional[TrainingFeedback], warn,
                      progress=None) -> tuple[list, dict, np.ndarray]:
    """(the records ``previous`` does not flag after the feedback's rules, a summary for the metadata,
    per record kept whether a normal entry's rule suppressed its flag: vouched for by an operator);
    all of them, and a warning, when it flags more than PREVIOUS_FLAG_LIMIT of them."""
    flags, suppressed = flagged_by(previous, sample, feedback.rules if feedback is not None else RuleSet(), progress)
    share = float(flags.mean()) if len(flags) else 0.0
    summary = {"model": previous.name, "version": previous.version, "records": int(flags.sum()),
               "fraction": round(share, 6), "limit": PREVIOUS_FLAG_LIMIT}
    if suppressed.any():
        summary["vouched_by_feedback"] = int(suppressed.sum())
    if share > PREVIOUS_FLAG_LIMIT:
        out, clients = concentrated_flags(previous, sample, flags)
        but = (f", but for the {int(out.sum()):,} records of the {len(clients):,} clients it flags "
               f"{CONCENTRATED_FLAGS} times or more and far above that share (an attack or a scanner: "
               f"{', '.join(clients[:3])})" if clients else
               "; it flags most of them, so no client stands out either" if share > MOST_FLAGGED else "")
        warn(f"the previous model {previous.name!r} flags {share:.1%} of the training records (more than "
             f"{PREVIOUS_FLAG_LIMIT:.0%}): it is no model of this traffic, so nothing is left out for its flags{but}")
        examples = [example_text(sample[i]) for i in np.flatnonzero(out)[:EXAMPLES]]
        return ([r for r, left in zip(sample, out) if not left],
                {**summary, "records": int(out.sum()), "ignored": True, "clients": clients[:EXAMPLES],
                 "client_count": len(clients), "client_flags": CONCENTRATED_FLAGS, "examples": examples},
                suppressed[~out])
    learned, kinds = widespread_kinds(previous, sample, flags)
    out = flags & ~learned
    examples = [example_text(sample[i]) for i in np.flatnonzero(out)[:EXAMPLES]]
    summary = {**summary, "records": int(out.sum()), "examples": examples}
    if learned.any():
        summary["learned_widespread"] = {
            "records": int(learned.sum()), "min_clients": WIDESPREAD_CLIENTS, "kinds": kinds[:EXAMPLES],
            "examples": [example_text(sample[i]) for i in np.flatnonzero(learned)[:EXAMPLES]]}
    return [r for r, left in zip(sample, out) if not left], summary, suppressed[~out]


def client_reader(model: Model):
    """record -> its client (remote_addr or an alias), "" where it names none."""
    normalizer = RecordNormalizer(model.featurizer.log_format, (), also=("remote_addr",))
    return lambda record: as_text(normalizer.normalize_one(record)[0].get("remote_addr")) or ""


def widespread_kinds(model: Model, records: Sequence[object], flags: np.ndarray) -> tuple[np.ndarray, list]:
    """(which flagged records are of a new kind of normal traffic, to be learned; those kinds' tokens
    with their client counts, most clients first).

    A flagged record is learned when every token of what made it unusual (its kind, as the review
    page groups it: a new section's path, a parameter's shape, a user agent's token) is flagged in
    the records of WIDESPREAD_CLIENTS distinct clients or more, none of them counted when flagged
    CONCENTRATED_FLAGS times or more (an attacker, a scanner). Never a record of such a client, nor one
    holding a request feature the injection prior marks (a quote, ``..``, a shell metacharacter):
    a payload family sprayed from many addresses stays out. The cost: a probe of one plain path (no
    injection mark) from WIDESPREAD_CLIENTS addresses or more, each under CONCENTRATED_FLAGS
    requests flagged, is learned (docs/accuracy.md)."""
    learned = np.zeros(len(records), dtype=bool)
    flagged = np.flatnonzero(flags)
    if not len(flagged):
        return learned, []
    client_of = client_reader(model)
    clients = [client_of(records[i]) for i in flagged]
    counts = Counter(clients)
    light = [(int(i), c) for i, c in zip(flagged, clients) if c and counts[c] < CONCENTRATED_FLAGS]
    if len({c for _, c in light}) < WIDESPREAD_CLIENTS:
        return learned, []
    found = inspect(model, [records[i] for i, _ in light])
    kinds = [where_and_kind(found, row) for row in range(len(light))]
    marked = injection_marked(found.batch, len(light))
    seen_by: dict = {}
    for (_, client), kind in zip(light, kinds):
        for token in kind:
            seen_by.setdefault(token, set()).add(client)
    widespread = {t for t, by in seen_by.items() if len(by) >= WIDESPREAD_CLIENTS}
    for row, ((index, _), kind) in enumerate(zip(light, kinds)):
        learned[index] = kind <= widespread and structural(found, row) and not marked[row]
    named = sorted(((str(t), len(seen_by[t])) for t in widespread), key=lambda pair: -pair[1])
    return learned, named


PLACES = ("path ", "parameters ")  # kind tokens naming where on the site: a new section, page, set of parameters


def where_and_kind(found, row: int) -> frozenset:
    """The record's kind as the review page groups it, with the page it was unusual on when its kind
    names none: a parameter's odd shape is a new kind of normal where one page of many clients shows
    it, not where payloads are put on every page (fuzzdb's on 50 clients' lines in
    benchmarks/feedback_loop.py, seed 4: learned, 16 of 205 injected lines were no longer flagged)."""
    kind = grouping_kind(found.kind(row))
    if any(isinstance(token, str) and token.startswith(PLACES) for token in kind):
        return kind
    unusual = {int(k) for k in found.batch.keys[found.unusual(row, KIND_SIZE)]}
    for converter in found.model.featurizer.converters:
        value = found.value_of(converter, row) if converter.kind == "url" else None
        if value is not None:
            template, template_level, _, _ = url_features(converter, value)
            if unusual & template_level:
                return kind | {f"page {template}"}
    return kind


def structural(found, row: int) -> bool:
    """Whether what made the record unusual names a structure (a path, a parameter, a shape, a token):
    a record unusual in details only (n-grams) has its most unusual n-grams for a kind, which names no
    page or client software, and a payload family shares its n-grams over whatever lines carry it."""
    unusual = found.unusual(row, KIND_SIZE)
    return bool(len(unusual)) and not found.detail[unusual].all()


def injection_marked(batch, size: int) -> np.ndarray:
    """bool [size]: the record holds a request feature the injection prior marks, however often seen."""
    prior = InjectionPrior()
    prior.observe(batch)
    holding = np.isin(batch.keys, prior.marked_keys())
    return np.bincount(batch.rows[holding], minlength=size).astype(bool)[:size]


def concentrated_flags(model: Model, records: Sequence[object], flags: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(which records are of a client flagged CONCENTRATED_FLAGS times or more and far above the
    overall share (stands_out), those clients, most flagged first); none where the records name no
    client (remote_addr or an alias), nor when the model flags most records (MOST_FLAGGED)."""
    share = float(flags.mean()) if len(flags) else 0.0
    if share > MOST_FLAGGED:
        return np.zeros(len(records), dtype=bool), []
    client_of = client_reader(model)
    clients = [client_of(r) for r in records]
    counts, totals = Counter(c for c, flag in zip(clients, flags) if flag), Counter(clients)
    heavy = [c for c, n in counts.most_common()
             if c and n >= CONCENTRATED_FLAGS and stands_out(n, totals[c], share)]
    if not heavy:
        return np.zeros(len(records), dtype=bool), []
    # Every record of such a client, flagged or not: a scanner's requests the model did not flag
    # (/backup.zip, /admin.php answered 404) are of the scan too, and learned they unflagged the rest
    # (a week's scanner: 137 of 700 flagged, 0 after such a retrain, 17 had only its flagged ones gone).
    chosen = set(heavy)
    out = np.fromiter((c in chosen for c in clients), dtype=bool, count=len(records))
    return out, heavy


def stands_out(flagged: int, records: int, share: float) -> bool:
    """Whether ``flagged`` of a client's ``records`` is FAR_ABOVE_SD standard deviations above what the
    overall ``share`` flagged gives it (a binomial count)."""
    expected = records * share
    spread = math.sqrt(max(records * share * (1.0 - share), 1e-12))
    return (flagged - expected) / spread >= FAR_ABOVE_SD


def flagged_by(model: Model, records: Sequence[object], rules: RuleSet,
               progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(whether ``model`` flags each record, the operators' rules applied (as the sidecar decides),
    whether a rule cleared the flag its score gave: suppressed by a normal entry)."""
    flags, suppressed = [np.zeros(0, dtype=bool)], [np.zeros(0, dtype=bool)]
    for start in range(0, len(records), SCORE_CHUNK):
        part = records[start: start + SCORE_CHUNK]
        scored = model.score(part)
        decided = decide(model, scored, feedback=FeedbackStep(rules, part)).is_anomaly
        flags.append(decided)
        suppressed.append(scored.is_anomaly & ~decided)  # (only a normal rule clears a flag here)
        if progress is not None:
            progress("scoring with the previous model", start + len(part), len(records), "records")
    return np.concatenate(flags), np.concatenate(suppressed)


def check_previous(previous: Model, spec: dict, name: str) -> None:
    """The previous model must read the records as this training does, and be of the same name."""
    if previous.sessions is not None or spec.get("sessions"):
        raise ConfigError("--previous-model: session models score sessions, not records; leave it out")
    if previous.featurizer.log_format != spec.get("format"):
        raise ConfigError(f"--previous-model {previous.name!r} reads {previous.featurizer.log_format} records; this "
                          f"training reads {spec.get('format')} (give the model serving these records)")
    if base_name(previous.name) != base_name(name):
        raise ConfigError(f"--previous-model is model {previous.name!r}, this training makes {name!r}: give the "
                          "model this one replaces (feedback entries are kept per model name)")
