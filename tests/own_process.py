"""Tests marked `own_process` run in a pytest process of their own and are reported here with the outcome they had there.

Some libraries leave threads or signal handlers behind in the process that used them (OpenVINO,
Ray, transformers after ORT; each module says why), so their tests run in a fresh interpreter.
The first such test of a module starts one child pytest for all of the module's marked tests;
the child writes each test's reports to a JSON-lines file, and this process reports every test
as passed, failed or skipped as it was there, never as skipped here. A test the child never
reported (the child died) fails, with the child's exit code and the end of its output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _pytest.reports import TestReport

IN_CHILD = "DMTJEPA_TESTS_IN_OWN_PROCESS"
REPORT_FILE = "DMTJEPA_TESTS_OWN_PROCESS_REPORT"
TIMEOUT_S = 1800
_outcomes: dict[Path, dict[str, list[dict]]] = {}  # module -> node id -> the child's reports of it
_children_run: list[bool] = []  # one entry once every child has run


def _run_child(item: pytest.Item) -> dict[str, list[dict]]:
    """Run every `own_process` test of item's module in one child pytest; its reports by node id."""
    marked = [i.nodeid for i in item.session.items if i.path == item.path and i.get_closest_marker("own_process")]
    with tempfile.TemporaryDirectory() as scratch:
        reports = Path(scratch) / "reports.jsonl"
        env = {**os.environ, IN_CHILD: "1", REPORT_FILE: str(reports)}
        try:
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *marked],
                cwd=item.config.rootpath, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
            )  # fmt: skip
            ended, output = f"exit code {run.returncode}", run.stdout + run.stderr
        except subprocess.TimeoutExpired as err:
            ended, output = f"no end within {TIMEOUT_S} s", str(err.stdout or "") + str(err.stderr or "")
        found: dict[str, list[dict]] = {nodeid: [] for nodeid in marked}
        lines = reports.read_text().splitlines() if reports.exists() else []
    for line in lines:
        record = json.loads(line)
        found.setdefault(record["nodeid"], []).append(record)
    missing = {"when": "call", "outcome": "failed", "duration": 0.0,
               "longrepr": f"the child pytest ended ({ended}) before this test reported; the end of its output:\n{output[-4000:]}"}  # fmt: skip
    # A test is reported in full once its teardown is: one cut short (the child died in it) fails.
    return {
        nodeid: records if any(r["when"] == "teardown" for r in records) else [*records, missing]
        for nodeid, records in found.items()
    }


def _report(item: pytest.Item, record: dict) -> TestReport:
    longrepr = record["longrepr"]
    if record["outcome"] == "skipped" and longrepr is not None:
        longrepr = tuple(longrepr)  # (path, line, reason), as pytest reports a skip
    return TestReport(
        item.nodeid, item.location, {name: 1 for name in item.keywords}, record["outcome"], longrepr, record["when"],
        duration=record["duration"], sections=[("in its own process", "ran in a child pytest")],
    )  # fmt: skip


def _run_every_child(session: pytest.Session) -> None:
    """Every module's child, before this process runs any test of its own.

    Started first, the children fork the process while it is still small, before ONNX Runtime, torch
    and transformers have filled it with threads and state. (The suite's process once died of a
    silent segmentation fault when a child ended late in a full run: the kernel's own SIGSEGV while
    it delivered SIGCHLD to a handler that torch's DataLoader had left installed; see conftest.py.)
    """
    for item in session.items:
        if item.get_closest_marker("own_process") is not None and item.path not in _outcomes:
            _outcomes[item.path] = _run_child(item)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if os.environ.get(IN_CHILD) == "1":
        return None  # this is the child: run every test here
    if not _children_run:
        _children_run.append(True)
        _run_every_child(item.session)
    if item.get_closest_marker("own_process") is None:
        return None  # an ordinary test: run it here
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for record in _outcomes[item.path][item.nodeid]:
        item.ihook.pytest_runtest_logreport(report=_report(item, record))
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def pytest_runtest_logreport(report: TestReport) -> None:
    """In the child: each report of each test, as one JSON line, for the parent to report again."""
    path = os.environ.get(REPORT_FILE)
    if os.environ.get(IN_CHILD) != "1" or not path:
        return
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        longrepr = list(report.longrepr)
    else:
        longrepr = None if report.longrepr is None else str(report.longreprtext)
    record = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome, "longrepr": longrepr,
              "duration": report.duration}  # fmt: skip
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
