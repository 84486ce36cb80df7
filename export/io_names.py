"""The names and layouts of an exported model's inputs and outputs: optimum's (default) or the legacy ones.

    optimum  pixel_values [B, 3, H, W] -> last_hidden_state [B, N, D], pooler_output [B, D],
             hidden_states_<i> [B, N, D]   (N = h*w patch tokens in row-major grid order)
    legacy   images [B, 3, H, W]       -> patch_embeddings [B, h, w, D], pooled [B, D],
             layer_<i> [B, h, w, D]

Both carry the same numbers: a token sequence is the grid read row by row, so a reader recovers the
[B, h, w, D] map with a reshape (h = H/p, w = W/p from its own input), which copies nothing and
changes no value. Readers (ONNX Runtime, TensorRT, Triton configs, `info`) accept either set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

IO_NAMES_METADATA = "io_names"  # metadata prop: which set the model was exported with


@dataclass(frozen=True)
class IoNames:
    """One set of input/output names and whether grid outputs are token sequences or maps."""

    style: str
    input: str
    grid: str  # the final tokens
    pooled: str
    layer_prefix: str  # + the block index (0-based, as given to --layers)
    tokens: bool  # True: grid outputs [B, N, D]; False: [B, h, w, D]

    def layer(self, index: int) -> str:
        return f"{self.layer_prefix}{index}"

    def outputs(self, layers: Sequence[int] = ()) -> list[str]:
        """The two contract outputs, then one per chosen layer in the order given."""
        return [self.grid, self.pooled, *(self.layer(i) for i in layers)]

    def layers_in(self, outputs: Iterable[str]) -> list[int]:
        """The block indices of the layer outputs among `outputs`, in their order."""
        found = []
        for name in outputs:
            rest = name[len(self.layer_prefix) :] if name.startswith(self.layer_prefix) else ""
            if rest.isdigit() and self.layer(int(rest)) == name:
                found.append(int(rest))
        return found

    def to_grid(self, output: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """A grid output as [B, h, w, D] whatever this set's layout (tokens are reshaped, maps kept)."""
        if not self.tokens:
            return output
        batch, count, dim = output.shape
        assert count == grid[0] * grid[1], (output.shape, grid)
        return output.reshape(batch, grid[0], grid[1], dim)


OPTIMUM = IoNames("optimum", "pixel_values", "last_hidden_state", "pooler_output", "hidden_states_", tokens=True)
LEGACY = IoNames("legacy", "images", "patch_embeddings", "pooled", "layer_", tokens=False)
IO_STYLES = {names.style: names for names in (OPTIMUM, LEGACY)}
DEFAULT_STYLE = OPTIMUM.style


def io_names(style: str) -> IoNames:
    """The set called `style`; ValueError naming the choices for any other."""
    if style not in IO_STYLES:
        raise ValueError(f"unknown --io-names {style!r}; choose {' or '.join(IO_STYLES)}.")
    return IO_STYLES[style]


def detect(inputs: Sequence[str], outputs: Iterable[str]) -> IoNames | None:
    """The set a model's tensor names follow (one input, both contract outputs), or None."""
    outputs = set(outputs)
    for names in IO_STYLES.values():
        if list(inputs) == [names.input] and {names.grid, names.pooled} <= outputs:
            return names
    return None
