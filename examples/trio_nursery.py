"""A trio program: the consumer is one child of a nursery, beside other tasks.

``await nursery.start(consumer.serve)`` returns once every worker consumes. A
producer and a progress reporter run next to it in the same nursery. When the
work is done the program stops cleanly: ``await consumer.stop()`` drains (the
batch in hand finishes and is acked, prefetched messages go back to the queue)
and returns once the consumer has stopped; then the nursery's remaining task,
the reporter, is cancelled.

Run: AMQP_BATCH_URL=amqp://guest:guest@localhost:5672/ python examples/trio_nursery.py
"""

import os

import trio

from amqp_batch import BatchConsumer, BatchConsumerSettings, MessageResult, Publisher

URL = os.environ.get("AMQP_BATCH_URL", "amqp://guest:guest@localhost:5672/")
QUEUE = os.environ.get("EXAMPLE_QUEUE", "example-trio-thumbnails")

#: Image ids to render; one message carries a body that is not an image id.
IMAGES = [str(n) for n in range(1, 13)]
BAD = "not-an-image"


class Thumbnails(BatchConsumer):
    """Renders a thumbnail per image id; anything else is dead-lettered."""

    def __init__(self, settings, expected):
        super().__init__(settings)
        self.rendered = []
        self.rejected = []
        self.expected = expected
        self.all_seen = trio.Event()

    async def process_messages(self, messages):
        for message in messages:
            if message.body.isdigit():
                await trio.lowlevel.checkpoint()  # render the thumbnail here
                self.rendered.append(message.message_id)
                yield MessageResult.ACK
            else:
                self.rejected.append(message.message_id)
                yield MessageResult.NACK  # to the dead-letter queue, not retried
        if len(self.rendered) + len(self.rejected) == self.expected:
            self.all_seen.set()


async def produce(publisher):
    for image in [*IMAGES[:6], BAD, *IMAGES[6:]]:
        await publisher.publish(image.encode(), routing_key=QUEUE, message_id=image)


async def report(consumer):
    """Another long-running task of the program: logs the consumer's state."""
    while True:
        [worker] = consumer.health()
        print("progress", worker.state.value, dict(worker.results), flush=True)
        await trio.sleep(1)


async def main():
    settings = BatchConsumerSettings(
        url=URL,
        queue_name=QUEUE,
        batch_size=5,
        batch_timeout=0.2,
        dead_letter_exchange=f"{QUEUE}-dlx",
        dead_letter_queue=f"{QUEUE}-dead",
    )
    consumer = Thumbnails(settings, expected=len(IMAGES) + 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(consumer.serve)  # returns once consuming
        nursery.start_soon(report, consumer)
        async with Publisher(URL) as publisher:
            nursery.start_soon(produce, publisher)
            await consumer.all_seen.wait()
        await consumer.stop()  # graceful; returns once the consumer has stopped
        nursery.cancel_scope.cancel()  # the reporter
    [worker] = consumer.health()
    print("acked", ",".join(consumer.rendered))
    print("dead-lettered", ",".join(consumer.rejected))
    print("results", dict(sorted(worker.results.items())))
    print("stopped")


if __name__ == "__main__":
    trio.run(main)
