"""Hugging Face style model directories: `config.json` + `model.safetensors` + a model card `README.md`.

`PretrainedEncoder` is the encoder with huggingface_hub's `PyTorchModelHubMixin`: its config is
the encoder file's metadata (`EncoderInfo`, field for field) and its weights have the encoder
file's tensor names, so a directory and an encoder file hold the same thing in two layouts.
`from_pretrained` reads either (or a Hub repo id) and returns the encoder in eval mode; a
directory's config.json is checked for types and bounds and against its weights file's header
before anything is built, as an encoder file's metadata is;
`save_pretrained` and `push_to_hub` come from the mixin and write the model card built here, so
the licence recorded in the encoder's provenance follows the weights to the Hub.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from dmt_jepa.encoder_file import (
    FORMAT_VERSION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderFileError,
    EncoderInfo,
    SafetensorsHeader,
    check_weights,
    load_encoder,
    read_json_file,
    read_safetensors_header,
    read_weights,
)
from dmt_jepa.models.vision_transformer import VisionTransformer

from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

PAPER = "https://arxiv.org/abs/2405.17995"
WEIGHTS_FILENAME = "model.safetensors"  # the name huggingface_hub's mixin writes and reads
CONFIG_FILENAME = "config.json"
UNSPECIFIED_LICENSE = "unspecified"


class PretrainedEncoder(
    VisionTransformer,
    PyTorchModelHubMixin,
    library_name="dmt-jepa",
    paper_url=PAPER,
    pipeline_tag="image-feature-extraction",
    tags=["dmt-jepa", "i-jepa", "self-supervised", "vision-transformer"],
):
    """The target encoder with `from_pretrained` / `save_pretrained` / `push_to_hub`; `.info` is its EncoderInfo."""

    def __init__(
        self,
        *,
        arch: str,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        img_size: list[int] | tuple[int, int],
        pixel_mean: list[float] | tuple[float, float, float] = IMAGENET_MEAN,
        pixel_std: list[float] | tuple[float, float, float] = IMAGENET_STD,
        provenance: dict | None = None,
        format_version: int = FORMAT_VERSION,
    ):
        super().__init__(
            img_size=tuple(img_size),
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
        )
        self.info = EncoderInfo(
            arch=arch,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            img_size=tuple(img_size),
            pixel_mean=tuple(pixel_mean),
            pixel_std=tuple(pixel_std),
            provenance=dict(provenance or {}),
            format_version=format_version,
        )

    @classmethod
    def from_info(cls, info: EncoderInfo) -> PretrainedEncoder:
        """An untrained encoder whose config is `info`."""
        return cls(**asdict(info))

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None = None,
        cache_dir: str | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        map_location: str = "cpu",
        strict: bool = True,
        **config,
    ):
        """The mixin's loader: the config and the weights' header are checked before the model is built."""
        if os.path.isdir(model_id):
            weights = Path(model_id) / WEIGHTS_FILENAME
        else:
            weights = Path(hf_hub_download(
                repo_id=model_id, filename=WEIGHTS_FILENAME, revision=revision, cache_dir=cache_dir,
                force_download=force_download, token=token, local_files_only=local_files_only,
            ))
        info, header = checked_config(config, weights, f"the config of {model_id}")
        return cls.built(info, weights, header).to(map_location)

    @classmethod
    def built(cls, info: EncoderInfo, weights: Path, header: SafetensorsHeader) -> PretrainedEncoder:
        """The encoder `info` describes with the weights of a file whose header `check_weights` accepted."""
        model = cls.from_info(info)
        model.load_state_dict(read_weights(weights, header.tensors))  # strict: names and shapes were checked
        return model.eval()

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The card save_pretrained and push_to_hub write: architecture, training, licence, figures."""
        return model_card(self.info)


def checked_config(values: object, weights: Path, source: str) -> tuple[EncoderInfo, SafetensorsHeader]:
    """A model directory's config (types, bounds) checked against its weights file's header; nothing built."""
    if not isinstance(values, dict):
        raise EncoderFileError(f"{source} is not a mapping of settings; it is damaged or not a dmt-jepa config.")
    info = EncoderInfo.from_values(values, source)
    if not weights.is_file():
        raise EncoderFileError(f"{weights} does not exist; a model directory holds {CONFIG_FILENAME} and {WEIGHTS_FILENAME}.")
    header = read_safetensors_header(weights)
    check_weights(info, header.tensors, str(weights), described_by=f"its {CONFIG_FILENAME}")
    return info, header


def read_model_directory(directory: str | os.PathLike) -> tuple[EncoderInfo, Path, SafetensorsHeader]:
    """A Hugging Face model directory's description, weights file and header, checked; nothing built."""
    directory = Path(directory)
    config, weights = directory / CONFIG_FILENAME, directory / WEIGHTS_FILENAME
    if not config.exists() or not weights.exists():
        raise EncoderFileError(
            f"{directory} is a directory but not a model directory (it needs {CONFIG_FILENAME} and {WEIGHTS_FILENAME}, "
            "as `dmtjepa export --format hf` writes them); give an encoder file, a model directory or a Hub repo id."
        )
    values = read_json_file(config)
    if isinstance(values, dict) and "model_args" in values and "architecture" in values:
        raise EncoderFileError(
            f"{directory} is a timm model directory; load it with timm.create_model('local-dir:{directory}', "
            "pretrained=True), or give dmt_jepa the encoder file it was exported from."
        )
    info, header = checked_config(values, weights, str(config))
    return info, weights, header


def looks_like_path(text: str) -> bool:
    """True for a string that cannot be a Hub repo id (owner/name), or that reads as a path."""
    if text.startswith((".", "~", os.sep)) or (os.altsep and os.altsep in text) or Path(text).suffix in (".safetensors", ".json"):
        return True
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False


def from_pretrained(path_or_repo_id: str | os.PathLike, *, device: str = "cpu", **hub_kwargs) -> PretrainedEncoder:
    """The encoder from an encoder file, a model directory, or a Hugging Face Hub repo id, in eval mode.

    Weights load strictly: a directory whose tensors do not match its config is an error, found
    from the weights' header before anything is built. A string that reads as a path is never
    sent to the Hub. `hub_kwargs` go to huggingface_hub (revision, cache_dir, token, local_files_only, ...).
    """
    text = os.fspath(path_or_repo_id)
    path = Path(text).expanduser()
    if path.is_file():
        encoder, info = load_encoder(path)
        model = PretrainedEncoder.from_info(info)
        model.load_state_dict(encoder.state_dict())
    elif path.is_dir():
        model = PretrainedEncoder.built(*read_model_directory(path))
    elif path.exists():
        raise EncoderFileError(f"{path} is neither a file nor a directory; give an encoder file or a model directory.")
    elif isinstance(path_or_repo_id, os.PathLike) or looks_like_path(text):
        raise EncoderFileError(
            f"{text} does not exist; give an encoder file (.safetensors), a model directory or a Hub repo id (owner/name)."
        )
    else:
        model = PretrainedEncoder.from_pretrained(text, **hub_kwargs)
    return model.to(device).eval()


def _license(info: EncoderInfo) -> str:
    return str(info.provenance.get("license") or UNSPECIFIED_LICENSE)


def model_card(info: EncoderInfo) -> ModelCard:
    """A model card from what the encoder's metadata records; nothing it does not record is claimed."""
    provenance = info.provenance
    license_id = _license(info)
    known_license = license_id != UNSPECIFIED_LICENSE
    data = ModelCardData(
        library_name="dmt-jepa",
        pipeline_tag="image-feature-extraction",
        tags=["dmt-jepa", "i-jepa", "self-supervised", "vision-transformer"],
        license=license_id if known_license else "other",
        license_name=None if known_license else UNSPECIFIED_LICENSE,
    )
    height, width = info.img_size
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# dmt-jepa {info.arch}/{info.patch_size}",
        "",
        "The target encoder of a Vision Transformer trained with DMT-JEPA (Mo & Yun, "
        f"[arXiv 2405.17995]({PAPER})) or I-JEPA: dense patch features for segmentation and detection.",
        "",
        "## Architecture",
        "",
        "| | |",
        "| --- | --- |",
        f"| architecture | {info.arch}, no class token, fixed 2-D sin-cos position embedding computed for any grid |",
        f"| patch size | {info.patch_size} |",
        f"| width / depth / heads | {info.embed_dim} / {info.depth} / {info.num_heads} (MLP ratio {info.mlp_ratio:g}) |",
        f"| trained at | {height} x {width} px ({height // info.patch_size} x {width // info.patch_size} patches) |",
        f"| pixel mean / std | {list(info.pixel_mean)} / {list(info.pixel_std)} |",
        "| outputs | patch tokens after the final LayerNorm, [B, h, w, D]; pooled = their mean |",
        "",
        "## Training",
        "",
        *_training_lines(provenance),
        "",
        "## Licence",
        "",
        (
            f"`{license_id}`" + (f": {provenance['license_note']}" if provenance.get("license_note") else ".")
            if known_license
            else "Not recorded: these weights carry the terms of the data and weights they were trained from; "
            "set one with `dmtjepa export --format hf --license ID` when you know it."
        ),
        "",
        "## Evaluation",
        "",
        *_evaluation_lines(provenance.get("evaluation")),
        "",
        "## Use",
        "",
        "```python",
        "import dmt_jepa",
        "encoder = dmt_jepa.from_pretrained(PATH_OR_REPO_ID)   # eval mode; encoder.info holds this card's facts",
        "grid, pooled = encoder.dense(images)                  # images normalised with the mean / std above",
        "layers = encoder.intermediate_layers(images, [2, 5, 8, 11], output_fmt='NCHW').maps",
        "```",
        "",
    ]
    return ModelCard("\n".join(lines))


def _training_lines(provenance: dict) -> list[str]:
    source = provenance.get("source", "unknown")
    lines = [f"- made by: `{source}`"]
    if "steps" in provenance:
        lines.append(f"- optimisation steps: {provenance['steps']}")
    config = provenance.get("config") or {}
    data = config.get("data") or {}
    if data:
        train = data.get("train") or f"the built-in scenes benchmark ({data.get('scenes_train', '?')} scenes)"
        lines.append(f"- training data: {train}")
    target = config.get("target") or {}
    if target.get("aggregation"):
        method = "I-JEPA (no aggregation)" if target["aggregation"] == "none" else f"DMT-JEPA, {target['aggregation']} aggregation"
        lines.append(f"- objective: {method}")
    optimization = config.get("optimization") or {}
    if optimization:
        lines.append(
            f"- optimisation: {optimization.get('epochs', '?')} epochs, batch {optimization.get('batch_size', '?')}, "
            f"lr {optimization.get('lr', '?')}"
        )
    if "checkpoint" in provenance:
        lines.append(f"- converted from: `{provenance['checkpoint']}` ({provenance.get('state_dict', 'state dict')})")
    return lines


def _evaluation_lines(evaluation: list[dict] | None) -> list[str]:
    if not evaluation:
        return ["No evaluation recorded with these weights."]
    lines = ["| protocol | metric | value | data |", "| --- | --- | --- | --- |"]
    for record in evaluation:
        lines.append(f"| {record['task']} | {record['metric']} | {record['value']:.2f} | {record.get('data', '')} |")
    return lines
