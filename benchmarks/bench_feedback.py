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
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, percentiles_ms, write_results  # noqa: E402
from benchmarks.feedback_loop import payloads, with_attacks  # noqa: E402
from logscore.decide import decide  # noqa: E402
from logscore.feedback import NORMAL, Entry, FeedbackStep, RuleSet  # noqa: E402
from logscore.features import load_spec  # noqa: E402
from logscore.inputs import read_lines  # noqa: E402
from logscore.model import Model  # noqa: E402
from logscore.review import ReviewRing  # noqa: E402
from logscore.training.train import TrainOptions, save_model, train  # noqa: E402

BATCH = 500


def cpu_us_per_record(work, chunks, repeats: int = 3) -> float:
    started = time.process_time()
    for _ in range(repeats):
        for chunk in chunks:
            work(chunk)
    return round((time.process_time() - started) / repeats / sum(len(c[0]) for c in chunks) * 1e6, 2)


def cost(data: Path, work: Path) -> dict:
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
    figures = {"records": len(later), "flagged_share": round(flagged, 4), "never_seen_request_share": round(float(novel), 4),
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
    return figures


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
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "feedback.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="logscore-bench-feedback-"))
    try:
        results = {"benchmark": "feedback", "machine": machine(), "load_average_before": os.getloadavg(),
                   "cost": cost(Path(args.data), work)}
        if not args.no_fleet:
            from tests.generate import shop_lines

            proto, _ = train(shop_lines(4000, seed=0), TrainOptions(spec=load_spec(None, "access"), name="shop",
                                                                    target_fpr=0.01))
            save_model(proto, work / "shop.onnx")
            results["fleet"] = fleet(args.trials, work, work / "shop.onnx")
        results["load_average_after"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import json

    print(json.dumps(results, indent=2))
    write_results(args.results, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
