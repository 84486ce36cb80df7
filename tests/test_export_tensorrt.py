"""TensorRT engines: profile shapes, version dispatch, sidecar; the real build where TensorRT and a GPU exist."""

from __future__ import annotations

import importlib.util
import json
from enum import IntEnum
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import EncoderInfo, file_sha256, info_from_encoder, save_encoder
from dmt_jepa.export.errors import ExportError
from dmt_jepa.export.info import describe
from dmt_jepa.export.io_names import OPTIMUM
from dmt_jepa.export.pipeline import export_encoder
from dmt_jepa.export.profile import ShapeProfile, default_profile, parse_shape, resolve_profile
from dmt_jepa.export.tensorrt_build import (
    apply_precision,
    engine_sidecar,
    network_flags,
    precision_plan,
    read_sidecar,
    require_gpu,
    require_tensorrt,
    sidecar_path,
)
from dmt_jepa.export.verify import FP16_TOLERANCE, ParityCheck, ParityReport
from dmt_jepa.models import VisionTransformer

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def _info(img_size=(224, 224), patch_size=16) -> EncoderInfo:
    return EncoderInfo(
        arch="vit_small", patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, img_size=img_size
    )


def test_default_profile_is_around_the_training_size():
    assert default_profile(_info()) == ShapeProfile(min=(1, 3, 112, 112), opt=(32, 3, 224, 224), max=(32, 3, 448, 448))
    # Half of 224 is 112 = 8 x 14; a 160x288 model at patch 16 halves to 80x144.
    assert default_profile(_info(patch_size=14)).min == (1, 3, 112, 112)
    assert default_profile(_info(img_size=(160, 288))).min == (1, 3, 80, 144)
    # Half of 98 is 49, rounded down to a multiple of 14: 42.
    assert default_profile(_info(img_size=(98, 98), patch_size=14)).min == (1, 3, 42, 42)


def test_shape_flags_parse_and_override_the_defaults():
    assert parse_shape("8x3x224x224", "--opt-shape") == (8, 3, 224, 224)
    assert parse_shape("images:1x3x160x288", "--min-shape") == (1, 3, 160, 288)
    assert parse_shape("pixel_values:1x3x160x288", "--min-shape") == (1, 3, 160, 288)
    profile = resolve_profile(_info(), opt_shape="16x3x224x224", max_shape="16x3x320x320")
    assert profile == ShapeProfile(min=(1, 3, 112, 112), opt=(16, 3, 224, 224), max=(16, 3, 320, 320))
    assert profile.shapes() == [(1, 112, 112), (16, 224, 224), (16, 320, 320)]
    same = resolve_profile(_info(), min_shape="4x3x224x224", opt_shape="4x3x224x224", max_shape="4x3x224x224")
    assert same.shapes() == [(4, 224, 224)]


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"min_shape": "1x3x224"}, "is not a shape"),
        ({"opt_shape": "8x1x224x224"}, "has 1 channels"),
        ({"min_shape": "0x3x224x224"}, "zero dimension"),
        ({"max_shape": "32x3x450x448"}, "--max-shape size 450x448 is not a multiple of the patch size 16"),
        ({"max_shape": "16x3x448x448"}, "batch must grow"),
        ({"min_shape": "1x3x256x112"}, "height must grow"),
    ],
)
def test_bad_shape_flags_are_refused(flags, message):
    with pytest.raises(ExportError, match=message):
        resolve_profile(_info(), **flags)


def test_version_dispatch():
    ten = precision_plan("10.13.3.9")
    assert (ten.api, ten.onnx_precision, ten.strongly_typed) == ("builder-flag-fp16", "fp32", False)
    eleven = precision_plan("11.4.1")
    assert (eleven.api, eleven.onnx_precision, eleven.strongly_typed) == ("strongly-typed", "fp16", True)
    with pytest.raises(ExportError, match="too old"):
        precision_plan("8.6.1")
    with pytest.raises(ExportError, match="cannot read"):
        precision_plan("unknown")


class _Flag(IntEnum):
    FP16 = 0
    PREFER_PRECISION_CONSTRAINTS = 1


class _Creation(IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class _LayerType(IntEnum):
    MATRIX_MULTIPLY = 0
    NORMALIZATION = 1


class _Layer:
    def __init__(self, kind):
        self.type, self.precision, self.output_types = kind, None, {}

    def set_output_type(self, index, dtype):
        self.output_types[index] = dtype


def _fake_tensorrt(version: str):
    """The few names of the tensorrt module that the precision setup touches."""
    return SimpleNamespace(
        __version__=version,
        BuilderFlag=_Flag,
        NetworkDefinitionCreationFlag=_Creation,
        LayerType=_LayerType,
        float32="fp32-type",
    )


@pytest.mark.parametrize("version", ["10.9.0", "11.1.0"])
def test_precision_setup_follows_the_tensorrt_version(version):
    trt = _fake_tensorrt(version)
    plan = precision_plan(trt.__version__)
    layers = [_Layer(_LayerType.MATRIX_MULTIPLY), _Layer(_LayerType.NORMALIZATION)]
    network = SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__)
    flags: list = []
    config = SimpleNamespace(set_flag=flags.append)
    apply_precision(trt, network, config, plan)
    if version.startswith("10"):
        assert network_flags(trt, plan) == 0
        assert flags == [_Flag.FP16, _Flag.PREFER_PRECISION_CONSTRAINTS]
        assert (layers[1].precision, layers[1].output_types) == ("fp32-type", {0: "fp32-type"})
    else:
        assert network_flags(trt, plan) == 1 << _Creation.STRONGLY_TYPED
        assert flags == []  # TensorRT 11 has no precision flags: fp16 comes from the ONNX
        assert layers[1].precision is None
    assert layers[0].precision is None and layers[0].output_types == {}


def _sidecar() -> dict:
    info = _info()
    check = ParityCheck(1, 112, 112, 3e-3, 1e-3, 0.99995, 0.9991)
    return engine_sidecar(
        engine_name="encoder.engine",
        engine_sha256="e" * 64,
        onnx_name="encoder_fp16.onnx",
        onnx_sha256="o" * 64,
        onnx_metadata={**info.to_metadata(), "source_sha256": "s" * 64, "precision": "fp16", "opset": "18"},
        profile=default_profile(info),
        plan=precision_plan("11.0.0"),
        tensorrt_version="11.0.0",
        gpu_name="NVIDIA H100",
        report=ParityReport("TensorRT 11.0.0 fp16", "ONNX Runtime fp32", FP16_TOLERANCE, (check,)),
        names=OPTIMUM,
    )


def test_sidecar_says_what_the_engine_is(tmp_path):
    sidecar = _sidecar()
    assert sidecar["profile"] == {"min": [1, 3, 112, 112], "opt": [32, 3, 224, 224], "max": [32, 3, 448, 448]}
    assert (sidecar["precision"], sidecar["tensorrt_version"], sidecar["gpu"]) == ("fp16", "11.0.0", "NVIDIA H100")
    assert sidecar["tensorrt_api"] == "strongly-typed"
    assert (sidecar["input"], sidecar["outputs"], sidecar["io_names"]) == (
        "pixel_values",
        ["last_hidden_state", "pooler_output"],
        "optimum",
    )
    assert sidecar["source_sha256"] == "s" * 64 and sidecar["onnx_sha256"] == "o" * 64
    assert sidecar["encoder"] == _info().to_metadata()  # the encoder file's own metadata, nothing else
    assert EncoderInfo.from_metadata(sidecar["encoder"]) == _info()
    parity = sidecar["parity"]
    assert parity["passed"] and parity["tolerance"] == {"cos_mean": 0.999, "cos_min": 0.99}
    assert parity["checks"][0]["cos_min"] == 0.9991
    # Written beside the engine, it is found from the engine's path and round-trips as JSON.
    sidecar_path(tmp_path / "encoder.engine").write_text(json.dumps(sidecar))
    assert sidecar_path(tmp_path / "encoder.engine").name == "encoder.engine.json"
    assert read_sidecar(tmp_path / "encoder.engine") == sidecar
    (tmp_path / "encoder.engine").write_bytes(b"not the engine the sidecar describes")
    described = describe(tmp_path / "encoder.engine")
    assert described["gpu"] == "NVIDIA H100" and described["kind"].startswith("TensorRT engine")
    assert described["matches_sidecar"] is False
    sidecar_path(tmp_path / "encoder.engine").write_text(
        json.dumps({**sidecar, "engine_sha256": file_sha256(tmp_path / "encoder.engine")})
    )
    assert describe(tmp_path / "encoder.engine")["matches_sidecar"] is True
    result = CliRunner().invoke(app, ["info", str(tmp_path / "encoder.engine.json")])
    assert result.exit_code == 0 and "tensorrt_version: 11.0.0" in result.output


def test_engine_without_sidecar_or_with_a_foreign_json_is_refused(tmp_path):
    (tmp_path / "model.engine").write_bytes(b"\0")
    with pytest.raises(ExportError, match="sidecar .* does not exist"):
        describe(tmp_path / "model.engine")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ExportError, match="not a dmt-jepa engine sidecar"):
        read_sidecar(tmp_path / "other.json")


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT and a GPU are present: the missing-tool errors cannot happen")
def test_missing_tensorrt_or_gpu_is_one_clear_error(tmp_path, monkeypatch):
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    path = save_encoder(tmp_path / "tiny.safetensors", encoder, info_from_encoder(encoder, "custom"))
    with pytest.raises(ExportError, match="TensorRT is not installed|no CUDA GPU is visible"):
        export_encoder(path, tmp_path / "out", trt=True)
    assert not (tmp_path / "out").exists()  # refused before any work
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # an absent module
    with pytest.raises(ExportError, match="TensorRT is not installed"):
        require_tensorrt()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExportError, match="no CUDA GPU is visible"):
        require_gpu()


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_TENSORRT, reason="needs TensorRT and a CUDA GPU")
def test_engine_matches_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2)
    path = save_encoder(tmp_path / "tiny.safetensors", encoder, info_from_encoder(encoder, "custom"))
    result = export_encoder(
        path, tmp_path / "out", trt=True, min_shape="1x3x32x32", opt_shape="4x3x64x64", max_shape="4x3x160x288"
    )
    assert result.engine == tmp_path / "out" / "encoder.engine" and result.engine.is_file()
    assert (tmp_path / "out" / "encoder.timing.cache").is_file()
    sidecar = read_sidecar(result.engine)
    assert sidecar["parity"]["passed"] and len(sidecar["parity"]["checks"]) == 3
    assert sidecar["profile"]["max"] == [4, 3, 160, 288]
    # Rebuilding reuses the timing cache and gives an engine that passes again.
    assert export_encoder(
        path, tmp_path / "out", trt=True, min_shape="1x3x32x32", opt_shape="4x3x64x64", max_shape="4x3x160x288"
    ).sidecar["parity"]["passed"]
