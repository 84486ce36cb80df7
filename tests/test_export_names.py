"""Export I/O names (optimum's by default, legacy on a flag), the Triton repository, --overwrite and file modes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import info_from_encoder, save_encoder
from dmt_jepa.export.errors import ExportError
from dmt_jepa.export.io_names import LEGACY, OPTIMUM
from dmt_jepa.export.out_dir import MANIFEST_FILENAME
from dmt_jepa.export.triton import CONFIG_FILENAME, check_repository, parse_config
from dmt_jepa.models import VisionTransformer
from dmt_jepa.serve.api import embed_images
from dmt_jepa.serve.backends import BackendError, load_backend


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2).eval()
    path = tmp_path_factory.mktemp("enc") / "enc.safetensors"
    return encoder, save_encoder(path, encoder, info_from_encoder(encoder, "custom"))


def _export(encoder_path: Path, out: Path, *extra: str) -> None:
    result = CliRunner().invoke(app, ["export", str(encoder_path), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def exports(encoder_file, tmp_path_factory):
    """The same encoder exported with the default names and with --io-names legacy, both with --layers 0."""
    root = tmp_path_factory.mktemp("exports")
    _export(encoder_file[1], root / "default", "--layers", "0")
    _export(encoder_file[1], root / "legacy", "--layers", "0", "--io-names", "legacy")
    return {"default": root / "default" / "encoder.onnx", "legacy": root / "legacy" / "encoder.onnx"}


def test_default_names_are_optimums_with_tokens_in_grid_row_order(encoder_file, exports):
    encoder, _ = encoder_file
    model = onnx.load(str(exports["default"]))
    assert [i.name for i in model.graph.input] == ["pixel_values"]
    assert [o.name for o in model.graph.output] == ["last_hidden_state", "pooler_output", "hidden_states_0"]
    assert {p.key: p.value for p in model.metadata_props}["io_names"] == "optimum"
    session = ort.InferenceSession(str(exports["default"]), providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 48, 80)
    tokens, pooled, first = session.run(None, {"pixel_values": images.numpy()})
    with torch.no_grad():
        grid, ref_pooled = encoder.dense(images)  # [2, 3, 5, 32]
        ref_first = encoder.intermediate_layers(images, [0], output_fmt="NHWC").maps[0]
    assert tokens.shape == (2, 15, 32) and first.shape == (2, 15, 32)
    # Token n is grid cell (n // w, n % w): compared cell by cell, not through a reshape.
    for n in range(15):
        np.testing.assert_allclose(tokens[:, n], grid[:, n // 5, n % 5].numpy(), atol=1e-5)
        np.testing.assert_allclose(first[:, n], ref_first[:, n // 5, n % 5].numpy(), atol=1e-5)
    np.testing.assert_allclose(pooled, ref_pooled.numpy(), atol=1e-5)


def test_legacy_names_keep_the_old_contract(exports):
    model = onnx.load(str(exports["legacy"]))
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["patch_embeddings", "pooled", "layer_0"]
    dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert len(dims) == 4 and dims[3] == 32


def _without_io_names_prop(src: Path, dst: Path) -> Path:
    """The file as versions before the io_names metadata prop wrote it."""
    model = onnx.load(str(src))
    kept = [p for p in model.metadata_props if p.key != "io_names"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(dst))
    return dst


def _renamed(src: Path, dst: Path, old: str, new: str) -> Path:
    """The model with one graph output renamed (and the node that makes it)."""
    model = onnx.load(str(src))
    for node in model.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
    for value in model.graph.output:
        value.name = new if value.name == old else value.name
    onnx.save(model, str(dst))
    return dst


def test_older_legacy_files_keep_working_and_mixed_names_are_refused(exports, tmp_path):
    older = _without_io_names_prop(exports["legacy"], tmp_path / "older.onnx")
    assert "io_names" not in {p.key for p in onnx.load(str(older)).metadata_props}
    images = np.random.default_rng(3).standard_normal((1, 3, 32, 48), dtype=np.float32)
    for got, want in zip(load_backend(older, layers=[0]).run(images), load_backend(exports["default"], layers=[0]).run(images)):
        np.testing.assert_array_equal(got, want)
    mixed = _renamed(exports["default"], tmp_path / "mixed.onnx", "last_hidden_state", "patch_embeddings")
    with pytest.raises(BackendError, match="not a dmt-jepa ONNX model"):
        load_backend(mixed)
    described = CliRunner().invoke(app, ["info", str(mixed), "--json"])
    assert json.loads(described.output)["io_names"] == "neither dmt-jepa name set"


def test_both_name_sets_serve_identical_embeddings(exports):
    images = np.random.default_rng(1).standard_normal((3, 3, 48, 80), dtype=np.float32)
    default = load_backend(exports["default"], layers=[0])
    legacy = load_backend(exports["legacy"], layers=[0])
    assert (default.names, legacy.names) == (OPTIMUM, LEGACY)
    for got, want in zip(default.run(images), legacy.run(images), strict=True):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    pixels = np.random.default_rng(2).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    a, b = embed_images(exports["default"], [pixels]), embed_images(exports["legacy"], [pixels])
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].shape == (2, 2, 32)


def test_info_names_the_io_set(exports):
    for kind, names in (("default", OPTIMUM), ("legacy", LEGACY)):
        result = CliRunner().invoke(app, ["info", str(exports[kind]), "--json"])
        described = json.loads(result.output)
        assert described["io_names"] == names.style
        assert list(described["inputs"]) == [names.input]


def test_unknown_io_names_is_refused_with_the_choices(encoder_file, tmp_path):
    result = CliRunner().invoke(app, ["export", str(encoder_file[1]), "--out", str(tmp_path / "o"), "--io-names", "hf"])
    words = " ".join(result.output.replace("│", " ").split())  # the option parser's message, out of its box
    assert (
        result.exit_code == 2 and "Invalid value for '--io-names'" in words and "'hf' is not one of 'optimum', 'legacy'." in words
    )
    assert not (tmp_path / "o").exists()


def test_triton_repository_parses_and_matches_the_graph(encoder_file, tmp_path):
    _export(encoder_file[1], tmp_path / "repo", "--format", "triton", "--model-name", "enc", "--layers", "-1")
    assert sorted(str(p.relative_to(tmp_path / "repo")) for p in (tmp_path / "repo").rglob("*")) == [
        "enc", f"enc/{MANIFEST_FILENAME}", "enc/1", "enc/1/model.onnx", "enc/config.pbtxt",
    ]  # fmt: skip
    text = (tmp_path / "repo" / "enc" / CONFIG_FILENAME).read_text()
    config = parse_config(text)
    assert config.name == "enc" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 32
    assert config.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in config.input] == [("pixel_values", [3, -1, -1])]
    assert [(t.name, list(t.dims)) for t in config.output] == [
        ("last_hidden_state", [-1, 32]), ("pooler_output", [32]), ("hidden_states_1", [-1, 32]),
    ]  # fmt: skip
    session = ort.InferenceSession(str(tmp_path / "repo" / "enc" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [t.name for t in config.output]
    check_repository(tmp_path / "repo" / "enc")
    described = json.loads(CliRunner().invoke(app, ["info", str(tmp_path / "repo" / "enc"), "--json"]).output)
    assert described["outputs"]["pooler_output"] == "TYPE_FP32 [32]" and described["metadata"]["io_names"] == "optimum"
    # A config that lies about the graph, or holds a field Triton does not know, is caught.
    for bad, message in (
        (text.replace("dims: [ 32 ]", "dims: [ 64 ]"), "differ from the graph"),
        (text.replace("TYPE_FP32", "TYPE_FP16", 1), "differ from the graph"),
        (text.replace('name: "pooler_output"', 'name: "pooled"'), "differ from the graph"),
        (text.replace("max_batch_size", "max_batch"), "does not parse"),
        (text.replace("TYPE_FP32", "TYPE_FLOAT", 1), "does not parse"),
    ):
        (tmp_path / "repo" / "enc" / CONFIG_FILENAME).write_text(bad)
        with pytest.raises(ExportError, match=message):
            check_repository(tmp_path / "repo" / "enc")
    result = CliRunner().invoke(app, ["info", str(tmp_path / "repo" / "enc")])
    assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1
    (tmp_path / "repo" / "enc" / CONFIG_FILENAME).unlink()
    os.mkfifo(tmp_path / "repo" / "enc" / CONFIG_FILENAME)  # never opened, so never blocks
    with pytest.raises(ExportError, match="not a regular config file"):
        check_repository(tmp_path / "repo" / "enc")


@pytest.mark.parametrize("name", ["../escape", "a/b", ".", ""])
def test_triton_model_name_must_be_a_plain_folder_name(encoder_file, tmp_path, name):
    result = CliRunner().invoke(
        app, ["export", str(encoder_file[1]), "--out", str(tmp_path / "r"), "--format", "triton", "--model-name", name]
    )
    assert result.exit_code == 2 and "plain folder name" in result.output
    assert not (tmp_path / "escape").exists() and not (tmp_path / "r").exists()


def test_an_earlier_export_is_refused_and_overwrite_removes_only_its_files(encoder_file, tmp_path):
    out = tmp_path / "out"
    _export(encoder_file[1], out, "--fp16")
    outside = tmp_path / "keep.txt"
    outside.write_text("not in out")
    (out / "link.txt").symlink_to(outside)
    (out / "notes").mkdir()
    before = (out / "encoder.onnx").read_bytes()
    result = CliRunner().invoke(app, ["export", str(encoder_file[1]), "--out", str(out), "--layers", "0"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "encoder.onnx").read_bytes() == before and (out / "encoder_fp16.onnx").exists()
    _export(encoder_file[1], out, "--layers", "0", "--overwrite")
    # no stale encoder_fp16.onnx; the link and the folder no export wrote stay
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILENAME, "encoder.onnx", "link.txt", "notes"]
    assert outside.read_text() == "not in out"
    outputs = [o.name for o in onnx.load(str(out / "encoder.onnx")).graph.output]
    assert outputs == ["last_hidden_state", "pooler_output", "hidden_states_0"]


def test_overwrite_keeps_an_input_no_export_wrote(encoder_file, tmp_path):
    out = tmp_path / "out"
    _export(encoder_file[1], out)
    source = out / "enc.safetensors"
    source.write_bytes(encoder_file[1].read_bytes())
    _export(source, out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILENAME, "enc.safetensors", "encoder.onnx"]
    assert source.read_bytes() == encoder_file[1].read_bytes()


def test_out_that_is_a_file_is_refused(encoder_file, tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(app, ["export", str(encoder_file[1]), "--out", str(tmp_path / "file"), "--overwrite"])
    assert result.exit_code == 2 and "is a file" in result.output
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(encoder_file, tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        encoder, _ = encoder_file
        path = save_encoder(tmp_path / "enc.safetensors", encoder, info_from_encoder(encoder, "custom"))
        _export(path, tmp_path / "hf", "--format", "hf")
        _export(path, tmp_path / "triton", "--format", "triton")
    finally:
        os.umask(old)
    written = [path, *(p for p in tmp_path.rglob("*") if p.is_file() and p != path)]
    assert {p.name for p in written} >= {"enc.safetensors", "model.safetensors", "model.onnx", "config.pbtxt", MANIFEST_FILENAME}
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == mode, p


@pytest.mark.parametrize("format", ["hf", "timm"])
def test_weights_exported_from_python_follow_the_umask(encoder_file, tmp_path, format):
    from dmt_jepa.export.weights import export_weights

    old = os.umask(0o022)
    try:
        encoder, _ = encoder_file
        path = save_encoder(tmp_path / "enc.safetensors", encoder, info_from_encoder(encoder, "custom"))
        export_weights(path, tmp_path / format, format, log=lambda line: None)
    finally:
        os.umask(old)
    written = list((tmp_path / format).iterdir())
    assert "model.safetensors" in {p.name for p in written}
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
