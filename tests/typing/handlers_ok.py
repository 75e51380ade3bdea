"""Type-checks clean under mypy --strict (tests/test_typing.py runs it)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence

from typing_extensions import assert_type

from amqp_batch import (
    BatchConsumerSettings,
    Message,
    MessageResult,
    batch_consumer,
    json_decoder,
    msgspec_decoder,
)
from amqp_batch.testing import make_message, run_handler


@dataclasses.dataclass
class Order:
    id: int


async def typed(messages: Sequence[Message[Order]]) -> AsyncIterator[MessageResult]:
    for message in messages:
        assert_type(message.value, Order)
        assert_type(message.value.id, int)
        yield MessageResult.ACK


async def untyped(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
    for message in messages:  # Message without a parameter still works
        assert_type(message.body, bytes)
        yield MessageResult.ACK


async def main(settings: BatchConsumerSettings) -> None:
    async with batch_consumer(
        settings, typed, decoder=json_decoder(lambda d: Order(**d))
    ):
        pass
    async with batch_consumer(settings, typed, decoder=msgspec_decoder(Order)):
        pass
    async with batch_consumer(settings, untyped):
        pass
    message = make_message(b'{"id": 1}', decoder=msgspec_decoder(Order))
    assert_type(message, Message[Order])
    assert_type(await run_handler(typed, [message]), list[MessageResult])
