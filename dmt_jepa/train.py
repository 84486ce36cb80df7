"""The pretraining loop: data -> DMT-JEPA steps (DDP, bf16, accumulation) -> logs and checkpoints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn

from dmt_jepa.checkpoint import (
    CheckpointError,
    checkpoint_bytes,
    checkpoint_dirs,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    tensor_bytes,
)
from dmt_jepa.config import ConfigError, OptimizationConfig, TrainConfig, config_to_dict, save_config, validate_config
from dmt_jepa.data.device import Normaliser, decode_on_device
from dmt_jepa.data.pipeline import StreamSpec, expand_shards, micro_batches
from dmt_jepa.disk_space import out_of_space
from dmt_jepa.encoder_file import info_from_encoder, save_encoder
from dmt_jepa.objective import DMTJEPA
from dmt_jepa.precision import device_has_bf16, effective_precision
from dmt_jepa.progress import progress_for
from dmt_jepa.tracking import Trackers


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss diverged); the message says what is kept and what to do."""


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 10e6 else f"{n / 1e6:,.0f} MB"


@dataclass
class PretrainResult:
    """Where a finished run left its outputs."""

    run_dir: Path
    encoder: Path
    checkpoint: Path
    steps: int
    loss: float
    is_main: bool = True  # rank 0, the process that wrote the outputs
    already_complete: bool = False  # resumed after its last step: nothing was trained and nothing written
    # On the built-in scenes with held-out scenes: the trained encoder against its random init
    # (dmt_jepa.evaluation.closing), also the log's last line.
    held_out: dict | None = None


@dataclass
class Schedule:
    """Learning rate, weight decay and EMA momentum as functions of the optimizer step."""

    total_steps: int
    warmup_steps: int
    start_lr: float
    lr: float
    final_lr: float
    weight_decay: float
    final_weight_decay: float
    ema: tuple[float, float]

    @classmethod
    def from_config(cls, opt: OptimizationConfig, steps_per_epoch: int) -> Schedule:
        return cls(
            total_steps=opt.epochs * steps_per_epoch,
            warmup_steps=round(opt.warmup_epochs * steps_per_epoch),
            start_lr=opt.start_lr,
            lr=opt.lr,
            final_lr=opt.final_lr,
            weight_decay=opt.weight_decay,
            final_weight_decay=opt.final_weight_decay,
            ema=opt.ema,
        )

    def learning_rate(self, step: int) -> float:
        """Linear warm-up start_lr -> lr, then cosine lr -> final_lr."""
        if step < self.warmup_steps:
            return self.start_lr + (self.lr - self.start_lr) * step / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.final_lr + (self.lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def weight_decay_at(self, step: int) -> float:
        """Cosine weight_decay -> final_weight_decay over the whole run."""
        progress = step / max(1, self.total_steps)
        return self.final_weight_decay + (self.weight_decay - self.final_weight_decay) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )

    def momentum(self, step: int) -> float:
        """EMA momentum, linear from ema[0] to ema[1] over the whole run."""
        return self.ema[0] + (self.ema[1] - self.ema[0]) * step / max(1, self.total_steps)


def param_groups(model: DMTJEPA) -> list[dict]:
    """AdamW groups: (encoder, predictor + online head) x (decayed, not decayed: biases and 1-D)."""
    params: dict[str, list[nn.Parameter]] = {name: [] for name in ("encoder", "encoder_no_wd", "predictor", "predictor_no_wd")}
    for module_name in ("context_encoder", "predictor", "online_head"):
        module = getattr(model, module_name)
        if module is None:
            continue
        side = "encoder" if module_name == "context_encoder" else "predictor"
        for pname, p in module.named_parameters():
            if p.requires_grad:
                no_wd = p.ndim == 1 or pname.endswith(".bias")
                params[side + ("_no_wd" if no_wd else "")].append(p)
    return [{"name": name, "params": ps, "apply_wd": not name.endswith("no_wd")} for name, ps in params.items() if ps]


@dataclass
class World:
    """This process's place in the (possibly single-process) distributed job."""

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_world(cfg: TrainConfig) -> World:
    """Join the torchrun job if there is one: NCCL on GPU, gloo on CPU."""
    use_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device is cuda but no CUDA device is visible; set run.device=cpu or auto.")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


T = TypeVar("T")


def _gather(world: World, obj: T) -> list[T]:
    """Every rank's `obj`, in rank order."""
    if world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def _barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def _weights_digest(model: DMTJEPA) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _rng_state(device: torch.device) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])


def builtin_shards(run_dir: Path, cfg: TrainConfig, world: World) -> str:
    """The built-in scenes data set (made once inside the run directory): its train shard pattern."""
    from dmt_jepa.scenes import ScenesError
    from dmt_jepa.scenes_cache import cached_scene_shards, progress_lines

    out = run_dir / "data"
    if world.is_main and not (out / "scenes.json").is_file():
        partial = run_dir / "data.partial"
        if partial.exists():
            shutil.rmtree(partial)
        say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
        try:
            cached_scene_shards(
                partial,
                progress=progress_lines(say),
                log=say,
                n_train=cfg.data.scenes_train,
                n_test=cfg.data.scenes_test,
                seed=cfg.run.seed,
                image_size=cfg.model.img_size,
                kind=cfg.data.scenes_kind,
                background=cfg.data.scenes_background,
                palette=cfg.data.scenes_palette,
            )
        except ScenesError as err:
            raise ConfigError(f"the built-in scenes (data.scenes_train, data.scenes_test) cannot be made: {err}") from err
        os.replace(partial, out)
    _barrier(world)
    return "::".join(str(p) for p in sorted(out.glob("train-*.tar")))


def _prepare_run_dir(cfg: TrainConfig, resume: str | os.PathLike | None, world: World) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (None: a fresh run)."""
    if resume is not None:
        checkpoint = find_checkpoint(resume)
        return checkpoint.parent.parent, checkpoint
    run_dir = Path(cfg.run.out_dir)
    if checkpoint_dirs(run_dir) or (run_dir / "encoder.safetensors").exists():
        raise ConfigError(
            f"run directory {run_dir} already holds a run; pass --resume {run_dir} to continue it "
            "or set run.out_dir to a new folder."
        )
    _barrier(world)  # every rank checked before rank 0 writes anything
    if world.is_main:  # a run stopped before its first checkpoint left nothing to resume: start it again
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            (run_dir / "log.jsonl").unlink(missing_ok=True)
        except OSError as err:
            raise ConfigError(
                f"cannot make the run directory {run_dir} ({err.strerror or err}); set run.out_dir to a folder you can write."
            ) from err
    return run_dir, None


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (a resumed run rewrites the steps after its checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def pretrain(cfg: TrainConfig, *, resume: str | os.PathLike | None = None) -> PretrainResult:
    """Train DMT-JEPA as `cfg` says (under torchrun: one process per device); rank 0 writes.

    `resume` is a run directory or one of its checkpoints; the run continues exactly where that
    checkpoint stopped (same world size and data.num_workers required).
    """
    world = _init_world(cfg)
    trainer = None
    try:
        trainer = Trainer(cfg, world, resume)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        if world.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class DataPosition:
    """Where this rank's data streams are within the current epoch."""

    emitted: list[int]  # per stream: samples taken from its shuffle buffer
    skipped: list[int]  # per stream: samples skipped as undecodable
    skipped_before: int = 0  # skipped in earlier epochs (all ranks) and before a resume

    def record(self, batch: dict) -> None:
        self.emitted[batch["stream"]] = batch["emitted"]
        self.skipped[batch["stream"]] = batch["skipped"]

    def new_epoch(self) -> None:
        self.skipped_before += sum(self.skipped)
        self.emitted = [0] * len(self.emitted)
        self.skipped = [0] * len(self.skipped)


class Trainer:
    """One pretraining run: set-up, the optimisation step, logging and checkpoints."""

    def __init__(self, cfg: TrainConfig, world: World, resume: str | os.PathLike | None):
        validate_config(cfg)  # a config built in Python, too, is refused before the run directory or data is made
        self.cfg, self.world = cfg, world
        opt = cfg.optimization
        self.per_rank, rest = divmod(opt.batch_size, world.size * opt.accumulation)
        if rest or self.per_rank == 0:
            raise ConfigError(
                f"optimization.batch_size={opt.batch_size} must be a multiple of processes x accumulation "
                f"= {world.size} x {opt.accumulation}."
            )
        self.steps_per_epoch = cfg.data.samples_per_epoch // opt.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"data.samples_per_epoch={cfg.data.samples_per_epoch} is smaller than one batch ({opt.batch_size}); raise it."
            )
        urls = expand_shards(cfg.data.train) if cfg.data.train else None  # checked before anything is written
        self.run_dir, checkpoint = _prepare_run_dir(cfg, resume, world)
        self.urls = urls or expand_shards(builtin_shards(self.run_dir, cfg, world))
        self.total_steps = opt.epochs * self.steps_per_epoch
        self.schedule = Schedule.from_config(opt, self.steps_per_epoch)
        precision, notice = effective_precision(opt.precision, world.device.type, device_has_bf16(world.device.type))
        self.autocast = precision == "bf16"
        if notice and world.is_main:
            print(f"note: {notice}", file=sys.stderr)

        if cfg.data.decode == "gpu" and world.device.type != "cuda":
            raise ConfigError("data.decode=gpu decodes on the GPU but this run has none; set data.decode=cpu.")
        self.normalise = Normaliser(cfg.data, world.device)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.model = DMTJEPA(cfg.method).to(world.device)
        # fused: one kernel over all parameters (CPU and CUDA); the per-tensor default is slow on CPU
        self.optimizer = torch.optim.AdamW(param_groups(self.model), lr=opt.start_lr, fused=True)
        streams = max(cfg.data.num_workers, 1)
        self.position = DataPosition(emitted=[0] * streams, skipped=[0] * streams)
        self.step = 0
        self.checkpoint, self.saved_step = checkpoint, -1
        self.encoder_path = self.run_dir / "encoder.safetensors"
        if checkpoint is not None:
            self._restore(checkpoint)
        # A finished run resumed as it is: nothing to train, so nothing on disk may change.
        self.already_complete = checkpoint is not None and self.step >= self.total_steps and self.encoder_path.is_file()
        if checkpoint is not None and world.is_main and not self.already_complete:
            save_config(cfg, self.run_dir / "config.yaml")  # overrides given on resume (e.g. more epochs) are part of the run now
        self.ddp: nn.Module = self.model
        if world.size > 1:
            device_ids = [world.device] if world.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        # The forward and loss, compiled as one graph (static mask shapes: compiled once); the
        # optimizer (one fused kernel) and the EMA stay eager.
        self.forward: Callable[..., torch.Tensor] = torch.compile(self.ddp) if opt.compile else self.ddp
        self.loss = torch.zeros((), device=world.device)
        # Step (1-based) and loss of the first non-finite loss; 0: none so far. Kept on the device.
        self.first_bad_step = torch.zeros((), dtype=torch.long, device=world.device)
        self.first_bad_loss = torch.zeros((), device=world.device)
        self.log_path = self.run_dir / "log.jsonl"
        self.trackers = None
        if world.is_main and not self.already_complete:
            _trim_log(self.log_path, self.step)
            self.trackers = Trackers(
                list(cfg.run.loggers), self.run_dir, config_to_dict(cfg), resumed_at=self.step if checkpoint is not None else None
            )

    def _restore(self, checkpoint: Path) -> None:
        state = load_checkpoint(checkpoint, self.model, self.cfg)
        if state["world_size"] != self.world.size or state["num_workers"] != self.cfg.data.num_workers:
            raise CheckpointError(
                f"checkpoint {checkpoint} was written by {state['world_size']} processes with data.num_workers="
                f"{state['num_workers']}; resume with the same numbers so that the data order continues exactly."
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = self.saved_step = state["step"]
        self.position.emitted = list(state["emitted"][self.world.rank])
        self.position.skipped_before = state["skipped"]
        _set_rng_state(state["rng"][self.world.rank], self.world.device)

    def _batches(self, epoch: int, in_epoch: int) -> Iterator[dict]:
        """This rank's micro-batches from optimizer step `in_epoch` of `epoch` to the end of training (one loader)."""
        cfg = self.cfg
        spec = StreamSpec(
            urls=self.urls,
            cfg=cfg.data,
            mask_cfg=cfg.mask,
            img_size=(cfg.model.img_size, cfg.model.img_size),
            grid=(cfg.model.img_size // cfg.model.patch_size,) * 2,
            batch_size=self.per_rank,
            seed=cfg.run.seed,
            epoch=epoch,
            rank=self.world.rank,
            world_size=self.world.size,
            batches_per_epoch=self.steps_per_epoch * cfg.optimization.accumulation,
            start_batch=in_epoch * cfg.optimization.accumulation,
            emitted=tuple(self.position.emitted) if in_epoch else (),
            epochs=cfg.optimization.epochs,
        )
        return micro_batches(spec, cfg.data.num_workers, pin_memory=self.world.device.type == "cuda")

    def train_step(self, batches: Iterator[dict]) -> tuple[float, float, float]:
        """One optimizer step over `accumulation` micro-batches; returns lr, weight decay, momentum.

        Nothing here waits for the device: the loss stays on it (`read_loss` fetches it), and a
        non-finite loss is only recorded there, with its step, to stop the run at the next read.
        """
        opt, device = self.cfg.optimization, self.world.device
        lr, wd = self.schedule.learning_rate(self.step), self.schedule.weight_decay_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group["apply_wd"] else 0.0
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for micro in range(opt.accumulation):
            batch = next(batches)
            if micro == 0 and self.step % self.steps_per_epoch == 0:
                self.position.new_epoch()
            self.position.record(batch)
            # uint8 to the device (decoded there too with data.decode=gpu), normalised there
            images = self.normalise(decode_on_device(batch, device))
            context_idx, target_idx = (batch[k].to(device, non_blocking=True) for k in ("context_idx", "target_idx"))
            last = micro == opt.accumulation - 1
            ddp = self.ddp  # wrapped in DistributedDataParallel exactly when the world has several ranks
            with contextlib.nullcontext() if last or not isinstance(ddp, nn.parallel.DistributedDataParallel) else ddp.no_sync():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    # targets (no grad) -> context -> predictor -> loss, inside the objective's forward
                    loss = self.forward(images, context_idx, target_idx) / opt.accumulation
                loss.backward()
            loss_sum += loss.detach()
        self.last_images = images
        self.loss = loss_sum
        first = (self.first_bad_step == 0) & ~torch.isfinite(loss_sum)
        self.first_bad_step = torch.where(first, self.step + 1, self.first_bad_step)
        self.first_bad_loss = torch.where(first, loss_sum, self.first_bad_loss)
        if opt.grad_clip:
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], opt.grad_clip)
        self.optimizer.step()
        momentum = self.schedule.momentum(self.step)
        self.model.update_target(momentum)  # EMA of the target encoder and target head
        self.step += 1
        return lr, wd, momentum

    def read_loss(self) -> float:
        """The last step's loss (mean over ranks); waits for the device. Raises if any step since the start was not finite."""
        reading = torch.stack([self.loss.double(), self.first_bad_step.double(), self.first_bad_loss.double()])
        if self.world.size > 1:
            bad = reading[1:].clone()
            dist.all_reduce(reading)  # loss summed over ranks
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # any rank's bad step stops every rank
            reading = torch.cat([reading[:1] / self.world.size, bad])
        loss, bad_step, bad_loss = reading.tolist()
        if bad_step:
            kept = f"the last good checkpoint is {self.checkpoint}" if self.checkpoint else "no checkpoint was written yet"
            raise TrainingError(
                f"loss became {bad_loss} at step {int(bad_step)}; {kept}; lower optimization.lr or set "
                "optimization.grad_clip, then resume or start again."
            )
        return loss

    def state(self) -> dict:
        """Training state for the checkpoint, with every rank's data position and RNG states."""
        mine: dict[str, Any] = {
            "emitted": list(self.position.emitted),
            "skipped": sum(self.position.skipped),
            "rng": _rng_state(self.world.device),
            "digest": _weights_digest(self.model),
        }
        shared = _gather(self.world, mine)
        assert len({s["digest"] for s in shared}) == 1, "ranks hold different weights"
        return {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "world_size": self.world.size,
            "num_workers": self.cfg.data.num_workers,
            "emitted": [s["emitted"] for s in shared],
            "rng": [s["rng"] for s in shared],
            "skipped": self.position.skipped_before + sum(s["skipped"] for s in shared),
            "weights_sha256": [s["digest"] for s in shared],
        }

    def _write_failed(self, what: str, err: BaseException, needed: int | None = None) -> TrainingError:
        """A write that failed (a full disk, most often), as one sentence that says what is kept.

        `needed`: bytes the write was to take, said when the disk or the quota is full.
        """
        kept = f"the checkpoint {self.checkpoint} is intact" if self.checkpoint else "no checkpoint was written yet"
        full = out_of_space(err)
        if full is not None and needed is not None:
            return TrainingError(
                f"{full} while writing {what} (about {_megabytes(needed)} needed); {kept}; "
                f"free space and rerun with --resume {self.run_dir}."
            )
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        return TrainingError(f"cannot write {what} ({reason}); {kept}; free space, then run again with --resume {self.run_dir}.")

    def save(self) -> None:
        state = self.state()
        failure = None
        if self.world.is_main:
            try:
                save_checkpoint(self.run_dir, self.step, self.model, state, self.cfg, keep=self.cfg.run.keep_checkpoints)
            except (OSError, SafetensorError) as err:
                where = f"checkpoint step {self.step} in {self.run_dir / 'checkpoints'}"
                failure = str(self._write_failed(where, err, checkpoint_bytes(self.model, state)))
        failures = _gather(self.world, failure)  # a barrier too: every rank learns whether rank 0 saved
        if failures[0] is not None:
            raise TrainingError(failures[0])
        self.checkpoint = self.run_dir / "checkpoints" / f"step-{self.step:09d}"
        self.saved_step = self.step

    def _log(self, record: dict) -> None:
        if self.world.is_main:
            try:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:
                raise self._write_failed(f"the log {self.log_path}", err) from err
            if self.trackers is not None:
                self.trackers.log(record)

    def close(self) -> None:
        """Finish the trackers' runs (TensorBoard's last events, MLflow's run status, W&B's offline files)."""
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None

    def run(self) -> PretrainResult:
        cfg = self.cfg
        loss = float("nan")
        if self.already_complete:
            assert self.checkpoint is not None  # a complete run was resumed from its last checkpoint
            return PretrainResult(self.run_dir, self.encoder_path, self.checkpoint, self.step, loss, self.world.is_main, True)
        progress = progress_for(
            cfg.run.progress and self.world.is_main,
            total=self.total_steps,
            start=self.step,
            batch_size=cfg.optimization.batch_size,
            every_s=cfg.run.progress_every_s,
        )
        start_time, start_step = time.perf_counter(), self.step
        read_time, read_step = start_time, self.step
        with progress:
            batches = self._batches(*divmod(self.step, self.steps_per_epoch))  # its workers serve every epoch left
            while self.step < self.total_steps:
                epoch = self.step // self.steps_per_epoch
                lr, wd, momentum = self.train_step(batches)
                every = cfg.run.locality_every
                locality_due = bool(every) and self.step % every == 0
                save_due = self.step % cfg.run.checkpoint_every == 0 or self.step == self.total_steps
                # the same decision on every rank: a read is a collective under DDP
                if self.step % cfg.run.log_every == 0 or locality_due or save_due:
                    loss = self.read_loss()  # before any save: a checkpoint never holds a diverged step
                    now = time.perf_counter()
                    images_per_s = cfg.optimization.batch_size * (self.step - read_step) / max(now - read_time, 1e-9)
                    read_step, read_time = self.step, now
                    elapsed = now - start_time
                    progress.update(self.step, loss=loss, lr=lr, images_per_s=images_per_s)
                    locality = self.model.locality(self.last_images) if locality_due and self.world.is_main else {}
                    self._log(
                        locality
                        | {
                            "step": self.step,
                            "epoch": epoch,
                            "loss": loss,
                            "lr": lr,
                            "weight_decay": wd,
                            "momentum": momentum,
                            "images_per_s": round(images_per_s, 2),
                            "elapsed_s": round(elapsed, 3),
                            "eta_s": round(elapsed / (self.step - start_step) * (self.total_steps - self.step), 1),
                            "skipped": self.position.skipped_before + sum(self.position.skipped),
                        }
                    )
                if save_due:
                    self.save()
            del batches  # stops the workers
        if self.saved_step != self.step:
            self.save()
        failure = None
        if self.world.is_main:
            target = self.model.target_encoder
            provenance = {"source": "dmtjepa pretrain", "steps": self.step, "config": config_to_dict(cfg)}
            info = info_from_encoder(target, cfg.model.arch, provenance=provenance)
            # YAML gives lists; the encoder file's fields are triples
            info.pixel_mean = cast("tuple[float, float, float]", tuple(cfg.data.pixel_mean))
            info.pixel_std = cast("tuple[float, float, float]", tuple(cfg.data.pixel_std))
            try:
                save_encoder(self.encoder_path, target, info)
            except (OSError, SafetensorError) as err:
                failure = str(self._write_failed(f"the encoder file {self.encoder_path}", err, tensor_bytes(target.state_dict())))
        failures = _gather(self.world, failure)
        if failures[0] is not None:
            raise TrainingError(failures[0])
        held_out = None
        scenes = self.run_dir / "data"
        if self.world.is_main and not cfg.data.train and cfg.data.scenes_test > 0 and (scenes / "scenes.json").is_file():
            from dmt_jepa.evaluation.closing import compare_with_init

            held_out = compare_with_init(self.model.target_encoder, info, scenes, seed=cfg.run.seed)
            self._log({"step": self.step, "held_out": held_out})
        assert self.checkpoint is not None  # saved above
        return PretrainResult(
            run_dir=self.run_dir,
            encoder=self.encoder_path,
            checkpoint=self.checkpoint,
            steps=self.step,
            loss=loss,
            is_main=self.world.is_main,
            held_out=held_out,
        )
