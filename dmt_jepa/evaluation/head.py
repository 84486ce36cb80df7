"""A trained dense head as a file: the linear pixel classifier of `eval dense`, kept for deployment.

One safetensors file: `weight` [C, D], `bias` [C], `feature_mean` [D], `feature_std` [D] (the
standardisation of the patch embeddings the head was trained on), and in the metadata the class
names, the pixel normalisation the encoder expects, the size the images were resized to, and the
encoder file it was trained on (its sha256), so that export and embed can refuse another encoder
(`head_for_encoder`).
Logits of a patch x are weight @ ((x - feature_mean) / feature_std) + bias; `folded` gives the
same map as one linear layer, the form a deployed graph carries.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

HEAD_FORMAT = "dmt-jepa dense head"
HEAD_VERSION = 1
TENSORS = ("weight", "bias", "feature_mean", "feature_std")


class HeadFileError(ValueError):
    """A head file that cannot be used; the message is one sentence for the user."""


@dataclass
class DenseHead:
    """The head's weights and what it needs to be used."""

    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    feature_mean: torch.Tensor  # [D]
    feature_std: torch.Tensor  # [D]
    class_names: list[str]
    encoder_sha256: str
    patch_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    image_size: tuple[int, int]  # what the images were resized to while the head was trained
    ignore_index: int = 255
    miou: float | None = None  # on the test split it was scored on

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [C, D], bias [C]) of the one linear layer equal to standardise-then-classify."""
        weight = self.weight / self.feature_std  # [C, D]
        return weight, self.bias - weight @ self.feature_mean

    def metadata(self) -> dict[str, str]:
        return {
            "format": HEAD_FORMAT,
            "format_version": str(HEAD_VERSION),
            "class_names": json.dumps(self.class_names),
            "encoder_sha256": self.encoder_sha256,
            "patch_size": str(self.patch_size),
            "pixel_mean": json.dumps(list(self.pixel_mean)),
            "pixel_std": json.dumps(list(self.pixel_std)),
            "image_size": json.dumps(list(self.image_size)),
            "ignore_index": str(self.ignore_index),
            "miou": json.dumps(self.miou),
        }


def save_head(path: str | os.PathLike, head: DenseHead) -> Path:
    """Write the head file aside, then rename it into place."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {name: getattr(head, name).detach().float().cpu().contiguous() for name in TENSORS}
    aside = path.with_name(path.name + ".partial")
    save_file(tensors, str(aside), metadata=head.metadata())
    os.replace(aside, path)
    return path


def load_head(path: str | os.PathLike) -> DenseHead:
    """Read and check a head file; HeadFileError names what is wrong."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise HeadFileError(f"head file {path} does not exist; pass the file `dmtjepa eval dense --save-head` wrote.")
    try:
        with safe_open(str(path), framework="pt") as file:
            meta = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise HeadFileError(f"{path} is not a safetensors file ({err}); pass the file `eval dense --save-head` wrote.") from err
    if meta.get("format") != HEAD_FORMAT or set(tensors) != set(TENSORS):
        raise HeadFileError(f"{path} is not a dense head file; pass the file `dmtjepa eval dense --save-head` wrote.")
    try:
        head = DenseHead(
            **{name: tensors[name].float() for name in TENSORS},
            class_names=json.loads(meta["class_names"]),
            encoder_sha256=meta["encoder_sha256"],
            patch_size=int(meta["patch_size"]),
            pixel_mean=tuple(json.loads(meta["pixel_mean"])),
            pixel_std=tuple(json.loads(meta["pixel_std"])),
            image_size=tuple(json.loads(meta["image_size"])),
            ignore_index=int(meta["ignore_index"]),
            miou=json.loads(meta["miou"]),
        )
    except (KeyError, ValueError, TypeError) as err:
        raise HeadFileError(f"{path} has damaged metadata ({err}); save the head again.") from err
    problem = _problem(head)
    if problem:
        raise HeadFileError(f"{path} {problem}; save the head again.")
    return head


def head_for_encoder(head_path: str | os.PathLike, encoder_path: str | os.PathLike) -> DenseHead:
    """The head at `head_path`, checked to belong to the encoder file at `encoder_path`; HeadFileError if not."""
    from dmt_jepa.encoder_file import EncoderFileError, file_sha256, read_encoder_info

    head = load_head(head_path)
    name = Path(head_path).name
    try:
        info = read_encoder_info(encoder_path)
    except EncoderFileError as err:
        raise HeadFileError(str(err)) from err
    if head.weight.shape[1] != info.embed_dim or head.patch_size != info.patch_size:
        raise HeadFileError(
            f"the head {name} takes {head.weight.shape[1]}-wide patch {head.patch_size} features but the encoder "
            f"gives {info.embed_dim}-wide patch {info.patch_size} ones; use it with the encoder it was trained on."
        )
    if head.encoder_sha256 != file_sha256(encoder_path):
        raise HeadFileError(
            f"the head {name} was trained on another encoder file (sha256 {head.encoder_sha256[:12]}); use it with "
            "that encoder, or train a head on this one with `dmtjepa eval dense --save-head`."
        )
    return head


def _problem(head: DenseHead) -> str | None:
    classes, dim = head.weight.shape if head.weight.ndim == 2 else (0, 0)
    if not classes or head.bias.shape != (classes,) or head.feature_mean.shape != (dim,) or head.feature_std.shape != (dim,):
        return "holds tensors whose shapes do not fit together"
    if len(head.class_names) != classes or not all(isinstance(n, str) for n in head.class_names):
        return f"names {len(head.class_names)} classes for {classes} outputs"
    if not all(torch.isfinite(t).all() for t in (head.weight, head.bias, head.feature_mean, head.feature_std)):
        return "holds values that are not finite"
    if not (head.feature_std > 0).all():
        return "holds a feature_std that is not positive"
    return None
