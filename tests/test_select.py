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


@pytest.mark.parametrize("k,expected", [(0, []), (1, [1]), (2, [1, 3]), (3, [0, 1, 3]), (4, [0, 1, 2, 3])])
def test_top_heads_picks_the_k_highest_sorted(k, expected):
    assert top_heads(torch.tensor([0.3, 0.9, 0.1, 0.5]), k).tolist() == expected


def _hand_grads() -> list[torch.Tensor]:
    """2 heads x 3 dims, 2 inputs. q's row r holds r (head 0: 2*(0+1+4) = 10, head 1: 2*(9+16+25) = 100);
    k is 0; v has 10 in both entries of row 1 (head 0: 200). So head 0 = 210 > head 1 = 100, and only
    because v counts: dropping v, reading rows as (head_dim, heads) or squaring after summing changes the winner."""
    gq = torch.arange(6.0).repeat_interleave(2).view(6, 2)
    gv = torch.zeros(6, 2)
    gv[1] = 10.0
    return [gq, torch.zeros(6, 2), gv]


def test_head_scores_hand_computed():
    scores = head_scores(_hand_grads(), num_heads=2)
    assert scores.tolist() == [210.0, 100.0]
    assert top_heads(scores, 1).tolist() == [0]


def test_head_scores_hand_computed_on_a_fused_qkv():
    fused = torch.cat(_hand_grads())  # rows laid out (3, heads, head_dim), as inject chunks them
    assert head_scores(list(fused.chunk(3)), num_heads=2).tolist() == [210.0, 100.0]


def test_hand_computed_entry_mask():
    g = torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]])
    expected = torch.tensor([[False, True, False], [True, False, False]])
    assert torch.equal(indices_to_mask(top_entries(g, 2 / 6), g.shape), expected)


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
