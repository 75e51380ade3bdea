"""PrometheusHooks: what each hook call does to the metrics, and the broker
sampler on the in-memory broker (tests/test_observability_broker.py scrapes a
consumer on RabbitMQ)."""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

from amqp_batch import MessageResult, WorkerHealth, WorkerState
from amqp_batch._actors.planner import Applied, DeadLetter, Fate
from amqp_batch._hooks import (
    BatchInfo,
    HandledBatch,
    HookDispatcher,
    Settlement,
    Settlements,
    SettleOutcome,
)
from amqp_batch._message import Message
from amqp_batch._transport._base import Delivery, Properties, QueueSpec
from amqp_batch._transport._url import parse_url
from amqp_batch.prometheus import METRIC_NAMES, PrometheusHooks
from amqp_batch.testing import MemoryBroker


def message(tag: int, *, timestamp: datetime.datetime | None = None) -> Message:
    return Message(
        Delivery(
            delivery_tag=tag,
            redelivered=False,
            exchange="",
            routing_key="orders",
            consumer_tag="c",
            body=b"x",
            properties=Properties(timestamp=timestamp),
        )
    )


def health(index: int, state: WorkerState) -> WorkerHealth:
    return WorkerHealth(
        index=index,
        state=state,
        reconnect_count=0,
        last_error=None,
        results={},
        url="amqp://app:***@rabbit/",
    )


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def hooks(registry: CollectorRegistry) -> PrometheusHooks:
    return PrometheusHooks(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


#: How the settlements reach the hook: a list (as a user's code or a test
#: would call it), or the consumer's own sequence, made from the acker's records.
SHAPES = ["list", "consumer"]


def shaped(settlements: list[Settlement], shape: str) -> Sequence[Settlement]:
    if shape == "list":
        return settlements
    fates = {
        SettleOutcome.ACKED: Fate.ACKED,
        SettleOutcome.REJECTED: Fate.REJECTED,
        SettleOutcome.REPUBLISHED: Fate.REPUBLISHED,
        SettleOutcome.REQUEUED: Fate.REQUEUED,
        SettleOutcome.DEAD_LETTERED: Fate.DEAD_LETTERED,
    }
    records = [
        Applied(
            s.message,
            DeadLetter("invalid-retry-count: x") if s.result is None else s.result,
            fates[s.outcome],
            s.reason,
        )
        for s in settlements
    ]
    made = Settlements(records)
    assert list(made) == settlements  # the same settlements, either way
    return Settlements(records)  # a fresh one: nothing made before the hook


def settle(results: Mapping[int, MessageResult | None]) -> list[Settlement]:
    outcome = {
        MessageResult.ACK: SettleOutcome.ACKED,
        MessageResult.NACK: SettleOutcome.REJECTED,
        MessageResult.REQUEUE: SettleOutcome.REPUBLISHED,
        MessageResult.REQUEUE_IMMEDIATE: SettleOutcome.REQUEUED,
        None: SettleOutcome.DEAD_LETTERED,
    }
    return [
        Settlement(message(tag), result, outcome[result])
        for tag, result in results.items()
    ]


def test_every_metric_is_exposed_under_its_documented_name(
    registry: CollectorRegistry, hooks: PrometheusHooks
) -> None:
    names = {metric.name for metric in registry.collect()}
    counters = {m.name for m in registry.collect() if m.type == "counter"}
    exposed = {f"{n}_total" if n in counters else n for n in names}
    assert exposed == set(METRIC_NAMES)


def test_a_batch_through_the_handler(
    registry: CollectorRegistry, hooks: PrometheusHooks
) -> None:
    dispatcher = HookDispatcher([hooks])
    batch = BatchInfo(worker=0, queue="orders", messages=[message(1), message(2)])
    assert dispatcher.batch_started is not None
    assert dispatcher.batch_handled is not None
    dispatcher.batch_started(batch)
    assert value(registry, "amqp_batch_batches_in_handler", queue="orders") == 1
    assert value(registry, "amqp_batch_unsettled_deliveries", queue="orders") == 2
    dispatcher.batch_handled(HandledBatch(batch, [MessageResult.ACK] * 2, 0.3, None))
    assert value(registry, "amqp_batch_batches_in_handler", queue="orders") == 0
    assert value(registry, "amqp_batch_batch_size_sum", queue="orders") == 2
    assert value(registry, "amqp_batch_batch_size_count", queue="orders") == 1
    assert value(
        registry, "amqp_batch_handler_duration_seconds_sum", queue="orders"
    ) == (pytest.approx(0.3))
    bucket = value(
        registry, "amqp_batch_handler_duration_seconds_bucket", queue="orders", le="0.5"
    )
    assert bucket == 1


@pytest.mark.parametrize("shape", SHAPES)
def test_settlements_count_results_and_release_unsettled(
    registry: CollectorRegistry, hooks: PrometheusHooks, shape: str
) -> None:
    hooks.batch_started(
        BatchInfo(worker=0, queue="orders", messages=[message(n) for n in range(6)])
    )
    results: dict[int, MessageResult | None] = {
        0: MessageResult.ACK,
        1: MessageResult.ACK,
        2: MessageResult.NACK,
        3: MessageResult.REQUEUE,
        4: MessageResult.REQUEUE_IMMEDIATE,
        5: None,
    }
    hooks.settled(0, "orders", shaped(settle(results), shape))
    for result, count in [
        ("ack", 2),
        ("nack", 1),
        ("requeue", 1),
        ("requeue_immediate", 1),
        ("dead_letter", 1),
    ]:
        assert (
            value(registry, "amqp_batch_messages_total", queue="orders", result=result)
            == count
        ), result
    assert value(registry, "amqp_batch_unsettled_deliveries", queue="orders") == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_end_to_end_delay_from_the_timestamp_property(
    registry: CollectorRegistry, hooks: PrometheusHooks, shape: str
) -> None:
    sent = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=3)
    settlements = [
        Settlement(message(1, timestamp=sent), MessageResult.ACK, SettleOutcome.ACKED),
        Settlement(message(2), MessageResult.ACK, SettleOutcome.ACKED),
    ]
    hooks.settled(0, "orders", shaped(settlements, shape))
    name = "amqp_batch_end_to_end_delay_seconds"
    assert value(registry, f"{name}_count", queue="orders") == 1  # only the stamped
    delay = value(registry, f"{name}_sum", queue="orders")
    assert delay is not None and 2.5 < delay < 60


def test_workers_by_state_and_reconnects(
    registry: CollectorRegistry, hooks: PrometheusHooks
) -> None:
    hooks.worker_state_changed(health(0, WorkerState.CONSUMING), WorkerState.CONNECTING)
    hooks.worker_state_changed(health(1, WorkerState.CONSUMING), WorkerState.CONNECTING)
    hooks.batch_started(BatchInfo(worker=1, queue="orders", messages=[message(1)]))
    hooks.worker_state_changed(
        health(1, WorkerState.BACKING_OFF), WorkerState.CONSUMING
    )
    hooks.reconnecting(health(1, WorkerState.BACKING_OFF), "ConnectionLost", None)
    assert value(registry, "amqp_batch_workers", state="consuming") == 1
    assert value(registry, "amqp_batch_workers", state="backing_off") == 1
    assert value(registry, "amqp_batch_workers", state="stopped") == 0
    assert value(registry, "amqp_batch_reconnects_total", reason="ConnectionLost") == 1
    # The lost session's delivery goes back to the queue: not unsettled here.
    assert value(registry, "amqp_batch_unsettled_deliveries", queue="orders") == 0


def test_hook_errors_are_counted(registry: CollectorRegistry) -> None:
    class Broken(PrometheusHooks):
        def copy_confirmed(self, worker: int, queue: str, latency: float) -> None:
            raise ZeroDivisionError

    dispatcher = HookDispatcher([Broken(registry)])
    assert dispatcher.copy_confirmed is not None
    dispatcher.copy_confirmed(0, "orders", 0.01)
    assert (
        value(
            registry,
            "amqp_batch_hook_errors_total",
            hook="Broken",
            method="copy_confirmed",
        )
        == 1
    )


def test_copy_confirm_latency(
    registry: CollectorRegistry, hooks: PrometheusHooks
) -> None:
    hooks.copy_confirmed(0, "orders", 0.004)
    assert value(registry, "amqp_batch_copy_confirm_seconds_count", queue="orders") == 1
    assert (
        value(
            registry,
            "amqp_batch_copy_confirm_seconds_bucket",
            queue="orders",
            le="0.005",
        )
        == 1
    )


def test_labels_never_carry_urls(
    registry: CollectorRegistry, hooks: PrometheusHooks
) -> None:
    hooks.worker_state_changed(health(0, WorkerState.CONSUMING), WorkerState.CONNECTING)
    hooks.reconnecting(health(0, WorkerState.BACKING_OFF), "ConnectionLost", None)
    for metric in registry.collect():
        for sample in metric.samples:
            for label in sample.labels.values():
                assert "://" not in label and "rabbit" not in label


async def test_the_sampler_reads_queue_counts_from_the_broker(
    registry: CollectorRegistry, hooks: PrometheusHooks
) -> None:
    broker = MemoryBroker()
    broker.declare(QueueSpec(name="orders"), QueueSpec(name="orders.dlq"))
    for n in range(3):
        await broker.publish(b"%d" % n, routing_key="orders")
    await broker.publish(b"dead", routing_key="orders.dlq")
    async with anyio.create_task_group() as group:
        await group.start(
            _sampler(hooks, broker, ["orders", "missing"], ["orders.dlq"])
        )
        group.cancel_scope.cancel()
    assert value(registry, "amqp_batch_queue_messages", queue="orders") == 3
    assert value(registry, "amqp_batch_queue_consumers", queue="orders") == 0
    assert value(registry, "amqp_batch_queue_messages", queue="missing") is None
    # The missing queue closed the sampler's channel; it reopened for the next.
    dlq = value(registry, "amqp_batch_dead_letter_queue_messages", queue="orders.dlq")
    assert dlq == 1


def _sampler(
    hooks: PrometheusHooks, broker: MemoryBroker, queues: list[str], dlqs: list[str]
) -> Any:
    parameters = parse_url("amqp://guest:guest@memory/")
    return lambda task_status: hooks.sample_broker(
        broker, parameters, queues, dlqs, interval=3600, task_status=task_status
    )


def test_the_grafana_dashboard_uses_only_metrics_we_expose() -> None:
    path = Path(__file__).parent.parent / "docs" / "dashboards" / "amqp-batch.json"
    dashboard = json.loads(path.read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"amqp_batch_[a-z_]+", target["expr"]))
    histograms = {"_bucket", "_sum", "_count"}
    exposed = set(METRIC_NAMES)
    for name in used:
        base = next((name[: -len(s)] for s in histograms if name.endswith(s)), name)
        assert name in exposed or base in exposed, name
    assert len(used) >= 10


def test_a_registry_holds_one_set_of_metrics(registry: CollectorRegistry) -> None:
    PrometheusHooks(registry)
    with pytest.raises(ValueError, match="one PrometheusHooks per registry"):
        PrometheusHooks(registry)
