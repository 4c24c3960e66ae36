"""The sampler's draw (inverse CDF: one uniform number per token) against the distribution it samples."""
import torch

from kvserve.engine.sampler import draw


def test_draw_follows_the_probabilities_and_never_picks_a_zero():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0])
    n = 20000
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(n)]), minlength=6).double()
    assert counts[[0, 2, 5]].sum() == 0
    # each share within 4 standard deviations of its probability
    sd = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 4 * sd + 1e-12).all(), counts / n


def test_draw_is_reproducible_by_seed_and_handles_unnormalised_mass():
    probs = torch.randn(49152, generator=torch.Generator().manual_seed(1)).softmax(-1) * 0.97
    a = [draw(probs, torch.Generator().manual_seed(5)) for _ in range(3)]
    b = [draw(probs, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert a == b
    one_hot = torch.zeros(10)
    one_hot[9] = 1.0  # the last token: the search must not step past the end
    assert {draw(one_hot, torch.Generator().manual_seed(s)) for s in range(50)} == {9}
