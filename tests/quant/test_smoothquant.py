import pytest
import torch

from tlq.errors import TLQError
from tlq.quant.smoothquant import smooth_scales


def test_smoothing_preserves_the_product_and_flattens_outliers():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 64, generator=g)
    outliers = torch.tensor([3, 17, 40])
    X[:, outliers] *= 50.0
    Ws = [torch.randn(32, 64, generator=g), 0.1 * torch.randn(16, 64, generator=g)]
    s = smooth_scales(X, Ws, alpha=0.5)
    assert s.shape == (64,) and torch.all(s > 0)
    for W in Ws:
        torch.testing.assert_close((X / s) @ (W * s).T, X @ W.T, rtol=1e-4, atol=1e-3)
    assert (X / s)[:, outliers].abs().max() < 0.2 * X[:, outliers].abs().max()
    # the activation range across channels becomes flatter
    ch = (X / s).abs().amax(0)
    assert ch.max() / ch.median() < 0.3 * (X.abs().amax(0).max() / X.abs().amax(0).median())


def test_smoothing_formula_and_limits():
    X = torch.tensor([[4.0, -1.0, 0.0], [1.0, 0.5, 0.0]])
    W1, W2 = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[-4.0, 1.0, 0.25]])
    s = smooth_scales(X, [W1, W2], alpha=0.5)
    torch.testing.assert_close(s[:2], torch.tensor([4.0 ** 0.5 / 4.0 ** 0.5, 1.0 / 2.0 ** 0.5]))
    assert s[2] > 0  # a dead channel is clamped, never zero
    torch.testing.assert_close(smooth_scales(X, [W1, W2], alpha=1.0)[:2], torch.tensor([4.0, 1.0]))
    with pytest.raises(TLQError, match="alpha"):
        smooth_scales(X, [W1], alpha=1.5)
