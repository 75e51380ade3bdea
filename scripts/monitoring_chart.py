"""Render ``docs/_static/monitoring.png`` from a real Prometheus scrape.

    python scripts/monitoring_chart.py [--seconds 90] [--out PATH.png]

Boots a private RabbitMQ node (tests/support/rabbit_node.py), runs a consumer
with ``PrometheusHooks`` and ``serve_http`` through a fault proxy, and Debian's
Prometheus (tests/support/prometheus_server.py) scraping it every second. A
producer publishes a mixed workload (80 % ACK, 10 % NACK, 10 % REQUEUE-then-ACK,
with ``timestamp``) at a steady rate; a third of the way in, the proxy cuts the
consumer's connections and holds the reconnect for five seconds. Then the script
asks Prometheus for the series (``/api/v1/query_range``) and plots them with
matplotlib: settled messages per second by result, workers by state, and the
queue depth from the broker sampler.

Needs matplotlib (``pip install matplotlib``) and the ``prometheus`` package.
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from prometheus_client import CollectorRegistry  # noqa: E402
from tests.support.fault_proxy import FaultProxy  # noqa: E402
from tests.support.prometheus_server import PrometheusServer  # noqa: E402
from tests.support.rabbit_node import PrivateNode  # noqa: E402

from amqp_batch import (  # noqa: E402
    BatchConsumerSettings,
    Message,
    MessageResult,
    batch_consumer,
)
from amqp_batch._transport._base import Properties  # noqa: E402
from amqp_batch.prometheus import PrometheusHooks, serve_http  # noqa: E402
from consumer_support import admin_channel  # noqa: E402

QUEUE = "monitoring-chart"
RATE = 300  # messages per second published


def decide(message: Message) -> MessageResult:
    kind = message.body[:1]
    if kind == b"n":
        return MessageResult.NACK
    if kind == b"r" and message.retry_count == 0:
        return MessageResult.REQUEUE
    return MessageResult.ACK


async def handle(messages: Sequence[Message]) -> list[MessageResult]:
    await anyio.sleep(0.002 * len(messages))  # some work per message
    return [decide(message) for message in messages]


async def produce(url: str, seconds: float) -> None:
    rng = random.Random(7)
    async with admin_channel(url) as channel:
        end = time.monotonic() + seconds
        sent = 0
        started = time.monotonic()
        while time.monotonic() < end:
            roll = rng.random()
            kind = b"n" if roll < 0.1 else b"r" if roll < 0.2 else b"a"
            await channel.publish(
                kind + b"-%d" % sent,
                routing_key=QUEUE,
                properties=Properties(
                    delivery_mode=2,
                    timestamp=datetime.datetime.now(datetime.timezone.utc),
                ),
            )
            sent += 1
            ahead = sent / RATE - (time.monotonic() - started)
            if ahead > 0:
                await anyio.sleep(ahead)


async def workload(node: PrivateNode, seconds: float) -> dict[str, Any]:
    registry = CollectorRegistry()
    metrics = PrometheusHooks(registry)
    async with FaultProxy("127.0.0.1", node.amqp_port) as proxy:
        settings = BatchConsumerSettings(
            url=proxy.url_for(),
            queue_name=QUEUE,
            dead_letter_exchange=f"{QUEUE}.dlx",
            dead_letter_queue=f"{QUEUE}.dlq",
            num_workers=2,
            prefetch_count=200,
            batch_size=50,
            batch_timeout=0.2,
            reconnect_backoff_base=0.1,
            reconnect_backoff_cap=0.5,
        )
        async with (
            batch_consumer(settings, handle, hooks=[metrics]) as consumer,
            anyio.create_task_group() as group,
        ):
            port = await group.start(serve_http, consumer, "127.0.0.1", 0, registry)
            group.start_soon(metrics.sample_consumer, consumer)  # every 15 s
            server = PrometheusServer([f"127.0.0.1:{port}"], interval=1.0)
            await anyio.to_thread.run_sync(server.start)
            try:
                began = time.time()
                group.start_soon(produce, node.url, seconds)
                await anyio.sleep(seconds / 3)
                cut_at = time.time()
                proxy.stall()
                proxy.cut()
                await anyio.sleep(5)
                proxy.resume()
                # The rest of the producer's run, then 5 s to drain.
                await anyio.sleep(seconds * 2 / 3)
                series = await anyio.to_thread.run_sync(
                    query_all, server, began, time.time()
                )
            finally:
                await anyio.to_thread.run_sync(server.stop)
            group.cancel_scope.cancel()
    return {"began": began, "cut_at": cut_at, "series": series}


def query_all(server: PrometheusServer, start: float, end: float) -> dict[str, Any]:
    step = 1.0
    return {
        "results": server.query_range(
            f'sum by (result) (rate(amqp_batch_messages_total{{queue="{QUEUE}"}}[5s]))',
            start,
            end,
            step,
        ),
        "workers": server.query_range(
            "sum by (state) (amqp_batch_workers)", start, end, step
        ),
        "depth": server.query_range(
            f'amqp_batch_queue_messages{{queue="{QUEUE}"}}', start, end, step
        ),
        "delay": server.query_range(
            "histogram_quantile(0.95, sum by (le) (rate("
            f'amqp_batch_end_to_end_delay_seconds_bucket{{queue="{QUEUE}"}}[5s])))',
            start,
            end,
            step,
        ),
    }


def plot(data: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    began, cut_at, series = data["began"], data["cut_at"], data["series"]
    figure, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)

    def draw(axis: Any, result: list[dict[str, Any]], label_key: str) -> None:
        for entry in result:
            xs = [float(t) - began for t, _ in entry["values"]]
            ys = [float(v) for _, v in entry["values"]]
            axis.plot(xs, ys, label=entry["metric"].get(label_key, label_key))
        axis.axvline(cut_at - began, color="grey", linestyle="--", linewidth=1)
        axis.legend(loc="upper right", fontsize=8)
        axis.grid(alpha=0.3)

    draw(axes[0], series["results"], "result")
    axes[0].set_ylabel("settled / s")
    axes[0].set_title("amqp_batch_messages_total by result (rate over 5 s)")
    draw(axes[1], series["workers"], "state")
    axes[1].set_ylabel("workers")
    axes[1].set_title("amqp_batch_workers by state")
    draw(axes[2], series["delay"], "p95 end-to-end delay (s)")
    axes[2].set_ylabel("seconds")
    axes[2].set_title("p95 amqp_batch_end_to_end_delay_seconds")
    axes[2].set_xlabel(
        "seconds since start (dashed: connection cut, reconnect held 5 s)"
    )
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/monitoring_chart.py")
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs/_static/monitoring.png"
    )
    options = parser.parse_args(argv)
    node = PrivateNode(tls=False)
    node.start()
    try:
        data = anyio.run(workload, node, options.seconds)
    finally:
        node.stop()
    plot(data, options.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
