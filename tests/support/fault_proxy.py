"""An in-process TCP proxy that breaks connections on purpose (asyncio and trio).

``async with FaultProxy(host, port) as proxy:`` listens on ``127.0.0.1:proxy.port``
and forwards each accepted connection to ``host:port``, both directions, until told
to misbehave:

- :meth:`FaultProxy.cut` closes every open connection, both sides, with FIN (or RST
  with ``rst=True``: ``SO_LINGER`` 0 before closing);
- :meth:`FaultProxy.stall` stops forwarding in both directions (sockets stay open,
  nothing is read any more, so TCP back-pressure builds up) until
  :meth:`FaultProxy.resume`; connections accepted while stalled are stalled too;
- :meth:`FaultProxy.set_delay` holds every chunk for that long before forwarding;
- :meth:`FaultProxy.cut_after` cuts *new* connections once N bytes went through
  (by default counting broker -> client bytes only, see its docstring).

Control methods are synchronous (callable from any task of the proxy's event loop);
the sockets are closed at the next scheduling point. ``await proxy.wait_closed()``
waits until no connection is left open. Leaving the ``async with`` closes everything.
"""

from __future__ import annotations

import socket
import struct
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Literal
from urllib.parse import quote

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskGroup

__all__ = ["CutDirection", "FaultProxy"]

CutDirection = Literal["to_client", "to_server", "total"]
_CHUNK = 65536


class _Link:
    """One proxied connection: its cancel scope and the faults it is subject to."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.scope = anyio.CancelScope()
        self.rst = False
        self.cut_after: int | None = None
        self.cut_direction: CutDirection = "to_client"
        self.cut_rst = False
        self.counted = 0

    def cut(self, rst: bool) -> None:
        """Close both sides: cancel the pumps; the handler then closes the streams."""
        self.rst = self.rst or rst
        self.scope.cancel()


class FaultProxy:
    """A TCP proxy on ``127.0.0.1`` that can cut, stall, slow down and truncate."""

    def __init__(
        self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1"
    ) -> None:
        """Prepare a proxy to ``target_host:target_port``; ``async with`` starts it."""
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.port = 0
        #: Connections accepted from clients so far.
        self.connections_accepted = 0
        #: Accepted connections whose upstream connect failed (closed at once).
        self.connect_failures = 0
        #: Bytes forwarded client -> target and target -> client, over all links.
        self.bytes_to_server = 0
        self.bytes_to_client = 0
        self._delay = 0.0
        self._gate: anyio.Event | None = None
        self._cut_after: int | None = None
        self._cut_direction: CutDirection = "to_client"
        self._cut_rst = False
        self._cut_remaining_connections: int | None = None
        self._links: set[_Link] = set()
        self._changed = anyio.Event()
        self._exit_stack: AsyncExitStack | None = None
        self._task_group: TaskGroup | None = None

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> FaultProxy:
        """Listen on a free port and start accepting connections."""
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            listener = await anyio.create_tcp_listener(
                local_host=self.listen_host, local_port=0
            )
            await stack.enter_async_context(listener)
            self.port = listener.extra(SocketAttribute.local_port)
            self._task_group = await stack.enter_async_context(
                anyio.create_task_group()
            )
            self._task_group.start_soon(listener.serve, self._serve, self._task_group)
        except BaseException as exc:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._exit_stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Close every connection and the listener."""
        assert self._exit_stack is not None and self._task_group is not None
        self._task_group.cancel_scope.cancel()
        if self._gate is not None:
            self._gate.set()
        stack, self._exit_stack = self._exit_stack, None
        return await stack.__aexit__(exc_type, exc, tb)

    # ----------------------------------------------------------------- facts

    @property
    def connections_open(self) -> int:
        """Connections currently being proxied."""
        return len(self._links)

    def url_for(
        self,
        user: str = "guest",
        password: str = "guest",
        vhost: str = "/",
        scheme: str = "amqp",
    ) -> str:
        """An AMQP URL through the proxy (vhost ``/`` gives a trailing ``/``)."""
        path = "" if vhost == "/" else quote(vhost, safe="")
        credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"{scheme}://{credentials}@127.0.0.1:{self.port}/{path}"

    # ----------------------------------------------------------------- faults

    def cut(self, rst: bool = False) -> int:
        """Close every open connection, both sides; return how many.

        ``rst=False`` closes with FIN (the client reads EOF); ``rst=True`` sets
        ``SO_LINGER`` 0 first, so the client sees a connection reset. New
        connections are still accepted afterwards.
        """
        links = list(self._links)
        for link in links:
            link.cut(rst)
        return len(links)

    def stall(self) -> None:
        """Stop forwarding in both directions, without closing anything."""
        if self._gate is None:
            self._gate = anyio.Event()

    def resume(self) -> None:
        """Forward again after :meth:`stall` (held chunks go through first)."""
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    def set_delay(self, seconds: float) -> None:
        """Hold each chunk ``seconds`` before forwarding it (0 = no delay).

        The delay is per chunk and per direction, so it also caps throughput.
        """
        self._delay = max(0.0, float(seconds))

    def cut_after(
        self,
        n_bytes: int | None,
        *,
        direction: CutDirection = "to_client",
        rst: bool = False,
        connections: int | None = None,
    ) -> None:
        """Cut each connection accepted from now on after ``n_bytes`` went through.

        Bytes are counted per connection, broker -> client by default
        (``direction="to_client"``: the client receives exactly ``n_bytes``, then
        EOF or a reset); ``"to_server"`` counts client -> broker bytes and
        ``"total"`` both directions together. ``connections`` limits the fault to
        that many new connections (None = every one); ``n_bytes=None`` turns it off.
        Connections already open are not affected.
        """
        if n_bytes is not None and n_bytes < 0:
            raise ValueError("n_bytes must be >= 0")
        self._cut_after = n_bytes
        self._cut_direction = direction
        self._cut_rst = rst
        self._cut_remaining_connections = connections

    async def wait_connections(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least ``count`` connections have been accepted in total."""
        with anyio.fail_after(timeout):
            while self.connections_accepted < count:
                await self._changed.wait()

    async def wait_closed(self, timeout: float = 10.0) -> None:
        """Wait until no proxied connection is open."""
        with anyio.fail_after(timeout):
            while self._links:
                await self._changed.wait()

    # ----------------------------------------------------------------- internals

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _new_link(self, number: int) -> _Link:
        link = _Link(number)
        if self._cut_after is not None and self._cut_remaining_connections != 0:
            link.cut_after = self._cut_after
            link.cut_direction = self._cut_direction
            link.cut_rst = self._cut_rst
            if self._cut_remaining_connections is not None:
                self._cut_remaining_connections -= 1
        return link

    async def _serve(self, client: SocketStream) -> None:
        """Proxy one accepted connection until either side ends or it is cut."""
        self.connections_accepted += 1
        link = self._new_link(self.connections_accepted)
        self._links.add(link)
        self._notify()
        try:
            async with client:
                with link.scope:
                    await self._forward(link, client)
                if link.rst:
                    _set_linger_zero(client)
        finally:
            self._links.discard(link)
            self._notify()

    async def _forward(self, link: _Link, client: SocketStream) -> None:
        """Connect upstream and run both pumps (inside the link's cancel scope)."""
        try:
            upstream = await anyio.connect_tcp(self.target_host, self.target_port)
        except OSError:
            self.connect_failures += 1
            return
        async with upstream:
            try:
                if link.cut_after == 0:
                    link.cut(link.cut_rst)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pump, link, client, upstream, True)
                    tg.start_soon(self._pump, link, upstream, client, False)
            finally:
                if link.rst:
                    _set_linger_zero(upstream)

    async def _pump(
        self, link: _Link, source: SocketStream, sink: SocketStream, to_server: bool
    ) -> None:
        """Copy one direction; half-close on EOF, end the link on errors or limits."""
        counts = link.cut_after is not None and link.cut_direction in (
            "total",
            "to_server" if to_server else "to_client",
        )
        try:
            while True:
                await self._wait_gate()
                try:
                    data = await source.receive(_CHUNK)
                except anyio.EndOfStream:
                    await sink.send_eof()
                    return
                if self._delay:
                    await anyio.sleep(self._delay)
                await self._wait_gate()
                if counts:
                    assert link.cut_after is not None
                    data = data[: link.cut_after - link.counted]
                    link.counted += len(data)
                if data:
                    await sink.send(data)
                    if to_server:
                        self.bytes_to_server += len(data)
                    else:
                        self.bytes_to_client += len(data)
                if counts and link.counted >= (link.cut_after or 0):
                    link.cut(link.cut_rst)
                    return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            # A peer reset or closed its side: take the whole link down.
            link.scope.cancel()

    async def _wait_gate(self) -> None:
        while self._gate is not None:
            await self._gate.wait()


def _set_linger_zero(stream: SocketStream) -> None:
    """Make the next close of ``stream`` send RST instead of FIN."""
    try:
        raw = stream.extra(SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, anyio.TypedAttributeLookupError):
        pass
