"""Our fp32 ONNX graph beside a plain timm -> torch.onnx export, node by node and timed; prints JSON.

    python benchmarks/onnx_graph_compare.py [--arch vit_small] [--sizes 224 320] [--batch 32] [--repeats 5] [--sessions 2]

For each graph: op counts as written, op counts after ONNX Runtime's graph optimisation (the
optimised model is saved with SessionOptions.optimized_model_filepath, so fused kernels such as
Attention, SkipLayerNormalization and FastGelu/BiasGelu show up by name), ONNX Runtime's profiler
time per op type for one batch, and images/s measured alternating ours / timm / ours / timm
(medians), so that other load on a shared machine hits both alike. `--profile` adds the per-op
profile. Random weights: speed does not depend on them (the same graphs with each other's weights
swapped in run as fast as with their own).

Where a session sits in memory moves its speed by a few per cent: two sessions of one graph in one
process differ by up to 2.5 % (the one created first slower), and the same graph in fresh
processes spreads over +-7 %. So each graph gets `--sessions` sessions, created in the order
ours, fused, timm, timm, fused, ours, ... and run in an order reversed every round; a graph's
figure is the mean of its sessions' medians, and every session's own median is printed beside it.

"ours fused" is our graph as the `onnxruntime-cpu` backend runs it in fp32: each attention block
rewritten as ONNX Runtime's fused Attention kernel (serve/backends/ort_attention.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmt_jepa.encoder_file import info_from_encoder  # noqa: E402
from dmt_jepa.export.onnx_export import export_graph  # noqa: E402
from dmt_jepa.models import create_encoder  # noqa: E402
from dmt_jepa.serve.backends.ort_attention import fuse_attention  # noqa: E402

TIMM_MODELS = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}


def export_timm(arch: str, path: Path, size: int) -> None:
    """What a user does without this project: timm's ViT, torch.onnx.export (dynamo), dynamic batch."""
    import timm

    model = timm.create_model(TIMM_MODELS[arch], pretrained=False, img_size=size).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (torch.randn(2, 3, size, size),),
            dynamo=True,
            input_names=["images"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    program.save(str(path))


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type (domain-qualified for contrib ops), the main graph only."""
    counts = collections.Counter(
        (f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in model.graph.node
    )
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def session(path: Path, optimised: Path | None = None, profile: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if optimised is not None:
        options.optimized_model_filepath = str(optimised)
    options.enable_profiling = profile
    options.profile_file_prefix = str(path.parent / "profile")  # the trace stays in the temporary folder
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def profile_by_op(path: Path, batch: np.ndarray) -> dict[str, float]:
    """Milliseconds per op type for one batch, from ONNX Runtime's profiler (after one warm-up run)."""
    sess = session(path, profile=True)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: batch})
    sess.run(None, {name: batch})
    trace_path = Path(sess.end_profiling())
    trace = json.loads(trace_path.read_text())
    trace_path.unlink()
    runs = [e for e in trace if e.get("name") == "model_run"]
    last_start = runs[-1]["ts"] if runs else 0
    per_op: collections.Counter = collections.Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= last_start:
            per_op[event["args"]["op_name"]] += event["dur"] / 1000
    return {op: round(ms, 2) for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])}


def alternating(runs: list[tuple[str, Callable]], batch: np.ndarray, repeats: int) -> list[float]:
    """Median images/s of each runner, measured in turn `repeats` times, the order reversed every other round."""
    for _, run in runs:
        run(batch)
    rates: list[list[float]] = [[] for _ in runs]
    for round_ in range(repeats):
        order = range(len(runs)) if round_ % 2 == 0 else reversed(range(len(runs)))
        for index in order:
            start = time.perf_counter()
            runs[index][1](batch)
            rates[index].append(len(batch) / (time.perf_counter() - start))
    return [round(statistics.median(r), 2) for r in rates]


def compare(arch: str, size: int, batch_size: int, repeats: int, sessions: int, profile: bool, work: Path) -> dict:
    torch.manual_seed(0)
    encoder = create_encoder(arch, img_size=224).eval()
    info = info_from_encoder(encoder, arch=arch)
    ours, timm_path = work / "ours.onnx", work / f"timm-{size}.onnx"
    if not ours.exists():
        export_graph(encoder, info, ours, {**info.to_metadata(), "precision": "fp32"})
    export_timm(arch, timm_path, size)
    batch = np.random.default_rng(0).standard_normal((batch_size, 3, size, size)).astype(np.float32)
    fused, count = fuse_attention(onnx.load(str(ours)), info.num_heads)
    fused_path = work / "ours-fused.onnx"
    onnx.save(fused, str(fused_path))
    paths = {"ours": ours, "ours fused": fused_path, "timm": timm_path}
    graphs = {}
    for name, path in paths.items():
        optimised = work / f"{name}-{size}.opt.onnx"
        session(path, optimised)
        graphs[name] = {
            "opset": next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")),
            "ops_as_written": op_counts(onnx.load(str(path))),
            "ops_after_ort": op_counts(onnx.load(str(optimised))),
        }
        if profile:
            graphs[name]["profile_ms_by_op"] = profile_by_op(path, batch)
    names = [name for i in range(sessions) for name in (list(paths) if i % 2 == 0 else list(paths)[::-1])]
    runs = []
    for name in names:
        sess = session(paths[name])
        input_name = sess.get_inputs()[0].name
        runs.append((name, lambda x, s=sess, i=input_name: s.run(None, {i: x})))
    medians = alternating(runs, batch, repeats)
    per_session = {name: [m for n, m in zip(names, medians, strict=True) if n == name] for name in paths}
    rates = {name: round(statistics.mean(m), 2) for name, m in per_session.items()}
    return {
        "size": size,
        "images_per_s": rates,
        "images_per_s_each_session": per_session,
        "ours_vs_timm": round(rates["ours"] / rates["timm"], 3),
        "ours_fused_vs_timm": round(rates["ours fused"] / rates["timm"], 3),
        "attention_blocks_fused": count,
        "graphs": graphs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small", choices=sorted(TIMM_MODELS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 320])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=2, help="sessions per graph, created ours timm timm ours ...")
    parser.add_argument("--profile", action="store_true", help="add ONNX Runtime's per-op profile")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import cpu_description

    with tempfile.TemporaryDirectory() as tmp:
        results = [compare(args.arch, s, args.batch, args.repeats, args.sessions, args.profile, Path(tmp)) for s in args.sizes]
    print(json.dumps({"cpu": cpu_description(), "arch": args.arch, "batch": args.batch, "results": results}, indent=1))


if __name__ == "__main__":
    main()
