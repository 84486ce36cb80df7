"""torch.hub entry points: `torch.hub.load(repo_or_dir, "dmt_jepa_encoder", weights=..., source="local")`.

torch.hub requires this file at the repository's top level; it only forwards to dmt_jepa.
"""

dependencies = ["torch", "timm", "safetensors", "huggingface_hub"]


def dmt_jepa_encoder(weights=None, arch="vit_base", patch_size=16, img_size=224, device="cpu"):
    """The DMT-JEPA target encoder in eval mode.

    weights: an encoder file (.safetensors), a model directory written by `dmtjepa export --format
    hf`, or a Hugging Face Hub repo id; the architecture then comes from the weights. None gives an
    untrained encoder of `arch` / `patch_size` / `img_size`.
    """
    if weights is not None:
        from dmt_jepa import from_pretrained

        return from_pretrained(weights, device=device)
    from dmt_jepa.models import create_encoder

    return create_encoder(arch, patch_size=patch_size, img_size=img_size).to(device).eval()
