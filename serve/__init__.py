"""Inference backends behind one interface, and the shard -> dense embeddings batch job.

Public API: `embed_shards` (the job behind `dmtjepa embed`), `embed_images` (the same in memory),
`open_embeddings` (an OUT_DIR read back), `load_backend`. They are imported on first use so that
decode worker processes, which import `serve.images`, do not pay for torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "embed_shards": "serve.job",
    "EmbedOptions": "serve.job",
    "JobSummary": "serve.job",
    "OutputDirError": "serve.job",
    "OutputWriteError": "serve.job",
    "EngineError": "serve.job",
    "embed_images": "serve.api",
    "open_embeddings": "serve.reader",
    "Embeddings": "serve.reader",
    "EmbeddingsError": "serve.reader",
    "load_backend": "serve.backends",
    "Backend": "serve.backends",
    "BackendError": "serve.backends",
    "InputError": "serve.inputs",
    "ImageRejected": "serve.images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'serve' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
