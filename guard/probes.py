"""One probe of one target: can a sending MTA get through to it right now?

Modes (SPEC section 4):
- ``tcp``: the TCP connection is accepted;
- ``banner``: ... and the server greets with 220 (a 4xx/5xx greeting is down, because
  Postfix skips such servers too);
- ``ehlo``: ... and answers EHLO with 250, then QUIT.
The whole probe is bounded by ``timeout``: a server that accepts and never greets costs
one timeout. Results are classified (``ok``, ``refused``, ``timeout``, ``reset``,
``bad-greeting``, ``closed``, ``unreachable``, ``error``) and the class is the detail.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from dataclasses import dataclass
from enum import StrEnum

from guard.config import ProbeMode
from guard.health import Target

MAX_REPLY_LINES = 100  # a multi-line reply longer than this is not an SMTP server
MAX_LINE = 4096


class ProbeClass(StrEnum):
    OK = "ok"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    RESET = "reset"
    BAD_GREETING = "bad-greeting"
    BAD_REPLY = "bad-reply"
    CLOSED = "closed"
    UNREACHABLE = "unreachable"
    ERROR = "error"


@dataclass(frozen=True)
class ProbeResult:
    target: Target
    result: ProbeClass
    detail: str
    elapsed: float  # seconds

    @property
    def ok(self) -> bool:
        return self.result is ProbeClass.OK


class _BadReply(Exception):
    def __init__(self, result: ProbeClass, detail: str) -> None:
        super().__init__(detail)
        self.result = result


async def _read_reply(reader: asyncio.StreamReader) -> tuple[str, str]:
    """Read one (possibly multi-line) SMTP reply: (code, first line)."""
    first = ""
    for _ in range(MAX_REPLY_LINES):
        raw = await reader.readline()
        if not raw:
            raise _BadReply(ProbeClass.CLOSED, "connection closed before a reply")
        line = raw[:MAX_LINE].decode("ascii", "replace").rstrip("\r\n")
        first = first or line
        if len(line) < 3 or not line[:3].isdigit():
            raise _BadReply(ProbeClass.BAD_REPLY, f"not an SMTP reply: {line[:60]!r}")
        if len(line) == 3 or line[3] != "-":
            return line[:3], first
    raise _BadReply(ProbeClass.BAD_REPLY, "reply too long")


async def _converse(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mode: ProbeMode, helo: str
) -> str:
    if mode is ProbeMode.TCP:
        return "connected"
    code, line = await _read_reply(reader)
    if code != "220":
        raise _BadReply(ProbeClass.BAD_GREETING, f"greeting {line[:80]!r}")
    if mode is ProbeMode.EHLO:
        writer.write(f"EHLO {helo}\r\n".encode("ascii", "replace"))
        await writer.drain()
        code, line = await _read_reply(reader)
        if code != "250":
            raise _BadReply(ProbeClass.BAD_REPLY, f"EHLO answered {line[:80]!r}")
    # Leave politely so the primary logs no lost connection.
    writer.write(b"QUIT\r\n")
    await writer.drain()
    return "greeted 220" if mode is ProbeMode.BANNER else "EHLO 250"


def _classify_os_error(e: OSError) -> ProbeClass:
    if isinstance(e, ConnectionRefusedError):
        return ProbeClass.REFUSED
    if isinstance(e, ConnectionResetError | BrokenPipeError):
        return ProbeClass.RESET
    if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL):
        return ProbeClass.UNREACHABLE
    if isinstance(e, TimeoutError):
        return ProbeClass.TIMEOUT
    return ProbeClass.ERROR


async def probe(target: Target, mode: ProbeMode, timeout: float, helo: str) -> ProbeResult:
    started = time.monotonic()
    writer: asyncio.StreamWriter | None = None

    def result(cls: ProbeClass, detail: str) -> ProbeResult:
        return ProbeResult(target, cls, detail, time.monotonic() - started)

    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(target.address, target.port)
            detail = await _converse(reader, writer, mode, helo)
        return result(ProbeClass.OK, detail)
    except TimeoutError:
        return result(ProbeClass.TIMEOUT, f"no answer within {timeout:g}s")
    except _BadReply as e:
        return result(e.result, str(e))
    except OSError as e:
        cls = _classify_os_error(e)
        # asyncio words refusals as "Connect call failed (...)"; the errno says it plainer.
        return result(cls, os.strerror(e.errno) if e.errno else str(e) or cls.value)
    except Exception as e:  # e.g. a line longer than the stream limit: the peer is broken
        return result(ProbeClass.ERROR, f"{type(e).__name__}: {str(e)[:80]}")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
