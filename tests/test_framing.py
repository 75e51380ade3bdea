"""Frame cutting and content reassembly, sans-IO (no socket)."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands, frame, header
from pamqp.body import ContentBody
from pamqp.heartbeat import Heartbeat

from amqp_batch import ProtocolError
from amqp_batch._transport._base import Delivery, Properties
from amqp_batch._transport._native._framing import (
    ContentHeaderFrame,
    FrameParser,
    PendingContent,
    encode_ack,
    encode_nack,
    encode_publish,
    encode_reject,
)
from pamqp_reference import marshal_publish, properties_from_pamqp, properties_to_pamqp


def _delivery_bytes(tag: int, body: bytes, frame_max: int = 4096) -> bytes:
    """A basic.deliver as the broker sends it, body cut at ``frame_max``."""
    data = marshal_publish(
        1,
        body,
        "ex",
        "rk",
        commands.Basic.Properties(message_id=str(tag)),
        False,
        frame_max,
    )
    # marshal_publish starts with basic.publish; swap it for basic.deliver.
    publish = frame.marshal(commands.Basic.Publish(exchange="ex", routing_key="rk"), 1)
    deliver = frame.marshal(commands.Basic.Deliver("ctag", tag, False, "ex", "rk"), 1)
    return deliver + data[len(publish) :]


def _reassemble(frames: list[tuple[int, object]]) -> list[tuple[int, bytes]]:
    messages: list[tuple[int, bytes]] = []
    pending: PendingContent | None = None
    for _, value in frames:
        done = None
        if isinstance(value, Delivery):  # the parser's whole-message fast path
            assert pending is None
            messages.append((value.delivery_tag, value.body))
        elif isinstance(value, commands.Basic.Deliver):
            pending = PendingContent(value)
        elif isinstance(value, ContentHeaderFrame):
            assert pending is not None
            done = pending.add_header(value)
        elif isinstance(value, ContentBody):
            assert pending is not None
            done = pending.add_body(value)
        if done is not None:
            assert isinstance(done.method, commands.Basic.Deliver)
            messages.append((done.method.delivery_tag, done.body))
            pending = None
    return messages


@given(
    bodies=st.lists(st.binary(max_size=20_000), min_size=1, max_size=5),
    cuts=st.lists(st.integers(1, 5000), max_size=30),
)
def test_any_split_of_the_stream_yields_the_same_messages(
    bodies: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(_delivery_bytes(i + 1, b) for i, b in enumerate(bodies))
    stream += Heartbeat.marshal()
    parser = FrameParser()
    frames = []
    position = 0
    for cut in cuts:
        frames.extend(parser.feed(stream[position : position + cut]))
        position += cut
    frames.extend(parser.feed(stream[position:]))
    assert parser.buffered == 0
    assert isinstance(frames[-1][1], Heartbeat)
    assert _reassemble(frames) == [(i + 1, b) for i, b in enumerate(bodies)]


def test_one_mebibyte_body_across_many_frames() -> None:
    body = bytes(range(256)) * 4096
    frames = FrameParser().feed(_delivery_bytes(7, body, frame_max=4096))
    bodies = [f for _, f in frames if isinstance(f, ContentBody)]
    assert len(bodies) == -(-len(body) // (4096 - 8))
    assert _reassemble(frames) == [(7, body)]


def test_publish_body_frames_respect_frame_max() -> None:
    data = marshal_publish(
        3, b"a" * 10_000, "", "q", commands.Basic.Properties(), False, 4096
    )
    frames = FrameParser().feed(data)
    sizes = [len(f.value) for _, f in frames if isinstance(f, ContentBody)]
    assert sizes == [4088, 4088, 1824]
    assert {channel for channel, _ in frames} == {3}


def test_empty_body_completes_at_the_header() -> None:
    frames = FrameParser().feed(_delivery_bytes(1, b""))
    assert _reassemble(frames) == [(1, b"")]


def test_missing_frame_end_is_a_protocol_error() -> None:
    raw = bytearray(frame.marshal(commands.Basic.Qos(prefetch_count=1), 1))
    raw[-1] = 0
    with pytest.raises(ProtocolError, match="frame-end"):
        FrameParser().feed(bytes(raw) + b"\x00")


def test_non_amqp_bytes_are_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="unknown frame type"):
        FrameParser().feed(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def test_protocol_header_answer_is_reported() -> None:
    with pytest.raises(ProtocolError, match="protocol version"):
        FrameParser().feed(b"AMQP\x00\x00\x09\x01")


def test_oversized_frame_is_refused() -> None:
    data = marshal_publish(
        1, b"z" * 9000, "", "q", commands.Basic.Properties(), False, 10_000
    )
    with pytest.raises(ProtocolError, match="frame_max"):
        FrameParser(max_frame_size=4096).feed(data)


def test_body_longer_than_announced_is_refused() -> None:
    pending = PendingContent(commands.Basic.Deliver("c", 1, False, "", "q"))
    pending.add_header(ContentHeaderFrame(3, Properties()))
    with pytest.raises(ProtocolError, match="more bytes"):
        pending.add_body(ContentBody(b"abcd"))


def test_properties_round_trip() -> None:
    stamp = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    ours = Properties(
        content_type="application/json",
        content_encoding="utf-8",
        headers={"x-retry-count": 2, "nested": {"a": [1, "b"]}},
        delivery_mode=2,
        priority=5,
        correlation_id="corr",
        reply_to="replies",
        expiration="60000",
        message_id="m-1",
        timestamp=stamp,
        type="order.created",
        user_id="guest",
        app_id="tests",
    )
    back = _decode_via_parser(properties_to_pamqp(ours))
    assert back.headers == ours.headers
    assert back.timestamp is not None
    assert back.timestamp.replace(tzinfo=datetime.timezone.utc) == stamp
    assert attrs_without(back, "headers", "timestamp") == attrs_without(
        ours, "headers", "timestamp"
    )


def _decode_via_parser(props: commands.Basic.Properties) -> Properties:
    """Marshal a content header with pamqp and decode it with our parser."""
    frames = FrameParser().feed(frame.marshal(header.ContentHeader(0, 5, props), 1))
    assert len(frames) == 1
    decoded = frames[0][1]
    assert isinstance(decoded, ContentHeaderFrame)
    assert decoded.body_size == 5
    return decoded.properties


_short = st.text(max_size=20)
_our_properties = st.builds(
    Properties,
    content_type=st.none() | _short,
    content_encoding=st.none() | _short,
    headers=st.none()
    | st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.integers(-(2**31), 2**31 - 1)
        | st.text(max_size=10)
        | st.booleans()
        | st.binary(max_size=5),
        max_size=4,
    ),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(0, 9),
    correlation_id=st.none() | _short,
    reply_to=st.none() | _short,
    expiration=st.none() | st.integers(0, 10**6).map(str),
    message_id=st.none() | _short,
    timestamp=st.none()
    | st.integers(0, 2**32 - 1).map(
        lambda s: datetime.datetime.fromtimestamp(s, tz=datetime.timezone.utc)
    ),
    type=st.none() | _short,
    user_id=st.none() | _short,
    app_id=st.none() | _short,
)
#: The same, as pamqp objects (for its encoder and generic decoder).
_pamqp_properties = _our_properties.map(properties_to_pamqp)


@given(_pamqp_properties)
def test_fast_header_decoder_agrees_with_pamqp(
    props: commands.Basic.Properties,
) -> None:
    """Our content-header decoder gives what pamqp's generic one gives."""
    encoded = props.marshal()
    reference = commands.Basic.Properties()
    reference.unmarshal(int.from_bytes(encoded[:2], "big"), encoded[2:])
    assert _decode_via_parser(props) == properties_from_pamqp(reference)


@given(
    consumer_tag=st.text(max_size=30),
    tag=st.integers(1, 2**63 - 1),
    redelivered=st.booleans(),
    exchange=st.from_regex(r"[A-Za-z0-9_.:\-]{0,30}", fullmatch=True),
    routing_key=st.text(max_size=30),
)
def test_fast_deliver_decoder_agrees_with_pamqp(
    consumer_tag: str, tag: int, redelivered: bool, exchange: str, routing_key: str
) -> None:
    method = commands.Basic.Deliver(
        consumer_tag, tag, redelivered, exchange, routing_key
    )
    ((channel, decoded),) = FrameParser().feed(frame.marshal(method, 9))
    assert channel == 9
    assert isinstance(decoded, commands.Basic.Deliver)
    assert (
        decoded.consumer_tag,
        decoded.delivery_tag,
        decoded.redelivered,
        decoded.exchange,
        decoded.routing_key,
    ) == (consumer_tag, tag, redelivered, exchange, routing_key)


def test_text_that_is_not_utf8_does_not_fail_the_connection() -> None:
    """RabbitMQ passes shortstr bytes through unchecked: one message with a
    non-UTF-8 message id must not kill the connection (it decodes with U+FFFD)."""
    raw = commands.Basic.Properties(message_id="ab").marshal()
    raw = raw.replace(b"\x02ab", b"\x02\xffb")
    payload = b"\x00\x3c\x00\x00" + (3).to_bytes(8, "big") + raw
    data = b"\x02\x00\x01" + len(payload).to_bytes(4, "big") + payload + b"\xce"
    ((_, decoded),) = FrameParser().feed(data)
    assert isinstance(decoded, ContentHeaderFrame)
    assert decoded.properties.message_id == "\ufffdb"


@pytest.mark.parametrize("cut", [1, 5, 12, 15])
def test_truncated_header_and_deliver_are_protocol_errors(cut: int) -> None:
    props = commands.Basic.Properties(message_id="abc", content_type="x/y")
    good_header = frame.marshal(header.ContentHeader(0, 1, props), 1)
    deliver = frame.marshal(commands.Basic.Deliver("ctag", 1, False, "ex", "rk"), 1)
    for good in (good_header, deliver):
        payload = good[7:-1][:-cut]
        bad = good[:3] + len(payload).to_bytes(4, "big") + payload + b"\xce"
        with pytest.raises(ProtocolError, match="malformed"):
            FrameParser().feed(bad)


def attrs_without(props: Properties, *names: str) -> dict[str, object]:
    """The properties as a dict, minus ``names``."""
    return {
        name: getattr(props, name)
        for name in Properties.__slots__
        if name not in names and not name.startswith("__")
    }


def test_invalid_properties_name_the_problem() -> None:
    with pytest.raises(ValueError, match="invalid message properties"):
        encode_publish(1, b"", "", "q", Properties(delivery_mode=7), False, 4096)


def test_headers_that_decoded_to_bytes_can_be_published_again() -> None:
    """A long string that is not UTF-8 decodes to bytes; republishing such a
    message must not fail, and must keep the bytes."""
    incoming = Properties(headers={"raw": b"\xff\xfe", "nested": {"x": [b"\x80"]}})
    data = encode_publish(1, b"", "", "q", incoming, False, 4096)
    [(_, _), (_, content_header)] = FrameParser().feed(data)
    assert isinstance(content_header, ContentHeaderFrame)
    decoded = content_header.properties
    assert decoded.headers is not None
    assert bytes(decoded.headers["raw"]) == b"\xff\xfe"
    assert bytes(decoded.headers["nested"]["x"][0]) == b"\x80"


def test_publish_refuses_properties_that_do_not_fit_in_one_frame() -> None:
    """The broker closes the connection (501) on a frame past frame_max, so such
    a publish is refused before anything is queued, naming the limit."""
    props = Properties(headers={"pad": "x" * 5000})
    with pytest.raises(ValueError, match=r"frame_max \(4096\)"):
        encode_publish(1, b"body", "", "q", props, False, 4096)


def test_content_headers_past_frame_max_are_accepted() -> None:
    """RabbitMQ sends a dead-lettered message's content header even when its
    x-death headers pushed it past frame_max: it is parsed, not refused."""
    props = commands.Basic.Properties(message_id="m", headers={"pad": "x" * 5000})
    data = frame.marshal(header.ContentHeader(0, 1, props), 1)
    ((_, decoded),) = FrameParser(max_frame_size=4096).feed(data)
    assert isinstance(decoded, ContentHeaderFrame)
    assert decoded.properties.headers == {"pad": "x" * 5000}


@given(
    props=st.none() | _our_properties,
    body=st.binary(max_size=9000),
    routing_key=st.text(max_size=40),
    mandatory=st.booleans(),
)
def test_fast_publish_encoder_gives_pamqps_bytes(
    props: Properties | None, body: bytes, routing_key: str, mandatory: bool
) -> None:
    """The hot-path publish encoder is byte for byte what pamqp produces."""
    ours = encode_publish(7, body, "ex.1", routing_key, props, mandatory, 4096)
    theirs = marshal_publish(
        7, body, "ex.1", routing_key, properties_to_pamqp(props), mandatory, 4096
    )
    assert ours == theirs


def test_fast_publish_encoder_refuses_what_pamqp_refuses() -> None:
    with pytest.raises(ValueError, match="exchange"):
        encode_publish(1, b"", "bad exchange!", "q", None, False, 4096)
    with pytest.raises(TypeError):
        encode_publish(1, b"", "", "q", Properties(headers={"x": {1, 2}}), False, 4096)


@given(
    channel=st.integers(1, 65535),
    tag=st.integers(1, 2**63 - 1),
    multiple=st.booleans(),
    requeue=st.booleans(),
)
def test_settlement_frames_are_pamqps_bytes(
    channel: int, tag: int, multiple: bool, requeue: bool
) -> None:
    """basic.ack / nack / reject, encoded by hand, are byte for byte pamqp's."""
    assert encode_ack(channel, tag, multiple) == frame.marshal(
        commands.Basic.Ack(tag, multiple), channel
    )
    assert encode_nack(channel, tag, multiple, requeue) == frame.marshal(
        commands.Basic.Nack(tag, multiple, requeue), channel
    )
    assert encode_reject(channel, tag, requeue) == frame.marshal(
        commands.Basic.Reject(tag, requeue), channel
    )


def _deliveries_frame_by_frame(data: bytes) -> list[tuple[int, Delivery]]:
    """Feed ``data`` one byte at a time (no whole message is ever buffered) and
    build each Delivery from its method, header and body frames."""
    parser = FrameParser()
    frames = [f for i in range(len(data)) for f in parser.feed(data[i : i + 1])]
    assert not any(isinstance(value, Delivery) for _, value in frames)
    out: list[tuple[int, Delivery]] = []
    pending: PendingContent | None = None
    for channel, value in frames:
        done = None
        if isinstance(value, commands.Basic.Deliver):
            pending = PendingContent(value)
        elif isinstance(value, ContentHeaderFrame):
            assert pending is not None
            done = pending.add_header(value)
        else:
            assert pending is not None and isinstance(value, ContentBody)
            done = pending.add_body(value)
        if done is not None:
            method = done.method
            assert isinstance(method, commands.Basic.Deliver)
            out.append(
                (
                    channel,
                    Delivery(
                        delivery_tag=method.delivery_tag,
                        redelivered=method.redelivered,
                        exchange=method.exchange,
                        routing_key=method.routing_key,
                        consumer_tag=method.consumer_tag,
                        body=done.body,
                        properties=done.properties,
                    ),
                )
            )
            pending = None
    return out


@given(
    props=_pamqp_properties,
    body=st.binary(max_size=300),
    tag=st.integers(1, 2**63 - 1),
    redelivered=st.booleans(),
    routing_key=st.text(max_size=20),
    channel=st.integers(1, 65535),
)
def test_whole_delivery_fast_path_gives_the_frame_by_frame_delivery(
    props: commands.Basic.Properties,
    body: bytes,
    tag: int,
    redelivered: bool,
    routing_key: str,
    channel: int,
) -> None:
    """A message whose frames arrive together is one Delivery, equal to the one
    built from its frames received one by one."""
    publish = frame.marshal(commands.Basic.Publish(exchange="ex", routing_key=""), 1)
    content = marshal_publish(channel, body, "ex", "", props, False, 4096)
    deliver = frame.marshal(
        commands.Basic.Deliver("ctag", tag, redelivered, "ex", routing_key), channel
    )
    data = deliver + content[len(publish) :]
    whole = FrameParser().feed(data)
    assert len(whole) == 1
    assert isinstance(whole[0][1], Delivery)
    assert whole == _deliveries_frame_by_frame(data)


def test_whole_delivery_needs_one_body_frame_on_its_channel() -> None:
    """A body in several frames, or frames of another channel in between, take
    the frame-by-frame path (and still give the same message)."""
    multi = _delivery_bytes(1, b"x" * 10_000, frame_max=4096)
    frames = FrameParser().feed(multi)
    assert not any(isinstance(value, Delivery) for _, value in frames)
    assert _reassemble(frames) == [(1, b"x" * 10_000)]
    single = _delivery_bytes(2, b"abc")
    deliver_end = single.index(b"\xce") + 1
    interleaved = single[:deliver_end] + Heartbeat.marshal() + single[deliver_end:]
    frames = FrameParser().feed(interleaved)
    assert not any(isinstance(value, Delivery) for _, value in frames)
    assert _reassemble(frames) == [(2, b"abc")]
