"""DMT-JEPA vs I-JEPA vs controls on the scenes benchmark: paired seeds, same budget; prints JSON.

Every trained arm of a seed starts from the same initial encoder and predictor and sees the same
images, crops and masks in the same order; only the targets differ. Main arms (I-JEPA and
DMT-JEPA with the default head) run on every seed, controls on fewer. Each target encoder is
evaluated frozen (kNN, linear probe, 11-class and figure-ground dense segmentation) on held-out
scenes, its targets' locality is measured at init, during training and at the end, and the report
gives per-seed paired differences against I-JEPA with their standard error.

    python benchmarks/study.py --out runs/study --report docs/results.md
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dmt_jepa.config import MaskConfig, MethodConfig, ModelConfig, TargetConfig
from dmt_jepa.encoder_file import IMAGENET_MEAN, IMAGENET_STD, info_from_encoder, save_encoder
from dmt_jepa.evaluation import (
    EvalOptions,
    dense_miou,
    evaluate_features,
    extract_features,
    perfect_patch_miou,
    read_labelled_shards,
)
from dmt_jepa.masks import MultiBlockMaskSampler
from dmt_jepa.models import create_encoder
from dmt_jepa.objective import DMTJEPA, train_step
from dmt_jepa.scenes import NUM_SEG_CLASSES, write_scene_shards
from dmt_jepa.viz import attention_picture, curves_picture, pca_picture, read_log, save_png

# Arm name -> target settings (None: the untrained encoder). Everything else is shared.
ARMS: dict[str, dict | None] = {
    "i-jepa": {"aggregation": "none"},
    "dmt-jepa-self": {"aggregation": "cross_attention", "query": "self"},
    "dmt-jepa-learned": {"aggregation": "cross_attention", "query": "learned"},
    "dmt-jepa-mean": {"aggregation": "cross_attention", "query": "mean"},
    "dmt-jepa-self-added": {"aggregation": "cross_attention", "query": "self", "context": "added"},
    "mean-pool": {"aggregation": "mean"},
    "random": None,
}
LABELS = {
    "i-jepa": "I-JEPA (aggregation none)",
    "dmt-jepa-self": "DMT-JEPA, query = the patch's own feature",
    "dmt-jepa-learned": "DMT-JEPA, query = a learned token",
    "dmt-jepa-mean": "DMT-JEPA, query = the image's mean token (the former head)",
    "dmt-jepa-self-added": "DMT-JEPA, own-feature query, former context path (head output added)",
    "mean-pool": "mean of the neighbours (no head)",
    "random": "random init",
}
DEFAULT_ARM = f"dmt-jepa-{TargetConfig().query}"  # the head a plain `dmtjepa pretrain` trains
METRICS = {"fg": ("figure_ground", "miou"), "dense": ("dense", "miou"), "knn": ("knn", "top1"), "linear": ("linear", "top1")}


@dataclass
class StudyConfig:
    """Everything that defines one study; the defaults are sized for about an hour on 2 CPU cores."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    control_seeds: list[int] = field(default_factory=lambda: [0, 1])
    arms: list[str] = field(default_factory=lambda: ["i-jepa", DEFAULT_ARM])
    controls: list[str] = field(default_factory=lambda: ["dmt-jepa-mean", "mean-pool", "random"])
    steps: int = 800
    batch_size: int = 32
    lr: float = 1e-3
    warmup: float = 0.1  # fraction of steps with a linear lr warm-up
    weight_decay: float = 0.04
    ema: tuple[float, float] = (0.99, 1.0)
    arch: str = "vit_nano"
    patch_size: int = 8
    image_size: int = 96
    pred_width: int = 64
    pred_depth: int = 2
    min_keep: int = 10
    crop_scale: tuple[float, float] = (0.3, 1.0)
    train_scenes: int = 3000
    test_scenes: int = 600
    data_seed: int = 0
    dense_epochs: int = 20
    dense_lr: float = 0.03
    locality_every: int = 100
    locality_images: int = 64  # test scenes on which target locality is measured
    picture_index: int = 5
    workers: int = 2
    threads: int = 1
    device: str = "cpu"

    def jobs(self) -> list[tuple[str, int]]:
        """(arm, seed) pairs: main arms seed by seed (a cut run holds whole pairs), then trained controls, then untrained."""
        main = sorted(((a, s) for a in self.arms for s in self.seeds), key=lambda pair: pair[1])
        controls = sorted(((a, s) for a in self.controls for s in self.control_seeds), key=lambda pair: (ARMS[pair[0]] is None, pair[1]))
        return list(dict.fromkeys(main + controls))


def method_config(cfg: StudyConfig, arm: str) -> MethodConfig:
    """The model of one arm of the study; only the target settings differ between arms."""
    return MethodConfig(
        model=ModelConfig(
            arch=cfg.arch,
            patch_size=cfg.patch_size,
            img_size=cfg.image_size,
            pred_width=cfg.pred_width,
            pred_depth=cfg.pred_depth,
        ),
        mask=MaskConfig(min_keep=cfg.min_keep),
        target=TargetConfig(**ARMS[arm]),
    )


def normalise(images: torch.Tensor) -> torch.Tensor:
    """Float [B, 3, H, W] in [0, 1] -> the encoder's normalised input."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def random_resized_crops(images: torch.Tensor, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop (aspect 3/4-4/3) of each image back to its own size, by one grid_sample: [B, 3, H, W]."""
    batch = images.shape[0]
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(batch, generator=generator)
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(batch, generator=generator)
    ratio = log_ratio.exp()
    width = (area * ratio).sqrt().clamp(max=1.0)  # crop side as a fraction of the image side
    height = (area / ratio).sqrt().clamp(max=1.0)
    centre_x = (1 - width) * (2 * torch.rand(batch, generator=generator) - 1)  # in [-1, 1] coordinates
    centre_y = (1 - height) * (2 * torch.rand(batch, generator=generator) - 1)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def pretrain(
    cfg: StudyConfig, arm: str, seed: int, images: torch.Tensor, probe_images: torch.Tensor, log_path: Path
) -> tuple[DMTJEPA, dict]:
    """Train one arm for cfg.steps on uint8 images [N, 3, S, S]; one JSON line per step.

    Target locality on `probe_images` (normalised, fixed) is logged at init and every
    cfg.locality_every steps. Returns the model and {first_50_steps_s, locality_init, locality_final}.
    """
    device = torch.device(cfg.device)
    torch.manual_seed(seed)  # same encoder and predictor init for every arm of this seed
    generator = torch.Generator().manual_seed(seed)  # same images, crops and masks in the same order
    model = DMTJEPA(method_config(cfg, arm)).to(device)
    grid = model.grid(images[:1])
    sampler = MultiBlockMaskSampler(grid, model.cfg.mask)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    warmup = max(1, int(cfg.warmup * cfg.steps))
    probe_images = probe_images.to(device)
    facts = {"locality_init": model.locality(probe_images), "first_50_steps_s": None}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(json.dumps({"step": 0} | facts["locality_init"]) + "\n")
        for step in range(cfg.steps):
            if step < warmup:
                lr = cfg.lr * (step + 1) / warmup
            else:
                lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            momentum = cfg.ema[0] + (cfg.ema[1] - cfg.ema[0]) * step / cfg.steps
            index = torch.randint(len(images), (cfg.batch_size,), generator=generator)
            batch = random_resized_crops(images[index].float() / 255.0, cfg.crop_scale, generator)
            batch = normalise(batch).to(device)
            masks = sampler(cfg.batch_size, generator).to(device)
            loss = train_step(model, batch, masks, optimizer, momentum)
            elapsed = time.perf_counter() - start
            if step + 1 == 50:
                facts["first_50_steps_s"] = round(elapsed, 2)
            record = {"step": step + 1, "loss": loss, "lr": lr, "momentum": momentum, "elapsed_s": round(elapsed, 3)}
            if (step + 1) % cfg.locality_every == 0 or step + 1 == cfg.steps:
                record |= model.locality(probe_images)
            log.write(json.dumps(record) + "\n")
    facts["locality_final"] = model.locality(probe_images)
    return model, facts


def machine(cfg: StudyConfig) -> str:
    """CPU model, cores, how the study used them, and library versions, for the report."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        cpu = f"{torch.cuda.get_device_name()} with {cpu}"
    return (
        f"{cpu}, {os.cpu_count()} cores visible, {cfg.workers} worker processes of {cfg.threads} thread(s), torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.system()}"
    )


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and standard deviation over seeds of each metric and locality figure of each arm."""
    table = {}
    for arm, runs in results.items():
        if not runs:
            continue
        row = {name: mean_sd([r[task][key] for r in runs]) for name, (task, key) in METRICS.items()}
        for when in ("init", "final"):
            if f"locality_{when}" in runs[0]:
                for key in ("within_image_share", "cos_to_image_mean"):
                    row[f"{key}_{when}"] = mean_sd([r[f"locality_{when}"][key] for r in runs])
        table[arm] = row
    return table


def paired_differences(results: dict[str, list[dict]], baseline: str = "i-jepa") -> dict[str, dict]:
    """Per seed, each arm minus the baseline on the same seed; mean and standard error of the mean."""
    base = {r["seed"]: r for r in results.get(baseline, [])}
    out = {}
    for arm, runs in results.items():
        pairs = [(r, base[r["seed"]]) for r in runs if arm != baseline and r["seed"] in base]
        if not pairs:
            continue
        out[arm] = {"seeds": [r["seed"] for r, _ in pairs]}
        for name, (task, key) in METRICS.items():
            diffs = [r[task][key] - b[task][key] for r, b in pairs]
            se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
            out[arm][name] = {"per_seed": [round(d, 2) for d in diffs], "mean": statistics.mean(diffs), "se": se}
    return out


def write_report(path: Path, cfg: StudyConfig, summary: dict, command: str, pictures: dict, reduced: bool) -> None:
    """The markdown report: tables, paired differences, locality, setup, machine, wall time and pictures."""
    table, paired, ceiling = summary["table"], summary["paired"], summary["ceiling"]
    grid = cfg.image_size // cfg.patch_size
    lines = ["# DMT-JEPA vs I-JEPA on the scenes benchmark", ""]
    if reduced:
        lines += ["**Reduced run**: fewer seeds or steps than the published configuration; read the numbers as indicative.", ""]
    lines += [
        f"{cfg.arch}/{cfg.patch_size} at {cfg.image_size} px: a {grid}x{grid} patch grid. Main arms on seeds "
        f"{', '.join(map(str, cfg.seeds))}; controls on seeds {', '.join(map(str, cfg.control_seeds))}. "
        "All figures in %, on held-out test scenes (photos and digit samples never seen in training); "
        f"the default head (what `dmtjepa pretrain` trains) is `{DEFAULT_ARM}`.",
        "",
        f"Ceiling of a perfect per-patch predictor under the same scoring at this grid: figure-ground "
        f"{ceiling['fg']:.1f}, 11 classes {ceiling['dense']:.1f}.",
        "",
        "## Mean +- standard deviation over seeds",
        "",
        "| arm | seeds | figure-ground mIoU | dense mIoU (11 classes) | kNN top-1 | linear top-1 |",
        "|---|---|---|---|---|---|",
    ]
    runs = summary["runs"]
    for arm, row in table.items():
        cells = " | ".join(f"{row[m][0]:.2f} +- {row[m][1]:.2f}" for m in METRICS)
        lines.append(f"| {LABELS[arm]} | {len(runs[arm])} | {cells} |")
    lines += [
        "",
        "## Paired differences against I-JEPA (same seed: same init, data order and masks)",
        "",
        "| arm | seeds | figure-ground: per seed | mean +- s.e. | dense (11): mean +- s.e. | kNN: mean +- s.e. | linear: mean +- s.e. |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, d in paired.items():
        if ARMS[arm] is None:
            continue
        per_seed = ", ".join(f"{v:+.2f}" for v in d["fg"]["per_seed"])
        cells = " | ".join(f"{d[m]['mean']:+.2f} +- {d[m]['se']:.2f}" for m in ("fg", "dense", "knn", "linear"))
        lines.append(f"| {LABELS[arm]} | {len(d['seeds'])} | {per_seed} | {cells} |")
    lines += [
        "",
        "## Target locality (on 64 test scenes; mean over seeds)",
        "",
        "Within-image share: the part of the targets' variance that lies between patches of the same image "
        "(I-JEPA's targets are the patch features themselves). Cosine: mean cosine of a target to its image's "
        "mean target (1 means one vector per image).",
        "",
        "| arm | within-image share at init | at the end | cosine to image mean at init | at the end |",
        "|---|---|---|---|---|",
    ]
    for arm, row in table.items():
        if "within_image_share_init" in row:
            lines.append(
                f"| {LABELS[arm]} | {row['within_image_share_init'][0]:.3f} | {row['within_image_share_final'][0]:.3f} | "
                f"{row['cos_to_image_mean_init'][0]:.3f} | {row['cos_to_image_mean_final'][0]:.3f} |"
            )
    first50 = [r["first_50_steps_s"] for rs in runs.values() for r in rs if r.get("first_50_steps_s")]
    lines += [
        "",
        "## Setup",
        f"- Data: `dmtjepa data scenes` with seed {cfg.data_seed}, {cfg.train_scenes} train and {cfg.test_scenes} test "
        f"scenes of {cfg.image_size} px (see docs/scenes.md).",
        f"- Model: {cfg.arch}/{cfg.patch_size} at {cfg.image_size} px, predictor {cfg.pred_width} wide x {cfg.pred_depth} deep; "
        "targets k = 4 of a 3x3 window, clip border, 2-block head, smooth-L1; masks 4 targets of scale 0.15-0.2, "
        f"context 0.85-1.0, min_keep {cfg.min_keep}.",
        f"- Training, identical for every trained arm: {cfg.steps} steps of batch {cfg.batch_size}, AdamW lr {cfg.lr} "
        f"(linear warm-up over {cfg.warmup:.0%} of the steps, then cosine to 0), weight decay {cfg.weight_decay} "
        f"(none on biases and norms), EMA momentum {cfg.ema[0]} -> {cfg.ema[1]}, RandomResizedCrop scale "
        f"{cfg.crop_scale[0]}-{cfg.crop_scale[1]}, fp32, on {cfg.device}. Random init: the same architecture, untrained.",
        f"- Evaluation of the target encoder, frozen (docs/evaluation.md): kNN (k = 20, T = 0.07), logistic regression "
        f"(C = 1), dense linear segmentation ({cfg.dense_epochs} epochs, lr {cfg.dense_lr}; 11 classes: background + "
        "10 digits), and the same dense protocol with all digits merged into one class (figure-ground).",
        "",
        "## Reproduce",
        "```",
        command,
        "```",
        f"Machine: {summary['machine']}.",
        f"Wall time: {summary['wall_s'] / 60:.1f} minutes for this invocation of the study; the jobs themselves took "
        f"{summary['job_s'] / 60:.1f} worker-minutes (training and evaluation, {cfg.workers} workers at a time); "
        f"the first 50 training steps of one arm took {min(first50, default=float('nan')):.1f}-{max(first50, default=float('nan')):.1f} s.",
        "",
        f"## Pictures of test scene {cfg.picture_index} (seed {cfg.seeds[0]})",
        "PCA of the patch embeddings (first three components as RGB) beside the scene, and the last-layer "
        "attention of the centre patch (per head, then their mean); for trained arms, the loss, learning rate "
        "and target locality of that seed's run.",
        "",
    ]
    for arm, files in sorted(pictures.items(), key=lambda item: list(ARMS).index(item[0])):
        lines += [f"**{LABELS[arm]}**", ""]
        for label, file in zip(("PCA", "attention", "training curves"), files):
            lines += [f"![{label}]({os.path.relpath(file, path.parent)})", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def run_arm(cfg: StudyConfig, arm: str, seed: int, out: Path, picture_dir: Path) -> dict:
    """Train (or not) one arm from one seed, save its target encoder, evaluate it, draw it for the first seed."""
    torch.set_num_threads(cfg.threads)
    tic = time.perf_counter()
    data = out / "data"
    train, test = read_labelled_shards(str(data / "train-*.tar")), read_labelled_shards(str(data / "test-*.tar"))
    probe_images = normalise(torch.from_numpy(np.stack(test.images[: cfg.locality_images])).permute(0, 3, 1, 2) / 255.0)
    result = {}
    if ARMS[arm] is None:
        torch.manual_seed(seed)
        encoder = create_encoder(cfg.arch, patch_size=cfg.patch_size, img_size=cfg.image_size)
    else:
        images = torch.from_numpy(np.stack(train.images)).permute(0, 3, 1, 2).contiguous()  # [N, 3, S, S] uint8
        model, facts = pretrain(cfg, arm, seed, images, probe_images, out / f"{arm}-seed{seed}.jsonl")
        encoder = model.target_encoder
        result.update(facts)
    train_s = time.perf_counter() - tic
    encoder.eval()
    info = info_from_encoder(encoder, cfg.arch, {"study": arm, "seed": seed, "steps": cfg.steps if ARMS[arm] else 0})
    train_features = extract_features(encoder, info, train.images)
    test_features = extract_features(encoder, info, test.images)
    path = save_encoder(out / f"{arm}-seed{seed}.safetensors", encoder.cpu(), info)
    options = EvalOptions(dense_epochs=cfg.dense_epochs, dense_lr=cfg.dense_lr, seed=seed)
    result |= evaluate_features(("knn", "linear"), train, test, train_features, test_features, options)
    dense = dict(epochs=cfg.dense_epochs, lr=cfg.dense_lr, seed=seed, device=cfg.device)
    result["dense"] = dense_miou(train_features.patches, train.segs, test_features.patches, test.segs,
                                 num_classes=NUM_SEG_CLASSES, **dense)
    # Figure-ground: the same linear protocol with every digit merged into one class. It asks whether
    # patch embeddings separate objects from background at all, whatever the digit's identity.
    result["figure_ground"] = dense_miou(
        train_features.patches, [(s > 0).astype(np.uint8) for s in train.segs],
        test_features.patches, [(s > 0).astype(np.uint8) for s in test.segs],
        num_classes=2, **dense,
    )
    if seed == cfg.seeds[0] and arm in cfg.arms + cfg.controls:
        scene = test.images[cfg.picture_index]
        result["pictures"] = [
            str(save_png(pca_picture(encoder, info, scene, side=192), picture_dir / f"{arm}-pca.png")),
            str(save_png(attention_picture(encoder, info, scene, side=128), picture_dir / f"{arm}-attention.png")),
        ]
        if ARMS[arm] is not None:
            log = read_log(out / f"{arm}-seed{seed}.jsonl")
            result["pictures"].append(str(save_png(curves_picture(log, width=900, height=300), picture_dir / f"{arm}-curves.png")))
    result.update(arm=arm, seed=seed, encoder=str(path), train_s=round(train_s, 1),
                  eval_s=round(time.perf_counter() - tic - train_s, 1))
    line = json.dumps(result)
    (out / "jobs").mkdir(exist_ok=True)
    (out / "jobs" / f"{arm}-seed{seed}.json").write_text(line)  # a rerun of the study skips this job
    print(line, file=sys.stderr, flush=True)
    return result


def run_study(
    cfg: StudyConfig, out: Path, report: Path | None, command: str, reduced: bool = False, run: bool = True
) -> dict:
    """Data, every (arm, seed) job not done yet in `out`, evaluation and pictures; returns the summary.

    Jobs run in `cfg.workers` processes of `cfg.threads` threads each: on a small shared CPU,
    independent single-threaded runs use the cores better than one multi-threaded run. Each finished
    job leaves out/jobs/ARM-seedS.json, so a cut study resumes where it stopped; with run=False only
    the jobs already there are summarised.
    """
    unknown = [a for a in cfg.arms + cfg.controls if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm {unknown[0]!r}; the arms are {', '.join(ARMS)}.")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "scenes.json").exists():
        write_scene_shards(data, n_train=cfg.train_scenes, n_test=cfg.test_scenes, seed=cfg.data_seed, image_size=cfg.image_size)
    picture_dir = report.parent / "results" if report is not None else out / "pictures"
    done = {p.stem: json.loads(p.read_text()) for p in sorted((out / "jobs").glob("*.json"))}
    jobs = [(cfg, arm, seed, out, picture_dir) for arm, seed in cfg.jobs() if f"{arm}-seed{seed}" not in done]
    if not run:
        jobs = []
    if cfg.workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(cfg.workers) as pool:
            finished = pool.starmap(run_arm, jobs, chunksize=1)
    else:
        finished = [run_arm(*job) for job in jobs]
    wanted = set(cfg.jobs())
    finished += [r for r in done.values() if (r["arm"], r["seed"]) in wanted]
    results = {a: sorted((r for r in finished if r["arm"] == a), key=lambda r: r["seed"]) for a in ARMS}
    results = {a: rs for a, rs in results.items() if rs}
    test = read_labelled_shards(str(data / "test-*.tar"))
    grid = (cfg.image_size // cfg.patch_size,) * 2
    ceiling = {
        "fg": perfect_patch_miou([(s > 0).astype(np.uint8) for s in test.segs], grid, num_classes=2),
        "dense": perfect_patch_miou(test.segs, grid, num_classes=NUM_SEG_CLASSES),
    }
    summary = {
        "config": asdict(cfg),
        "default_arm": DEFAULT_ARM,
        "table": summarise(results),
        "paired": paired_differences(results),
        "ceiling": ceiling,
        "wall_s": round(time.perf_counter() - start, 1),
        "job_s": round(sum(r["train_s"] + r["eval_s"] for r in finished), 1),
        "runs": {a: [{k: v for k, v in r.items() if k != "pictures"} for r in rs] for a, rs in results.items()},
        "machine": machine(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if report is not None:
        pictures = {r["arm"]: [Path(p) for p in r["pictures"]] for r in finished if "pictures" in r}
        write_report(report, cfg, summary, command, pictures, reduced)
    return summary


def main(argv: list[str] | None = None) -> None:
    defaults = StudyConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="Directory for data, encoders and logs.")
    parser.add_argument("--report", type=Path, default=None, help="Markdown report to write (e.g. docs/results.md).")
    parser.add_argument("--seeds", type=int, nargs="+", default=defaults.seeds, help="Seeds of the main arms.")
    parser.add_argument("--control-seeds", type=int, nargs="*", default=defaults.control_seeds)
    parser.add_argument("--arms", nargs="+", default=defaults.arms, help=f"Main arms, of: {', '.join(ARMS)}.")
    parser.add_argument("--controls", nargs="*", default=defaults.controls, help="Control arms (run on --control-seeds).")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--arch", default=defaults.arch)
    parser.add_argument("--patch-size", type=int, default=defaults.patch_size)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--pred-width", type=int, default=defaults.pred_width)
    parser.add_argument("--pred-depth", type=int, default=defaults.pred_depth)
    parser.add_argument("--train-scenes", type=int, default=defaults.train_scenes)
    parser.add_argument("--test-scenes", type=int, default=defaults.test_scenes)
    parser.add_argument("--dense-epochs", type=int, default=defaults.dense_epochs)
    parser.add_argument("--ema", type=float, nargs=2, default=defaults.ema, help="EMA momentum at the start and end.")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="Jobs run at the same time.")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="Threads of each worker.")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda: where training, features and probes run.")
    parser.add_argument("--reduced", action="store_true", help="Label the report as a reduced run.")
    parser.add_argument("--report-only", action="store_true", help="Summarise the jobs already in --out; train nothing.")
    args = parser.parse_args(argv)
    cfg = StudyConfig(
        seeds=args.seeds, control_seeds=args.control_seeds, arms=args.arms, controls=args.controls, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, arch=args.arch, patch_size=args.patch_size, image_size=args.image_size,
        pred_width=args.pred_width, pred_depth=args.pred_depth, train_scenes=args.train_scenes,
        test_scenes=args.test_scenes, dense_epochs=args.dense_epochs, workers=args.workers, threads=args.threads,
        ema=tuple(args.ema), device=args.device,
    )
    command = "python benchmarks/study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = run_study(cfg, args.out, args.report, command, reduced=args.reduced, run=not args.report_only)
    print(json.dumps({"table": summary["table"], "paired": summary["paired"], "ceiling": summary["ceiling"],
                      "wall_s": summary["wall_s"]}))


if __name__ == "__main__":
    main()
