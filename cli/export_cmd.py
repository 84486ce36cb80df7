"""`dmtjepa export` and `dmtjepa info`: thin wrappers over export.pipeline and export.info."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dmt_jepa.cli.choices import ExportFormat, IoNames
from dmt_jepa.cli.embed_cmd import LAYERS_HELP, parse_layers
from dmt_jepa.cli.preflight import fail, need_encoder


def _fail(err: Exception) -> typer.Exit:
    """One sentence on stderr; exit 1 when a built model failed its check, 2 for anything the user can fix."""
    from dmt_jepa.export.errors import ParityError

    typer.echo(f"error: {err}", err=True)
    return typer.Exit(1 if isinstance(err, ParityError) else 2)


def parse_image_size(text: str) -> tuple[int, int]:
    """ "224" or "224x320" -> (224, 224) or (224, 320); anything else is one sentence."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        fail(f"--image-size takes H or HxW in pixels (e.g. 224 or 224x320), got {text!r}.")
    height, width = int(parts[0]), int(parts[-1])
    return height, width


def export(
    encoder: Annotated[Path, typer.Argument(help="Encoder file (.safetensors) written by training.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for encoder.onnx and the other outputs.")],
    format: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="onnx (and TensorRT), triton (Triton model repository), hf (Hugging Face model directory) "
            "or timm (timm checkpoint directory).",
        ),
    ] = "onnx",
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write encoder_fp16.onnx; LayerNorm stays fp32.")] = False,
    trt: Annotated[bool, typer.Option("--trt", help="Also build a TensorRT fp16 engine (TensorRT, GPU).")] = False,
    min_shape: Annotated[str | None, typer.Option(help="Smallest engine input Bx3xHxW [1 at half the training size].")] = None,
    opt_shape: Annotated[str | None, typer.Option(help="Engine input to tune for, Bx3xHxW [32 at the training size].")] = None,
    max_shape: Annotated[str | None, typer.Option(help="Largest engine input Bx3xHxW [32 at twice the training size].")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset, 18 to 20.")] = 18,
    layers: Annotated[str | None, typer.Option(help=LAYERS_HELP + " Adds outputs hidden_states_<i> (legacy: layer_<i>).")] = None,
    io_names: Annotated[
        IoNames,
        typer.Option(
            "--io-names",
            help="optimum: pixel_values -> last_hidden_state [B, N, D], pooler_output; "
            "legacy: images -> patch_embeddings [B, h, w, D], pooled.",
        ),
    ] = "optimum",
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace an earlier export in --out: the files its manifest lists are removed or rewritten; nothing else.",
        ),
    ] = False,
    model_name: Annotated[
        str | None,
        typer.Option(
            "--model-name", help="triton: the model's folder and name (default dmt_jepa; with --head, dmt_jepa_segmenter)."
        ),
    ] = None,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="triton: max_batch_size of the config.")] = 32,
    license: Annotated[
        str | None, typer.Option("--license", help="hf/timm: licence id to record where the encoder file records none.")
    ] = None,
    eval_results: Annotated[
        list[Path] | None, typer.Option("--eval-results", help="hf/timm: JSON printed by `dmtjepa eval`, for the model card.")
    ] = None,
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size",
            help="hf/timm: H or HxW to deploy at (default: the training size); the stored position table is "
            "that grid's, so transformers and timm are exact there.",
        ),
    ] = None,
    head: Annotated[
        Path | None,
        typer.Option(
            "--head",
            help="A head file from `eval dense --save-head`: write segmenter.onnx, pixel_values -> logits [B, C, H/p, W/p]; "
            "with --format triton, a Triton model of that graph whose config lists the class names.",
        ),
    ] = None,
    labels: Annotated[
        bool, typer.Option("--labels", help="With --head: also output labels [B, H, W], the argmax of the upsampled logits.")
    ] = False,
) -> None:
    """Export the target encoder to ONNX (and TensorRT), a Triton model repository, a Hugging Face directory or a
    timm checkpoint; each is checked against the encoder before it is kept."""
    engine = [flag for flag, used in [("--fp16", fp16), ("--trt", trt)] if used]
    if format != "onnx" and (engine or min_shape or opt_shape or max_shape):
        fail(f"{', '.join(engine) or 'engine shapes'} only apply to --format onnx; drop them.")
    if format in ("hf", "timm") and (layers or io_names != "optimum"):
        fail("--layers and --io-names apply to --format onnx and triton; drop them.")
    if format not in ("hf", "timm") and (license or eval_results or image_size):
        fail(f"--license, --eval-results and --image-size apply to --format hf and timm; drop them for {format}.")
    size = parse_image_size(image_size) if image_size else None
    chosen_layers = parse_layers(layers)
    need_encoder(encoder)
    if head is not None or labels:
        engine_flags = [fp16, trt, bool(layers), io_names != "optimum"]
        return _export_segmenter(encoder, out, head, labels, format, model_name, max_batch_size, opset, overwrite, engine_flags)

    from dmt_jepa.encoder_file import EncoderFileError
    from dmt_jepa.export.errors import ExportError
    from dmt_jepa.export.pipeline import export_encoder

    if format in ("hf", "timm"):
        from dmt_jepa.export.out_dir import replacing
        from dmt_jepa.export.weights import export_weights

        try:
            with replacing(out, overwrite=overwrite, sources=(encoder,)):
                export_weights(
                    encoder, out, format, license=license, evaluation=eval_results or (), image_size=size, log=typer.echo
                )
        except (EncoderFileError, ExportError) as err:
            raise _fail(err) from err
        return
    try:
        if format == "triton":
            from dmt_jepa.export.triton import export_triton

            export_triton(
                encoder, out, model_name="dmt_jepa" if model_name is None else model_name,
                max_batch_size=max_batch_size, opset=opset, layers=chosen_layers, io_style=io_names, overwrite=overwrite,
                log=typer.echo,
            )  # fmt: skip
            return
        export_encoder(
            encoder,
            out,
            fp16=fp16,
            trt=trt,
            min_shape=min_shape,
            opt_shape=opt_shape,
            max_shape=max_shape,
            opset=opset,
            layers=chosen_layers,
            io_style=io_names,
            overwrite=overwrite,
            log=typer.echo,
        )
    except (EncoderFileError, ExportError) as err:
        raise _fail(err) from err


def _export_segmenter(
    encoder: Path,
    out: Path,
    head: Path | None,
    labels: bool,
    format: str,
    model_name: str | None,
    max_batch_size: int,
    opset: int,
    overwrite: bool,
    engine_flags: list[bool],
) -> None:
    """`export ENCODER --out DIR --head HEAD [--labels] [--format triton]`: the one-graph segmentation model,
    as DIR/segmenter.onnx or as the Triton model DIR/NAME."""
    if head is None:
        fail("--labels applies with --head only; add --head HEAD.safetensors or drop --labels.")
    if format not in ("onnx", "triton"):
        fail(f"--head writes a segmenter as ONNX or as a Triton model, not {format}; choose --format onnx or triton.")
    if any(engine_flags):
        fail("--head writes one fp32 ONNX graph; drop --fp16, --trt, --layers and --io-names.")
    from dmt_jepa.encoder_file import EncoderFileError
    from dmt_jepa.export.errors import ExportError
    from dmt_jepa.export.head import export_segmenter, export_segmenter_triton

    try:
        if format == "triton":
            export_segmenter_triton(
                encoder, head, out, model_name="dmt_jepa_segmenter" if model_name is None else model_name,
                max_batch_size=max_batch_size, labels=labels, opset=opset, overwrite=overwrite, log=typer.echo,
            )  # fmt: skip
        else:
            export_segmenter(encoder, head, out, labels=labels, opset=opset, overwrite=overwrite, log=typer.echo)
    except (EncoderFileError, ExportError) as err:
        raise _fail(err) from err


def info(
    file: Annotated[
        str,
        typer.Argument(
            help="Encoder .safetensors, .onnx model, .engine / its .engine.json, an hf/timm model directory, "
            "a Triton model folder, or an embed OUT_DIR (path or file:// URL)."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of indented text.")] = False,
) -> None:
    """Print what an encoder file, ONNX model, TensorRT engine or model directory says about itself, or summarise an embed OUT_DIR."""
    path = _local(file)
    if not path.exists():
        fail(f"{path} does not exist; give an encoder file, a model file or folder, or an embed OUT_DIR.")
    from dmt_jepa.encoder_file import EncoderFileError
    from dmt_jepa.export.errors import ExportError
    from dmt_jepa.export.info import describe, describe_model_directory, format_description, is_model_directory
    from dmt_jepa.export.triton import describe_triton_model, is_triton_model

    if is_triton_model(path):
        try:
            description = describe_triton_model(path)
        except ExportError as err:
            raise _fail(err) from err
        typer.echo(json.dumps(description, indent=2) if as_json else format_description(description))
        return
    if is_model_directory(path):
        try:
            description = describe_model_directory(path)
        except EncoderFileError as err:
            raise _fail(err) from err
        typer.echo(json.dumps(description, indent=2) if as_json else format_description(description))
        return
    if path.is_dir():
        from dmt_jepa.serve.stats import describe_out_dir

        try:
            description = describe_out_dir(path)
        except OSError as err:
            raise _fail(ExportError(f"cannot read OUT_DIR {path} ({err.strerror or err}); check its permissions.")) from err
        typer.echo(json.dumps(description, indent=2) if as_json else format_out_dir(description))
        return

    try:
        description = describe(path)
    except (EncoderFileError, ExportError) as err:
        raise _fail(err) from err
    typer.echo(json.dumps(description, indent=2) if as_json else format_description(description))


def _local(location: str) -> Path:
    """The path of a local file or folder, also when given as a file:// URL."""
    from dmt_jepa.serve.safe_read import local_folder

    path = local_folder(location)
    if path is None:
        fail(f"info reads local files only, not {location}; copy it down (or mount it) first.")
    return path


def format_out_dir(d: dict) -> str:
    """`dmtjepa info OUT_DIR` as text: one fact per line."""
    job = "" if d["shards_in_job"] is None else f" of {d['shards_in_job']} in the job"
    others = d["not_in_job"]
    if others:
        shown = ", ".join(others[:10]) + (" ..." if len(others) > 10 else "")
        job += f", and {len(others)} more that the last job did not list ({shown})"
    lines = [f"{d['out_dir']}: {d['format']}", f"  shards done: {d['shards_done']}{job}"]
    for problem in d["damaged"].values():
        lines.append(f"  damaged, left out: {problem}")
    if d["missing"]:
        shown = ", ".join(d["missing"][:10]) + (" ..." if len(d["missing"]) > 10 else "")
        lines.append(f"  not done: {len(d['missing'])} ({shown})")
    if d["in_progress"]:
        lines.append(f"  being written now (or left by a killed run): {', '.join(d['in_progress'])}")
    if len(d["groups"]) > 1:
        lines.append(
            f"  mixed: {len(d['groups'])} different models or settings, whose vectors do not compare "
            "(open_embeddings refuses such a folder); move each set of shards to a folder of its own:"
        )
    for group in d["groups"]:
        model, indent = group["model"], "  " if len(d["groups"]) == 1 else "    "
        if len(d["groups"]) > 1:
            shown = ", ".join(group["shards"][:10]) + (" ..." if len(group["shards"]) > 10 else "")
            lines.append(f"  shards {shown} ({len(group['shards'])}):")
        if model:
            lines.append(f"{indent}model: {model.get('file')} ({model.get('arch')}, sha256 {str(model.get('sha256'))[:12]})")
        settings = ", ".join(f"{k} {v}" for k, v in group["settings"].items())
        lines.append(f"{indent}settings: {settings}, input {group['input_size']}")
    lines.append(f"  images: {d['embedded']} embedded, {d['failed']} failed, {len(d['cut_shards'])} shards cut off")
    for kind, count in d["failures_by_kind"].items():
        lines.append(f"    {count} x {kind}")
    per_image = "" if d["bytes_per_image"] is None else f" ({d['bytes_per_image']:.0f} bytes per image)"
    lines.append(f"  data: {d['data_bytes']} bytes{per_image}")
    job_summary = d["summary"]
    if job_summary is not None:
        lines.append(
            f"  job summary: {job_summary['embedded']} images, {job_summary['failed']} failed, "
            f"{job_summary['workers']} workers, {job_summary['wall_seconds']:.1f} s wall, "
            f"{job_summary['images_per_second']:.1f} images/s, dmt-jepa {', '.join(job_summary['versions'])}"
        )
    return "\n".join(lines)
