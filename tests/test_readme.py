"""README's bash blocks, run in the order written from an empty folder, with its placeholders
(image folder, shard patterns, a public checkpoint) filled by tiny real files and every pretrain
made tiny; lines that need what this machine lacks are skipped with the reason said here."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dmt_jepa.cli.main import app

ROOT = Path(__file__).resolve().parents[1]

# Line fragment -> why the line is not run here. Every README line is run or named here.
SKIPPED = {
    "pip install": "installs packages over the network",
    "-m pytest": "the test suite itself",
    "torchrun": "several processes under torchrun (tests/test_pretrain_ddp.py runs DDP on CPU)",
    "srun": "needs SLURM",
    "--trt": "needs TensorRT and a GPU",
    "--backend torch-cuda": "needs a CUDA GPU (tests/test_embed_device_decode.py runs --decode gpu's path on the CPU)",
    "s3://": "needs an object store",
    "eval detect": "trains a Faster R-CNN for minutes (tests/test_detection.py covers it)",
    "benchmarks/study.py": "the study, hours on 2 cores",
}
# README placeholder -> the tiny real thing the test makes in its place.
FILLED = {
    "IMAGE_DIR": "images",
    "--train 5000 --test 1000": "--train 16 --test 8",
    "shards/shard-{000000..000127}.tar": "shards/shard-000000.tar",  # `data pack` of 8 images makes one shard
    "data/train-{0000..0099}.tar": "data/train-{0000..0001}.tar",
}
# Appended right after `pretrain`, so that the README's own overrides (later) still win.
TINY = [
    "model.arch=vit_nano", "model.img_size=64", "model.pred_width=32", "model.pred_depth=1", "mask.min_keep=2",
    "target.head_depth=1", "data.samples_per_epoch=8", "data.num_workers=0", "data.shuffle_buffer=8",
    "data.scenes_train=16", "data.scenes_test=16", "optimization.epochs=1", "optimization.batch_size=4",
    "optimization.warmup_epochs=0", "run.checkpoint_every=2",
]  # fmt: skip


def bash_lines() -> list[str]:
    """Every command line of README's ```bash blocks, in order, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def skip_reason(line: str) -> str | None:
    return next((why for fragment, why in SKIPPED.items() if fragment in line), None)


def command_args(line: str) -> list[str]:
    """The arguments after `dmtjepa`, placeholders filled, optional [...] parts left out."""
    for placeholder, real in FILLED.items():
        line = line.replace(placeholder, real)
    line = re.sub(r"\s\[[^\]]*\]", "", line)
    words = shlex.split(line, comments=True)
    assert words[0] == "dmtjepa", line
    args = words[1:]
    if args[0] == "pretrain" and "--resume" not in args:
        args[1:1] = TINY
    return args


def test_every_readme_line_is_a_dmtjepa_command_or_skipped_with_a_reason():
    lines = bash_lines()
    assert len(lines) >= 25
    for line in lines:
        assert skip_reason(line) or line.startswith("dmtjepa "), f"README line neither run nor skipped: {line}"


def test_every_readme_command_has_help():
    commands = set()
    for line in bash_lines():
        words = shlex.split(line, comments=True)
        if words[0] == "dmtjepa":  # a group's command is its second word
            commands.add(tuple(words[1:3] if words[1] in ("data", "eval", "viz") else words[1:2]))
    assert {("pretrain",), ("export",), ("embed",), ("info",), ("data", "scenes"), ("viz", "pca")} <= commands
    for command in sorted(commands):
        result = CliRunner().invoke(app, [*command, "--help"], prog_name="dmtjepa")
        assert result.exit_code == 0, (command, result.output)
        assert f"Usage: dmtjepa {' '.join(command)}" in " ".join(result.stdout.split()), result.stdout


def make_placeholders(folder: Path) -> None:
    from pretrain_fixtures import make_images
    from test_pretrain_convert import public_checkpoint

    from dmt_jepa.data import pack_images

    make_images(folder / "images", 8, classes=2)
    pack_images(make_images(folder / "scratch", 6, seed=1)[0].parent, folder / "scratch-shards", max_shard_count=3)
    (folder / "data" / "shards").mkdir(parents=True)
    for i, shard in enumerate(sorted((folder / "scratch-shards").glob("*.tar"))):
        (folder / "data" / f"train-{i:04d}.tar").write_bytes(shard.read_bytes())
        (folder / "data" / "shards" / shard.name).write_bytes(shard.read_bytes())
    (folder / "shards.txt").write_text("data/train-0000.tar\ndata/train-0001.tar\n")
    public_checkpoint(folder / "ijepa.pth.tar")
    from labelled_datasets import scenes, write_voc

    write_voc(scenes(folder / "voc-scenes", 8, 4, 32), folder / "VOC2012", folder / "voc-reference")


@pytest.mark.slow
def test_readme_commands_work_in_the_order_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    make_placeholders(tmp_path)
    ran, skipped = [], []
    for line in bash_lines():
        if skip_reason(line):
            skipped.append(line)
            continue
        result = CliRunner().invoke(app, command_args(line), prog_name="dmtjepa")
        assert result.exit_code == 0, f"{line}\n{result.output}"
        ran.append((line, result.stdout))
    assert len(ran) >= 19 and len(skipped) <= 10

    # What README says each command leaves behind.
    for run in ("runs/demo", "runs/b16", "runs/learned8"):
        assert (tmp_path / run / "encoder.safetensors").is_file() and (tmp_path / run / "log.jsonl").is_file()
        assert any((tmp_path / run / "checkpoints").iterdir())
    learned = yaml.safe_load((tmp_path / "runs/learned8/config.yaml").read_text())
    assert learned["target"]["query"] == "learned" and learned["model"]["patch_size"] == 8
    assert learned["target"]["aggregation"] == "cross_attention"  # the query is a setting of the paper's head
    b16 = yaml.safe_load((tmp_path / "runs/b16/config.yaml").read_text())
    assert b16["data"]["train"] == "shards/shard-000000.tar" and b16["optimization"]["final_weight_decay"] == 0.4
    resumed = next(out for line, out in ran if "--resume runs/b16" in line)
    assert "already complete" in resumed
    assert sorted(p.name for p in (tmp_path / "scenes").glob("*.tar")) == ["test-000000.tar", "train-000000.tar"]
    assert (tmp_path / "shards" / "shard-000000.tar").is_file() and (tmp_path / "encoder.safetensors").is_file()
    made_files = ("deploy/encoder.onnx", "deploy-layers/encoder.onnx", "models/dmt_jepa/config.pbtxt", "hf/config.json",
                  "pca.png", "att.png", "curves.png")
    made_files += ("voc/dataset.json", "head.safetensors", "seg/segmenter.onnx")
    for made in made_files:
        assert (tmp_path / made).is_file(), made
    assert any((tmp_path / "timm").iterdir())
    for out, shards in (("out", ["train-0000", "train-0001"]), ("out-int8", ["shard-000000", "shard-000001"])):
        for name in shards:
            done = json.loads((tmp_path / out / f"{name}.json").read_text())
            assert done["embedded"] == 3 and not done["failures"], done
    assert sorted(p.name for p in (tmp_path / "vectors" / "img_emb").iterdir()) == [
        "img_emb_train-0000.npy", "img_emb_train-0001.npy"]
