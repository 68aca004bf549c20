"""The rarity part of a model's graph, run by the compiled featurizer's SurpriseTable.

A logscore graph starts the same way whatever its detectors (training/detectors.py, Rarity):
``key_surprise = LabelEncoder(keys)`` (each feature key's rarity in training, 1 for a key never
seen), then ``ScatterElements(zeros, rows, key_surprise * key_weights, reduction="add")``: each
record's sum. On novel traffic onnxruntime spent about 1.4 µs a record there (155 lookups a record);
the compiled table does the same float32 products and additions, in the same order, in about 0.7.
The graph then runs on one key a record, one it has never seen (surprise 1), weighed by the
record's sum: 1 × sum and 0 + sum give the sum back to the bit, and the rest of the graph runs as
trained on the same values. So the scores, raw scores and surprise are the very ones the whole
graph gives (tests/test_graph_shortcut.py holds them equal).

Only a graph of exactly this shape takes the shortcut: keys, weights and rows read by nothing else,
none of them nor the weighed surprise a graph output, the surprise output named key_surprise, no
node holding a subgraph (one may read any tensor around it). Any other graph runs whole (a detector
this version does not know), as does every graph when the compiled featurizer is not in use, and
every batch under MIN_RECORDS records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .artifact import GRAPH_FIELD, WireError, wire_field, wire_fields, wire_varint
from .features import native

# A key no table holds (its keys are 32-bit): the LabelEncoder gives it its default, 1.
ABSENT_KEY = 1 << 32
# Below this many records the graph runs whole: the shortcut's fixed cost (its arrays, about 2 µs a
# call) is more than it saves (0.2-0.6 µs a record; docs/performance.md).
MIN_RECORDS = 16

_INTS_TAG = 8 << 3 | 0  # AttributeProto.ints, one field a value (ONNX's proto2 does not pack them)
_FLOATS_TAG = 7 << 3 | 5  # AttributeProto.floats, likewise
KNOWN_DOMAINS = {"", "ai.onnx.ml"}


@dataclass
class Node:
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attributes: dict[str, dict]  # name -> the attribute's values (read_attribute)

    @property
    def holds_graph(self) -> bool:
        return any(attribute["graph"] for attribute in self.attributes.values())


@dataclass
class RarityShortcut:
    table: object  # _native.SurpriseTable

    def run(self, session, batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(score [N], raw_scores [N, M], key_surprise [nnz]), as model.run_graph gives them."""
        # (contiguous copies only of arrays that are not: onnxruntime took any)
        surprise, sums = self.table.sum_rows(np.ascontiguousarray(batch.keys), np.ascontiguousarray(batch.weights),
                                             np.ascontiguousarray(batch.rows), batch.size)
        feeds = {"keys": np.full(batch.size, ABSENT_KEY, np.int64), "key_weights": np.frombuffer(sums, np.float32),
                 "rows": np.arange(batch.size, dtype=np.int64), "dense": batch.dense}
        score, raw = session.run(["score", "raw_scores"], feeds)
        return score, raw, np.frombuffer(surprise, np.float32)


def rarity_shortcut(model_bytes: bytes) -> Optional[RarityShortcut]:
    """The shortcut for this model's graph, or None: it runs whole (another shape, or the compiled
    featurizer is not in use)."""
    compiled = native.module()
    if compiled is None:
        return None
    try:
        table = rarity_table(model_bytes)
        return RarityShortcut(compiled.SurpriseTable(*table, 1.0)) if table is not None else None
    except (WireError, ValueError, IndexError):  # (onnxruntime read the file; this reading is ours)
        return None


def rarity_table(model_bytes: bytes) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(keys int64, surprise float32) of the graph's LabelEncoder when the graph is of the shape
    the shortcut reproduces exactly, else None."""
    graphs = [value for number, wire_type, value in wire_fields(model_bytes) if number == GRAPH_FIELD]
    if len(graphs) != 1:  # (protobuf merges a repeated message field: onnxruntime would read both)
        return None
    fields = list(wire_fields(graphs[0]))
    nodes = [read_node(value) for number, wire_type, value in fields if number == 1 and wire_type == 2]
    outputs = {value_name(value) for number, wire_type, value in fields if number == 12 and wire_type == 2}
    if any(node.holds_graph or node.domain not in KNOWN_DOMAINS for node in nodes):
        return None  # (a subgraph may read any tensor of the graph around it)
    readers: dict[str, list[Node]] = {}
    for node in nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    made_by = {name: node for node in nodes for name in node.outputs}

    def only_reader(name: str) -> Optional[Node]:
        found = readers.get(name, [])
        return found[0] if len(found) == 1 else None

    encoder, weigh, add = only_reader("keys"), None, None
    if encoder and (encoder.op_type, encoder.domain, encoder.inputs, encoder.outputs) == \
            ("LabelEncoder", "ai.onnx.ml", ["keys"], ["key_surprise"]):
        weigh = only_reader("key_surprise")
    if weigh and (weigh.op_type, weigh.domain) == ("Mul", "") and \
            sorted(weigh.inputs) == sorted([encoder.outputs[0], "key_weights"]) and only_reader("key_weights"):
        add = only_reader(weigh.outputs[0])
    if not (add and (add.op_type, add.domain) == ("ScatterElements", "") and len(add.inputs) == 3 and
            add.inputs[1:] == ["rows", weigh.outputs[0]] and only_reader("rows") and
            attribute_int(add, "axis", 0) == 0 and attribute_bytes(add, "reduction", b"none") == b"add" and
            zeros(made_by.get(add.inputs[0])) and not outputs & {"keys", "key_weights", "rows", weigh.outputs[0]}):
        return None
    if set(encoder.attributes) != {"keys_int64s", "values_floats", "default_float"} or \
            encoder.attributes["default_float"].get("f") != 1.0:
        return None
    keys, values = encoder.attributes["keys_int64s"]["ints"], encoder.attributes["values_floats"]["floats"]
    ordered = np.sort(keys)
    if len(keys) != len(values) or (len(keys) and int(ordered[-1]) >= ABSENT_KEY) or \
            bool((ordered[1:] == ordered[:-1]).any()):  # (a key given twice: which value the graph takes is its own)
        return None
    return keys.astype(np.int64), values


def zeros(node: Optional[Node]) -> bool:
    """Whether ``node`` makes float32 zeros (ConstantOfShape of +0.0): the sums start from them."""
    if node is None or (node.op_type, node.domain) != ("ConstantOfShape", ""):
        return False
    if "value" not in node.attributes:
        return True  # (its default: float32 0)
    tensor = node.attributes["value"].get("t")
    if tensor is None:
        return False
    fields = {number: value for number, _, value in wire_fields(tensor)}
    data = fields.get(9, fields.get(4, b""))  # raw_data, else float_data (packed)
    return fields.get(2) == 1 and data == b"\0\0\0\0"  # FLOAT, one +0.0


def read_node(data: bytes) -> Node:
    node = Node("", "", [], [], {})
    for number, wire_type, value in wire_fields(data):
        if wire_type != 2:
            continue
        if number == 1:
            node.inputs.append(value.decode("utf-8", "replace"))
        elif number == 2:
            node.outputs.append(value.decode("utf-8", "replace"))
        elif number == 4:
            node.op_type = value.decode("utf-8", "replace")
        elif number == 7:
            node.domain = value.decode("utf-8", "replace")
        elif number == 5:
            attribute = read_attribute(value)
            node.attributes[attribute.get("name", "")] = attribute
    if node.domain == "ai.onnx":
        node.domain = ""
    return node


def value_name(data: bytes) -> str:
    """A ValueInfoProto's name."""
    names = [value for number, wire_type, value in wire_fields(data) if number == 1 and wire_type == 2]
    return names[-1].decode("utf-8", "replace") if names else ""


def read_attribute(data: bytes) -> dict:
    """An AttributeProto's name and values: f, i, s, t, floats (float32) and ints (uint64), packed or
    not, and whether it holds a graph. A field given twice counts as protobuf counts it (the last).
    A run of unpacked values is read in one step: a big model's table holds a million keys."""
    found: dict = {"floats": [], "ints": [], "graph": False}
    pos = 0
    while pos < len(data):
        if data[pos] == _INTS_TAG:
            ints, pos = tagged_varints(data, pos)
            found["ints"].append(ints)
            continue
        if data[pos] == _FLOATS_TAG:
            run = np.frombuffer(data, np.uint8, offset=pos)
            fields = run[: len(run) // 5 * 5].reshape(-1, 5)
            tagged = fields[:, 0] == _FLOATS_TAG
            count = len(tagged) if tagged.all() else int(np.argmin(tagged))
            if not count:
                raise WireError(f"a float field cut short at byte {pos}")
            found["floats"].append(fields[:count, 1:].copy().view("<f4").ravel())
            pos += count * 5
            continue
        number, wire_type, value, pos = wire_field(data, pos)
        if number == 1 and wire_type == 2:
            found["name"] = value.decode("utf-8", "replace")
        elif number in (6, 11):  # g, graphs: a subgraph
            found["graph"] = True
        elif number == 2 and wire_type == 5:
            found["f"] = float(np.frombuffer(value, "<f4")[0])
        elif number == 3 and wire_type == 0:
            found["i"] = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 4 and wire_type == 2:
            found["s"] = value
        elif number == 5 and wire_type == 2:
            found["t"] = value
        elif number == 7 and wire_type == 2:  # packed floats
            found["floats"].append(np.frombuffer(value, "<f4"))
        elif number == 8 and wire_type == 2:  # packed ints
            at, ints = 0, []
            while at < len(value):
                one, at = wire_varint(value, at)
                ints.append(one)
            found["ints"].append(np.array(ints, np.uint64))
    for name, dtype in (("floats", np.float32), ("ints", np.uint64)):
        found[name] = np.concatenate(found[name]).astype(dtype) if found[name] else np.zeros(0, dtype)
    return found


def tagged_varints(data: bytes, pos: int) -> tuple[np.ndarray, int]:
    """The run of unpacked ints fields (a one-byte tag, then a varint) from ``pos``, decoded at once
    (one at a time, a million keys took a second): (values as uint64, where the run ends)."""
    run = np.frombuffer(data, np.uint8, offset=pos)
    last = np.flatnonzero(run < 0x80)  # each varint's last byte (the tag, under 0x80, is one of its own)
    first = np.concatenate([[0], last[:-1] + 1])
    pairs = len(last) // 2
    tags = first[0: 2 * pairs: 2]
    tagged = (tags == last[0: 2 * pairs: 2]) & (run[tags] == _INTS_TAG)
    count = pairs if tagged.all() else int(np.argmin(tagged))
    if not count:
        raise WireError(f"an int field cut short at byte {pos}")
    starts, ends = first[1: 2 * count: 2], last[1: 2 * count: 2]
    longest = int((ends - starts).max()) + 1
    if longest > 10:
        raise WireError(f"a varint longer than 10 bytes after byte {pos}")
    values = np.zeros(count, np.uint64)
    for shift in range(longest):
        more = starts + shift <= ends
        values[more] |= (run[starts[more] + shift] & 0x7F).astype(np.uint64) << np.uint64(7 * shift)
    return values, pos + int(ends[-1]) + 1


def attribute_int(node: Node, name: str, default: int) -> int:
    return node.attributes[name].get("i", default) if name in node.attributes else default


def attribute_bytes(node: Node, name: str, default: bytes) -> bytes:
    return node.attributes[name].get("s", default) if name in node.attributes else default
