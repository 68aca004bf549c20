"""The graph's rarity part run by the compiled SurpriseTable (graph_shortcut.py) gives the whole
graph's results to the bit, and graphs of any other shape run whole."""

import dataclasses
import random

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from logscore.features import load_spec, native
from logscore.graph_shortcut import ABSENT_KEY, MIN_RECORDS, rarity_shortcut, read_attribute
from logscore.model import Model, run_graph
from logscore.training.train import TrainOptions, save_model, train

from .generate import attack_lines, blog_lines, shop_lines

pytestmark = pytest.mark.skipif(not native.built(), reason="the compiled featurizer is not built")

SHIPPED = "models/apache-access.onnx"


def novel_lines(count: int, seed: int) -> list[str]:
    """Shop lines whose URLs carry words and ids never seen: most of their keys miss the table."""
    rng = random.Random(seed)
    lines = []
    for line in shop_lines(count, seed=seed):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz%20-_") for _ in range(rng.randint(3, 30)))
        lines.append(line.replace(" HTTP/", f"{'&' if '?' in line else '?'}{word}={rng.getrandbits(40)} HTTP/", 1))
    return lines


def scoring_lines() -> list[str]:
    shop = shop_lines(300, seed=21)
    return shop + [line for _, line in attack_lines(shop, 120)] + blog_lines(60) + novel_lines(300, seed=22)


def assert_whole_graph_results(model: Model, lines: list[str]) -> None:
    assert model.shortcut is not None
    for size in (1, 7, MIN_RECORDS, len(lines)):
        batch = model.featurizer.transform(lines[:size], dense=model.needs_dense)
        whole = run_graph(model.session, batch)
        for short in (model.shortcut.run(model.session, batch), model.run_graph(batch)):
            for mine, theirs in zip(short, whole):
                assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
                assert mine.tobytes() == theirs.tobytes()


@pytest.fixture(scope="module")
def detectors_model(tmp_path_factory):
    """A model with detectors that read the dense block beside rarity (their subgraphs run as trained)."""
    model, _ = train(shop_lines(1500, seed=3), TrainOptions(spec=load_spec(None, "access"), name="mixed",
                                                            detectors=("rarity", "isolation_forest", "pca"),
                                                            folds=2, target_fpr=0.01))
    path = tmp_path_factory.mktemp("mixed") / "mixed.onnx"
    save_model(model, path)
    return path


def test_the_shipped_model_gives_the_whole_graphs_results():
    assert_whole_graph_results(Model.load(SHIPPED), scoring_lines())


def test_trained_models_give_the_whole_graphs_results(shop_model_path, detectors_model, behaviour_model):
    for path in (shop_model_path, detectors_model, behaviour_model):
        model = Model.load(path)
        assert_whole_graph_results(model, scoring_lines())
        # and so the scores and explanations a caller gets
        plain = Model.load(path)
        plain.shortcut = None
        one, two = model.score(scoring_lines(), explain=3), plain.score(scoring_lines(), explain=3)
        assert one.scores.tobytes() == two.scores.tobytes() and one.raw_scores.tobytes() == two.raw_scores.tobytes()
        assert one.explanations == two.explanations


def test_the_python_path_runs_the_whole_graph(monkeypatch):
    monkeypatch.setenv("LOGSCORE_PURE_PYTHON", "1")
    assert Model.load(SHIPPED).shortcut is None


def shipped_graph() -> onnx.ModelProto:
    return onnx.load(SHIPPED)


def node(proto: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    return next(n for n in proto.graph.node if n.op_type == op_type)


def set_attribute(target: onnx.NodeProto, name: str, value) -> None:
    kept = [a for a in target.attribute if a.name != name]
    del target.attribute[:]
    target.attribute.extend(kept + [helper.make_attribute(name, value)])


def read_keys_elsewhere(proto):
    proto.graph.node.append(helper.make_node("Identity", ["keys"], ["keys_again"]))
    proto.graph.output.append(helper.make_tensor_value_info("keys_again", onnx.TensorProto.INT64, ["nnz"]))


def read_rows_elsewhere(proto):
    proto.graph.node.append(helper.make_node("Identity", ["rows"], ["rows_again"]))
    proto.graph.output.append(helper.make_tensor_value_info("rows_again", onnx.TensorProto.INT64, ["nnz"]))


def weigh_again(proto):
    proto.graph.node.append(helper.make_node("Identity", [node(proto, "Mul").output[0]], ["weighed_again"]))
    proto.graph.output.append(helper.make_tensor_value_info("weighed_again", onnx.TensorProto.FLOAT, ["nnz"]))


def start_from_ones(proto):
    set_attribute(node(proto, "ConstantOfShape"), "value", numpy_helper.from_array(np.ones(1, np.float32)))


def key_past_32_bits(proto):
    encoder = node(proto, "LabelEncoder")
    keys = next(a for a in encoder.attribute if a.name == "keys_int64s").ints
    set_attribute(encoder, "keys_int64s", [ABSENT_KEY + 5] + list(keys)[1:])


def surprise_from_elsewhere(proto):
    encoder, weigh = node(proto, "LabelEncoder"), node(proto, "Mul")
    encoder.output[0] = "encoded"
    weigh.input[list(weigh.input).index("key_surprise")] = "encoded"
    proto.graph.node.append(helper.make_node("Identity", ["dense"], ["key_surprise"]))


def weighed_surprise_as_an_output(proto):
    proto.graph.output.append(helper.make_tensor_value_info(node(proto, "Mul").output[0], onnx.TensorProto.FLOAT,
                                                            ["nnz"]))


def a_subgraph_reading_rows(proto):
    body = helper.make_graph([helper.make_node("Identity", ["rows"], ["seen"])], "body", [],
                             [helper.make_tensor_value_info("seen", onnx.TensorProto.INT64, ["nnz"])])
    proto.graph.node.append(helper.make_node("SequenceMap", ["dense"], ["mapped"], body=body))


OTHER_SHAPES = {
    "a default surprise other than 1": lambda p: set_attribute(node(p, "LabelEncoder"), "default_float", 0.5),
    "keys read by another node": read_keys_elsewhere,
    "rows read by another node": read_rows_elsewhere,
    "the weighed surprise read by another node": weigh_again,
    "sums that start from ones": start_from_ones,
    "a scatter that replaces instead of adding": lambda p: set_attribute(node(p, "ScatterElements"),
                                                                          "reduction", "max"),
    "a key past 32 bits": key_past_32_bits,
    "a Mul by something else": lambda p: node(p, "Mul").input.__setitem__(1, "key_surprise"),
    "key_surprise not the encoder's output": surprise_from_elsewhere,
    "the weighed surprise a graph output": weighed_surprise_as_an_output,
    "a subgraph that may read rows": a_subgraph_reading_rows,
}


@pytest.mark.parametrize("change", list(OTHER_SHAPES), ids=list(OTHER_SHAPES))
def test_graphs_of_other_shapes_run_whole(change):
    assert rarity_shortcut(shipped_graph().SerializeToString()) is not None  # (the unchanged graph takes it)
    proto = shipped_graph()
    OTHER_SHAPES[change](proto)
    assert rarity_shortcut(proto.SerializeToString()) is None


def test_a_file_holding_two_graphs_runs_whole():
    # onnxruntime merges a message field given twice: the second graph's node reads rows as well.
    extra = helper.make_graph([helper.make_node("Identity", ["rows"], ["rows_again"])], "more", [], [])
    data = extra.SerializeToString()
    assert rarity_shortcut(shipped_graph().SerializeToString() + bytes([7 << 3 | 2]) + encode_varint(len(data)) +
                           data) is None


def test_arrays_that_are_not_contiguous_give_the_whole_graphs_results():
    model = Model.load(SHIPPED)
    batch = model.featurizer.transform(scoring_lines()[:40], dense=model.needs_dense)
    strided = dataclasses.replace(batch, **{name: np.repeat(getattr(batch, name), 2)[::2]
                                            for name in ("keys", "weights", "rows")})
    assert not strided.keys.flags.c_contiguous
    for mine, theirs in zip(model.shortcut.run(model.session, strided), run_graph(model.session, batch)):
        assert mine.tobytes() == theirs.tobytes()


def test_odd_weights_and_rows_sum_as_onnxruntime_sums_them():
    model = Model.load(SHIPPED)
    batch = model.featurizer.transform(scoring_lines()[:40], dense=model.needs_dense)
    weights = batch.weights.copy()
    weights[:8] = [np.nan, np.inf, -np.inf, -0.0, -2.5, 3e38, 3e38, np.float32(np.nan) * -1]
    rows = batch.rows.copy()
    rows[20:30] = 3  # a row met again after others
    odd = dataclasses.replace(batch, weights=weights, rows=rows)
    empty = dataclasses.replace(batch, keys=batch.keys[:0], weights=weights[:0], rows=rows[:0])
    for each in (odd, empty):
        for mine, theirs in zip(model.shortcut.run(model.session, each), run_graph(model.session, each)):
            assert mine.tobytes() == theirs.tobytes()


def test_a_table_reads_back_as_onnx_wrote_it_packed_or_not():
    proto = shipped_graph()
    encoder = node(proto, "LabelEncoder")
    attributes = {a.name: a for a in encoder.attribute}
    keys, values = list(attributes["keys_int64s"].ints), list(attributes["values_floats"].floats)
    unpacked = read_attribute(attributes["keys_int64s"].SerializeToString())
    assert unpacked["ints"].tolist() == keys
    assert read_attribute(attributes["values_floats"].SerializeToString())["floats"].tobytes() == \
        np.array(values, np.float32).tobytes()
    varints = b"".join(encode_varint(key) for key in keys)
    packed = (b"\x0a" + encode_varint(len(b"keys_int64s")) + b"keys_int64s" +
              bytes([8 << 3 | 2]) + encode_varint(len(varints)) + varints)
    assert read_attribute(packed)["ints"].tolist() == keys
    floats = np.array(values, "<f4").tobytes()
    packed_floats = bytes([7 << 3 | 2]) + encode_varint(len(floats)) + floats
    assert read_attribute(packed_floats)["floats"].tobytes() == floats


@pytest.mark.parametrize("cut", [b"\x40", b"\x40\x85\x80", b"\x3d\x00\x00", b"\x40\x05\x40"],
                         ids=["tag alone", "varint unfinished", "float cut", "second int missing"])
def test_attributes_cut_short_are_refused_not_read_for_ever(cut):
    from logscore.artifact import WireError
    with pytest.raises(WireError):
        read_attribute(cut)


def test_a_graph_cut_short_runs_whole():
    data = shipped_graph().SerializeToString()
    encoder_keys = data.index(b"keys_int64s")
    assert rarity_shortcut(data[: encoder_keys + 500]) is None


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def reference_lookup(table: dict, keys: np.ndarray) -> np.ndarray:
    return np.array([table.get(int(k), 1.0) for k in keys], np.float32)


def reference_sums(surprise: np.ndarray, weights: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    """As ScatterElements adds: each row from float32 zero, in the keys' order, in float32."""
    sums = np.zeros(size, np.float32)
    for value, weight, row in zip(surprise, weights, rows):
        sums[row] = np.float32(sums[row] + np.float32(value * weight))
    return sums


@pytest.mark.parametrize("count", [0, 1, 9, 5000, 300_000])
def test_the_compiled_table_finds_what_a_dict_finds(count):
    rng = np.random.default_rng(count)
    keys = rng.choice(1 << 32, size=count, replace=False).astype(np.int64)
    if count:
        keys[0], keys[-1] = 0, (1 << 32) - 1  # the edges of 32 bits
    values = rng.random(count, dtype=np.float32)
    table = native.module(True).SurpriseTable(keys, values, 1.0)
    assert len(table) == count
    wanted = np.concatenate([keys[rng.permutation(count)][:2000], rng.integers(0, 1 << 32, 2000),
                             keys[:50] + (1 << 32), keys[:50] | np.int64(-(1 << 62)), [-1, ABSENT_KEY, 0]])
    found = np.frombuffer(table.lookup(wanted.astype(np.int64)), np.float32)
    assert found.tobytes() == reference_lookup(dict(zip(keys.tolist(), values.tolist())), wanted).tobytes()


def test_keys_past_a_full_bucket_are_found_in_the_spill_list():
    # 16 keys take 4 buckets of 8: twelve in one bucket spill four (bucket = key × golden ratio, top 2 bits).
    colliding = [k for k in range(1, 400) if ((k * 0x9E3779B97F4A7C15) % (1 << 64)) >> 62 == 0][:12]
    others = [k for k in range(400, 800) if ((k * 0x9E3779B97F4A7C15) % (1 << 64)) >> 62 != 0][:4]
    keys = np.array(colliding + others, np.int64)
    values = np.linspace(0.05, 0.8, len(keys), dtype=np.float32)
    table = native.module(True).SurpriseTable(keys, values, 1.0)
    assert table.spilled == 4
    wanted = np.concatenate([keys, np.arange(800, 1200), keys + (1 << 32)])
    found = np.frombuffer(table.lookup(wanted), np.float32)
    assert found.tobytes() == reference_lookup(dict(zip(keys.tolist(), values.tolist())), wanted).tobytes()


def test_sums_add_in_the_keys_order_even_when_a_row_comes_back():
    rng = np.random.default_rng(4)
    keys = rng.choice(1 << 32, size=400, replace=False).astype(np.int64)
    values = rng.random(400, dtype=np.float32)
    table = native.module(True).SurpriseTable(keys, values, 1.0)
    wanted = np.concatenate([keys[:300], rng.integers(0, 1 << 32, 300)])
    rng.shuffle(wanted)
    weights = (rng.random(len(wanted), dtype=np.float32) * 3).astype(np.float32)
    rows = np.sort(rng.integers(0, 50, len(wanted)))
    rows[100:140] = 3  # a row met again after others
    surprise, sums = table.sum_rows(wanted, weights, rows, 60)
    expected = reference_lookup(dict(zip(keys.tolist(), values.tolist())), wanted)
    assert np.frombuffer(surprise, np.float32).tobytes() == expected.tobytes()
    assert np.frombuffer(sums, np.float32).tobytes() == reference_sums(expected, weights, rows, 60).tobytes()


def test_the_compiled_table_refuses_what_it_cannot_hold():
    table_type = native.module(True).SurpriseTable
    with pytest.raises(ValueError, match="32-bit"):
        table_type(np.array([ABSENT_KEY], np.int64), np.ones(1, np.float32), 1.0)
    with pytest.raises(ValueError, match="one value a key"):
        table_type(np.arange(3, dtype=np.int64), np.ones(2, np.float32), 1.0)
    table = table_type(np.arange(3, dtype=np.int64), np.ones(3, np.float32), 1.0)
    with pytest.raises(ValueError, match="not a record of a batch of 2"):
        table.sum_rows(np.arange(3, dtype=np.int64), np.ones(3, np.float32), np.array([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="one each a key"):
        table.sum_rows(np.arange(3, dtype=np.int64), np.ones(2, np.float32), np.array([0, 1, 1]), 2)
    with pytest.raises(ValueError, match="size < 2"):  # (its sums' bytes would overflow)
        table.sum_rows(np.arange(3, dtype=np.int64), np.ones(3, np.float32), np.array([0, 1, 1]), 1 << 62)
