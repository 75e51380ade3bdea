"""x-retry-count parsing: untrusted input is never silently reset."""

from __future__ import annotations

import datetime
from decimal import Decimal

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from amqp_batch._retry import (
    MAX_RETRY_COUNT,
    InvalidRetryCount,
    parse_retry_count,
    requeue_properties,
)
from amqp_batch._transport._base import Delivery, Properties


@pytest.mark.parametrize(
    "value",
    ["3", -1, 3.5, True, False, 2**63 - 1, [1], {}, None, b"\xff", Decimal(1)],
)
def test_bad_values_are_invalid(value: object) -> None:
    with pytest.raises(InvalidRetryCount):
        parse_retry_count({"x-retry-count": value})


def test_absent_counts_as_zero() -> None:
    assert parse_retry_count(None) == 0
    assert parse_retry_count({}) == 0
    assert parse_retry_count({"other": 1}) == 0


@given(st.integers(min_value=0, max_value=MAX_RETRY_COUNT))
def test_plain_non_negative_integers_are_taken(value: int) -> None:
    assert parse_retry_count({"x-retry-count": value}) == value


def test_a_copy_keeps_every_property_but_user_id() -> None:
    """Every field of Properties (including any added later) reaches the copy."""
    values: dict[str, object] = {
        field.name: f"v-{field.name}" for field in attrs.fields(Properties)
    }
    values.update(
        headers={"h": 1},
        delivery_mode=2,
        priority=3,
        timestamp=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
    )
    original = Properties(**values)  # type: ignore[arg-type]
    delivery = Delivery(
        delivery_tag=1,
        redelivered=False,
        exchange="orders",
        routing_key="created",
        consumer_tag="c",
        body=b"",
        properties=original,
    )
    copy = requeue_properties(delivery, 2)
    assert copy.user_id is None
    assert copy.headers == {
        "h": 1,
        "x-original-exchange": "orders",
        "x-original-routing-key": "created",
        "x-retry-count": 2,
    }
    for field in attrs.fields(Properties):
        if field.name not in ("headers", "user_id"):
            assert getattr(copy, field.name) == values[field.name], field.name
