"""Semantic neighbours against a brute-force enumeration of each window."""

import math

import pytest
import torch

from dmt_jepa.neighbours import semantic_neighbours


def brute_force(features, h, w, k, k_size, border):
    """For every patch: enumerate its window by hand, score by cosine, sort, keep the top k."""
    r = k_size // 2
    out = []
    for feats in features:
        per_patch = []
        for y in range(h):
            for x in range(w):
                cands = set()
                for yy in range(y - r, y + r + 1):
                    for xx in range(x - r, x + r + 1):
                        if border == "clip" and not (0 <= yy < h and 0 <= xx < w):
                            continue
                        j = (yy % h) * w + (xx % w)
                        if j != y * w + x:
                            cands.add(j)
                i = y * w + x
                fi = feats[i].tolist()
                ni = math.sqrt(sum(v * v for v in fi))

                def cos(j, feats=feats, fi=fi, ni=ni):
                    fj = feats[j].tolist()
                    return sum(a * b for a, b in zip(fi, fj)) / (ni * math.sqrt(sum(v * v for v in fj)))

                per_patch.append(sorted(cands, key=cos, reverse=True)[:k])
        out.append(per_patch)
    return out


@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (6, 6), (7, 12)])
@pytest.mark.parametrize("border", ["clip", "wrap"])
def test_matches_brute_force(grid, border):
    h, w = grid
    torch.manual_seed(h * 100 + w)
    feats = torch.randn(2, h * w, 8, dtype=torch.float64)
    k = 4
    idx, valid = semantic_neighbours(feats, grid, k=k, k_size=3, border=border)
    expected = brute_force(feats, h, w, k, 3, border)
    for b in range(2):
        for n in range(h * w):
            n_valid = int(valid[b, n].sum())
            assert idx[b, n, :n_valid].tolist() == expected[b][n]
            assert valid[b, n, :n_valid].all() and not valid[b, n, n_valid:].any()
            # invalid slots point at the patch itself (a safe placeholder), never elsewhere
            assert (idx[b, n, n_valid:] == n).all()
            assert n not in idx[b, n, :n_valid].tolist(), "a patch selected itself"


def test_clip_corners_have_fewer_candidates_and_never_leave_the_image():
    h, w = 6, 6
    feats = torch.randn(1, h * w, 4)
    idx, valid = semantic_neighbours(feats, (h, w), k=8, k_size=3, border="clip")
    counts = valid[0].sum(-1).reshape(h, w)
    assert counts[0, 0] == counts[0, -1] == counts[-1, 0] == counts[-1, -1] == 3
    assert counts[0, 2] == 5 and counts[2, 2] == 8
    for n in range(h * w):
        y, x = divmod(n, w)
        for j in idx[0, n][valid[0, n]].tolist():
            assert abs(j // w - y) <= 1 and abs(j % w - x) <= 1


def test_wrap_neighbours_cross_the_border():
    h, w = 6, 6
    feats = torch.randn(1, h * w, 4)
    idx, valid = semantic_neighbours(feats, (h, w), k=8, k_size=3, border="wrap")
    assert valid.all()
    assert set(idx[0, 0].tolist()) == {1, 5, 6, 7, 11, 30, 31, 35}


def test_larger_window_and_tiny_wrapped_grid_never_select_self():
    feats = torch.randn(3, 2 * 3, 5)
    idx, valid = semantic_neighbours(feats, (2, 3), k=4, k_size=5, border="wrap")
    n = torch.arange(6)[None, :, None]
    assert not ((idx == n) & valid).any()
