"""Three ways to run a consumer, plus on_start/on_stop hooks and settings read
from the environment (AMQP_BATCH_URL, AMQP_BATCH_QUEUE_NAME, ...).

1. ``async with batch_consumer(settings, handler)`` — consuming inside the block.
2. ``await task_group.start(consumer.serve)`` — a child of your task group.
3. ``await consumer.run()`` — owns the process: SIGINT/SIGTERM stop it gracefully
   (a second signal stops at once). Started here by ``EXAMPLE_MODE=run``.
"""

import os

import anyio

from amqp_batch import (
    BatchConsumer,
    BatchConsumerSettings,
    MessageResult,
    Publisher,
    batch_consumer,
)

MODE = os.environ.get("EXAMPLE_MODE", "context")


async def handle(messages):
    for message in messages:
        print("handled", message.body.decode())
        yield MessageResult.ACK


class WithHooks(BatchConsumer):
    async def on_start(self):
        print("on_start")  # open database pools etc.

    async def on_stop(self):
        print("on_stop")  # runs once, after every worker stopped

    async def process_messages(self, messages):
        async for result in handle(messages):
            yield result


async def main() -> None:
    os.environ.setdefault("AMQP_BATCH_QUEUE_NAME", "example-ways-to-run")
    settings = BatchConsumerSettings.from_env(batch_timeout=0.1)
    done = anyio.Event()

    async def publish_two() -> None:
        async with Publisher(settings.url) as publisher:
            for text in ("one", "two"):
                await publisher.publish(text.encode(), routing_key=settings.queue_name)

    if MODE == "context":
        count = 0

        async def counting(messages):
            nonlocal count
            async for result in handle(messages):
                count += 1
                yield result
            if count == 2:
                done.set()

        async with batch_consumer(settings, counting):
            await publish_two()
            await done.wait()
    elif MODE == "serve":
        consumer = WithHooks(settings)
        async with anyio.create_task_group() as group:
            await group.start(consumer.serve)
            print("healthy", consumer.is_healthy)
            await publish_two()
            await consumer.stop()
    else:
        print("ready", flush=True)
        await WithHooks(settings).run()
    print("stopped")


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("EXAMPLE_BACKEND", "asyncio"))
