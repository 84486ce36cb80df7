"""Dense mIoU of the scenes benchmark computed from each stored form of `dmtjepa embed`; prints JSON.

The scenes' label maps ride along as carried `seg.png` members, so everything the probe needs is
read back through serve.open_embeddings: the same linear probe (dmt_jepa.evaluation.dense_miou)
on float32, float16, int8 and PCA-reduced patches shows what each trade-off costs.

    python benchmarks/stored_forms_miou.py [--model encoder.safetensors] [--train 600] [--test 200]

Without --model, a randomly initialised ViT-S/16 is used: its features are weak, but the figure
that matters here is the gap between each stored form and float32.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmt_jepa.encoder_file import info_from_encoder, save_encoder  # noqa: E402
from dmt_jepa.evaluation import dense_miou  # noqa: E402
from dmt_jepa.models import create_encoder  # noqa: E402
from dmt_jepa.scenes import write_scene_shards  # noqa: E402
from dmt_jepa.serve import embed_shards, open_embeddings  # noqa: E402

FORMS = [
    {"dtype": "float32"},
    {"dtype": "float16"},
    {"dtype": "int8"},
    {"dtype": "float16", "pca": 64},
    {"dtype": "int8", "pca": 64},
]


def read_split(out: Path) -> tuple[torch.Tensor, list[np.ndarray]]:
    emb = open_embeddings(out)
    patches = torch.from_numpy(np.concatenate([b.patches for b in emb.batches(256)]))
    segs = [np.asarray(Image.open(io.BytesIO(dict(m)["seg.png"]))) for m in emb.metadata().column("members").to_pylist()]
    return patches, segs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stored-forms-"))
    model = args.model
    if model is None:
        torch.manual_seed(0)
        encoder = create_encoder("vit_small", img_size=args.size).eval()
        model = save_encoder(work / "encoder.safetensors", encoder, info_from_encoder(encoder, arch="vit_small"))
    write_scene_shards(work / "scenes", n_train=args.train, n_test=args.test, image_size=args.size)
    for split in ("train", "test"):  # a list file per split: INPUT as a directory would take both
        shards = sorted(p.name for p in (work / "scenes").glob(f"{split}-*.tar"))
        (work / "scenes" / f"{split}.txt").write_text("\n".join(shards) + "\n")
    results = []
    for form in FORMS:
        name = "-".join(f"{k}{v}" for k, v in form.items())
        splits = {}
        for split in ("train", "test"):
            out = work / name / split
            embed_shards(str(work / "scenes" / f"{split}.txt"), out, model, layout="array", size=(args.size, args.size),
                         progress_every=0, **form)  # fmt: skip
            splits[split] = read_split(out)
        (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
        score = dense_miou(train_x, train_y, test_x, test_y, num_classes=11, epochs=args.epochs)
        bytes_per_image = sum(p.stat().st_size for p in (work / name / "test").glob("*.patches*.npy")) / len(test_y)
        results.append({**form, "miou": score["miou"], "pixel_accuracy": score["pixel_accuracy"],
                        "patch_bytes_per_image": bytes_per_image})  # fmt: skip
    print(json.dumps({"model": str(args.model or "random vit_small"), "size": args.size, "train": args.train,
                      "test": args.test, "forms": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
