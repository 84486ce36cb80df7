"""`dmtjepa pretrain` overrides that cannot be read: one sentence on stderr, exit 2, nothing made;
under torchrun at most one line per rank (every rank parses the same command line), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.config import ConfigError, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]

MALFORMED = [
    ("data.train=...", "the value of override 'data.train' is not valid YAML"),
    ("data.train=[a", "the value of override 'data.train' is not valid YAML"),
    ("data.train=" + "[" * 5000, "is not valid YAML (nested too deeply)"),
    ("data.train=!!timestamp 2001", "is not valid YAML (a tagged value that cannot be built"),
    ("model.patch_size=!!int abc", "the value of override 'model.patch_size' is not valid YAML"),
    ("model.depth=abc", "unknown config key 'model.depth'; valid keys here are: arch, patch_size"),
    ("model.patch_size=abc", "model.patch_size needs an integer, got 'abc'."),
    ("nokey", "override 'nokey' must look like section.key=value"),
    ("a.b=", "unknown config key 'a'; valid keys here are: model, mask"),
    ("=3", "override '=3' must look like section.key=value"),
    ("model.=16", "override 'model.=16' must look like section.key=value"),
    ("model..patch_size=16", "must look like section.key=value"),
    ("model.patch_size.x=3", "goes inside 'patch_size', which is a value, not a section"),
]


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("dmt_jepa.train.Trainer", refuse)


@pytest.mark.parametrize("override, words", MALFORMED)
def test_malformed_override_is_one_line_on_stderr(tmp_path, monkeypatch, no_training, override, words):
    monkeypatch.delenv("RANK", raising=False)
    result = CliRunner().invoke(app, ["pretrain", f"run.out_dir={tmp_path / 'run'}", override])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rank", ["0", "1", "7"])
def test_under_torchrun_each_rank_reports_in_one_line(tmp_path, monkeypatch, no_training, rank):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "8")
    result = CliRunner().invoke(app, ["pretrain", "data.train=[a", f"run.out_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


@pytest.mark.parametrize(
    "item, expected",
    [
        ("optimization.lr=5e-4", ("optimization.lr", "5e-4")),  # YAML 1.1 reads it as text; the dataclass types it
        (" model.patch_size = 8", ("model.patch_size", 8)),
        ("data.train=", ("data.train", "")),
        ("data.train=a=b.tar", ("data.train", "a=b.tar")),
        ("data.crop_scale=[0.2, 1]", ("data.crop_scale", [0.2, 1])),
        ("data.train='[a'", ("data.train", "[a")),
    ],
)
def test_parse_override_splits_at_the_first_equals_and_reads_yaml(item, expected):
    assert parse_override(item) == expected


@pytest.mark.parametrize("text", ["model: " + "[" * 5000, "model: !!timestamp 2001\n", "model: !!float fast\n"])
def test_config_file_yaml_that_cannot_be_built_is_one_sentence(tmp_path, text):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"^config file .*c\.yaml is not valid YAML \(") as err:
        load_config(tmp_path / "c.yaml")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("make", ["file", "under_a_file"])
def test_run_directory_that_cannot_be_made_is_one_sentence(shards_dir, tmp_path, monkeypatch, make):
    monkeypatch.delenv("RANK", raising=False)
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "afile" if make == "file" else tmp_path / "afile" / "run"
    result = CliRunner().invoke(app, ["pretrain", f"data.train={shards_dir}", f"run.out_dir={out}"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and f"cannot make the run directory {out}" in lines[0], result.stderr
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.fixture
def shards_dir(tmp_path) -> str:
    from pretrain_fixtures import make_images

    from dmt_jepa.data import pack_images

    make_images(tmp_path / "images", 4)
    pack_images(tmp_path / "images", tmp_path / "shards")
    return str(tmp_path / "shards" / "shard-000000.tar")


def entry_point(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    env.pop("RANK", None)
    return subprocess.run(
        [sys.executable, "-m", "dmt_jepa.cli.main", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.parametrize("override", ["data.train=[a", "model.depth=abc"])
def test_real_entry_point_prints_one_sentence_and_no_traceback(tmp_path, override):
    out = entry_point("pretrain", override, f"run.out_dir={tmp_path / 'run'}")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_with_a_malformed_override_prints_one_error_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "dmt_jepa.cli.main",
        "pretrain",
        "data.train=[a",
        "run.device=cpu",
        f"run.out_dir={tmp_path / 'run'}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    ours = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    # One line per rank at most: the first rank to exit has said it before torchrun stops the other.
    assert 1 <= len(ours) <= 2 and len(set(ours)) == 1, out.stderr
    assert "'data.train' is not valid YAML" in ours[0]
    assert not (tmp_path / "run").exists()
