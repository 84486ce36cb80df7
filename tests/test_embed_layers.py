"""`--layers`: intermediate blocks from every backend and in the job's output shards."""

import io
import json

import numpy as np
import pytest
import torch
from embed_helpers import photo_samples, read_output, tiny_encoder, write_encoder_file, write_onnx_model, write_shard
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import info_from_encoder
from dmt_jepa.export.onnx_export import export_graph
from dmt_jepa.serve.api import preprocess_for
from dmt_jepa.serve.backends import BackendError, load_backend
from dmt_jepa.serve.images import prepare


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    encoder = tiny_encoder()
    info = info_from_encoder(encoder, arch="vit_test")
    with_layers = directory / "layers.onnx"
    export_graph(encoder, info, with_layers, {**info.to_metadata(), "precision": "fp32"}, layers=[0])
    return {
        "encoder": write_encoder_file(directory / "enc.safetensors"),
        "onnx": with_layers,
        "plain_onnx": write_onnx_model(directory / "plain.onnx", encoder),
    }


@pytest.mark.parametrize("kind", ["encoder", "onnx"])
def test_backends_return_the_chosen_blocks(models, kind):
    images = np.random.default_rng(0).standard_normal((2, 3, 48, 80), dtype=np.float32)
    backend = load_backend(models[kind], layers=[0])
    assert backend.layers == (0,)
    grid, pooled, first = backend.run(images)
    with torch.no_grad():
        features = tiny_encoder().intermediate_layers(torch.from_numpy(images), [0, 1], output_fmt="NHWC")
    np.testing.assert_allclose(first, features.maps[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(grid, features.maps[1].numpy(), atol=1e-4)
    np.testing.assert_allclose(pooled, features.pooled.numpy(), atol=1e-4)


def test_unavailable_layers_are_refused(models):
    with pytest.raises(BackendError, match="export it with `dmtjepa export --layers`"):
        load_backend(models["plain_onnx"], layers=[0])
    with pytest.raises(BackendError, match="within 0 to 1"):
        load_backend(models["encoder"], layers=[2])


def test_job_writes_one_array_per_layer(tmp_path, models):
    samples = photo_samples("s", 3)
    write_shard(tmp_path / "in" / "part.tar", samples)
    args = ["embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(models["encoder"])]
    result = CliRunner().invoke(app, [*args, "--layers", "0,-1", "--workers", "0"])
    assert result.exit_code == 0, result.output
    written = read_output(tmp_path / "out" / "part.tar")
    backend = load_backend(models["encoder"], layers=[0])
    for key, members in samples:
        assert sorted(written[key]) == ["emb.npy", "in.cls", "json", "layer_0.npy", "layer_1.npy"]
        first = np.load(io.BytesIO(written[key]["layer_0.npy"]))
        last = np.load(io.BytesIO(written[key]["layer_1.npy"]))
        emb = np.load(io.BytesIO(written[key]["emb.npy"]))
        assert first.dtype == np.float16 and first.shape == (4, 4, 32)
        np.testing.assert_array_equal(last, emb)  # the last block after the norm is the grid itself
        pixels = prepare(next(v for e, v in members.items() if e in ("png", "jpg")), preprocess_for(backend))[0]
        _, _, want = backend.run_pixels(np.array(pixels[None]))
        np.testing.assert_allclose(first.astype(np.float32), want[0], atol=2e-2, rtol=1e-2)
    assert json.loads((tmp_path / "out" / "part.json").read_text())["layers"] == [0, 1]


def test_layers_are_refused_where_they_cannot_be_written(tmp_path, models):
    write_shard(tmp_path / "in" / "part.tar", photo_samples("s", 1))
    args = ["embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(models["encoder"]), "--layers", "0"]
    refused = ((["--layout", "embedding-reader"], "pooled vectors only"), (["--pca", "4"], "cannot be combined"))
    for extra, message in refused:
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.json"))
