"""Which deliveries are settled how, and when (sans-IO).

Delivery tags on a channel grow. The ledger settles in tag order from the lowest
unsettled tag: a contiguous run of ACKs becomes one ``ack(multiple=True)`` at the
run's last tag; any other action is sent on its own, at its place. Settling stops
at the first tag whose action is not known yet, so a multiple-ack never covers a
message whose result is unknown or whose republish is unconfirmed.

While republishing is stalled (a memory alarm blocks the publisher connection),
``take_ready(past_undecided=True)`` also releases the decided tags *behind* an
undecided one, each in a frame of its own (never ``multiple``: a multiple-ack
would cover the undecided tag), so acks that do not depend on a pending
republish keep flowing.

A tag is decided either with a bare :class:`Action` (the acker's ACK fast path:
no object per message) or with an :class:`~.planner.Applied` record, which the
frame that settles the tag hands back (``Settle.records``), so the acker can
count what it sent, message by message, without a second per-tag map.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from .planner import Applied

__all__ = ["AckLedger", "Action", "Settle"]


class Action(enum.Enum):
    """A wire-level settlement."""

    ACK = "ack"
    #: ``basic.reject(requeue=False)``: dead-letter through the queue's DLX (or drop).
    REJECT = "reject"
    #: ``basic.nack(requeue=True)``: back to the queue.
    REQUEUE = "requeue"


#: Bound once: in Python 3.11 reading ``Action.ACK`` costs ten times a global.
_ACK = Action.ACK


@attrs.frozen
class Settle:
    """One frame to send: ``action`` at ``delivery_tag``.

    ``bare`` counts the tags it settles that were decided with a bare action,
    ``records`` holds the others' records (in tag order); neither takes part in
    comparisons.
    """

    action: Action
    delivery_tag: int
    multiple: bool = False
    bare: int = attrs.field(default=0, eq=False)
    records: Sequence[Applied] = attrs.field(default=(), eq=False)


class AckLedger:
    """The delivery tags of one session, in order, with their decisions.

    Every operation is O(1) amortized per tag (``take_ready`` also sorts the tags
    it releases past an undecided one), whatever the prefetch.
    """

    def __init__(self) -> None:
        #: Registered tags in order; a tag released early (past an undecided
        #: one) stays here, no longer in ``_actions``, until the head passes it.
        self._order: deque[int] = deque()
        #: Unsettled tags: their decision, or None while undecided.
        self._actions: dict[int, Action | Applied | None] = {}
        #: Decided tags not released yet.
        self._waiting: set[int] = set()

    def __len__(self) -> int:
        """How many registered tags are not settled yet."""
        return len(self._actions)

    def register(self, delivery_tag: int) -> None:
        """Note a delivery as it arrives (tags must grow)."""
        if self._order and delivery_tag <= self._order[-1]:
            raise ValueError(
                f"delivery tag {delivery_tag} does not follow {self._order[-1]}"
            )
        self._order.append(delivery_tag)
        self._actions[delivery_tag] = None

    def resolve(self, delivery_tag: int, decision: Action | Applied) -> None:
        """Decide how ``delivery_tag`` is settled: a bare action, or a record
        (whose ``action`` is sent). Deciding twice is a bug."""
        if self._actions.get(delivery_tag, decision) is not None:
            raise ValueError(f"delivery tag {delivery_tag} is unknown or decided")
        self._actions[delivery_tag] = decision
        self._waiting.add(delivery_tag)

    def _skip_released(self) -> None:
        order, actions = self._order, self._actions
        while order and order[0] not in actions:
            order.popleft()

    def head_decided(self) -> bool:
        """Whether the oldest unsettled tag is decided (frames are ready)."""
        self._skip_released()
        return bool(self._order) and self._actions[self._order[0]] is not None

    def take_ready(self, *, past_undecided: bool = False) -> list[Settle]:
        """The frames that may be sent now, in order; they count as settled.

        With ``past_undecided``, decided tags after the first undecided one are
        released too, one single-tag frame each.
        """
        frames: list[Settle] = []
        run_end = run_length = 0
        run_records: list[Applied] = []
        order, actions, waiting = self._order, self._actions, self._waiting
        ack = _ACK
        while order:
            delivery_tag = order[0]
            if delivery_tag not in actions:
                order.popleft()  # released earlier, past an undecided tag
                continue
            decision = actions[delivery_tag]
            if decision is None:
                break
            order.popleft()
            del actions[delivery_tag]
            waiting.discard(delivery_tag)
            if decision is ack:  # the fast path: a bare ACK
                run_end, run_length = delivery_tag, run_length + 1
                continue
            if not isinstance(decision, Action) and decision.fate.action is ack:
                run_end, run_length = delivery_tag, run_length + 1
                run_records.append(decision)
                continue
            if run_length:
                frames.append(_ack_run(run_end, run_length, run_records))
                run_length, run_records = 0, []
            frames.append(_single(delivery_tag, decision))
        if run_length:
            frames.append(_ack_run(run_end, run_length, run_records))
        if past_undecided and waiting:
            for delivery_tag in sorted(waiting):
                decision = actions.pop(delivery_tag)
                assert decision is not None
                frames.append(_single(delivery_tag, decision))
            waiting.clear()
        return frames


def _ack_run(last: int, length: int, records: list[Applied]) -> Settle:
    """One ack for a run of ``length`` tags ending at ``last``."""
    return Settle(_ACK, last, length > 1, length - len(records), records)


def _single(delivery_tag: int, decision: Action | Applied) -> Settle:
    """A frame for one tag only."""
    if isinstance(decision, Action):
        return Settle(decision, delivery_tag, False, 1)
    return Settle(decision.fate.action, delivery_tag, False, 0, (decision,))
