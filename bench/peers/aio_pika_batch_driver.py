"""Drive aio-pika-batch 0.1.0 through one benchmark measurement.

Runs with the Python 3.12 interpreter of the virtual environment that the bench
creates (``bench/.venvs/aio-pika-batch``); it imports nothing from amqp-batch. The
queue is filled by the runner before this starts. Protocol on stdout and the
arguments: ``common.py`` beside this file. Logs go to stderr.

Modes (``--mode``), mirroring ``bench/workloads.py``:

- ``drain``: ACK everything; done when ``--count`` messages were handled and their
  results applied, then the consumer is stopped (timed).
- ``mixed``: message ``i`` (index at the start of the body) gets NACK if
  ``i % 10 == 0``, REQUEUE (always) if ``i % 10 == 1``, else ACK; done when every
  message reached its final result, the consumer stopped, the queue is empty and
  the DLQ holds ``--expect-dlq`` messages (polled on a probe connection).
- ``io``: ACK everything after awaiting ``--sleep`` seconds per batch.
- ``latency``: ACK everything and record ``now - timestamp`` (the body's second
  field) per message; the runner publishes at a fixed rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any

import aio_pika
import structlog
from aio_pika_batch import BatchConsumer, BatchConsumerSettings, MessageResult
from common import RETRY_HEADER, Meter, emit, parser, rss_kib


class State:
    """Shared by every worker instance (aio-pika-batch builds one per worker)."""

    mode = "drain"
    target = 0
    handled = 0
    final = 0
    sleep = 0.0
    max_requeue = 3
    latencies: list[float] = []
    done: asyncio.Event | None = None


class Bench(BatchConsumer[BatchConsumerSettings]):
    """The benchmark handler."""

    async def process_messages(self, messages: list[Any]) -> Any:
        state = State
        if state.sleep:
            await asyncio.sleep(state.sleep)
        if state.mode == "latency":
            now = time.time()
            for message in messages:
                state.latencies.append(now - float(message.body[11:29]))
        for message in messages:
            state.handled += 1
            if state.mode != "mixed":
                state.final += 1
                yield MessageResult.ACK
                continue
            kind = int(message.body[:10]) % 10
            if kind == 0:
                state.final += 1
                yield MessageResult.NACK
            elif kind == 1:
                headers = message.headers or {}
                if int(headers.get(RETRY_HEADER, 0)) >= state.max_requeue:
                    state.final += 1
                yield MessageResult.REQUEUE
            else:
                state.final += 1
                yield MessageResult.ACK

    async def _flush_batch(self, *args: Any, **kwargs: Any) -> None:
        # Results are applied after the generator ends: signal only then.
        await super()._flush_batch(*args, **kwargs)
        if State.final >= State.target and State.done is not None:
            State.done.set()


async def queue_counts(channel: Any, *names: str) -> list[int]:
    """Ready-message counts of ``names`` (passive declares)."""
    counts = []
    for name in names:
        queue = await channel.declare_queue(name, passive=True)
        counts.append(queue.declaration_result.message_count)
    return counts


async def main(args: argparse.Namespace) -> None:
    State.mode = args.mode
    State.target = args.count
    State.sleep = args.sleep
    State.max_requeue = args.max_requeue
    State.done = asyncio.Event()
    arguments = {"x-dead-letter-exchange": args.dlx} if args.dlx else None
    settings = BatchConsumerSettings(
        url=args.url,
        queue_name=args.queue,
        prefetch_count=args.prefetch,
        batch_size=args.batch_size,
        batch_timeout=args.batch_timeout,
        num_workers=args.workers,
        max_requeue_attempts=args.max_requeue,
        queue_arguments=arguments,
    )
    probe = await aio_pika.connect(args.url)
    probe_channel = await probe.channel()
    baseline = rss_kib()
    consumer = Bench(settings)
    meter = Meter()
    meter.start()
    await consumer.__aenter__()
    try:
        if args.mode == "latency":
            # __aenter__ returns before the workers consume: wait for them.
            while (
                await probe_channel.declare_queue(args.queue, passive=True)
            ).declaration_result.consumer_count < args.workers:
                await asyncio.sleep(0.01)
            print(json.dumps({"ready": True}), flush=True)
        await State.done.wait()
    finally:
        await consumer.stop()
    if args.dlq:
        while await queue_counts(probe_channel, args.queue, args.dlq) != [
            0,
            args.expect_dlq,
        ]:
            await asyncio.sleep(0.005)
    meter.stop()
    await probe.close()
    emit(meter, State.handled, baseline, latencies=State.latencies)


def parse() -> argparse.Namespace:
    modes = ("drain", "mixed", "io", "latency")
    return parser(__doc__.splitlines()[0], modes).parse_args()


if __name__ == "__main__":
    # aio-pika-batch logs through structlog, which by default prints every level
    # (debug included) to stdout: keep WARNING and up, on stderr, as a deployment
    # would.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    asyncio.run(main(parse()))
