"""The man pages: rendered by groff without a warning, and in step with the code:
every command and option of the parser in mx-guard(8), every config key (and which
ones only a restart changes) in mx-guard.toml(5), nothing documented that is gone."""

from __future__ import annotations

import argparse
import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from guard.cli import build_parser
from guard.config import ConfigError, defaults_documented, parse_config
from guard.reload import RESTART_ONLY
from tests.support.guardproc import ROOT

MAN = ROOT / "deploy" / "man"
GUARD_8 = MAN / "mx-guard.8"
TOML_5 = MAN / "mx-guard.toml.5"
COMMON = {"-c", "--config", "--log-level"}  # documented once, under OPTIONS
NOT_DOCUMENTED_PER_COMMAND = {"-h", "--help"}


@pytest.mark.tools
@pytest.mark.parametrize("page", [GUARD_8, TOML_5], ids=lambda p: p.name)
def test_renders_without_warnings(page: Path) -> None:
    groff = shutil.which("groff")
    assert groff, "groff is missing: sh tests/support/install-test-deps.sh (groff-base)"
    r = subprocess.run([groff, "-man", "-ww", "-z", str(page)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def blocks(page: Path, macro: str) -> dict[str, str]:
    """The text under each ``.SH``/``.SS`` heading, by heading."""
    out: dict[str, str] = {}
    name = ""
    for line in page.read_text().splitlines():
        m = re.match(rf"^\.{macro} \"?(.*?)\"?$", line)
        if m:
            name = m.group(1)
            out[name] = ""
        elif name and not re.match(r"^\.S[HS] ", line):
            out[name] += line + "\n"
        elif re.match(r"^\.SH ", line):
            name = ""
    return out


def options_in(text: str) -> set[str]:
    """Options named where an option is defined: after .TP, in .B/.BI/.BR lines."""
    found: set[str] = set()
    lines = text.splitlines()
    for before, line in itertools.pairwise(lines):
        if before == ".TP" and re.match(r"^\.B[IR]? ", line):
            found.update(o.replace("\\-", "-")
                         for o in re.findall(r"(?<![\w\\])((?:\\-){1,2}[\w\\-]+)", line))
    return found


def parser_commands() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {o for a in p._actions for o in a.option_strings}
            for name, p in sub.choices.items()}


def test_every_command_and_option_is_in_mx_guard_8() -> None:
    commands = parser_commands()
    sections = blocks(GUARD_8, "SS")
    documented = {name.removeprefix("mx-guard ") for name in sections}
    assert documented == set(commands), "mx-guard(8) COMMANDS differ from the parser"
    for name, options in commands.items():
        own = options - COMMON - NOT_DOCUMENTED_PER_COMMAND
        assert options_in(sections[f"mx-guard {name}"]) == own, f"options of {name}"
    common = options_in(blocks(GUARD_8, "SH")["OPTIONS"])
    top = {o for a in build_parser()._actions for o in a.option_strings}
    assert common == COMMON | NOT_DOCUMENTED_PER_COMMAND | top
    assert all(options >= COMMON for options in commands.values())


def keys_in(text: str) -> list[str]:
    lines = text.splitlines()
    return [line.removeprefix(".B ") for before, line in itertools.pairwise(lines)
            if before == ".TP" and line.startswith(".B ")]


def test_every_config_key_is_in_mx_guard_toml_5() -> None:
    sections = blocks(TOML_5, "SS")
    tables = {name.strip("[]") for name in sections}
    documented = defaults_documented()
    assert tables == {*documented, "domain"}, "mx-guard.toml(5) sections differ"
    for table, defaults in documented.items():
        assert sorted(keys_in(sections[f"[{table}]"])) == sorted(defaults), f"[{table}]"
    with pytest.raises(ConfigError) as refused:
        parse_config({"domain": [{"name": "example.org", "bogus": 1}]})
    known = re.search(r"known keys: ([\w, ]+)", str(refused.value))
    assert known, refused.value
    assert sorted(keys_in(sections["[[domain]]"])) == known.group(1).split(", ")


def test_restart_only_keys_are_marked_so() -> None:
    marked = set()
    for name, text in blocks(TOML_5, "SS").items():
        for entry in re.split(r"^\.TP$", text, flags=re.M)[1:]:
            key = entry.strip().splitlines()[0].removeprefix(".B ")
            if "Restart only." in entry:
                marked.add((name.strip("[]"), key))
    assert marked == set(RESTART_ONLY)
