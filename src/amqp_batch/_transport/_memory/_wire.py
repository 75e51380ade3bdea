"""Message properties as a consumer gets them back from RabbitMQ (sans-IO).

A publish goes through the AMQP encoding on its way to the broker, and that
changes values: a ``bytes`` header comes back as ``bytearray``, a tuple as a
list, a datetime loses its microseconds and a naive one is taken as UTC. The
memory broker puts every publish through the same pamqp encoding the native
transport uses, so a handler tested on it sees what it would see in production,
and a value AMQP cannot carry fails the publish just as it does there.
"""

from __future__ import annotations

from pamqp import header

from .._base import EMPTY_PROPERTIES, Properties
from .._native._framing import properties_from_pamqp, properties_to_pamqp

__all__ = ["through_the_wire"]


def through_the_wire(properties: Properties | None) -> Properties:
    """``properties`` encoded as a content header and decoded again.

    Raises what the native transport raises for properties it cannot encode
    (``ValueError`` for an invalid property, ``TypeError`` for a header value
    of a type AMQP has no field type for).
    """
    if properties is None or properties == EMPTY_PROPERTIES:
        return EMPTY_PROPERTIES
    encoded = header.ContentHeader(0, 0, properties_to_pamqp(properties)).marshal()
    decoded = header.ContentHeader()
    decoded.unmarshal(encoded)
    return properties_from_pamqp(decoded.properties)
