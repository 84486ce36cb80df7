"""Vision Transformer encoder, predictor and the factory that builds them by name.

Names are imported on first use, so that the sizes (VARIANTS) can be read without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmt_jepa.lazy import lazy_attributes

if TYPE_CHECKING:  # the names as the type checker sees them; at run time, __getattr__ imports them
    from dmt_jepa.models.pos_embed import sincos_2d
    from dmt_jepa.models.predictor import Predictor
    from dmt_jepa.models.variants import VARIANTS
    from dmt_jepa.models.vision_transformer import LayerFeatures, VisionTransformer, create_encoder, resolve_layers

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
