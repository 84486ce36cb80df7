"""The pretraining loop: schedules, parameter groups, checkpoints that resume exactly, failures."""

import json
import shutil

import pytest
import torch
from pretrain_fixtures import make_images, tiny_overrides
from safetensors.torch import load_file
from typer.testing import CliRunner

from dmt_jepa.checkpoint import CheckpointError, checkpoint_dirs
from dmt_jepa.cli.main import app
from dmt_jepa.config import ConfigError, load_config
from dmt_jepa.data import pack_images
from dmt_jepa.encoder_file import load_encoder
from dmt_jepa.objective import DMTJEPA
from dmt_jepa.train import Schedule, TrainingError, param_groups, pretrain


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("pretrain")
    make_images(root / "images", 24)
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is missing")
    pack_images(root / "images", root / "shards", max_shard_count=5)
    # pack skips unreadable files, so put one corrupt sample into a shard by hand as a user's tool might
    import webdataset as wds

    with wds.TarWriter(str(root / "shards" / "shard-000005.tar")) as sink:
        sink.write({"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 truncated"})
        sink.write({"__key__": "good", "png": (root / "images" / "img000.png").read_bytes()})
    return str(root / "shards" / "shard-{000000..000005}.tar")


def _losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())]


def test_schedule_warms_up_then_decays():
    s = Schedule(
        total_steps=100,
        warmup_steps=20,
        start_lr=2e-4,
        lr=1e-3,
        final_lr=1e-6,
        weight_decay=0.04,
        final_weight_decay=0.4,
        ema=(0.996, 1.0),
    )
    assert s.learning_rate(0) == pytest.approx(2e-4) and s.learning_rate(10) == pytest.approx(6e-4)
    assert s.learning_rate(20) == pytest.approx(1e-3) and s.learning_rate(100) == pytest.approx(1e-6)
    assert s.learning_rate(60) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    lrs = [s.learning_rate(i) for i in range(20, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert s.weight_decay_at(0) == pytest.approx(0.04) and s.weight_decay_at(100) == pytest.approx(0.4)
    assert s.weight_decay_at(50) == pytest.approx(0.22)
    assert s.momentum(0) == pytest.approx(0.996) and s.momentum(100) == pytest.approx(1.0)


def test_param_groups_exempt_biases_and_cover_trainables_once():
    cfg = load_config(None, tiny_overrides("x", "y"))
    model = DMTJEPA(cfg.method)
    groups = {g["name"]: g for g in param_groups(model)}
    assert set(groups) == {"encoder", "encoder_no_wd", "predictor", "predictor_no_wd"}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable) and set(ids) == {id(p) for p in trainable}
    assert {id(p) for p in model.online_head.parameters()} <= {
        id(p) for p in groups["predictor"]["params"] + groups["predictor_no_wd"]["params"]
    }
    for name, g in groups.items():
        assert g["apply_wd"] == (not name.endswith("no_wd"))
        assert all((p.ndim > 1) == g["apply_wd"] for p in g["params"])


def test_interrupted_and_resumed_run_repeats_the_uninterrupted_one(shards, tmp_path, monkeypatch):
    import dmt_jepa.train

    loaders = []  # every loader a run opens: one per run, its workers serve every epoch
    opened = dmt_jepa.train.micro_batches
    monkeypatch.setattr(dmt_jepa.train, "micro_batches", lambda spec, *a, **kw: loaders.append(spec) or opened(spec, *a, **kw))
    overrides = tiny_overrides(
        shards,
        tmp_path / "full",
        "data.num_workers=2",
        "optimization.accumulation=2",
        "run.checkpoint_every=3",
        "model.drop_path_rate=0.2",
    )
    full = pretrain(load_config(None, overrides))
    assert [(s.epoch, s.start_batch, s.end_epoch) for s in loaders] == [(0, 0, 2)]
    assert full.steps == 8 and [c.name for c in checkpoint_dirs(full.run_dir)] == [
        "step-000000003",
        "step-000000006",
        "step-000000008",
    ]
    log = [json.loads(line) for line in (full.run_dir / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped"] >= 1  # the corrupt sample was met and counted, not fatal
    # The interruption: only what was on disk at step 3 (mid-epoch) survives.
    cut = tmp_path / "cut"
    shutil.copytree(full.run_dir, cut)
    for later in checkpoint_dirs(cut)[1:]:
        shutil.rmtree(later)
    (cut / "encoder.safetensors").unlink()
    config = cut / "config.yaml"
    resumed = pretrain(load_config(config, [f"run.out_dir={cut}"]), resume=cut)
    assert [(s.epoch, s.start_batch, s.end_epoch) for s in loaders[1:]] == [(0, 6, 2)]
    assert _losses(resumed.run_dir) == _losses(full.run_dir)
    a, b = load_file(str(full.encoder)), load_file(str(resumed.encoder))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_holds_every_module_and_a_weights_only_state(shards, tmp_path):
    result = pretrain(
        load_config(None, tiny_overrides(shards, tmp_path / "run", "optimization.epochs=1", "run.locality_every=2"))
    )
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    with_locality = [r["step"] for r in log if "within_image_share" in r]
    assert with_locality == [r["step"] for r in log if r["step"] % 2 == 0] and with_locality
    assert all(0 <= r["within_image_share"] <= 1 and -1 <= r["cos_to_image_mean"] <= 1 for r in log if "within_image_share" in r)
    files = sorted(p.name for p in result.checkpoint.iterdir())
    assert files == [
        "config.yaml",
        "context_encoder.safetensors",
        "online_head.safetensors",
        "predictor.safetensors",
        "state.pt",
        "target_encoder.safetensors",
        "target_head.safetensors",
    ]
    state = torch.load(result.checkpoint / "state.pt", weights_only=True)
    assert state["step"] == 4 and "state" in state["optimizer"]
    # the encoder file is the target encoder, not the context encoder
    encoder, info = load_encoder(result.encoder)
    target = load_file(str(result.checkpoint / "target_encoder.safetensors"))
    context = load_file(str(result.checkpoint / "context_encoder.safetensors"))
    assert all(torch.equal(v, target[k]) for k, v in encoder.state_dict().items())
    assert not all(torch.equal(v, context[k]) for k, v in encoder.state_dict().items())
    assert info.arch == "vit_nano" and info.img_size == (64, 64)


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    cfg = load_config(
        None,
        tiny_overrides(shards, tmp_path / "run", "optimization.start_lr=1e30", "optimization.lr=1e30", "run.checkpoint_every=1"),
    )
    with pytest.raises(TrainingError, match=r"loss became (nan|inf).*step-000000001") as err:
        pretrain(cfg)
    assert "\n" not in str(err.value)
    kept = checkpoint_dirs(tmp_path / "run")
    assert [c.name for c in kept] == ["step-000000001"]
    assert torch.load(kept[0] / "state.pt", weights_only=True)["step"] == 1
    assert not (tmp_path / "run" / "encoder.safetensors").exists()


def test_existing_run_is_never_overwritten(shards, tmp_path):
    cfg = load_config(None, tiny_overrides(shards, tmp_path / "run", "optimization.epochs=1"))
    pretrain(cfg)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        pretrain(cfg)
    assert before == {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}


def test_checkpoint_of_another_architecture_is_refused(shards, tmp_path):
    run = pretrain(load_config(None, tiny_overrides(shards, tmp_path / "run", "optimization.epochs=1")))
    other = load_config(None, tiny_overrides(shards, tmp_path / "run", "optimization.epochs=2", "model.pred_depth=2"))
    config_before = (run.run_dir / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match="another architecture.*pred_depth=1.*pred_depth=2"):
        pretrain(other, resume=run.run_dir)
    assert (run.run_dir / "config.yaml").read_text() == config_before
    # same config names but different tensors (e.g. an edited file) are refused too
    same = load_config(None, tiny_overrides(shards, tmp_path / "run", "optimization.epochs=2"))
    (run.checkpoint / "predictor.safetensors").write_bytes((run.checkpoint / "context_encoder.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="another architecture"):
        pretrain(same, resume=run.run_dir)


def test_cli_reports_bad_input_in_one_sentence(shards, tmp_path):
    runner = CliRunner()
    bad_key = runner.invoke(app, ["pretrain", *tiny_overrides(shards, tmp_path / "a"), "optimization.lrr=1e-3"])
    assert bad_key.exit_code == 2 and "unknown config key 'optimization.lrr'; valid keys here are: epochs" in bad_key.output
    config = tmp_path / "bad.yaml"
    config.write_text("optimisation:\n  lr: 1.0e-3\n")
    bad_file = runner.invoke(app, ["pretrain", "--config", str(config)])
    assert bad_file.exit_code == 2 and "unknown config key 'optimisation'" in bad_file.output
    no_shards = runner.invoke(app, ["pretrain", *tiny_overrides(str(tmp_path / "none-{0..3}.tar"), tmp_path / "b")])
    assert no_shards.exit_code == 2 and "matches no file" in no_shards.stderr
    assert len(no_shards.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_data_pack_counts(tmp_path):
    make_images(tmp_path / "images", 7, classes=2)
    out = CliRunner().invoke(app, ["data", "pack", str(tmp_path / "images"), str(tmp_path / "shards"), "--max-shard-count", "3"])
    assert out.exit_code == 0 and "packed 7 images in 2 classes into 3 shards" in out.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_run_trains_and_resumes(shards, tmp_path):
    overrides = tiny_overrides(shards, tmp_path / "run", "run.device=cuda", "optimization.precision=bf16")
    first = pretrain(load_config(None, [*overrides, "optimization.epochs=1"]))
    assert torch.load(first.checkpoint / "state.pt", weights_only=True)["step"] == 4
    resumed = pretrain(load_config(None, overrides), resume=first.run_dir)
    losses = _losses(resumed.run_dir)
    assert [s for s, _ in losses] == list(range(1, 9)) and all(0 < loss < 10 for _, loss in losses)
    encoder, _ = load_encoder(resumed.encoder, device="cuda")
    assert encoder(torch.randn(1, 3, 64, 64, device="cuda")).isfinite().all()


def test_builtin_scenes_are_made_once_inside_the_run(tmp_path):
    pytest.importorskip("dmt_jepa.scenes", reason="the scenes generator is not installed")
    overrides = tiny_overrides("", tmp_path / "run", "data.scenes_train=12", "optimization.epochs=1")
    result = pretrain(load_config(None, overrides))
    shards = sorted((tmp_path / "run" / "data").glob("train-*.tar"))
    assert shards and result.steps == 4 and result.encoder.is_file()
    stamp = [p.stat().st_mtime_ns for p in shards]
    pretrain(load_config(None, [*overrides, "optimization.epochs=2"]), resume=result.run_dir)
    assert [p.stat().st_mtime_ns for p in shards] == stamp  # reused on resume, not rebuilt


def test_run_stopped_before_its_first_checkpoint_can_start_again(shards, tmp_path):
    overrides = tiny_overrides(shards, tmp_path / "run", "optimization.epochs=1")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("left by a run killed at step 1\n")
    (tmp_path / "run" / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    result = pretrain(load_config(None, overrides))
    assert [s for s, _ in _losses(result.run_dir)] == [1, 2, 3, 4]
    assert load_config(result.run_dir / "config.yaml") == load_config(None, overrides)


def test_save_killed_midway_leaves_earlier_checkpoints_usable(shards, tmp_path):
    from dmt_jepa.checkpoint import find_checkpoint

    result = pretrain(load_config(None, tiny_overrides(shards, tmp_path / "run", "optimization.epochs=1")))
    stale = tmp_path / "run" / "checkpoints" / ".step-000000099.partial"
    stale.mkdir()
    (stale / "context_encoder.safetensors").write_bytes(b"half written")
    assert find_checkpoint(tmp_path / "run") == result.checkpoint  # the partial save is never picked
    resumed = pretrain(
        load_config(None, tiny_overrides(shards, tmp_path / "run", "optimization.epochs=2")), resume=result.run_dir
    )
    assert resumed.steps == 8 and not stale.exists()


def test_patch_size_8_trains_exports_and_matches_onnx(shards, tmp_path):
    from dmt_jepa.export.onnx_export import export_onnx

    overrides = tiny_overrides(shards, tmp_path / "p8", "model.patch_size=8", "model.img_size=48", "optimization.epochs=1")
    result = pretrain(load_config(None, overrides))
    encoder, info = load_encoder(result.encoder)
    assert info.patch_size == 8 and info.grid_size == (6, 6)
    log: list[str] = []
    (exported,) = export_onnx(result.encoder, tmp_path / "onnx", shapes=[(2, 48, 48), (1, 40, 72)], log=log.append)
    assert exported.report.ok and sum(line.endswith("ok") for line in log) == 2
    import onnxruntime as ort

    images = torch.randn(2, 3, 56, 32)
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    tokens, pooled = session.run(["last_hidden_state", "pooler_output"], {"pixel_values": images.numpy()})
    with torch.no_grad():
        ref_patches, ref_pooled = encoder.eval().dense(images)
    assert tokens.shape == (2, 7 * 4, encoder.embed_dim)
    patches = tokens.reshape(2, 7, 4, encoder.embed_dim)  # tokens in row-major grid order
    assert (torch.from_numpy(patches) - ref_patches).abs().max() <= 1e-4
    assert (torch.from_numpy(pooled) - ref_pooled).abs().max() <= 1e-4
