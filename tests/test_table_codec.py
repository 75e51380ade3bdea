"""The field-table codec (``_native._table``) against pamqp, its reference.

Byte for byte pamqp's encoding and pamqp's decoded values, except for the
divergences the module documents, each of which is tested here.
"""

from __future__ import annotations

import datetime
import struct
import time
from collections.abc import Mapping
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import decode, encode

from amqp_batch._transport._native import _table
from amqp_batch._transport._native._table import decode_table, encode_table

UTC = datetime.timezone.utc
_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
_U32 = struct.Struct(">I")

# Comparing values: the same type and the same value, floats bit for bit (NaN),
# decimals digit for digit, datetimes with their UTC offset.


def _same(ours: Any, theirs: Any) -> bool:
    if type(ours) is not type(theirs):
        return False
    if isinstance(ours, dict):
        return list(ours) == list(theirs) and all(
            _same(ours[key], theirs[key]) for key in ours
        )
    if isinstance(ours, list):
        return len(ours) == len(theirs) and all(map(_same, ours, theirs))
    if isinstance(ours, float):
        return struct.pack(">d", ours) == struct.pack(">d", theirs)
    if isinstance(ours, Decimal):
        return bool(ours.as_tuple() == theirs.as_tuple())
    if isinstance(ours, datetime.datetime):
        return bool(ours == theirs and ours.utcoffset() == theirs.utcoffset())
    return bool(ours == theirs)


def _decoded(data: bytes) -> dict[str, Any]:
    table, end = decode_table(data, 0, len(data))
    assert end == len(data)
    return table


def _pamqp_encoded(table: Mapping[str, Any]) -> bytes:
    return encode.field_table(dict(table))


def _pamqp_decoded(data: bytes) -> dict[str, Any]:
    consumed, table = decode.field_table(data)
    assert consumed == len(data)
    return table


def _entry(key: bytes, tag: bytes, payload: bytes) -> bytes:
    """A one-entry table, length prefix included."""
    body = bytes((len(key),)) + key + tag + payload
    return _U32.pack(len(body)) + body


def _long(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


# Strategies

#: Keys pamqp keeps whole: at most 32 characters is at most 128 UTF-8 bytes.
_keys = st.text(st.characters(codec="utf-8"), max_size=32)
_texts = st.text(st.characters(codec="utf-8"), max_size=30)
#: Where pamqp's choice of integer type changes.
_INT_BOUNDARIES = [
    *(
        n + d
        for n in (-(2**31), -32768, -128, 128, 32768, 65536, 2**31, 2**32)
        for d in (-1, 0, 1)
    ),
    -(2**63),
    2**63 - 1,
]
_ints = st.integers(-(2**63), 2**63 - 1) | st.sampled_from(_INT_BOUNDARIES)


def _decimal(mantissa: int, exponent: int) -> Decimal:
    sign = 0 if mantissa >= 0 else 1
    return Decimal((sign, tuple(map(int, str(abs(mantissa)))), exponent))


#: Decimals that round-trip exactly (a scale and a signed 32-bit mantissa)...
_exact_decimals = st.builds(
    _decimal, st.integers(-(2**31), 2**31 - 1), st.integers(-255, 0)
)
#: ... and, for the encoder, also those with a positive exponent.
_decimals = _exact_decimals | st.builds(
    _decimal, st.integers(-999, 999), st.integers(1, 6)
)
_offsets = st.integers(-23 * 60, 23 * 60).map(
    lambda minutes: datetime.timezone(datetime.timedelta(minutes=minutes))
)
_datetime_range = (datetime.datetime(1971, 1, 1), datetime.datetime(2200, 1, 1))
_tz: st.SearchStrategy[datetime.tzinfo] = st.just(UTC) | _offsets
_datetimes = st.datetimes(*_datetime_range) | st.datetimes(
    *_datetime_range, timezones=_tz
)  # naive (pamqp takes them as UTC) and aware
#: Timestamps pamqp decodes as seconds (at most 2**32 - 1), whole seconds, UTC.
_utc_seconds = st.integers(0, 2**32 - 1).map(
    lambda seconds: datetime.datetime.fromtimestamp(seconds, tz=UTC)
)
_bytearrays = st.binary(max_size=20).map(bytearray)

#: Values pamqp encodes as we do: no float, bytes, tuple or non-dict mapping.
_pamqp_leaves = (
    st.booleans()
    | _ints
    | _texts
    | st.none()
    | _decimals
    | _datetimes
    | st.integers(0, 2**33).map(time.gmtime)
    | _bytearrays
)


def _tables_of(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    values = st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(_keys, children, max_size=4)
        ),
        max_leaves=12,
    )
    return st.dictionaries(_keys, values, max_size=6)


_pamqp_tables = _tables_of(_pamqp_leaves)


def test_pamqp_is_in_its_default_mode() -> None:
    """We follow pamqp's integer types when it does not support old RabbitMQs."""
    assert not encode.DEPRECATED_RABBITMQ_SUPPORT


# Encoding: pamqp's bytes


@_SETTINGS
@given(_pamqp_tables)
def test_encoding_is_pamqps(table: dict[str, Any]) -> None:
    assert encode_table(table) == _pamqp_encoded(table)


@pytest.mark.parametrize("value", [0, -1, *_INT_BOUNDARIES])
def test_integers_take_pamqps_smallest_type(value: int) -> None:
    assert encode_table({"n": value}) == _pamqp_encoded({"n": value})


def test_subclasses_encode_as_their_base_type() -> None:
    class Text(str):
        pass

    class Number(int):
        pass

    table = {Text("key"): Text("value"), "n": Number(300), "t": True, "f": False}
    assert encode_table(table) == _pamqp_encoded(table)


def test_empty_and_nested_empty_tables() -> None:
    assert encode_table({}) == b"\x00\x00\x00\x00" == _pamqp_encoded({})
    table: dict[str, Any] = {"t": {}, "a": [], "aa": [[], {}]}
    assert encode_table(table) == _pamqp_encoded(table)


def test_timestamps_are_pamqps() -> None:
    table = {
        "naive": datetime.datetime(2024, 5, 1, 12, 30, 15, 999999),
        "utc": datetime.datetime(2024, 5, 1, 12, 30, 15, tzinfo=UTC),
        "offset": datetime.datetime(
            2024, 5, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))
        ),
        "struct_time": time.gmtime(1_700_000_000),
    }
    assert encode_table(table) == _pamqp_encoded(table)


def test_the_caches_keep_types_and_values_apart() -> None:
    """Encodings are remembered per key and (key, str value): the same key with
    another type or value, or a value equal to a cached one, still encodes right."""
    for value, decoded in (
        ("1", "1"),
        (1, 1),
        (True, True),
        (1.0, 1.0),
        ("1", "1"),
        ("2", "2"),
        (b"1", bytearray(b"1")),
    ):
        assert _same(_decoded(encode_table({"k": value})), {"k": decoded})
    assert encode_table({"k": "1"}) == _pamqp_encoded({"k": "1"})


def test_the_caches_are_bounded() -> None:
    for number in range(_table.STR_ENTRIES_MAX + 10):
        table = {f"key-{number}": f"value-{number}"}
        assert encode_table(table) == _pamqp_encoded(table)
    assert len(_table.STR_ENTRIES) <= _table.STR_ENTRIES_MAX
    assert len(_table.KEY_HEADS) <= _table.KEY_HEADS_MAX
    long_value = {"k": "v" * (_table.STR_ENTRY_VALUE_MAX + 1)}
    assert encode_table(long_value) == _pamqp_encoded(long_value)
    assert ("k", long_value["k"]) not in _table.STR_ENTRIES


# Decoding: pamqp's values


@_SETTINGS
@given(_tables_of(_pamqp_leaves | st.floats(width=32)))
def test_decoding_is_pamqps(table: dict[str, Any]) -> None:
    data = _pamqp_encoded(table)  # floats as pamqp sends them: 'f'
    assert _same(_decoded(data), _pamqp_decoded(data))


_T = datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)


@pytest.mark.parametrize(
    ("tag", "payload", "expected"),
    [
        (b"t", b"\x02", True),
        (b"t", b"\x00", False),
        (b"b", b"\xff", -1),
        (b"B", b"\xff", 255),
        (b"s", b"\xff\xfe", -2),
        (b"u", b"\xff\xfe", 65534),
        (b"I", b"\xff\xff\xff\xfe", -2),
        (b"i", b"\xff\xff\xff\xfe", 2**32 - 2),
        (b"l", b"\xff" * 7 + b"\xfe", -2),
        (b"L", b"\xff" * 7 + b"\xfe", -2),  # signed, as pamqp decodes it
        (b"f", struct.pack(">f", 1.5), 1.5),
        (b"d", struct.pack(">d", 0.1), 0.1),
        (b"D", b"\x02" + struct.pack(">i", -150), Decimal("-1.50")),
        (b"D", b"\x00" + struct.pack(">i", 7), Decimal("7")),
        (b"S", _long("héllo".encode()), "héllo"),
        (b"S", _long(b"\xff\xfe"), b"\xff\xfe"),  # not UTF-8: bytes
        (b"x", _long(b"\x00\x01"), bytearray(b"\x00\x01")),
        (b"T", struct.pack(">Q", 1_700_000_000), _T),
        # Past 2**32 - 1, pamqp takes the timestamp as milliseconds.
        (b"T", struct.pack(">Q", 1_700_000_000_123), _T.replace(microsecond=123000)),
        (b"V", b"", None),
        (b"\x00", b"", None),
        (b"A", encode.field_array([1, "a", [None]]), [1, "a", [None]]),
        (b"F", _pamqp_encoded({"a": {"b": 1}}), {"a": {"b": 1}}),
    ],
)
def test_every_type_tag_decodes_as_pamqp(
    tag: bytes, payload: bytes, expected: Any
) -> None:
    data = _entry(b"key", tag, payload)
    assert _same(_decoded(data), {"key": expected})
    assert _same(_decoded(data), _pamqp_decoded(data))


_FIXED_SIZES = {b"t": 1, b"b": 1, b"B": 1, b"s": 2, b"u": 2, b"I": 4, b"i": 4}
_FIXED_SIZES |= {b"l": 8, b"L": 8, b"f": 4, b"d": 8, b"D": 5}
_payloads = st.one_of(
    *(
        st.tuples(st.just(tag), st.binary(min_size=size, max_size=size))
        for tag, size in _FIXED_SIZES.items()
    ),
    st.tuples(st.sampled_from([b"S", b"x"]), st.binary(max_size=20).map(_long)),
    st.tuples(st.sampled_from([b"V", b"\x00"]), st.just(b"")),
    st.tuples(
        st.just(b"T"),
        (
            st.integers(0, 2**32 - 1)
            | st.integers(2**32, 253_402_300_799_999)  # milliseconds, to 9999
            | st.integers(0, 2**64 - 1)
        ).map(struct.Struct(">Q").pack),
    ),
)


@_SETTINGS
@given(key=_keys, tagged=_payloads)
def test_any_value_of_any_tag_decodes_as_pamqp(
    key: str, tagged: tuple[bytes, bytes]
) -> None:
    """Every bit pattern of every type, including timestamps out of range (pamqp
    lets OverflowError and others escape; we raise ValueError)."""
    data = _entry(key.encode(), *tagged)
    try:
        theirs = _pamqp_decoded(data)
    except (ValueError, OverflowError, OSError):
        with pytest.raises(ValueError, match="out of range"):
            _decoded(data)
    else:
        assert _same(_decoded(data), theirs)


@_SETTINGS
@given(table=_pamqp_tables, data=st.data())
def test_damaged_tables_fail_cleanly_or_decode_as_pamqp(
    table: dict[str, Any], data: st.DataObject
) -> None:
    """A byte changed or the data cut short: a ValueError (or struct.error,
    IndexError, which the framing layer also catches), or, when it still
    decodes, pamqp's values."""
    encoded = bytearray(_pamqp_encoded(table))
    if data.draw(st.booleans(), label="truncate"):
        del encoded[data.draw(st.integers(0, len(encoded) - 1), label="at") :]
    else:
        encoded[data.draw(st.integers(0, len(encoded) - 1), label="at")] = data.draw(
            st.integers(0, 255), label="byte"
        )
    damaged = bytes(encoded)
    try:
        ours, end = decode_table(damaged, 0, len(damaged))
    except (ValueError, IndexError, struct.error):
        return
    try:
        theirs = decode.field_table(damaged[:end])[1]
    except UnicodeDecodeError:  # a key made invalid: we decode it with U+FFFD
        return
    assert _same(ours, theirs)


# Round trip


def _normalized(value: Any) -> Any:
    """What a value decodes back to: tuples as lists, bytes as bytearray."""
    if isinstance(value, Mapping):
        return {key: _normalized(item) for key, item in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_normalized(item) for item in value]
    if isinstance(value, bytes):
        return bytearray(value)
    return value


_round_trip_leaves = (
    st.booleans()
    | _ints
    | _texts
    | st.none()
    | st.floats()  # NaN and infinities too: doubles are exact
    | _exact_decimals
    | _utc_seconds
    | st.binary(max_size=20)
    | _bytearrays
)
_long_keys = st.text(st.characters(codec="utf-8"), max_size=64).filter(
    lambda key: len(key.encode()) <= 255
)
_round_trip_tables = st.dictionaries(
    _long_keys,
    st.recursive(
        _round_trip_leaves,
        lambda children: (
            st.lists(children, max_size=4)
            | st.lists(children, max_size=4).map(tuple)
            | st.dictionaries(_keys, children, max_size=4)
        ),
        max_leaves=12,
    ),
    max_size=6,
)


@_SETTINGS
@given(_round_trip_tables)
def test_round_trip(table: dict[str, Any]) -> None:
    assert _same(_decoded(encode_table(table)), _normalized(table))


# The divergences from pamqp, on purpose


def test_floats_are_doubles() -> None:
    """pamqp sends 'f' (32 bits) and loses precision; we send 'd'."""
    data = encode_table({"x": 0.1})
    assert data == _entry(b"x", b"d", struct.pack(">d", 0.1))
    assert _pamqp_encoded({"x": 0.1}) == _entry(b"x", b"f", struct.pack(">f", 0.1))
    assert _decoded(data) == {"x": 0.1}
    assert _pamqp_decoded(_pamqp_encoded({"x": 0.1})) != {"x": 0.1}


def test_bytes_are_byte_arrays() -> None:
    """pamqp refuses bytes; we send them as 'x', as pamqp sends bytearray."""
    with pytest.raises(TypeError):
        _pamqp_encoded({"x": b"\xff\x00"})
    data = encode_table({"x": b"\xff\x00", "nested": {"a": [b"\x80"]}})
    assert data == _pamqp_encoded(
        {"x": bytearray(b"\xff\x00"), "nested": {"a": [bytearray(b"\x80")]}}
    )
    assert encode_table({"x": bytearray(b"\xff")}) == _pamqp_encoded(
        {"x": bytearray(b"\xff")}
    )


def test_a_long_string_that_is_not_utf8_goes_back_out_with_its_bytes() -> None:
    received = _decoded(_entry(b"raw", b"S", _long(b"\xff\xfe")))
    assert received == {"raw": b"\xff\xfe"}
    assert _decoded(encode_table(received)) == {"raw": bytearray(b"\xff\xfe")}


def test_a_key_that_is_not_utf8_decodes_with_replacement_characters() -> None:
    data = _entry(b"x-\xff\xfeid", b"S", _long(b"v"))
    with pytest.raises(UnicodeDecodeError):
        decode.field_table(data)
    assert _decoded(data) == {"x-\ufffd\ufffdid": "v"}
    nested = _entry(b"outer", b"F", data)
    assert _decoded(nested) == {"outer": {"x-\ufffd\ufffdid": "v"}}


@pytest.mark.parametrize("key", ["k" * 129, "k" * 255, "é" * 127 + "k"])
def test_keys_up_to_255_bytes_are_kept_whole(key: str) -> None:
    """pamqp truncates keys to 128 bytes (with a warning); a short string holds
    255, and RabbitMQ takes them."""
    data = encode_table({key: 1})
    assert _decoded(data) == {key: 1}
    assert _pamqp_decoded(_pamqp_encoded({key: 1})) != {key: 1}


@pytest.mark.parametrize("key", ["k" * 256, "é" * 128, "€" * 100])
def test_longer_keys_are_refused_naming_them(key: str) -> None:
    with pytest.raises(ValueError, match="header key") as info:
        encode_table({key: 1})
    message = str(info.value)
    assert key[:40] in message
    assert key not in message  # shortened
    assert f"{len(key.encode())} bytes" in message


def test_any_mapping_is_a_table_and_a_tuple_an_array() -> None:
    table = {"b": 1, "a": {"c": "d"}, "e": [1, "f"]}
    expected = _pamqp_encoded(table)
    assert encode_table(MappingProxyType(table)) == expected
    assert encode_table({**table, "a": MappingProxyType({"c": "d"})}) == expected
    assert encode_table({**table, "e": (1, "f")}) == expected


# Errors


def test_unsupported_types_name_the_key_and_the_type() -> None:
    with pytest.raises(TypeError, match=r"^header 'x' error: unsupported type object$"):
        encode_table({"x": object()})
    with pytest.raises(
        TypeError, match=r"^header 'a' error: header 'b' error: unsupported type set$"
    ):
        encode_table({"a": {"b": {1}}})
    with pytest.raises(
        TypeError, match=r"^header 'a' error: item 1 error: unsupported type complex$"
    ):
        encode_table({"a": [1, 1j]})
    with pytest.raises(TypeError, match="unsupported type date"):
        encode_table({"d": datetime.date(2024, 1, 1)})


def test_values_out_of_range_name_the_key() -> None:
    with pytest.raises(
        TypeError, match=r"header 'n' error: integer 9223372036854775808"
    ):
        encode_table({"n": 2**63})
    with pytest.raises(TypeError, match="header 'n' error: integer"):
        encode_table({"n": -(2**63) - 1})
    with pytest.raises(TypeError, match="header 'd' error: cannot encode NaN"):
        encode_table({"d": Decimal("NaN")})
    with pytest.raises(TypeError, match=r"header 'd' error: decimal .* mantissa"):
        encode_table({"d": Decimal(2**31)})
    with pytest.raises(TypeError, match=r"header 'd' error: decimal .* 255 digits"):
        encode_table({"d": Decimal("1E-256")})
    with pytest.raises(ValueError, match=r"header 't' error: timestamp .* before 1970"):
        encode_table({"t": datetime.datetime(1969, 12, 31, tzinfo=UTC)})
    with pytest.raises(ValueError, match=r"header 's' error: .*surrogate"):
        encode_table({"s": "\ud800"})
    with pytest.raises(
        ValueError, match=r"header 's' error: item 0 error: .*surrogate"
    ):
        encode_table({"s": ["\ud800"]})


def test_bad_keys_are_named() -> None:
    with pytest.raises(TypeError, match="header key 1 is not a str but int"):
        encode_table({1: "a"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="header key 1 is not a str but int"):
        encode_table({"a": "b", 1: "c"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="header key '\\\\ud800' is not valid Unicode"):
        encode_table({"\ud800": 1})
    with pytest.raises(TypeError, match="a table must be a mapping, not list"):
        encode_table([("a", 1)])  # type: ignore[arg-type]


def test_truncated_tables_are_refused() -> None:
    data = encode_table({"key": "value", "n": 1})
    with pytest.raises(ValueError, match=f"field table of {len(data) - 4} bytes runs"):
        decode_table(data, 0, len(data) - 1)
    with pytest.raises(ValueError, match="field table length runs past"):
        decode_table(data, 0, 3)
    with pytest.raises(ValueError, match="field table length runs past"):
        decode_table(b"", 0, 0)


def test_values_that_run_past_their_table_are_refused() -> None:
    # A long string claiming 100 bytes, in a table of 8 (the buffer goes on).
    lying = _entry(b"k", b"S", _U32.pack(100) + b"ab") + b"\x00" * 200
    with pytest.raises(ValueError, match="header 'k': long string runs past"):
        decode_table(lying, 0, len(lying))
    cut = _entry(b"k", b"S", b"\x00\x00")  # its length is cut short
    with pytest.raises(ValueError, match="header 'k': long string runs past"):
        decode_table(cut, 0, len(cut))
    for tag in (b"b", b"s", b"I", b"l", b"d", b"D", b"T"):
        short = _entry(b"k", tag, b"")
        with pytest.raises(ValueError, match=r"header 'k': .*runs past"):
            decode_table(short, 0, len(short))
    key_only = _U32.pack(4) + b"\x03abc"  # no room for the type tag
    with pytest.raises(ValueError, match="key runs past"):
        decode_table(key_only, 0, len(key_only))
    inner = _entry(b"inner", b"x", _U32.pack(50))
    with pytest.raises(
        ValueError, match=r"header 'outer': header 'inner': .*runs past"
    ):
        decode_table(_entry(b"outer", b"F", inner), 0, len(inner) + 11)
    array = _entry(b"a", b"A", _U32.pack(3) + b"S\x00\x00")
    with pytest.raises(ValueError, match=r"header 'a': item 0: .*runs past"):
        decode_table(array, 0, len(array))


def test_unknown_type_tags_are_refused_naming_them() -> None:
    data = _entry(b"k", b"Z", b"\x00")
    with pytest.raises(ValueError, match=r"^header 'k': unknown field type b'Z'$"):
        decode_table(data, 0, len(data))
    nested = _entry(b"outer", b"A", _long(b"b\x01Z"))
    with pytest.raises(
        ValueError, match=r"^header 'outer': item 1: unknown field type b'Z'$"
    ):
        decode_table(nested, 0, len(nested))


def test_timestamps_out_of_range_raise_value_error() -> None:
    data = _entry(b"t", b"T", b"\xff" * 8)
    with pytest.raises(ValueError, match=r"header 't': timestamp .* out of range"):
        decode_table(data, 0, len(data))


# Decoding inside a frame


def test_decodes_at_an_offset_inside_a_larger_buffer() -> None:
    table = {"x-retry-count": 2, "trace": "abc", "nested": {"a": [1, "b"]}}
    encoded = encode_table(table)
    buffer = b"\xaa" * 17 + encoded + b"\x01\x02\x03"
    start, end = 17, 17 + len(encoded)
    assert decode_table(buffer, start, len(buffer)) == (table, end)
    assert decode_table(buffer, start, end) == (table, end)
    # ``end`` is respected even though the buffer goes on.
    with pytest.raises(ValueError, match="runs past"):
        decode_table(buffer, start, end - 1)


def test_an_empty_table_at_an_offset() -> None:
    buffer = b"ab\x00\x00\x00\x00cd"
    assert decode_table(buffer, 2, len(buffer)) == ({}, 6)
