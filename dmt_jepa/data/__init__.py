"""Image shards: packing folders into WebDataset tars, and the training pipeline that reads them.

Names are imported on first use: `pack_images` and `expand_shards` check their paths before
torch is imported, so that a mistyped path is answered at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmt_jepa.lazy import lazy_attributes

if TYPE_CHECKING:  # the names as the type checker sees them; at run time, __getattr__ imports them
    from dmt_jepa.data.pack import PackSummary, pack_images
    from dmt_jepa.data.pipeline import micro_batches
    from dmt_jepa.data.shards import DataError, expand_shards

_EXPORTS = {
    "DataError": "dmt_jepa.data.shards",
    "expand_shards": "dmt_jepa.data.shards",
    "PackSummary": "dmt_jepa.data.pack",
    "pack_images": "dmt_jepa.data.pack",
    "micro_batches": "dmt_jepa.data.pipeline",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_attributes(__name__, _EXPORTS)
