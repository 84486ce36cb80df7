"""`--engine ray` on a local Ray instance: the local engine's files byte for byte, every key once, reruns, a killed actor."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from embed_helpers import image_bytes, photo_samples, read_output, write_encoder_file, write_shard
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.serve import EngineError, embed_shards
from dmt_jepa.serve.job import EmbedOptions
from dmt_jepa.serve.stats import STATS_DIR

BATCH = 3


# The tests that start a Ray instance (test_on_ray_*) run in a pytest process of their own
# (tests/own_process.py): ray.init replaces the process's SIGSEGV handler (Python's faulthandler)
# and ray.shutdown leaves it at the default and some of Ray's native threads running, so that a
# crash later in the suite would print no trace.


@pytest.fixture(scope="module")
def ray_instance():
    """One Ray instance for the module: 2 CPUs, no dashboard, no usage report; shut down at the end."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_worker_niceness"] = "0"  # as serve.ray_engine does for an instance it starts
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    return write_encoder_file(tmp_path_factory.mktemp("model") / "enc.safetensors")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """Three shards: photos with a corrupt image and an image-less sample among them, photos alone, and a cut tar.
    Returns the input folder and, per shard, the keys a reader can reach (a cut tar: those before the cut)."""
    root = tmp_path_factory.mktemp("in")
    mixed = photo_samples("a", 7, seed=1)
    mixed.insert(2, ("a_corrupt", {"jpg": b"\xff\xd8 not a jpeg"}))
    mixed.insert(5, ("a_label_only", {"cls": b"3"}))
    mixed.append(("a_tiny", {"png": image_bytes(8, 8)}))  # smaller than one patch
    write_shard(root / "part-0.tar", mixed)
    write_shard(root / "part-1.tar", photo_samples("b", 5, seed=2))
    whole = write_shard(root.parent / "whole.tar", photo_samples("c", 6, seed=3)).read_bytes()
    (root / "part-2.tar").write_bytes(whole[: len(whole) * 2 // 3])
    keys = {"part-0": [k for k, _ in mixed], "part-1": [f"b{i:04d}" for i in range(5)], "part-2": None}
    return root, keys


def snapshot(out_dir: Path) -> dict[str, bytes]:
    """Every file but the stats directory (timings, hosts)."""
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir()) if p.name != STATS_DIR}


@pytest.fixture(scope="module")
def local_out(tmp_path_factory, inputs, encoder_file) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    embed_shards(str(inputs[0]), out, encoder_file, batch_size=BATCH, workers=1, pooled=True)
    return out


@pytest.mark.own_process
def test_on_ray_writes_the_local_engines_bytes_and_accounts_for_every_key_once(
    ray_instance, tmp_path, inputs, encoder_file, local_out
):
    out = tmp_path / "out"
    summary = embed_shards(str(inputs[0]), out, encoder_file, batch_size=BATCH, pooled=True, engine="ray", decode_workers=1)
    assert snapshot(out) == snapshot(local_out)
    assert sorted(summary.completed) == ["part-0", "part-1", "part-2"] and summary.cut_shards == ["part-2"]
    for name, keys in inputs[1].items():
        record = json.loads((out / f"{name}.json").read_text())
        embedded = list(read_output(out / f"{name}.tar"))
        failed = [f["key"] for f in record["failures"]]
        assert record["embedded"] == len(embedded) and record["failed"] == len(failed)
        accounted = embedded + failed
        assert len(accounted) == len(set(accounted))  # never twice
        if keys is None:  # the cut tar: a prefix of its keys, and the shard says it was cut
            assert record["cut"] and sorted(accounted) == [f"c{i:04d}" for i in range(len(accounted))]
            assert len(accounted) >= 2
        else:
            assert sorted(accounted) == sorted(keys) and record["cut"] is None
    failures = {f["key"]: f["reason"] for f in json.loads((out / "part-0.json").read_text())["failures"]}
    assert set(failures) == {"a_corrupt", "a_label_only", "a_tiny"}
    assert summary.embedded == sum(json.loads((out / f"part-{i}.json").read_text())["embedded"] for i in range(3))


@pytest.mark.slow  # four Ray runs, each starting a model actor: about 2 minutes on 2 busy cores
@pytest.mark.own_process
def test_on_ray_reruns_skip_done_shards_and_refuse_other_settings(ray_instance, tmp_path, inputs, encoder_file, local_out):
    out = tmp_path / "out"
    args = ["embed", str(inputs[0]), str(out), "--model", str(encoder_file), "--batch-size", str(BATCH), "--pooled"]
    ray_args = ["--engine", "ray", "--decode-workers", "1", "--model-workers", "1"]
    result = CliRunner().invoke(app, args + ray_args)
    assert result.exit_code == 0, result.output
    assert snapshot(out) == snapshot(local_out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}

    again = embed_shards(str(inputs[0]), out, encoder_file, batch_size=BATCH, pooled=True, engine="ray")
    assert sorted(again.skipped) == ["part-0", "part-1", "part-2"] and again.completed == [] and again.embedded == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before

    refused = CliRunner().invoke(app, args + ray_args + ["--dtype", "float32"])
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert snapshot(out) == snapshot(local_out)

    redone = embed_shards(
        str(inputs[0]), out, encoder_file, batch_size=BATCH, pooled=True, dtype="float32", overwrite=True, engine="ray"
    )
    assert sorted(redone.completed) == ["part-0", "part-1", "part-2"]
    assert all(json.loads((out / f"part-{i}.json").read_text())["dtype"] == "float32" for i in range(3))


def _model_actor_pids() -> list[tuple[int, str]]:
    """(pid, process title) of the model actors: Ray titles an actor's process after its class."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::ModelWorker"):
                found.append((int(entry.name), title))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the actor's process through /proc")
@pytest.mark.own_process
def test_on_ray_a_model_actor_killed_mid_shard_is_restarted_and_the_output_is_whole(
    ray_instance, tmp_path, inputs, encoder_file, local_out
):
    out = tmp_path / "out"
    killed: list[tuple[int, list[str]]] = []
    job_over = threading.Event()

    def kill_once() -> None:
        """SIGKILL the model actor while it embeds a batch (or, if never caught at it, once a first shard is done)."""
        while not job_over.is_set():
            actors = _model_actor_pids()
            busy = [pid for pid, title in actors if ".embed" in title]
            if busy or (actors and (out / "part-0.json").exists()):
                pid = (busy or [actors[0][0]])[0]
                done = sorted(p.name for p in out.glob("part-*.json")) if out.exists() else []
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, done))
                return
            time.sleep(0.002)

    killer = threading.Thread(target=kill_once, daemon=True)
    killer.start()
    try:
        summary = embed_shards(str(inputs[0]), out, encoder_file, batch_size=BATCH, pooled=True, engine="ray", decode_workers=1)
    finally:
        job_over.set()
        killer.join()
    assert killed, "the model actor was never seen running"
    pid, done_at_kill = killed[0]
    assert len(done_at_kill) < 3  # killed before the job was over
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert sorted(summary.completed) == ["part-0", "part-1", "part-2"]
    assert snapshot(out) == snapshot(local_out)


def test_ray_only_settings_need_the_ray_engine(tmp_path, inputs, encoder_file):
    with pytest.raises(ValueError, match="only apply to --engine ray"):
        EmbedOptions(model_workers=2)
    with pytest.raises(ValueError, match="unknown engine"):
        EmbedOptions(engine="spark")
    result = CliRunner().invoke(
        app, ["embed", str(inputs[0]), str(tmp_path / "out"), "--model", str(encoder_file), "--address", "auto"]
    )
    assert result.exit_code == 2 and "--engine ray" in result.output


def test_without_ray_installed_the_ray_engine_says_how_to_install_it(tmp_path, inputs, encoder_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    with pytest.raises(EngineError, match=r"pip install 'dmt-jepa\[ray\]'"):
        embed_shards(str(inputs[0]), tmp_path / "out", encoder_file, engine="ray")
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(
        app, ["embed", str(inputs[0]), str(tmp_path / "out"), "--model", str(encoder_file), "--engine", "ray"]
    )
    assert result.exit_code == 2 and "pip install" in result.output and result.output.count("\n") <= 2


def test_a_stalled_stage_stops_the_reading_before_it():
    """The back-pressure rule of the Ray engine's pipeline, counted by hand: at most `depth` items started
    and not yet handed on, results in order, and nothing more started while the consumer does not pull."""
    from dmt_jepa.serve.ray_engine import in_order

    started: list[int] = []

    def start(item: int):
        started.append(item)
        return lambda: item * 10

    stages = in_order(iter(range(20)), start, depth=3)
    assert next(stages) == 0 and started == [0, 1, 2]
    assert started == [0, 1, 2]  # a consumer that stalls here holds the reading back
    handed = [0]
    for result in stages:
        assert len(started) - len(handed) <= 3
        handed.append(result)
    assert handed == [i * 10 for i in range(20)] and started == list(range(20))


# Every wait on Ray ends: what the cluster lacks is said in one sentence, in bounded time


def test_an_address_that_does_not_answer_is_refused_in_one_sentence_at_once(tmp_path, inputs, encoder_file):
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    import socket

    with socket.socket() as closed:  # a port nothing listens on once this block ends
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(EngineError, match=f"the Ray cluster at 127.0.0.1:{port} does not answer") as caught:
        embed_shards(str(inputs[0]), tmp_path / "out", encoder_file, engine="ray", address=f"127.0.0.1:{port}")
    assert time.monotonic() - start < 15 and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def dmtjepa(*args: str, timeout: float) -> tuple[int, str, float]:
    """The CLI in a process of its own (Ray starts there, not here): exit code, stderr, seconds taken."""
    import subprocess

    start = time.monotonic()
    run = subprocess.run(
        [str(Path(sys.executable).parent / "dmtjepa"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    return run.returncode, run.stderr, time.monotonic() - start


@pytest.mark.skipif(os.cpu_count() is None or os.cpu_count() > 8, reason="asks for more CPUs than this machine has")
@pytest.mark.parametrize(
    "extra, words",
    [
        (["--model-workers", "12"], "--model-workers 12 with --gpus-per-worker 0 needs 13 CPUs"),
        (["--gpus-per-worker", "64"], "needs 2 CPUs and 64 GPUs"),
    ],
)
def test_actors_a_local_ray_cannot_hold_are_refused_in_one_sentence_not_waited_for(tmp_path, inputs, encoder_file, extra, words):
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    code, stderr, seconds = dmtjepa(
        "embed", str(inputs[0]), str(tmp_path / "out"), "--model", str(encoder_file), "--engine", "ray", *extra, timeout=120
    )
    [error] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and words in error and "lower --model-workers" in error, stderr[-2000:]
    assert seconds < 90  # Ray's own start, then the refusal at once
    assert not list((tmp_path / "out").glob("*.json"))


DRIVER = """
import sys, time
from dmt_jepa.serve import ray_engine
from dmt_jepa.serve.job import EmbedOptions
with ray_engine.session(sys.argv[1], EmbedOptions(engine="ray")):
    print("ready", flush=True)
    time.sleep(600)
"""


def descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every live process below `pid`, from /proc."""
    parents: dict[int, list[int]] = {}
    starts = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(name))
        starts[int(name)] = fields[19]
    found, todo = {}, [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def alive(processes: dict[int, str]) -> list[int]:
    left = []
    for pid, started in processes.items():
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19] == started:
                left.append(pid)
        except OSError:
            pass
    return left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the driver's processes through /proc")
def test_the_local_ray_a_driver_started_goes_when_the_driver_is_killed(encoder_file):
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    import subprocess

    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(encoder_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    started = {}
    try:
        assert driver.stdout.readline() == b"ready\n"  # Ray up, the model actor loaded
        started = descendants(driver.pid)
        assert any(pid for pid in started if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::")), started
        driver.kill()  # SIGKILL: no finally, no atexit
        driver.wait()
        deadline = time.monotonic() + 30
        while alive(started) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert alive(started) == []
    finally:
        driver.kill()
        for pid in alive(started):  # only what this test's driver started, by pid and start time
            os.kill(pid, signal.SIGKILL)
