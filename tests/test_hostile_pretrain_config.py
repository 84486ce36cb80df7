"""Pretrain configs and runs under hostile input: sizes past every bound, malformed YAML, a full
disk, a resume with nothing left to do; each one sentence, nothing lost, nothing rewritten."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from pretrain_fixtures import make_images, tiny_overrides
from safetensors import SafetensorError
from safetensors.torch import load_file
from typer.testing import CliRunner

from dmt_jepa.checkpoint import checkpoint_dirs
from dmt_jepa.cli.main import app
from dmt_jepa.config import ConfigError, load_config
from dmt_jepa.data import pack_images


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("hostile-pretrain")
    make_images(root / "images", 12)
    pack_images(root / "images", root / "shards", max_shard_count=6)
    return str(root / "shards" / "shard-{000000..000001}.tar")


def pretrain_cli(*args: str):
    return CliRunner().invoke(app, ["pretrain", *args])


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.img_size=160000", "model.img_size must be at most 4096 pixels, got 160000"),
        ("model.img_size=.inf", "model.img_size needs an integer, got inf"),
        ("model.patch_size=128", "model.patch_size must be at most 64"),
        ("optimization.batch_size=1000000000", "optimization.batch_size must be at most 65536"),
        ("model.pred_width=1048576", "model.pred_width must be at most 8192"),
        ("model.pred_depth=100000", "model.pred_depth must be at most 256"),
        ("model.pred_heads=100000", "model.pred_heads must be at most 256"),
        ("target.head_depth=100000", "target.head_depth must be within [0, 256]"),
        ("data.num_workers=100000", "data.num_workers must be at most 512"),
    ],
)
def test_sizes_past_the_bounds_are_refused_before_anything_is_built(tmp_path, monkeypatch, override, words):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("dmt_jepa.train.Trainer", no_training)
    result = pretrain_cli(override, f"run.out_dir={tmp_path / 'run'}")
    assert words in one_line_error(result)
    assert not (tmp_path / "run").exists()


# A 6x6 patch grid (96 px, 16 px patches) with mask.min_keep 4, whatever the demo trains on; each case's own
# overrides come after these and win.
SIX_BY_SIX = ["model.img_size=96", "model.patch_size=16", "mask.min_keep=4"]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["model.img_size=16"], "the 1x1 patch grid (model.img_size / model.patch_size) is one patch"),
        (["mask.min_keep=37"], "mask.min_keep must be at most the 36 patches of the 6x6 patch grid"),
        (["mask.num_targets=37"], "mask.num_targets must be at most the 36 patches of the 6x6 patch grid"),
        (["mask.context_scale=[0.01, 0.01]"], "mask.context_scale [0.01, 0.01] can draw a context block of 1 patch on"),
        (["model.img_size=32", "mask.min_keep=3"], "can leave at least mask.min_keep 3 context patches in only"),
    ],
)
def test_mask_settings_the_grid_cannot_hold_are_refused_before_anything_is_made(tmp_path, overrides, words):
    result = pretrain_cli(*SIX_BY_SIX, *overrides, f"run.out_dir={tmp_path / 'run'}")
    assert words in one_line_error(result)
    assert not (tmp_path / "run").exists()


def test_a_config_built_in_python_is_checked_before_the_run_directory_is_made(tmp_path):
    from dataclasses import replace

    from dmt_jepa.train import pretrain

    cfg = load_config(overrides=[f"run.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="1x1 patch grid"):
        pretrain(replace(cfg, model=replace(cfg.model, img_size=16)))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["[a", "...", "{a: [", "*alias", "`x"])
def test_malformed_yaml_override_value_is_one_sentence(tmp_path, value):
    result = pretrain_cli(f"data.train={value}", f"run.out_dir={tmp_path / 'run'}")
    line = one_line_error(result)
    assert "the value of override 'data.train' is not valid YAML" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["- model\n- data\n", "just text\n", "42\n"])
def test_config_file_whose_top_level_is_not_a_mapping_is_one_sentence(tmp_path, text):
    (tmp_path / "c.yaml").write_text(text)
    for extra in ([], ["model.img_size=64"]):
        result = pretrain_cli("--config", str(tmp_path / "c.yaml"), *extra, f"run.out_dir={tmp_path / 'run'}")
        assert "must map sections to settings at its top level" in one_line_error(result)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    (tmp_path / "c.yaml").write_text("# nothing set\n")  # empty: the defaults, as before
    assert load_config(tmp_path / "c.yaml") == load_config(None)


def _tensors_equal(a, b) -> bool:
    a, b = load_file(str(a)), load_file(str(b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _megabytes_said(line: str) -> float:
    return float(re.search(r"\(about ([\d,.]+) MB needed\)", line).group(1).replace(",", ""))


def _folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _full_disk_at_step_4_then_resume(shards, tmp_path, monkeypatch, patch, words: str) -> str:
    """Run with the save of step 4 failing as `patch` makes it; check what is left and that resume finishes."""
    full = pretrain_cli(*tiny_overrides(shards, tmp_path / "full", "optimization.epochs=1"))
    assert full.exit_code == 0, full.output
    with monkeypatch.context() as m:
        patch(m)
        line = one_line_error(pretrain_cli(*tiny_overrides(shards, tmp_path / "run", "optimization.epochs=1")), code=1)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert line.startswith(f"error: {words} while writing checkpoint step 4 in {checkpoints} (about "), line
    assert "step-000000002 is intact" in line and line.endswith(f"--resume {tmp_path / 'run'}."), line
    # what was to be written is as big as the checkpoint before it, measured on disk
    assert _megabytes_said(line) == pytest.approx(_folder_bytes(checkpoints / "step-000000002") / 1e6, rel=0.1, abs=0.05)
    assert [c.name for c in checkpoint_dirs(tmp_path / "run")] == ["step-000000002"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000000002"]  # no partial left
    resumed = pretrain_cli("--resume", str(tmp_path / "run"))
    assert resumed.exit_code == 0, resumed.output
    assert _tensors_equal(tmp_path / "run" / "encoder.safetensors", tmp_path / "full" / "encoder.safetensors")
    return line


@pytest.mark.parametrize(
    "error, words",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
        (SafetensorError("Error while serializing: No space left on device (os error 28)"), "no space left on device"),
    ],
)
def test_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resume_finishes(shards, tmp_path, monkeypatch, error, words):
    import dmt_jepa.checkpoint as checkpoint

    real = checkpoint.save_file

    def disk_full_at_step_4(tensors, filename, metadata=None):
        if "step-000000004" in filename:
            raise error
        real(tensors, filename, metadata=metadata)

    _full_disk_at_step_4_then_resume(
        shards, tmp_path, monkeypatch, lambda m: m.setattr(checkpoint, "save_file", disk_full_at_step_4), words
    )


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs /dev/full")
def test_full_disk_writing_the_training_state_keeps_the_previous_checkpoint(shards, tmp_path, monkeypatch):
    real = torch.save

    def state_onto_a_full_disk(obj, f, *args, **kwargs):
        """At step 4, the bytes go to /dev/full, which refuses every write as a full disk does."""
        if "step-000000004" not in str(getattr(f, "name", f)):
            return real(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)):
            return real(obj, "/dev/full", *args, **kwargs)
        with open("/dev/full", "wb") as full:
            return real(obj, full, *args, **kwargs)

    _full_disk_at_step_4_then_resume(
        shards, tmp_path, monkeypatch, lambda m: m.setattr(torch, "save", state_onto_a_full_disk), "no space left on device"
    )


def test_full_disk_writing_the_encoder_file_then_resume_writes_it(shards, tmp_path, monkeypatch):
    import dmt_jepa.encoder_file as encoder_file

    real = encoder_file.save_file

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(encoder_file, "save_file", disk_full)
    overrides = tiny_overrides(shards, tmp_path / "run", "optimization.epochs=1")
    line = one_line_error(pretrain_cli(*overrides), code=1)
    assert line.startswith(
        f"error: no space left on device while writing the encoder file {tmp_path / 'run' / 'encoder.safetensors'}"
    ), line
    assert "step-000000004 is intact" in line
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "encoder" in p.name) == []  # no half-written file
    monkeypatch.setattr(encoder_file, "save_file", real)
    resumed = pretrain_cli("--resume", str(tmp_path / "run"))
    assert resumed.exit_code == 0 and "already complete" not in resumed.stdout, resumed.output
    target = tmp_path / "run" / "checkpoints" / "step-000000004" / "target_encoder.safetensors"
    assert _tensors_equal(tmp_path / "run" / "encoder.safetensors", target)
    encoder_bytes = (tmp_path / "run" / "encoder.safetensors").stat().st_size
    assert _megabytes_said(line) == pytest.approx(encoder_bytes / 1e6, rel=0.1, abs=0.05)


def _tree(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_of_a_finished_run_changes_nothing_and_says_so(shards, tmp_path):
    overrides = tiny_overrides(shards, tmp_path / "run", "optimization.epochs=1")
    assert pretrain_cli(*overrides).exit_code == 0
    before = _tree(tmp_path / "run")
    for args in (["--resume", str(tmp_path / "run")], ["--resume", str(tmp_path / "run"), "run.progress=false"]):
        result = pretrain_cli(*args)
        assert result.exit_code == 0, result.output
        assert f"the run in {tmp_path / 'run'} is already complete (4 steps)" in result.stdout
        assert "nan" not in result.stdout
        assert _tree(tmp_path / "run") == before
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
