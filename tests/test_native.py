"""The compiled featurizer gives bit for bit the features of the Python reference.

Random inputs (hypothesis, built from the fragments that matter: percent escapes, separators,
digits, hex, non-ASCII, surrogates, quotes) go through every converter and the access-line
fast path, both ways; real inputs (the generators' access, attack and syslog lines) go
through the default specs and the shipped model, scores included.
"""

import gc
import json
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from logscore.errors import ConfigError
from logscore.features import DEFAULT_SPECS, Featurizer
from logscore.features import native
from logscore.features.batch import ValueFeatures, text_key, text_seed
from logscore.features.converters import CACHE_BYTES, ValueCache, key_bytes
from logscore.model import Model

from .generate import attack_lines, blog_lines, session_lines, shop_lines, syslog_lines

# Skipped on a developer's machine without the extension; in CI (CI=true, after scripts/setup.sh
# installed gcc and python3-dev) a missing extension fails these tests instead.
pytestmark = pytest.mark.skipif(not native.built() and os.environ.get("CI") != "true",
                                reason="the compiled featurizer is not built (pip install -e . with gcc "
                                "and Python's headers; scripts/setup.sh)")

FRAGMENTS = ["/", "?", "&", ";", "=", "+", "%", "%2", "%25", "%2527", "%20", "%3D", "%26", "%C3%A9", "%E2%82",
             "%c3", "%zz", "%%", "%F1", "://", "http://h:8080", "..", "-", ".", "_", "a", "Z", "id", "sort",
             "abc", "0", "42", "123456789", "deadbeef12", "0x1f", "1.5", "-3", "1e400", "nan", "inf", " ",
             "  ", "\t", "\n", '"', "\\", "'", "<", ">", "[", "]", "é", "ß", "İ", "٣", "日本", "\ud800", "\x1f",
             "\x00", "a" * 30, "9" * 20, "<ip>", "10.0.0.1", "0a1b2c3d-0000-4000-8000-00aabbccddee"]
texts = st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join)
values = st.one_of(st.none(), texts)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CONVERTER_SPECS = [
    {"kind": "url"},
    {"kind": "url", "part": "query", "decode_rounds": 1},
    {"kind": "url", "enumerated": ["/a?sort", "?id", "/{id}?x"], "weight": 0.3, "weighting": "tf"},
    {"kind": "ngrams", "n": [2, 4], "decode": True, "shape": True},
    {"kind": "ngrams", "n": [3, 3], "decode": True, "weight": 0.2},
    {"kind": "ngrams", "n": [1, 2], "lowercase": True, "max_bytes": 7, "weighting": "log_tf"},
    {"kind": "ngrams", "n": [5, 8], "weighting": "tf"},
    {"kind": "ngrams", "n": [1, 8], "max_bytes": 65_536},  # long values: sorted by radix passes
    {"kind": "tokens"},
    {"kind": "tokens", "template": False, "lowercase": True, "weighting": "log_tf", "weight": 0.5},
    {"kind": "alarms", "weight": 8.0},
    {"kind": "categorical"},
    {"kind": "categorical", "transform": "status_class"},
    {"kind": "numeric", "weight": 0.25},
    {"kind": "sequence", "n": [1, 2], "separator": "/", "weighting": "log_tf"},
]


# Every boundary the compiled code decides on, once each (random inputs rarely hit them exactly).
EDGE_VALUES = [
    None, "", "/p?x=a1a1a1a1a1a1", "/p?x=a1a1a1a1a1a1a", "/p?x=a1a1a1a1a1a1a1", "/٣٣/x", "/12/ab", "/deadbeef/x",
    "/0a1b2c3d-0000-4000-8000-00aabbccddee/y", "/0a1b2c3d-0000-4000-8000-00aabbccddeg/y", "/DEADBEEF1",
    "/abcdef1", "/ABCDEF12/", "http://host:80/a/b?c=d", "https://x.example.com", "abcdefghi://x/y?q=1",
    "abcdefghij://x/y", "/r?u=http://a/b", "%C3%A9%", "%E2%82%AC", "%E2%82", "%F0%9F%98%80", "%ED%A0%80",
    "%FF", "é%C3%A9", "%C3é%A9", "+%2B+", "%252B", "/%25252527?a=%25252527", "/a?x=%2527%2527", "%%41",
    "%4%41", "x=1&&y=2;z", "?=v", "/?a=b=c", "/?noeq", "/?&", "/?;;", "/p?a=" + "x" * 70, "/p?" + "n" * 70 + "=1",
    "/p?%6E" * 3 + "=1", "/a/a/b/a/", "//", "/?a=1&a=2&b", "-0", "-0.0", "0.5", "1", "2", "1e308", "1e309",
    "  12  ", "1_000", "١٢", "0x10", "-5", "nan", "-inf", "conn from 10.1.2.3:22 id 0xdeadbeef took 1.5s",
    "open /var/log/x.log", "ÀÉ İstanbul ß", "ABC", "\ud800x\udfff", "a\x00b",
    "aaaa9999----", "éééa", "\t\n x", "x" * 40,
    "java.lang.OutOfMemoryError: Java heap space", "segfault at 10 ip 0x7f3a error 4", "DEBUG errno=2 kill -9 FAILED",
    "".join(chr(33 + i * 7919 % 90) for i in range(3000))]  # over 4,096 n-grams of 1 to 8 bytes


@pytest.mark.parametrize("converter", CONVERTER_SPECS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_every_converter_gives_the_same_features_at_the_edges(converter):
    spec = {"format": "jsonl", "fields": [{"field": "f", "converters": [converter]}]}
    records = [{"f": v} if v is not None else {} for v in EDGE_VALUES]
    assert_same_features(spec, records, fit=records)
    assert_same_features(spec, records[7:9])  # a small batch: other window widths


EDGE_LINES = [
    'host\x1c - - [x] "GET / HTTP/1.1" 200 1', '1.2.3.4 - - [x] "GET / HTTP/1.1" 200 1 "a\\\n" "b"',
    '1.2.3.4 - - [x] "GET / HTTP/1.1" 200 - "-" "-"', '1.2.3.4 - bob [x] "GET /a HTTP/1.1" 404 12 "a\\"b" "c"',
    '1.2.3.4 - - [x] "GET / HTTP/1.1" 200 12 "r" "a" trailing', '1.2.3.4 - - [x] "get / HTTP/1.1" 200 1',
    '1.2.3.4 - - [x] "GET /a b HTTP/1.1" 200 1', '1.2.3.4 - - [x] "GET / HTTP/1.1" 2000 1',
    '1.2.3.4 - - [x] "GET /\\x HTTP/1.1" 200 1', '1.2.3.4 - - [x] "GET / HTTP/1.1" 200 1 "r" "a\\',
    '1.2.3.4 - - [x] "GET / HTTP/1.1" 200 1 "r"  "a"', '1.2.3.4 - - [x] "GET / HTTP/1.1"  200 1',
    '1.2.3.4\t- - [x] "GET / HTTP/1.1" 200 1', '1.2.3.4 - - [x] "GET / HTTP/1.1" 200 12a "r" "a"',
    '1.2.3.4 - - [] "GET /é HTTP/1.1" 200 1', '1.2.3.4 - - [x] "GET / HTTP/1.1" 200 1 "r\x85" "a"',
    "", "-", '"', '1.2.3.4 - - [x] "GET / HTTP/1.1" 200', '1.2.3.4 - - [x] "GET / HTTP/1.1" 200 1 "a\\\\" "b"',
    # Apache's vhost_combined ("%v:%p " first), and first tokens that end in ":digits" without being one
    'www.example.com:443 1.2.3.4 - - [x] "GET / HTTP/1.1" 200 1 "r" "a"', '::1 - - [x] "GET / HTTP/1.1" 200 1',
    'a:1 ::1 - - [x] "GET / HTTP/1.1" 200 1', ':1 1.2.3.4 - - [x] "GET / HTTP/1.1" 200 1',
    'a:1 - - [x] "GET / HTTP/1.1" 200 1',
    '::1 - bob x [x] "GET / HTTP/1.1" 200 1', 'h:1: 1.2.3.4 - - [x] "GET / HTTP/1.1" 200 1', 'h:80 - - [x] "-" 408 -',
]


def test_access_lines_at_the_edges_parse_the_same():
    compiled, reference = both(DEFAULT_SPECS["access"])
    wide = [*compiled.fields, "remote_addr", "user", "time", "request", "protocol", "referer", "vhost"]
    compiled.fields = reference.fields = wide
    assert compiled.field_values(EDGE_LINES) == reference.field_values(EDGE_LINES)


def test_vhost_combined_lines_are_read_by_the_compiled_parser_itself():
    """Apache's vhost_combined lines went to the Python parser one by one (a call back per line):
    7.9 µs of CPU a line where a combined line took 1.6."""
    lines = ['www.example.com:443 1.2.3.4 - - [17/May/2015:10:05:03 +0000] "GET /a HTTP/1.1" 200 1 "-" "curl/8"',
             'h:80 2001:db8::1 - bob [17/May/2015:10:05:03 +0000] "POST /b?c=d HTTP/2.0" 404 - "r" "a"']
    called_back = []
    columns, parsed, _ = native._native.access_columns(
        lines, ("vhost", "remote_addr", "url", "user_agent"), True, 100, 1000,
        lambda record: called_back.append(record) or ({}, False, False), str)
    assert not called_back and parsed == [True, True]
    assert columns == [["www.example.com:443", "h:80"], ["1.2.3.4", "2001:db8::1"], ["/a", "/b?c=d"], ["curl/8", "a"]]


def test_repeated_and_look_alike_field_values_are_read_as_they_are():
    """The compiled parser hands a column's repeated value the str it made for it before; values of one
    length with the same first, middle and last characters (one memo slot) must each stay themselves."""
    agents = ["Mozilla/5.0 (A) X", "Mozilla/5.0 (B) X", "Mozilla/5.0 (A) X", "Mozilla/5.0 (C) X", "Mozilla/5.0 (B) X"]
    methods, statuses = ["GET", "PUT", "GET"] * 5, ["200", "201"] * 8
    lines = [f'1.2.3.4 - - [x] "{method} /{i % 2} HTTP/1.1" {status} {i % 3} "r" "{agent}"'
             for i, (agent, method, status) in enumerate(zip(agents * 3, methods, statuses))]
    compiled, reference = both(DEFAULT_SPECS["access"])
    wide = [*compiled.fields, "request", "referer"]
    compiled.fields = reference.fields = wide
    assert compiled.field_values(lines) == reference.field_values(lines)
    columns, parsed, _ = native._native.access_columns(lines, ("user_agent", "method"), True, 100, 1000, None, str)
    assert all(parsed) and columns == [agents * 3, methods]
    assert columns[1][0] is columns[1][2]  # made once, so hashed once


def both(spec: dict) -> tuple[Featurizer, Featurizer]:
    return Featurizer(spec, native=True), Featurizer(spec, native=False)


def assert_same_batches(compiled, reference) -> None:
    for name in ("rows", "keys", "weights", "dense", "truncated", "unparsed"):
        a, b = getattr(compiled, name), getattr(reference, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), name  # bit for bit (NaN-safe, -0.0-safe)


def assert_same_features(spec: dict, records: list, fit: list | None = None) -> None:
    compiled, reference = both(spec)
    if fit is not None:
        compiled.fit(fit)
        reference.fit(fit)
    # Three times: the compiled caches store a value the second time it is computed (their
    # doorkeeper), so the third pass is served from them.
    for _ in range(3):
        one, two = compiled.transform(records), reference.transform(records)
        assert_same_batches(one, two)
    for index in range(0, len(one.keys), max(1, len(one.keys) // 7)):
        assert one.name(index) == two.name(index)


@pytest.mark.parametrize("converter", CONVERTER_SPECS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@SETTINGS
@given(column=st.lists(values, min_size=1, max_size=25))
def test_every_converter_gives_the_same_features(converter, column):
    spec = {"format": "jsonl", "fields": [{"field": "f", "converters": [converter]}]}
    records = [{"f": v} if v is not None else {} for v in column]
    assert_same_features(spec, records, fit=records)


@SETTINGS
@given(column=st.lists(texts, min_size=1, max_size=10), limit=st.integers(1, 40))
def test_truncation_and_non_text_values_are_the_same(column, limit):
    spec = {"format": "jsonl", "max_field_chars": limit, "fields": [
        {"field": "f", "converters": [{"kind": "ngrams", "n": [1, 2]}]},
        {"field": "g", "converters": [{"kind": "categorical"}]}]}
    records = [{"f": v, "g": [i, v] if i % 3 else i} for i, v in enumerate(column)]
    assert_same_features(spec, records)


LINE_PARTS = st.fixed_dictionaries({
    "addr": st.sampled_from(["1.2.3.4", "::1", "-", "", "a b", "host\x1c", "www.x:80 1.2.3.4", "h:8 ::1", "a:1 b c"]),
    "user": st.sampled_from(["-", "bob", "", "x y"]),
    "time": st.sampled_from(["17/May/2015:10:05:03 +0000", "", "x]y", "["]),
    "method": st.sampled_from(["GET", "POST", "get", "", "G3T", "PROPFIND"]),
    "url": texts,
    "protocol": st.sampled_from(["HTTP/1.1", "HTTP/2", "HTTP/", "HTTP/1.1x", "http/1.0", ""]),
    "status": st.sampled_from(["200", "404", "-", "2000", "20", "٢٠٠"]),
    "bytes": st.sampled_from(["1234", "-", "", "12a", "0"]),
    "tail": st.sampled_from(["", ' "-" "Mozilla/5.0"', ' "http://x/" "a \\" b"', ' "r" "unterminated',
                             ' "r\\\n" "a"', ' "r""a"', ' "" ""', " trailing", ' "a\\\\" "b\\"c"']),
})


def access_line(p: dict) -> str:
    return (f'{p["addr"]} - {p["user"]} [{p["time"]}] "{p["method"]} {p["url"]} {p["protocol"]}" '
            f'{p["status"]} {p["bytes"]}{p["tail"]}')


@SETTINGS
@given(lines=st.lists(LINE_PARTS.map(access_line) | texts, min_size=1, max_size=20))
def test_access_lines_parse_the_same(lines):
    spec = DEFAULT_SPECS["access"]
    compiled, reference = both(spec)
    wide = [*compiled.fields, "remote_addr", "user", "time", "request", "protocol", "referer", "vhost"]
    compiled.fields = reference.fields = wide  # every field the fast path extracts
    assert compiled.field_values(lines) == reference.field_values(lines)
    assert_same_features(spec, lines)


# Field maps as shippers send them: the line under message or log (Fluentd's and Fluent Bit's
# tail), beside fields of the shipper's own, some of which name a wanted field or its alias,
# some nested (Fluent Bit's kubernetes metadata, ECS's url.original).
LINE_VALUES = st.one_of(LINE_PARTS.map(access_line), texts, st.none(), st.just(7), st.just({"nested": "map"}),
                        LINE_PARTS.map(lambda p: access_line(p).encode("utf-8", "surrogatepass")),
                        st.just(b'1.2.3.4 - - [x] "GET /caf\xe9 HTTP/1.1" 200 1'))
OTHER_FIELDS = st.dictionaries(st.sampled_from(["host", "kubernetes", "url", "path", "url.original", "http",
                                                "http.request", "status", "agent", "stream", "time"]),
                               st.one_of(texts, st.just({"original": "/from/ecs?a=1"}), st.just({"method": "PUT"}),
                                         st.just({"request": {"method": "PUT"}}), st.just({"pod": "web-1"})),
                               max_size=3)
SHIPPED_RECORDS = st.builds(lambda key, line, other, both: {**other, key: line, **({"log": both} if both else {})},
                            st.sampled_from(["message", "log"]), LINE_VALUES, OTHER_FIELDS,
                            st.one_of(st.none(), LINE_PARTS.map(access_line)))


@SETTINGS
@given(records=st.lists(SHIPPED_RECORDS, min_size=1, max_size=15), max_line=st.sampled_from([20, 65_536]))
def test_field_maps_holding_lines_give_the_features_of_the_python_path(records, max_line):
    spec = DEFAULT_SPECS["access"]
    compiled, reference = Featurizer(spec, max_line, native=True), Featurizer(spec, max_line, native=False)
    assert compiled.field_values(records) == reference.field_values(records)
    for _ in range(2):
        assert_same_batches(compiled.transform(records), reference.transform(records))


def test_a_field_map_whose_line_does_not_parse_keeps_its_own_message():
    """An unparsed line alone gives {"message": line}; a map holding it under log gives its own fields."""
    spec = {"format": "access", "fields": [{"field": "message", "converters": [{"kind": "categorical"}]},
                                           {"field": "url", "converters": [{"kind": "categorical"}]}]}
    compiled, reference = both(spec)
    records = [{"log": "not an access line"}, "not an access line", {"log": '1.2.3.4 - - [x] "GET /a HTTP/1.1" 200 1'}]
    assert compiled.field_values(records) == reference.field_values(records)
    assert compiled.field_values(records)[0]["message"] == [None, "not an access line", None]


def real_lines(log_format: str, count: int, seed: int) -> list[str]:
    """The generators' lines of a format (access: the shop's, attacks on it and a blog's)."""
    def access() -> list[str]:
        shop = shop_lines(count, seed=seed)
        return shop + [line for _, line in attack_lines(shop, count // 5)] + blog_lines(count // 5)

    return {"access": access, "syslog": lambda: syslog_lines(count * 2 // 3),
            "plain": lambda: session_lines(count // 7)[0],
            "jsonl": lambda: [f'{{"level": "{("info", "warn", "error")[i % 3]}", "message": "{line}", "pri": {i % 24}}}'
                              for i, line in enumerate(syslog_lines(count // 3))]}[log_format]()


@pytest.mark.parametrize("log_format", ["access", "syslog", "jsonl", "plain"])
def test_real_lines_give_the_same_features(log_format):
    lines = real_lines(log_format, 1500, seed=5)
    assert_same_features(DEFAULT_SPECS[log_format], lines, fit=lines[:500])


def test_the_shipped_model_scores_the_same():
    lines = shop_lines(800, seed=8) + [line for _, line in attack_lines(shop_lines(200), 200)]
    compiled = Model.load("models/apache-access.onnx")
    reference = Model.load("models/apache-access.onnx")
    reference.featurizer = Featurizer(reference.metadata["featurizer"], native=False)
    assert compiled.featurizer.native is not None
    for batch in (lines, lines[:1]):
        one, two = compiled.score(batch, explain=3), reference.score(batch, explain=3)
        assert one.scores.tobytes() == two.scores.tobytes()
        assert one.explanations == two.explanations


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "sparse"])
def test_a_record_alone_gets_the_features_it_gets_in_a_batch(compiled, dense):
    # One record takes shortcuts (no search for distinct values; in Python, no expansion): the
    # features must still be those of the same record in a batch, in the same order.
    lines = shop_lines(40, seed=9) + [line for _, line in attack_lines(shop_lines(20), 20)]
    featurizer = Featurizer(DEFAULT_SPECS["access"], native=compiled)
    featurizer.fit(lines)
    batch = featurizer.transform(lines, dense=dense)
    for row, line in enumerate(lines):
        alone, mine = featurizer.transform([line], dense=dense), np.flatnonzero(batch.rows == row)
        assert alone.rows.tolist() == [0] * len(mine)
        assert alone.keys.tolist() == batch.keys[mine].tolist()
        assert alone.weights.tobytes() == batch.weights[mine].tobytes()
        assert alone.dense.tobytes() == batch.dense[row:row + 1].tobytes()
        assert [alone.name(i) for i in range(len(mine))] == [batch.name(int(i)) for i in mine]


@SETTINGS
@given(operations=st.lists(st.tuples(st.booleans(), st.integers(0, 30), st.integers(0, 300)), max_size=200))
def test_compiled_cache_keeps_what_the_python_cache_keeps(operations):
    featurizer = Featurizer({"format": "plain", "fields": [{"field": "message", "converters": [
        {"kind": "categorical"}]}]}, native=True)
    converter = featurizer.converters[0]
    entries = {size: converter.featurize(["x" * size])[0] for size in {s for _, _, s in operations}}
    compiled, reference = native._native.Cache(8, 6000), ValueCache(8, 6000)
    for is_put, key, size in operations:
        if is_put:
            compiled.put(str(key), entries[size])
            reference.put(str(key), entries[size])
        else:
            assert (compiled.get(str(key)) is None) == (reference.get(str(key)) is None)
    assert len(compiled) == len(reference) and compiled.nbytes <= 6000 + 400


# Keys as the featurizer makes them: strs (ASCII or not; equal ones that are other objects), the
# bytes of URL structures and encodings (equal in text to a str, yet another key), None.
CACHE_KEYS = st.one_of(st.integers(0, 400).map(str), st.integers(0, 400).map(lambda i: "".join(["k", str(i)])),
                       st.integers(0, 60).map(lambda i: f"é{i}"), st.integers(0, 60).map(lambda i: str(i).encode()),
                       st.none())


@SETTINGS
@given(operations=st.lists(st.tuples(st.booleans(), CACHE_KEYS), max_size=400), half=st.sampled_from([2, 16, 300]))
def test_the_compiled_cache_finds_each_key_as_a_dict_does(operations, half):
    """The compiled cache's own tables (grown from 8 slots to hundreds) hold what the Python
    cache's dicts hold: the same entry object for each key, the same count and bytes."""
    compiled, reference = native._native.Cache(2 * half, 1 << 30), ValueCache(2 * half, 1 << 30)
    entries = entries_of(3)
    for step, (is_put, key) in enumerate(operations):
        if is_put:
            compiled.put(key, entries[step % 3])
            reference.put(key, entries[step % 3])
        else:
            assert compiled.get(key) is reference.get(key)
        assert len(compiled) == len(reference) and compiled.nbytes == reference.nbytes
    for _, key in operations:
        assert compiled.get(key) is reference.get(key)


def test_the_compiled_cache_tells_a_str_from_its_bytes():
    """hash("1") == hash(b"1"): the two share a probe sequence, yet are two keys, as in a dict."""
    cache, entries = native._native.Cache(64, 1 << 30), entries_of(2)
    cache.put("1", entries[0])
    cache.put(b"1", entries[1])
    assert cache.get("1") is entries[0] and cache.get(b"1") is entries[1] and len(cache) == 2


@SETTINGS
@given(calls=st.lists(st.sets(st.integers(0, 40), max_size=12), max_size=30))
def test_compiled_lookup_of_distinct_keys_matches_the_python_one(calls):
    """Each call's keys are distinct (a field's distinct values): both caches compute exactly the
    keys they miss, in order, return every key's entry and keep the same keys."""
    entries = {key: ValueFeatures(np.array([key], dtype=np.int64), np.ones(1, dtype=np.float32), None, str(key))
               for key in range(41)}
    caches = {"compiled": native._native.Cache(8, 100_000), "python": ValueCache(8, 100_000)}
    asked: dict[str, list] = {name: [] for name in caches}
    for keys in calls:
        keys = [str(k) for k in sorted(keys)]
        for name, cache in caches.items():
            def compute(missing, name=name):
                asked[name].append(list(missing))
                return [entries[int(k)] for k in missing]
            found = cache.lookup_distinct(keys, compute)
            assert len(found) == len(keys) and all(entry is entries[int(k)] for entry, k in zip(found, keys))
        assert asked["compiled"] == asked["python"]
        assert all(key in {k for batch in asked["python"] for k in batch} for key in keys)
    compiled, python = caches["compiled"], caches["python"]
    assert all(compiled.get(str(k)) is python.get(str(k)) for k in range(41))


class DoorkeeperModel:
    """What the compiled cache with a doorkeeper should do, in Python: a ValueCache (the tested twin of
    its generations) that, once it has turned over (an older generation holds entries), stores a
    computed key only when the key's bit, picked by the top bits of hash(key) times 2^64/phi, was set
    by an earlier offer; the bits are cleared once an eighth are set."""

    def __init__(self, entries: int, max_bytes: int):
        self.cache = ValueCache(entries, max_bytes)
        self.shift = 9
        while 1 << self.shift < max(entries // 2, 1) * 2 * 8:
            self.shift += 1
        self.bits: set[int] = set()

    def seen_before(self, key) -> bool:
        if not self.cache._old:
            return True
        bit = ((hash(key) % (1 << 64)) * 0x9E3779B97F4A7C15 % (1 << 64)) >> (64 - self.shift)
        if bit in self.bits:
            return True
        if len(self.bits) >= (1 << self.shift) // 8:
            self.bits.clear()
        self.bits.add(bit)
        return False

    def lookup_distinct(self, keys, compute):
        found = [self.cache.get(key) for key in keys]
        missing = [i for i, entry in enumerate(found) if entry is None]
        for i, entry in zip(missing, compute([keys[i] for i in missing]) if missing else []):
            found[i] = entry
            if self.seen_before(keys[i]):
                self.cache.put(keys[i], entry)
        return found


@SETTINGS
@given(calls=st.lists(st.lists(st.integers(0, 3000), max_size=60, unique=True), max_size=40),
       entries=st.sampled_from([8, 64, 1024]))
def test_the_doorkeeper_stores_the_keys_computed_again_and_no_others(calls, entries):
    """The compiled cache with a doorkeeper computes, returns and keeps what its Python model does,
    through generations turning over and the doorkeeper's bits being cleared (3,000 keys)."""
    made = entries_of(4)
    compiled, model = native._native.Cache(entries, 1 << 30, doorkeeper=True), DoorkeeperModel(entries, 1 << 30)
    for keys in calls:
        keys = [f"/k/{k}" for k in keys]
        asked = {"compiled": [], "model": []}
        for name, cache in (("compiled", compiled), ("model", model)):
            def compute(missing, name=name):
                asked[name].append(list(missing))
                return [made[len(key) % 4] for key in missing]
            found = cache.lookup_distinct(keys, compute)
            assert [entry is made[len(key) % 4] for entry, key in zip(found, keys)] == [True] * len(keys)
        assert asked["compiled"] == asked["model"]
        assert len(compiled) == len(model.cache)
    assert all(compiled.get(f"/k/{k}") is model.cache.get(f"/k/{k}") for k in range(3001))


def turned_over_cache(entries: int) -> object:
    """A compiled cache with a doorkeeper that has turned over once (filled by put, which stores all)."""
    cache = native._native.Cache(entries, 1 << 30, doorkeeper=True)
    for index, entry in enumerate(entries_of(entries // 2 + 1)):
        cache.put(f"filler {index}", entry)
    return cache


def test_the_doorkeeper_stores_a_value_at_its_second_computation_once_the_cache_turned_over():
    computed = []

    def compute(missing):
        computed.extend(missing)
        return entries_of(len(missing))

    fresh = native._native.Cache(16_384, 1 << 30, doorkeeper=True)
    fresh.lookup_distinct(["k", "j"], compute)
    assert len(fresh) == 2  # evicting nothing yet, it stores all (a small log is cached at once)
    for lookup in ("lookup_distinct", "lookup"):
        cache, computed[:] = turned_over_cache(16), []
        held = len(cache)
        for _ in range(3):
            if lookup == "lookup":  # keys given with their values, twice each: computed once a call
                cache.lookup(["/a", "/a", "/b"], ["k", "k", "j"], lambda values, keys: compute(keys))
            else:
                cache.lookup_distinct(["k", "j"], compute)
            computed.append("|")
        assert computed == ["k", "j", "|", "k", "j", "|", "|"], lookup
        assert len(cache) == held + 2


def test_without_its_doorkeeper_the_compiled_cache_stores_every_computed_value():
    cache = native._native.Cache(16_384, 1 << 30)
    cache.lookup_distinct(["k", "j"], lambda missing: entries_of(len(missing)))
    assert len(cache) == 2


def test_crafted_keys_sharing_their_low_hash_bits_do_not_share_a_doorkeeper_bit():
    """Keys whose hashes share their low 16 bits (what whoever knows the hash seed can make) fall on
    bits spread over the doorkeeper, so they are stored no sooner than other keys: their first
    computation stores as few of them as the model's spread bits tell (by low bits, all but one)."""
    crafted = [key for key in map("/u/{}".format, range(2_000_000)) if hash(key) & 0xFFFF == 0][:8]
    assert len(crafted) == 8  # about 30 are found: the hash seed changes which
    cache, model = turned_over_cache(64), DoorkeeperModel(64, 1 << 30)
    for index, entry in enumerate(entries_of(33)):
        model.cache.put(f"filler {index}", entry)
    held = len(cache)
    cache.lookup_distinct(crafted, lambda missing: entries_of(len(missing)))
    assert len(cache) - held == sum(model.seen_before(key) for key in crafted)
    assert len(model.bits) >= 6  # 8 keys on 512 bits: three sharing one is rarer than once in 20,000 runs


@pytest.mark.parametrize("kind", ["compiled", "python"])
def test_lookup_of_distinct_keys_refuses_a_wrong_count_and_stores_nothing(kind):
    cache = native._native.Cache(8, 100_000) if kind == "compiled" else ValueCache(8, 100_000)
    with pytest.raises(ValueError, match="different number of entries"):
        cache.lookup_distinct(["a", "b"], lambda missing: [])
    assert len(cache) == 0


def test_the_compiled_cache_survives_a_compute_that_changes_its_lists_or_walks_the_heap():
    import gc

    cache = native._native.Cache(8, 100_000)
    for lookup in (lambda compute: cache.lookup_distinct(["a", "b"], compute),
                   lambda compute: cache.lookup(["a", "b"], ["a", "b"], lambda values, keys: compute(keys))):
        with pytest.raises(ValueError, match="changed the length"):
            lookup(lambda missing: (missing.clear(), [])[1])
        assert lookup(lambda missing: (gc.get_objects(), [None] * len(missing))[1]) == [None, None]
        cache.clear()


def test_an_extension_built_before_the_doorkeeper_still_featurizes(monkeypatch):
    """A checkout updated without its extension rebuilt: Cache takes no doorkeeper (TypeError), and
    every model failed to load; its caches now store every value, the features are the same."""
    built = native._native.Cache
    monkeypatch.setattr(native._native, "Cache", lambda entries, max_bytes: built(entries, max_bytes))
    lines = real_lines("access", 300, seed=12)
    assert_same_features(DEFAULT_SPECS["access"], lines, fit=lines[:100])


def test_the_python_path_can_be_forced_and_says_why():
    script = ("from logscore.features import Featurizer, DEFAULT_SPECS, native;"
              "print(Featurizer(DEFAULT_SPECS['access']).native is None, native.status())")
    env = {**os.environ, "LOGSCORE_PURE_PYTHON": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "python", "(LOGSCORE_PURE_PYTHON=1)"]


def test_a_missing_extension_falls_back_and_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(native, "_native", None)
    monkeypatch.setattr(native, "_announced", False)
    with caplog.at_level("WARNING", logger="logscore"):
        first, second = Featurizer(DEFAULT_SPECS["access"]), Featurizer(DEFAULT_SPECS["access"])
    assert first.native is None and second.native is None
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "compiled featurizer is not built" in caplog.records[0].getMessage()
    with pytest.raises(ImportError, match="not built"):
        Featurizer(DEFAULT_SPECS["access"], native=True)
    lines = shop_lines(50)
    assert_same_batches(first.transform(lines), Featurizer(DEFAULT_SPECS["access"], native=False).transform(lines))


@SETTINGS
@given(column=st.lists(values, max_size=40), copies=st.lists(st.integers(0, 39), max_size=20))
def test_distinct_values_are_found_as_a_dict_finds_them(column, copies):
    """The compiled distinct uses a table of its own: the same ids, and each distinct value the
    object first seen, as the reference's dict gives; equal strs that are other objects too."""
    column = list(column) + ["".join(list(column[i])) for i in copies if i < len(column) and column[i] is not None]
    ids, found = native._native.distinct(column)
    index: dict = {}
    expected = [index.setdefault(value, len(index)) for value in column]
    assert np.frombuffer(ids, dtype=np.int64).tolist() == expected
    assert len(found) == len(index) and all(a is b for a, b in zip(found, index))


def test_bad_values_are_clear_errors_not_crashes():
    with pytest.raises(TypeError, match="str or None"):
        native._native.ngram_encode([b"bytes"], False, False, False, 10)
    with pytest.raises(TypeError, match="weakref"):
        native._native.text_features(["a"], [["a"]], 0, 1.0, 0, object())
    assert np.frombuffer(native._native.distinct([])[0], dtype=np.int64).size == 0
    held, entries = [np.array([0, 1], dtype=np.int64)], native._native.text_features(
        ["a", "b"], [["a"], ["b"]], 0, 1.0, 0, weakref.ref(ValueCache()))
    with pytest.raises(ValueError, match="one per held buffer"):
        native._native.assemble(held, [], entries, 2, False)
    with pytest.raises(IndexError, match="out of range"):
        native._native.assemble(held, [1], entries, 2, False)  # record 1 would hold entry 2 of 2
    with pytest.raises(IndexError, match="out of range"):
        native._native.assemble(held, [-1], entries, 2, False)
    # found under AddressSanitizer: each read or wrote outside its buffers, or crashed
    with pytest.raises(ValueError, match="one value per text list"):
        native._native.text_features(["v"] * 40, [["x"]], 0, 1.0, 0, weakref.ref(ValueCache()))
    with pytest.raises(TypeError, match="str or None"):
        native._native.numeric_labels([b"12", 12], "(missing)")
    assert len(native._native.Cache.__new__(native._native.Cache)) == 0  # not initialised, yet no crash
    misaligned = memoryview(bytearray(17))[1:]  # int64s at an odd address (undefined to load directly)
    aligned = np.zeros(2, dtype=np.int64)
    assert native._native.assemble([misaligned], [0], entries, 2, False) == native._native.assemble(
        [aligned], [0], entries, 2, False)


@pytest.mark.parametrize("max_bytes", [-3, 0, 65_537, 2.5, True])
def test_an_ngram_length_out_of_range_is_refused_when_the_model_loads(max_bytes):
    """A negative max_bytes made the compiled encoder write before its buffer."""
    with pytest.raises(ConfigError, match="max_bytes"):
        Featurizer({"log_format": "access",
                    "fields": [{"field": "url", "converters": [{"kind": "ngrams", "max_bytes": max_bytes}]}]})


# Windows and clients: the fields they read come as text columns beside the featurizer's, and
# their keys are counted in C (features/_native.c key_counts); the Python path is the reference.
BEHAVIOUR_FIELDS = ("status", "url", "remote_addr", "host", "hostname", "message", "log", "level", "severity",
                    "pri", "kubernetes.pod", "time", "@timestamp")
BEHAVIOUR_RECORDS = st.builds(
    lambda key, line, other: {**other, key: line} if key else line,
    st.sampled_from(["message", "log", None]), LINE_VALUES.filter(lambda v: isinstance(v, str)) | LINE_VALUES,
    st.dictionaries(st.sampled_from(["host", "hostname", "level", "severity", "pri", "remote_addr", "status", "url",
                                     "kubernetes", "log", "agent", "path", "time", "@timestamp"]),
                    st.one_of(texts, st.just(404), st.just(b"web-\xff"), st.just({"pod": "web-1"}), st.none()),
                    max_size=3))


def assert_same_behaviour_columns(spec: dict, records: list, max_line: int = 65_536) -> None:
    compiled, reference = Featurizer(spec, max_line, native=True), Featurizer(spec, max_line, native=False)
    with_columns = compiled.normalized_values(records, False, BEHAVIOUR_FIELDS)
    expected = reference.normalized_values(records, False, BEHAVIOUR_FIELDS)
    assert with_columns[4] == expected[4]
    # The featurizer's own columns, parse and truncation flags do not change when columns are asked for.
    assert with_columns[:3] == expected[:3] == compiled.normalized_values(records, False)[:3]


@SETTINGS
@given(records=st.lists(BEHAVIOUR_RECORDS, min_size=1, max_size=15), max_line=st.sampled_from([20, 65_536]),
       limit=st.sampled_from([5, 8192]))
# a map under "log" beside a raw line (found at 1,500 examples): C named the map as text, Python flattened it
@example(records=[{"log": {"pod": "web-1"}, "message": b'1.2.3.4 - - [x] "GET /caf\xe9 HTTP/1.1" 200 1'}],
         max_line=20, limit=5)
def test_the_columns_windows_and_clients_read_are_those_of_the_python_path(records, max_line, limit):
    assert_same_behaviour_columns({**DEFAULT_SPECS["access"], "max_field_chars": limit}, records, max_line)


@pytest.mark.parametrize("log_format", ["access", "syslog", "jsonl", "plain"])
def test_real_lines_and_shippers_maps_give_the_columns_of_the_python_path(log_format):
    lines = real_lines(log_format, 600, seed=6)
    shipped = ([{"message": line} for line in lines[:300]]
               + [{"log": line.encode(), "host": "web-1"} for line in lines[:100]]
               + [{"message": line, "level": "warn", "kubernetes": {"pod": "p"}} for line in lines[:100]]
               + [{"log": line, "time": "2026-12-03T10:00:00.1Z", "stream": "stdout"} for line in lines[:50]])
    assert_same_behaviour_columns(DEFAULT_SPECS[log_format], lines + shipped)


URL_EDGES = ["/a/123\n", "/a/123\n/b", "/a/123\n\n", "/\n", "\n", "/٣٣/x", "٣/x", "http://h/1/2", "abcdefghi://x/1",
             "abcdefghij://x/1", "https://host", "/" + "1" * 300, "/" + "a" * 156 + "/12345", "/" + "é" * 158 + "/1",
             "/0a1b2c3d-0000-4000-8000-00aabbccddee\n", "//12//", "/12?/34", "?", "/%31/x", "/😀/123"]
# Values about the window key cache's byte limit (windows.CACHED_ENTRY_BYTES): kept as a message
# template up to 55 emoji, as a host up to 61
CACHE_EDGES = ["😀" * 55, "😀" * 56, "😀" * 61, "😀" * 62, "é" * 61, "é" * 62, "h" * 340, "h" * 400, "中" * 56]


def both_namers(dimensions) -> tuple:
    from logscore.windows import KeyNamer

    return KeyNamer(dimensions, native=True), KeyNamer(dimensions, native=False)


@SETTINGS
@given(rows=st.lists(st.tuples(values | st.sampled_from(URL_EDGES + EDGE_VALUES), values | st.sampled_from(CACHE_EDGES),
                               st.sampled_from([None, "200", "503", "2000", "٢٠٠", "5²³", "099", "-"]),
                               st.sampled_from([None, "ERROR", " Warn ", "", "info"]),
                               st.sampled_from([None, "3", "x", "13"])),
                     max_size=40), cache=st.sampled_from([2, 65_536]))
def test_window_keys_are_counted_the_same_in_c_and_python(rows, cache):
    from logscore import windows

    columns = {name: [row[i] for row in rows] for i, name in enumerate(("url", "message", "status", "level", "pri"))}
    columns.update({"severity": [None] * len(rows), "host": columns["level"], "hostname": columns["message"]})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(windows, "VALUE_CACHE", cache)  # a cache that is cleared while a batch is named
        compiled, reference = both_namers(windows.DIMENSIONS)
        for _ in range(2):  # cold, then cached
            tags = ["web"] * len(rows)
            assert list(compiled.count(columns, len(rows), "r", tags).items()) == \
                list(reference.count(columns, len(rows), "r", tags).items())
            # and the same values kept (their bytes counted alike) where C names by call
            named_by_call = [d for d in windows.DIMENSIONS if d in compiled._cache and d not in windows.NATIVE_NAMING]
            assert {d: compiled._cache[d] for d in named_by_call} == {d: reference._cache[d] for d in named_by_call}


def test_window_keys_of_edge_urls_are_the_same_in_c_and_python():
    compiled, reference = both_namers(["url_template", "status_class"])
    urls = URL_EDGES + EDGE_VALUES
    columns = {"url": urls, "status": ["200"] * len(urls)}
    assert list(compiled.count(columns, len(urls), "r", None).items()) == \
        list(reference.count(columns, len(urls), "r", None).items())


# Python code the compiled featurizer calls back into (weighers, compute, an entry's nbytes, a set's
# __eq__, an offset's __index__, finalizers run by a collection) may change the lists it was given
# or the cache it works on: found under AddressSanitizer, each read freed memory or past a list.
def ref_of(obj) -> weakref.ref:
    return weakref.ref(obj)


KEEP = ValueCache()  # named by the entries these tests make


def entries_of(count: int) -> list:
    return native._native.text_features([str(i) for i in range(count)], [["t"]] * count, 0, 1.0, 0, ref_of(KEEP))


def test_a_weigher_that_shrinks_the_values_does_not_shorten_the_features():
    values = [str(i) for i in range(64)]

    def weigher(counts):
        del values[1:]
        return np.ones(len(counts), dtype=np.float32)

    made = native._native.text_features(values, [["t"]] * 64, 0, 1.0, weigher, ref_of(KEEP))
    assert [f.value for f in made] == [str(i) for i in range(64)]


def while_collections_shrink(values: list, call):
    """call(), with a garbage collection at nearly every allocation, each running a finalizer that
    pops an item of values."""
    import gc

    armed = []

    class Cycle:  # garbage with a finalizer, made again each time it is collected
        def __init__(self):
            self.me = self

        def __del__(self):
            if armed and values:
                values.pop()
            Cycle()

    Cycle()
    threshold = gc.get_threshold()
    gc.set_threshold(1)
    held = [[] for _ in range(200)]  # no free lists left: each new list is an allocation that may collect
    armed.append(True)
    try:
        return call()
    finally:
        armed.clear()
        gc.set_threshold(*threshold)
        del held


def test_collections_that_shrink_the_lists_being_read_change_nothing():
    values = [f"ÉÀ{i}" for i in range(100)]
    encoded = while_collections_shrink(values, lambda: native._native.ngram_encode(values, False, True, False, 100))
    # the values as they were when the call took them (a collection may already have shrunk the list)
    assert 0 < len(encoded) and encoded == [b"\x02" + f"éà{i}".encode() + b"\x03" for i in range(len(encoded))]
    records = [f"line {i}" * 3 for i in range(64)]
    columns, parsed, _ = while_collections_shrink(records, lambda: native._native.access_columns(
        records, ("message",), False, 100, 100, lambda record: ({"message": record}, True, False), str))
    assert 0 < len(parsed) and columns[0] == [f"line {i}" * 3 for i in range(len(parsed))]


def test_a_set_member_whose_eq_shrinks_the_urls_changes_nothing():
    urls = ["/a?x=1"] * 64

    class Template(str):
        def __hash__(self):
            return hash("/a")

        def __eq__(self, other):
            del urls[1:]
            return False

    templates = native._native.template_set(frozenset({Template("z")}))
    structures = native._native.url_structures(urls, True, 3, frozenset({"/a?x"}), templates)
    assert len(structures) == 64 and len(set(structures)) == 1


def walk_lists():
    """What a heap walker (a profiler, a leak finder) does: read every list the collector knows."""
    import gc

    for obj in gc.get_objects():
        if type(obj) is list:
            list(obj)


def test_callbacks_that_walk_the_heap_find_no_half_made_list():
    """The result lists are filled one slot at a time around callbacks: the collector must not
    hand them, NULL slots and all, to Python code."""
    def normalize_one(record):
        walk_lists()
        return {"message": record}, True, False

    assert native._native.access_columns(["a", "b"], ("message",), False, 100, 100, normalize_one, str) == \
        ([["a", "b"]], [True, True], [False, False])

    class Template(str):
        def __hash__(self):
            return hash("/a")

        def __eq__(self, other):
            walk_lists()
            return False

    structures = native._native.url_structures(["/a?x=1"] * 3, True, 3, frozenset({"/a?x"}),
                                               native._native.template_set(frozenset({Template()})))
    assert len(set(structures)) == 1


def test_offsets_that_change_the_entries_are_refused():
    entries = entries_of(8)

    class Emptying:
        def __index__(self):
            entries.clear()
            return 0

    class Swapping:
        def __index__(self):
            entries[0] = 12345678901234567890
            return 0

    held = [np.arange(8, dtype=np.int64)]
    with pytest.raises(IndexError, match="out of range"):  # the entries are checked after the offsets are read
        native._native.assemble(held, [Emptying()], entries, 8, False)
    entries.extend(entries_of(8))
    with pytest.raises(TypeError, match="Features"):
        native._native.assemble(held, [Swapping()], entries, 8, False)


def test_an_entry_moved_up_by_get_survives_its_nbytes_clearing_the_cache():
    cache = native._native.Cache(2, 1 << 30)
    armed = []

    class Entry:
        @property
        def nbytes(self):
            if armed:
                cache.clear()
            return 10

    cache.put("a", Entry())  # the cache holds its only reference
    cache.put("b", entries_of(1)[0])  # "a" now in the older generation
    armed.append(True)
    assert type(cache.get("a")) is Entry


def test_a_lookup_survives_an_nbytes_that_clears_compute_s_lists_and_the_cache():
    cache = native._native.Cache(1 << 20, 1 << 30)
    kept: dict = {}

    class Entry:
        @property
        def nbytes(self):
            kept["entries"].clear()
            kept["missing"].clear()
            cache.clear()
            return 1

    def compute(missing):
        kept["missing"], kept["entries"] = missing, [Entry() for _ in missing]
        return kept["entries"]

    found = cache.lookup_distinct([str(i) for i in range(32)], compute)
    assert len(found) == 32 and all(type(entry) is Entry for entry in found)


def test_a_finalizer_that_puts_while_the_older_generation_is_dropped_keeps_the_cache_whole():
    cache = native._native.Cache(2, 1 << 30)
    keep = entries_of(1)[0]

    class Entry:
        nbytes = 10

        def __del__(self):
            cache.put("put by a finalizer", keep)

    cache.put("a", Entry())
    cache.put("b", keep)  # older: {a: Entry}
    cache.put("c", keep)  # drops {a: Entry}: its finalizer puts while the generations turn
    cache.put("d", keep)
    assert len(cache) == 3 and cache.get("put by a finalizer") is keep


def test_a_parsed_flag_that_raises_is_the_error_raised():
    class Flag:
        def __bool__(self):
            raise RuntimeError("flag")

    class Cut:
        def __bool__(self):
            raise AssertionError("read after the flag failed")

    with pytest.raises(RuntimeError, match="flag"):
        native._native.access_columns(["x"], ("message",), False, 100, 100,
                                      lambda record: ({"message": "m"}, Flag(), Cut()), str)


class Odd(str):
    """A str subclass whose methods and hash say otherwise than its text."""

    def __hash__(self):
        return 1

    def __eq__(self, other):
        return False

    def split(self, *args, **kwargs):
        return ["odd"]

    def partition(self, *args):
        return ("odd", "", "")

    def encode(self, *args):
        return b"odd"


def test_only_plain_str_reaches_the_compiled_featurizer():
    """The decoders (JSON, msgpack, protobuf) make plain str; a subclass from a caller of the Python API
    is made a plain str by the record normalizer, so both paths give the features of its text,
    and the compiled functions refuse one given to them directly (its __hash__ and __eq__ would
    run inside them)."""
    spec = DEFAULT_SPECS["access"]
    line = '1.2.3.4 - - [x] "GET /a/12?q=1 HTTP/1.1" 200 12 "-" "Mozilla/5.0 (X11)"'
    fields = {"url": "/a/12?q=1", "method": "GET", "status": "200", "bytes": "12", "user_agent": "curl/8"}
    for plain, odd in ((line, Odd(line)), (fields, {k: Odd(v) for k, v in fields.items()})):
        for native_path in (True, False):
            featurizer = Featurizer(spec, native=native_path)
            assert_same_batches(featurizer.transform([odd, odd]), featurizer.transform([plain, plain]))
    compiled = native._native
    no_templates = compiled.template_set(frozenset())
    for refused in (lambda: compiled.Cache(8, 1000).get(Odd("k")), lambda: compiled.distinct([Odd("a"), "a"]),
                    lambda: compiled.ngram_encode([Odd("a")], False, False, False, 10),
                    lambda: compiled.url_structures([Odd("/a")], True, 3, frozenset(), no_templates),
                    lambda: compiled.numeric_labels(["1"], Odd("(missing)")),
                    lambda: compiled.text_features(["v"], [[Odd("t")]], 0, 1.0, 0, ref_of(KEEP))):
        with pytest.raises(TypeError, match="not a subclass"):
            refused()


# Found by the coverage-guided differential fuzzer (/work/exp/s13-native in the s13 session).
def test_the_compiled_cache_counts_the_bytes_of_non_ascii_keys_as_the_python_one():
    compiled, reference = native._native.Cache(64, 1 << 20), ValueCache(64, 1 << 20)
    entry = entries_of(1)[0]
    for key in ("a", "é", "日本", "😀", b"x\xff", None):
        compiled.put(key, entry)
        reference.put(key, entry)
        assert compiled.nbytes == reference.nbytes, key


def test_enumerated_values_are_found_behind_templates_of_any_width():
    """The compiled path finds a URL's template among the enumerated slots' by its code points,
    whatever the width a str of them would have (ASCII, Latin-1, two and four bytes)."""
    slots = ["/a?sort", "/é?q", "/日本/{id}?p", "/😀?e", "?id", "/{id}/b?x"]
    spec = {"format": "jsonl", "fields": [{"field": "f", "converters": [{"kind": "url", "enumerated": slots}]}]}
    urls = ["/a?sort=up", "/é?q=1", "/%C3%A9?q=2", "/日本/12345?p=x", "/日本/12345?q=x", "/😀?e=ok", "/😀?f=no",
            "?id=7", "/999/b?x=1", "/999/c?x=1", "/b?x=1", "/é/?q=3", "/日?p=1"]
    assert_same_features(spec, [{"f": url} for url in urls])


def test_empty_feature_texts_are_hashed_as_the_python_path_hashes_them():
    """An empty text counted first hashed a null arena, and a URL's empty path was split at a null
    pointer (undefined behaviour, clang's UBSan)."""
    spec = {"format": "jsonl", "fields": [{"field": "f", "converters": [
        {"kind": "categorical"}, {"kind": "sequence", "n": [1, 2], "separator": "/"}, {"kind": "url", "part": "query"},
        {"kind": "url"}]}]}
    assert_same_features(spec, [{"f": ""}, {"f": "/"}, {"f": "a"}, {"f": "?a=1"}])


# Pieces of application lines' heads, and what sits at their edges (a digit, a dot or a letter
# joined to a level word; fractions and zones of every length; non-ASCII digits and letters).
HEAD_FRAGMENTS = ["2015-10-18", " ", "T", "_", "18:01:47", "18:01:4", ",978", ".5", "." + "1" * 10, "Z", "+01:00",
                  "+0100", "-05:30", "+01:001", "+01", ":", "Sun", "Dec", " 4", "04", "2005", "Nov", "  9", "123",
                  "INFO", "warn", "Warning", "ERR", "error", "CRITICAL", "crit", "ALERT", "infos", "[", "]", "=",
                  "level=", "-", ".", "_", "9", "a", "é", "ſ", "K", "٣", "😀", "x" * 40, "081109", "203615",
                  "03-17", "16:13:38", "1702", "  ", " W ", " E", "D", "ń", "2024/01/15", "/", " UTC", " GMT", "UTC",
                  "I1223", "E", "1223", "17/06/09", "20171223", "-22:15:29", ":606", ":60", "10.30", "10", "2:"]
HEADS = st.lists(st.sampled_from(HEAD_FRAGMENTS), max_size=24).map("".join)


@SETTINGS
@given(lines=st.lists(HEADS, min_size=1, max_size=40))
@example(lines=["2015-10-18 18:01:47.1111111111+01:00 INFO", "Sun Dec  4 04:47:44.1 2005 x", "Nov   9 04:47:44",
                "x" * 64 + "Nov 9 18:01:47 ERROR", "ERROR" + "x" * 50, "a" * 47 + " CRITICAL", "a" * 49 + " ERR",
                "2015-10-18 18:01:47+01:001 warn", "ſevere ERROR", "infoé error", "x" * 63 + "Nov 9 18:01:47 INFO",
                "Nov" + " " * 120 + "9 04:47:44 ERROR x", "Nov   9 04:47:44 WARN",
                "2015-10-18 18:01:47" + " " * 47 + "ERR", "081109 203615 148 INFO", "081109 2036151", "081109 203615",
                "03-17 16:13:38.1111111111 E", "03-17 16:13:38", "03-17 16:13:3", "x03-17 16:13:38 WARN",
                "03-17 16:13:38.811  1702  2395 D x", "03-17 16:13:38  1 2 ń x", "03-17 16:13:38 1 2 W",
                "03-17 16:13:38" + " " * 43 + "1 2 W ", "03-17 16:13:38" + " " * 42 + "1 2 W ", "03-17 16:13:38 1 W x",
                "2024/01/15 10:23:45 [error] 1#0: x", "2024/01/15 10:23:45.1111111111 x", "2024/01/1510:23:45 ERROR",
                "x2024/01/15 10:23:45 warn", "2024-01-02 10:11:12.345 UTC [1] LOG: x", "2024-01-02 10:11:12 GMTx",
                "2024-01-02 10:11:12+01:00 UTC ERROR", "2024-01-02 10:11:12 UTC_x",
                "I1223 22:15:29.606000  1 f.cc:1] x",
                "F1223 22:15:29 ERROR", "X1223 22:15:29 WARN", " E1223 22:15:29", "17/06/09 20:10:40 INFO x",
                "17/06/09 20:10:401", "x17/06/09 20:10:40", "09/06/17 20:10:40 user x", "17/06/09 20:10:40 warn.x",
                "17/06/09 20:10:40 Error: x", "17/06/09 20:10:40 ERRORS", "17/06/09 20:10:40 INFO",
                "20171223-22:15:29:606|a|1|x", "20171223-22:15:29:60 x",
                "20171223-22:15:35:1|x", "20171223-22:15:35:1234", "20171223-2:5:3:1|x", "20171223-222:1:1",
                "20171223-1::1",
                "20171223-22:15:29", "[10.30 16:49:06] a.exe - warn", "[10.30 16:49:06 x", "x[10.30 16:49:06]"])
def test_a_line_s_head_is_read_the_same_in_c_and_python(lines):
    from logscore.parsers import head_reader, line_head

    compiled = head_reader(native.module(True))
    assert [compiled(line) for line in lines] == [line_head(line) for line in lines]


def test_real_application_lines_heads_are_read_the_same_in_c_and_python():
    from logscore.parsers import head_reader, line_head

    from .generate import timed_app_lines

    lines = timed_app_lines(600, 1.0, 1_772_323_200.0, seed=2) + syslog_lines(300) + session_lines(50)[0]
    compiled = head_reader(native.module(True))
    heads = [line_head(line) for line in lines]
    assert [compiled(line) for line in lines] == heads
    assert sum("time" in head for head in heads) >= 900 and sum("level" in head for head in heads) >= 600


def test_a_json_logger_s_own_names_give_the_columns_of_the_python_path():
    from .test_cli import PINO, json_logger_lines

    lines = json_logger_lines(200, 3, PINO) + json_logger_lines(50, 4, {"message": "@m", "level": "@l", "time": "@t"})
    maps = [json.loads(line) for line in lines[::3]] + [{"log": line} for line in lines[:20]]
    assert_same_behaviour_columns(DEFAULT_SPECS["jsonl"], lines + maps)
    values = Featurizer(DEFAULT_SPECS["jsonl"], native=True).field_values(lines[:3])[0]
    assert all(values["message"]) and values["level"] == ["30"] * 3
    # A model whose spec names no aliases (trained before them) reads what it read then.
    older = {**DEFAULT_SPECS["jsonl"], "fields": [{k: v for k, v in entry.items() if k != "aliases"}
                                                    for entry in DEFAULT_SPECS["jsonl"]["fields"]]}
    assert Featurizer(older, native=True).field_values(lines[:3])[0]["message"] == [None] * 3


def test_a_url_scored_alone_does_not_rebuild_the_enumerated_templates_table():
    """The compiled table of the templates enumerated slots start with was made on every call: per
    record when records come one at a time, its cost growing with the model's slots (20,000 slots:
    732 µs a URL against 14). It is made once per converter."""
    class CountingTables:
        def __init__(self, module):
            self.module, self.made = module, 0

        def template_set(self, templates):
            self.made += 1
            return self.module.template_set(templates)

        def __getattr__(self, name):
            return getattr(self.module, name)

    spec = {"format": "jsonl", "fields": [{"field": "f", "converters": [
        {"kind": "url", "enumerated": [f"/t{i}/x?p" for i in range(50)]}]}]}
    featurizer = Featurizer(spec, native=True)
    url = next(converter for converter in featurizer.converters if converter.kind == "url")
    counting = CountingTables(url._native)
    url.accelerate(counting)
    alone = [featurizer.transform([{"f": f"/t{i}/x?p={i}"}]) for i in range(5)]
    assert counting.made == 1 and len(alone) == 5


# A path of thousands of distinct segments: the compiled converter dropped repeated segments by
# rescanning every earlier one (probe: 11 ms a line at the default field cut, 2.6 in Python).
def many_segments(count: int, repeat_every: int = 0) -> str:
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names = [a + b for a in letters for b in letters][:count]
    if repeat_every:
        names = [names[i // 2] if i % repeat_every == 0 else name for i, name in enumerate(names)]
    return "/" + "/".join(names)


@pytest.mark.parametrize("weighting", ["binary", "tf"])
def test_segments_are_counted_once_with_comparisons_linear_in_them(weighting):
    spec = {"format": "jsonl", "max_field_chars": 65_536,
            "fields": [{"field": "url", "converters": [{"kind": "url", "weighting": weighting}]}]}
    urls = [many_segments(2_500), many_segments(2_500, repeat_every=3) + "/ab/ab//"]
    assert_same_features(spec, [{"url": u} for u in urls])  # repeats counted once, as dict.fromkeys does
    compiled = Featurizer(spec, native=True)
    before = native._native.comparisons()
    compiled.transform([{"url": many_segments(2_500)}])
    compared = native._native.comparisons() - before
    # Each of ~2,500 texts meets a few slots of the counter's table; a rescan compares ~3 million pairs.
    assert compared < 4 * 2_500, compared


def held_by(cache) -> int:
    """Estimated bytes of the distinct objects a cache keeps: its keys, its entries and the values its
    entries name (gc's referents: the compiled Cache's traverse visits its keys and entries)."""
    tables = [cache._new, cache._old] if isinstance(cache, ValueCache) else [cache]
    held = {id(o): o for table in tables for o in gc.get_referents(table)}
    entries = [o for o in held.values() if hasattr(o, "nbytes") and hasattr(o, "value")]
    keys = [o for o in held.values() if not hasattr(o, "nbytes")]
    values = {id(e.value): e.value for e in entries if e.value is not None and id(e.value) not in held}
    return (sum(key_bytes(k) for k in keys) + sum(e.nbytes for e in entries)
            + sum(key_bytes(v) for v in values.values()))


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_url_caches_count_the_urls_their_entries_keep(compiled):
    # Each structure's entry keeps the first URL of that structure (to name its features): long
    # values of distinct structures (probe: RSS 67 -> 597 MiB in caches counted at 2.8 MiB), and
    # short URLs sharing the structure of a long one (/{id}: their entries keep the long one).
    long_values = [{"url": f"/?p{i}=" + "\U0001F600" * 8_150} for i in range(300)]
    long_ids = [{"url": f"/{'9' * 8_000}?q{i}=1"} for i in range(300)]
    short_ids = [{"url": f"/1?q{i}=1"} for i in range(300)]
    featurizer = Featurizer({"format": "jsonl", "fields": [{"field": "url", "converters": [{"kind": "url"}]}]},
                            native=compiled)
    for records in (long_values, long_ids, short_ids):
        featurizer.transform(records)
    converter = featurizer.converters[0]
    for cache in (converter._cache, converter._by_structure):
        assert held_by(cache) <= cache.nbytes <= CACHE_BYTES + 2 * 40_000, (held_by(cache), cache.nbytes)


def same_key_texts(prefix: str, seed: int, count: int, width: int = 48) -> list[str]:
    """``count`` distinct words of g/h whose feature texts (``prefix`` + word) share one crc32 key: crc32
    is affine in the bits, so any set of letter flips whose key changes xor to zero keeps the key."""
    def key(word):
        return text_key(seed, prefix + word)
    base = "g" * width
    flips = [key(base[:j] + "h" + base[j + 1:]) ^ key(base) for j in range(width)]
    pivots: dict[int, tuple[int, int]] = {}
    null_space = []  # sets of flips (bit masks over positions) that leave the key as it is
    for j, change in enumerate(flips):
        mask = 1 << j
        for bit in sorted(pivots, reverse=True):
            if change >> bit & 1:
                change, mask = change ^ pivots[bit][0], mask ^ pivots[bit][1]
        if change:
            pivots[change.bit_length() - 1] = (change, mask)
        else:
            null_space.append(mask)
    words = []
    for chosen in range(1, count + 1):  # distinct subsets of the null space's basis: distinct words
        mask = 0
        for i, flip_set in enumerate(null_space):
            mask ^= flip_set if chosen >> i & 1 else 0
        words.append("".join("h" if mask >> j & 1 else "g" for j in range(width)))
    assert len({key(w) for w in words}) == 1 and len(set(words)) == count
    return words


def test_texts_made_to_share_a_key_are_counted_apart_in_linear_time():
    url_spec = {"format": "jsonl", "fields": [{"field": "url", "converters": [{"kind": "url"}]}]}
    segments = same_key_texts("segment ", text_seed("url", "url"), 160)
    url = "/" + "/".join(segments + segments[:5])
    words = same_key_texts("token ", text_seed("msg", "tokens"), 20)
    tokens_spec = {"format": "jsonl",
                   "fields": [{"field": "msg", "converters": [{"kind": "tokens", "weighting": "tf"}]}]}
    assert_same_features(url_spec, [{"url": url}])
    assert_same_features(tokens_spec, [{"msg": " ".join(words + words[:7] + words[:3])}])  # counts 3, 2, 1
    before = native._native.comparisons()
    Featurizer(url_spec, native=True).transform([{"url": url}])
    compared = native._native.comparisons() - before
    # A walk past every earlier text of the key compared ~13,000 pairs here.
    assert compared < 4 * len(segments), compared
