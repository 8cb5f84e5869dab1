"""``make bench``: what the guard costs, as ratios against baselines measured in one run.

Sections (each module's header says how it measures):
  milter   direct milter protocol, sessions/s at 1, 8 and 32 clients: the guard (memory
           and Redis store, bypass and trusted paths) against a no-op pymilter milter
           with the same callbacks; store round trips per session (bench_milter.py)
  mta      Postfix per message (sequential p50) and messages/s with smtp-source at 1
           and 20 sessions, for no milter, a no-op milter, the guard on a Unix and on a
           TCP socket; Sendmail with the guard on a Unix and a TCP socket (bench_mta.py)
  core     decide() with 100 and 10,000 domains, a probe cycle of 2,000 targets, start
           time and memory with 10,000 domains (bench_core.py)
  evidence a witness's record readable by a secondary after the connect (p99), and the
           RCPT callback of a bypass with Redis evidence at 1 and 8 clients
           (evidence_bench.py)
``python -m tests.support.bench [SECTION...]`` runs some; the table goes to stdout and
every number to bench.json (or $BENCH_JSON). Medians throughout; the machines here are
shared and noisy, so read the ratios, which compare numbers taken side by side.
Needs root (private Postfix and Sendmail) and the test dependencies (make test-deps).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tests.support import bench_core, bench_milter, bench_mta, evidence_bench
from tests.support.smtp import guard_socket_dir

SECTIONS = {"milter": bench_milter.run, "mta": bench_mta.run, "core": bench_core.run,
            "evidence": evidence_bench.run}


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, Linux {platform.release()}, " \
           f"Python {platform.python_version()}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def table(r: dict[str, Any]) -> str:
    out = [f"mx-guard bench, {r['date']}, {r['machine']}"]
    if "milter" in r:
        m = r["milter"]["sessions_per_s"]
        noop = m["noop"]
        clients = list(noop)
        out += ["", "Direct milter protocol, whole sessions/s (ratio to the no-op milter)",
                f"  {'':24}" + "".join(f"{str(c) + ' client(s)':>22}" for c in clients)]
        for name, by in m.items():
            out.append(f"  {name:24}" + "".join(
                f"{by[c]:>13.0f} ({_ratio(by[c], noop[c]):>5})" for c in clients))
        trips = r["milter"]["redis_round_trips"]
        out.append("  store round trips per session (Redis): "
                   + ", ".join(f"{k} {v:.2f}" for k, v in trips.items()))
    if "mta" in r:
        seq = r["mta"]["postfix_sequential"]
        out += ["", "Postfix, one SMTP session at a time, per message",
                f"  {'':12}{'p50 ms':>9}{'p95 ms':>9}{'/ none':>8}"]
        for name, v in seq.items():
            out.append(f"  {name:12}{v['p50_ms']:>9.2f}{v['p95_ms']:>9.2f}"
                       f"{_ratio(v['p50_ms'], seq['none']['p50_ms']):>8}")
        out.append(f"  guard inet - unix p50: "
                   f"{seq['guard-inet']['p50_ms'] - seq['guard-unix']['p50_ms']:+.2f} ms")
        tput = r["mta"]["postfix_msgs_per_s"]
        out += ["", "Postfix, smtp-source to smtp-sink, messages/s (ratio to no milter)"]
        for sessions, by in tput.items():
            out.append(f"  {sessions:>2} session(s): " + "  ".join(
                f"{n} {v:.0f} ({_ratio(v, by['none'])})" for n, v in by.items()))
        sm = r["mta"]["sendmail_sequential"]
        out += ["", "Sendmail, one SMTP session at a time, per message"]
        for name, v in sm.items():
            out.append(f"  guard-{name:7} p50 {v['p50_ms']:7.2f} ms   p95 {v['p95_ms']:7.2f} ms")
        out.append(f"  guard inet - unix p50: "
                   f"{sm['inet']['p50_ms'] - sm['unix']['p50_ms']:+.2f} ms")
    if "core" in r:
        c = r["core"]
        out += ["", "The parts alone"]
        for n, v in c["decide"].items():
            out.append(f"  decide(), {n:>6} domains: {v['decide_us']:6.2f} us per call "
                       f"({v['decide_us'] / v['dict_lookup_us']:.0f}x a dict lookup)")
        p = c["probe_cycle"]
        out.append(f"  probe cycle, {p['targets']} targets ({p['down_or_unknown']} silent or "
                   f"refusing): first round {p['first_round_s']:.2f} s; per 10 s cycle "
                   f"{p['probes_per_cycle']:.0f} probes, {p['cpu_s_per_cycle']:.2f} CPU-s")
        s = c["startup"]
        out.append(f"  mx-guard run, {s['domains']} domains: listening after "
                   f"{s['start_s']:.2f} s, RSS {s['rss_mb']:.0f} MB")
    if "evidence" in r:
        e = r["evidence"]
        w = e["witness"]
        out += ["", "Evidence",
                f"  witness connect -> record readable by a secondary: p50 {w['p50_ms']:.2f} ms, "
                f"p99 {w['p99_ms']:.2f} ms ({w['samples']} connects; target p99 100 ms)"]
        for n, b in e["bypass"].items():
            out.append(f"  bypass RCPT with Redis evidence, {n} client(s): p50 "
                       f"{b['p50_ms']:.2f} ms, p99 {b['p99_ms']:.2f} ms, max {b['max_ms']:.2f} ms "
                       f"({b['rcpts']} RCPTs)")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    wanted = argv or list(SECTIONS)
    unknown = set(wanted) - SECTIONS.keys()
    if unknown:
        print(f"unknown section(s) {sorted(unknown)}; choose from {list(SECTIONS)}",
              file=sys.stderr)
        return 2
    # Postfix's processes (user postfix) must reach the work and socket directories.
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"mx-guard-bench-{os.getpid()}"
    work.mkdir(parents=True, mode=0o755)
    sockets = guard_socket_dir()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "machine": machine()}
    started = time.perf_counter()
    try:
        for name in wanted:
            results[name] = SECTIONS[name](work, sockets)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    results["bench_seconds"] = time.perf_counter() - started
    path = Path(os.environ.get("BENCH_JSON", "bench.json"))
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"\n({results['bench_seconds']:.0f} s; every number in {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
