"""The simulator: every shipped scenario against the goals, determinism, sender models.

Goals (SPEC section 10), per shipped scenario in conf/scenarios/:
- no legitimate message lost;
- legitimate delay p95 within one sender retry interval: what the guard adds to each
  legitimate population's p95 (against the same scenario with ``action = "dry-run"``,
  where the world alone delays mail: a greylisting primary, a dead route) is at most
  the model's first retry gap plus what the retried try spends on the way (one connect
  timeout past a dead primary, a second of SMTP round trips);
- at least 99 % of out-of-order spam (spam that reached a secondary while the primary
  would have taken it) stopped or flagged.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from guard.config import ConfigError
from guard.simulate.primary import Condition, Episode, Primary, SenderTimeouts
from guard.simulate.report import Summary, summarize, to_json, totals
from guard.simulate.scenario import (
    Population,
    ScenarioError,
    load_scenario,
    parse_scenario,
)
from guard.simulate.senders import (
    Bot,
    Exchange,
    Exim,
    GmailPool,
    Message,
    Postfix,
    Qmail,
    SenderHost,
    Sendmail,
)
from guard.simulate.world import EPOCH, Results, simulate

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((ROOT / "conf" / "scenarios").glob("*.toml"))
SPEC_FIELDS = ["legit", "messages", "delivered", "lost", "delay_p50_s", "delay_p95_s",
               "delay_max_s", "at_secondary", "stopped", "flagged"]


ROUND_TRIPS_S = 1.0


@cache
def run(path: Path) -> Results:
    return simulate(load_scenario(path))


@cache
def without_guard(path: Path) -> dict[str, Summary]:
    """The same world with the guard deciding but changing nothing (dry-run)."""
    scenario = load_scenario(path)
    guard = {**scenario.guard, "policy": {**scenario.guard.get("policy", {}),
                                          "action": "dry-run"}}
    return summarize(simulate(dataclasses.replace(scenario, guard=guard)))


def test_the_scenarios_ship() -> None:
    names = {p.stem for p in SCENARIOS}
    assert {"normal", "outage", "flapping", "ipv6-broken", "greylisting", "witness",
            "two-secondaries"} <= names


# -- the goals, per shipped scenario ---------------------------------------------------

@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_no_legitimate_message_is_lost(path: Path) -> None:
    results = run(path)
    lost = {n: s.lost for n, s in summarize(results).items() if s.legit and s.lost}
    assert lost == {}


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_legitimate_delay_p95_is_within_one_retry_interval(path: Path) -> None:
    results = run(path)
    baseline = without_guard(path)
    over = {}
    for name, s in summarize(results).items():
        model = results.models[name]
        allowed = (baseline[name].delay_p95_s + model.retry_interval + model.timeouts.connect
                   + ROUND_TRIPS_S)
        if s.legit and s.delay_p95_s > allowed:
            over[name] = (s.delay_p95_s, allowed)
    assert over == {}


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_out_of_order_spam_is_stopped_or_flagged(path: Path) -> None:
    spam = totals(run(path))["spam"]
    assert spam.out_of_order > 0, "a scenario without out-of-order spam proves nothing"
    assert spam.caught_share >= 0.99, (spam.out_of_order, spam.out_of_order_caught)


# -- determinism and output ------------------------------------------------------------

SMALL = {
    "scenario": {"name": "small", "duration": "6h", "seed": 3},
    "primary": {"episode": [{"at": "2h", "for": "30m", "condition": "refused"}]},
    "population": [
        {"model": "postfix", "messages": 40}, {"model": "exim", "messages": 30},
        {"model": "gmail", "messages": 30}, {"model": "broken-route", "messages": 10},
        {"model": "bot-lowest", "messages": 300},
    ],
}


def test_a_seed_gives_the_same_run_and_another_seed_another() -> None:
    scenario = parse_scenario(SMALL)
    first, again = to_json(simulate(scenario)), to_json(simulate(scenario))
    assert first == again
    assert to_json(simulate(scenario, seed=4)) != first


def test_a_seed_gives_the_same_run_in_another_process() -> None:
    """Nothing depends on Python's per-process hash salt (set iteration order)."""
    outputs = set()
    for salt in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-m", "guard", "simulate", "--json", "--seed", "5",
             str(ROOT / "conf/scenarios/two-secondaries.toml")],
            capture_output=True, text=True, timeout=120, check=True,
            env={**os.environ, "PYTHONHASHSEED": salt})
        outputs.add(done.stdout)
    assert len(outputs) == 1


def test_json_has_exactly_the_spec_fields() -> None:
    data = json.loads(to_json(simulate(parse_scenario(SMALL))))
    assert set(data) == {"populations", "totals"}
    assert list(data["populations"]) == ["postfix", "exim", "gmail", "broken-route",
                                         "bot-lowest"]
    for fields in data["populations"].values():
        assert list(fields) == SPEC_FIELDS
    assert set(data["totals"]) == {"legit", "spam"}
    assert list(data["totals"]["legit"]) == SPEC_FIELDS[1:]
    assert data["populations"]["bot-lowest"]["legit"] is False


def test_the_command_prints_the_outage_table() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "guard", "simulate", str(ROOT / "conf/scenarios/outage.toml")],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("scenario outage (seed 1)")
    rows = [line.split()[0] for line in done.stdout.splitlines()[2:]]
    assert "postfix" in rows and "bot-lowest" in rows


def test_a_bad_scenario_is_refused_with_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[population]]\nmodel = "postfix"\nmesages = 3\n')
    with pytest.raises(ScenarioError, match=r"bad.toml: \[\[population\]\] #1: unknown key "
                                            r"'mesages'"):
        load_scenario(bad)
    bad.write_text('[guard.probe]\nintervall = "1s"\n')
    with pytest.raises(ConfigError, match=r"bad.toml \[guard\]: \[probe\] intervall: unknown"):
        simulate(load_scenario(bad))
    bad.write_text('[guard.self]\nnode = "x"\n')
    with pytest.raises(ScenarioError, match=r"set by the simulator"):
        load_scenario(bad)


def test_the_guard_decides_in_the_simulation() -> None:
    """A bot at the secondary of a healthy primary meets the guard's default tempfail;
    the same bot during an outage is accepted: the verdicts are decide()'s."""
    results = simulate(parse_scenario({
        "scenario": {"duration": "4h"},
        "primary": {"episode": [{"at": "2h", "for": "1h", "condition": "refused"}]},
        "population": [{"model": "bot-lowest", "messages": 400}],
    }))
    msgs = results.messages["bot-lowest"]
    during = [m for m in msgs if EPOCH + 2 * 3600 + 60 < m.submitted < EPOCH + 3 * 3600]
    before = [m for m in msgs if m.submitted < EPOCH + 2 * 3600 - 120]  # retries too
    assert during and all(m.delivered_at is not None for m in during)
    assert {r for m in during for r in m.reasons} == {"primary-down"}
    assert before and all(m.delivered_at is None for m in before)
    assert {r for m in before for r in m.reasons} == {"bypass"}


# -- sender models' schedules ----------------------------------------------------------

def message(submitted: float = 0.0) -> Message:
    return Message("p", 0, "a@b.example", "u@example.org", submitted,
                   SenderHost("198.18.0.25", "2001:db8::25", None, phase=0.25), "4")


def schedule(model: Postfix | Exim | Qmail | Exchange | GmailPool | Sendmail, tries: int,
             ) -> list[float]:
    """Times of the tries of a message every try of which fails, from the first try."""
    msg, now, times = message(), 0.0, [0.0]
    rng = random.Random(1)
    for n in range(1, tries):
        msg.tries = n
        gap = model.retry_gap(msg, now, rng)
        assert gap is not None
        now += gap
        times.append(round(now, 1))
    return times


def test_postfix_backs_off_from_300s_doubling_to_4000s() -> None:
    assert schedule(Postfix(), 8) == [0, 300, 600, 1200, 2400, 4800, 8800, 12800]


def test_exim_follows_its_default_retry_rule() -> None:
    times = schedule(Exim(), 12)
    assert times[:9] == [i * 900.0 for i in range(9)]  # F,2h,15m
    gaps = [b - a for a, b in itertools.pairwise(times[8:])]
    assert gaps == [3600.0, 5400.0, 8100.0]  # G,16h,1h,1.5
    assert Exim.rule_gap(20 * 3600, 30) == 6 * 3600  # F,4d,6h
    assert Exim.rule_gap(4 * 86400 + 1, 40) is None


def test_qmail_retries_at_400_n_squared() -> None:
    assert schedule(Qmail(), 5) == [0, 400, 1600, 3600, 6400]


def test_exchange_retries_after_1_5_10_then_every_15_minutes() -> None:
    times = schedule(Exchange(), 6)
    assert [b - a for a, b in itertools.pairwise(times)] == [60, 300, 600, 900, 900]


def test_gmail_pool_retries_at_the_observed_minutes_from_new_addresses() -> None:
    assert schedule(GmailPool(), 6)[1:] == [m * 60.0 for m in (6, 29, 57, 99, 162)]
    rng = random.Random(2)
    addresses = {GmailPool().client(message(), rng)[0].v4 for _ in range(9)}
    assert len(addresses) >= 7


def test_sendmail_waits_for_its_next_queue_run() -> None:
    times = schedule(Sendmail(), 4)
    assert times[1] == 0.25 * 1800  # this machine's queue runner is a quarter in
    assert times[2] - times[1] == 1800 and times[3] - times[2] == 1800


def test_about_a_third_of_bots_retry_within_a_minute() -> None:
    rng = random.Random(5)
    gaps = []
    for _ in range(3000):
        msg = message()
        msg.tries = 1
        gaps.append(Bot().retry_gap(msg, 0.0, rng))
    retried = [g for g in gaps if g is not None]
    assert 0.28 < len(retried) / len(gaps) < 0.38
    assert all(5 <= g <= 60 for g in retried)


def test_exim_skips_a_failed_primary_for_its_retry_time() -> None:
    """After a failed connection Exim's host retry record makes it skip the primary
    15 minutes; it goes back once that time is past and a try works."""
    results = simulate(parse_scenario({
        "scenario": {"duration": "3h"},
        "primary": {"episode": [{"at": "1h", "for": "2m", "condition": "refused"}]},
        "population": [{"model": "exim", "messages": 300, "hosts": 1}],
    }))
    msgs = results.messages["exim"]
    right_after = [m for m in msgs if EPOCH + 3720 < m.submitted < EPOCH + 3600 + 900]
    later = [m for m in msgs if m.submitted > EPOCH + 3600 + 1000]
    assert right_after and all(m.at_secondary for m in right_after)
    assert later and not any(m.at_secondary for m in later)


def test_a_tarpit_primary_costs_a_sender_its_greeting_timeout() -> None:
    primary = Primary([Episode(0.0, 100.0, Condition.TARPIT)])
    t = SenderTimeouts(connect=30.0, greeting=300.0)
    assert primary.deliver(4, "198.18.0.25", "a@b", "u@example.org", t, 50.0).elapsed == 300
    assert primary.deliver(4, "198.18.0.25", "a@b", "u@example.org", t, 150.0).elapsed < 1


def test_summary_counts() -> None:
    msgs = [message(0.0) for _ in range(4)]
    msgs[0].delivered_at = 10.0
    msgs[1].delivered_at = 100.0
    msgs[1].at_secondary = msgs[1].flagged = msgs[1].out_of_order = True
    msgs[2].lost = True
    msgs[3].out_of_order = msgs[3].at_secondary = True
    s = Summary.of(True, msgs)
    assert (s.messages, s.delivered, s.lost, s.stopped, s.flagged) == (4, 2, 1, 2, 1)
    assert (s.delay_p50_s, s.delay_max_s, s.out_of_order, s.out_of_order_caught) == \
        (10.0, 100.0, 2, 2)
    assert Population("x", "postfix", 1).family == "4"


def test_the_witness_evidence_is_used() -> None:
    results = run(ROOT / "conf/scenarios/witness.toml")
    assert results.decisions.get("seen-at-primary", 0) > 0
    assert "seen-at-primary" not in run(ROOT / "conf/scenarios/greylisting.toml").decisions


def test_probe_on_bypass_shrinks_the_window_after_the_primary_dies(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Postfix message that meets the dead primary in the window before the next
    scheduled probe is tempfailed (one retry, 300 s); a probe on bypass closes the
    window at the first such message instead of at the next interval."""
    from guard.simulate import secondary

    scenario = parse_scenario({
        "scenario": {"duration": "8h", "seed": 2},
        "guard": {"probe": {"interval": "30s"}, "policy": {"stale_after": "90s"}},
        "primary": {"flap": [{"from": "1h", "until": "8h", "every": "1h", "down": "10m",
                              "condition": "refused"}]},
        "population": [{"model": "postfix", "messages": 6000, "hosts": 20}],
    })

    def retried() -> int:
        return sum(1 for m in simulate(scenario).messages["postfix"]
                   if m.delay is not None and m.delay >= 300)

    with_probe = retried()
    monkeypatch.setattr(secondary.SecondaryNode, "_probe_now", lambda self, targets: None)
    without = retried()
    assert without > 2 * with_probe, (without, with_probe)
