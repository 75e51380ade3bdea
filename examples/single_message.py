"""The single-message form: Consumer.process_message returns one result."""

import os

import anyio

from amqp_batch import Consumer, ConsumerSettings, MessageResult, Publisher

URL = os.environ.get("AMQP_BATCH_URL", "amqp://guest:guest@localhost:5672/")
QUEUE = os.environ.get("EXAMPLE_QUEUE", "example-single")


class Printer(Consumer):
    count = 0

    async def process_message(self, message):
        self.count += 1
        print("got", message.body.decode(), "retry", message.retry_count)
        if self.count == 3:
            await self.stop()
        return MessageResult.ACK


async def main() -> None:
    async with Publisher(URL) as publisher:
        consumer = Printer(ConsumerSettings(url=URL, queue_name=QUEUE))
        async with anyio.create_task_group() as group:
            await group.start(consumer.serve)
            for text in ("a", "b", "c"):
                await publisher.publish(text.encode(), routing_key=QUEUE)
    print("stopped")


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("EXAMPLE_BACKEND", "asyncio"))
