"""Vision Transformer encoder, predictor and the factory that builds them by name."""

from dmt_jepa.models.pos_embed import sincos_2d
from dmt_jepa.models.predictor import Predictor
from dmt_jepa.models.vision_transformer import VARIANTS, LayerFeatures, VisionTransformer, create_encoder, resolve_layers

__all__ = [
    "VARIANTS",
    "LayerFeatures",
    "Predictor",
    "VisionTransformer",
    "create_encoder",
    "resolve_layers",
    "sincos_2d",
]
