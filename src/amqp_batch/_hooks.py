"""The hook API: what a consumer tells observers (metrics, tracing, your own code).

Subclass :class:`ConsumerHooks`, override the methods you need, and pass instances
as ``BatchConsumer(settings, hooks=[...])``. Every method is a no-op by default.

Hooks are **synchronous** on purpose: they run on the hot path, inside the handler
runner, the acker and the worker, between two steps that must not be separated by
a scheduling point (an ``await`` there would let a settlement overtake another, or
cancel the acker in the middle of a batch). A hook should update a counter, set a
span attribute, append to a list: microseconds. Anything slow or async (sending to
a collector, writing to a database) belongs in your own task, fed for example by a
memory object stream with ``send_nowait``.

A hook that raises ``Exception`` is logged (logger ``amqp_batch.hooks``), counted
(:attr:`HookDispatcher.hook_errors`, and ``hook_failed`` on every hook) and
ignored: observing never changes what is consumed or settled. ``BaseException``
(cancellation, ``KeyboardInterrupt``) is never caught.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

import attrs

from ._message import Message
from ._results import MessageResult

if TYPE_CHECKING:
    from ._actors.planner import Applied
    from ._worker import WorkerHealth, WorkerState

__all__ = [
    "BatchInfo",
    "ConsumerHooks",
    "HandledBatch",
    "HookDispatcher",
    "SettleOutcome",
    "Settlement",
    "confirm_reporter",
    "settlement_reporter",
]

logger = logging.getLogger("amqp_batch.hooks")


@attrs.frozen(slots=True, eq=False)
class BatchInfo:
    """One batch on its way through the handler.

    The same object is passed to :meth:`ConsumerHooks.batch_started` and, as
    :attr:`HandledBatch.batch`, to :meth:`ConsumerHooks.batch_handled` of that
    batch (compare with ``is``, or key a dict with ``id()`` between the two
    calls).
    """

    #: The worker's number, from 0.
    worker: int
    #: The queue consumed.
    queue: str
    #: The messages of the batch, in delivery order.
    messages: Sequence[Message]


@attrs.frozen(slots=True)
class HandledBatch:
    """What the handler made of one batch, for :meth:`ConsumerHooks.batch_handled`.

    One record rather than four arguments, for the reason
    :meth:`~ConsumerHooks.settled` gets :class:`Settlement` records: a field can
    be added in a later release without breaking your overrides.
    """

    #: The batch, the very object :meth:`ConsumerHooks.batch_started` received
    #: (``handled.batch is batch``).
    batch: BatchInfo
    #: One result per message, in delivery order (the fallback filled in where
    #: the handler raised); empty when the handler was cancelled, and then
    #: nothing of the batch will be settled.
    results: Sequence[MessageResult]
    #: Seconds the handler took, its guards (rate limit, timeout...) included,
    #: measured with ``time.perf_counter()``.
    duration: float
    #: What the handler raised (the fallback was applied), or the cancellation
    #: that stopped it; None when it returned.
    error: BaseException | None


class SettleOutcome(enum.Enum):
    """What happened to a message on the wire once its result was applied."""

    #: ``basic.ack``: done (an ACK, or an original whose copy was confirmed).
    ACKED = "acked"
    #: REQUEUE: a copy with ``x-retry-count`` + 1 was confirmed at the back of the
    #: queue, then the original was acked.
    REPUBLISHED = "republished"
    #: The library published it to the dead-letter exchange (confirmed), then
    #: acked the original.
    DEAD_LETTERED = "dead_lettered"
    #: ``basic.reject(requeue=False)``: the broker dead-letters it if the queue
    #: has a dead-letter exchange, else drops it.
    REJECTED = "rejected"
    #: ``basic.nack(requeue=True)`` (REQUEUE_IMMEDIATE): back to the queue's head.
    REQUEUED = "requeued"


@attrs.frozen(slots=True)
class Settlement:
    """One message's applied settlement."""

    message: Message
    #: The handler's result; None when the library decided without asking the
    #: handler (e.g. an untrusted ``x-retry-count`` header).
    result: MessageResult | None
    outcome: SettleOutcome
    #: Why it was dead-lettered or rejected (``rejected``,
    #: ``max-requeue-attempts``, ``republish-failed``, a bad-header reason);
    #: None otherwise.
    reason: str | None = None


class ConsumerHooks:
    """Base class of consumer hooks: override what you need; all are no-ops.

    Called synchronously on the consumer's hot path (see the module docs): keep
    them fast, never block, never await. An exception is logged, counted and
    ignored.
    """

    def batch_started(self, batch: BatchInfo) -> None:
        """A batch is handed to the handler (called in the handler's own task,
        so a context variable set here is seen by the handler)."""

    def batch_handled(self, handled: HandledBatch) -> None:
        """The handler is done with ``handled.batch`` (same task as
        :meth:`batch_started`): its results, duration and error, if any (see
        :class:`HandledBatch`)."""

    def settled(
        self, worker: int, queue: str, settlements: Sequence[Settlement]
    ) -> None:
        """Settlements were sent to the broker (one call per group the acker
        sent together, in delivery-tag order)."""

    def copy_confirmed(self, worker: int, queue: str, latency: float) -> None:
        """The broker confirmed a copy (a REQUEUE republish or a library
        dead-letter) ``latency`` seconds after it was published."""

    def worker_state_changed(self, health: WorkerHealth, previous: WorkerState) -> None:
        """A worker moved from ``previous`` to ``health.state``."""

    def reconnecting(
        self, health: WorkerHealth, reason: str, error: BaseException | None
    ) -> None:
        """A worker's session ended and it is about to back off and reconnect.
        ``reason`` is short and fixed (e.g. the error's type name:
        ``ConnectionLost``, ``ChannelClosed``, ``ConsumerCancelled``), fit for a
        metric label; ``error`` the error itself (its text never has a
        password)."""

    def hook_failed(self, hook: str, method: str, error: Exception) -> None:
        """Another hook's ``method`` raised ``error`` (already logged); ``hook``
        is its class name. An error raised here is only logged."""


#: The event methods a dispatcher fans out (``hook_failed`` is its own path).
EVENTS = (
    "batch_started",
    "batch_handled",
    "settled",
    "copy_confirmed",
    "worker_state_changed",
    "reconnecting",
)


def overrides(hook: ConsumerHooks, method: str) -> bool:
    """True when ``hook``'s class overrides ``ConsumerHooks.method``."""
    return getattr(type(hook), method) is not getattr(ConsumerHooks, method)


class HookDispatcher:
    """Fans events out to hooks; internal to the consumer.

    For each event, the attribute of the same name is None when no hook
    overrides it, so the hot path costs one ``is None`` check when nobody
    listens; otherwise it is a callable that calls each listening hook, logging,
    counting and ignoring what they raise.
    """

    batch_started: Callable[[BatchInfo], None] | None
    batch_handled: Callable[[HandledBatch], None] | None
    settled: Callable[[int, str, Sequence[Settlement]], None] | None
    copy_confirmed: Callable[[int, str, float], None] | None
    worker_state_changed: Callable[[WorkerHealth, WorkerState], None] | None
    reconnecting: Callable[[WorkerHealth, str, BaseException | None], None] | None

    def __init__(self, hooks: Sequence[ConsumerHooks] = ()) -> None:
        for hook in hooks:
            if not isinstance(hook, ConsumerHooks):
                raise TypeError(
                    f"hooks must be ConsumerHooks instances, got {type(hook).__name__}"
                )
        self.hooks: tuple[ConsumerHooks, ...] = tuple(hooks)
        #: How many times a hook raised (read by tests and health reports).
        self.hook_errors = 0
        self._failure_listeners = [
            hook for hook in self.hooks if overrides(hook, "hook_failed")
        ]
        for event in EVENTS:
            listeners = [hook for hook in self.hooks if overrides(hook, event)]
            setattr(self, event, self._fan_out(event, listeners) if listeners else None)

    def __repr__(self) -> str:
        names = ", ".join(type(hook).__name__ for hook in self.hooks)
        return f"<HookDispatcher [{names}] errors={self.hook_errors}>"

    @property
    def active(self) -> bool:
        """True when at least one hook listens to some event."""
        return any(getattr(self, event) is not None for event in EVENTS)

    def _fan_out(
        self, event: str, listeners: list[ConsumerHooks]
    ) -> Callable[..., None]:
        methods = [(hook, getattr(hook, event)) for hook in listeners]
        failed = self._failed

        def dispatch(*args: Any) -> None:
            for hook, method in methods:
                try:
                    method(*args)
                except Exception as exc:
                    failed(hook, event, exc)

        dispatch.__name__ = event
        return dispatch

    def _failed(self, hook: ConsumerHooks, event: str, error: Exception) -> None:
        self.hook_errors += 1
        name = type(hook).__name__
        logger.error(
            "hook %s.%s raised %s; ignored",
            name,
            event,
            type(error).__name__,
            exc_info=error,
            extra={"hook": name, "hook_method": event},
        )
        for listener in self._failure_listeners:
            try:
                listener.hook_failed(name, event, error)
            except Exception:
                self.hook_errors += 1
                logger.exception(
                    "hook %s.hook_failed raised; ignored",
                    type(listener).__name__,
                    extra={
                        "hook": type(listener).__name__,
                        "hook_method": "hook_failed",
                    },
                )


#: The planner's fates (by value) as the outcomes hooks see.
_OUTCOMES = {
    "acked": SettleOutcome.ACKED,
    "requeued": SettleOutcome.REQUEUED,
    "republished": SettleOutcome.REPUBLISHED,
    "dead-lettered": SettleOutcome.DEAD_LETTERED,
    "rejected": SettleOutcome.REJECTED,
}


def settlement_reporter(
    hooks: HookDispatcher, worker: int, queue: str
) -> Callable[[Sequence[Applied]], None] | None:
    """The acker's ``on_applied`` for ``hooks`` (None when no hook listens to
    ``settled``: the acker then keeps its bare-ACK fast path)."""
    settled = hooks.settled
    if settled is None:
        return None

    def report(applied: Sequence[Applied]) -> None:
        settled(worker, queue, Settlements(applied))

    return report


def _settlement(record: Applied) -> Settlement:
    disposition = record.disposition
    return Settlement(
        record.message,
        disposition if isinstance(disposition, MessageResult) else None,
        _OUTCOMES[record.fate._value_],
        record.reason,
    )


class Settlements(Sequence[Settlement]):
    """The settlements of one ``settled`` call, made when a hook first reads
    them (internal: hooks see a read-only ``Sequence[Settlement]``).

    One is made per message, so a hook that only counts results
    (:class:`~amqp_batch.prometheus.PrometheusHooks`) reads :meth:`tally`
    instead and none are made unless another hook reads them.
    """

    __slots__ = ("_made", "_records")

    def __init__(self, records: Sequence[Applied]) -> None:
        self._records = records
        self._made: list[Settlement] | None = None

    def _all(self) -> list[Settlement]:
        made = self._made
        if made is None:
            made = self._made = [_settlement(record) for record in self._records]
        return made

    def __len__(self) -> int:
        return len(self._records)

    @overload
    def __getitem__(self, index: int) -> Settlement: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Settlement]: ...

    def __getitem__(self, index: int | slice) -> Settlement | Sequence[Settlement]:
        return self._all()[index]

    def __iter__(self) -> Iterator[Settlement]:
        return iter(self._all())

    def __repr__(self) -> str:
        return f"<{len(self)} settlements>"

    def tally(self) -> tuple[dict[str, int], list[Message]]:
        """How many settled per result (its value; ``"dead_letter"`` when the
        library decided without the handler), and the messages that carry a
        ``timestamp``."""
        counts: dict[str, int] = {}
        stamped: list[Message] = []
        for record in self._records:
            disposition = record.disposition
            # _value_ is a plain attribute; .value is a property (slower).
            label = (
                disposition._value_
                if isinstance(disposition, MessageResult)
                else "dead_letter"
            )
            counts[label] = counts.get(label, 0) + 1
            message = record.message
            if message.timestamp is not None:
                stamped.append(message)
        return counts, stamped


def confirm_reporter(
    hooks: HookDispatcher, worker: int, queue: str
) -> Callable[[float], None] | None:
    """The acker's ``on_copy_confirmed`` for ``hooks`` (None when no hook
    listens to ``copy_confirmed``)."""
    confirmed = hooks.copy_confirmed
    if confirmed is None:
        return None

    def report(latency: float) -> None:
        confirmed(worker, queue, latency)

    return report
