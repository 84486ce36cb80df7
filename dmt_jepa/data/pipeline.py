"""Training input: shard patterns -> resampled, shuffled, decoded, cropped uint8 micro-batches with masks.

Every random choice is drawn from generators seeded by (seed, epoch, rank, stream), so the data
order is a pure function of the config. A stream's position is the number of samples it has
emitted from its shuffle buffer; resuming replays the stream up to that point reading only tar
bytes (no decoding), which makes a resumed run see exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import io
import logging
import math
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dmt_jepa.config import DataConfig, MaskConfig
from dmt_jepa.data.shards import DataError, expand_shards  # noqa: F401  (expand_shards: train imports it from here)
from dmt_jepa.masks import MultiBlockMaskSampler

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MAX_FAILED_IN_A_ROW = 100  # beyond this the shards are not image shards, not a few corrupt files


def crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random):
    """RandomResizedCrop's box (left, top, w, h): area fraction in `scale`, aspect w/h log-uniform in `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # No draw fitted (extreme aspect): the largest centred box with an aspect inside `ratio`.
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
    w, h = min(w, width), min(h, height)
    return (width - w) // 2, (height - h) // 2, w, h


def image_bytes(sample: dict) -> bytes:
    """The encoded image of a WebDataset sample (JPEG, PNG or WebP); raises ValueError if there is none."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError(f"no image entry ({', '.join(IMAGE_KEYS)}) among {sorted(k for k in sample if not k.startswith('_'))}")
    return sample[key]


class Augment:
    """Decode and RandomResizedCrop to the training size: encoded image -> [3, H, W] uint8.

    A JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still leaves the crop at
    least as large as the output, so large photos cost a fraction of a full decode; the crop
    box is drawn on the full-size image either way, so the draws do not depend on it.
    Normalisation happens on the device (dmt_jepa.data.device). With `decode_jpeg_later`, a JPEG
    is only opened for its size and returned as (encoded bytes, crop box) for the device to decode.
    """

    def __init__(self, cfg: DataConfig, img_size: tuple[int, int], *, decode_jpeg_later: bool = False):
        self.cfg = cfg
        self.height, self.width = img_size
        self.decode_jpeg_later = decode_jpeg_later

    def __call__(self, data: bytes, rng: random.Random):
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            left, top, w, h = crop_box(width, height, self.cfg.crop_scale, self.cfg.crop_ratio, rng)
            if image.format == "JPEG" and self.decode_jpeg_later:
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), (left, top, w, h)
            if image.format == "JPEG":
                image.draft("RGB", (math.ceil(width * self.width / w), math.ceil(height * self.height / h)))
            sx, sy = image.size[0] / width, image.size[1] / height  # 1, or the DCT scale draft chose
            box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
            rgb = image.convert("RGB").resize((self.width, self.height), Image.Resampling.BICUBIC, box=box)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1)))  # [3, H, W] uint8


def hash_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (stable across processes and runs)."""
    return random.Random("/".join(str(p) for p in parts)).getrandbits(63)


@dataclass
class StreamSpec:
    """Everything that determines the data of a run's epochs on one rank (one loader serves them all)."""

    urls: list[str]
    cfg: DataConfig
    mask_cfg: MaskConfig
    img_size: tuple[int, int]
    grid: tuple[int, int]
    batch_size: int  # per micro-batch on this rank
    seed: int
    epoch: int
    rank: int
    world_size: int
    batches_per_epoch: int  # micro-batches this rank takes this epoch
    start_batch: int = 0  # micro-batches already consumed in `epoch` (resume)
    emitted: tuple[int, ...] = ()  # per stream: samples already emitted in `epoch` (resume)
    epochs: int | None = None  # serve epochs `epoch` .. epochs - 1 (None: `epoch` alone)

    @property
    def end_epoch(self) -> int:
        return self.epoch + 1 if self.epochs is None else self.epochs


class ShardStream(IterableDataset):
    """One rank's micro-batches, epoch after epoch; DataLoader workers each play one stream an epoch.

    Micro-batch i of an epoch comes from stream i mod W (W streams), whatever loader serves it,
    so a run's data does not depend on where it was resumed. DataLoader fetches round-robin
    over its W workers for as long as it lives: the loader's g-th micro-batch comes from worker
    g mod W. So in each epoch worker w plays the stream whose batches land on it, (w + start_batch
    - batches served in earlier epochs) mod W, and the workers live for the whole run instead of
    being started again every epoch.
    """

    def __init__(self, spec: StreamSpec, num_streams: int):
        self.spec = spec
        self.num_streams = num_streams

    def _my_shards(self, stream: int, epoch: int) -> list[str]:
        """This stream's share of the shards for the epoch (all of them if there are fewer than streams)."""
        spec = self.spec
        order = list(spec.urls)
        random.Random(f"shards/{spec.seed}/{epoch}").shuffle(order)  # same on every rank
        slot, slots = spec.rank * self.num_streams + stream, spec.world_size * self.num_streams
        return order[slot::slots] or order

    def _raw_samples(self, stream: int, epoch: int, rng: random.Random, counters: dict) -> Iterator[dict]:
        """Samples of this stream's shards, reshuffled on every pass, endlessly (resampling to the epoch length)."""

        def on_error(err: Exception) -> bool:
            counters["skipped"] += 1
            log.warning("skipped the rest of an unreadable shard (%s)", err)
            return True

        mine = self._my_shards(stream, epoch)
        while True:
            rng.shuffle(mine)
            found = 0
            for url in mine:
                for sample in wds.tarfile_samples([{"url": url}], handler=on_error):
                    found += 1
                    yield sample
            if not found:
                raise DataError(
                    f"none of the {len(mine)} shards {mine[0]}, ... holds a sample; check that they are WebDataset tar files."
                )

    def _shuffled(self, stream: int, epoch: int, counters: dict) -> Iterator[dict]:
        """Raw samples through a seeded shuffle buffer."""
        spec = self.spec
        rng = random.Random(f"stream/{spec.seed}/{epoch}/{spec.rank}/{stream}")
        buffer: list[dict] = []
        for sample in self._raw_samples(stream, epoch, rng, counters):
            if len(buffer) < max(spec.cfg.shuffle_buffer, 1):
                buffer.append(sample)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], sample = sample, buffer[j]
            yield sample

    def __iter__(self) -> Iterator[dict]:
        spec = self.spec
        info = get_worker_info()
        worker = info.id if info is not None else 0
        assert (info.num_workers if info is not None else 1) == self.num_streams
        augment = Augment(spec.cfg, spec.img_size, decode_jpeg_later=spec.cfg.decode == "gpu")
        sampler = MultiBlockMaskSampler(spec.grid, spec.mask_cfg)
        served = -spec.start_batch  # the loader's micro-batches before this epoch's first, less those resumed past
        for epoch in range(spec.epoch, spec.end_epoch):
            start = spec.start_batch if epoch == spec.epoch else 0
            stream = (worker - served) % self.num_streams
            emitted = spec.emitted[stream] if spec.emitted and epoch == spec.epoch else 0
            yield from self._epoch(epoch, stream, start, emitted, augment, sampler)
            served += spec.batches_per_epoch

    def _epoch(self, epoch: int, stream: int, start: int, emitted: int, augment, sampler) -> Iterator[dict]:
        """The micro-batches `stream` serves in `epoch` from micro-batch `start` on, `emitted` samples in."""
        spec = self.spec
        # Micro-batches of the epoch this stream serves, from where the epoch resumes.
        mine = [i for i in range(start, spec.batches_per_epoch) if i % self.num_streams == stream]
        if not mine:
            return
        counters = {"skipped": 0}
        failed_in_a_row = 0
        samples = self._shuffled(stream, epoch, counters)
        for _ in range(emitted):  # replay without decoding
            next(samples)
        counters["skipped"] = 0  # what the replay met was counted before the checkpoint
        for index in mine:
            images: list[torch.Tensor] = []
            encoded: list[tuple] = []  # (index in the batch, JPEG bytes, crop box)
            while len(images) < spec.batch_size:
                sample = next(samples)
                emitted += 1
                rng = random.Random(f"crop/{spec.seed}/{epoch}/{spec.rank}/{stream}/{emitted}")
                try:
                    image = augment(image_bytes(sample), rng)
                except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                    counters["skipped"] += 1
                    failed_in_a_row += 1
                    log.warning("skipped undecodable sample %s in %s (%s)", sample.get("__key__"), sample.get("__url__"), err)
                    if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                        raise DataError(
                            f"{failed_in_a_row} samples in a row had no decodable image (the last: "
                            f"{sample.get('__key__')} in {sample.get('__url__')}); check that the shards hold "
                            "JPEG, PNG or WebP images."
                        ) from err
                    continue
                failed_in_a_row = 0
                if isinstance(image, tuple):  # a JPEG left for the device: (bytes, crop box)
                    encoded.append((len(images), *image))
                    image = torch.zeros(3, *spec.img_size, dtype=torch.uint8)
                images.append(image)
            step = epoch * spec.batches_per_epoch + index
            generator = torch.Generator().manual_seed(hash_seed(spec.seed, spec.rank, step))
            masks = sampler(spec.batch_size, generator)
            yield {
                "images": torch.stack(images),  # [B, 3, H, W] uint8
                "encoded": encoded,  # (row, JPEG bytes, crop box) for the device to decode; empty on the CPU path
                "context_idx": masks.context_idx,  # [B, Nc]
                "target_idx": masks.target_idx,  # [B, M, T]
                "epoch": epoch,
                "index": index,
                "stream": stream,
                "emitted": emitted,
                "skipped": counters["skipped"],
            }


@contextmanager
def child_signal_restored() -> Iterator[None]:
    """Leave the process's SIGCHLD handling as it was once a DataLoader is done.

    A loader with workers installs a Python SIGCHLD handler (it watches for a dead worker) and keeps
    it for the life of the process, so every later child's exit or stop is delivered to the
    interpreter on the alternate signal stack. In long processes that start many children afterwards
    (the test suite: about 1 full run in 4) one such delivery killed the process with a SIGSEGV the
    kernel raised itself (si_code SI_KERNEL, main thread asleep in time.sleep, no trace printed).
    On the way out the handler found on entry is put back, and torch's note that its handler is set
    is cleared so that a later loader installs it again while it runs.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    before = signal.getsignal(signal.SIGCHLD)
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGCHLD) is not before:
            signal.signal(signal.SIGCHLD, before)
            from torch.utils.data._utils import signal_handling

            if hasattr(signal_handling, "_SIGCHLD_handler_set"):
                signal_handling._SIGCHLD_handler_set = False


def micro_batches(spec: StreamSpec, num_workers: int, *, pin_memory: bool = False) -> Iterator[dict]:
    """The rank's micro-batches of epochs `spec.epoch` .. `spec.end_epoch` - 1, in order, through one DataLoader.

    Its `num_workers` workers start once and serve every epoch (each epoch's streams are seeded by
    the epoch inside the workers), so a many-epoch run does not pay the workers' start-up per epoch.
    """
    streams = max(num_workers, 1)
    loader = DataLoader(
        ShardStream(spec, streams),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers else None,
        generator=torch.Generator().manual_seed(spec.seed),  # keeps the global RNG (drop path) untouched
    )
    expected = (spec.epoch, spec.start_batch)
    try:
        with child_signal_restored():
            for batch in loader:
                assert (batch["epoch"], batch["index"]) == expected, "DataLoader returned micro-batches out of order"
                epoch, index = expected
                expected = (epoch, index + 1) if index + 1 < spec.batches_per_epoch else (epoch + 1, 0)
                yield batch
    except DataError as err:
        # A worker's DataError arrives with its traceback in the message: keep the sentence.
        raise DataError(str(err).strip().splitlines()[-1].split("DataError: ")[-1]) from None
