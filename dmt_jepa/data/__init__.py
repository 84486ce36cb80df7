"""Image shards: packing folders into WebDataset tars, and the training pipeline that reads them."""

from dmt_jepa.data.pack import PackSummary, pack_images
from dmt_jepa.data.pipeline import DataError, expand_shards, micro_batches

__all__ = ["DataError", "PackSummary", "expand_shards", "micro_batches", "pack_images"]
