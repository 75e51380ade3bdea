"""Who may connect to a memory broker, and whether its publishes must wait."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import anyio

from ..._exceptions import AuthenticationError, ConnectionRefused, UnknownVirtualHost
from .._url import ConnectionParameters

__all__ = ["Gate"]


class Gate:
    """Credential and vhost checks, refused connections and blocked publishers
    (as under a RabbitMQ memory alarm)."""

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        virtual_hosts: Collection[str] | None = None,
    ) -> None:
        self._users = dict(users) if users is not None else None
        self._virtual_hosts = set(virtual_hosts) if virtual_hosts is not None else None
        self._unblocked: anyio.Event | None = None
        #: While True, every new connection fails with ``ConnectionRefused``.
        self.refuse_connections = False
        #: While True, publishes wait (``connection.blocked``).
        self.blocked = False

    def check(self, parameters: ConnectionParameters) -> None:
        """Raise what RabbitMQ's connection handshake would for ``parameters``."""
        if self.refuse_connections:
            raise ConnectionRefused(
                f"cannot connect to {parameters.redacted_url}: the memory broker "
                "refuses connections"
            )
        user, vhost = parameters.username, parameters.virtual_host
        if self._users is not None and self._users.get(user) != parameters.password:
            raise AuthenticationError(
                f"the broker refused the credentials of user {user!r} on vhost "
                f"{vhost!r} (403 ACCESS_REFUSED)",
                reply_code=403,
                reply_text="ACCESS_REFUSED - Login was refused",
            )
        if self._virtual_hosts is not None and vhost not in self._virtual_hosts:
            raise UnknownVirtualHost(
                f"the broker closed the connection: 530 NOT_ALLOWED - vhost {vhost!r} "
                "not found",
                reply_code=530,
                reply_text=f"NOT_ALLOWED - vhost {vhost} not found",
            )

    def unblock(self) -> None:
        """Let waiting and new publishes through again."""
        self.blocked = False
        event, self._unblocked = self._unblocked, None
        if event is not None:
            event.set()

    async def wait_unblocked(self) -> None:
        """Return once publishers are not blocked."""
        while self.blocked:
            if self._unblocked is None:
                self._unblocked = anyio.Event()
            await self._unblocked.wait()
