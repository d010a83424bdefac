"""The CLI: help for every subcommand, each backed by its module, and exit 2 without a command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hippocrates.cli import COMMANDS, main


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_subcommand_has_help(name: str):
    proc = subprocess.run(
        [sys.executable, "-m", "hippocrates.cli", name, "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: hippo" in proc.stdout


def test_every_subcommand_has_a_module():
    assert [n for n, (module, _) in COMMANDS.items() if module is None] == []


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: hippo" in capsys.readouterr().out
