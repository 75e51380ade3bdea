"""Drive a hand-written aio-pika batch consumer through one measurement.

What a user writes without a batch library (bench/.venvs/aio-pika): consume into
an ``asyncio.Queue``, collect up to ``--batch-size`` messages or until
``--batch-timeout`` after the first, process, then settle the batch: NACKs
rejected one by one (the broker dead-letters them), REQUEUE copies published on
the same channel with publisher confirms (all of a batch's copies in flight
together, ``asyncio.gather``), and one ``ack(multiple=True)`` at the batch's last
acked message once the copies are confirmed. A REQUEUE at the limit is rejected
and the broker dead-letters it. Arguments and protocol: ``common.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

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


class Consumer:
    """The batch loop and its counters."""

    def __init__(self, args: argparse.Namespace, channel: Any) -> None:
        self.args = args
        self.channel = channel
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.handled = 0
        self.final = 0

    async def collect(self) -> list[Any]:
        """Up to batch-size messages, or fewer once batch-timeout has passed."""
        inbox, loop = self.inbox, asyncio.get_running_loop()
        batch = [await inbox.get()]
        deadline = loop.time() + self.args.batch_timeout
        while len(batch) < self.args.batch_size:
            if not inbox.empty():
                batch.append(inbox.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(inbox.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def process(self, batch: list[Any]) -> None:
        """The handler's decisions, then the settlement of the whole batch."""
        args, last_ack, copies = self.args, None, []
        if args.sleep:
            await asyncio.sleep(args.sleep)
        for message in batch:
            self.handled += 1
            retries = retry_count(message.headers) if args.mode == "mixed" else 0
            decision = decide(args.mode, message.body, retries, args.max_requeue)
            if decision is Decision.REQUEUE:
                copy = aio_pika.Message(
                    message.body,
                    headers=copy_headers(message.headers, args.queue, retries),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                copies.append(
                    self.channel.default_exchange.publish(
                        copy, routing_key=args.queue, mandatory=True
                    )
                )
                last_ack = message
                continue
            self.final += 1
            if decision is Decision.ACK:
                last_ack = message
            else:
                await message.reject(requeue=False)
        await asyncio.gather(*copies)
        if last_ack is not None:
            await last_ack.ack(multiple=True)

    async def run(self) -> None:
        while self.final < self.args.count:
            await self.process(await self.collect())


async def main(args: argparse.Namespace) -> None:
    probe = await aio_pika.connect(args.url)
    probe_channel = await probe.channel()
    baseline = rss_kib()
    meter = Meter()
    meter.start()
    connection = await aio_pika.connect(args.url)
    channel = await connection.channel()  # publisher confirms: aio-pika's default
    await channel.set_qos(prefetch_count=args.prefetch)
    queue = await channel.get_queue(args.queue, ensure=False)
    consumer = Consumer(args, channel)
    tag = await queue.consume(consumer.inbox.put)
    await consumer.run()
    await queue.cancel(tag)
    await connection.close()
    if args.dlq:
        await wait_for_counts(probe_channel, args.queue, args.dlq, args.expect_dlq)
    meter.stop()
    await probe.close()
    emit(meter, consumer.handled, baseline)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(parser(__doc__.splitlines()[0], ("drain", "mixed")).parse_args()))
