"""AMQP 0-9-1 field tables (message headers, arguments): encoder and decoder.

A faster stand-in for pamqp's ``encode.field_table`` / ``decode.field_table`` on
the hot paths (republishing message copies with their headers, decoding content
header ``headers``). The decoder reads at an offset inside the frame instead of
slicing copies of it.

Compatible with pamqp: the decoder gives pamqp's values for every type tag pamqp
knows (``t b B s u I i l L f d D S A T F V x`` and ``\\x00`` for void): a long
string that is not UTF-8 decodes to :class:`bytes`, a byte array to
:class:`bytearray`, a timestamp to an aware UTC :class:`~datetime.datetime` (a
value past 2**32 - 1 is taken as milliseconds), ``L`` as a signed 64-bit integer.
The encoder gives pamqp's bytes (keys sorted, the smallest integer type that fits,
naive datetimes taken as UTC) for every table pamqp can encode, with the
deliberate divergences below.

Divergences from pamqp, on purpose:

* A key that is not UTF-8 decodes with U+FFFD for the bad bytes (pamqp raises):
  RabbitMQ passes any bytes through, and one bad header must not take down the
  connection.
* A :class:`float` is encoded as ``d`` (64-bit double), so that it round-trips
  exactly; pamqp encodes ``f`` (32-bit), which loses precision.
* :class:`bytes` is encoded as a byte array ``x``, like :class:`bytearray`; pamqp
  refuses ``bytes``. So a long string that decoded to bytes can be sent again,
  with the same bytes.
* A key of 129 to 255 UTF-8 bytes is kept whole (pamqp truncates it to 128 bytes
  with a warning); a longer one raises :class:`ValueError` (a short string cannot
  hold it).
* Any :class:`~collections.abc.Mapping` encodes as a table and a :class:`tuple` as
  an array (pamqp wants ``dict`` and ``list``).
* A bad value is reported as :class:`TypeError` (unsupported type, integer or
  decimal out of range) or :class:`ValueError` (text that is not encodable, a
  timestamp before 1970), naming the key, for example ``header 'x' error:
  unsupported type object``; a key that is not a str raises :class:`TypeError`
  (pamqp: AttributeError).
* A malformed table raises :class:`ValueError` naming what ran past the end; a
  value must end inside its table (pamqp reads on). A timestamp out of
  :class:`~datetime.datetime`'s range raises :class:`ValueError` too (pamqp lets
  OverflowError or OSError out).
"""

from __future__ import annotations

import calendar
import datetime
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

__all__ = ["decode_table", "encode_table"]

_UTC = datetime.timezone.utc
_U32 = struct.Struct(">I")
_EMPTY_TABLE = b"\x00\x00\x00\x00"
# Tag + value, packed in one call.
_TAGGED_U32 = struct.Struct(">cI")  # i; the length of S, x, A
_TAGGED_I16 = struct.Struct(">ch")
_TAGGED_U16 = struct.Struct(">cH")
_TAGGED_I32 = struct.Struct(">ci")
_TAGGED_I64 = struct.Struct(">cq")
_TAGGED_U64 = struct.Struct(">cQ")  # T
_TAGGED_DOUBLE = struct.Struct(">cd")
_TAGGED_DECIMAL = struct.Struct(">cBi")
_DECIMAL = struct.Struct(">Bi")
_TIMESTAMP = struct.Struct(">Q")
#: ``b`` and one byte for -128..127. Indexed by the value itself: a negative index
#: counts from the end, which is where its two's complement byte is.
_SMALL_INTS = tuple(bytes((0x62, byte)) for byte in range(256))
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1

# Copies of a message carry the same header names and mostly the same string
# values (x-original-exchange...): their encodings are remembered. Both caches
# are bounded (emptied when full) and hold only exact ``str`` keys.
#: key -> length octet + UTF-8.
KEY_HEADS: dict[str, bytes] = {}
KEY_HEADS_MAX = 1024
#: (key, str value) -> the whole entry: key head, ``S``, length, UTF-8.
STR_ENTRIES: dict[tuple[str, str], bytes] = {}
STR_ENTRIES_MAX = 2048
STR_ENTRY_VALUE_MAX = 128  # longer values are not remembered (bounds the memory)


def encode_table(table: Mapping[str, Any]) -> bytes:
    """Encode ``table`` as an AMQP field table, its 4-byte length included.

    Raises :class:`TypeError` or :class:`ValueError` naming the key of a value
    that cannot be encoded (see the module docstring).
    """
    if not table:
        return _EMPTY_TABLE
    if type(table) is not dict and not isinstance(table, Mapping):
        raise TypeError(f"a table must be a mapping, not {type(table).__name__}")
    parts: list[bytes] = []
    append = parts.append
    str_entries = STR_ENTRIES
    key_heads = KEY_HEADS
    small_ints = _SMALL_INTS
    for key in _sorted_keys(table):
        value = table[key]
        cls = type(value)
        if cls is str:
            append(str_entries.get((key, value)) or _str_entry(key, value))
            continue
        append(key_heads.get(key) or _key_head(key))
        if cls is int and -128 <= value <= 127:
            append(small_ints[value])
            continue
        try:
            append(_encode_value(value))
        except (TypeError, ValueError, struct.error) as exc:
            raise _named(exc, f"header {key!r}") from exc
    body = b"".join(parts)
    return _U32.pack(len(body)) + body


def _sorted_keys(table: Mapping[str, Any]) -> list[str]:
    """The keys in pamqp's order; a key that is not a str raises TypeError."""
    try:
        return sorted(table)
    except TypeError:
        for key in table:
            _key_head(key)  # raises for the key that is not a str
        raise


def _key_head(key: object) -> bytes:
    """The encoded key: its length octet and UTF-8 bytes."""
    if not isinstance(key, str):
        raise TypeError(f"header key {key!r} is not a str but {type(key).__name__}")
    try:
        encoded = key.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"header key {key!r} is not valid Unicode: {exc}") from None
    if len(encoded) > 255:
        raise ValueError(
            f"header key {key[:40]!r}... is {len(encoded)} bytes in UTF-8, "
            "more than the 255 an AMQP field name can hold"
        )
    head = bytes((len(encoded),)) + encoded
    if type(key) is str:
        if len(KEY_HEADS) >= KEY_HEADS_MAX:
            KEY_HEADS.clear()
        KEY_HEADS[key] = head
    return head


def _str_entry(key: str, value: str) -> bytes:
    """A whole entry whose value is a str (remembered if short)."""
    head = KEY_HEADS.get(key) or _key_head(key)
    try:
        encoded = value.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"header {key!r} error: {exc}") from None
    entry = head + _TAGGED_U32.pack(b"S", len(encoded)) + encoded
    if type(key) is str and len(value) <= STR_ENTRY_VALUE_MAX:
        if len(STR_ENTRIES) >= STR_ENTRIES_MAX:
            STR_ENTRIES.clear()
        STR_ENTRIES[key, value] = entry
    return entry


def _named(exc: Exception, where: str) -> Exception:
    """``exc`` (a TypeError, else a ValueError) with ``where`` in front."""
    cls = TypeError if isinstance(exc, TypeError) else ValueError
    return cls(f"{where} error: {exc}")


def _encode_value(value: object) -> bytes:
    """One tagged value; the type checks follow pamqp's order."""
    if type(value) is str:
        encoded = value.encode()
        return _TAGGED_U32.pack(b"S", len(encoded)) + encoded
    if type(value) is int:
        return _encode_int(value)
    if value is None:
        return b"V"
    if isinstance(value, bool):  # before int: bool is an int
        return b"t\x01" if value else b"t\x00"
    if isinstance(value, int):
        return _encode_int(value)
    if isinstance(value, Decimal):
        return _encode_decimal(value)
    if isinstance(value, float):
        return _TAGGED_DOUBLE.pack(b"d", value)
    if isinstance(value, str):
        encoded = value.encode()
        return _TAGGED_U32.pack(b"S", len(encoded)) + encoded
    if isinstance(value, (datetime.datetime, time.struct_time)):
        return _encode_timestamp(value)
    if isinstance(value, Mapping):
        return b"F" + encode_table(value)
    if isinstance(value, (list, tuple)):
        return _encode_array(value)
    if isinstance(value, (bytes, bytearray)):
        return _TAGGED_U32.pack(b"x", len(value)) + value
    raise TypeError(f"unsupported type {type(value).__name__}")


def _encode_array(items: Sequence[Any]) -> bytes:
    """A field array: ``A``, its length, then each tagged value."""
    parts: list[bytes] = []
    for index, item in enumerate(items):
        try:
            parts.append(_encode_value(item))
        except (TypeError, ValueError, struct.error) as exc:
            raise _named(exc, f"item {index}") from exc
    body = b"".join(parts)
    return _TAGGED_U32.pack(b"A", len(body)) + body


def _encode_int(value: int) -> bytes:
    """The smallest integer type that holds ``value``, as pamqp chooses it."""
    if -128 <= value <= 127:
        return _SMALL_INTS[value]
    if -32768 <= value <= 32767:
        return _TAGGED_I16.pack(b"s", value)
    if 0 <= value <= 65535:
        return _TAGGED_U16.pack(b"u", value)
    if _I32_MIN <= value <= _I32_MAX:
        return _TAGGED_I32.pack(b"I", value)
    if 0 <= value <= 4294967295:
        return _TAGGED_U32.pack(b"i", value)
    if _I64_MIN <= value <= _I64_MAX:
        return _TAGGED_I64.pack(b"l", value)
    raise TypeError(f"integer {value} is outside the signed 64-bit range")


def _encode_decimal(value: Decimal) -> bytes:
    """A decimal as scale and 32-bit mantissa, by pamqp's rules."""
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):  # NaN, Infinity
        raise TypeError(f"cannot encode {value} as a decimal")
    if exponent > 0:
        scale, mantissa = 0, int(value)
    else:
        scale = -exponent
        mantissa = int(value.scaleb(scale))
    if scale > 255:
        raise TypeError(f"decimal {value} has more than 255 digits after the point")
    if not _I32_MIN <= mantissa <= _I32_MAX:
        raise TypeError(f"decimal {value} has a mantissa outside the signed 32 bits")
    return _TAGGED_DECIMAL.pack(b"D", scale, mantissa)


def _encode_timestamp(value: datetime.datetime | time.struct_time) -> bytes:
    """Seconds since the epoch; a naive datetime is taken as UTC (as pamqp)."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            value = value.replace(tzinfo=_UTC)
        seconds = int(value.timestamp())
    else:
        seconds = calendar.timegm(value)
    if seconds < 0:
        raise ValueError(f"timestamp {value} is before 1970")
    return _TAGGED_U64.pack(b"T", seconds)


# Decoding

#: Fixed-size values: tag -> (unpack_from, size).
_FIXED: dict[int, tuple[Callable[[bytes, int], tuple[Any, ...]], int]] = {
    ord(tag): (struct.Struct(fmt).unpack_from, struct.calcsize(fmt))
    for tag, fmt in (
        ("t", ">?"),
        ("b", ">b"),
        ("B", ">B"),
        ("s", ">h"),
        ("u", ">H"),
        ("I", ">i"),
        ("i", ">I"),
        ("l", ">q"),
        ("L", ">q"),  # signed, as pamqp decodes it
        ("f", ">f"),
        ("d", ">d"),
    )
}
_LONG_STR = ord("S")
_SHORT_SHORT_INT = ord("b")
_VOID = (ord("V"), 0)  # NUL: not in the errata, seen in the wild (as pamqp)
_TABLE = ord("F")
_ARRAY = ord("A")
_BYTE_ARRAY = ord("x")
_TIMESTAMP_TAG = ord("T")
_DECIMAL_TAG = ord("D")
_POWERS_OF_TEN = tuple(Decimal(10) ** -scale for scale in range(256))


def _extent(
    data: bytes, offset: int, end: int, what: str, limit: str
) -> tuple[int, int]:
    """Where the contents of the field table or array ``what`` at ``offset``
    (32-bit length first) start and end; they must end by ``end``, which the
    error calls ``limit``."""
    start = offset + 4
    if start > end:
        raise ValueError(f"{what} length runs past {limit}")
    (length,) = _U32.unpack_from(data, offset)
    stop = start + length
    if stop > end:
        raise ValueError(f"{what} of {length} bytes runs past {limit}")
    return start, stop


def decode_table(data: bytes, offset: int, end: int) -> tuple[dict[str, Any], int]:
    """Decode the field table (length prefix included) at ``offset`` in ``data``.

    Returns the table and the offset just past it. Raises :class:`ValueError`
    when the table, or a value in it, runs past ``end`` (or past its enclosing
    table), or a value has an unknown type tag.
    """
    table_start, table_end = _extent(
        data, offset, end, "field table", "the end of the data"
    )
    table: dict[str, Any] = {}
    fixed = _FIXED
    unpack_length = _U32.unpack_from
    position = table_start
    while position < table_end:
        key_end = position + 1 + data[position]
        if key_end >= table_end:  # the key and its type tag
            raise ValueError("field table key runs past the end of its table")
        raw = data[position + 1 : key_end]
        try:
            key = raw.decode()
        except UnicodeDecodeError:  # errors= makes decode() slower: only if needed
            key = raw.decode("utf-8", "replace")
        tag = data[key_end]
        if tag == _LONG_STR:
            value_start = key_end + 5
            if value_start > table_end:
                raise ValueError(f"header {key!r}: long string runs past its table")
            position = value_start + unpack_length(data, key_end + 1)[0]
            if position > table_end:
                raise ValueError(f"header {key!r}: long string runs past its table")
            raw = data[value_start:position]
            try:
                table[key] = raw.decode()
            except UnicodeDecodeError:
                table[key] = raw
        elif tag == _SHORT_SHORT_INT:  # what small ints encode as: no unpack call
            position = key_end + 2
            if position > table_end:
                raise ValueError(f"header {key!r}: value runs past its table")
            table[key] = (data[key_end + 1] ^ 0x80) - 0x80  # the octet, signed
        elif tag in fixed:
            unpack, size = fixed[tag]
            position = key_end + 1 + size
            if position > table_end:
                raise ValueError(f"header {key!r}: value runs past its table")
            table[key] = unpack(data, key_end + 1)[0]
        else:
            try:
                table[key], position = _decode_value(tag, data, key_end + 1, table_end)
            except ValueError as exc:
                raise ValueError(f"header {key!r}: {exc}") from None
    return table, table_end


def _decode_value(tag: int, data: bytes, position: int, end: int) -> tuple[Any, int]:
    """Decode the value of type ``tag`` at ``position``; it must end by ``end``."""
    unpack = _FIXED.get(tag)
    if unpack is not None:
        value_end = position + unpack[1]
        if value_end > end:
            raise ValueError(f"{chr(tag)!r} value runs past its table")
        return unpack[0](data, position)[0], value_end
    if tag == _LONG_STR:
        raw, position = _long_bytes(data, position, end)
        try:
            return raw.decode(), position
        except UnicodeDecodeError:
            return raw, position
    if tag in _VOID:
        return None, position
    if tag == _TABLE:
        return decode_table(data, position, end)
    if tag == _ARRAY:
        return _decode_array(data, position, end)
    if tag == _BYTE_ARRAY:
        raw, position = _long_bytes(data, position, end)
        return bytearray(raw), position
    if tag == _TIMESTAMP_TAG:
        if position + 8 > end:
            raise ValueError("timestamp runs past its table")
        (stamp,) = _TIMESTAMP.unpack_from(data, position)
        return _timestamp(stamp), position + 8
    if tag == _DECIMAL_TAG:
        if position + 5 > end:
            raise ValueError("decimal runs past its table")
        scale, mantissa = _DECIMAL.unpack_from(data, position)
        return Decimal(mantissa) * _POWERS_OF_TEN[scale], position + 5
    raise ValueError(f"unknown field type {bytes((tag,))!r}")


def _long_bytes(data: bytes, position: int, end: int) -> tuple[bytes, int]:
    """The bytes of a long string or byte array (32-bit length first)."""
    value_start = position + 4
    if value_start <= end:
        (size,) = _U32.unpack_from(data, position)
        value_end = value_start + size
        if value_end <= end:
            return data[value_start:value_end], value_end
    raise ValueError("long string or byte array runs past its table")


def _decode_array(data: bytes, position: int, end: int) -> tuple[list[Any], int]:
    """Decode a field array (length prefix included) at ``position``."""
    items_start, array_end = _extent(data, position, end, "field array", "its table")
    items: list[Any] = []
    position = items_start
    while position < array_end:
        try:
            item, position = _decode_value(
                data[position], data, position + 1, array_end
            )
        except ValueError as exc:
            raise ValueError(f"item {len(items)}: {exc}") from None
        items.append(item)
    return items, array_end


def _timestamp(stamp: int) -> datetime.datetime:
    """Seconds since the epoch as an aware UTC datetime; like pamqp, a value past
    2**32 - 1 is taken as milliseconds."""
    try:
        if stamp > 0xFFFFFFFF:
            return datetime.datetime.fromtimestamp(stamp / 1000.0, tz=_UTC)
        return datetime.datetime.fromtimestamp(stamp, tz=_UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"timestamp {stamp} is out of range") from None
