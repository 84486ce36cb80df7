"""optimization.compile: the forward and loss form one graph, compiled once for a whole run."""

import json
import shutil

import pytest
import torch
from pretrain_fixtures import small_shards, tiny_overrides
from safetensors.torch import load_file

from dmt_jepa.checkpoint import checkpoint_dirs
from dmt_jepa.config import MaskConfig, load_config
from dmt_jepa.masks import MultiBlockMaskSampler
from dmt_jepa.objective import DMTJEPA, step_without_sync
from dmt_jepa.train import pretrain


def _model(aggregation: str = "cross_attention", **mask) -> DMTJEPA:
    cfg = load_config(None, tiny_overrides("x", "y", f"target.aggregation={aggregation}"))
    cfg.mask = MaskConfig(**{"min_keep": 2, **mask})
    torch.manual_seed(0)
    return DMTJEPA(cfg.method)


@pytest.mark.parametrize("aggregation", ["cross_attention", "none"])
def test_forward_and_loss_trace_without_graph_breaks(aggregation):
    model = _model(aggregation)
    masks = MultiBlockMaskSampler((4, 4), model.cfg.mask)(2, torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64), masks.context_idx, masks.target_idx)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def _compiles_over_ten_steps(static: bool) -> int:
    """Graphs dynamo hands its backend over 10 optimizer steps with fresh images and masks (stops at the second)."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward  # run the captured graph as it is: the count is what is measured

    model = _model(static=static)
    compiled = torch.compile(model, backend=counting_backend)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sampler = MultiBlockMaskSampler((4, 4), model.cfg.mask)
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        images = torch.randn(3, 3, 64, 64, generator=generator)
        loss = step_without_sync(compiled, images, sampler(3, generator), optimizer, 0.99)
        assert torch.isfinite(loss)
        if len(graphs) > 1:
            break
    return len(graphs)


def test_static_masks_compile_once_over_ten_steps():
    assert _compiles_over_ten_steps(static=True) == 1


@pytest.mark.slow  # two or more traces of the whole step: ~30 s on 2 cores
def test_masks_that_change_size_recompile():
    """The count sees recompiles where there are some: per-batch mask sizes cause them."""
    assert _compiles_over_ten_steps(static=False) > 1


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return small_shards(tmp_path_factory.mktemp("compile"))


def _losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())]


@pytest.mark.slow  # inductor compiles the forward and backward on CPU: minutes on 2 cores
def test_compiled_run_resumes_exactly(shards, tmp_path):
    overrides = tiny_overrides(
        shards, tmp_path / "full", "optimization.compile=true", "run.checkpoint_every=3", "model.drop_path_rate=0.2"
    )
    full = pretrain(load_config(None, overrides))
    cut = tmp_path / "cut"
    shutil.copytree(full.run_dir, cut)
    for later in checkpoint_dirs(cut)[1:]:
        shutil.rmtree(later)
    (cut / "encoder.safetensors").unlink()
    resumed = pretrain(load_config(cut / "config.yaml", [f"run.out_dir={cut}"]), resume=cut)
    assert _losses(resumed.run_dir) == _losses(full.run_dir) and len(_losses(full.run_dir)) == 8
    a, b = load_file(str(full.encoder)), load_file(str(resumed.encoder))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_compile_flag_sets_the_config_key(tmp_path):
    """`dmtjepa pretrain --compile` resolves to optimization.compile=true (read back from the run's
    config.yaml; the run stops at its empty shard before anything is compiled)."""
    import tarfile

    from typer.testing import CliRunner

    from dmt_jepa.cli.main import app

    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    for flag, expected in (["--compile"], True), ([], False):
        out = tmp_path / f"run-{expected}"
        result = CliRunner().invoke(app, ["pretrain", *flag, *tiny_overrides(str(tmp_path / "empty.tar"), out)])
        assert result.exit_code == 2 and "holds a sample" in result.output
        assert load_config(out / "config.yaml", []).optimization.compile is expected
