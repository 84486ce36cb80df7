"""What the package installs: one import name, and one-sentence errors where an optional extra is missing."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import info_from_encoder, save_encoder
from dmt_jepa.models import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = {"dmt_jepa": "dmt_jepa", "export": "dmt_jepa/export", "serve": "dmt_jepa/serve", "cli": "dmt_jepa/cli"}


@pytest.mark.slow
def test_the_wheel_installs_only_dmt_jepa_and_every_source_file(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build's own folders stay out of the checkout
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for folder in SOURCE_FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "-q"],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("dmt_jepa-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"dmt_jepa", wheel.name.split("-py")[0] + ".dist-info"}
    # Every module of the source tree, at its installed name; the reference is the tree itself.
    expected = {
        f"{installed}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, installed in SOURCE_FOLDERS.items()
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert expected - set(names) == set()
    assert "dmt_jepa/configs/demo.yaml" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "dmtjepa = dmt_jepa.cli.main:app" in entry_points


def test_the_installed_environment_has_no_generic_top_level_names(tmp_path):
    code = (
        "import importlib.util as u, dmt_jepa.cli.main, dmt_jepa.export.pipeline, dmt_jepa.serve.job;"
        "print(sorted(n for n in ('cli', 'export', 'serve') if u.find_spec(n)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120, env={"PATH": ""}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture
def encoder_file(tmp_path):
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return save_encoder(tmp_path / "e.safetensors", encoder, info_from_encoder(encoder, "custom"))


def _without(monkeypatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # an import of it now raises ImportError


def test_viz_without_matplotlib_says_which_extra(monkeypatch, encoder_file, tmp_path):
    from PIL import Image

    from dmt_jepa.scenes import make_scene

    _without(monkeypatch, "matplotlib", "matplotlib.pyplot")
    Image.fromarray(make_scene("test", 0, image_size=32).image).save(tmp_path / "scene.png")
    result = CliRunner().invoke(
        app, ["viz", "attention", str(encoder_file), str(tmp_path / "scene.png"), "-o", str(tmp_path / "a.png")]
    )
    assert result.exit_code == 2 and "pip install 'dmt-jepa[viz]'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "a.png").exists()
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 0.5, "lr": 0.001}\n')
    result = CliRunner().invoke(app, ["viz", "curves", str(tmp_path)])
    assert result.exit_code == 2 and "pip install 'dmt-jepa[viz]'" in result.output
    assert not (tmp_path / "curves.png").exists()
    # PCA draws without matplotlib.
    result = CliRunner().invoke(
        app, ["viz", "pca", str(encoder_file), str(tmp_path / "scene.png"), "-o", str(tmp_path / "p.png")]
    )
    assert result.exit_code == 0, result.output


def test_eval_detect_without_pycocotools_stops_before_training(monkeypatch, encoder_file, tmp_path):
    from dmt_jepa.scenes import write_scene_shards

    _without(monkeypatch, "pycocotools", "pycocotools.coco", "pycocotools.cocoeval")
    write_scene_shards(tmp_path / "data", n_train=4, n_test=2, image_size=32)
    result = CliRunner().invoke(app, ["eval", "detect", str(encoder_file), str(tmp_path / "data"), "--epochs", "1"])
    assert result.exit_code == 2 and "pip install 'dmt-jepa[detect]'" in result.output
    assert "detector epoch" not in result.output
