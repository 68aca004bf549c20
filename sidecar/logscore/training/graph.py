"""Building the one ONNX graph of a model.

Inputs (the featurizer's output, see sidecar.features.batch):
  keys [nnz] int64, key_weights [nnz] float32, rows [nnz] int64, dense [N, D] float32
Outputs:
  score [N]          calibrated score in [0, 1]: fraction of held-out normal records scoring lower
  raw_scores [N, M]  each detector's raw score (higher = more anomalous)
  key_surprise [nnz] how unusual each key was in training (0 common .. 1 never seen)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
ML_OPSET = 3  # onnxruntime refuses ai.onnx.ml 4 for tree ensembles

INPUTS = {
    "keys": (TensorProto.INT64, ["nnz"]),
    "key_weights": (TensorProto.FLOAT, ["nnz"]),
    "rows": (TensorProto.INT64, ["nnz"]),
    "dense": (TensorProto.FLOAT, ["N", "D"]),
}


class GraphBuilder:
    """Appends nodes with unique tensor names; detectors add their own subgraphs."""

    def __init__(self, dense_width: int):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.dense_width = dense_width
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, hint: str = "c", dtype=np.float32) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str = "", domain: str = "", **attrs) -> str:
        output = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], domain=domain, **attrs))
        return output

    def ops(self, op_type: str, inputs: list[str], outputs: int, **attrs) -> list[str]:
        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, **attrs))
        return names

    # Shared pieces -------------------------------------------------------
    def batch_size(self) -> str:
        shape = self.op("Shape", ["dense"])
        return self.op("Gather", [shape, self.const([0], dtype=np.int64)], axis=0)

    def row_sum(self, per_key: str) -> str:
        """Sum a per-key tensor into one value per record (CSR rows → [N])."""
        zeros = self.op("ConstantOfShape", [self.batch_size()],
                        value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
        return self.op("ScatterElements", [zeros, "rows", per_key], reduction="add", axis=0)

    def standardize(self, mean: np.ndarray, scale: np.ndarray) -> str:
        centered = self.op("Sub", ["dense", self.const(mean[None, :])])
        return self.op("Div", [centered, self.const(scale[None, :])])

    def squared_norm(self, x: str) -> str:
        """Row-wise sum of squares, [N, D] → [N]."""
        squared = self.op("Mul", [x, x])
        return self.op("ReduceSum", [squared, self.const([1], dtype=np.int64)], keepdims=0)

    def squared_distances(self, x: str, points: np.ndarray) -> str:
        """[N, D] x [P, D] points → [N, P] squared euclidean distances, clipped at 0."""
        x_norm = self.op("Unsqueeze", [self.squared_norm(x), self.const([1], dtype=np.int64)])
        cross = self.op("MatMul", [x, self.const(points.T.astype(np.float32))])
        cross2 = self.op("Mul", [cross, self.const(-2.0)])
        point_norm = self.const((points.astype(np.float64) ** 2).sum(axis=1)[None, :])
        total = self.op("Add", [self.op("Add", [x_norm, cross2]), point_norm])
        return self.op("Max", [total, self.const(0.0)])

    def ecdf(self, x: str, knots: np.ndarray, levels: np.ndarray) -> str:
        """Empirical CDF: levels[i] where i = number of knots strictly below x.

        ``knots`` sorted ascending [M]; ``levels`` [M + 1] with levels[0] = 0. A balanced search
        tree (one TreeEnsembleRegressor tree, depth log2 M) rather than comparing x with every
        knot: about 11 comparisons a record instead of up to 2,048 (0.3 µs a record less on the
        default model, docs/performance.md). The same answer: x <= knot goes left, so a knot
        equal to x is not below it; NaN goes left too, to level 0, as no knot compares below NaN.
        """
        tree = ecdf_tree(np.asarray(knots, dtype=np.float32), np.asarray(levels, dtype=np.float32))
        column = self.op("Unsqueeze", [x, self.const([1], dtype=np.int64)])
        found = self.op("TreeEnsembleRegressor", [column], domain="ai.onnx.ml", n_targets=1,
                        aggregate_function="SUM", post_transform="NONE", **tree)
        return self.op("Squeeze", [found, self.const([1], dtype=np.int64)])

    def name_outputs(self, outputs: dict[str, str]) -> None:
        """Names the node producing each public output after it: an Identity node there would
        copy the tensor on every run. An output read straight from an input or a constant, or
        already named, keeps an Identity."""
        produced = {name for node in self.nodes for name in node.output}
        renamed: dict[str, str] = {}
        for public, internal in outputs.items():
            if internal in produced and internal not in renamed:
                renamed[internal] = public
        for node in self.nodes:
            for names in (node.input, node.output):
                names[:] = [renamed.get(name, name) for name in names]
        for public, internal in outputs.items():
            if renamed.get(internal) != public:
                self.nodes.append(helper.make_node("Identity", [renamed.get(internal, internal)], [public]))

    def finish(self, outputs: dict[str, str], metadata: dict[str, str]) -> onnx.ModelProto:
        self.name_outputs(outputs)
        graph = helper.make_graph(
            self.nodes, "logscore",
            [helper.make_tensor_value_info(name, dtype, shape) for name, (dtype, shape) in INPUTS.items()],
            [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
             helper.make_tensor_value_info("raw_scores", TensorProto.FLOAT, ["N", "M"]),
             helper.make_tensor_value_info("key_surprise", TensorProto.FLOAT, ["nnz"])],
            initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
                                  producer_name="logscore")
        model.ir_version = 9  # readable by onnxruntime >= 1.16
        helper.set_model_props(model, metadata)
        onnx.checker.check_model(model)
        return model


def ecdf_tree(knots: np.ndarray, levels: np.ndarray) -> dict[str, list]:
    """TreeEnsembleRegressor attributes of one balanced tree over sorted ``knots`` whose leaf
    under x weighs levels[number of knots strictly below x]."""
    nodes: dict[str, list] = {key: [] for key in (
        "nodes_nodeids", "nodes_modes", "nodes_values", "nodes_truenodeids", "nodes_falsenodeids")}
    leaves: dict[str, list] = {"target_nodeids": [], "target_weights": []}
    # Iterative (a deep recursion would need a raised limit): (node id, first knot, end, knots below).
    pending = [(0, 0, len(knots), 0)]
    next_id = 1
    while pending:
        node, low, high, below = pending.pop()
        nodes["nodes_nodeids"].append(node)
        if low >= high:
            nodes["nodes_modes"].append("LEAF")
            nodes["nodes_values"].append(0.0)
            nodes["nodes_truenodeids"].append(0)
            nodes["nodes_falsenodeids"].append(0)
            leaves["target_nodeids"].append(node)
            leaves["target_weights"].append(float(levels[below]))
            continue
        middle = (low + high) // 2
        left, right, next_id = next_id, next_id + 1, next_id + 2
        nodes["nodes_modes"].append("BRANCH_LEQ")
        nodes["nodes_values"].append(float(knots[middle]))
        nodes["nodes_truenodeids"].append(left)
        nodes["nodes_falsenodeids"].append(right)
        pending.append((left, low, middle, below))
        pending.append((right, middle + 1, high, below + middle - low + 1))
    count, leaf_count = len(nodes["nodes_nodeids"]), len(leaves["target_nodeids"])
    return {**nodes, **leaves, "nodes_treeids": [0] * count, "nodes_featureids": [0] * count,
            "nodes_missing_value_tracks_true": [1] * count,
            "target_treeids": [0] * leaf_count, "target_ids": [0] * leaf_count}
