"""Quick start: subclass BatchConsumer, yield one result per message.

Run: AMQP_BATCH_URL=amqp://guest:guest@localhost:5672/ python examples/quickstart.py
It publishes a few JSON messages (one malformed), consumes them, and stops itself.
"""

import json
import os

import anyio

from amqp_batch import BatchConsumer, BatchConsumerSettings, MessageResult, Publisher

URL = os.environ.get("AMQP_BATCH_URL", "amqp://guest:guest@localhost:5672/")
QUEUE = os.environ.get("EXAMPLE_QUEUE", "example-quickstart")


class MyConsumer(BatchConsumer):
    seen = 0

    async def process_messages(self, messages):
        for message in messages:
            self.seen += 1
            try:
                data = json.loads(message.body)
            except json.JSONDecodeError:
                print("bad", message.body)
                yield MessageResult.NACK  # bad data: to the DLX, never retried
                continue
            print("ok", data["n"])
            yield MessageResult.ACK
        if self.seen >= 5:
            await self.stop()  # from a handler: requests a graceful stop


async def main() -> None:
    settings = BatchConsumerSettings(
        url=URL, queue_name=QUEUE, batch_size=50, batch_timeout=0.2, prefetch_count=300
    )
    consumer = MyConsumer(settings)
    async with anyio.create_task_group() as group:
        await group.start(consumer.serve)
        async with Publisher(URL) as publisher:
            for n in range(4):
                await publisher.publish(
                    json.dumps({"n": n}).encode(), routing_key=QUEUE
                )
            await publisher.publish(b"not json", routing_key=QUEUE)
    print("stopped")


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("EXAMPLE_BACKEND", "asyncio"))
