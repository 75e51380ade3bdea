"""Handlers for ``amqp-batch run`` tests (imported by the CLI subprocess).

The fate of a message depends on its id (its body): multiples of 3 are NACKed,
other multiples of 5 REQUEUEd, the rest ACKed. Each batch prints
``batch <ids>`` on stdout, so a test can follow what the handler saw.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from amqp_batch import Message, MessageResult

NOT_CALLABLE = 42


def fate(number: int) -> MessageResult:
    """The result the handlers here give message ``number``."""
    if number % 3 == 0:
        return MessageResult.NACK
    if number % 5 == 0:
        return MessageResult.REQUEUE
    return MessageResult.ACK


def announce(messages: Sequence[Message]) -> None:
    print("batch " + " ".join(m.body.decode() for m in messages), flush=True)


async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
    """An async generator handler."""
    announce(messages)
    for message in messages:
        yield fate(int(message.body))


async def handle_list(messages: Sequence[Message]) -> list[MessageResult]:
    """An async function returning the results."""
    announce(messages)
    return [fate(int(message.body)) for message in messages]


def plain(messages: Sequence[Message]) -> list[MessageResult]:
    """Not a handler: a plain function."""
    return [MessageResult.ACK for _ in messages]


class NotAConsumer:
    """A class that is not a BatchConsumer."""
