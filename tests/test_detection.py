"""Dense-task adapters and the detection protocol: pyramid strides, a Faster R-CNN step, COCO AP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import info_from_encoder, save_encoder
from dmt_jepa.evaluation.detection import DetectOptions, build_detector, coco_box_ap, detection_batch
from dmt_jepa.models import VisionTransformer
from dmt_jepa.models.pyramid import EncoderBackbone
from dmt_jepa.scenes import make_scene, write_scene_shards


def _encoder(depth: int = 4) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=depth, num_heads=2).eval()


@pytest.mark.parametrize("layers", [None, [0, 1, 2, 3]])
def test_pyramid_levels_have_strides_4_to_64(layers):
    backbone = EncoderBackbone(_encoder(), out_channels=24, layers=layers)
    assert backbone.out_channels == 24 and backbone.strides == [4, 8, 16, 32, 64]
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 128, 192))
    assert list(features) == ["0", "1", "2", "3", "pool"]
    for level, stride in zip(features.values(), backbone.strides):
        assert level.shape == (2, 24, 128 // stride, 192 // stride)


def test_pyramid_pads_to_whole_patches_and_uses_the_chosen_blocks():
    encoder = _encoder()
    backbone = EncoderBackbone(encoder, out_channels=8, layers=[0, 1, 2, -1])
    x = torch.randn(1, 3, 100, 130)  # 7 x 9 patches after padding
    with torch.no_grad():
        maps = backbone.encode(x)
        padded = torch.nn.functional.pad(x, (0, 14, 0, 12))
        expected = encoder.intermediate_layers(padded, [0, 1, 2, 3], output_fmt="NCHW").maps
        features = backbone(x)
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want)
    assert features["2"].shape[-2:] == (7, 9) and features["0"].shape[-2:] == (28, 36)
    with pytest.raises(ValueError, match="one layer per pyramid level"):
        EncoderBackbone(encoder, layers=[1, 2])


@pytest.mark.parametrize("finetune", [False, True])
def test_one_faster_rcnn_step_on_scenes(finetune):
    encoder = _encoder(depth=2)
    info = info_from_encoder(encoder, "custom")
    torch.manual_seed(0)
    model = build_detector(encoder, info, num_classes=10, options=DetectOptions(finetune=finetune, out_channels=16))
    scenes = [make_scene("train", i, image_size=64) for i in range(4)]
    inputs, targets = detection_batch([s.image for s in scenes], [s.boxes for s in scenes], size=64)
    encoder_before = {k: v.clone() for k, v in encoder.state_dict().items()}
    pyramid_before = {k: v.clone() for k, v in model.backbone.pyramid.state_dict().items()}
    model.train()
    losses = model(inputs, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss > 0
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss.backward()
    optimizer.step()
    moved = any(not torch.equal(v, pyramid_before[k]) for k, v in model.backbone.pyramid.state_dict().items())
    encoder_moved = any(not torch.equal(v, encoder_before[k]) for k, v in encoder.state_dict().items())
    assert moved and encoder_moved == finetune
    assert model.backbone.encoder.training == finetune  # a frozen encoder stays in eval mode
    model.eval()
    with torch.no_grad():
        (out,) = model(inputs[:1])
    assert out["boxes"].shape[1] == 4 and len(out["boxes"]) == len(out["scores"]) == len(out["labels"])


def _ground_truth(count: int) -> list[list[dict]]:
    return [make_scene("test", i, image_size=64).boxes for i in range(count)]


def test_coco_ap_is_100_for_predictions_equal_to_the_ground_truth():
    truth = _ground_truth(12)
    predictions = [
        {
            "boxes": np.array([b["box"] for b in boxes], dtype=np.float32).reshape(-1, 4),
            "scores": np.ones(len(boxes), dtype=np.float32),
            "labels": np.array([b["digit"] for b in boxes]),
        }
        for boxes in truth
    ]
    scores = coco_box_ap(truth, predictions, [(64, 64)] * 12, num_classes=10)
    assert scores["ap"] == pytest.approx(100.0) and scores["ap50"] == pytest.approx(100.0)
    # Shifting every box by a quarter of its size lowers the strict thresholds but not AP50.
    shifted = [
        {**p, "boxes": p["boxes"] + np.array([1, 0, 1, 0]) * (p["boxes"][:, 2:3] - p["boxes"][:, 0:1]) / 8} for p in predictions
    ]
    partly = coco_box_ap(truth, shifted, [(64, 64)] * 12, num_classes=10)
    assert partly["ap50"] == pytest.approx(100.0) and partly["ap"] < 95.0


def test_coco_ap_is_near_zero_for_a_constant_predictor():
    truth = _ground_truth(30)
    constant = {"boxes": np.array([[0.0, 0.0, 32.0, 32.0]]), "scores": np.array([0.9]), "labels": np.array([3])}
    scores = coco_box_ap(truth, [constant] * 30, [(64, 64)] * 30, num_classes=10)
    assert scores["ap"] < 2.0 and scores["ap50"] < 5.0
    nothing = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, dtype=int)}
    assert coco_box_ap(truth, [nothing] * 30, [(64, 64)] * 30, num_classes=10)["ap"] == 0.0


def test_eval_detect_command_end_to_end(tmp_path):
    encoder = _encoder(depth=2)
    path = save_encoder(tmp_path / "enc.safetensors", encoder, info_from_encoder(encoder, "custom"))
    write_scene_shards(tmp_path / "data", n_train=16, n_test=8, image_size=64)
    args = ["eval", "detect", str(path), str(tmp_path / "data"), "--epochs", "1", "--batch-size", "8", "--channels", "16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert "detector epoch 1/1: mean loss" in result.output
    assert record["detect"]["steps"] == 2 and np.isfinite(record["detect"]["final_loss"])
    assert 0.0 <= record["detect"]["ap"] <= record["detect"]["ap50"] <= 100.0
    assert record["options"]["finetune"] is False and "detection box AP" in result.output


def test_eval_detect_refuses_shards_without_boxes(tmp_path):
    from embed_helpers import photo_samples, write_shard

    encoder = _encoder(depth=2)
    path = save_encoder(tmp_path / "enc.safetensors", encoder, info_from_encoder(encoder, "custom"))
    write_shard(tmp_path / "d" / "train-0.tar", photo_samples("a", 2))
    write_shard(tmp_path / "d" / "test-0.tar", photo_samples("b", 2))
    result = CliRunner().invoke(app, ["eval", "detect", str(path), str(tmp_path / "d")])
    assert result.exit_code == 2 and "boxes.json" in result.output


def test_mask_rcnn_takes_the_backbone_as_it_is():
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    backbone = EncoderBackbone(_encoder(depth=2), out_channels=16)
    sizes = tuple((int(4 * s),) for s in backbone.strides)
    model = MaskRCNN(
        backbone,
        num_classes=11,
        min_size=64,
        max_size=64,
        rpn_anchor_generator=AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes)),
    )
    scenes = [make_scene("train", i, image_size=64) for i in range(2)]
    inputs, targets = detection_batch([s.image for s in scenes], [s.boxes for s in scenes], size=64)
    for scene, target in zip(scenes, targets):
        masks = []
        for record in scene.boxes:  # the digit's own pixels inside its box: an instance mask
            x0, y0, x1, y1 = record["box"]
            mask = np.zeros_like(scene.seg)
            mask[y0:y1, x0:x1] = scene.seg[y0:y1, x0:x1] == 1 + record["digit"]
            masks.append(mask)
        target["masks"] = torch.from_numpy(np.stack(masks)).to(torch.uint8)
    model.train()
    losses = model(inputs, targets)
    assert "loss_mask" in losses and all(torch.isfinite(v) for v in losses.values())
