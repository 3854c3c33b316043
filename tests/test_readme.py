"""The README cannot drift: the CLI help it quotes is the real help."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from streammerge.cli import main

README = (Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```text\n\$ streammerge (.*?)\n(.*?)```", README, re.S)


def test_readme_quotes_help():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("command, text", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_quoted_help_is_current(command, text):
    result = CliRunner().invoke(main, command.split(), prog_name="streammerge")
    assert result.output == text


def test_readme_gives_the_two_setup_commands():
    assert "make demo" in README and "make test" in README
