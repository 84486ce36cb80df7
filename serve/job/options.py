"""The embedding job's settings, what one process of it did, and the identity that makes a shard this run's.

`EmbedOptions` is every setting (the CLI builds one); `run_identity` is the part of them, with the
model's hash and version, that fixes a shard's bytes: a shard whose NAME.json records another
identity is not done for this run. `ShardRun` is what an engine (local or Ray) is handed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import dmt_jepa
from dmt_jepa.serve.backends import Backend
from dmt_jepa.serve.claims import DEFAULT_LEASE_SECONDS
from dmt_jepa.serve.embed_rules import option_problems
from dmt_jepa.serve.images import DEFAULT_MAX_PIXELS, Preprocess
from dmt_jepa.serve.inputs import ShardSource
from dmt_jepa.serve.layouts import LAYOUTS, OutputSpec
from dmt_jepa.serve.quantize import DTYPES

if TYPE_CHECKING:
    from dmt_jepa.serve.labels import Labeller

ENGINES = ("local", "ray")
DECODES = ("cpu", "gpu")


class EngineError(ValueError):
    """The chosen engine cannot run here (Ray missing, a cluster out of reach); one sentence for the user."""


class OutputWriteError(OSError):
    """Writing into OUT_DIR failed mid-job (a full disk, an I/O error); the message is one sentence."""


@dataclass(frozen=True)
class EmbedOptions:
    """Every setting of the embedding job; the CLI builds one, `embed_shards` reads it."""

    backend: str = "auto"
    precision: str | None = None  # None: the model's own
    size: tuple[int, int] | None = None  # [H, W]; None: the training size
    resize: str = "crop"
    batch_size: int = 32
    workers: int | None = None  # decode processes; None: half the CPUs, at least one; 0: in a thread
    pooled: bool = False
    layout: str = "tar"  # tar: WebDataset samples; array: .npy arrays and a Parquet table per shard;
    # embedding-reader: pooled vectors and tables in img_emb/ and metadata/ (serve/layouts.py)
    dtype: str = "float16"  # float32, float16, or int8 with a float32 scale per vector
    pooled_only: bool = False  # pooled vectors only, no patch grids
    max_carried_bytes: int = 64 << 10  # non-image input members up to this size are copied; 0: none
    pca: int | None = None  # store patch (and pooled) vectors projected on this many principal axes
    rank: int | None = None  # with world_size: a static split; None: from the environment, else shared
    world_size: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = False  # a bar on stderr (for a terminal)
    progress_every: float = 0.0  # without the bar: a plain progress line on stderr this often (seconds); 0: none
    overwrite: bool = False  # redo shards that OUT_DIR holds from other settings, instead of refusing
    lease_seconds: float = DEFAULT_LEASE_SECONDS  # a claim unchanged this long belongs to a dead process
    max_queued_bytes: int = 256 << 20  # encoded image bytes between the reader and the batcher
    # blocks also written (tar: KEY.layer_<i>.npy, array: NAME.layer_<i>.npy); a Backend given has its own
    layers: tuple[int, ...] | None = None
    engine: str = "local"  # local: this process and its decode workers; ray: a Ray cluster (serve.ray_engine)
    address: str | None = None  # ray: the cluster to join ("auto": the one `ray start` began here); None: a new local one
    decode_workers: int | None = None  # ray: decode tasks at once; None: the cluster's CPUs less the model actors'
    model_workers: int = 1  # ray: model actors, each holding the model once
    gpus_per_worker: float = 0.0  # ray: GPUs per model actor; 0: CPU
    decode: str = "cpu"  # cpu: decode workers decode; gpu: they check JPEG headers, the PyTorch backend's device decodes
    head: str | os.PathLike | None = None  # a dense head file of the encoder: a label map per image (serve/labels.py)

    def __post_init__(self) -> None:
        assert self.batch_size >= 1 and self.lease_seconds > 0 and self.max_queued_bytes > 0
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}.")
        if self.decode not in DECODES:
            raise ValueError(f"unknown decode {self.decode!r}; choose one of {', '.join(DECODES)}.")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}.")
        problems = option_problems(
            engine=self.engine, address=self.address, decode_workers=self.decode_workers, model_workers=self.model_workers,
            gpus_per_worker=self.gpus_per_worker, decode=self.decode, layout=self.layout, dtype=self.dtype,
            layers=self.layers, pca=self.pca, head=self.head is not None,
        )  # fmt: skip
        if problems:
            raise ValueError(problems[0])

    @property
    def output(self) -> OutputSpec:
        return OutputSpec(self.layout, self.dtype, self.pooled, self.pooled_only)  # layers: the runner's, absolute


@dataclass
class JobSummary:
    """What one process of the job did."""

    rank: int
    world_size: int
    shards: list[str]  # NAMEs assigned to this rank (all of them without a static split)
    skipped: list[str] = field(default_factory=list)  # already done before this run
    completed: list[str] = field(default_factory=list)  # committed by this process
    missing: dict[str, str] = field(default_factory=dict)  # NAME -> why it could not be read (not done)
    embedded: int = 0
    failed: int = 0
    cut_shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    backend: str = ""
    precision: str = ""
    notices: list[str] = field(default_factory=list)  # one line each, for the user
    job: dict | None = None  # the summary over all workers, once this run saw every shard done
    worst_patch_cosine: float | None = None  # first-batch check against fp32, where one ran
    check_seconds: float = 0.0  # part of `seconds` spent on that check (it runs the first batch twice)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def by_others(self) -> int:
        """Shards of this process's share that other processes finished during this run."""
        return len(self.shards) - len(self.skipped) - len(self.completed) - len(self.missing)


def run_identity(runner: Backend, prep: Preprocess, options: EmbedOptions) -> dict:
    """What makes a shard's bytes what they are; a shard made otherwise is not this run's to skip."""
    return {
        "model_sha256": runner.model_sha256,
        "input_size": list(prep.size),
        "resize": prep.resize,
        "pooled": options.pooled,
        "layout": options.layout,
        "dtype": options.dtype,
        "pooled_only": options.pooled_only,
        "max_carried_bytes": options.max_carried_bytes,
        "pca": options.pca,
        "precision": runner.precision,
        "backend": runner.name.split("-")[0],
        "version": dmt_jepa.__version__,
        **({"layers": list(runner.layers)} if runner.layers else {}),
        **({"decode": "gpu"} if options.decode == "gpu" else {}),  # a few grey levels from the CPU's resize
    }


@dataclass
class ShardRun:
    """What an engine's run takes: the shards still to do, and everything that fixes their bytes and records."""

    pending: list[ShardSource]
    names: list[str]  # every shard of the job, for the totals in the stats
    out_dir: Path
    runner: Backend
    prep: Preprocess
    identity: dict
    projection: np.ndarray | None  # [pca + 1, D] with --pca
    options: EmbedOptions
    summary: JobSummary
    publish: Callable[[str], None] | None = None  # a remote OUT_DIR: upload a committed shard
    labeller: Labeller | None = None  # with --head: a label map per image
