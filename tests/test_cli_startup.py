"""A wrong path or option is answered before torch, onnxruntime or a job module is imported; choices are real choices.

The error paths run in a child interpreter, which starts with none of the heavy modules loaded: what
it holds after each command is what that command imported. (How long that takes is measured by
benchmarks/cli_startup.py, never asserted here.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dmt_jepa.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
HEAVY = (
    "torch", "onnxruntime", "onnx", "timm", "webdataset", "sklearn", "dmt_jepa.encoder_file", "dmt_jepa.train",
    "dmt_jepa.serve.job", "dmt_jepa.export.pipeline", "dmt_jepa.convert", "dmt_jepa.evaluation.run", "dmt_jepa.viz",
)  # fmt: skip

CHILD = """
import json, sys
from typer.testing import CliRunner
from dmt_jepa.cli.main import app
results = []
for args in json.loads(sys.argv[1]):
    run = CliRunner().invoke(app, args)
    results.append({"code": run.exit_code, "stderr": run.stderr, "stdout": run.stdout,
                    "heavy": [name for name in json.loads(sys.argv[2]) if name in sys.modules]})
print(json.dumps(results))
"""


def run_in_child(cases: list[list[str]], cwd: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cases), json.dumps(HEAVY)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_wrong_paths_are_one_sentence_before_any_heavy_import(tmp_path):
    (tmp_path / "enc.safetensors").write_bytes(b"not opened before the heavy imports")
    (tmp_path / "no-shards").mkdir()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.tar").write_bytes(b"")
    cases = {
        "data pack NOPE out": "image folder NOPE does not exist",
        "convert NOPE out.safetensors": "checkpoint NOPE does not exist",
        "embed NOPE.txt out --model enc.safetensors": "NOPE.txt",
        "embed no-shards out --model enc.safetensors": "no-shards",
        "embed in out --model NOPE.safetensors": "model file NOPE.safetensors does not exist",
        "pretrain --resume runs/nope": "runs/nope does not exist",
        "pretrain --resume no-shards": "no-shards holds no checkpoint",
        "pretrain --config nope.yaml": "nope.yaml does not exist",
        "pretrain data.train=NOPE.tar": "shard pattern 'NOPE.tar' matches no file",
        "pretrain model.arch=vit_gigantic": "model.arch must be one of",
        "export NOPE --out x": "encoder file NOPE does not exist",
        "export NOPE --out x --format triton": "encoder file NOPE does not exist",
        "export NOPE --out x --format timm": "encoder file NOPE does not exist",
        "info NOPE": "NOPE does not exist",
        "eval knn NOPE no-shards": "encoder file NOPE does not exist",
        "eval linear enc.safetensors NOPE": "DATA NOPE does not exist",
        "eval dense enc.safetensors no-shards": "no shards match",
        "eval all enc.safetensors --train NOPE --test NOPE": "no shards match NOPE",
        "eval detect enc.safetensors no-shards": "no shards match",
        "viz pca NOPE image.png --out x.png": "encoder file NOPE does not exist",
        "viz attention enc.safetensors NOPE.png --out x.png": "image NOPE.png does not exist",
        "viz curves NOPE": "training log NOPE does not exist",
        "data scenes out --train 0 --test 0": "at least one scene",
        "embed in out --model enc.safetensors --address auto": "--address only apply to --engine ray",
        "embed in out --model enc.safetensors --engine ray --decode gpu --backend torch-cuda": "--decode gpu runs with --engine local",
        "embed in out --model enc.safetensors --layout embedding-reader --dtype int8": "embedding-reader reads float16",
        "embed in out --model enc.safetensors --layers 1 --pca 4": "--layers and --pca cannot be combined",
    }
    results = run_in_child([line.split() for line in cases], tmp_path)
    for (line, message), result in zip(cases.items(), results):
        lines = result["stderr"].strip().splitlines()
        assert result["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), (line, result)
        assert message in lines[0], (line, lines[0])
        assert result["heavy"] == [], (line, result["heavy"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.safetensors", "in", "no-shards"]  # nothing made


def test_help_imports_nothing_heavy(tmp_path):
    results = run_in_child([["--help"], ["export", "--help"], ["embed", "--help"]], tmp_path)
    assert all(r["code"] == 0 and r["heavy"] == [] for r in results), results


def test_pretrain_says_where_it_trains_only_once_its_data_is_found(tmp_path):
    run = CliRunner().invoke(
        app, ["pretrain", f"data.train={tmp_path}/shards-{{000..002}}.tar", f"run.out_dir={tmp_path / 'run'}"]
    )
    assert run.exit_code == 2 and "training in" not in run.output
    assert run.stderr.strip().splitlines() == [
        f"error: shard pattern '{tmp_path}/shards-{{000..002}}.tar' matches no file; check the path and the brace range."
    ]
    assert not (tmp_path / "run").exists()


def test_a_shard_pattern_with_an_unset_variable_is_one_sentence(tmp_path, monkeypatch):
    from dmt_jepa.data import DataError, expand_shards

    (tmp_path / "s-000.tar").write_bytes(b"")
    monkeypatch.setenv("WDS_ROOT", str(tmp_path))
    assert expand_shards("${ROOT}/s-{000..000}.tar") == [f"{tmp_path}/s-000.tar"]
    monkeypatch.delenv("WDS_ROOT")
    with pytest.raises(DataError, match=r"uses \$\{ROOT\} but WDS_ROOT is not set"):
        expand_shards("${ROOT}/s-000.tar")


def _completions(path: tuple[str, ...], name: str) -> tuple[str, ...]:
    """What shell completion offers for option `name` of the command at `path`."""
    command = typer.main.get_command(app)
    for part in path:
        command = command.commands[part]
    option = next(p for p in command.params if name in p.opts)
    context = command.make_context(path[-1], [], resilient_parsing=True)
    return tuple(item.value for item in option.shell_complete(context, ""))


def _accepted() -> dict[tuple[tuple[str, ...], str], tuple[str, ...]]:
    """Each choice option and the values its package accepts, read from the package itself."""
    from dmt_jepa import scenes
    from dmt_jepa.data import labelled_formats
    from dmt_jepa.export.io_names import IO_STYLES
    from dmt_jepa.export.weights import WEIGHT_FORMATS
    from dmt_jepa.serve import backends, images, job, layouts, quantize
    from dmt_jepa.serve.backends.base import PRECISIONS

    return {
        (("export",), "--format"): ("onnx", "triton", *WEIGHT_FORMATS),
        (("export",), "--io-names"): tuple(IO_STYLES),
        (("embed",), "--backend"): backends.BACKENDS,
        (("embed",), "--precision"): PRECISIONS,
        (("embed",), "--resize"): images.RESIZE_POLICIES,
        (("embed",), "--layout"): layouts.LAYOUTS,
        (("embed",), "--dtype"): quantize.DTYPES,
        (("embed",), "--engine"): job.ENGINES,
        (("embed",), "--decode"): job.DECODES,
        (("data", "scenes"), "--kind"): tuple(scenes.KINDS),
        (("data", "scenes"), "--background"): scenes.BACKGROUNDS,
        (("data", "scenes"), "--palette"): scenes.PALETTES,
        (("data", "pack"), "--format"): labelled_formats.FORMATS,
    }


def test_choice_options_offer_exactly_what_their_package_accepts():
    for (path, name), values in _accepted().items():
        assert _completions(path, name) == tuple(values), (path, name)


def test_shell_completion_lists_the_values_of_a_choice(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "_DMTJEPA_COMPLETE": "complete_bash",
           "COMP_WORDS": "dmtjepa embed in out --layout ", "COMP_CWORD": "5"}  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "dmt_jepa.cli.main"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["tar", "array", "embedding-reader"], out


def test_a_value_outside_a_choice_is_refused_with_the_choices(tmp_path):
    run = CliRunner().invoke(app, ["embed", "in", "out", "--model", "m.onnx", "--dtype", "bfloat16"])
    words = " ".join(run.output.replace("│", " ").split())  # the message as one line, out of its box
    assert run.exit_code == 2 and "'bfloat16' is not one of 'float32', 'float16', 'int8'" in words


def test_triton_export_names_only_paths_that_exist_when_it_is_done(tmp_path):
    from embed_helpers import write_encoder_file

    from dmt_jepa.export.triton import export_triton

    encoder = write_encoder_file(tmp_path / "enc.safetensors")
    lines: list[str] = []
    export_triton(encoder, tmp_path / "models", model_name="m", log=lines.append)
    named = [word.strip("(),;:") for line in lines for word in line.split() if word.startswith(str(tmp_path))]
    assert named and all(Path(path).exists() for path in named), lines
    assert any(line.startswith("wrote the Triton model repository") for line in lines), lines
