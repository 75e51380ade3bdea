"""Fan-in pipeline: N source consumers -> a staging exchange -> one writer.

Each source handler republishes through a Publisher (its own connection, so a
memory alarm that blocks publishing never stalls the sources' acks).
"""

import os

import anyio

from amqp_batch import (
    BatchConsumer,
    BatchConsumerSettings,
    MessageResult,
    Publisher,
)

URL = os.environ.get("AMQP_BATCH_URL", "amqp://guest:guest@localhost:5672/")
PREFIX = os.environ.get("EXAMPLE_QUEUE", "example-fan-in")
SOURCES = [f"{PREFIX}-source-{i}" for i in range(3)]
STAGING = f"{PREFIX}-staging"
WRITER_QUEUE = f"{PREFIX}-writer"


class Source(BatchConsumer):
    def __init__(self, settings, publisher):
        super().__init__(settings)
        self.publisher = publisher

    async def process_messages(self, messages):
        for message in messages:
            await self.publisher.publish(
                message.body,
                exchange=STAGING,
                routing_key="staged",
                headers={"source": self.settings.queue_name},
            )
            yield MessageResult.ACK


class Writer(BatchConsumer):
    def __init__(self, settings, done):
        super().__init__(settings)
        self.rows = []
        self.done = done

    async def process_messages(self, messages):
        self.rows.extend(f"{m.headers['source']}:{m.body.decode()}" for m in messages)
        print("wrote batch of", len(messages))
        for _ in messages:
            yield MessageResult.ACK
        if len(self.rows) == 3 * len(SOURCES):
            self.done.set()


async def main() -> None:
    done = anyio.Event()
    writer = Writer(
        BatchConsumerSettings(
            url=URL,
            queue_name=WRITER_QUEUE,
            exchange_name=STAGING,
            exchange_type="fanout",
            batch_size=100,
            batch_timeout=0.2,
            prefetch_count=100,
        ),
        done,
    )
    async with Publisher(URL) as publisher, anyio.create_task_group() as group:
        await group.start(writer.serve)
        sources = [
            Source(
                BatchConsumerSettings(url=URL, queue_name=q, batch_timeout=0.1),
                publisher,
            )
            for q in SOURCES
        ]
        for source in sources:
            await group.start(source.serve)
        for queue in SOURCES:
            for n in range(3):
                await publisher.publish(str(n).encode(), routing_key=queue)
        await done.wait()
        for consumer in (*sources, writer):
            await consumer.stop()  # graceful: waits until it has drained
    print("rows", sorted(writer.rows))


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("EXAMPLE_BACKEND", "asyncio"))
