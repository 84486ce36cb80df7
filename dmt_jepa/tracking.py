"""Where a run's records go besides RUN_DIR/log.jsonl: TensorBoard, MLflow and Weights & Biases, all local.

`run.loggers` names them; `jsonl` (log.jsonl, which resuming, `viz curves` and the closing probe read) is
always written. Every record that the run appends to log.jsonl is handed to each tracker as scalars
under a tag that says what it is: `train/loss`, `train/lr`, `train/images_per_s`, `locality/...`,
`held_out/trained/semantic_miou`... Nothing leaves the machine unless asked: TensorBoard writes event
files in RUN_DIR/tensorboard, MLflow a file store in RUN_DIR/mlruns (or the server or database that
MLFLOW_TRACKING_URI names), W&B an offline run in RUN_DIR/wandb (`wandb sync` uploads it later). A resumed run continues the same tracker run, and the steps after
its checkpoint that the stopped run had already logged are handled as each tracker can: TensorBoard
purges them, MLflow keeps both values of such a step, W&B keeps the first (it ignores steps it has seen).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
import uuid
from pathlib import Path

from dmt_jepa.optional import import_extra

LOGGERS = ("jsonl", "tensorboard", "mlflow", "wandb")
# logger -> (module it needs, the extra that installs it)
NEEDS = {"tensorboard": ("tensorboard", "track"), "mlflow": ("mlflow", "track"), "wandb": ("wandb", "wandb")}
# log.jsonl keys -> the group of their tag
GROUPS = {
    "loss": "train",
    "lr": "train",
    "weight_decay": "train",
    "momentum": "train",
    "images_per_s": "train",
    "eta_s": "train",
    "elapsed_s": "train",
    "skipped": "train",
    "epoch": "train",
}


def logger_problems(names: list[str]) -> list[str]:
    """What is wrong with `run.loggers`, each a phrase: unknown names and trackers whose package is missing."""
    problems = []
    for name in names:
        if name not in LOGGERS:
            problems.append(f"run.loggers must name only {', '.join(LOGGERS)}, got {name!r}")
        elif name in NEEDS and importlib.util.find_spec(NEEDS[name][0]) is None:
            module, extra = NEEDS[name]
            problems.append(f"run.loggers names {name}, whose package {module} is not installed: pip install 'dmt-jepa[{extra}]'")
    return problems


def scalars(record: dict) -> dict[str, float]:
    """A log.jsonl record as {tag: value}: its finite numbers (nested dicts joined by '/'), without the step."""
    out: dict[str, float] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}/{key}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[prefix] = float(value)

    for key, value in record.items():
        if key != "step":
            walk(f"{GROUPS.get(key, 'locality')}/{key}" if not isinstance(value, dict) else key, value)
    return out


class Trackers:
    """The trackers of one run, on the process that writes (rank 0)."""

    def __init__(self, names: list[str], run_dir: Path, config: dict, *, resumed_at: int | None = None):
        self.writers: list[_TensorBoard | _MLflow | _WandB] = []
        run_dir = Path(run_dir)
        for name in dict.fromkeys(names):
            if name == "tensorboard":
                self.writers.append(_TensorBoard(run_dir, config, resumed_at))
            elif name == "mlflow":
                self.writers.append(_MLflow(run_dir, config))
            elif name == "wandb":
                self.writers.append(_WandB(run_dir, config))

    def log(self, record: dict) -> None:
        values = scalars(record)
        if values:
            for writer in self.writers:
                writer.log(int(record["step"]), values)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def _run_id(path: Path, make) -> str:
    """The tracker run id kept in RUN_DIR, made once: a resumed run continues the same tracker run."""
    if path.is_file():
        return path.read_text().strip()
    run_id = make()
    path.write_text(run_id + "\n")
    return run_id


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict, resumed_at: int | None):
        import_extra("tensorboard", "track", "run.loggers tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events the stopped run logged after the checkpoint are dropped, so each step has one value
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resumed_at)
        if resumed_at is None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # watched live: every record is on disk when the next step starts

    def close(self) -> None:
        self.writer.close()


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)[:500]  # MLflow's limit on a parameter's value
    return out


class _MLflow:
    def __init__(self, run_dir: Path, config: dict):
        mlflow = import_extra("mlflow", "track", "run.loggers mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI")  # the user's own server or database, where one is set
        if not uri:  # else a file store in the run directory, which MLflow 3 keeps working only on request
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)

        def make() -> str:
            experiment = self.client.get_experiment_by_name("dmtjepa")
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("dmtjepa")
            run = self.client.create_run(experiment_id, run_name=run_dir.name)
            for key, value in _flat(config).items():
                self.client.log_param(run.info.run_id, key, value)
            return run.info.run_id

        self.run_id = _run_id(run_dir / "mlflow-run-id.txt", make)

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(tag, value, stamp, step) for tag, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _WandB:
    def __init__(self, run_dir: Path, config: dict):
        wandb = import_extra("wandb", "wandb", "run.loggers wandb")
        run_id = _run_id(run_dir / "wandb-run-id.txt", lambda: uuid.uuid4().hex[:8])
        self.run = wandb.init(
            project="dmtjepa", name=run_dir.name, id=run_id, resume="allow", mode="offline", dir=str(run_dir), config=config
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
