"""Precision of the training step under bf16 autocast: neighbours ranked in fp32, residual
streams in bf16 from their first add, and one norm1 per context-side head block."""

import torch
import torch.nn.functional as F

from dmt_jepa.config import MaskConfig, MethodConfig, ModelConfig, TargetConfig
from dmt_jepa.heads import LocalAggregationHead
from dmt_jepa.masks import MultiBlockMaskSampler
from dmt_jepa.neighbours import semantic_neighbours, window_candidates
from dmt_jepa.objective import DMTJEPA


def test_neighbours_under_bf16_autocast_are_the_fp32_neighbours():
    torch.manual_seed(0)
    features = F.layer_norm(torch.randn(8, 196, 64), (64,))
    fp32 = semantic_neighbours(features, (14, 14), k=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = semantic_neighbours(features, (14, 14), k=4)
    assert torch.equal(fp32[0], mixed[0]) and torch.equal(fp32[1], mixed[1])
    # These features are ones where the precision of the ranking matters: bf16 cosines pick other sets.
    cand, valid = window_candidates(14, 14, 3, "clip")
    unit = F.normalize(features, dim=-1)
    sim = torch.einsum("bnd,bnwd->bnw", unit.bfloat16(), unit[:, cand.flatten()].reshape(8, 196, -1, 64).bfloat16())
    bf16_sets = sim.float().masked_fill(~valid, float("-inf")).topk(4, dim=-1).indices.sort(-1).values
    fp32_sets = torch.stack([(cand[None] == fp32[0][..., j : j + 1]).int().argmax(-1) for j in range(4)], -1).sort(-1).values
    assert (bf16_sets != fp32_sets).any(-1).float().mean() > 0


def _tiny_model() -> DMTJEPA:
    torch.manual_seed(0)
    return DMTJEPA(
        MethodConfig(
            model=ModelConfig(arch="vit_nano", img_size=64, pred_width=32, pred_depth=1),
            mask=MaskConfig(min_keep=2),
            target=TargetConfig(head_depth=1),
        )
    )


def test_residual_streams_enter_the_blocks_in_bf16_under_autocast():
    model = _tiny_model()
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, args[0].dtype)

        return hook

    model.context_encoder.blocks[0].register_forward_pre_hook(record("context_encoder"))
    model.predictor.blocks[0].register_forward_pre_hook(record("predictor"))
    masks = MultiBlockMaskSampler((4, 4), model.cfg.mask)(2, torch.Generator().manual_seed(0))
    # CUDA autocast runs LayerNorm in fp32, so there the context reaches the predictor in fp32:
    # its stream must still be bf16 after the position table is added.
    context = torch.randn(2, masks.context_idx.shape[1], 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.context_encoder(torch.randn(2, 3, 64, 64), keep=masks.context_idx)
        model.predictor(context, masks.context_idx, masks.target_idx, (4, 4))
    assert seen == {"context_encoder": torch.bfloat16, "predictor": torch.bfloat16}


def test_context_side_head_runs_norm1_once_per_block_and_computes_the_same():
    torch.manual_seed(0)
    head = LocalAggregationHead(32, 4, depth=2, query="self", context="tokens")
    calls = []
    for block in head.blocks:
        block.norm1.register_forward_hook(lambda m, args, out: calls.append(m))
    tokens = torch.randn(2, 9, 32)
    out = head.forward_global(tokens)
    assert len(calls) == len(head.blocks) and {id(c) for c in calls} == {id(b.norm1) for b in head.blocks}
    # Reference: each block's queries and keys normalised separately, attention written out.
    x = tokens
    for block in head.blocks:
        q = block.q(block.norm1(x)).view(2, 9, 4, 8).transpose(1, 2)
        kv = block.kv(block.norm1(x)).view(2, 9, 2, 4, 8)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        attended = ((q @ k.transpose(-1, -2)) * 8**-0.5).softmax(-1) @ v  # [B, H, Q, hd]
        x = block.finish(x, attended.transpose(1, 2))
    torch.testing.assert_close(out, head.norm(x), rtol=1e-5, atol=1e-5)
