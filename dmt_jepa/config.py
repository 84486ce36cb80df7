"""Dataclass configuration: the method (encoder, predictor, masks, targets) and a training run."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from dmt_jepa.limits import MAX_BATCH_SIZE, MAX_DEPTH, MAX_EMBED_DIM, MAX_HEADS, MAX_IMG_SIZE, MAX_PATCH_SIZE, MAX_WORKERS

AGGREGATIONS = ("cross_attention", "self_attention", "mean", "max", "none")
BORDERS = ("clip", "wrap")
LOSSES = ("smooth_l1", "l2")
QUERIES = ("self", "learned", "mean")  # what starts a target's residual stream in the head (dmt_jepa.heads)
CONTEXT_PATHS = ("tokens", "added", "none")  # none: the head makes targets only; the context skips it


@dataclass
class ModelConfig:
    """Encoder and predictor architecture."""

    arch: str = "vit_base"
    patch_size: int = 16
    img_size: int = 224
    drop_path_rate: float = 0.0
    pred_width: int = 384
    pred_depth: int = 6
    pred_heads: int | None = None  # None: as many heads as the encoder (I-JEPA)


@dataclass
class MaskConfig:
    """Multi-block masking: target blocks removed from one large context block."""

    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10
    static: bool = True  # fixed context and target sizes per config (compilable); false: sizes vary per batch


@dataclass
class TargetConfig:
    """Discriminative targets: semantic neighbours, their aggregation, and the loss."""

    # What the last complete study's pre-declared rule chose (docs/results/selection.json, checked by
    # tests/test_study.py): none, I-JEPA's own-patch targets, since no DMT-JEPA arm was ahead of it.
    aggregation: str = "none"
    k: int = 4
    k_size: int = 3
    border: str = "clip"
    head_depth: int = 2
    query: str = "self"  # what starts each target's residual stream in the head: self | learned | mean
    context: str = "tokens"  # the online head on the context side: tokens (per-token stream) | added | none
    include_self: bool = False  # the patch itself is a candidate of its own window (then always its top-1)
    plain_weight: float = 0.0  # loss = (1 - w) * loss(aggregated targets) + w * loss(the patches' own features)
    loss: str = "smooth_l1"

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        if self.border not in BORDERS:
            raise ValueError(f"border must be one of {', '.join(BORDERS)}, got {self.border!r}")
        if self.query not in QUERIES:
            raise ValueError(f"target.query must be one of {', '.join(QUERIES)}, got {self.query!r}")
        if self.context not in CONTEXT_PATHS:
            raise ValueError(f"target.context must be one of {', '.join(CONTEXT_PATHS)}, got {self.context!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.k_size < 3 or self.k_size % 2 == 0:
            raise ValueError(f"k_size must be an odd number >= 3, got {self.k_size}")
        candidates = self.k_size**2 - (0 if self.include_self else 1)
        if not 1 <= self.k <= candidates:
            raise ValueError(f"k must be between 1 and the window's {candidates} candidates, got {self.k}")
        if not 0.0 <= self.plain_weight <= 1.0:
            raise ValueError(f"target.plain_weight must be between 0 and 1, got {self.plain_weight}")


@dataclass
class MethodConfig:
    """Everything that defines the DMT-JEPA model and objective."""

    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    target: TargetConfig = field(default_factory=TargetConfig)


PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DataConfig:
    """Where the training images come from and how they become batches."""

    train: str = ""  # WebDataset shard pattern ("data/shard-{000000..000099}.tar"); "" = built-in scenes
    samples_per_epoch: int = 1_281_167  # epoch length: shards are resampled to this many samples
    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    shuffle_buffer: int = 1000
    num_workers: int = 8
    decode: str = "cpu"  # cpu: workers decode; gpu: workers ship JPEG bytes, the GPU decodes (nvJPEG), crops, resizes
    scenes_train: int = 2000  # built-in scenes for training, made when `train` is ""
    scenes_test: int = 0  # held-out built-in scenes written beside them, for `dmtjepa eval` and the closing probe
    scenes_kind: str = "digits"  # the built-in scenes' objects: digits, shapes or textures (dmt_jepa.scenes.KINDS)
    scenes_background: str = "photo"  # behind them: photo (a crop of a bundled photo) or plain
    scenes_palette: str = "colour"  # colour, or mono (black and white objects on grey; shapes and textures only)

    def __post_init__(self) -> None:
        if self.samples_per_epoch < 1:
            raise ValueError(f"data.samples_per_epoch must be positive, got {self.samples_per_epoch}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.decode not in ("cpu", "gpu"):
            raise ValueError(f"data.decode must be cpu or gpu, got {self.decode!r}")


@dataclass
class OptimizationConfig:
    """AdamW with warm-up + cosine learning rate, cosine weight decay and an EMA schedule."""

    epochs: int = 600
    batch_size: int = 2048  # global: summed over processes and accumulation steps
    accumulation: int = 1  # micro-batches per optimizer step
    start_lr: float = 2e-4
    lr: float = 1e-3  # peak, reached after the warm-up
    final_lr: float = 1e-6
    warmup_epochs: float = 40
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    ema: tuple[float, float] = (0.996, 1.0)
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the forward and loss (and so their backward); minutes of compilation first

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"optimization.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.accumulation < 1:
            raise ValueError("optimization.epochs, batch_size and accumulation must be positive")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ValueError(f"optimization.warmup_epochs must be within [0, epochs], got {self.warmup_epochs}")


@dataclass
class RunConfig:
    """Where a run writes, how often it saves, and what it prints."""

    out_dir: str = "runs/pretrain"
    seed: int = 0
    device: str = "auto"  # auto: CUDA when available (one GPU per process), else CPU
    checkpoint_every: int = 1000  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # older checkpoint directories are deleted once a newer one is complete
    progress: bool = True  # on rank 0: a live bar on a terminal, else plain lines (dmt_jepa.progress)
    progress_every_s: float = 30.0  # seconds between plain progress lines when stdout is not a terminal; 0: every step
    locality_every: int = 100  # optimizer steps between target-locality records in log.jsonl; 0: never
    log_every: int = 10  # optimizer steps between loss reads (each waits for the device) and log.jsonl records
    # Where each log.jsonl record also goes (dmt_jepa.tracking): jsonl (log.jsonl, always written), tensorboard,
    # mlflow, wandb; all local (RUN_DIR/tensorboard, RUN_DIR/mlruns, an offline RUN_DIR/wandb).
    loggers: tuple[str, ...] = ("jsonl",)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"run.device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("run.checkpoint_every and run.keep_checkpoints must be positive")
        if self.log_every < 1:
            raise ValueError(f"run.log_every must be positive, got {self.log_every}")
        if self.locality_every < 0:
            raise ValueError(f"run.locality_every must be >= 0 (0: never), got {self.locality_every}")
        if not self.progress_every_s >= 0:  # also refuses nan
            raise ValueError(f"run.progress_every_s must be >= 0 (0: every step), got {self.progress_every_s}")


@dataclass
class TrainConfig:
    """A whole pretraining run: the method, its data, its optimisation and its run settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def method(self) -> MethodConfig:
        return MethodConfig(model=self.model, mask=self.mask, target=self.target)


class ConfigError(ValueError):
    """A configuration the user wrote that cannot be used; the message is one sentence."""


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the type a dataclass field declares."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key} cannot be {value!r}.")
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise ConfigError(f"{key} needs a list of {len(args)} values, got {value!r}.")
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else args
        return tuple(_coerce(v, t, key) for v, t in zip(value, kinds))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} needs true or false, got {value!r}.")
    if hint in (int, float):
        try:
            number = hint(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            number = None
        if number is None or (hint is int and isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key} needs {'an integer' if hint is int else 'a number'}, got {value!r}.")
        return number
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} needs a string, got {value!r}.")
        return str(value)
    raise AssertionError(f"unsupported config field type {hint!r} for {key}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a nested dict, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping of keys, got {values!r}.")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {where!r}; valid keys here are: {', '.join(names)}.")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        kwargs[name] = _build(hint, value, key) if is_dataclass(hint) else _coerce(value, hint, key)
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ConfigError(f"{err}.".replace("..", ".")) from err


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r} goes inside {part!r}, which is a value, not a section.")
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (defaults where absent) and apply `section.key=value` overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config path {path} is a directory; pass a YAML file to --config.")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config.")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise ConfigError(f"cannot read config file {path} ({reason}); pass a readable UTF-8 YAML file to --config.") from err
        try:
            tree = _read_yaml(text)
        except ValueError as err:
            raise ConfigError(f"config file {path} is not valid YAML ({err}).") from err
        if tree is None:
            tree = {}
        if not isinstance(tree, dict):
            raise ConfigError(
                f"config file {path} must map sections to settings at its top level (model:, data:, optimization:, ...), "
                f"not hold a {type(tree).__name__}; see configs/demo.yaml."
            )
    for item in overrides:
        _set_dotted(tree, *parse_override(item))
    return validate_config(_build(TrainConfig, tree, ""))


def _read_yaml(text: str) -> Any:
    """`text` as YAML, or ValueError with the parser's one-line reason."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(getattr(err, "problem", None) or str(err).splitlines()[0]) from err
    except RecursionError as err:
        raise ValueError("nested too deeply") from err
    except (ValueError, TypeError, AttributeError, OverflowError) as err:
        # PyYAML's constructors raise these for a tagged scalar they cannot build (`!!timestamp 2001`).
        raise ValueError(f"a tagged value that cannot be built: {' '.join(str(err).split())[:80]}") from err


def parse_override(item: str) -> tuple[str, Any]:
    """`section.key=value` -> ("section.key", the value read as YAML); ConfigError in one sentence."""
    dotted, sep, raw = item.partition("=")
    dotted = dotted.strip()
    if not sep or not all(part.strip() for part in dotted.split(".")):
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optimization.lr=5e-4.")
    try:
        return dotted, _read_yaml(raw) if raw.strip() else ""
    except ValueError as err:
        raise ConfigError(
            f"the value of override {dotted!r} is not valid YAML ({err}); quote text that holds "
            f"YAML characters, e.g. {dotted}='\"...\"'."
        ) from err


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (lists for tuples) of a config dataclass, ready for YAML or JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(asdict(cfg))


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically); `load_config` reads it back unchanged."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
    return path


def builtin_config_path(name: str) -> Path | None:
    """The packaged YAML of a built-in config name (demo, vit_b16, vit_l16, vit_h14), else None."""
    path = Path(__file__).parent / "configs" / f"{name}.yaml"
    return path if "/" not in name and not name.endswith(".yaml") and path.is_file() else None


# --- Values that each parse but cannot train: checked once the whole config is known, before a
# run directory is made, so that a bad value is one sentence and not a traceback after config.yaml.


def _ordered_range(value: tuple[float, float], low: float, high: float | None) -> bool:
    """low <= value[0] <= value[1] (<= high): a (min, max) pair inside its bounds."""
    return low <= value[0] <= value[1] and (high is None or value[1] <= high)


def config_problems(cfg: TrainConfig) -> list[str]:
    """Every value of `cfg` that cannot train, each as a phrase naming its key."""
    from dmt_jepa.models import VARIANTS  # the architectures by name; torch is imported by training anyway
    from dmt_jepa.tracking import logger_problems

    m, k, o, d = cfg.model, cfg.mask, cfg.optimization, cfg.data
    checks = [
        (m.arch in VARIANTS, f"model.arch must be one of {', '.join(VARIANTS)}, got {m.arch!r}"),
        (m.patch_size >= 1, f"model.patch_size must be positive, got {m.patch_size}"),
        (m.patch_size <= MAX_PATCH_SIZE, f"model.patch_size must be at most {MAX_PATCH_SIZE}, got {m.patch_size}"),
        (m.img_size <= MAX_IMG_SIZE, f"model.img_size must be at most {MAX_IMG_SIZE} pixels, got {m.img_size}"),
        (
            m.patch_size >= 1 and m.img_size >= m.patch_size and m.img_size % m.patch_size == 0,
            f"model.img_size {m.img_size} must be a positive multiple of model.patch_size {m.patch_size}",
        ),
        (0 <= m.drop_path_rate < 1, f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}"),
        (m.pred_width >= 1 and m.pred_depth >= 1, "model.pred_width and model.pred_depth must be positive"),
        (m.pred_heads is None or m.pred_heads >= 1, f"model.pred_heads must be positive, got {m.pred_heads}"),
        (m.pred_width <= MAX_EMBED_DIM, f"model.pred_width must be at most {MAX_EMBED_DIM}, got {m.pred_width}"),
        (m.pred_depth <= MAX_DEPTH, f"model.pred_depth must be at most {MAX_DEPTH}, got {m.pred_depth}"),
        (m.pred_heads is None or m.pred_heads <= MAX_HEADS, f"model.pred_heads must be at most {MAX_HEADS}, got {m.pred_heads}"),
        (k.num_targets >= 1, f"mask.num_targets must be at least 1, got {k.num_targets}"),
        (k.min_keep >= 1, f"mask.min_keep must be at least 1, got {k.min_keep}"),
        (
            _ordered_range(k.target_scale, 1e-9, 1),
            f"mask.target_scale must satisfy 0 < low <= high <= 1, got {list(k.target_scale)}",
        ),
        (
            _ordered_range(k.context_scale, 1e-9, 1),
            f"mask.context_scale must satisfy 0 < low <= high <= 1, got {list(k.context_scale)}",
        ),
        (
            _ordered_range(k.target_aspect, 1e-9, None),
            f"mask.target_aspect must satisfy 0 < low <= high, got {list(k.target_aspect)}",
        ),
        (
            _ordered_range(k.context_aspect, 1e-9, None),
            f"mask.context_aspect must satisfy 0 < low <= high, got {list(k.context_aspect)}",
        ),
        (
            0 <= cfg.target.head_depth <= MAX_DEPTH,
            f"target.head_depth must be within [0, {MAX_DEPTH}], got {cfg.target.head_depth}",
        ),
        (o.batch_size <= MAX_BATCH_SIZE, f"optimization.batch_size must be at most {MAX_BATCH_SIZE}, got {o.batch_size}"),
        (d.num_workers <= MAX_WORKERS, f"data.num_workers must be at most {MAX_WORKERS}, got {d.num_workers}"),
        (o.lr > 0, f"optimization.lr must be positive, got {o.lr}"),
        (o.start_lr >= 0 and o.final_lr >= 0, "optimization.start_lr and final_lr must be >= 0"),
        (o.weight_decay >= 0 and o.final_weight_decay >= 0, "optimization.weight_decay and final_weight_decay must be >= 0"),
        (_ordered_range(o.ema, 0, 1), f"optimization.ema must satisfy 0 <= start <= end <= 1, got {list(o.ema)}"),
        (o.grad_clip is None or o.grad_clip > 0, f"optimization.grad_clip must be positive or none, got {o.grad_clip}"),
        (all(s > 0 for s in d.pixel_std), f"data.pixel_std must be positive, got {list(d.pixel_std)}"),
        (_ordered_range(d.crop_ratio, 1e-9, None), f"data.crop_ratio must satisfy 0 < low <= high, got {list(d.crop_ratio)}"),
        (d.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {d.shuffle_buffer}"),
    ]
    checks += [(False, problem) for problem in logger_problems(list(cfg.run.loggers))]
    if not d.train:  # the built-in scenes are made by this run: their settings are checked before it starts
        from dmt_jepa.scenes import scenes_problems

        checks += [
            (False, problem) for problem in scenes_problems(d.scenes_kind, d.scenes_background, d.scenes_palette, "data.scenes_")
        ]
    problems = [message for ok, message in checks if not ok]
    if not problems:  # the mask settings against the patch grid, once every size and range is valid
        from dmt_jepa.mask_geometry import mask_problems  # numpy only: a config is checked before torch is imported

        problems += mask_problems(m.img_size // m.patch_size, k)
    if m.arch in VARIANTS and m.pred_width >= 1:
        heads = m.pred_heads or VARIANTS[m.arch].num_heads
        if m.pred_width % heads:
            problems.append(f"model.pred_width {m.pred_width} must be divisible by the predictor's {heads} heads")
    return problems


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """`cfg` itself, or ConfigError naming the first value that cannot train."""
    problems = config_problems(cfg)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{problems[0]}{more}.")
    return cfg
