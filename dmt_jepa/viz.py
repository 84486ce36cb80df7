"""Pictures of what an encoder learned: PCA of patch embeddings, last-layer attention, training curves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dmt_jepa.encoder_file import EncoderInfo
from dmt_jepa.evaluation.features import to_input
from dmt_jepa.models import VisionTransformer
from dmt_jepa.optional import import_extra


class VizError(ValueError):
    """Input a picture cannot be made from; the message is one sentence for the user."""


def _panel(array: np.ndarray, side: int, resample: Image.Resampling = Image.Resampling.NEAREST) -> Image.Image:
    """A float [h, w] or [h, w, 3] array in [0, 1] (or uint8 image) as a side x side RGB panel."""
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB").resize((side, side), resample)


def _row(panels: list[Image.Image]) -> Image.Image:
    """Panels side by side."""
    side = panels[0].height
    canvas = Image.new("RGB", (side * len(panels), side))
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * side, 0))
    return canvas


def pca_rgb(patches: torch.Tensor) -> np.ndarray:
    """[h, w, D] patch embeddings -> [h, w, 3] in [0, 1]: the first three principal components, min-max scaled."""
    h, w, dim = patches.shape
    x = patches.reshape(h * w, dim).double()
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    components = x @ v[:3].T  # [h*w, <=3]
    # A component's sign is arbitrary; make its largest-magnitude score positive so pictures are reproducible.
    signs = torch.sign(components.gather(0, components.abs().argmax(0, keepdim=True)))
    components = components * torch.where(signs == 0, 1.0, signs)
    low, high = components.min(0).values, components.max(0).values
    scaled = (components - low) / (high - low).clamp_min(1e-12)
    rgb = torch.zeros(h * w, 3, dtype=torch.float64)
    rgb[:, : scaled.shape[1]] = scaled
    return rgb.reshape(h, w, 3).numpy()


@torch.inference_mode()
def pca_picture(
    encoder: VisionTransformer, info: EncoderInfo, image: np.ndarray, *, image_size: int | None = None, side: int = 256
) -> Image.Image:
    """The image beside its patch embeddings' first three principal components as RGB: (2 * side) x side."""
    size = image_size or info.img_size
    x = to_input([image], info, size)
    patches, _ = encoder.dense(x)  # [1, h, w, D]
    shown = Image.fromarray(image).convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    return _row([shown, _panel(pca_rgb(patches[0].float()), side)])


@torch.inference_mode()
def attention_picture(
    encoder: VisionTransformer,
    info: EncoderInfo,
    image: np.ndarray,
    query: tuple[int, int] | None = None,
    *,
    image_size: int | None = None,
    side: int = 160,
) -> Image.Image:
    """Last-layer attention of one query patch: the image (query boxed), each head, and their mean; (heads + 2) * side wide."""
    colormaps = import_extra("matplotlib", "viz", "the attention picture").colormaps

    size = image_size or info.img_size
    x = to_input([image], info, size)
    h, w = x.shape[-2] // info.patch_size, x.shape[-1] // info.patch_size
    row, col = query if query is not None else (h // 2, w // 2)
    if not (0 <= row < h and 0 <= col < w):
        raise VizError(f"query patch ({row}, {col}) is outside the {h} x {w} patch grid; choose row < {h}, column < {w}.")
    attention = encoder.last_layer_attention(x)[0, :, row * w + col]  # [heads, N]
    maps = attention.reshape(-1, h, w).float()
    maps = torch.cat([maps, maps.mean(0, keepdim=True)])  # heads then their mean
    colormap = colormaps["viridis"]
    panels = []
    shown = Image.fromarray(image).convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(shown)
    cell_h, cell_w = side / h, side / w
    draw.rectangle([col * cell_w, row * cell_h, (col + 1) * cell_w - 1, (row + 1) * cell_h - 1], outline=(255, 0, 0), width=2)
    panels.append(shown)
    for m in maps:
        scaled = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
        panels.append(_panel(colormap(scaled.numpy())[:, :, :3], side))
    return _row(panels)


def _event_files(path: Path) -> list[Path]:
    """TensorBoard event files at `path`: the file itself, or those in the folder (RUN_DIR/tensorboard)."""
    if path.is_file():
        return [path] if path.name.startswith("events.out.tfevents") else []
    return sorted(path.glob("events.out.tfevents*")) if path.is_dir() else []


def read_tensorboard(path: str | os.PathLike) -> list[dict]:
    """The records a run's TensorBoard events hold (run.loggers tensorboard), shaped like log.jsonl's: one dict
    per step with the last part of each scalar's tag as its key (train/loss -> loss)."""
    files = _event_files(Path(path))
    if not files:
        raise VizError(f"no TensorBoard event files at {path}; point at RUN_DIR/tensorboard or one events.out.tfevents file.")
    event_accumulator = import_extra(
        "tensorboard.backend.event_processing.event_accumulator", "track", "reading TensorBoard events"
    )
    by_step: dict[int, dict] = {}
    for file in files:
        events = event_accumulator.EventAccumulator(str(file), size_guidance={event_accumulator.SCALARS: 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag.count("/") != 1:  # nested figures (held_out/trained/...) are not curves
                continue
            for event in events.Scalars(tag):
                by_step.setdefault(event.step, {"step": event.step})[tag.split("/")[1]] = event.value
    return [by_step[step] for step in sorted(by_step)]


def read_log(path: str | os.PathLike) -> list[dict]:
    """The per-step records of a run: its JSON-lines log (RUN_DIR/log.jsonl, or the file itself), or its
    TensorBoard events (RUN_DIR/tensorboard, or one event file) where that is what `path` names."""
    path = Path(path)
    if _event_files(path):
        records = read_tensorboard(path)
        if not any("loss" in r for r in records):
            raise VizError(f"the TensorBoard events at {path} hold no train/loss; are they a dmtjepa run's?")
        return records
    log = path / "log.jsonl" if path.is_dir() else path
    if not log.is_file():
        raise VizError(f"no training log at {log}; point at a run directory that holds log.jsonl.")
    records = []
    for number, line in enumerate(log.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise VizError(f"line {number} of {log} is not JSON; the log is damaged.") from None
    if not any("step" in r and "loss" in r for r in records):
        raise VizError(f"{log} holds no records with step and loss; is it a dmtjepa training log?")
    return records


def curves_picture(records: list[dict], *, width: int = 1000, height: int = 400) -> Image.Image:
    """Loss, learning rate and (when logged) target locality against step, side by side: width x height pixels."""
    matplotlib = import_extra("matplotlib", "viz", "the training-curves picture")
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels: list[tuple[str, tuple[str, ...]]] = [("training loss", ("loss",)), ("learning rate", ("lr",))]
    if any("within_image_share" in r for r in records):
        panels.append(("target locality", ("within_image_share", "cos_to_image_mean")))
    dpi = 100
    figure, axes = plt.subplots(1, len(panels), figsize=(width / dpi, height / dpi), dpi=dpi)
    for axis, (title, keys) in zip(axes, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if "step" in r and key in r]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, linewidth=1.2, marker="." if len(keys) > 1 else None, label=key)
        axis.set_xlabel("step")
        axis.set_ylabel(keys[0] if len(keys) == 1 else "")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        if len(keys) > 1:
            axis.set_ylim(0, 1.02)
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.canvas.draw()
    picture = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB")
    plt.close(figure)
    return picture


def save_png(picture: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG atomically (aside, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    picture.save(partial, format="PNG")
    os.replace(partial, path)
    return path


def read_image(path: str | os.PathLike, index: int = 0) -> np.ndarray:
    """An RGB image from an image file, or sample `index` of a WebDataset shard (.tar)."""
    from dmt_jepa.evaluation.data import EvalDataError, image_from_shard

    path = Path(path)
    if not path.is_file():
        raise VizError(f"{path} does not exist; give an image file or a .tar shard.")
    if path.suffix == ".tar":
        try:
            return image_from_shard(path, index)
        except EvalDataError as err:
            raise VizError(str(err)) from None
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as err:
        raise VizError(f"{path} is not a readable image ({err}).") from None
