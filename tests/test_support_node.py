"""Tests of the private RabbitMQ node machinery, with plain sockets and pamqp frames."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from pamqp import body, commands, frame, header
from pamqp.base import Frame
from tests.support.rabbit_node import (
    PrivateNode,
    _pid_alive,
    _processes_of_node,
    _wait_until,
)

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD = 1
CONNECTION_FORCED = 320


class BlockingAMQP:
    """A minimal blocking AMQP 0-9-1 client: just enough to exercise the node."""

    def __init__(self, sock: socket.socket) -> None:
        """Wrap a connected (plain or TLS) socket."""
        self.sock = sock
        self.buffer = b""

    @classmethod
    def open(
        cls,
        port: int,
        connection_name: str,
        user: str = "guest",
        password: str = "guest",
        vhost: str = "/",
    ) -> BlockingAMQP:
        """Connect, authenticate, open ``vhost`` and channel 1."""
        client = cls(socket.create_connection(("127.0.0.1", port), timeout=10))
        client.sock.sendall(PROTOCOL_HEADER)
        assert isinstance(client.read_frame(), commands.Connection.Start)
        client.send(
            commands.Connection.StartOk(
                client_properties={"connection_name": connection_name},
                response=f"\0{user}\0{password}",
            )
        )
        tune = client.read_frame()
        assert isinstance(tune, commands.Connection.Tune)
        client.send(commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        client.send(commands.Connection.Open(vhost))
        assert isinstance(client.read_frame(), commands.Connection.OpenOk)
        client.send(commands.Channel.Open(), channel=1)
        assert isinstance(client.read_frame(), commands.Channel.OpenOk)
        return client

    def send(self, value: Any, channel: int = 0) -> None:
        """Marshal and send one frame."""
        self.sock.sendall(frame.marshal(value, channel))

    def read_frame(self) -> Any:
        """Read one frame (skipping heartbeats); raise EOFError on EOF."""
        while True:
            if self.buffer:
                try:
                    consumed, _channel, value = frame.unmarshal(self.buffer)
                except Exception:  # pamqp: incomplete frame, read more
                    consumed = 0
                if consumed:
                    self.buffer = self.buffer[consumed:]
                    if isinstance(
                        value, Frame | header.ContentHeader | body.ContentBody
                    ):
                        return value
                    continue
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buffer += data

    def publish_confirmed(self, queue: str, payload: bytes) -> None:
        """Publish a persistent message to ``queue`` and wait for its confirm."""
        self.send(commands.Basic.Publish(routing_key=queue), channel=1)
        properties = commands.Basic.Properties(delivery_mode=2)
        self.send(header.ContentHeader(0, len(payload), properties), channel=1)
        self.send(body.ContentBody(payload), channel=1)
        assert isinstance(self.read_frame(), commands.Basic.Ack)

    def close(self) -> None:
        """Close the socket (no AMQP close handshake: the tests do not need one)."""
        self.sock.close()


def declare(client: BlockingAMQP, queue: str, durable: bool = False) -> None:
    """Declare ``queue`` on channel 1 and put the channel in confirm mode."""
    client.send(commands.Queue.Declare(queue=queue, durable=durable), channel=1)
    assert isinstance(client.read_frame(), commands.Queue.DeclareOk)
    client.send(commands.Confirm.Select(), channel=1)
    assert isinstance(client.read_frame(), commands.Confirm.SelectOk)


def test_amqp_port_answers_with_connection_start(private_node: PrivateNode) -> None:
    with socket.create_connection(("127.0.0.1", private_node.amqp_port), 10) as sock:
        sock.sendall(PROTOCOL_HEADER)
        reply = sock.recv(7)
    assert reply[0] == FRAME_METHOD
    assert reply[1:3] == b"\x00\x00"  # channel 0


def test_tls_listener_trusts_only_its_ca(private_node: PrivateNode) -> None:
    assert private_node.tls_url == (
        f"amqps://guest:guest@localhost:{private_node.amqps_port}/"
    )
    address = ("127.0.0.1", private_node.amqps_port)
    context = private_node.client_ssl_context()
    with (
        socket.create_connection(address, 10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(PROTOCOL_HEADER)
        assert tls.recv(7)[0] == FRAME_METHOD

    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)
    with (
        socket.create_connection(address, 10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        stranger.wrap_socket(raw, server_hostname="localhost")


def test_eval_and_ctl(private_node: PrivateNode) -> None:
    assert private_node.eval("1 + 1.") == "2"
    assert private_node.node_name in private_node.ctl("status")


def test_close_connection_by_name(private_node: PrivateNode, unique_name: str) -> None:
    client = BlockingAMQP.open(private_node.amqp_port, unique_name)
    try:
        names = [c["name"] for c in private_node.list_connections()]
        assert unique_name in names
        assert private_node.close_connection(unique_name, reason="bye") == 1
        close = client.read_frame()
        assert isinstance(close, commands.Connection.Close)
        assert close.reply_code == CONNECTION_FORCED
        client.send(commands.Connection.CloseOk())
        # The broker closes its socket with linger 0 after close-ok: EOF or RST.
        with pytest.raises((EOFError, ConnectionResetError)):
            client.read_frame()
        still_open = [
            c
            for c in private_node.list_connections()
            if c["name"] == unique_name and c["state"] not in ("closing", "closed")
        ]
        assert still_open == []
    finally:
        client.close()


def test_queue_counts_and_delete_queue(
    private_node: PrivateNode, unique_name: str
) -> None:
    client = BlockingAMQP.open(private_node.amqp_port, unique_name)
    try:
        declare(client, unique_name)
        client.publish_confirmed(unique_name, b"one")
        client.publish_confirmed(unique_name, b"two")
        assert private_node.queue_counts(unique_name) == (2, 0)
        private_node.delete_queue(unique_name)
        with pytest.raises(KeyError):
            private_node.queue_counts(unique_name)
    finally:
        client.close()


def test_memory_alarm_set_and_cleared(private_node: PrivateNode) -> None:
    private_node.set_memory_alarm()
    try:
        assert "memory" in private_node.eval("rabbit_alarm:get_alarms().")
    finally:
        private_node.clear_memory_alarm()
    assert "memory" not in private_node.eval("rabbit_alarm:get_alarms().")


def test_settings_changed_then_reset(destructive_node: PrivateNode) -> None:
    original = destructive_node.eval("application:get_env(rabbit, consumer_timeout).")
    destructive_node.set_consumer_timeout(3000)
    destructive_node.set_max_message_size(4096)
    assert (
        destructive_node.eval(
            "{application:get_env(rabbit, consumer_timeout), "
            "application:get_env(rabbit, max_message_size)}."
        )
        == "{{ok,3000},{ok,4096}}"
    )
    destructive_node.reset()
    after = destructive_node.eval("application:get_env(rabbit, consumer_timeout).")
    assert after == original


def test_user_and_vhost(private_node: PrivateNode, unique_name: str) -> None:
    private_node.add_vhost(unique_name)
    private_node.add_user(unique_name, "s3cret", vhosts=[unique_name])
    client = BlockingAMQP.open(
        private_node.amqp_port, unique_name, unique_name, "s3cret", unique_name
    )
    try:
        assert unique_name in [c["name"] for c in private_node.list_connections()]
    finally:
        client.close()
        private_node.ctl("delete_user", unique_name)
        private_node.ctl("delete_vhost", unique_name)


def test_stop_app_start_app(destructive_node: PrivateNode) -> None:
    destructive_node.stop_app()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", destructive_node.amqp_port), 2).close()
    destructive_node.start_app()
    with socket.create_connection(
        ("127.0.0.1", destructive_node.amqp_port), 10
    ) as sock:
        sock.sendall(PROTOCOL_HEADER)
        assert sock.recv(7)[0] == FRAME_METHOD


def _recovered_counts(node: PrivateNode, queue: str) -> tuple[int, int]:
    """``queue``'s counts once the restarted node recovered it: right after a
    restart from a crash, ``await_startup`` has been seen to return while the
    durable queue was not in the queue table yet (the CLI's own start-up used
    to hide it). Polled, for 30 s at most."""

    def recovered() -> bool:
        try:
            node.queue_counts(queue)
        except KeyError:
            return False
        return True

    _wait_until(recovered, 30)
    return node.queue_counts(queue)  # KeyError if it never came back


@pytest.mark.private_node  # boots a node of its own
def test_own_node_kill9_restart_and_stop(unique_name: str) -> None:
    """A second node: a crash keeps confirmed persistent messages; stop() cleans up."""
    with PrivateNode(tls=False) as node:
        base_dir = node.base_dir
        assert base_dir is not None
        client = BlockingAMQP.open(node.amqp_port, unique_name)
        try:
            declare(client, unique_name, durable=True)
            client.publish_confirmed(unique_name, b"survivor")
        finally:
            client.close()
        first_pid = node.os_pid
        node.kill9()
        assert first_pid is not None
        assert not _pid_alive(first_pid)
        node.start()
        assert node.os_pid != first_pid
        assert _recovered_counts(node, unique_name) == (1, 0)
        pid = node.os_pid
    assert pid is not None
    assert not _pid_alive(pid)
    assert _processes_of_node(node.node_name) == []
    assert not Path(base_dir).exists()
