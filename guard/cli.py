"""The ``mx-guard`` command line.

Exit codes: 0 ok, 1 bad config or input, 2 usage (argparse's own).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from guard import __version__, traplist
from guard.config import Config, ConfigError, config_path, load_config
from guard.control import (
    ControlError,
    ControlUnavailable,
    ask,
    control_socket_path,
    control_socket_path_of_file,
)
from guard.discovery import MxDirectory, directory_for
from guard.evidence import Evidence, EvidenceRules, bypass_try, verified_name
from guard.live import render_prober, traps_of
from guard.logsetup import Logs
from guard.policy import (
    Connection,
    Reason,
    client_address,
    decide,
    iso_time,
    recipient_domain,
    with_evidence,
)
from guard.reload import block_reload_signal
from guard.simulate.cli import add_arguments as simulate_arguments
from guard.simulate.cli import run as cmd_simulate
from guard.status import (
    HealthView,
    gather_health,
    render_status,
    render_verdict,
    status_data,
    to_json,
    verdict_data,
)
from guard.store import Store, StoreError, open_store

EXIT_OK = 0
EXIT_BAD_INPUT = 1

log = logging.getLogger("guard")


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def block_stop_signals() -> None:
    """Block the stop signals in this thread and every thread it starts from now on.

    libmilter waits for them in a thread of its own (sigwait); any other thread that
    left them unblocked would take the signal instead and die by its default action,
    without draining connections. Call before any thread starts.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    store = open_store(config)  # the store URL is parsed here; nothing is contacted
    store.close()
    dns = sum(1 for d in config.domains if d.from_dns)
    print(f"{config.path}: ok ({len(config.domains)} domain(s), {dns} from DNS, "
          f"store {store.description}, action {config.policy.action})")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    # libmilter is loaded only by the commands that need it.
    from guard.control import ControlServer
    from guard.live import commands_for
    from guard.milter import serve
    from guard.reload import Reloader
    from guard.service import Guard

    config = _load(args)
    args.logs.apply(config.log)
    guard = Guard(config)
    guard.start()
    reloader = Reloader(guard, args.logs)
    commands = commands_for(guard)
    reloader.register(commands)
    control = ControlServer(control_socket_path(config), commands, config.control.timeout)
    control.start()
    reloader.start_signal_thread()
    try:
        serve(guard)
    finally:
        reloader.stop()
        control.stop()
        guard.stop()
    return EXIT_OK


def cmd_probe(args: argparse.Namespace) -> int:
    from guard.service import Guard

    config = _load(args)
    args.logs.apply(config.log)
    if config.store.url.startswith("memory://"):
        log.warning("mx-guard probe with the memory:// store shares its observations "
                    "with nobody; set [store] url to a Redis URL")
    guard = Guard(config)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.set())
    guard.start()
    log.info("probing only (no milter); stop with SIGTERM")
    stopping.wait()
    guard.stop()
    return EXIT_OK


def _ask_guard(config: Config, command: str, request: dict[str, Any]) -> tuple[Any, str]:
    """The running guard's answer, or None and why there is none."""
    try:
        return ask(control_socket_path(config), command, request), ""
    except ControlUnavailable as e:
        return None, f"no running guard answers on {e}"


def _current_view(config: Config, why_not_live: str) -> tuple[MxDirectory, HealthView]:
    """MX sets looked up now, and health as the store (or a probe now) has it."""
    directory = directory_for(config)
    directory.refresh_due()
    store = open_store(config)
    try:
        view = gather_health(config, store, directory)
    finally:
        store.close()
    return directory, replace(view, source=f"{why_not_live}, so: {view.source}")


def cmd_explain(args: argparse.Namespace) -> int:
    config = _load(args)
    client = client_address(args.client)
    if client is None:
        print(f"mx-guard explain: --client {args.client!r} is not an IP address",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    domain = recipient_domain(args.rcpt)
    if domain is None:
        print(f"mx-guard explain: --rcpt {args.rcpt!r} has no domain", file=sys.stderr)
        return EXIT_BAD_INPUT
    live, why_not = _ask_guard(config, "explain", {
        "client": str(client), "rcpt": args.rcpt, "from": args.sender, "helo": args.helo,
        "authenticated": args.authenticated, "client_name": args.client_name})
    if live is not None:
        if args.json:
            sys.stdout.write(to_json({**live["verdict"], "from": args.sender}))
        else:
            sys.stdout.write(f"client:  {client}\nfrom:    <{args.sender}>\n{live['text']}")
        return EXIT_OK
    directory, view = _current_view(config, why_not)
    conn = Connection(client, time.time(), args.helo, args.authenticated,
                      verified_name(args.client_name, None))
    verdict = decide(conn, domain, directory.get(domain), view.snapshot, config)
    evidence_source = "none needed (not a bypass)"
    if verdict.reason is Reason.BYPASS:
        evidence, evidence_source = _peek_evidence(config, conn, args.sender, args.rcpt)
        verdict = with_evidence(verdict, evidence, config)
    if args.json:
        data = verdict_data(verdict, config.me.node, view.source)
        sys.stdout.write(to_json({**data, "from": args.sender,
                                  "evidence_source": evidence_source}))
    else:
        sys.stdout.write(f"client:  {client}\nfrom:    <{args.sender}>\n")
        sys.stdout.write(render_verdict(verdict, config.me.node, view.source))
        sys.stdout.write(f"evidence: {evidence_source}\n")
    return EXIT_OK


def _peek_evidence(config: Config, conn: Connection, sender: str,
                   rcpt: str) -> tuple[Evidence | None, str]:
    """What the store knows of this try, counting nothing."""
    assert conn.client is not None
    store = _shared_store(config, "explain")
    if store is None:
        return None, "unknown here (memory store): the plain action is shown"
    bypass = bypass_try(conn.client, conn.client_name, sender, rcpt, conn.connected_at,
                        config.release)
    try:
        return (store.peek_bypass(bypass, EvidenceRules.of(config)),
                f"store {store.description}, as if this were the next try (not counted)")
    except StoreError as e:
        return None, f"store {store.description} unreachable ({e}): the plain action applies"
    finally:
        store.close()


def _shared_store(config: Config, what: str) -> Store | None:
    """The store, unless it is the running guard's private memory (then say so)."""
    if config.store.url.startswith("memory://"):
        print(f"mx-guard {what}: the memory:// store lives inside the running guard and "
              "cannot be read from here; with a Redis store it can", file=sys.stderr)
        return None
    return open_store(config)


def cmd_traps(args: argparse.Namespace) -> int:
    config = _load(args)
    now = time.time()
    live, why_not = _ask_guard(config, "traps", {})
    if live is not None:
        traps = [t for t in traps_of(live) if t.count >= args.min]
    else:
        print(f"mx-guard traps: {why_not}; reading the store", file=sys.stderr)
        store = _shared_store(config, "traps")
        if store is None:
            return EXIT_BAD_INPUT
        try:
            traps = [t for t in store.traps(now, config.traps.ttl) if t.count >= args.min]
        finally:
            store.close()
    header = (f"mx-guard traps, {iso_time(now)}: {len(traps)} client(s) with at least "
              f"{args.min} bypass(es) within {config.traps.ttl:g}s")
    if args.json or args.format == "json":
        sys.stdout.write(traplist.render_json(traps))
    elif args.format == "nft":
        sys.stdout.write(traplist.render_nft(traps, header))
    elif args.format == "rbldnsd":
        sys.stdout.write(traplist.render_rbldnsd(traps, header))
    else:
        sys.stdout.write(traplist.render_plain(traps))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    data, why_not = _ask_guard(config, "status", {})
    if data is not None:
        text = render_status(data) + render_prober(data["prober"], data["time"])
        sys.stdout.write(to_json(data) if args.json else text)
        return EXIT_OK
    directory, view = _current_view(config, why_not)
    data = status_data(config, directory, view)
    sys.stdout.write(to_json(data) if args.json else render_status(data))
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    path = control_socket_path_of_file(config_path(args.config))
    if path is None:  # not even TOML: no socket to find, and the guard would refuse it
        try:
            _load(args)
        except ConfigError as e:
            print(f"mx-guard reload: refused, the running guard was not asked: {e}",
                  file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        outcome = ask(path, "reload", {}, timeout=30)
    except ControlUnavailable as e:
        print(f"mx-guard reload: no running guard answers on {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not outcome["applied"]:
        print(f"mx-guard reload: refused, the running config stays: {outcome['error']}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    changed = ", ".join(outcome["changed"]) or "nothing"
    print(f"{outcome['path']}: reloaded, changed {changed}")
    if outcome["kept"]:
        print(f"kept until a restart: {', '.join(outcome['kept'])}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mx-guard",
        description="Anti-spam milter for secondary MX hosts: flags or tempfails mail "
        "that bypassed a healthy primary MX.",
    )
    parser.add_argument("--version", action="version", version=f"mx-guard {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="config file (default: $MX_GUARD_CONFIG "
                        "or /etc/mx-guard/guard.toml)")
    common.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", parents=[common], help="run the milter, prober and refresher")
    sub.add_parser("probe", parents=[common], help="run the prober only")
    sub.add_parser("check-config", parents=[common], help="validate the config file")
    sub.add_parser("reload", parents=[common], help="make the running guard re-read its "
                   "config file (as SIGUSR1 does)")
    p = sub.add_parser("status", parents=[common], help="domains, MX tiers and health")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("explain", parents=[common], help="the verdict for a client and "
                       "recipient, now, and why")
    p.add_argument("--client", required=True, help="client IP address")
    p.add_argument("--rcpt", required=True, help="recipient address")
    p.add_argument("--from", dest="sender", default="", help="envelope sender")
    p.add_argument("--helo", default="")
    p.add_argument("--authenticated", action="store_true",
                   help="the client authenticated (SMTP AUTH)")
    p.add_argument("--client-name", default=None, metavar="NAME",
                   help="the client's host name as the MTA verified it (sender pools)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("traps", parents=[common], help="clients that bypassed a healthy "
                       "primary and were neither released nor seen there")
    p.add_argument("--min", type=int, default=1, metavar="N",
                   help="only clients with at least N bypasses")
    p.add_argument("--format", choices=["plain", "json", "nft", "rbldnsd"], default="plain")
    p.add_argument("--json", action="store_true", help="the same as --format json")
    p = sub.add_parser("simulate", parents=[common], help="replay a scenario of mail on a "
                       "virtual clock through the guard's own decisions")
    simulate_arguments(p)
    return parser


COMMANDS = {
    "run": cmd_run,
    "probe": cmd_probe,
    "check-config": cmd_check_config,
    "explain": cmd_explain,
    "status": cmd_status,
    "traps": cmd_traps,
    "reload": cmd_reload,
    "simulate": cmd_simulate,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        block_stop_signals()  # before the log writer thread starts
        block_reload_signal()
    args.logs = Logs(args.log_level, background=args.command in ("run", "probe"))
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"mx-guard: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StoreError as e:
        print(f"mx-guard: store: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ControlError as e:
        print(f"mx-guard: the running guard refused: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        args.logs.stop()  # writes out what is still queued


if __name__ == "__main__":
    sys.exit(main())
