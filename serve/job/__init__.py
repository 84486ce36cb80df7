"""The shard -> dense embeddings batch job.

Three stages run at once so that the slowest one sets the pace:
  reader thread   claimed shards -> samples -> decode tasks for worker processes (bounded queue)
  main thread     decoded images -> batches -> backend (batches never span two shards)
  writer thread   embeddings -> OUT/.NAME.tar.OWNER.partial -> OUT/NAME.tar, then OUT/NAME.json last
Every queue is bounded in count, and the encoded bytes between reader and batcher in bytes, so
memory grows neither with shard size nor with image size. Batches stay inside one shard so that a
shard's bytes do not depend on which shards a restarted run skips, or which process embeds it.
A shard is done when NAME.tar and NAME.json exist and NAME.json records this run's identity.

Here: `embed_shards`, which opens OUT_DIR, skips what is done and hands the rest to an engine.
  options.py   EmbedOptions, JobSummary, the run's identity, ShardRun (what an engine is handed)
  out_dir.py   OUT_DIR: refusals, preparation, --overwrite's clearing, a remote OUT_DIR, a failed write
  read.py      the read side: claims, shard reading, the reader thread and its byte budget
  write.py     the write side: a batch through the model, per-shard outputs, commit, the writer thread
  loop.py      the local engine's loop over the three stages (serve/ray_engine.py is the Ray one)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, cast

from dmt_jepa.serve.api import preprocess_for
from dmt_jepa.serve.backends import Backend, BackendError, load_backend
from dmt_jepa.serve.images import Preprocess
from dmt_jepa.serve.inputs import ShardSource, partition, resolve_inputs, resolve_rank
from dmt_jepa.serve.job.loop import run_local
from dmt_jepa.serve.job.options import (
    DECODES,
    ENGINES,
    EmbedOptions,
    EngineError,
    JobSummary,
    OutputWriteError,
    ShardRun,
    run_identity,
)
from dmt_jepa.serve.job.out_dir import (
    check_identity,
    clear_other_settings,
    open_remote,
    prepare_out_dir,
    refuse_out_over_inputs,
    write_failure,
)
from dmt_jepa.serve.job.read import _ByteBudget
from dmt_jepa.serve.labels import Labeller, load_labeller
from dmt_jepa.serve.pca import PCA_FILE, PcaError, load_or_fit
from dmt_jepa.serve.remote import RemoteOut
from dmt_jepa.serve.safe_write import OutputDirError
from dmt_jepa.serve.shards import done_records, identity_difference, read_record
from dmt_jepa.serve.stats import STATS_DIR, SUMMARY, read_summary, write_summary

__all__ = [
    "DECODES",
    "ENGINES",
    "EmbedOptions",
    "EngineError",
    "JobSummary",
    "OutputDirError",
    "OutputWriteError",
    "_ByteBudget",
    "embed_shards",
    "prepare_out_dir",
    "refuse_out_over_inputs",
]


def embed_shards(
    inputs: str | Sequence[str],
    out_dir: str | os.PathLike,
    model: str | os.PathLike | Backend,
    options: EmbedOptions | None = None,
    **settings: Any,
) -> JobSummary:
    """Embed every shard of INPUT (this rank's share) into OUT_DIR; shards already done are skipped.

    `model` is a model file, or a Backend already built (then `backend` and `precision` are its own).
    Settings are an EmbedOptions, or its fields as keywords. Any number of processes may run this on
    one OUT_DIR at once: each shard is claimed by one of them (serve.claims).
    """
    options = replace(options or EmbedOptions(), **settings)
    shards = resolve_inputs(inputs)
    rank, world_size = resolve_rank(options.rank, options.world_size)
    mine = partition(shards, rank, world_size)
    labeller = None
    if options.head is not None:  # a head of another encoder is refused before any work
        labeller = load_labeller(options.head, model.model_path if isinstance(model, Backend) else model)
    with ExitStack() as stack:
        if options.engine == "ray":
            from dmt_jepa.serve import ray_engine  # Ray is an optional extra, imported only when asked for

            runner, run = stack.enter_context(ray_engine.session(model, options))
        else:
            runner = (
                model if isinstance(model, Backend) else load_backend(model, options.backend, options.precision, options.layers)
            )
            run = run_local
            from dmt_jepa.serve.backends.torch_backend import TorchBackend

            if options.decode == "gpu" and not isinstance(runner, TorchBackend):
                raise BackendError(
                    f"--decode gpu decodes on the PyTorch backend's GPU, not with {runner.name}; add --backend torch-cuda."
                )
        prep = preprocess_for(runner, options.size, options.resize, options.max_pixels)
        refuse_out_over_inputs(out_dir, shards)
        remote = open_remote(out_dir)
        if remote is not None:
            stack.callback(remote.close)
        return _embed_into(out_dir, remote, shards, mine, rank, world_size, runner, prep, options, run, labeller)


def _embed_into(
    out_dir: str | os.PathLike,
    remote: RemoteOut | None,
    shards: list[ShardSource],
    mine: list[ShardSource],
    rank: int,
    world_size: int,
    runner: Backend,
    prep: Preprocess,
    options: EmbedOptions,
    run: Callable[[ShardRun], None],
    labeller: Labeller | None = None,
) -> JobSummary:
    """embed_shards once OUT_DIR is open: local, or a remote one staged in `remote.staging`."""
    out = Path(out_dir) if remote is None else remote.staging
    read = partial(read_record, out) if remote is None else remote.read_record
    identity = run_identity(runner, prep, options)
    if labeller is not None:
        identity["head_sha256"] = labeller.sha256
    records = done_records(out) if remote is None else remote.done_records()
    if not options.overwrite:
        check_identity(out_dir, identity, records)
    prepare_out_dir(out, options.layout)
    projection = None
    if options.pca is not None:
        if remote is not None:
            remote.pull(PCA_FILE)
        try:
            projection, identity["pca_sha256"] = load_or_fit(out, runner, prep, shards, options.pca, options.overwrite)
        except PcaError as err:
            raise OutputDirError(str(err)) from err
        if remote is not None:
            remote.push(PCA_FILE)
    if options.overwrite:
        clear_other_settings(out, remote, identity, records, keep_pca=options.pca is not None)

    def done(name: str) -> bool:
        record = read(name)
        return record is not None and identity_difference(record, identity) is None

    summary = JobSummary(rank, world_size, [s.name for s in mine], backend=runner.name, precision=runner.precision)
    summary.notices += runner.notices
    summary.skipped = [s.name for s in mine if done(s.name)]
    pending = [s for s in mine if s.name not in set(summary.skipped)]
    start = time.perf_counter()
    if pending:
        try:
            publish = None if remote is None else remote.publish
            names = [s.name for s in shards]
            run(ShardRun(pending, names, out, runner, prep, identity, projection, options, summary, publish, labeller))
        except OSError as err:
            dim = runner.info.embed_dim if projection is None else cast(int, options.pca)  # set with one
            raise OutputWriteError(write_failure(out_dir, out, err, options, runner.layers, prep.grid, dim)) from err
    summary.seconds = time.perf_counter() - start
    names = [s.name for s in shards]
    if (summary.completed or read_summary(out) is None) and all(done(n) for n in names):
        try:
            if remote is not None:
                remote.pull_stats()  # the other workers' records, for totals over all of them
            summary.job = write_summary(out, names)
            if remote is not None:
                remote.push(f"{STATS_DIR}/{SUMMARY}")
        except OSError as err:
            summary.notices.append(f"the job summary could not be written to {out_dir} ({err.strerror or err})")
    return summary
