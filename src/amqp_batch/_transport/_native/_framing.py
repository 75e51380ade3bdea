"""Sans-IO framing: bytes in, frames out; frames out, bytes in.

This module cuts the byte stream into frames, reassembles content (method +
header + any number of body frames) into messages, and encodes publishes. The hot
paths are ours (``basic.deliver``, content headers straight into the contract's
:class:`~amqp_batch._transport._base.Properties`, header tables in
:mod:`._table`, ``basic.publish``, ``basic.ack``/``nack``/``reject``); pamqp does
every other method. Nothing here does I/O, so all of it is tested without a
socket, against pamqp as the reference.
"""

from __future__ import annotations

import operator
import struct
from typing import Any, ClassVar, NoReturn

import attrs
from pamqp import commands, decode, encode, frame
from pamqp import constants as amqp_constants
from pamqp.base import Frame as MethodFrame
from pamqp.body import ContentBody
from pamqp.exceptions import UnmarshalingException
from pamqp.heartbeat import Heartbeat

from ..._exceptions import ProtocolError
from .._base import Delivery, Properties
from ._table import decode_table, encode_table

__all__ = [
    "ContentHeaderFrame",
    "FrameParser",
    "IncomingContent",
    "PendingContent",
    "encode_ack",
    "encode_nack",
    "encode_publish",
    "encode_reject",
    "marshal_method",
]

_FRAME_HEADER = struct.Struct(">BHI")
_METHOD_INDEX = struct.Struct(">I")
_FRAME_HEADER_SIZE = 7
_FRAME_END = amqp_constants.FRAME_END
_FRAME_METHOD = amqp_constants.FRAME_METHOD
_FRAME_HEADER_TYPE = amqp_constants.FRAME_HEADER
_FRAME_BODY = amqp_constants.FRAME_BODY
_FRAME_HEARTBEAT = amqp_constants.FRAME_HEARTBEAT
_AMQP_HEADER = b"AMQP"
_FRAME_TYPES = frozenset(
    (_FRAME_METHOD, _FRAME_HEADER_TYPE, _FRAME_BODY, _FRAME_HEARTBEAT)
)
#: frame_max counts the 8 bytes of frame overhead (7 header + 1 end octet).
FRAME_OVERHEAD = 8
#: The largest content header frame accepted past frame_max (see FrameParser).
MAX_HEADER_FRAME = 16 * 1024 * 1024


@attrs.define(slots=True)
class ContentHeaderFrame:
    """A decoded content header: the body's size and the message's properties."""

    name: ClassVar[str] = "ContentHeader"
    body_size: int
    properties: Properties


IncomingFrame = MethodFrame | ContentHeaderFrame | ContentBody | Heartbeat | Delivery


class FrameParser:
    """Cuts a byte stream into ``(channel, frame)`` pairs.

    Frames larger than ``max_frame_size`` are refused, except content headers up
    to :data:`MAX_HEADER_FRAME`: RabbitMQ does not hold its own content headers
    to frame_max (a dead-lettered message gains ``x-death`` headers).

    A ``basic.deliver`` whose content header and single body frame are already
    in the buffer (the usual case) comes out as one :class:`Delivery`; otherwise
    frames come one by one: body frames as :class:`ContentBody` holding the
    payload slice, ``basic.deliver`` and content headers decoded here, other
    methods by pamqp. A malformed stream raises :class:`~amqp_batch.ProtocolError`.
    """

    __slots__ = ("_rest", "max_frame_size")

    def __init__(self, max_frame_size: int = 131072) -> None:
        self._rest = b""
        #: Largest frame accepted (payload + overhead); 0 means no limit yet.
        self.max_frame_size = max_frame_size

    def feed(self, data: bytes) -> list[tuple[int, IncomingFrame]]:
        """Add ``data`` and return every frame now complete, in order."""
        buffer = self._rest + data if self._rest else bytes(data)
        frames: list[tuple[int, IncomingFrame]] = []
        append = frames.append
        offset = 0
        end_of_data = len(buffer)
        unpack_from = _FRAME_HEADER.unpack_from
        max_frame_size = self.max_frame_size
        while end_of_data - offset >= _FRAME_HEADER_SIZE:
            frame_type, channel, size = unpack_from(buffer, offset)
            frame_end = offset + _FRAME_HEADER_SIZE + size
            if frame_type not in _FRAME_TYPES or (
                max_frame_size
                and size + FRAME_OVERHEAD > max_frame_size
                # RabbitMQ sends a dead-lettered message's content header even
                # when its x-death headers pushed it past frame_max; refusing it
                # would make that message impossible to consume.
                and (frame_type != _FRAME_HEADER_TYPE or size > MAX_HEADER_FRAME)
            ):
                self._reject(buffer, offset, size)
            if frame_end >= end_of_data:
                break
            if buffer[frame_end] != _FRAME_END:
                raise ProtocolError("malformed frame: missing frame-end octet")
            payload_start = offset + _FRAME_HEADER_SIZE
            if frame_type == _FRAME_BODY:
                append((channel, ContentBody(buffer[payload_start:frame_end])))
            elif frame_type == _FRAME_METHOD:
                if buffer[payload_start : payload_start + 4] == _DELIVER_INDEX:
                    whole = _whole_delivery(
                        buffer, channel, payload_start, frame_end, max_frame_size
                    )
                    if whole is not None:
                        # The common case: the message's three frames at once.
                        append((channel, whole[0]))
                        offset = whole[1]
                        continue
                    append((channel, _decode_deliver(buffer, payload_start, frame_end)))
                else:
                    append((channel, _decode_method(buffer[payload_start:frame_end])))
            elif frame_type == _FRAME_HEADER_TYPE:
                append((channel, _decode_header(buffer, payload_start, frame_end)))
            elif frame_type == _FRAME_HEARTBEAT:
                append((channel, Heartbeat()))
            else:
                self._reject(buffer, offset, size)
            offset = frame_end + 1
        self._rest = buffer[offset:] if offset < end_of_data else b""
        return frames

    @staticmethod
    def _reject(buffer: bytes, offset: int, size: int) -> NoReturn:
        if buffer[offset : offset + 4] == _AMQP_HEADER:
            raise ProtocolError(
                "the broker rejected our protocol version "
                f"(it answered {buffer[offset : offset + 8]!r})",
            )
        if buffer[offset] not in (
            _FRAME_METHOD,
            _FRAME_HEADER_TYPE,
            _FRAME_BODY,
            _FRAME_HEARTBEAT,
        ):
            raise ProtocolError(f"malformed frame: unknown frame type {buffer[offset]}")
        raise ProtocolError(f"frame of {size} bytes exceeds the negotiated frame_max")

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._rest)


def _decode_method(payload: bytes) -> MethodFrame:
    """Decode a method frame's payload with pamqp (its class by method index)."""
    try:
        (method_index,) = _METHOD_INDEX.unpack_from(payload)
        method: MethodFrame = commands.INDEX_MAPPING[method_index]()
        method.unmarshal(payload[4:])
    except KeyError:
        raise ProtocolError("malformed frame: unknown method index") from None
    except (struct.error, ValueError, UnmarshalingException) as exc:
        raise ProtocolError(f"malformed method frame: {exc}") from exc
    return method


_DELIVER_INDEX = _METHOD_INDEX.pack(commands.Basic.Deliver.index)
_U64 = struct.Struct(">Q")
_HEADER_START = struct.Struct(">HHQH")  # class-id, weight, body size, flags
_new_deliver = commands.Basic.Deliver.__new__
_Deliver = commands.Basic.Deliver


def _short_str(data: bytes, offset: int) -> tuple[str, int]:
    """A shortstr at ``offset``: the text and the offset after it (the caller
    checks that it ends inside the frame).

    Not UTF-8 (RabbitMQ passes any bytes through) decodes with U+FFFD instead of
    failing the whole connection on one message.
    """
    end = offset + 1 + data[offset]
    if end > len(data):
        raise ValueError("short string runs past the data")
    return data[offset + 1 : end].decode("utf-8", "replace"), end


def _deliver_fields(
    data: bytes, start: int, end: int
) -> tuple[str, int, bool, str, str]:
    """``basic.deliver``'s fields (consumer tag, delivery tag, redelivered,
    exchange, routing key) from its method payload at ``start``."""
    # The three short strings inline (this runs once per message); each one is
    # checked to end inside the frame below, before anything is returned.
    try:
        offset = start + 5 + data[start + 4]
        consumer_tag = data[start + 5 : offset].decode("utf-8", "replace")
        (delivery_tag,) = _U64.unpack_from(data, offset)
        redelivered = bool(data[offset + 8] & 1)
        at = offset + 10
        offset = at + data[offset + 9]
        exchange = data[at:offset].decode("utf-8", "replace")
        at = offset + 1
        offset = at + data[offset]
        routing_key = data[at:offset].decode("utf-8", "replace")
    except (IndexError, struct.error) as exc:
        raise ProtocolError(f"malformed method frame: {exc}") from exc
    if offset != end:
        raise ProtocolError("malformed method frame: basic.deliver length")
    return consumer_tag, delivery_tag, redelivered, exchange, routing_key


def _decode_deliver(data: bytes, start: int, end: int) -> commands.Basic.Deliver:
    """Decode ``basic.deliver`` (the hot path) without pamqp's generic decoder.

    The result is a real :class:`pamqp.commands.Basic.Deliver`; the fields are the
    same as pamqp's except that text that is not UTF-8 is decoded with U+FFFD.
    """
    fields = _deliver_fields(data, start, end)
    method = _new_deliver(_Deliver)
    (
        method.consumer_tag,
        method.delivery_tag,
        method.redelivered,
        method.exchange,
        method.routing_key,
    ) = fields
    return method


def _frame_end(
    data: bytes,
    at: int,
    frame_type: int,
    channel: int,
    max_frame_size: int,
    *,
    size: int | None = None,
) -> int | None:
    """The offset of the frame-end octet of the frame at ``data[at:]`` when that
    frame is complete, of ``frame_type`` on ``channel``, within frame_max (and of
    ``size`` bytes when given); else ``None``."""
    if len(data) - at < _FRAME_HEADER_SIZE:
        return None
    found_type, found_channel, found_size = _FRAME_HEADER.unpack_from(data, at)
    frame_end: int = at + _FRAME_HEADER_SIZE + found_size
    if (
        found_type != frame_type
        or found_channel != channel
        or (size is not None and found_size != size)
        or frame_end >= len(data)
        or (max_frame_size and found_size + FRAME_OVERHEAD > max_frame_size)
        or data[frame_end] != _FRAME_END
    ):
        return None
    return frame_end


def _whole_delivery(
    data: bytes, channel: int, start: int, end: int, max_frame_size: int
) -> tuple[Delivery, int] | None:
    """The :class:`Delivery` whose ``basic.deliver`` payload is ``data[start:end]``,
    when its content header and its one body frame follow complete in ``data``;
    with the offset after them. ``None`` for anything else (a body in several
    frames, a frame not yet received, another channel, a header past frame_max):
    the frames are then taken one by one, with every check, and give the same
    delivery.
    """
    if not channel:
        return None
    consumer_tag, delivery_tag, redelivered, exchange, routing_key = _deliver_fields(
        data, start, end
    )
    at = end + 1
    header_end = _frame_end(data, at, _FRAME_HEADER_TYPE, channel, max_frame_size)
    if header_end is None:
        return None
    header = _decode_header(data, at + _FRAME_HEADER_SIZE, header_end)
    at = header_end + 1
    body_size = header.body_size
    if not body_size:
        body = b""
    else:
        body_end = _frame_end(
            data, at, _FRAME_BODY, channel, max_frame_size, size=body_size
        )
        if body_end is None:
            return None
        body = data[at + _FRAME_HEADER_SIZE : body_end]
        at = body_end + 1
    delivery = Delivery(
        delivery_tag=delivery_tag,
        redelivered=redelivered,
        exchange=exchange,
        routing_key=routing_key,
        consumer_tag=consumer_tag,
        body=body,
        properties=header.properties,
    )
    return delivery, at


_EMPTY_PROPERTIES = Properties()
#: headers, correlation-id, message-id, timestamp: usually unique per message (and
#: headers are a mutable dict), so such properties are never shared.
_PER_MESSAGE_FLAGS = 0x2000 | 0x0400 | 0x0080 | 0x0040
_SHARED_PROPERTIES_MAX = 256
_shared_properties: dict[bytes, Properties] = {}


def _decode_header(data: bytes, start: int, end: int) -> ContentHeaderFrame:
    """Decode a content header frame straight into :class:`Properties`."""
    try:
        _, _, body_size, flags = _HEADER_START.unpack_from(data, start)
        if not flags:
            return ContentHeaderFrame(body_size, _EMPTY_PROPERTIES)
        if not flags & _PER_MESSAGE_FLAGS:
            # Properties that do not vary per message (delivery mode, content
            # type, app id...) repeat: decode each distinct encoding once.
            key = data[start + 12 : end]
            cached = _shared_properties.get(key)
            if cached is None:
                cached, offset = _decode_properties(flags, data, start + 14, end)
                if offset != end:
                    raise ProtocolError("malformed content header: properties length")
                if len(_shared_properties) >= _SHARED_PROPERTIES_MAX:
                    _shared_properties.clear()
                _shared_properties[key] = cached
            return ContentHeaderFrame(body_size, cached)
        properties, offset = _decode_properties(flags, data, start + 14, end)
    except (IndexError, ValueError, struct.error) as exc:
        raise ProtocolError(f"malformed content header: {exc}") from exc
    if offset != end:
        raise ProtocolError("malformed content header: properties length")
    return ContentHeaderFrame(body_size, properties)


def _decode_properties(
    flags: int, data: bytes, offset: int, end: int
) -> tuple[Properties, int]:
    """Decode the basic properties ``flags`` announces, from ``offset`` to
    ``end``; returns them and the offset after the last one."""
    if flags & 1:
        raise ValueError("property flags continue past 16 bits")
    values: dict[str, Any] = {}
    for name, bit, kind in _PROPERTY_LAYOUT:
        if not flags & bit:
            continue
        if kind == "s":
            values[name], offset = _short_str(data, offset)
        elif kind == "o":
            values[name] = data[offset]
            offset += 1
        elif kind == "t":
            values[name], offset = decode_table(data, offset, end)
        else:  # timestamp
            consumed, stamp = decode.timestamp(data[offset : offset + 8])
            values[name] = stamp
            offset += consumed
    values.pop("cluster_id", None)  # deprecated; not part of the contract
    return Properties(**values), offset


#: (field, flag bit, kind): s = shortstr, o = octet, t = table, d = timestamp.
_PROPERTY_LAYOUT = (
    ("content_type", 0x8000, "s"),
    ("content_encoding", 0x4000, "s"),
    ("headers", 0x2000, "t"),
    ("delivery_mode", 0x1000, "o"),
    ("priority", 0x0800, "o"),
    ("correlation_id", 0x0400, "s"),
    ("reply_to", 0x0200, "s"),
    ("expiration", 0x0100, "s"),
    ("message_id", 0x0080, "s"),
    ("timestamp", 0x0040, "d"),
    ("type", 0x0020, "s"),
    ("user_id", 0x0010, "s"),
    ("app_id", 0x0008, "s"),
    ("cluster_id", 0x0004, "s"),
)


def marshal_method(method: MethodFrame, channel: int) -> bytes:
    """Encode one method frame."""
    return frame.marshal(method, channel)


# basic.ack / basic.nack / basic.reject: one per settled run, so encoded here
# (byte for byte pamqp's: frame header, class and method ids, the delivery tag,
# the bits packed from the lowest).
_SETTLE_FRAME = struct.Struct(">BHIHHQBB")
_SETTLE_SIZE = 13  # class id, method id, tag, bits


def encode_ack(channel: int, delivery_tag: int, multiple: bool) -> bytes:
    """``basic.ack`` as one frame."""
    return _SETTLE_FRAME.pack(
        _FRAME_METHOD, channel, _SETTLE_SIZE, 60, 80, delivery_tag, multiple, _FRAME_END
    )


def encode_nack(
    channel: int, delivery_tag: int, multiple: bool, requeue: bool
) -> bytes:
    """``basic.nack`` as one frame."""
    bits = multiple | requeue << 1
    return _SETTLE_FRAME.pack(
        _FRAME_METHOD, channel, _SETTLE_SIZE, 60, 120, delivery_tag, bits, _FRAME_END
    )


def encode_reject(channel: int, delivery_tag: int, requeue: bool) -> bytes:
    """``basic.reject`` as one frame."""
    return _SETTLE_FRAME.pack(
        _FRAME_METHOD, channel, _SETTLE_SIZE, 60, 90, delivery_tag, requeue, _FRAME_END
    )


_PUBLISH_METHOD = struct.pack(">IH", commands.Basic.Publish.index, 0)  # + ticket
_CONTENT_HEADER_START = struct.Struct(">HHQH")
_EXCHANGE_NAME = amqp_constants.DOMAIN_REGEX["exchange-name"]
_FRAME_END_BYTE = bytes((_FRAME_END,))


def encode_publish(
    channel: int,
    body: bytes,
    exchange: str,
    routing_key: str,
    properties: Properties | None,
    mandatory: bool,
    frame_max: int,
) -> bytes:
    """Encode ``basic.publish`` with its content header and body frames, as one
    bytes object so that it is written whole or not at all.

    Built from the contract's :class:`Properties` without pamqp's generic encoder
    (this is the republishing hot path); the bytes are pamqp's (a hypothesis test
    checks them against it). Header tables are encoded by :mod:`._table`.
    """
    if len(exchange) > 127 or not _EXCHANGE_NAME.fullmatch(exchange):
        raise ValueError(f"invalid exchange name {exchange!r}")
    try:
        flags, encoded = _encode_properties(properties)
        method = b"".join(
            (
                _PUBLISH_METHOD,
                _encode_short_str(exchange),
                _encode_short_str(routing_key),
                b"\x01" if mandatory else b"\x00",
            )
        )
    except AttributeError as exc:  # a non-str where a string belongs
        raise TypeError(f"invalid message properties: {exc}") from exc
    header_payload = _CONTENT_HEADER_START.pack(60, 0, len(body), flags) + encoded
    pack = _FRAME_HEADER.pack
    if frame_max and len(header_payload) + FRAME_OVERHEAD > frame_max:
        # The broker would close the whole connection (501 FRAME_ERROR).
        raise ValueError(
            f"message properties take {len(header_payload) + FRAME_OVERHEAD} bytes, "
            f"more than the connection's frame_max ({frame_max}) allows in one frame"
        )
    parts = [
        pack(_FRAME_METHOD, channel, len(method)),
        method,
        _FRAME_END_BYTE,
        pack(_FRAME_HEADER_TYPE, channel, len(header_payload)),
        header_payload,
        _FRAME_END_BYTE,
    ]
    chunk = frame_max - FRAME_OVERHEAD if frame_max else len(body) or 1
    if len(body) <= chunk:
        if body:
            parts += (pack(_FRAME_BODY, channel, len(body)), body, _FRAME_END_BYTE)
    else:
        view = memoryview(body)
        for start in range(0, len(body), chunk):
            piece = view[start : start + chunk]
            parts += (
                pack(_FRAME_BODY, channel, len(piece)),
                piece.tobytes(),
                _FRAME_END_BYTE,
            )
    return b"".join(parts)


def _encode_short_str(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 255:
        raise ValueError(f"short string of {len(data)} bytes exceeds 255")
    return bytes((len(data),)) + data


#: Every property but the deprecated cluster-id, in the AMQP order, in one call.
_ENCODE_LAYOUT = _PROPERTY_LAYOUT[:-1]
_PROPERTY_VALUES = operator.attrgetter(*(name for name, _, _ in _ENCODE_LAYOUT))
_HEADERS_BIT = 0x2000
#: The properties besides the headers, when none is per message (see
#: _PER_MESSAGE_FLAGS): a copy keeps its original's, so they repeat from publish
#: to publish. Their flags and encoding before and after the headers, by value.
_encoded_shared: dict[tuple[Any, ...], tuple[int, bytes, bytes]] = {}
_ENCODED_SHARED_MAX = 256
_OCTET_TYPES = (type(None), int)


def _encode_properties(properties: Properties | None) -> tuple[int, bytes]:
    """The property flags and the encoded properties, in the AMQP order."""
    if properties is None:
        return 0, b""
    values = _PROPERTY_VALUES(properties)
    delivery_mode = values[3]
    if delivery_mode is not None and delivery_mode not in (1, 2):
        raise ValueError(
            f"invalid message properties: Invalid delivery_mode value: {delivery_mode}"
        )
    if not (
        values[5] is None  # correlation-id
        and values[8] is None  # message-id
        and values[9] is None  # timestamp
        # exact types only: 2.0 and True equal 2 and 1 but are refused
        and type(delivery_mode) in _OCTET_TYPES
        and type(values[4]) in _OCTET_TYPES
    ):
        return _encode_values(values, _ENCODE_LAYOUT)
    key = values[:2] + values[3:]
    try:
        cached = _encoded_shared.get(key)
    except TypeError:  # an unhashable value: refused where it is encoded
        return _encode_values(values, _ENCODE_LAYOUT)
    if cached is None:
        # Once in order, as below, so that a bad value raises as it would there.
        encoded = _encode_values(values, _ENCODE_LAYOUT)
        flags, before = _encode_values(values[:2], _ENCODE_LAYOUT[:2])
        more, after = _encode_values(values[3:], _ENCODE_LAYOUT[3:])
        if len(_encoded_shared) >= _ENCODED_SHARED_MAX:
            _encoded_shared.clear()
        _encoded_shared[key] = flags | more, before, after
        return encoded
    flags, before, after = cached
    headers = values[2]
    if headers is None or headers == "":
        return flags, before + after
    return flags | _HEADERS_BIT, b"".join((before, encode_table(headers), after))


def _encode_values(
    values: tuple[Any, ...], layout: tuple[tuple[str, int, str], ...]
) -> tuple[int, bytes]:
    """The flags and encoding of property ``values`` laid out as ``layout``."""
    flags = 0
    parts: list[bytes] = []
    for value, (name, bit, kind) in zip(values, layout, strict=True):
        if value is None or value == "":  # pamqp sends an empty string as unset
            continue
        flags |= bit
        if kind == "s":
            parts.append(_encode_short_str(value))
        elif kind == "o":
            if type(value) is not int or not 0 <= value <= 255:
                raise TypeError(f"invalid message properties: {name}={value!r}")
            parts.append(bytes((value,)))
        elif kind == "t":
            parts.append(encode_table(value))
        else:
            parts.append(encode.timestamp(value))
    return flags, b"".join(parts)


# Content reassembly

ContentMethod = commands.Basic.Deliver | commands.Basic.Return | commands.Basic.GetOk


@attrs.define(slots=True)
class IncomingContent:
    """A complete message: the method that announced it, its properties, its body."""

    method: ContentMethod
    properties: Properties
    body: bytes


@attrs.define(slots=True)
class PendingContent:
    """Reassembles one message from its method, content header and body frames."""

    method: ContentMethod
    properties: Properties | None = None
    body_size: int = 0
    chunks: list[bytes] = attrs.field(factory=list)
    received: int = 0

    def add_header(self, content_header: ContentHeaderFrame) -> IncomingContent | None:
        """Record the header; returns the message if it has no body."""
        if self.properties is not None:
            raise ProtocolError("a second content header arrived for one message")
        self.properties = content_header.properties
        self.body_size = content_header.body_size
        if self.body_size == 0:
            return IncomingContent(self.method, self.properties, b"")
        return None

    def add_body(self, body: ContentBody) -> IncomingContent | None:
        """Add a body frame; returns the message once every byte has arrived."""
        if self.properties is None:
            raise ProtocolError("a body frame arrived before its content header")
        value = body.value
        self.received += len(value)
        if self.received > self.body_size:
            raise ProtocolError("body frames carry more bytes than the header said")
        if self.received == self.body_size:
            data = value if not self.chunks else b"".join([*self.chunks, value])
            return IncomingContent(self.method, self.properties, data)
        self.chunks.append(value)
        return None
