"""Encoder file -> ONNX model (fp32, optionally fp16), verified before it is kept."""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, cast

import numpy as np
import onnx
import torch
from torch import nn

from dmt_jepa.encoder_file import EncoderInfo, file_sha256, load_encoder
from dmt_jepa.export.errors import ExportError, ParityError
from dmt_jepa.export.io_names import DEFAULT_STYLE, IO_NAMES_METADATA, OPTIMUM, IoNames, io_names
from dmt_jepa.export.verify import (
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    ParityReport,
    Shape,
    Tolerance,
    check_multiple_of_patch,
    check_parity,
    default_shapes,
)
from dmt_jepa.models import VisionTransformer, resolve_layers

# Opset 18 keeps attention as MatMul -> Softmax -> MatMul (opset 23 would emit the fused
# Attention op, which older TensorRT parsers reject); TensorRT's ONNX parser recognises that
# pattern and fuses it into its own attention kernels. 18 also has LayerNormalization (17+).
DEFAULT_OPSET = 18
SUPPORTED_OPSETS = (18, 19, 20)

LAYERS_METADATA = "layers"  # metadata prop: JSON list of the block indices exported as extra outputs
FP32_FILENAME = "encoder.onnx"
FP16_FILENAME = "encoder_fp16.onnx"
TRACE_BATCH = 2  # batch 1 would let the tracer specialise the batch dimension to a constant


def dense_outputs(
    encoder: VisionTransformer, images: torch.Tensor, layers: Sequence[int] = (), names: IoNames = OPTIMUM
) -> tuple[torch.Tensor, ...]:
    """The graph's outputs in `names.outputs(layers)` order and layout; legacy without layers is `encoder.dense`."""
    grid, pooled, maps = encoder.dense_with_layers(images, layers)
    if names.tokens:  # [B, h, w, D] -> [B, h*w, D], the grid read row by row
        grid, maps = grid.flatten(1, 2), [m.flatten(1, 2) for m in maps]
    return (grid, pooled, *maps)


class DenseEncoder(nn.Module):
    """The deployed graph: float32 images [B, 3, H, W] -> float32 (tokens or grid, pooled [B, D], layers...)."""

    def __init__(
        self,
        encoder: VisionTransformer,
        compute_dtype: torch.dtype = torch.float32,
        layers: Sequence[int] = (),
        names: IoNames = OPTIMUM,
    ):
        super().__init__()
        self.encoder = encoder
        self.compute_dtype = compute_dtype
        self.layers = tuple(layers)
        self.names = names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = dense_outputs(self.encoder, images.to(self.compute_dtype), self.layers, self.names)
        return tuple(out.float() for out in outputs)


class Float32LayerNorm(nn.Module):
    """A LayerNorm computed in float32 whatever its input dtype: fp16 variance overflows and loses the mean."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


class FusableGelu(nn.Module):
    """Exact (erf) GELU written as x * (1 + erf(x / sqrt 2)) * 0.5, the order ONNX Runtime fuses.

    torch.onnx writes nn.GELU at opset 18 as x * (0.5 * (1 + erf(x / sqrt 2))), a pattern ONNX
    Runtime's Gelu fusion does not match: each block then runs five element-wise ops over its
    widest activation instead of one BiasGelu kernel, which made the fp32 graph a fifth slower than
    a plain timm export (benchmarks/onnx_graph_compare.py). Multiplying by 0.5 is exact, so the
    values are those of nn.GELU; the ops stay standard ONNX (TensorRT parses them as before).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 + torch.erf(x / SQRT2)) * 0.5


SQRT2 = 1.4142135623730951


def with_fusable_gelu(encoder: VisionTransformer) -> VisionTransformer:
    """A copy of `encoder` whose exact nn.GELU activations are FusableGelu (the graph's values are unchanged)."""
    encoder = copy.deepcopy(encoder)
    names = [name for name, m in encoder.named_modules() if isinstance(m, nn.GELU) and m.approximate == "none"]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(encoder.get_submodule(parent_name) if parent_name else encoder, child, FusableGelu())
    return encoder


def half_encoder(encoder: VisionTransformer) -> VisionTransformer:
    """An fp16 copy of the encoder whose LayerNorms keep their fp32 weights and compute in fp32."""
    half = copy.deepcopy(encoder).half()
    norm_names = [name for name, module in encoder.named_modules() if isinstance(module, nn.LayerNorm)]
    for name in norm_names:
        parent_name, _, child = name.rpartition(".")
        parent = half.get_submodule(parent_name) if parent_name else half
        setattr(parent, child, Float32LayerNorm(copy.deepcopy(cast(nn.LayerNorm, encoder.get_submodule(name)))))
    return half.eval()


@dataclass(frozen=True)
class OnnxExport:
    """One written ONNX model and the parity figures that let it be kept."""

    path: Path
    precision: str
    report: ParityReport


def torch_runner(
    encoder: VisionTransformer, layers: Sequence[int] = (), names: IoNames = OPTIMUM
) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
    """The fp32 PyTorch reference as a numpy function, with the outputs `names.outputs(layers)` names."""

    def run(images: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            outputs = dense_outputs(encoder, torch.from_numpy(images), layers, names)
        return tuple(out.numpy() for out in outputs)

    return run


def onnx_runner(
    path: str | os.PathLike,
    providers: Sequence[str | tuple[str, dict]] = ("CPUExecutionProvider",),
    layers: Sequence[int] = (),
    names: IoNames = OPTIMUM,
):
    """An ONNX Runtime session on `path` as a numpy function, returning `names.outputs(layers)`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT warns about every fp16 node it runs through fp32 casts on CPU
    session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))

    outputs = names.outputs(layers)

    def run(images: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(session.run(outputs, {names.input: images}))

    return run


def export_graph(
    encoder: VisionTransformer,
    info: EncoderInfo,
    path: Path,
    metadata: dict[str, str],
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    layers: Sequence[int] = (),
    names: IoNames = OPTIMUM,
) -> None:
    """Trace the dense view of `encoder` with dynamic batch, height and width and save it to `path`."""
    graph_encoder = with_fusable_gelu(half_encoder(encoder) if fp16 else encoder)
    model = DenseEncoder(graph_encoder, torch.float16 if fp16 else torch.float32, layers, names)
    example = torch.randn(TRACE_BATCH, 3, *info.img_size)
    with warnings.catch_warnings():
        # The exporter warns about internals (deprecated decompositions, fake-tensor notes) that
        # say nothing about this model; a real problem surfaces as an exception or in parity.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(),
            (example,),
            input_names=[names.input],
            output_names=names.outputs(layers),
            dynamic_shapes={"images": {0: "batch", 2: "height", 3: "width"}},  # keyed by forward()'s argument
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    assert program is not None  # dynamo=True returns the program
    program.model.metadata_props.update({**metadata, IO_NAMES_METADATA: names.style})
    program.model.doc_string = f"dmt-jepa {info.arch}/{info.patch_size} target encoder, {'fp16' if fp16 else 'fp32'}"
    program.save(str(path))


def full_check(path: Path) -> None:
    """onnx.checker with full check (shape inference included); raises ExportError on a broken model."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"the exported model {path.name} fails onnx.checker ({err}); please report this.") from err


def verify_onnx(
    path: Path,
    encoder: VisionTransformer,
    shapes: Sequence[Shape],
    tolerance: Tolerance,
    *,
    name: str = "ONNX Runtime",
    layers: Sequence[int] = (),
    names: IoNames = OPTIMUM,
) -> ParityReport:
    """ONNX Runtime on `path` against the fp32 PyTorch encoder at every shape, on every output."""
    return check_parity(
        onnx_runner(path, layers=layers, names=names),
        torch_runner(encoder, layers, names),
        shapes,
        tolerance,
        candidate_name=name,
        reference_name="PyTorch fp32",
    )


def fresh_scratch(out_dir: Path, name: str) -> Path:
    """An empty hidden folder `out_dir/.NAME.partial` to write into before a check decides what is kept."""
    scratch = out_dir / f".{name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        scratch.mkdir(parents=True)
    except OSError as err:
        raise ExportError(f"cannot write into {out_dir} ({err.strerror}); choose a writable --out.") from err
    return scratch


class _Checked(Protocol):
    """What `_write_verified` reads of a check's report (ParityReport, export.head's SegmenterParity)."""

    @property
    def ok(self) -> bool: ...

    def lines(self) -> list[str]: ...


Report = TypeVar("Report", bound=_Checked)


def _write_verified(
    out_dir: Path,
    filename: str,
    write: Callable[[Path], None],
    verify: Callable[[Path], Report],
    log: Callable[[str], None],
) -> Report:
    """Write into a scratch folder, check, and only then move into `out_dir` (an older file survives a failure)."""
    scratch = fresh_scratch(out_dir, filename)
    try:
        write(scratch / filename)
        full_check(scratch / filename)
        report = verify(scratch / filename)
        for line in report.lines():
            log(line)
        if not report.ok:
            raise ParityError(
                f"{filename} differs from the PyTorch encoder beyond tolerance and was not kept "
                "(figures above); please report this with the encoder's architecture.",
                report.lines(),
            )
        # Large models carry an external data file next to the graph; move everything written.
        for item in scratch.iterdir():
            os.replace(item, out_dir / item.name)
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def export_onnx(
    encoder_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    shapes: Sequence[Shape] | None = None,
    layers: int | Sequence[int] | None = None,
    io_style: str = DEFAULT_STYLE,
    log: Callable[[str], None] = print,
) -> list[OnnxExport]:
    """Export the encoder file to `out_dir/encoder.onnx` (and `encoder_fp16.onnx`), each verified first.

    `layers` (an int: the last n blocks; or block indices) adds one output per block after the
    final norm (`hidden_states_<i>`, or `layer_<i>` with `io_style="legacy"`: export/io_names.py)
    beside the two outputs of the contract.
    """
    try:
        names = io_names(io_style)
    except ValueError as err:
        raise ExportError(str(err)) from err
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported; choose one of {', '.join(map(str, SUPPORTED_OPSETS))}.")
    encoder, info = load_encoder(encoder_path)
    try:
        layers = resolve_layers(info.depth, layers) if layers is not None else []
    except ValueError as err:
        raise ExportError(f"--layers: {err}") from err
    if len(set(layers)) != len(layers):
        raise ExportError(f"--layers names a block twice ({layers}); list each block once.")
    shapes = list(shapes) if shapes is not None else default_shapes(info)
    for shape in shapes:
        check_multiple_of_patch(shape, info.patch_size, "check shape")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create the output folder {out_dir} ({err.strerror}); choose a writable --out.") from err

    metadata = {**info.to_metadata(), "source_sha256": file_sha256(encoder_path), "opset": str(opset)}
    if layers:
        metadata[LAYERS_METADATA] = json.dumps(layers)
    variants = [("fp32", FP32_FILENAME, FP32_TOLERANCE)]
    if fp16:
        variants.append(("fp16", FP16_FILENAME, FP16_TOLERANCE))
    results = []
    for precision, filename, tolerance in variants:

        def write(path: Path, precision: str = precision) -> None:
            meta = {**metadata, "precision": precision}
            export_graph(encoder, info, path, meta, fp16=precision == "fp16", opset=opset, layers=layers, names=names)

        def verify(path: Path, precision: str = precision, tolerance: Tolerance = tolerance) -> ParityReport:
            name = f"ONNX Runtime {precision}"
            return verify_onnx(path, encoder, shapes, tolerance, name=name, layers=layers, names=names)

        report = _write_verified(out_dir, filename, write, verify, log)
        results.append(OnnxExport(out_dir / filename, precision, report))
        log(f"wrote {out_dir / filename}")
    return results
