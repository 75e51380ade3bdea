"""Each line with an "error:" comment must fail mypy --strict (tests/test_typing.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence

from amqp_batch import (
    BatchConsumerSettings,
    Message,
    MessageResult,
    batch_consumer,
    msgspec_decoder,
)


@dataclasses.dataclass
class Order:
    id: int


@dataclasses.dataclass
class User:
    name: str


async def yields_strings(messages: Sequence[Message[Order]]) -> AsyncIterator[str]:
    for _ in messages:
        yield "ack"


async def typed(messages: Sequence[Message[Order]]) -> AsyncIterator[MessageResult]:
    for message in messages:
        print(message.value.name)  # error: an Order has no name
        yield MessageResult.ACK


async def main(settings: BatchConsumerSettings) -> None:
    async with batch_consumer(settings, yields_strings):  # error: not results
        pass
    users = msgspec_decoder(User)
    async with batch_consumer(settings, typed, decoder=users):  # error: not Orders
        pass
