"""A trained model end to end: calibration, attacks, explanations, artifact checks."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from logscore.artifact import FORMAT_VERSION, HASH_KEY, METADATA_KEY, _scan_model, content_hash, read_artifact
from logscore.errors import ConfigError, ModelLoadError
from logscore import model as model_module
from logscore.features import DEFAULT_SPECS, Featurizer
from logscore.model import Model, record_slices
from logscore.windows import LEVELS_READ

from .generate import attack_lines, blog_lines, shop_lines, syslog_lines


@pytest.fixture(scope="module")
def shop_model(shop_model_path):
    return Model.load(shop_model_path)


def test_scores_are_bounded_and_false_positive_rate_near_target(shop_model):
    fresh = shop_lines(20_000, seed=99)
    result = shop_model.score(fresh)
    assert result.scores.dtype == np.float32
    assert np.all((result.scores >= 0) & (result.scores <= 1))
    target = shop_model.metadata["calibration"]["target_fpr"]
    flagged = result.is_anomaly.mean()
    assert target / 2 <= flagged <= target * 2, f"flagged {flagged:.4f}, target {target}"


def test_attacks_in_shop_traffic_are_flagged(shop_model):
    attacks = attack_lines(shop_lines(500, seed=5), 400)
    result = shop_model.score([line for _, line in attacks])
    for family in sorted({f for f, _ in attacks}):
        hits = [flag for (f, _), flag in zip(attacks, result.is_anomaly) if f == family]
        assert np.mean(hits) >= 0.9, f"{family}: {np.mean(hits):.2f}"


def test_explanations_name_the_unusual_parts(shop_model):
    line = shop_lines(1, seed=11)[0].replace("HTTP/1.1", "HTTP/1.1", 1)
    attacked = line.split('"')[0] + '"GET /products/12?id=1%27%20OR%201%3D1-- HTTP/1.1" 200 10 "-" "x"'
    result = shop_model.score([attacked], explain=5)
    explanation = result.explanations[0]
    assert 1 <= len(explanation) <= 5
    assert any("shape id=9' a 9=9-" in e and "never seen" in e for e in explanation), explanation
    normal = shop_model.score(shop_lines(5, seed=12), explain=5)
    assert all(len(e) <= 5 for e in normal.explanations)


def test_explanations_cut_the_names_of_long_values(shop_model):
    """A 4,800-character path segment is named by its first characters, not whole: each of its
    record's explanations was 5 KB (and the converter's remembered names 80 MiB at most)."""
    from logscore.features.converters import MAX_NAME_CHARS

    line = shop_lines(1, seed=11)[0].split('"')[0] + f'"GET /{"abcdefgh" * 600}/x.php HTTP/1.1" 200 10 "-" "x"'
    explanation = shop_model.score([line], explain=5).explanations[0]
    cut = [e for e in explanation if "abcdefgh" in e]
    assert cut and all(len(name.partition(" (")[0]) == MAX_NAME_CHARS and "… (never seen" in name for name in cut)
    assert any(e.startswith("url: segment x.php") for e in explanation)  # short names whole


def test_flagged_records_alone_are_explained_as_every_record_is(shop_model):
    """Forward mode names features for the flagged records only (featurized again on their own):
    the same names as explaining every record gives them, and none for the others."""
    lines = shop_lines(400, seed=15) + [line for _, line in attack_lines(shop_lines(20, seed=16), 8, seed=17)]
    every = shop_model.score(lines, explain=3)
    flagged = shop_model.score(lines, explain_flagged=3)
    assert every.is_anomaly.sum() >= 8 and (flagged.is_anomaly == every.is_anomaly).all()
    expected = [names if flag else [] for names, flag in zip(every.explanations, every.is_anomaly)]
    assert [list(names) for names in flagged.explanations] == expected


def test_a_flood_is_named_from_the_batch_scored_each_feature_described_once(shop_model, monkeypatch):
    """Most of a batch flagged (another site's traffic): the flagged records are named from the
    batch scored, not featurized and run again, and each distinct feature of a value is described
    once however many records name it; the names are those explaining every record gives."""
    from logscore.features.converters import Converter

    lines = blog_lines(300, seed=18) + [line for _, line in attack_lines(blog_lines(40, seed=19), 40, seed=20)]
    every = shop_model.score(lines, explain=3)
    transforms, described = [], []
    featurize, describe = shop_model.featurizer.transform, Converter.describe
    monkeypatch.setattr(shop_model.featurizer, "transform", lambda *a, **k: transforms.append(1) or featurize(*a, **k))
    monkeypatch.setattr(Converter, "describe", lambda self, *a: described.append(1) or describe(self, *a))
    flagged = shop_model.score(lines, explain_flagged=3)
    assert flagged.is_anomaly.mean() > 0.5 and (flagged.is_anomaly == every.is_anomaly).all()
    expected = [names if flag else [] for names, flag in zip(every.explanations, every.is_anomaly)]
    assert [list(names) for names in flagged.explanations] == expected
    assert len(transforms) == 1  # the batch scored, not the flagged records again
    named = sum(len(names) for names in flagged.explanations)
    assert len(described) < named / 3, (len(described), named)


def test_explanations_name_each_records_most_unusual_features_in_order(shop_model):
    """Known answer: per record, its ``top`` features that contributed (a NaN too), most first; a
    feature that did not contribute is never named, whatever order the batch holds the records in."""
    from types import SimpleNamespace

    rows = np.array([1, 0, 0, 2, 0, 1, 0, 1, 0])
    surprise = np.array([0.3, 0.2, 0.9, 0.0, 0.5, np.nan, 1.0, 0.1, 0.05], dtype=np.float32)
    weights = np.array([1, 1, 1, 1, 1, 1, 0, 1, 1], dtype=np.float32)  # feature 6: weight 0
    batch = SimpleNamespace(rows=rows, weights=weights, size=3, names=lambda chosen: [f"f{i}" for i in chosen])
    explained = shop_model._explain(batch, surprise, top=3)
    names = [[e.partition(" (")[0] for e in record] for record in explained]
    assert names == [["f2", "f4", "f1"], ["f0", "f7", "f5"], []]
    assert explained[1][2] == "f5 (rarity unknown)"  # a damaged model's NaN: named, not a failed call


def test_threshold_can_be_overridden_per_call(shop_model):
    lines = shop_lines(200, seed=13)
    assert shop_model.score(lines, threshold=0.0).is_anomaly.all()
    assert not shop_model.score(lines, threshold=1.01).is_anomaly.any()


def test_field_maps_and_raw_lines_score_the_same(shop_model):
    lines = shop_lines(30, seed=14)
    field_maps = []
    for line in lines:
        fields, _ = shop_model.featurizer.normalizer.parse(line)
        field_maps.append(fields)
    np.testing.assert_array_equal(shop_model.score(lines).scores, shop_model.score(field_maps).scores)


def test_metadata_describes_the_model(shop_model):
    meta = shop_model.metadata
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["training"]["records_used"] == 4000
    assert [d["kind"] for d in meta["detectors"]] == ["rarity"]
    assert len(shop_model.version) == 12


# --- refusing bad files -------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="missing.onnx: cannot read"):
        Model.load(tmp_path / "missing.onnx")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "flip_byte"])
def test_corrupt_files_are_refused_naming_the_file(shop_model_path, tmp_path, damage):
    data = shop_model_path.read_bytes()
    broken = {
        "truncate": data[: len(data) // 2],
        "garbage": b"\x00\xff" * 100,
        "empty": b"",
        "flip_byte": data[:-200] + bytes([data[-200] ^ 0x55]) + data[-199:],
    }[damage]
    path = tmp_path / f"{damage}.onnx"
    path.write_bytes(broken)
    with pytest.raises(ModelLoadError, match=f"{damage}.onnx: ") as error:
        Model.load(path)
    assert "re-" in str(error.value)  # says what to do


def test_foreign_onnx_model_is_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "foreign.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(ModelLoadError, match="foreign.onnx: an ONNX model, but not a logscore model"):
        Model.load(path)


def rewrite_metadata(source, target, change, rehash=False):
    """``rehash``: store the new content hash too, as a logscore that wrote such metadata would."""
    import onnx

    model = onnx.load(str(source))
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            meta = json.loads(prop.value)
            change(meta)
            prop.value = json.dumps(meta, sort_keys=True)
            metadata_json = prop.value
    onnx.save(model, str(target))
    if rehash:
        graph, _ = _scan_model(Path(target).read_bytes())
        for prop in model.metadata_props:
            if prop.key == HASH_KEY:
                prop.value = content_hash(graph, metadata_json)
        onnx.save(model, str(target))


def test_newer_format_is_refused(shop_model_path, tmp_path):
    path = tmp_path / "newer.onnx"
    rewrite_metadata(shop_model_path, path, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ModelLoadError, match="newer.onnx: made by a newer logscore"):
        Model.load(path)


def test_windows_reading_levels_as_a_newer_logscore_does_are_refused(behaviour_model, tmp_path):
    # Read the older way, its windows would count level=error against trained level=50, silently.
    path = tmp_path / "newer-windows.onnx"
    rewrite_metadata(behaviour_model, path, lambda m: m["windows"].update(levels_read=LEVELS_READ + 1), rehash=True)
    with pytest.raises(ModelLoadError, match="newer-windows.onnx: made by a newer logscore .*upgrade logscore"):
        Model.load(path)


def test_a_logscore_from_before_mac_masking_refuses_the_models_trained_since(behaviour_model, monkeypatch):
    """Models trained since mask MAC addresses in their windows' templates (windows.levels_read 4) and
    their messages' tokens (the tokens and alarms option `macs`): a logscore from before would
    count and score them unmasked, silently; it refuses them, saying why."""
    from logscore.features import Featurizer, load_spec
    from logscore.features.converters import AlarmsConverter, TokensConverter

    assert Model.load(behaviour_model).metadata["windows"]["levels_read"] == LEVELS_READ == 4
    monkeypatch.setattr("logscore.model.LEVELS_READ", 3)  # as a logscore from before reads
    with pytest.raises(ModelLoadError, match="version 4; this logscore reads up to 3.*upgrade logscore"):
        Model.load(behaviour_model)
    syslog = load_spec(None, "syslog")
    assert [c.get("macs") for c in syslog["fields"][1]["converters"]] == [True, True]
    for converter in (TokensConverter, AlarmsConverter):
        monkeypatch.setattr(converter, "options", {k: v for k, v in converter.options.items() if k != "macs"})
    with pytest.raises(ConfigError, match="unknown option.*macs"):
        Featurizer(syslog)


def test_an_option_this_logscore_does_not_know_says_a_newer_one_may_have_made_the_model(shop_model_path, tmp_path):
    # A rolling upgrade: a model a newer logscore trained reaches a sidecar not yet upgraded.
    def add_option(meta):
        meta["featurizer"]["fields"][0]["converters"][0]["an_option_of_later_versions"] = 1

    path = tmp_path / "later.onnx"
    rewrite_metadata(shop_model_path, path, add_option, rehash=True)
    with pytest.raises(ModelLoadError, match="an_option_of_later_versions.*a model made by a newer logscore needs "
                                             "that version here"):
        Model.load(path)


def test_edited_metadata_fails_the_content_hash(shop_model_path, tmp_path):
    path = tmp_path / "edited.onnx"
    rewrite_metadata(shop_model_path, path, lambda m: m["calibration"].update(threshold=0.5))
    with pytest.raises(ModelLoadError, match="edited.onnx: content hash mismatch"):
        Model.load(path)


def test_a_copy_loads_with_the_same_version(shop_model_path, tmp_path):
    copy = tmp_path / "copy.onnx"
    shutil.copy(shop_model_path, copy)
    assert read_artifact(copy).version == read_artifact(shop_model_path).version


def test_explanations_name_each_records_most_contributing_features_in_order():
    """Against the definition, on random batches: per record, the features whose contribution
    (weight x surprise) is not <= 0, most first (ties and NaN in batch order, NaN last), at most top."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    for _ in range(300):
        size, count = int(rng.integers(1, 6)), int(rng.integers(0, 40))
        rows = np.sort(rng.integers(0, size, count))  # record by record, as every featurizer lays keys out
        weights = rng.choice([-1.0, 0.0, 0.5, 1.0, 2.0], count).astype(np.float32)
        surprise = rng.choice([0.0, 0.3, 1.0, np.nan], count).astype(np.float32)
        top = int(rng.integers(1, 5))
        batch = SimpleNamespace(rows=rows, weights=weights, size=size,
                                names=lambda chosen: [f"k{i}" for i in chosen.tolist()])
        model = SimpleNamespace(describe_rarity=lambda s: f"{s:.1f}")
        model._explain_slice = lambda *args: Model._explain_slice(model, *args)
        contribution = weights * surprise
        expected = []
        for row in range(size):
            mine = [i for i in range(count) if rows[i] == row and not contribution[i] <= 0]
            mine.sort(key=lambda i: (bool(np.isnan(contribution[i])), -contribution[i], i))
            expected.append([f"k{i} ({surprise[i]:.1f})" for i in mine[:top]])
        assert Model._explain(model, batch, surprise, top) == expected


def test_feature_names_remembered_for_explanations_are_the_names_worked_out(shop_model_path, monkeypatch):
    from logscore.features import converters

    normal = shop_lines(300, seed=12)
    lines = normal + [line for _, line in attack_lines(normal, 100, seed=13)]
    fresh = Model.load(shop_model_path).score(lines, 5).explanations
    monkeypatch.setattr(converters, "MAX_NAMES", 50)  # remembered names are dropped often
    model = Model.load(shop_model_path)
    assert model.score(lines, 5).explanations == fresh
    assert model.score(lines, 5).explanations == fresh  # now mostly from what was remembered
    assert all(len(c._names) <= 50 for c in model.featurizer.converters)


def test_feature_names_remembered_for_explanations_stay_within_their_bytes(shop_model, monkeypatch):
    """Counted in names only, names of CJK or emoji values took 7 MiB a converter where 2 were meant."""
    from logscore.features import converters

    budget = 64 * 1024
    monkeypatch.setattr(converters, "MAX_NAMES_BYTES", budget)
    fresh = Model.load(shop_model.artifact.path)
    named = [names for names in fresh.score(long_novel_lines(60, seed=14), explain=20).explanations]
    assert sum(len(n) for names in named for n in names) * 4 > budget  # (more than the budget was named)
    for converter in fresh.featurizer.converters:
        held = sum(converters.key_bytes(n) + converters.NAME_ENTRY_BYTES for n in converter._names.values())
        assert held == converter._names_bytes <= budget


def long_novel_lines(count: int, seed: int) -> list[str]:
    """Shop lines whose URLs are long runs of CJK never seen in training (thousands of keys a record)."""
    rng = np.random.default_rng(seed)
    return [line.replace("GET /", "GET /" + "".join(chr(c) for c in rng.integers(0x4E00, 0x5600, 300)) + "/", 1)
            for line in shop_lines(count, seed=seed)]


def test_explaining_a_step_at_a_time_names_what_one_step_names(shop_model, monkeypatch):
    """Explanations are worked out some records at a time (EXPLAIN_SLICE_KEYS keys: sorting and
    naming every key of 512 records of long URLs at once took 130 MB): the same names, in the same
    order, whatever the step, records with no key and records longer than a step included."""
    lines = long_novel_lines(30, seed=3) + shop_lines(40, seed=4) + ["", "x"] + long_novel_lines(5, seed=5)
    shipped = model_module.EXPLAIN_SLICE_KEYS
    monkeypatch.setattr(model_module, "EXPLAIN_SLICE_KEYS", 10**12)  # one step (the batch holds more than shipped)
    whole = shop_model.score(lines, explain=7).explanations
    for step in (1, 50, 4_000, shipped):
        monkeypatch.setattr(model_module, "EXPLAIN_SLICE_KEYS", step)
        assert shop_model.score(lines, explain=7).explanations == whole
        flagged = shop_model.score(lines, explain_flagged=7)
        assert [list(e) for e in flagged.explanations] == [e if f else [] for e, f in zip(whole, flagged.is_anomaly)]
    long = [named for named, line in zip(whole, lines) if len(line) > 300]
    assert len(long) > 20 and all(long)  # (the long records named: else this compared empty lists)


@pytest.mark.parametrize("rows", [[], [0], [0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 2, 3, 3], [2, 2, 5, 5, 5, 9] * 1,
                                  sorted(np.random.default_rng(1).integers(0, 40, 300).tolist())])
@pytest.mark.parametrize("most", [1, 2, 3, 7, 1000])
def test_record_slices_cover_the_keys_in_whole_records_of_at_most_the_step(rows, most):
    rows = np.array(rows, dtype=np.int64)
    slices = list(record_slices(rows, most))
    assert [start for start, _ in slices] == [0, *(stop for _, stop in slices)][:len(slices)]
    assert (slices[-1][1] if slices else 0) == rows.size
    for start, stop in slices:
        assert stop > start
        assert start == 0 or rows[start] != rows[start - 1]  # whole records
        assert stop == rows.size or rows[stop] != rows[stop - 1]
        assert stop - start <= most or len(set(rows[start:stop].tolist())) == 1  # or one record alone


@pytest.mark.parametrize("log_format", ["access", "syslog"])
def test_keys_named_before_the_batch_resolves_are_traced_to_the_values_it_traces_them_to(log_format):
    """The compiled featurizer traces only the keys named to their values (resolving every key of
    the batch took 61 MB for 512 records of long URLs): the same values and names as resolving all."""
    if log_format == "access":
        lines = shop_lines(150, seed=6) + [line for _, line in attack_lines(shop_lines(50, seed=7), 50)]
        records = lines + long_novel_lines(10, seed=8) + ["", "not an access line"]
        records += [{"message": line, "host": "web-1"} for line in lines[:30]] + [{"host": "no message"}]
    else:
        records = syslog_lines(300) + [""]
    featurizer = Featurizer(DEFAULT_SPECS[log_format], native=True)
    if featurizer.native is None:
        pytest.skip("the compiled featurizer is not built")
    featurizer.fit(records[:100])
    indices = np.random.default_rng(9).permutation(featurizer.transform(records).keys.size)[:3000]
    traced = featurizer.transform(records).origins
    names = traced.names(indices)
    assert traced._origins is None  # (nothing resolved: else this compares the batch with itself)
    resolved = featurizer.transform(records).origins.resolve()
    assert names == resolved.names(indices)
    entry_of_key, position = featurizer.transform(records).origins._sink.key_layout().origins_of(indices)
    assert entry_of_key.tolist() == resolved.entry_of_key[indices].tolist()
    assert position.tolist() == resolved.position[indices].tolist()
