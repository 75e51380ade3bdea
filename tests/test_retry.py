"""x-retry-count parsing: untrusted input is never silently reset."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amqp_batch._retry import MAX_RETRY_COUNT, InvalidRetryCount, parse_retry_count


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
