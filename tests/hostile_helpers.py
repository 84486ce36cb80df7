"""Helpers of the hostile-input tests: outputs copied to be damaged, and a guard against blocking reads."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

import pytest
from embed_helpers import photo_samples, write_encoder_file, write_shard


def two_models(root: Path, first_images: int) -> tuple[Path, Path]:
    """Encoder files a.safetensors and b.safetensors (other weights) in root, and input shards
    in/part-0.tar (`first_images` images) and in/part-1.tar (2 others)."""
    model, other = write_encoder_file(root / "a.safetensors"), write_encoder_file(root / "b.safetensors", seed=1)
    write_shard(root / "in" / "part-0.tar", photo_samples("a", first_images))
    write_shard(root / "in" / "part-1.tar", photo_samples("b", 2, seed=1))
    return model, other


def damaged_copy(out_dir: Path, tmp_path: Path) -> Path:
    """A copy of a good OUT_DIR, to damage."""
    return Path(shutil.copytree(out_dir, tmp_path / "out"))


def within(seconds: float, call, *fifos: Path):
    """call() in a thread; fails the test (rather than hanging the suite) where it blocks on a FIFO.

    Returns what call() returned, or the exception it raised. On a timeout each FIFO is opened for
    writing and closed, which hands a blocked reader end-of-file, so no thread is left behind.
    """
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # handed to the test, which says what it expects
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as err:
                assert err.errno == errno.ENXIO, err  # no reader: nothing was blocked on this one
        thread.join(5)
        pytest.fail(f"still reading after {seconds} s: blocked on a FIFO")
    return outcome.get("error", outcome.get("value"))
