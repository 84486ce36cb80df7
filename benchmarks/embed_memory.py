"""Peak memory of `embed_shards` as a shard grows; prints one JSON object.

Each sample is a small PNG and one carried member of `--member-bytes` random bytes (just under the
default --max-carried-bytes, so that every member is copied to the output). One shard of 1,500 and
one of 6,000 such samples are embedded per layout, each run in a fresh process (decoding in a
thread, so that the process's peak RSS covers the whole job); then one shard holding a single sample
with 6,000 small members. A layout whose memory does not grow with the shard shows the same peak at
both counts. A tiny random encoder (64 px, width 32): the figures measure the job, not the model.

    python benchmarks/embed_memory.py [--member-bytes 60000] [--counts 1500 6000] [--members 6000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, resource, sys
from dmt_jepa.serve import embed_shards
summary = embed_shards(sys.argv[1], sys.argv[2], sys.argv[3], workers=0, layout=sys.argv[4])
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "embedded": summary.embedded}))
"""


def small_png(seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: int, member_bytes: int) -> Path:
    """`samples` samples: KEY.png and KEY.bin (incompressible, so that nothing shrinks it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = [small_png(i) for i in range(16)]
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            add(tar, f"k{i:06d}.png", images[i % len(images)])
            add(tar, f"k{i:06d}.bin", rng.bytes(member_bytes))
    return path


def write_many_members_shard(path: Path, members: int) -> Path:
    """One sample: an image and `members` small members KEY.m<i> of 100 bytes each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        add(tar, "one.png", small_png(0))
        for i in range(members):
            add(tar, f"one.m{i:05d}", bytes([i % 251]) * 100)
    return path


def peak(shard_dir: Path, out_dir: Path, model: Path, layout: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(shard_dir), str(out_dir), str(model), layout],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--member-bytes", type=int, default=60_000)
    parser.add_argument("--counts", type=int, nargs="+", default=[1500, 6000])
    parser.add_argument("--members", type=int, default=6000)
    args = parser.parse_args()

    import torch

    from dmt_jepa.encoder_file import info_from_encoder, save_encoder
    from dmt_jepa.models import VisionTransformer

    with tempfile.TemporaryDirectory(prefix="embed-memory-") as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        encoder = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2).eval()
        model = save_encoder(work / "enc.safetensors", encoder, info_from_encoder(encoder, arch="vit_test"))
        results: dict[str, dict] = {}
        for count in args.counts:
            shard_dir = work / f"in-{count}"
            write_shard(shard_dir / "s.tar", count, args.member_bytes)
            for layout in ("tar", "array"):
                results[f"{layout}_{count}_samples"] = peak(shard_dir, work / f"out-{layout}-{count}", model, layout)
        many = work / "in-many"
        write_many_members_shard(many / "s.tar", args.members)
        for layout in ("tar", "array"):
            results[f"{layout}_one_sample_{args.members}_members"] = peak(many, work / f"out-many-{layout}", model, layout)
    low, high = min(args.counts), max(args.counts)
    growth = {
        layout: results[f"{layout}_{high}_samples"]["peak_rss_mib"] / results[f"{layout}_{low}_samples"]["peak_rss_mib"] - 1
        for layout in ("tar", "array")
    }
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "member_bytes": args.member_bytes,
                "runs": results,
                f"peak_growth_{low}_to_{high}": {k: round(v, 4) for k, v in growth.items()},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
