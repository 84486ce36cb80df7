"""Training configs: YAML + dotted overrides -> dataclasses, unknown keys refused, round trip."""

import pytest

from dmt_jepa.config import ConfigError, builtin_config_path, load_config, save_config


def test_overrides_are_typed_by_the_dataclass():
    cfg = load_config(
        None,
        [
            "optimization.lr=5e-4",
            "optimization.grad_clip=1",
            "data.crop_scale=[0.2, 1]",
            "optimization.ema=0.99,1.0",
            "run.progress=false",
            "model.pred_heads=none",
        ],
    )
    assert cfg.optimization.lr == 5e-4 and isinstance(cfg.optimization.lr, float)  # YAML alone reads 5e-4 as text
    assert cfg.optimization.grad_clip == 1.0 and cfg.data.crop_scale == (0.2, 1.0)
    assert cfg.optimization.ema == (0.99, 1.0) and cfg.run.progress is False and cfg.model.pred_heads is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimization.lrr=1", "unknown config key 'optimization.lrr'; valid keys here are: epochs, batch_size"),
        ("optim.lr=1", "unknown config key 'optim'; valid keys here are: model, mask, target, data, optimization, run."),
        ("optimization.lr=fast", "optimization.lr needs a number, got 'fast'."),
        ("optimization.epochs=2.5", "optimization.epochs needs an integer"),
        ("data.crop_scale=[0.3]", "data.crop_scale needs a list of 2 values"),
        ("target.aggregation=sum", "aggregation must be one of"),
        ("target.query=image", "target.query must be one of self, learned, mean, got 'image'"),
        ("target.context=both", "target.context must be one of tokens, added"),
        ("run.locality_every=-1", "run.locality_every must be >= 0"),
        ("optimization.lr", "must look like section.key=value"),
    ],
)
def test_bad_keys_and_values_are_one_sentence(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_yaml_file_with_misspelt_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  arhc: vit_small\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.arhc'; valid keys here are: arch, patch_size"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(builtin_config_path("vit_l16"), ["optimization.grad_clip=3.0", "mask.target_scale=[0.1,0.2]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_paper_configs_carry_the_paper_values():
    for name, arch, patch, depth, epochs in [
        ("vit_b16", "vit_base", 16, 6, 600),
        ("vit_l16", "vit_large", 16, 12, 600),
        ("vit_h14", "vit_huge", 14, 12, 300),
    ]:
        cfg = load_config(builtin_config_path(name))
        m, o = cfg.model, cfg.optimization
        assert (m.arch, m.patch_size, m.img_size, m.pred_width, m.pred_depth) == (arch, patch, 224, 384, depth)
        assert (o.epochs, o.batch_size, o.warmup_epochs) == (epochs, 2048, 40)
        assert (o.start_lr, o.lr, o.final_lr) == (2e-4, 1e-3, 1e-6)
        assert (o.weight_decay, o.final_weight_decay, o.ema) == (0.04, 0.4, (0.996, 1.0))
        assert cfg.data.crop_scale == (0.3, 1.0) and cfg.target.aggregation == "cross_attention"
    assert builtin_config_path("demo") is not None and builtin_config_path("nope") is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimization.lr=-1", "optimization.lr must be positive, got -1.0"),
        ("optimization.lr=0", "optimization.lr must be positive"),
        ("optimization.ema=[2,3]", "optimization.ema must satisfy 0 <= start <= end <= 1"),
        ("optimization.ema=[1.0,0.9]", "optimization.ema must satisfy 0 <= start <= end <= 1"),
        ("model.arch=bogus", "model.arch must be one of vit_nano"),
        ("mask.num_targets=0", "mask.num_targets must be at least 1"),
        ("model.img_size=100", "model.img_size 100 must be a positive multiple of model.patch_size 8"),
        ("model.patch_size=0", "model.patch_size must be positive"),
        ("mask.target_scale=[0.3,0.2]", "mask.target_scale must satisfy"),
        ("model.pred_heads=5", "model.pred_width 64 must be divisible by the predictor's 5 heads"),
    ],
)
def test_values_that_cannot_train_are_one_sentence(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(builtin_config_path("demo"), [override])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["model.arch=bogus", "mask.num_targets=0", "optimization.lr=-1"])
def test_pretrain_refuses_before_writing_anything(tmp_path, override):
    from typer.testing import CliRunner

    from dmt_jepa.cli.main import app

    result = CliRunner().invoke(app, ["pretrain", override, f"run.out_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "run").exists()
