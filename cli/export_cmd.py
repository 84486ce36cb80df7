"""`dmtjepa export` and `dmtjepa info`: thin wrappers over export.pipeline and export.info."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.embed_cmd import LAYERS_HELP, parse_layers


def _fail(err: Exception) -> typer.Exit:
    """One sentence on stderr; exit 1 when a built model failed its check, 2 for anything the user can fix."""
    from export.errors import ParityError

    typer.echo(f"error: {err}", err=True)
    return typer.Exit(1 if isinstance(err, ParityError) else 2)


def export(
    encoder: Annotated[Path, typer.Argument(help="Encoder file (.safetensors) written by training.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for encoder.onnx and the other outputs.")],
    format: Annotated[
        str,
        typer.Option(
            "--format", help="onnx (and TensorRT), hf (Hugging Face model directory) or timm (timm checkpoint directory)."
        ),
    ] = "onnx",
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write encoder_fp16.onnx; LayerNorm stays fp32.")] = False,
    trt: Annotated[bool, typer.Option("--trt", help="Also build a TensorRT fp16 engine (TensorRT, GPU).")] = False,
    min_shape: Annotated[
        str | None, typer.Option(help="Smallest engine input Bx3xHxW [1 at half the training size].")
    ] = None,
    opt_shape: Annotated[
        str | None, typer.Option(help="Engine input to tune for, Bx3xHxW [32 at the training size].")
    ] = None,
    max_shape: Annotated[
        str | None, typer.Option(help="Largest engine input Bx3xHxW [32 at twice the training size].")
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset, 18 to 20.")] = 18,
    layers: Annotated[str | None, typer.Option(help=LAYERS_HELP + " Adds outputs layer_<i>.")] = None,
    license: Annotated[
        str | None, typer.Option("--license", help="hf/timm: licence id to record where the encoder file records none.")
    ] = None,
    eval_results: Annotated[
        list[Path] | None, typer.Option("--eval-results", help="hf/timm: JSON printed by `dmtjepa eval`, for the model card.")
    ] = None,
) -> None:
    """Export the target encoder to ONNX (and TensorRT), a Hugging Face directory or a timm checkpoint; each is
    checked against the encoder before it is kept."""
    from dmt_jepa.encoder_file import EncoderFileError
    from export.errors import ExportError
    from export.pipeline import export_encoder

    if format not in ("onnx", "hf", "timm"):
        raise _fail(ExportError(f"unknown --format {format!r}; choose onnx, hf or timm."))
    if format != "onnx":
        onnx_only = [flag for flag, used in [("--fp16", fp16), ("--trt", trt), ("--layers", layers)] if used]
        if onnx_only or min_shape or opt_shape or max_shape:
            raise _fail(ExportError(f"{', '.join(onnx_only) or 'engine shapes'} only apply to --format onnx; drop them."))
        from export.weights import export_weights

        try:
            export_weights(encoder, out, format, license=license, evaluation=eval_results or (), log=typer.echo)
        except (EncoderFileError, ExportError) as err:
            raise _fail(err) from err
        return
    if license or eval_results:
        raise _fail(ExportError("--license and --eval-results apply to --format hf and timm; drop them for onnx."))
    try:
        export_encoder(
            encoder, out, fp16=fp16, trt=trt, min_shape=min_shape, opt_shape=opt_shape, max_shape=max_shape,
            opset=opset, layers=parse_layers(layers), log=typer.echo,
        )
    except (EncoderFileError, ExportError) as err:
        raise _fail(err) from err


def info(
    file: Annotated[Path, typer.Argument(help="Encoder .safetensors, .onnx model, or .engine / its .engine.json.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of indented text.")] = False,
) -> None:
    """Print what an encoder file, ONNX model or TensorRT engine says about itself."""
    from dmt_jepa.encoder_file import EncoderFileError
    from export.errors import ExportError
    from export.info import describe, format_description

    try:
        description = describe(file)
    except (EncoderFileError, ExportError) as err:
        raise _fail(err) from err
    typer.echo(json.dumps(description, indent=2) if as_json else format_description(description))
