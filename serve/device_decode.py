"""`embed --decode gpu`: JPEGs decoded where the model runs (nvJPEG on CUDA), upright, resized there.

Decode workers only read and check each JPEG's header (serve.images.prepare_leaving_jpeg); the
batch's JPEGs are decoded together by torchvision's decoder on the backend's device, turned
upright by their EXIF orientation, and resized by the same policy as the CPU path (bicubic,
antialiased; within a few grey levels of Pillow's resize, which also decodes at a reduced DCT
scale first). A JPEG the device decoder refuses is decoded again on the CPU, alone in a throwaway
process, exactly as the CPU path would have; only then can it fail.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from dmt_jepa.serve.images import EncodedJpeg, ImageRejected, Preprocess, crop_plan, geometry_record

# EXIF orientation -> how to make the stored image upright: (transpose, flip rows, flip columns), applied in that order.
_UPRIGHT = {
    1: (False, False, False),
    2: (False, False, True),  # mirrored left-right
    3: (False, True, True),  # rotated 180
    4: (False, True, False),  # mirrored top-bottom
    5: (True, False, False),  # transposed
    6: (True, False, True),  # rotated 90 clockwise to view
    7: (True, True, True),  # transversed
    8: (True, True, False),  # rotated 90 counter-clockwise to view
}


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """[3, h, w] as stored -> as viewed, for EXIF orientation 1-8 (what Pillow's exif_transpose does)."""
    transpose, flip_rows, flip_cols = _UPRIGHT.get(orientation, _UPRIGHT[1])
    if transpose:
        image = image.transpose(1, 2)
    dims = [d for d, flip in ((1, flip_rows), (2, flip_cols)) if flip]
    return image.flip(dims) if dims else image


def resize_on_device(image: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """Upright uint8 [3, h, w] -> uint8 [H, W, 3] by the resize policy (serve.images.resize on the CPU)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize, resized_crop

    bicubic = {"interpolation": InterpolationMode.BICUBIC, "antialias": True}
    out_h, out_w = prep.size
    height, width = image.shape[-2:]
    if prep.resize == "crop":
        new_h, new_w, top, left, whole = crop_plan(height, width, prep)
        if whole:
            out = resize(image, [new_h, new_w], **bicubic)[:, top : top + out_h, left : left + out_w]
        else:  # an extreme aspect ratio: resample only the source region the crop keeps (whole pixels here)
            sy, sx = height / new_h, width / new_w
            box_top, box_left = round(top * sy), round(left * sx)
            out = resized_crop(
                image, box_top, box_left, max(1, round(out_h * sy)), max(1, round(out_w * sx)), [out_h, out_w], **bicubic
            )
    else:
        fill = torch.tensor([round(m * 255) for m in prep.pixel_mean], dtype=torch.uint8, device=image.device)
        out = fill.view(3, 1, 1).repeat(1, out_h, out_w)
        new_h, new_w = geometry_record(height, width, prep)["content"]
        out[:, :new_h, :new_w] = resize(image, [new_h, new_w], **bicubic)
    return out.permute(1, 2, 0)


class DeviceDecoder:
    """EncodedJpeg items -> uint8 [H, W, 3] arrays, decoded on `device`; `fallback(data)` decodes one on the CPU."""

    def __init__(self, device: str, prep: Preprocess, fallback: Callable[[bytes], tuple[np.ndarray, dict]]):
        self.device, self.prep, self.fallback = device, prep, fallback
        self.fell_back = 0  # JPEGs the device refused and the CPU decoded

    def _decode(self, items: list[EncodedJpeg]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        datas = [torch.frombuffer(bytearray(item.data), dtype=torch.uint8) for item in items]
        try:
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one bad JPEG fails the whole list: find it
            decoded: list[torch.Tensor | None] = []
            for data in datas:
                try:
                    decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    decoded.append(None)
            return decoded

    def __call__(self, items: list[EncodedJpeg]) -> list[np.ndarray | ImageRejected]:
        """Each item's pixels, or why it cannot be used (only if the CPU cannot decode it either)."""
        out: list[np.ndarray | ImageRejected | None] = [None] * len(items)
        on_device: dict[int, torch.Tensor] = {}
        for i, (item, image) in enumerate(zip(items, self._decode(items), strict=True)):
            stored = item.size if item.orientation < 5 else item.size[::-1]
            if image is not None and tuple(image.shape[-2:]) == stored:
                on_device[i] = resize_on_device(upright(image, item.orientation), self.prep)
                continue
            self.fell_back += 1
            try:
                out[i] = self.fallback(item.data)[0]
            except ImageRejected as err:
                out[i] = err
        if on_device:  # one copy to the host for the batch
            for i, pixels in zip(on_device, torch.stack(list(on_device.values())).cpu().numpy(), strict=True):
                out[i] = pixels
        return out
