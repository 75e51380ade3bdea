"""Test helpers: an in-memory broker to run handlers without RabbitMQ, and
:func:`make_message` / :func:`run_handler` to unit-test a handler without any
broker.

.. code-block:: python

    broker = MemoryBroker()
    async with batch_consumer(settings, handle, transport=broker):
        await broker.publish(b"hello", routing_key=settings.queue_name)
        await broker.wait_drained(settings.queue_name, timeout=5)

See ``docs/testing.md`` for the fixtures and the differences from RabbitMQ.
"""

from __future__ import annotations

from ._exports import set_public_module
from ._handler_testing import make_message as make_message
from ._handler_testing import run_handler as run_handler
from ._transport._base import BindingSpec as BindingSpec
from ._transport._base import Delivery as Delivery
from ._transport._base import ExchangeSpec as ExchangeSpec
from ._transport._base import Properties as Properties
from ._transport._base import QueueSpec as QueueSpec
from ._transport._base import SessionSpec as SessionSpec
from ._transport._memory import BrokerMessage as BrokerMessage
from ._transport._memory import MemoryBroker as MemoryBroker
from ._transport._memory import MemoryPublisher as MemoryPublisher
from ._transport._memory import MemorySession as MemorySession
from ._transport._memory import Published as Published
from ._transport._url import ConnectionParameters as ConnectionParameters

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
    "make_message",
    "run_handler",
]

set_public_module(__name__, globals(), __all__)
del set_public_module
