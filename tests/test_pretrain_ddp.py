"""Two processes under torchrun on CPU (gloo): DDP trains and the ranks stay identical."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from pretrain_fixtures import make_images, tiny_overrides
from safetensors.torch import load_file

from dmt_jepa.config import load_config
from dmt_jepa.data import pack_images
from dmt_jepa.objective import DMTJEPA

ROOT = Path(__file__).resolve().parents[1]


def test_two_gloo_processes_train_and_hold_identical_weights(tmp_path):
    make_images(tmp_path / "images", 16)
    pack_images(tmp_path / "images", tmp_path / "shards", max_shard_count=4)
    overrides = tiny_overrides(
        str(tmp_path / "shards" / "shard-{000000..000003}.tar"),
        tmp_path / "run",
        "optimization.epochs=1",
        "run.checkpoint_every=4",
        "run.keep_checkpoints=1",
        "run.log_every=2",
        "run.locality_every=3",
    )  # reads at 2, 3 (rank 0 measures locality), 4
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "dmt_jepa.cli.main",
        "pretrain",
        *overrides,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("encoder file:") == 1  # only rank 0 reports and writes

    checkpoint = tmp_path / "run" / "checkpoints" / "step-000000004"
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["weights_sha256"]) == 2
    assert state["weights_sha256"][0] == state["weights_sha256"][1]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3, 4] and all(r["loss"] > 0 for r in log)
    assert [r["step"] for r in log if "within_image_share" in r] == [3]

    torch.manual_seed(0)
    initial = DMTJEPA(load_config(None, overrides).method).context_encoder.state_dict()
    trained = load_file(str(checkpoint / "context_encoder.safetensors"))
    assert all(not torch.equal(trained[k], v) for k, v in initial.items() if k.endswith("qkv.weight"))
