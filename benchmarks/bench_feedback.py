"""What feedback costs and how fast it spreads.

    python benchmarks/bench_feedback.py [--data ../shared/data] [--trials 20] [--no-fleet]

1. Cost on the scoring path (in process, CPU time, one core): the decide step per record, without
   feedback, with the review page's ring only, and with 0 / 5 / 50 / 200 normal entries in force,
   beside scoring itself (featurize + graph) in the same run. Data: the later 45 % of the Elastic
   Apache log with fuzzdb payloads in 5 % of the lines (a model trained on its first 10 %); the
   share of flagged records (only they are inspected) and of never-seen URLs is stated.
2. Spread across a fleet (real processes): a throwaway PostgreSQL cluster, two sidecars sharing it
   as their feedback store; an entry written through the first, then the second scored every 10 ms
   until a record of the marked kind comes back suppressed. Reported: p50 / p99 / max over trials
   (the target: within 1 s, on the next call). The first sidecar applies its own write on the very
   next call (it reloads before answering); checked too.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, percentiles_ms, write_results  # noqa: E402
from benchmarks.feedback_loop import payloads, with_attacks  # noqa: E402
from logscore.decide import decide  # noqa: E402
from logscore.errors import InvalidRequest  # noqa: E402
from logscore.feedback import KEEP, NORMAL, Entry, FeedbackStep, RuleSet, pattern_from_records  # noqa: E402
from logscore.feedback_store import COLUMNS, FeedbackService, SqliteStore  # noqa: E402
from logscore.features import load_spec  # noqa: E402
from logscore.generated.logscore.v1 import scorer_pb2 as pb  # noqa: E402
from logscore.inputs import read_lines  # noqa: E402
from logscore.model import Model  # noqa: E402
from logscore.review import FEEDBACK_ROWS, ReviewRing, render_feedback  # noqa: E402
from logscore.servers.feedback_grpc import encode_entry  # noqa: E402
from logscore.training.train import TrainOptions, save_model, train  # noqa: E402

BATCH = 500
SCALE = (10, 200, 1000, 10_000)
ROUTES = ("web.access", "shop.access", "api.access", "static.access", "admin.access")
WORDS = ("catalog", "orders", "invoice", "press", "careers", "wiki", "forum", "status", "billing", "media", "assets",
         "partners", "support", "legal", "events", "labs", "mirror", "builds", "reports", "gallery", "feeds", "tickets")
EXTENSIONS = ("html", "php", "json", "xml", "css", "js", "png", "pdf", "tar.gz", "deb", "rpm", "txt", "")
PARAMETERS = ("page", "sort", "lang", "ref", "q", "utm_source", "session", "filter", "limit", "offset", "fmt", "v")


def made_up_request(rng: random.Random, serial: int) -> str:
    """A request of a page never seen: each its own kind (a new section, file, parameter set or odd path)."""
    word = f"{rng.choice(WORDS)}{serial}"  # the serial makes every entry's pattern its own
    extension = rng.choice(EXTENSIONS)
    file = f"{rng.choice(WORDS)}-{rng.randrange(100)}" + (f".{extension}" if extension else "")
    style = rng.randrange(5)
    if style == 0:  # a new section
        return f"/{word}/{file}"
    if style == 1:  # a known section, a new page with parameters
        query = "&".join(f"{p}{serial % 7 or ''}={rng.choice(['1', 'asc', 'en', 'x9f3', 'true', '2015-05'])}"
                         for p in rng.sample(PARAMETERS, rng.randint(1, 3)))
        return f"/presentations/{word}/{file}?{query}"
    if style == 2:  # an API path with an id
        return f"/api/v{rng.randint(1, 4)}/{word}/{rng.randrange(10**6)}"
    if style == 3:  # an odd path: a shape of its own
        return f"/{word}/{rng.choice(['~', '@', '+', '%7E', '..;'])}{file}"
    return f"/{word}/{rng.choice(WORDS)}/{file}?id={rng.randrange(10**4)}"


def made_up_line(template: str, rng: random.Random, serial: int) -> str:
    """A line of the log with its request (and, a time in five, its user agent) made up."""
    head, request, tail = template.split('"', 2)
    method, _, protocol = request.split(" ", 2)
    line = f'{head}"{rng.choice([method, method, "POST", "HEAD"])} {made_up_request(rng, serial)} {protocol}"{tail}'
    if rng.random() < 0.2:
        quoted = line.rsplit('"', 2)
        line = f'{quoted[0]}"{rng.choice(WORDS).title()}Bot/{serial % 50}.{rng.randrange(10)} (+https://example.com)"' \
               f"{quoted[2]}"
    return line


def many_entries(model: Model, count: int, groups: list, lines: list[str], seed: int = 0) -> list[Entry]:
    """``count`` distinct entries, each its own pattern, as months of marks leave them: the review
    groups' patterns first (they match the records scored), then records of made-up pages marked
    one by one, and a field value in twenty; a tenth "keep"; a fifth scoped to a route, a tenth to
    an entity; a fifth expiring within a day, one in twenty expired (not in force)."""
    rng = random.Random(seed)
    now = time.time()
    fields = [name for name in model.featurizer.fields if name in ("agent", "user_agent", "ip", "client", "status")]
    entries: list[Entry] = []
    serial = 0
    while len(entries) < count:
        number = len(entries) + 1
        if number <= len(groups):
            pattern, verdict = groups[number - 1].pattern(), NORMAL
            example = groups[number - 1].examples[-1].text
        elif fields and rng.random() < 0.05:
            pattern, verdict = {"field": rng.choice(fields), "value": f"{rng.choice(WORDS)}-{serial}"}, NORMAL
            example = ""
            serial += 1
        else:
            serial += 1
            example = made_up_line(rng.choice(lines), rng, serial)
            try:
                pattern = pattern_from_records(model, [example])
            except InvalidRequest:  # nothing unusual in it: another one
                continue
            verdict = KEEP if rng.random() < 0.1 else NORMAL
        scoped = number > len(groups)
        entry = Entry(number, verdict, pattern, "bench", reason=f"bench entry {number}", model=model.name,
                      route=rng.choice(ROUTES) if scoped and rng.random() < 0.2 else "",
                      entity=f"tenant-{rng.randrange(20)}" if scoped and rng.random() < 0.1 else "",
                      created_at=now - rng.uniform(0, 90 * 86400), example=example)
        luck = rng.random()
        if scoped and luck < 0.05:
            entry.expires_at = now - rng.uniform(1, 86400)
        elif scoped and luck < 0.25:
            entry.expires_at = now + rng.uniform(3600, 86400)
        entries.append(entry)
    return entries


def store_with(path: Path, entries: list[Entry]) -> SqliteStore:
    """A SQLite store holding ``entries``, written in one transaction (marking 10,000 one by one
    would measure the marks, not what reading them back costs)."""
    store = SqliteStore(str(path))
    store.migrate()
    connection = sqlite3.connect(path)
    with connection:
        connection.executemany(
            f"INSERT INTO feedback ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})",
            [(e.id, e.verdict, e.model, e.route, e.entity, json.dumps(e.pattern), e.example, e.author, e.reason,
              e.created_at, e.expires_at, e.removed_at, e.removed_by) for e in entries])
        connection.execute("UPDATE feedback_revision SET revision = revision + 1")
    connection.close()
    return store


def cpu_ms(work, repeats: int = 1) -> float:
    started = time.process_time()
    for _ in range(repeats):
        work()
    return round((time.process_time() - started) / repeats * 1000, 2)


def cpu_us_per_record(work, chunks, repeats: int = 3) -> float:
    started = time.process_time()
    for _ in range(repeats):
        for chunk in chunks:
            work(chunk)
    return round((time.process_time() - started) / repeats / sum(len(c[0]) for c in chunks) * 1e6, 2)


def cost(data: Path, work: Path, counts: tuple = ()) -> dict:
    lines = list(read_lines([str(data / "elastic_apache_access_logs" / "apache_logs")]))
    first, second = int(0.1 * len(lines)), int(0.55 * len(lines))
    rng = random.Random(0)
    pool = payloads(data)
    review, _ = with_attacks(lines[first:second], 0.05, pool, rng)
    later, _ = with_attacks(lines[second:], 0.05, pool, rng)
    proto, _ = train(lines[:first], TrainOptions(spec=load_spec(None, "access"), name="apache-access",
                                                 target_fpr=0.002))
    save_model(proto, work / "apache-access.onnx")
    model = Model.load(work / "apache-access.onnx")

    ring = ReviewRing(100_000, 10_000)  # groups of the review lines: the patterns of the entries
    for start in range(0, len(review), BATCH):
        chunk = review[start: start + BATCH]
        decide(model, model.score(chunk), feedback=FeedbackStep(RuleSet(), chunk, observe=ring.observe,
                                                                inspect_always=True))
    groups = ring.snapshot()
    chunks = [(later[i: i + BATCH], model.score(later[i: i + BATCH])) for i in range(0, len(later), BATCH)]
    flagged = sum(int(s.is_anomaly.sum()) for _, s in chunks) / len(later)
    trained_urls = {line.split('"')[1] for line in lines[:first] if line.count('"') >= 2}
    novel = np.mean([line.split('"')[1] not in trained_urls for line in later if line.count('"') >= 2])

    steady = ReviewRing()  # one ring, as in the sidecar: groups persist across calls
    figures = {"records": len(later), "flagged_share": round(flagged, 4),
               "never_seen_request_share": round(float(novel), 4),
               "score_us_per_record": cpu_us_per_record(lambda c: model.score(c[0]), chunks, 1),
               "decide_us_per_record": {"without_feedback": cpu_us_per_record(lambda c: decide(model, c[1]), chunks),
                                        "review_ring_only": cpu_us_per_record(lambda c: decide(
                                            model, c[1], feedback=FeedbackStep(RuleSet(), c[0], observe=steady.observe,
                                                                               inspect_always=True)), chunks)}}
    for count in (0, 5, 50, 200):
        entries = [Entry(i + 1, NORMAL, groups[i % len(groups)].pattern(), "bench", model="apache-access")
                   for i in range(count)]
        rules = RuleSet(entries)
        figures["decide_us_per_record"][f"{count}_entries"] = cpu_us_per_record(
            lambda c: decide(model, c[1], feedback=FeedbackStep(rules, c[0])), chunks)
    per_flagged = (figures["decide_us_per_record"]["5_entries"] - figures["decide_us_per_record"]["without_feedback"]) \
        / max(flagged, 1e-9)
    figures["decide_us_per_flagged_record_5_entries"] = round(per_flagged, 1)
    if counts:
        figures["scale"] = {str(count): at_scale(model, count, groups, lines[:first], chunks, work) for count in counts}
    return figures


def at_scale(model: Model, count: int, groups: list, lines: list[str], chunks: list, work: Path) -> dict:
    """The cost of ``count`` distinct entries: on the scoring path, on reload, on a mark, in the lists."""
    entries = many_entries(model, count, groups, lines)
    rules = RuleSet(entries)

    def decide_with(chunk, notes=None):
        routes = [ROUTES[i % len(ROUTES)] for i in range(len(chunk[0]))]
        decision = decide(model, chunk[1], feedback=FeedbackStep(rules, chunk[0], routes))
        if notes is not None:
            notes.append((decision.is_anomaly.tolist(), decision.notes, np.round(decision.scores, 6).tolist()))
        return decision

    decisions: list = []
    for chunk in chunks:
        decide_with(chunk, decisions)
    suppressed = sum(str(note).count("suppressed by") for _, notes, _ in decisions for note in notes)
    path = work / f"feedback-{count}.db"
    store = store_with(path, entries)
    service = FeedbackService(store, 1.0)
    started = time.perf_counter()
    loaded = cpu_ms(lambda: service.reload(force=True))  # a sidecar starting
    load_wall = round((time.perf_counter() - started) * 1000, 1)
    # ...and on each feedback change, with the collection of what it made (the collector may be put off)
    reloaded = cpu_ms(lambda: (service.reload(force=True), gc.collect(1)), 3)
    started = time.perf_counter()
    store.add(Entry(0, NORMAL, {"field": "status", "value": "299"}, "bench", model=model.name))
    mark_ms = round((time.perf_counter() - started) * 1000, 1)
    listed = store.entries(include_removed=True)
    body: list = []
    alone, during = scoring_beside_reloads(model, rules, chunks, store)
    return {"active_entries": len(rules), "keep_entries": sum(e.verdict == KEEP for e in rules.entries),
            "decide_us_per_record": cpu_us_per_record(decide_with, chunks),
            "suppressed_records": suppressed,
            "decisions_digest": hashlib.sha256(repr(decisions).encode()).hexdigest()[:16],
            "build_rules_ms": cpu_ms(lambda: RuleSet(entries)),
            "load_from_sqlite_cpu_ms": loaded, "load_from_sqlite_wall_ms": load_wall,
            "reload_from_sqlite_cpu_ms": reloaded,
            "one_mark_more_ms": mark_ms,
            "list_json_ms": cpu_ms(lambda: body.append(json.dumps({"feedback": [e.as_json() for e in listed]}))),
            "list_json_bytes": len(body[-1]),
            "grpc_list_bytes": pb.ListFeedbackResponse(entries=[encode_entry(e) for e in listed]).ByteSize(),
            "page_table_ms": cpu_ms(lambda: body.append(render_feedback(*service.latest(FEEDBACK_ROWS)))),
            "page_table_bytes": len(body[-1]),
            "scoring_wall_ms_alone": alone, "scoring_wall_ms_during_reloads": during}


def scoring_beside_reloads(model: Model, rules: RuleSet, chunks: list, store: SqliteStore) -> tuple[float, float]:
    """Wall time of scoring the chunks (with the rules) alone, then while another thread reloads the store
    again and again (as the sidecar's watch thread does on each change): what a reload takes from scoring."""
    def scoring() -> float:
        started = time.perf_counter()
        for records, scored in chunks:
            decide(model, scored, feedback=FeedbackStep(rules, records))
        return round((time.perf_counter() - started) * 1000, 1)

    alone = min(scoring() for _ in range(3))
    stop = threading.Event()

    def reloading():
        while not stop.is_set():
            RuleSet(store.entries())
    thread = threading.Thread(target=reloading)
    thread.start()
    try:
        during = min(scoring() for _ in range(3))
    finally:
        stop.set()
        thread.join()
    return alone, during


def fleet(trials: int, work: Path, model: Path) -> dict:
    from tests.postgres_cluster import PostgresCluster
    from tests.sidecar_process import SidecarProcess, models_dir_with
    from tests.test_feedback import compare_lines, feedback, score

    cluster = PostgresCluster()
    reason = cluster.why_not()
    if reason:
        return {"skipped": reason}
    cluster.start()
    sidecars = []
    try:
        url = cluster.create_database("bench")
        for name in ("a", "b"):
            (work / name).mkdir()
            sidecars.append(SidecarProcess(models_dir_with(work / name, model, "shop"), work / name,
                                           feedback_store=url, feedback_poll_s="0.5").start())
        first, second = sidecars
        spread, own = [], []
        for trial in range(trials):
            lines = compare_lines(3, seed=1000 + trial)
            # Each trial marks pages of a kind of its own: a new section and new parameter names
            letters = random.Random(trial)
            word = "".join(letters.choice("ghijklmnopqrstuvwxyz") for _ in range(8))  # no hex: not an id
            lines = [line.replace("/products/", f"/{word}/").replace("with=", f"{word}=").replace("view=", f"v{word}=")
                     for line in lines]
            flagged = [r["is_anomaly"] for r in score(second, lines[1:])]
            assert all(flagged), (trial, lines, flagged)
            status, body = feedback(first, "POST", {"verdict": "normal", "author": "bench", "records": lines[:1]})
            assert status == 200, body
            written = time.perf_counter()
            own.append(not any(r["is_anomaly"] for r in score(first, lines[1:])))
            while any(r["is_anomaly"] for r in score(second, lines[1:])):
                if time.perf_counter() - written > 10:
                    raise RuntimeError("the second sidecar did not apply the entry within 10 s")
                time.sleep(0.01)
            spread.append(time.perf_counter() - written)
        return {"trials": trials, "postgresql": cluster.bin.parent.name, **percentiles_ms(spread, "spread"),
                "spread_max_ms": round(max(spread) * 1000, 1), "writer_applies_on_next_call": all(own),
                "poll_s": 0.5, "note": "NOTIFY/LISTEN pushes the change; the poll is the fallback"}
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--no-fleet", action="store_true", help="skip the PostgreSQL fleet part")
    parser.add_argument("--scale", default=",".join(map(str, SCALE)),
                        help="entry counts measured at scale, comma-separated ('' for none)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "feedback.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="logscore-bench-feedback-"))
    try:
        results = {"benchmark": "feedback", "machine": machine(), "load_average_before": os.getloadavg(),
                   "cost": cost(Path(args.data), work, tuple(int(c) for c in args.scale.split(",") if c))}
        if not args.no_fleet:
            from tests.generate import shop_lines

            proto, _ = train(shop_lines(4000, seed=0), TrainOptions(spec=load_spec(None, "access"), name="shop",
                                                                    target_fpr=0.01))
            save_model(proto, work / "shop.onnx")
            results["fleet"] = fleet(args.trials, work, work / "shop.onnx")
        results["load_average_after"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    write_results(args.results, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
