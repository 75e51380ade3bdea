"""Drive a FastStream RabbitMQ subscriber through one measurement.

FastStream (bench/.venvs/faststream) in its usual mode: a ``@broker.subscriber``
handler per message, acked by FastStream after the handler returns (its default
ack policy), ``--prefetch`` set on the subscriber's channel, service logs at
WARNING (its per-message INFO lines off, as a deployment would run it). In W2 the
handler rejects a NACK (``message.reject()``, the broker dead-letters it), and
for a REQUEUE awaits ``broker.publish`` of a copy with ``x-retry-count`` + 1
(persistent, publisher confirms: FastStream's default channel) before returning,
so the original is acked after the copy is confirmed. A REQUEUE at the limit is
rejected. Arguments and protocol: ``common.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import aio_pika
from common import (
    Decision,
    Meter,
    copy_headers,
    decide,
    emit,
    parser,
    retry_count,
    rss_kib,
    wait_for_counts,
)
from faststream.rabbit import Channel, RabbitBroker, RabbitMessage, RabbitQueue


class Counts:
    handled = 0
    final = 0


async def main(args: argparse.Namespace) -> None:
    broker = RabbitBroker(args.url, log_level=logging.DEBUG)
    counts, done = Counts(), asyncio.Event()
    queue = RabbitQueue(args.queue, durable=True, declare=False)

    @broker.subscriber(queue, channel=Channel(prefetch_count=args.prefetch))
    async def handle(body: bytes, message: RabbitMessage) -> None:
        counts.handled += 1
        retries = retry_count(message.headers) if args.mode == "mixed" else 0
        decision = decide(args.mode, body, retries, args.max_requeue)
        if decision is Decision.REQUEUE:
            await broker.publish(
                body,
                queue=args.queue,
                persist=True,
                headers=copy_headers(message.headers, args.queue, retries),
            )
            return
        if decision is not Decision.ACK:
            await message.reject()
        counts.final += 1
        if counts.final >= args.count:
            done.set()

    probe = await aio_pika.connect(args.url)
    probe_channel = await probe.channel()
    baseline = rss_kib()
    meter = Meter()
    meter.start()
    await broker.start()
    await done.wait()
    await broker.stop()  # waits for the handlers in flight, then their acks
    if args.dlq:
        await wait_for_counts(probe_channel, args.queue, args.dlq, args.expect_dlq)
    meter.stop()
    await probe.close()
    emit(meter, counts.handled, baseline)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(parser(__doc__.splitlines()[0], ("drain", "mixed")).parse_args()))
