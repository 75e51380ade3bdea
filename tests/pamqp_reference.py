"""pamqp as the reference codec for the hand-written hot paths in
``amqp_batch._transport._native._framing``: the tests check our encoder and
decoders against these (byte for byte where pamqp encodes)."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from pamqp import commands, frame, header
from pamqp.constants import FRAME_BODY, FRAME_END

from amqp_batch._transport._base import Properties
from amqp_batch._transport._native._framing import FRAME_OVERHEAD

_FRAME_HEADER = struct.Struct(">BHI")


def marshal_publish(
    channel: int,
    body: bytes,
    exchange: str,
    routing_key: str,
    properties: commands.Basic.Properties,
    mandatory: bool,
    frame_max: int,
) -> bytes:
    """Encode ``basic.publish`` with its content header and body frames, as one
    bytes object so that it is written whole or not at all."""
    content_header = frame.marshal(
        header.ContentHeader(0, len(body), properties), channel
    )
    parts = [
        frame.marshal(
            commands.Basic.Publish(
                exchange=exchange, routing_key=routing_key, mandatory=mandatory
            ),
            channel,
        ),
        content_header,
    ]
    chunk = frame_max - FRAME_OVERHEAD
    pack = _FRAME_HEADER.pack
    end = bytes((FRAME_END,))
    view = memoryview(body)
    for start in range(0, len(body), chunk):
        piece = view[start : start + chunk]
        parts.append(pack(FRAME_BODY, channel, len(piece)))
        parts.append(piece.tobytes())
        parts.append(end)
    return b"".join(parts)


_PAMQP_FIELDS = (
    ("content_type", "content_type"),
    ("content_encoding", "content_encoding"),
    ("headers", "headers"),
    ("delivery_mode", "delivery_mode"),
    ("priority", "priority"),
    ("correlation_id", "correlation_id"),
    ("reply_to", "reply_to"),
    ("expiration", "expiration"),
    ("message_id", "message_id"),
    ("timestamp", "timestamp"),
    ("type", "message_type"),
    ("user_id", "user_id"),
    ("app_id", "app_id"),
)


def properties_from_pamqp(props: commands.Basic.Properties) -> Properties:
    """Convert pamqp's properties to the contract's :class:`Properties`."""
    return Properties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=props.headers,
        delivery_mode=props.delivery_mode,
        priority=props.priority,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        expiration=props.expiration,
        message_id=props.message_id,
        timestamp=props.timestamp,
        type=props.message_type,
        user_id=props.user_id,
        app_id=props.app_id,
    )


def properties_to_pamqp(props: Properties | None) -> commands.Basic.Properties:
    """Convert the contract's :class:`Properties` to pamqp's, for publishing."""
    if props is None:
        return commands.Basic.Properties()
    kwargs: dict[str, Any] = {}
    for ours, theirs in _PAMQP_FIELDS:
        value = getattr(props, ours)
        if value is not None:
            kwargs[theirs] = encodable_table(value) if ours == "headers" else value
    try:
        return commands.Basic.Properties(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid message properties: {exc}") from exc


def encodable_table(table: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a header table that pamqp can encode: ``bytes`` (a long string
    that was not UTF-8) as a byte array with the same bytes, which is what our
    own table encoder sends for ``bytes``."""
    return {key: _encodable(value) for key, value in table.items()}


def _encodable(value: Any) -> Any:
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, Mapping):
        return encodable_table(value)
    if isinstance(value, list | tuple):
        return [_encodable(item) for item in value]
    return value
