"""The error policy: ``classify()`` over every AMQP 0-9-1 reply code, the phase
facts, and the one exception-group unwrapping rule."""

from __future__ import annotations

import sys

import anyio
import anyio.lowlevel
import pytest

from amqp_batch import (
    AMQPBatchError,
    AuthenticationError,
    ChannelClosed,
    ConnectionBlockedTimeout,
    ConnectionLost,
    ConnectionRefused,
    ConsumerCancelled,
    MessageNacked,
    ProtocolError,
    TransportError,
    UnknownVirtualHost,
)
from amqp_batch._exceptions import (
    Phase,
    Verdict,
    classify,
    connection_close_error,
    first_library_error,
    recording_phase,
    unwrap_group,
)
from amqp_batch._transport._base import QueueSpec, SessionSpec
from amqp_batch._transport._memory import MemoryBroker
from amqp_batch._transport._native import connect, open_session
from amqp_batch._transport._url import parse_url

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

# Every reply code of AMQP 0-9-1 (and one it does not define), with what the
# consumer does about it, written out rather than derived from the policy:
#   code: (fatal as a connection.close,
#          retryable as a channel.close,
#          fatal as a channel.close during session setup)
# A channel error after consuming started is never fatal: that channel ended, the
# worker opens a new one.
POLICY = {
    200: (False, True, False),  # REPLY_SUCCESS
    311: (False, True, False),  # CONTENT_TOO_LARGE
    312: (False, True, False),  # NO_ROUTE
    313: (False, True, False),  # NO_CONSUMERS
    320: (False, True, False),  # CONNECTION_FORCED: reconnect
    402: (True, True, False),  # INVALID_PATH
    403: (True, False, True),  # ACCESS_REFUSED
    404: (False, True, True),  # NOT_FOUND: the topology is wrong
    405: (False, True, False),  # RESOURCE_LOCKED
    406: (False, False, True),  # PRECONDITION_FAILED: redeclared differently
    501: (True, True, False),  # FRAME_ERROR
    502: (True, True, False),  # SYNTAX_ERROR
    503: (True, True, False),  # COMMAND_INVALID
    504: (True, True, False),  # CHANNEL_ERROR
    505: (True, True, False),  # UNEXPECTED_FRAME
    506: (True, True, False),  # RESOURCE_ERROR
    530: (True, True, False),  # NOT_ALLOWED: unknown vhost
    540: (True, True, False),  # NOT_IMPLEMENTED
    541: (False, True, False),  # INTERNAL_ERROR: the broker restarts
    999: (False, True, False),  # not in the spec: retried
}
PHASES = [Phase.SETUP, Phase.CONSUMING]


@pytest.mark.parametrize("phase", PHASES, ids=lambda p: p.value)
@pytest.mark.parametrize("code", sorted(POLICY))
def test_connection_close_policy(code: int, phase: Phase) -> None:
    fatal, _, _ = POLICY[code]
    error = connection_close_error(
        f"closed: {code}", reply_code=code, reply_text="TEXT", class_id=10
    )
    error.phase = phase
    assert classify(error) == Verdict(retryable=not fatal, fatal=fatal)
    assert error.retryable is not fatal
    # The same facts on a plain ConnectionLost decide the same way.
    plain = ConnectionLost("closed", reply_code=code, phase=phase)
    assert classify(plain) == classify(error)
    assert (error.reply_code, error.reply_text, error.class_id) == (code, "TEXT", 10)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (403, AuthenticationError),
        (530, UnknownVirtualHost),
        (402, ProtocolError),
        (505, ProtocolError),
        (320, ConnectionLost),
        (541, ConnectionLost),
    ],
)
def test_connection_close_types_name_the_reason(
    code: int, kind: type[ConnectionLost]
) -> None:
    assert type(connection_close_error("x", reply_code=code, reply_text="")) is kind


@pytest.mark.parametrize("phase", PHASES, ids=lambda p: p.value)
@pytest.mark.parametrize("code", sorted(POLICY))
def test_channel_close_policy(code: int, phase: Phase) -> None:
    _, retryable, fatal_in_setup = POLICY[code]
    error = ChannelClosed(
        f"closed: {code}", reply_code=code, class_id=50, method_id=10, phase=phase
    )
    fatal = fatal_in_setup if phase is Phase.SETUP else False
    assert classify(error) == Verdict(retryable=retryable, fatal=fatal)
    assert error.retryable is retryable


@pytest.mark.parametrize("code", sorted(POLICY))
def test_channel_close_outside_a_session_is_fatal_when_not_retryable(
    code: int,
) -> None:
    _, retryable, _ = POLICY[code]
    assert classify(ChannelClosed("x", reply_code=code)) == Verdict(
        retryable=retryable, fatal=not retryable
    )


@pytest.mark.parametrize(
    ("error", "fatal"),
    [
        (AuthenticationError("the broker hung up during authentication"), True),
        (UnknownVirtualHost("no such vhost"), True),
        (ProtocolError("malformed frame"), True),
        (ConnectionRefused("refused"), False),
        (ConnectionRefused("bad certificate", certificate_rejected=True), True),
        (ConnectionLost("heartbeat missed"), False),
        (ChannelClosed("channel 1 is closed"), False),
        (ConsumerCancelled("the broker cancelled the consumer"), False),
        (ConnectionBlockedTimeout("blocked too long"), False),
        (TransportError("no free channel numbers"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else "",
)
def test_errors_without_a_reply_code(error: TransportError, fatal: bool) -> None:
    for phase in (None, *PHASES):
        error.phase = phase
        assert classify(error) == Verdict(retryable=not fatal, fatal=fatal)


def test_retryable_is_read_only() -> None:
    error = ChannelClosed("x", reply_code=406)
    with pytest.raises(AttributeError):
        error.retryable = True  # type: ignore[misc]
    assert not error.retryable


def test_recording_phase_marks_errors_once_also_inside_groups() -> None:
    inner = ChannelClosed("declare", reply_code=404)
    with (
        pytest.raises(ChannelClosed),
        recording_phase(Phase.CONSUMING),
        recording_phase(Phase.SETUP),
    ):
        raise inner
    assert inner.phase is Phase.SETUP  # the inner block knew better
    grouped = ChannelClosed("deep", reply_code=406)
    with pytest.raises(ExceptionGroup), recording_phase(Phase.CONSUMING):
        raise ExceptionGroup("g", [ExceptionGroup("h", [grouped]), KeyError()])
    assert grouped.phase is Phase.CONSUMING
    assert classify(grouped).fatal is False


async def test_native_session_records_setup_and_the_frame_facts(
    broker_url: str, unique_name: str
) -> None:
    params = parse_url(broker_url)
    spec = SessionSpec(
        parameters=params,
        queue=unique_name,
        prefetch_count=1,
        queues=[QueueSpec(name=unique_name, durable=False)],
    )
    async with connect(params) as connection:
        async with connection.channel() as channel:
            await channel.queue_declare(unique_name, arguments={"x-max-length": 1})
        try:
            with pytest.raises(ChannelClosed) as info:
                async with open_session(spec):
                    pytest.fail("a queue redeclared with other arguments must fail")
        finally:
            async with connection.channel() as channel:
                await channel.queue_delete(unique_name)
    error = info.value
    # queue.declare is class 50, method 10.
    assert (error.reply_code, error.class_id, error.method_id) == (406, 50, 10)
    assert error.phase is Phase.SETUP
    assert classify(error) == Verdict(retryable=False, fatal=True)


async def test_memory_session_records_setup() -> None:
    broker = MemoryBroker()
    broker.declare(QueueSpec(name="q"))
    spec = SessionSpec(
        parameters=parse_url("amqp://localhost/"),
        queue="q",
        prefetch_count=1,
        queues=[QueueSpec(name="q", arguments={"x-max-length": 1})],
    )
    with pytest.raises(ChannelClosed) as info:
        async with broker.open_session(spec):
            pytest.fail("a queue redeclared with other arguments must fail")
    assert info.value.reply_code == 406
    assert info.value.phase is Phase.SETUP
    assert classify(info.value).fatal


# -- exception groups -----------------------------------------------------------------


async def a_cancellation() -> BaseException:
    """A real cancellation exception of the running backend."""
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.lowlevel.checkpoint()
        except anyio.get_cancelled_exc_class() as exc:
            return exc
    raise AssertionError("the checkpoint was not cancelled")


def group(*members: BaseException) -> BaseExceptionGroup[BaseException]:
    return BaseExceptionGroup("task group", list(members))


async def test_unwrap_group_finds_the_one_exception() -> None:
    lost = ConnectionLost("lost")
    bug = KeyError("bug")
    assert unwrap_group(lost) is lost
    assert unwrap_group(group(lost)) is lost
    assert unwrap_group(group(group(group(bug)))) is bug
    assert unwrap_group(group(lost, group(lost))) is lost  # one error, seen twice
    several = group(lost, group(bug))
    assert unwrap_group(several) is several


async def test_unwrap_group_never_swallows_or_converts_cancellation() -> None:
    cancelled = await a_cancellation()
    lost = ConnectionLost("lost")
    for wrapped in (
        group(cancelled),
        group(group(cancelled)),
        group(lost, cancelled),
        group(group(lost), group(cancelled)),
    ):
        assert unwrap_group(wrapped) is wrapped
    assert unwrap_group(cancelled) is cancelled


async def test_first_library_error() -> None:
    first, second = ChannelClosed("first", reply_code=406), ConnectionLost("second")
    nacked = MessageNacked("nacked")
    assert first_library_error(first, TransportError) is first
    assert first_library_error(group(group(first), second), TransportError) is first
    assert first_library_error(group(nacked, first), AMQPBatchError) is nacked
    # Anything else in the group is a bug or another kind: let it propagate.
    assert first_library_error(group(first, KeyError()), TransportError) is None
    assert first_library_error(group(nacked, first), TransportError) is None
    assert first_library_error(KeyError(), AMQPBatchError) is None


async def test_first_library_error_never_swallows_cancellation() -> None:
    cancelled = await a_cancellation()
    lost = ConnectionLost("lost")
    assert first_library_error(cancelled, AMQPBatchError) is None
    assert first_library_error(group(cancelled), AMQPBatchError) is None
    assert first_library_error(group(lost, group(cancelled)), AMQPBatchError) is None
