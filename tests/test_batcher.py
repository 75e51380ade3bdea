"""The batcher and handler runner, deterministic: trio's autojump clock makes an
hour-long batch deadline pass at once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import anyio
import pytest
import trio
import trio.testing

from amqp_batch import MessageResult
from amqp_batch._actors.acker import DeadLetter, Outcome
from amqp_batch._actors.batcher import run_batcher
from amqp_batch._actors.handler import collect_results
from amqp_batch._actors.ledger import AckLedger
from amqp_batch._message import Message
from amqp_batch._transport._base import Delivery, Properties


def _delivery(
    tag: int, size: int = 1, headers: dict[str, object] | None = None
) -> Delivery:
    return Delivery(
        delivery_tag=tag,
        redelivered=False,
        exchange="",
        routing_key="q",
        consumer_tag="c",
        body=b"x" * size,
        properties=Properties(headers=headers),
    )


def _message(tag: int, size: int = 1) -> Message:
    return Message(_delivery(tag, size))


class _Run:
    """What one batcher run produced."""

    def __init__(self) -> None:
        self.flushed: list[tuple[float, list[int]]] = []
        self.dead: list[tuple[int, str]] = []
        self.ledger = AckLedger()


async def _run_batcher(
    feed: list[tuple[float, Delivery]],
    *,
    batch_size: int,
    batch_timeout: float,
    max_batch_bytes: int | None = None,
    buffer: int = 0,
    stop_at: float | None = None,
) -> _Run:
    """Feed deliveries at virtual times; record each flushed batch as
    (time, tags), and each dead-lettered delivery; ``stop_at`` cancels the intake
    then."""
    send, receive = anyio.create_memory_object_stream[Delivery](buffer)
    out_send, out_receive = anyio.create_memory_object_stream[list[Message]](100)
    acker_send, acker_receive = anyio.create_memory_object_stream[list[Outcome]](100)
    start = anyio.current_time()
    run = _Run()

    async def producer() -> None:
        async with send:
            for at, delivery in feed:
                await anyio.sleep_until(start + at)
                await send.send(delivery)

    async def dead_letters() -> None:
        async with acker_receive:
            async for outcomes in acker_receive:
                for message, outcome in outcomes:
                    assert isinstance(outcome, DeadLetter)
                    run.dead.append((message.delivery_tag, outcome.reason))

    async with receive, anyio.create_task_group() as group:
        group.start_soon(producer)
        group.start_soon(dead_letters)
        intake = await group.start(
            lambda task_status: run_batcher(
                receive,
                run.ledger,
                out_send,
                acker_send,
                batch_size=batch_size,
                batch_timeout=batch_timeout,
                max_batch_bytes=max_batch_bytes,
                task_status=task_status,
            )
        )
        if stop_at is not None:

            async def stopper() -> None:
                await anyio.sleep_until(start + stop_at)
                intake.cancel()

            group.start_soon(stopper)
        async with out_receive:
            async for batch in out_receive:
                run.flushed.append(
                    (
                        round(anyio.current_time() - start, 3),
                        [m.delivery_tag for m in batch],
                    )
                )
        group.cancel_scope.cancel()
    return run


async def _batches(
    feed: list[tuple[float, Message]],
    *,
    batch_size: int,
    batch_timeout: float,
    max_batch_bytes: int | None = None,
) -> list[tuple[float, list[int]]]:
    run = await _run_batcher(
        [(at, m.delivery) for at, m in feed],
        batch_size=batch_size,
        batch_timeout=batch_timeout,
        max_batch_bytes=max_batch_bytes,
    )
    return run.flushed


@pytest.mark.trio
async def test_deadline_counts_from_first_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    feed = [(0.0, _message(1)), (3000.0, _message(2)), (3700.0, _message(3))]
    flushed = await _batches(feed, batch_size=10, batch_timeout=3600)
    # 1 and 2 flush an hour after 1 arrived; 3 flushes when the input ends.
    assert flushed == [(3600.0, [1, 2]), (3700.0, [3])]


@pytest.mark.trio
async def test_size_flush_is_immediate(autojump_clock: trio.testing.MockClock) -> None:
    feed = [(0.0, _message(tag)) for tag in range(1, 8)]
    flushed = await _batches(feed, batch_size=3, batch_timeout=3600)
    assert flushed == [(0.0, [1, 2, 3]), (0.0, [4, 5, 6]), (0.0, [7])]


@pytest.mark.trio
async def test_bytes_flush(autojump_clock: trio.testing.MockClock) -> None:
    feed = [(0.0, _message(tag, size=40)) for tag in range(1, 6)]
    flushed = await _batches(
        feed, batch_size=100, batch_timeout=10, max_batch_bytes=100
    )
    assert flushed == [(0.0, [1, 2]), (0.0, [3, 4]), (0.0, [5])]


@pytest.mark.trio
async def test_max_batch_bytes_is_a_cap_not_a_trigger(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: batches overshot max_batch_bytes by their last message. Now no
    batch exceeds it, except a message that alone is larger (a batch of one);
    every tag is still registered with the ledger, in order."""
    sizes = {1: 60, 2: 30, 3: 20, 4: 150, 5: 10, 6: 100, 7: 1}
    feed = [(0.0, _delivery(tag, size)) for tag, size in sizes.items()]
    run = await _run_batcher(
        feed, batch_size=100, batch_timeout=10, max_batch_bytes=100, buffer=10
    )
    assert [tags for _, tags in run.flushed] == [[1, 2], [3], [4], [5], [6], [7]]
    for _, tags in run.flushed:
        assert len(tags) == 1 or sum(sizes[t] for t in tags) <= 100
    assert len(run.ledger) == 7


@pytest.mark.trio
async def test_carried_delivery_keeps_its_batch_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The delivery that did not fit starts the next batch, which still flushes
    on its deadline (nothing is held back waiting for more input)."""
    feed = [(0.0, _delivery(1, 80)), (1.0, _delivery(2, 80)), (50.0, _delivery(3))]
    run = await _run_batcher(
        feed, batch_size=10, batch_timeout=5, max_batch_bytes=100, buffer=10
    )
    assert run.flushed == [(1.0, [1]), (6.0, [2]), (50.0, [3])]


@pytest.mark.trio
async def test_buffered_deliveries_fill_whole_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Deliveries the session already holds are taken in one go: full batches,
    every tag registered with the ledger in order."""
    feed = [(0.0, _delivery(tag)) for tag in range(1, 11)]
    run = await _run_batcher(feed, batch_size=4, batch_timeout=3600, buffer=100)
    assert run.flushed == [(0.0, [1, 2, 3, 4]), (0.0, [5, 6, 7, 8]), (0.0, [9, 10])]
    assert len(run.ledger) == 10


@pytest.mark.trio
async def test_invalid_retry_header_goes_to_the_acker_not_the_handler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    feed = [
        (0.0, _delivery(1, headers={"x-retry-count": "3"})),
        (0.0, _delivery(2)),
        (0.0, _delivery(3, headers={"x-retry-count": -1})),
        (0.0, _delivery(4, headers={"x-retry-count": 2})),
    ]
    run = await _run_batcher(feed, batch_size=2, batch_timeout=3600)
    assert run.flushed == [(0.0, [2, 4])]
    assert [tag for tag, _ in run.dead] == [1, 3]
    assert all(reason.startswith("invalid-retry-count") for _, reason in run.dead)
    # Every tag is known to the ledger, the dead-lettered ones too.
    assert len(run.ledger) == 4


@pytest.mark.trio
async def test_stopping_the_intake_flushes_the_batch_being_collected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After ``Intake.cancel`` the batch in progress goes to the handler at once
    and nothing more is taken (it stays in the session for the broker)."""
    feed = [(0.0, _delivery(1)), (1.0, _delivery(2)), (5.0, _delivery(3))]
    run = await _run_batcher(
        feed, batch_size=10, batch_timeout=3600, buffer=10, stop_at=2.0
    )
    assert run.flushed == [(2.0, [1, 2])]
    assert len(run.ledger) == 2


pytestmark_anyio = pytest.mark.anyio


@pytest.mark.anyio
async def test_collect_results_forms() -> None:
    messages = [_message(t) for t in (1, 2, 3)]

    async def generator(ms: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for _ in ms:
            yield MessageResult.NACK

    async def returns_list(ms: Sequence[Message]) -> list[MessageResult]:
        return [MessageResult.REQUEUE] * len(ms)

    async def short(ms: Sequence[Message]) -> AsyncIterator[MessageResult]:
        yield MessageResult.ACK

    async def raises(ms: Sequence[Message]) -> AsyncIterator[MessageResult]:
        yield MessageResult.ACK
        raise ValueError("boom")

    async def junk(ms: Sequence[Message]) -> list[object]:
        return [MessageResult.ACK, 1, MessageResult.ACK]

    async def returns_none(ms: Sequence[Message]) -> None:
        return None

    after_loop: list[bool] = []

    async def extra(ms: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for _ in range(5):
            yield MessageResult.ACK
        after_loop.append(True)  # code after the loop still runs

    fallback = MessageResult.REQUEUE_IMMEDIATE
    f, a = fallback, MessageResult.ACK
    assert (
        await collect_results(generator, messages, fallback=f)
        == [MessageResult.NACK] * 3
    )
    assert (
        await collect_results(returns_list, messages, fallback=f)
        == [MessageResult.REQUEUE] * 3
    )
    assert await collect_results(short, messages, fallback=f) == [a, f, f]
    assert await collect_results(raises, messages, fallback=f) == [a, f, f]
    assert await collect_results(junk, messages, fallback=f) == [a, f, f]
    assert await collect_results(returns_none, messages, fallback=f) == [f, f, f]
    assert await collect_results(extra, messages, fallback=f) == [a, a, a]
    assert after_loop == [True]


@pytest.mark.anyio
async def test_collect_results_never_swallows_cancellation() -> None:
    messages = [_message(1)]
    entered = anyio.Event()

    async def slow(ms: Sequence[Message]) -> AsyncIterator[MessageResult]:
        entered.set()
        await anyio.sleep_forever()
        yield MessageResult.ACK

    results: list[MessageResult] | None = None
    with anyio.move_on_after(5) as scope:
        async with anyio.create_task_group() as group:

            async def run() -> None:
                nonlocal results
                results = await collect_results(
                    slow, messages, fallback=MessageResult.ACK
                )

            group.start_soon(run)
            await entered.wait()
            group.cancel_scope.cancel()
    assert not scope.cancelled_caught
    assert results is None
