"""TensorRT backend: runs a built engine (TensorRT 10 or 11 Python API) with torch CUDA tensors as buffers.

What the engine cannot say about itself comes from the sidecar `dmtjepa export --trt` writes beside
it (NAME.engine.json): the encoder metadata, the precision it was built in, its optimisation profile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dmt_jepa.encoder_file import EncoderFileError, EncoderInfo
from dmt_jepa.export.io_names import IO_STYLES, IoNames
from dmt_jepa.serve.backends.base import Backend, BackendError


def read_sidecar(engine: Path) -> dict:
    """The engine's sidecar, reduced to what this backend needs: info, profile ([B, 3, H, W] each), precision."""
    from dmt_jepa.export.errors import ExportError
    from dmt_jepa.export.tensorrt_build import read_sidecar as read_export_sidecar

    try:
        sidecar = read_export_sidecar(engine)
        info = EncoderInfo.from_metadata(sidecar["encoder"], source=f"the sidecar of {engine}")
        profile = {k: [int(v) for v in sidecar["profile"][k]] for k in ("min", "opt", "max")}
        return {"info": info, "profile": profile, "precision": str(sidecar["precision"])}
    except ExportError as err:
        raise BackendError(str(err)) from err
    except (KeyError, ValueError, TypeError, EncoderFileError) as err:
        raise BackendError(f"the sidecar of {engine} is incomplete ({err}); rebuild the engine.") from err


class TensorRTBackend(Backend):
    """A deserialised engine; inputs and outputs are bound by tensor name (the TensorRT >= 10 API), under
    either name set (export/io_names.py); token outputs [B, N, D] are reshaped to the [B, h, w, D] grid."""

    def __init__(self, path: Path, *, precision: str | None):
        sidecar = read_sidecar(path)
        self.info, self.profile = sidecar["info"], sidecar["profile"]
        self.name, self.model_path, self.precision = "tensorrt", path, sidecar["precision"]
        if precision not in (None, self.precision):
            raise BackendError(
                f"the engine {path} was built for {self.precision}, not {precision}; rebuild it or omit --precision."
            )
        try:
            import tensorrt as trt
            import torch
        except ImportError as err:
            raise BackendError("the TensorRT backend needs the tensorrt package (pip install tensorrt) and a CUDA GPU.") from err
        if int(trt.__version__.split(".")[0]) < 10:
            raise BackendError(f"TensorRT {trt.__version__} is too old; this backend needs TensorRT 10 or newer.")
        if not torch.cuda.is_available():
            raise BackendError("the TensorRT backend needs a CUDA GPU and none is visible.")
        self._trt, self._torch = trt, torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendError(
                f"TensorRT cannot deserialise {path} (built by another TensorRT version or GPU?); rebuild it here."
            )
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        found = [n for n in IO_STYLES.values() if names == {n.input, *n.outputs()}]
        if not found:
            expected = " or ".join(str([n.input, *n.outputs()]) for n in IO_STYLES.values())
            raise BackendError(f"the engine {path} has tensors {sorted(names)}, not the dmt-jepa contract {expected}.")
        self.names: IoNames = found[0]
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def check_size(self, size: tuple[int, int]) -> None:
        super().check_size(size)
        lo, hi = self.profile["min"], self.profile["max"]
        if not (lo[2] <= size[0] <= hi[2] and lo[3] <= size[1] <= hi[3]):
            raise BackendError(
                f"the engine's profile covers {lo[2]}x{lo[3]} to {hi[2]}x{hi[3]}, not {size[0]}x{size[1]}; "
                "choose --size inside it or rebuild the engine with a wider profile."
            )

    def _torch_dtype(self, name: str):
        trt, torch = self._trt, self._torch
        return {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16}[
            self.engine.get_tensor_dtype(name)
        ]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._execute(self._torch.from_numpy(images).to("cuda"))

    def run_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from dmt_jepa.serve.backends.torch_backend import normalise_on_device

        return self._execute(normalise_on_device(pixels, self.info, "cuda"))

    def _execute(self, images) -> tuple[np.ndarray, np.ndarray]:
        """float32 CUDA tensor [B, 3, H, W] -> numpy outputs; batches above the profile's maximum are split."""
        torch, names = self._torch, self.names
        outputs = []
        for start in range(0, images.shape[0], self.profile["max"][0]):
            x = images[start : start + self.profile["max"][0]].to(self._torch_dtype(names.input)).contiguous()  # [b, 3, H, W]
            self.context.set_input_shape(names.input, tuple(x.shape))
            self.context.set_tensor_address(names.input, x.data_ptr())
            results = {}
            for name in names.outputs():
                shape = tuple(self.context.get_tensor_shape(name))
                results[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
                self.context.set_tensor_address(name, results[name].data_ptr())
            self.stream.wait_stream(torch.cuda.current_stream())  # the input is ready before TensorRT reads it
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            self.stream.synchronize()
            outputs.append([results[name].float().cpu().numpy() for name in names.outputs()])
        grid = (images.shape[2] // self.info.patch_size, images.shape[3] // self.info.patch_size)
        return names.to_grid(np.concatenate([o[0] for o in outputs]), grid), np.concatenate([o[1] for o in outputs])
