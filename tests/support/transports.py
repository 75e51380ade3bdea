"""Transports the contract suites run against.

The native transport runs on asyncio and trio; the aiormq one is asyncio-only, so
its trio row is not generated at all (not skipped). ``over_transports`` is a
direct parametrization of ``anyio_backend`` and ``transport_kind`` together.
"""

from __future__ import annotations

from typing import Any

import pytest

#: aiormq rows run with the broker tests (``-m broker``): the offline sessions
#: (``nox -s tests_pythons``) do not install the aiormq extra.
_AIORMQ = pytest.param("asyncio", "aiormq", marks=pytest.mark.broker)

#: (backend, transport) rows: every pair except aiormq on trio.
ROWS = [("asyncio", "native"), ("trio", "native"), _AIORMQ]

over_transports = pytest.mark.parametrize(
    ("anyio_backend", "transport_kind"), ROWS, scope="module"
)

#: (backend, broker) rows of the consumer parity suite: RabbitMQ through the
#: native transport and MemoryBroker on both backends, RabbitMQ through aiormq
#: on asyncio.
PARITY_ROWS = [
    ("asyncio", "rabbitmq"),
    ("trio", "rabbitmq"),
    ("asyncio", "memory"),
    ("trio", "memory"),
    _AIORMQ,
]

over_brokers = pytest.mark.parametrize(
    ("anyio_backend", "broker_kind"), PARITY_ROWS, scope="module"
)


def make_transport(kind: str) -> Any:
    """A fresh transport of ``kind`` ("native" or "aiormq")."""
    if kind == "aiormq":
        from amqp_batch import AiormqTransport

        return AiormqTransport()
    from amqp_batch._transport._native import NativeTransport

    return NativeTransport()
