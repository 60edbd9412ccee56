"""The JSON codec: two encoders, one policy.

orjson encodes sessions made only of scalars; the standard library everything else and
decides what can be stored. These tests pin that the fast encoder never accepts, drops or
changes anything the policy would not.
"""

from __future__ import annotations

import datetime
import enum
import json
import math
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clustersess import SessionValueError, codec

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # beyond 64 bits too: orjson refuses those, the fallback must take them
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),  # lone surrogates included: they must be refused, never stored
)


def stdlib(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


@given(st.dictionaries(st.text(), scalars, max_size=8))
def test_scalar_sessions_round_trip_exactly_as_the_standard_library_would(data: dict[str, Any]) -> None:
    try:
        expected: bytes | None = stdlib(data)
    except (ValueError, TypeError):
        expected = None  # not storable: a lone surrogate somewhere
    assert codec.only_scalars(data)
    if expected is None:
        with pytest.raises(SessionValueError):
            codec.encode(data)
        return
    raw = codec.encode(data)
    # Not always byte-equal (orjson spells some floats differently, e.g. 1e16 against
    # 1e+16) but always the same value, with the same types, after decoding.
    decoded = codec.decode(raw)
    assert decoded == json.loads(expected)
    assert [type(v) for v in decoded.values()] == [type(v) for v in data.values()]
    assert codec.encode(data) == raw  # canonical: unchanged data encodes to the same bytes


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_not_written_as_null(bad: float) -> None:
    # Reaching the encoder past check_value() (dict.__setitem__, as a careless subclass
    # or a decoded payload could): orjson alone would store null.
    data: dict[str, Any] = {"ok": None}
    dict.__setitem__(data, "x", bad)
    with pytest.raises(SessionValueError, match=r"session\['x'\]"):
        codec.encode(data)


def test_a_null_that_is_really_none_still_takes_the_fast_path() -> None:
    assert codec.encode({"a": None, "b": "null"}) == b'{"a":null,"b":"null"}'


@pytest.mark.parametrize(
    "value",
    [
        datetime.datetime(2026, 1, 1),
        uuid.UUID(int=1),
        enum.Enum("Color", "RED").RED,
        {1, 2},
        b"bytes",
    ],
    ids=["datetime", "uuid", "enum", "set", "bytes"],
)
def test_what_orjson_would_take_but_the_policy_refuses(value: Any) -> None:
    with pytest.raises(SessionValueError):
        codec.check_value("k", value)
    # and nested, past check_value (an in-place mutation): still refused at commit
    with pytest.raises(SessionValueError, match=r"session\['k'\]"):
        codec.encode({"k": [value]})


def test_non_str_keys_take_the_standard_library_path() -> None:
    data: dict[Any, Any] = {1: "one"}
    assert codec.encode(data) == stdlib(data)


@pytest.mark.parametrize(
    ("value", "scalar"),
    [("ascii", True), ("ünïcode", True), (1, True), (2**100, True), (1.5, True), (True, True),
     (None, True), ([1], False), ({"a": 1}, False), ((1, 2), False)],
)
def test_check_value_tells_scalars(value: Any, scalar: bool) -> None:
    assert codec.check_value("k", value) is scalar


def test_bool_subclass_of_int_is_still_a_scalar_but_int_subclasses_are_not() -> None:
    class MyInt(int):
        pass

    assert codec.check_value("k", True) is True
    assert codec.check_value("k", MyInt(3)) is False  # stored as 3, but not provably immutable
