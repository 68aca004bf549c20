"""The score histogram counts alike however many records a batch has."""

import numpy as np
import pytest

from logscore.metrics import SCORE_BUCKETS, Metrics


def histogram(metrics: Metrics) -> dict:
    text = metrics.render().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith("logscore_score_")}


def test_small_and_large_batches_count_the_same():
    scores = np.random.default_rng(0).random(50).astype(np.float32) ** 0.1
    scores[:3] = [0.999, 1.0, 0.5]  # on bucket edges: counted as "less or equal"
    one_by_one, at_once = Metrics(), Metrics()
    for value in scores:
        one_by_one.scores.observe("m", np.array([value], dtype=np.float32))
    at_once.scores.observe("m", scores)
    counts, same = histogram(at_once), histogram(one_by_one)
    assert same.pop('logscore_score_sum{model="m"}') == pytest.approx(counts.pop('logscore_score_sum{model="m"}'))
    assert same == counts
    assert counts['logscore_score_count{model="m"}'] == 50
    for edge in SCORE_BUCKETS:
        assert counts[f'logscore_score_bucket{{le="{edge}",model="m"}}'] == int((scores.astype(np.float64) <= edge).sum())
