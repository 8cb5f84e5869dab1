"""Where log lines go, and how a slow log sink is kept away from mail.

The long-running commands (``run``, ``probe``) log from a writer thread: a callback
only puts its record on a bounded queue, and when the writer falls behind the record
is dropped. The short commands write straight to stderr.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys

LOG_QUEUE_MAX = 10000  # records waiting for the writer before new ones are dropped


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to a writer thread; drops them when it falls behind.

    A milter callback that logs must never wait on a slow log sink (a stalled
    journald would block every callback): losing a log line beats holding mail.
    """

    def __init__(self, queue: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(queue)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


def setup_logging(level: str, background: bool) -> logging.handlers.QueueListener | None:
    """Log to stderr; for the long-running commands, from a writer thread."""
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper()))
    if not background:
        root.addHandler(writer)
        return None
    records: queue.Queue[logging.LogRecord] = queue.Queue(LOG_QUEUE_MAX)
    root.addHandler(DroppingQueueHandler(records))
    listener = logging.handlers.QueueListener(records, writer)
    listener.start()
    return listener
