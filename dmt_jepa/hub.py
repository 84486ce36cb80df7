"""Hugging Face model directories that transformers loads natively, and that dmt_jepa reads back exactly.

A directory `save_pretrained` writes (and `push_to_hub` uploads) is transformers' I-JEPA layout:
`config.json` with `model_type: ijepa` (so `AutoModel.from_pretrained(dir)` builds `IJepaModel`
with no remote code) plus a `dmt_jepa` block holding the encoder file's metadata (`EncoderInfo`,
field for field); `model.safetensors` under IJepaModel's names with the sin-cos table stored at
the training grid (dmt_jepa/models/transformers_layout.py); `preprocessor_config.json` (a
`ViTImageProcessor`: bicubic resize to the training size, the encoder's mean / std); and the
model card `README.md` (dmt_jepa/model_card.py). The previous layout (config.json = the metadata alone, our tensor names)
is still read. `from_pretrained` reads an encoder file, either directory layout or a Hub repo id;
a directory's config is checked for types and bounds and against its weights file's header
before anything is built, and a stored position table must be the sin-cos table the encoder
computes, since dmt_jepa computes it again for every grid rather than reading it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import cast

from huggingface_hub import ModelCard, PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import save_file

from dmt_jepa.encoder_file import (
    FLOAT_DTYPES,
    FORMAT_VERSION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderFileError,
    EncoderInfo,
    SafetensorsHeader,
    check_weights,
    encoder_shapes,
    load_encoder,
    read_json_file,
    read_safetensors_header,
    read_weights,
)
from dmt_jepa.model_card import PAPER, TAGS, model_card
from dmt_jepa.models.pos_embed import sincos_2d
from dmt_jepa.models.transformers_layout import from_transformers, to_transformers, transformers_shapes
from dmt_jepa.models.vision_transformer import LayerNorm, VisionTransformer

WEIGHTS_FILENAME = "model.safetensors"  # the name huggingface_hub's mixin writes and reads
CONFIG_FILENAME = "config.json"
PREPROCESSOR_FILENAME = "preprocessor_config.json"
MODEL_TYPE = "ijepa"  # transformers' I-JEPA model, the same network as ours
INFO_KEY = "dmt_jepa"  # config.json's block with the encoder file's metadata
PARITY_KEY = "dmt_jepa_parity"  # config.json's measured loader differences, for the model card
TABLE_TOLERANCE = 1e-6  # a stored position table further than this from our sin-cos one is not ours


class PretrainedEncoder(
    VisionTransformer,
    PyTorchModelHubMixin,
    library_name="transformers",
    paper_url=PAPER,
    pipeline_tag="image-feature-extraction",
    tags=list(TAGS),  # a copy: the mixin adds its own tags to the list it is given
):
    """The target encoder with `from_pretrained` / `save_pretrained` / `push_to_hub`; `.info` is its EncoderInfo.

    `.parity` holds the loader differences an export measured (rows of the model card), [] if none.
    """

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
            img_size=cast("tuple[int, int]", tuple(img_size)),
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
            img_size=cast("tuple[int, int]", tuple(img_size)),
            pixel_mean=cast("tuple[float, float, float]", tuple(pixel_mean)),
            pixel_std=cast("tuple[float, float, float]", tuple(pixel_std)),
            provenance=dict(provenance or {}),
            format_version=format_version,
        )
        self.parity: list[dict] = []

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
        """The mixin's loader: the repo's config and weights are fetched and read as a local directory is."""
        directory = (
            Path(model_id)
            if os.path.isdir(model_id)
            else download_directory(
                model_id,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        )
        return load_model_directory(directory).to(map_location)

    @classmethod
    def built(cls, info: EncoderInfo, weights: Path, header: SafetensorsHeader) -> PretrainedEncoder:
        """The encoder `info` describes with the weights of a file whose header was checked against it (either layout)."""
        state = read_weights(weights, header.tensors)
        if TRANSFORMERS_MARK in state:
            state, table = from_transformers(state, info.depth)
            expected = sincos_2d(*info.grid_size, info.embed_dim)[None]
            if not float((table.float() - expected).abs().max()) <= TABLE_TOLERANCE:
                raise EncoderFileError(
                    f"{weights} holds a position table that is not the sin-cos table this encoder computes (changed after "
                    "export, e.g. fine-tuned with transformers); load it with transformers.AutoModel instead."
                )
        model = cls.from_info(info)
        model.load_state_dict(state)  # strict: names and shapes were checked
        return model.eval()

    def _save_pretrained(self, save_directory: Path) -> None:
        """What save_pretrained and push_to_hub write: the transformers layout (the mixin adds README.md)."""
        write_model_directory(self, Path(save_directory))

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The card save_pretrained and push_to_hub write: architecture, training, licence, figures, loaders."""
        return model_card(self.info, parity=self.parity)


TRANSFORMERS_MARK = "layernorm.weight"  # a tensor name only the transformers layout has


def transformers_config(info: EncoderInfo, parity: Sequence[dict] = ()) -> dict:
    """config.json: IJepaConfig's fields for this encoder, plus our metadata and the measured parity."""
    assert LayerNorm.keywords["eps"] == 1e-6  # the eps written below; a change must change both
    return {
        "architectures": ["IJepaModel"],
        "model_type": MODEL_TYPE,
        "hidden_size": info.embed_dim,
        "num_hidden_layers": info.depth,
        "num_attention_heads": info.num_heads,
        "intermediate_size": int(info.embed_dim * info.mlp_ratio),  # timm's Mlp width
        "hidden_act": "gelu",  # exact (erf) GELU, as timm's Mlp
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": list(info.img_size),
        "patch_size": info.patch_size,
        "num_channels": 3,
        "qkv_bias": True,
        "dtype": "float32",
        INFO_KEY: json.loads(json.dumps(asdict(info))),
        PARITY_KEY: list(parity),
    }


def image_processor_config(info: EncoderInfo) -> dict:
    """preprocessor_config.json: resize (bicubic, as the embedding job) to the training size, scale, normalise."""
    height, width = info.img_size
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": height, "width": width},
        "resample": 3,  # PIL's BICUBIC
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(info.pixel_mean),
        "image_std": list(info.pixel_std),
    }


def write_model_directory(model: PretrainedEncoder, directory: Path) -> None:
    """config.json, model.safetensors (IJepaModel's names) and preprocessor_config.json into `directory`."""
    info = model.info
    (directory / CONFIG_FILENAME).write_text(json.dumps(transformers_config(info, model.parity), indent=2) + "\n")
    (directory / PREPROCESSOR_FILENAME).write_text(json.dumps(image_processor_config(info), indent=2) + "\n")
    tensors = to_transformers(model.state_dict(), info.depth, info.grid_size)
    save_file(tensors, str(directory / WEIGHTS_FILENAME), metadata={"format": "pt"})  # what transformers expects


def checked_config(values: object, weights: Path, source: str) -> tuple[EncoderInfo, SafetensorsHeader]:
    """A model directory's config (types, bounds) checked against its weights file's header; nothing built.

    Either layout: transformers' (`model_type: ijepa`, our metadata in its `dmt_jepa` block, whose
    architecture the transformers fields must repeat) or the previous one (the metadata alone).
    """
    if not isinstance(values, dict):
        raise EncoderFileError(f"{source} is not a mapping of settings; it is damaged or not a dmt-jepa config.")
    native = values.get("model_type") == MODEL_TYPE
    if native and not isinstance(values.get(INFO_KEY), dict):
        raise EncoderFileError(
            f"{source} describes a transformers I-JEPA model that dmt-jepa did not write (no '{INFO_KEY}' block); "
            "load it with transformers.AutoModel.from_pretrained."
        )
    info = EncoderInfo.from_values(values[INFO_KEY] if native else values, source)
    if native:
        _check_transformers_fields(values, info, source)
    if not weights.is_file():
        raise EncoderFileError(f"{weights} does not exist; a model directory holds {CONFIG_FILENAME} and {WEIGHTS_FILENAME}.")
    header = read_safetensors_header(weights)
    if native:
        _check_transformers_weights(info, header, str(weights))
    else:
        check_weights(info, header.tensors, str(weights), described_by=f"its {CONFIG_FILENAME}")
    return info, header


def _check_transformers_fields(values: dict, info: EncoderInfo, source: str) -> None:
    """The IJepaConfig fields transformers builds from must describe the encoder the dmt_jepa block describes."""
    expected = {key: value for key, value in transformers_config(info).items() if key not in (INFO_KEY, PARITY_KEY, "dtype")}
    for key, value in expected.items():
        if values.get(key) != value and not (key == "image_size" and values.get(key) == value[0] == value[1]):
            raise EncoderFileError(
                f"{source} says {key} {values.get(key)!r} where its '{INFO_KEY}' block means {value!r}; "
                "it is damaged: export the encoder again."
            )


def _check_transformers_weights(info: EncoderInfo, header: SafetensorsHeader, source: str) -> None:
    """EncoderFileError unless the header holds exactly IJepaModel's tensors for `info`, each floating point."""
    expected = transformers_shapes(encoder_shapes(info), info.depth, info.grid_size)
    held = {name: entry.shape for name, entry in header.tensors.items()}
    if held != expected:
        odd = next(name for name in sorted(expected.keys() | held.keys()) if held.get(name) != expected.get(name))
        raise EncoderFileError(
            f"{source} does not hold the weights its {CONFIG_FILENAME} describes ({info.arch}, {info.embed_dim} wide, "
            f"{info.depth} blocks: {sum(map(math.prod, expected.values()))} numbers; the file has "
            f"{sum(map(math.prod, held.values()))}, and {odd} is {held.get(odd, 'missing')}, not {expected.get(odd, 'expected')}); "
            "it is damaged or not an encoder's."
        )
    if any(entry.dtype not in FLOAT_DTYPES for entry in header.tensors.values()):
        raise EncoderFileError(f"{source} holds weights that are not floating point; it is damaged: export the encoder again.")


def read_model_directory(directory: str | os.PathLike) -> tuple[EncoderInfo, Path, SafetensorsHeader]:
    """A Hugging Face model directory's description, weights file and header, checked; nothing built."""
    info, weights, header, _ = _read_model_directory(Path(directory))
    return info, weights, header


def _read_model_directory(directory: Path) -> tuple[EncoderInfo, Path, SafetensorsHeader, list[dict]]:
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
    return info, weights, header, _parity_rows(values.get(PARITY_KEY))


def _parity_rows(rows: object) -> list[dict]:
    """The measured rows a config carries, kept only where each is what an export writes (else none: they only feed the card)."""
    fields = {"loader": str, "size": str, "max_abs": float, "cosine_min": float}
    if not isinstance(rows, list) or len(rows) > 16:
        return []
    good = all(
        isinstance(row, dict)
        and row.keys() == fields.keys()
        and all(
            isinstance(row[key], kind) and (kind is str and len(row[key]) < 80 or kind is float and math.isfinite(row[key]))
            for key, kind in fields.items()
        )
        for row in rows
    )
    return [dict(row) for row in rows] if good else []


def load_model_directory(directory: Path) -> PretrainedEncoder:
    """The encoder a checked model directory holds, with the parity rows its config carries."""
    info, weights, header, parity = _read_model_directory(directory)
    model = PretrainedEncoder.built(info, weights, header)
    model.parity = parity
    return model


def download_directory(repo_id: str, **hub_kwargs) -> Path:
    """The folder holding a Hub repo's config.json and model.safetensors, fetched (or found in the cache)."""
    paths = [Path(hf_hub_download(repo_id=repo_id, filename=name, **hub_kwargs)) for name in (CONFIG_FILENAME, WEIGHTS_FILENAME)]
    assert paths[0].parent == paths[1].parent  # one snapshot folder per revision
    return paths[0].parent


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
        model = load_model_directory(path)
    elif path.exists():
        raise EncoderFileError(f"{path} is neither a file nor a directory; give an encoder file or a model directory.")
    elif isinstance(path_or_repo_id, os.PathLike) or looks_like_path(text):
        raise EncoderFileError(
            f"{text} does not exist; give an encoder file (.safetensors), a model directory or a Hub repo id (owner/name)."
        )
    else:
        model = load_model_directory(download_directory(text, **hub_kwargs))
    return model.to(device).eval()
