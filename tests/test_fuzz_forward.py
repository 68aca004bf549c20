"""Fuzzing the forward-protocol decoder of the real sidecar: random frames, mutated valid frames,
random compressed payloads. The sidecar must not crash, log no unhandled exception, keep its
memory bounded, and still relay a valid chunk afterwards. Bounded: a fixed number of examples."""

from __future__ import annotations

import gzip
import socket
import uuid

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .sidecar_process import ROOT, SidecarProcess, free_port
from .test_forward import ForwardReceiver, assert_peak_below, event_time, packed, send_chunk

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=40), st.binary(max_size=40),
                    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=6)),
                      max_leaves=30)
TIMES = st.one_of(st.integers(0, 2**32), st.floats(allow_nan=False), st.builds(event_time, st.integers(0, 2**31)),
                  VALUES)
RECORDS = st.dictionaries(st.text(max_size=12), VALUES, max_size=5)
ENTRIES = st.lists(st.one_of(st.tuples(TIMES, RECORDS).map(list), VALUES), max_size=20)
OPTIONS = st.one_of(st.none(), st.dictionaries(st.sampled_from(["chunk", "size", "compressed", "fluent_signal"]),
                                               VALUES, max_size=4))


def frame(tag, body, option) -> bytes:
    parts = [tag, body] + ([option] if option is not None else [])
    return msgpack.packb(parts, use_bin_type=True)


FRAMES = st.one_of(
    st.binary(max_size=400),  # anything at all
    st.builds(frame, st.one_of(st.text(max_size=20), VALUES), ENTRIES, OPTIONS),  # Forward-shaped
    st.builds(lambda tag, entries, option: frame(tag, packed(entries), option),  # PackedForward-shaped
              st.text(max_size=20), ENTRIES, OPTIONS),
    st.builds(lambda tag, entries, cut: frame(tag, gzip.compress(packed(entries))[:cut], {"compressed": "gzip"}),
              st.text(max_size=20), ENTRIES, st.integers(0, 200)),  # compressed, possibly truncated
    st.builds(lambda tag, junk: frame(tag, junk, {"compressed": "gzip", "chunk": "c"}),
              st.text(max_size=20), st.binary(max_size=200)),  # "compressed" junk
    st.builds(lambda tag, moment, record, option: msgpack.packb([tag, moment, record, option], use_bin_type=True),
              st.text(max_size=20), TIMES, RECORDS, OPTIONS),  # Message-shaped
)


def mutate(data: bytes, position: int, value: int) -> bytes:
    if not data:
        return data
    position %= len(data)
    return data[:position] + bytes([value]) + data[position + 1:]


@pytest.fixture(scope="module")
def forward_chain(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fuzz-forward")
    receiver = ForwardReceiver(free_port()).start()
    port = free_port()
    sidecar = SidecarProcess(ROOT / "models", workdir, forward=f"127.0.0.1:{port}",
                             forward_to=f"127.0.0.1:{receiver.port}", forward_idle_timeout_s=2,
                             forward_max_message_bytes=4 * 1024 * 1024).start()
    yield sidecar, port
    sidecar.stop()
    receiver.stop()


def deliver(port: int, data: bytes) -> None:
    """Send bytes, half-close, read whatever comes back until the sidecar closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)
        try:
            while connection.recv(65536):
                pass
        except (socket.timeout, ConnectionError):
            pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=FRAMES, position=st.integers(0, 10_000), value=st.integers(0, 255), mutated=st.booleans())
def test_any_bytes_on_the_forward_port_are_handled(forward_chain, data, position, value, mutated):
    sidecar, port = forward_chain
    deliver(port, mutate(data, position, value) if mutated else data)
    assert sidecar.process.poll() is None


def test_after_fuzzing_the_sidecar_still_relays_and_logged_no_unhandled_error(forward_chain):
    sidecar, port = forward_chain
    chunk = uuid.uuid4().hex
    assert send_chunk(port, ["web", [[1_700_000_000, {"message": "still here"}]], {"chunk": chunk}]) == {"ack": chunk}
    log = sidecar.log()
    assert "Traceback" not in log and "Unhandled exception" not in log and '"level": "error"' not in log
    assert_peak_below(sidecar, 300)
