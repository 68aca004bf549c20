import itertools
import random

import numpy as np
import pytest

from logscore.errors import ConfigError
from logscore.features import DEFAULT_SPECS, Featurizer
from logscore.features.converters import (NgramConverter, UrlConverter, ValueCache, mask_variables, percent_decode,
                                         value_shape)

from .generate import shop_lines, syslog_lines


def keys_by_row(batch):
    return [set(batch.keys[batch.rows == row].tolist()) for row in range(batch.size)]


def names_of_row(batch, row):
    return {batch.name(i) for i in np.nonzero(batch.rows == row)[0]}


def test_same_record_gives_same_features_alone_or_in_any_batch():
    lines = shop_lines(50, seed=3)
    featurizer = Featurizer(DEFAULT_SPECS["access"])
    together = featurizer.transform(lines)
    alone = [featurizer.transform([line]) for line in lines]
    assert keys_by_row(together) == [keys_by_row(b)[0] for b in alone]
    np.testing.assert_allclose(together.dense, np.vstack([b.dense for b in alone]), rtol=1e-6)


def test_keys_are_unique_per_record_and_converter():
    batch = Featurizer({"format": "plain", "fields": [
        {"field": "message", "converters": [{"kind": "ngrams", "n": [2, 2]}]}]}).transform(["abababab"])
    assert len(batch.keys) == len(set(batch.keys.tolist())) == 4  # ^a ab ba b$
    assert names_of_row(batch, 0) == {"message 2-gram '^a'", "message 2-gram 'ab'", "message 2-gram 'ba'",
                                      "message 2-gram 'b$'"}


def test_term_weighting_counts_repeats():
    spec = {"format": "plain", "fields": [{"field": "message", "converters": [
        {"kind": "ngrams", "n": [2, 2], "weighting": "tf"}]}]}
    batch = Featurizer(spec).transform(["abababab"])
    weights = {batch.name(i): float(batch.weights[i]) for i in range(len(batch.keys))}
    assert weights == {"message 2-gram '^a'": 1, "message 2-gram 'ab'": 4, "message 2-gram 'ba'": 3,
                       "message 2-gram 'b$'": 1}


def test_url_structure_features():
    converter = UrlConverter("url", enumerated=["/cart/add?qty"])
    features = set(converter.features("/cart/add?item=42&qty=3&x=%2527%20OR%201%3D1"))
    assert "path /cart/add" in features
    assert "parameters /cart/add?item&qty&x" in features
    assert "shape /cart/add?item=9" in features
    assert "value /cart/add?qty=3" in features  # qty is an enumeration
    assert not any(f.startswith("value /cart/add?item") for f in features)
    assert "shape x=' a 9=9" in features  # decoded twice
    assert {"character x='", "character x==", "character x= "} <= features
    assert "value encoded more than once: x" in features
    assert "path /products/{id}/reviews" in set(converter.features("/products/981/reviews"))
    long_value = set(converter.features("/p?address=Calle+Mayor+12%2C+4%C2%BA+B%2C+Madrid+28001"))
    assert not any(f.startswith("shape address") for f in long_value)  # too specific to recur
    assert "character address=," in long_value


def test_url_converter_learns_enumerations():
    converter = UrlConverter("url")
    converter.fit([f"/p?sort={s}&id={i}" for i, s in enumerate(["new", "top"] * 50)])
    assert converter.learned() == {"enumerated": ["/p?sort"]}


def test_helpers():
    assert value_shape("abc123-XY") == "a9-a"
    assert percent_decode("%2527", 3) == ("'", 2)
    assert percent_decode("%2527", 1) == ("%27", 1)
    assert mask_variables("conn from 10.1.2.3:22 id 0xdeadbeef took 1.5s") == "conn from <ip> id <hex> took <num>s"


def test_value_shape_collapses_every_run_of_a_character():
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("aA9z0'  //--<\n%") for _ in range(rng.randint(0, 30)))
        classes = text.translate(str.maketrans({**{c: "a" for c in "aAz"}, **{c: "9" for c in "90"}}))
        assert value_shape(text) == "".join(k for k, _ in itertools.groupby(classes))[:48]


class Entry(int):
    nbytes = 100


def test_value_cache_is_bounded_and_keeps_values_in_use():
    cache = ValueCache(size=4)
    cache.put("hot", Entry(1))
    for i in range(100):
        cache.put(f"cold{i}", Entry(i))
        assert cache.get("hot") == 1  # in steady use: moved to the newer generation each time
        assert len(cache) <= 4
    assert cache.get("cold0") is None  # long gone
    assert cache.get("cold99") == 99


def test_value_cache_is_bounded_in_bytes():
    cache = ValueCache(size=1000, max_bytes=2000)
    for i in range(100):
        cache.put(f"v{i}", Entry(i))  # ≈ 150 bytes each with its key
        assert cache.nbytes <= 2000 + 200
    assert len(cache) < 20 and cache.get("v99") == 99


def test_urls_of_one_structure_share_features_and_names():
    converter = UrlConverter("url")
    first, second, longer, other = converter.featurize(
        ["/products/108?page=2", "/products/9?page=7", "/products/9?page=12", "/cart?page=2"])
    assert first is second  # differ only where no feature looks: featurized once
    assert longer is not first and other is not first  # a longer page number; another path
    assert set(converter.features("/products/9?page=7")) == {first.describe(i).split(": ", 1)[1]
                                                             for i in range(len(first.keys))}
    shapes = NgramConverter("url", n=[2, 3], shape=True)
    a, b, c = shapes.featurize(["/blog/a1", "/news/bb22", "/x/1"])
    assert a is b and c is not a  # the same shape (/a/a9): the same n-grams


def test_missing_fields_are_features_not_errors():
    batch = Featurizer(DEFAULT_SPECS["access"]).transform([{"url": "/only-a-url"}])
    names = names_of_row(batch, 0)
    assert "method categorical: (missing)" in names and "user_agent tokens: (missing)" in names


@pytest.mark.parametrize("log_format", sorted(DEFAULT_SPECS))
def test_bad_input_never_raises(log_format):
    records = ["", "\x00\x01\x02", b"\xff\xfe\xfa invalid utf-8", "x" * 1_000_000, "\u202e\ud800 lone surrogate",
               {"url": None, "method": 5, "status": ["a"]}, {"nested": {"deep": {"x": 1}}}, 12345]
    featurizer = Featurizer(DEFAULT_SPECS[log_format])
    batch = featurizer.transform(records)
    assert batch.dense.shape == (len(records), featurizer.width)
    assert np.isfinite(batch.dense).all()
    for i in range(len(batch.keys)):
        assert isinstance(batch.name(i), str)


def test_oversized_field_is_truncated_and_flagged():
    featurizer = Featurizer({**DEFAULT_SPECS["plain"], "max_field_chars": 100})
    batch = featurizer.transform(["short", "y" * 101])
    assert batch.truncated.tolist() == [False, True]


def test_syslog_features_mask_variables():
    batch = Featurizer(DEFAULT_SPECS["syslog"]).transform(syslog_lines(1, seed=5))
    names = names_of_row(batch, 0)
    templates = [n for n in names if n.startswith("message tokens: template ")]
    assert len(templates) == 1 and ("<ip>" in templates[0] or "<num>" in templates[0])


@pytest.mark.parametrize("spec, message", [
    ({"fields": [{"field": "x", "converters": [{"kind": "nope"}]}]}, "unknown converter kind 'nope'"),
    ({"fields": [{"field": "x", "converters": [{"kind": "ngrams", "n": [4, 2]}]}]}, "n must be"),
    ({"fields": [{"field": "x", "converters": [{"kind": "tokens", "colour": 1}]}]}, "unknown option"),
    ({"fields": [{"field": "x", "converters": [{"kind": "tokens", "weighting": "idf"}]}]}, "weighting"),
    ({"fields": []}, "no converters"),
])
def test_bad_converter_config_is_a_clear_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        Featurizer(spec)


def test_spec_round_trips_with_learned_state():
    featurizer = Featurizer(DEFAULT_SPECS["access"])
    lines = shop_lines(500, seed=1)
    featurizer.fit(lines)
    again = Featurizer(featurizer.spec())
    assert again.spec() == featurizer.spec()
    assert keys_by_row(again.transform(lines[:20])) == keys_by_row(featurizer.transform(lines[:20]))


def test_sequence_features_keep_order_and_ends():
    from logscore.features.converters import SequenceConverter

    features = list(SequenceConverter("events", n=[1, 2]).features("22 5 5 11"))
    assert features == ["1-gram 22", "1-gram 5", "1-gram 5", "1-gram 11", "2-gram 22 5", "2-gram 5 5",
                        "2-gram 5 11", "first 22", "last 11", "length 3"]
    templates = SequenceConverter("events", n=[2, 2], separator="\n").features("Receiving block <*>\nDeleting <*>")
    assert "2-gram Receiving block <*> Deleting <*>" in list(templates)


def test_sequence_counts_reach_the_weights():
    spec = {"format": "jsonl", "fields": [{"field": "events", "converters": [
        {"kind": "sequence", "n": [1, 1], "weighting": "tf"}]}]}
    batch = Featurizer(spec).transform([{"events": "a b a a"}])
    weights = {batch.name(i): float(batch.weights[i]) for i in range(len(batch.keys))}
    assert weights["events sequence: 1-gram a"] == 3 and weights["events sequence: 1-gram b"] == 1


def test_the_alarms_word_list_is_the_model_s_own():
    """SIGSEGV and deny were no words of failure (a launchd crash, the macOS sandbox's refusals went
    unflagged in a Mac log: syslog trial). Models trained since read word list 2; those trained
    before keep list 1, else a normal "deny" line of theirs would hold never-seen alarms."""
    from logscore.features.converters import AlarmsConverter

    text = "Service exited due to SIGSEGV; QQ(10018) deny file-read-data, access denied"
    assert DEFAULT_SPECS["syslog"]["fields"][1]["converters"][1]["words"] == 2
    assert list(AlarmsConverter("message", words=2).features(text)) == [
        "alarm word SIGSEGV", "alarm sigsegv", "alarm word deny", "alarm deny", "alarm word denied", "alarm denied"]
    assert list(AlarmsConverter("message").features(text)) == ["alarm word denied", "alarm denied"]
    with pytest.raises(ConfigError, match="no word list 3; this logscore knows 1, 2"):
        AlarmsConverter("message", words=3)
