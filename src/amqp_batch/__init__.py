"""amqp-batch: a RabbitMQ batch consumer for anyio (asyncio and trio)."""

from ._bodies import Decoder as Decoder
from ._bodies import UnsupportedContentType as UnsupportedContentType
from ._bodies import json_decoder as json_decoder
from ._bodies import msgspec_decoder as msgspec_decoder
from ._bodies import pydantic_decoder as pydantic_decoder
from ._consumer import BatchConsumer as BatchConsumer
from ._consumer import Consumer as Consumer
from ._consumer import batch_consumer as batch_consumer
from ._exceptions import AMQPBatchError as AMQPBatchError
from ._exceptions import AuthenticationError as AuthenticationError
from ._exceptions import ChannelClosed as ChannelClosed
from ._exceptions import ConnectionBlockedTimeout as ConnectionBlockedTimeout
from ._exceptions import ConnectionLost as ConnectionLost
from ._exceptions import ConnectionRefused as ConnectionRefused
from ._exceptions import ConsumerCancelled as ConsumerCancelled
from ._exceptions import MessageNacked as MessageNacked
from ._exceptions import MessageReturned as MessageReturned
from ._exceptions import ProtocolError as ProtocolError
from ._exceptions import TransportError as TransportError
from ._exceptions import UnknownVirtualHost as UnknownVirtualHost
from ._exports import set_public_module
from ._hooks import BatchInfo as BatchInfo
from ._hooks import ConsumerHooks as ConsumerHooks
from ._hooks import HandledBatch as HandledBatch
from ._hooks import Settlement as Settlement
from ._hooks import SettleOutcome as SettleOutcome
from ._logging import JSONFormatter as JSONFormatter
from ._message import Message as Message
from ._publisher import Publisher as Publisher
from ._publisher import PublishTimeout as PublishTimeout
from ._results import BatchHandler as BatchHandler
from ._results import MessageResult as MessageResult
from ._retry import RETRY_COUNT_HEADER as RETRY_COUNT_HEADER
from ._settings import BatchConsumerSettings as BatchConsumerSettings
from ._settings import ConsumerSettings as ConsumerSettings
from ._transport._aiormq import AiormqTransport as AiormqTransport
from ._transport._base import Properties as Properties
from ._transport._url import ConnectionParameters as ConnectionParameters
from ._transport._url import parse_url as parse_url
from ._version import __version__ as __version__
from ._worker import WorkerHealth as WorkerHealth
from ._worker import WorkerState as WorkerState

__all__ = [
    "RETRY_COUNT_HEADER",
    "AMQPBatchError",
    "AiormqTransport",
    "AuthenticationError",
    "BatchConsumer",
    "BatchConsumerSettings",
    "BatchHandler",
    "BatchInfo",
    "ChannelClosed",
    "ConnectionBlockedTimeout",
    "ConnectionLost",
    "ConnectionParameters",
    "ConnectionRefused",
    "Consumer",
    "ConsumerCancelled",
    "ConsumerHooks",
    "ConsumerSettings",
    "Decoder",
    "HandledBatch",
    "JSONFormatter",
    "Message",
    "MessageNacked",
    "MessageResult",
    "MessageReturned",
    "Properties",
    "ProtocolError",
    "PublishTimeout",
    "Publisher",
    "SettleOutcome",
    "Settlement",
    "TransportError",
    "UnknownVirtualHost",
    "UnsupportedContentType",
    "WorkerHealth",
    "WorkerState",
    "__version__",
    "batch_consumer",
    "json_decoder",
    "msgspec_decoder",
    "parse_url",
    "pydantic_decoder",
]

set_public_module(__name__, globals(), __all__)
del set_public_module
