"""Handlers for ``amqp-batch run --processes`` tests: every line names the process.

``start PID ID[:r] ...`` when a batch reaches the handler (``:r`` for a redelivered
message), ``acked PID ID ...`` once its results are given. ``AMQP_BATCH_TEST_WORK``
is how long a batch takes (seconds, default 1).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence

import anyio

from amqp_batch import Message, MessageResult

WORK = float(os.environ.get("AMQP_BATCH_TEST_WORK", "1"))


def say(line: str) -> None:
    """Print ``line`` with one write: the children share the supervisor's stdout,
    and under ``PYTHONUNBUFFERED`` ``print`` writes the text and its newline
    separately, so two processes' lines could interleave."""
    os.write(1, f"{line}\n".encode())


async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
    pid = os.getpid()
    ids = [m.body.decode() + (":r" if m.redelivered else "") for m in messages]
    say(f"start {pid} {' '.join(ids)}")
    await anyio.sleep(WORK)  # the work
    for _ in messages:
        yield MessageResult.ACK
    say(f"acked {pid} {' '.join(m.body.decode() for m in messages)}")
