"""The TensorRT optimisation profile: min/opt/max input shapes, from flags or around the training size."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dmt_jepa.encoder_file import EncoderInfo
from dmt_jepa.export.errors import ExportError
from dmt_jepa.export.verify import Shape, check_multiple_of_patch

InputShape = tuple[int, int, int, int]  # (batch, 3, height, width)

DEFAULT_OPT_BATCH = 32
DEFAULT_MAX_BATCH = 32

_SHAPE = re.compile(r"^(?:images:|pixel_values:)?(\d+)x(\d+)x(\d+)x(\d+)$")


@dataclass(frozen=True)
class ShapeProfile:
    """Smallest, tuned-for and largest input shape the engine accepts."""

    min: InputShape
    opt: InputShape
    max: InputShape

    def shapes(self) -> list[Shape]:
        """The distinct (batch, height, width) of min, opt and max, for parity checks."""
        seen: list[Shape] = []
        for batch, _, height, width in (self.min, self.opt, self.max):
            if (batch, height, width) not in seen:
                seen.append((batch, height, width))
        return seen

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def parse_shape(text: str, flag: str) -> InputShape:
    """'BxCxHxW' (trtexec's form, optionally prefixed with the input name) -> (B, C, H, W)."""
    match = _SHAPE.match(text.strip())
    if not match:
        raise ExportError(f"{flag} {text!r} is not a shape; write it as BATCHx3xHEIGHTxWIDTH, e.g. 8x3x224x224.")
    shape = tuple(int(g) for g in match.groups())
    if shape[1] != 3:
        raise ExportError(f"{flag} {text!r} has {shape[1]} channels; the encoder takes 3 (write Bx3xHxW).")
    if min(shape) < 1:
        raise ExportError(f"{flag} {text!r} has a zero dimension; every dimension must be at least 1.")
    return shape  # type: ignore[return-value]


def _down_to_patch(size: int, patch: int) -> int:
    return max(patch, size // patch * patch)


def default_profile(info: EncoderInfo) -> ShapeProfile:
    """Batch 1 at half the training size (down to a patch multiple) to batch 32 at twice it; tuned for 32 at it."""
    height, width = info.img_size
    p = info.patch_size
    return ShapeProfile(
        min=(1, 3, _down_to_patch(height // 2, p), _down_to_patch(width // 2, p)),
        opt=(DEFAULT_OPT_BATCH, 3, height, width),
        max=(DEFAULT_MAX_BATCH, 3, 2 * height, 2 * width),
    )


def resolve_profile(
    info: EncoderInfo, min_shape: str | None = None, opt_shape: str | None = None, max_shape: str | None = None
) -> ShapeProfile:
    """The default profile with any of min/opt/max replaced by the given flags, then validated."""
    default = default_profile(info)
    profile = ShapeProfile(
        min=parse_shape(min_shape, "--min-shape") if min_shape else default.min,
        opt=parse_shape(opt_shape, "--opt-shape") if opt_shape else default.opt,
        max=parse_shape(max_shape, "--max-shape") if max_shape else default.max,
    )
    flags = ("--min-shape", "--opt-shape", "--max-shape")
    for flag, (batch, _, height, width) in zip(flags, (profile.min, profile.opt, profile.max)):
        check_multiple_of_patch((batch, height, width), info.patch_size, flag)
    names = ("batch", "channels", "height", "width")
    for i, name in enumerate(names):
        if not profile.min[i] <= profile.opt[i] <= profile.max[i]:
            raise ExportError(
                f"the profile's {name} must grow from --min-shape to --opt-shape to --max-shape, "
                f"got {profile.min[i]}, {profile.opt[i]}, {profile.max[i]}."
            )
    return profile
