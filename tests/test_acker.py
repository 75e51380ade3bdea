"""The acker's coalescing rule (hypothesis, against a model of the broker's
channel) and its republish / dead-letter decisions (with in-test fakes)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amqp_batch import MessageNacked, MessageResult, MessageReturned
from amqp_batch._actors.acker import Acker, DeadLetter, Outcome
from amqp_batch._actors.ledger import AckLedger, Action, Settle
from amqp_batch._actors.planner import Applied, Fate
from amqp_batch._message import Message
from amqp_batch._retry import RetryPolicy
from amqp_batch._transport._base import Delivery, Properties
from consumer_support import FakeConfirmation, FakePublisher, FakeSession


class ChannelModel:
    """The broker's view of one channel: which tags are unsettled, and how each
    tag ended. Checks every frame against the decisions known when it is sent."""

    def __init__(self, tags: list[int]) -> None:
        self.unsettled = sorted(tags)
        self.fate: dict[int, Action] = {}

    def apply(self, frame: Settle, decided: dict[int, Action]) -> None:
        assert self.unsettled, f"{frame} with nothing unsettled"
        lowest = self.unsettled[0]
        if frame.action is Action.ACK and frame.multiple:
            covered = [t for t in self.unsettled if t <= frame.delivery_tag]
        else:
            covered = [frame.delivery_tag]
        # In tag order from the lowest unsettled tag.
        assert covered[0] == lowest
        assert frame.delivery_tag in self.unsettled
        for tag in covered:
            # Never covers a tag whose action is unknown or different.
            assert decided.get(tag) is frame.action
            self.fate[tag] = frame.action
            self.unsettled.remove(tag)


actions = st.sampled_from(list(Action))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), outcomes=st.lists(actions, min_size=0, max_size=40))
def test_ledger_settles_each_tag_once_in_order(
    data: st.DataObject, outcomes: list[Action]
) -> None:
    tags = list(range(1, len(outcomes) + 1))
    ledger = AckLedger()
    for tag in tags:
        ledger.register(tag)
    order = data.draw(st.permutations(tags))
    take_after = data.draw(
        st.lists(st.booleans(), min_size=len(tags), max_size=len(tags))
    )
    model = ChannelModel(tags)
    decided: dict[int, Action] = {}
    for tag, take in zip(order, take_after, strict=True):
        ledger.resolve(tag, outcomes[tag - 1])
        decided[tag] = outcomes[tag - 1]
        if take:
            for frame in ledger.take_ready():
                model.apply(frame, decided)
    for frame in ledger.take_ready():
        model.apply(frame, decided)
    assert model.unsettled == []
    assert len(ledger) == 0
    assert model.fate == {tag: outcomes[tag - 1] for tag in tags}


@given(outcomes=st.lists(actions, min_size=1, max_size=60))
def test_ledger_coalesces_each_run_of_acks_into_one_frame(
    outcomes: list[Action],
) -> None:
    ledger = AckLedger()
    for tag, action in enumerate(outcomes, start=1):
        ledger.register(tag)
        ledger.resolve(tag, action)
    frames = ledger.take_ready()
    runs = sum(
        1
        for i, action in enumerate(outcomes)
        if action is Action.ACK and (i == 0 or outcomes[i - 1] is not Action.ACK)
    )
    others = sum(1 for action in outcomes if action is not Action.ACK)
    assert len(frames) == runs + others
    # A multiple-ack frame only for runs longer than one.
    model = ChannelModel(list(range(1, len(outcomes) + 1)))
    for frame in frames:
        model.apply(frame, dict(enumerate(outcomes, start=1)))
    assert model.unsettled == []


def test_ledger_rejects_double_decisions_and_unknown_tags() -> None:
    ledger = AckLedger()
    ledger.register(5)
    ledger.resolve(5, Action.ACK)
    with pytest.raises(ValueError, match="unknown or decided"):
        ledger.resolve(5, Action.REJECT)
    with pytest.raises(ValueError, match="unknown or decided"):
        ledger.resolve(6, Action.ACK)
    with pytest.raises(ValueError, match="does not follow"):
        ledger.register(5)


def test_ledger_stops_at_an_undecided_tag() -> None:
    ledger = AckLedger()
    for tag in (1, 2, 3, 4):
        ledger.register(tag)
    ledger.resolve(1, Action.ACK)
    ledger.resolve(3, Action.ACK)
    ledger.resolve(4, Action.ACK)
    assert ledger.take_ready() == [Settle(Action.ACK, 1, False)]
    ledger.resolve(2, Action.REQUEUE)
    assert ledger.take_ready() == [
        Settle(Action.REQUEUE, 2, False),
        Settle(Action.ACK, 4, True),
    ]


# -- the acker with fakes -----------------------------------------------------------

pytestmark_anyio = pytest.mark.anyio


def _message(tag: int, message_id: str, **headers: object) -> Message:
    delivery = Delivery(
        delivery_tag=tag,
        redelivered=False,
        exchange="" if "x-original-routing-key" in headers else "orders",
        routing_key="q" if "x-original-routing-key" in headers else "orders.created",
        consumer_tag="c",
        body=message_id.encode(),
        properties=Properties(message_id=message_id, headers=headers or None),
    )
    retry = headers.get("x-retry-count", 0)
    assert isinstance(retry, int)
    return Message(delivery, retry_count=retry)


def _opener(publisher: FakePublisher) -> Callable[[], _Open]:
    return lambda: _Open(publisher)


class _Open:
    def __init__(self, publisher: FakePublisher) -> None:
        self.publisher = publisher

    async def __aenter__(self) -> FakePublisher:
        return self.publisher

    async def __aexit__(self, *exc: object) -> None:
        return None


def _ledger(tags: Iterable[int]) -> AckLedger:
    ledger = AckLedger()
    for tag in sorted(tags):
        ledger.register(tag)
    return ledger


async def _run_acker(
    batches: list[list[Outcome]],
    *,
    policy: RetryPolicy,
    publisher: FakePublisher,
    on_applied: Callable[[Sequence[Applied]], None] | None = None,
) -> tuple[FakeSession, Counter[str]]:
    session = FakeSession()
    ledger = _ledger(m.delivery_tag for batch in batches for m, _ in batch)
    counts: Counter[str] = Counter()
    acker = Acker(
        session, ledger, policy, _opener(publisher), counts, on_applied=on_applied
    )
    send, receive = anyio.create_memory_object_stream[list[Outcome]](len(batches))
    with send:
        for batch in batches:
            send.send_nowait(batch)
    await acker.run(receive)
    session.close()
    return session, counts


@pytest.mark.anyio
async def test_acker_requeue_republishes_then_acks() -> None:
    publisher = FakePublisher()
    policy = RetryPolicy(queue="q", max_requeue_attempts=3)
    batch: list[Outcome] = [
        (_message(1, "a"), MessageResult.ACK),
        (_message(2, "b"), MessageResult.REQUEUE),
        (_message(3, "c"), MessageResult.ACK),
    ]
    session, counts = await _run_acker([batch], policy=policy, publisher=publisher)
    # 1 is acked at once; the republished original only once its copy is
    # confirmed, in one run with 3 behind it.
    assert session.frames == [("ack", 1, False), ("ack", 3, True)]
    [(exchange, routing_key, properties, body)] = publisher.published
    assert (exchange, routing_key, body) == ("", "q", b"b")
    assert properties is not None
    assert properties.headers == {
        "x-retry-count": 1,
        "x-original-exchange": "orders",
        "x-original-routing-key": "orders.created",
    }
    assert counts == Counter(ack=2, requeue=1)


@pytest.mark.anyio
async def test_acker_returned_copy_leaves_original_to_be_dead_lettered() -> None:
    returned = MessageReturned(
        "no route", reply_code=312, reply_text="NO_ROUTE", exchange="", routing_key="q"
    )
    publisher = FakePublisher(fail={"b": returned})
    policy = RetryPolicy(queue="q", max_requeue_attempts=3)
    batch: list[Outcome] = [
        (_message(1, "a"), MessageResult.ACK),
        (_message(2, "b"), MessageResult.REQUEUE),
        (_message(3, "c"), MessageResult.ACK),
    ]
    session, _ = await _run_acker([batch], policy=policy, publisher=publisher)
    assert session.frames == [
        ("ack", 1, False),
        ("reject", 2, False),
        ("ack", 3, False),
    ]


@pytest.mark.anyio
async def test_acker_dead_letters_exhausted_copy_itself_when_dlx_known() -> None:
    publisher = FakePublisher()
    policy = RetryPolicy(queue="q", max_requeue_attempts=2, dead_letter_exchange="dlx")
    copy = _message(
        1,
        "a",
        **{
            "x-retry-count": 2,
            "x-original-exchange": "orders",
            "x-original-routing-key": "orders.created",
        },
    )
    original = _message(2, "b")
    batch: list[Outcome] = [
        (copy, MessageResult.REQUEUE),
        (original, MessageResult.NACK),
    ]
    session, counts = await _run_acker([batch], policy=policy, publisher=publisher)
    assert session.frames == [("ack", 1, False), ("reject", 2, False)]
    [(exchange, routing_key, properties, _)] = publisher.published
    assert (exchange, routing_key) == ("dlx", "orders.created")
    assert properties is not None
    assert properties.headers is not None
    assert properties.headers["x-dead-letter-reason"] == "max-requeue-attempts"
    assert counts["dead_lettered"] == 2


@pytest.mark.anyio
async def test_acker_nacked_dead_letter_publish_rejects() -> None:
    publisher = FakePublisher(fail={"a": MessageNacked("nacked")})
    policy = RetryPolicy(queue="q", max_requeue_attempts=2, dead_letter_exchange="dlx")
    batch: list[Outcome] = [(_message(1, "a"), DeadLetter("invalid-retry-count"))]
    session, _ = await _run_acker([batch], policy=policy, publisher=publisher)
    assert session.frames == [("reject", 1, False)]
    assert publisher.published == []


@pytest.mark.anyio
async def test_acker_waits_for_earlier_batch_before_acking_later_one() -> None:
    publisher = FakePublisher()
    policy = RetryPolicy(queue="q", max_requeue_attempts=2)
    later: list[Outcome] = [(_message(t, str(t)), MessageResult.ACK) for t in (3, 4)]
    earlier: list[Outcome] = [
        (_message(1, "1"), MessageResult.ACK),
        (_message(2, "2"), MessageResult.REQUEUE_IMMEDIATE),
    ]
    session, _ = await _run_acker([later, earlier], policy=policy, publisher=publisher)
    assert session.frames == [("ack", 1, False), ("nack", 2, False), ("ack", 4, True)]


class GatedPublisher(FakePublisher):
    """Holds every publish until ``expected`` publishes are in flight together, so
    a test only passes if the acker pipelines them."""

    def __init__(self, expected: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.expected = expected
        self.in_flight = 0
        self.max_in_flight = 0
        self.all_in_flight = anyio.Event()
        self.confirmed: list[str] = []

    def start_publish(self, body: bytes, **kwargs: object) -> _GatedConfirmation:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.in_flight == self.expected:
            self.all_in_flight.set()
        inner = super().start_publish(body, **kwargs)  # type: ignore[arg-type]
        return _GatedConfirmation(self, inner, body)


class _GatedConfirmation:
    done = False  # held until the test releases it

    def __init__(
        self, gate: GatedPublisher, inner: FakeConfirmation, body: bytes
    ) -> None:
        self.gate, self.inner, self.body = gate, inner, body

    async def wait(self) -> None:
        try:
            with anyio.fail_after(5):
                await self.gate.all_in_flight.wait()
            await self.inner.wait()
            self.gate.confirmed.append(self.body.decode())
        finally:
            self.gate.in_flight -= 1


@pytest.mark.anyio
async def test_acker_pipelines_a_batchs_republishes_then_acks_in_tag_order() -> None:
    """Every REQUEUE copy of a batch is in flight at once; each original is
    settled once its own copy is confirmed, in tag order, ack runs coalesced."""
    publisher = GatedPublisher(expected=4, fail={"d": MessageNacked("nacked")})
    policy = RetryPolicy(queue="q", max_requeue_attempts=3)
    batch: list[Outcome] = [
        (_message(1, "a"), MessageResult.REQUEUE),
        (_message(2, "b"), MessageResult.ACK),
        (_message(3, "c"), MessageResult.REQUEUE),
        (_message(4, "d"), MessageResult.REQUEUE),
        (_message(5, "e"), MessageResult.REQUEUE),
        (_message(6, "f"), MessageResult.ACK),
    ]
    session, counts = await _run_acker([batch], policy=policy, publisher=publisher)
    assert publisher.max_in_flight == 4
    assert sorted(publisher.confirmed) == ["a", "c", "e"]
    # "d"'s copy was nacked: the original is rejected (dead-lettered), never acked.
    assert session.frames == [
        ("ack", 2, True),
        ("ack", 3, False),
        ("reject", 4, False),
        ("ack", 6, True),
    ]
    assert counts == Counter(requeue=4, ack=2, dead_lettered=1)


@pytest.mark.anyio
async def test_a_copy_that_cannot_be_encoded_dead_letters_its_original() -> None:
    """``start_publish`` refusing a copy (its headers no longer fit in a frame)
    dead-letters the original instead of failing the session: an original is
    rejected (the broker dead-letters it), a copy is published to the DLX, and
    if that cannot be encoded either, rejected. Nothing else is disturbed."""
    too_big = ValueError("message properties take 131100 bytes, more than ...")
    publisher = FakePublisher(refuse={"b": too_big, "d": too_big})
    policy = RetryPolicy(queue="q", max_requeue_attempts=3, dead_letter_exchange="dlx")
    batch: list[Outcome] = [
        (_message(1, "a"), MessageResult.REQUEUE),
        (_message(2, "b"), MessageResult.REQUEUE),
        (
            _message(
                3,
                "c",
                **{
                    "x-retry-count": 1,
                    "x-original-exchange": "orders",
                    "x-original-routing-key": "orders.created",
                },
            ),
            MessageResult.REQUEUE,
        ),
        (
            _message(
                4,
                "d",
                **{
                    "x-retry-count": 1,
                    "x-original-exchange": "orders",
                    "x-original-routing-key": "orders.created",
                },
            ),
            MessageResult.REQUEUE,
        ),
        (_message(5, "e"), MessageResult.ACK),
    ]
    session, counts = await _run_acker([batch], policy=policy, publisher=publisher)
    # "b" (an original) is rejected: the broker dead-letters it with its own key.
    # "d" (a copy) cannot go to the DLX either: rejected as the last resort.
    # "a" and "c" are acked once their copies are confirmed; "e" with them.
    assert session.frames == [
        ("ack", 1, False),
        ("reject", 2, False),
        ("ack", 3, False),
        ("reject", 4, False),
        ("ack", 5, False),
    ]
    assert [body for *_, body in publisher.published] == [b"a", b"c"]
    assert counts["dead_lettered"] == 2


class HeldPublisher(FakePublisher):
    """Holds every confirm until ``release`` is set; ``waiting`` is set once a
    confirm is awaited."""

    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()
        self.waiting = anyio.Event()

    def start_publish(self, body: bytes, **kwargs: object) -> _HeldConfirmation:
        inner = super().start_publish(body, **kwargs)  # type: ignore[arg-type]
        return _HeldConfirmation(self, inner)


class _HeldConfirmation:
    done = False  # held until the test releases it

    def __init__(self, gate: HeldPublisher, inner: FakeConfirmation) -> None:
        self.gate, self.inner = gate, inner

    async def wait(self) -> None:
        self.gate.waiting.set()
        await self.gate.release.wait()
        await self.inner.wait()


@pytest.mark.anyio
async def test_health_counts_a_result_only_once_its_frame_is_sent() -> None:
    """A REQUEUE whose copy is not confirmed yet is not counted (its original is
    not acked); an ACK counts once its ack is sent, not when it is decided."""
    publisher = HeldPublisher()
    policy = RetryPolicy(queue="q", max_requeue_attempts=3)
    session = FakeSession()
    counts: Counter[str] = Counter()
    acker = Acker(session, _ledger([1, 2]), policy, _opener(publisher), counts)
    send, receive = anyio.create_memory_object_stream[list[Outcome]](1)
    async with anyio.create_task_group() as group:
        group.start_soon(acker.run, receive)
        with send:
            await send.send(
                [
                    (_message(1, "a"), MessageResult.REQUEUE),
                    (_message(2, "b"), MessageResult.ACK),
                ]
            )
            with anyio.fail_after(5):
                await publisher.waiting.wait()
            assert counts["requeue"] == 0
            assert ("ack", 1, False) not in session.frames
            # 2 is acked (and counted) only if publishing counted as stalled.
            assert counts["ack"] == (1 if ("ack", 2, False) in session.frames else 0)
            publisher.release.set()
    session.close()
    assert counts == Counter(ack=1, requeue=1)
    assert sorted(session.frames) in (
        [("ack", 2, True)],
        [("ack", 1, False), ("ack", 2, False)],
    )


@pytest.mark.anyio
async def test_on_applied_hears_every_settlement_once_with_its_fate() -> None:
    """The internal hook gets one record per settled message, ACKs included,
    with what happened to it; the counts are the same as without it."""
    refused = ValueError("too big")
    publisher = FakePublisher(
        fail={"f": MessageNacked("nacked")}, refuse={"g": refused}
    )
    policy = RetryPolicy(queue="q", max_requeue_attempts=1, dead_letter_exchange="dlx")
    copy_headers = {
        "x-retry-count": 1,
        "x-original-exchange": "orders",
        "x-original-routing-key": "orders.created",
    }
    batch: list[Outcome] = [
        (_message(1, "a"), MessageResult.ACK),
        (_message(2, "b"), MessageResult.REQUEUE_IMMEDIATE),
        (_message(3, "c"), MessageResult.NACK),
        (_message(4, "d"), MessageResult.REQUEUE),
        (_message(5, "e", **copy_headers), MessageResult.REQUEUE),
        (_message(6, "f"), DeadLetter("invalid-retry-count: x")),
        (_message(7, "g"), MessageResult.REQUEUE),
    ]
    heard: list[Applied] = []
    _, counts = await _run_acker(
        [batch], policy=policy, publisher=publisher, on_applied=heard.extend
    )
    assert [(r.message.delivery_tag, r.fate, r.reason) for r in heard] == [
        (1, Fate.ACKED, None),
        (2, Fate.REQUEUED, None),
        (3, Fate.REJECTED, "rejected"),
        (4, Fate.REPUBLISHED, None),
        (5, Fate.DEAD_LETTERED, "max-requeue-attempts"),
        (6, Fate.REJECTED, "invalid-retry-count: x"),
        (7, Fate.REJECTED, "republish-failed"),
    ]
    assert [r.disposition for r in heard] == [d for _, d in batch]
    assert counts == Counter(
        ack=1, requeue_immediate=1, nack=1, requeue=3, dead_lettered=4
    )
