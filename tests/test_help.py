"""Every option of sftgo-prep, sftgo-train, examples/hf_trainer.py and experiments/compare.py has a help text that
shows its default (or says it is required), as a user reads it in --help."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from sftgo.pipeline.cli import main as prep
from sftgo.trainer.cli import cli as train

ROOT = Path(__file__).resolve().parents[1]


def commands():
    yield from ((f"sftgo-prep {name}", cmd) for name, cmd in prep.commands.items())
    yield "sftgo-train", train


@pytest.mark.parametrize("name, command", list(commands()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_click_option_has_help_with_its_default(name, command):
    ctx = click.Context(command, info_name=name)
    for option in (p for p in command.params if isinstance(p, click.Option) and p.name != "help"):
        shown = (option.get_help_record(ctx) or ("", ""))[1]
        words = re.sub(r"\[(default|required)[^\]]*\]", "", shown).strip()
        assert words, f"{name} {option.opts[0]} has no help text"
        assert "default" in shown.lower() or "[required]" in shown, f"{name} {option.opts[0]}: {shown!r}"


@pytest.mark.parametrize("script", ["examples/hf_trainer.py", "experiments/compare.py"])
def test_every_argparse_option_has_help_with_its_default(script):
    text = subprocess.run(
        [sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    options = text.split("options:", 1)[1]
    blocks = re.split(r"\n  (?=-)", "\n" + options)[1:]  # one block per option, its help lines included
    assert len(blocks) > 5, text
    for block in blocks:
        flag = block.split()[0].rstrip(",")
        if flag in ("-h", "--help"):
            continue
        first, _, rest = block.partition("  ")  # the option and its metavar, then its help
        assert rest.strip(), f"{script} {flag} has no help text"
        assert "default" in block.lower() or "required" in block, f"{script} {flag}: {block!r}"
