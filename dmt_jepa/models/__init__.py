"""Vision Transformer encoder, predictor and the factory that builds them by name."""

from dmt_jepa.models.pos_embed import sincos_2d
from dmt_jepa.models.predictor import Predictor
from dmt_jepa.models.vision_transformer import VARIANTS, VisionTransformer, create_encoder

__all__ = ["VARIANTS", "Predictor", "VisionTransformer", "create_encoder", "sincos_2d"]
