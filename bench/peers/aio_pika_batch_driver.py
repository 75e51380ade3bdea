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
- ``outage`` (W7): REQUEUE every message for ``--outage`` seconds from the
  consumer's start (the dependency is down), ACK from then on; done when every
  message was acked or dead-lettered (its own REQUEUE, ``--max-requeue``), the
  consumer stopped, the queue is empty and the DLQ holds the dead-lettered ones.
  Reports them and the seconds from the end of the outage to that point.

``--queue-type quorum`` declares the work queue with ``x-queue-type: quorum``
(besides ``x-dead-letter-exchange``), the same arguments as the runner's fill
and amqp-batch: aio-pika-batch declares the queue itself from
``queue_arguments``.
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
from common import RETRY_HEADER, Meter, batch_options, emit, parser, rss_kib


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
    #: outage mode: REQUEUE until this ``time.monotonic()``.
    outage_until = float("inf")
    failed = 0
    dead = 0


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
        if state.mode == "outage":
            for result in outage_results(messages):
                yield result
            return
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


def outage_results(messages: list[Any]) -> list[Any]:
    """W7: REQUEUE while the outage lasts (a REQUEUE at the limit is
    dead-lettered by aio-pika-batch), then ACK."""
    state = State
    failing = time.monotonic() < state.outage_until
    results = []
    for message in messages:
        state.handled += 1
        if not failing:
            state.final += 1
            results.append(MessageResult.ACK)
            continue
        state.failed += 1
        if int((message.headers or {}).get(RETRY_HEADER, 0)) >= state.max_requeue:
            state.final += 1
            state.dead += 1
        results.append(MessageResult.REQUEUE)
    return results


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
    arguments: dict[str, Any] = {}
    if args.queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    if args.dlx:
        arguments["x-dead-letter-exchange"] = args.dlx
    settings = BatchConsumerSettings(
        **batch_options(args), queue_arguments=arguments or None
    )
    probe = await aio_pika.connect(args.url)
    probe_channel = await probe.channel()
    baseline = rss_kib()
    consumer = Bench(settings)
    meter = Meter()
    meter.start()
    if args.mode == "outage":
        State.outage_until = time.monotonic() + args.outage
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
        expect = State.dead if args.mode == "outage" else args.expect_dlq
        while await queue_counts(probe_channel, args.queue, args.dlq) != [0, expect]:
            await asyncio.sleep(0.005)
    ended = time.monotonic()
    meter.stop()
    await probe.close()
    extra: dict[str, Any] = {"latencies": State.latencies}
    if args.mode == "outage":
        extra |= {
            "dead_lettered": State.dead,
            "failed_calls": State.failed,
            "drain_seconds": max(0.0, ended - State.outage_until),
        }
    emit(meter, State.handled, baseline, **extra)


def parse() -> argparse.Namespace:
    modes = ("drain", "mixed", "io", "latency", "outage")
    arguments = parser(__doc__.splitlines()[0], modes)
    arguments.add_argument("--queue-type", choices=("classic", "quorum"))
    arguments.add_argument("--outage", type=float, default=5.0)
    return arguments.parse_args()


if __name__ == "__main__":
    # aio-pika-batch logs through structlog, which by default prints every level
    # (debug included) to stdout: keep WARNING and up, on stderr, as a deployment
    # would.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    asyncio.run(main(parse()))
