"""URL parsing, sans-IO: every bad URL is refused before a socket opens."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amqp_batch import ConnectionParameters, parse_url

SECRET = "s3cr3t-MARKER-pw"


def test_defaults_for_a_bare_host() -> None:
    params = parse_url("amqp://broker.example")
    assert (params.host, params.port, params.virtual_host) == (
        "broker.example",
        5672,
        "/",
    )
    assert (params.username, params.password, params.tls) == ("guest", "guest", False)


def test_amqps_uses_5671_and_tls() -> None:
    params = parse_url("amqps://u:p@h/")
    assert params.tls
    assert params.port == 5671


def test_percent_decoding_of_user_password_and_vhost() -> None:
    params = parse_url("amqp://us%40er:p%3Aa%2Fss@h:1234/my%2Fvhost")
    assert params.username == "us@er"
    assert params.password == "p:a/ss"
    assert params.virtual_host == "my/vhost"
    assert params.port == 1234


def test_default_vhost_written_as_percent_2f() -> None:
    assert parse_url("amqp://h/%2F").virtual_host == "/"
    assert parse_url("amqp://h/").virtual_host == "/"


def test_ipv6_host_in_brackets() -> None:
    params = parse_url("amqp://u:p@[::1]:5673/v")
    assert (params.host, params.port, params.virtual_host) == ("::1", 5673, "v")
    assert "[::1]:5673" in params.redacted_url


def test_query_options() -> None:
    params = parse_url(
        "amqp://h/?heartbeat=5&connection_timeout=2.5&name=worker-1&frame_max=8192"
    )
    assert params.heartbeat == 5
    assert params.connection_timeout == 2.5
    assert params.connection_name == "worker-1"
    assert params.frame_max == 8192


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://h/", "scheme 'http'"),
        ("amqp://", "host is empty"),
        ("amqp://u:p@/vh", "host is empty"),
        ("amqp://h:notaport/", "not a number"),
        ("amqp://h:99999/", "out of range"),
        ("amqp://[::1/", "no closing ']'"),
        ("amqp://h/?heartbeat=soon", "not a number"),
        ("amqp://h/?colour=blue", "unknown query option"),
        ("broker:5672", "expected amqp://"),
    ],
)
def test_bad_urls_raise_clear_value_errors(url: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="invalid AMQP URL") as info:
        parse_url(url)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        f"amqp://user:{SECRET}@:5672/",
        f"amqp://user:{SECRET}@h:bad/",
        f"amqp://user:{SECRET}@[::1/",
        f"http://user:{SECRET}@h/",
    ],
)
def test_password_never_in_error_text(url: str) -> None:
    with pytest.raises(ValueError, match="invalid AMQP URL") as info:
        parse_url(url)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


def test_password_never_in_repr_or_str() -> None:
    params = parse_url(f"amqp://user:{SECRET}@h/")
    assert params.password == SECRET
    for text in (repr(params), str(params), params.redacted_url):
        assert SECRET not in text
    assert "***" in params.redacted_url


_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20
)


@given(username=_text, password=_text, vhost=_text, port=st.integers(1, 65535))
def test_round_trip_of_quoted_components(
    username: str, password: str, vhost: str, port: int
) -> None:
    url = (
        f"amqp://{quote(username, safe='')}:{quote(password, safe='')}"
        f"@rabbit.local:{port}/{quote(vhost, safe='')}"
    )
    params = parse_url(url)
    assert params == ConnectionParameters(
        host="rabbit.local",
        port=port,
        virtual_host=vhost,
        username=username,
        password=password,
    )
    assert "password" not in repr(params)
