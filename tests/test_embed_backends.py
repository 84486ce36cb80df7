"""Backends against the encoder's own PyTorch output; precision checks; model-file errors; the in-memory API."""

import io
import json

import numpy as np
import pytest
import torch
from embed_helpers import TRAIN_SIZE, image_bytes, tiny_dense, tiny_encoder, tiny_model_files, write_onnx_model
from PIL import Image

from dmt_jepa import serve
from dmt_jepa.encoder_file import info_from_encoder
from dmt_jepa.serve.backends import Backend, BackendError, checked_run, choose_backend, load_backend
from dmt_jepa.serve.backends.tensorrt_backend import read_sidecar
from dmt_jepa.serve.images import ImageRejected, normalise


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_model_files(tmp_path_factory.mktemp("models"))


reference = tiny_dense


def batch(n=3, height=TRAIN_SIZE, width=TRAIN_SIZE, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, height, width)).astype(np.float32)


def pixels(n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, TRAIN_SIZE, TRAIN_SIZE, 3), dtype=np.uint8)


def normalised(images):
    info = info_from_encoder(tiny_encoder(), "vit_test")
    return normalise(images, info.pixel_mean, info.pixel_std)


@pytest.mark.parametrize("kind, name", [("encoder", "torch-cpu"), ("onnx", "onnxruntime-cpu")])
@pytest.mark.parametrize("height, width", [(TRAIN_SIZE, TRAIN_SIZE), (48, 80)])
def test_fp32_backends_equal_pytorch(models, kind, name, height, width):
    backend = load_backend(models[kind], name)
    assert backend.name == name and backend.precision == "fp32"
    images = batch(3, height, width)
    grid, pooled = backend.run(images)
    want_grid, want_pooled = reference(images)
    assert grid.shape == (3, height // 16, width // 16, 32)
    np.testing.assert_allclose(grid, want_grid, atol=1e-4)
    np.testing.assert_allclose(pooled, want_pooled, atol=1e-4)


def _cpu_seconds_after_a_run(session, images: np.ndarray) -> float:
    """CPU time this process spends in the 0.3 s after a run returns (the run itself excluded), least of 3."""
    import time

    spent = []
    for _ in range(3):
        session.run(None, {session.get_inputs()[0].name: images})
        start = time.process_time()
        time.sleep(0.3)
        spent.append(time.process_time() - start)
    return min(spent)


def test_cpu_sessions_keep_the_memory_arena_and_stop_spinning_when_a_run_returns(models):
    """The arena is worth 10 % of fp32 throughput for ~50 MiB; threads spin inside a run but not after it,
    when the decode workers need the cores (serve/backends/onnx_backend.py)."""
    import onnxruntime as ort

    from dmt_jepa.serve.backends.onnx_backend import _session

    session = _session(models["onnx"], "cpu")
    assert session.get_session_options().enable_cpu_mem_arena
    images = batch(64)
    default = ort.InferenceSession(str(models["onnx"]), providers=["CPUExecutionProvider"])
    if _cpu_seconds_after_a_run(default, images) < 0.01:
        pytest.skip("ONNX Runtime's threads do not spin after a run on this machine: nothing to tell apart")
    assert _cpu_seconds_after_a_run(session, images) < 0.005


@pytest.mark.parametrize("kind", ["encoder", "onnx"])
def test_pixel_batches_are_normalised_like_the_reference(models, kind):
    backend = load_backend(models[kind])
    grid, pooled = backend.run_pixels(pixels(2))
    want_grid, want_pooled = reference(normalised(pixels(2)))
    np.testing.assert_allclose(grid, want_grid, atol=1e-4)
    np.testing.assert_allclose(pooled, want_pooled, atol=1e-4)


@pytest.mark.parametrize("kind, precision", [("encoder", "bf16"), ("onnx", "int8")])
def test_low_precision_runs_and_passes_its_check(models, kind, precision):
    backend = load_backend(models[kind], precision=precision)
    images = pixels(4)
    (grid, _), worst = checked_run(backend, images)
    want, _ = reference(normalised(images))
    assert not np.array_equal(grid, want)  # really a different arithmetic
    assert 0.99 <= worst <= 1.0
    cosine = (grid * want).sum(-1) / np.linalg.norm(grid, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cosine.min() == pytest.approx(worst, abs=1e-3)


def test_fp16_onnx_runs_in_its_own_precision(models, tmp_path):
    backend = load_backend(write_onnx_model(tmp_path / "fp16.onnx", tiny_encoder(), fp16=True))
    assert backend.precision == "fp16" and backend.reference() is None
    grid, _ = backend.run(batch(2))
    want, _ = reference(batch(2))
    cosine = (grid * want).sum(-1) / np.linalg.norm(grid, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cosine.min() >= 0.99
    with pytest.raises(BackendError, match="not int8"):
        load_backend(tmp_path / "fp16.onnx", precision="int8")


class NoisyBackend(Backend):
    """A low-precision path gone wrong: noise as large as the signal."""

    def __init__(self, good: Backend):
        self.good, self.name, self.precision, self.info = good, "noisy", "int8", good.info

    def run(self, images):
        grid, pooled = self.good.run(images)
        return grid + np.random.default_rng(0).standard_normal(grid.shape).astype(np.float32), pooled

    def reference(self):
        return self.good


def test_precision_check_refuses_a_bad_path(models):
    with pytest.raises(BackendError, match="too far from fp32"):
        checked_run(NoisyBackend(load_backend(models["encoder"])), pixels(2))


def test_auto_choice_on_this_machine(models):
    cuda = torch.cuda.is_available()
    assert choose_backend("encoder") == ("torch-cuda" if cuda else "torch-cpu")
    assert choose_backend("engine") == "tensorrt"
    if not cuda:
        assert choose_backend("onnx") == "onnxruntime-cpu"


def test_wrong_model_files_are_clear_errors(models, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "notes.txt").write_text("hello")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    cases = [
        (tmp_path / "missing.safetensors", {}, "does not exist"),
        (tmp_path / "notes.txt", {}, "neither an encoder file"),
        (tmp_path / "other.safetensors", {}, "not a dmt-jepa encoder file"),
        (tmp_path / "junk.onnx", {}, "cannot load"),
        (models["encoder"], {"backend": "onnxruntime-cpu"}, "cannot run an encoder file"),
        (models["onnx"], {"backend": "torch-cpu"}, "cannot run an ONNX model"),
        (models["encoder"], {"precision": "int8"}, "not int8"),
        (models["encoder"], {"precision": "fp16"}, "not fp16"),
        (models["onnx"], {"precision": "bf16"}, "not bf16"),
        (models["encoder"], {"precision": "fp8"}, "unknown precision"),
        (models["encoder"], {"backend": "tpu"}, "unknown backend"),
    ]
    for path, options, words in cases:
        with pytest.raises(BackendError, match=words):
            load_backend(path, **options)


def test_onnx_without_the_contract_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, str(tmp_path / "relu.onnx"))
    with pytest.raises(BackendError, match="not a dmt-jepa ONNX model"):
        load_backend(tmp_path / "relu.onnx")


def test_engine_sidecar_as_export_writes_it(tmp_path):
    from dmt_jepa.export.tensorrt_build import SIDECAR_FORMAT

    engine = tmp_path / "enc.engine"
    engine.write_bytes(b"engine bytes")
    with pytest.raises(BackendError, match="does not exist"):
        read_sidecar(engine)
    meta = info_from_encoder(tiny_encoder(), "vit_test").to_metadata()
    profile = {"min": [1, 3, 32, 32], "opt": [8, 3, 64, 64], "max": [32, 3, 128, 128]}
    sidecar = {"format": SIDECAR_FORMAT, "encoder": meta, "precision": "fp16", "profile": profile}
    (tmp_path / "enc.engine.json").write_text(json.dumps(sidecar))
    read = read_sidecar(engine)
    assert read["precision"] == "fp16" and read["info"].patch_size == 16 and read["profile"]["max"] == [32, 3, 128, 128]
    (tmp_path / "enc.engine.json").write_text(json.dumps({"format": SIDECAR_FORMAT, "precision": "fp16"}))
    with pytest.raises(BackendError, match="incomplete"):
        read_sidecar(engine)


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.tensorrt
@pytest.mark.skipif(not _has_tensorrt(), reason="needs the tensorrt package and a CUDA GPU")
def test_tensorrt_engine_equals_onnx(models, tmp_path):
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(models["onnx"].read_bytes())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(network.get_input(0).name, (1, 3, 32, 32), (4, 3, 64, 64), (8, 3, 96, 96))
    config.add_optimization_profile(profile)
    engine = tmp_path / "enc.engine"
    engine.write_bytes(bytes(builder.build_serialized_network(network, config)))
    from dmt_jepa.export.tensorrt_build import SIDECAR_FORMAT

    meta = load_backend(models["onnx"]).info.to_metadata()
    profile_json = {"min": [1, 3, 32, 32], "opt": [4, 3, 64, 64], "max": [8, 3, 96, 96]}
    sidecar = {"format": SIDECAR_FORMAT, "encoder": meta, "precision": "fp32", "profile": profile_json}
    (tmp_path / "enc.engine.json").write_text(json.dumps(sidecar))
    backend = load_backend(engine)
    images = batch(10)  # more than the profile's batch: split inside the backend
    grid, pooled = backend.run(images)
    np.testing.assert_allclose(grid, reference(images)[0], atol=1e-3)
    with pytest.raises(BackendError, match="profile covers"):
        backend.check_size((160, 160))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_torch_cuda(models, precision):
    backend = load_backend(models["encoder"], backend="torch-cuda", precision=precision)
    (grid, _), _ = checked_run(backend, pixels(4))
    np.testing.assert_allclose(grid, reference(normalised(pixels(4)))[0], atol=1e-3 if precision == "fp32" else 0.1)


def test_embed_images_api_accepts_every_image_kind(models, tmp_path):
    data = image_bytes(70, 90, "PNG", seed=3)
    (tmp_path / "a.png").write_bytes(data)
    pil = Image.open(io.BytesIO(data))
    out = serve.embed_images(models["encoder"], [data, tmp_path / "a.png", str(tmp_path / "a.png"), pil, np.asarray(pil)])
    assert len(out) == 5 and out[0].shape == (4, 4, 32) and out[0].dtype == np.float32
    for other in out[1:]:
        np.testing.assert_array_equal(other, out[0])
    onnx_out = serve.embed_images(models["onnx"], [data], size=(48, 80))
    assert onnx_out[0].shape == (3, 5, 32)
    with pytest.raises(ImageRejected, match="image 1:"):
        serve.embed_images(models["encoder"], [data, b"not an image"])
    with pytest.raises(BackendError, match="not a multiple of the patch size"):
        serve.embed_images(models["encoder"], [data], size=(50, 64))


@pytest.mark.parametrize("named", [["fast"], {"fast": 1}, 3, None])
def test_a_cached_choice_that_is_not_a_backend_name_is_measured_again(tmp_path, named):
    """A cache entry is JSON someone may have edited: a "backend" that is no name is ignored, not a crash."""
    from dmt_jepa.encoder_file import EncoderInfo
    from dmt_jepa.serve.backends.choice import CACHE_FILE, cache_key, measured_choice, read_cache

    class Fake:
        def __init__(self, name: str, seconds: float):
            self.name, self.seconds = name, seconds

        def run(self, images):
            import time

            time.sleep(self.seconds)

    info = EncoderInfo("vit_nano", 8, 32, 2, 2, 4.0, (16, 16))
    (tmp_path / CACHE_FILE).write_text(json.dumps({cache_key("onnx", info, "fp32"): {"backend": named}}))
    build = {"slow": lambda: Fake("slow", 0.02), "fast": lambda: Fake("fast", 0.0)}
    name, backend = measured_choice("onnx", info, "fp32", build, cache=tmp_path)
    assert name == "fast" and backend.name == "fast"
    assert read_cache(tmp_path / CACHE_FILE)[cache_key("onnx", info, "fp32")]["backend"] == "fast"
