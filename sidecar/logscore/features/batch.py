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

    @property
    def nbytes(self) -> int:
        """Memory held, estimated (for the caches' bound)."""
        return 200 + self.keys.nbytes + self.weights.nbytes


class Describer(Protocol):
    def describe(self, value: Optional[str], key: int) -> str: ...

    def feature_text(self, value: Optional[str], key: int) -> Optional[str]: ...


@dataclass
class KeyOrigins:
    """Where each key of a batch came from, to name it in explanations."""

    entries: list[ValueFeatures]
    entry_of_key: np.ndarray  # int64 [nnz]
    position: np.ndarray  # int64 [nnz]: index within its entry's keys
    # NOTE: compiled features reach their converter through a weak reference; the batch keeps
    # the converters alive so that its keys can still be named.
    converters: Optional[list] = None

    def name(self, index: int) -> str:
        return self.entries[int(self.entry_of_key[index])].describe(int(self.position[index]))

    def names(self, indices: np.ndarray) -> list[str]:
        """Each distinct (value, key) is described once: in a flood the flagged records' top
        features are mostly of the same few values (one call a key was 3.4 µs a flagged record)."""
        entries = self.entries
        entry_of_key, position = self.entry_of_key[indices], self.position[indices]
        if not position.size:
            return []
        origin = entry_of_key * (int(position.max()) + 1) + position
        _, first, where = np.unique(origin, return_index=True, return_inverse=True)
        named = [entries[entry].describe(at) for entry, at in
                 zip(entry_of_key[first].tolist(), position[first].tolist())]
        return [named[i] for i in where.ravel().tolist()]

    def resolve(self) -> "KeyOrigins":
        return self


@dataclass
class KeyLayout:
    """A batch's keys traced to their values from the records' values alone (FeatureSink.key_layout)."""

    held: np.ndarray  # int64 [N, C]: each record's entry of each converter
    ends: np.ndarray  # int64 [N, C]: within its record, where each converter's keys end
    starts: np.ndarray  # int64 [N]: where each record's keys start in the batch

    def origins_of(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(entry_of_key, position) of the keys at ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        # (a record without keys starts where the next one does: the last record starting at or before a key holds it)
        record = np.searchsorted(self.starts, indices, side="right") - 1
        within = indices - self.starts[record]
        ends = self.ends[record]
        converter = (ends <= within[:, None]).sum(axis=1)  # converters whose keys end at or before it
        before = np.where(converter > 0, ends[np.arange(len(record)), np.maximum(converter - 1, 0)], 0)
        return self.held[record, converter], within - before


class LazyOrigins:
    """KeyOrigins of a batch the compiled featurizer built, worked out when a key is first named."""

    def __init__(self, sink: "FeatureSink"):
        self._sink = sink
        self._origins: Optional[KeyOrigins] = None
        self._layout: Optional[KeyLayout] = None

    def name(self, index: int) -> str:
        return self.names(np.array([index], dtype=np.int64))[0]

    def names(self, indices: np.ndarray) -> list[str]:
        """Only the keys named are traced to their values (NOTE: resolving every key of 512 records of
        2 KB CJK URLs, 1.7 million, took 61 MB to name 20 keys a record)."""
        if self._origins is not None:
            return self._origins.names(indices)
        sink = self._sink
        if self._layout is None:  # (worked out once: a batch is named a step of records at a time)
            self._layout = sink.key_layout()
        entry_of_key, position = self._layout.origins_of(indices)
        origins = KeyOrigins(sink._entries, entry_of_key, position, sink._converters)
        return origins.names(np.arange(len(indices)))

    def resolve(self) -> KeyOrigins:
        if self._origins is None:
            sink = self._sink
            entry_of_key, position = sink._assemble(with_origins=True)[3:]
            self._origins = KeyOrigins(sink._entries, entry_of_key, position, sink._converters)
        return self._origins


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

    def names(self, indices: np.ndarray) -> list[str]:
        return [self.name(index) for index in indices.tolist()]

    def resolve(self) -> KeyOrigins:
        entries = [self.entries[entry_id] for entry_id in self.held]
        sizes = np.array([len(e.keys) for e in entries], dtype=np.int64)
        position = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes]) if len(sizes) else sizes
        return KeyOrigins(entries, np.repeat(np.arange(len(entries), dtype=np.int64), sizes), position)


@dataclass
class FeatureBatch:
    rows: np.ndarray  # int64 [nnz]: record index of each key, in record order (Model._explain steps by records)
    keys: np.ndarray  # int64 [nnz]: hashed feature key, unique within a record and converter
    weights: np.ndarray  # float32 [nnz]: converter weight x term weighting
    dense: np.ndarray  # float32 [N, dense_dims + numeric columns]
    truncated: np.ndarray  # bool [N]: a field was cut to max_field_chars
    unparsed: np.ndarray  # bool [N]: the raw line did not match the log format
    origins: Optional[KeyOrigins | SingleRecordOrigins | LazyOrigins] = None
    fields: Optional[list] = None  # the records' normalized field maps (training windows and clients)
    columns: Optional[dict] = None  # fields as text columns (windows and clients read them)

    @property
    def size(self) -> int:
        return self.dense.shape[0]

    def name(self, index: int) -> str:
        return self.origins.name(index)

    def names(self, indices: np.ndarray) -> list[str]:
        """The names of keys ``indices`` (one call: a flood names thousands)."""
        return self.origins.names(indices)

    def without_keys(self, keep: np.ndarray, dense_dims: int) -> np.ndarray:
        """The dense block as if only the ``keep`` keys were present (numeric columns unchanged)."""
        hashed = hashed_block(self.rows[keep], self.keys[keep], self.weights[keep], self.size, dense_dims)
        return np.ascontiguousarray(np.column_stack([hashed, self.dense[:, dense_dims:]]), dtype=np.float32)


def hashed_block(rows: np.ndarray, keys: np.ndarray, weights: np.ndarray, size: int, dims: int) -> np.ndarray:
    """The hashed dense projection of a batch's keys: log1p of the weights summed per key modulo dims."""
    hashed = np.bincount(rows * dims + keys % dims, weights=weights, minlength=size * dims)
    return np.log1p(hashed.reshape(size, dims)).astype(np.float32)


class FeatureSink:
    """Collects what each converter emits and assembles a FeatureBatch.

    Converters hand in the features of their distinct values and, per record,
    which distinct value it holds; ``build`` expands all converters at once
    with a handful of numpy operations, whatever the number of converters.
    """

    def __init__(self, size: int, dense_dims: int, native=None, converters: Optional[list] = None):
        self.size = size
        self.dense_dims = dense_dims
        self._native = native  # the compiled featurizer (features/native.py), or None
        self._converters = converters
        self._entries: list[ValueFeatures] = []
        self._entry_ids: list[np.ndarray] = []  # per converter: [N] index into its entries in _entries
        self._offsets: list[int] = []  # per converter: where its entries start in _entries
        self._numeric: list[np.ndarray] = []
        self.truncated = np.zeros(size, dtype=bool)
        self.unparsed = np.zeros(size, dtype=bool)

    def add_values(self, ids: np.ndarray, entries: list[ValueFeatures]) -> None:
        """``ids[r]``: which of ``entries`` (one per distinct value) record r holds."""
        # NOTE: the offset is kept apart, not added to ids: that numpy call per converter was a
        # sixth of featurizing one record
        self._entry_ids.append(ids)
        self._offsets.append(len(self._entries))
        self._entries.extend(entries)

    def _build_one(self) -> FeatureBatch:
        """One record (the latency-bound case): its entries are simply concatenated."""
        held = [int(ids[0]) + offset for ids, offset in zip(self._entry_ids, self._offsets)]
        parts = [self._entries[h] for h in held]
        keys = np.concatenate([e.keys for e in parts]) if parts else np.zeros(0, np.int64)
        weights = np.concatenate([e.weights for e in parts]) if parts else np.zeros(0, np.float32)
        return FeatureBatch(np.zeros(len(keys), dtype=np.int64), keys, weights, np.zeros((1, 0), np.float32),
                            self.truncated, self.unparsed, SingleRecordOrigins(self._entries, held))

    def add_numeric(self, column: np.ndarray) -> None:
        # NOTE: made float32 only when a dense block is built: models of rarity alone build none (needs_dense)
        self._numeric.append(column)

    def build(self, dense: bool = True) -> FeatureBatch:
        """The batch; ``dense=False`` (no vector detector in the model) skips the dense block."""
        if self._native is not None:
            rows, keys, weights = self._assemble(with_origins=False)[:3]
            return self._batch(rows, keys, weights, dense, LazyOrigins(self))
        if self.size == 1 and not dense:
            return self._build_one()
        entries = self._entries
        lengths = np.fromiter((len(e.keys) for e in entries), dtype=np.int64, count=len(entries))
        offsets = np.zeros(len(entries) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        all_keys = np.concatenate([e.keys for e in entries]) if entries else np.zeros(0, np.int64)
        all_weights = np.concatenate([e.weights for e in entries]) if entries else np.zeros(0, np.float32)
        # Record-major order: record 0's keys of every converter, then record 1's, ...
        held = (np.column_stack([ids + offset for ids, offset in zip(self._entry_ids, self._offsets)]).ravel()
                if self._entry_ids else np.zeros(0, dtype=np.int64))
        run_lengths = lengths[held]
        total = int(run_lengths.sum())
        converters = len(self._entry_ids)
        rows = np.repeat(np.repeat(np.arange(self.size, dtype=np.int64), converters), run_lengths)
        run_starts = np.cumsum(run_lengths) - run_lengths
        entry_of_key = np.repeat(held, run_lengths)
        position = np.arange(total, dtype=np.int64) - np.repeat(run_starts, run_lengths)
        index = offsets[entry_of_key] + position
        keys, weights = all_keys[index], all_weights[index]
        return self._batch(rows, keys, weights, dense, KeyOrigins(entries, entry_of_key, position))

    def key_layout(self) -> "KeyLayout":
        """Where each record's keys lie, as build lays them out: record by record, each converter's value in turn."""
        entries = self._entries
        try:
            lengths = np.fromiter((e.size for e in entries), dtype=np.int64, count=len(entries))
        except AttributeError:  # an extension built before Features.size, not rebuilt since (keys: a copy each)
            lengths = np.fromiter((len(e.keys) for e in entries), dtype=np.int64, count=len(entries))
        held = np.column_stack([ids + offset for ids, offset in zip(self._entry_ids, self._offsets)])  # [N, C]
        ends = np.cumsum(lengths[held], axis=1)  # within its record, where each converter's keys end
        starts = np.zeros(self.size, dtype=np.int64)  # where each record's keys start in the batch
        np.cumsum(ends[:-1, -1], out=starts[1:])
        return KeyLayout(held, ends, starts)

    def _assemble(self, with_origins: bool) -> list[np.ndarray]:
        """The compiled expansion: rows, keys, weights (and entry_of_key, position)."""
        buffers = self._native.assemble(self._entry_ids, self._offsets, self._entries, self.size, with_origins)
        dtypes = (np.int64, np.int64, np.float32) + ((np.int64, np.int64) if with_origins else ())
        return [np.frombuffer(buffer, dtype=dtype) for buffer, dtype in zip(buffers, dtypes)]

    def _batch(self, rows: np.ndarray, keys: np.ndarray, weights: np.ndarray, dense: bool,
               origins: KeyOrigins) -> FeatureBatch:
        if dense:
            hashed = hashed_block(rows, keys, weights, self.size, self.dense_dims)
            block = (np.column_stack([hashed, *(column.astype(np.float32, copy=False) for column in self._numeric)])
                     if self._numeric else hashed)
        else:
            block = np.zeros((self.size, 0), dtype=np.float32)
        return FeatureBatch(rows, keys, weights, np.ascontiguousarray(block, dtype=np.float32),
                            self.truncated, self.unparsed, origins)


WEIGHTINGS = ("binary", "tf", "log_tf")


def term_weights(counts: np.ndarray, weighting: str) -> np.ndarray:
    if weighting == "binary":
        return np.ones_like(counts, dtype=np.float32)
    if weighting == "tf":
        return counts.astype(np.float32)
    return (1.0 + np.log(counts)).astype(np.float32)
