"""Rerun every accuracy evaluation on ../shared/data and regenerate docs/accuracy.md's tables.

    python benchmarks/evaluate_all.py [--data ../shared/data] [--only csic,hdfs_20k]

Each evaluation trains on normal data only (the dataset's protocol), scores the test
set through the product's scoring path (sidecar.model.Model), and reports with
sidecar.evaluation. Results go to benchmarks/results/accuracy.json, plots to
docs/img/, and the table between the markers in docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from logscore.evaluation import Evaluation, group_sessions, plot, sequence_ceiling  # noqa: E402
from logscore.features.featurizer import SESSION_FIELDS  # noqa: E402
from logscore.model import Model  # noqa: E402
from logscore.sessions import SessionKeys, SessionSpec  # noqa: E402
from logscore.training.train import TrainOptions, save_model, train  # noqa: E402

# Requests of the CSIC 2010 shop: URL structure and the form body, both as parameters.
# Structure alone measured best here (n-grams of the free-text values add noise: names,
# addresses); a never-seen method weighs like three unseen features.
CSIC_SPEC = {
    "format": "jsonl",
    "fields": [
        {"field": "url", "converters": [{"kind": "url"}]},
        {"field": "body", "converters": [{"kind": "url", "part": "query"}]},
        {"field": "method", "converters": [{"kind": "categorical", "weight": 3}]},
    ],
}
# Sessions (one record per block): event n-grams in order, first/last event, length.
SESSION_SPEC = {"format": "jsonl", "fields": [{"field": "events", "converters": [
    {"kind": "sequence", "n": [1, 2], "separator": "\n"}]}]}


def progress(stage, done, total, unit="records"):
    print(f"  {stage}: {done}/{total or '?'} {unit}", file=sys.stderr, flush=True)


def score_all(score, records: list, batch: int = 4096) -> dict:
    """Scores of ``records`` through ``score`` (a batch → scores function), batch by batch, and
    the cost per record (reported with the results)."""
    started = time.perf_counter()
    scores = [score(records[i: i + batch]) for i in range(0, len(records), batch)]
    seconds = time.perf_counter() - started
    return {"scores": np.concatenate(scores).astype(np.float64),
            "score_us_per_record": round(seconds / max(len(records), 1) * 1e6, 1)}


def model_scores(model: Model):
    return lambda records: model.score(records).scores


def fit(records: list, spec: dict, name: str, workdir: Path, **options) -> Model:
    started = time.perf_counter()
    proto, _ = train(records, TrainOptions(spec=spec, name=name, **options), progress)
    path = workdir / f"{name}.onnx"
    save_model(proto, path)
    print(f"  trained {name} on {len(records)} records in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return Model.load(path)


def csic(data: Path, workdir: Path, detectors: list[str]) -> dict:
    rows = _csic_rows(data)

    def record(row):
        return {k: row[k] for k in ("method", "url", "body") if row.get(k)}

    training = [record(r) for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    model = fit(training, CSIC_SPEC, "csic-" + "-".join(detectors), workdir, detectors=detectors,
                target_fpr=0.01, max_records=100_000)
    return {"labels": np.array([r["label"] == "anomalous" for r in test]), "threshold": model.threshold,
            **score_all(model_scores(model), [record(r) for r in test])}


def csic_baseline(data: Path, workdir: Path, detectors: list[str]) -> dict:
    """A prior-art method (benchmarks/baselines.py) on the request text: method, URL and body."""
    from benchmarks.baselines import BASELINES

    rows = _csic_rows(data)
    text = lambda r: " ".join(r[k] for k in ("method", "url", "body") if r.get(k))  # noqa: E731
    test = [r for r in rows if r["split"] == "test"]
    started = time.perf_counter()
    baseline = BASELINES[detectors[0]]([text(r) for r in rows if r["split"] == "train"])
    print(f"  fitted {detectors[0]} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return {"labels": np.array([r["label"] == "anomalous" for r in test]), "threshold": baseline.threshold,
            **score_all(baseline.score, [text(r) for r in test], batch=5000)}


def _csic_rows(data: Path) -> list[dict]:
    csv.field_size_limit(16 * 1024 * 1024)
    with open(data / "csic2010_http" / "csic2010_requests.csv", encoding="utf-8", errors="replace",
              newline="") as source:
        return list(csv.DictReader(source))


def sessions(training: list[list[str]], test: list[list[str]], labels: list[int], name: str, workdir: Path,
             detectors: list[str]) -> dict:
    def record(events):
        return {"events": "\n".join(events)}

    model = fit([record(e) for e in training], SESSION_SPEC, name, workdir, detectors=detectors, target_fpr=0.01)
    return {"labels": np.array(labels, dtype=bool), "threshold": model.threshold, "unit": "session",
            **score_all(model_scores(model), [record(e) for e in test])}


def hdfs_sessions(data: Path, workdir: Path, detectors: list[str]) -> dict:
    """DeepLog's sessions: fit on 80 % of hdfs_train, test on the other 20 % + hdfs_test_abnormal."""
    folder = data / "hdfs_sessions_deeplog"
    read = lambda name: [line.split() for line in (folder / name).read_text().splitlines() if line.strip()]  # noqa: E731
    normal, abnormal = read("hdfs_train"), read("hdfs_test_abnormal")
    order = np.random.default_rng(0).permutation(len(normal))
    cut = int(len(normal) * 0.8)
    training = [normal[i] for i in order[:cut]]
    test = [normal[i] for i in order[cut:]] + abnormal
    labels = [0] * (len(normal) - cut) + [1] * len(abnormal)
    return sessions(training, test, labels, "hdfs-sessions-" + "-".join(detectors), workdir, detectors)


def hdfs_100k(data: Path, workdir: Path, detectors: list[str]) -> dict:
    """Blocks of HDFS_100k as template sequences, deeploglizer's split; fit on normal train blocks."""
    folder = data / "hdfs_100k_block_labels"
    split = {row["BlockId"]: row["deeploglizer_split"]
             for row in csv.DictReader(open(folder / "hdfs_100k_block_labels.csv"))}
    blocks = [json.loads(line) for line in open(folder / "hdfs_100k_block_template_sequences.jsonl")]
    training = [b["templates"] for b in blocks if split.get(b["BlockId"]) == "train" and b["label"] == 0]
    test = [b for b in blocks if split.get(b["BlockId"]) == "test"]
    outcome = sessions(training, [b["templates"] for b in test], [b["label"] for b in test],
                       "hdfs-100k-" + "-".join(detectors), workdir, detectors)
    outcome["ceiling"] = sequence_ceiling([tuple(b["templates"]) for b in test], [b["label"] for b in test],
                                          [tuple(b["templates"]) for b in blocks if b["label"] == 0])
    return outcome


def hdfs_20k(data: Path, workdir: Path, detectors: list[str]) -> dict:
    """Raw HDFS lines through a session model, as the sidecar would see them: trained with
    ``--session-key blk_-?\\d+`` on the lines of half the normal blocks (chosen at random; the
    lines in file order), then the lines of the other blocks scored in file order, each as its
    block so far; a block scores its most anomalous line."""
    folder = data / "hdfs_20k_labeled"
    lines = (folder / "HDFS_20000.log").read_text(errors="replace").splitlines()
    labels = [row["Label"] == "Anomaly" for row in csv.DictReader(open(folder / "HDFS_20000.line_labels.csv"))]
    key = r"blk_-?\d+"
    block_of = [(re.findall(key, line) or [None])[0] for line in lines]
    blocks = sorted({b for b in block_of if b})
    training_blocks = set(np.random.default_rng(0).choice(blocks, len(blocks) // 2, replace=False))
    anomalous_blocks = {b for b, label in zip(block_of, labels) if label}
    training = [line for line, b in zip(lines, block_of) if b in training_blocks and b not in anomalous_blocks]
    test = [i for i, b in enumerate(block_of) if b and b not in training_blocks]
    spec = {"format": "plain", "fields": SESSION_FIELDS, "sessions": {"key": key}}
    model = fit(training, spec, "hdfs-20k-" + "-".join(detectors), workdir, detectors=detectors, target_fpr=0.01)
    # In file order: the model's session tracker follows each block.
    scored = score_all(model_scores(model), [lines[i] for i in test])
    ids, block_scores, block_labels = group_sessions([lines[i] for i in test], scored["scores"],
                                                     np.array([labels[i] for i in test]), key)
    events = block_events(lines, block_of, key)
    ceiling = sequence_ceiling([events[b] for b in ids], block_labels,
                               [events[b] for b in blocks if b not in anomalous_blocks])
    return {"labels": block_labels.astype(bool), "scores": block_scores, "threshold": model.threshold,
            "unit": "block", "ceiling": ceiling, "score_us_per_record": scored["score_us_per_record"]}


def block_events(lines: list[str], block_of: list, key: str) -> dict[str, tuple]:
    """Each block's events in order, masked as the session tracker masks them."""
    keys = SessionKeys(SessionSpec(key=key))
    events: dict[str, list[str]] = {}
    for line, block in zip(lines, block_of):
        if block:
            events.setdefault(block, []).append(keys.key_and_event(line)[1])
    return {block: tuple(sequence) for block, sequence in events.items()}


def bgl_2k(data: Path, workdir: Path, detectors: list[str]) -> dict:
    """BGL 2k, line level, chronological split: fit on the normal lines of the first half."""
    lines = (data / "loghub_2k" / "BGL" / "BGL_2k.log").read_text(errors="replace").splitlines()
    labels = [line.split(" ", 1)[0] != "-" for line in lines]
    # The label is the first token; what a shipper would see is the rest of the line.
    messages = [{"message": line.split(" ", 1)[1].rstrip("\r")} for line in lines]
    half = len(lines) // 2
    training = [m for m, label in zip(messages[:half], labels[:half]) if not label]
    model = fit(training, {"format": "plain", "fields": [{"field": "message", "converters": [{"kind": "tokens"}]}]},
                "bgl-" + "-".join(detectors), workdir, detectors=detectors, target_fpr=0.01)
    return {"labels": np.array(labels[half:]), "threshold": model.threshold,
            **score_all(model_scores(model), messages[half:])}


EVALUATIONS = {
    "csic": ("CSIC 2010 HTTP requests (fit: 36,000 normal train; test: 36,000 normal + 25,065 attacks)", csic),
    "csic_baseline": ("CSIC 2010, baselines (benchmarks/baselines.py, not the product)", csic_baseline),
    "hdfs_sessions": ("HDFS DeepLog sessions (fit: 80 % of hdfs_train; test: the other 20 % + 16,838 "
                      "abnormal)", hdfs_sessions),
    "hdfs_100k": ("HDFS 100k blocks, deeploglizer split (fit: normal train blocks; test: 1,531 normal + 57 "
                  "anomalous)", hdfs_100k),
    "hdfs_20k": ("HDFS first 20,000 raw lines through a session model keyed by blk_ id (fit: lines of half "
                 "the normal blocks; test: the other blocks' lines, in file order)", hdfs_20k),
    "bgl_2k": ("BGL 2k lines, chronological split (fit: normal lines of the first half; test: the second half)",
               bgl_2k),
}
DETECTOR_SETS = {"csic": [["rarity"], ["isolation_forest"], ["rarity", "isolation_forest"]],
                 "csic_baseline": [["jubatus-style LOF on char bigrams"], ["AICoE Word2Vec + SOM"],
                                   ["LAD fork LOF + autoencoder on Word2Vec"]],
                 "hdfs_sessions": [["rarity"], ["pca"], ["rarity", "pca"]],
                 "hdfs_100k": [["rarity"], ["pca"]],
                 "hdfs_20k": [["rarity"]],
                 "bgl_2k": [["rarity"], ["autoencoder"]]}


def table(results: list[dict]) -> str:
    lines = ["| data | detectors | unit | ROC-AUC | PR-AUC | TPR @ FPR 1 % | TPR @ FPR 0.1 % | "
             "F1 (model threshold) | F1 (best) | F1 ceiling | µs/record |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ceiling = r["ceiling"]["best_f1"] if "ceiling" in r else "–"
        lines.append(f"| {r['data']} | {', '.join(r['detectors'])} | {r['unit']} | {r['roc_auc']} | {r['pr_auc']} | "
                     f"{r['tpr_at_fpr_1pct']} | {r['tpr_at_fpr_0.1pct']} | {r['at_model_threshold']['f1']} | "
                     f"{r['at_best_f1']['f1']} | {ceiling} | {r['score_us_per_record']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--only", help="comma-separated: " + ", ".join(EVALUATIONS))
    args = parser.parse_args()
    data = Path(args.data)
    chosen = args.only.split(",") if args.only else list(EVALUATIONS)
    workdir = Path(tempfile.mkdtemp(prefix="logscore-eval-"))
    (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
    results = []
    for name in chosen:
        title, run = EVALUATIONS[name]
        for detectors in DETECTOR_SETS[name]:
            print(f"== {name} with {detectors}", file=sys.stderr)
            outcome = run(data, workdir, detectors)
            report = Evaluation(outcome["labels"], outcome["scores"], outcome["threshold"]).report()
            prefix = ROOT / "docs" / "img" / f"{name}_{'_'.join(detectors)}"
            try:
                plot(outcome["labels"], outcome["scores"], str(prefix), f"{name} {'+'.join(detectors)}")
            except ImportError:
                print("  (no matplotlib: no plots)", file=sys.stderr)
            results.append({"data": name, "title": title, "detectors": detectors,
                            "unit": outcome.get("unit", "record"), **report,
                            **{k: outcome[k] for k in ("score_us_per_record", "ceiling") if k in outcome}})
            print(json.dumps({k: results[-1][k] for k in ("roc_auc", "pr_auc", "tpr_at_fpr_1pct")}), file=sys.stderr)
    out = ROOT / "benchmarks" / "results" / "accuracy.json"
    if args.only and out.exists():  # keep the other datasets' earlier results, in the usual order
        earlier = [r for r in json.loads(out.read_text()) if r["data"] not in chosen]
        order = list(EVALUATIONS)
        results = sorted(earlier + results, key=lambda r: order.index(r["data"]))
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    accuracy = ROOT / "docs" / "accuracy.md"
    text = accuracy.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start in text and end in text:
        text = text[: text.index(start) + len(start)] + "\n" + table(results) + "\n" + text[text.index(end):]
        accuracy.write_text(text)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
