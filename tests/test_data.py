"""Packing image folders into shards, and the training pipeline that reads them."""

import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from pretrain_fixtures import make_images, png_bytes, write_shard

from dmt_jepa.config import DataConfig, MaskConfig
from dmt_jepa.data import DataError, expand_shards, micro_batches, pack_images
from dmt_jepa.data.device import Normaliser, decode_on_device
from dmt_jepa.data.pipeline import Augment, ShardStream, StreamSpec, crop_box


def _spec(urls, **kw) -> StreamSpec:
    base = dict(
        urls=urls,
        cfg=DataConfig(shuffle_buffer=6, num_workers=0),
        mask_cfg=MaskConfig(min_keep=2),
        img_size=(64, 64),
        grid=(4, 4),
        batch_size=3,
        seed=0,
        epoch=0,
        rank=0,
        world_size=1,
        batches_per_epoch=8,
    )
    base.update(kw)
    return StreamSpec(**base)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data")
    make_images(root / "images", 30, classes=3)
    pack_images(root / "images", root / "shards", max_shard_count=6)
    return str(root / "shards" / "shard-{000000..000004}.tar")


def test_pack_keeps_every_image_in_sorted_order_with_labels(tmp_path):
    paths = make_images(tmp_path / "images", 10, classes=2)
    (tmp_path / "images" / "class0" / "broken.png").write_bytes(b"not an image")
    summary = pack_images(tmp_path / "images", tmp_path / "out", max_shard_count=4)
    assert summary.images == 10 and summary.classes == ["class0", "class1"]
    assert [rel for rel, _ in summary.skipped] == ["class0/broken.png"]
    assert [Path(s).name for s in summary.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    records = []
    for shard in summary.shards:
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({name.split(".")[0] for name in members}):
            meta = json.loads(members[f"{key}.json"])
            image = next(v for k, v in members.items() if k.startswith(key) and k.split(".", 1)[1] in ("png", "jpg", "webp"))
            records.append((meta["source"], int(members[f"{key}.cls"]), image))
    expected = sorted(paths, key=lambda p: str(p.relative_to(tmp_path / "images")))
    assert [r[0] for r in records] == [str(p.relative_to(tmp_path / "images")) for p in expected]
    assert [r[1] for r in records] == [int(p.parent.name[-1]) for p in expected]
    assert all(r[2] == p.read_bytes() for r, p in zip(records, expected))


def test_pack_refuses_to_overwrite_shards(tmp_path):
    make_images(tmp_path / "images", 3)
    pack_images(tmp_path / "images", tmp_path / "out")
    before = (tmp_path / "out" / "shard-000000.tar").read_bytes()
    make_images(tmp_path / "images", 5, seed=1)
    with pytest.raises(DataError, match="already holds shards"):
        pack_images(tmp_path / "images", tmp_path / "out")
    assert (tmp_path / "out" / "shard-000000.tar").read_bytes() == before


def test_shard_pattern_matching_nothing_is_one_sentence(tmp_path):
    with pytest.raises(DataError, match="matches no file") as err:
        expand_shards(str(tmp_path / "nothing-{000..009}.tar"))
    assert str(err.value).count(". ") == 0
    write_shard(tmp_path / "s-000.tar", [{"__key__": "a", "png": png_bytes(np.zeros((8, 8, 3), np.uint8))}])
    with pytest.raises(DataError, match="1 of the 2 shards"):
        expand_shards(str(tmp_path / "s-{000..001}.tar"))
    assert expand_shards(str(tmp_path / "s-{000..000}.tar")) == [str(tmp_path / "s-000.tar")]


def test_crop_box_respects_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(500):
        width, height = rng.randint(20, 300), rng.randint(20, 300)
        left, top, w, h = crop_box(width, height, (0.3, 1.0), (0.75, 4 / 3), rng)
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        # rounding to whole pixels moves area and aspect by at most a pixel per side
        assert (w - 1) / (h + 1) <= 4 / 3 and (w + 1) / (h - 1) >= 0.75
        fallback = (w == width or h == height) and left == (width - w) // 2 and top == (height - h) // 2
        assert (w + 1) * (h + 1) >= 0.3 * width * height or fallback


def test_augment_normalises_with_mean_and_std():
    cfg = DataConfig()
    pixels = Augment(cfg, (32, 48))(png_bytes(np.full((30, 50, 3), (255, 128, 0), np.uint8)), random.Random(0))
    assert pixels.shape == (3, 32, 48) and pixels.dtype == torch.uint8
    out = Normaliser(cfg, torch.device("cpu"))(pixels[None])[0]
    expected = [(c / 255 - m) / s for c, m, s in zip((255, 128, 0), cfg.pixel_mean, cfg.pixel_std)]
    torch.testing.assert_close(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5, rtol=0)


def test_reduced_jpeg_decode_matches_a_full_decode():
    import io

    from PIL import Image

    yy, xx = np.mgrid[0:600, 0:800]
    photo = np.stack([xx * 255 // 800, yy * 255 // 600, (xx + yy) * 255 // 1400], axis=-1).astype(np.uint8)
    photo[200:400, 300:500] = (20, 200, 60)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=95)
    cfg = DataConfig()
    for seed in range(5):
        out = Normaliser(cfg, torch.device("cpu"))(Augment(cfg, (32, 32))(buf.getvalue(), random.Random(seed))[None])[0]
        # reference: full decode, the same crop box (same draws), resize, normalise
        left, top, w, h = crop_box(800, 600, cfg.crop_scale, cfg.crop_ratio, random.Random(seed))
        full = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        ref = np.asarray(full.resize((32, 32), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)), np.float32) / 255
        ref = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(cfg.pixel_mean)[:, None, None]) / torch.tensor(
            cfg.pixel_std
        )[:, None, None]
        assert (out - ref).abs().mean() < 0.05 and (out - ref).abs().max() < 1.0


def test_same_spec_gives_same_batches_and_other_seed_does_not(shards):
    urls = expand_shards(shards)
    a, b = list(micro_batches(_spec(urls), 0)), list(micro_batches(_spec(urls), 0))
    c = list(micro_batches(_spec(urls, seed=1), 0))
    assert len(a) == 8 and a[0]["images"].shape == (3, 3, 64, 64)
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["target_idx"], y["target_idx"])
    assert not torch.equal(a[0]["images"], c[0]["images"])


def test_resumed_stream_continues_exactly_with_workers(shards):
    urls = expand_shards(shards)
    full = list(micro_batches(_spec(urls), 2))
    assert [b["stream"] for b in full] == [0, 1] * 4
    # Interrupt after 3 micro-batches: each stream's last emitted count is the saved position.
    emitted = [0, 0]
    for batch in full[:3]:
        emitted[batch["stream"]] = batch["emitted"]
    resumed = list(micro_batches(_spec(urls, start_batch=3, emitted=tuple(emitted)), 2))
    assert [b["index"] for b in resumed] == list(range(3, 8))
    for x, y in zip(full[3:], resumed):
        assert torch.equal(x["images"], y["images"])
        assert torch.equal(x["context_idx"], y["context_idx"]) and torch.equal(x["target_idx"], y["target_idx"])


@pytest.mark.parametrize("workers", [2, 3])
def test_one_loader_serves_every_epoch_as_loaders_per_epoch_would(shards, workers):
    # 5 micro-batches an epoch: not a multiple of the workers, so the stream each worker plays rotates.
    urls = expand_shards(shards)
    spec = dict(batches_per_epoch=5)
    per_epoch = [b for e in range(3) for b in micro_batches(_spec(urls, epoch=e, **spec), workers)]
    spanning = list(micro_batches(_spec(urls, epochs=3, **spec), workers))
    assert [(b["epoch"], b["index"]) for b in spanning] == [(e, i) for e in range(3) for i in range(5)]
    assert [b["stream"] for b in spanning] == [i % workers for _ in range(3) for i in range(5)]
    for x, y in zip(per_epoch, spanning, strict=True):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["target_idx"], y["target_idx"])
        assert (x["epoch"], x["index"], x["stream"], x["emitted"]) == (y["epoch"], y["index"], y["stream"], y["emitted"])
    # Resumed 3 micro-batches into epoch 1, one loader serves the rest of epoch 1 and epoch 2 unchanged.
    emitted = [0] * workers
    for batch in spanning[5:8]:
        emitted[batch["stream"]] = batch["emitted"]
    resumed = list(micro_batches(_spec(urls, epoch=1, epochs=3, start_batch=3, emitted=tuple(emitted), **spec), workers))
    assert len(resumed) == len(spanning[8:])
    for x, y in zip(spanning[8:], resumed):
        assert (x["epoch"], x["index"]) == (y["epoch"], y["index"]) and torch.equal(x["images"], y["images"])


def test_ranks_and_workers_split_the_shards(shards):
    urls = expand_shards(shards)
    first_pass = []
    for rank in range(2):
        stream = ShardStream(_spec(urls, rank=rank, world_size=2), num_streams=2)
        for s in range(2):
            first_pass += stream._my_shards(s, 0) if len(urls) > rank * 2 + s else []
    assert sorted(first_pass) == sorted(urls)


def test_corrupt_image_in_shard_is_a_counted_skip(tmp_path):
    rng = np.random.default_rng(0)
    samples = [{"__key__": f"{i:03d}", "png": png_bytes(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))} for i in range(9)]
    samples.insert(4, {"__key__": "bad", "jpg": b"\xff\xd8 this is not a jpeg"})
    write_shard(tmp_path / "s-000.tar", samples)
    spec = _spec([str(tmp_path / "s-000.tar")], cfg=DataConfig(shuffle_buffer=1, num_workers=0), batches_per_epoch=3)
    batches = list(micro_batches(spec, 0))
    assert all(b["images"].shape[0] == 3 for b in batches)
    assert batches[-1]["emitted"] == 10 and batches[-1]["skipped"] == 1


def test_truncated_shard_is_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    good = [{"__key__": f"{i:03d}", "png": png_bytes(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))} for i in range(6)]
    write_shard(tmp_path / "s-000.tar", good)
    write_shard(tmp_path / "s-001.tar", good)
    data = (tmp_path / "s-001.tar").read_bytes()
    (tmp_path / "s-001.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    spec = _spec([str(tmp_path / "s-000.tar"), str(tmp_path / "s-001.tar")], batches_per_epoch=6)
    batches = list(micro_batches(spec, 0))
    assert len(batches) == 6 and batches[-1]["skipped"] >= 1


@pytest.mark.parametrize("workers", [0, 1])
def test_shards_without_images_are_one_sentence_not_a_hang(tmp_path, workers):
    write_shard(tmp_path / "text.tar", [{"__key__": f"{i:03d}", "txt": b"no image here"} for i in range(5)])
    (tmp_path / "notatar.tar").write_bytes(b"this is not a tar file at all" * 20)
    for url, message in [("text.tar", "samples in a row had no decodable image"), ("notatar.tar", "holds a sample")]:
        spec = _spec([str(tmp_path / url)], batches_per_epoch=2)
        with pytest.raises(DataError, match=message) as err:
            list(micro_batches(spec, workers))
        assert "\n" not in str(err.value)


def test_device_normalisation_gives_the_former_worker_values_bit_for_bit():
    cfg = DataConfig(pixel_mean=(0.5, 0.4, 0.3), pixel_std=(0.2, 0.25, 0.3))
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    # the former worker code: numpy fp32, mean and 1/std scaled to 0-255
    mean = np.asarray(cfg.pixel_mean, dtype=np.float32) * 255.0
    scale = 1.0 / (np.asarray(cfg.pixel_std, dtype=np.float32) * 255.0)
    ref = (pixels.permute(0, 2, 3, 1).numpy().astype(np.float32) - mean) * scale
    out = Normaliser(cfg, torch.device("cpu"))(pixels)
    assert torch.equal(out, torch.from_numpy(ref).permute(0, 3, 1, 2))


def _photo_shards(root: Path) -> str:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:120]
    samples = []
    for i in range(12):
        photo = np.stack([xx * 2 + i * 9, yy * 2, (xx + yy + i * 20)], -1).astype(np.uint8)
        photo[20:50, 30:70] = rng.integers(0, 256, 3)
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, format="JPEG" if i % 3 else "PNG", quality=95)
        samples.append({"__key__": f"{i:04d}", "jpg" if i % 3 else "png": buf.getvalue()})
    root.mkdir()
    write_shard(root / "photos.tar", samples)
    return str(root / "photos.tar")


def test_device_decode_path_gives_the_cpu_paths_crops(tmp_path):
    """data.decode=gpu ships JPEG bytes and crop boxes; decoded by torchvision (here on the CPU, on
    a GPU by nvJPEG) the batches match the workers' own decode: same masks, same crops, PNGs
    identical, JPEG pixels within resize-filter differences."""
    urls = expand_shards(_photo_shards(tmp_path / "shards"))
    on_cpu = list(micro_batches(_spec(urls, batches_per_epoch=3), 0))
    later = list(
        micro_batches(_spec(urls, batches_per_epoch=3, cfg=DataConfig(shuffle_buffer=6, num_workers=0, decode="gpu")), 0)
    )
    encoded_rows = 0
    for a, b in zip(on_cpu, later):
        assert torch.equal(a["context_idx"], b["context_idx"]) and torch.equal(a["target_idx"], b["target_idx"])
        assert a["encoded"] == []
        rows = {row for row, _, _ in b["encoded"]}
        encoded_rows += len(rows)
        images = decode_on_device(b, torch.device("cpu"))
        assert images.dtype == torch.uint8 and images.shape == a["images"].shape
        for row in range(len(images)):
            if row in rows:
                diff = (images[row].float() - a["images"][row].float()).abs()
                assert diff.mean() < 6 and diff.max() < 80
            else:
                assert torch.equal(images[row], a["images"][row])
    assert 0 < encoded_rows < sum(len(a["images"]) for a in on_cpu)


def test_device_decode_of_a_corrupt_jpeg_is_one_sentence():
    batch = {
        "images": torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
        "encoded": [(0, torch.tensor([0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3], dtype=torch.uint8), (0, 0, 4, 4))],
    }
    with pytest.raises(DataError, match=r"cannot be decoded on the device .*data.decode=cpu") as err:
        decode_on_device(batch, torch.device("cpu"))
    assert "\n" not in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG decode)")
def test_nvjpeg_decode_matches_the_cpu_decode(tmp_path):
    urls = expand_shards(_photo_shards(tmp_path / "shards"))
    spec = _spec(urls, batches_per_epoch=2, cfg=DataConfig(shuffle_buffer=6, num_workers=0, decode="gpu"))
    for batch in micro_batches(spec, 0):
        on_gpu = decode_on_device(batch, torch.device("cuda")).cpu()
        on_cpu = decode_on_device(batch, torch.device("cpu"))
        assert (on_gpu.float() - on_cpu.float()).abs().mean() < 3


def test_decode_setting_is_checked_before_a_run_starts(shards, tmp_path):
    from pretrain_fixtures import tiny_overrides

    from dmt_jepa.config import ConfigError, load_config
    from dmt_jepa.train import pretrain

    with pytest.raises(ConfigError, match="data.decode must be cpu or gpu"):
        load_config(None, tiny_overrides(shards, tmp_path / "a", "data.decode=nvjpeg"))
    with pytest.raises(ConfigError, match="data.decode=gpu decodes on the GPU but this run has none"):
        pretrain(load_config(None, tiny_overrides(shards, tmp_path / "b", "data.decode=gpu", "run.device=cpu")))
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_device_decode_trusts_the_bytes_not_the_member_name(tmp_path):
    """A `.jpg` member that holds a PNG is decoded by the worker; only real JPEGs are left encoded."""
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    write_shard(tmp_path / "lying.tar", [{"__key__": f"{i:03d}", "jpg": png_bytes(pixels)} for i in range(6)])
    spec = _spec(
        [str(tmp_path / "lying.tar")], batches_per_epoch=2, cfg=DataConfig(shuffle_buffer=2, num_workers=0, decode="gpu")
    )
    for batch in micro_batches(spec, 0):
        assert batch["encoded"] == [] and batch["images"].dtype == torch.uint8
        assert batch["images"].float().std() > 10  # decoded pixels, not the zeros left for the device


def test_a_loader_with_workers_leaves_the_sigchld_handler_it_found(shards):
    """torch's worker-watching SIGCHLD handler is in place while the loader runs and gone once it is done or closed."""
    import signal

    urls = expand_shards(shards)
    before = signal.getsignal(signal.SIGCHLD)
    during = [signal.getsignal(signal.SIGCHLD) for _ in micro_batches(_spec(urls), 2)]
    assert len(during) == 8 and all(handler is not before and callable(handler) for handler in during)
    assert signal.getsignal(signal.SIGCHLD) is before
    stream = micro_batches(_spec(urls), 2)
    next(stream)
    assert signal.getsignal(signal.SIGCHLD) is not before  # a second loader installs it again
    stream.close()  # a run stopped early
    assert signal.getsignal(signal.SIGCHLD) is before
