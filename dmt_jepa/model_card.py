"""The model card a model directory carries (README.md): Hub metadata, facts from the encoder's metadata, snippets, figures.

Nothing the encoder's metadata does not record is claimed. The usage snippets are written for the
model the card describes (its sizes, its depth), so that they run as printed once the placeholder
path is replaced, and the loader differences are rows an export measured, never typed in.
"""

from __future__ import annotations

from collections.abc import Sequence

from huggingface_hub import ModelCard, ModelCardData

from dmt_jepa.encoder_file import EncoderInfo

PAPER = "https://arxiv.org/abs/2405.17995"
UNSPECIFIED_LICENSE = "unspecified"
MODEL_PATH = "PATH/TO/THIS/FOLDER"  # the snippets' placeholder for this directory or its Hub repo id
TAGS = ["dmt-jepa", "i-jepa", "ijepa", "self-supervised", "vision-transformer", "image-feature-extraction"]
# Hub ids of the public I-JEPA weights that transformers converted, by the public checkpoint's file name.
PUBLIC_BASE_MODELS = {
    "IN1K-vit.h.14-300e.pth.tar": ("facebook/ijepa_vith14_1k", "ILSVRC/imagenet-1k"),
    "IN1K-vit.h.16-448px-300e.pth.tar": ("facebook/ijepa_vith16_1k", "ILSVRC/imagenet-1k"),
    "IN22K-vit.h.14-900e.pth.tar": ("facebook/ijepa_vith14_22k", "ILSVRC/imagenet-21k"),
    "IN22K-vit.g.16-600e.pth.tar": ("facebook/ijepa_vitg16_22k", "ILSVRC/imagenet-21k"),
}


def _license(info: EncoderInfo) -> str:
    return str(info.provenance.get("license") or UNSPECIFIED_LICENSE)


def model_card(info: EncoderInfo, *, parity: Sequence[dict] = (), library: str = "transformers") -> ModelCard:
    """A model card from what the encoder's metadata records; nothing it does not record is claimed.

    `library` is the directory's loader ("transformers" or "timm"): it sets the Hub metadata and
    the first usage snippet. `parity` are the rows an export measured between that loader and
    dmt-jepa; the snippets are written for this model's sizes and depth.
    """
    provenance = info.provenance
    license_id = _license(info)
    known_license = license_id != UNSPECIFIED_LICENSE
    base_model, dataset = PUBLIC_BASE_MODELS.get(str(provenance.get("checkpoint")), (None, None))
    data = ModelCardData(
        library_name=library,
        pipeline_tag="image-feature-extraction",
        tags=[*TAGS, *(["timm"] if library == "timm" else [])],
        license=license_id if known_license else "other",
        license_name=None if known_license else UNSPECIFIED_LICENSE,
        base_model=base_model,
        datasets=[dataset] if dataset else None,
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
        *_size_rows(info),
        f"| pixel mean / std | {list(info.pixel_mean)} / {list(info.pixel_std)} |",
        "| outputs | patch tokens after the final LayerNorm, [B, h*w, D] row-major; pooled = their mean |",
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
        *(transformers_usage(info) if library == "transformers" else timm_usage(info)),
        "",
        "With the dmt-jepa package (the sin-cos table is computed exactly for every image size):",
        "",
        *dmt_jepa_usage(info),
        "",
        *_parity_lines(parity, library),
    ]
    return ModelCard("\n".join(lines))


def layer_choice(depth: int) -> list[int]:
    """Four blocks spread over the depth, the last included (2, 5, 8, 11 of 12); fewer for shallow encoders."""
    return sorted({max(0, depth * (k + 1) // 4 - 1) for k in range(4)})


def transformers_usage(info: EncoderInfo) -> list[str]:
    """A snippet for transformers alone, with this model's shapes."""
    (h, w), dim = info.grid_size, info.embed_dim
    return [
        "With transformers alone (no remote code):",
        "",
        "```python",
        "import torch",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, AutoModel, pipeline",
        f'model = AutoModel.from_pretrained("{MODEL_PATH}").eval()   # or a Hub repo id',
        f'processor = AutoImageProcessor.from_pretrained("{MODEL_PATH}")',
        f'image = Image.new("RGB", ({2 * info.img_size[1]}, {2 * info.img_size[0]}), (120, 90, 60))   # any RGB image',
        f'inputs = processor(images=image, return_tensors="pt")    # resized to {info.img_size[0]} x {info.img_size[1]}',
        "with torch.no_grad():",
        f"    tokens = model(**inputs).last_hidden_state          # [1, {h * w}, {dim}]",
        f"grid = tokens.reshape(1, {h}, {w}, {dim})                  # patch grid, row-major",
        f"pooled = tokens.mean(dim=1)                             # [1, {dim}], the deployed pooled vector",
        f'features = pipeline("image-feature-extraction", model="{MODEL_PATH}")(image, return_tensors=True)',
        "```",
        "",
        "Other sizes: `model(pixel_values, interpolate_pos_encoding=True)` resizes the stored position table "
        "(bicubic), which is not what the encoder was trained with; the table below says how far that lands.",
    ]


def _size_rows(info: EncoderInfo) -> list[str]:
    """The size trained at, and where an export was made for another size, the size its position table is for."""
    p = info.patch_size

    def size(h: int, w: int) -> str:
        return f"{h} x {w} px ({h // p} x {w // p} patches)"

    trained = info.provenance.get("trained_img_size")
    if not trained or tuple(trained) == tuple(info.img_size):
        return [f"| trained at | {size(*info.img_size)} |"]
    return [
        f"| trained at | {size(*trained)} |",
        f"| exported for | {size(*info.img_size)}: the stored position table is the sin-cos table of this grid, "
        "so loaders are exact at this size |",
    ]


def timm_usage(info: EncoderInfo) -> list[str]:
    """A snippet for timm alone, with this model's shapes."""
    (h, w), dim = info.grid_size, info.embed_dim
    return [
        "With timm alone:",
        "",
        "```python",
        "import timm, torch",
        f'model = timm.create_model("local-dir:{MODEL_PATH}", pretrained=True).eval()   # or "hf-hub:USER/REPO"',
        f"images = torch.randn(2, 3, {info.img_size[0]}, {info.img_size[1]})   # normalised with the mean / std above",
        "with torch.no_grad():",
        f"    tokens = model.forward_features(images)   # [2, {h * w}, {dim}] after the final norm",
        "```",
        "",
        "Other sizes run with the stored position table resized (bicubic), which is not what the encoder "
        "was trained with; the table below says how far that lands.",
    ]


def dmt_jepa_usage(info: EncoderInfo) -> list[str]:
    """A snippet for the dmt-jepa package, its layer indices valid for this depth."""
    layers = layer_choice(info.depth)
    return [
        "```python",
        "import dmt_jepa, torch",
        f'encoder = dmt_jepa.from_pretrained("{MODEL_PATH}")   # eval mode; encoder.info holds this card\'s facts',
        f"images = torch.randn(2, 3, {info.img_size[0]}, {info.img_size[1]})   # normalised with the mean / std above",
        "with torch.no_grad():",
        "    grid, pooled = encoder.dense(images)   # [B, h, w, D], [B, D]",
        f"    maps = encoder.intermediate_layers(images, {layers}).maps   # {len(layers)} x [B, D, h, w]",
        "```",
    ]


def _parity_lines(parity: Sequence[dict], library: str) -> list[str]:
    if not parity:
        return []
    lines = [
        f"## {library} vs dmt-jepa",
        "",
        f"Measured when this directory was exported: the patch tokens {library} gives against the dmt-jepa "
        "encoder's, on random images.",
        "",
        "| loader | size (H x W) | max abs difference | cosine per patch, min |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r['loader']} | {r['size']} | {r['max_abs']:.2e} | {r['cosine_min']:.4f} |" for r in parity]
    return lines


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
        method = (
            "I-JEPA (no aggregation)" if target["aggregation"] == "none" else f"DMT-JEPA, {target['aggregation']} aggregation"
        )
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
