"""The image's sample handler (``amqp-batch run handlers:handle``): replace this
directory with your own code."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

from amqp_batch import Message, MessageResult

logger = logging.getLogger("handlers")


async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
    """Log the size of each batch and acknowledge every message."""
    logger.info("batch of %d messages", len(messages))
    for _ in messages:
        yield MessageResult.ACK
