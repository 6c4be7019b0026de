"""`rdv --help`, `rdv robot --help`, `rdv teleop --help`: every flag is listed and says its default.

Runs the installed `rdv` console script, as a user would, and checks its output against the
parsers the commands are built from.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from services.arm_driver.config import build_parser as driver_parser
from services.cli import build_parser, station_flags

RDV = str(Path(sys.executable).parent / "rdv")


def run_help(*args: str) -> str:
    result = subprocess.run(
        [RDV, *args, "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout


def flags_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        action
        for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
    ]


def test_top_level_help_lists_every_command() -> None:
    text = run_help()
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in commands:
        assert f"    {name} " in text, f"rdv --help does not list {name}"


@pytest.mark.parametrize("kind,command", [("robot", "robot"), ("teleop", "teleop")])
def test_station_help_explains_every_flag_with_its_default(kind: str, command: str) -> None:
    text = " ".join(run_help(command).split())  # argparse wraps lines; compare unwrapped
    flags = flags_of(station_flags(kind))
    assert len(flags) >= 15
    for action in flags:
        assert action.option_strings[0] in text, f"{action.option_strings[0]} missing from help"
        assert action.help and "default" in action.help, (
            f"rdv {command} {action.option_strings[0]}: help does not state its default"
        )
    assert f"--{kind}.<field>=<value>" in text


def test_driver_help_explains_every_flag_with_its_default() -> None:
    for action in flags_of(driver_parser()):
        assert action.help and "default" in action.help, action.option_strings[0]
