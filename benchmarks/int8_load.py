"""Loading a calibrated int8 backend with an empty and with a filled calibration cache; prints JSON.

    python benchmarks/int8_load.py [--arch vit_small] [--size 224] [--rounds 3]

Each load runs in a fresh process (so that its peak RSS is its own), empty and filled alternating
within every round; the filled cache is the one the round's empty load has just written. Seconds
are from the start of `load_backend` to its return, plus the first batch of 2 images, so that a
model that loads but cannot run would show. Random weights: calibration time does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, resource, sys, time
import numpy as np
from dmt_jepa.serve.backends import load_backend
path, backend, precision, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
start = time.perf_counter()
runner = load_backend(path, backend, precision)
runner.run(np.zeros((2, 3, size, size), np.float32))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PATHS = (("openvino", "int8"), ("onnxruntime-cpu", "int8-static"))


def load_once(model: Path, backend: str, precision: str, size: int, cache: Path) -> dict:
    env = {**os.environ, "DMT_JEPA_CACHE_DIR": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), backend, precision, str(size)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import importlib.util

    import torch

    from dmt_jepa.encoder_file import info_from_encoder
    from dmt_jepa.export.onnx_export import export_graph
    from dmt_jepa.models import create_encoder

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import cpu_description

    paths = [p for p in PATHS if p[0] != "openvino" or importlib.util.find_spec("openvino")]
    results: dict[str, dict[str, list[dict]]] = {f"{b} {p}": {"empty": [], "filled": []} for b, p in paths}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        encoder = create_encoder(args.arch, img_size=args.size).eval()
        info = info_from_encoder(encoder, arch=args.arch)
        model = Path(tmp) / "encoder.onnx"
        export_graph(encoder, info, model, {**info.to_metadata(), "precision": "fp32"})
        for round_ in range(args.rounds):
            for backend, precision in paths:
                cache = Path(tmp) / f"cache-{round_}-{backend}"
                for state in ("empty", "filled"):
                    results[f"{backend} {precision}"][state].append(load_once(model, backend, precision, args.size, cache))
    summary = {
        name: {
            state: {
                "seconds": round(statistics.median(r["seconds"] for r in runs), 2),
                "peak_rss_mib": round(statistics.median(r["peak_rss_mib"] for r in runs)),
                "rounds_seconds": [round(r["seconds"], 2) for r in runs],
            }
            for state, runs in by_state.items()
        }
        for name, by_state in results.items()
    }
    print(json.dumps({"cpu": cpu_description(), "arch": args.arch, "size": args.size, "loads": summary}, indent=1))


if __name__ == "__main__":
    main()
