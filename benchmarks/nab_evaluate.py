"""NAB on the shared series: ours (`logscore evaluate --series`) beside a windowed Gaussian, scored by NAB.

    python benchmarks/nab_evaluate.py --nab /path/to/NAB --nab-python /path/to/venv/bin/python

NAB's own scorer runs beside the project, never copied into it: ``--nab`` is a checkout of
numenta/NAB and ``--nab-python`` a Python with its needs (pandas < 3). This script lays out a work
directory (``--work``, outside the project) holding only the series of ``--data`` (symlinked) and
their windows, writes each detector's results there in NAB's format, and runs
``run.py --optimize --score --normalize`` on it (NAB's threshold optimisation, one threshold per
detector and profile). The null detector's results (a constant score) are NAB's baseline.

Other series: ``--data NAB/data --windows FILE`` scores only the series a windows file names (paths
relative to ``--data``, as in NAB's ``labels/combined_windows.json``), less those of ``--without
FILE``: the 48 NAB series the project was not tuned on are its held-out test (docs/accuracy.md),

    ... --data NAB/data --windows NAB/labels/combined_windows.json --without ../shared/data/nab/combined_windows.json
 ``--published ARTime,numenta,...``
rescores NAB's own results of those detectors on the same series, in the same run. NAB scores every
row of a series in file order; one series whose clock goes back (machine_temperature_system_failure)
is read with that time held at the one before (``read_nab_series``).

Detectors: ``logscore`` (the product: the windows' forecaster, online, sidecar/logscore/series.py)
and ``windowedGaussianBaseline`` (written here for comparison: the tail probability of each value
under the mean and deviation of the previous ``WINDOW`` values, as NAB's windowed Gaussian does).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, write_results  # noqa: E402
from logscore.errors import InputError  # noqa: E402
from logscore.series import Series, labels_from_windows, read_series, score_series, unix_seconds  # noqa: E402

WINDOW = 6400  # NAB's windowed Gaussian uses the last 6,400 values
STEP = 100  # ... recomputing its mean and deviation every 100 values
DETECTORS = ("logscore", "windowedGaussianBaseline", "null")


def windowed_gaussian(values: np.ndarray) -> np.ndarray:
    """1 - the tail probability beyond each value (on its side) under a normal fitted to the values before it
    (the last WINDOW of them; refitted after every value until the window is full, then every STEP)."""
    scores = np.zeros(len(values))
    mean = deviation = None
    for i, value in enumerate(values.tolist()):
        if mean is not None:
            z = abs(value - mean) / max(deviation, 1e-6)
            scores[i] = 1.0 - 0.5 * math.erfc(z / math.sqrt(2))  # in [0.5, 1]: 1 - the tail beyond the value
        if i < WINDOW or (i - WINDOW) % STEP == STEP - 1:
            window = values[max(0, i + 1 - WINDOW): i + 1]
            mean, deviation = float(window.mean()), float(window.std())
    return scores


def read_nab_series(path: Path) -> Series:
    """A NAB series as NAB scores it: every row, in file order. One of NAB's 58 series
    (machine_temperature_system_failure) has its clock go back 55 minutes at row 10,149, which
    `logscore evaluate --series` refuses; here a time that goes back is held at the latest before it."""
    try:
        return read_series(str(path))
    except InputError as error:
        if "must not go back" not in str(error):
            raise
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    times = np.maximum.accumulate(np.array([unix_seconds(stamp) for stamp, _ in rows]))
    return Series([stamp for stamp, _ in rows], times, np.array([float(value) for _, value in rows]))


def write_nab_results(path: Path, series, scores: np.ndarray, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["timestamp", "value", "anomaly_score", "label"])
        for stamp, value, score, label in zip(series.timestamps, series.values.tolist(), scores.tolist(),
                                              labels.tolist()):
            writer.writerow([stamp, value, repr(score), label])  # NOTE: all digits: the baseline's scores crowd near 1


def lay_out(data: Path, work: Path, windows_file: Optional[Path] = None, without: Optional[Path] = None) -> dict:
    """work/data (links to the series named in the windows file, less those ``without`` names),
    work/labels/combined_windows.json; returns the windows. The windows file is
    ``data/combined_windows.json`` unless given."""
    windows = json.loads((windows_file or data / "combined_windows.json").read_text())
    for name in json.loads(without.read_text()) if without else ():
        windows.pop(name, None)
    for name in windows:
        target = work / "data" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(data / name)
    (work / "labels").mkdir(parents=True, exist_ok=True)
    (work / "labels" / "combined_windows.json").write_text(json.dumps(windows, indent=1))
    return windows


def score_all(data: Path, work: Path, windows: dict) -> dict:
    timings = {}
    for name, spans in windows.items():
        series = read_nab_series(data / name)
        labels = labels_from_windows(series, spans)
        category, file_name = name.split("/")
        started = time.process_time()
        ours = score_series(series.times, series.values)
        timings[name] = round((time.process_time() - started) / len(ours) * 1e6, 1)
        results = {"logscore": ours, "windowedGaussianBaseline": windowed_gaussian(series.values),
                   "null": np.full(len(ours), 0.5)}
        for detector, scores in results.items():
            write_nab_results(work / "results" / detector / category / f"{detector}_{file_name}", series, scores,
                              labels)
        print(f"{name}: {len(ours)} points, {timings[name]} us of CPU per point", flush=True)
    return timings


def link_published(nab: Path, work: Path, windows: dict, detectors: Sequence[str]) -> None:
    """NAB's own results of published detectors (``nab/results/DETECTOR``) for the same series, linked
    into the work tree, so NAB's scorer rescores them on these series beside ours."""
    for detector in detectors:
        for name in windows:
            category, file_name = name.split("/")
            source = nab / "results" / detector / category / f"{detector}_{file_name}"
            if not source.exists():
                raise SystemExit(f"{source}: no results of '{detector}' for {name} in the NAB checkout; "
                                 f"name a detector listed in {nab / 'results'}")
            target = work / "results" / detector / category / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(source)


def run_nab(nab: Path, python: str, work: Path, detectors: Sequence[str] = DETECTORS) -> dict:
    """NAB's optimize + score + normalize on the work tree; the final scores per detector and profile."""
    thresholds = work / "thresholds.json"
    thresholds.write_text(json.dumps({d: {} for d in detectors}))
    command = [python, str(nab / "run.py"), "-d", ",".join(detectors), "--optimize", "--score", "--normalize",
               "--skipConfirmation", "--dataDir", str(work / "data"), "--resultsDir", str(work / "results"),
               "--windowsFile", str(work / "labels" / "combined_windows.json"),
               "--profilesFile", str(nab / "config" / "profiles.json"), "--thresholdsFile", str(thresholds),
               "-n", "1"]
    done = subprocess.run(command, cwd=nab, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(nab)})
    if done.returncode != 0:
        raise SystemExit(f"NAB failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    scores: dict = {}
    for detector, profile, value in re.findall(r"Final score for '(\w+)' detector on '(\w+)' profile = (-?[\d.]+)",
                                               done.stdout):
        scores.setdefault(detector, {})[profile] = float(value)
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nab", required=True, type=Path, help="a checkout of numenta/NAB")
    parser.add_argument("--nab-python", required=True, help="a Python that runs NAB (pandas < 3)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "nab")
    parser.add_argument("--windows", type=Path, help="the windows file naming the series to score (paths "
                        "relative to --data, as in NAB's labels/combined_windows.json); default "
                        "DATA/combined_windows.json")
    parser.add_argument("--without", type=Path, help="a windows file whose series are left out (the held-out "
                        "48: --windows NAB/labels/combined_windows.json --without ../shared/data/nab/"
                        "combined_windows.json)")
    parser.add_argument("--published", default="", help="comma-separated NAB detectors (e.g. "
                        "ARTime,numenta,randomCutForest,twitterADVec,windowedGaussian) whose own results in "
                        "--nab are rescored on the same series")
    parser.add_argument("--work", type=Path, default=Path("/tmp/logscore-nab"))
    parser.add_argument("--out", default="benchmarks/results/nab.json")
    args = parser.parse_args()
    published = [d for d in args.published.split(",") if d]
    windows = lay_out(args.data, args.work, args.windows, args.without)
    link_published(args.nab, args.work, windows, published)
    timings = score_all(args.data, args.work, windows)
    scores = run_nab(args.nab, args.nab_python, args.work, DETECTORS + tuple(published))
    for detector in ("logscore", "windowedGaussianBaseline", *published):
        print(f"{detector}: NAB standard {scores.get(detector, {}).get('standard')}")
    result = {"machine": machine(), "load_average": os.getloadavg(),
              "series": sorted(windows), "windows": sum(len(w) for w in windows.values()),
              "nab_scores": scores, "cpu_us_per_point": timings}
    if args.windows is None and args.data.name == "nab" and len(windows) == 10:
        result["published_on_these_10_standard"] = {"ARTime": 84.7, "HTM": 71.0, "Random Cut Forest": 65.7,
                                                    "Twitter ADVec": 54.9, "windowed Gaussian": 49.5}
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
