"""Detectors: fit on normal records (scikit-learn or numpy), exported as ONNX subgraphs.

Every detector's raw score means "higher is more anomalous" (scikit-learn's
``score_samples`` is the opposite: it is negated here, once). ``reference``
computes the same raw score without ONNX, for the equivalence tests.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import numpy as np

from ..features import FeatureBatch
from .graph import GraphBuilder


@dataclass
class Features:
    """What detectors fit on and score: a featurized batch and the training key frequencies."""

    batch: FeatureBatch
    table: "RarityTable"

    @property
    def dense(self) -> np.ndarray:
        return self.batch.dense


class Detector:
    kind = ""
    uses_dense = True
    progress = None  # training sets it: called (step, steps) by detectors that fit in long steps

    def __init__(self, seed: int = 0, **params):
        self.seed = seed
        self.params = params

    def fit(self, data: Features) -> None:
        raise NotImplementedError

    def build(self, g: GraphBuilder, surprise: str) -> str:
        """Add this detector's subgraph; return the name of its raw score tensor [N]."""
        raise NotImplementedError

    def reference(self, data: Features) -> np.ndarray:
        """The raw score computed without ONNX (scikit-learn or numpy)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, **self.params}


class Standardizer:
    """Column mean/scale learned on training data; constant columns keep scale 1."""

    def __init__(self, dense: np.ndarray):
        self.mean = dense.mean(axis=0)
        scale = dense.std(axis=0)
        self.scale = np.where(scale > 1e-6, scale, 1.0)

    def __call__(self, dense: np.ndarray) -> np.ndarray:
        return (dense - self.mean) / self.scale


# --- rarity --------------------------------------------------------------

def default_support(records: int) -> float:
    """Records a feature must be seen in to count as fully normal: 0.05 % of them, at least 5."""
    return max(5.0, 0.0005 * records)


class RarityTable:
    """Training frequency of every feature key, as surprise in [0, 1].

    surprise = 1 - log1p(count) / log1p(support), clipped to [0, 1]: a key never
    seen is 1, a key seen in ``support`` or more records is 0. Stored in the
    graph as a LabelEncoder (exact 32-bit keys, no second hashing); it also
    feeds explanations for every model, whatever its detectors.
    """

    def __init__(self, keys: np.ndarray, records: int, support: float | None = None):
        self.records = records
        self.support = float(support if support is not None else default_support(records))
        unique, counts = np.unique(keys, return_counts=True)
        self.keys = unique
        self.surprise = self.surprise_of(counts)

    @classmethod
    def from_counts(cls, keys: np.ndarray, counts: np.ndarray, records: int,
                    support: float | None = None) -> "RarityTable":
        """The table of distinct ``keys`` (ascending) seen ``counts`` times (training/streaming.py)."""
        table = cls(np.zeros(0, np.int64), records, support)
        table.keys, table.surprise = keys, table.surprise_of(counts)
        return table

    def surprise_of(self, counts: np.ndarray) -> np.ndarray:
        return np.clip(1.0 - np.log1p(counts) / math.log1p(self.support), 0.0, 1.0).astype(np.float32)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        if len(self.keys) == 0:
            return np.ones(len(keys), dtype=np.float32)
        position = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[position] == keys, self.surprise[position], 1.0).astype(np.float32)

    def build(self, g: GraphBuilder) -> str:
        return g.op("LabelEncoder", ["keys"], "key_surprise", domain="ai.onnx.ml",
                    keys_int64s=self.keys.tolist() or [-1], values_floats=self.surprise.tolist() or [1.0],
                    default_float=1.0)


class Rarity(Detector):
    """Sum of the surprise of a record's features: unseen paths, parameters, value shapes, n-grams."""

    kind = "rarity"
    uses_dense = False

    def fit(self, data: Features) -> None:
        self.table = data.table

    def build(self, g: GraphBuilder, surprise: str) -> str:
        return g.row_sum(g.op("Mul", [surprise, "key_weights"]))

    def reference(self, data: Features) -> np.ndarray:
        batch = data.batch
        per_key = self.table.lookup(batch.keys) * batch.weights
        return np.bincount(batch.rows, weights=per_key, minlength=batch.size)


# --- isolation forest ------------------------------------------------------

def average_path_length(n: np.ndarray) -> np.ndarray:
    """Expected path length of an unsuccessful BST search among n points (Liu et al.)."""
    n = np.asarray(n, dtype=np.float64)
    result = np.zeros_like(n)
    result[n == 2] = 1.0
    big = n > 2
    result[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return result


class IsolationForest(Detector):
    """All trees in one TreeEnsembleRegressor node (skl2onnx's export is ~100x slower to run)."""

    kind = "isolation_forest"

    def fit(self, data: Features) -> None:
        from sklearn.ensemble import IsolationForest as SkIsolationForest

        dense = data.dense
        self.params.setdefault("n_estimators", 100)
        self.params.setdefault("max_samples", 256)
        self.model = SkIsolationForest(random_state=self.seed, **self.params).fit(dense)

    def reference(self, data: Features) -> np.ndarray:
        return -self.model.score_samples(data.dense)

    def build(self, g: GraphBuilder, surprise: str) -> str:
        attrs: dict[str, list] = {k: [] for k in (
            "nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_values", "nodes_modes",
            "nodes_truenodeids", "nodes_falsenodeids", "target_treeids", "target_nodeids",
            "target_ids", "target_weights")}
        for tree_id, (estimator, features) in enumerate(zip(self.model.estimators_,
                                                             self.model.estimators_features_)):
            self._add_tree(attrs, tree_id, estimator.tree_, features)
        summed = g.op("TreeEnsembleRegressor", ["dense"], domain="ai.onnx.ml", n_targets=1,
                      aggregate_function="SUM", post_transform="NONE", **attrs)
        flat = g.op("Reshape", [summed, g.const([-1], dtype=np.int64)])
        normalizer = len(self.model.estimators_) * float(average_path_length([self.model.max_samples_])[0])
        exponent = g.op("Div", [flat, g.const(-normalizer)])
        return g.op("Pow", [g.const(2.0), exponent])

    @staticmethod
    def _add_tree(attrs: dict, tree_id: int, tree, features: np.ndarray) -> None:
        depth = np.zeros(tree.node_count)
        for node in range(tree.node_count):  # children always follow their parent
            for child in (tree.children_left[node], tree.children_right[node]):
                if child >= 0:
                    depth[child] = depth[node] + 1
        for node in range(tree.node_count):
            leaf = tree.children_left[node] < 0
            attrs["nodes_treeids"].append(tree_id)
            attrs["nodes_nodeids"].append(node)
            attrs["nodes_featureids"].append(0 if leaf else int(features[tree.feature[node]]))
            attrs["nodes_values"].append(0.0 if leaf else float(tree.threshold[node]))
            attrs["nodes_modes"].append("LEAF" if leaf else "BRANCH_LEQ")
            attrs["nodes_truenodeids"].append(0 if leaf else int(tree.children_left[node]))
            attrs["nodes_falsenodeids"].append(0 if leaf else int(tree.children_right[node]))
            if leaf:
                samples = tree.n_node_samples[node]
                attrs["target_treeids"].append(tree_id)
                attrs["target_nodeids"].append(node)
                attrs["target_ids"].append(0)
                attrs["target_weights"].append(float(depth[node] + average_path_length([samples])[0]))


# --- PCA reconstruction error ------------------------------------------------

class PcaReconstruction(Detector):
    kind = "pca"

    def fit(self, data: Features) -> None:
        from sklearn.decomposition import PCA

        dense = data.dense
        self.params.setdefault("n_components", 0.95)
        self.scaler = Standardizer(dense)
        self.model = PCA(random_state=self.seed, **self.params).fit(self.scaler(dense))

    def reference(self, data: Features) -> np.ndarray:
        x = self.scaler(data.dense)
        return ((x - self.model.inverse_transform(self.model.transform(x))) ** 2).sum(axis=1)

    def build(self, g: GraphBuilder, surprise: str) -> str:
        x = g.standardize(self.scaler.mean, self.scaler.scale)
        centered = g.op("Sub", [x, g.const(self.model.mean_[None, :])])
        components = self.model.components_.astype(np.float32)
        projected = g.op("MatMul", [centered, g.const(components.T)])
        back = g.op("MatMul", [projected, g.const(components)])
        return g.squared_norm(g.op("Sub", [centered, back]))


# --- autoencoder ------------------------------------------------------------

class Autoencoder(Detector):
    """MLPRegressor trained to reproduce its input; score = squared reconstruction error."""

    kind = "autoencoder"

    def fit(self, data: Features) -> None:
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        dense = data.dense
        self.params.setdefault("hidden", 32)
        self.params.setdefault("max_iter", 60)
        self.scaler = Standardizer(dense)
        x = self.scaler(dense)
        model = epoch_reporting_mlp(self.progress, hidden_layer_sizes=(self.params["hidden"],), activation="relu",
                                    max_iter=self.params["max_iter"], random_state=self.seed, early_stopping=False)
        with warnings.catch_warnings():
            # Stopping at max_iter is the plan (a fixed budget per fold), not a problem to warn about.
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model = model.fit(x, x)

    def reference(self, data: Features) -> np.ndarray:
        x = self.scaler(data.dense)
        return ((self.model.predict(x) - x) ** 2).sum(axis=1)

    def build(self, g: GraphBuilder, surprise: str) -> str:
        x = g.standardize(self.scaler.mean, self.scaler.scale)
        (w0, w1), (b0, b1) = self.model.coefs_, self.model.intercepts_
        hidden = g.op("Relu", [g.op("Add", [g.op("MatMul", [x, g.const(w0)]), g.const(b0)])])
        output = g.op("Add", [g.op("MatMul", [hidden, g.const(w1)]), g.const(b1)])
        return g.squared_norm(g.op("Sub", [output, x]))


def epoch_reporting_mlp(progress, **params):
    """An MLPRegressor that calls ``progress(epoch, max_iter)`` after each epoch (when given)."""
    from sklearn.neural_network import MLPRegressor

    class EpochReportingMLP(MLPRegressor):
        # NOTE: MLPRegressor takes no callback; this hook of its training loop runs once per epoch.
        def _update_no_improvement_count(self, *args, **kwargs):
            super()._update_no_improvement_count(*args, **kwargs)
            if progress is not None:
                progress(self.n_iter_, self.max_iter)

    return EpochReportingMLP(**params)


# --- self-organizing map --------------------------------------------------------

class SelfOrganizingMap(Detector):
    """Batch-trained SOM (numpy); score = squared distance to the best-matching unit."""

    kind = "som"

    def fit(self, data: Features) -> None:
        dense = data.dense
        self.params.setdefault("grid", 8)
        self.params.setdefault("epochs", 10)
        self.scaler = Standardizer(dense)
        x = self.scaler(dense)
        rng = np.random.default_rng(self.seed)
        side = int(self.params["grid"])
        units = x[rng.choice(len(x), size=side * side, replace=len(x) < side * side)].astype(np.float64)
        grid = np.array([(i, j) for i in range(side) for j in range(side)], dtype=np.float64)
        grid_distance = ((grid[:, None, :] - grid[None, :, :]) ** 2).sum(axis=2)
        epochs = int(self.params["epochs"])
        for epoch in range(epochs):
            sigma = max(side / 2.0 * (1.0 - epoch / epochs), 0.5)
            neighbourhood = np.exp(-grid_distance / (2 * sigma * sigma))
            winners = self._distances(x, units).argmin(axis=1)
            influence = neighbourhood[:, winners]  # [units, records]
            total = influence.sum(axis=1, keepdims=True)
            units = np.where(total > 1e-12, influence @ x / np.maximum(total, 1e-12), units)
        self.units = units

    @staticmethod
    def _distances(x: np.ndarray, units: np.ndarray) -> np.ndarray:
        return np.maximum((x ** 2).sum(1)[:, None] - 2 * x @ units.T + (units ** 2).sum(1)[None, :], 0)

    def reference(self, data: Features) -> np.ndarray:
        return self._distances(self.scaler(data.dense), self.units).min(axis=1)

    def build(self, g: GraphBuilder, surprise: str) -> str:
        x = g.standardize(self.scaler.mean, self.scaler.scale)
        distances = g.squared_distances(x, self.units)
        return g.op("ReduceMin", [distances, g.const([1], dtype=np.int64)], keepdims=0)


# --- local outlier factor ----------------------------------------------------------

class LocalOutlierFactor(Detector):
    """LOF (novelty) against a bounded reference set of distinct training points.

    The graph holds the reference points with their k-distance and local
    reachability density, so a query costs one distance matrix and a TopK.
    """

    kind = "lof"

    def fit(self, data: Features) -> None:
        from sklearn.neighbors import LocalOutlierFactor as SkLOF

        dense = data.dense
        self.params.setdefault("n_neighbors", 20)
        self.params.setdefault("max_reference", 2000)
        self.scaler = Standardizer(dense)
        # Duplicates make k-distances 0 and densities infinite: keep distinct points.
        distinct = np.unique(self.scaler(dense).astype(np.float32), axis=0)
        rng = np.random.default_rng(self.seed)
        if len(distinct) > self.params["max_reference"]:
            distinct = distinct[rng.choice(len(distinct), self.params["max_reference"], replace=False)]
        self.k = min(int(self.params["n_neighbors"]), len(distinct) - 1)
        self.model = SkLOF(n_neighbors=self.k, novelty=True).fit(distinct)
        self.reference_points = distinct
        distances, neighbours = self.model.kneighbors()
        self.k_distance = distances[:, -1]
        reach = np.maximum(distances, self.k_distance[neighbours])
        self.lrd = 1.0 / (reach.mean(axis=1) + 1e-10)

    def reference(self, data: Features) -> np.ndarray:
        return -self.model.score_samples(self.scaler(data.dense).astype(np.float32))

    def build(self, g: GraphBuilder, surprise: str) -> str:
        x = g.standardize(self.scaler.mean, self.scaler.scale)
        distances = g.op("Sqrt", [g.squared_distances(x, self.reference_points)])
        nearest, indices = g.ops("TopK", [distances, g.const([self.k], dtype=np.int64)], 2,
                                 axis=1, largest=0, sorted=1)
        k_distance = g.op("Gather", [g.const(self.k_distance), indices], axis=0)
        reach = g.op("Max", [nearest, k_distance])
        axis = g.const([1], dtype=np.int64)
        mean_reach = g.op("ReduceMean", [reach, axis], keepdims=0)
        neighbour_lrd = g.op("ReduceMean", [g.op("Gather", [g.const(self.lrd), indices], axis=0), axis],
                             keepdims=0)
        return g.op("Mul", [neighbour_lrd, g.op("Add", [mean_reach, g.const(1e-10)])])


DETECTORS: dict[str, type[Detector]] = {
    cls.kind: cls
    for cls in (Rarity, IsolationForest, PcaReconstruction, Autoencoder, SelfOrganizingMap, LocalOutlierFactor)
}
