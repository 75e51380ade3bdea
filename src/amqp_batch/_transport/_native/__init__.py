"""The native transport: AMQP 0-9-1 on anyio byte streams, frames by pamqp."""

from ._channel import Channel as Channel
from ._channel import QueueInfo as QueueInfo
from ._connection import Connection as Connection
from ._connection import connect as connect
from ._network import NetworkBackend as NetworkBackend
from ._network import TCPNetwork as TCPNetwork
from ._session import NativePublisher as NativePublisher
from ._session import NativeSession as NativeSession
from ._session import NativeTransport as NativeTransport
from ._session import declare as declare
from ._session import open_publisher as open_publisher
from ._session import open_session as open_session

__all__ = [
    "Channel",
    "Connection",
    "NativePublisher",
    "NativeSession",
    "NativeTransport",
    "NetworkBackend",
    "QueueInfo",
    "TCPNetwork",
    "connect",
    "declare",
    "open_publisher",
    "open_session",
]
