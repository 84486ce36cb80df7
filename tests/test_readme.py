"""README's bash blocks and its Python block, run in the order written from an empty folder with every
pretrain made tiny. The commands block runs as written (only sizes shrunk for speed); the block of what a
fresh checkout lacks runs with its placeholders (a VOC folder, a public checkpoint, a shard pattern) filled
by tiny real files, and lines that need what this machine lacks are skipped with the reason said here."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
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
# README placeholder -> the tiny real thing the test makes in its place (only outside the commands block).
FILLED = {
    "shards/shard-{000000..000127}.tar": "shards/shard-000000.tar",  # `data pack` of the photos makes one shard
}
# A size in README -> a smaller one, for speed; allowed anywhere.
SHRUNK = {"--train 5000 --test 1000": "--train 16 --test 8"}
# Appended right after `pretrain`, so that the README's own overrides (later) still win.
TINY = [
    "model.arch=vit_nano", "model.img_size=64", "model.pred_width=32", "model.pred_depth=1", "mask.min_keep=2",
    "target.head_depth=1", "data.samples_per_epoch=8", "data.num_workers=0", "data.shuffle_buffer=8",
    "data.scenes_train=16", "data.scenes_test=16", "optimization.epochs=1", "optimization.batch_size=4",
    "optimization.warmup_epochs=0", "run.checkpoint_every=2",
]  # fmt: skip


def bash_lines(text: str | None = None) -> list[str]:
    """Every command line of the ```bash blocks of `text` (default README), in order, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", text if text is not None else (ROOT / "README.md").read_text(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def commands_block() -> list[str]:
    """The lines README promises to run as written after the quickstart."""
    text = (ROOT / "README.md").read_text()
    return bash_lines(text[text.index("## The commands") : text.index("These need what a fresh checkout does not have")])


def skip_reason(line: str) -> str | None:
    return next((why for fragment, why in SKIPPED.items() if fragment in line), None)


def command_args(line: str) -> list[str]:
    """The arguments after `dmtjepa`, placeholders filled and sizes shrunk."""
    for placeholder, real in (FILLED | SHRUNK).items():
        line = line.replace(placeholder, real)
    words = shlex.split(line, comments=True)
    assert words[0] == "dmtjepa", line
    args = words[1:]
    if args[0] == "pretrain" and "--resume" not in args:
        args[1:1] = TINY
    return args


def test_every_readme_line_is_a_dmtjepa_or_python_command_or_skipped_with_a_reason():
    lines = bash_lines()
    assert len(lines) >= 25
    for line in lines:
        runnable = line.startswith(("dmtjepa ", 'python -c "'))
        assert skip_reason(line) or runnable, f"README line neither run nor skipped: {line}"


def test_the_commands_block_runs_as_written():
    """No placeholder, no [...] notation, nothing that needs what a fresh checkout lacks."""
    lines = commands_block()
    assert len(lines) >= 25
    for line in lines:
        assert not skip_reason(line), f"in the runnable block but needs what this machine lacks: {line}"
        assert not any(placeholder in line for placeholder in FILLED), f"a placeholder in the runnable block: {line}"
        assert not re.search(r"\s\[-", line), f"[...] notation, which the shell passes on literally: {line}"


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
    """What the block of what a fresh checkout lacks names: a public checkpoint and a VOC folder."""
    from labelled_datasets import scenes, write_voc
    from test_pretrain_convert import public_checkpoint

    public_checkpoint(folder / "ijepa.pth.tar")
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
        if line.startswith("python -c"):
            done = subprocess.run([sys.executable, "-c", shlex.split(line, comments=True)[2]], capture_output=True, text=True)
            assert done.returncode == 0, f"{line}\n{done.stderr}"
            ran.append((line, done.stdout))
            continue
        result = CliRunner().invoke(app, command_args(line), prog_name="dmtjepa")
        assert result.exit_code == 0, f"{line}\n{result.output}"
        ran.append((line, result.stdout))
    assert len(ran) >= 30 and len(skipped) <= 10
    # README's Python block, in the repository root as README says (hubconf.py beside the outputs here)
    shutil.copy(ROOT / "hubconf.py", tmp_path / "hubconf.py")
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    done = subprocess.run(
        [sys.executable, "-c", code + "\nprint([tuple(m.shape) for m in maps], backbone.out_channels)"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("]")[0] == "[(2, 64, 8, 8), (2, 64, 8, 8), (2, 64, 8, 8)", done.stdout

    # What README says each command leaves behind.
    for run in ("runs/demo", "runs/own", "runs/learned8", "runs/tb", "runs/b16"):
        assert (tmp_path / run / "encoder.safetensors").is_file() and (tmp_path / run / "log.jsonl").is_file()
        assert any((tmp_path / run / "checkpoints").iterdir())
    learned = yaml.safe_load((tmp_path / "runs/learned8/config.yaml").read_text())
    assert learned["target"]["query"] == "learned" and learned["model"]["patch_size"] == 8
    assert learned["target"]["aggregation"] == "cross_attention"  # the query is a setting of the paper's head
    own = yaml.safe_load((tmp_path / "runs/own/config.yaml").read_text())
    assert own["data"]["train"] == "shards/shard-{000000..000000}.tar" and own["optimization"]["epochs"] == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs/own/log.jsonl").read_text().splitlines()]
    assert steps[-1] == 4  # two epochs of two steps: the resume trained the second
    assert any((tmp_path / "runs/tb/tensorboard").glob("events.out.tfevents*"))
    b16 = yaml.safe_load((tmp_path / "runs/b16/config.yaml").read_text())
    assert b16["data"]["train"] == "shards/shard-000000.tar" and b16["optimization"]["final_weight_decay"] == 0.4
    resumed = next(out for line, out in ran if "--resume runs/b16" in line)
    assert "already complete" in resumed
    assert sorted(p.name for p in (tmp_path / "scenes").glob("*.tar")) == ["test-000000.tar", "train-000000.tar"]
    photos = sorted((tmp_path / "images" / "photos").iterdir())
    assert len(photos) >= 20 and (tmp_path / "shards" / "shard-000000.tar").is_file()
    assert (tmp_path / "encoder.safetensors").is_file()
    made_files = (
        "deploy/encoder.onnx",
        "deploy/encoder_fp16.onnx",
        "deploy-layers/encoder.onnx",
        "models/dmt_jepa/config.pbtxt",
        "hf/config.json",
        "timm/config.json",
        "pca.png",
        "att.png",
        "curves.png",
        "voc/dataset.json",
        "head.safetensors",
        "voc-head.safetensors",
        "seg/segmenter.onnx",
        "shards.txt",
    )
    for made in made_files:
        assert (tmp_path / made).is_file(), made
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["model_args"]["img_size"] == [96, 96]
    for out, name, count in (("out", "test-000000", 16), ("out-int8", "shard-000000", len(photos))):
        done = json.loads((tmp_path / out / f"{name}.json").read_text())
        assert done["embedded"] == count and not done["failures"], done
    assert sorted(p.name for p in (tmp_path / "vectors" / "img_emb").iterdir()) == ["img_emb_test-000000.npy"]
    assert any((tmp_path / "arrays").glob("test-000000*.parquet"))
