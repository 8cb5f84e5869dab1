"""What PostfixMTA (postfix.py) and SendmailMTA (sendmail.py) share.

A private MTA instance lives in one directory (a fresh temporary one unless
``workdir`` is given; removed at stop() unless $MXGUARD_E2E_KEEP is set), listens
on one SMTP port (a free one unless ``port`` is given) and logs to
<workdir>/maillog. start() returns once the port greets with 220; a failed start
stops what it started and raises HarnessError with the log. Instances a crashed
or interrupted test run did not stop are stopped at exit.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Self

from tests.support.smtpserver import free_port

from .smtp import HarnessError, require_root, tail, wait_for_banner, wait_until

KEEP_ENV = "MXGUARD_E2E_KEEP"  # set to 1 to keep the instance directory after stop()

_RUNNING: set[PrivateMTA] = set()


@atexit.register
def _stop_leftovers() -> None:
    """Stop instances a crashed or interrupted test run did not stop."""
    for mta in list(_RUNNING):
        with contextlib.suppress(Exception):
            mta.stop()


class PrivateMTA(abc.ABC):
    """A private secondary MX.  Use start()/stop() or ``with``."""

    NAME: ClassVar[str]  # "Postfix": messages, and the temporary directory's prefix
    DEFAULT_MILTER_MACROS: ClassVar[Mapping[str, str]]  # milter_macros override these

    def __init__(self, milter: str | None, *, milter_macros: Mapping[str, str] | None,
                 host: str, port: int | None, workdir: str | os.PathLike[str] | None,
                 start_timeout: float):
        self.milter = milter
        self.milter_macros = dict(self.DEFAULT_MILTER_MACROS, **(milter_macros or {}))
        self.host = host
        self._port = port
        self._workdir_arg = Path(workdir) if workdir else None
        self.start_timeout = start_timeout
        self._workdir: Path | None = None
        self._owns_workdir = False

    # ------------------------------------------------------------ paths
    @property
    def workdir(self) -> Path:
        """The instance directory (exists from start() on)."""
        if self._workdir is None:
            raise HarnessError(f"{type(self).__name__} has not been started")
        return self._workdir

    @property
    def log_path(self) -> Path:
        return self.workdir / "maillog"

    @property
    def port(self) -> int:
        """The SMTP port (a free one is picked at start() unless given)."""
        if self._port is None:
            raise HarnessError(f"{type(self).__name__} has not been started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # ------------------------------------------------------------ log
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        rx = re.compile(pattern)
        return wait_until(lambda: rx.search(self.log_text()), timeout,
                          message=f"/{pattern}/ in {self.log_path}")

    def _diagnostics(self) -> str:
        """What a HarnessError shows of the instance."""
        return f"--- maillog ---\n{tail(self.log_path)}"

    # ------------------------------------------------------------ what each MTA does
    @property
    @abc.abstractmethod
    def running(self) -> bool: ...

    @abc.abstractmethod
    def _check_installed(self) -> None:
        """HarnessError unless the MTA is installed."""

    @abc.abstractmethod
    def _launch(self) -> None:
        """Write the configuration into workdir, start the MTA and wait for its greeting."""

    @abc.abstractmethod
    def _shutdown(self) -> None:
        """Stop what _launch() started (also after a failed or partial _launch())."""

    def _exited(self) -> str | None:
        """Why the MTA is known to have exited, or None."""
        return None

    # ------------------------------------------------------------ control
    def _await_greeting(self, port: int, timeout: float, what: str) -> None:
        """Wait until *port* greets with 220; HarnessError if it does not within
        *timeout* seconds or the MTA exits first."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                if (exited := self._exited()) is not None:
                    raise TimeoutError(exited)
                try:
                    wait_for_banner(self.host, port, min(2.0, deadline - time.monotonic()))
                    return
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        raise
        except TimeoutError as exc:
            raise HarnessError(f"{what} did not start on {self.host}:{port}: {exc}\n"
                               f"{self._diagnostics()}") from None

    def start(self) -> Self:
        if self.running:
            return self
        require_root(type(self).__name__)
        self._check_installed()
        if self._workdir_arg:
            self._workdir = self._workdir_arg
            self._workdir.mkdir(parents=True, exist_ok=True)
        else:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"mxguard-{self.NAME.lower()}-"))
            self._owns_workdir = True
        os.chmod(self.workdir, 0o755)  # the MTA's unprivileged daemons must traverse it
        if self._port is None:
            self._port = free_port(self.host)
        _RUNNING.add(self)
        try:
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        _RUNNING.discard(self)
        if self._workdir is None:
            return
        self._shutdown()
        if self._owns_workdir and not os.environ.get(KEEP_ENV):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.host}:{self._port} milter={self.milter!r} "
                f"dir={self._workdir}>")
