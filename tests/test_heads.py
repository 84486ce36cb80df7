"""Local aggregation head against a naive per-patch implementation."""

import pytest
import torch
import torch.nn.functional as F

from dmt_jepa.heads import LocalAggregationHead, pool_neighbours
from dmt_jepa.neighbours import semantic_neighbours


def naive_block(block, x, tokens):
    """One cross-attention block for ONE query x [D] over its neighbour tokens [k, D]."""
    dim = x.shape[0]
    heads, hd = block.num_heads, dim // block.num_heads
    ln = lambda v: F.layer_norm(v, (dim,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    q = F.linear(ln(x), block.q.weight, block.q.bias)
    w_k, w_v = block.kv.weight[:dim], block.kv.weight[dim:]
    b_k, b_v = block.kv.bias[:dim], block.kv.bias[dim:]
    keys = F.linear(ln(tokens), w_k, b_k)  # [k, D]
    values = F.linear(ln(tokens), w_v, b_v)
    out = []
    for head in range(heads):
        s = slice(head * hd, (head + 1) * hd)
        logits = torch.stack([(q[s] * keys[j, s]).sum() / hd**0.5 for j in range(len(tokens))])
        attn = torch.softmax(logits, 0)
        out.append(sum(attn[j] * values[j, s] for j in range(len(tokens))))
    x = x + block.proj(torch.cat(out))
    return x + block.mlp(block.norm2(x))


def naive_head(head, tokens, idx, valid):
    """Loop over images and patches; each patch's query starts as ITS image's mean token."""
    batch, n, _ = idx.shape
    out = torch.empty(batch, n, tokens.shape[-1], dtype=tokens.dtype)
    for b in range(batch):
        mean_token = tokens[b].mean(0)
        for i in range(n):
            neigh = tokens[b, idx[b, i][valid[b, i]]]
            x = mean_token
            for block in head.blocks:
                x = naive_block(block, x, neigh)
            out[b, i] = head.norm(x)
    return out


def random_head(dim=16, heads=2, depth=2, seed=0):
    torch.manual_seed(seed)
    head = LocalAggregationHead(dim, heads, depth=depth).double()
    for p in head.parameters():  # break the symmetric init so every weight matters
        p.data.normal_(0, 0.3)
    return head


@pytest.mark.parametrize("border", ["clip", "wrap"])
def test_cross_attention_equals_naive_per_patch_loop(border):
    head = random_head()
    grid = (5, 7)
    tokens = torch.randn(3, 35, 16, dtype=torch.float64)
    idx, valid = semantic_neighbours(tokens, grid, k=4, border=border)
    fast = head.forward_local(tokens, idx, valid)
    torch.testing.assert_close(fast, naive_head(head, tokens, idx, valid), rtol=0, atol=1e-5)


def test_positions_select_the_same_rows():
    head = random_head()
    tokens = torch.randn(2, 36, 16, dtype=torch.float64)
    idx, valid = semantic_neighbours(tokens, (6, 6), k=3)
    positions = torch.tensor([[0, 5, 35, 7], [1, 1, 20, 30]])
    full = head.forward_local(tokens, idx, valid)
    part = head.forward_local(tokens, idx, valid, positions)
    torch.testing.assert_close(part, torch.stack([full[b, positions[b]] for b in range(2)]))


def test_each_patch_is_queried_with_its_own_images_mean_token():
    head = random_head()
    tokens = torch.randn(2, 36, 16, dtype=torch.float64)
    idx, valid = semantic_neighbours(tokens, (6, 6), k=4)
    batched = head.forward_local(tokens, idx, valid)
    # Change only image 1's tokens that image 0's patches never select: image 0's mean token
    # is untouched, so its targets must not move; a head that mixed mean tokens would move.
    other = tokens.clone()
    other[1] = torch.randn(36, 16, dtype=torch.float64) * 5
    moved = head.forward_local(other, idx, valid)
    torch.testing.assert_close(moved[0], batched[0], rtol=0, atol=1e-12)
    assert (moved[1] - batched[1]).abs().max() > 1e-3
    alone = head.forward_local(tokens[:1], idx[:1], valid[:1])
    torch.testing.assert_close(alone[0], batched[0], rtol=0, atol=1e-10)


def test_invalid_slots_do_not_contribute():
    head = random_head()
    tokens = torch.randn(1, 36, 16, dtype=torch.float64)
    idx, valid = semantic_neighbours(tokens, (6, 6), k=8, border="clip")
    out = head.forward_local(tokens, idx, valid)
    # corner patch 0 has 3 valid neighbours: pointing its invalid slots elsewhere changes nothing
    idx2 = idx.clone()
    idx2[0, 0][~valid[0, 0]] = 20
    torch.testing.assert_close(head.forward_local(tokens, idx2, valid)[0, 0], out[0, 0])


def test_self_attention_head_masks_invalid_slots_and_matches_per_patch_runs():
    torch.manual_seed(0)
    head = LocalAggregationHead(16, 2, mode="self_attention").double().eval()
    tokens = torch.randn(2, 36, 16, dtype=torch.float64)
    idx, valid = semantic_neighbours(tokens, (6, 6), k=8, border="clip")
    out = head.forward_local(tokens, idx, valid)
    for b, i in [(0, 0), (1, 14), (1, 35)]:
        seq = torch.cat([tokens[b].mean(0, keepdim=True), tokens[b, idx[b, i][valid[b, i]]]])[None]
        for block in head.blocks:
            seq = block(seq)
        torch.testing.assert_close(out[b, i], head.norm(seq[0, 0]))


def test_global_mode_adds_one_vector_to_every_context_token():
    head = random_head()
    tokens = torch.randn(2, 10, 16, dtype=torch.float64)
    out = head.forward_global(tokens)
    delta = out - tokens
    torch.testing.assert_close(delta, delta[:, :1].expand_as(delta))
    # it is the local computation with every token as a neighbour
    idx = torch.arange(10).expand(2, 1, 10)
    ref = head.forward_local(tokens, idx, torch.ones_like(idx, dtype=torch.bool))
    torch.testing.assert_close(delta[:, 0], ref[:, 0])


def test_mean_and_max_pooling_by_hand():
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [5.0, -2.0]]])
    idx = torch.tensor([[[1, 2], [0, 0], [0, 1]]])
    valid = torch.tensor([[[True, True], [True, False], [True, True]]])
    torch.testing.assert_close(pool_neighbours(tokens, idx, valid, "mean"), torch.tensor([[[4.0, 1.0], [1.0, 0.0], [2.0, 2.0]]]))
    torch.testing.assert_close(pool_neighbours(tokens, idx, valid, "max"), torch.tensor([[[5.0, 4.0], [1.0, 0.0], [3.0, 4.0]]]))
