"""eval dense --save-head -> a head file -> export --head: one ONNX segmentation graph, checked against PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from labelled_datasets import scenes
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import info_from_encoder, load_encoder, save_encoder
from dmt_jepa.evaluation import read_labelled_shards
from dmt_jepa.evaluation.dense import confusion_matrix, scores
from dmt_jepa.evaluation.features import to_input
from dmt_jepa.evaluation.head import HeadFileError, load_head
from dmt_jepa.export.out_dir import read_manifest
from dmt_jepa.models import VisionTransformer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A head trained by `eval dense --save-head` on 30/12 scenes at 32 px, and the segmenter exported from it."""
    root = tmp_path_factory.mktemp("head")
    data = scenes(root / "scenes", 30, 12, 32)
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    path = save_encoder(root / "enc.safetensors", encoder, info_from_encoder(encoder, "custom"))
    runner = CliRunner()
    args = [
        "eval",
        "dense",
        str(path),
        str(data),
        "--epochs",
        "15",
        "--lr",
        "0.05",
        "--save-head",
        str(root / "head.safetensors"),
    ]
    run = runner.invoke(app, args)
    assert run.exit_code == 0, run.output
    result = json.loads(next(line for line in run.output.splitlines() if line.startswith("{")))
    export = runner.invoke(
        app, ["export", str(path), "--out", str(root / "out"), "--head", str(root / "head.safetensors"), "--labels"]
    )
    assert export.exit_code == 0, export.output
    return {
        "root": root,
        "data": data,
        "encoder": path,
        "head": root / "head.safetensors",
        "result": result,
        "export": export.output,
    }


def test_the_head_file_keeps_classes_normalisation_and_its_encoder(trained):
    head = load_head(trained["head"])
    assert head.class_names == ["background", *map(str, range(10))] and head.num_classes == 11
    assert head.image_size == (32, 32) and head.patch_size == 8 and head.miou == pytest.approx(trained["result"]["dense"]["miou"])
    # The folded layer is standardise-then-classify: check it on made-up features against the two steps.
    x = torch.randn(5, 32)
    weight, bias = head.folded()
    expected = ((x - head.feature_mean) / head.feature_std) @ head.weight.T + head.bias
    assert torch.allclose(x @ weight.T + bias, expected, atol=1e-4)


def test_segmenter_graph_has_the_contract_and_is_listed_in_the_manifest(trained):
    out = trained["root"] / "out"
    model = onnx.load(str(out / "segmenter.onnx"))
    assert [i.name for i in model.graph.input] == ["pixel_values"]
    shapes = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert list(shapes) == ["logits", "labels"] and shapes["logits"][:2] == ["batch", 11] and len(shapes["labels"]) == 3
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["class_names"])[:2] == ["background", "0"] and meta["patch_size"] == "8"
    assert set(read_manifest(out)) == {"segmenter.onnx"}
    assert "ONNX Runtime segmenter vs PyTorch fp32:" in trained["export"] and "FAIL" not in trained["export"]


def test_onnx_labels_on_the_test_scenes_reproduce_the_evaluation_miou(trained):
    """An independent route: ONNX Runtime on the test images, argmax scored here, equals eval's figure."""
    encoder, info = load_encoder(trained["encoder"])
    test = read_labelled_shards(str(trained["data"] / "test-*.tar"))
    pixels = to_input(test.images, info, 32).numpy()
    session = ort.InferenceSession(str(trained["root"] / "out" / "segmenter.onnx"), providers=["CPUExecutionProvider"])
    logits, labels = session.run(["logits", "labels"], {"pixel_values": pixels})
    assert logits.shape == (12, 11, 4, 4) and labels.shape == (12, 32, 32) and labels.dtype == np.int64
    # The logits by hand: the encoder's grid, standardised with the file's statistics, then its linear layer.
    head = load_head(trained["head"])
    with torch.no_grad():
        grid, _ = encoder.dense(torch.from_numpy(pixels))
        by_hand = (((grid - head.feature_mean) / head.feature_std) @ head.weight.T + head.bias).permute(0, 3, 1, 2)
    assert np.abs(logits - by_hand.numpy()).max() <= 1e-3 * max(1.0, float(by_hand.abs().max()))
    upsampled = F.interpolate(by_hand, size=(32, 32), mode="bilinear", align_corners=False).argmax(1).numpy()
    assert np.mean(labels == upsampled) >= 0.999
    confusion = sum(confusion_matrix(p, t, 11) for p, t in zip(labels, test.segs))
    assert scores(confusion)["miou"] == pytest.approx(trained["result"]["dense"]["miou"], abs=0.05)


def test_a_head_is_refused_with_another_encoder_or_as_another_file(trained, tmp_path):
    runner = CliRunner()
    torch.manual_seed(1)
    other = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    other_path = save_encoder(tmp_path / "other.safetensors", other, info_from_encoder(other, "custom"))
    run = runner.invoke(app, ["export", str(other_path), "--out", str(tmp_path / "o"), "--head", str(trained["head"])])
    assert run.exit_code == 2 and "was trained on another encoder file" in run.output and not (tmp_path / "o").exists()
    tensors = load_file(str(trained["head"]))
    save_file(tensors, str(tmp_path / "bare.safetensors"))  # the weights without the metadata
    with pytest.raises(HeadFileError, match="is not a dense head file"):
        load_head(tmp_path / "bare.safetensors")
    run = runner.invoke(app, ["export", str(trained["encoder"]), "--out", str(tmp_path / "o"), "--labels"])
    assert run.exit_code == 2 and "--labels applies with --head only" in run.output
    run = runner.invoke(
        app, ["export", str(trained["encoder"]), "--out", str(tmp_path / "o"), "--head", str(trained["head"]), "--fp16"]
    )
    assert run.exit_code == 2 and "--head writes one fp32 ONNX graph" in run.output
    run = runner.invoke(
        app, ["eval", "dense", str(trained["encoder"]), str(trained["data"]), "--save-head", str(trained["head"])]
    )
    assert run.exit_code == 2 and "already exists" in run.output
