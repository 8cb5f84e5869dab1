"""Where log lines go, and how a slow log sink is kept away from mail.

Sinks (``[log] target``):

- ``stderr``: ``TIME LEVEL LOGGER: message``. Under journald (``JOURNAL_STREAM`` names
  our stderr) the time is left to the journal and each line starts with the
  sd-daemon ``<N>`` priority prefix instead, so the journal keeps the level.
- ``syslog``: datagrams to a local syslog socket (``[log] syslog_socket``), facility
  ``[log] facility`` (``mail`` by default), ident ``mx-guard[PID]``.

The long-running commands (``run``, ``probe``) log from a writer thread: a callback
only puts its record on a bounded queue. When the writer falls behind (a stalled
journald, a syslog daemon that stopped reading) new records are dropped, as are lines
a sink fails to take; each one counts in ``mxguard_log_dropped_total``, and the
episode is reported once when it starts and once, with the count, when the writer
has caught up. The short commands write straight to stderr.
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import queue
import socket
import sys
import threading
from collections.abc import Mapping
from typing import TextIO

from guard import metrics
from guard.config import LogConfig, LogTarget
from guard.episodes import FaultEpisode
from guard.logsafe import printable

LOG_QUEUE_MAX = 10000  # records waiting for the writer before new ones are dropped
IDENT = "mx-guard"

STDERR_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "<%(priority)d>%(levelname)s %(name)s: %(message)s"
SYSLOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

# syslog(3) severities, as sd-daemon(3) prefixes and syslog priorities use them.
_SEVERITY = {
    logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
    logging.DEBUG: 7,
}


def severity(levelno: int) -> int:
    return next((s for level, s in sorted(_SEVERITY.items(), reverse=True)
                 if levelno >= level), 7)


class DropCounter:
    """Log lines lost, from any thread; the writer reads it to report episodes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0

    def drop(self) -> None:
        with self._lock:
            self.total += 1
        metrics.LOG_DROPPED.inc()


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to a writer thread; drops them when it falls behind.

    A milter callback that logs must never wait on a slow log sink (a stalled
    journald would block every callback): losing a log line beats holding mail.
    """

    def __init__(self, records: queue.Queue[logging.LogRecord], dropped: DropCounter) -> None:
        super().__init__(records)
        self.dropped = dropped

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped.drop()


def _printable_line(line: str) -> str:
    return line if line.isprintable() else printable(line, len(line))


class SafeFormatter(logging.Formatter):
    """Every line it writes is printable text, and continuation lines (a traceback, a
    stack) are indented: an exception message that carries client text cannot start a
    log line of its own, nor a journal priority prefix."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        first, newline, rest = text.partition("\n")
        if not newline:
            return _printable_line(text)
        return "\n".join([_printable_line(first),
                          *(f"  | {_printable_line(line)}" for line in rest.split("\n"))])


class _JournalFormatter(SafeFormatter):
    def format(self, record: logging.LogRecord) -> str:
        record.priority = severity(record.levelno)
        return super().format(record)


def under_journald(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when ``stream`` is the journal stream systemd gave us (systemd.exec(5):
    ``JOURNAL_STREAM`` is ``DEVICE:INODE`` of it; a redirected stderr keeps times)."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


class _SyslogHandler(logging.handlers.SysLogHandler):
    """A line the syslog socket refuses is dropped and counted, not printed."""

    def __init__(self, path: str, facility: str, dropped: DropCounter) -> None:
        super().__init__(address=path, facility=self.facility_names[facility],
                         socktype=socket.SOCK_DGRAM)
        self.ident = f"{IDENT}[{os.getpid()}]: "
        self._dropped = dropped

    def handleError(self, record: logging.LogRecord) -> None:
        self._dropped.drop()


class _Writer(logging.handlers.QueueListener):
    """The writer thread; after each record it sees whether lines were lost."""

    def __init__(self, records: queue.Queue[logging.LogRecord], sink: logging.Handler,
                 dropped: DropCounter) -> None:
        super().__init__(records, sink)
        self._records = records
        self._dropped = dropped
        self._seen = 0
        self._episode_from: int | None = None  # the drop count when the episode began
        # Reports go straight to the sink from this thread, never through the queue
        # that is full.
        reporter = logging.getLogger("guard.log")
        reporter.propagate = False
        reporter.handlers = [_ToSink(self)]
        self._episode = FaultEpisode("log writer", reporter)

    def handle(self, record: logging.LogRecord) -> None:
        super().handle(record)
        total = self._dropped.total
        if total != self._seen:
            if self._episode_from is None:
                self._episode_from = self._seen
            self._seen = total
            self._episode.failed(RuntimeError(
                "the log sink fell behind, dropping lines (mxguard_log_dropped_total)"))
        elif self._episode_from is not None and self._records.empty():
            lost, self._episode_from = total - self._episode_from, None
            self._episode.succeeded(f", {lost} line(s) dropped")


class _ToSink(logging.Handler):
    def __init__(self, writer: _Writer) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        for sink in self._writer.handlers:
            sink.handle(record)


class Logs:
    """This process's log plumbing. ``apply`` points it at a ``[log]`` section, at
    start and on reload; until then (and for the short commands) it is stderr."""

    def __init__(self, level: str, background: bool, *, stream: TextIO | None = None,
                 environ: Mapping[str, str] | None = None,
                 queue_max: int = LOG_QUEUE_MAX) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._environ = environ if environ is not None else os.environ
        self.dropped = DropCounter()
        self._root = logging.getLogger()
        self._root.setLevel(getattr(logging, level.upper()))
        self._sink = self._stderr()
        self._writer: _Writer | None = None
        if background:
            records: queue.Queue[logging.LogRecord] = queue.Queue(queue_max)
            self._front: logging.Handler = DroppingQueueHandler(records, self.dropped)
            self._writer = _Writer(records, self._sink, self.dropped)
            self._writer.start()
        else:
            self._front = self._sink
        self._root.addHandler(self._front)
        self.config: LogConfig | None = None

    def _stderr(self) -> logging.Handler:
        handler = logging.StreamHandler(self._stream)
        if under_journald(self._stream, self._environ):
            handler.setFormatter(_JournalFormatter(JOURNAL_FORMAT))
        else:
            handler.setFormatter(SafeFormatter(STDERR_FORMAT))
        return handler

    def apply(self, config: LogConfig) -> None:
        """Log where ``config`` says from now on. A syslog socket that cannot be
        opened leaves logging where it was, and says so there."""
        if config == self.config:
            return
        if config.target is LogTarget.SYSLOG:
            try:
                syslog = _SyslogHandler(config.syslog_socket, config.facility, self.dropped)
                connected: socket.socket | None = getattr(syslog, "socket", None)
                if connected is None or connected.fileno() < 0:  # newer Pythons say nothing
                    syslog.close()
                    raise FileNotFoundError(os.strerror(errno.ENOENT))
            except OSError as e:
                logging.getLogger("guard.log").warning(
                    "cannot log to syslog at %s (%s); logging stays where it was",
                    config.syslog_socket, e.strerror or e)
                return
            sink: logging.Handler = syslog
            sink.setFormatter(SafeFormatter(SYSLOG_FORMAT))
        else:
            sink = self._stderr()
        old, self._sink = self._sink, sink
        if self._writer is not None:
            self._writer.handlers = (sink,)  # one assignment: the writer sees old or new
        else:
            self._root.removeHandler(self._front)
            self._front = sink
            self._root.addHandler(sink)
        old.close()
        self.config = config

    def stop(self) -> None:
        """Write out what is still queued, then detach."""
        if self._writer is not None:
            self._writer.stop()
        self._root.removeHandler(self._front)
        self._sink.close()
