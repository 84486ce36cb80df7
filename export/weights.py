"""Encoder file -> weights other libraries load: a Hugging Face model directory and a timm checkpoint.

Both are written into a scratch folder, loaded back the way a user would load them and compared
with the encoder file, and only then moved into place (as the ONNX export does):
  hf    transformers' I-JEPA layout (dmt_jepa/hub.py): config.json, model.safetensors,
        preprocessor_config.json, README.md; loaded back with plain
        `transformers.AutoModel.from_pretrained` (no remote code: every tensor found, none left
        over, the patch tokens equal to ours within 1e-5 at the training size, measured at two other
        sizes) and with `dmt_jepa.from_pretrained`, which must give the same tensors and config.
  timm  config.json (timm's: architecture, model_args, pretrained_cfg) + model.safetensors with the
        position table stored at the training size + README.md; loaded back with plain
        `timm.create_model("local-dir:OUT", pretrained=True)`, whose patch tokens must equal ours
        at the training size within 1e-5 (and are measured at two other sizes).
Away from the training size both libraries resize the stored table where dmt-jepa computes sin-cos
again: the measured differences go into the model card (and, for hf, config.json). `--image-size`
stores the table of another grid instead, so the libraries are exact at the size people deploy;
"training size" below is then that size (the size trained at stays in the provenance and the card).
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
from typing import Any

import torch
from safetensors.torch import save_file

from dmt_jepa.encoder_file import EncoderInfo, file_sha256, load_encoder
from dmt_jepa.export.errors import ExportError, ParityError
from dmt_jepa.export.onnx_export import fresh_scratch
from dmt_jepa.export.out_dir import make_readable
from dmt_jepa.hub import CONFIG_FILENAME, WEIGHTS_FILENAME, PretrainedEncoder, from_pretrained, write_model_directory
from dmt_jepa.model_card import model_card
from dmt_jepa.models import VARIANTS, VisionTransformer, sincos_2d

WEIGHT_FORMATS = ("hf", "timm")
TIMM_TOLERANCE = 1e-5  # max abs difference of the patch tokens at the training size
TRANSFORMERS_TOLERANCE = 1e-5  # the same bound for transformers' IJepaModel


def resolve_license(info: EncoderInfo, license: str | None) -> EncoderInfo:
    """`info` with `license` recorded where it records none; a different recorded licence is an error."""
    recorded = info.provenance.get("license")
    if license is None or license == recorded:
        return info
    if recorded:
        raise ExportError(
            f"the encoder file records the licence {recorded!r}; an export cannot relicense it as {license!r} (drop --license)."
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
            raise ExportError(
                f"cannot read evaluation results from {path} ({err}); give the JSON printed by dmtjepa eval."
            ) from err
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
    extra: dict[str, object] = {"exported_from": {"file": Path(encoder_path).name, "sha256": file_sha256(encoder_path)}}
    if evaluation:
        extra["evaluation"] = evaluation_records(evaluation)
    return encoder, replace(info, provenance={**info.provenance, **extra})


def at_size(encoder: VisionTransformer, info: EncoderInfo, size: tuple[int, int], format: str) -> EncoderInfo:
    """`info` (and `encoder`, in place) set to deploy at `size`: the stored position table becomes the sin-cos
    table of that grid, so the other library is exact there; the size trained at stays in the provenance."""
    height, width = size
    p = info.patch_size
    if height < p or width < p or height % p or width % p:
        raise ExportError(f"--image-size {height}x{width} must be a multiple of the patch size {p} on both sides.")
    if format == "hf" and height != width:
        raise ExportError(
            f"transformers' I-JEPA takes square images only; give --image-size {height} or {width} for --format hf."
        )
    if (height, width) == tuple(info.img_size):
        return info
    encoder.img_size = (height, width)  # what grid_size, and so the stored table, follow
    trained = {"trained_img_size": list(info.provenance.get("trained_img_size", info.img_size))}
    return replace(info, img_size=(height, width), provenance={**info.provenance, **trained})


def export_weights(
    encoder_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    format: str,
    *,
    license: str | None = None,
    evaluation: Sequence[str | os.PathLike] = (),
    image_size: tuple[int, int] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the `format` ("hf" or "timm") directory into `out_dir`: into a scratch folder first,
    loaded back and compared there, then moved into place (an older export survives a failure).

    `image_size` (H, W), default the training size: the size the other library is to be exact at."""
    assert format in WEIGHT_FORMATS, format
    encoder, info = _prepare(encoder_path, license, evaluation)
    if image_size is not None:
        info = at_size(encoder, info, image_size, format)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create the output folder {out_dir} ({err.strerror}); choose a writable --out.") from err
    write = _write_hf if format == "hf" else _write_timm
    scratch = fresh_scratch(out_dir, f"{format}-weights")
    try:
        write(scratch, encoder, info, log)
        names = sorted(item.name for item in scratch.iterdir())
        for item in scratch.iterdir():
            make_readable(item)  # safetensors writes 0600 whatever the umask
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"wrote {out_dir} ({', '.join(names)}; licence {info.provenance.get('license', 'unspecified')})")
    return out_dir


def parity_sizes(info: EncoderInfo) -> list[tuple[int, int]]:
    """The training size, then two others where loaders differ: 1.5 times it, and a wider one (patch multiples)."""
    height, width, p = *info.img_size, info.patch_size

    def scaled(side: int, factor: float) -> int:
        return max(p, round(side * factor / p) * p)

    return [(height, width), (scaled(height, 1.5), scaled(width, 1.5)), (height, scaled(width, 5 / 3))]


def parity_row(loader: str, theirs: torch.Tensor, ours: torch.Tensor, size: tuple[int, int]) -> dict:
    """One model-card row: max abs difference and the lowest per-patch cosine of two [B, N, D] token sets."""
    cosine = torch.nn.functional.cosine_similarity(theirs.double(), ours.double(), dim=-1)
    return {
        "loader": loader,
        "size": f"{size[0]} x {size[1]}",
        "max_abs": float((theirs - ours).abs().max()),
        "cosine_min": float(cosine.min()),
    }


def measure_loader(
    loader: str, run: Callable[[torch.Tensor, bool], torch.Tensor], encoder: VisionTransformer, info: EncoderInfo
) -> list[dict]:
    """Rows for `run(images, at_training_size)` -> [B, N, D] against our encoder at `parity_sizes`, on seeded random images.

    A size the loader cannot run (transformers resizes only a square table) gets no row.
    """
    rows = []
    for size in parity_sizes(info):
        images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            try:
                theirs = run(images, size == tuple(info.img_size))
            except RuntimeError:
                continue
            rows.append(parity_row(loader, theirs, encoder(images), size))
    return rows


def _require_exact(rows: list[dict], tolerance: float, library: str, log: Callable[[str], None]) -> None:
    """Log every row; ParityError unless the first (the training size) is within `tolerance`."""
    lines = [
        f"{r['loader']} vs dmt-jepa at {r['size']}: max|diff| patch tokens {r['max_abs']:.2e}, "
        f"cosine per patch min {r['cosine_min']:.6f}"
        for r in rows
    ]
    lines[0] += "  ok" if rows[0]["max_abs"] <= tolerance else f"  FAIL: > {tolerance:.0e}"
    for line in lines:
        log(line)
    if not rows[0]["max_abs"] <= tolerance:
        raise ParityError(
            f"{library} does not reproduce the encoder at the size it was exported for; the directory was not kept.", lines
        )


def _write_hf(directory: Path, encoder: VisionTransformer, info: EncoderInfo, log: Callable[[str], None]) -> None:
    """transformers' layout, measured with transformers, then config.json and the card carry the figures."""
    model = PretrainedEncoder.from_info(info)
    model.load_state_dict(encoder.state_dict())
    write_model_directory(model, directory)
    model.parity = _check_transformers(directory, encoder, info, log)
    write_model_directory(model, directory)  # again, now with the measured rows in config.json
    (directory / "README.md").write_text(model.generate_model_card().content)
    _check_hf(directory, encoder, info, log)


def _check_transformers(directory: Path, encoder: VisionTransformer, info: EncoderInfo, log: Callable[[str], None]) -> list[dict]:
    """Plain transformers (AutoModel, no remote code) must find every tensor and give our tokens at the training size."""
    try:
        import transformers
    except ImportError as err:
        raise ExportError(
            "--format hf checks the directory with transformers, which is not installed; pip install 'dmt-jepa[hf]'."
        ) from err
    transformers.utils.logging.disable_progress_bar()  # one bar per load would break the export's plain log
    model, loading = transformers.AutoModel.from_pretrained(directory, output_loading_info=True)
    model = model.float().eval()
    left = {key: value for key, value in loading.items() if value}
    if type(model).__name__ != "IJepaModel" or left:
        raise ParityError(f"transformers does not load the directory as IJepaModel with every tensor ({left}); not kept.", [])
    log(f"loaded with transformers {transformers.__version__} as IJepaModel: every tensor found, none left over")

    def run(images: torch.Tensor, at_training_size: bool) -> torch.Tensor:
        return model(pixel_values=images, interpolate_pos_encoding=not at_training_size).last_hidden_state

    rows = measure_loader(f"transformers {transformers.__version__}", run, encoder, info)
    _require_exact(rows, TRANSFORMERS_TOLERANCE, "transformers", log)
    return rows


def _check_hf(directory: Path, encoder: VisionTransformer, info: EncoderInfo, log: Callable[[str], None]) -> None:
    """`dmt_jepa.from_pretrained` must give every tensor and the whole config back."""
    loaded = from_pretrained(directory)
    ours = encoder.state_dict()
    differing = [k for k, v in loaded.state_dict().items() if not torch.equal(v, ours[k])]
    if differing or _as_json(loaded.info) != _as_json(info):
        raise ParityError(f"the model directory does not load back as the encoder file {differing[:1]}; not kept.", [])
    log(f"loaded back with dmt_jepa.from_pretrained: {len(ours)} tensors equal, config equal")


def timm_architecture(info: EncoderInfo) -> str:
    """timm's preset for this encoder's own size (vit_small_patch16_224), else the preset nearest it in width.

    timm builds registered names only, and has none for some sizes (vit_nano, vit_large at patch 8):
    those get the nearest preset at their patch size, or at patch 16 where timm has none at theirs;
    model_args then set every dimension, so the weights load the same either way.
    """
    import timm

    for patch in (info.patch_size, 16):
        presets = [arch for arch in VARIANTS if timm.is_model(f"{arch}_patch{patch}_224")]
        if presets:
            nearest = min(presets, key=lambda arch: (arch != info.arch, abs(VARIANTS[arch].embed_dim - info.embed_dim)))
            return f"{nearest}_patch{patch}_224"
    raise AssertionError("timm registers ViT presets at patch 16")


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


def _write_timm(directory: Path, encoder: VisionTransformer, info: EncoderInfo, log: Callable[[str], None]) -> None:
    (directory / CONFIG_FILENAME).write_text(json.dumps(timm_config(info), indent=2) + "\n")
    save_file(timm_state_dict(encoder), str(directory / WEIGHTS_FILENAME), metadata={"format": "pt"})
    parity = _check_timm(directory, encoder, info, log)
    (directory / "README.md").write_text(model_card(info, parity=parity, library="timm").content)


def _check_timm(directory: Path, encoder: VisionTransformer, info: EncoderInfo, log: Callable[[str], None]) -> list[dict]:
    """Plain timm, loading the folder its own way, must give our patch tokens at the training size; other sizes measured."""
    import timm

    model: Any = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()  # timm's ViT, not typed as one
    rows = measure_loader(f"timm {timm.__version__}", lambda images, _: model.forward_features(images), encoder, info)
    _require_exact(rows, TIMM_TOLERANCE, "timm", log)
    return rows
