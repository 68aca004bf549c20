"""Learning a new site: the real sidecar (`logscore serve --learn`) starts from a model of another
site and learns the new one from its first 5,000 lines (issue #11).

    python benchmarks/learn_new_site.py [--data ../shared/data]

Two directions, each over the sidecar's own gRPC socket, lines in the site's order, 250 per call:

- **shop → blog**: a model trained on a shop (CSIC 2010's normal training requests rendered as
  access lines) meets the real log of a blog (the Elastic example Apache log, 10,000 lines of
  17-20 May 2015, its own scanners included).
- **blog → shop**: the shipped default model (trained on that blog) meets the shop: CSIC 2010's
  normal test requests rendered as access lines; CSIC's own GET attacks are also measured.

Attacks: fuzzdb payloads injected into the following lines (the families of
benchmarks/train_default_model.py, 500 each).

For the first 5,000 lines: per 500, the share over the starting model's threshold (what it would
flag) and the share flagged (held while learning). Then the learned model swaps in; the following
lines: the share flagged per 500 (the realized FPR; for the blog an upper bound, its log holds
real scanners) and the attacks flagged at the threshold. Results: benchmarks/results/learning.json;
``learning_section`` renders the section of docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import machine, write_results  # noqa: E402
from benchmarks.train_default_model import PAYLOAD_FILES, inject  # noqa: E402
from logscore.artifact import read_artifact  # noqa: E402
from logscore.inputs import read_lines  # noqa: E402
from tests.sidecar_process import SidecarProcess  # noqa: E402

LEARN_RECORDS = 5000
STEP = 500  # lines per row of the time series
CALL = 250  # lines per gRPC call
CSIC_AGENT = "Mozilla/5.0 (compatible; Konqueror/3.5; Linux) KHTML/3.5.8 (like Gecko)"


def csic_access_lines(data: Path, split: str, label: str, methods=("GET", "POST", "PUT")) -> list[str]:
    """CSIC 2010 requests as an access log would hold them: path and query (no body), status 200."""
    from benchmarks.evaluate_all import _csic_rows

    lines = []
    for number, row in enumerate(r for r in _csic_rows(data) if r["split"] == split and r["label"] == label):
        if row["method"] not in methods:
            continue
        parts = urlsplit(row["url"])
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        target = target.replace("\\", "\\\\").replace('"', '\\"')
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(1262304000 + number * 7))
        lines.append(f'127.0.0.1 - - [{stamp}] "{row["method"]} {target} HTTP/1.1" 200 - "-" "{CSIC_AGENT}"')
    return lines


def injected(data: Path, lines: list[str], count: int = 500) -> list[str]:
    """fuzzdb payloads injected into a site's lines, ``count`` per family."""
    rng = random.Random(0)
    attacks = []
    for relative in PAYLOAD_FILES.values():
        payloads = [p.strip() for p in (data / "payloads" / "fuzzdb" / "attack" / relative)
                    .read_text(encoding="utf-8", errors="replace").splitlines() if p.strip()]
        attacks += [inject(rng.choice(lines), rng.choice(payloads), rng) for _ in range(count)]
    return attacks


def stream(stub, lines: list[str], threshold: float) -> dict:
    """Send lines in order; per STEP lines: share over the threshold, share flagged, share held."""
    from logscore.generated.logscore.v1 import scorer_pb2 as pb

    over, flagged, held = [], [], []
    for start in range(0, len(lines), CALL):
        chunk = lines[start: start + CALL]
        response = stub.Score(pb.ScoreRequest(lines=pb.RawLines(lines=[x.encode() for x in chunk])), timeout=60)
        over += [s >= threshold for s in response.scores]
        flagged += list(response.is_anomaly)
        learning = {n.index for n in response.notes if n.description.startswith("learning")}
        held += [i in learning for i in range(len(chunk))]
    steps = range(0, len(lines), STEP)
    share = lambda values, i: round(float(np.mean(values[i: i + STEP])), 4)  # noqa: E731
    return {"over_threshold": [share(over, i) for i in steps], "flagged": [share(flagged, i) for i in steps],
            "held": [share(held, i) for i in steps], "flagged_total": int(np.sum(flagged)), "lines": len(lines),
            "flagged_at": np.flatnonzero(flagged).tolist()}


def learn(name: str, start_model: Path, site: list[str], attacks: dict[str, list[str]], workdir: Path) -> dict:
    """The sidecar learns ``site[:LEARN_RECORDS]``, then scores the rest and each set of attacks."""
    models = workdir / name / "models"
    models.mkdir(parents=True)
    shutil.copy(start_model, models / "site.onnx")
    starting = read_artifact(models / "site.onnx").metadata
    sidecar = SidecarProcess(models, workdir / name, default_model="site", learn="true",
                             learn_records=LEARN_RECORDS, learn_window=LEARN_RECORDS).start()
    try:
        stub = sidecar.stub()
        first = stream(stub, site[:LEARN_RECORDS], starting["calibration"]["threshold"])
        waited = time.monotonic()
        original = sidecar.model_versions()["site"]
        sidecar.wait_for(lambda: sidecar.model_versions()["site"] != original, 900, "the learned model")
        waited = round(time.monotonic() - waited, 1)
        learned = read_artifact(models / "site.onnx").metadata
        following = stream(stub, site[LEARN_RECORDS:], learned["calibration"]["threshold"])
        attacked = {kind: stream(stub, lines, learned["calibration"]["threshold"]) for kind, lines in attacks.items()}
        status = json.loads(sidecar.http_get("/readyz")[1])["learning"]["site"]
    finally:
        sidecar.stop()
    for streamed in (first, *attacked.values()):
        del streamed["flagged_at"]
    aside = learned["training"].get("set_aside") or {}
    return {"name": name, "starting_model": starting["training"]["inputs"], "lines": len(site),
            "first": first, "following": following, "learning_seconds": waited, "last": status["last"],
            "learned": {"threshold": learned["calibration"]["threshold"],
                        "target_fpr": learned["calibration"]["target_fpr"],
                        "held_back_fpr": learned["calibration"]["held_back"]["fpr"],
                        "records_used": learned["training"]["records_used"], "set_aside": aside.get("records"),
                        "set_aside_examples": [e["record"] for e in aside.get("examples", [])[:5]]},
            "following_flagged": round(following["flagged_total"] / max(following["lines"], 1), 5),
            "following_flagged_2xx_3xx": flagged_below_400(site[LEARN_RECORDS:], following),
            "attack_recall": {kind: {"flagged": round(a["flagged_total"] / max(a["lines"], 1), 4), "lines": a["lines"]}
                              for kind, a in attacked.items()}}


def flagged_below_400(lines: list[str], streamed: dict) -> dict:
    """The flagged share among lines answered 2xx/3xx (a blog's 404s are mostly scanners and broken links)."""
    from logscore.parsers import parse_access

    status = [parse_access(line)[0].get("status", "") for line in lines]
    served = [i for i, code in enumerate(status) if code[:1] in ("2", "3")]
    flagged = set(streamed["flagged_at"])
    hits = sum(1 for i in served if i in flagged)
    return {"lines": len(served), "flagged": hits, "share": round(hits / max(len(served), 1), 5)}


def run_all(data: Path, workdir: Path) -> dict:
    from logscore.features import load_spec
    from logscore.training.train import TrainOptions, save_model, train

    blog = list(read_lines([str(data / "elastic_apache_access_logs" / "apache_logs")]))
    shop_training = csic_access_lines(data, "train", "normal")
    shop_model = workdir / "shop.onnx"
    proto, _ = train(shop_training, TrainOptions(spec=load_spec(None, "access"), name="shop", inputs=["csic2010"]))
    save_model(proto, shop_model)
    shop_site = csic_access_lines(data, "test", "normal")[:10_000]
    shop_attacks = random.Random(0).sample(csic_access_lines(data, "test", "anomalous", ("GET",)), 2000)
    results = {"machine": machine(), "load_average": os.getloadavg(), "learn_records": LEARN_RECORDS,
               "runs": [learn("shop model → blog", shop_model, blog,
                              {"fuzzdb injected": injected(data, blog[LEARN_RECORDS:])}, workdir),
                        learn("default model (blog) → shop", ROOT / "models" / "apache-access.onnx", shop_site,
                              {"fuzzdb injected": injected(data, shop_site[LEARN_RECORDS:]),
                               "CSIC GET attacks": shop_attacks}, workdir)]}
    results["load_average_after"] = os.getloadavg()
    write_results(str(ROOT / "benchmarks" / "results" / "learning.json"), results)
    return results


def learning_section(results: dict) -> str:
    """Markdown for docs/accuracy.md: a summary table, then each run's flagged share over time."""
    lines = ["| starting model → new site | first 5,000 lines: over the starting model's threshold | flagged while "
             "learning | learning took | following lines flagged (2xx/3xx only) | attacks flagged | set aside in "
             "training |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for run in results["runs"]:
        first, served = run["first"], run["following_flagged_2xx_3xx"]
        attacks = "; ".join(f"{kind} {a['flagged']:.2%} of {a['lines']:,}" for kind, a in run["attack_recall"].items())
        lines.append(f"| {run['name']} | {np.mean(first['over_threshold']):.1%} | {np.mean(first['flagged']):.1%} | "
                     f"{run['learning_seconds']} s | {run['following_flagged']:.2%} of {run['following']['lines']:,} "
                     f"({served['share']:.2%} of {served['lines']:,}) | {attacks} | {run['learned']['set_aside']} |")
    for run in results["runs"]:
        lines += ["", f"**{run['name']}**: the share of each 500 lines over the starting model's threshold (what it "
                  "would have flagged) and flagged (held while learning), in order.", "",
                  "| lines | model | over the starting model's threshold | flagged | held |", "|---|---|---:|---:|---:|"]
        for i, (over, flagged, held) in enumerate(zip(*(run["first"][k] for k in ("over_threshold", "flagged",
                                                                                   "held")))):
            lines.append(f"| {i * STEP:,}–{(i + 1) * STEP:,} | starting (learning) | {over:.1%} | {flagged:.1%} | "
                         f"{held:.0%} |")
        for i, flagged in enumerate(run["following"]["flagged"]):
            start = LEARN_RECORDS + i * STEP
            lines.append(f"| {start:,}–{min(start + STEP, run['lines']):,} | learned | – | {flagged:.1%} | 0 % |")
    lines += ["", f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores; load average "
              f"{results['load_average'][0]:.1f} at the start, {results['load_average_after'][0]:.1f} at the end."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    results = run_all(Path(args.data), Path(tempfile.mkdtemp(prefix="logscore-learning-")))
    print(learning_section(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
