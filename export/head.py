"""Encoder file + dense head file -> one verified ONNX segmentation graph.

The graph: `pixel_values` float32 [B, 3, H, W] (normalised as the encoder expects) -> the target
encoder's patch grid -> the head as one 1x1 convolution (its feature standardisation folded in)
-> `logits` float32 [B, C, H/p, W/p]; with `labels`, also `labels` int64 [B, H, W], the argmax of
the logits upsampled bilinearly to the input size, as `eval dense` scored them. B, H and W are
dynamic (multiples of p). Like every export it is written aside, run by ONNX Runtime against the
PyTorch model on random images at the training size and a non-square size, and kept only if the
two agree; the class names ride along in the metadata. The same checked graph is written either as
`segmenter.onnx` (`export_segmenter`) or as the model of a Triton repository
(`export_segmenter_triton`, through export/triton.py, whose config repeats the class names).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmt_jepa.encoder_file import EncoderInfo, file_sha256, load_encoder
from dmt_jepa.evaluation.head import DenseHead, HeadFileError, head_for_encoder
from dmt_jepa.export.errors import ExportError
from dmt_jepa.export.onnx_export import DEFAULT_OPSET, SUPPORTED_OPSETS, TRACE_BATCH, _write_verified, with_fusable_gelu
from dmt_jepa.export.out_dir import replacing
from dmt_jepa.export.triton import DEFAULT_MAX_BATCH, check_settings, write_model
from dmt_jepa.export.verify import Shape, check_multiple_of_patch, default_shapes, random_images
from dmt_jepa.models import VisionTransformer

SEGMENTER_FILENAME = "segmenter.onnx"
DEFAULT_TRITON_NAME = "dmt_jepa_segmenter"
INPUT = "pixel_values"
LOGITS, LABELS = "logits", "labels"
LOGITS_TOLERANCE = 1e-4  # max |ONNX - PyTorch| over the logits, relative to the largest logit (at least 1)
LABELS_AGREEMENT = 0.999  # share of pixels whose label agrees; an exact tie may fall either way


class Segmenter(nn.Module):
    """Encoder -> 1x1 convolution over the patch grid -> logits [B, C, h, w] (and labels [B, H, W])."""

    def __init__(self, encoder: VisionTransformer, head: DenseHead, labels: bool = False):
        super().__init__()
        self.encoder = encoder
        weight, bias = head.folded()  # [C, D], [C]
        self.classify = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=1)
        with torch.no_grad():
            self.classify.weight.copy_(weight[:, :, None, None])
            assert self.classify.bias is not None  # nn.Conv2d has one unless bias=False
            self.classify.bias.copy_(bias)
        self.labels = labels

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grid, _ = self.encoder.dense(pixel_values)  # [B, h, w, D]
        logits = self.classify(grid.permute(0, 3, 1, 2))  # [B, C, h, w]
        if not self.labels:
            return (logits,)
        upsampled = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        return logits, upsampled.argmax(1)  # [B, C, h, w], [B, H, W]


@dataclass(frozen=True)
class SegmenterCheck:
    """ONNX Runtime against PyTorch at one shape."""

    batch: int
    height: int
    width: int
    max_abs_err_logits: float
    logits_scale: float  # largest |logit| of the reference
    labels_agreement: float | None  # None without the labels output

    def failures(self) -> list[str]:
        out = []
        bound = LOGITS_TOLERANCE * max(1.0, self.logits_scale)
        if not self.max_abs_err_logits <= bound:  # also catches NaN
            out.append(f"logits max abs error {self.max_abs_err_logits:.2e} > {bound:.1e}")
        if self.labels_agreement is not None and not self.labels_agreement >= LABELS_AGREEMENT:
            out.append(f"labels agree on {100 * self.labels_agreement:.3f} % of pixels < {100 * LABELS_AGREEMENT} %")
        return out

    def line(self) -> str:
        failed = self.failures()
        labels = "" if self.labels_agreement is None else f", labels agree on {100 * self.labels_agreement:.3f} % of pixels"
        verdict = "ok" if not failed else "FAIL: " + "; ".join(failed)
        return (
            f"batch {self.batch}, {self.height}x{self.width}: max|diff| logits {self.max_abs_err_logits:.2e} "
            f"(largest logit {self.logits_scale:.2e}){labels}  {verdict}"
        )


@dataclass(frozen=True)
class SegmenterParity:
    """Every check of one segmentation graph (the interface `_write_verified` reads: ok, lines)."""

    checks: tuple[SegmenterCheck, ...]

    @property
    def ok(self) -> bool:
        return all(not c.failures() for c in self.checks)

    def lines(self) -> list[str]:
        return ["ONNX Runtime segmenter vs PyTorch fp32:"] + ["  " + c.line() for c in self.checks]


def check_segmenter(path: Path, model: Segmenter, shapes: Sequence[Shape], seed: int = 0) -> SegmenterParity:
    """Run the graph and the module on the same random images at every shape."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    names = [LOGITS, LABELS] if model.labels else [LOGITS]
    checks = []
    for i, shape in enumerate(shapes):
        images = random_images(shape, seed + i)
        with torch.inference_mode():
            reference = [out.numpy() for out in model(torch.from_numpy(images))]
        candidate = session.run(names, {INPUT: images})
        agreement = float(np.mean(reference[1] == candidate[1])) if model.labels else None
        checks.append(
            SegmenterCheck(
                *shape,
                max_abs_err_logits=float(np.abs(reference[0] - candidate[0]).max()),
                logits_scale=float(np.abs(reference[0]).max()),
                labels_agreement=agreement,
            )
        )
    return SegmenterParity(tuple(checks))


def _write_graph(
    encoder: VisionTransformer, head: DenseHead, labels: bool, info: EncoderInfo, path: Path, metadata: dict[str, str], opset: int
) -> None:
    """Trace the segmenter (its GELUs in the order ONNX Runtime fuses) with dynamic batch, height and width."""
    graph = Segmenter(with_fusable_gelu(encoder), head, labels)
    outputs = [LOGITS, LABELS] if labels else [LOGITS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on internals; real problems raise or fail parity
        program = torch.onnx.export(
            graph.eval(),
            (torch.randn(TRACE_BATCH, 3, *info.img_size),),
            input_names=[INPUT],
            output_names=outputs,
            dynamic_shapes={"pixel_values": {0: "batch", 2: "height", 3: "width"}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    assert program is not None  # dynamo=True returns the program
    program.model.metadata_props.update(metadata)
    program.model.doc_string = f"dmt-jepa {info.arch}/{info.patch_size} target encoder with a {len(outputs)}-output dense head"
    program.save(str(path))


def _matching_head(head_path: str | os.PathLike, encoder_path: str | os.PathLike) -> DenseHead:
    """The head file, checked to belong to this encoder file."""
    try:
        return head_for_encoder(head_path, encoder_path)
    except HeadFileError as err:
        raise ExportError(str(err)) from err


@dataclass(frozen=True)
class _Plan:
    """A segmenter ready to write: the encoder and its matching head, the shapes it is checked at, its metadata."""

    encoder: VisionTransformer
    info: EncoderInfo
    head: DenseHead
    labels: bool
    opset: int
    shapes: list[Shape]
    metadata: dict[str, str]

    def write(self, folder: Path, log: Callable[[str], None]) -> SegmenterParity:
        """`folder/segmenter.onnx`, written aside and kept only if ONNX Runtime agrees with PyTorch."""
        model = Segmenter(self.encoder.eval(), self.head, self.labels).eval()
        return _write_verified(
            folder,
            SEGMENTER_FILENAME,
            lambda path: _write_graph(self.encoder, self.head, self.labels, self.info, path, self.metadata, self.opset),
            lambda path: check_segmenter(path, model, self.shapes),
            log,
        )


def _plan(
    encoder_path: str | os.PathLike, head_path: str | os.PathLike, labels: bool, opset: int, shapes: Sequence[Shape] | None
) -> _Plan:
    """Check the opset, the encoder, the head against it and the shapes: every refusal before any work."""
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported; choose one of {', '.join(map(str, SUPPORTED_OPSETS))}.")
    encoder, info = load_encoder(encoder_path)
    head = _matching_head(head_path, encoder_path)
    shapes = list(shapes) if shapes is not None else default_shapes(info)
    for shape in shapes:
        check_multiple_of_patch(shape, info.patch_size, "check shape")
    metadata = {
        **info.to_metadata(),
        "source_sha256": file_sha256(encoder_path),
        "head_sha256": file_sha256(head_path),
        "class_names": json.dumps(head.class_names),
        "head_image_size": json.dumps(list(head.image_size)),
        "outputs": json.dumps([LOGITS, LABELS] if labels else [LOGITS]),
        "opset": str(opset),
    }
    return _Plan(encoder, info, head, labels, opset, shapes, metadata)


def export_segmenter(
    encoder_path: str | os.PathLike,
    head_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    labels: bool = False,
    opset: int = DEFAULT_OPSET,
    shapes: Sequence[Shape] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[Path, SegmenterParity]:
    """Write `out_dir/segmenter.onnx` (listed in the folder's manifest), verified against PyTorch first."""
    plan = _plan(encoder_path, head_path, labels, opset, shapes)
    out_dir = Path(out_dir)
    with replacing(out_dir, overwrite=overwrite, sources=(encoder_path, head_path)):
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ExportError(f"cannot create the output folder {out_dir} ({err.strerror}); choose a writable --out.") from err
        report = plan.write(out_dir, log)
    head = plan.head
    log(f"wrote {out_dir / SEGMENTER_FILENAME} ({head.num_classes} classes: {', '.join(head.class_names[:6])}"
        f"{' ...' if head.num_classes > 6 else ''})")  # fmt: skip
    return out_dir / SEGMENTER_FILENAME, report


def export_segmenter_triton(
    encoder_path: str | os.PathLike,
    head_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_name: str = DEFAULT_TRITON_NAME,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    labels: bool = False,
    opset: int = DEFAULT_OPSET,
    shapes: Sequence[Shape] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[Path, SegmenterParity]:
    """Write the Triton model `out_dir/model_name/`: 1/model.onnx is the segmenter graph, verified against PyTorch
    first, and config.pbtxt declares its inputs and outputs and lists the class names (parameter `class_names`).
    Other models in `out_dir` are left alone; `overwrite` replaces an earlier export of this one."""
    check_settings(model_name, max_batch_size)
    plan = _plan(encoder_path, head_path, labels, opset, shapes)
    reports: list[SegmenterParity] = []

    def write_graph(folder: Path) -> Path:
        reports.append(plan.write(folder, log))
        return folder / SEGMENTER_FILENAME

    sources = (encoder_path, head_path)
    model_dir = write_model(out_dir, model_name, max_batch_size, write_graph, sources=sources, overwrite=overwrite, log=log)
    return model_dir, reports[0]
