"""Bounded fuzzing of the decoders, against the real `logscore serve` process.

Hypothesis generates gRPC request bytes (random and well-formed ScoreRequests with odd
records, odd msgpack event streams) and HTTP bodies (random bytes, any JSON, odd query
strings). Every answer must be a documented status, never INTERNAL / 500; afterwards
the process is alive, its log holds no error or traceback, and its peak memory stays
under the shipped limit. CI runs a fixed set of examples (~1 minute); set
LOGSCORE_FUZZ_EXAMPLES=N for a longer, randomized run.
"""

from __future__ import annotations

import http.client
import json
import os

import grpc
import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from logscore.generated.logscore.v1 import scorer_pb2 as pb

from .sidecar_process import SidecarProcess, models_dir_with

EXAMPLES = int(os.environ.get("LOGSCORE_FUZZ_EXAMPLES", "0"))
# CI: a fixed set of examples, and a failure reported as found (shrinking it can take minutes).
FUZZ = settings(max_examples=EXAMPLES or 400, derandomize=not EXAMPLES, deadline=None, database=None,
                phases=list(Phase) if EXAMPLES else [Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SHIPPED_MEMORY_LIMIT = 350 * 1024 * 1024  # docs/deploy: MemoryMax=350M, limits.memory 350Mi

GRPC_ANSWERS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
HTTP_ANSWERS = {200, 400, 404, 413, 415, 429}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, shop_model_path):
    workdir = tmp_path_factory.mktemp("fuzz")
    process = SidecarProcess(models_dir_with(workdir, shop_model_path, "shop"), workdir).start()
    yield process
    try:
        assert process.process.poll() is None, "the sidecar died"
        log = process.log()
        assert '"level": "error"' not in log and "Traceback" not in log, log[-5000:]
        assert process.peak_rss_bytes() < SHIPPED_MEMORY_LIMIT
    finally:
        assert process.stop() == 0


@pytest.fixture(scope="module")
def score_bytes(sidecar):
    channel = sidecar.channel()
    yield channel.unary_unary("/logscore.v1.Scorer/Score")
    channel.close()


def expect_documented_grpc_answer(call, data: bytes) -> None:
    try:
        response = pb.ScoreResponse.FromString(call(data, timeout=10))
    except grpc.RpcError as error:
        assert error.code() in GRPC_ANSWERS, (error.code(), error.details(), data[:200])
        return
    assert all(0.0 <= score <= 1.0 for score in response.scores)


# --- gRPC request bytes ----------------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_as_a_score_request(score_bytes, data):
    expect_documented_grpc_answer(score_bytes, data)


texts = st.text(max_size=300)
records = st.dictionaries(texts, texts, max_size=8)


@st.composite
def score_requests(draw) -> pb.ScoreRequest:
    request = pb.ScoreRequest(model=draw(st.sampled_from(["", "shop", "nope", "shop@x"])),
                              tag=draw(st.sampled_from(["", "web.access"])),
                              explain=draw(st.integers(0, 120)), request_id=draw(texts))
    kind = draw(st.sampled_from(["lines", "structured", "event_stream", "none"]))
    if kind == "lines":
        request.lines.lines.extend(draw(st.lists(st.binary(max_size=2000), max_size=20)))
    elif kind == "structured":
        for record in draw(st.lists(records, max_size=20)):
            request.structured.records.add(fields=record)
    elif kind == "event_stream":
        request.event_stream = draw(event_streams())
    return request


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | texts | st.binary(max_size=100),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(texts | st.integers(-2**63, 2**63), inner, max_size=6),
    max_leaves=30)


@st.composite
def event_streams(draw) -> bytes:
    """Well-formed streams of odd records, odd entries, or either cut and flipped at random."""
    entries = draw(st.lists(st.one_of(
        st.tuples(st.integers(0, 2**32) | st.just(msgpack.ExtType(0, b"\0" * 8)),
                  st.dictionaries(texts, msgpack_values, max_size=6)).map(list),
        msgpack_values), max_size=10))
    data = b"".join(msgpack.packb(entry) for entry in entries)
    if data and draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        flip = draw(st.integers(0, 255))
        data = data[:cut] + bytes([flip]) + data[cut + 1:]
    return data


@FUZZ
@given(score_requests())
def test_well_formed_requests_with_odd_records(score_bytes, request):
    expect_documented_grpc_answer(score_bytes, request.SerializeToString())


# --- HTTP JSON -----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(texts, inner, max_size=6), max_leaves=40)
queries = st.dictionaries(st.sampled_from(["model", "tag", "explain", "timeout_ms", "x"]),
                          st.sampled_from(["", "0", "3", "shop", "abc", "-1", "1e309", "nan", "200", "%zz"]),
                          max_size=3)


def post(sidecar, body: bytes, query: dict, content_type: str = "application/json") -> int:
    connection = http.client.HTTPConnection("127.0.0.1", sidecar.http_port, timeout=10)
    try:
        target = "/v1/score" + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
        connection.request("POST", target, body, {"Content-Type": content_type})
        response = connection.getresponse()
        answer = response.read()
    finally:
        connection.close()
    assert response.status in HTTP_ANSWERS, (response.status, answer[:300], body[:200], query)
    if response.status != 200:
        assert "error" in json.loads(answer)
    return response.status


@FUZZ
@given(json_values, queries)
def test_any_json_body(sidecar, value, query):
    post(sidecar, json.dumps(value).encode(), query)


@FUZZ
@given(st.lists(st.one_of(records, json_values), max_size=20))
def test_arrays_of_odd_events(sidecar, events):
    post(sidecar, json.dumps({"records": events}).encode(), {})


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from(["application/json", "text/plain", ""]))
def test_random_bytes_as_a_body(sidecar, body, content_type):
    post(sidecar, body, {}, content_type)
