"""export --head --format triton: the segmenter as a model of a Triton repository, beside the models already there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_hostile_outputs import files_under, one_sentence_refusal
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import file_sha256, info_from_encoder, save_encoder
from dmt_jepa.evaluation.head import DenseHead, save_head
from dmt_jepa.export.errors import ExportError
from dmt_jepa.export.out_dir import MANIFEST_FILENAME, read_manifest
from dmt_jepa.export.triton import CONFIG_FILENAME, check_repository, parse_config
from dmt_jepa.models import VisionTransformer

# Names a config must carry through text-format escaping: quotes, a backslash, a comma, non-ASCII.
CLASS_NAMES = ["background", 'say "cat"', "back\\slash", "a, b", "café", "日本"]
NAME = "dmt_jepa_segmenter"  # the default model name with --head


def export(encoder: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["export", str(encoder), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """An encoder, a head made for it (random weights: parity, not accuracy, is tested here) and a repository
    that already holds a model no export wrote and the encoder's own Triton model."""
    root = tmp_path_factory.mktemp("seg")
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2).eval()
    info = info_from_encoder(encoder, "custom")
    encoder_path = save_encoder(root / "enc.safetensors", encoder, info)
    classes, dim = len(CLASS_NAMES), 32
    head = DenseHead(
        weight=torch.randn(classes, dim), bias=torch.randn(classes), feature_mean=torch.randn(dim),
        feature_std=torch.rand(dim) + 0.5, class_names=CLASS_NAMES, encoder_sha256=file_sha256(encoder_path),
        patch_size=8, pixel_mean=info.pixel_mean, pixel_std=info.pixel_std, image_size=(32, 32),
    )  # fmt: skip
    head_path = save_head(root / "head.safetensors", head)
    repo = root / "models"
    (repo / "theirs" / "1").mkdir(parents=True)
    (repo / "theirs" / "config.pbtxt").write_text('name: "theirs"')
    (repo / "theirs" / "1" / "model.plan").write_bytes(b"engine")
    for args in (
        ["--format", "triton"],  # the encoder, as models/dmt_jepa
        ["--head", str(head_path), "--labels", "--format", "triton", "--max-batch-size", "8"],
    ):
        result = export(encoder_path, repo, *args)
        assert result.exit_code == 0, result.output
    plain = export(encoder_path, root / "plain", "--head", str(head_path), "--labels")
    assert plain.exit_code == 0, plain.output
    return {"encoder": encoder_path, "head": head_path, "repo": repo, "plain": root / "plain", "log": result.output}


def triton_spec(value: onnx.ValueInfoProto) -> tuple[str, str, list[int]]:
    """What the config must say of a graph input or output: Triton's type name, dims without the batch, -1 if symbolic."""
    types: dict[int, str] = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
    return value.name, types[value.type.tensor_type.elem_type], dims[1:]


def test_the_config_declares_the_graphs_inputs_and_outputs(files):
    model_dir = files["repo"] / NAME
    assert sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*")) == [
        MANIFEST_FILENAME, "1", "1/model.onnx", CONFIG_FILENAME,
    ]  # fmt: skip
    assert set(read_manifest(model_dir) or {}) == {"1/model.onnx", CONFIG_FILENAME}
    config = parse_config((model_dir / CONFIG_FILENAME).read_text())
    names = config.DESCRIPTOR.file.enum_types_by_name["DataType"].values_by_number
    declared = {
        kind: [(t.name, names[t.data_type].name, list(t.dims)) for t in getattr(config, kind)] for kind in ("input", "output")
    }
    assert config.name == NAME and config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    assert config.HasField("dynamic_batching")
    assert declared["input"] == [("pixel_values", "TYPE_FP32", [3, -1, -1])]
    classes = len(CLASS_NAMES)
    assert declared["output"] == [("logits", "TYPE_FP32", [classes, -1, -1]), ("labels", "TYPE_INT64", [-1, -1])]
    graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
    assert declared == {"input": [triton_spec(v) for v in graph.input], "output": [triton_spec(v) for v in graph.output]}
    # checked against PyTorch before it was kept, as segmenter.onnx is
    assert "ONNX Runtime segmenter vs PyTorch fp32:" in files["log"] and "FAIL" not in files["log"]


def test_the_triton_model_computes_what_segmenter_onnx_does(files):
    options = {"providers": ["CPUExecutionProvider"]}
    triton = ort.InferenceSession(str(files["repo"] / NAME / "1" / "model.onnx"), **options)
    plain = ort.InferenceSession(str(files["plain"] / "segmenter.onnx"), **options)
    for shape in [(1, 3, 32, 32), (3, 3, 24, 40)]:
        images = np.random.default_rng(sum(shape)).standard_normal(shape, dtype=np.float32)
        logits, labels = triton.run(["logits", "labels"], {"pixel_values": images})
        ref_logits, ref_labels = plain.run(["logits", "labels"], {"pixel_values": images})
        assert logits.shape == (shape[0], len(CLASS_NAMES), shape[2] // 8, shape[3] // 8) and labels.dtype == np.int64
        np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-5)
        assert np.array_equal(labels, ref_labels)


def test_the_config_lists_the_class_names_in_order(files, tmp_path):
    model_dir = files["repo"] / NAME
    text = (model_dir / CONFIG_FILENAME).read_text()
    config = parse_config(text)
    assert json.loads(config.parameters["class_names"].string_value) == CLASS_NAMES
    metadata = {p.key: p.value for p in onnx.load(str(model_dir / "1" / "model.onnx")).metadata_props}
    assert config.parameters["class_names"].string_value == metadata["class_names"]
    # A config whose class names differ from the graph's is caught, here and by `info`.
    copy = tmp_path / NAME
    (copy / "1").mkdir(parents=True)
    (copy / "1" / "model.onnx").write_bytes((model_dir / "1" / "model.onnx").read_bytes())
    (copy / CONFIG_FILENAME).write_text(text.replace("background", "sky"))
    with pytest.raises(ExportError, match="parameters"):
        check_repository(copy)
    result = CliRunner().invoke(app, ["info", str(copy)])
    assert result.exit_code == 2 and "disagrees with the model" in result.output


def test_a_rerun_is_refused_and_overwrite_replaces_this_model_alone(files):
    repo = files["repo"]
    siblings = {name: files_under(repo / name) for name in ("theirs", "dmt_jepa")}
    before = files_under(repo / NAME)
    head = ["--head", str(files["head"]), "--format", "triton"]
    one_sentence_refusal(export(files["encoder"], repo, *head), "--overwrite")
    assert files_under(repo / NAME) == before
    result = export(files["encoder"], repo, *head, "--overwrite")  # now without --labels
    assert result.exit_code == 0, result.output
    assert {name: files_under(repo / name) for name in ("theirs", "dmt_jepa")} == siblings
    assert sorted(p.name for p in repo.iterdir()) == ["dmt_jepa", NAME, "theirs"]
    config = parse_config((repo / NAME / CONFIG_FILENAME).read_text())
    assert [t.name for t in config.output] == ["logits"] and config.max_batch_size == 32
    assert set(read_manifest(repo / NAME) or {}) == {"1/model.onnx", CONFIG_FILENAME}
    # --model-name puts a second segmenter beside the first
    result = export(files["encoder"], repo, *head, "--model-name", "seg.v2")
    assert result.exit_code == 0, result.output
    assert parse_config((repo / "seg.v2" / CONFIG_FILENAME).read_text()).name == "seg.v2"
    assert {name: files_under(repo / name) for name in ("theirs", "dmt_jepa")} == siblings


@pytest.mark.parametrize("fmt", ["hf", "timm"])
def test_a_head_with_a_weights_format_is_refused_before_any_work(files, tmp_path, fmt):
    one_sentence_refusal(
        export(files["encoder"], tmp_path / "o", "--head", str(files["head"]), "--format", fmt),
        f"--head writes a segmenter as ONNX or as a Triton model, not {fmt}",
    )
    assert not (tmp_path / "o").exists()
