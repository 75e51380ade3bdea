"""What the transports share: the topology walker, the base of a consuming
session, and the error a ``basic.return`` stands for.

The native and the aiormq channel declare with the same method names and
keywords (``exchange_declare(name, exchange_type=..., durable=...)``,
``queue_declare``, ``queue_bind``), so one walker serves both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from anyio.streams.memory import MemoryObjectReceiveStream

from .._exceptions import MessageReturned
from ._base import BindingSpec, Delivery, ExchangeSpec, QueueSpec, SessionSpec

__all__ = [
    "Declarable",
    "DeclaringChannel",
    "SessionBase",
    "declare_topology",
    "returned_error",
    "topology",
]

Declarable = ExchangeSpec | QueueSpec | BindingSpec


class DeclaringChannel(Protocol):
    """A channel that declares exchanges, queues and bindings (keywords as
    AMQP names them)."""

    async def exchange_declare(
        self,
        exchange: str,
        *,
        exchange_type: str,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: dict[str, Any] | None,
    ) -> Any:
        """``exchange.declare``."""

    async def queue_declare(
        self,
        queue: str,
        *,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: dict[str, Any] | None,
    ) -> Any:
        """``queue.declare``."""

    async def queue_bind(
        self,
        queue: str,
        exchange: str,
        *,
        routing_key: str,
        arguments: dict[str, Any] | None,
    ) -> Any:
        """``queue.bind``."""


def topology(spec: SessionSpec) -> list[Declarable]:
    """What a session declares, in order: exchanges, queues, bindings."""
    return [*spec.exchanges, *spec.queues, *spec.bindings]


def _table(arguments: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if arguments is None else dict(arguments)


async def declare_topology(
    channel: DeclaringChannel, items: Sequence[Declarable]
) -> None:
    """Declare exchanges, queues and bindings on ``channel``, in the order given;
    the predefined exchanges (``""``, ``amq.*``) cannot be declared and are
    skipped."""
    for item in items:
        if isinstance(item, ExchangeSpec):
            if not item.name or item.name.startswith("amq."):
                continue
            await channel.exchange_declare(
                item.name,
                exchange_type=item.type,
                durable=item.durable,
                auto_delete=item.auto_delete,
                internal=item.internal,
                arguments=_table(item.arguments),
            )
        elif isinstance(item, QueueSpec):
            await channel.queue_declare(
                item.name,
                durable=item.durable,
                exclusive=item.exclusive,
                auto_delete=item.auto_delete,
                arguments=_table(item.arguments),
            )
        else:
            await channel.queue_bind(
                item.queue,
                item.exchange,
                routing_key=item.routing_key,
                arguments=_table(item.arguments),
            )


class SessionBase:
    """What every consuming session keeps: its consumer tag and the stream of
    its deliveries."""

    def __init__(
        self, consumer_tag: str, deliveries: MemoryObjectReceiveStream[Delivery]
    ) -> None:
        self.consumer_tag = consumer_tag
        self._deliveries = deliveries

    def __repr__(self) -> str:
        return f"<{type(self).__name__} consumer={self.consumer_tag}>"

    @property
    def deliveries(self) -> MemoryObjectReceiveStream[Delivery]:
        """Deliveries in arrival order; ends after cancel or a broker cancel."""
        return self._deliveries


def returned_error(method: Any) -> MessageReturned:
    """The error of a publish the broker returned (its ``basic.return``)."""
    code, text = method.reply_code, method.reply_text
    exchange, routing_key = method.exchange, method.routing_key
    return MessageReturned(
        f"message returned by the broker: {code} {text}"
        f" (exchange={exchange!r}, routing_key={routing_key!r})",
        reply_code=code,
        reply_text=text,
        exchange=exchange,
        routing_key=routing_key,
    )
