"""Evaluations on constructed cases with known answers, and end to end on an encoder file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dmt_jepa.encoder_file import info_from_encoder, save_encoder
from dmt_jepa.evaluation import EvalDataError, dense_miou, evaluate_encoder, knn_top1, linear_top1
from dmt_jepa.evaluation.dense import confusion_matrix, iou_per_class
from dmt_jepa.models import VisionTransformer
from dmt_jepa.scenes import write_scene_shards

CLASSES = 10


def _balanced(per_class: int) -> torch.Tensor:
    return torch.arange(CLASSES).repeat_interleave(per_class)


@pytest.mark.parametrize("top1", [knn_top1, linear_top1])
def test_pooled_probes_exact_features_give_100_and_constant_give_chance(top1) -> None:
    train_y, test_y = _balanced(25), _balanced(5)
    one_hot = torch.eye(CLASSES)
    assert top1(one_hot[train_y], train_y, one_hot[test_y], test_y) == pytest.approx(100.0)
    constant_train, constant_test = torch.ones(len(train_y), 8), torch.ones(len(test_y), 8)
    assert top1(constant_train, train_y, constant_test, test_y) == pytest.approx(100.0 / CLASSES)


def test_knn_vote_is_the_weighted_majority_of_the_k_nearest() -> None:
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    train_y = torch.tensor([0, 0, 1, 1, 1])
    test_x = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_top1(train_x, train_y, test_x, torch.tensor([0, 1]), k=2) == 100.0
    # With k = 5 the three class-1 vectors outvote the two nearer class-0 ones when T is large.
    assert knn_top1(train_x, train_y, test_x[:1], torch.tensor([1]), k=5, temperature=100.0) == 100.0


def _half_split_case(n: int, grid: int = 4, patch: int = 8, seed: int = 0):
    """Images whose left half is class a and right half class b; patch features one-hot of their class."""
    rng = np.random.default_rng(seed)
    patches, segs = [], []
    for _ in range(n):
        a, b = rng.choice(4, size=2, replace=False)
        cells = np.full((grid, grid), a)
        cells[:, grid // 2 :] = b
        patches.append(torch.eye(4)[torch.from_numpy(cells)])  # [grid, grid, 4]
        segs.append(np.kron(cells, np.ones((patch, patch), dtype=np.int64)).astype(np.uint8))
    return torch.stack(patches), segs


def test_dense_exact_patch_features_give_miou_100() -> None:
    train_patches, train_segs = _half_split_case(40, seed=0)
    test_patches, test_segs = _half_split_case(12, seed=1)
    result = dense_miou(train_patches, train_segs, test_patches, test_segs, num_classes=4, epochs=30, lr=0.05)
    assert result["miou"] == pytest.approx(100.0)
    assert result["pixel_accuracy"] == pytest.approx(100.0)


def test_dense_constant_features_predict_the_majority_class() -> None:
    _, train_segs = _half_split_case(40, seed=0)
    _, test_segs = _half_split_case(12, seed=1)
    for segs in (train_segs, test_segs):  # make class 0 the majority: a band of it in every image
        for s in segs:
            s[:, :12] = 0
    constant = torch.ones(40, 4, 4, 6)
    result = dense_miou(constant, train_segs, torch.ones(12, 4, 4, 6), test_segs, num_classes=4, epochs=20, lr=0.05)
    truth = np.stack(test_segs)
    present = np.unique(truth)
    # Predicting 0 everywhere: IoU(0) = pixels of 0 / all pixels, every other present class 0.
    assert result["miou"] == pytest.approx(100.0 * np.mean(truth == 0) / len(present))


def test_iou_on_a_hand_made_confusion() -> None:
    truth = np.array([[0, 0, 1, 1], [2, 2, 2, 255]], dtype=np.uint8)
    predicted = np.array([[0, 1, 1, 1], [2, 2, 0, 1]])
    confusion = confusion_matrix(predicted, truth, 4)
    assert confusion.sum() == 7  # the ignored pixel is left out
    iou = iou_per_class(confusion)
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 2, fn 1 -> 2/3; class 3 absent.
    assert iou[:3] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert np.isnan(iou[3])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    write_scene_shards(root, n_train=40, n_test=20, seed=0, image_size=32, shard_size=25)
    return root


def _tiny_encoder(path, constant: bool) -> None:
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    if constant:  # a final LayerNorm with zero scale and shift makes every embedding zero
        torch.nn.init.zeros_(encoder.norm.weight)
        torch.nn.init.zeros_(encoder.norm.bias)
    save_encoder(path, encoder, info_from_encoder(encoder, "custom"))


def test_evaluate_encoder_with_constant_features_gives_chance(shards, tmp_path) -> None:
    from dmt_jepa.evaluation import read_labelled_shards

    _tiny_encoder(tmp_path / "c.safetensors", constant=True)
    result = evaluate_encoder(tmp_path / "c.safetensors", f"{shards}/train-*.tar", f"{shards}/test-*.tar")
    train, test = read_labelled_shards(f"{shards}/train-*.tar"), read_labelled_shards(f"{shards}/test-*.tar")
    frequencies = {100.0 * float(np.mean(test.labels == c)) for c in range(CLASSES)}
    assert min(frequencies, key=lambda f: abs(f - result["knn"]["top1"])) == pytest.approx(result["knn"]["top1"])
    majority = np.bincount(train.labels, minlength=CLASSES).argmax()
    assert result["linear"]["top1"] == pytest.approx(100.0 * np.mean(test.labels == majority))
    truth = np.stack(test.segs)
    expected = 100.0 * np.mean(truth == 0) / len(np.unique(truth))
    assert result["dense"]["miou"] == pytest.approx(expected)
    # The balanced probe gives every class the same weight: constant features score one class's IoU
    # (the one every pixel is assigned to) over the classes, whichever that is.
    balanced = result["dense_balanced"]
    assert sorted(v for v in balanced["iou_per_class"] if v)[:-1] == [] and balanced["miou"] <= expected + 1e-9
    assert result["train"] == 40 and result["test"] == 20


def test_cli_eval_prints_json_line_and_table(shards, tmp_path) -> None:
    from typer.testing import CliRunner

    from dmt_jepa.cli.main import app

    _tiny_encoder(tmp_path / "r.safetensors", constant=False)
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "dense", str(tmp_path / "r.safetensors"), str(shards), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    line = next(out for out in result.output.splitlines() if out.startswith("{"))
    record = json.loads(line)
    assert 0.0 <= record["dense"]["miou"] <= 100.0 and "knn" not in record
    assert "dense mIoU" in result.output and "class-balanced probe" in result.output
    assert 0.0 <= record["dense_balanced"]["miou"] <= 100.0 and record["dense_balanced"]["bootstrap_se"] >= 0.0
    bad = runner.invoke(app, ["eval", "knn", str(tmp_path / "missing.safetensors"), str(shards)])
    assert bad.exit_code != 0 and "does not exist" in bad.output


def test_unlabelled_or_truncated_shards_are_one_sentence_errors(shards, tmp_path) -> None:
    from dmt_jepa.evaluation import read_labelled_shards

    data = (shards / "train-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(EvalDataError, match="truncated"):
        read_labelled_shards(str(tmp_path / "cut.tar"))
    with pytest.raises(EvalDataError, match="no shards match"):
        read_labelled_shards(str(tmp_path / "nothing-*.tar"))


def test_perfect_patch_ceiling_by_hand() -> None:
    from dmt_jepa.evaluation import perfect_patch_miou

    # Labels that follow the 4x4 patch grid: bilinear upsampling keeps every pixel but the inner
    # corner (7, 7), where class 1 gets weight 0.625^2 < 1/2. IoU(1) = 63/64, IoU(0) = 192/193.
    aligned = np.zeros((16, 16), dtype=np.uint8)
    aligned[:8, :8] = 1
    assert perfect_patch_miou([aligned], (4, 4), num_classes=2) == pytest.approx(100.0 * (63 / 64 + 192 / 193) / 2)
    # One pixel of class 1 inside a 4x4 patch of background: the patch says "background", so
    # IoU(0) = 255/256 and IoU(1) = 0.
    speck = np.zeros((16, 16), dtype=np.uint8)
    speck[5, 5] = 1
    assert perfect_patch_miou([speck], (4, 4), num_classes=2) == pytest.approx(100.0 * (255 / 256) / 2)
    # The same speck at a 16x16 grid (one pixel per patch) is found exactly.
    assert perfect_patch_miou([speck], (16, 16), num_classes=2) == pytest.approx(100.0)
