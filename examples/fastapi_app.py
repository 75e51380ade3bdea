"""A FastAPI service that publishes from an endpoint and consumes in batches, in
one process: the consumer runs in the app's lifespan, in its task group, beside
the request handlers. No threads; a slow batch never blocks an endpoint.

    POST /orders   {"id": "o1", "item": "book", "quantity": 2}  -> 202, published
    GET  /health   consumer health and counts (503 while not consuming)

Run: AMQP_BATCH_URL=amqp://guest:guest@localhost:5672/ uvicorn fastapi_app:app
(from this directory). uvicorn runs it on asyncio. FastAPI and Starlette are
built on anyio, so the app itself also runs under trio (the test suite drives it
through its ASGI interface on both); serve it on trio with an ASGI server that
supports trio, such as hypercorn's trio worker.
"""

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from pydantic import BaseModel, ValidationError

from amqp_batch import (
    BatchConsumerSettings,
    MessageResult,
    Publisher,
    batch_consumer,
)

URL = os.environ.get("AMQP_BATCH_URL", "amqp://guest:guest@localhost:5672/")
QUEUE = os.environ.get("EXAMPLE_QUEUE", "example-fastapi-orders")


class Order(BaseModel):
    id: str
    item: str
    quantity: int = 1


async def save_orders(orders):
    """Write a batch of orders (one INSERT ... VALUES for all of them, say)."""
    for order in orders:
        print("saved", order.id)


class Counts:
    """What GET /health reports about the handler."""

    def __init__(self):
        self.batches = 0
        self.processed = 0
        self.invalid = 0
        self.in_progress = 0


def create_app(settings, *, save=save_orders, transport=None):
    """The app for ``settings``; ``save`` stores a batch of orders (a test
    passes its own), ``transport`` is for tests (a MemoryBroker)."""
    counts = Counts()
    service = {}

    async def handle(messages):
        orders, results = [], []
        for message in messages:
            try:
                orders.append(Order.model_validate_json(message.body))
                results.append(MessageResult.ACK)
            except ValidationError:
                results.append(MessageResult.NACK)  # bad data: never retried
        counts.in_progress = len(messages)
        try:
            # If this raises, the batch gets unhandled_exception_action (REQUEUE).
            await save(orders)
        finally:
            counts.in_progress = 0
        counts.batches += 1
        counts.processed += len(orders)
        counts.invalid += len(messages) - len(orders)
        return results

    @asynccontextmanager
    async def lifespan(app):
        # Both run in the lifespan's task: the consumer's workers are children of
        # its task group. Leaving (server shutdown) drains: the batch in the
        # handler finishes and is acked, prefetched messages go back.
        async with (
            Publisher.from_settings(settings, transport=transport) as publisher,
            batch_consumer(settings, handle, transport=transport) as consumer,
        ):
            service["publisher"], service["consumer"] = publisher, consumer
            yield
        service.clear()

    app = FastAPI(title="orders", lifespan=lifespan)
    app.state.counts = counts
    app.state.service = service

    @app.post("/orders", status_code=202)
    async def create_order(order: Order):
        await service["publisher"].publish(
            order.model_dump_json().encode(),
            routing_key=settings.queue_name,
            message_id=order.id,
            content_type="application/json",
        )
        return {"queued": order.id}

    @app.get("/health")
    async def health(response: Response):
        consumer = service.get("consumer")
        healthy = consumer is not None and consumer.is_healthy
        if not healthy:
            response.status_code = 503
        workers = consumer.health() if consumer is not None else ()
        return {
            "healthy": healthy,
            "workers": [worker.state.value for worker in workers],
            "acked": sum(worker.results.get("ack", 0) for worker in workers),
            "batches": counts.batches,
            "processed": counts.processed,
            "invalid": counts.invalid,
            "in_progress": counts.in_progress,
        }

    return app


app = create_app(
    BatchConsumerSettings(
        url=URL,
        queue_name=QUEUE,
        batch_size=100,
        batch_timeout=0.5,
        prefetch_count=200,
        connection_name="orders-service",
    )
)

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app)
