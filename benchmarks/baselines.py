"""The prior art's methods, re-implemented for comparison only (never part of the product).

- Jubatus anomaly as deployed with Fluentd: LOF over binary character bigrams of the request.
- AICoE log-anomaly-detector: Word2Vec means + a 24x24 self-organizing map, mean + 3.1 sigma.
- Its fork (LAD): LOF + autoencoder on Word2Vec means.
- The naive pipeline a first attempt builds: HashingVectorizer char 3-grams of the URL + IsolationForest.

And the floor: the least any scorer of access lines does (``HashingFloor``).

Needs scikit-learn and gensim (the ``baselines`` extra). Each ``fit_*`` learns from normal texts
and returns a ``Baseline``: ``featurize`` (texts → vectors) and ``score_features`` (vectors →
scores, higher is more anomalous) are separate so benchmarks can time them as the product's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Baseline:
    featurize: Callable[[list[str]], object]
    score_features: Callable[[object], np.ndarray]
    threshold: float  # scores at or above are anomalous, as the original method decides

    def score(self, texts: list[str]) -> np.ndarray:
        return self.score_features(self.featurize(texts))


def fit_jubatus_style_lof(training: list[str], neighbours: int = 10, reference: int = 5000,
                          seed: int = 0) -> Baseline:
    """LOF (novelty) on binary char-bigram vectors; threshold at the 99th training percentile."""
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.neighbors import LocalOutlierFactor

    vectorizer = HashingVectorizer(analyzer="char", ngram_range=(2, 2), binary=True, norm="l2",
                                   alternate_sign=False, n_features=2 ** 18)
    rng = np.random.default_rng(seed)
    sample = [training[i] for i in rng.choice(len(training), min(reference, len(training)), replace=False)]
    lof = LocalOutlierFactor(n_neighbors=neighbours, novelty=True).fit(vectorizer.transform(sample))
    outlier_factor = lambda vectors: -lof.score_samples(vectors)  # noqa: E731
    train_scores = outlier_factor(vectorizer.transform(sample))
    return Baseline(vectorizer.transform, outlier_factor, float(np.percentile(train_scores, 99)))


_WORDS = re.compile(r"\w+|[^\w\s]")
_W2V_DIMS = 64


def _fit_word2vec_means(training: list[str], seed: int) -> Callable[[list[str]], np.ndarray]:
    """Word2Vec (gensim) on the records' tokens; a record's vector is the mean of its word vectors."""
    from gensim.models import Word2Vec

    model = Word2Vec([_WORDS.findall(t.lower()) for t in training], vector_size=_W2V_DIMS, window=5,
                     min_count=1, epochs=5, workers=1, seed=seed)

    def means(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), _W2V_DIMS), dtype=np.float32)
        for i, text in enumerate(texts):
            known = [model.wv[t] for t in _WORDS.findall(text.lower()) if t in model.wv]
            if known:
                out[i] = np.mean(known, axis=0)
        return out

    return means


def fit_aicoe_w2v_som(training: list[str], seed: int = 0) -> Baseline:
    """AICoE log-anomaly-detector: Word2Vec means, a 24x24 SOM, distance to the best-matching unit;
    threshold mean + 3.1 sigma of the training distances."""
    means = _fit_word2vec_means(training, seed)
    train_vectors = means(training)
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
    unit_distance = lambda vectors: np.sqrt(_distances(vectors, units).min(1))  # noqa: E731
    train_scores = unit_distance(train_vectors)
    return Baseline(means, unit_distance, float(train_scores.mean() + 3.1 * train_scores.std()))


def fit_lad_lof_autoencoder(training: list[str], seed: int = 0) -> Baseline:
    """The LAD fork's ensemble: LOF and an autoencoder on Word2Vec means; each score turned into its
    rank among training scores, the two averaged; threshold at the training 99th percentile."""
    from sklearn.neighbors import LocalOutlierFactor
    from sklearn.neural_network import MLPRegressor

    means = _fit_word2vec_means(training, seed)
    train_vectors = means(training)
    rng = np.random.default_rng(seed)
    reference = train_vectors[rng.choice(len(train_vectors), min(5000, len(train_vectors)), replace=False)]
    lof = LocalOutlierFactor(n_neighbors=20, novelty=True).fit(reference)
    autoencoder = MLPRegressor(hidden_layer_sizes=(16,), max_iter=50, random_state=seed).fit(reference, reference)
    train_lof = np.sort(-lof.score_samples(reference))
    train_ae = np.sort(((autoencoder.predict(reference) - reference) ** 2).sum(1))

    def mean_rank(vectors: np.ndarray) -> np.ndarray:
        lof_scores = -lof.score_samples(vectors)
        ae_scores = ((autoencoder.predict(vectors) - vectors) ** 2).sum(1)
        return (np.searchsorted(train_lof, lof_scores) / len(train_lof)
                + np.searchsorted(train_ae, ae_scores) / len(train_ae)) / 2

    return Baseline(means, mean_rank, float(np.percentile(mean_rank(reference), 99)))


def request_urls(lines: list[str]) -> list[str]:
    """The URL of each access line, split out naively (the text between the first two spaces of
    the quoted request)."""
    urls = []
    for line in lines:
        request = line.split('"', 2)[1] if line.count('"') >= 2 else line
        parts = request.split(" ")
        urls.append(parts[1] if len(parts) > 1 else request)
    return urls


def fit_naive_url_isolation_forest(training: list[str], seed: int = 0) -> Baseline:
    """HashingVectorizer (char 3-grams of the URL) + a 100-tree IsolationForest: what a first
    attempt with scikit-learn looks like. Threshold at the 99th training percentile.

    NOTE: 2^10 hashed features, handed to the forest dense: its fastest setting we found (with
    2^18 sparse features ``score_samples`` took 6x as long), so comparisons do not flatter."""
    from sklearn.ensemble import IsolationForest
    from sklearn.feature_extraction.text import HashingVectorizer

    vectorizer = HashingVectorizer(analyzer="char", ngram_range=(3, 3), n_features=2 ** 10, alternate_sign=False)
    vectorize = lambda lines: vectorizer.transform(request_urls(lines)).toarray().astype(np.float32)  # noqa: E731
    forest = IsolationForest(n_estimators=100, random_state=seed).fit(vectorize(training))
    outlier_score = lambda vectors: -forest.score_samples(vectors)  # noqa: E731
    return Baseline(vectorize, outlier_score, float(np.percentile(outlier_score(vectorize(training)), 99)))


class HashingFloor:
    """The floor: character 3-grams of each URL hashed over the whole batch with numpy, and one
    onnxruntime call summing a weight table over them (Gather + ReduceSum). No parsing, no
    structure, no caches, no calibration: the least a scorer of these lines does per record."""

    TABLE_BITS = 20

    def __init__(self, seed: int = 0):
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        table = np.random.default_rng(seed).random(1 << self.TABLE_BITS, dtype=np.float32)
        table[0] = 0.0  # padding windows point here
        graph = helper.make_graph(
            [helper.make_node("Gather", ["table", "keys"], ["weights"], axis=0),
             helper.make_node("ReduceSum", ["weights", "axis"], ["score"], keepdims=0)],
            "floor", [helper.make_tensor_value_info("keys", TensorProto.INT64, [None, None])],
            [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None])],
            [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([1], np.int64), "axis")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def featurize(self, lines: list[str]) -> np.ndarray:
        encoded = [url.encode("utf-8", "surrogatepass")[:1024] for url in request_urls(lines)]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        width = max(int(lengths.max(initial=3)), 3)
        matrix = np.zeros((len(encoded), width), dtype=np.uint64)
        matrix[np.arange(width) < lengths[:, None]] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        hashed = matrix[:, :-2] * np.uint64(0x100000001B3) ** 2 + matrix[:, 1:-1] * np.uint64(0x100000001B3) \
            + matrix[:, 2:]
        keys = ((hashed * np.uint64(0xBF58476D1CE4E5B9)) >> np.uint64(64 - self.TABLE_BITS)).astype(np.int64)
        keys[np.arange(width - 2) + 3 > lengths[:, None]] = 0
        return keys

    def score_features(self, keys: np.ndarray) -> np.ndarray:
        return self.session.run(["score"], {"keys": keys})[0]

    def score(self, lines: list[str]) -> np.ndarray:
        return self.score_features(self.featurize(lines))


BASELINES = {"jubatus-style LOF on char bigrams": fit_jubatus_style_lof,
             "AICoE Word2Vec + SOM": fit_aicoe_w2v_som,
             "LAD fork LOF + autoencoder on Word2Vec": fit_lad_lof_autoencoder}


def _distances(x: np.ndarray, units: np.ndarray) -> np.ndarray:
    return np.maximum((x ** 2).sum(1)[:, None] - 2 * x @ units.T + (units ** 2).sum(1)[None, :], 0)
