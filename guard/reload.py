"""Reload: apply a changed config file to the running guard, without a restart.

Triggers: ``mx-guard reload`` (the ``reload`` control command, which answers with
the outcome; systemd's ``ExecReload=`` runs it) and SIGUSR1 (SIGHUP cannot be used:
libmilter stops on it).

What a reload keeps: every milter session (nothing is stopped or re-bound), the
prober's state per target (hysteresis counts, last ok, last fail: probing is not
restarted, so down_grace is not forgotten), the health snapshot, and the MX sets of
unchanged domains. What it applies: domains, policy (actions, trusted networks,
down_grace, replies, header), probe settings (mode, intervals, timeout, rise, fall,
quorum, helo), DNS settings, [self] names and addresses, [store] refresh, and [log].

Settings that only a restart can change (``RESTART_ONLY``) keep their running value;
the log names them. A file that fails validation changes nothing: one log line says
why, and the running config stays.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from guard.config import Config, ConfigError, load_config
from guard.control import BadRequest, CommandTable

if TYPE_CHECKING:
    from guard.logsetup import Logs
    from guard.service import Guard

log = logging.getLogger("guard.reload")

RELOAD_SIGNAL = signal.SIGUSR1

# (section, key): bound at start (sockets, store connection, node identity in the
# store, the prober's concurrency bound, the role and its queue, the exporter), so
# kept until a restart.
RESTART_ONLY = (
    ("milter", "socket"), ("milter", "timeout"),
    ("store", "url"), ("store", "prefix"), ("store", "timeout"),
    ("self", "node"),
    ("probe", "concurrency"),
    ("witness", "role"), ("witness", "queue"),
    ("metrics", "listen"),
    ("control", "socket"), ("control", "timeout"),
)
_ATTR = {"self": "me"}  # TOML table -> Config attribute, where they differ
_TABLE = {attr: table for table, attr in _ATTR.items()}


@dataclass(frozen=True)
class Outcome:
    applied: bool
    path: str
    error: str = ""
    changed: tuple[str, ...] = ()     # sections whose values changed, "[[domain]]"
    kept: tuple[str, ...] = ()        # restart-only keys that differ, as "[section] key"

    def as_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "path": self.path, "error": self.error,
                "changed": list(self.changed), "kept": list(self.kept)}


def _section(config: Config, table: str) -> Any:
    return getattr(config, _ATTR.get(table, table))


def keep_restart_only(running: Config, new: Config) -> tuple[Config, tuple[str, ...]]:
    """``new`` with every restart-only key at its running value, and those that differed."""
    kept: list[str] = []
    sections: dict[str, Any] = {}
    for table, key in RESTART_ONLY:
        attr = _ATTR.get(table, table)
        now, wanted = getattr(_section(running, table), key), getattr(_section(new, table), key)
        if now != wanted:
            kept.append(f"[{table}] {key}")
            base = sections.get(attr, _section(new, table))
            sections[attr] = replace(base, **{key: now})
    return replace(new, **sections), tuple(kept)


def changed_sections(running: Config, new: Config) -> tuple[str, ...]:
    out = [f"[{_TABLE.get(f.name, f.name)}]" for f in fields(Config)
           if f.name not in ("domains", "path")
           and getattr(running, f.name) != getattr(new, f.name)]
    if running.domains != new.domains:
        out.append("[[domain]]")
    return tuple(out)


class Reloader:
    """Applies reloads to one running guard, one at a time."""

    def __init__(self, guard: Guard, logs: Logs | None = None) -> None:
        self._guard = guard
        self._logs = logs
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._signals = threading.Thread(target=self._wait_for_signal, name="reload-signal",
                                         daemon=True)

    def reload(self) -> Outcome:
        with self._lock:
            return self._reload()

    def register(self, commands: CommandTable) -> None:
        """The ``reload`` control command: reloads, answers with the outcome."""
        def command(args: Mapping[str, Any]) -> dict[str, Any]:
            if args:
                raise BadRequest("reload takes no arguments")
            return self.reload().as_dict()

        commands.add("reload", command, "re-read the config file and apply it")

    def _reload(self) -> Outcome:
        running = self._guard.config
        path = running.path
        try:
            new = load_config(path)
        except ConfigError as e:
            log.error("reload refused, the running config stays: %s", e)
            return Outcome(False, path, error=str(e))
        effective, kept = keep_restart_only(running, new)
        if kept:
            log.warning("reload: %s cannot change while running; the running value%s "
                        "stay%s until a restart", ", ".join(kept), "s" if len(kept) > 1 else "",
                        "" if len(kept) > 1 else "s")
        changed = changed_sections(running, effective)
        self.apply(effective)
        log.info("config reloaded from %s: %s", path,
                 f"changed {', '.join(changed)}" if changed else "nothing changed")
        return Outcome(True, path, changed=changed, kept=kept)

    def apply(self, config: Config) -> None:
        """Hand ``config`` to every part. The order matters: MX sets and the prober
        first, so the first decision under the new policy sees the new domains."""
        guard = self._guard
        guard.directory.reconfigure(config)
        if guard.prober is not None:
            guard.prober.reconfigure(config)
        guard.refresher.reconfigure(config.store.refresh, config.aggregation)
        if guard.witness is not None:
            guard.witness.reconfigure(config)
        guard.config = config  # one reference swap: a callback sees old or new
        if self._logs is not None:
            self._logs.apply(config.log)

    # -- SIGUSR1 ------------------------------------------------------------------------

    def start_signal_thread(self) -> None:
        """Reload on SIGUSR1. The signal must be blocked in every thread (see
        ``block_reload_signal``) so that only this thread's sigwait takes it."""
        self._signals.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._signals.is_alive():
            self._signals.join(timeout=5)

    def _wait_for_signal(self) -> None:
        while not self._stopping.is_set():
            if signal.sigtimedwait({RELOAD_SIGNAL}, 1.0) is None:
                continue
            log.info("reload requested by %s", RELOAD_SIGNAL.name)
            try:
                self.reload()
            except Exception:  # a bug in a reload must not end the guard or reloading
                log.exception("reload failed; the running config stays")


def block_reload_signal() -> None:
    """Block SIGUSR1 in this thread and every thread it starts; call before any starts."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {RELOAD_SIGNAL})
