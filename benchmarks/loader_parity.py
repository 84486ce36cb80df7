"""How far each loader of the exported weights lands from the encoder file, per image size; prints a table and JSON.

    python benchmarks/loader_parity.py --encoder runs/demo/encoder.safetensors

Exports the hf and timm directories (the real `export_weights`, with its checks), loads them the
way a user would (dmt_jepa.from_pretrained, transformers' AutoModel with
interpolate_pos_encoding away from the training size, timm's local-dir loader) and compares
their patch tokens with the encoder file's on seeded random images at the training size, the
two sizes the model cards measure, and twice the training size. Without --encoder, a seeded
untrained vit_nano/16 at 96 px stands in (the differences come from the position tables, which
do not depend on training). A loader that cannot run a size (transformers resizes only a square
table) gets "-".
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import timm
import torch
import transformers

import dmt_jepa
from dmt_jepa.encoder_file import info_from_encoder, load_encoder, save_encoder
from dmt_jepa.export.weights import export_weights, parity_row, parity_sizes
from dmt_jepa.models import create_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", type=Path, help="encoder file [a seeded untrained vit_nano/16 at 96 px]")
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        path = args.encoder
        if path is None:
            torch.manual_seed(0)
            model = create_encoder("vit_nano", patch_size=16, img_size=96).eval()
            path = save_encoder(scratch / "enc.safetensors", model, info_from_encoder(model, "vit_nano", {"source": "untrained"}))
        encoder, info = load_encoder(path)
        quiet = lambda line: None  # noqa: E731
        export_weights(path, scratch / "hf", "hf", log=quiet)
        export_weights(path, scratch / "timm", "timm", log=quiet)
        ours_hf = dmt_jepa.from_pretrained(scratch / "hf")
        hf = transformers.AutoModel.from_pretrained(scratch / "hf").eval()
        timm_model = timm.create_model(f"local-dir:{scratch / 'timm'}", pretrained=True).eval()
        training = tuple(info.img_size)
        loaders = {
            "dmt_jepa.from_pretrained(hf dir)": lambda x: ours_hf(x),
            f"transformers {transformers.__version__} AutoModel(hf dir)": lambda x: (
                hf(pixel_values=x, interpolate_pos_encoding=tuple(x.shape[-2:]) != training).last_hidden_state
            ),
            f"timm {timm.__version__} local-dir (timm dir)": lambda x: timm_model.forward_features(x),
        }
        sizes = [*parity_sizes(info), (2 * info.img_size[0], 2 * info.img_size[1])]
        rows = []
        for loader, run in loaders.items():
            for size in sizes:
                images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
                with torch.no_grad():
                    try:
                        rows.append(parity_row(loader, run(images), encoder(images), size))
                    except RuntimeError:
                        rows.append({"loader": loader, "size": f"{size[0]} x {size[1]}", "max_abs": None, "cosine_min": None})
    cell = lambda r: "-" if r["max_abs"] is None else f"{r['max_abs']:.2e} ({r['cosine_min']:.3f})"  # noqa: E731
    names = [f"{h} x {w}" + (" (training)" if (h, w) == training else "") for h, w in sizes]
    print(
        f"{info.arch}/{info.patch_size}, trained at {training[0]} x {training[1]}: max abs difference of the patch tokens "
        "to the encoder file (lowest per-patch cosine)\n"
    )
    print("| loader | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(sizes))
    for loader in loaders:
        print(f"| {loader} | " + " | ".join(cell(r) for r in rows if r["loader"] == loader) + " |")
    print()
    print(json.dumps({"encoder": str(args.encoder or "untrained vit_nano/16 at 96 px"), "rows": rows}))


if __name__ == "__main__":
    main()
