"""Encoder file -> a Triton Inference Server model repository, checked before it is kept.

    OUT/NAME/config.pbtxt    platform onnxruntime_onnx, max_batch_size, inputs and outputs with
                             their dtypes and dims (batch left out, as Triton wants with batching;
                             -1 where the graph's dimension is dynamic), dynamic_batching, and
                             as `parameters` the graph's metadata Triton's clients need (a
                             segmenter's class_names)
    OUT/NAME/1/model.onnx    the verified fp32 ONNX model, version 1: the encoder's
                             (export/onnx_export.py) or a segmenter's (export/head.py)

The written config is parsed back by protobuf's strict text-format parser against the fields of
Triton's `ModelConfig` that it uses (their names, types and numbers as Triton's model_config.proto
documents them; an unknown or mistyped field fails), and every input and output is compared with
the ONNX graph: names, dtypes and dims, and each parameter with the metadata it repeats. Either
failure keeps nothing. `write_model` does all of this around any verified graph writer. The export owns OUT/NAME
only (export/out_dir.py guards that folder and writes its manifest there), so a repository that
holds other models gains this one beside them, and replacing it leaves them alone.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from dmt_jepa.export.errors import ExportError
from dmt_jepa.export.io_names import DEFAULT_STYLE
from dmt_jepa.export.onnx_export import DEFAULT_OPSET, FP32_FILENAME, export_onnx, fresh_scratch
from dmt_jepa.export.out_dir import move_into, replacing

TRITON_MODEL_FILENAME = "model.onnx"
CONFIG_FILENAME = "config.pbtxt"
DEFAULT_MODEL_NAME = "dmt_jepa"
DEFAULT_MAX_BATCH = 32
MAX_QUEUE_DELAY_US = 100  # how long Triton may hold a request to fill a batch
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

# Triton's DataType enum (model_config.proto) for the ONNX element types an export can carry.
_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.INT64: "TYPE_INT64",
}  # fmt: skip
_DATA_TYPE_VALUES = {
    "TYPE_INVALID": 0, "TYPE_BOOL": 1, "TYPE_UINT8": 2, "TYPE_UINT16": 3, "TYPE_UINT32": 4, "TYPE_UINT64": 5,
    "TYPE_INT8": 6, "TYPE_INT16": 7, "TYPE_INT32": 8, "TYPE_INT64": 9, "TYPE_FP16": 10, "TYPE_FP32": 11,
    "TYPE_FP64": 12, "TYPE_STRING": 13, "TYPE_BF16": 14,
}  # fmt: skip
# The graph's metadata props the config repeats as `parameters` (same key, same text), where a client
# reads them from Triton (GET v2/models/NAME/config). Class names go here rather than in a
# `label_filename` file: Triton's classification extension ranks an output's elements flattened, so
# on logits [C, h, w] its indices would be pixel positions, not classes.
CONFIG_PARAMETERS = ("class_names",)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as Triton declares it: dims without the batch dimension, -1 where dynamic."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def graph_specs(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The ONNX graph's inputs and outputs as Triton specs (its first dimension is the batch)."""

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        if tensor.elem_type not in _TRITON_TYPES:
            raise ExportError(f"the ONNX tensor {value.name} has an element type Triton configs here do not map.")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        return TensorSpec(value.name, _TRITON_TYPES[tensor.elem_type], dims[1:])

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def graph_parameters(model: onnx.ModelProto) -> dict[str, str]:
    """The metadata props of CONFIG_PARAMETERS that the graph carries, by key."""
    metadata = {p.key: p.value for p in model.metadata_props}
    return {key: metadata[key] for key in CONFIG_PARAMETERS if key in metadata}


def config_text(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
    parameters: Mapping[str, str] | None = None,
) -> str:
    """config.pbtxt in Triton's text format."""
    from google.protobuf import text_encoding

    def block(specs: Sequence[TensorSpec]) -> str:
        entries = [
            f'  {{\n    name: "{s.name}"\n    data_type: {s.data_type}\n    dims: [ {", ".join(map(str, s.dims))} ]\n  }}'
            for s in specs
        ]
        return "[\n" + ",\n".join(entries) + "\n]"

    def parameter(key: str, value: str) -> str:
        # the value is the graph's metadata, which holds the user's class names: escaped (non-ASCII as octal bytes)
        escaped = text_encoding.CEscape(value.encode("utf-8"), as_utf8=False)
        return f'parameters {{\n  key: "{key}"\n  value {{\n    string_value: "{escaped}"\n  }}\n}}\n'

    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
        f"input {block(inputs)}\noutput {block(outputs)}\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n}}\n"
    ) + "".join(parameter(key, value) for key, value in (parameters or {}).items())


def _model_config_class():
    """A protobuf message class for the subset of Triton's ModelConfig these repositories use."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="dmt_jepa_triton_model_config.proto", package="inference")
    data_type = proto.enum_type.add(name="DataType")
    for key, number in _DATA_TYPE_VALUES.items():
        data_type.value.add(name=key, number=number)

    def message(name: str, fields: list[tuple[str, int, int, int, str]]) -> None:
        msg = proto.message_type.add(name=name)
        for field, number, kind, label, type_name in fields:
            msg.field.add(name=field, number=number, type=kind, label=label, type_name=type_name or None)

    one, many = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("ModelInput", [
        ("name", 1, F.TYPE_STRING, one, ""), ("data_type", 2, F.TYPE_ENUM, one, ".inference.DataType"),
        ("dims", 4, F.TYPE_INT64, many, ""),
    ])  # fmt: skip
    message("ModelOutput", [
        ("name", 1, F.TYPE_STRING, one, ""), ("data_type", 2, F.TYPE_ENUM, one, ".inference.DataType"),
        ("dims", 3, F.TYPE_INT64, many, ""),
    ])  # fmt: skip
    message("ModelDynamicBatching", [
        ("preferred_batch_size", 1, F.TYPE_INT32, many, ""), ("max_queue_delay_microseconds", 2, F.TYPE_UINT64, one, ""),
    ])  # fmt: skip
    message("ModelParameter", [("string_value", 1, F.TYPE_STRING, one, "")])
    message("ModelConfig", [
        ("name", 1, F.TYPE_STRING, one, ""), ("platform", 2, F.TYPE_STRING, one, ""),
        ("max_batch_size", 4, F.TYPE_INT32, one, ""),
        ("input", 5, F.TYPE_MESSAGE, many, ".inference.ModelInput"),
        ("output", 6, F.TYPE_MESSAGE, many, ".inference.ModelOutput"),
        ("dynamic_batching", 11, F.TYPE_MESSAGE, one, ".inference.ModelDynamicBatching"),
        ("parameters", 14, F.TYPE_MESSAGE, many, ".inference.ModelConfig.ParametersEntry"),
        ("backend", 17, F.TYPE_STRING, one, ""),
    ])  # fmt: skip
    # map<string, ModelParameter> parameters: protobuf's form of a map, a repeated key-value entry
    entry = proto.message_type[-1].nested_type.add(name="ParametersEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=one)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=one, type_name=".inference.ModelParameter")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def parse_config(text: str):
    """config.pbtxt -> a ModelConfig message; ExportError on any field Triton would not accept."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, _model_config_class()())
    except text_format.ParseError as err:
        raise ExportError(f"the Triton config does not parse as a ModelConfig ({err}); please report this.") from err


MAX_CONFIG_BYTES = 1 << 20  # a config of a few inputs and outputs is a few hundred bytes


def is_triton_model(path: str | os.PathLike) -> bool:
    """A folder holding config.pbtxt: a Triton model, as `--format triton` writes OUT/NAME."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILENAME).exists()


def _read_config(model_dir: Path) -> str:
    """config.pbtxt's text: a regular file (not a link or FIFO) of bounded size."""
    path = model_dir / CONFIG_FILENAME
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
        raise ExportError(f"{path} is not a regular config file under {MAX_CONFIG_BYTES} bytes; export the model again.")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ExportError(f"cannot read {path} ({err}); export the model again.") from err


def check_repository(model_dir: Path) -> None:
    """Parse NAME/config.pbtxt and compare it with NAME/1/model.onnx; ExportError on any mismatch."""
    config = parse_config(_read_config(model_dir))
    onnx_path = model_dir / "1" / TRITON_MODEL_FILENAME
    if onnx_path.is_symlink() or not onnx_path.is_file():
        raise ExportError(f"{onnx_path} is missing or not a regular file; export the model again.")
    model = onnx.load(str(onnx_path), load_external_data=False)
    inputs, outputs = graph_specs(model)
    data_type_name = config.DESCRIPTOR.file.enum_types_by_name["DataType"].values_by_number
    declared = {
        kind: [TensorSpec(t.name, data_type_name[t.data_type].name, tuple(t.dims)) for t in getattr(config, kind)]
        for kind in ("input", "output")
    }
    problems = []
    if config.name != model_dir.name:
        problems.append(f"name {config.name!r} is not the folder's {model_dir.name!r}")
    if config.platform != "onnxruntime_onnx" or config.max_batch_size < 1:
        problems.append("platform or max_batch_size")
    if not config.HasField("dynamic_batching"):
        problems.append("no dynamic_batching")
    for kind, graph in (("input", inputs), ("output", outputs)):
        if declared[kind] != graph:
            problems.append(f"{kind}s {declared[kind]} differ from the graph's {graph}")
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    if parameters != graph_parameters(model):
        problems.append(f"parameters {sorted(parameters)} differ from the graph's metadata")
    if problems:
        raise ExportError(f"the Triton config disagrees with the model ({'; '.join(problems)}); please report this.")


def describe_triton_model(model_dir: str | os.PathLike) -> dict:
    """What `dmtjepa info` prints for a Triton model folder: its config, checked against its ONNX model."""
    model_dir = Path(model_dir)
    check_repository(model_dir)
    config = parse_config(_read_config(model_dir))
    names = config.DESCRIPTOR.file.enum_types_by_name["DataType"].values_by_number

    def tensors(kind: str) -> dict[str, str]:
        return {t.name: f"{names[t.data_type].name} {list(t.dims)}" for t in getattr(config, kind)}

    model = onnx.load(str(model_dir / "1" / TRITON_MODEL_FILENAME), load_external_data=False)
    return {
        "kind": "Triton model (config checked against its ONNX model)",
        "directory": str(model_dir),
        "name": config.name,
        "platform": config.platform,
        "max_batch_size": config.max_batch_size,
        "inputs": tensors("input"),
        "outputs": tensors("output"),
        "metadata": {p.key: p.value for p in model.metadata_props},
    }


def check_settings(model_name: str, max_batch_size: int) -> None:
    """--model-name and --max-batch-size, checked before any work."""
    if not _MODEL_NAME.fullmatch(model_name):
        raise ExportError(f"--model-name {model_name!r} is not a plain folder name; use letters, digits, '_', '.' and '-'.")
    if not 1 <= max_batch_size <= 1 << 20:
        raise ExportError(f"--max-batch-size {max_batch_size} is out of range; give a whole number from 1.")


def write_model(
    out_dir: str | os.PathLike,
    model_name: str,
    max_batch_size: int,
    write_graph: Callable[[Path], Path],
    *,
    sources: Sequence[str | os.PathLike],
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the model `out_dir/model_name/` around one graph, checked first; returns its folder.

    `write_graph(folder)` writes the verified fp32 graph (and, for large models, its external data)
    into `folder` and returns the graph's path; it becomes 1/model.onnx beside a config made from
    it. Other models in `out_dir` are left alone; `overwrite` replaces an earlier export of this one.
    """
    check_settings(model_name, max_batch_size)
    out_dir = Path(out_dir)
    final = out_dir / model_name
    with replacing(final, overwrite=overwrite, sources=tuple(sources)):
        scratch = fresh_scratch(out_dir, f"{model_name}.triton")
        try:
            (scratch / "onnx").mkdir()
            graph = write_graph(scratch / "onnx")
            model_dir = scratch / model_name
            (model_dir / "1").mkdir(parents=True)
            for item in (scratch / "onnx").iterdir():  # the graph and, for large models, its external data
                os.replace(item, model_dir / "1" / (TRITON_MODEL_FILENAME if item == graph else item.name))
            model = onnx.load(str(model_dir / "1" / TRITON_MODEL_FILENAME), load_external_data=False)
            text = config_text(model_name, *graph_specs(model), max_batch_size, graph_parameters(model))
            (model_dir / CONFIG_FILENAME).write_text(text)
            check_repository(model_dir)
            move_into(model_dir, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    written = f"{model_name}/{CONFIG_FILENAME}, {model_name}/1/{TRITON_MODEL_FILENAME}"
    log(f"wrote the Triton model repository {out_dir} ({written})")
    return final


def export_triton(
    encoder_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    opset: int = DEFAULT_OPSET,
    layers: Sequence[int] | None = None,
    io_style: str = DEFAULT_STYLE,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the encoder's model `out_dir/model_name/` (config.pbtxt, 1/model.onnx) of a Triton repository, checked
    first; returns its folder. Other models in `out_dir` are left alone; `overwrite` replaces an earlier export of this one."""

    def write_graph(folder: Path) -> Path:
        # export_onnx's parity lines are passed on; its "wrote" lines name the scratch folder, which the user never sees
        onnx_log = lambda line: None if line.startswith(f"wrote {folder}") else log(line)  # noqa: E731
        export_onnx(encoder_path, folder, opset=opset, layers=layers, io_style=io_style, log=onnx_log)
        return folder / FP32_FILENAME

    return write_model(out_dir, model_name, max_batch_size, write_graph, sources=(encoder_path,), overwrite=overwrite, log=log)
