"""Featurize and score cost per record (CPU time, one core), at several batch sizes.

    python benchmarks/bench_scoring.py [--sections traffic,explanations,single,detectors,prior_art]
                                       [--json benchmarks/results/scoring.json]

- **traffic**: the shipped default model (models/apache-access.onnx) on repetitive and novel
  traffic (benchmarks/traffic.py: the real access log; the same with 99 % of request lines
  never seen), with the compiled featurizer (the graph's rarity part compiled too:
  graph_shortcut.py; and once more with the graph run whole) and with the pure-Python one, beside a naive
  pipeline (HashingVectorizer char 3-grams of the URL + IsolationForest) and a floor (char
  3-gram hashing of the URL over the batch + one onnxruntime Gather/ReduceSum call), all
  measured in this run. Each row states the share of request lines never seen and the load.
- **explanations**: ``Model.score`` of the default model with and without ``explain=3``, and with
  ``explain_flagged=3`` (forward mode: the flagged records only), both traffics.
- **single**: ``Model.score`` of one record a call (its featurizing and its graph timed apart),
  beside the floor's, back to back and with other memory read between calls (what single-record
  latency in a server meets).
- **detectors**: one small model per detector trained on generated shop lines
  (tests/generate.py), on long-tail traffic (a third of the requests new).
- **prior_art**: the prior art's methods (benchmarks/baselines.py; needs gensim).
- **crafted**: value caches fed keys whose hashes share their low bits (what whoever knows the hash
  seed can send: run with PYTHONHASHSEED fixed), the compiled cache beside the dict-backed one, µs of
  CPU per new value (a get that misses, then a put), as the featurizer uses them. Not in the default
  sections.

Featurizing and the model are timed apart: ``featurize`` then ``score``. Writes JSON with the
machine described.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import load_average, machine, write_results  # noqa: E402
from benchmarks.traffic import TRAFFIC, never_seen_share, real_lines, sent_digests  # noqa: E402
from logscore.features import Featurizer, load_spec  # noqa: E402
from logscore.model import Model, run_graph  # noqa: E402
from logscore.training.detectors import DETECTORS  # noqa: E402
from logscore.training.train import TrainOptions, save_model, train  # noqa: E402
from tests.generate import shop_lines  # noqa: E402

BATCHES = (1, 100, 1000, 10000)


def bench_stages(featurize, score, pool: list[str], batches=BATCHES, warm_up: Optional[list[str]] = None) -> list[dict]:
    """Median CPU cost of ``featurize(batch)`` and of ``score(features)`` at each batch size, each
    batch the next lines of ``pool`` (so caches meet new values as often as the traffic has them).
    Each row states the share of request lines never seen before it, and the load average."""
    rows = []
    offset = 0

    def next_batch(size: int) -> list[str]:
        nonlocal offset
        batch = [pool[(offset + i) % len(pool)] for i in range(size)]
        offset += size
        return batch

    featurize(warm_up or next_batch(100))
    for size in batches:
        featurize_times, score_times = [], []
        first = offset
        for _ in range(max(3, min(200, 20000 // size))):
            batch = next_batch(size)
            started = time.process_time()
            features = featurize(batch)
            featurized = time.process_time()
            score(features)
            featurize_times.append(featurized - started)
            score_times.append(time.process_time() - featurized)
        # NOTE: new means not in the warm-up and not in an earlier batch of this row
        sent = [pool[i % len(pool)] for i in range(0, offset)]
        novelty = never_seen_share(*sent_digests(sent))["never_seen_request_lines"]
        novelty_here = never_seen_share(*sent_digests(sent[first:]))["never_seen_request_lines"]
        featurize_seconds, score_seconds = float(np.median(featurize_times)), float(np.median(score_times))
        rows.append({"batch": size, "featurize_us_per_record": round(featurize_seconds / size * 1e6, 2),
                     "score_us_per_record": round(score_seconds / size * 1e6, 2),
                     "total_us_per_record": round((featurize_seconds + score_seconds) / size * 1e6, 2),
                     "records_per_s": round(size / max(featurize_seconds + score_seconds, 1e-9)),
                     "never_seen_request_lines": min(novelty, novelty_here), "load_average": load_average()})
    return rows


def print_rows(name: str, rows: list[dict]) -> None:
    for row in rows:
        print(f"{name:44} {row['batch']:>6} {row['featurize_us_per_record']:>13} "
              f"{row['score_us_per_record']:>9} {row['total_us_per_record']:>9} {row['records_per_s']:>10}"
              f"   never seen {row['never_seen_request_lines']:>6.1%}  load {row['load_average']}", flush=True)


def bench_traffic() -> dict:
    """The default model, compiled and Python featurizer, the naive pipeline and the floor, on
    repetitive and novel traffic: the figures of issue #13's targets."""
    from benchmarks.baselines import HashingFloor, fit_naive_url_isolation_forest

    model = Model.load(ROOT / "models" / "apache-access.onnx")
    naive, floor = fit_naive_url_isolation_forest(list(real_lines())), HashingFloor()
    results = {}
    for traffic in ("repetitive", "novel"):
        pool = TRAFFIC[traffic](120_000, seed=31)
        warm_up = TRAFFIC["repetitive"](10_000, seed=32)  # the real log once: agents, statuses cached
        results[traffic] = {}
        for name, featurize, score, batches in (
                ("logscore, compiled featurizer", Featurizer(model.metadata["featurizer"], native=True).transform,
                 model.run_graph, BATCHES),
                # (the graph run whole, its rarity part too: what the shortcut saves, in the same run)
                ("logscore, compiled featurizer, whole graph",
                 Featurizer(model.metadata["featurizer"], native=True).transform,
                 lambda f: run_graph(model.session, f), (1, 1000)),
                ("logscore, Python featurizer", Featurizer(model.metadata["featurizer"], native=False).transform,
                 lambda f: run_graph(model.session, f), (1, 1000)),
                ("naive: HashingVectorizer + IsolationForest", naive.featurize, naive.score_features, (1, 1000)),
                ("floor: char 3-gram hashing + Gather/ReduceSum", floor.featurize, floor.score_features, (1, 1000))):
            dense = model.needs_dense
            transform = (lambda records, f=featurize: f(records, dense=dense)) if name.startswith("logscore") \
                else featurize
            rows = bench_stages(transform, score, pool, batches, warm_up if name.startswith("logscore") else None)
            results[traffic][name] = rows
            print_rows(f"{traffic}: {name}", rows)
    return results


def bench_explanations(explain: int = 3, batch: int = 1000, batches: int = 20) -> dict:
    """``Model.score`` with and without explanations (what the Fluentd plugin's ``explanation_key``
    and the API's ``explain`` ask for, and forward mode's for flagged records only), each batch the
    next lines, interleaved, CPU per record."""
    model = Model.load(ROOT / "models" / "apache-access.onnx")
    variants = {"score": {}, "explained": {"explain": explain}, "flagged_explained": {"explain_flagged": explain}}
    results = {}
    for traffic in ("repetitive", "novel"):
        pool = TRAFFIC[traffic](len(variants) * batch * batches + 10_000, seed=33)
        model.score(pool[:10_000], explain)  # warm: caches, remembered feature names
        times: dict[str, list[float]] = {name: [] for name in variants}
        offset, flagged = 10_000, 0
        for _ in range(batches):
            for name, asked in variants.items():
                records = pool[offset: offset + batch]
                offset += batch
                started = time.process_time()
                flagged += int(model.score(records, **asked).is_anomaly.sum())
                times[name].append(time.process_time() - started)
        sent = pool[10_000: offset]
        row = {"batch": batch, "explain": explain,
               **{f"{name}_us_per_record": round(float(np.median(times[name])) / batch * 1e6, 2) for name in variants},
               "flagged_share": round(flagged / len(sent), 4),
               "never_seen_request_lines": never_seen_share(*sent_digests(sent))["never_seen_request_lines"],
               "load_average": load_average()}
        results[traffic] = row
        print(f"{traffic}: Model.score {row['score_us_per_record']} µs/record, with explain={explain} "
              f"{row['explained_us_per_record']}, flagged ones only {row['flagged_explained_us_per_record']} "
              f"({row['flagged_share']:.2%} flagged)   never seen {row['never_seen_request_lines']:.1%}  "
              f"load {row['load_average']}", flush=True)
    return results


def bench_crafted(values: int = 8000, slots: int = 16384) -> dict:
    """See the module's doc: crafted keys fall into 64 of a generation's ``slots`` slots."""
    from logscore.features import native
    from logscore.features.converters import ValueCache

    crafted = [key for key in map("/u/{}".format, range(10_000_000)) if hash(key) & (slots - 1) < 64][:values]
    ordinary = [f"b{i}" for i in range(slots // 2)]  # one turnover first: a fresh generation of `slots`
    entry = type("Entry", (), {"nbytes": 1})()
    results = {"values": len(crafted), "never_seen_share": 1.0, "load_average": load_average()}
    for name, cache in (("compiled", native._native.Cache(slots, 1 << 40)), ("dict", ValueCache(slots, 1 << 40))):
        for key in ordinary:
            cache.put(key, entry)
        started = time.process_time()
        for key in crafted:
            if cache.get(key) is None:
                cache.put(key, entry)
        results[f"{name}_us_per_value"] = round((time.process_time() - started) / len(crafted) * 1e6, 3)
    print(f"crafted keys ({len(crafted)} sharing their low hash bits, every one never seen): compiled cache "
          f"{results['compiled_us_per_value']} µs a value, dict-backed {results['dict_us_per_value']} "
          f"(the floor, same run); load {results['load_average']}")
    return results


def bench_single(calls: int = 3000, rounds: int = 3, evict_mib: int = 8) -> dict:
    """One record a call, CPU µs per call of ``Model.score``'s two parts, featurizing and the graph,
    beside the floor's two (char 3-gram hashing, one Gather/ReduceSum call): back to back (caches
    warm, as in the batch rows) and with ``evict_mib`` MiB read before each call, as a server's other
    work (its gRPC layer, the client, other processes on the same cores) evicts the model's code and
    data between single-record calls. Interleaved rounds; the repetitive traffic."""
    from benchmarks.baselines import HashingFloor

    model, floor = Model.load(ROOT / "models" / "apache-access.onnx"), HashingFloor()
    options = dict(dense=model.needs_dense, with_fields=model.needs_fields, columns=model.behaviour_fields)
    pipelines = {"logscore": (lambda line: model.featurizer.transform([line], **options),
                              model.run_graph),
                 "floor": (lambda line: floor.featurize([line]), floor.score_features)}
    lines = TRAFFIC["repetitive"](2000 + 2 * rounds * calls, seed=34)
    for line in lines[:2000]:
        for featurize, graph in pipelines.values():
            graph(featurize(line))
    other_work = np.ones(evict_mib << 20, dtype=np.uint8)
    kinds = ("warm", "evicted")
    times = {name: {kind: {"featurize": [], "graph": []} for kind in kinds} for name in pipelines}
    offset = 2000
    for _ in range(rounds):
        for kind in kinds:
            spent = {name: [0.0, 0.0] for name in pipelines}
            for line in lines[offset: offset + calls]:
                for name, (featurize, graph) in pipelines.items():
                    if kind == "evicted":
                        other_work.sum()
                    started = time.thread_time()
                    features = featurize(line)
                    featurized = time.thread_time()
                    graph(features)
                    spent[name][0] += featurized - started
                    spent[name][1] += time.thread_time() - featurized
            offset += calls
            for name, (featurizing, running) in spent.items():
                times[name][kind]["featurize"].append(featurizing / calls * 1e6)
                times[name][kind]["graph"].append(running / calls * 1e6)
    result: dict = {name: {kind: {part: round(float(np.median(values)), 1) for part, values in parts.items()}
                           for kind, parts in by_kind.items()} for name, by_kind in times.items()}
    for by_kind in result.values():
        for parts in by_kind.values():
            parts["total"] = round(parts["featurize"] + parts["graph"], 1)
    novelty = never_seen_share(*sent_digests(lines[2000:offset]))["never_seen_request_lines"]
    result.update(evict_mib=evict_mib, never_seen_request_lines=novelty, load_average=load_average())
    for kind, label in (("warm", "back to back"), ("evicted", f"with {evict_mib} MiB read before each call")):
        ours, least = result["logscore"][kind], result["floor"][kind]
        print(f"single record, {label}: {ours['total']} µs a call (featurize {ours['featurize']}, graph "
              f"{ours['graph']}); floor {least['total']} (featurize {least['featurize']}, graph {least['graph']})"
              f"   never seen {novelty:.1%}  load {result['load_average']}", flush=True)
    return result


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
        print_rows(f"long tail: {name}", results[name]["batches"])
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="traffic,explanations,single,detectors,prior_art")
    parser.add_argument("--records", type=int, default=4000, help="training records per model")
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "scoring.json"))
    parser.add_argument("--workdir", default="/tmp/logscore-bench")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    sections = args.sections.split(",")
    results = {"machine": machine(), "load_average_at_start": load_average()}
    print(f"machine: {results['machine']}; load average {results['load_average_at_start']}")
    print(f"{'':44} {'batch':>6} {'featurize µs':>13} {'score µs':>9} {'total µs':>9} {'records/s':>10}  (CPU, per record)")
    if "traffic" in sections:
        results["traffic"] = bench_traffic()
    if "explanations" in sections:
        results["explanations"] = bench_explanations()
    if "single" in sections:
        results["single"] = bench_single()
    if "crafted" in sections:
        results["crafted"] = bench_crafted()
    # Long-tail traffic: a third of the requests carry a URL not seen before (ids, search words).
    training, scoring = shop_lines(args.records, seed=0), shop_lines(200_000, seed=1)
    results["detectors_traffic"] = "tests/generate.py shop_lines: 32 % of requests new"
    results["detectors"] = {}
    for kind in (args.detectors.split(",") if "detectors" in sections else []):
        proto, _ = train(training, TrainOptions(spec=load_spec(None, "access"), detectors=[kind], folds=2))
        path = Path(args.workdir) / f"{kind}.onnx"
        save_model(proto, path)
        model = Model.load(path)
        rows = bench_stages(model.featurizer.transform, model.run_graph, scoring)
        results["detectors"][kind] = {"model_bytes": path.stat().st_size, "batches": rows}
        print_rows(f"long tail: {kind}", rows)
    if "prior_art" in sections:
        results["baselines"] = bench_baselines(training, scoring)
    # Sections not run keep their figures from the last run that had them (each row has its load).
    previous = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    for key, value in previous.items():
        if key not in results or (not results[key] and value):
            results[key] = value
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
