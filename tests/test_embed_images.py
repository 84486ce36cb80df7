"""Decoding and the resize policy, each against a reference built by hand with Pillow and numpy."""

import io

import numpy as np
import pytest
from embed_helpers import huge_png_header
from PIL import Image

from dmt_jepa.serve.images import ImageRejected, Preprocess, normalise, prepare, prepare_array

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def prep(size=(32, 32), resize="crop", **kw):
    return Preprocess(size=size, patch_size=16, pixel_mean=MEAN, pixel_std=STD, resize=resize, **kw)


def encode(image: Image.Image, fmt="PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def random_rgb(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def by_hand(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> normalised [3, H, W], written out per channel."""
    out = np.empty((3, *pixels.shape[:2]), np.float32)
    for c in range(3):
        out[c] = (pixels[..., c] / 255.0 - MEAN[c]) / STD[c]
    return out


def test_crop_policy_matches_hand_computation():
    image = random_rgb(50, 100)  # H=50, W=100: shorter side 50 -> 32, so 64 wide, crop 16 off each side
    x, record = prepare(encode(image), prep())
    np.testing.assert_array_equal(x, np.asarray(image.resize((64, 32), Image.Resampling.BICUBIC))[:, 16:48])
    assert record == {"original_size": [50, 100], "input_size": [32, 32], "grid": [2, 2], "resize": "crop"}


def test_pad_policy_keeps_whole_image_top_left():
    image = random_rgb(50, 100)  # fits as 16 x 32
    x, record = prepare(encode(image), prep(resize="pad"))
    np.testing.assert_array_equal(x[:16], np.asarray(image.resize((32, 16), Image.Resampling.BICUBIC)))
    assert (x[16:] == [124, 116, 104]).all()  # the pixel mean in 8 bits
    np.testing.assert_allclose(normalise(x[16:], MEAN, STD), 0, atol=0.01)  # about zero for the model
    assert record["content"] == [16, 32] and record["original_size"] == [50, 100]


def test_normalise_matches_hand_formula_for_batches():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    x = normalise(pixels, MEAN, STD)
    assert x.dtype == np.float32 and x.shape == (2, 3, 5, 7)
    for i in range(2):
        np.testing.assert_allclose(x[i], by_hand(pixels[i]), atol=1e-6)


def test_non_square_target_size():
    x, record = prepare(encode(random_rgb(90, 70)), prep(size=(48, 80)))
    assert x.shape == (48, 80, 3) and x.dtype == np.uint8 and record["grid"] == [3, 5]


def test_exif_orientation_is_applied():
    upright = random_rgb(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    x, record = prepare(encode(stored, exif=exif.tobytes()), prep())
    np.testing.assert_array_equal(x, prepare(encode(upright), prep())[0])
    assert record["original_size"] == [60, 40]


def test_colour_modes_become_rgb():
    rgb = random_rgb(40, 40)
    gray = rgb.convert("L")
    reference_gray = prepare(encode(gray.convert("RGB")), prep())[0]
    np.testing.assert_array_equal(prepare(encode(gray), prep())[0], reference_gray)
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.full((40, 40), 7, np.uint8)))
    np.testing.assert_array_equal(prepare(encode(rgba), prep())[0], prepare(encode(rgb), prep())[0])
    sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)  # I;16 with the same levels
    np.testing.assert_array_equal(prepare(encode(sixteen), prep())[0], reference_gray)
    cmyk = prepare(encode(rgb.convert("CMYK"), "JPEG", quality=95), prep())[0]
    assert cmyk.shape == (32, 32, 3)
    palette = rgb.convert("P")
    np.testing.assert_array_equal(prepare(encode(palette), prep())[0], prepare(encode(palette.convert("RGB")), prep())[0])


def test_large_jpeg_decoded_at_reduced_scale_is_close_to_full_decode():
    image = Image.fromarray(
        np.kron(np.random.default_rng(0).integers(0, 256, (30, 40, 3)), np.ones((32, 32, 1))).astype(np.uint8)
    )
    data = encode(image, "JPEG", quality=95)  # 960 x 1280: DCT scaling kicks in
    fast, record = prepare(data, prep(size=(64, 64)))
    full = Image.open(io.BytesIO(data)).convert("RGB")
    slow = prepare_array(np.asarray(full), prep(size=(64, 64)))[0]
    assert record["original_size"] == [960, 1280]
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 3  # grey levels


@pytest.mark.parametrize(
    "data, options, words",
    [
        (b"", {}, "empty"),
        (b"GIF89a but not really an image at all", {}, "cannot decode"),
        (b"\x00\x01" * 500, {}, "cannot decode"),
        (encode(random_rgb(64, 64))[:300], {}, "cannot decode"),
        (encode(random_rgb(64, 64), "JPEG")[:400], {}, "cannot decode"),
        (huge_png_header(100_000, 100_000), {}, "decompression bomb"),
        (huge_png_header(5_000, 5_000), {"max_pixels": 1_000_000}, "decompression bomb"),
        (encode(random_rgb(10, 200)), {}, "smaller than one 16x16 patch"),
    ],
    ids=["empty", "text", "noise", "truncated-png", "truncated-jpeg", "bomb", "over-limit", "too-small"],
)
def test_bad_images_are_rejected_with_reason(data, options, words):
    with pytest.raises(ImageRejected, match=words):
        prepare(data, prep(**options))


def test_arrays_match_encoded_images():
    image = random_rgb(45, 70)
    x, record = prepare_array(np.asarray(image), prep())
    np.testing.assert_array_equal(x, prepare(encode(image), prep())[0])
    assert record["original_size"] == [45, 70]
    with pytest.raises(ImageRejected, match="uint8"):
        prepare_array(np.zeros((40, 40, 3), np.float32), prep())


def test_max_pixels_really_raises_pillows_own_limit():
    declared = huge_png_header(20_000, 10_000)  # 200 M pixels, above Pillow's own limit of 178,956,970
    with pytest.raises(ImageRejected, match="decompression bomb"):
        prepare(declared, prep())
    with pytest.raises(ImageRejected, match="limit of 150000000 pixels"):
        prepare(declared, prep(max_pixels=150_000_000))
    with pytest.raises(ImageRejected) as err:  # past every size check: only its missing pixel data stops it
        prepare(declared, prep(max_pixels=300_000_000))
    assert "truncated" in str(err.value) and "bomb" not in str(err.value)


def test_failure_reasons_carry_no_object_addresses():
    with pytest.raises(ImageRejected) as err:
        prepare(b"a caption, not an image", prep())
    assert "cannot identify image file" in str(err.value) and " at 0x" not in str(err.value)


def test_extreme_aspect_ratio_crop_resamples_only_what_it_keeps():
    ramp = np.linspace(0, 255, 4000)  # smooth, so that the two resampling orders agree closely
    pixels = np.stack([np.tile(ramp, (20, 1)), np.tile(ramp[::-1], (20, 1)), np.full((20, 4000), 90.0)], axis=-1)
    image = Image.fromarray(pixels.astype(np.uint8))  # 20 x 4000: scaled whole, 32 x 6400 (200 x the target)
    x, record = prepare(encode(image), prep())
    want = np.asarray(image.resize((6400, 32), Image.Resampling.BICUBIC))[:, 3184:3216]
    assert x.shape == (32, 32, 3) and record["original_size"] == [20, 4000]
    assert np.abs(x.astype(int) - want.astype(int)).max() <= 2
