"""Test helpers: an in-memory broker to run handlers without RabbitMQ.

.. code-block:: python

    broker = MemoryBroker()
    async with batch_consumer(settings, handle, transport=broker):
        await broker.publish(b"hello", routing_key=settings.queue_name)
        await broker.wait_drained(settings.queue_name, timeout=5)

See ``docs/testing.md`` for the fixtures and the differences from RabbitMQ.
"""

from __future__ import annotations

from ._exports import set_public_module
from ._transport._base import (
    BindingSpec,
    Delivery,
    ExchangeSpec,
    Properties,
    QueueSpec,
    SessionSpec,
)
from ._transport._memory import (
    BrokerMessage,
    MemoryBroker,
    MemoryPublisher,
    MemorySession,
    Published,
)
from ._transport._url import ConnectionParameters

__all__ = [
    "BindingSpec",
    "BrokerMessage",
    "ConnectionParameters",
    "Delivery",
    "ExchangeSpec",
    "MemoryBroker",
    "MemoryPublisher",
    "MemorySession",
    "Properties",
    "Published",
    "QueueSpec",
    "SessionSpec",
]

set_public_module(__name__, globals(), __all__)
del set_public_module
