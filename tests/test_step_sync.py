"""The training step never waits for the device; the loss is read every run.log_every steps, and a
non-finite loss still stops the run (at the next read, naming the step where it happened)."""

import json
import re

import pytest
import torch
from pretrain_fixtures import small_shards, tiny_overrides
from torch.profiler import ProfilerActivity, profile

from dmt_jepa.config import load_config
from dmt_jepa.masks import MultiBlockMaskSampler
from dmt_jepa.objective import train_step
from dmt_jepa.train import Trainer, TrainingError, _init_world, pretrain

READS = {"aten::item", "aten::_local_scalar_dense"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return small_shards(tmp_path_factory.mktemp("sync"))


def _parents(event) -> list[str]:
    names = []
    while (event := event.cpu_parent) is not None:
        names.append(event.name)
    return names


def _reads(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name in READS)


def test_steady_state_step_reads_nothing_from_the_device(shards, tmp_path):
    cfg = load_config(None, tiny_overrides(shards, tmp_path / "run", "optimization.grad_clip=1.0"))
    trainer = Trainer(cfg, _init_world(cfg), None)
    loader = trainer._batches(0, 0)
    batches = iter([next(loader) for _ in range(3)])  # drawn before: the masks are drawn on the host by design
    for _ in range(2):  # warm-up: first-step allocations and optimizer state
        trainer.train_step(batches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(batches)
    reads = [_parents(e) for e in prof.events() if e.name in READS]
    # Fused AdamW's CPU kernel reads its step counters, CPU tensors (on CUDA the same kernel reads
    # them on the device, no sync): the only reads allowed, and only inside that kernel.
    assert [r for r in reads if "aten::_fused_adamw_" not in r] == []
    # The counter sees a read where there is one: the checked step reads its loss once.
    images = torch.randn(4, 3, 64, 64)
    masks = MultiBlockMaskSampler((4, 4), cfg.mask)(4, torch.Generator().manual_seed(0))
    assert _reads(lambda: train_step(trainer.model, images, masks, trainer.optimizer, 0.99)) >= 1


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_loss_is_logged_every_log_every_steps_and_matches_a_read_every_step(shards, tmp_path):
    every = pretrain(load_config(None, tiny_overrides(shards, tmp_path / "a", "run.checkpoint_every=100")))
    sparse = pretrain(load_config(None, tiny_overrides(shards, tmp_path / "b", "run.checkpoint_every=100", "run.log_every=3")))
    full, part = _log(every.run_dir), _log(sparse.run_dir)
    assert [r["step"] for r in full] == list(range(1, 9))
    assert [r["step"] for r in part] == [3, 6, 8]  # and the last step, always
    assert [(r["step"], r["loss"]) for r in part] == [(r["step"], r["loss"]) for r in full if r["step"] in (3, 6, 8)]
    assert sparse.loss == every.loss == full[-1]["loss"]


def test_nonfinite_loss_stops_at_the_next_read_and_names_its_step(shards, tmp_path):
    diverge = ("optimization.start_lr=1e30", "optimization.lr=1e30", "run.checkpoint_every=100")
    with pytest.raises(TrainingError) as at_once:
        pretrain(load_config(None, tiny_overrides(shards, tmp_path / "a", *diverge)))
    step = int(re.search(r"at step (\d+);", str(at_once.value)).group(1))
    assert step < 5, "the loss did not diverge early enough for this test"
    with pytest.raises(TrainingError, match=rf"loss became (nan|inf|-inf) at step {step}; no checkpoint was written yet"):
        pretrain(load_config(None, tiny_overrides(shards, tmp_path / "b", *diverge, "run.log_every=5")))
    assert not (tmp_path / "b" / "checkpoints").exists() or not any((tmp_path / "b" / "checkpoints").iterdir())
    assert not (tmp_path / "b" / "encoder.safetensors").exists()
    assert not (tmp_path / "b" / "log.jsonl").exists() or _log(tmp_path / "b") == []
