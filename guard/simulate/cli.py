"""The ``mx-guard simulate SCENARIO.toml [--json] [--seed N]`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from guard.simulate.report import render, to_json
from guard.simulate.scenario import load_scenario
from guard.simulate.world import simulate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", metavar="SCENARIO.toml",
                        help="scenario file (see conf/scenarios/)")
    parser.add_argument("--json", action="store_true", help="print SPEC section 10 JSON")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (default: the scenario's)")


def run(args: argparse.Namespace) -> int:
    """Raises ConfigError (a ScenarioError) on a bad scenario: exit code 1 via main."""
    if getattr(args, "log_level", "info") == "info":
        # The guard logs every transition at info; a simulated day has hundreds.
        logging.getLogger("guard").setLevel(logging.WARNING)
    scenario = load_scenario(args.scenario)
    results = simulate(scenario, args.seed)
    sys.stdout.write(to_json(results) if args.json else render(results))
    return 0
