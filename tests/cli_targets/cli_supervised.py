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


async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
    pid = os.getpid()
    ids = [m.body.decode() + (":r" if m.redelivered else "") for m in messages]
    print(f"start {pid} {' '.join(ids)}", flush=True)
    await anyio.sleep(WORK)  # the work
    for _ in messages:
        yield MessageResult.ACK
    print(f"acked {pid} {' '.join(m.body.decode() for m in messages)}", flush=True)
