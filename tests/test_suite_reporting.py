"""What the test suite reports: the summary line under a user's -q, and tests run in a process of their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MARKED = """
import os
import pytest

def witness(name):
    (Path(os.environ["WITNESS_DIR"]) / name).write_text(str(os.getpid()))

from pathlib import Path

@pytest.mark.own_process
def test_marked_passes():
    witness("passes")

@pytest.mark.own_process
def test_marked_fails():
    witness("fails")
    assert 1 == 2

@pytest.mark.own_process
def test_marked_skips():
    pytest.skip("not in this process either")

def test_plain():
    witness("plain")
"""

CRASHES = """
import os
import pytest

@pytest.mark.own_process
def test_the_child_dies():
    os._exit(3)
"""


def run_pytest(folder: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, int]:
    """pytest on `folder` with the project's own settings; also the pid of that pytest process."""
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
               "--rootdir", str(folder), *args, str(folder)]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), **env}
    with subprocess.Popen(
        command, cwd=folder, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as child:
        output, _ = child.communicate(timeout=300)
    return subprocess.CompletedProcess(command, child.returncode, output, ""), child.pid


def test_a_users_q_keeps_the_summary_line(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert True\n")
    run, _ = run_pytest(tmp_path, "-q")
    assert run.returncode == 0 and run.stdout.strip().splitlines()[-1].startswith("1 passed"), run.stdout


def test_tests_run_in_their_own_process_are_reported_as_they_ended_there(tmp_path):
    (tmp_path / "conftest.py").write_text("from own_process import pytest_runtest_logreport, pytest_runtest_protocol\n")
    (tmp_path / "test_marked.py").write_text(MARKED)
    (tmp_path / "test_crashes.py").write_text(CRASHES)
    witnesses = tmp_path / "witnesses"
    witnesses.mkdir()
    run, parent = run_pytest(tmp_path, "-rA", WITNESS_DIR=str(witnesses))
    lines = run.stdout.splitlines()
    assert "PASSED test_marked.py::test_marked_passes" in lines, run.stdout
    assert "PASSED test_marked.py::test_plain" in lines, run.stdout
    assert any(line.startswith("FAILED test_marked.py::test_marked_fails") for line in lines), run.stdout
    assert "assert 1 == 2" in run.stdout
    assert any(line.startswith("SKIPPED") and "not in this process either" in line for line in lines), run.stdout
    assert any(line.startswith("FAILED test_crashes.py::test_the_child_dies") for line in lines), run.stdout
    assert "exit code 3" in run.stdout
    assert lines[-1].strip("= ").startswith("2 failed, 2 passed, 1 skipped"), lines[-1]
    pids = {path.name: int(path.read_text()) for path in witnesses.iterdir()}
    assert pids["plain"] == parent and pids["passes"] != parent and pids["fails"] == pids["passes"]
