"""Message properties as a consumer gets them back from RabbitMQ (sans-IO).

A publish goes through the AMQP encoding on its way to the broker, and that
changes values: a ``bytes`` header comes back as ``bytearray``, a tuple as a
list, a datetime loses its microseconds and a naive one is taken as UTC. The
memory broker puts every publish through the native transport's own encoder
and frame decoder, so a handler tested on it sees what it would see in
production, and a value AMQP cannot carry fails the publish just as it does
there.
"""

from __future__ import annotations

from typing import Any

from pamqp import commands

from .._base import EMPTY_PROPERTIES, Properties
from .._native._framing import (
    ContentHeaderFrame,
    FrameParser,
    PendingContent,
    encode_publish,
)

__all__ = ["through_the_wire"]

_CHANNEL = 1


def through_the_wire(properties: Properties | None) -> Properties:
    """``properties`` encoded as a content header frame and decoded again.

    Raises what the native transport raises for properties it cannot encode
    (``ValueError`` for an invalid property, ``TypeError`` for a header value
    of a type AMQP has no field type for).
    """
    if properties is None or properties == EMPTY_PROPERTIES:
        return EMPTY_PROPERTIES
    # The publish encoder the native channel uses (frame_max 0: no limit here).
    data = encode_publish(_CHANNEL, b"", "", "", properties, False, 0)
    # Any: the parser's frame union is narrowed by the frames we fed it.
    frames: list[tuple[int, Any]] = FrameParser().feed(data)
    frames = [f for f in frames if isinstance(f[1], ContentHeaderFrame)]
    [(_, decoded)] = frames
    content = PendingContent(commands.Basic.Deliver()).add_header(decoded)
    assert content is not None  # a body of 0 bytes: complete with its header
    return content.properties
