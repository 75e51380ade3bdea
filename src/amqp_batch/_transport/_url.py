"""AMQP URL parsing (sans-IO).

``amqp://user:pass@host:port/vhost?heartbeat=30&connection_timeout=10&name=x`` and
``amqps://`` follow RabbitMQ's URI spec: user, password and vhost are
percent-decoded, the default vhost is ``/`` (written ``%2F``), IPv6 hosts go in
brackets. Everything wrong is a :class:`ValueError` naming what was wrong, raised
before any socket opens, and never containing the password.
"""

from __future__ import annotations

import ssl
from urllib.parse import parse_qsl, quote, unquote

import attrs

__all__ = ["ConnectionParameters", "parse_url"]

_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
_QUERY_ALIASES = {
    "heartbeat": "heartbeat",
    "connection_timeout": "connection_timeout",
    "connect_timeout": "connection_timeout",
    "name": "connection_name",
    "connection_name": "connection_name",
    "frame_max": "frame_max",
    "channel_max": "channel_max",
}


def _redacted_context(_: ssl.SSLContext | None) -> str:
    return "<ssl.SSLContext>" if _ is not None else "None"


@attrs.frozen(kw_only=True)
class ConnectionParameters:
    """Where and how to connect. The password never appears in ``repr``."""

    host: str = "localhost"
    port: int = 5672
    virtual_host: str = "/"
    username: str = "guest"
    password: str = attrs.field(default="guest", repr=False)
    tls: bool = False
    heartbeat: int = 60
    connection_timeout: float = 10.0
    connection_name: str | None = None
    #: Largest frame we accept, bytes; 0 (the default) takes the broker's.
    #: RabbitMQ sends a message's content header in one frame whatever the
    #: negotiated size, so a smaller limit than the broker's would make a message
    #: with large headers (possible when the broker's frame_max was raised) fail
    #: the whole connection.
    frame_max: int = 0
    channel_max: int = 2047
    ssl_context: ssl.SSLContext | None = attrs.field(
        default=None, repr=_redacted_context, eq=False
    )
    verify_tls: bool = True

    @property
    def redacted_url(self) -> str:
        """The URL with the password replaced by ``***``, safe to log."""
        scheme = "amqps" if self.tls else "amqp"
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = quote(self.username, safe="")
        vhost = quote(self.virtual_host, safe="")
        return f"{scheme}://{user}:***@{host}:{self.port}/{vhost}"

    def __str__(self) -> str:
        return self.redacted_url


def _parse_authority(authority: str) -> tuple[str, str, str, int | None]:
    userinfo, _, hostport = authority.rpartition("@")
    username, password = "guest", "guest"
    if userinfo:
        user_part, has_password, password_part = userinfo.partition(":")
        username = unquote(user_part)
        password = unquote(password_part) if has_password else ""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end == -1:
            raise ValueError("invalid AMQP URL: IPv6 host has no closing ']'")
        host = hostport[1:end]
        rest = hostport[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError("invalid AMQP URL: unexpected text after the IPv6 host")
        port_text = rest[1:] if rest else ""
    else:
        if "[" in hostport or "]" in hostport:
            raise ValueError("invalid AMQP URL: unbalanced '[' or ']' in the host")
        host, _, port_text = hostport.partition(":")
    host = unquote(host)
    if not host:
        raise ValueError("invalid AMQP URL: the host is empty")
    port: int | None = None
    if port_text:
        if not port_text.isdigit():
            # Not quoted: in a URL with an unencoded ':' in the password, the
            # "port" would be a piece of the password.
            raise ValueError("invalid AMQP URL: the port is not a number")
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError(f"invalid AMQP URL: port {port} is out of range")
    return username, password, host, port


def _query_options(query: str) -> dict[str, int | float | str]:
    options: dict[str, int | float | str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        field = _QUERY_ALIASES.get(key)
        if field is None:
            raise ValueError(f"invalid AMQP URL: unknown query option {key!r}")
        if field == "connection_name":
            options[field] = value
            continue
        try:
            number = float(value) if field == "connection_timeout" else int(value)
        except ValueError:
            raise ValueError(
                f"invalid AMQP URL: {key}={value!r} is not a number"
            ) from None
        if number < 0:
            raise ValueError(f"invalid AMQP URL: {key} must not be negative")
        options[field] = number
    return options


def parse_url(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    verify_tls: bool = True,
) -> ConnectionParameters:
    """Parse an ``amqp://`` or ``amqps://`` URL into :class:`ConnectionParameters`.

    Raises :class:`ValueError` with a message that names the problem (never the
    password) for any other scheme, an empty host, a bad port, an unclosed ``[``
    or an unknown query option.
    """
    if not isinstance(url, str):
        raise TypeError(f"AMQP URL must be a str, not {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("invalid AMQP URL: expected amqp://host or amqps://host")
    scheme = scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(
            f"invalid AMQP URL: scheme {scheme!r} is not supported "
            "(use amqp:// or amqps://)"
        )
    end = min((i for i in map(rest.find, "/?#") if i != -1), default=len(rest))
    if "@" not in rest[:end] and "@" in rest[end:]:
        # An unencoded '/', '?' or '#' in the password ends the host part early;
        # say so without quoting any part of the URL (it holds the password).
        raise ValueError(
            "invalid AMQP URL: '@' after the host; percent-encode '/', '?', '#' "
            "and '@' in the user name and password (e.g. '/' as %2F)"
        )
    rest, _, _fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    username, password, host, port = _parse_authority(authority)
    virtual_host = unquote(path) if slash and path else "/"
    if slash and not path and rest.endswith("/"):
        # "amqp://host/" names the default vhost, like RabbitMQ's own clients.
        virtual_host = "/"
    if "/" in path:
        raise ValueError(
            "invalid AMQP URL: the vhost must be one path segment (write '/' as %2F)"
        )
    options = _query_options(query)
    return ConnectionParameters(
        host=host,
        port=port if port is not None else _DEFAULT_PORTS[scheme],
        virtual_host=virtual_host,
        username=username,
        password=password,
        tls=scheme == "amqps",
        ssl_context=ssl_context,
        verify_tls=verify_tls,
        **options,  # type: ignore[arg-type]
    )
