"""Many processes on one OUT_DIR: real processes sharing the shards through claims, and taking over a dead one's."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from embed_helpers import photo_samples, write_encoder_file, write_shard
from test_embed_job import SLOW_WRITER, snapshot, wait_for

from dmt_jepa.serve import embed_shards
from dmt_jepa.serve.claims import Claims

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    return write_encoder_file(tmp_path_factory.mktemp("model") / "enc.safetensors")


def embed_process(*args: str, slow: bool = False) -> subprocess.Popen:
    command = ["-c", SLOW_WRITER] if slow else ["-m", "dmt_jepa.cli.main"]
    return subprocess.Popen(
        [sys.executable, *command, "embed", *args], env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_two_processes_on_one_out_dir_equal_one_run(tmp_path, encoder_file):
    for s in range(6):
        write_shard(tmp_path / "in" / f"s{s}.tar", photo_samples(f"k{s}_", 3, seed=s))
    embed_shards(str(tmp_path / "in"), tmp_path / "one", encoder_file, workers=0, batch_size=2)
    args = [str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(encoder_file), "--workers", "0", "--batch-size", "2"]
    processes = [embed_process(*args) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], results
    committed = [int(re.search(r"(\d+) shards embedded", out).group(1)) for out, _ in results]
    assert sum(committed) == 6  # every shard committed exactly once, by one of the two
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "one")


def start_mid_shard(tmp_path, encoder_file, lease: float) -> tuple[subprocess.Popen, list[str], dict]:
    """A worker (writer slowed down) stopped at nothing yet: returned once it holds a claim and writes aside."""
    for s in range(3):
        write_shard(tmp_path / "in" / f"s{s}.tar", photo_samples(f"k{s}_", 8, seed=s))
    embed_shards(str(tmp_path / "in"), tmp_path / "clean", encoder_file, workers=0, batch_size=4)
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), str(out), "--model", str(encoder_file), "--workers", "0", "--batch-size", "4"]
    args += ["--lease", str(lease)]
    worker = embed_process(*args, slow=True)
    wait_for(lambda: out.is_dir() and any(p.name.endswith(".partial") for p in out.iterdir()))
    return worker, args, snapshot(tmp_path / "clean")


def test_a_sigkilled_workers_claim_is_taken_over(tmp_path, encoder_file):
    lease = 120.0  # longer than the whole test: the takeover must come from seeing the holder gone
    first, args, clean = start_mid_shard(tmp_path, encoder_file, lease)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert any(p.name.endswith(".claim") for p in (tmp_path / "out").iterdir()), "the killed worker held no claim"
    started = time.monotonic()
    second = embed_process(*args)
    _, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    assert time.monotonic() - started < lease
    assert snapshot(tmp_path / "out") == clean  # no claim, no file aside left


@pytest.mark.slow
def test_a_stalled_worker_is_taken_over_after_the_lease_and_then_steps_aside(tmp_path, encoder_file):
    lease = 2.0
    first, args, clean = start_mid_shard(tmp_path, encoder_file, lease)
    first.send_signal(signal.SIGSTOP)  # alive, holding its claim, but no longer beating
    try:
        started = time.monotonic()
        second = embed_process(*args)
        _, stderr = second.communicate(timeout=300)
        assert second.returncode == 0, stderr
        assert time.monotonic() - started >= lease
        assert snapshot(tmp_path / "out") == clean
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=120)  # it finds its claim gone and drops its work
    assert first.returncode == 0, stderr
    assert snapshot(tmp_path / "out") == clean


def test_a_live_claim_is_not_taken_and_a_stale_one_is(tmp_path):
    holder, other = Claims(tmp_path, "a", lease=0.4), Claims(tmp_path, "b", lease=0.4)
    try:
        assert holder.try_claim("s") and not other.try_claim("s")
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # the heartbeat keeps it fresh for several leases
            assert not other.try_claim("s")
            time.sleep(0.05)
        holder._stop.set()  # the holder stops beating, as a killed process does
        holder._beat.join()
        wait_for(lambda: other.try_claim("s"), timeout=5)
        assert other.owns("s") and not holder.owns("s")
    finally:
        other.close()
        holder.close()
    assert list(tmp_path.iterdir()) == []
