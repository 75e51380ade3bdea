"""One long-lived Erlang VM that evaluates expressions on a private node.

Every ``rabbitmqctl`` call boots an Erlang VM and the Elixir CLI first (1-3 s on
this machine, most of it before the command runs). :class:`ErlangShell` boots one
hidden Erlang node (``erl -hidden``) per private node, once, and then sends it
expressions over a pipe; it evaluates each one *on the private node* the way
``rabbitmqctl eval`` does (``rpc:call(Node, erl_eval, exprs, ...)``), so a call
takes milliseconds. :class:`~tests.support.rabbit_node.PrivateNode` runs
``eval`` and the helpers built on it (alarms, settings, connections,
``stop_app``/``start_app``) through it.

The shell runs as the node's user with the node's ``HOME``, so it reads the
node's Erlang cookie, and no other. It exits when its stdin closes, so it never
outlives the test process (even one killed with SIGKILL). It carries no
``RABBITMQ_NODENAME``: killing a node's processes (``kill9``) leaves it running,
and it reconnects to the node when the node boots again.

Wire format, one line each way: ``<timeout ms> p|raw <hex of the UTF-8
expression>`` in, ``ok|raw|error <hex of the text>`` out: ``ok`` carries the
result formatted with ``~p`` (as ``rabbitmqctl eval`` prints it), ``raw`` a
binary result as is (asked with ``raw``), ``error`` a ``badrpc`` or a parse
error.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["ErlangShell", "ShellError"]

# The shell's main loop (an `erl -eval` argument). `Target` and the request come
# from the environment and stdin; nothing is interpolated into the code.
_LOOP = r"""
Target = list_to_atom(os:getenv("AMQPBATCH_SHELL_TARGET")),
Reply = fun(Tag, Bin) ->
    io:put_chars([Tag, " ", binary:encode_hex(Bin), "\n"])
end,
Format = fun(Pattern, Args) ->
    unicode:characters_to_binary(io_lib:format(Pattern, Args))
end,
Eval = fun(Timeout, Mode, Source) ->
    try
        {ok, Tokens, _} = erl_scan:string(unicode:characters_to_list(Source)),
        {ok, Exprs} = erl_parse:parse_exprs(Tokens),
        case rpc:call(Target, erl_eval, exprs, [Exprs, []], Timeout) of
            {value, Value, _} when Mode =:= "raw", is_binary(Value) ->
                Reply("raw", Value);
            {value, Value, _} ->
                Reply("ok", Format("~p", [Value]));
            Other ->
                Reply("error", Format("~p", [Other]))
        end
    catch Class:Reason ->
        Reply("error", Format("~p:~p", [Class, Reason]))
    end
end,
Loop = fun Loop() ->
    case io:get_line("") of
        Line when is_list(Line) ->
            [Ms, Mode, Hex] = string:split(string:trim(Line), " ", all),
            Eval(list_to_integer(Ms), Mode, binary:decode_hex(list_to_binary(Hex))),
            Loop();
        _ -> halt(0)
    end
end,
Reply("ready", <<>>),
Loop().
"""


class ShellError(RuntimeError):
    """The expression failed on the node (``badrpc``), or the shell itself did."""


class ErlangShell:
    """A hidden Erlang node that evaluates expressions on ``target``.

    Started on the first :meth:`call`; :meth:`close` stops it. Thread-safe (one
    call at a time). ``env`` and ``popen_kwargs`` are those of the node's own
    ``rabbitmqctl`` calls (user, ``HOME`` with the cookie); ``log`` receives the
    shell's stderr.
    """

    def __init__(
        self,
        target: str,
        env: dict[str, str],
        popen_kwargs: dict[str, Any],
        log: Path,
    ) -> None:
        """Prepare (do not start) a shell for node ``target``."""
        self.target = target
        self._env = {k: v for k, v in env.items() if not k.startswith("RABBITMQ_")}
        self._env["AMQPBATCH_SHELL_TARGET"] = target
        self._popen_kwargs = {
            k: v for k, v in popen_kwargs.items() if k not in ("env", "stdin")
        }
        self._log = log
        self._process: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._lock = threading.Lock()

    def call(
        self, expr: str, timeout: float = 60.0, raw: bool = False
    ) -> tuple[str, str]:
        """Evaluate ``expr`` on the node; ``("ok", printed)``, or with ``raw`` and a
        binary result ``("raw", its text)``.

        Raises :class:`ShellError` for a failed evaluation (the node down, an
        exception, a parse error) and :class:`TimeoutError` if no reply comes.
        """
        with self._lock:
            process = self._ensure_started()
            assert process.stdin is not None
            mode = "raw" if raw else "p"
            request = f"{int(timeout * 1000)} {mode} {expr.encode().hex()}\n"
            try:
                process.stdin.write(request.encode())
                process.stdin.flush()
            except OSError as exc:
                self._discard()
                raise ShellError(f"the shell for {self.target} died: {exc}") from exc
            tag, text = self._read_reply(timeout + 5)
        if tag == "error":
            raise ShellError(text)
        return tag, text

    def close(self) -> None:
        """Stop the shell (close its stdin; kill it if it lingers)."""
        with self._lock:
            self._discard()

    # ------------------------------------------------------------------ internals

    def _ensure_started(self) -> subprocess.Popen[bytes]:
        if self._process is not None and self._process.poll() is None:
            return self._process
        self._discard()
        erl = shutil.which("erl", path=self._env.get("PATH")) or "erl"
        name = f"amqpbatch-shell-{os.getpid()}-{secrets.token_hex(4)}@localhost"
        command = [
            erl,
            "-noshell",
            "-hidden",
            "-sname",
            name,
            "-kernel",
            "inet_dist_use_interface",
            "{127,0,0,1}",
            "-eval",
            _LOOP,
        ]
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=self._env,
                **self._popen_kwargs,
            )
        self._buffer = b""
        tag, _ = self._read_reply(30)
        if tag != "ready":
            self._discard()
            raise ShellError(f"the shell for {self.target} did not start: {tag}")
        return self._process

    def _read_reply(self, timeout: float) -> tuple[str, str]:
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._discard()
                raise TimeoutError(f"no reply from the shell for {self.target}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self._discard()
                raise ShellError(f"the shell for {self.target} exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        tag, _, payload = line.decode().partition(" ")
        return tag, bytes.fromhex(payload).decode("utf-8", errors="replace")

    def _discard(self) -> None:
        process, self._process = self._process, None
        self._buffer = b""
        if process is None:
            return
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
