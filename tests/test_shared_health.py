"""Shared health through a real Redis, under faults, with real guard processes.

Every guard here is ``python -m guard run`` with its store URL pointing at a private
``redis-server`` (or a Sentinel setup); nothing uses the memory store. While a fault
lasts, a thread per guard keeps sending milter transactions (connect, helo, mail, rcpt
to a guarded domain from an untrusted client) over the guard's Unix socket and records
every answer and its latency. The scenarios are built so that the right answer is known
and any answer caused by Redis is wrong:

- guard ``up`` probes a live primary and has ``on_unknown = "accept"``: the right answer
  is the bypass 451; losing its own knowledge would show as ``continue``.
- guard ``down`` probes a port where nothing listens and has ``on_unknown =
  "tempfail"``: the right answer is ``continue`` (primary-down); losing its own
  knowledge would show as a 451.

Each fault also asserts that every callback answered within the SPEC's 250 ms budget,
that traffic kept flowing throughout, and that the fault was logged once per episode
per component (reading and publishing) with one recovery line. The worst latency per
fault is printed (``pytest -s``) and carried in the assertion messages.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from guard.health import Observation, State, Target, Transition
from guard.lookup import BACKOFF_SECONDS
from guard.store.redis import RedisStore
from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import ROOT, GuardProcess, guard_toml
from tests.support.milterclient import MilterClient, MilterError
from tests.support.redis_server import RedisServer, SentinelCluster
from tests.support.smtpserver import free_port

BUDGET = 0.25  # seconds a callback may take (SPEC section 4)
REFRESH = 0.2  # seconds: [store] refresh in guard_toml
STORE_TIMEOUT = 0.1  # seconds: [store] timeout in guard_toml
SPAMMER = "203.0.113.7"
BYPASS_451 = "451 4.7.1 Please deliver mail for example.org to its primary MX"
CONTINUE = "continue"
FAULT_SECONDS = 2.5  # how long each fault lasts
FAULT_STALE_AFTER = "1.5s"  # the least the config allows
MAX_GAP = 0.5  # seconds: the longest pause allowed between two answers of one guard
TRAFFIC_PAUSE = 0.02  # seconds between two transactions of one traffic thread

# Worst callback latency per fault, printed at the end of the module for the record.
WORST: dict[str, tuple[float, int]] = {}


@pytest.fixture(scope="module", autouse=True)
def latency_table() -> Iterator[None]:
    yield
    if WORST:
        print("\nworst callback latency per fault (ms, transactions):")
        for phase, (worst, count) in WORST.items():
            print(f"  {phase:<40} {worst * 1000:7.1f} ms  {count:5d}")


# -- traffic --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic() when the RCPT answer arrived
    answer: str  # the 'y' reply text, a reply name ("continue"), or "error: ..."
    elapsed: float  # seconds: the slowest reply of the transaction


class Traffic:
    """Milter transactions to one guard, one after another, from a thread, timed."""

    def __init__(self, name: str, socket: str) -> None:
        self.name = name
        self.socket = socket
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"traffic-{name}", daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=10)

    def _one(self) -> Sample:
        started = time.monotonic()
        try:
            with MilterClient(self.socket, timeout=2) as c:
                replies = [c.connect("client.example", SPAMMER, 40000),
                           c.helo("client.example"), c.mail("<sender@client.example>"),
                           c.rcpt("<user@example.org>")]
                c.abort()
        except (MilterError, OSError) as e:
            return Sample(time.monotonic(), f"error: {e}", time.monotonic() - started)
        rcpt = replies[-1]
        answer = rcpt.text if rcpt.command == "y" else rcpt.name
        return Sample(time.monotonic(), answer, max(r.elapsed for r in replies))

    def _run(self) -> None:
        while not self._stopping.is_set():
            sample = self._one()
            with self._lock:
                self._samples.append(sample)
            self._stopping.wait(TRAFFIC_PAUSE)

    def between(self, start: float, end: float) -> list[Sample]:
        with self._lock:
            return [s for s in self._samples if start <= s.at <= end]

    def first(self, answer: str, after: float, timeout: float) -> Sample:
        """The first sample after ``after`` answering ``answer``; waits for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for s in self._samples:
                    if s.at > after and s.answer == answer:
                        return s
            time.sleep(0.01)
        last = self.between(after, time.monotonic())[-5:]
        raise AssertionError(f"{self.name}: no {answer!r} within {timeout}s; last: {last}")


def check_window(traffic: Traffic, start: float, end: float, want: str, phase: str) -> float:
    """Every answer in [start, end] is ``want``, in budget, with no long gap; the worst
    latency is recorded under ``phase`` and returned."""
    samples = traffic.between(start, end)
    label = f"{phase} [{traffic.name}]"
    assert len(samples) >= 5, f"{label}: only {len(samples)} transactions"
    worst = max(s.elapsed for s in samples)
    WORST[label] = max((worst, len(samples)), WORST.get(label, (0.0, 0)))
    print(f"\n{label}: {len(samples)} transactions, worst callback {worst * 1000:.1f} ms")
    wrong = [s for s in samples if s.answer != want]
    assert not wrong, (f"{label}: {len(wrong)} of {len(samples)} answers were not {want!r}, "
                       f"e.g. {wrong[:3]}")
    times = [start, *(s.at for s in samples), end]
    gap = max(b - a for a, b in itertools.pairwise(times))
    assert gap < MAX_GAP, f"{label}: no answer for {gap:.2f}s"
    slow = [s for s in samples if s.elapsed >= BUDGET]
    assert not slow, (f"{label}: {len(slow)} transaction(s) over the {BUDGET * 1000:.0f} ms "
                      f"budget; worst {worst * 1000:.1f} ms")
    # No store round trip on the hot path but a bypass's one evidence lookup: a callback
    # that waited on a frozen store takes its whole timeout. After one such wait the
    # lookup leaves the store alone for BACKOFF_SECONDS, so a bypass may wait once per
    # back-off; any other path never. A stray scheduling hiccup or two is not that.
    lookups = int((end - start) / BACKOFF_SECONDS) + 1 if want == BYPASS_451 else 0
    waited = [s for s in samples if s.elapsed >= 0.9 * STORE_TIMEOUT]
    assert len(waited) <= lookups + 2, (
        f"{label}: {len(waited)} transactions took as long as a store call "
        f"({STORE_TIMEOUT * 1000:.0f} ms), more than {lookups} evidence lookup(s) in "
        f"{end - start:.1f}s: does the hot path wait on the store? worst {worst * 1000:.1f} ms")
    return worst


# -- logs -----------------------------------------------------------------------------

COMPONENTS = ("reading health", "publishing")


def episodes(log: str) -> dict[str, tuple[int, int]]:
    """Per store component: (failing lines, recovered lines) in ``log``."""
    return {
        c: (len(re.findall(rf"\({c}\) failing: ", log)),
            len(re.findall(rf"\({c}\) recovered after ", log)))
        for c in COMPONENTS
    }


def reasons(log: str) -> set[str]:
    """The reasons of the decision lines for the untrusted test client in ``log``."""
    return set(re.findall(rf"client={re.escape(SPAMMER)} .*? reason=(\S+)", log))


def wait_recovered(guard: GuardProcess, after: int, timeout: float = 10.0) -> None:
    for c in COMPONENTS:
        guard.wait_for_log(rf"\({c}\) recovered after ", timeout, after)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until ``condition()``; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started


def fresh_from(store: RedisStore, node: str, target: Target, since: float) -> bool:
    """Whether ``node``'s observation of ``target`` in the store is newer than ``since``."""
    try:
        return any(o.node == node and o.target == target and o.observed_at > since
                   for o in store.observations())
    except Exception:  # the store is still coming back
        return False


def written(store: RedisStore, node: Node, since: float) -> Callable[[], bool]:
    """A condition: ``node``'s own observation was written to ``store`` after ``since``."""
    return lambda: fresh_from(store, node.name, node.target, since)


# -- a guard with its traffic ------------------------------------------------------------


@dataclass
class Node:
    name: str  # the guard's [self] node
    guard: GuardProcess
    socket: str
    target: Target
    want: str  # the right RCPT answer throughout
    want_reason: str
    traffic: Traffic


def start_nodes(tmp: Path, store_url: str, live_primary: FakePrimary,
                nodes: list[Node]) -> None:
    """Guard "up" (mx2, live primary) and guard "down" (mx3, nothing listening).

    Their stale_after is shorter than a fault, so the last shared snapshot goes stale
    while the fault lasts and only the guard's own observations can keep it deciding.
    Fills ``nodes`` as it starts them, so the caller can stop what did start."""
    dead_port = free_port()
    specs = [("up", "mx2", live_primary.port, 'on_unknown = "accept"', BYPASS_451, "bypass"),
             ("down", "mx3", dead_port, 'on_unknown = "tempfail"', CONTINUE, "primary-down")]
    for kind, node, port, extra, want, reason in specs:
        socket = f"unix:{tmp}/{kind}.sock"
        config = guard_toml(socket, port, extra, node=node, store=store_url,
                            stale_after=FAULT_STALE_AFTER)
        guard = GuardProcess(config, tmp, kind)
        nodes.append(Node(node, guard.start(), socket, Target("127.0.0.1", port), want,
                          reason, Traffic(kind, socket)))
    for n, state in zip(nodes, ("up", "down"), strict=True):
        n.guard.wait_for_log(rf"target {re.escape(str(n.target))} is {state}")
    for n in nodes:
        n.traffic.start()


def stop_nodes(nodes: list[Node]) -> None:
    for n in nodes:
        n.traffic.stop()
    for n in nodes:  # SIGTERM all first: libmilter takes seconds to notice
        if n.guard.proc is not None:
            n.guard.signal(signal.SIGTERM)
    codes = [n.guard.stop() for n in nodes]
    for n, code in zip(nodes, codes, strict=True):
        log = n.guard.log()
        assert "Traceback" not in log and "callback failed" not in log, log[-3000:]
        assert code == 0, f"{n.guard.config.name} exited {code} on SIGTERM"


def check_nodes(nodes: list[Node], start: float, end: float, phase: str,
                marks: list[int]) -> None:
    """Right answers in budget for the window, one episode per component, right reasons."""
    for n, mark in zip(nodes, marks, strict=True):
        check_window(n.traffic, start, end, n.want, phase)
        log = n.guard.log()[mark:]
        assert reasons(log) == {n.want_reason}, f"{phase} [{n.traffic.name}]: {reasons(log)}"
        count = len(n.traffic.between(start, end))
        assert episodes(log) == {c: (1, 1) for c in COMPONENTS}, (
            f"{phase} [{n.traffic.name}]: want one failing and one recovered line per "
            f"component over {count} transactions, got {episodes(log)}:\n{log[-3000:]}")


@dataclass
class Faults:
    redis: RedisServer  # created stopped: the guards start while it is refused
    store: RedisStore  # the test's own view of the store
    primary: FakePrimary
    nodes: list[Node]
    started: float  # monotonic time the traffic started
    marks: list[int]  # log offsets when the guards started

    def ensure_redis(self) -> None:
        """Redis up and both guards reading and publishing again."""
        if self.redis.running:
            return
        marks = [len(n.guard.log()) for n in self.nodes]
        self.redis.start()
        for n, mark in zip(self.nodes, marks, strict=True):
            wait_recovered(n.guard, mark)

    def settle(self) -> None:
        """Redis up and every guard answering right again (after an earlier failure)."""
        self.ensure_redis()
        now = time.monotonic()
        for n in self.nodes:
            n.traffic.first(n.want, now, 5.0)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    tmp = tmp_path_factory.mktemp("faults")
    redis = RedisServer(port=free_port())
    store = RedisStore(redis.url, timeout=1.0)
    primary = FakePrimary().start()
    nodes: list[Node] = []
    try:
        start_nodes(tmp, redis.url, primary, nodes)
        yield Faults(redis, store, primary, nodes, time.monotonic(), [0, 0])
    finally:
        try:
            stop_nodes(nodes)
        finally:
            primary.stop()
            store.close()
            redis.close()


# -- 1-4: faults of a standalone Redis -------------------------------------------------------


def test_redis_refused_at_start_up_then_coming_up(faults: Faults) -> None:
    assert not faults.redis.running, "the guards must start while Redis is refused"
    time.sleep(1.5)  # serving with no store at all
    came_up, starting = time.time(), time.monotonic()
    faults.redis.start()
    for n in faults.nodes:
        wait_for(written(faults.store, n, came_up), 5.0, f"{n.name}'s observation in Redis")
    took = time.monotonic() - starting
    assert took < 3.0, f"observations reached Redis {took:.2f}s after it started"
    print(f"\nboth observations in Redis {took:.2f}s after starting it")
    for n in faults.nodes:
        wait_recovered(n.guard, 0)
    check_nodes(faults.nodes, faults.started, time.monotonic(), "refused at start-up",
                faults.marks)
    by_node = {o.node: o for o in faults.store.observations()}
    assert by_node["mx2"].state is State.UP and by_node["mx3"].state is State.DOWN
    assert by_node["mx3"].detail.startswith("refused"), by_node["mx3"]


def test_redis_killed_then_restarted(faults: Faults) -> None:
    faults.settle()
    up, down = faults.nodes
    marks = [len(n.guard.log()) for n in faults.nodes]
    start = time.monotonic()
    faults.redis.kill()
    time.sleep(FAULT_SECONDS)
    faults.redis.start()  # same port, empty: the kill lost everything
    restarted, restarted_epoch = time.monotonic(), time.time()

    # Another node's view, written after the restart, must reach the decisions within
    # about one refresh: a fake mx9 says the live primary is down.
    now = time.time()
    mx9_down = Observation(up.target, "mx9", State.DOWN, now, now, None, now, "refused: test")
    faults.store.publish([mx9_down], [Transition(up.target, "mx9", State.UP, State.DOWN, now)])
    published = time.monotonic()
    followed = up.traffic.first(CONTINUE, published, 5.0)
    print(f"\nmx9's DOWN followed {followed.at - restarted:.3f}s after the restart "
          f"({followed.at - published:.3f}s after the publish)")
    assert followed.at - published < REFRESH + 0.3, (
        f"mx9's DOWN reached the decision {followed.at - published:.3f}s after the publish")
    up.guard.wait_for_log(r"action=accept reason=primary-down .*down at mx9: refused: test",
                          after=marks[0])
    # The guards' own observations are written again (the restart emptied Redis).
    for n, mark in zip(faults.nodes, marks, strict=True):
        wait_for(written(faults.store, n, restarted_epoch),
                 3.0, f"{n.name}'s observation after the restart")
        wait_recovered(n.guard, mark)
    end = time.monotonic()

    # up: bypass until mx9's DOWN was published; down: continue all along.
    check_window(up.traffic, start, published, up.want, "kill + restart")
    check_window(down.traffic, start, end, down.want, "kill + restart")
    for n, mark in zip(faults.nodes, marks, strict=True):
        assert episodes(n.guard.log()[mark:]) == {c: (1, 1) for c in COMPONENTS}, \
            n.guard.log()[mark:]

    # mx9 sees it up again: back to the bypass 451.
    now = time.time()
    mx9_up = Observation(up.target, "mx9", State.UP, now, now, now, None, "220 test")
    faults.store.publish([mx9_up], [Transition(up.target, "mx9", State.DOWN, State.UP, now)])
    back = up.traffic.first(BYPASS_451, time.monotonic(), 3.0)
    time.sleep(0.5)
    check_window(up.traffic, back.at, time.monotonic(), up.want, "kill + restart, mx9 up")
    assert reasons(down.guard.log()[marks[1]:]) == {"primary-down"}


def client_pause(redis: RedisServer) -> Callable[[], None]:
    # CLIENT PAUSE blocks the issuing client too (CLIENT UNPAUSE included, Redis 7.0),
    # so the pause ends by itself; the returned resume waits for that.
    pause_ms = int(FAULT_SECONDS * 1000)
    started = time.monotonic()
    redis.admin.client_pause(pause_ms, all=True)
    return lambda: time.sleep(max(0.0, started + FAULT_SECONDS + 0.05 - time.monotonic()))


def sigstop(redis: RedisServer) -> Callable[[], None]:
    redis.pause()
    time.sleep(FAULT_SECONDS)
    return redis.resume


@pytest.mark.parametrize("freeze", [sigstop, client_pause], ids=["sigstop", "client-pause"])
def test_redis_frozen(faults: Faults, freeze: Callable[[RedisServer], Callable[[], None]]
                      ) -> None:
    faults.settle()
    phase = "SIGSTOP" if freeze is sigstop else "CLIENT PAUSE ALL"
    marks = [len(n.guard.log()) for n in faults.nodes]
    start = time.monotonic()
    resume = freeze(faults.redis)
    for n, mark in zip(faults.nodes, marks, strict=True):  # noticed while it lasts
        n.guard.wait_for_log(r"\(reading health\) failing: ", 1.0, mark)
    resume()
    resumed = time.time()
    for n, mark in zip(faults.nodes, marks, strict=True):
        wait_recovered(n.guard, mark)
        wait_for(written(faults.store, n, resumed), 3.0,
                 f"{n.name}'s observation after the resume")
    check_nodes(faults.nodes, start, time.monotonic(), phase, marks)


# -- 5: Sentinel failover -----------------------------------------------------------------


def test_sentinel_failover(sentinel_cluster: SentinelCluster,
                           tmp_path: Path) -> None:
    primary = FakePrimary().start()
    nodes: list[Node] = []
    cluster_store = RedisStore(sentinel_cluster.url, timeout=1.0)
    try:
        start_nodes(tmp_path, sentinel_cluster.url, primary, nodes)
        before = time.time()
        for n in nodes:
            wait_for(written(cluster_store, n, before), 5.0,
                     f"{n.name}'s observation through Sentinel")
        marks = [len(n.guard.log()) for n in nodes]
        start, killed = time.monotonic(), time.time()
        new_master = sentinel_cluster.kill_master()
        promoted = time.time() - killed
        master_store = RedisStore(new_master.url, timeout=1.0)
        try:
            took = {n.name: wait_for(
                written(master_store, n, killed + promoted),
                10.0, f"{n.name}'s observation on the new master") + promoted
                for n in nodes}
            print(f"\nfailover: promoted after {promoted:.2f}s; fresh observations on the "
                  f"new master after {took}")
            for n, mark in zip(nodes, marks, strict=True):
                wait_recovered(n.guard, mark)
            check_nodes(nodes, start, time.monotonic(), "Sentinel failover", marks)
            assert max(took.values()) < promoted + 5.0, took

            # Reads come from the new master too: another node's view there counts.
            up = nodes[0]
            now = time.time()
            master_store.publish(
                [Observation(up.target, "mx9", State.DOWN, now, now, None, now, "refused")],
                [Transition(up.target, "mx9", State.UP, State.DOWN, now)])
            up.traffic.first(CONTINUE, time.monotonic(), 3.0)
        finally:
            master_store.close()
    finally:
        try:
            stop_nodes(nodes)
        finally:
            cluster_store.close()
            primary.stop()


# -- 6, 7: two nodes, one Redis, different views -------------------------------------------


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        pytest.fail(f"{name} is not installed (util-linux / iproute2)")
    return path


class NetnsGuard(GuardProcess):
    """``mx-guard run`` in a network namespace of its own with only ``lo`` up.

    The milter socket and the Redis Unix socket are files, so they cross namespaces;
    TCP to 127.0.0.1 reaches only what listens inside this namespace."""

    def start(self, *extra: str) -> NetnsGuard:
        log = self.logfile.open("ab")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [tool("unshare"), "--net", "sh", "-c", f'{tool("ip")} link set lo up && exec "$@"',
             "sh", sys.executable, "-m", "guard", "run", "-c", str(self.config), *extra],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
        )
        log.close()
        return self


LISTENER = """
import sys
from tests.support.fakeprimary import FakePrimary
primary = FakePrimary(port=int(sys.argv[1])).start()
print("listening", flush=True)
sys.stdin.read()
primary.stop()
"""


class ListenerInNetns:
    """A fake primary on 127.0.0.1:``port`` inside the network namespace of ``pid``."""

    def __init__(self, pid: int, port: int) -> None:
        self.proc = subprocess.Popen(
            [tool("nsenter"), f"--net=/proc/{pid}/ns/net", sys.executable, "-c", LISTENER,
             str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == b"listening\n", f"listener in the namespace failed: {line!r}"

    def close(self) -> None:
        pipes: list[IO[bytes] | None] = [self.proc.stdin, self.proc.stdout]
        for pipe in pipes:
            if pipe is not None:
                pipe.close()
        self.proc.wait(10)


def status(config: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "guard", "status", "-c", str(config), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def target_entry(data: dict[str, Any], domain: str) -> dict[str, Any]:
    [dom] = [d for d in data["domains"] if d["name"] == domain]
    [host] = [h for h in dom["hosts"] if h["role"] == "higher-priority"]
    [target] = host["targets"]
    return dict(target)


def test_two_nodes_one_redis_see_different_things(redis_server: RedisServer,
                                                  tmp_path: Path) -> None:
    primary = FakePrimary().start()  # in the root namespace only
    target = Target("127.0.0.1", primary.port)
    url = redis_server.unix_url  # a file: reachable from B's namespace too
    extra = 'down_grace = "2s"\non_unknown = "tempfail"'
    a = GuardProcess(guard_toml(f"unix:{tmp_path}/a.sock", primary.port, extra, node="mxa",
                                store=url), tmp_path, "a")
    b = NetnsGuard(guard_toml(f"unix:{tmp_path}/b.sock", primary.port, extra, node="mxb",
                              store=url), tmp_path, "b")
    store = RedisStore(url, timeout=1.0)
    nodes = [Node("mxa", a, f"unix:{tmp_path}/a.sock", target, CONTINUE, "primary-down",
                  Traffic("a", f"unix:{tmp_path}/a.sock")),
             Node("mxb", b, f"unix:{tmp_path}/b.sock", target, CONTINUE, "primary-down",
                  Traffic("b", f"unix:{tmp_path}/b.sock"))]
    listener: ListenerInNetns | None = None
    try:
        a.start()
        b.start()
        a.wait_for_log(rf"target {re.escape(str(target))} is up")  # A alone: up
        b.wait_for_log(rf"target {re.escape(str(target))} is down \(was unknown\): refused")
        for n in nodes:
            n.traffic.start()

        # Any fresh down wins: both accept, and both say whose observation it was.
        agreed = max(n.traffic.first(CONTINUE, 0.0, 5.0).at for n in nodes)
        time.sleep(1.0)
        for n in nodes:
            check_window(n.traffic, agreed, time.monotonic(), CONTINUE, "two nodes, B down")
            n.guard.wait_for_log(r"action=accept reason=primary-down .*down at mxb: refused")
        views = {o.node: o for o in store.observations() if o.target == target}
        assert views["mxa"].state is State.UP and views["mxb"].state is State.DOWN, views

        # 7: status, from A's config, asks A (its control socket) and shows both nodes'
        # observations, from A's snapshot of the store, and the history.
        data = json.loads(status(a.config, "--json"))
        assert data["node"] == "mxa" and data["store"].startswith("unix://")
        assert data["health_source"].startswith("the running guard (node mxa, pid ")
        assert {d["name"] for d in data["domains"]} == {"example.org", "flagged.example"}
        [dom] = [d for d in data["domains"] if d["name"] == "example.org"]
        assert dom["known"] and dom["self_preference"] == 20 and dom["action"] == "tempfail"
        assert [(h["host"], h["preference"], h["role"]) for h in dom["hosts"]] == [
            ("mx1.example.org", 10, "higher-priority"), ("mx2.example.org", 20, "self")]
        entry = target_entry(data, "example.org")
        assert entry["target"] == str(target) and entry["state"] == "down"
        assert entry["detail"].startswith("down at mxb: refused")
        obs = {o["node"]: o for o in entry["observations"]}
        assert obs.keys() == {"mxa", "mxb"}
        assert obs["mxa"]["state"] == "up" and obs["mxa"]["last_fail"] is None
        assert obs["mxb"]["state"] == "down" and obs["mxb"]["detail"].startswith("refused")
        history = {(t["node"], t["old"], t["new"]) for t in data["history"]
                   if t["target"] == str(target)}
        assert {("mxa", "unknown", "up"), ("mxb", "unknown", "down")} <= history
        text = status(a.config)
        assert re.search(r"example\.org  action=tempfail .*self at preference 20", text)
        assert re.search(r"\n\s+10  mx1\.example\.org  \(higher-priority\)\n", text)
        assert re.search(rf"{re.escape(str(target))}\s+DOWN\s+since .*down at mxb", text)
        assert re.search(r"node mxa\s+up\s+seen", text)
        assert re.search(r"node mxb\s+down\s+seen .*refused", text)
        assert re.search(r"last transitions:\n(.*\n)*.*mxb\s+unknown -> down", text)

        # B's view recovers (a listener inside its namespace): after down_grace both
        # nodes are back to the bypass 451.
        assert b.proc is not None
        listener = ListenerInNetns(b.proc.pid, primary.port)
        fixed = time.monotonic()
        b.wait_for_log(rf"target {re.escape(str(target))} is up \(was down\)")
        back = {n.name: n.traffic.first(BYPASS_451, fixed, 6.0).at - fixed for n in nodes}
        print(f"\nbypass 451 again after {back} (down_grace 2s)")
        assert all(1.5 < t < 4.5 for t in back.values()), back
        settled = time.monotonic()
        time.sleep(1.0)
        for n in nodes:
            check_window(n.traffic, settled, time.monotonic(), BYPASS_451, "two nodes, B up")
        data = json.loads(status(a.config, "--json"))
        entry = target_entry(data, "example.org")
        assert entry["state"] == "up" and entry["detail"] == "up at mxa,mxb", entry
        assert ("mxb", "down", "up") in {(t["node"], t["old"], t["new"])
                                         for t in data["history"]}
    finally:
        try:
            if listener is not None:
                listener.close()
            stop_nodes(nodes)
        finally:
            store.close()
            primary.stop()
