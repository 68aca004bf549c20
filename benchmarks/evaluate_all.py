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
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from sidecar.evaluation import Evaluation, group_sessions, plot  # noqa: E402
from sidecar.model import Model  # noqa: E402
from sidecar.training.train import TrainOptions, save_model, train  # noqa: E402

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
# HDFS lines: masked tokens and the line template.
HDFS_SPEC = {"format": "plain", "fields": [{"field": "message", "converters": [{"kind": "tokens"}]}]}


def progress(stage, done, total, unit="records"):
    print(f"  {stage}: {done}/{total or '?'} {unit}", file=sys.stderr, flush=True)


def score_all(model: Model, records: list, batch: int = 4096) -> np.ndarray:
    scores = [model.score(records[i: i + batch]).scores for i in range(0, len(records), batch)]
    return np.concatenate(scores).astype(np.float64)


def fit(records: list, spec: dict, name: str, workdir: Path, **options) -> Model:
    started = time.perf_counter()
    proto, _ = train(records, TrainOptions(spec=spec, name=name, **options), progress)
    path = workdir / f"{name}.onnx"
    save_model(proto, path)
    print(f"  trained {name} on {len(records)} records in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return Model.load(path)


def csic(data: Path, workdir: Path, detectors: list[str]) -> dict:
    csv.field_size_limit(16 * 1024 * 1024)
    rows = list(csv.DictReader(open(data / "csic2010_http" / "csic2010_requests.csv", encoding="utf-8",
                                    errors="replace", newline="")))

    def record(row):
        return {k: row[k] for k in ("method", "url", "body") if row.get(k)}

    training = [record(r) for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    model = fit(training, CSIC_SPEC, "csic-" + "-".join(detectors), workdir, detectors=detectors,
                target_fpr=0.01, max_records=100_000)
    labels = np.array([r["label"] == "anomalous" for r in test])
    scores = score_all(model, [record(r) for r in test])
    return {"labels": labels, "scores": scores, "threshold": model.threshold}


def hdfs_20k(data: Path, workdir: Path, detectors: list[str]) -> dict:
    folder = data / "hdfs_20k_labeled"
    lines = (folder / "HDFS_20000.log").read_text(errors="replace").splitlines()
    labels = [row["Label"] == "Anomaly" for row in csv.DictReader(open(folder / "HDFS_20000.line_labels.csv"))]
    blocks = [re.findall(r"blk_-?\d+", line) for line in lines]
    # Fit on the lines of normal blocks in the first half; evaluate blocks of the second half.
    half = len(lines) // 2
    training = [{"message": line} for line, label in zip(lines[:half], labels[:half]) if not label]
    model = fit(training, HDFS_SPEC, "hdfs-" + "-".join(detectors), workdir, detectors=detectors, target_fpr=0.01)
    test_lines = lines[half:]
    scores = score_all(model, [{"message": line} for line in test_lines])
    first_half_blocks = {b for found in blocks[:half] for b in found}
    keep = [i for i, found in enumerate(blocks[half:]) if found and found[0] not in first_half_blocks]
    ids, session_scores, session_labels = group_sessions(
        [test_lines[i] for i in keep], scores[keep], np.array(labels[half:])[keep], r"blk_-?\d+")
    return {"labels": session_labels.astype(bool), "scores": session_scores, "threshold": model.threshold,
            "unit": "block"}


EVALUATIONS = {
    "csic": ("CSIC 2010 HTTP requests (fit: 36,000 normal train; test: 36,000 normal + 25,065 attacks)", csic),
    "hdfs_20k": ("HDFS first 20,000 lines, per block (fit: normal blocks' lines of the first half; "
                 "test: blocks starting in the second half)", hdfs_20k),
}
DETECTOR_SETS = {"csic": [["rarity"], ["isolation_forest"], ["rarity", "isolation_forest"]],
                 "hdfs_20k": [["rarity"], ["pca"]]}


def table(results: list[dict]) -> str:
    lines = ["| data | detectors | unit | ROC-AUC | PR-AUC | TPR @ FPR 1 % | TPR @ FPR 0.1 % | F1 (model threshold) | F1 (best) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['data']} | {', '.join(r['detectors'])} | {r['unit']} | {r['roc_auc']} | {r['pr_auc']} | "
                     f"{r['tpr_at_fpr_1pct']} | {r['tpr_at_fpr_0.1pct']} | {r['at_model_threshold']['f1']} | "
                     f"{r['at_best_f1']['f1']} |")
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
                            "unit": outcome.get("unit", "record"), **report})
            print(json.dumps({k: results[-1][k] for k in ("roc_auc", "pr_auc", "tpr_at_fpr_1pct")}), file=sys.stderr)
    out = ROOT / "benchmarks" / "results" / "accuracy.json"
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
