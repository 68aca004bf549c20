"""Featurize and score cost per record, per detector and per baseline, at several batch sizes.

    python benchmarks/bench_scoring.py [--records 4000] [--json benchmarks/results/scoring.json]

Trains one small model per detector on generated access lines (tests/generate.py),
then times ``Featurizer.transform`` and the ONNX graph separately, in this process,
one thread, on long-tail traffic (a third of the requests new); the default detector
also on repetitive traffic (200 lines over and over: every value cached). The prior
art's methods (benchmarks/baselines.py, when gensim is installed) are fitted on the
same lines and timed the same way: their vectorizing, then their model. Prints a
table and writes JSON with the machine described.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import machine, write_results  # noqa: E402
from logscore.features import load_spec  # noqa: E402
from logscore.model import Model, run_graph  # noqa: E402
from logscore.training.detectors import DETECTORS  # noqa: E402
from logscore.training.train import TrainOptions, save_model, train  # noqa: E402
from tests.generate import shop_lines  # noqa: E402

BATCHES = (1, 100, 1000, 10000)


def bench_stages(featurize, score, pool: list[str]) -> list[dict]:
    """Median cost of ``featurize(batch)`` and of ``score(features)`` at each batch size, each
    batch the next lines of ``pool`` (so caches meet new values as often as the traffic has them)."""
    rows = []
    offset = 0

    def next_batch(size: int) -> list[str]:
        nonlocal offset
        batch = [pool[(offset + i) % len(pool)] for i in range(size)]
        offset = (offset + size) % len(pool)
        return batch

    featurize(next_batch(100))  # warm up
    for size in BATCHES:
        featurize_times, score_times = [], []
        for _ in range(max(3, min(200, 20000 // size))):
            batch = next_batch(size)
            started = time.perf_counter()
            features = featurize(batch)
            featurized = time.perf_counter()
            score(features)
            featurize_times.append(featurized - started)
            score_times.append(time.perf_counter() - featurized)
        featurize_seconds, score_seconds = float(np.median(featurize_times)), float(np.median(score_times))
        rows.append({"batch": size, "featurize_us_per_record": round(featurize_seconds / size * 1e6, 2),
                     "score_us_per_record": round(score_seconds / size * 1e6, 2),
                     "total_us_per_record": round((featurize_seconds + score_seconds) / size * 1e6, 2),
                     "records_per_s": round(size / (featurize_seconds + score_seconds))})
    return rows


def print_rows(name: str, rows: list[dict]) -> None:
    for row in rows:
        print(f"{name:40} {row['batch']:>6} {row['featurize_us_per_record']:>13} "
              f"{row['score_us_per_record']:>9} {row['total_us_per_record']:>9}{'':14}{row['records_per_s']:>10}")


def bench_baselines(training: list[str], scoring: list[str]) -> dict:
    try:
        import gensim  # noqa: F401

        from benchmarks.baselines import BASELINES
    except ImportError:
        print("(baselines skipped: pip install -e '.[baselines]' for gensim)")
        return {}
    results = {}
    for name, fit in BASELINES.items():
        baseline = fit(training)
        results[name] = {"batches": bench_stages(baseline.featurize, baseline.score_features, scoring)}
        print_rows(name, results[name]["batches"])
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=4000, help="training records per model")
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "scoring.json"))
    parser.add_argument("--workdir", default="/tmp/logscore-bench")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    # Long-tail traffic: a third of the requests carry a URL not seen before (ids, search words).
    training, scoring = shop_lines(args.records, seed=0), shop_lines(200_000, seed=1)
    results = {"machine": machine(), "traffic": "tests/generate.py shop_lines: 32 % of requests new",
               "detectors": {}}
    print(f"machine: {results['machine']}")
    print(f"{'detector':40} {'batch':>6} {'featurize µs':>13} {'score µs':>9} {'total µs':>9}  (per record)"
          f" {'records/s':>10}")
    for kind in args.detectors.split(","):
        proto, _ = train(training, TrainOptions(spec=load_spec(None, "access"), detectors=[kind], folds=2))
        path = Path(args.workdir) / f"{kind}.onnx"
        save_model(proto, path)
        model = Model.load(path)
        run = lambda features: run_graph(model.session, features)  # noqa: E731
        rows = bench_stages(model.featurizer.transform, run, scoring)
        results["detectors"][kind] = {"model_bytes": path.stat().st_size, "batches": rows}
        print_rows(kind, rows)
        if kind == "rarity":  # the same model on repetitive traffic: every value cached
            rows = bench_stages(model.featurizer.transform, run, shop_lines(200, seed=2))
            results["rarity_repetitive_traffic"] = {"batches": rows}
            print_rows("rarity, repetitive traffic", rows)
    results["baselines"] = bench_baselines(training, scoring)
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
