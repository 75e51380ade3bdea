"""What stands between a batch and the handler: idempotency, the rate limit,
``handler_timeout``, and the kill switch's view of the results.

The handler runner calls :func:`run_guarded` for each batch. In order:

1. messages whose key the idempotency store has seen are ACKed at once and
   never reach the handler (counted as ``duplicate`` in ``health()``);
2. the rest wait for the consumer's shared rate limiter (the wait is the only
   delay added to the batch);
3. the handler runs, cancelled past ``handler_timeout``
   (see :func:`~amqp_batch._actors.handler.collect_results`);
4. the results are reported (the kill switch counts them) and the keys of
   the ACKed messages are remembered in the store.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import attrs

from .._message import Message
from .._ratelimit import RateLimiter
from .._results import BatchHandler, MessageResult
from ..idempotency import IdempotencyStore, message_id_key
from .acker import Outcome

__all__ = ["HandlerGuards", "run_guarded"]

logger = logging.getLogger("amqp_batch.handler")


@attrs.define(kw_only=True)
class HandlerGuards:
    """The guards of one worker's handler runners (all optional)."""

    #: ``handler_timeout``: seconds one handler call may take.
    timeout: float | None = None
    #: Shared by every worker of the consumer (``max_messages_per_second``).
    limiter: RateLimiter | None = None
    #: Skips messages already handled (shared by every worker).
    idempotency: IdempotencyStore | None = None
    #: The idempotency key of a message (``None``: never deduplicated).
    key: Callable[[Message], str | None] = message_id_key
    #: Called with the results of every batch the handler ran.
    on_results: Callable[[Sequence[MessageResult]], None] | None = None
    #: Called with how many messages of a batch were skipped as seen.
    on_duplicates: Callable[[int], None] | None = None


#: :func:`~amqp_batch._actors.handler.collect_results`'s signature.
Collect = Callable[..., Awaitable[list[MessageResult]]]


async def run_guarded(
    batch: list[Message],
    handler: BatchHandler,
    fallback: MessageResult,
    guards: HandlerGuards,
    collect_results: Collect,
) -> list[Outcome]:
    """One outcome per message of ``batch``, in order (see the module doc)."""
    fresh, seen = await _split_seen(batch, guards)
    results: dict[int, MessageResult] = {}
    if fresh:
        if guards.limiter is not None:
            await guards.limiter.acquire(len(fresh))
        handled = await collect_results(
            handler, fresh, fallback=fallback, timeout=guards.timeout
        )
        if guards.on_results is not None:
            guards.on_results(handled)
        results = {id(m): r for m, r in zip(fresh, handled, strict=True)}
        await _remember(fresh, handled, guards)
    ack = MessageResult.ACK
    return [(m, ack if id(m) in seen else results[id(m)]) for m in batch]


async def _split_seen(
    batch: list[Message], guards: HandlerGuards
) -> tuple[list[Message], set[int]]:
    store = guards.idempotency
    if store is None:
        return batch, set()
    keys = [guards.key(message) for message in batch]
    known = await store.seen([k for k in keys if k is not None])
    if not known:
        return batch, set()
    seen = {
        id(m) for m, k in zip(batch, keys, strict=True) if k is not None and k in known
    }
    logger.info("%d message(s) already handled: acked without the handler", len(seen))
    if guards.on_duplicates is not None:
        guards.on_duplicates(len(seen))
    return [m for m in batch if id(m) not in seen], seen


async def _remember(
    messages: list[Message], results: list[MessageResult], guards: HandlerGuards
) -> None:
    store = guards.idempotency
    if store is None:
        return
    keys = [
        key
        for message, result in zip(messages, results, strict=True)
        if result is MessageResult.ACK and (key := guards.key(message)) is not None
    ]
    if keys:
        await store.remember(keys)
