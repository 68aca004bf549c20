"""The prior art's methods, re-implemented for comparison only (never part of the product).

- Jubatus anomaly as deployed with Fluentd: LOF over binary character bigrams of the request.
"""

from __future__ import annotations

import numpy as np


def jubatus_style_lof(training: list[str], test: list[str], neighbours: int = 10, reference: int = 5000,
                      seed: int = 0) -> tuple[np.ndarray, float]:
    """LOF (novelty) on binary char-bigram vectors; (test scores, threshold at the 99th training percentile)."""
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.neighbors import LocalOutlierFactor

    vectorizer = HashingVectorizer(analyzer="char", ngram_range=(2, 2), binary=True, norm="l2",
                                   alternate_sign=False, n_features=2 ** 18)
    rng = np.random.default_rng(seed)
    sample = [training[i] for i in rng.choice(len(training), min(reference, len(training)), replace=False)]
    lof = LocalOutlierFactor(n_neighbors=neighbours, novelty=True).fit(vectorizer.transform(sample))
    train_scores = -lof.score_samples(vectorizer.transform(sample))
    test_scores = np.concatenate([-lof.score_samples(vectorizer.transform(test[i: i + 5000]))
                                  for i in range(0, len(test), 5000)])
    return test_scores, float(np.percentile(train_scores, 99))
