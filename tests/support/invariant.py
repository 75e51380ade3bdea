"""The Jepsen ``total-queue`` invariant, for fault tests (docs/reliability.md).

A fault test publishes numbered ids with publisher confirms, runs a consumer whose
handler goes through a :class:`Recorder`, breaks something, waits until every
confirmed id has a final decision, stops the consumer and then calls :func:`check`,
which drains the work queue and the dead-letter queue and classifies every id::

    recorder = Recorder(decide=lambda m: MessageResult.ACK)
    confirmed = await publish_numbered(url, queue, 200)
    async with batch_consumer(settings, recorder.handler):
        ... fault ...
        await recorder.wait_decided(confirmed, timeout=30)
    report = await check(url, queue, dead_letter_queue, recorder, confirmed)
    report.assert_holds(max_duplicates=prefetch)

- lost = confirmed - (acked | dead-lettered | still queued) must be empty;
- unexpected = ids seen anywhere that were never published must be empty;
- every id ends in one place: never both acked and dead-lettered;
- duplicates (the handler saw the same id at the same retry count again) are
  counted, and every duplicate must come from a ``redelivered=true`` delivery.

``still queued`` are ids the checker drained from the work queue at the end: not
lost (the broker still holds them), but reported, since a test that waited for
every decision normally expects none.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import anyio
import attrs

from amqp_batch import Message, MessageResult
from amqp_batch._transport._base import Properties
from consumer_support import admin_channel, drain

Decide = Callable[[Message], MessageResult]

_FINAL = (MessageResult.ACK, MessageResult.NACK)


def _always_ack(message: Message) -> MessageResult:
    return MessageResult.ACK


class Recorder:
    """Wraps the decision of a test handler and remembers every delivery it saw.

    ``decide`` maps a message to its result (default: ACK). ``max_requeue`` is the
    consumer's ``max_requeue_attempts``: a REQUEUE at that count is final (it is
    dead-lettered by the library).
    """

    def __init__(self, decide: Decide = _always_ack, *, max_requeue: int = 3) -> None:
        self.decide = decide
        self.max_requeue = max_requeue
        #: (id, retry_count) -> times the handler saw it.
        self.seen: collections.Counter[tuple[str, int]] = collections.Counter()
        #: (id, retry_count) -> times it came with ``redelivered=true``.
        self.redelivered: collections.Counter[tuple[str, int]] = collections.Counter()
        self.acked: set[str] = set()
        self.final: set[str] = set()
        self.batches = 0
        self._changed = anyio.Event()

    def record(self, message: Message) -> MessageResult:
        """Decide ``message`` and remember it (call once per delivery)."""
        message_id = message.message_id or message.body.decode("utf-8", "replace")
        key = (message_id, message.retry_count)
        self.seen[key] += 1
        if message.redelivered:
            self.redelivered[key] += 1
        result = self.decide(message)
        if result is MessageResult.ACK:
            self.acked.add(message_id)
        if result in _FINAL or (
            result is MessageResult.REQUEUE and message.retry_count >= self.max_requeue
        ):
            self.final.add(message_id)
        self._changed.set()
        self._changed = anyio.Event()
        return result

    async def handler(
        self, messages: Sequence[Message]
    ) -> AsyncIterator[MessageResult]:
        """A batch handler: one recorded decision per message, in order."""
        self.batches += 1
        for message in messages:
            yield self.record(message)

    async def wait_decided(self, ids: Iterable[str], *, timeout: float) -> None:
        """Wait until every id in ``ids`` has had a final decision."""
        wanted = set(ids)
        with anyio.fail_after(timeout):
            while not wanted <= self.final:
                await self._changed.wait()

    async def wait_seen(self, count: int, *, timeout: float) -> None:
        """Wait until the handler has seen ``count`` deliveries in total."""
        with anyio.fail_after(timeout):
            while self.seen.total() < count:
                await self._changed.wait()


@attrs.frozen
class Report:
    """What happened to every confirmed id."""

    confirmed: frozenset[str]
    acked: frozenset[str]
    dead_lettered: collections.Counter[str]
    still_queued: collections.Counter[str]
    #: Deliveries the handler saw beyond the first, per (id, retry_count).
    duplicates: int
    #: Duplicates that arrived without ``redelivered=true`` (must be 0).
    unflagged_duplicates: int
    deliveries: int

    @property
    def lost(self) -> frozenset[str]:
        """Confirmed ids that are neither acked, dead-lettered nor still queued."""
        return (
            self.confirmed
            - self.acked
            - set(self.dead_lettered)
            - set(self.still_queued)
        )

    @property
    def unexpected(self) -> frozenset[str]:
        """Ids seen somewhere that were never published (and confirmed)."""
        everywhere = self.acked | set(self.dead_lettered) | set(self.still_queued)
        return frozenset(everywhere - self.confirmed)

    @property
    def twice_settled(self) -> frozenset[str]:
        """Ids both acked and dead-lettered, or dead-lettered more than once."""
        both = self.acked & set(self.dead_lettered)
        many = {i for i, n in self.dead_lettered.items() if n > 1}
        return frozenset(both | many)

    def assert_holds(
        self, *, max_duplicates: int = 0, allow_still_queued: bool = False
    ) -> None:
        """Assert the invariant; ``max_duplicates`` bounds the duplicate count."""
        assert not self.lost, f"lost {len(self.lost)}: {sorted(self.lost)[:20]}"
        assert not self.unexpected, f"unexpected: {sorted(self.unexpected)[:20]}"
        assert not self.twice_settled, f"settled twice: {sorted(self.twice_settled)}"
        assert self.unflagged_duplicates == 0, (
            f"{self.unflagged_duplicates} duplicates came without redelivered=true"
        )
        assert self.duplicates <= max_duplicates, (
            f"{self.duplicates} duplicates > {max_duplicates}"
        )
        if not allow_still_queued:
            assert not self.still_queued, (
                f"still queued: {sorted(self.still_queued)[:20]}"
            )

    def figures(self) -> dict[str, Any]:
        """The counts, for reports."""
        return {
            "confirmed": len(self.confirmed),
            "acked": len(self.acked),
            "dead_lettered": len(self.dead_lettered),
            "still_queued": len(self.still_queued),
            "lost": len(self.lost),
            "unexpected": len(self.unexpected),
            "duplicates": self.duplicates,
            "deliveries": self.deliveries,
        }


async def publish_numbered(
    url: str,
    routing_key: str,
    count: int,
    *,
    exchange: str = "",
    start: int = 0,
    body_size: int = 0,
    headers: dict[str, Any] | None = None,
) -> list[str]:
    """Publish ``count`` persistent messages with ids ``start..`` under confirms.

    Returns the ids whose publish the broker confirmed (all, or it raises).
    The body is the id, padded with spaces to ``body_size`` bytes.
    """
    confirmed: list[str] = []
    async with admin_channel(url) as channel:
        for number in range(start, start + count):
            text = str(number)
            await channel.publish(
                text.encode().ljust(body_size),
                exchange=exchange,
                routing_key=routing_key,
                properties=Properties(
                    message_id=text, delivery_mode=2, headers=headers
                ),
            )
            confirmed.append(text)
    return confirmed


async def check(
    url: str,
    queue: str,
    dead_letter_queue: str | None,
    recorder: Recorder,
    confirmed: Iterable[str],
) -> Report:
    """Drain ``queue`` and ``dead_letter_queue`` and classify every id."""
    async with admin_channel(url) as channel:
        remaining = await drain(channel, queue)
        dead = await drain(channel, dead_letter_queue) if dead_letter_queue else []

    def ids(deliveries: Sequence[Any]) -> collections.Counter[str]:
        return collections.Counter(
            str(d.properties.message_id or d.body.decode("utf-8", "replace").strip())
            for d in deliveries
        )

    duplicates = sum(n - 1 for n in recorder.seen.values() if n > 1)
    unflagged = sum(
        max(0, (n - 1) - recorder.redelivered[key])
        for key, n in recorder.seen.items()
        if n > 1
    )
    return Report(
        confirmed=frozenset(confirmed),
        acked=frozenset(recorder.acked),
        dead_lettered=ids(dead),
        still_queued=ids(remaining),
        duplicates=duplicates,
        unflagged_duplicates=unflagged,
        deliveries=recorder.seen.total(),
    )
