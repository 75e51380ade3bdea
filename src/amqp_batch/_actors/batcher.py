"""Batcher: groups messages by size, bytes and a deadline. No timer tasks."""

from __future__ import annotations

import math

from anyio import EndOfStream, current_time, move_on_at
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from .._message import Message

__all__ = ["run_batcher"]


async def run_batcher(
    messages: ObjectReceiveStream[Message],
    to_handler: ObjectSendStream[list[Message]],
    *,
    batch_size: int,
    batch_timeout: float,
    max_batch_bytes: int | None = None,
) -> None:
    """Flush a batch at ``batch_size`` messages, ``max_batch_bytes`` bytes, or
    ``batch_timeout`` seconds after its first message, whichever comes first.

    The deadline is a ``move_on_at`` around the receive inside this one loop.
    When ``messages`` ends (shutdown), the batch being collected is flushed at once
    and ``to_handler`` is closed.
    """
    byte_limit = math.inf if max_batch_bytes is None else max_batch_bytes
    async with messages, to_handler:
        while True:
            try:
                first = await messages.receive()
            except EndOfStream:
                return
            batch = [first]
            batch_bytes = len(first.body)
            ended = False
            with move_on_at(current_time() + batch_timeout):
                while len(batch) < batch_size and batch_bytes < byte_limit:
                    try:
                        message = await messages.receive()
                    except EndOfStream:
                        ended = True
                        break
                    batch.append(message)
                    batch_bytes += len(message.body)
            await to_handler.send(batch)
            if ended:
                return
