"""Inference backends behind one interface, and the shard -> dense embeddings batch job.

Public API: `embed_shards` (the job behind `dmtjepa embed`), `embed_images` (the same in memory),
`open_embeddings` (an OUT_DIR read back), `load_backend`. They are imported on first use so that
decode worker processes, which import `dmt_jepa.serve.images`, do not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmt_jepa.lazy import lazy_attributes

if TYPE_CHECKING:  # the names as the type checker sees them; at run time, __getattr__ imports them
    from dmt_jepa.serve.api import embed_images
    from dmt_jepa.serve.backends import Backend, BackendError, load_backend
    from dmt_jepa.serve.images import ImageRejected
    from dmt_jepa.serve.inputs import InputError
    from dmt_jepa.serve.job import EmbedOptions, EngineError, JobSummary, OutputDirError, OutputWriteError, embed_shards
    from dmt_jepa.serve.reader import Embeddings, EmbeddingsError, open_embeddings

_EXPORTS = {
    "embed_shards": "dmt_jepa.serve.job",
    "EmbedOptions": "dmt_jepa.serve.job",
    "JobSummary": "dmt_jepa.serve.job",
    "OutputDirError": "dmt_jepa.serve.job",
    "OutputWriteError": "dmt_jepa.serve.job",
    "EngineError": "dmt_jepa.serve.job",
    "embed_images": "dmt_jepa.serve.api",
    "open_embeddings": "dmt_jepa.serve.reader",
    "Embeddings": "dmt_jepa.serve.reader",
    "EmbeddingsError": "dmt_jepa.serve.reader",
    "load_backend": "dmt_jepa.serve.backends",
    "Backend": "dmt_jepa.serve.backends",
    "BackendError": "dmt_jepa.serve.backends",
    "InputError": "dmt_jepa.serve.inputs",
    "ImageRejected": "dmt_jepa.serve.images",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_attributes(__name__, _EXPORTS)
