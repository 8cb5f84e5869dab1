"""The Prometheus exporter of a running guard, read over HTTP after real traffic."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import GuardProcess, guard_toml
from tests.support.milterclient import MilterClient
from tests.support.smtpserver import free_port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def value(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert m, f"no {series} in:\n{text}"
    return float(m.group(1))


def test_metrics_count_decisions_probes_targets_and_latency(tmp_path: Path) -> None:
    port = free_port()
    socket = f"unix:{tmp_path}/guard.sock"
    with FakePrimary() as mx1:
        config = guard_toml(socket, mx1.port, extra=f'[metrics]\nlisten = "127.0.0.1:{port}"')
        with GuardProcess(config, tmp_path) as guard:
            guard.start()
            guard.wait_for_log(r"target 127\.0\.0\.1:\d+ is up")
            for rcpt in ("a@example.org", "b@example.org", "c@unguarded.example"):
                with MilterClient(socket, timeout=2) as c:
                    c.connect("client.example", "203.0.113.7", 40000)
                    c.mail("<s@client.example>")
                    c.rcpt(f"<{rcpt}>")
                    c.abort()
            guard.wait_for_log(r"rcpt=<c@unguarded\.example>.*reason=not-secondary")
            text = scrape(port)
    assert value(text, 'mxguard_decisions_total{action="tempfail",reason="bypass"}') == 2
    assert value(text, 'mxguard_decisions_total{action="accept",reason="not-secondary"}') == 1
    assert value(text, 'mxguard_probes_total{result="ok"}') >= 2
    assert value(text, 'mxguard_targets{state="up"}') == 1
    assert value(text, 'mxguard_callback_seconds_count{callback="envrcpt"}') == 3
    assert value(text, 'mxguard_callback_seconds_bucket{callback="envrcpt",le="0.25"}') == 3
    assert value(text, "mxguard_store_degraded") == 0
