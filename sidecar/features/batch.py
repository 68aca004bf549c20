"""The featurizer's output: hashed feature keys in CSR form plus a dense block.

High-dimensional features reach the ONNX graph as keys (a lookup table in the
graph weights them), never as wide dense vectors. The dense block is a small
hashed projection of the same keys plus numeric columns, for the detectors
that need vectors (IsolationForest, PCA, autoencoder, SOM, LOF).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


def text_seed(*parts: str) -> int:
    """A stable 32-bit seed for a feature namespace (field + converter kind)."""
    return zlib.crc32("\x1f".join(parts).encode("utf-8", "surrogatepass"))


def text_key(seed: int, text: str) -> int:
    return zlib.crc32(text.encode("utf-8", "surrogatepass"), seed)


@dataclass
class Segment:
    """A run of the flat key arrays written by one converter, for naming keys."""

    start: int
    stop: int
    describe: Callable[[int, int], str]  # (flat index, row) -> readable feature name


@dataclass
class FeatureBatch:
    rows: np.ndarray  # int64 [nnz]: record index of each key
    keys: np.ndarray  # int64 [nnz]: hashed feature key, unique within a record and converter
    weights: np.ndarray  # float32 [nnz]: converter weight x term weighting
    dense: np.ndarray  # float32 [N, dense_dims + numeric columns]
    truncated: np.ndarray  # bool [N]: a field was cut to max_field_chars
    unparsed: np.ndarray  # bool [N]: the raw line did not match the log format
    segments: list[Segment] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.dense.shape[0]

    def name(self, index: int) -> str:
        for segment in self.segments:
            if segment.start <= index < segment.stop:
                return segment.describe(index, int(self.rows[index]))
        raise IndexError(index)


class FeatureSink:
    """Collects what each converter emits and assembles a FeatureBatch."""

    def __init__(self, size: int, dense_dims: int):
        self.size = size
        self.dense_dims = dense_dims
        self._rows: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self._numeric: list[np.ndarray] = []
        self._segments: list[Segment] = []
        self._nnz = 0
        self.truncated = np.zeros(size, dtype=bool)
        self.unparsed = np.zeros(size, dtype=bool)

    def add_keys(self, rows: np.ndarray, keys: np.ndarray, weights: np.ndarray,
                 describe: Callable[[int, int], str]) -> None:
        start = self._nnz
        self._nnz += len(keys)
        self._rows.append(rows.astype(np.int64, copy=False))
        self._keys.append(keys.astype(np.int64, copy=False))
        self._weights.append(weights.astype(np.float32, copy=False))
        self._segments.append(Segment(start, self._nnz, lambda i, row, s=start: describe(i - s, row)))

    def add_numeric(self, column: np.ndarray) -> None:
        self._numeric.append(column.astype(np.float32, copy=False))

    def build(self) -> FeatureBatch:
        empty_i = np.zeros(0, dtype=np.int64)
        rows = np.concatenate(self._rows) if self._rows else empty_i
        keys = np.concatenate(self._keys) if self._keys else empty_i
        weights = np.concatenate(self._weights) if self._weights else np.zeros(0, np.float32)
        hashed = np.bincount(rows * self.dense_dims + keys % self.dense_dims, weights=weights,
                             minlength=self.size * self.dense_dims)
        hashed = np.log1p(hashed.reshape(self.size, self.dense_dims)).astype(np.float32)
        dense = np.column_stack([hashed, *self._numeric]) if self._numeric else hashed
        return FeatureBatch(rows, keys, weights, np.ascontiguousarray(dense, dtype=np.float32),
                            self.truncated, self.unparsed, self._segments)


WEIGHTINGS = ("binary", "tf", "log_tf")


def term_weights(counts: np.ndarray, weighting: str) -> np.ndarray:
    if weighting == "binary":
        return np.ones_like(counts, dtype=np.float32)
    if weighting == "tf":
        return counts.astype(np.float32)
    return (1.0 + np.log(counts)).astype(np.float32)
