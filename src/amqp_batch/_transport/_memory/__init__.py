"""An in-memory broker implementing the transport contract, for tests.

Public as :mod:`amqp_batch.testing`.
"""

from ._broker import MemoryBroker
from ._model import BrokerMessage, Published
from ._session import MemoryPublisher, MemorySession

__all__ = [
    "BrokerMessage",
    "MemoryBroker",
    "MemoryPublisher",
    "MemorySession",
    "Published",
]
