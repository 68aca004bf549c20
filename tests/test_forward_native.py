"""The compiled ext hook forward mode decodes with (``_native.ExtHook``) gives what its Python
reference (``forward.ext_value``) gives: the same values of the same types, and the same errors,
for every ext value msgpack may hand over (any code, any bytes) and inside decoded messages."""

import os
import struct
import sys

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logscore.features import native
from logscore.servers import forward

pytestmark = pytest.mark.skipif(not native.built() and os.environ.get("CI") != "true",
                                reason="the compiled featurizer is not built (pip install -e . with gcc "
                                "and Python's headers; scripts/setup.sh)")


def compiled_hook():
    return native.module(True).ExtHook(msgpack.ExtType, forward.ext_value)


def outcome(hook, code, data):
    """What a hook gives: (type, value) or (error type, its text)."""
    try:
        value = hook(code, data)
    except Exception as error:  # noqa: BLE001 (compared, not handled)
        return type(error), str(error)
    return type(value), tuple(value), [type(item) for item in value]


@settings(max_examples=400, deadline=None)
@given(st.integers(-200, 200) | st.sampled_from([0, 0, 0, 2**63, -(2**63) - 1, 2**70]), st.binary(max_size=20))
def test_any_code_and_bytes_give_what_the_python_hook_gives(code, data):
    assert outcome(compiled_hook(), code, data) == outcome(forward.ext_value, code, data)


def test_event_times_are_ext_types_and_other_codes_are_checked():
    hook = compiled_hook()
    time = hook(0, struct.pack(">II", 1_700_000_000, 5))
    assert type(time) is msgpack.ExtType and time == msgpack.ExtType(0, struct.pack(">II", 1_700_000_000, 5))
    assert time.code == 0 and hash(time) == hash(msgpack.ExtType(0, time.data))
    with pytest.raises(ValueError, match="0~127"):
        hook(-1, b"x")  # a reserved code: refused as msgpack.ExtType refuses it


def test_anything_but_an_int_code_and_bytes_goes_to_the_other_hook():
    seen = []
    hook = native.module(True).ExtHook(msgpack.ExtType, lambda code, data: seen.append((code, data)) or "other")
    assert hook(False, b"x") == "other" and hook(0, bytearray(b"x")) == "other" and hook(0.0, b"x") == "other"
    assert hook(code=0, data=b"x") == "other"
    assert seen == [(False, b"x"), (0, bytearray(b"x")), (0.0, b"x"), (0, b"x")]


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="subclass of tuple"):
        native.module(True).ExtHook(dict, forward.ext_value)
    with pytest.raises(TypeError, match="callable"):
        native.module(True).ExtHook(msgpack.ExtType, 3)


ext_values = st.builds(lambda code, data: msgpack.ExtType(code, data), st.sampled_from([0, 0, 0, 1, 5, 127]),
                       st.binary(max_size=12))
documents = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=5) | ext_values,
                         lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner,
                                                                                     max_size=4), max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(documents, st.binary(max_size=3))
def test_decoded_messages_are_the_same_with_either_hook(document, reserved_tail):
    packed = msgpack.packb(document) + (b"\xd4\xfe" + reserved_tail[:1].ljust(1, b"\0") if reserved_tail else b"")

    def decoded(hook):
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, ext_hook=hook)
        unpacker.feed(packed)
        try:
            return [repr(value) for value in unpacker]
        except ValueError as error:  # a reserved ext code at the end
            return type(error), str(error)

    assert decoded(compiled_hook()) == decoded(forward.ext_value)


def test_no_reference_is_leaked():
    hook, data, code = compiled_hook(), b"12345678", 0
    before = sys.getrefcount(data), sys.getrefcount(hook)
    for _ in range(1000):
        hook(code, data)
        hook(3, data)
    assert (sys.getrefcount(data), sys.getrefcount(hook)) == before


def test_forward_mode_decodes_with_the_compiled_hook_unless_told_not_to(monkeypatch):
    assert isinstance(forward.ext_hook(), native.module(True).ExtHook)
    monkeypatch.setenv(native.FORCE_PYTHON_ENV, "1")
    assert forward.ext_hook() is forward.ext_value
