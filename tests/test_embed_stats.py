"""A job you can watch: plain progress lines, per-shard stats, the job summary, `dmtjepa info OUT_DIR`."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from embed_helpers import image_bytes, photo_samples, write_encoder_file, write_shard
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.serve import embed_shards
from dmt_jepa.serve.stats import STATS_DIR, failure_kind

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    return write_encoder_file(tmp_path_factory.mktemp("model") / "enc.safetensors")


def test_progress_lines_without_a_terminal(tmp_path, encoder_file):
    for s in range(3):
        write_shard(tmp_path / "in" / f"s{s}.tar", photo_samples(f"k{s}_", 3, seed=s))
    result = subprocess.run(
        [sys.executable, "-m", "dmt_jepa.cli.main", "embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model",
         str(encoder_file), "--workers", "0", "--batch-size", "2", "--progress-every", "0.001"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("embed: ")]
    pattern = r"embed: (\d+) images, [\d.]+ images/s, shards (\d)/3, (\d+) failed, elapsed \d+ s, ETA (\S+)"
    parsed = [re.fullmatch(pattern, line) for line in lines]
    assert len(lines) >= 4 and all(parsed), result.stderr
    assert parsed[-1].groups()[:3] == ("9", "3", "0") and parsed[-1].group(4) == "00:00:00"
    assert "\x1b" not in result.stderr  # no cursor moves in a log file


def test_summary_totals_are_the_sums_of_the_shard_records(tmp_path, encoder_file):
    bad = [("noimage", {"txt": b"x"}), ("corrupt", {"jpg": b"\xff\xd8junk"}), ("empty", {"png": b""})]
    for s in range(4):
        write_shard(tmp_path / "in" / f"s{s}.tar", photo_samples(f"k{s}_", 2 + s, seed=s) + bad[: s % 4])
    first = embed_shards(str(tmp_path / "in"), tmp_path / "out", encoder_file, workers=0, rank=0, world_size=2)
    assert first.job is None and not (tmp_path / "out" / STATS_DIR / "summary.json").exists()
    second = embed_shards(str(tmp_path / "in"), tmp_path / "out", encoder_file, workers=0, rank=1, world_size=2)
    summary = json.loads((tmp_path / "out" / STATS_DIR / "summary.json").read_text())
    assert second.job == summary
    stats = [json.loads((tmp_path / "out" / STATS_DIR / f"s{s}.json").read_text()) for s in range(4)]
    records = [json.loads((tmp_path / "out" / f"s{s}.json").read_text()) for s in range(4)]
    assert summary["embedded"] == sum(r["embedded"] for r in stats) == sum(r["embedded"] for r in records) == 14
    assert summary["failed"] == sum(r["failed"] for r in stats) == sum(r["failed"] for r in records) == 3 + 1 + 2
    kinds = {}
    for record in records:
        for failure in record["failures"]:
            kinds[failure_kind(failure["reason"])] = kinds.get(failure_kind(failure["reason"]), 0) + 1
    assert summary["failures_by_kind"] == kinds and len(kinds) == 3
    assert summary["shards"] == 4 and summary["workers"] == 2 and summary["versions"] == [stats[0]["version"]]
    assert summary["wall_seconds"] >= max(r["seconds"] for r in stats)
    assert {r["rank"] for r in stats} == {0, 1} and all(r["seconds"] > 0 for r in stats)


def test_failure_kinds_drop_what_is_particular_to_a_sample():
    assert failure_kind("member a/b.jpg is 300 bytes, more than the 100-byte limit") == (
        "member X is N bytes, more than the N-byte limit"
    )
    assert failure_kind("cannot decode the image (OSError: broken data)") == "cannot decode the image"


def test_info_summarises_an_out_dir_and_names_what_is_missing(tmp_path, encoder_file):
    write_shard(tmp_path / "in" / "s0.tar", photo_samples("a", 3) + [("noimage", {"txt": b"x"})])
    (tmp_path / "list.txt").write_text("in/s0.tar\nin/late.tar\n")
    embed_shards(str(tmp_path / "list.txt"), tmp_path / "out", encoder_file, workers=0, layout="array", dtype="int8")
    result = CliRunner().invoke(app, ["info", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    data = sum(p.stat().st_size for p in (tmp_path / "out").iterdir() if p.is_file() and not p.name.endswith(".json"))
    assert info["shards_done"] == 1 and info["shards_in_job"] == 2 and info["missing"] == ["late"]
    assert info["embedded"] == 3 and info["failed"] == 1 and info["data_bytes"] == data
    assert info["settings"] == [{"layout": "array", "dtype": "int8", "pooled": False, "pooled_only": False}]
    assert info["models"][0]["sha256"] and info["summary"] is None
    text = CliRunner().invoke(app, ["info", str(tmp_path / "out")]).stdout
    assert "not done: 1 (late)" in text and "3 embedded, 1 failed" in text
    (tmp_path / "out" / ".late.v2.patches.npy.host-1-abc.partial").write_bytes(b"")
    assert json.loads(CliRunner().invoke(app, ["info", str(tmp_path / "out"), "--json"]).stdout)["in_progress"] == ["late.v2"]
    (tmp_path / "out" / ".late.v2.patches.npy.host-1-abc.partial").unlink()
    write_shard(tmp_path / "in" / "late.tar", [("b", {"png": image_bytes(70, 70)})])
    embed_shards(str(tmp_path / "list.txt"), tmp_path / "out", encoder_file, workers=0, layout="array", dtype="int8")
    info = json.loads(CliRunner().invoke(app, ["info", str(tmp_path / "out"), "--json"]).stdout)
    assert info["missing"] == [] and info["summary"]["embedded"] == 4  # both runs: s0 kept its stats record
    assert info["summary"]["shards_with_stats"] == 2 and info["summary"]["failed"] == 1
