"""Encoder file -> weights other libraries load: a Hugging Face model directory and a timm checkpoint.

Both are written into a scratch folder, loaded back the way a user would load them and compared
with the encoder file, and only then moved into place (as the ONNX export does):
  hf    config.json (the encoder metadata) + model.safetensors + README.md model card;
        loaded back with `dmt_jepa.from_pretrained`, which must give the same tensors.
  timm  config.json (timm's: architecture, model_args, pretrained_cfg) + model.safetensors with the
        position table stored at the training size + README.md; loaded back with plain
        `timm.create_model("local-dir:OUT", pretrained=True)`, whose patch tokens must equal ours
        at the training size within 1e-5.
The licence in the encoder's provenance goes into both configs and the card; an export cannot
change a licence the file already records.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from dmt_jepa.encoder_file import EncoderInfo, file_sha256, load_encoder
from dmt_jepa.hub import WEIGHTS_FILENAME, PretrainedEncoder, from_pretrained, model_card
from dmt_jepa.models import VisionTransformer, sincos_2d
from export.errors import ExportError, ParityError
from export.onnx_export import fresh_scratch

WEIGHT_FORMATS = ("hf", "timm")
TIMM_TOLERANCE = 1e-5  # max abs difference of the patch tokens at the training size
TIMM_FALLBACK_ARCHITECTURE = "vit_base_patch16_224"  # model_args carry the real shape whatever the name


def resolve_license(info: EncoderInfo, license: str | None) -> EncoderInfo:
    """`info` with `license` recorded where it records none; a different recorded licence is an error."""
    recorded = info.provenance.get("license")
    if license is None or license == recorded:
        return info
    if recorded:
        raise ExportError(
            f"the encoder file records the licence {recorded!r}; an export cannot relicense it as {license!r} "
            "(drop --license)."
        )
    return replace(info, provenance={**info.provenance, "license": license})


def evaluation_records(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """Headline figures from JSON lines that `dmtjepa eval ...` printed, as model-card rows."""
    metrics = {
        "knn": [("top1", "top-1 %")],
        "linear": [("top1", "top-1 %")],
        "dense": [("miou", "mIoU %")],
        "detect": [("ap", "box AP"), ("ap50", "box AP50")],
    }
    records = []
    for path in paths:
        try:
            lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip().startswith("{")]
        except (OSError, json.JSONDecodeError) as err:
            raise ExportError(f"cannot read evaluation results from {path} ({err}); give the JSON printed by dmtjepa eval.") from err
        for result in lines:
            data = f"{result.get('train', '?')} train / {result.get('test', '?')} test images"
            for task, pairs in metrics.items():
                for key, metric in pairs:
                    if isinstance(result.get(task), dict) and key in result[task]:
                        records.append({"task": task, "metric": metric, "value": float(result[task][key]), "data": data})
    if paths and not records:
        raise ExportError(f"no evaluation figures in {', '.join(map(str, paths))}; give the JSON printed by dmtjepa eval.")
    return records


def _as_json(info: EncoderInfo) -> dict:
    """What a JSON config can hold of `info` (tuples become lists), for comparing a round trip."""
    return json.loads(json.dumps(asdict(info)))


def _prepare(encoder_path, license, evaluation) -> tuple[VisionTransformer, EncoderInfo]:
    encoder, info = load_encoder(encoder_path)
    info = resolve_license(info, license)
    extra = {"exported_from": {"file": Path(encoder_path).name, "sha256": file_sha256(encoder_path)}}
    if evaluation:
        extra["evaluation"] = evaluation_records(evaluation)
    return encoder, replace(info, provenance={**info.provenance, **extra})


def export_weights(
    encoder_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    format: str,
    *,
    license: str | None = None,
    evaluation: Sequence[str | os.PathLike] = (),
    log: Callable[[str], None] = print,
) -> Path:
    """Write the `format` ("hf" or "timm") directory into `out_dir`: into a scratch folder first,
    loaded back and compared there, then moved into place (an older export survives a failure)."""
    assert format in WEIGHT_FORMATS, format
    encoder, info = _prepare(encoder_path, license, evaluation)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create the output folder {out_dir} ({err.strerror}); choose a writable --out.") from err
    write, check = (_write_hf, _check_hf) if format == "hf" else (_write_timm, _check_timm)
    scratch = fresh_scratch(out_dir, f"{format}-weights")
    try:
        write(scratch, encoder, info)
        check(scratch, encoder, info, log)
        for item in scratch.iterdir():
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"wrote {out_dir} (config.json, {WEIGHTS_FILENAME}, README.md; licence {info.provenance.get('license', 'unspecified')})")
    return out_dir


def _write_hf(directory: Path, encoder: VisionTransformer, info: EncoderInfo) -> None:
    model = PretrainedEncoder.from_info(info)
    model.load_state_dict(encoder.state_dict())
    model.save_pretrained(directory)


def _check_hf(directory: Path, encoder: VisionTransformer, info: EncoderInfo, log: Callable[[str], None]) -> None:
    """`dmt_jepa.from_pretrained` must give every tensor and the whole config back."""
    loaded = from_pretrained(directory)
    ours = encoder.state_dict()
    differing = [k for k, v in loaded.state_dict().items() if not torch.equal(v, ours[k])]
    if differing or _as_json(loaded.info) != _as_json(info):
        raise ParityError(f"the model directory does not load back as the encoder file {differing[:1]}; not kept.", [])
    log(f"loaded back with dmt_jepa.from_pretrained: {len(ours)} tensors equal, config equal")


def timm_architecture(info: EncoderInfo) -> str:
    """timm's registered name for this size, else a ViT name whose model_args are then overridden in full."""
    import timm

    name = f"{info.arch}_patch{info.patch_size}_224"
    return name if timm.is_model(name) else TIMM_FALLBACK_ARCHITECTURE


def timm_config(info: EncoderInfo) -> dict:
    """timm's config.json: the layout timm uses for its own I-JEPA weights (no class token, mean pool)."""
    height, width = info.img_size
    return {
        "architecture": timm_architecture(info),
        "num_classes": 0,
        "num_features": info.embed_dim,
        "model_args": {
            "img_size": [height, width],
            "patch_size": info.patch_size,
            "embed_dim": info.embed_dim,
            "depth": info.depth,
            "num_heads": info.num_heads,
            "mlp_ratio": info.mlp_ratio,
            "class_token": False,
            "global_pool": "avg",
            "fc_norm": False,  # keeps the final LayerNorm on the tokens, where our encoder has it
            "num_classes": 0,
            "dynamic_img_size": True,  # other sizes run, with the stored table interpolated
        },
        "pretrained_cfg": {
            "input_size": [3, height, width],
            "fixed_input_size": False,
            "mean": list(info.pixel_mean),
            "std": list(info.pixel_std),
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "num_classes": 0,
            "license": info.provenance.get("license", "unspecified"),
        },
    }


def timm_state_dict(encoder: VisionTransformer) -> dict[str, torch.Tensor]:
    """Our tensors (timm's names already) plus the sin-cos table at the training grid as `pos_embed` [1, N, D]."""
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    state["pos_embed"] = sincos_2d(*encoder.grid_size, encoder.embed_dim)[None].contiguous()
    return state


def _write_timm(directory: Path, encoder: VisionTransformer, info: EncoderInfo) -> None:
    (directory / "config.json").write_text(json.dumps(timm_config(info), indent=2) + "\n")
    save_file(timm_state_dict(encoder), str(directory / WEIGHTS_FILENAME), metadata={"format": "pt"})
    (directory / "README.md").write_text(model_card(info).content + TIMM_USAGE.format(size=info.img_size[0]))


def _check_timm(directory: Path, encoder: VisionTransformer, info: EncoderInfo, log: Callable[[str], None]) -> None:
    """Plain timm, loading the folder its own way, must give our patch tokens at the training size."""
    import timm

    model = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
    images = torch.randn(2, 3, *info.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = float((model.forward_features(images) - encoder(images)).abs().max())  # [B, N, D] after the norm
    line = f"timm vs dmt-jepa at {info.img_size[0]}x{info.img_size[1]}: max|diff| patch tokens {error:.2e}"
    log(line + ("  ok" if error <= TIMM_TOLERANCE else f"  FAIL: > {TIMM_TOLERANCE:.0e}"))
    if not error <= TIMM_TOLERANCE:
        raise ParityError("timm does not reproduce the encoder at its training size; the checkpoint was not kept.", [line])


TIMM_USAGE = """
## With timm alone

```python
import timm
model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)   # or "hf-hub:USER/REPO"
tokens = model.forward_features(images)   # [B, N, D] patch tokens after the final norm
```
At {size} px (the training size) this equals the dmt-jepa encoder within 1e-5. At other sizes timm
interpolates the stored position table (bicubic), while dmt-jepa computes the sin-cos table
exactly for every grid: the two then differ slightly; use dmt-jepa for sizes other than {size}.
"""
