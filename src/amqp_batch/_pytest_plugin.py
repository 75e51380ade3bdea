"""pytest fixtures for testing handlers on :class:`~amqp_batch.testing.MemoryBroker`.

Registered as the ``amqp_batch`` pytest plugin (entry point ``pytest11``), or by
hand with ``pytest_plugins = ["amqp_batch._pytest_plugin"]`` in a root
``conftest.py``. The async fixture needs an async test runner: mark the test
``@pytest.mark.anyio`` (anyio's plugin, on the ``anyio_backend`` of your choice).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ._transport._memory import MemoryBroker, MemoryPublisher
from ._transport._url import ConnectionParameters

__all__ = ["memory_broker", "memory_publisher"]


@pytest.fixture
def memory_broker() -> MemoryBroker:
    """A fresh, empty :class:`~amqp_batch.testing.MemoryBroker`."""
    return MemoryBroker()


@pytest.fixture
async def memory_publisher(
    memory_broker: MemoryBroker,
) -> AsyncIterator[MemoryPublisher]:
    """A confirm-mode publisher session open on ``memory_broker``."""
    parameters = ConnectionParameters(connection_name="memory-publisher")
    async with memory_broker.open_publisher(parameters) as publisher:
        yield publisher
