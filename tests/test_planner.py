"""The acker's planner: every result x header x setting, as plain data (no fakes,
no IO). Each test states a documented rule (docs/design.md, "Retry count and
dead-lettering") and checks the plan the planner gives against it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amqp_batch import MessageResult
from amqp_batch._actors.ledger import Action
from amqp_batch._actors.planner import (
    MAX_REQUEUE_ATTEMPTS,
    REJECTED,
    REPUBLISH_FAILED,
    DeadLetter,
    DeadLetterPublish,
    Disposition,
    Fate,
    Plan,
    Republish,
    Settle,
    plan,
)
from amqp_batch._message import Message
from amqp_batch._retry import (
    DEAD_LETTER_REASON_HEADER,
    MAX_RETRY_COUNT,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    RETRY_COUNT_HEADER,
    InvalidRetryCount,
    RetryPolicy,
    parse_retry_count,
)
from amqp_batch._transport._base import Delivery, Properties

QUEUE = "q"
#: Where an original was published; a copy carries it in x-original-*.
FIRST = ("orders", "orders.created")
#: Row B1's producer values that are not a retry count.
B1_INVALID: list[Any] = ["3", -1, 3.5, True, 2**63 - 1, [1], {}, None, b"\xff"]
ABSENT = object()

retry_values = st.one_of(
    st.just(ABSENT),
    st.integers(0, 6),
    st.just(MAX_RETRY_COUNT),
    st.sampled_from(B1_INVALID),
    st.integers(max_value=-1),
    st.integers(min_value=MAX_RETRY_COUNT + 1),
)
originals = st.one_of(
    st.just(ABSENT),  # no x-original-* headers
    st.tuples(st.sampled_from(["", "orders", "other"]), st.text(max_size=8)),
    st.tuples(st.just(ABSENT), st.just("orders.created")),  # routing key only
    st.tuples(st.integers(), st.integers()),  # not strings: ignored
)
policies = st.builds(
    RetryPolicy,
    queue=st.just(QUEUE),
    max_requeue_attempts=st.integers(0, 5),
    dead_letter_exchange=st.sampled_from([None, "dlx", ""]),
    dead_letter_routing_key=st.sampled_from([None, "dead"]),
)
results = st.one_of(
    st.sampled_from(list(MessageResult)),
    st.builds(DeadLetter, st.sampled_from(["invalid-retry-count: x", "other"])),
)


@st.composite
def deliveries(draw: st.DrawFn) -> Delivery:
    """A delivery as the broker gives it: an original (from its exchange) or
    one of our copies (default exchange, routing key = queue), with any mix of
    retry count, x-original-* and other headers, with or without user_id."""
    headers: dict[str, Any] = {}
    retry = draw(retry_values)
    if retry is not ABSENT:
        headers[RETRY_COUNT_HEADER] = retry
    first = draw(originals)
    if first is not ABSENT:
        exchange, routing_key = first
        if exchange is not ABSENT:
            headers[ORIGINAL_EXCHANGE_HEADER] = exchange
        headers[ORIGINAL_ROUTING_KEY_HEADER] = routing_key
    if draw(st.booleans()):
        headers["app"] = draw(st.text(max_size=5))
    via_default = draw(st.booleans())
    return Delivery(
        delivery_tag=draw(st.integers(1, 2**16)),
        redelivered=draw(st.booleans()),
        exchange="" if via_default else FIRST[0],
        routing_key=QUEUE if via_default else FIRST[1],
        consumer_tag="ctag",
        body=b"body",
        properties=Properties(
            message_id="m",
            headers=headers or None,
            user_id=draw(st.sampled_from([None, "producer"])),
            delivery_mode=2,
        ),
    )


def as_batcher_does(
    delivery: Delivery, result: Disposition
) -> tuple[Message, Disposition]:
    """The message and disposition the acker gets: a bad retry count is
    dead-lettered by the batcher and never reaches the handler."""
    try:
        retry_count = parse_retry_count(delivery.properties.headers)
    except InvalidRetryCount as exc:
        return Message(delivery), DeadLetter(f"invalid-retry-count: {exc}")
    return Message(delivery, retry_count=retry_count), result


def is_copy(delivery: Delivery) -> bool:
    """The documented test: via the default exchange, routing key = our queue,
    x-original-exchange and x-original-routing-key both strings (of at most
    255 bytes; no signing key in these policies)."""
    headers = delivery.properties.headers or {}
    return (
        delivery.exchange == ""
        and delivery.routing_key == QUEUE
        and isinstance(headers.get(ORIGINAL_EXCHANGE_HEADER), str)
        and isinstance(headers.get(ORIGINAL_ROUTING_KEY_HEADER), str)
    )


def first_destination(delivery: Delivery) -> tuple[str, str]:
    """A copy's x-original-* headers; anything else's own destination (producer
    headers are not trusted)."""
    headers = delivery.properties.headers or {}
    if is_copy(delivery):
        return headers[ORIGINAL_EXCHANGE_HEADER], headers[ORIGINAL_ROUTING_KEY_HEADER]
    return delivery.exchange, delivery.routing_key


def check_dead_letter(
    planned: Plan,
    delivery: Delivery,
    policy: RetryPolicy,
    reason: str,
    *,
    by_library: bool,
) -> None:
    """Rejected (the broker dead-letters) unless the library dead-letters it
    itself: then published to the DLX under the first routing key (or the
    queue's x-dead-letter-routing-key), with the reason, falling back to a
    reject."""
    if policy.dead_letter_exchange is None or not by_library:
        assert planned == Settle(Action.REJECT, reason)
        assert type(planned) is Settle
        return
    assert type(planned) is DeadLetterPublish
    assert planned.exchange == policy.dead_letter_exchange
    expected_key = policy.dead_letter_routing_key or first_destination(delivery)[1]
    assert planned.routing_key == expected_key
    assert planned.reason == reason
    assert not planned.mandatory
    assert planned.fallback == Settle(Action.REJECT, reason)
    properties = planned.properties
    headers = dict(properties.headers or {})
    assert headers.pop(DEAD_LETTER_REASON_HEADER) == reason
    check_kept(delivery, properties, headers, ignore=())


def check_kept(
    delivery: Delivery,
    properties: Properties,
    headers: dict[str, Any],
    *,
    ignore: tuple[str, ...],
) -> None:
    """Every header and property kept, x-original-* set to the first
    destination (a producer's own are replaced), no user_id."""
    original = dict(delivery.properties.headers or {})
    first = first_destination(delivery)
    original.pop(ORIGINAL_EXCHANGE_HEADER, None)
    original.pop(ORIGINAL_ROUTING_KEY_HEADER, None)
    assert headers.pop(ORIGINAL_EXCHANGE_HEADER) == first[0]
    assert headers.pop(ORIGINAL_ROUTING_KEY_HEADER) == first[1]
    for name in ignore:
        headers.pop(name, None)
        original.pop(name, None)
    assert headers == original
    assert properties.user_id is None
    assert properties.message_id == delivery.properties.message_id
    assert properties.delivery_mode == delivery.properties.delivery_mode


@settings(max_examples=1500, deadline=None)
@given(delivery=deliveries(), result=results, policy=policies)
def test_every_result_header_and_setting_gets_its_documented_plan(
    delivery: Delivery, result: Disposition, policy: RetryPolicy
) -> None:
    message, disposition = as_batcher_does(delivery, result)
    planned = plan(message, disposition, policy)
    copy = is_copy(delivery)
    if disposition is MessageResult.ACK:
        assert (type(planned), planned) == (Settle, Settle(Action.ACK))
    elif disposition is MessageResult.REQUEUE_IMMEDIATE:
        assert (type(planned), planned) == (Settle, Settle(Action.REQUEUE))
    elif isinstance(disposition, DeadLetter):
        # Dead-lettered by the library whenever the DLX is known, so the
        # reason header is there, even for an original.
        check_dead_letter(
            planned, delivery, policy, disposition.reason, by_library=True
        )
    elif disposition is MessageResult.NACK:
        check_dead_letter(planned, delivery, policy, REJECTED, by_library=copy)
    elif message.retry_count >= policy.max_requeue_attempts:
        check_dead_letter(
            planned, delivery, policy, MAX_REQUEUE_ATTEMPTS, by_library=copy
        )
    else:
        assert type(planned) is Republish
        assert (planned.exchange, planned.routing_key) == ("", QUEUE)
        assert planned.mandatory
        headers = dict(planned.properties.headers or {})
        assert headers.pop(RETRY_COUNT_HEADER) == message.retry_count + 1
        check_kept(delivery, planned.properties, headers, ignore=(RETRY_COUNT_HEADER,))
        check_dead_letter(
            planned.fallback, delivery, policy, REPUBLISH_FAILED, by_library=copy
        )


@settings(max_examples=500, deadline=None)
@given(delivery=deliveries(), result=results, policy=policies)
def test_every_plan_ends_in_a_settlement_and_never_acks_a_failure(
    delivery: Delivery, result: Disposition, policy: RetryPolicy
) -> None:
    """Whatever fails, following fallbacks ends in a Settle within two steps,
    and that last resort is a reject: a message whose publish failed is never
    acked, requeued or dropped silently."""
    message, disposition = as_batcher_does(delivery, result)
    planned = plan(message, disposition, policy)
    steps = 0
    while not isinstance(planned, Settle):
        planned = planned.fallback
        steps += 1
        assert planned.fate is not Fate.ACKED
    assert steps <= 2
    if steps:
        assert planned.action is Action.REJECT
    # Only ACK and REQUEUE_IMMEDIATE settle without a dead letter.
    if steps == 0 and planned.action is not Action.REJECT:
        assert disposition in (MessageResult.ACK, MessageResult.REQUEUE_IMMEDIATE)


@pytest.mark.parametrize("value", B1_INVALID, ids=repr)
@pytest.mark.parametrize("dead_letter_exchange", [None, "dlx"])
def test_each_b1_value_is_dead_lettered_with_its_reason(
    value: Any, dead_letter_exchange: str | None
) -> None:
    """Row B1: a bad x-retry-count is dead-lettered once, with the reason, under
    its original routing key; never handled, requeued or read as 0."""
    delivery = Delivery(
        delivery_tag=1,
        redelivered=False,
        exchange=FIRST[0],
        routing_key=FIRST[1],
        consumer_tag="c",
        body=b"x",
        properties=Properties(message_id="m", headers={RETRY_COUNT_HEADER: value}),
    )
    policy = RetryPolicy(
        queue=QUEUE, max_requeue_attempts=3, dead_letter_exchange=dead_letter_exchange
    )
    message, disposition = as_batcher_does(delivery, MessageResult.ACK)
    assert isinstance(disposition, DeadLetter)
    assert disposition.reason.startswith("invalid-retry-count: x-retry-count")
    planned = plan(message, disposition, policy)
    if dead_letter_exchange is None:
        assert planned == Settle(Action.REJECT, disposition.reason)
        return
    assert isinstance(planned, DeadLetterPublish)
    assert (planned.exchange, planned.routing_key) == ("dlx", FIRST[1])
    headers = planned.properties.headers
    assert headers is not None
    assert headers[DEAD_LETTER_REASON_HEADER] == disposition.reason
    assert headers[RETRY_COUNT_HEADER] == value  # kept as it came


def test_copies_count_up_to_the_limit_then_dead_letter() -> None:
    """With max 3 a message is handled 4 times: three copies, then the DLX."""
    policy = RetryPolicy(
        queue=QUEUE, max_requeue_attempts=3, dead_letter_exchange="dlx"
    )
    delivery = Delivery(
        delivery_tag=1,
        redelivered=False,
        exchange=FIRST[0],
        routing_key=FIRST[1],
        consumer_tag="c",
        body=b"x",
    )
    counts = []
    for _ in range(4):
        message, _ = as_batcher_does(delivery, MessageResult.REQUEUE)
        planned = plan(message, MessageResult.REQUEUE, policy)
        if not isinstance(planned, Republish):
            break
        headers = planned.properties.headers
        assert headers is not None
        counts.append(headers[RETRY_COUNT_HEADER])
        delivery = Delivery(
            delivery_tag=1,
            redelivered=False,
            exchange=planned.exchange,
            routing_key=planned.routing_key,
            consumer_tag="c",
            body=b"x",
            properties=planned.properties,
        )
    assert counts == [1, 2, 3]
    assert isinstance(planned, DeadLetterPublish)
    assert (planned.exchange, planned.routing_key) == ("dlx", FIRST[1])
    assert planned.reason == MAX_REQUEUE_ATTEMPTS


def test_plans_do_not_show_message_data() -> None:
    """A plan's repr names where it goes, never the body or the headers."""
    delivery = Delivery(
        delivery_tag=1,
        redelivered=False,
        exchange="",
        routing_key=QUEUE,
        consumer_tag="c",
        body=b"secret-body",
        properties=Properties(
            headers={
                ORIGINAL_EXCHANGE_HEADER: "",
                ORIGINAL_ROUTING_KEY_HEADER: "k",
                "token": "secret-header",
            }
        ),
    )
    policy = RetryPolicy(
        queue=QUEUE, max_requeue_attempts=3, dead_letter_exchange="dlx"
    )
    for result in (MessageResult.REQUEUE, MessageResult.NACK):
        text = repr(plan(Message(delivery), result, policy))
        assert "secret" not in text
        assert "dlx" in text
