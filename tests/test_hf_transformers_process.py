"""Runs tests/test_hf_transformers.py in a pytest process of its own (the reason is there)."""

import re
from pathlib import Path

from embed_helpers import pytest_in_own_process

MODULE = Path(__file__).with_name("test_hf_transformers.py")


def test_the_transformers_tests_pass_in_a_process_of_their_own():
    from test_hf_transformers import IN_OWN_PROCESS

    run = pytest_in_own_process(str(MODULE), "", IN_OWN_PROCESS, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed", summary) and "failed" not in summary and "error" not in summary, summary
