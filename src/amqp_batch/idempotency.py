"""Idempotency: skip messages that were already handled.

RabbitMQ delivers at least once: after a lost connection, a crash between the
handler and the ack, or a confirmed copy whose original's ack was lost, the
same message comes again. An :class:`IdempotencyStore` remembers the keys of
handled messages so a redelivery is acked without reaching the handler.

The rule:

1. Before a batch reaches the handler, the keys of its messages are looked up
   with :meth:`IdempotencyStore.seen`; those messages are ACKed at once and
   never handed to the handler.
2. After the handler, the keys of the messages it ACKed are stored with
   :meth:`IdempotencyStore.remember` (only ACKed ones: a REQUEUEd or NACKed
   message was not done).

A message without a key (by default: without a ``message_id``) is never
deduplicated. The store is consulted with whole batches, so a networked store
costs one round trip per batch in each direction.

:class:`MemoryIdempotencyStore` (the default implementation) keeps keys in the
process for ``ttl`` seconds: it catches the redeliveries of one process's own
session losses, not those that another process receives. Share a store across
processes with a networked one, e.g. the Redis store in
``examples/idempotency_redis.py``. :func:`deduplicated` applies a store to any
batch handler.
"""

from __future__ import annotations

import collections
import inspect
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Iterable,
    Sequence,
)
from contextlib import aclosing
from typing import Any, Protocol, runtime_checkable

from ._message import Message
from ._results import MessageResult

__all__ = [
    "IdempotencyStore",
    "MemoryIdempotencyStore",
    "deduplicated",
    "message_id_key",
]


@runtime_checkable
class IdempotencyStore(Protocol):
    """Where the keys of handled messages are kept."""

    async def seen(self, keys: Sequence[str]) -> set[str]:
        """The subset of ``keys`` that were remembered (and not expired)."""
        ...

    async def remember(self, keys: Sequence[str]) -> None:
        """Keep ``keys`` as handled."""
        ...


def message_id_key(message: Message) -> str | None:
    """The default key: the ``message_id`` property (``None``: no deduplication)."""
    return message.message_id or None


class MemoryIdempotencyStore:
    """Keys kept in this process for ``ttl`` seconds, at most ``max_keys`` of
    them (the oldest are forgotten first)."""

    def __init__(
        self,
        ttl: float = 3600.0,
        *,
        max_keys: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0, got {ttl!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        self.ttl = ttl
        self.max_keys = max_keys
        self._clock = clock
        # key -> expiry, in insertion order (so the oldest expire first).
        self._keys: collections.OrderedDict[str, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def _expire(self, now: float) -> None:
        keys = self._keys
        while keys:
            key, expiry = next(iter(keys.items()))
            if expiry > now and len(keys) <= self.max_keys:
                break
            del keys[key]

    async def seen(self, keys: Sequence[str]) -> set[str]:
        """The subset of ``keys`` remembered less than ``ttl`` seconds ago."""
        self._expire(self._clock())
        return {key for key in keys if key in self._keys}

    async def remember(self, keys: Sequence[str]) -> None:
        """Keep ``keys`` for ``ttl`` seconds from now."""
        now = self._clock()
        for key in keys:
            self._keys.pop(key, None)
            self._keys[key] = now + self.ttl
        self._expire(now)


def deduplicated(
    handler: Callable[[Sequence[Message]], Any],
    store: IdempotencyStore,
    *,
    key: Callable[[Message], str | None] = message_id_key,
    on_skip: Callable[[Sequence[Message]], object] | None = None,
) -> Callable[[Sequence[Message]], AsyncIterator[MessageResult]]:
    """Wrap a batch handler so that messages already in ``store`` are ACKed
    without reaching it, and the ones it ACKs are remembered.

    ``on_skip`` is called with the skipped messages of each batch (e.g. to
    count them). The wrapped handler may yield results or return a sequence;
    results past the batch's end are dropped. Results it gave before raising
    still apply; the exception then reaches the consumer, which gives the
    rest ``unhandled_exception_action``.
    """

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        keys = [key(message) for message in messages]
        done = await store.seen([k for k in keys if k is not None])
        fresh: list[Message] = []
        skipped: list[Message] = []
        for message, message_key in zip(messages, keys, strict=True):
            is_done = message_key is not None and message_key in done
            (skipped if is_done else fresh).append(message)
        if on_skip is not None and skipped:
            on_skip(skipped)
        results: list[Any] = []
        error: Exception | None = None
        if fresh:
            try:
                async with aclosing(_results(handler, fresh)) as produced:
                    async for result in produced:
                        results.append(result)
            except Exception as exc:  # given back below, after the results
                error = exc
        del results[len(fresh) :]
        acked = [
            k
            for m, r in zip(fresh, results, strict=False)
            if r is MessageResult.ACK and (k := key(m)) is not None
        ]
        if acked:
            await store.remember(acked)
        by_message = {id(m): r for m, r in zip(fresh, results, strict=False)}
        for message, message_key in zip(messages, keys, strict=True):
            if message_key is not None and message_key in done:
                yield MessageResult.ACK
            elif id(message) in by_message:
                yield by_message[id(message)]
            else:
                break  # too few results: the consumer applies its fallback
        if error is not None:
            raise error

    return handle


async def _results(
    handler: Callable[[Sequence[Message]], Any], messages: Sequence[Message]
) -> AsyncGenerator[Any, None]:
    produced = handler(messages)
    if inspect.isawaitable(produced):
        produced = await produced
    if isinstance(produced, Iterable):
        for item in produced:
            yield item
    else:
        async for item in produced:
            yield item
