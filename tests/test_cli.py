"""The `dmtjepa` application itself: its version, its shell completion, and the entry points."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError
from pathlib import Path

from typer.testing import CliRunner

import dmt_jepa
import dmt_jepa.cli.main as cli_main
from dmt_jepa.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"version", "export", "info", "embed", "pretrain", "convert", "eval", "viz", "data"}


def source_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_source_version_is_the_one_pyproject_declares():
    assert dmt_jepa.__version__ == source_version()


def test_version_flag_prints_the_version_through_the_real_entry_point():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "dmt_jepa.cli.main", "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout == source_version() + "\n"


def test_version_flag_and_command_agree_and_ignore_a_command_after_them():
    flag = CliRunner().invoke(app, ["--version", "pretrain", "nokey"])
    command = CliRunner().invoke(app, ["version"])
    assert flag.exit_code == 0 and command.exit_code == 0
    assert flag.stdout == command.stdout == source_version() + "\n"


def test_version_falls_back_to_the_source_when_not_installed(monkeypatch):
    def not_installed(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(cli_main, "distribution_version", not_installed)
    monkeypatch.setattr(dmt_jepa, "__version__", "9.8.7")
    assert CliRunner().invoke(app, ["--version"]).stdout == "9.8.7\n"


def complete(words: str) -> set[str]:
    """What bash completion offers after `words`, asked the way the installed script asks."""
    env = {"_DMTJEPA_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}
    result = CliRunner().invoke(app, [], env=env, prog_name="dmtjepa")
    assert result.exit_code == 0, result.output
    return set(result.stdout.split())


def test_show_completion_prints_a_bash_script_for_dmtjepa():
    # Typer detects the shell from the process tree; its own switch turns detection off so that the
    # shell can be named (read when the app is built, hence a process of its own).
    env = dict(os.environ, PYTHONPATH=str(ROOT), _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    cmd = [sys.executable, "-m", "dmt_jepa.cli.main", "--show-completion", "bash"]
    script = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert script.returncode == 0, script.stderr
    assert "complete -o default -F _dmtjepa_completion dmtjepa" in script.stdout
    assert "_DMTJEPA_COMPLETE=complete_bash" in script.stdout


def test_completion_names_the_commands_their_subcommands_and_options():
    assert complete("dmtjepa ") == COMMANDS
    assert complete("dmtjepa data ") == {"pack", "scenes"}
    assert complete("dmtjepa eval ") == {"knn", "linear", "dense", "detect", "all"}
    assert {"--config", "--resume", "--help"} <= complete("dmtjepa pretrain --")
    assert complete("dmtjepa ex") == {"export"}
