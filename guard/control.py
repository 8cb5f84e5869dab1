"""The control socket: a small local protocol between the CLI and a running guard.

``mx-guard run`` listens on a Unix stream socket (``[control] socket``; by default
``NAME.control.sock`` beside the milter socket ``NAME.sock``), mode 0660. One request
per connection, one JSON object per line each way::

    -> {"command": "status", "args": {}}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "error": "unknown command 'stats' (known: explain, reload, status)"}

Commands live in a ``CommandTable`` (name -> handler), so a feature adds its own
without touching the protocol. A handler takes the request's ``args`` object and
returns something JSON can encode; ``BadRequest`` and ``CommandFailed`` become a
clear error answer, any other exception an "internal error" answer and one log line.

Serving never touches the milter: it has its own accept thread and one thread per
client, at most ``MAX_CLIENTS`` at once (more are told the guard is busy), and every
client has ``[control] timeout`` to send its request and read the answer, so a slow or
stuck client costs one thread for that long and nobody else anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from guard.config import Config, ConfigError, load_config, parse_config
from guard.episodes import FaultEpisode

log = logging.getLogger("guard.control")

SOCKET_MODE = 0o660
# With an inet milter socket there is no directory to go beside: this one.
INET_MILTER_CONTROL_SOCKET = "/run/mx-guard/guard.control.sock"
REQUEST_MAX_BYTES = 64 * 1024
MAX_CLIENTS = 8
ACCEPT_RETRY_SECONDS = 0.1  # after a failed accept(), before the next

Handler = Callable[[Mapping[str, Any]], Any]


class BadRequest(Exception):
    """The request is malformed or its arguments are wrong (the client's fault)."""


class CommandFailed(Exception):
    """The command could not be done now, e.g. the store did not answer (transient)."""


class ControlUnavailable(Exception):
    """No guard answers on the control socket (not running, or no access to it)."""


class ControlError(Exception):
    """The running guard refused or failed the request; the message is its answer."""


def control_socket_path(config: Config) -> str:
    """``[control] socket``, or beside a Unix milter socket and named after it
    (``guard.sock`` -> ``guard.control.sock``), so two guards whose milter sockets
    share a directory do not share a control socket."""
    if config.control.socket:
        return config.control.socket
    kind, _, rest = config.milter.socket.partition(":")
    if kind in ("unix", "local"):
        return rest.removesuffix(".sock") + ".control.sock"
    return INET_MILTER_CONTROL_SOCKET


def control_socket_path_of_file(path: str) -> str | None:
    """The control socket a config file names, even when the rest of the file is
    invalid (``mx-guard reload`` must reach the guard to have a bad file refused);
    None when the file cannot be read as TOML at all."""
    try:
        return control_socket_path(load_config(path))
    except ConfigError:
        pass
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return None
    wanted = {k: raw[k] for k in ("milter", "control") if isinstance(raw.get(k), dict)}
    try:
        return control_socket_path(parse_config(wanted, path))
    except ConfigError:
        return control_socket_path(Config())


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    help: str


class CommandTable:
    """The commands a running guard answers; ``answer`` is the whole protocol."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def add(self, name: str, handler: Handler, help: str = "") -> None:
        if name in self._commands:
            raise ValueError(f"control command {name!r} is already registered")
        self._commands[name] = Command(name, handler, help)

    @property
    def names(self) -> list[str]:
        return sorted(self._commands)

    def answer(self, line: bytes) -> bytes:
        """One request line in, one answer line out; never raises."""
        try:
            command, args = self._parse(line)
            result = command.handler(args)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except (BadRequest, CommandFailed) as e:
            reply = {"ok": False, "error": str(e)}
        except Exception as e:  # a bug in a handler must not end serving
            log.exception("control command failed")
            reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
        try:
            return json.dumps(reply, sort_keys=True).encode() + b"\n"
        except (TypeError, ValueError) as e:
            log.error("control answer cannot be encoded: %s", e)
            return b'{"error": "internal error: answer not encodable", "ok": false}\n'

    def _parse(self, line: bytes) -> tuple[Command, Mapping[str, Any]]:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadRequest('a request is one line of JSON: {"command": NAME, '
                             '"args": {...}}') from None
        if not isinstance(request, dict):
            raise BadRequest("the request must be a JSON object")
        unknown = set(request) - {"command", "args"}
        if unknown:
            raise BadRequest(f"unknown request key {sorted(unknown)[0]!r} "
                             "(known: args, command)")
        name = request.get("command")
        if not isinstance(name, str):
            raise BadRequest(f"'command' must be a string, one of {', '.join(self.names)}")
        command = self._commands.get(name)
        if command is None:
            raise BadRequest(f"unknown command {name!r} (known: {', '.join(self.names)})")
        args = request.get("args", {})
        if not isinstance(args, dict):
            raise BadRequest("'args' must be a JSON object")
        return command, args


class ControlServer:
    """Serves a ``CommandTable`` on a Unix socket from threads of its own."""

    def __init__(self, path: str, commands: CommandTable, timeout: float) -> None:
        self.path = path
        self._commands = commands
        self._timeout = timeout
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._clients = threading.BoundedSemaphore(MAX_CLIENTS)
        self._accept_fault = FaultEpisode("control socket (accepting clients)", log)
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)

    def start(self) -> bool:
        """Listen and serve; False (and one log line) if the socket cannot be had.

        The milter runs either way: the control socket is for operators, not mail.
        """
        try:
            self._listener = self._bind()
        except OSError as e:
            log.error("control socket %s not served: %s", self.path, e.strerror or e)
            return False
        self._thread.start()
        log.info("control socket on %s (commands: %s)", self.path,
                 ", ".join(self._commands.names))
        return True

    def _bind(self) -> socket.socket:
        # As the milter's socket directory would be (umask permitting): not world-open.
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o770, exist_ok=True)
        if os.path.exists(self.path):
            if _answers(self.path):
                raise OSError(f"another process serves {self.path}")
            os.unlink(self.path)  # left over from a guard that died
        # Bound under a temporary name and renamed into place, so the socket is
        # never reachable with a mode wider than 0660.
        staging = f"{self.path}.{os.getpid()}.new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(staging)
            os.chmod(staging, SOCKET_MODE)
            os.rename(staging, self.path)
            listener.listen(16)
        except OSError:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(staging)
            raise
        self._inode = os.stat(self.path).st_ino
        return listener

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:  # still ours, not a successor's
                os.unlink(self.path)

    def _accept_loop(self) -> None:
        while True:
            listener = self._listener
            if listener is None:
                return
            try:
                conn, _ = listener.accept()
            except OSError as e:
                if self._listener is None:
                    return  # stopped
                # Out of descriptors, say: once in the log, and no busy loop that would
                # drown the log and take the GIL from the milter threads.
                self._accept_fault.failed(e)
                time.sleep(ACCEPT_RETRY_SECONDS)
                continue
            self._accept_fault.succeeded()
            if not self._clients.acquire(blocking=False):
                self._refuse_busy(conn)
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), name="control-client",
                                 daemon=True).start()
            except RuntimeError as e:  # no thread to be had: this client goes unserved
                self._clients.release()
                conn.close()
                self._accept_fault.failed(e)

    def _refuse_busy(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.1)
            with contextlib.suppress(OSError):
                conn.sendall(b'{"error": "busy: too many control clients, try again", '
                             b'"ok": false}\n')

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(self._timeout)
                line = _read_line(conn)
                if line is None:
                    return
                conn.sendall(self._commands.answer(line))
        except (OSError, TimeoutError):
            pass  # the client went away or was too slow: its loss only
        finally:
            self._clients.release()


def _read_line(conn: socket.socket) -> bytes | None:
    """The request line; an answer and None when it is too long."""
    data = _recv_line(conn, REQUEST_MAX_BYTES)
    if data is None:
        conn.sendall(json.dumps({"ok": False, "error": f"request longer than "
                                 f"{REQUEST_MAX_BYTES} bytes"}).encode() + b"\n")
        return None
    return data.split(b"\n", 1)[0]


def _recv_line(sock: socket.socket, limit: int | None = None) -> bytes | None:
    """Bytes up to and including the first newline (or the peer's close); None once
    more than ``limit`` bytes came without one."""
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if limit is not None and len(data) > limit:
            return None
    return data


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def ask(path: str, command: str, args: Mapping[str, Any] | None = None,
        timeout: float = 10.0) -> Any:
    """Send one request to the guard on ``path``; its result.

    Raises ``ControlUnavailable`` when nothing answers there and ``ControlError`` when
    the guard answers with an error.
    """
    request = json.dumps({"command": command, "args": dict(args or {})}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            raise ControlUnavailable(f"{path}: {e.strerror or e}") from None
        try:
            s.sendall(request)
            data = _recv_line(s) or b""
        except OSError as e:
            raise ControlUnavailable(f"{path}: {e.strerror or e}") from None
    try:
        reply = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ControlError(f"{path}: not a control answer: {data[:200]!r}") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ControlError(f"{path}: not a control answer: {data[:200]!r}")
    if not reply["ok"]:
        raise ControlError(str(reply.get("error", "unknown error")))
    return reply.get("result")
