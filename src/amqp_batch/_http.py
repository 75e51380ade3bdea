"""A small HTTP/1.1 server for probes and metrics, on anyio (asyncio or trio).

``GET /metrics`` (Prometheus text exposition), ``GET /healthz`` (liveness: the
event loop answers and a watchdog task ran recently) and ``GET /readyz``
(readiness: every worker is consuming). Requests are parsed by h11 (sans-IO, so
no threads and no framework): a bad, huge or slow request is answered or dropped
in its own task and never touches consuming.

One request per connection (``Connection: close``): probes and scrapers open a
connection per request anyway, and it keeps the server stateless.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio import TASK_STATUS_IGNORED, current_time
from anyio.abc import SocketStream, TaskStatus

from ._exceptions import AMQPBatchError

if TYPE_CHECKING:
    import h11

    from ._worker import WorkerHealth

__all__ = ["HTTPServerError", "ProbeServer", "serve_http"]

logger = logging.getLogger("amqp_batch.http")

#: Largest request line plus headers, in bytes.
MAX_REQUEST_BYTES = 8192
#: Seconds a client has to send its whole request (then it is dropped).
READ_TIMEOUT = 5.0
#: Seconds a response may take to be written to a slow reader.
WRITE_TIMEOUT = 10.0
#: Connections served at once; more are answered 503 and closed.
MAX_CONNECTIONS = 32
#: How often the liveness watchdog ticks, and how stale its tick may get.
WATCHDOG_INTERVAL = 1.0
LIVENESS_TIMEOUT = 10.0

_PATHS = ("/metrics", "/healthz", "/readyz")


class HTTPServerError(AMQPBatchError):
    """The probe and metrics server could not start (e.g. its port is taken)."""


class HealthSource(Protocol):
    """What the server needs of a consumer: its workers' health."""

    def health(self) -> Sequence[WorkerHealth]:
        """One snapshot per worker."""
        ...


def _require_h11() -> Any:
    try:
        import h11
    except ImportError:  # pragma: no cover - depends on the environment
        raise HTTPServerError(
            "the HTTP server needs h11: pip install 'amqp-batch[prometheus]'"
        ) from None
    return h11


class ProbeServer:
    """The state behind the three paths; :meth:`handle` serves one connection
    (each in its own task)."""

    def __init__(
        self,
        consumer: HealthSource,
        registry: Any = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout: float = READ_TIMEOUT,
        liveness_timeout: float = LIVENESS_TIMEOUT,
        watchdog_interval: float = WATCHDOG_INTERVAL,
    ) -> None:
        self._h11 = _require_h11()
        self._consumer = consumer
        self._registry = registry
        self._max_connections = max_connections
        self._read_timeout = read_timeout
        self._liveness_timeout = liveness_timeout
        self._connections = 0
        self._watchdog_interval = watchdog_interval
        self._last_tick = current_time()
        self._lag = 0.0
        #: Requests answered, by status code (for tests and debugging).
        self.responses: dict[int, int] = {}

    # -- the watchdog -----------------------------------------------------------

    async def watchdog(self) -> None:
        """Tick forever, measuring how late each tick wakes up; ``/healthz``
        fails while the last tick is older, or woke later, than
        ``liveness_timeout`` (something blocks the event loop)."""
        while True:
            scheduled = current_time() + self._watchdog_interval
            await anyio.sleep(self._watchdog_interval)
            self._last_tick = current_time()
            self._lag = max(0.0, self._last_tick - scheduled)

    # -- one connection -----------------------------------------------------------

    async def handle(self, stream: SocketStream) -> None:
        """Serve one request on ``stream``, then close it."""
        async with stream:
            if self._connections >= self._max_connections:
                await self._send_plain(stream, 503, b"too many connections\n")
                return
            self._connections += 1
            try:
                await self._serve_one(stream)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the client went away: nothing to answer
            finally:
                self._connections -= 1

    async def _serve_one(self, stream: SocketStream) -> None:
        h11 = self._h11
        connection = h11.Connection(
            h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES
        )
        request: Any = None
        with anyio.move_on_after(self._read_timeout):
            request = await self._read_request(stream, connection)
        if request is None:
            logger.debug("dropped a client that sent no request in time")
            return
        if isinstance(request, int):
            await self._send_plain(stream, request, _ERROR_BODIES[request])
            return
        method = request.method.decode("ascii", "replace")
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        status, content_type, body = self.respond(method, path)
        body_out = b"" if method == "HEAD" else body
        await self._send(
            stream,
            connection,
            status,
            body_out,
            content_type=content_type,
            length=len(body),
            allow=status == 405,
        )

    async def _read_request(
        self, stream: SocketStream, connection: h11.Connection
    ) -> Any:
        """The request event, or an error status (400, 414, 431) as an int."""
        h11 = self._h11
        head = bytearray()
        while True:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as exc:
                return _error_status(exc.error_status_hint, head)
            if isinstance(event, h11.Request):
                return _oversized(event) or event
            if isinstance(event, h11.ConnectionClosed):
                return None
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive(4096)
                except anyio.EndOfStream:
                    data = b""
                if len(head) <= MAX_REQUEST_BYTES:
                    head += data
                connection.receive_data(data)
            else:
                return 400

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body for ``method path``."""
        if path not in _PATHS:
            return 404, "text/plain; charset=utf-8", b"not found\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"method not allowed\n"
        if path == "/metrics":
            return self._metrics()
        if path == "/healthz":
            return self._liveness()
        return self._readiness()

    def _metrics(self) -> tuple[int, str, bytes]:
        try:
            from prometheus_client import (
                CONTENT_TYPE_LATEST,
                REGISTRY,
                generate_latest,
            )
        except ImportError:
            return (
                404,
                "text/plain; charset=utf-8",
                b"no metrics: pip install 'amqp-batch[prometheus]'\n",
            )
        registry = REGISTRY if self._registry is None else self._registry
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)

    def _liveness(self) -> tuple[int, str, bytes]:
        age = current_time() - self._last_tick - self._watchdog_interval
        late = max(age, self._lag)
        alive = late <= self._liveness_timeout
        body = {"alive": alive, "event_loop_lag_seconds": round(max(late, 0.0), 3)}
        return (200 if alive else 503), "application/json", _json(body)

    def _readiness(self) -> tuple[int, str, bytes]:
        healths = list(self._consumer.health())
        waiting = [h for h in healths if h.state.value != "consuming"]
        ready = bool(healths) and not waiting
        body: dict[str, Any] = {
            "ready": ready,
            "workers": len(healths),
            "not_consuming": [
                {
                    "worker": h.index,
                    "state": h.state.value,
                    "last_error": h.last_error,
                    "reconnect_count": h.reconnect_count,
                }
                for h in waiting
            ],
        }
        return (200 if ready else 503), "application/json", _json(body)

    # -- writing -----------------------------------------------------------------

    async def _send(
        self,
        stream: SocketStream,
        connection: h11.Connection,
        status: int,
        body: bytes,
        *,
        content_type: str = "text/plain; charset=utf-8",
        length: int | None = None,
        allow: bool = False,
    ) -> None:
        h11 = self._h11
        headers = [
            ("content-type", content_type),
            ("content-length", str(len(body) if length is None else length)),
            ("connection", "close"),
        ]
        if allow:
            headers.append(("allow", "GET, HEAD"))
        data = connection.send(h11.Response(status_code=status, headers=headers))
        data += connection.send(h11.Data(data=body)) if body else b""
        data += connection.send(h11.EndOfMessage())
        self._count(status)
        with anyio.move_on_after(WRITE_TIMEOUT):
            await stream.send(data)

    async def _send_plain(self, stream: SocketStream, status: int, body: bytes) -> None:
        """A response written without h11 (after a parse error h11 will not)."""
        reason = {400: "Bad Request", 414: "URI Too Long", 503: "Service Unavailable"}
        phrase = reason.get(status, "Request Header Fields Too Large")
        head = (
            f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8"
            f"\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self._count(status)
        with (
            anyio.move_on_after(WRITE_TIMEOUT),
            suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError),
        ):
            await stream.send(head.encode("ascii") + body)

    def _count(self, status: int) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1


_ERROR_BODIES = {
    400: b"bad request\n",
    414: b"request line too long\n",
    431: b"request headers too long\n",
}


def _error_status(hint: int, head: bytes | bytearray) -> int:
    """400, or 414 when the request line alone passed the size cap, 431 when the
    headers did."""
    if hint != 431:
        return 400
    return 414 if b"\n" not in head[:MAX_REQUEST_BYTES] else 431


def _oversized(request: Any) -> int | None:
    """414 or 431 for a request that arrived whole but passes the size cap
    (h11 caps only what it is still waiting for)."""
    line = len(request.method) + len(request.target) + 11
    if line > MAX_REQUEST_BYTES:
        return 414
    headers = sum(len(name) + len(value) + 4 for name, value in request.headers)
    return 431 if line + headers > MAX_REQUEST_BYTES else None


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


async def serve_http(
    consumer: HealthSource,
    host: str = "127.0.0.1",
    port: int = 9464,
    registry: Any = None,
    *,
    max_connections: int = MAX_CONNECTIONS,
    read_timeout: float = READ_TIMEOUT,
    liveness_timeout: float = LIVENESS_TIMEOUT,
    watchdog_interval: float = WATCHDOG_INTERVAL,
    task_status: TaskStatus[int] = TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` for ``consumer`` until
    cancelled.

    Use it with ``port = await task_group.start(serve_http, consumer, host,
    port, registry)``: the port it listens on (useful with ``port=0``) is given
    to ``task_status`` once it listens. ``registry`` is the Prometheus
    ``CollectorRegistry`` to expose (default: prometheus_client's global one).
    Binds 127.0.0.1 unless told otherwise. Raises :class:`HTTPServerError` at
    once if it cannot listen (the port is taken, the host is not local).
    """
    server = ProbeServer(
        consumer,
        registry,
        max_connections=max_connections,
        read_timeout=read_timeout,
        liveness_timeout=liveness_timeout,
        watchdog_interval=watchdog_interval,
    )
    try:
        listener = await anyio.create_tcp_listener(
            local_host=host, local_port=port, reuse_port=False
        )
    except OSError as exc:
        raise HTTPServerError(
            f"cannot listen on {host}:{port} for /metrics and probes: "
            f"{exc.strerror or exc}"
        ) from None
    async with listener, anyio.create_task_group() as group:
        group.start_soon(server.watchdog)
        bound = listener.listeners[0].extra(anyio.abc.SocketAttribute.local_port)
        logger.info(
            "serving /metrics, /healthz and /readyz on http://%s:%d",
            host,
            bound,
            extra={"http_host": host, "http_port": bound},
        )
        task_status.started(bound)
        await listener.serve(server.handle, group)
