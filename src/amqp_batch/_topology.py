"""What a consumer's sessions declare, and the acker's retry rules, from its
settings."""

from __future__ import annotations

from typing import Any

from ._delays import delay_queues
from ._retry import RetryPolicy
from ._settings import BatchConsumerSettings
from ._transport._base import BindingSpec, ExchangeSpec, QueueSpec

__all__ = ["retry_policy", "topology"]


def topology(
    settings: BatchConsumerSettings,
) -> tuple[list[ExchangeSpec], list[QueueSpec], list[BindingSpec]]:
    """What every session declares for ``settings``."""
    exchanges: list[ExchangeSpec] = []
    queues: list[QueueSpec] = []
    bindings: list[BindingSpec] = []
    arguments: dict[str, Any] = dict(settings.work_queue_arguments)
    if settings.effective_dead_letter_routing_key is not None:
        dead_key = settings.effective_dead_letter_routing_key
        arguments.setdefault("x-dead-letter-routing-key", dead_key)
    durable = settings.exchange_durable
    if dlx := settings.dead_letter_exchange:
        arguments.setdefault("x-dead-letter-exchange", dlx)
        kind = settings.dead_letter_exchange_type
        exchanges.append(ExchangeSpec(name=dlx, type=kind, durable=durable))
        if settings.dead_letter_queue:
            quorum = settings.queue_type == "quorum"
            queues.append(
                QueueSpec(
                    name=settings.dead_letter_queue,
                    durable=settings.queue_durable,
                    arguments={"x-queue-type": "quorum"} if quorum else None,
                )
            )
            bindings.append(
                BindingSpec(
                    queue=settings.dead_letter_queue,
                    exchange=settings.dead_letter_exchange,
                    routing_key=settings.dead_letter_binding_key,
                )
            )
    if exchange := settings.exchange_name:
        kind = settings.exchange_type
        exchanges.append(ExchangeSpec(name=exchange, type=kind, durable=durable))
    queues.extend(_work_queues(settings, arguments))
    if settings.exchange_name:
        routing_key = settings.routing_key
        bindings.append(
            BindingSpec(
                queue=settings.queue_name,
                exchange=settings.exchange_name,
                # aio-pika binds with the queue's name when no key is given.
                routing_key=settings.queue_name if routing_key is None else routing_key,
            )
        )
    return exchanges, queues, bindings


def _work_queues(
    settings: BatchConsumerSettings, arguments: dict[str, Any]
) -> list[QueueSpec]:
    """The work queue, then its delay queues (if ``retry_delays``)."""
    work = QueueSpec(
        name=settings.queue_name,
        durable=settings.queue_durable,
        arguments=arguments or None,
    )
    delays = delay_queues(
        settings.queue_name,
        settings.retry_delay_schedule,
        queue_arguments=settings.work_queue_arguments,
    )
    return [work, *delays]


def retry_policy(settings: BatchConsumerSettings) -> RetryPolicy:
    """The acker's retry and dead-letter rules for ``settings``."""
    arguments = settings.queue_arguments or {}
    exchange = settings.dead_letter_exchange or arguments.get("x-dead-letter-exchange")
    routing_key = settings.effective_dead_letter_routing_key
    return RetryPolicy(
        queue=settings.queue_name,
        max_requeue_attempts=settings.max_requeue_attempts,
        dead_letter_exchange=exchange if isinstance(exchange, str) else None,
        dead_letter_routing_key=routing_key if isinstance(routing_key, str) else None,
        signing_key=settings.header_signing_key,
        retry_delays=settings.retry_delay_schedule,
        dead_letter_strategy=settings.dead_letter_strategy,
    )
