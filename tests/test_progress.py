"""Pretraining progress: plain lines every N seconds through a pipe, the live bar on a terminal."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pretrain_fixtures import make_images, tiny_overrides
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.config import ConfigError, load_config
from dmt_jepa.data import pack_images
from dmt_jepa.progress import BarProgress, LineProgress, NoProgress, format_duration, progress_for

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^step (\d+)/(\d+)  loss (\d+\.\d{4})  lr (\S+)  (\d+\.\d) img/s  ETA (\d+:\d\d:\d\d)$")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_every_n_seconds_with_the_first_and_last_step():
    clock, out = Clock(), io.StringIO()
    # 10 steps of 8 images from step 2 (a resumed run) to 12, one step every 1.5 s, a line every 4 s.
    with LineProgress(total=12, start=2, batch_size=8, every_s=4.0, stream=out, clock=clock) as progress:
        for step in range(3, 13):
            clock.now += 1.5
            progress.update(step, loss=step / 100, lr=1e-3, images_per_s=-1.0)
    lines = out.getvalue().splitlines()
    # t = 1.5 (first) -> step 3; t >= 5.5: step 6 (t 6.0); t >= 10.0: step 9 (t 10.5); the last, step 12 (t 15.0).
    assert [int(LINE.match(line)[1]) for line in lines] == [3, 6, 9, 12]
    assert lines[0] == "step 3/12  loss 0.0300  lr 1.00e-03  5.3 img/s  ETA 0:00:14"  # 8 images in 1.5 s; 1.5 s x 9 steps
    assert lines[1] == "step 6/12  loss 0.0600  lr 1.00e-03  5.3 img/s  ETA 0:00:09"  # 24 images in 4.5 s; 1.5 s x 6
    assert lines[-1].endswith("ETA 0:00:00")


def test_every_zero_prints_every_step_and_a_stalled_clock_does_not_divide_by_zero():
    clock, out = Clock(), io.StringIO()
    with LineProgress(total=3, start=0, batch_size=4, every_s=0.0, stream=out, clock=clock) as progress:
        for step in (1, 2, 3):
            progress.update(step, loss=0.5, lr=1e-4, images_per_s=0.0)
    assert [int(LINE.match(line)[1]) for line in out.getvalue().splitlines()] == [1, 2, 3]


class GoneReader(io.StringIO):
    def write(self, text: str) -> int:
        self.writes = getattr(self, "writes", 0) + 1
        raise BrokenPipeError(32, "Broken pipe")


def test_a_reader_that_goes_away_stops_the_lines_not_the_run():
    clock, out = Clock(), GoneReader()
    with LineProgress(total=4, start=0, batch_size=4, every_s=0.0, stream=out, clock=clock) as progress:
        for step in (1, 2, 3, 4):
            progress.update(step, loss=0.5, lr=1e-4, images_per_s=0.0)  # raises nothing
    assert out.writes == 1  # tried once, then left alone


@pytest.mark.parametrize(
    "seconds, text", [(0, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05"), (float("nan"), "?"), (float("inf"), "?")]
)
def test_durations_read_as_hours_minutes_seconds(seconds, text):
    assert format_duration(seconds) == text


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_gets_lines_a_terminal_gets_the_bar(monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # many CI systems set it; a log file still gets lines
    options = dict(total=5, start=0, batch_size=2, every_s=1.0)
    assert isinstance(progress_for(True, stream=io.StringIO(), **options), LineProgress)
    assert isinstance(progress_for(False, stream=Terminal(), **options), NoProgress)
    terminal = Terminal()
    with progress_for(True, stream=terminal, **options) as bar:
        assert isinstance(bar, BarProgress)
        bar.update(2, loss=0.25, lr=1e-3, images_per_s=3.0)
    assert "2/5" in terminal.getvalue() and "loss 0.2500" in terminal.getvalue()


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_negative_or_nan_interval_is_refused(value):
    with pytest.raises(ConfigError, match="run.progress_every_s must be >= 0"):
        load_config(None, [f"run.progress_every_s={value}"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("progress")
    make_images(root / "images", 8)
    pack_images(root / "images", root / "shards")
    return str(root / "shards" / "shard-000000.tar")


def test_tiny_run_through_a_pipe_prints_a_line_per_step_matching_its_log(shards, tmp_path):
    out_dir = tmp_path / "run"
    overrides = tiny_overrides(shards, out_dir, "run.progress=true", "run.progress_every_s=0")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for var in ("FORCE_TERMINAL", "TTY_COMPATIBLE", "RANK"):
        env.pop(var, None)
    run = subprocess.run(
        [sys.executable, "-m", "dmt_jepa.cli.main", "pretrain", *overrides], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    matches = [LINE.match(line) for line in run.stdout.splitlines() if line.startswith("step ")]
    assert all(matches) and "\x1b[" not in run.stdout  # plain text, no terminal escapes
    logged = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    assert [int(m[1]) for m in matches] == [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert {int(m[2]) for m in matches} == {8}
    assert [m[3] for m in matches] == [f"{r['loss']:.4f}" for r in logged]
    assert [float(m[4]) for m in matches] == pytest.approx([r["lr"] for r in logged], rel=6e-3)
    assert matches[-1][6] == "0:00:00"


def test_long_interval_prints_only_the_first_and_last_step(shards, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    overrides = tiny_overrides(
        shards, tmp_path / "run", "run.progress=true", "run.progress_every_s=3600", "optimization.epochs=1"
    )
    result = CliRunner().invoke(app, ["pretrain", *overrides])
    assert result.exit_code == 0, result.output
    steps = [int(LINE.match(line)[1]) for line in result.stdout.splitlines() if line.startswith("step ")]
    assert steps == [1, 4]
