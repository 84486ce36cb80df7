"""The umask is read without being changed: another thread creating a file meanwhile sees the real one."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dmt_jepa import file_modes
from dmt_jepa.file_modes import as_umask_allows, current_umask

HAS_PROC_STATUS = "Umask:" in (Path("/proc/self/status").read_text() if Path("/proc/self/status").is_file() else "")


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def test_current_umask_is_the_one_the_process_set(umask_027):
    assert current_umask() == umask_027


def test_a_file_made_readable_as_the_umask_allows_has_the_mode_open_gives(umask_027, tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")  # the reference: the mode a plain open() gives under this umask
    ours = tmp_path / "ours"
    ours.write_text("x")
    os.chmod(ours, 0o600)  # what safetensors leaves
    as_umask_allows(ours)
    assert stat.S_IMODE(ours.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o640


@pytest.mark.skipif(not HAS_PROC_STATUS, reason="needs Linux's /proc/self/status")
def test_current_umask_does_not_change_the_umask_where_proc_tells_it(umask_027, monkeypatch):
    def no_umask(mask):
        raise AssertionError("os.umask was called")

    monkeypatch.setattr(os, "umask", no_umask)
    assert current_umask() == umask_027


def test_without_proc_the_umask_is_read_by_setting_it_back(umask_027, monkeypatch, tmp_path):
    monkeypatch.setattr(file_modes, "_STATUS", tmp_path / "missing")
    assert current_umask() == umask_027
    assert os.umask(umask_027) == umask_027  # restored after the read
