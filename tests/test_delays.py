"""Delay-queue topology: pure rules (hypothesis), and the broker really sends an
expired copy back to the work queue, for classic and quorum work queues."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from amqp_batch._delays import (
    delay_for_attempt,
    delay_queue_for,
    delay_queue_name,
    delay_queues,
    ttl_milliseconds,
)
from amqp_batch._transport._base import Properties
from consumer_support import admin_channel, cleanup, consuming, unique_name

delays_strategy = st.lists(
    st.floats(min_value=0.001, max_value=86_400, allow_nan=False), max_size=8
)


def test_names_are_predictable() -> None:
    assert delay_queue_name("orders", 10) == "orders.retry.10s"
    assert delay_queue_name("orders", 0.5) == "orders.retry.500ms"
    assert delay_queue_name("orders", 1.5) == "orders.retry.1500ms"
    assert delay_queue_name("orders", 3600.0) == "orders.retry.3600s"
    assert delay_queue_name("orders", 0.0001) == "orders.retry.1ms"


def test_the_last_delay_repeats() -> None:
    delays = (1.0, 10.0, 60.0)
    assert [delay_for_attempt(delays, n) for n in range(1, 6)] == [1, 10, 60, 60, 60]
    assert delay_for_attempt((), 3) is None
    assert delay_queue_for("q", (), 1) is None
    assert delay_queue_for("q", delays, 2) == "q.retry.10s"
    with pytest.raises(ValueError, match="at least 1"):
        delay_for_attempt(delays, 0)


@given(queue=st.text(min_size=1, max_size=40), delays=delays_strategy)
def test_every_attempt_has_a_declared_queue_that_leads_back(
    queue: str, delays: list[float]
) -> None:
    specs = delay_queues(queue, delays)
    names = [spec.name for spec in specs]
    assert len(names) == len(set(names))  # one queue per distinct delay
    assert len(specs) == len({ttl_milliseconds(d) for d in delays})
    for attempt in range(1, len(delays) + 3):
        target = delay_queue_for(queue, delays, attempt)
        if not delays:
            assert target is None
            continue
        assert target in names
        spec = specs[names.index(target)]
        arguments = dict(spec.arguments or {})
        delay = delays[min(attempt, len(delays)) - 1]
        assert arguments["x-message-ttl"] == ttl_milliseconds(delay)
        assert arguments["x-dead-letter-exchange"] == ""
        assert arguments["x-dead-letter-routing-key"] == queue
        assert spec.durable
        assert target.startswith(f"{queue}.retry.")


@given(delays=delays_strategy)
def test_queue_type_follows_the_work_queue(delays: list[float]) -> None:
    for spec in delay_queues("q", delays, queue_arguments={"x-queue-type": "quorum"}):
        arguments = dict(spec.arguments or {})
        assert arguments["x-queue-type"] == "quorum"
        assert arguments["x-dead-letter-strategy"] == "at-least-once"
        assert arguments["x-overflow"] == "reject-publish"
    for spec in delay_queues("q", delays, queue_arguments={"x-max-length": 5}):
        assert "x-queue-type" not in dict(spec.arguments or {})


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_expired_copy_goes_back_to_the_work_queue(
    broker_url: str, queue_type: str
) -> None:
    """Declared twice (idempotent); a copy published to the 0.3 s delay queue
    reaches the work queue no earlier than 0.3 s later, headers kept."""
    queue = unique_name()
    work_arguments = {"x-queue-type": queue_type}
    (spec,) = delay_queues(queue, [0.3], queue_arguments=work_arguments)
    try:
        async with admin_channel(broker_url) as channel:
            await channel.queue_declare(queue, durable=True, arguments=work_arguments)
            for _ in range(2):
                await channel.queue_declare(
                    spec.name, durable=True, arguments=spec.arguments
                )
            async with consuming(broker_url, queue) as session:
                sent = anyio.current_time()
                await channel.publish(
                    b"copy",
                    routing_key=spec.name,
                    mandatory=True,
                    properties=Properties(
                        message_id="m1",
                        delivery_mode=2,
                        headers={"x-retry-count": 1, "x-original-routing-key": "k"},
                    ),
                )
                with anyio.fail_after(10):
                    delivery = await session.deliveries.receive()
                arrived = anyio.current_time()
                await session.ack(delivery.delivery_tag)
                await session.cancel()
    finally:
        await cleanup(broker_url, queues=[queue, spec.name])
    assert arrived - sent >= 0.3
    assert delivery.exchange == ""
    assert delivery.routing_key == queue
    headers = delivery.properties.headers or {}
    assert headers["x-retry-count"] == 1
    assert headers["x-original-routing-key"] == "k"
    assert delivery.properties.message_id == "m1"
