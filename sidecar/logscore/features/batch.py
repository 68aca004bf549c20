"""The featurizer's output: hashed feature keys in CSR form plus a dense block.

High-dimensional features reach the ONNX graph as keys (a lookup table in the
graph weights them), never as wide dense vectors. The dense block is a small
hashed projection of the same keys plus numeric columns, for the detectors
that need vectors (IsolationForest, PCA, autoencoder, SOM, LOF).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np


def text_seed(*parts: str) -> int:
    """A stable 32-bit seed for a feature namespace (field + converter kind)."""
    return zlib.crc32("\x1f".join(parts).encode("utf-8", "surrogatepass"))


def text_key(seed: int, text: str) -> int:
    return zlib.crc32(text.encode("utf-8", "surrogatepass"), seed)


@dataclass(frozen=True, slots=True)
class ValueFeatures:
    """The features of one distinct field value; cached, so each value is featurized once."""

    keys: np.ndarray  # int64
    weights: np.ndarray  # float32, converter weight included
    converter: "Describer"  # names a key of the value, for explanations
    value: Optional[str]

    def describe(self, index: int) -> str:
        return self.converter.describe(self.value, int(self.keys[index]))


class Describer(Protocol):
    def describe(self, value: Optional[str], key: int) -> str: ...


@dataclass
class KeyOrigins:
    """Where each key of a batch came from, to name it in explanations."""

    entries: list[ValueFeatures]
    entry_of_key: np.ndarray  # int64 [nnz]
    position: np.ndarray  # int64 [nnz]: index within its entry's keys

    def name(self, index: int) -> str:
        return self.entries[int(self.entry_of_key[index])].describe(int(self.position[index]))


class SingleRecordOrigins:
    """KeyOrigins of a one-record batch, worked out only when a key is named."""

    def __init__(self, entries: list[ValueFeatures], held: list[int]):
        self.entries, self.held = entries, held

    def name(self, index: int) -> str:
        for entry_id in self.held:
            size = len(self.entries[entry_id].keys)
            if index < size:
                return self.entries[entry_id].describe(index)
            index -= size
        raise IndexError(index)


@dataclass
class FeatureBatch:
    rows: np.ndarray  # int64 [nnz]: record index of each key
    keys: np.ndarray  # int64 [nnz]: hashed feature key, unique within a record and converter
    weights: np.ndarray  # float32 [nnz]: converter weight x term weighting
    dense: np.ndarray  # float32 [N, dense_dims + numeric columns]
    truncated: np.ndarray  # bool [N]: a field was cut to max_field_chars
    unparsed: np.ndarray  # bool [N]: the raw line did not match the log format
    origins: Optional[KeyOrigins | SingleRecordOrigins] = None
    fields: Optional[list] = None  # the records' normalized field maps (windows and clients read them)

    @property
    def size(self) -> int:
        return self.dense.shape[0]

    def name(self, index: int) -> str:
        return self.origins.name(index)


class FeatureSink:
    """Collects what each converter emits and assembles a FeatureBatch.

    Converters hand in the features of their distinct values and, per record,
    which distinct value it holds; ``build`` expands all converters at once
    with a handful of numpy operations, whatever the number of converters.
    """

    def __init__(self, size: int, dense_dims: int):
        self.size = size
        self.dense_dims = dense_dims
        self._entries: list[ValueFeatures] = []
        self._entry_ids: list[np.ndarray] = []  # per converter: [N] index into _entries
        self._numeric: list[np.ndarray] = []
        self.truncated = np.zeros(size, dtype=bool)
        self.unparsed = np.zeros(size, dtype=bool)

    def add_values(self, ids: np.ndarray, entries: list[ValueFeatures]) -> None:
        """``ids[r]``: which of ``entries`` (one per distinct value) record r holds."""
        self._entry_ids.append(ids + len(self._entries))
        self._entries.extend(entries)

    def _build_one(self) -> FeatureBatch:
        """One record (the latency-bound case): its entries are simply concatenated."""
        held = [int(ids[0]) for ids in self._entry_ids]
        parts = [self._entries[h] for h in held]
        keys = np.concatenate([e.keys for e in parts]) if parts else np.zeros(0, np.int64)
        weights = np.concatenate([e.weights for e in parts]) if parts else np.zeros(0, np.float32)
        return FeatureBatch(np.zeros(len(keys), dtype=np.int64), keys, weights, np.zeros((1, 0), np.float32),
                            self.truncated, self.unparsed, SingleRecordOrigins(self._entries, held))

    def add_numeric(self, column: np.ndarray) -> None:
        self._numeric.append(column.astype(np.float32, copy=False))

    def build(self, dense: bool = True) -> FeatureBatch:
        """The batch; ``dense=False`` (no vector detector in the model) skips the dense block."""
        if self.size == 1 and not dense:
            return self._build_one()
        entries = self._entries
        lengths = np.fromiter((len(e.keys) for e in entries), dtype=np.int64, count=len(entries))
        offsets = np.zeros(len(entries) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        all_keys = np.concatenate([e.keys for e in entries]) if entries else np.zeros(0, np.int64)
        all_weights = np.concatenate([e.weights for e in entries]) if entries else np.zeros(0, np.float32)
        # Record-major order: record 0's keys of every converter, then record 1's, ...
        held = (np.column_stack(self._entry_ids).ravel() if self._entry_ids
                else np.zeros(0, dtype=np.int64))
        run_lengths = lengths[held]
        total = int(run_lengths.sum())
        converters = len(self._entry_ids)
        rows = np.repeat(np.repeat(np.arange(self.size, dtype=np.int64), converters), run_lengths)
        run_starts = np.cumsum(run_lengths) - run_lengths
        entry_of_key = np.repeat(held, run_lengths)
        position = np.arange(total, dtype=np.int64) - np.repeat(run_starts, run_lengths)
        index = offsets[entry_of_key] + position
        keys, weights = all_keys[index], all_weights[index]
        if dense:
            hashed = np.bincount(rows * self.dense_dims + keys % self.dense_dims, weights=weights,
                                 minlength=self.size * self.dense_dims)
            hashed = np.log1p(hashed.reshape(self.size, self.dense_dims)).astype(np.float32)
            block = np.column_stack([hashed, *self._numeric]) if self._numeric else hashed
        else:
            block = np.zeros((self.size, 0), dtype=np.float32)
        return FeatureBatch(rows, keys, weights, np.ascontiguousarray(block, dtype=np.float32),
                            self.truncated, self.unparsed, KeyOrigins(entries, entry_of_key, position))


WEIGHTINGS = ("binary", "tf", "log_tf")


def term_weights(counts: np.ndarray, weighting: str) -> np.ndarray:
    if weighting == "binary":
        return np.ones_like(counts, dtype=np.float32)
    if weighting == "tf":
        return counts.astype(np.float32)
    return (1.0 + np.log(counts)).astype(np.float32)
