"""What the acker does with each result, as data (pure: no IO, no logging).

:func:`plan` maps a message, its :data:`Disposition` and the queue's
:class:`~amqp_batch._retry.RetryPolicy` to one plan value:

- :class:`Settle`: send ``action`` for the delivery, nothing else;
- :class:`Republish`: publish a copy (confirmed, ``mandatory``), then ack the
  original; its ``fallback`` says how to dead-letter the original if the copy
  cannot be encoded or is returned or nacked;
- :class:`DeadLetterPublish`: publish the message to the dead-letter exchange
  with a reason header (confirmed), then ack the original; its ``fallback``
  (a ``basic.reject``) is for when that publish fails.

Fallbacks are plans too, so every path is decided here and the acker only runs
them. Once a plan has been carried out, the acker records an :class:`Applied`
with the message's :class:`Fate`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, NamedTuple

import attrs

from .._message import Message
from .._results import MessageResult
from .._retry import RetryPolicy, dead_letter_properties
from .._transport._base import Delivery, Properties
from .ledger import Action

__all__ = [
    "DECODE_ERROR",
    "MAX_REQUEUE_ATTEMPTS",
    "REJECTED",
    "REPUBLISH_FAILED",
    "Applied",
    "DeadLetter",
    "DeadLetterPublish",
    "Disposition",
    "Fate",
    "Plan",
    "Publish",
    "Republish",
    "Settle",
    "plan",
    "requeue_target",
]

#: The dead-letter reason of a NACK.
REJECTED = "rejected"
#: The dead-letter reason of a REQUEUE past ``max_requeue_attempts``.
MAX_REQUEUE_ATTEMPTS = "max-requeue-attempts"
#: The dead-letter reason of a REQUEUE whose copy failed.
REPUBLISH_FAILED = "republish-failed"
#: The dead-letter reason of a body the consumer's decoder refused.
DECODE_ERROR = "decode-error"


@attrs.frozen
class DeadLetter:
    """Dead-letter this message without asking the handler (e.g. a bad header);
    ``headers`` are added to the dead letter besides the reason."""

    reason: str
    headers: Mapping[str, Any] | None = None


Disposition = MessageResult | DeadLetter


class Fate(enum.Enum):
    """How a message was settled, once it was. Each member's value is its
    label; ``action`` is the frame that settles the original, ``dead_letters``
    whether the message left the queue as a dead letter."""

    action: Action
    dead_letters: bool

    def __new__(cls, label: str, action: Action, dead_letters: bool) -> Fate:
        member = object.__new__(cls)
        member._value_ = label
        # Plain attributes, not properties: read once per settled message.
        member.action = action
        member.dead_letters = dead_letters
        return member

    #: ``basic.ack``: the handler's ACK.
    ACKED = ("acked", Action.ACK, False)
    #: ``basic.nack(requeue=True)``: REQUEUE_IMMEDIATE.
    REQUEUED = ("requeued", Action.REQUEUE, False)
    #: A copy was published to the back of the queue and confirmed, then the
    #: original acked.
    REPUBLISHED = ("republished", Action.ACK, False)
    #: The library published the message to the dead-letter exchange (with
    #: ``x-dead-letter-reason``), it was confirmed, then the original acked.
    DEAD_LETTERED = ("dead-lettered", Action.ACK, True)
    #: ``basic.reject(requeue=False)``: the broker dead-letters it through the
    #: queue's DLX, or drops it when the queue has none.
    REJECTED = ("rejected", Action.REJECT, True)


# Enum members bound to module names once: in Python 3.11 reading
# ``Enum.MEMBER`` costs about ten times as much as reading a global.
_ACK_ACTION, _REJECT_ACTION = Action.ACK, Action.REJECT
_ACKED, _REQUEUED, _REJECTED = Fate.ACKED, Fate.REQUEUED, Fate.REJECTED
_ACK_RESULT, _NACK_RESULT = MessageResult.ACK, MessageResult.NACK
_REQUEUE_IMMEDIATE_RESULT = MessageResult.REQUEUE_IMMEDIATE

# The plan values are named tuples, not attrs classes: one or two are made per
# message that is not a plain ACK, and a named tuple costs a third as much to make.


class Settle(NamedTuple):
    """Send ``action`` for the delivery; ``reason`` says why it is rejected."""

    action: Action
    reason: str | None = None

    @property
    def fate(self) -> Fate:
        """What this settlement does to the message."""
        # Identity tests, not a dict: an enum's hash is a Python-level call.
        action = self.action
        if action is _ACK_ACTION:
            return _ACKED
        return _REJECTED if action is _REJECT_ACTION else _REQUEUED


class DeadLetterPublish(NamedTuple):
    """Publish the message to ``exchange`` with ``routing_key`` and
    ``x-dead-letter-reason: reason`` (not ``mandatory``: like broker
    dead-lettering, an unroutable dead letter is dropped), then ack the original.
    If the publish cannot be encoded or is nacked: ``fallback``."""

    exchange: str
    routing_key: str
    reason: str
    #: The original delivery, whose properties the dead letter keeps.
    delivery: Delivery
    fallback: Settle
    #: The queue's policy (trusted ``x-original-*`` headers, signing key).
    policy: RetryPolicy | None = None
    #: More headers for the dead letter (e.g. the class of a decode error).
    headers: Mapping[str, Any] | None = None
    #: Where the message was first published, when the planner knows it already
    #: (else the policy works it out from ``delivery``).
    original: tuple[str, str] | None = None
    #: Never: an unroutable dead letter is dropped. (Fields, not properties,
    #: like ``fate``: read once per publish.)
    mandatory: bool = False
    #: What this plan does to the message once its publish is confirmed.
    fate: Fate = Fate.DEAD_LETTERED

    @property
    def properties(self) -> Properties:
        """The dead letter's properties (built when it is published: most
        dead-letter plans are fallbacks that never run)."""
        if self.policy is not None:
            return self.policy.dead_letter_properties(
                self.delivery, self.reason, self.headers, original=self.original
            )
        return dead_letter_properties(self.delivery, self.reason, headers=self.headers)

    def __repr__(self) -> str:
        # Without the delivery: its body and headers are the producer's data.
        return _describe(self, f"reason={self.reason!r}, ")


class Republish(NamedTuple):
    """Publish a copy to ``exchange`` with ``routing_key`` (``mandatory``), then
    ack the original. If the copy cannot be encoded, is returned or is nacked,
    the original is dead-lettered by ``fallback``."""

    exchange: str
    routing_key: str
    properties: Properties
    fallback: Settle | DeadLetterPublish
    #: Always: an unroutable copy must not count as requeued.
    mandatory: bool = True
    #: What this plan does to the message once its copy is confirmed.
    fate: Fate = Fate.REPUBLISHED
    #: A republished message is not dead-lettered.
    reason: None = None

    def __repr__(self) -> str:
        # Without the properties: their headers are the producer's data.
        return _describe(self)


def _describe(planned: Republish | DeadLetterPublish, reason: str = "") -> str:
    """A publish plan's repr: where it goes and its fallback, no message data."""
    return (
        f"{type(planned).__name__}(exchange={planned.exchange!r}, routing_key="
        f"{planned.routing_key!r}, {reason}fallback={planned.fallback!r})"
    )


Publish = Republish | DeadLetterPublish
Plan = Settle | Publish


class Applied(NamedTuple):
    """One message whose settlement was (or, held in the ledger, is about to
    be) sent: the handler's ``disposition``, what happened (``fate``), and the
    dead-letter reason if it was dead-lettered. (A named tuple: one is made
    per settled message that is not a plain ACK.)"""

    message: Message
    disposition: Disposition
    fate: Fate
    reason: str | None = None

    @property
    def action(self) -> Action:
        """The frame that settles the original."""
        return self.fate.action


ACK = Settle(Action.ACK)
REQUEUE = Settle(Action.REQUEUE)
_REJECTS = {
    reason: Settle(Action.REJECT, reason)
    for reason in (REJECTED, MAX_REQUEUE_ATTEMPTS, REPUBLISH_FAILED)
}


def plan(message: Message, disposition: Disposition, policy: RetryPolicy) -> Plan:
    """What to do with ``message`` given its disposition and the queue's policy.

    ACK and REQUEUE_IMMEDIATE are settled as they are; NACK dead-letters;
    REQUEUE republishes a copy with ``x-retry-count`` + 1 until the count reached
    ``max_requeue_attempts``, then dead-letters; a :class:`DeadLetter` is
    dead-lettered with its reason (by the library whenever the DLX is known).
    """
    if disposition is _ACK_RESULT:
        return ACK
    if disposition is _REQUEUE_IMMEDIATE_RESULT:
        return REQUEUE
    delivery = message.delivery
    if isinstance(disposition, DeadLetter):
        return _dead_letter(
            delivery,
            policy,
            disposition.reason,
            by_library=True,
            headers=disposition.headers,
        )
    trusted = policy.trusted_original(delivery)
    # Worked out once per plan (it checks the x-original-* headers): the dead
    # letter and the copy below are both addressed from it.
    original = trusted or (delivery.exchange, delivery.routing_key)
    by_library = trusted is not None
    if disposition is _NACK_RESULT:
        return _dead_letter(
            delivery, policy, REJECTED, by_library=by_library, original=original
        )
    if policy.is_exhausted(message.retry_count):
        return _dead_letter(
            delivery,
            policy,
            MAX_REQUEUE_ATTEMPTS,
            by_library=by_library,
            original=original,
        )
    new_count = message.retry_count + 1
    exchange, routing_key = requeue_target(policy, new_count)
    return Republish(
        exchange,
        routing_key,
        policy.requeue_properties(delivery, new_count, original=original),
        _dead_letter(
            delivery,
            policy,
            REPUBLISH_FAILED,
            by_library=by_library,
            original=original,
        ),
    )


def requeue_target(policy: RetryPolicy, new_retry_count: int = 1) -> tuple[str, str]:
    """The exchange and routing key a REQUEUE copy is published to: the
    default exchange, straight to the queue, or to the delay queue of its
    attempt when the policy has ``retry_delays``."""
    return "", policy.retry_destination(new_retry_count)


def _dead_letter(
    delivery: Delivery,
    policy: RetryPolicy,
    reason: str,
    *,
    by_library: bool,
    headers: Mapping[str, Any] | None = None,
    original: tuple[str, str] | None = None,
) -> Settle | DeadLetterPublish:
    """Dead-letter with the original routing key.

    When the DLX is known the library publishes the dead letter there itself
    (confirmed, then acks the original): always with ``dead_letter_strategy
    = "publish"`` (crash-safe), and with ``"broker"`` for copies, which the
    broker would dead-letter under the queue's name, and for messages that
    need a reason header (``by_library``). Otherwise the original is rejected
    and the broker dead-letters it (keeping its exchange and routing key,
    adding ``x-death``). The routing key is the queue's
    ``x-dead-letter-routing-key`` when set, as the broker would use it.
    """
    reject = _REJECTS.get(reason) or Settle(_REJECT_ACTION, reason)
    destination = policy.dead_letter_destination(delivery, original)
    if destination is None or not (
        by_library or policy.dead_letter_strategy == "publish"
    ):
        return reject
    exchange, routing_key = destination
    return DeadLetterPublish(
        exchange, routing_key, reason, delivery, reject, policy, headers, original
    )
