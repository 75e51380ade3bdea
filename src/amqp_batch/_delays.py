"""Delayed retries: the delay queues of a work queue, as a pure function.

A REQUEUEd copy that must wait is published (default exchange, ``mandatory``)
to the delay queue of its attempt instead of the work queue. A delay queue has
no consumer: its ``x-message-ttl`` is the delay, and when a copy expires the
broker dead-letters it to the default exchange with the work queue's name as
routing key, i.e. back to the back of the work queue, where the consumer sees
it as a copy (exchange ``""``, routing key = the queue) with every header kept.

Names are predictable: ``<queue>.retry.<delay>``, the delay in whole seconds
(``orders.retry.10s``) or, when it is not a whole number of seconds, in
milliseconds (``orders.retry.1500ms``). Delays that round to the same
millisecond share one queue. Delay queues are durable and are declared
idempotently on every session; the library never deletes them (a changed
``retry_delays`` only adds queues): see the retries how-to for cleaning up.

The queue type follows the work queue: a quorum work queue
(``x-queue-type: quorum``) gets quorum delay queues with at-least-once
dead-lettering (``x-dead-letter-strategy: at-least-once``, which needs
``x-overflow: reject-publish``), so a waiting copy is replicated like the work
queue and is not lost between the delay queue and the work queue when a node
fails; any other work queue gets classic delay queues.

Nothing here talks to the broker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._transport._base import QueueSpec

__all__ = [
    "delay_for_attempt",
    "delay_queue_for",
    "delay_queue_name",
    "delay_queues",
    "ttl_milliseconds",
]


def ttl_milliseconds(delay: float) -> int:
    """``delay`` seconds as the whole milliseconds of ``x-message-ttl`` (>= 1)."""
    return max(1, round(delay * 1000))


def delay_queue_name(queue: str, delay: float) -> str:
    """``<queue>.retry.<delay>``: ``10s`` for whole seconds, else ``1500ms``."""
    ttl = ttl_milliseconds(delay)
    suffix = f"{ttl // 1000}s" if ttl % 1000 == 0 else f"{ttl}ms"
    return f"{queue}.retry.{suffix}"


def delay_for_attempt(delays: Sequence[float], retry_count: int) -> float | None:
    """The delay before the copy whose ``x-retry-count`` is ``retry_count``
    (1 for the first retry) is handled: ``delays[retry_count - 1]``, the last
    repeating; ``None`` when there are no delays (retry at once)."""
    if not delays:
        return None
    if retry_count < 1:
        raise ValueError(f"a copy's retry count is at least 1, got {retry_count}")
    return delays[min(retry_count, len(delays)) - 1]


def delay_queue_for(
    queue: str, delays: Sequence[float], retry_count: int
) -> str | None:
    """The delay queue the copy with ``retry_count`` goes to (``None``: the work
    queue itself, no delay)."""
    delay = delay_for_attempt(delays, retry_count)
    return None if delay is None else delay_queue_name(queue, delay)


def delay_queues(
    queue: str,
    delays: Sequence[float],
    *,
    queue_arguments: Mapping[str, Any] | None = None,
) -> list[QueueSpec]:
    """The delay queues to declare for work queue ``queue``, one per distinct
    delay (in the order of first use), each sending expired copies back to
    ``queue``. ``queue_arguments`` are the work queue's (for its type)."""
    quorum = (queue_arguments or {}).get("x-queue-type") == "quorum"
    specs: dict[str, QueueSpec] = {}
    for delay in delays:
        name = delay_queue_name(queue, delay)
        if name in specs:
            continue
        arguments: dict[str, Any] = {
            "x-message-ttl": ttl_milliseconds(delay),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue,
        }
        if quorum:
            arguments["x-queue-type"] = "quorum"
            arguments["x-dead-letter-strategy"] = "at-least-once"
            arguments["x-overflow"] = "reject-publish"
        specs[name] = QueueSpec(name=name, durable=True, arguments=arguments)
    return list(specs.values())
