"""Consumer classes for ``amqp-batch run`` tests (imported by the CLI subprocess)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import anyio
from cli_handlers import announce, fate

from amqp_batch import BatchConsumer, Consumer, Message, MessageResult


class Ingest(BatchConsumer):  # type: ignore[type-arg]
    """The batch form, with hooks that print."""

    async def on_start(self) -> None:
        print(f"on_start {self.settings.queue_name}", flush=True)

    async def on_stop(self) -> None:
        print("on_stop", flush=True)

    async def process_messages(
        self, messages: Sequence[Message]
    ) -> AsyncIterator[MessageResult]:
        announce(messages)
        for message in messages:
            yield fate(int(message.body))


class Single(Consumer):  # type: ignore[type-arg]
    """The single-message form."""

    async def process_message(self, message: Message) -> MessageResult:
        print(f"batch {message.body.decode()}", flush=True)
        return fate(int(message.body))


class Slow(BatchConsumer):  # type: ignore[type-arg]
    """Each batch takes half a second of work; prints when it is done."""

    async def process_messages(
        self, messages: Sequence[Message]
    ) -> AsyncIterator[MessageResult]:
        announce(messages)
        await anyio.sleep(0.5)  # the work
        for _ in messages:
            yield MessageResult.ACK
        print("acked " + " ".join(m.body.decode() for m in messages), flush=True)


class NeedsMore(BatchConsumer):  # type: ignore[type-arg]
    """Its constructor wants more than the settings."""

    def __init__(self, settings: object, database: str) -> None:
        super().__init__(settings)  # type: ignore[arg-type]

    async def process_messages(
        self, messages: Sequence[Message]
    ) -> AsyncIterator[MessageResult]:
        for _ in messages:
            yield MessageResult.ACK


class Unfinished(BatchConsumer):  # type: ignore[type-arg]
    """Forgot to implement process_messages."""
