"""Each detector's ONNX graph against its scikit-learn/numpy reference, on generated data."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from logscore.features import FeatureBatch
from logscore.model import make_session, run_graph
from logscore.training.detectors import DETECTORS, Features, RarityTable
from logscore.training.graph import ML_OPSET, OPSET, GraphBuilder
from logscore.training.train import apply_ecdf, assemble_graph, calibrate, ecdf_table


def generated_batch(rng, records: int, width: int = 12) -> FeatureBatch:
    centers = rng.normal(0, 3, size=(3, width))
    dense = (centers[rng.integers(0, 3, records)] + rng.normal(0, 1, (records, width))).astype(np.float32)
    per_row = rng.integers(1, 15, records)
    rows = np.repeat(np.arange(records), per_row)
    keys = rng.zipf(1.5, len(rows)).astype(np.int64) % 5000
    weights = rng.choice([0.5, 1.0, 2.0], len(rows)).astype(np.float32)
    return FeatureBatch(rows, keys, weights, dense, np.zeros(records, bool), np.zeros(records, bool))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    train, test = generated_batch(rng, 1500), generated_batch(rng, 400)
    table = RarityTable(train.keys, train.size)
    return Features(train, table), Features(test, table)


pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

SMALL = {"isolation_forest": {"n_estimators": 30}, "autoencoder": {"hidden": 8, "max_iter": 30},
         "som": {"grid": 4, "epochs": 4}, "lof": {"n_neighbors": 10, "max_reference": 500}}


@pytest.mark.parametrize("kind", sorted(DETECTORS))
def test_onnx_raw_score_equals_reference(kind, data):
    train, test = data
    detector = DETECTORS[kind](seed=0, **SMALL.get(kind, {}))
    detector.fit(train)
    graph = assemble_graph(train.dense.shape[1], train.table, [detector])
    _, raw, surprise = run_graph(make_session(graph.SerializeToString()), test.batch)
    expected = detector.reference(test)
    assert raw.shape == (test.batch.size, 1)
    assert np.ptp(expected) > 0, "generated data must give varied scores"
    np.testing.assert_allclose(raw[:, 0], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(surprise, train.table.lookup(test.batch.keys), atol=1e-6)


def test_outliers_score_higher_for_every_detector(data):
    train, _ = data
    rng = np.random.default_rng(3)
    far = generated_batch(rng, 50)
    far.dense += 25.0
    far.keys += 100_000  # never seen
    near = generated_batch(rng, 50)
    for kind in sorted(DETECTORS):
        detector = DETECTORS[kind](seed=0, **SMALL.get(kind, {}))
        detector.fit(train)
        far_scores = detector.reference(Features(far, train.table))
        near_scores = detector.reference(Features(near, train.table))
        assert np.median(far_scores) > np.percentile(near_scores, 90), kind


def test_rarity_surprise_is_one_for_unseen_and_zero_for_common():
    table = RarityTable(np.array([1] * 100 + [2] * 3 + [3]), records=100, support=10)
    surprise = table.lookup(np.array([1, 2, 3, 4]))
    assert surprise[0] == 0.0 and surprise[3] == 1.0
    assert 0 < surprise[2] < 1 and surprise[1] < surprise[2]


def test_ecdf_is_fraction_strictly_lower():
    values = np.array([0, 0, 0, 1, 2, 2, 3], dtype=np.float32)
    knots, levels = ecdf_table(values)
    got = apply_ecdf(np.array([-1, 0, 0.5, 1, 2, 3, 4], dtype=np.float32), knots, levels)
    np.testing.assert_allclose(got, [0, 0, 3 / 7, 3 / 7, 4 / 7, 6 / 7, 1], atol=1e-6)


def test_ecdf_with_many_values_keeps_the_tail_exact():
    values = np.random.default_rng(0).normal(size=50_000).astype(np.float32)
    knots, levels = ecdf_table(values, max_knots=512, exact_tail=100)
    assert len(knots) <= 512
    top = np.sort(values)[-100:]
    exact = np.array([(values < v).mean() for v in top])
    np.testing.assert_allclose(apply_ecdf(top, knots, levels), exact, atol=1e-6)


def ecdf_in_graph(knots: np.ndarray, levels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """GraphBuilder.ecdf run by onnxruntime over ``values``."""
    g = GraphBuilder(dense_width=1)
    column = g.op("Squeeze", ["dense", g.const([1], dtype=np.int64)])
    found = g.ecdf(column, knots, levels)
    model = helper.make_model(
        helper.make_graph(g.nodes + [helper.make_node("Identity", [found], ["level"])], "ecdf",
                          [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["N", 1])],
                          [helper.make_tensor_value_info("level", TensorProto.FLOAT, ["N"])],
                          initializer=g.initializers),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)])
    model.ir_version = 9
    return make_session(model.SerializeToString()).run(["level"], {"dense": values[:, None]})[0]


@pytest.mark.parametrize("knot_count", [0, 1, 2, 7, 548, 2048])
def test_graph_ecdf_is_the_numpy_ecdf_at_every_knot_and_between(knot_count):
    rng = np.random.default_rng(knot_count)
    distinct = rng.normal(size=knot_count).astype(np.float32)
    knots, levels = ecdf_table(np.repeat(distinct, rng.integers(1, 4, size=knot_count)))  # ties in the data
    assert len(knots) == knot_count
    between = (knots[:-1] + knots[1:]) / 2 if knot_count > 1 else np.zeros(0)
    probes = np.concatenate([knots, np.nextafter(knots.astype(np.float32), np.float32(np.inf)), between,
                             [-np.inf, np.inf, -1e30, 1e30, 0.0]]).astype(np.float32)
    expected = levels[np.searchsorted(knots.astype(np.float32), probes, side="left")]
    np.testing.assert_array_equal(ecdf_in_graph(knots, levels, probes), expected)


def test_graph_ecdf_puts_nan_at_level_zero():
    knots, levels = ecdf_table(np.array([0.0, 1.0, 2.0], dtype=np.float32))
    assert ecdf_in_graph(knots, levels, np.array([np.nan], dtype=np.float32))[0] == 0.0


def test_graph_calibration_matches_numpy_for_an_ensemble(data):
    train, test = data
    detectors = [DETECTORS[k](seed=0, **SMALL.get(k, {})) for k in ("rarity", "pca")]
    for detector in detectors:
        detector.fit(train)
    uncalibrated = assemble_graph(train.dense.shape[1], train.table, detectors)
    _, raw, _ = run_graph(make_session(uncalibrated.SerializeToString()), test.batch)
    calibration, expected = calibrate(raw)  # as training does: from the graph's own raw scores
    graph = assemble_graph(train.dense.shape[1], train.table, detectors, calibration, None)
    score, graph_raw, _ = run_graph(make_session(graph.SerializeToString()), test.batch)
    np.testing.assert_array_equal(graph_raw, raw)
    np.testing.assert_allclose(score, expected, atol=1e-6)
    assert score.min() == 0.0 and 0.99 <= score.max() <= 1.0
    assert len(np.unique(score)) > 100


def test_key_counter_merging_now_and_then_counts_like_one_unique(monkeypatch):
    from logscore.training import streaming

    monkeypatch.setattr(streaming, "PENDING_KEYS", 50)  # merge often, and past the merged size
    rng = np.random.default_rng(3)
    counter, every = streaming.KeyCounter(), []
    for _ in range(40):
        keys = rng.integers(0, 400, size=rng.integers(0, 60)) * 7919 - 10**12
        counter.add(keys)
        every.append(keys)
    expected_keys, expected_counts = np.unique(np.concatenate(every), return_counts=True)
    keys, counts = counter.totals()
    assert keys.tolist() == expected_keys.tolist() and counts.tolist() == expected_counts.tolist()


def test_screening_pairs_hold_exactly_the_rare_and_marked_keys_of_each_record(monkeypatch):
    """record_key_pairs filters as it goes (small COMPACT_PAIRS: several compactions and a refilter);
    the result must equal filtering all of each record's distinct pairs at the end."""
    from logscore.features import Featurizer, load_spec
    from logscore.training import streaming

    from .generate import shop_lines

    monkeypatch.setattr(streaming, "COMPACT_PAIRS", 3000)
    monkeypatch.setattr(streaming.KeySet, "SLOT_BITS", 6)  # common keys sharing slots, looked up apart
    lines = shop_lines(3000, seed=4)
    featurizer = Featurizer(load_spec(None, "access"))
    featurizer.fit(lines)
    every_rows, every_keys = [], []
    for start in range(0, len(lines), 256):
        batch = featurizer.transform(lines[start: start + 256], dense=False)
        every_rows.append(batch.rows.astype(np.int64) + start)
        every_keys.append(batch.keys.astype(np.int64))
    pairs_all = np.unique(np.stack([np.concatenate(every_rows), np.concatenate(every_keys)]), axis=1)
    distinct_all, holders_all = np.unique(pairs_all[1], return_counts=True)
    bound = 0.05 * len(lines)
    marked = distinct_all[holders_all >= bound][::3]  # some common keys marked: they stay
    held = np.isin(pairs_all[1], distinct_all[(holders_all < bound)]) | np.isin(pairs_all[1], marked)
    assert 0 < held.sum() < len(held)

    pairs = streaming.record_key_pairs(featurizer, lines, 256, bound, lambda: marked)
    assert pairs.rows.tolist() == pairs_all[0][held].tolist() and pairs.keys.tolist() == pairs_all[1][held].tolist()
    assert pairs.distinct[pairs.key_index].tolist() == pairs.keys.tolist()
    assert pairs.holders.tolist() == holders_all[np.searchsorted(distinct_all, pairs.distinct)].tolist()
    assert pairs.records == len(lines)
    every_key, occurrences = np.unique(np.concatenate(every_keys), return_counts=True)
    assert pairs.every_key.tolist() == every_key.tolist() and pairs.occurrences.tolist() == occurrences.tolist()
    assert (occurrences > np.unique(pairs_all[1], return_counts=True)[1]).any()  # keys two converters share


def test_a_url_plan_learns_what_fitting_the_masked_urls_learns():
    """EnumerationPlan (each URL split once, then array operations per mask) against the rule
    written out: a slot is an enumeration with at most max_enum_values values, each used
    min_enum_support times on average."""
    from logscore.features.converters import UrlConverter

    rng = np.random.default_rng(5)
    urls = [f"/p{rng.integers(3)}?sort={rng.integers(9 + (i % 3))}&id={i}&x" if i % 17 else None
            for i in range(600)]
    converter = UrlConverter("url")
    plan = converter.fit_plan(urls)
    for _ in range(20):
        mask = rng.random(len(urls)) < rng.uniform(0.05, 1.0)
        values, uses = {}, {}
        for url in (u for u, keep in zip(urls, mask) if keep and u is not None):
            template, params, _ = converter._split(url)
            for name, value in params:
                values.setdefault(f"{template}?{name}", set()).add(value)
                uses[f"{template}?{name}"] = uses.get(f"{template}?{name}", 0) + 1
        expected = sorted(slot for slot, seen in values.items() if len(seen) <= 8 and uses[slot] >= 5 * len(seen))
        assert plan.learned(mask) == {"enumerated": expected}
        assert 0 < len(expected) < len(values)


def test_crossfit_tables_equal_fitting_on_the_masked_records():
    """The fold models from the sample's key counts (training/crossfit.py) are the models fit on
    the fold's records: the same table key for key and the same featurizer, also where a fold
    learns other enumerations than the whole sample (a 9th value of ``tab`` in three records only)
    and with records vouching for nothing."""
    from logscore.features import Featurizer, load_spec
    from logscore.training import streaming
    from logscore.training.crossfit import CrossFit
    from logscore.training.train import TrainOptions, fit, quiet

    from .generate import access_line, shop_lines

    import random

    lines_rng, rng = random.Random(2), np.random.default_rng(2)
    odd = [access_line(lines_rng, "GET", f"/list?tab={'ninth' if i < 3 else i // 4 % 8}&page={i}") for i in range(300)]
    sample = shop_lines(1500, seed=6) + odd
    options = TrainOptions(spec=load_spec(None, "access"), chunk=128)
    reference = Featurizer(options.spec)
    plan = reference.fit_plan(sample)
    reference.apply(plan.learned())
    pairs = streaming.record_key_pairs(reference, sample, options.chunk, len(sample), lambda: np.zeros(0, np.int64))
    crossfit = CrossFit(sample, options.spec, plan, reference, pairs.every_key, pairs.occurrences, options.chunk,
                        None)
    folds = np.arange(len(sample)) % 4
    ninth = np.zeros(len(sample), dtype=bool)
    ninth[1500:1503] = True
    for fold, aside, vouching in [(0, ninth, None), (1, ninth, ~(rng.random(len(sample)) < 0.05)), (2, None, None)]:
        held_out = folds == fold
        mask = ~held_out & (~aside if aside is not None else True)
        featurizer, features = crossfit.features(mask, quiet, "test", vouching, held_out)
        fitted = fit([r for r, use in zip(sample, mask) if use], options, quiet, "test",
                     vouching=None if vouching is None else vouching[mask])
        assert featurizer.spec() == fitted.featurizer.spec()
        assert features.table.keys.tolist() == fitted.table.keys.tolist()
        assert features.table.surprise.tolist() == fitted.table.surprise.tolist()
        assert features.table.records == fitted.table.records and features.table.support == fitted.table.support
        learned_here = "/list?tab" in featurizer.spec()["fields"][0]["converters"][0]["enumerated"]
        assert learned_here == (aside is not None)  # without the three, tab is an enumeration
        assert (featurizer is reference) == (aside is None)


def test_record_pairs_refuse_keys_past_32_bits():
    """Row and key share one int64 while a record's keys are sorted: a key past 32 bits would
    take another record's row (rows [0, 0, 1], keys [5, 2^32 + 5, 7] came back as rows [0, 1, 1])."""
    from logscore.training.streaming import distinct_pairs

    rows, keys, repeats = distinct_pairs(np.array([1, 0, 0, 1]), np.array([7, 5, 2**32 - 1, 7]))
    assert rows.tolist() == [0, 0, 1] and keys.tolist() == [5, 2**32 - 1, 7] and repeats.tolist() == [7]
    for bad in (2**32 + 5, -1):
        with pytest.raises(ValueError, match="32-bit"):
            distinct_pairs(np.array([0, 0, 1]), np.array([5, bad, 7]))
