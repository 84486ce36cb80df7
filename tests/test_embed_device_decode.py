"""`embed --decode gpu`: headers checked by the workers, JPEGs decoded, turned upright and resized
where the model runs. The device here is the CPU (torchvision's decoder); on CUDA it is nvJPEG."""

import io
import json

import numpy as np
import pytest
import torch
from embed_helpers import image_bytes, read_output, write_encoder_file, write_shard
from PIL import Image, ImageOps
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.serve import embed_shards
from dmt_jepa.serve.device_decode import DeviceDecoder, upright
from dmt_jepa.serve.images import EXIF_ORIENTATION, EncodedJpeg, ImageRejected, Preprocess, prepare, prepare_leaving_jpeg
from dmt_jepa.serve.job import EmbedOptions, OutputDirError

PREP = Preprocess((64, 64), 16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def smooth_jpeg(height: int, width: int, orientation: int = 1, mode: str = "RGB", seed: int = 0) -> bytes:
    """A photo-like (smooth) JPEG, optionally with an EXIF orientation tag."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [128 + 100 * np.sin(2 * np.pi * (a * x + b * y) + c) for a, b, c in rng.uniform(0.5, 2.5, (3, 3))]
    image = Image.fromarray(np.stack(channels, -1).astype(np.uint8))
    if mode != "RGB":
        image = image.convert(mode)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes() if orientation != 1 else b"")
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_is_what_pillow_does_for_every_exif_orientation(orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = orientation
    image.info["exif"] = exif.tobytes()
    want = np.asarray(ImageOps.exif_transpose(image))
    got = upright(torch.from_numpy(stored).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert got.shape == want.shape and np.array_equal(got, want)


@pytest.mark.parametrize("resize", ["crop", "pad"])
@pytest.mark.parametrize(
    ("height", "width", "orientation", "mode"),
    [
        (90, 130, 1, "RGB"),
        (130, 90, 6, "RGB"),
        (75, 200, 8, "RGB"),
        (100, 100, 3, "L"),
        (600, 400, 1, "RGB"),
    ],
)
def test_jpegs_stay_encoded_and_decode_on_the_device_like_the_cpu_path(resize, height, width, orientation, mode):
    prep = Preprocess((64, 64), 16, PREP.pixel_mean, PREP.pixel_std, resize=resize)
    data = smooth_jpeg(height, width, orientation, mode)
    left, record = prepare_leaving_jpeg(data, prep)
    pixels, cpu_record = prepare(data, prep)
    assert isinstance(left, EncodedJpeg) and record == cpu_record  # the record comes from the header alone
    fallbacks = []
    [device] = DeviceDecoder("cpu", prep, fallbacks.append)([left])
    assert not fallbacks and device.dtype == np.uint8 and device.shape == pixels.shape == (64, 64, 3)
    difference = np.abs(device.astype(int) - pixels.astype(int))
    # Pillow decodes large JPEGs at a reduced DCT scale first and resizes differently: grey levels apart, not more.
    assert difference.mean() < 3 and np.percentile(difference, 99) < 16
    if resize == "pad":
        content_h, content_w = record["content"]
        assert np.array_equal(device[content_h:], pixels[content_h:]) and np.array_equal(
            device[:, content_w:], pixels[:, content_w:]
        )


def test_other_images_are_decoded_by_the_workers_as_before():
    for data in (image_bytes(80, 90, "PNG"), image_bytes(80, 90, "JPEG", mode="CMYK"), image_bytes(80, 90, "WEBP")):
        left, record = prepare_leaving_jpeg(data, PREP)
        pixels, cpu_record = prepare(data, PREP)
        assert isinstance(left, np.ndarray) and np.array_equal(left, pixels) and record == cpu_record
    with pytest.raises(ImageRejected, match="smaller than one 16x16 patch"):
        prepare_leaving_jpeg(smooth_jpeg(10, 90), PREP)  # header checks still apply to JPEGs left encoded


def test_a_jpeg_the_device_refuses_is_decoded_on_the_cpu_or_fails_alone():
    good = smooth_jpeg(80, 90)
    cut = good[: len(good) // 2]  # the header is intact, the scan data is not
    calls = []

    def cpu(data):
        calls.append(data)
        return prepare(data, PREP)

    decoder = DeviceDecoder("cpu", PREP, cpu)
    items = [prepare_leaving_jpeg(d, PREP)[0] for d in (good, cut, good)]
    out = decoder(items)
    assert isinstance(out[0], np.ndarray) and isinstance(out[2], np.ndarray) and np.array_equal(out[0], out[2])
    assert isinstance(out[1], ImageRejected) and "truncated" in str(out[1]) and calls == [cut] and decoder.fell_back == 1


def test_embed_with_device_decode_accounts_for_every_input_and_matches_the_cpu_path(tmp_path):
    encoder = write_encoder_file(tmp_path / "enc.safetensors")
    jpeg = smooth_jpeg(100, 140, seed=1)
    samples = [
        ("a", {"jpg": jpeg, "cls": b"1"}),
        ("rotated", {"jpg": smooth_jpeg(120, 90, orientation=6, seed=2)}),
        ("png", {"png": image_bytes(70, 80, "PNG")}),
        ("cut", {"jpg": jpeg[: len(jpeg) // 2]}),
        ("gray", {"jpg": smooth_jpeg(90, 90, mode="L", seed=3)}),
        ("notjpeg", {"jpg": b"\xff\xd8\xff\xe0 nothing more"}),
    ]
    write_shard(tmp_path / "in" / "part-0.tar", samples)
    runs = {}
    for decode in ("cpu", "gpu"):
        summary = embed_shards(
            str(tmp_path / "in" / "part-0.tar"),
            tmp_path / decode,
            encoder,
            backend="torch-cpu",
            batch_size=4,
            workers=1,
            decode=decode,
            dtype="float32",
        )
        assert (summary.embedded, summary.failed) == (4, 2)
        runs[decode] = read_output(tmp_path / decode / "part-0.tar")
        done = json.loads((tmp_path / decode / "part-0.json").read_text())
        assert sorted(f["key"] for f in done["failures"]) == ["cut", "notjpeg"]
    assert list(runs["gpu"]) == list(runs["cpu"]) == ["a", "rotated", "png", "gray"]
    for key in runs["cpu"]:
        cpu, gpu = (np.load(io.BytesIO(runs[d][key]["emb.npy"])) for d in ("cpu", "gpu"))
        cosine = (cpu * gpu).sum(-1) / np.linalg.norm(cpu, axis=-1) / np.linalg.norm(gpu, axis=-1)
        assert cosine.min() > 0.98, (key, cosine.min())
        assert runs["gpu"][key]["json"] == runs["cpu"][key]["json"]
        # JPEGs went through the device's decoder and resize (a few grey levels apart); the PNG through the workers
        assert np.array_equal(cpu, gpu) == (key == "png"), key
    assert runs["gpu"]["a"]["in.cls"] == b"1"
    # Outputs decoded one way are not silently mixed with the other's.
    with pytest.raises(OutputDirError, match="decode"):
        embed_shards(str(tmp_path / "in" / "part-0.tar"), tmp_path / "gpu", encoder, backend="torch-cpu", workers=0)


def test_device_decode_needs_the_pytorch_backend_on_a_gpu(tmp_path):
    encoder = write_encoder_file(tmp_path / "enc.safetensors")
    write_shard(tmp_path / "in" / "part-0.tar", [("a", {"jpg": smooth_jpeg(80, 80)})])
    result = CliRunner().invoke(
        app, ["embed", str(tmp_path / "in" / "part-0.tar"), str(tmp_path / "out"), "--model", str(encoder), "--decode", "gpu"]
    )
    assert result.exit_code == 2 and "--decode gpu decodes on the GPU that runs the model" in result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="--engine local"):
        EmbedOptions(decode="gpu", engine="ray")
    with pytest.raises(ValueError, match="unknown decode"):
        EmbedOptions(decode="nvjpeg")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG decode)")
def test_nvjpeg_decode_and_resize_match_the_cpu_path(tmp_path):
    items = [
        smooth_jpeg(h, w, o, seed=i) for i, (h, w, o) in enumerate([(90, 130, 1), (130, 90, 6), (480, 640, 1), (75, 200, 8)])
    ]
    fallbacks = []
    decoded = DeviceDecoder("cuda", PREP, fallbacks.append)([prepare_leaving_jpeg(d, PREP)[0] for d in items])
    assert not fallbacks
    for data, pixels in zip(items, decoded, strict=True):
        difference = np.abs(pixels.astype(int) - prepare(data, PREP)[0].astype(int))
        assert difference.mean() < 3 and np.percentile(difference, 99) < 16
    encoder = write_encoder_file(tmp_path / "enc.safetensors")
    write_shard(tmp_path / "in" / "part-0.tar", [(f"k{i}", {"jpg": d}) for i, d in enumerate(items)])
    summary = embed_shards(
        str(tmp_path / "in" / "part-0.tar"), tmp_path / "out", encoder, backend="torch-cuda", workers=1, decode="gpu"
    )
    assert (summary.embedded, summary.failed) == (4, 0)
