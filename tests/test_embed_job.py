"""The embedding job end to end: equal to PyTorch, every key accounted for, ranks, restarts, kills, errors."""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from embed_helpers import (
    TRAIN_SIZE,
    huge_png_header,
    image_bytes,
    photo_samples,
    read_output,
    tiny_encoder,
    write_encoder_file,
    write_shard,
)
from PIL import Image
from typer.testing import CliRunner

import dmt_jepa
from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import model_identity
from dmt_jepa.serve import embed_shards
from dmt_jepa.serve.images import prepare
from dmt_jepa.serve.stats import STATS_DIR

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    return write_encoder_file(tmp_path_factory.mktemp("model") / "enc.safetensors")


def reference_embedding(data: bytes) -> tuple[np.ndarray, list[int]]:
    """Shorter side to 64, centre 64 x 64, normalise, encoder.dense: written out step by step."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    height, width = image.height, image.width
    scale = TRAIN_SIZE / min(height, width)
    new_h, new_w = max(TRAIN_SIZE, round(height * scale)), max(TRAIN_SIZE, round(width * scale))
    top, left = (new_h - TRAIN_SIZE) // 2, (new_w - TRAIN_SIZE) // 2
    pixels = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))[top : top + TRAIN_SIZE, left : left + TRAIN_SIZE]
    x = ((pixels / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32)
    with torch.no_grad():
        grid, _ = tiny_encoder().dense(torch.from_numpy(x))
    return grid[0].numpy(), [height, width]


def snapshot(out_dir: Path) -> dict[str, bytes]:
    """The byte-reproducible files: everything but the stats directory (timings, hosts)."""
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir()) if p.name != STATS_DIR}


def test_outputs_equal_pytorch_with_documented_shapes(tmp_path, encoder_file):
    shards = {f"part-{s}": photo_samples(f"p{s}_", 5, seed=s) for s in range(2)}
    for name, samples in shards.items():
        write_shard(tmp_path / "in" / f"{name}.tar", samples)
    summary = embed_shards(
        str(tmp_path / "in" / "part-{0..1}.tar"), tmp_path / "out", encoder_file, batch_size=3, workers=1, pooled=True
    )
    assert summary.embedded == 10 and summary.failed == 0 and summary.backend == "torch-cpu"
    for name, samples in shards.items():
        written = read_output(tmp_path / "out" / f"{name}.tar")
        assert list(written) == [key for key, _ in samples]
        for key, members in samples:
            emb = np.load(io.BytesIO(written[key]["emb.npy"]))
            pooled = np.load(io.BytesIO(written[key]["pooled.npy"]))
            want, original = reference_embedding(next(v for e, v in members.items() if e in ("png", "jpg")))
            assert emb.dtype == np.float16 and emb.shape == (4, 4, 32)
            np.testing.assert_allclose(emb.astype(np.float32), want, atol=2e-2, rtol=1e-2)
            np.testing.assert_allclose(pooled.astype(np.float32), want.mean((0, 1)), atol=2e-3)
            record = json.loads(written[key]["json"])
            assert record == {"original_size": original, "input_size": [64, 64], "grid": [4, 4], "resize": "crop"}
        done = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert done["embedded"] == 5 and done["failures"] == [] and done["cut"] is None
        assert done["model"]["sha256"] == model_identity(encoder_file) and done["precision"] == "fp32"


def bad_samples() -> list[tuple[str, dict[str, bytes]]]:
    good = image_bytes(80, 70, "PNG", seed=1)
    return [
        ("good0", {"png": good, "cls": b"0"}),
        ("corrupt", {"jpg": b"\xff\xd8\xff\xe0" + os.urandom(300)}),
        ("truncated", {"png": image_bytes(90, 90, "PNG", seed=2)[:200]}),
        ("zero", {"jpg": b""}),
        ("textasjpg", {"jpg": b"this is a caption, not an image"}),
        ("bomb", {"png": huge_png_header(100_000, 100_000)}),
        ("tiny", {"png": image_bytes(8, 300, "PNG")}),
        ("noimage", {"cls": b"3", "txt": b"caption"}),
        ("good1", {"jpg": image_bytes(100, 64, "JPEG", seed=3)}),
    ]


def test_bad_inputs_never_stop_the_job_and_every_key_is_accounted_for(tmp_path, encoder_file):
    write_shard(tmp_path / "in" / "bad.tar", bad_samples())
    cut_source = write_shard(tmp_path / "whole.tar", photo_samples("c", 6, seed=9)).read_bytes()
    (tmp_path / "in" / "cut.tar").write_bytes(cut_source[: len(cut_source) * 2 // 3])
    (tmp_path / "in" / "garbage.tar").write_bytes(os.urandom(3000))
    result = CliRunner().invoke(
        app, ["embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(encoder_file), "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    bad = json.loads((tmp_path / "out" / "bad.json").read_text())
    embedded = set(read_output(tmp_path / "out" / "bad.tar"))
    reasons = {f["key"]: f["reason"] for f in bad["failures"]}
    assert embedded == {"good0", "good1"} and bad["embedded"] == 2
    assert set(reasons) | embedded == {key for key, _ in bad_samples()} and not set(reasons) & embedded
    for key, words in [
        ("corrupt", "cannot decode"),
        ("truncated", "cannot decode"),
        ("zero", "empty"),
        ("textasjpg", "cannot decode"),
        ("bomb", "decompression bomb"),
        ("tiny", "smaller than one"),
        ("noimage", "no image member"),
    ]:
        assert words in reasons[key], (key, reasons[key])
    cut = json.loads((tmp_path / "out" / "cut.json").read_text())
    kept = list(read_output(tmp_path / "out" / "cut.tar"))
    assert cut["cut"] and kept == [f"c{i:04d}" for i in range(len(kept))] and len(kept) >= 2
    assert cut["embedded"] + cut["failed"] >= len(kept)
    assert json.loads((tmp_path / "out" / "garbage.json").read_text())["cut"]
    assert "3 shards embedded" in result.output and "2 shards cut off" in result.output


def test_two_ranks_cover_every_shard_once_and_equal_one_process(tmp_path, encoder_file, monkeypatch):
    for s in range(5):
        write_shard(tmp_path / "in" / f"s{s}.tar", photo_samples(f"k{s}_", 2, seed=s))
    single = embed_shards(str(tmp_path / "in"), tmp_path / "one", encoder_file, workers=0)
    rank0 = embed_shards(str(tmp_path / "in"), tmp_path / "two", encoder_file, workers=0, rank=0, world_size=2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rank1 = embed_shards(str(tmp_path / "in"), tmp_path / "two", encoder_file, workers=0)
    assert (rank0.rank, rank1.rank) == (0, 1)
    assert sorted(rank0.shards + rank1.shards) == sorted(single.shards) and not set(rank0.shards) & set(rank1.shards)
    assert snapshot(tmp_path / "two") == snapshot(tmp_path / "one")


def test_rerun_skips_done_shards_and_redoes_the_rest(tmp_path, encoder_file):
    for s in range(3):
        write_shard(tmp_path / "in" / f"s{s}.tar", photo_samples(f"k{s}_", 2, seed=s))
    embed_shards(str(tmp_path / "in"), tmp_path / "out", encoder_file, workers=0)
    clean = snapshot(tmp_path / "out")
    (tmp_path / "out" / "s1.json").unlink()
    (tmp_path / "out" / ".s1.tar.partial").write_bytes(b"left by a killed run")
    again = embed_shards(str(tmp_path / "in"), tmp_path / "out", encoder_file, workers=0, progress=True)
    assert again.skipped == ["s0", "s2"] and again.embedded == 2
    assert snapshot(tmp_path / "out") == clean


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the embedding process never reached the state to kill it in"
        time.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


# The real CLI in a real process, with a writer slowed down so that the kill lands mid-shard.
SLOW_WRITER = """
import sys, time
from dmt_jepa.serve.shards import ShardOutput
add = ShardOutput.add
def slow_add(self, *args, **kwargs):
    time.sleep(0.05)
    add(self, *args, **kwargs)
ShardOutput.add = slow_add
import dmt_jepa
from dmt_jepa.cli.main import app
app(sys.argv[1:])
"""


def test_killed_mid_shard_then_rerun_equals_one_clean_run(tmp_path, encoder_file):
    for s in range(4):
        write_shard(tmp_path / "in" / f"s{s}.tar", photo_samples(f"k{s}_", 8, seed=s))
    embed_shards(str(tmp_path / "in"), tmp_path / "clean", encoder_file, batch_size=4, workers=0)
    clean = snapshot(tmp_path / "clean")
    out = tmp_path / "out"
    args = [
        "embed",
        str(tmp_path / "in"),
        str(out),
        "--model",
        str(encoder_file),
        "--batch-size",
        "4",
        "--workers",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: (out / "s0.json").exists() and any(p.name.endswith(".partial") for p in out.iterdir()))
        children = [int(p) for p in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    visible = snapshot(out)
    assert "s0.json" in visible and len([n for n in visible if n.endswith(".json")]) < 4  # killed mid-job
    for name, data in visible.items():
        if not name.startswith("."):
            assert data == clean[name], f"{name} became visible before it was complete"
    wait_for(lambda: all(gone(pid) for pid in children), timeout=10)  # decode workers follow their parent
    embed_shards(str(tmp_path / "in"), out, encoder_file, batch_size=4, workers=0)
    assert snapshot(out) == clean


@pytest.mark.parametrize(
    "case, words",
    [
        ("no-input", "matches no existing shard"),
        ("model-kind", "neither an encoder file"),
        ("out-not-writable", "cannot write to OUT_DIR"),
        ("out-is-input", "would overwrite"),
        ("bad-size", "not a multiple of the patch size"),
    ],
)
def test_user_errors_are_one_sentence_and_write_nothing(tmp_path, encoder_file, case, words):
    write_shard(tmp_path / "in" / "s.tar", photo_samples("k", 1))
    (tmp_path / "notes.txt").write_text("not a model")
    inputs, out, model, extra = str(tmp_path / "in"), tmp_path / "out", encoder_file, []
    if case == "no-input":
        inputs = str(tmp_path / "none-{0..3}.tar")
    elif case == "model-kind":
        model = tmp_path / "notes.txt"
    elif case == "out-not-writable":
        out = tmp_path / "notes.txt" / "out"
    elif case == "out-is-input":
        out = tmp_path / "in"
    else:
        extra = ["--size", "50x64"]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    result = CliRunner().invoke(app, ["embed", inputs, str(out), "--model", str(model), *extra])
    assert result.exit_code == 2
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_pipe_and_gzip_sources_give_the_same_output(tmp_path, encoder_file):
    import gzip

    shard = write_shard(tmp_path / "src" / "a.tar", photo_samples("k", 3))
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "a.tar.gz").write_bytes(gzip.compress(shard.read_bytes()))
    (tmp_path / "list.txt").write_text(f"pipe:cat {shard}\n")
    for name, inputs in [("plain", str(shard)), ("pipe", str(tmp_path / "list.txt")), ("gzip", str(tmp_path / "gz"))]:
        embed_shards(inputs, tmp_path / name, encoder_file, workers=0)
    assert snapshot(tmp_path / "plain")["a.tar"] == snapshot(tmp_path / "pipe")["a.tar"] == snapshot(tmp_path / "gzip")["a.tar"]


def crash_on_marker(data: bytes, prep):
    """`prepare` with a decoder that dies the hard way (as a segfault in an image library would)."""
    if data.startswith(b"CRASH"):
        os.kill(os.getpid(), signal.SIGKILL)
    return prepare(data, prep)


def test_a_decoder_crash_costs_only_its_own_image(tmp_path, encoder_file, monkeypatch):
    monkeypatch.setattr("dmt_jepa.serve.decode.prepare", crash_on_marker)
    samples = photo_samples("a", 3) + [("boom", {"png": b"CRASH" + bytes(100)})] + photo_samples("b", 4)
    write_shard(tmp_path / "in" / "s.tar", samples)
    summary = embed_shards(str(tmp_path / "in"), tmp_path / "out", encoder_file, workers=1, batch_size=2)
    record = json.loads((tmp_path / "out" / "s.json").read_text())
    assert summary.embedded == 7 and [f["key"] for f in record["failures"]] == ["boom"]
    assert "crashed the decoder" in record["failures"][0]["reason"]
    assert list(read_output(tmp_path / "out" / "s.tar")) == [key for key, _ in samples if key != "boom"]


def test_rerun_with_other_settings_refuses_naming_the_difference(tmp_path, encoder_file):
    for s in range(4):
        write_shard(tmp_path / "in" / f"s{s}.tar", photo_samples(f"k{s}_", 2, seed=s))
    other_model = write_encoder_file(tmp_path / "other.safetensors", seed=1)
    embed_shards(str(tmp_path / "in" / "s{0..1}.tar"), tmp_path / "out", encoder_file, workers=0)
    first = snapshot(tmp_path / "out")
    for extra, words in [
        (["--model", str(other_model)], "model_sha256"),
        (["--model", str(encoder_file), "--size", "128"], "input_size"),
        (["--model", str(encoder_file), "--resize", "pad"], "resize"),
        (["--model", str(encoder_file), "--pooled"], "pooled"),
        (["--model", str(encoder_file), "--layout", "array"], "layout"),
        (["--model", str(encoder_file), "--dtype", "int8"], "dtype"),
    ]:
        result = CliRunner().invoke(app, ["embed", str(tmp_path / "in" / "s{0..3}.tar"), str(tmp_path / "out"), *extra])
        assert result.exit_code == 2, result.output
        assert words in result.stderr and "--overwrite" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert snapshot(tmp_path / "out") == first  # nothing written, nothing mixed in
    args = ["embed", str(tmp_path / "in" / "s{0..3}.tar"), str(tmp_path / "out"), "--model", str(other_model)]
    result = CliRunner().invoke(app, [*args, "--overwrite", "--workers", "0"])
    assert result.exit_code == 0, result.output
    embed_shards(str(tmp_path / "in"), tmp_path / "clean", other_model, workers=0)
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "clean")


def test_identity_is_recorded_and_a_shard_needs_both_files(tmp_path, encoder_file):
    write_shard(tmp_path / "in" / "s0.tar", photo_samples("k", 2))
    embed_shards(str(tmp_path / "in"), tmp_path / "out", encoder_file, workers=0)
    clean = snapshot(tmp_path / "out")
    record = json.loads(clean["s0.json"])
    assert record["identity"] == {
        "model_sha256": model_identity(encoder_file),
        "input_size": [64, 64],
        "resize": "crop",
        "pooled": False,
        "layout": "tar",
        "dtype": "float16",
        "pooled_only": False,
        "max_carried_bytes": 65536,
        "pca": None,
        "precision": "fp32",
        "backend": "torch",
        "version": dmt_jepa.__version__,
    }
    (tmp_path / "out" / "s0.tar").unlink()  # NAME.json alone is not a done shard
    again = embed_shards(str(tmp_path / "in"), tmp_path / "out", encoder_file, workers=0)
    assert again.skipped == [] and again.completed == ["s0"] and snapshot(tmp_path / "out") == clean


def test_a_missing_shard_is_reported_and_done_once_it_appears(tmp_path, encoder_file):
    write_shard(tmp_path / "in" / "s0.tar", photo_samples("k", 2))
    (tmp_path / "list.txt").write_text("in/s0.tar\nin/late.tar\n")
    args = ["embed", str(tmp_path / "list.txt"), str(tmp_path / "out"), "--model", str(encoder_file), "--workers", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3 and "late" in result.stderr and "not done" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_stats", "s0.json", "s0.tar"]
    assert not (tmp_path / "out" / STATS_DIR / "summary.json").exists()  # the job is not complete
    write_shard(tmp_path / "in" / "late.tar", photo_samples("l", 2, seed=5))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "1 shards embedded, 1 already done" in result.output
    assert json.loads((tmp_path / "out" / "late.json").read_text())["embedded"] == 2


def test_hostile_member_names_stay_inside_an_extraction_and_keep_their_key(tmp_path, encoder_file):
    image = image_bytes(70, 70, "PNG", seed=4)
    write_shard(tmp_path / "in" / "evil.tar", [("../../x", {"png": image}), ("/abs/path", {"png": image})])
    summary = embed_shards(str(tmp_path / "in"), tmp_path / "out", encoder_file, workers=0)
    assert summary.embedded == 2
    target = tmp_path / "deep" / "extract"
    target.mkdir(parents=True)
    with tarfile.open(tmp_path / "out" / "evil.tar") as tar:
        names = tar.getnames()
        # what an extractall without a filter (Python < 3.14's default) would write to: inside, every one
        assert all(target in Path(os.path.realpath(os.path.join(target, n))).parents for n in names), names
        tar.extractall(target, filter="data")  # raises, writing nothing, for a name that leaves `target`
    written = {p for p in tmp_path.rglob("*") if p.is_file() and p.name.endswith(".npy")}
    assert len(written) == 2 and all(target in p.parents for p in written), sorted(map(str, written))
    assert names[0] == "%2E%2E/%2E%2E/x.emb.npy" and names[2] == "%2Fabs/path.emb.npy"
    record = json.loads((target / "%2Fabs" / "path.json").read_text())
    assert record["key"] == "/abs/path"


def test_a_malformed_pax_header_cuts_its_shard_and_the_job_goes_on(tmp_path, encoder_file):
    write_shard(tmp_path / "in" / "s0.tar", photo_samples("a", 2))
    image = image_bytes(70, 70)
    info = tarfile.TarInfo("b.png")
    info.size, info.pax_headers = len(image), {"size": "abc"}
    with tarfile.open(tmp_path / "in" / "s1.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(image))
    write_shard(tmp_path / "in" / "s2.tar", photo_samples("c", 2, seed=2))
    result = CliRunner().invoke(
        app, ["embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(encoder_file), "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "s1.json").read_text())["cut"]
    assert json.loads((tmp_path / "out" / "s2.json").read_text())["embedded"] == 2


def long_thin_png(width: int, height: int) -> bytes:
    """A grayscale PNG of zeros written chunk by chunk: 1,000,000 x 16 is about 20 KB."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = zlib.compress(bytes(height * (1 + width)), 9)  # filter byte 0, then the row's pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


# Peak RSS of one embedding process, in its own interpreter: after a warm-up job on a small image
# (torch, the model, the pipeline), then after a job on the given shard; decoding in the process.
PEAK_RSS = """
import json, resource, sys
from dmt_jepa.serve import embed_shards
embed_shards(sys.argv[1], sys.argv[3], sys.argv[4], workers=0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
summary = embed_shards(sys.argv[2], sys.argv[3], sys.argv[4], workers=0)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "after_kib": after, "embedded": summary.embedded}))
"""
HUGE_IMAGE_RSS_BOUND_MIB = 200  # docs/embed.md: what one 16 M-pixel image may add to the job's peak


def test_peak_memory_of_an_extreme_aspect_ratio_stays_bounded(tmp_path, encoder_file):
    png = long_thin_png(1_000_000, 16)
    assert len(png) < 40_000
    write_shard(tmp_path / "small" / "a.tar", [("small", {"png": image_bytes(70, 70)})])
    write_shard(tmp_path / "huge" / "b.tar", [("thin", {"png": png})])
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PEAK_RSS,
            str(tmp_path / "small"),
            str(tmp_path / "huge"),
            str(tmp_path / "out"),
            str(encoder_file),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    assert rss["embedded"] == 1
    assert (rss["after_kib"] - rss["before_kib"]) / 1024 < HUGE_IMAGE_RSS_BOUND_MIB, rss


def test_queued_bytes_are_bounded_and_one_image_over_the_budget_still_passes(tmp_path, encoder_file):
    from dmt_jepa.serve.job import _ByteBudget

    budget, stop, peak = _ByteBudget(1000), threading.Event(), []
    budget.acquire(600, stop)
    waiter = threading.Thread(target=lambda: (budget.acquire(600, stop), peak.append(budget.used)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and budget.used == 600  # 1200 would exceed the budget: it waits
    budget.release(600)
    waiter.join(timeout=5)
    assert peak == [600]
    budget.release(600)
    budget.acquire(5000, stop)  # alone in the queue: larger than the budget, yet it passes
    assert budget.used == 5000
    write_shard(tmp_path / "in" / "s.tar", photo_samples("k", 6))
    embed_shards(str(tmp_path / "in"), tmp_path / "tight", encoder_file, workers=1, max_queued_bytes=1)
    embed_shards(str(tmp_path / "in"), tmp_path / "loose", encoder_file, workers=1)
    assert snapshot(tmp_path / "tight") == snapshot(tmp_path / "loose")


def limit_file_size(limit: int):
    """preexec_fn: writes past `limit` bytes fail with EFBIG, as they would on a full disk."""

    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a signal that kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_write_failure_is_one_sentence_removes_partials_and_marks_nothing_done(tmp_path, encoder_file):
    write_shard(tmp_path / "in" / "s0.tar", photo_samples("a", 2))
    write_shard(tmp_path / "in" / "s1.tar", photo_samples("b", 16, seed=1))
    embed_shards(str(tmp_path / "in"), tmp_path / "clean", encoder_file, workers=0)
    clean = snapshot(tmp_path / "clean")
    assert len(clean["s0.tar"]) < 20_000 < len(clean["s1.tar"])
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dmt_jepa.cli.main",
            "embed",
            str(tmp_path / "in"),
            str(out),
            "--model",
            str(encoder_file),
            "--workers",
            "0",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size(20_000),
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: writing into OUT_DIR") and len(result.stderr.strip().splitlines()) == 1
    assert "File too large" in result.stderr
    assert snapshot(out) == {"s0.json": clean["s0.json"], "s0.tar": clean["s0.tar"]}  # nothing aside, s1 not done
    embed_shards(str(tmp_path / "in"), out, encoder_file, workers=0)
    assert snapshot(out) == clean


def test_name_json_is_the_same_bytes_on_every_run(tmp_path, encoder_file):
    write_shard(tmp_path / "in" / "bad.tar", bad_samples())
    for name in ("one", "two"):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "dmt_jepa.cli.main",
                "embed",
                str(tmp_path / "in"),
                str(tmp_path / name),
                "--model",
                str(encoder_file),
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    one = (tmp_path / "one" / "bad.json").read_bytes()
    assert one == (tmp_path / "two" / "bad.json").read_bytes() and b" at 0x" not in one
