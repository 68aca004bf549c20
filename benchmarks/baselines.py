"""The prior art's methods, re-implemented for comparison only (never part of the product).

- Jubatus anomaly as deployed with Fluentd: LOF over binary character bigrams of the request.
- AICoE log-anomaly-detector: Word2Vec means + a 24x24 self-organizing map, mean + 3.1 sigma.
- Its fork (LAD): LOF + autoencoder on Word2Vec means.

Needs scikit-learn and gensim (`pip install gensim`); each returns (test scores, threshold).
"""

from __future__ import annotations

import re

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


_WORDS = re.compile(r"\w+|[^\w\s]")


def _word2vec_means(training: list[str], test: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Word2Vec (gensim) on the records' tokens; each record is the mean of its word vectors."""
    from gensim.models import Word2Vec

    train_tokens = [_WORDS.findall(t.lower()) for t in training]
    model = Word2Vec(train_tokens, vector_size=64, window=5, min_count=1, epochs=5, workers=1, seed=seed)

    def means(tokens_list):
        out = np.zeros((len(tokens_list), 64), dtype=np.float32)
        for i, tokens in enumerate(tokens_list):
            known = [model.wv[t] for t in tokens if t in model.wv]
            if known:
                out[i] = np.mean(known, axis=0)
        return out

    return means(train_tokens), means([_WORDS.findall(t.lower()) for t in test])


def aicoe_w2v_som(training: list[str], test: list[str], seed: int = 0) -> tuple[np.ndarray, float]:
    """AICoE log-anomaly-detector: Word2Vec means, a 24x24 SOM, distance to the best-matching unit;
    threshold mean + 3.1 sigma of the training distances."""
    train_vectors, test_vectors = _word2vec_means(training, test, seed)
    rng = np.random.default_rng(seed)
    units = train_vectors[rng.choice(len(train_vectors), 24 * 24, replace=len(train_vectors) < 576)].astype(np.float64)
    grid = np.array([(i, j) for i in range(24) for j in range(24)], dtype=np.float64)
    grid_distance = ((grid[:, None] - grid[None]) ** 2).sum(-1)
    sample = train_vectors[rng.choice(len(train_vectors), min(10_000, len(train_vectors)), replace=False)]
    for epoch in range(10):
        sigma = max(12.0 * (1 - epoch / 10), 0.5)
        winners = _distances(sample, units).argmin(1)
        influence = np.exp(-grid_distance / (2 * sigma * sigma))[:, winners]
        total = influence.sum(1, keepdims=True)
        units = np.where(total > 1e-12, influence @ sample / np.maximum(total, 1e-12), units)
    train_scores = np.sqrt(_distances(train_vectors, units).min(1))
    test_scores = np.sqrt(_distances(test_vectors, units).min(1))
    return test_scores, float(train_scores.mean() + 3.1 * train_scores.std())


def lad_lof_autoencoder(training: list[str], test: list[str], seed: int = 0) -> tuple[np.ndarray, float]:
    """The LAD fork's ensemble: LOF and an autoencoder on Word2Vec means; each score turned into its
    rank among training scores, the two averaged; threshold at the training 99th percentile."""
    from sklearn.neighbors import LocalOutlierFactor
    from sklearn.neural_network import MLPRegressor

    train_vectors, test_vectors = _word2vec_means(training, test, seed)
    rng = np.random.default_rng(seed)
    reference = train_vectors[rng.choice(len(train_vectors), min(5000, len(train_vectors)), replace=False)]
    lof = LocalOutlierFactor(n_neighbors=20, novelty=True).fit(reference)
    autoencoder = MLPRegressor(hidden_layer_sizes=(16,), max_iter=50, random_state=seed).fit(reference, reference)

    def both(vectors):
        return (-lof.score_samples(vectors), ((autoencoder.predict(vectors) - vectors) ** 2).sum(1))

    train_lof, train_ae = both(reference)
    test_lof, test_ae = both(test_vectors)
    rank = lambda train, values: np.searchsorted(np.sort(train), values) / len(train)  # noqa: E731
    train_scores = (rank(train_lof, train_lof) + rank(train_ae, train_ae)) / 2
    test_scores = (rank(train_lof, test_lof) + rank(train_ae, test_ae)) / 2
    return test_scores, float(np.percentile(train_scores, 99))


def _distances(x: np.ndarray, units: np.ndarray) -> np.ndarray:
    return np.maximum((x ** 2).sum(1)[:, None] - 2 * x @ units.T + (units ** 2).sum(1)[None, :], 0)
