"""The `dmtjepa` application itself: its version, its shell completion, and the entry points."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError
from pathlib import Path

from typer.testing import CliRunner

import dmt_jepa
import dmt_jepa.cli.main as cli_main
from dmt_jepa.cli.main import app

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10, which the package supports, has no tomllib; pytest itself depends on tomli there
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"version", "export", "info", "embed", "pretrain", "convert", "eval", "viz", "data"}


def source_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_source_version_is_the_one_pyproject_declares():
    assert dmt_jepa.__version__ == source_version()


def test_version_flag_prints_the_version_through_the_real_entry_point():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "dmt_jepa.cli.main", "--version"], capture_output=True, text=True, env=env, timeout=60
    )
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


def under_bash(args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m dmt_jepa.cli.main ARGS` as a child of bash: Typer finds the shell in the process tree."""
    command = f"{shlex.quote(sys.executable)} -m dmt_jepa.cli.main {args}; exit $?"  # two commands: bash does not exec
    return subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT), **env}
    )


def test_show_completion_prints_a_bash_script_for_dmtjepa():
    script = under_bash("--show-completion")
    assert script.returncode == 0, script.stderr
    assert "complete -o default -F _dmtjepa_completion dmtjepa" in script.stdout
    assert "_DMTJEPA_COMPLETE=complete_bash" in script.stdout


def test_completion_names_the_commands_their_subcommands_and_options():
    assert complete("dmtjepa ") == COMMANDS
    assert complete("dmtjepa data ") == {"pack", "scenes"}
    assert complete("dmtjepa eval ") == {"knn", "linear", "dense", "detect", "all"}
    assert {"--config", "--resume", "--help"} <= complete("dmtjepa pretrain --")
    assert complete("dmtjepa ex") == {"export"}


def test_install_completion_into_an_unusable_home_is_one_sentence_and_writes_nothing(tmp_path):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "rc-is-a-folder" / ".bashrc").mkdir(parents=True)
    for home in (tmp_path / "a-file", tmp_path / "missing", tmp_path / "rc-is-a-folder"):
        run = under_bash("--install-completion", HOME=str(home))
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: cannot install shell completion"), run
        assert "--show-completion" in lines[0] and "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".bashrc", "a-file", "rc-is-a-folder"]


def test_install_completion_into_a_usable_home_writes_the_script_and_the_line_that_reads_it(tmp_path):
    run = under_bash("--install-completion", HOME=str(tmp_path))
    assert run.returncode == 0, run.stderr
    script = tmp_path / ".bash_completions" / "dmtjepa.sh"
    assert "_DMTJEPA_COMPLETE=complete_bash" in script.read_text()
    assert f"source '{script}'" in (tmp_path / ".bashrc").read_text()
