"""OpenVINO backend and calibrated int8 against the encoder's own PyTorch output; their refusals."""

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from embed_helpers import TRAIN_SIZE, tiny_dense, tiny_encoder, tiny_model_files, write_onnx_model

from dmt_jepa.encoder_file import info_from_encoder
from dmt_jepa.serve.backends import Backend, BackendError, checked_run, load_backend, patch_cosine
from dmt_jepa.serve.calibration import _Batches, quantize_static_int8, scene_pixels, weight_matmuls
from dmt_jepa.serve.images import normalise

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="needs OpenVINO (pip install 'dmt-jepa[openvino]')"
)

# This module's tests run in a pytest process of their own (tests/own_process.py): OpenVINO's CPU
# plugin starts stream threads of its own in the process that compiles a model and sets an alternate
# signal stack of its own on the thread that builds it, which the suite's process should not inherit.
pytestmark = pytest.mark.own_process


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_model_files(tmp_path_factory.mktemp("models"))


reference = tiny_dense


def scenes(n: int, seed: int = 1) -> np.ndarray:
    return scene_pixels(n, (TRAIN_SIZE, TRAIN_SIZE), seed=seed)


def normalised(pixels: np.ndarray) -> np.ndarray:
    info = info_from_encoder(tiny_encoder(), "vit_test")
    return normalise(pixels, info.pixel_mean, info.pixel_std)


@needs_openvino
@pytest.mark.parametrize("kind", ["onnx", "encoder"])
@pytest.mark.parametrize("height, width", [(TRAIN_SIZE, TRAIN_SIZE), (48, 80)])
def test_openvino_fp32_equals_pytorch(models, kind, height, width):
    backend = load_backend(models[kind], "openvino")
    assert backend.name == "openvino" and backend.precision == "fp32" and backend.reference() is None
    images = np.random.default_rng(0).standard_normal((3, 3, height, width)).astype(np.float32)
    grid, pooled = backend.run(images)
    want_grid, want_pooled = reference(images)
    assert grid.shape == (3, height // 16, width // 16, 32)
    np.testing.assert_allclose(grid, want_grid, atol=1e-4)
    np.testing.assert_allclose(pooled, want_pooled, atol=1e-4)


@needs_openvino
def test_openvino_streams_split_a_batch_and_keep_its_order(models):
    runner = load_backend(models["onnx"], "openvino", "fp32")
    assert runner.streams == len(runner._pixels.requests) >= 1
    images = normalised(scenes(7))
    together = runner.run(images)
    alone = [runner.run(images[i : i + 1]) for i in range(len(images))]
    for which, out in enumerate(together):
        assert out.shape[0] == 7
        np.testing.assert_allclose(out, np.concatenate([a[which] for a in alone]), atol=1e-5, rtol=1e-4)
    three = runner._float  # more parts than a batch of two can fill: still every image once, in order
    compiled = three.requests[0].get_compiled_model()
    three.streams, three.requests = 3, [compiled.create_infer_request() for _ in range(3)]
    pair = runner.run(images[:2])
    np.testing.assert_allclose(pair[0], together[0][:2], atol=1e-5, rtol=1e-4)


@needs_openvino
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_openvino_normalises_uint8_pixels_inside_the_model_like_numpy(models, precision):
    runner = load_backend(models["onnx"], "openvino", precision)
    pixels = scenes(5, seed=3)
    inside, outside = runner.run_pixels(pixels), runner.run(normalised(pixels))
    for a, b in zip(inside, outside, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)
    grid, _ = reference(normalised(pixels))
    assert patch_cosine(inside[0], grid).min() > (0.9999 if precision == "fp32" else 0.99)


@needs_openvino
def test_openvino_layers_equal_pytorch_blocks(tmp_path):
    from dmt_jepa.export.onnx_export import export_graph

    encoder = tiny_encoder()
    info = info_from_encoder(encoder, "vit_test")
    path = tmp_path / "layers.onnx"
    export_graph(encoder, info, path, {**info.to_metadata(), "precision": "fp32"}, layers=[0])
    images = normalised(scenes(2))
    grid, pooled, block0 = load_backend(path, "openvino", layers=[0]).run(images)
    with torch.no_grad():
        features = encoder.intermediate_layers(torch.from_numpy(images), [0, -1], output_fmt="NHWC")
    np.testing.assert_allclose(block0, features.maps[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(grid, features.maps[1].numpy(), atol=1e-4)
    with pytest.raises(BackendError, match="no output for layers"):
        load_backend(path, "openvino", layers=[1])


@needs_openvino
def test_openvino_int8_is_calibrated_and_passes_its_check(models):
    backend = load_backend(models["onnx"], "openvino", "int8")
    images = scenes(4)
    (grid, _), worst = checked_run(backend, images)
    want, _ = reference(normalised(images))
    assert not np.array_equal(grid, want)  # really int8 arithmetic
    assert 0.99 <= worst < 1.0
    assert patch_cosine(grid, want).min() == pytest.approx(worst, abs=1e-3)


@needs_openvino
def test_openvino_bf16_follows_the_cpu(models):
    from dmt_jepa.serve.backends.openvino_backend import OpenVinoBackend

    with pytest.raises(BackendError, match="no bf16|has none"):
        OpenVinoBackend(models["onnx"], precision="bf16", has_bf16=False)
    backend = OpenVinoBackend(models["onnx"], precision="bf16", has_bf16=True)
    (grid, _), worst = checked_run(backend, scenes(2))
    assert worst >= 0.99 and backend.reference().precision == "fp32"


@needs_openvino
def test_openvino_refusals_are_one_sentence(models, tmp_path):
    not_onnx = tmp_path / "fake.onnx"
    not_onnx.write_bytes(b"\x00not a model at all")
    with pytest.raises(BackendError, match="cannot load .* as an ONNX model"):
        load_backend(not_onnx, "openvino")
    other = tmp_path / "other.onnx"
    model = onnx.load(str(models["onnx"]))
    model.graph.output[0].name = "features"  # a graph whose outputs lie about the contract
    onnx.save(model, str(other))
    with pytest.raises(BackendError, match="not a dmt-jepa ONNX model"):
        load_backend(other, "openvino")
    with pytest.raises(BackendError, match="runs fp32, bf16, int8"):
        load_backend(models["onnx"], "openvino", "fp16")


def test_missing_openvino_says_how_to_install(models, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # what Python does when the package is absent
    with pytest.raises(BackendError, match=r"pip install \"dmt-jepa\[openvino\]\""):
        load_backend(models["onnx"], "openvino")


def test_calibration_reader_yields_every_image_once_per_pass():
    images = np.arange(19 * 3 * 2 * 2, dtype=np.float32).reshape(19, 3, 2, 2)
    reader = _Batches("images", images)
    for _ in range(2):  # the quantiser may read the data twice, rewinding in between
        seen = []
        while (item := reader.get_next()) is not None:
            seen.append(item["images"])
        np.testing.assert_array_equal(np.concatenate(seen), images)
        reader.rewind()


def test_only_weight_matmuls_are_quantised(models):
    model = onnx.load(str(models["onnx"]))
    chosen = {n.op_type for n in model.graph.node if n.name in weight_matmuls(model)}
    counted = [n for n in model.graph.node if n.name in weight_matmuls(model)]
    depth = len(tiny_encoder().blocks)
    assert chosen == {"MatMul"}
    assert len(counted) == 4 * depth  # qkv, proj, fc1, fc2 per block; not attention's q @ k, attn @ v


def test_onnxruntime_static_int8_keeps_the_contract_and_stays_close(models, tmp_path):
    info = info_from_encoder(tiny_encoder(), "vit_test")
    out = quantize_static_int8(models["onnx"], scenes(16, seed=0), info, tmp_path / "int8.onnx")
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    backend = load_backend(models["onnx"], "onnxruntime-cpu", "int8-static")
    images = scenes(4)
    (grid, _), worst = checked_run(backend, images)
    want, _ = reference(normalised(images))
    assert not np.array_equal(grid, want)
    assert 0.99 <= worst < 1.0


def test_calibration_does_not_depend_on_how_images_are_grouped(models, tmp_path, monkeypatch):
    """Ranges are min/max over every image: one image a run (bounded memory) gives the model that 5 at once give."""
    from dmt_jepa.serve import calibration

    info = info_from_encoder(tiny_encoder(), "vit_test")
    built = {}
    for per_run in (1, 5):
        monkeypatch.setattr(calibration, "CALIBRATION_BATCH", per_run)
        reader = calibration._Batches("x", np.zeros((10, 3, 2, 2), np.float32))
        assert sum(1 for _ in iter(reader.get_next, None)) == -(-10 // per_run)  # the grouping the test varies
        model = onnx.load(str(quantize_static_int8(models["onnx"], scenes(10, seed=3), info, tmp_path / f"{per_run}.onnx")))
        built[per_run] = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    assert built[1].keys() == built[5].keys()
    scales = [name for name in built[1] if name.endswith("_scale")]
    assert scales  # the activation ranges are in the graph as QuantizeLinear scales
    for name in built[1]:
        np.testing.assert_array_equal(built[1][name], built[5][name], err_msg=name)


class Timed(Backend):
    """A backend whose speed is set by the test: each run sleeps `seconds`."""

    def __init__(self, name: str, seconds: float, good: Backend):
        self.name, self.seconds, self.good, self.info, self.precision = name, seconds, good, good.info, "fp32"

    def run(self, images):
        import time

        time.sleep(self.seconds)
        return self.good.run(images)


def test_measured_choice_picks_the_fastest_and_caches_it(models, tmp_path):
    from dmt_jepa.serve.backends.choice import CACHE_FILE, measured_choice, read_cache

    good = load_backend(models["onnx"], "onnxruntime-cpu")
    built = []

    def builder(name, seconds):
        def make():
            built.append(name)
            return Timed(name, seconds, good)

        return make

    build = {"slow": builder("slow", 0.03), "fast": builder("fast", 0.0)}
    name, backend = measured_choice("onnx", good.info, "fp32", build, cache=tmp_path)
    assert name == "fast" and backend.name == "fast" and sorted(built) == ["fast", "slow"]
    (entry,) = read_cache(tmp_path / CACHE_FILE).values()
    assert entry["backend"] == "fast" and entry["images_per_s"]["fast"] > entry["images_per_s"]["slow"]
    built.clear()  # the second call reads the cache: nothing is built or measured
    assert measured_choice("onnx", good.info, "fp32", build, cache=tmp_path) == ("fast", None) and built == []
    # A different precision is a different entry, measured on its own.
    assert measured_choice("onnx", good.info, "int8", build, cache=tmp_path)[0] == "fast" and len(built) == 2


@pytest.mark.parametrize("damage", ["garbage", "list", "directory", "link", "unknown-backend", "huge"])
def test_a_damaged_cache_is_measured_again(models, tmp_path, damage):
    from dmt_jepa.serve.backends.choice import CACHE_FILE, MAX_CACHE_BYTES, cache_key, measured_choice

    good = load_backend(models["onnx"], "onnxruntime-cpu")
    cache = tmp_path / CACHE_FILE
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({cache_key("onnx", good.info, "fp32"): {"backend": "slow"}}))
    if damage == "garbage":
        cache.write_bytes(b"\xff{not json")
    elif damage == "list":
        cache.write_text("[1, 2]")
    elif damage == "directory":
        cache.mkdir()
    elif damage == "link":
        cache.symlink_to(elsewhere)  # a link to a file that names the slow one: not followed
    elif damage == "unknown-backend":
        cache.write_text(json.dumps({cache_key("onnx", good.info, "fp32"): {"backend": "../../etc"}}))
    else:
        cache.write_text(" " * (MAX_CACHE_BYTES + 1))
    build = {"slow": lambda: Timed("slow", 0.03, good), "fast": lambda: Timed("fast", 0.0, good)}
    assert measured_choice("onnx", good.info, "fp32", build, cache=tmp_path)[0] == "fast"
    assert json.loads(elsewhere.read_text()) == {cache_key("onnx", good.info, "fp32"): {"backend": "slow"}}


def test_cache_lives_outside_the_package(monkeypatch, tmp_path):
    from pathlib import Path

    from dmt_jepa import serve
    from dmt_jepa.serve.backends.choice import cache_dir

    assert cache_dir({"DMT_JEPA_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "dmt-jepa"
    assert cache_dir({}) == Path.home() / ".cache" / "dmt-jepa"
    package = Path(serve.__file__).resolve().parent.parent
    assert package not in cache_dir({}).resolve().parents


@needs_openvino
def test_auto_measures_openvino_against_onnxruntime(models, tmp_path, monkeypatch):
    from dmt_jepa.serve.backends.choice import CACHE_FILE, read_cache

    monkeypatch.setenv("DMT_JEPA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("dmt_jepa.serve.backends._cuda_available", lambda: False)
    backend = load_backend(models["onnx"])
    (entry,) = read_cache(tmp_path / CACHE_FILE).values()
    assert set(entry["images_per_s"]) == {"onnxruntime-cpu", "openvino"}
    assert backend.name == entry["backend"] == max(entry["images_per_s"], key=entry["images_per_s"].get)
    grid, _ = backend.run(normalised(scenes(2)))
    np.testing.assert_allclose(grid, reference(normalised(scenes(2)))[0], atol=1e-4)


@needs_openvino
@pytest.mark.parametrize("kind", ["onnx", "encoder"])
def test_openvino_int8_is_calibrated_once_then_loaded_from_the_cache(models, kind, tmp_path, monkeypatch):
    """An encoder file is exported again on every load: the export must give the same bytes for the cache to hit."""
    from dmt_jepa.serve import calibration

    monkeypatch.setenv("DMT_JEPA_CACHE_DIR", str(tmp_path))
    made = []
    real = calibration.quantize_static_int8
    monkeypatch.setattr(calibration, "quantize_static_int8", lambda *a, **k: made.append(a[0]) or real(*a, **k))
    images = scenes(3)
    first = load_backend(models[kind], "openvino", "int8").run_pixels(images)
    second = load_backend(models[kind], "openvino", "int8").run_pixels(images)
    assert len(made) == 1 and len(list((tmp_path / calibration.CACHE_FOLDER).iterdir())) == 1
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@needs_openvino
@pytest.mark.parametrize("kind", ["onnx", "encoder"])
def test_openvino_int8_cached_model_that_fails_the_first_batch_check_is_deleted_so_the_next_run_calibrates(
    models, kind, tmp_path, tmp_path_factory, monkeypatch
):
    from dmt_jepa.serve import calibration
    from dmt_jepa.serve.calibration import CACHE_FOLDER, DEFAULT_CALIBRATION_IMAGES, calibration_key

    monkeypatch.setenv("DMT_JEPA_CACHE_DIR", str(tmp_path))
    folder = tmp_path / CACHE_FOLDER
    # The first load exports an encoder file to ONNX (the same bytes every time) and calibrates it: its entry's
    # name gives the key, and another model's calibrated graph, stamped with that key, takes its place. No check
    # at load can tell it from a good one: only the first batch, compared with fp32, shows it.
    load_backend(models[kind], "openvino", "int8")
    [good] = folder.iterdir()
    key = good.name.split("-")[0]
    if kind == "onnx":
        assert key == calibration_key(models["onnx"], scenes(DEFAULT_CALIBRATION_IMAGES, seed=0))
    other = write_onnx_model(tmp_path_factory.mktemp("other-model") / "other.onnx", tiny_encoder(seed=5))
    stale = quantize_static_int8(
        other, scenes(6, seed=0), info_from_encoder(tiny_encoder(), "vit_test"), tmp_path / "stale.onnx", key
    )
    good.unlink()
    data = stale.read_bytes()
    (folder / f"{key}-{calibration._content_hash(data)}.onnx").write_bytes(data)
    bystander = folder / f"{'0' * 64}-{calibration._content_hash(b'another model')}.onnx"  # another key's entry stays
    bystander.write_bytes(b"another model")
    batch = scenes(2, seed=3)
    with pytest.raises(BackendError, match="the cached calibrated model it ran was deleted") as caught:
        checked_run(load_backend(models[kind], "openvino", "int8"), batch)
    assert "\n" not in str(caught.value)
    assert sorted(folder.iterdir()) == [bystander]
    made = []
    real = calibration.quantize_static_int8
    monkeypatch.setattr(calibration, "quantize_static_int8", lambda *a, **k: made.append(a[0]) or real(*a, **k))
    _, worst = checked_run(load_backend(models[kind], "openvino", "int8"), batch)  # calibrated again
    assert len(made) == 1 and worst is not None and worst >= 0.99
    assert len([entry for entry in folder.iterdir() if entry.name.startswith(f"{key}-")]) == 1
