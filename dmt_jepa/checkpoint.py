"""Training checkpoints: one directory per save, written aside and renamed into place.

Layout of `RUN_DIR/checkpoints/step-000001000/`:
- `<module>.safetensors` for every module of the objective (context_encoder, target_encoder,
  predictor, and online_head / target_head when the aggregation has heads);
- `state.pt`: optimizer state, step, data position, RNG states (plain tensors and numbers, so
  `torch.load(..., weights_only=True)` reads it);
- `config.yaml`: the resolved config of the run.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dmt_jepa.checkpoint_paths import PREFIX, CheckpointError, checkpoint_dirs, find_checkpoint  # noqa: F401  (imported from here)
from dmt_jepa.config import TrainConfig, save_config
from dmt_jepa.file_modes import as_umask_allows

MODULES = ("context_encoder", "target_encoder", "predictor", "online_head", "target_head")


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in `obj` (a tensor, or dicts, lists and tuples holding some): what a save of it writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def checkpoint_bytes(model: nn.Module, state: dict) -> int:
    """About the size of the checkpoint `save_checkpoint` writes for `model` and `state`."""
    modules = [getattr(model, name, None) for name in MODULES]
    return sum(tensor_bytes(m.state_dict()) for m in modules if m is not None) + tensor_bytes(state)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    state: dict,
    cfg: TrainConfig,
    *,
    keep: int,
) -> Path:
    """Write checkpoint `step` of `model` with training `state`, then delete all but the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:09d}"
    tmp = root / f".{final.name}.partial"
    for stale in root.glob(".*.partial") if root.is_dir() else []:  # left by a run killed while saving
        shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    try:
        for name in MODULES:
            module = getattr(model, name, None)
            if module is not None:
                weights = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
                save_file(weights, str(tmp / f"{name}.safetensors"))
                as_umask_allows(tmp / f"{name}.safetensors")
        with open(tmp / "state.pt", "wb") as f:  # a file of ours: a full disk is an OSError, not torch's RuntimeError
            torch.save(state, f)
        save_config(cfg, tmp / "config.yaml")
    except BaseException:  # a full disk, or a kill: the partial save goes, the checkpoints before it stay
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # a second save at the same step replaces the first only once it is complete
        old = root / f".{final.name}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    for stale in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(stale)
    return final


def _architecture(cfg_model: dict) -> str:
    return ", ".join(f"{k}={cfg_model[k]}" for k in ("arch", "patch_size", "pred_width", "pred_depth") if k in cfg_model)


def load_checkpoint(path: str | os.PathLike, model: nn.Module, cfg: TrainConfig) -> dict:
    """Load every module's weights from checkpoint `path` into `model`; return its training state."""
    path = Path(path)
    saved_cfg = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    ours = {
        "arch": cfg.model.arch,
        "patch_size": cfg.model.patch_size,
        "pred_width": cfg.model.pred_width,
        "pred_depth": cfg.model.pred_depth,
    }
    theirs = saved_cfg.get("model", {})

    def mismatch(detail: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {path} was made for another architecture ({_architecture(theirs) or detail}) than this "
            f"run's ({_architecture(ours)}); resume with the run's own config or start a new run elsewhere."
        )

    if (
        any(theirs.get(k, v) != v for k, v in ours.items())
        or saved_cfg.get("target", {}).get("aggregation", cfg.target.aggregation) != cfg.target.aggregation
    ):
        raise mismatch("")
    for name in MODULES:
        module = getattr(model, name, None)
        file = path / f"{name}.safetensors"
        if module is None:
            if file.exists():
                raise mismatch(f"it has a {name}")
            continue
        if not file.is_file():
            raise mismatch(f"it has no {name}")
        try:
            weights = load_file(str(file))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file} is unreadable ({err}); resume from an earlier checkpoint.") from err
        try:
            module.load_state_dict(weights, strict=True)
        except RuntimeError as err:
            raise mismatch(f"{name} tensors differ") from err
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path / 'state.pt'} is unreadable ({err}); resume from an earlier checkpoint.") from err
