"""Decode grouping by length (no model): every decode lands in exactly one group, batch order is kept
inside a group, and a long outlier does not make short requests read its whole context."""
from hypothesis import given
from hypothesis import strategies as st

from kvserve.attn.backend import group_decodes


def test_outlier_gets_its_own_group():
    groups = group_decodes([100, 120, 2000, 130, 1900], block_size=16)
    assert groups == [[0, 1, 3], [2, 4]]


def test_equal_lengths_stay_one_group():
    assert group_decodes([37] * 12, block_size=16) == [list(range(12))]


def test_group_cost_trades_groups_for_padding():
    lens = [64, 128, 192, 256]
    assert group_decodes(lens, 16, group_cost=10**9) == [[0, 1, 2, 3]]  # groups too dear: pad to 256
    assert group_decodes(lens, 16, group_cost=0) == [[0], [1], [2], [3]]  # groups free: no padding


@given(st.lists(st.integers(1, 4096), min_size=1, max_size=64), st.sampled_from([1, 16, 4096]))
def test_partition(lens, block_size):
    groups = group_decodes(lens, block_size)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    assert all(g == sorted(g) for g in groups)
