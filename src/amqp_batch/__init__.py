"""amqp-batch: a RabbitMQ batch consumer for anyio (asyncio and trio)."""

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
from ._transport._base import Properties as Properties
from ._transport._url import ConnectionParameters as ConnectionParameters
from ._transport._url import parse_url as parse_url
from ._version import __version__ as __version__
