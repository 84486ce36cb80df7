"""`dmtjepa embed`: image shards -> dense patch embeddings, one output shard per input shard."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from dmt_jepa.cli.choices import Backend, Decode, Dtype, Engine, Layout, Precision, Resize
from dmt_jepa.cli.preflight import fail, need_file, need_path

BACKEND_HELP = (
    "auto, torch-cpu, torch-cuda, onnxruntime-cpu, onnxruntime-cuda, openvino or tensorrt (auto: fastest for the "
    "model here; on a CPU measured once and cached, see docs/embed.md)."
)


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'224' -> (224, 224); '160x288' -> (160, 288) as [H, W]."""
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise typer.BadParameter(f"{text!r} is not a size; write HxW (e.g. 224x224 or 160x288) or one number.")
    return (int(parts[0]), int(parts[-1]))


def parse_layers(text: str | None) -> list[int] | None:
    """'3,5,7,11' -> [3, 5, 7, 11]: block indices, 0-based, negative from the end."""
    if text is None:
        return None
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a list of block indices; write e.g. 3,5,7,11.") from None
    if len(set(layers)) != len(layers):
        raise typer.BadParameter(f"{text!r} names a block twice; list each block once.")
    return layers


LAYERS_HELP = "Also output these blocks (after the final norm), e.g. 3,5,7,11 (0-based; -1 = last)."


def embed(
    input: str = typer.Argument(
        ...,
        help="Shards: a brace pattern (data/shard-{000..099}.tar), a file listing shard paths/URLs, or a directory.",
    ),
    out_dir: str = typer.Argument(
        ..., help="Where each input shard NAME.tar's outputs go: a folder, or an fsspec URL (s3://bucket/out, ...)."
    ),
    model: Path = typer.Option(
        ..., "--model", help="Encoder file (.safetensors), ONNX model (.onnx) or TensorRT engine (.engine)."
    ),
    backend: Backend = typer.Option("auto", help=BACKEND_HELP),
    precision: Precision | None = typer.Option(
        None,
        help="fp32, bf16, fp16, int8 or int8-static where the backend supports it (default: the model's own); "
        "int8 is dynamic on onnxruntime-cpu and calibrated on openvino, int8-static calibrated on onnxruntime-cpu.",
    ),
    size: str = typer.Option(None, help="Model input HxW, multiples of the patch size (default: the training size)."),
    resize: Resize = typer.Option("crop", help="crop: shorter side to size, centre crop; pad: fit inside, pad with the mean."),
    batch_size: int = typer.Option(32, min=1, help="Images per inference batch."),
    workers: int = typer.Option(None, min=0, help="Decode worker processes (default: half the CPUs; 0 decodes in a thread)."),
    pooled: bool = typer.Option(False, "--pooled", help="Also write pooled.npy, the mean patch embedding."),
    layout: Layout = typer.Option(
        "tar",
        help="tar: a WebDataset tar per shard; array: .npy arrays (memmap-able) and a Parquet table per shard; "
        "embedding-reader: pooled vectors in img_emb/ and tables in metadata/ (clip-retrieval's folders).",
    ),
    dtype: Dtype = typer.Option("float16", help="float32, float16, or int8 (with a float32 scale per vector)."),
    pooled_only: bool = typer.Option(False, "--pooled-only", help="Write pooled vectors only, no patch grids."),
    pca: int = typer.Option(
        None, help="Store vectors projected on this many principal axes, fitted on the job's first images (OUT/pca.npy)."
    ),
    max_carried_bytes: int = typer.Option(
        65536, min=0, help="Copy each non-image input member (cls, json, txt, ...) up to this size; 0: none."
    ),
    rank: int = typer.Option(None, help="This process's rank (default: RANK or SLURM_PROCID, else 0)."),
    world_size: int = typer.Option(
        None, help="Number of processes sharing the shards (default: WORLD_SIZE or SLURM_NTASKS, else 1)."
    ),
    max_pixels: int = typer.Option(None, min=1, help="Refuse images declaring more pixels than this (decompression bombs)."),
    progress: bool = typer.Option(
        None,
        "--progress/--no-progress",
        help="Progress bar (default: a bar when stderr is a terminal, else a plain line every --progress-every s).",
    ),
    progress_every: float = typer.Option(
        30.0, min=0, help="Seconds between plain progress lines when stderr is not a terminal; 0: none."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Redo shards OUT_DIR holds from other settings (default: refuse such a run)."
    ),
    lease: float = typer.Option(
        60.0, min=0.1, help="Seconds after which a shard claimed by a process that stopped is taken over."
    ),
    layers: str = typer.Option(None, help=LAYERS_HELP + " Written as KEY.layer_<i>.npy (tar) or NAME.layer_<i>.npy (array)."),
    engine: Engine = typer.Option(
        "local", help="local: this process and its decode workers; ray: a Ray cluster (pip install 'dmt-jepa[ray]')."
    ),
    address: str = typer.Option(
        None, help="--engine ray: the cluster to join (auto: the one `ray start --head` began here; default: a new local one)."
    ),
    decode_workers: int = typer.Option(
        None, min=1, help="--engine ray: decode tasks at once (default: the cluster's CPUs less the model workers)."
    ),
    model_workers: int = typer.Option(1, min=1, help="--engine ray: model actors, each loading the model once."),
    gpus_per_worker: float = typer.Option(0.0, min=0, help="--engine ray: GPUs per model actor (0: CPU)."),
    decode: Decode = typer.Option(
        "cpu",
        help="cpu: decode workers decode; gpu: JPEGs are decoded on the GPU that runs the model (nvJPEG, "
        "needs --backend torch-cuda), workers only check their headers.",
    ),
    head: Path = typer.Option(
        None,
        "--head",
        help="A head file of --model's encoder (`eval dense --save-head`): also store each image's label map, "
        "the argmax class per patch (KEY.labels.npy, tar layout).",
    ),
) -> None:
    """Embed every image of the input shards; reruns skip shards already done; many processes may share OUT_DIR."""
    from dmt_jepa.serve.inputs import InputError, resolve_inputs
    from dmt_jepa.serve.remote import location

    if decode == "gpu" and backend != "torch-cuda":
        raise typer.BadParameter(f"--decode gpu decodes on the GPU that runs the model: use --backend torch-cuda, not {backend}.")
    chosen_size, chosen_layers = parse_size(size), parse_layers(layers)
    from dmt_jepa.serve.embed_rules import option_problems  # torch-free: a clash is answered before the job's imports

    clashes = option_problems(
        engine=engine, address=address, decode_workers=decode_workers, model_workers=model_workers,
        gpus_per_worker=gpus_per_worker, decode=decode, layout=layout, dtype=dtype,
        layers=tuple(chosen_layers) if chosen_layers else None, pca=pca, head=head is not None,
    )  # fmt: skip
    if clashes:
        fail(clashes[0])
    if head is not None:
        need_file(head, "head file", "pass the file `dmtjepa eval dense --save-head` wrote")
    try:
        resolve_inputs(input)
    except InputError as err:
        fail(str(err))
    need_path(model, "model file", "pass an encoder file (.safetensors), an ONNX model (.onnx) or a TensorRT engine (.engine)")
    if location(out_dir)[0] == "memory":
        fail(
            f"OUT_DIR {out_dir} lives in this process's memory, so the outputs would vanish when the command "
            "ends; choose a folder or a persistent store (file://, s3://, ...)."
        )

    from dmt_jepa.encoder_file import EncoderFileError
    from dmt_jepa.evaluation.head import HeadFileError
    from dmt_jepa.serve.backends import BackendError
    from dmt_jepa.serve.images import DEFAULT_MAX_PIXELS
    from dmt_jepa.serve.job import EmbedOptions, EngineError, OutputDirError, OutputWriteError, embed_shards

    try:
        options = EmbedOptions(
            backend=backend,
            precision=precision,
            size=chosen_size,
            resize=resize,
            batch_size=batch_size,
            workers=workers,
            pooled=pooled,
            layout=layout,
            dtype=dtype,
            pooled_only=pooled_only,
            max_carried_bytes=max_carried_bytes,
            pca=pca,
            rank=rank,
            world_size=world_size,
            max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
            progress=sys.stderr.isatty() if progress is None else progress,
            progress_every=progress_every if progress is None else 0.0,
            overwrite=overwrite,
            layers=tuple(chosen_layers) if chosen_layers else None,
            lease_seconds=lease,
            engine=engine,
            address=address,
            decode_workers=decode_workers,
            model_workers=model_workers,
            gpus_per_worker=gpus_per_worker,
            decode=decode,
            head=head,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    try:
        summary = embed_shards(input, out_dir, model, options)
    except (InputError, BackendError, OutputDirError, EncoderFileError, EngineError, HeadFileError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    except OutputWriteError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    for notice in summary.notices:
        typer.echo(f"note: {notice}", err=True)
    check = (
        ""
        if summary.worst_patch_cosine is None
        else f"; {summary.precision} vs fp32 worst patch cosine {summary.worst_patch_cosine:.4f}"
    )
    others = f", {summary.by_others} by other processes" if summary.by_others else ""
    typer.echo(
        f"rank {summary.rank}/{summary.world_size}: {len(summary.completed)} shards embedded, "
        f"{len(summary.skipped)} already done{others}; "
        f"{summary.embedded} images embedded, {summary.failed} failed (reasons in NAME.json), "
        f"{len(summary.cut_shards)} shards cut off; {summary.images_per_second:.1f} images/s on "
        f"{summary.backend} {summary.precision}{check}; outputs in {out_dir}"
    )
    if summary.job is not None:
        job = summary.job
        typer.echo(
            f"job: all {job['shards']} shards done by {job['workers']} workers: {job['embedded']} images embedded, "
            f"{job['failed']} failed, {job['images_per_second']:.1f} images/s over {job['wall_seconds']:.0f} s "
            f"(totals in {out_dir}/_stats/summary.json)"
        )
    if summary.missing:
        name, reason = next(iter(summary.missing.items()))
        typer.echo(
            f"error: {len(summary.missing)} shards could not be read and are not done (first: {name}: {reason}); "
            "rerun the same command once they are readable.",
            err=True,
        )
        raise typer.Exit(3)
