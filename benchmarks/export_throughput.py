"""Images/s of the exported encoder per available backend and precision; prints JSON.

    python benchmarks/export_throughput.py --arch vit_small --batch 32 --size 224

Random-initialised encoders (no weights are downloaded): throughput does not depend on the
weights. Each model goes through the real export (ONNX fp32 and fp16, verified; a TensorRT
engine where TensorRT and a GPU exist), then every backend runs the same batch.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dmt_jepa.encoder_file import info_from_encoder, save_encoder
from dmt_jepa.export.io_names import OPTIMUM
from dmt_jepa.export.onnx_export import onnx_runner
from dmt_jepa.export.pipeline import export_encoder
from dmt_jepa.models import create_encoder


def _time(run: Callable[[], object], iters: int) -> float:
    """Median seconds of one call, after one warm-up call."""
    run()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def _torch_backends(encoder, images: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
    backends = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        enc = copy.deepcopy(encoder).to(device)
        x = torch.from_numpy(images).to(device)
        for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):

            def run(enc=enc, x=x, dtype=dtype, device=device) -> np.ndarray:
                with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                    patches, _ = enc.dense(x)
                if device == "cuda":
                    torch.cuda.synchronize()
                return patches.float().cpu().numpy()

            backends[f"pytorch-{device} {precision}"] = run
    return backends


def _onnx_backends(out_dir: Path, images: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
    import onnxruntime as ort

    providers = {"cpu": ["CPUExecutionProvider"]}
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        providers["cuda"] = ["CUDAExecutionProvider"]
    backends = {}
    for device, provider in providers.items():
        for precision, filename in (("fp32", "encoder.onnx"), ("fp16", "encoder_fp16.onnx")):
            runner = onnx_runner(out_dir / filename, providers=provider)
            backends[f"onnxruntime-{device} {precision}"] = lambda runner=runner: runner(images)[0]
    return backends


def _tensorrt_backend(engine: Path, images: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
    from dmt_jepa.export.tensorrt_build import TensorRTRunner, require_tensorrt

    runner = TensorRTRunner(require_tensorrt(), engine.read_bytes(), OPTIMUM)  # export_encoder writes the default names
    return {"tensorrt fp16": lambda: runner(images)[0]}


def benchmark(arch: str, batch: int, size: int, iters: int, work_dir: Path) -> dict:
    torch.manual_seed(0)
    encoder = create_encoder(arch, img_size=size).eval()
    path = save_encoder(work_dir / f"{arch}.safetensors", encoder, info_from_encoder(encoder, arch))
    with_trt = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
    result = export_encoder(path, work_dir / arch, fp16=True, trt=with_trt, log=lambda line: None)
    images = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)

    backends = _torch_backends(encoder, images) | _onnx_backends(work_dir / arch, images)
    if result.engine is not None:
        backends |= _tensorrt_backend(result.engine, images)
    reference = backends["pytorch-cpu fp32"]()
    rows = []
    for name, run in backends.items():
        seconds = _time(run, iters)
        rows.append(
            {
                "backend": name.split()[0],
                "precision": name.split()[1],
                "images_per_s": round(batch / seconds, 2),
                "seconds_per_batch": round(seconds, 4),
                "cosine_min_vs_pytorch_fp32": round(_cosine_min(run(), reference), 6),
            }
        )
    return {"arch": arch, "patch_size": encoder.patch_size, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["vit_small"], help="vit_tiny, vit_small, vit_base, ...")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=3, help="timed calls per backend (median reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = [benchmark(arch, args.batch, args.size, args.iters, Path(tmp)) for arch in args.arch]
    print(
        json.dumps(
            {
                "benchmark": "export_throughput",
                "batch": args.batch,
                "image_size": args.size,
                "machine": {
                    "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__,
                },
                "models": models,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
