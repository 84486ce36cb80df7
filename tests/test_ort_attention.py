"""ONNX Runtime's fused Attention in place of our exported attention: same outputs, and only where the pattern is ours."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from embed_helpers import TRAIN_SIZE, tiny_encoder, write_onnx_model
from onnx import helper

from dmt_jepa.serve.backends import load_backend
from dmt_jepa.serve.backends.ort_attention import fuse_attention

SIZES = [(TRAIN_SIZE, TRAIN_SIZE), (48, 80)]


def peaked_encoder():
    """The tiny encoder with q, k and the output projection scaled up: attention far from uniform and
    weighing on the output, so that its scale shows there."""
    encoder = tiny_encoder()
    with torch.no_grad():
        for block in encoder.blocks:
            width = block.attn.qkv.weight.shape[1]
            block.attn.qkv.weight[: 2 * width] *= 10.0
            block.attn.proj.weight *= 20.0
    return encoder


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_onnx_model(tmp_path_factory.mktemp("attention") / "enc.onnx", peaked_encoder())


def torch_dense(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        grid, pooled = peaked_encoder().dense(torch.from_numpy(images))
    return grid.numpy(), pooled.numpy()


def run(model: onnx.ModelProto, images: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})


def images(height: int, width: int, count: int = 3) -> np.ndarray:
    return np.random.default_rng(height * width).standard_normal((count, 3, height, width)).astype(np.float32)


def ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def scale_off(fused: onnx.ModelProto) -> onnx.ModelProto:
    """`fused` with every Attention node's logit scale 1.5x what it should be (changed in place)."""
    for node in fused.graph.node:
        if node.op_type == "Attention":
            next(a for a in node.attribute if a.name == "scale").f *= 1.5
    return fused


def test_the_attention_is_peaked_enough_for_its_scale_to_matter(model_path):
    """The premise of the tests below: the same graph with another logit scale gives other outputs."""
    model = onnx.load(str(model_path))
    fused = scale_off(fuse_attention(model, num_heads=2)[0])
    x = images(TRAIN_SIZE, TRAIN_SIZE)
    assert np.abs(run(fused, x)[0] - run(model, x)[0]).max() > 1e-2


@pytest.mark.parametrize("height, width", SIZES)
def test_every_block_is_fused_and_the_outputs_do_not_change(model_path, height, width):
    model = onnx.load(str(model_path))
    fused, count = fuse_attention(model, num_heads=2)
    depth = len(tiny_encoder().blocks)
    assert count == depth and ops(fused).count("Attention") == depth
    assert "Softmax" not in ops(fused) and ops(model).count("Softmax") == depth
    x = images(height, width)
    want_grid, want_pooled = torch_dense(x)
    for original, rewritten in zip(run(model, x), run(fused, x), strict=True):
        np.testing.assert_allclose(rewritten, original, atol=1e-5)
    grid, pooled = run(fused, x)
    np.testing.assert_allclose(grid.reshape(want_grid.shape), want_grid, atol=1e-4)
    np.testing.assert_allclose(pooled, want_pooled, atol=1e-4)


def test_the_fused_scale_is_one_over_the_root_of_the_head_width(model_path):
    fused, _ = fuse_attention(onnx.load(str(model_path)), num_heads=2)
    head_width = 32 // 2
    for node in fused.graph.node:
        if node.op_type == "Attention":
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert attributes["num_heads"] == 2
            assert attributes["scale"] == pytest.approx(head_width**-0.5, rel=1e-6)


def test_a_block_whose_inner_value_is_used_outside_is_left_alone(model_path):
    """A graph that also outputs block 0's attention probabilities keeps that block as written."""
    model = onnx.load(str(model_path))
    first_softmax = next(node for node in model.graph.node if node.op_type == "Softmax")
    model.graph.output.append(helper.make_tensor_value_info(first_softmax.output[0], onnx.TensorProto.FLOAT, None))
    fused, count = fuse_attention(model, num_heads=2)
    assert count == len(tiny_encoder().blocks) - 1 and ops(fused).count("Softmax") == 1
    x = images(TRAIN_SIZE, TRAIN_SIZE)
    for original, rewritten in zip(run(model, x), run(fused, x), strict=True):
        np.testing.assert_allclose(rewritten, original, atol=1e-5)


def test_a_graph_without_the_pattern_is_returned_unchanged():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "g", [x], [y]))
    fused, count = fuse_attention(model, num_heads=2)
    assert count == 0 and fused.SerializeToString() == model.SerializeToString()


def test_the_cpu_backend_runs_fp32_fused_and_leaves_the_file_as_it_was(model_path):
    before = model_path.read_bytes()
    backend = load_backend(model_path, "onnxruntime-cpu", "fp32")
    assert backend.fused_attention == len(tiny_encoder().blocks)
    assert model_path.read_bytes() == before
    for height, width in SIZES:
        x = images(height, width)
        grid, pooled = backend.run(x)
        want_grid, want_pooled = torch_dense(x)
        np.testing.assert_allclose(grid, want_grid, atol=1e-4)
        np.testing.assert_allclose(pooled, want_pooled, atol=1e-4)


def _disagreeing(model, num_heads):
    fused, count = fuse_attention(model, num_heads)
    return scale_off(fused), count


def _failing(model, num_heads):
    raise ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB")


@pytest.mark.parametrize("rewrite", [_disagreeing, _failing], ids=["disagrees with the original", "fails"])
def test_a_rewrite_that_disagrees_or_fails_leaves_the_graph_as_written(model_path, monkeypatch, rewrite):
    monkeypatch.setattr("dmt_jepa.serve.backends.ort_attention.fuse_attention", rewrite)
    backend = load_backend(model_path, "onnxruntime-cpu", "fp32")
    assert backend.fused_attention == 0
    x = images(TRAIN_SIZE, TRAIN_SIZE)
    np.testing.assert_allclose(backend.run(x)[0], torch_dense(x)[0], atol=1e-4)


def test_dynamic_int8_quantises_the_fused_attention_and_stays_close(model_path):
    from dmt_jepa.serve.backends import checked_run
    from dmt_jepa.serve.backends.onnx_backend import _quantized

    fused, _ = fuse_attention(onnx.load(str(model_path)), num_heads=2)
    quantised = onnx.ModelProto.FromString(_quantized(fused.SerializeToString()))
    depth = len(tiny_encoder().blocks)
    assert ops(quantised).count("QAttention") == depth and "Attention" not in ops(quantised)
    backend = load_backend(model_path, "onnxruntime-cpu", "int8")
    assert backend.fused_attention == depth
    pixels = np.random.default_rng(1).integers(0, 256, (3, TRAIN_SIZE, TRAIN_SIZE, 3), dtype=np.uint8)
    (grid, _), worst = checked_run(backend, pixels)  # against the fp32 reference, as the job checks
    assert 0.99 <= worst < 1.0


def test_fp16_sessions_are_not_fused(tmp_path):
    fp16 = write_onnx_model(tmp_path / "fp16.onnx", peaked_encoder(), fp16=True)
    backend = load_backend(fp16, "onnxruntime-cpu")
    assert backend.precision == "fp16" and backend.fused_attention == 0


def test_an_export_with_intermediate_layers_is_fused_and_keeps_them(tmp_path):
    from dmt_jepa.encoder_file import info_from_encoder
    from dmt_jepa.export.onnx_export import export_graph

    encoder = peaked_encoder()
    info = info_from_encoder(encoder, arch="vit_test")
    path = tmp_path / "layers.onnx"
    export_graph(encoder, info, path, {**info.to_metadata(), "precision": "fp32"}, layers=[0])
    backend = load_backend(path, "onnxruntime-cpu", "fp32", layers=[0])
    assert backend.fused_attention == len(encoder.blocks)
    x = images(48, 80, count=2)
    grid, pooled, first = backend.run(x)
    with torch.no_grad():
        features = encoder.intermediate_layers(torch.from_numpy(x), [0, 1], output_fmt="NHWC")
    np.testing.assert_allclose(first, features.maps[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(grid, features.maps[1].numpy(), atol=1e-4)
    np.testing.assert_allclose(pooled, features.pooled.numpy(), atol=1e-4)
