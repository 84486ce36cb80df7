"""ONNX export: the contract, parity with PyTorch, fp16 bounds, and refusal of a wrong graph."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

import dmt_jepa.export.onnx_export as onnx_export
from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import EncoderFileError, file_sha256, info_from_encoder, save_encoder
from dmt_jepa.export.errors import ExportError
from dmt_jepa.export.onnx_export import export_onnx, verify_onnx
from dmt_jepa.export.out_dir import MANIFEST_FILENAME, replacing
from dmt_jepa.export.verify import FP32_TOLERANCE, check_parity
from dmt_jepa.models import VisionTransformer, create_encoder


def _encoder_file(directory: Path, encoder: VisionTransformer, arch: str) -> Path:
    return save_encoder(directory / f"{arch}.safetensors", encoder.eval(), info_from_encoder(encoder, arch))


def _ort(path: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch grid [B, h, w, D] and pooled [B, D] from the default-named model's tokens [B, h*w, D]."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tokens, pooled = session.run(["last_hidden_state", "pooler_output"], {"pixel_values": images.numpy()})
    grid = tokens.reshape(images.shape[0], images.shape[2] // 16, images.shape[3] // 16, tokens.shape[-1])
    return torch.from_numpy(grid), torch.from_numpy(pooled)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-block, width-64 encoder trained at 224x224, exported in fp32 and fp16 once for the module."""
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2).eval()
    directory = tmp_path_factory.mktemp("tiny")
    path = _encoder_file(directory, encoder, "custom")
    log: list[str] = []
    exports = export_onnx(path, directory / "out", fp16=True, log=log.append)
    return SimpleNamespace(encoder=encoder, path=path, out=directory / "out", exports=exports, log=log)


def test_onnx_follows_the_contract(tiny):
    model = onnx.load(str(tiny.out / "encoder.onnx"))
    (inp,) = model.graph.input
    assert inp.name == "pixel_values" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 3, "height", "width"]
    patches, pooled = model.graph.output
    assert (patches.name, pooled.name) == ("last_hidden_state", "pooler_output")
    patch_dims = [d.dim_param or d.dim_value for d in patches.type.tensor_type.shape.dim]
    assert patch_dims[0] == "batch" and patch_dims[2] == 64
    assert isinstance(patch_dims[1], str) and patch_dims[1]  # a symbolic token count, not a fixed size
    assert [d.dim_param or d.dim_value for d in pooled.type.tensor_type.shape.dim] == ["batch", 64]
    (opset,) = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    assert 18 <= opset <= 20
    ops = {node.op_type for node in model.graph.node}
    assert "Softmax" in ops and "Attention" not in ops  # attention stays MatMul/Softmax for TensorRT
    meta = {p.key: p.value for p in model.metadata_props}
    expected = info_from_encoder(tiny.encoder, "custom").to_metadata()
    assert {k: meta[k] for k in expected} == expected
    assert meta["source_sha256"] == file_sha256(tiny.path)
    assert meta["precision"] == "fp32"


def test_exported_at_224_equals_pytorch_at_other_shapes(tiny):
    # Traced at 224x224; run at 160x288 and at a batch and grid the exporter never checked.
    for batch, height, width in [(1, 224, 224), (3, 160, 288), (2, 48, 112)]:
        images = torch.randn(batch, 3, height, width)
        patches, pooled = _ort(tiny.out / "encoder.onnx", images)
        with torch.no_grad():
            ref_patches, ref_pooled = tiny.encoder.dense(images)
        assert patches.shape == (batch, height // 16, width // 16, 64)
        assert (patches - ref_patches).abs().max() <= 1e-4
        assert (pooled - ref_pooled).abs().max() <= 1e-4
    # The figures were printed for both precisions, one line per checked shape.
    assert sum(line.strip().startswith("batch ") and line.endswith("ok") for line in tiny.log) == 8


def test_fp16_meets_cosine_bounds_and_keeps_layernorm_fp32(tiny):
    path = tiny.out / "encoder_fp16.onnx"
    for batch, height, width in [(1, 224, 224), (3, 160, 288)]:
        images = torch.randn(batch, 3, height, width)
        patches, _ = _ort(path, images)
        with torch.no_grad():
            ref, _ = tiny.encoder.dense(images)
        cos = F.cosine_similarity(patches.double(), ref.double(), dim=-1)  # [B, h, w]
        assert cos.mean() >= 0.999 and cos.min() >= 0.99
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert len(norms) == 2 * 2 + 1
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in norms)
    assert all(types[n.input[1]] == onnx.TensorProto.FLOAT for n in norms)  # fp32 scale, not rounded
    assert matmuls and all(types[n.input[0]] == onnx.TensorProto.FLOAT16 for n in matmuls)


def _perturb_one_weight(src: Path, dst: Path) -> None:
    """Add 0.05 to a single element of the largest weight matrix."""
    model = onnx.load(str(src))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = onnx.numpy_helper.to_array(init).copy()
    weights.flat[0] += 0.05
    init.CopyFrom(onnx.numpy_helper.from_array(weights, init.name))
    onnx.save(model, str(dst))


def test_verification_rejects_one_perturbed_weight(tiny, tmp_path):
    shapes = [(1, 224, 224), (3, 160, 288)]
    assert verify_onnx(tiny.out / "encoder.onnx", tiny.encoder, shapes, FP32_TOLERANCE).ok
    _perturb_one_weight(tiny.out / "encoder.onnx", tmp_path / "tampered.onnx")
    report = verify_onnx(tmp_path / "tampered.onnx", tiny.encoder, shapes, FP32_TOLERANCE)
    assert not report.ok
    assert all(c.max_abs_err_patches > 1e-4 for c in report.checks)
    assert any("FAIL" in line for line in report.lines())


def test_failed_export_keeps_nothing_and_spares_the_old_file(tiny, tmp_path, monkeypatch):
    # An exporter that writes a subtly wrong graph: the command must exit non-zero with the
    # figures, keep no new file, and leave the previous export in place.
    real = onnx_export.export_graph

    def wrong_graph(encoder, info, path, metadata, **kwargs):
        real(encoder, info, path, metadata, **kwargs)
        _perturb_one_weight(path, path)

    monkeypatch.setattr(onnx_export, "export_graph", wrong_graph)
    out = tmp_path / "out"
    with replacing(out, overwrite=False):  # an earlier export, recorded in the folder's manifest
        out.mkdir()
        (out / "encoder.onnx").write_bytes(b"previous export")
    manifest = (out / MANIFEST_FILENAME).read_bytes()
    result = CliRunner().invoke(app, ["export", str(tiny.path), "--out", str(out), "--overwrite"])
    assert result.exit_code == 1
    assert "FAIL" in result.output and "was not kept" in result.output
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILENAME, "encoder.onnx"]
    assert (out / "encoder.onnx").read_bytes() == b"previous export"
    assert (out / MANIFEST_FILENAME).read_bytes() == manifest


@pytest.mark.slow
def test_vit_tiny_exported_at_224_runs_at_160x288(tmp_path):
    torch.manual_seed(1)
    encoder = create_encoder("vit_tiny").eval()
    path = _encoder_file(tmp_path, encoder, "vit_tiny")
    (export,) = export_onnx(path, tmp_path / "out", shapes=[(1, 224, 224)], log=lambda line: None)
    images = torch.randn(2, 3, 160, 288)
    patches, pooled = _ort(export.path, images)
    with torch.no_grad():
        ref_patches, ref_pooled = encoder.dense(images)
    assert patches.shape == (2, 10, 18, 192)
    assert (patches - ref_patches).abs().max() <= 1e-4
    assert (pooled - ref_pooled).abs().max() <= 1e-4


@pytest.mark.slow
def test_vit_small_parity_at_default_shapes(tmp_path):
    torch.manual_seed(2)
    encoder = create_encoder("vit_small", img_size=96).eval()
    path = _encoder_file(tmp_path, encoder, "vit_small")
    (export,) = export_onnx(path, tmp_path / "out", log=lambda line: None)
    shapes = [(c.batch, c.height, c.width) for c in export.report.checks]
    assert shapes == [(1, 96, 96), (3, 96, 96), (1, 160, 288), (3, 160, 288)]
    assert export.report.ok
    images = torch.randn(3, 3, 96, 96)
    patches, _ = _ort(export.path, images)
    with torch.no_grad():
        ref, _ = encoder.dense(images)
    assert (patches - ref).abs().max() <= 1e-4


def test_missing_and_wrong_files_are_refused(tmp_path):
    with pytest.raises(EncoderFileError, match="does not exist"):
        export_onnx(tmp_path / "absent.safetensors", tmp_path / "out")
    (tmp_path / "text.safetensors").write_text("not weights")
    with pytest.raises(EncoderFileError, match="not a safetensors"):
        export_onnx(tmp_path / "text.safetensors", tmp_path / "out")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(EncoderFileError, match="not a dmt-jepa encoder"):
        export_onnx(tmp_path / "plain.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shape_not_a_multiple_of_the_patch_is_refused(tiny, tmp_path):
    with pytest.raises(ExportError, match="not a multiple of the patch size 16"):
        export_onnx(tiny.path, tmp_path / "out", shapes=[(1, 224, 230)])
    with pytest.raises(ExportError, match="opset 17"):
        export_onnx(tiny.path, tmp_path / "out", opset=17)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "{missing}", "--out", "{out}"], "does not exist"),
        (["export", "{text}", "--out", "{out}"], "not a safetensors encoder file"),
        (["export", "{encoder}", "--out", "{out}", "--trt", "--min-shape", "1x3x60x64"], "not a multiple of the patch"),
        (["export", "{encoder}", "--out", "{out}", "--max-shape", "1x3x64x64"], "only apply to TensorRT"),
        (["info", "{text}"], "not a safetensors encoder file"),
        (["info", "{missing}"], "does not exist"),
    ],
)
def test_cli_errors_are_one_sentence(tiny, tmp_path, args, message):
    (tmp_path / "text.safetensors").write_text("not weights")
    paths = {
        "missing": tmp_path / "absent.safetensors",
        "text": tmp_path / "text.safetensors",
        "encoder": tiny.path,
        "out": tmp_path / "out",
    }
    result = CliRunner().invoke(app, [a.format(**paths) for a in args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_info_reads_encoder_and_onnx(tiny, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["info", str(tiny.path)])
    assert result.exit_code == 0
    assert "dmt-jepa encoder file" in result.output and file_sha256(tiny.path) in result.output
    shutil.copy(tiny.out / "encoder_fp16.onnx", tmp_path / "model.onnx")
    result = runner.invoke(app, ["info", str(tmp_path / "model.onnx"), "--json"])
    assert result.exit_code == 0
    described = json.loads(result.output)
    assert described["kind"] == "ONNX model"
    assert described["metadata"]["precision"] == "fp16"
    assert described["metadata"]["source_sha256"] == file_sha256(tiny.path)
    assert described["inputs"] == {"pixel_values": "float32 ['batch', 3, 'height', 'width']"}


def test_layers_are_extra_outputs_each_checked(tmp_path):
    torch.manual_seed(3)
    encoder = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2).eval()
    path = _encoder_file(tmp_path, encoder, "custom")
    result = CliRunner().invoke(app, ["export", str(path), "--out", str(tmp_path / "out"), "--layers=0,-2"])
    assert result.exit_code == 0, result.output
    assert "layers" in result.output  # the parity lines carry the layer outputs' error
    onnx_path = tmp_path / "out" / "encoder.onnx"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["last_hidden_state", "pooler_output", "hidden_states_0", "hidden_states_1"]
    assert json.loads(session.get_modelmeta().custom_metadata_map["layers"]) == [0, 1]
    images = torch.randn(2, 3, 48, 80)
    outputs = session.run(names, {"pixel_values": images.numpy()})
    with torch.no_grad():
        grid, pooled = encoder.dense(images)
        layers = [m.flatten(1, 2) for m in encoder.intermediate_layers(images, [0, 1], output_fmt="NHWC").maps]
    for got, expected in zip(outputs, [grid.flatten(1, 2), pooled, *layers]):
        assert got.shape == tuple(expected.shape)
        assert np.abs(got - expected.numpy()).max() <= 1e-4
    # A candidate wrong on one layer output only fails the check.
    reference = onnx_export.torch_runner(encoder, [0, 1])
    candidate = onnx_export.onnx_runner(onnx_path, layers=[0, 1])

    def wrong_layer(x):
        patches, pooled, first, second = candidate(x)
        return patches, pooled, first, second + 1e-3

    shapes = [(1, 64, 64)]
    assert check_parity(candidate, reference, shapes, FP32_TOLERANCE, candidate_name="c", reference_name="r").ok
    report = check_parity(wrong_layer, reference, shapes, FP32_TOLERANCE, candidate_name="c", reference_name="r")
    assert not report.ok and report.checks[0].max_abs_err_layers > 1e-4


def test_layers_are_refused_for_engines_and_out_of_range(tiny, tmp_path):
    result = CliRunner().invoke(app, ["export", str(tiny.path), "--out", str(tmp_path / "a"), "--layers", "5"])
    assert result.exit_code == 2 and "within 0 to 1" in result.output
    result = CliRunner().invoke(app, ["export", str(tiny.path), "--out", str(tmp_path / "b"), "--trt", "--layers", "1"])
    assert result.exit_code == 2 and "ONNX models only" in result.output


def test_fusable_gelu_equals_exact_gelu():
    """The export's GELU form gives nn.GELU's values (erf form), over a wide range and at the extremes."""
    x = torch.cat([torch.linspace(-12, 12, 4001), torch.tensor([0.0, -0.0, 1e-8, -1e-8, 60.0, -60.0])])
    reference = F.gelu(x.double()).float()
    assert torch.allclose(onnx_export.FusableGelu()(x), reference, atol=2e-7, rtol=1e-6)
    encoder = create_encoder("vit_nano", patch_size=8, img_size=32).eval()
    swapped = onnx_export.with_fusable_gelu(encoder)
    assert not any(isinstance(m, torch.nn.GELU) for m in swapped.modules())
    assert any(isinstance(m, torch.nn.GELU) for m in encoder.modules())  # the caller's encoder is untouched


def test_onnx_runtime_fuses_every_block_gelu(tiny, tmp_path):
    """After ONNX Runtime's graph optimisation each block's fc1 bias + GELU is one BiasGelu and no Erf is left."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(tiny.out / "encoder.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]
    assert ops.count("BiasGelu") == len(tiny.encoder.blocks)
    assert "Erf" not in ops
