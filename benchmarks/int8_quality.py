"""What int8 costs in quality: patch cosine to fp32 and dense probe mIoU per CPU precision; prints JSON.

    python benchmarks/int8_quality.py --model runs/study-v3/i-jepa-seed0.safetensors [--train 300] [--test 150]

The encoder is exported to ONNX, then each path embeds the same scenes (dmt_jepa/scenes.py: real
photos with digits, per-pixel labels): ONNX Runtime fp32, dynamic int8 and calibrated int8 (static,
QDQ, ranges from `--calibration` train scenes), and OpenVINO fp32, bf16 (where the CPU has it)
and calibrated int8. For each: the patch cosine to ONNX Runtime fp32 on the test scenes (min and
mean) and the class-balanced probe's mIoU (dmt_jepa/evaluation/balanced.py), fitted on the train
scenes and scored on the test scenes of the same path's features: figure-ground (the study's primary figure) and 11-class.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import cpu_description  # noqa: E402

from dmt_jepa.encoder_file import load_encoder  # noqa: E402
from dmt_jepa.evaluation.balanced import balanced_miou  # noqa: E402
from dmt_jepa.export.onnx_export import export_graph  # noqa: E402
from dmt_jepa.scenes import NUM_SEG_CLASSES, make_scene  # noqa: E402
from dmt_jepa.serve.backends import load_backend, patch_cosine  # noqa: E402
from dmt_jepa.serve.backends.cpu import cpu_info  # noqa: E402
from dmt_jepa.serve.calibration import scene_pixels  # noqa: E402

BATCH = 32


def scenes(split: str, count: int, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    made = [make_scene(split, i, seed=1, image_size=size) for i in range(count)]
    return np.stack([s.image for s in made]), [s.seg for s in made]


def embed(backend, pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([backend.run_pixels(pixels[i : i + BATCH])[0] for i in range(0, len(pixels), BATCH)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="an encoder file (.safetensors)")
    parser.add_argument("--train", type=int, default=300, help="train scenes for the probe")
    parser.add_argument("--test", type=int, default=150, help="test scenes for the probe and the cosine")
    parser.add_argument("--calibration", type=int, default=256, help="train scenes the static int8 ranges come from")
    args = parser.parse_args()
    encoder, info = load_encoder(args.model)
    size = info.img_size[0]
    work = Path(tempfile.mkdtemp(prefix="int8-quality-"))
    onnx_path = work / "encoder.onnx"
    export_graph(encoder, info, onnx_path, {**info.to_metadata(), "precision": "fp32"})
    train_pixels, train_segs = scenes("train", args.train, size)
    test_pixels, test_segs = scenes("test", args.test, size)
    calibration = scene_pixels(args.calibration, info.img_size, seed=2)  # disjoint from the probe's scenes

    paths = [("onnxruntime-cpu", "fp32"), ("onnxruntime-cpu", "int8"), ("onnxruntime-cpu", "int8-static")]
    try:
        import openvino  # noqa: F401

        paths += [("openvino", "fp32")] + ([("openvino", "bf16")] if cpu_info().bf16 else []) + [("openvino", "int8")]
    except ImportError:
        pass
    results, reference = [], None
    for name, precision in paths:
        if name == "openvino" and precision == "int8":
            from dmt_jepa.serve.backends.openvino_backend import OpenVinoBackend

            backend = OpenVinoBackend(onnx_path, precision="int8", calibration=calibration)
        elif precision == "int8-static":
            from dmt_jepa.serve.backends.onnx_backend import OnnxRuntimeBackend
            from dmt_jepa.serve.calibration import quantize_static_int8

            quantize_static_int8(onnx_path, calibration, info, work / "static.onnx")
            backend = OnnxRuntimeBackend(work / "static.onnx", device="cpu", precision="fp32")
        else:
            backend = load_backend(onnx_path, name, precision)
        test = embed(backend, test_pixels)
        train = embed(backend, train_pixels)
        reference = test if reference is None else reference
        cosine = patch_cosine(test, reference)
        probe = balanced_miou(torch.from_numpy(train), train_segs, torch.from_numpy(test), test_segs, num_classes=NUM_SEG_CLASSES)
        # Figure-ground (digit vs background): the study's primary figure, docs/results.md.
        fg = balanced_miou(
            torch.from_numpy(train),
            [s > 0 for s in train_segs],
            torch.from_numpy(test),
            [s > 0 for s in test_segs],
            num_classes=2,
        )
        results.append(
            {
                "backend": name,
                "precision": precision,
                "patch_cosine_min": round(float(cosine.min()), 5),
                "patch_cosine_mean": round(float(cosine.mean()), 5),
                "figure_ground_miou": round(fg["miou"], 2),
                "figure_ground_miou_bootstrap_se": round(fg["bootstrap_se"], 2),
                "miou_11_class": round(probe["miou"], 2),
                "miou_11_class_bootstrap_se": round(probe["bootstrap_se"], 2),
            }
        )
        print(json.dumps(results[-1]), file=sys.stderr)
    print(
        json.dumps(
            {
                "cpu": cpu_description(),
                "model": str(args.model),
                "arch": f"{info.arch}/{info.patch_size} at {size} px",
                "train": args.train,
                "test": args.test,
                "calibration_images": args.calibration,
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
