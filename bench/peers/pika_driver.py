"""Drive pika's BlockingConnection consumer through one measurement.

What a user writes with pika (bench/.venvs/pika): ``channel.consume`` with an
inactivity timeout of ``--batch-timeout``, and ``basic_ack(multiple=True)`` at the
last acked message every ``--batch-size`` messages and when the queue goes
quiet. In W2 the channel is in confirm mode: a NACK is rejected at once (the
broker dead-letters it), a REQUEUE copy is published with ``basic_publish``,
which in confirm mode returns once the broker confirmed it (one round trip per
copy, what pika offers), and the original is covered by the next multiple-ack.
A REQUEUE at the limit is rejected. Arguments and protocol: ``common.py``.
"""

from __future__ import annotations

import argparse
import logging

import pika
from common import (
    Decision,
    Meter,
    copy_headers,
    decide,
    emit,
    parser,
    retry_count,
    rss_kib,
)


def queue_counts(
    channel: pika.adapters.blocking_connection.BlockingChannel, *names: str
) -> list[int]:
    return [
        channel.queue_declare(name, passive=True).method.message_count for name in names
    ]


def consume(
    args: argparse.Namespace, channel: pika.adapters.blocking_connection.BlockingChannel
) -> int:
    """Consume until every message is final; returns how many were handled."""
    handled = final = unacked = 0
    last_ack = None
    persistent = pika.DeliveryMode.Persistent
    for method, properties, body in channel.consume(
        args.queue, inactivity_timeout=args.batch_timeout
    ):
        if method is not None:
            handled += 1
            headers = properties.headers
            retries = retry_count(headers) if args.mode == "mixed" else 0
            decision = decide(args.mode, body, retries, args.max_requeue)
            if decision is Decision.REQUEUE:
                channel.basic_publish(
                    "",
                    args.queue,
                    body,
                    pika.BasicProperties(
                        delivery_mode=persistent,
                        headers=copy_headers(headers, args.queue, retries),
                    ),
                    mandatory=True,
                )
                last_ack, unacked = method.delivery_tag, unacked + 1
            elif decision is Decision.ACK:
                final += 1
                last_ack, unacked = method.delivery_tag, unacked + 1
            else:
                final += 1
                channel.basic_reject(method.delivery_tag, requeue=False)
        if last_ack is not None and (
            method is None or unacked >= args.batch_size or final >= args.count
        ):
            channel.basic_ack(last_ack, multiple=True)
            last_ack, unacked = None, 0
        if final >= args.count:
            break
    channel.cancel()
    return handled


def main(args: argparse.Namespace) -> None:
    url = pika.URLParameters(args.url)
    probe = pika.BlockingConnection(url)
    probe_channel = probe.channel()
    baseline = rss_kib()
    meter = Meter()
    meter.start()
    connection = pika.BlockingConnection(url)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=args.prefetch)
    if args.mode == "mixed":
        channel.confirm_delivery()
    handled = consume(args, channel)
    connection.close()
    if args.dlq:
        while queue_counts(probe_channel, args.queue, args.dlq) != [0, args.expect_dlq]:
            probe.sleep(0.005)
    meter.stop()
    probe.close()
    emit(meter, handled, baseline)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(parser(__doc__.splitlines()[0], ("drain", "mixed")).parse_args())
