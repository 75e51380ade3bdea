"""A Redis idempotency store, on asyncio and trio.

redis-py's asyncio client runs on asyncio only, so under trio it cannot be
used. The store needs two commands (``EXISTS`` and ``SET ... EX``), so it
speaks Redis's protocol (RESP) itself over an anyio TCP stream: about fifty
lines, no dependency, and the same code on both backends. One connection is
shared by every worker of the consumer; a lock keeps each pipeline whole.

Run it (a broker on localhost and Redis on 127.0.0.1:6379)::

    python examples/idempotency_redis.py

It publishes one message twice (same ``message_id``) and one once, and stops
once all three are acked: the handler sees each message once.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from amqp_batch import (
    BatchConsumerSettings,
    Message,
    MessageResult,
    Publisher,
    batch_consumer,
)
from amqp_batch.idempotency import deduplicated


class RedisError(Exception):
    """Redis answered with an error."""


class RedisIdempotencyStore:
    """Keys under ``prefix`` in Redis, each expiring after ``ttl`` seconds."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        ttl: int = 86_400,
        prefix: str = "amqp-batch:seen:",
    ) -> None:
        self.host, self.port, self.ttl, self.prefix = host, port, ttl, prefix
        self._lock = anyio.Lock()
        self._stream: SocketStream | None = None
        self._reader: BufferedByteReceiveStream | None = None

    async def __aenter__(self) -> RedisIdempotencyStore:
        self._stream = await anyio.connect_tcp(self.host, self.port)
        self._reader = BufferedByteReceiveStream(self._stream)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._stream is not None:
            await self._stream.aclose()

    async def seen(self, keys: Sequence[str]) -> set[str]:
        """The keys Redis still holds (one pipelined ``EXISTS`` per key)."""
        replies = await self.execute([("EXISTS", self.prefix + k) for k in keys])
        return {key for key, reply in zip(keys, replies, strict=True) if reply == 1}

    async def remember(self, keys: Sequence[str]) -> None:
        """Store every key with its expiry (one pipelined ``SET`` per key)."""
        ttl = str(self.ttl)
        await self.execute([("SET", self.prefix + k, "1", "EX", ttl) for k in keys])

    async def execute(self, commands: Sequence[tuple[str, ...]]) -> list[Any]:
        """Send ``commands`` in one pipeline; their replies, in order."""
        if not commands:
            return []
        assert self._stream is not None, "use the store as an async context manager"
        out = bytearray()
        for command in commands:
            out += b"*%d\r\n" % len(command)
            for part in command:
                data = part.encode()
                out += b"$%d\r\n%s\r\n" % (len(data), data)
        async with self._lock:
            await self._stream.send(bytes(out))
            return [await self._reply() for _ in commands]

    async def _reply(self) -> Any:
        assert self._reader is not None
        line = await self._reader.receive_until(b"\r\n", 1 << 20)
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = await self._reader.receive_exactly(size + 2)
            return data[:-2]
        if kind == b"*":
            return [await self._reply() for _ in range(int(rest))]
        raise RedisError(f"unexpected reply {line[:20]!r}")


URL = os.environ.get("AMQP_BATCH_URL", "amqp://guest:guest@localhost:5672/")
QUEUE = os.environ.get("EXAMPLE_QUEUE", "example-idempotency")
REDIS_PREFIX = os.environ.get("EXAMPLE_REDIS_PREFIX", f"example:{QUEUE}:")


async def main() -> None:
    """Publish order-1 twice and order-2 once: the handler sees each once."""
    handled: list[str] = []
    all_acked = anyio.Event()
    skipped = 0

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            handled.append(message.message_id or "")
            print("handled", message.message_id)
            yield MessageResult.ACK

    def on_skip(messages: Sequence[Message]) -> None:
        nonlocal skipped
        skipped += len(messages)
        for message in messages:
            print("skipped", message.message_id)

    async def watch(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        async for result in deduplicated(handle, store, on_skip=on_skip)(messages):
            yield result
        if len(handled) + skipped == 3:
            all_acked.set()

    settings = BatchConsumerSettings(
        url=URL, queue_name=QUEUE, batch_size=1, batch_timeout=0.2
    )
    async with (
        RedisIdempotencyStore(ttl=3600, prefix=REDIS_PREFIX) as store,
        batch_consumer(settings, watch),
        Publisher(URL) as publisher,
    ):
        for message_id in ("order-1", "order-1", "order-2"):
            await publisher.publish(b"{}", routing_key=QUEUE, message_id=message_id)
        with anyio.fail_after(30):
            await all_acked.wait()
    print("stopped")


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("EXAMPLE_BACKEND", "asyncio"))
