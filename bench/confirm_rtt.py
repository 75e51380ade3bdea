"""Confirmed publishes one at a time vs pipelined, on our transport.

W2's REQUEUE path republishes each copy and waits for its confirm before the next
(``Acker._requeue``); this measures what one such round trip costs against a
pipelined window (how ``transport.fill`` publishes).

    python bench/confirm_rtt.py [--count 2000]
"""

from __future__ import annotations

import argparse
import os
import time

import anyio

from amqp_batch._transport._base import Properties
from amqp_batch._transport._native import connect
from amqp_batch._transport._url import parse_url

QUEUE = "amqp-batch.bench.confirm-rtt"


async def main(url: str, count: int) -> None:
    body = b"x" * 256
    properties = Properties(delivery_mode=2)
    async with connect(parse_url(url)) as connection, connection.channel() as channel:
        await channel.queue_declare(QUEUE, durable=True)
        await channel.confirm_select()
        started = time.perf_counter()
        for _ in range(count):
            await channel.publish(body, routing_key=QUEUE, properties=properties)
        sequential = time.perf_counter() - started
        started = time.perf_counter()
        waiters = [
            channel.start_publish(body, routing_key=QUEUE, properties=properties)
            for _ in range(count)
        ]
        for waiter in waiters:
            assert waiter is not None
            await waiter.wait()
        pipelined = time.perf_counter() - started
        await channel.queue_delete(QUEUE)
    print(
        f"{count} confirmed publishes: one at a time {sequential / count * 1e6:,.0f} "
        f"µs each ({count / sequential:,.0f}/s); pipelined "
        f"{pipelined / count * 1e6:,.0f} µs each ({count / pipelined:,.0f}/s)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("AMQP_BATCH_BENCH_URL", "amqp://guest:guest@127.0.0.1/"),
    )
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    anyio.run(main, args.url, args.count)
