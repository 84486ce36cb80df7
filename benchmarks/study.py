"""DMT-JEPA vs I-JEPA, its ablations and controls on the scenes benchmark: paired seeds, same budget; prints JSON.

Every trained arm of a seed starts from the same initial encoder and predictor and sees the same
images, crops and masks in the same order; only the targets differ. The main arms (I-JEPA and the
default DMT-JEPA) run on every seed, the ablations (one target setting changed from the DMT-JEPA
base) on fewer, the untrained control on fewer still. Each run's target encoder (the EMA, the
deployed model), its context encoder and the average of its target encoder over the last quarter
of training are evaluated frozen: the primary figure is the class-balanced closed-form dense probe
(`dmt_jepa.evaluation.balanced`) for figure-ground and 11 classes, on a validation split (what
any choice is made on) and a test split (what is reported); the SGD probe of earlier versions,
kNN and linear probes are kept as secondary figures of the target encoder. Targets' locality and
their cosine to their own patch are measured at init, during training and at the end. The report
gives per-seed paired differences against I-JEPA with their standard error across seeds and the
test set's bootstrap standard error.

    python benchmarks/study.py --out runs/study --report docs/results.md
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shutil
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
    LabelledSet,
    evaluate_features,
    extract_features,
    perfect_patch_miou,
    read_labelled_shards,
)
from dmt_jepa.evaluation.balanced import fit_balanced_probe, per_image_confusions, scores
from dmt_jepa.masks import MultiBlockMaskSampler
from dmt_jepa.models import create_encoder
from dmt_jepa.objective import DMTJEPA, train_step
from dmt_jepa.scenes import BACKGROUNDS, KINDS, PALETTES, write_scene_shards
from dmt_jepa.scenes_cache import progress_lines
from dmt_jepa.viz import attention_picture, curves_picture, pca_picture, read_log, save_png

# The DMT-JEPA settings every ablation starts from (the paper's head: k = 4 of a 3x3 window,
# 2 cross-attention blocks, the patch's own feature as query, the public code's context path).
BASE = {
    "aggregation": "cross_attention",
    "query": "self",
    "k": 4,
    "k_size": 3,
    "head_depth": 2,
    "context": "tokens",
    "include_self": False,
    "plain_weight": 0.0,
}
# Arm name -> (target settings, label); settings None: the untrained encoder.
ARMS: dict[str, tuple[dict | None, str]] = {
    "i-jepa": ({"aggregation": "none"}, "I-JEPA (aggregation none)"),
    "dmt-jepa": (BASE, "DMT-JEPA (k 4 of 3x3, 2-block head, own-feature query, token context path)"),
    "dmt-jepa-k1": (BASE | {"k": 1}, "DMT-JEPA, k = 1"),
    "dmt-jepa-k2": (BASE | {"k": 2}, "DMT-JEPA, k = 2"),
    "dmt-jepa-k8": (BASE | {"k": 8}, "DMT-JEPA, k = 8 (the whole 3x3 window)"),
    "dmt-jepa-window5": (BASE | {"k_size": 5}, "DMT-JEPA, 5x5 window"),
    "dmt-jepa-learned": (BASE | {"query": "learned"}, "DMT-JEPA, query = a learned token"),
    "dmt-jepa-mean": (BASE | {"query": "mean"}, "DMT-JEPA, query = the image's mean token"),
    "dmt-jepa-with-self": (BASE | {"include_self": True}, "DMT-JEPA, the patch itself among the keys"),
    "dmt-jepa-depth1": (BASE | {"head_depth": 1}, "DMT-JEPA, 1-block head"),
    "dmt-jepa-added": (BASE | {"context": "added"}, "DMT-JEPA, context path `added`"),
    "dmt-jepa-no-context": (BASE | {"context": "none"}, "DMT-JEPA, no context path (head untrained, targets only)"),
    "mean-pool": (BASE | {"aggregation": "mean"}, "DMT-JEPA's neighbour targets without its head (mean of 4 of 3x3)"),
    "dmt-jepa-mix": (BASE | {"plain_weight": 0.5}, "DMT-JEPA, loss half on own-patch targets"),
    "random": (None, "random init"),
}
LABELS = {arm: label for arm, (_, label) in ARMS.items()}


def _default_arm() -> str:
    """The arm whose target settings are what a plain `dmtjepa pretrain` trains."""
    default = asdict(TargetConfig())
    for arm, (settings, _) in ARMS.items():
        if settings is not None and all(default[k] == v for k, v in settings.items()):
            if settings.get("aggregation") != "none" or default["aggregation"] == "none":
                return arm
    return "dmt-jepa"


DEFAULT_ARM = _default_arm()
# Main arms, run on every unit: I-JEPA, DMT-JEPA's neighbour targets without its head, the paper's head, and
# whatever `dmtjepa pretrain` trains.
MAIN_ARMS = list(dict.fromkeys(["i-jepa", "mean-pool", "dmt-jepa", DEFAULT_ARM]))
# Report name -> where it sits in a job record. "sem" is the per-pixel probe over every class (background
# and one per object class), "fg" the same probe with every object merged into one figure class.
METRICS = {
    "sem_val": ("target", "val", "dense", "miou"),
    "sem": ("target", "test", "dense", "miou"),
    "fg_val": ("target", "val", "fg", "miou"),
    "fg": ("target", "test", "fg", "miou"),
    "knn": ("secondary", "knn", "top1"),
    "linear": ("secondary", "linear", "top1"),
}
# The pre-declared rule (docs/results.md) that chooses the default of `dmtjepa pretrain`: the DMT-JEPA arm
# with the highest mean paired difference to I-JEPA in RULE_FIGURE, over data draws, wins if that mean is
# positive and at least RULE_MARGIN standard errors (the data draw as the unit); otherwise I-JEPA.
RULE_FIGURE = "sem_val"
RULE_MARGIN = 2.0


def _has(record: dict, name: str) -> bool:
    try:
        metric(record, name)
    except KeyError:
        return False
    return True


def metric(record: dict, name: str) -> float:
    value = record
    for key in METRICS[name]:
        value = value[key]
    return value


@dataclass
class StudyConfig:
    """Everything that defines one study. The defaults are study v4 (docs/results.md): 8 data draws x 4 model
    seeds of the main arms, the untrained head and the untrained encoder on model seed 0 of every draw,
    about 112 jobs of 4-5 worker-minutes on a 2-core CPU."""

    data_seeds: list[int] = field(default_factory=lambda: list(range(8)))  # one scenes draw each, crossed with the model seeds
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    ablation_seeds: list[int] = field(default_factory=lambda: [0])
    control_seeds: list[int] = field(default_factory=lambda: [0])
    arms: list[str] = field(default_factory=lambda: list(MAIN_ARMS))
    ablations: list[str] = field(default_factory=lambda: ["dmt-jepa-no-context"])
    controls: list[str] = field(default_factory=lambda: ["random"])
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: float = 0.1  # fraction of steps with a linear lr warm-up
    weight_decay: float = 0.04
    ema: tuple[float, float] = (0.99, 1.0)
    arch: str = "vit_nano"
    patch_size: int = 8
    image_size: int = 64
    pred_width: int = 64
    pred_depth: int = 2
    min_keep: int = 10
    # The reported study (docs/results.md) drew per-batch mask sizes; static sizes predict fewer target
    # patches (docs/method.md), so they are a different budget and need a study of their own.
    static_masks: bool = False
    crop_scale: tuple[float, float] = (0.3, 1.0)
    train_scenes: int = 6000
    val_scenes: int = 600  # the first held-out scenes; the rest are the test split
    test_scenes: int = 2400
    scenes: str = "textures"  # the kind of objects in the scenes (dmt_jepa.scenes.KINDS)
    background: str = "plain"  # behind them: a photo crop or a plain colour (dmt_jepa.scenes.BACKGROUNDS)
    palette: str = "mono"  # random hues, or black and white on grey (dmt_jepa.scenes.PALETTES)
    bootstrap: int = 1000
    locality_every: int = 100
    locality_images: int = 64  # validation scenes on which target locality is measured
    picture_index: int = 5
    workers: int = 2
    threads: int = 1
    device: str = "cpu"

    def jobs(self) -> list[tuple[str, int, int]]:
        """(arm, data seed, model seed) triples: the main arms model seed by model seed, each over every data draw
        (a cut run holds whole pairs on as many draws as possible), then controls, then ablations arm by arm."""
        main = [(a, d, s) for s in self.seeds for d in self.data_seeds for a in self.arms]
        controls = [(a, d, s) for a in self.controls for s in self.control_seeds for d in self.data_seeds]
        ablations = [(a, d, s) for a in self.ablations for s in self.ablation_seeds for d in self.data_seeds]
        return list(dict.fromkeys(main + controls + ablations))


def job_name(arm: str, data_seed: int, seed: int) -> str:
    """The stem of a job's files: its record, confusions, training log and encoder."""
    return f"{arm}-data{data_seed}-seed{seed}"


def data_dir(out: Path, data_seed: int) -> Path:
    return out / f"data{data_seed}"


def unit(record: dict) -> tuple[int, int]:
    """What pairs two arms' runs: the same data draw and the same model seed."""
    return record["data_seed"], record["seed"]


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
        mask=MaskConfig(min_keep=cfg.min_keep, static=cfg.static_masks),
        target=TargetConfig(**ARMS[arm][0]),
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


def subset(data: LabelledSet, start: int, stop: int | None) -> LabelledSet:
    """Scenes start..stop of a labelled set."""
    part = slice(start, stop)
    return LabelledSet(
        data.keys[part],
        data.images[part],
        data.labels[part],
        data.segs[part],
        data.boxes[part] if data.boxes is not None else None,
    )


def splits(cfg: StudyConfig, out: Path, data_seed: int) -> tuple[LabelledSet, LabelledSet, LabelledSet]:
    """Train, validation and test scenes of one draw: validation and test are disjoint parts of the held-out scenes."""
    data = data_dir(out, data_seed)
    train, held_out = read_labelled_shards(str(data / "train-*.tar")), read_labelled_shards(str(data / "test-*.tar"))
    return train, subset(held_out, 0, cfg.val_scenes), subset(held_out, cfg.val_scenes, None)


def seg_classes(cfg: StudyConfig) -> int:
    """Per-pixel classes of the study's scenes: background and one per object class."""
    return len(KINDS[cfg.scenes]) + 1


def figure_ground(segs: list[np.ndarray]) -> list[np.ndarray]:
    """Every digit merged into one class: 0 background, 1 figure (ignored pixels stay ignored)."""
    return [np.where(s == 255, 255, (s > 0)).astype(np.uint8) for s in segs]


def probe_scores(train_patches, train_segs, eval_sets: dict, num_classes: int) -> tuple[dict, dict]:
    """Balanced probe fitted on train, scored on each eval set: ({split: scores}, {split: per-image confusions})."""
    probe = fit_balanced_probe(train_patches, train_segs, num_classes=num_classes)
    results, confusions = {}, {}
    for split, (patches, segs) in eval_sets.items():
        confusions[split] = per_image_confusions(probe, patches, segs)
        results[split] = scores(confusions[split].sum(0))
        if num_classes == 2:
            results[split]["bg_iou"], results[split]["fg_iou"] = results[split]["iou_per_class"]
    return results, confusions


def evaluate_encoder(cfg: StudyConfig, encoder, info, train, val, test, dense: bool = True) -> tuple[dict, dict, dict]:
    """Balanced figure-ground (and 11-class) probes on val and test: ({val|test: {fg, dense}}, test confusions, features)."""
    features = {
        name: extract_features(encoder, info, data.images) for name, data in (("train", train), ("val", val), ("test", test))
    }
    result = {"val": {}, "test": {}}
    confusions = {}
    tasks = (("fg", figure_ground, 2), ("dense", lambda s: s, seg_classes(cfg)))
    for task, segs_of, classes in tasks if dense else tasks[:1]:
        eval_sets = {split: (features[split].patches, segs_of(data.segs)) for split, data in (("val", val), ("test", test))}
        scored, conf = probe_scores(features["train"].patches, segs_of(train.segs), eval_sets, classes)
        for split in ("val", "test"):
            result[split][task] = scored[split]
        confusions[task] = conf["test"]
    return result, confusions, features


def run_arm(cfg: StudyConfig, arm: str, data_seed: int, seed: int, out: Path, picture_dir: Path, jobs: Path) -> dict:
    """Train (or not) one arm from one model seed on one data draw, save its target encoder, evaluate it frozen.

    The encoder and training log go to `out`; the job's record and test confusions to `jobs`."""
    torch.set_num_threads(cfg.threads)
    tic = time.perf_counter()
    name = job_name(arm, data_seed, seed)
    train, val, test = splits(cfg, out, data_seed)
    probe_images = normalise(torch.from_numpy(np.stack(val.images[: cfg.locality_images])).permute(0, 3, 1, 2) / 255.0)
    result = {"arm": arm, "data_seed": data_seed, "seed": seed}
    torch.manual_seed(seed)
    if ARMS[arm][0] is None:
        encoder = create_encoder(cfg.arch, patch_size=cfg.patch_size, img_size=cfg.image_size)
    else:
        images = torch.from_numpy(np.stack(train.images)).permute(0, 3, 1, 2).contiguous()  # [N, 3, S, S] uint8
        model, facts = pretrain(cfg, arm, seed, images, probe_images, out / f"{name}.jsonl")
        encoder = model.target_encoder
        result.update(facts)
    train_s = time.perf_counter() - tic
    encoder.eval()
    info = info_from_encoder(encoder, cfg.arch, {"study": arm, "data_seed": data_seed, "seed": seed})
    result["target"], confusions, features = evaluate_encoder(cfg, encoder, info, train, val, test)
    path = save_encoder(out / f"{name}.safetensors", encoder.cpu(), info)
    # Image-level semantics of the pooled features: kNN and logistic regression on the dominant object's class.
    result["secondary"] = evaluate_features(
        ("knn", "linear"), train, test, features["train"], features["test"], EvalOptions(seed=seed)
    )
    np.savez_compressed(jobs / f"{name}-confusions.npz", **{f"target_{t}": c for t, c in confusions.items()})
    first = (min(cfg.data_seeds), min(cfg.seeds + cfg.ablation_seeds + cfg.control_seeds))
    if (data_seed, seed) == first and arm in cfg.arms + cfg.controls:
        scene = test.images[cfg.picture_index]
        result["pictures"] = [
            str(save_png(pca_picture(encoder, info, scene, side=192), picture_dir / f"{arm}-pca.png")),
            str(save_png(attention_picture(encoder, info, scene, side=128), picture_dir / f"{arm}-attention.png")),
        ]
        if ARMS[arm][0] is not None:
            log = read_log(out / f"{name}.jsonl")
            result["pictures"].append(
                str(save_png(curves_picture(log, width=900, height=300), picture_dir / f"{arm}-curves.png"))
            )
    result.update(encoder=str(path), train_s=round(train_s, 1), eval_s=round(time.perf_counter() - tic - train_s, 1))
    line = json.dumps(result)
    record = jobs / f"{name}.json"
    record.with_suffix(".partial").write_text(line)
    os.replace(record.with_suffix(".partial"), record)  # a rerun of the study skips this job; a cut one redoes it
    print(line, file=sys.stderr, flush=True)
    return result


def two_level(values: dict[tuple[int, int], float]) -> dict:
    """A figure over (data seed, model seed) units, with the data draw as the unit of replication.

    mean: the mean over draws of each draw's mean over its model seeds; se: the SD of those draw means
    over sqrt(draws). The variance is split as in a one-way random-effects model (method of moments):
    sd_within, the pooled SD between model seeds inside a draw; sd_between, the SD the draws add on
    their own (the draw means' variance less what within-draw noise alone puts into them, floored at 0).
    """
    by_draw: dict[int, list[float]] = {}
    for (draw, _), value in sorted(values.items()):
        by_draw.setdefault(draw, []).append(value)
    means = {draw: statistics.mean(v) for draw, v in by_draw.items()}
    out = {
        "draws": len(means),
        "units": len(values),
        "per_draw": {str(d): round(m, 3) for d, m in means.items()},
        "mean": statistics.mean(means.values()),
    }
    spread = statistics.stdev(means.values()) if len(means) > 1 else float("nan")
    out["sd_draw_means"], out["se"] = spread, spread / math.sqrt(len(means))
    within = [statistics.variance(v) for v in by_draw.values() if len(v) > 1]
    out["sd_within"] = math.sqrt(statistics.mean(within)) if within else float("nan")
    if within and len(means) > 1:
        per_draw = len(by_draw) / sum(1 / len(v) for v in by_draw.values())  # harmonic mean of model seeds per draw
        out["sd_between"] = math.sqrt(max(0.0, spread**2 - out["sd_within"] ** 2 / per_draw))
    else:
        out["sd_between"] = float("nan")
    return out


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Each arm's figures over its units (two levels) and its target locality at the end of training."""
    table = {}
    for arm, runs in results.items():
        row = {name: two_level({unit(r): metric(r, name) for r in runs}) for name in METRICS if all(_has(r, name) for r in runs)}
        if "locality_final" in runs[0]:
            for key in ("within_image_share", "cos_to_image_mean", "cos_to_own_patch"):
                row[key] = statistics.mean(r["locality_final"][key] for r in runs)
        table[arm] = row
    return table


def paired_differences(results: dict[str, list[dict]], baseline: str = "i-jepa", names=tuple(METRICS)) -> dict[str, dict]:
    """Each arm minus the baseline on the same (data seed, model seed), summarised over two levels."""
    base = {unit(r): r for r in results.get(baseline, [])}
    out = {}
    for arm, runs in results.items():
        pairs = {unit(r): (r, base[unit(r)]) for r in runs if arm != baseline and unit(r) in base}
        if not pairs:
            continue
        out[arm] = {"units": sorted(pairs)}
        for name in names:
            try:
                diffs = {u: metric(r, name) - metric(b, name) for u, (r, b) in pairs.items()}
            except KeyError:
                continue
            out[arm][name] = two_level(diffs)
    return out


def _miou_of(confusion: np.ndarray) -> np.ndarray:
    """mIoU (%) of summed confusions [..., C, C] -> [...]."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1).astype(np.float64)
    union = confusion.sum(-2) + confusion.sum(-1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return 100.0 * np.nanmean(iou, axis=-1)


def bootstrap_paired_se(
    jobs: Path,
    arm: str,
    units: list[tuple[int, int]],
    key: str = "target_dense",
    baseline: str | None = "i-jepa",
    samples: int = 1000,
) -> float:
    """Bootstrap s.e. (over test scenes, resampled jointly for every unit and both arms) of the mean paired difference.

    With baseline None: of the arm's mean figure over the units. Every draw has as many test scenes,
    so one resample of scene indices serves every draw.
    """

    def load(a):
        return np.stack([np.load(jobs / f"{job_name(a, d, s)}-confusions.npz")[key] for d, s in units])  # [U, N, C, C]

    arm_conf = load(arm)
    base_conf = load(baseline) if baseline else None
    rng = np.random.default_rng(0)
    values = []
    n = arm_conf.shape[1]
    for _ in range(samples):
        times = np.bincount(rng.integers(0, n, size=n), minlength=n)  # how often each scene is drawn
        value = _miou_of(np.einsum("n,sncd->scd", times, arm_conf))
        if base_conf is not None:
            value = value - _miou_of(np.einsum("n,sncd->scd", times, base_conf))
        values.append(value.mean())
    return float(np.std(values, ddof=1))


def select_default(paired: dict, candidates: list[str]) -> dict:
    """The pre-declared rule: the candidate with the best mean paired RULE_FIGURE over data draws, if it is ahead
    of I-JEPA by at least RULE_MARGIN standard errors with the draw as the unit; otherwise I-JEPA.

    Only arms run on as many units as the best-covered one compete: a 4-seed mean beside 30-seed
    ones would win on its noise (a 5x5 window at -0.44 on 4 seeds was -2.45 over 30).
    """
    run = [a for a in candidates if a in paired and RULE_FIGURE in paired[a]]
    if not run:
        return {"arm": "i-jepa", "reason": "no DMT-JEPA arm was run"}
    most = max(len(paired[a]["units"]) for a in run)
    best = max((a for a in run if len(paired[a]["units"]) == most), key=lambda a: paired[a][RULE_FIGURE]["mean"])
    d = paired[best][RULE_FIGURE]
    told = f"{best}: {d['mean']:+.2f} +- {d['se']:.2f} over {d['draws']} draws ({most} runs)"
    if d["draws"] > 1 and d["mean"] > 0 and d["mean"] >= RULE_MARGIN * d["se"]:
        return {"arm": best, "reason": f"ahead of I-JEPA by at least {RULE_MARGIN:g} s.e. on validation ({told})"}
    return {"arm": "i-jepa", "reason": f"no DMT-JEPA arm is ahead of I-JEPA by {RULE_MARGIN:g} s.e. on validation (best {told})"}


def _two(value: float) -> str:
    """A figure to 2 decimals, or "-" where it does not exist (nan: no split of one model seed per draw)."""
    return f"{value:.2f}" if value == value else "-"


def _pm(value: tuple[float, float] | dict, digits: int = 2) -> str:
    mean, spread = value if isinstance(value, tuple) else (value["mean"], value["se"])
    return f"{mean:.{digits}f} +- {spread:.{digits}f}"


FIGURE_NAMES = {
    "sem_val": "semantic mIoU *val*",
    "sem": "semantic mIoU",
    "fg_val": "figure-ground *val*",
    "fg": "figure-ground",
    "knn": "kNN top-1",
    "linear": "linear top-1",
}


def write_report(path: Path, cfg: StudyConfig, summary: dict, command: str, pictures: dict, reduced: bool) -> None:
    """The markdown report: what the benchmark sees, the two-level tables, the rule and its output, setup, pictures."""
    table, paired = summary["table"], summary["paired"]
    grid = cfg.image_size // cfg.patch_size
    classes = len(KINDS[cfg.scenes])
    lines = ["# DMT-JEPA vs I-JEPA on the scenes benchmark", ""]
    if reduced:
        lines += ["**Reduced run**: fewer seeds or steps than the published configuration; read the numbers as indicative.", ""]
    if not summary["complete"]:
        done, wanted = summary["jobs_done"], summary["jobs_wanted"]
        lines += [
            f"**Partial**: {done} of the {wanted} jobs of this configuration have run; every table holds only "
            "those, and the rule's output below is not applied to the shipped default.",
            "",
        ]
    if summary["departures"]:
        lines += [
            "**Another configuration than the declared study**: "
            + ", ".join(summary["departures"])
            + ". The rule's output below is reported, not applied to the shipped default.",
            "",
        ]
    lines += [
        f"{cfg.arch}/{cfg.patch_size} at {cfg.image_size} px: {'an' if str(grid).startswith('8') or grid in (11, 18) else 'a'} "
        f"{grid}x{grid} patch grid; `{cfg.scenes}` scenes on "
        f"`{cfg.background}` backgrounds in the `{cfg.palette}` palette ({classes} object classes). Data draws (data seeds) "
        f"{', '.join(map(str, cfg.data_seeds))}, crossed with model seeds {', '.join(map(str, cfg.seeds))} for the main "
        f"arms; ablations on model seeds {', '.join(map(str, cfg.ablation_seeds))}; untrained control on model seeds "
        f"{', '.join(map(str, cfg.control_seeds))}. Figures in %, on {cfg.test_scenes} held-out test scenes of each draw "
        f"unless marked *val* ({cfg.val_scenes} other held-out scenes, on which any choice is made). Primary figure: "
        f"**semantic mIoU**, the class-balanced closed-form linear probe (`dmt_jepa.evaluation.balanced`) over "
        f"{classes + 1} per-pixel classes (background and each object class) on the frozen target encoder; secondary: "
        "figure-ground mIoU (every object one class) and kNN / linear top-1 of the dominant object's class "
        f"(chance {100 / classes:.1f}).",
        "",
        f"Ceiling of a perfect per-patch predictor at this grid: semantic {summary['ceiling']['sem']:.1f}, figure-ground "
        f"{summary['ceiling']['fg']:.1f}.",
        "",
        "## Each arm: mean over data draws +- s.e. (the draw as the unit)",
        "",
        "| arm | runs (draws) | " + " | ".join(FIGURE_NAMES[m] for m in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for arm, row in table.items():
        any_figure = next(iter(row.values()))
        cells = " | ".join(_pm(row[m]) if m in row else "-" for m in METRICS)
        lines.append(f"| {LABELS[arm]} | {any_figure['units']} ({any_figure['draws']}) | {cells} |")
    lines += [
        "",
        "## Two levels: how much the draw of the data and the model seed each move the figures",
        "",
        "Per arm and per paired difference against I-JEPA (same draw, same model seed: same init, data order and masks): "
        "the mean of each draw, the grand mean +- s.e. over draws, the SD between draw means, and the variance split "
        "into an SD that the draws add on their own and the pooled SD between model seeds inside a draw. "
        "Test-set s.e.: bootstrap over the test scenes (resampled jointly for every run and both arms) of the mean "
        "semantic difference.",
        "",
        "| arm | figure | per draw | mean +- s.e. (draws) | SD of draw means | SD between draws | SD within a draw | test-set s.e. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, source in (("", table), ("minus I-JEPA: ", paired)):
        for arm, row in source.items():
            for name in ("sem_val", "sem", "fg_val", "fg"):
                if name not in row:
                    continue
                d = row[name]
                per_draw = ", ".join(f"{v:+.2f}" if label else f"{v:.2f}" for v in d["per_draw"].values())
                boot = summary["test_set_se"].get(arm, float("nan")) if label and name == "sem" else float("nan")
                sds = " | ".join(_two(d[k]) for k in ("sd_draw_means", "sd_between", "sd_within"))
                lines.append(f"| {label}{LABELS[arm]} | {FIGURE_NAMES[name]} | {per_draw} | {_pm(d)} | {sds} | {_two(boot)} |")
    if summary["ablation_table"]:
        lines += [
            "",
            f"## Ablations: one setting changed from `dmt-jepa`, on model seeds {', '.join(map(str, cfg.ablation_seeds))}",
            "",
            "Paired against I-JEPA on the same units; mean +- s.e. over draws. Target locality at the end of training on "
            "validation scenes: within-image share of the targets' variance, their cosine to their image's mean target "
            "and to their own patch's feature.",
            "",
            "| arm | runs | semantic minus I-JEPA | *val* | figure-ground minus I-JEPA | within-image share | cos to image mean | cos to own patch |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for arm, row in summary["ablation_table"].items():
            lines.append(
                f"| {LABELS[arm]} | {row['runs']} | {_pm(row['sem'])} | {_pm(row['sem_val'])} | {_pm(row['fg'])} | "
                f"{row['within_image_share']:.3f} | {row['cos_to_image_mean']:.3f} | {row['cos_to_own_patch']:.3f} |"
            )
    selection = summary["selection"]
    lines += [
        "",
        "## The rule and its output",
        "",
        f"Declared before the runs (docs/results.md, *The rule*) and applied by `select_default()`: among the DMT-JEPA "
        f"arms run on every unit, the one with the highest mean paired {FIGURE_NAMES[RULE_FIGURE]} against I-JEPA over "
        f"data draws becomes the default if that mean is positive and at least {RULE_MARGIN:g} standard errors (the "
        "draw as the unit); otherwise I-JEPA does.",
        "",
        f"**Output**: `{selection['arm']}` ({selection['reason']}).",
        "",
    ]
    first50 = [r["first_50_steps_s"] for rs in summary["runs"].values() for r in rs if r.get("first_50_steps_s")]
    lines += [
        "## Setup",
        f"- Data: per data seed, `dmtjepa data scenes --kind {cfg.scenes} --background {cfg.background} --palette "
        f"{cfg.palette} --seed D` with "
        f"{cfg.train_scenes} train and {cfg.val_scenes + cfg.test_scenes} held-out scenes of {cfg.image_size} px (see "
        f"docs/scenes.md); the first {cfg.val_scenes} held-out scenes are the validation split, the other "
        f"{cfg.test_scenes} the test split.",
        f"- Model: {cfg.arch}/{cfg.patch_size} at {cfg.image_size} px, predictor {cfg.pred_width} wide x {cfg.pred_depth} deep; "
        "DMT-JEPA base: k = 4 of a 3x3 window, clip border, 2-block cross-attention head, own-feature query, token context "
        f"path, smooth-L1; masks 4 targets of scale 0.15-0.2, context 0.85-1.0, min_keep {cfg.min_keep}"
        f"{', static sizes' if cfg.static_masks else ', sizes drawn per batch'}.",
        f"- Training, identical for every trained arm: {cfg.steps} steps of batch {cfg.batch_size}, AdamW lr {cfg.lr} "
        f"(linear warm-up over {cfg.warmup:.0%} of the steps, then cosine to 0), weight decay {cfg.weight_decay} "
        f"(none on biases and norms), EMA momentum {cfg.ema[0]} -> {cfg.ema[1]}, RandomResizedCrop scale "
        f"{cfg.crop_scale[0]}-{cfg.crop_scale[1]}, fp32, on {cfg.device}. Random init: the same architecture, untrained.",
        "- Probes: a linear pixel classifier on the standardised patch features, upsampled bilinearly to the label size, "
        "fitted by class-balanced weighted least squares (each class weighted by the inverse of its pixel share) in "
        "closed form (float64, ridge 1e-4 of the mean diagonal): deterministic, nothing tuned; kNN (k = 20, T = 0.07) "
        "and logistic regression (C = 1) on pooled features.",
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
    ]
    if pictures:
        lines += [
            f"## Pictures of test scene {cfg.picture_index} (data seed {min(cfg.data_seeds)})",
            "PCA of the patch embeddings (first three components as RGB) beside the scene, and the last-layer "
            "attention of the centre patch (per head, then their mean); for trained arms, the loss, learning rate "
            "and target locality of that run.",
            "",
        ]
    for arm, files in sorted(pictures.items(), key=lambda item: list(ARMS).index(item[0])):
        lines += [f"**{LABELS[arm]}**", ""]
        for file in files:
            label = {"pca": "PCA", "attention": "attention", "curves": "training curves"}[Path(file).stem.rsplit("-", 1)[1]]
            lines += [f"![{label}]({os.path.relpath(file, path.parent)})", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def ablation_table(cfg: StudyConfig, results: dict[str, list[dict]]) -> dict:
    """Each DMT-JEPA arm on the ablation seeds: paired differences against I-JEPA and final target locality."""
    restricted = {a: [r for r in rs if r["seed"] in cfg.ablation_seeds] for a, rs in results.items()}
    paired = paired_differences(restricted, names=("sem", "sem_val", "fg"))
    table = {}
    for arm in [a for a in cfg.arms if a != "i-jepa"] + cfg.ablations:
        runs = restricted.get(arm, [])
        if not runs or "sem" not in paired.get(arm, {}):
            continue
        row = {"runs": len(paired[arm]["units"])} | {name: paired[arm][name] for name in ("sem", "sem_val", "fg")}
        for key in ("within_image_share", "cos_to_image_mean", "cos_to_own_patch"):
            row[key] = statistics.mean(r["locality_final"][key] for r in runs)
        table[arm] = row
    return table


def make_draw(cfg: StudyConfig, out: Path, data_seed: int) -> None:
    """The scenes of one data seed, written aside and renamed when complete."""
    data = data_dir(out, data_seed)
    print(f"making the scenes of data seed {data_seed} in {data}", file=sys.stderr, flush=True)
    partial = data.with_name(data.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_scene_shards(
        partial,
        n_train=cfg.train_scenes,
        n_test=cfg.val_scenes + cfg.test_scenes,
        seed=data_seed,
        image_size=cfg.image_size,
        kind=cfg.scenes,
        background=cfg.background,
        palette=cfg.palette,
        progress=progress_lines(lambda line: print(f"data seed {data_seed}: {line}", file=sys.stderr, flush=True)),
    )
    os.replace(partial, data)


def beside(report: Path, files: list[str]) -> list[Path]:
    """A job's pictures in the report's results folder, copied there if the job drew them elsewhere. A picture left
    on another machine (the record was carried, its run folder was not) keeps the copy already beside the report,
    or is left out."""
    folder = picture_folder(report)
    placed = []
    for file in map(Path, files):
        target = folder / file.name
        if file.exists() and (not target.exists() or not file.samefile(target)):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
        if target.exists():
            placed.append(target)
    return placed


RUN_SETTINGS = ("workers", "threads", "device")  # how a study runs, not what it measures


def departures(cfg: StudyConfig, declared: StudyConfig) -> list[str]:
    """The settings in which `cfg` measures something else than the declared study ("image_size 96 (declared 64)")."""
    ours, theirs = asdict(cfg), asdict(declared)
    return [f"{k} {ours[k]} (declared {theirs[k]})" for k in ours if k not in RUN_SETTINGS and ours[k] != theirs[k]]


def picture_folder(report: Path) -> Path:
    """Where a report's pictures go: a folder of their own beside it, so two reports never share a picture."""
    return report.parent / "results" / report.stem


def selection_path(report: Path) -> Path:
    """Where a complete study leaves its rule's output, beside its report: the shipped default must follow it."""
    return report.parent / "results" / "selection.json"


def run_study(
    cfg: StudyConfig,
    out: Path,
    report: Path | None,
    command: str,
    reduced: bool = False,
    run: bool = True,
    jobs_dir: Path | None = None,
    declared: StudyConfig | None = None,
) -> dict:
    """Data draws, every (arm, data seed, model seed) job not done yet in `out`, evaluation, tables; returns the summary.

    Jobs run in `cfg.workers` processes of `cfg.threads` threads each: on a small shared CPU,
    independent single-threaded runs use the cores better than one multi-threaded run. Each finished
    job leaves ARM-dataD-seedS.json and its test confusions in `jobs_dir` (default out/jobs), so a cut
    study resumes where it stopped; a jobs folder kept apart from `out` (in version control) carries
    a study across machines, since the data draws are remade from their seeds. With run=False only
    the jobs already there are summarised, and a report of fewer jobs than asked for says so. Only a complete
    study of the `declared` configuration (default: StudyConfig(), the study docs/results.md declares its rule for)
    writes the rule's output; another one (a second scale, another benchmark) reports it without applying it.
    """
    jobs_dir = jobs_dir if jobs_dir is not None else out / "jobs"
    unknown = [a for a in cfg.arms + cfg.ablations + cfg.controls if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm {unknown[0]!r}; the arms are {', '.join(ARMS)}.")
    start = time.perf_counter()
    jobs_dir.mkdir(parents=True, exist_ok=True)
    draws = [(cfg, out, d) for d in cfg.data_seeds if not (data_dir(out, d) / "scenes.json").exists()]
    if cfg.workers > 1 and len(draws) > 1:
        with multiprocessing.get_context("spawn").Pool(cfg.workers) as pool:
            pool.starmap(make_draw, draws, chunksize=1)
    else:
        for draw in draws:
            make_draw(*draw)
    picture_dir = picture_folder(report) if report is not None else out / "pictures"
    done = {p.stem: json.loads(p.read_text()) for p in sorted(jobs_dir.glob("*.json"))}
    todo = [job for job in cfg.jobs() if job_name(*job) not in done]
    jobs = [(cfg, arm, d, s, out, picture_dir, jobs_dir) for arm, d, s in todo] if run else []
    if jobs:
        print(f"{len(jobs)} jobs to run, {len(cfg.jobs()) - len(jobs)} already done", file=sys.stderr, flush=True)
    if cfg.workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(cfg.workers) as pool:
            finished = pool.starmap(run_arm, jobs, chunksize=1)
    else:
        finished = [run_arm(*job) for job in jobs]
    wanted = set(cfg.jobs())
    finished += [r for r in done.values() if (r["arm"], *unit(r)) in wanted]
    results = {a: sorted((r for r in finished if r["arm"] == a), key=unit) for a in ARMS}
    results = {a: rs for a, rs in results.items() if rs}
    held_out = [
        read_labelled_shards(str(data_dir(out, d) / "test-*.tar"))
        for d in cfg.data_seeds
        if (data_dir(out, d) / "scenes.json").exists()
    ]
    grid = (cfg.image_size // cfg.patch_size,) * 2
    segs = [s for data in held_out for s in data.segs[cfg.val_scenes :]]  # the test split of every draw
    ceiling = {
        "fg": perfect_patch_miou(figure_ground(segs), grid, num_classes=2),
        "sem": perfect_patch_miou(segs, grid, num_classes=seg_classes(cfg)),
    }
    paired = paired_differences(results)
    test_se = {arm: bootstrap_paired_se(jobs_dir, arm, d["units"], samples=cfg.bootstrap) for arm, d in paired.items()}
    candidates = [a for a in cfg.arms + cfg.ablations if a != "i-jepa" and a in paired]
    summary = {
        "config": asdict(cfg),
        "default_arm": DEFAULT_ARM,
        "complete": len(finished) == len(wanted),
        "departures": departures(cfg, declared if declared is not None else StudyConfig()),
        "jobs_done": len(finished),
        "jobs_wanted": len(wanted),
        "table": summarise(results),
        "paired": paired,
        "test_set_se": test_se,
        "ablation_table": ablation_table(cfg, results),
        "selection": select_default(paired, candidates),
        "ceiling": ceiling,
        "wall_s": round(time.perf_counter() - start, 1),
        "job_s": round(sum(r["train_s"] + r["eval_s"] for r in finished), 1),
        "runs": {a: [{k: v for k, v in r.items() if k != "pictures"} for r in rs] for a, rs in results.items()},
        "machine": machine(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if report is not None:
        pictures = {r["arm"]: placed for r in finished if "pictures" in r and (placed := beside(report, r["pictures"]))}
        write_report(report, cfg, summary, command, pictures, reduced)
        if summary["complete"] and not reduced and not summary["departures"]:
            selection = {
                "arm": summary["selection"]["arm"],
                "reason": summary["selection"]["reason"],
                "settings": ARMS[summary["selection"]["arm"]][0],
                "command": command,
            }
            selection_path(report).parent.mkdir(parents=True, exist_ok=True)
            selection_path(report).write_text(json.dumps(selection, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    defaults = StudyConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="Directory for data, encoders and logs.")
    parser.add_argument(
        "--jobs",
        type=Path,
        default=None,
        help="Folder of the job records and test confusions (default OUT/jobs); keep it to resume elsewhere.",
    )
    parser.add_argument("--report", type=Path, default=None, help="Markdown report to write (e.g. docs/results.md).")
    parser.add_argument("--data-seeds", type=int, nargs="+", default=defaults.data_seeds, help="Data draws (scenes seeds).")
    parser.add_argument("--seeds", type=int, nargs="+", default=defaults.seeds, help="Model seeds of the main arms.")
    parser.add_argument("--ablation-seeds", type=int, nargs="*", default=defaults.ablation_seeds)
    parser.add_argument("--control-seeds", type=int, nargs="*", default=defaults.control_seeds)
    parser.add_argument("--arms", nargs="+", default=defaults.arms, help=f"Main arms, of: {', '.join(ARMS)}.")
    parser.add_argument("--ablations", nargs="*", default=defaults.ablations, help="Ablation arms (run on --ablation-seeds).")
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
    parser.add_argument("--val-scenes", type=int, default=defaults.val_scenes)
    parser.add_argument("--test-scenes", type=int, default=defaults.test_scenes)
    parser.add_argument("--scenes", choices=list(KINDS), default=defaults.scenes, help="Kind of objects in the scenes.")
    parser.add_argument("--background", choices=BACKGROUNDS, default=defaults.background, help="Behind the objects.")
    parser.add_argument("--palette", choices=PALETTES, default=defaults.palette, help="Colours of objects and background.")
    parser.add_argument("--static-masks", action="store_true", help="Fixed mask sizes (pretrain's default); off: per batch.")
    parser.add_argument("--ema", type=float, nargs=2, default=defaults.ema, help="EMA momentum at the start and end.")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="Jobs run at the same time.")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="Threads of each worker.")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda: where training, features and probes run.")
    parser.add_argument("--reduced", action="store_true", help="Label the report as a reduced run.")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="Summarise the jobs already done; train nothing (missing data draws are remade for the ceiling).",
    )
    args = parser.parse_args(argv)
    cfg = StudyConfig(
        seeds=args.seeds,
        ablation_seeds=args.ablation_seeds,
        control_seeds=args.control_seeds,
        arms=args.arms,
        ablations=args.ablations,
        controls=args.controls,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        arch=args.arch,
        patch_size=args.patch_size,
        image_size=args.image_size,
        pred_width=args.pred_width,
        pred_depth=args.pred_depth,
        train_scenes=args.train_scenes,
        val_scenes=args.val_scenes,
        test_scenes=args.test_scenes,
        workers=args.workers,
        threads=args.threads,
        data_seeds=args.data_seeds,
        ema=tuple(args.ema),
        device=args.device,
        static_masks=args.static_masks,
        scenes=args.scenes,
        background=args.background,
        palette=args.palette,
    )
    command = "python benchmarks/study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = run_study(cfg, args.out, args.report, command, reduced=args.reduced, run=not args.report_only, jobs_dir=args.jobs)
    print(
        json.dumps(
            {
                "paired": summary["paired"],
                "test_set_se": summary["test_set_se"],
                "selection": summary["selection"],
                "ceiling": summary["ceiling"],
                "wall_s": summary["wall_s"],
            }
        )
    )


if __name__ == "__main__":
    main()
