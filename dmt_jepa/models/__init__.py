"""Vision Transformer encoder, predictor and the factory that builds them by name.

Names are imported on first use, so that the sizes (VARIANTS) can be read without torch.
"""

from __future__ import annotations

from dmt_jepa.lazy import lazy_attributes

_EXPORTS = {
    "VARIANTS": "dmt_jepa.models.variants",
    "LayerFeatures": "dmt_jepa.models.vision_transformer",
    "VisionTransformer": "dmt_jepa.models.vision_transformer",
    "create_encoder": "dmt_jepa.models.vision_transformer",
    "resolve_layers": "dmt_jepa.models.vision_transformer",
    "Predictor": "dmt_jepa.models.predictor",
    "sincos_2d": "dmt_jepa.models.pos_embed",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_attributes(__name__, _EXPORTS)
