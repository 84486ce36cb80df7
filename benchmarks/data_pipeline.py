"""Images per second of the training input pipeline (read, shuffle, decode, crop, masks); prints JSON.

Example:
    python benchmarks/data_pipeline.py --images 512 --img-size 224 --workers 0,2 --batch 64
The shards hold JPEGs of ImageNet's typical size (500x375) cut from the photos that ship with
scikit-image, so decode costs are those of real photos.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from dmt_jepa.config import DataConfig, MaskConfig
from dmt_jepa.data.pipeline import StreamSpec, expand_shards, micro_batches


def write_photo_shards(out: Path, count: int, per_shard: int = 256) -> str:
    """`count` 500x375 JPEGs (quality 90) cut at random from scikit-image's bundled photos."""
    from skimage import data as photos

    sources = [
        np.asarray(Image.fromarray(f()).convert("RGB").resize((1000, 750)))
        for f in (photos.astronaut, photos.coffee, photos.chelsea, photos.rocket)
    ]
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(out / "bench-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(count):
            src = sources[i % len(sources)]
            top, left = rng.integers(0, 750 - 375), rng.integers(0, 1000 - 500)
            buf = io.BytesIO()
            Image.fromarray(src[top : top + 375, left : left + 500]).save(buf, format="JPEG", quality=90)
            sink.write({"__key__": f"{i:08d}", "jpg": buf.getvalue()})
    shards = sorted(out.glob("bench-*.tar"))
    return str(out / f"bench-{{000000..{len(shards) - 1:06d}}}.tar")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="images in the benchmark shards")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12, help="batches timed per setting, after one warm-up batch")
    parser.add_argument("--workers", default="0,2", help="comma-separated data.num_workers settings")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        urls = expand_shards(write_photo_shards(Path(tmp), args.images))
        grid = (args.img_size // args.patch_size,) * 2
        for workers in (int(w) for w in args.workers.split(",")):
            spec = StreamSpec(
                urls=urls,
                cfg=DataConfig(shuffle_buffer=256, num_workers=workers),
                mask_cfg=MaskConfig(),
                img_size=(args.img_size, args.img_size),
                grid=grid,
                batch_size=args.batch,
                seed=0,
                epoch=0,
                rank=0,
                world_size=1,
                batches_per_epoch=args.batches + 1,
            )
            batches = micro_batches(spec, workers)
            next(batches)  # workers started, shuffle buffer filled
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in batches:
                pass
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            results[str(workers)] = {"images_per_s": round(args.batch * args.batches / seconds, 1)}
            if workers == 0:  # all decoding in this process: images per CPU-second = per core, whatever else runs
                results[str(workers)]["images_per_cpu_s"] = round(args.batch * args.batches / cpu_seconds, 1)
    print(
        json.dumps(
            {
                "benchmark": "data_pipeline",
                "img_size": args.img_size,
                "batch": args.batch,
                "source": "500x375 JPEG q90",
                "cpu": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "workers": results,
            }
        )
    )


if __name__ == "__main__":
    main()
