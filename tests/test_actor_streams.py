"""The actors' hand-offs: at once when the other side is ready, and like anyio's
own calls otherwise (a pending cancellation first, then the stream's error)."""

from __future__ import annotations

import anyio
import pytest

from amqp_batch._actors.streams import receive, send

pytestmark = pytest.mark.anyio


async def test_a_ready_hand_off_happens_at_once() -> None:
    """An item in the buffer is taken, and room is used, without a scheduling
    point: even in a cancelled scope both go through."""
    tx, rx = anyio.create_memory_object_stream[int](1)
    with tx, rx, anyio.CancelScope() as scope:
        scope.cancel()
        await send(tx, 1)
        assert await receive(rx) == 1
    assert not scope.cancelled_caught


async def test_waits_like_anyio_when_the_other_side_is_not_ready() -> None:
    tx, rx = anyio.create_memory_object_stream[str](0)
    got: list[str] = []

    async def consume() -> None:
        got.append(await receive(rx))

    with tx, rx:
        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await send(tx, "batch")  # no receiver waits yet, or it does: both work
    assert got == ["batch"]


async def test_a_broken_stream_raises_a_pending_cancellation_first() -> None:
    """An actor whose peer is gone (its task ended with the connection) is
    cancelled with it: it sees the cancellation, not the broken stream."""
    tx, rx = anyio.create_memory_object_stream[int](1)
    rx.close()
    with tx:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await send(tx, 1)
        assert scope.cancelled_caught
        with pytest.raises(anyio.BrokenResourceError):
            await send(tx, 1)


async def test_an_ended_stream_raises_a_pending_cancellation_first() -> None:
    tx, rx = anyio.create_memory_object_stream[int](1)
    tx.close()
    with rx:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await receive(rx)
        assert scope.cancelled_caught
        with pytest.raises(anyio.EndOfStream):
            await receive(rx)
