"""run.loggers: the records of log.jsonl also in TensorBoard, MLflow and W&B (all local), read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.tracking import logger_problems, scalars

TINY = ["model.arch=vit_nano", "model.img_size=32", "model.patch_size=8", "model.pred_width=32", "model.pred_depth=1",
        "mask.min_keep=2", "data.samples_per_epoch=16", "data.num_workers=0", "data.shuffle_buffer=8",
        "data.scenes_train=16", "data.scenes_test=8", "data.scenes_kind=shapes", "data.scenes_background=plain",
        "optimization.batch_size=4", "optimization.warmup_epochs=0", "run.checkpoint_every=4", "run.log_every=1",
        "run.locality_every=2"]  # fmt: skip


def pretrain(out: Path, *extra: str, resume: bool = False):
    args = ["pretrain", "--resume", str(out), *extra] if resume else ["pretrain", *TINY, f"run.out_dir={out}", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_scalars_tag_each_number_by_what_it_is() -> None:
    record = {
        "step": 7,
        "epoch": 0,
        "loss": 0.5,
        "lr": 1e-3,
        "within_image_share": 0.25,
        "note": "text",
        "bad": float("nan"),
        "flag": True,
        "held_out": {"trained": {"semantic_miou": 26.3}, "classes": 8},
    }
    assert scalars(record) == {
        "train/epoch": 0.0,
        "train/loss": 0.5,
        "train/lr": 1e-3,
        "locality/within_image_share": 0.25,
        "held_out/trained/semantic_miou": 26.3,
        "held_out/classes": 8.0,
    }


def test_unknown_or_missing_loggers_are_refused_before_the_run_directory_is_made(tmp_path, monkeypatch) -> None:
    assert logger_problems(["jsonl"]) == []
    assert logger_problems(["tensorbord"]) == ["run.loggers must name only jsonl, tensorboard, mlflow, wandb, got 'tensorbord'"]
    monkeypatch.setattr("dmt_jepa.tracking.NEEDS", {"wandb": ("a_package_that_is_not_there", "wandb")})
    assert logger_problems(["wandb"]) == [
        "run.loggers names wandb, whose package a_package_that_is_not_there is not installed: pip install 'dmt-jepa[wandb]'"
    ]
    result = CliRunner().invoke(app, ["pretrain", "run.loggers=[jsonl,wandb]", f"run.out_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2 and "pip install 'dmt-jepa[wandb]'" in result.output
    assert not (tmp_path / "run").exists()


def test_tensorboard_holds_what_log_jsonl_holds_and_a_resume_purges_the_replayed_steps(tmp_path) -> None:
    pytest.importorskip("tensorboard", reason="run.loggers tensorboard needs the track extra")
    from dmt_jepa.viz import read_log, read_tensorboard

    out = tmp_path / "run"
    log = pretrain(out, "optimization.epochs=1", "run.loggers=[jsonl,tensorboard]")
    events = read_tensorboard(out / "tensorboard")
    losses = {r["step"]: r["loss"] for r in log if "loss" in r}
    assert {r["step"]: r["loss"] for r in events if "loss" in r} == pytest.approx(losses, rel=1e-6)
    assert [r["step"] for r in events if "within_image_share" in r] == [r["step"] for r in log if "within_image_share" in r]
    # a second run of more epochs resumed from the last checkpoint: one value per step, the steps continue
    log = pretrain(out, "optimization.epochs=2", resume=True)
    events = read_log(out / "tensorboard")  # what `viz curves RUN_DIR/tensorboard` draws
    assert [r["step"] for r in events if "loss" in r] == [r["step"] for r in log if "loss" in r] == list(range(1, 9))
    assert [r["loss"] for r in events if "loss" in r] == pytest.approx([r["loss"] for r in log if "loss" in r], rel=1e-6)
    result = CliRunner().invoke(app, ["viz", "curves", str(out / "tensorboard"), "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 0 and (tmp_path / "c.png").stat().st_size > 0, result.output


def test_mlflow_run_holds_the_losses_config_and_closing_figures(tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow", reason="run.loggers mlflow needs the track extra")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    log = pretrain(out, "optimization.epochs=1", "run.loggers=[mlflow]")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run = client.get_run((out / "mlflow-run-id.txt").read_text().strip())
    assert run.info.status == "FINISHED" and run.data.params["model.arch"] == "vit_nano"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx({r["step"]: r["loss"] for r in log if "loss" in r}, rel=1e-6)
    closing = log[-1]["held_out"]["trained"]["semantic_miou"]
    assert run.data.metrics["held_out/trained/semantic_miou"] == pytest.approx(closing)


def test_wandb_writes_an_offline_run_in_the_run_directory(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb", reason="run.loggers wandb needs the wandb extra")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    pretrain(out, "optimization.epochs=1", "run.loggers=[wandb]")
    run_id = (out / "wandb-run-id.txt").read_text().strip()
    offline = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), sorted(p.name for p in (out / "wandb").iterdir())
