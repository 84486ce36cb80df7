"""`embed --head`: a trained dense head's label map beside each image's patch grid.

The head (`dmtjepa eval dense --save-head`) is checked to belong to the encoder file before any
work; then each embedded image's float patch grid, as the model gave it and before it is rounded
to the output dtype, is standardised with the head's feature statistics and classified, and the
argmax class per patch is stored as `labels.npy`: uint8 [h, w], uint16 where the head has more
than 255 classes. That is what `eval dense` predicts at patch resolution.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dmt_jepa.encoder_file import file_sha256
from dmt_jepa.evaluation.head import DenseHead, HeadFileError, head_for_encoder

LABELS_STEM = "labels"  # the tar layout's member KEY.labels.npy


@dataclass(frozen=True)
class Labeller:
    """A head checked against the job's encoder file, and the label maps it gives."""

    head: DenseHead
    file: str  # the head file's name, for the records
    sha256: str  # of the head file: part of the run's identity

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.head.num_classes <= 255 else np.uint16)

    def __call__(self, grid: np.ndarray) -> np.ndarray:
        """[B, h, w, D] patch embeddings -> [B, h, w] argmax class per patch."""
        head = self.head
        with torch.no_grad():
            x = (torch.from_numpy(np.asarray(grid, dtype=np.float32)) - head.feature_mean) / head.feature_std
            logits = torch.nn.functional.linear(x, head.weight, head.bias)  # [B, h, w, C]
            return logits.argmax(-1).numpy().astype(self.dtype)

    def describe(self) -> dict:
        """What NAME.json records of the head: enough for a reader to name the classes."""
        return {
            "file": self.file,
            "sha256": self.sha256,
            "class_names": list(self.head.class_names),
            "labels": f"{LABELS_STEM}.npy",
            "dtype": self.dtype.name,
        }


def load_labeller(head_path: str | os.PathLike, model_path: str | os.PathLike) -> Labeller:
    """The head at `head_path` for the encoder file `model_path`; HeadFileError, one sentence, if it does not fit."""
    model_path = Path(model_path)
    if model_path.suffix.lower() != ".safetensors":
        raise HeadFileError(
            f"--head needs --model to be the encoder file the head was trained on (.safetensors), not {model_path.name}; "
            "pass that encoder file."
        )
    head = head_for_encoder(head_path, model_path)
    return Labeller(head, Path(head_path).name, file_sha256(head_path))
