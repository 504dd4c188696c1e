"""Selection math: exact budgets on separate and fused q/k/v layouts."""

import math

import pytest
import torch

from lorsu_edge.select import budget_count, head_rows, head_scores, indices_to_mask, top_entries, top_heads


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.1, 0.37, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(64, 32), (4096, 1024 // 16), (7, 13)])
def test_top_entries_hits_budget_exactly(fraction, shape):
    g = torch.randn(shape)
    idx = top_entries(g, fraction)
    assert idx.numel() == math.floor(fraction * g.numel() + 1e-9) == budget_count(g.numel(), fraction)
    assert idx.unique().numel() == idx.numel()
    if idx.numel():
        mask = indices_to_mask(idx, shape)
        # every selected |g| is >= every unselected |g|
        assert g.abs()[mask].min() >= g.abs()[~mask].max() if (~mask).any() else True


def test_top_entries_picks_largest_magnitude_regardless_of_sign():
    g = torch.tensor([[0.1, -5.0], [3.0, 0.2]])
    assert top_entries(g, 0.5).tolist() == [1, 2]


@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_top_heads_exactly_k(k):
    scores = torch.rand(4)
    heads = top_heads(scores, k)
    assert heads.numel() == k
    assert set(heads.tolist()) == set(torch.topk(scores, k).indices.tolist())


def test_head_scores_sum_of_squares_per_head():
    heads, hd, d_in = 4, 3, 5
    gq, gk, gv = (torch.randn(heads * hd, d_in) for _ in range(3))
    scores = head_scores([gq, gk, gv], heads)
    for h in range(heads):
        rows = slice(h * hd, (h + 1) * hd)
        expected = sum(g[rows].pow(2).sum() for g in (gq, gk, gv))
        assert torch.allclose(scores[h], expected)


def test_fused_qkv_scores_equal_separate():
    heads, hd, d_in = 4, 8, 32
    gq, gk, gv = (torch.randn(heads * hd, d_in) for _ in range(3))
    fused = torch.cat([gq, gk, gv])
    assert torch.allclose(head_scores(list(fused.chunk(3)), heads), head_scores([gq, gk, gv], heads))


def test_head_rows_separate_and_fused():
    heads = torch.tensor([1, 3])
    assert head_rows(heads, 2).tolist() == [2, 3, 6, 7]
    fused = head_rows(heads, 2, parts=3, part_stride=8)
    assert fused.tolist() == [2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23]


def test_bad_budgets_raise():
    with pytest.raises(ValueError):
        top_entries(torch.randn(4), 1.5)
    with pytest.raises(ValueError):
        top_heads(torch.randn(4), 5)
