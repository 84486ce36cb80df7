"""`embed --head`: each image's label map, the head of `eval dense` applied to its patch grid."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from embed_helpers import TRAIN_SIZE, image_bytes, read_output, write_encoder_file, write_shard
from PIL import Image
from test_embed_job import snapshot
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import file_sha256, load_encoder
from dmt_jepa.evaluation.features import to_input
from dmt_jepa.evaluation.head import DenseHead, load_head, save_head
from dmt_jepa.serve import EmbeddingsError, open_embeddings

DIM = 32  # the tiny encoder's width


def embed(*args: object):
    return CliRunner().invoke(app, ["embed", *map(str, args), "--workers", "0"])


def one_sentence_refusal(result, words: str) -> None:
    assert result.exit_code == 2, result.output
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def square_samples(prefix: str, count: int, seed: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    """PNGs at the model's own size: the job's crop and eval's resize both leave them as they are."""
    return [(f"{prefix}{i:03d}", {"png": image_bytes(TRAIN_SIZE, TRAIN_SIZE, seed=seed + i)}) for i in range(count)]


def write_head(path: Path, encoder_file: Path, classes: int, seed: int = 0) -> Path:
    """A head file as `eval dense --save-head` writes one, its standardisation fitted to the encoder's own grids."""
    images = [np.array(Image.open(io.BytesIO(image_bytes(TRAIN_SIZE, TRAIN_SIZE, seed=100 + i)))) for i in range(4)]
    encoder, info = load_encoder(encoder_file)
    with torch.no_grad():
        grid, _ = encoder.dense(to_input(images, info, TRAIN_SIZE))  # [4, h, w, D]
    flat = grid.reshape(-1, DIM)
    generator = torch.Generator().manual_seed(seed)
    head = DenseHead(
        weight=torch.randn(classes, DIM, generator=generator),
        bias=torch.randn(classes, generator=generator),
        feature_mean=flat.mean(0),
        feature_std=flat.std(0),
        class_names=[f"class_{c}" for c in range(classes)],
        encoder_sha256=file_sha256(encoder_file),
        patch_size=info.patch_size,
        pixel_mean=info.pixel_mean,
        pixel_std=info.pixel_std,
        image_size=(TRAIN_SIZE, TRAIN_SIZE),
    )
    return save_head(path, head)


def labels_by_hand(png: bytes, encoder_file: Path, head_file: Path) -> np.ndarray:
    """eval dense's route, not the job's: its preprocessing, the encoder in torch, standardise, classify, argmax."""
    encoder, info = load_encoder(encoder_file)
    head = load_head(head_file)
    with torch.no_grad():
        grid, _ = encoder.dense(to_input([np.array(Image.open(io.BytesIO(png)).convert("RGB"))], info, TRAIN_SIZE))
        logits = ((grid - head.feature_mean) / head.feature_std) @ head.weight.T + head.bias  # [1, h, w, C]
    return logits.argmax(-1)[0].numpy()


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    return write_encoder_file(tmp_path_factory.mktemp("model") / "enc.safetensors")


@pytest.fixture(scope="module")
def heads(tmp_path_factory, encoder_file):
    root = tmp_path_factory.mktemp("heads")
    return {
        "five": write_head(root / "five.safetensors", encoder_file, 5),
        "other_five": write_head(root / "other_five.safetensors", encoder_file, 5, seed=1),
        "many": write_head(root / "many.safetensors", encoder_file, 300),
    }


@pytest.mark.parametrize(
    ("head", "dtype", "extra"), [("five", np.uint8, []), ("many", np.uint16, ["--layers", "0"])], ids=["uint8", "uint16-layers"]
)
def test_label_maps_equal_the_head_applied_to_the_encoders_grid(tmp_path, encoder_file, heads, head, dtype, extra):
    """With --layers too, the head classifies the final grid."""
    samples = square_samples("img", 4)
    write_shard(tmp_path / "in" / "part.tar", samples)
    args = ["--model", encoder_file, "--head", heads[head], "--batch-size", "3", *extra]
    run = embed(tmp_path / "in", tmp_path / "out", *args)
    assert run.exit_code == 0, run.output
    written = read_output(tmp_path / "out" / "part.tar")
    seen = set()
    for key, members in samples:
        labels = np.load(io.BytesIO(written[key]["labels.npy"]))
        assert labels.dtype == dtype and labels.shape == (TRAIN_SIZE // 16, TRAIN_SIZE // 16)
        np.testing.assert_array_equal(labels, labels_by_hand(members["png"], encoder_file, heads[head]))
        seen.update(labels.ravel().tolist())
    assert len(seen) > 1  # a head that gives one class everywhere would prove little
    record = json.loads((tmp_path / "out" / "part.json").read_text())
    assert record["head"]["class_names"] == load_head(heads[head]).class_names
    assert record["head"]["dtype"] == np.dtype(dtype).name and record["identity"]["head_sha256"] == file_sha256(heads[head])


def test_the_reader_gives_the_label_maps_and_class_names_back(tmp_path, encoder_file, heads):
    samples = square_samples("r", 3, seed=7)
    write_shard(tmp_path / "in" / "part.tar", samples)
    assert embed(tmp_path / "in", tmp_path / "out", "--model", encoder_file, "--head", heads["five"]).exit_code == 0
    written = read_output(tmp_path / "out" / "part.tar")
    emb = open_embeddings(tmp_path / "out")
    assert emb.class_names == [f"class_{c}" for c in range(5)]
    stored = np.stack([np.load(io.BytesIO(written[key]["labels.npy"])) for key, _ in samples])
    for row, (key, _) in enumerate(samples):
        np.testing.assert_array_equal(emb[key].labels, stored[row])
    (batch,) = emb.batches(8)
    np.testing.assert_array_equal(batch.labels, stored)
    # NAME.json naming fewer classes than the label maps use: refused on reading, not returned
    record = json.loads((tmp_path / "out" / "part.json").read_text())
    record["head"]["class_names"] = record["head"]["class_names"][: int(stored.max())]
    (tmp_path / "out" / "part.json").write_text(json.dumps(record))
    with pytest.raises(EmbeddingsError, match="class id beyond"):
        open_embeddings(tmp_path / "out")[samples[int(np.argmax(stored.max(axis=(1, 2))))][0]]


def test_without_head_there_are_no_label_maps(tmp_path, encoder_file):
    write_shard(tmp_path / "in" / "part.tar", square_samples("n", 2))
    assert embed(tmp_path / "in", tmp_path / "out", "--model", encoder_file).exit_code == 0
    assert all("labels.npy" not in members for members in read_output(tmp_path / "out" / "part.tar").values())
    emb = open_embeddings(tmp_path / "out")
    assert emb.class_names is None and emb[0].labels is None


def test_heads_that_do_not_fit_are_refused_in_one_sentence_before_any_work(tmp_path, encoder_file, heads):
    write_shard(tmp_path / "in" / "part.tar", square_samples("x", 1))
    other_encoder = write_encoder_file(tmp_path / "other.safetensors", seed=1)
    onnx = tmp_path / "enc.onnx"
    onnx.write_bytes(b"not read: the head is refused first")
    not_a_head = tmp_path / "not_a_head.safetensors"
    not_a_head.write_bytes(encoder_file.read_bytes())
    out = tmp_path / "out"
    cases = [
        (["--model", other_encoder, "--head", heads["five"]], "was trained on another encoder file"),
        (["--model", onnx, "--head", heads["five"]], "--head needs --model to be the encoder file"),
        (["--model", encoder_file, "--head", not_a_head], "is not a dense head file"),
        (["--model", encoder_file, "--head", tmp_path / "missing.safetensors"], "does not exist"),
        (["--model", encoder_file, "--head", heads["five"], "--pca", "4"], "--pca projects away"),
        (["--model", encoder_file, "--head", heads["five"], "--layout", "array"], "--layout array has no room"),
        (["--model", encoder_file, "--head", heads["five"], "--layout", "embedding-reader"], "has no room"),
        (["--model", encoder_file, "--head", heads["five"], "--engine", "ray"], "not written by the Ray engine"),
    ]
    for args, words in cases:
        one_sentence_refusal(embed(tmp_path / "in", out, *args), words)
        assert not out.exists(), args


def test_a_rerun_with_another_head_or_none_is_refused(tmp_path, encoder_file, heads):
    write_shard(tmp_path / "in" / "s0.tar", square_samples("a", 2))
    write_shard(tmp_path / "more" / "s1.tar", square_samples("b", 2, seed=5))
    plain, labelled = tmp_path / "plain", tmp_path / "labelled"
    assert embed(tmp_path / "in", plain, "--model", encoder_file).exit_code == 0
    assert embed(tmp_path / "in", labelled, "--model", encoder_file, "--head", heads["five"]).exit_code == 0
    reruns = [
        (labelled, ["--head", heads["other_five"]]),  # another head of the same encoder
        (labelled, []),  # no head
        (plain, ["--head", heads["five"]]),  # a head over a run without one
    ]
    for out, extra in reruns:
        kept = snapshot(out)
        one_sentence_refusal(embed(tmp_path / "more", out, "--model", encoder_file, *extra), "head_sha256")
        assert snapshot(out) == kept
    again = embed(tmp_path / "in", labelled, "--model", encoder_file, "--head", heads["five"])
    assert again.exit_code == 0 and "1 already done" in again.output, again.output


def test_labels_follow_the_grid_at_another_input_size(tmp_path, encoder_file, heads):
    """At --size 32x96 the map is the 2 x 6 patch grid the embeddings have."""
    write_shard(tmp_path / "in" / "part.tar", square_samples("z", 1))
    run = embed(tmp_path / "in", tmp_path / "out", "--model", encoder_file, "--head", heads["five"], "--size", "32x96")
    assert run.exit_code == 0, run.output
    members = read_output(tmp_path / "out" / "part.tar")["z000"]
    labels, grid = np.load(io.BytesIO(members["labels.npy"])), np.load(io.BytesIO(members["emb.npy"]))
    assert labels.shape == grid.shape[:2] == (2, 6)
