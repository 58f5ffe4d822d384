import pytest
import torch

from tlq.errors import TLQError
from tlq.quant.qparams import quantize_activations_int8, quantize_rtn
from tlq.quant.scale_search import search_clip_ratios, search_input_scales
from tlq.schemes import QuantScheme

BF16 = torch.bfloat16
W3G32 = QuantScheme("t", bits=3, group_size=32, symmetric=False)
W4A8 = QuantScheme("t8", bits=4, group_size=-1, symmetric=True, act_bits=8)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def outlier_inputs(T=384, K=128, seed=0, n_out=4, factor=20.0):
    X = torch.randn(T, K, generator=gen(seed))
    cols = torch.randperm(K, generator=gen(seed + 1))[:n_out]
    X[:, cols] *= factor
    return X


def linears(K=128, seed=0):
    return [torch.randn(32, K, generator=gen(seed + 2)), torch.randn(16, K, generator=gen(seed + 3))]


def scaled_loss(Ws, X, s, scheme, w=None, act_quant=False, loss="mse"):
    """Token-weighted loss of the scaled, quantized group of linears, computed independently."""
    w = torch.ones(X.shape[0]) if w is None else w
    Xs = X / s
    if act_quant:
        Xs = quantize_activations_int8(Xs)
    rtn = lambda W: quantize_rtn(W, scheme.bits, scheme.group_size, scheme.symmetric, BF16).dequantize()  # noqa: E731
    err = torch.cat([X @ W.T - Xs @ rtn(W * s).T for W in Ws], dim=1)
    per_token = (err.square() if loss == "mse" else err.abs()).mean(1)
    return float((w * per_token).sum() / w.sum())


@pytest.mark.parametrize("scheme,act_quant", [(W3G32, False), (W4A8, True)])
def test_scales_reduce_output_error_with_outlier_channels(scheme, act_quant):
    X, Ws = outlier_inputs(), linears()
    s = search_input_scales(Ws, X, scheme, BF16, act_quant=act_quant)
    assert s.shape == (128,) and torch.all(s >= 1e-4)
    ones = torch.ones(128)
    assert scaled_loss(Ws, X, s, scheme, act_quant=act_quant) < 0.5 * scaled_loss(Ws, X, ones, scheme,
                                                                                   act_quant=act_quant)


@pytest.mark.parametrize("loss", ["mse", "mae"])
def test_never_worse_than_no_scaling(loss):
    for seed in range(3):
        for X in (torch.randn(256, 64, generator=gen(seed)), outlier_inputs(256, 64, seed=seed, factor=3.0)):
            Ws = linears(64, seed)
            w = 0.2 + torch.rand(256, generator=gen(seed + 9))
            s = search_input_scales(Ws, X, W3G32, BF16, w=w, n_grid=10, loss=loss)
            assert scaled_loss(Ws, X, s, W3G32, w, loss=loss) <= scaled_loss(Ws, X, torch.ones(64), W3G32, w,
                                                                             loss=loss)


def test_zero_weight_tokens_do_not_influence_scales():
    X, Ws = outlier_inputs(256, 64, seed=4), linears(64, seed=4)
    w = 0.5 + torch.rand(256, generator=gen(5))
    base = search_input_scales(Ws, X, W3G32, BF16, w=w, max_tokens=200)
    # extra tokens with huge outliers on other channels
    extra = torch.randn(128, 64, generator=gen(6))
    extra[:, :8] *= 200.0
    X2 = torch.cat([extra[:64], X, extra[64:]])
    zero = search_input_scales(Ws, X2, W3G32, BF16, w=torch.cat([torch.zeros(64), w, torch.zeros(64)]),
                               max_tokens=200)
    assert torch.equal(zero, base)
    counted = search_input_scales(Ws, X2, W3G32, BF16, w=torch.cat([torch.ones(64), w, torch.ones(64)]),
                                  max_tokens=200)
    assert not torch.equal(counted, base)  # the same tokens with weight do move the result


def test_scale_search_is_deterministic_and_validates():
    X, Ws = outlier_inputs(300, 64, seed=7), linears(64, seed=7)
    a = search_input_scales(Ws, X, W3G32, BF16, max_tokens=100, seed=3)
    b = search_input_scales(Ws, X, W3G32, BF16, max_tokens=100, seed=3)
    assert torch.equal(a, b)
    with pytest.raises(TLQError, match="loss"):
        search_input_scales(Ws, X, W3G32, BF16, loss="huber")
    with pytest.raises(TLQError):
        search_input_scales(Ws, X, W3G32, BF16, w=torch.zeros(300))


def group_errors(W, X, scheme, ratio, w):
    """Weighted squared error of each (row, group) partial product: [N, n_groups]."""
    Q = quantize_rtn(W, scheme.bits, scheme.group_size, scheme.symmetric, BF16, clip_ratio=ratio).dequantize()
    g = W.shape[1] if scheme.group_size == -1 else scheme.group_size
    errs = [(w[:, None] * (X[:, j:j + g] @ (W[:, j:j + g] - Q[:, j:j + g]).T).square()).sum(0)
            for j in range(0, W.shape[1], g)]
    return torch.stack(errs, dim=1)


def heavy_tailed(N, K, seed):
    g = gen(seed)
    return torch.randn(N, K, generator=g) * torch.exp(torch.randn(N, K, generator=g))


@pytest.mark.parametrize("scheme", [W3G32, QuantScheme("s", bits=4, group_size=-1, symmetric=True),
                                    QuantScheme("a", bits=4, group_size=48, symmetric=True)])
def test_clipping_never_increases_weighted_error(scheme):
    W, X = heavy_tailed(24, 96, seed=8), torch.randn(300, 96, generator=gen(9))
    w = torch.rand(300, generator=gen(10))
    ratio = search_clip_ratios(W, X, scheme, BF16, w=w)
    ng = 1 if scheme.group_size == -1 else -(-96 // scheme.group_size)
    assert ratio.shape == (24, ng) and torch.all(ratio <= 1.0) and torch.all(ratio > 0.5)
    clipped, plain = group_errors(W, X, scheme, ratio, w), group_errors(W, X, scheme, None, w)
    assert torch.all(clipped <= plain * (1 + 1e-6))
    assert clipped.sum() < 0.95 * plain.sum()  # heavy tails: clipping does help
    assert (ratio < 1).any()


def test_clipping_ignores_zero_weight_tokens():
    W, X = heavy_tailed(16, 64, seed=11), torch.randn(200, 64, generator=gen(12))
    base = search_clip_ratios(W, X, W3G32, BF16)
    X2 = torch.cat([X, 100 * torch.randn(50, 64, generator=gen(13))])
    w2 = torch.cat([torch.ones(200), torch.zeros(50)])
    assert torch.equal(search_clip_ratios(W, X2, W3G32, BF16, w=w2), base)


@pytest.mark.parametrize("T,K", [(384, 128), (96, 128)], ids=["hessian-path", "token-path"])
def test_chosen_scale_is_the_grid_argmin_of_the_direct_loss(T, K):
    """Weight-only MSE uses tr(E H E^T) when tokens outnumber inputs; the pick must match the direct loss."""
    X, Ws = outlier_inputs(T, K, seed=4, factor=6.0), linears(K, seed=4)
    w = 0.2 + torch.rand(T, generator=gen(11))
    n_grid = 10
    s = search_input_scales(Ws, X, W3G32, BF16, w=w, n_grid=n_grid)
    stat = (w[:, None] / w.sum() * X.abs()).sum(0)
    candidates = []
    for step in range(n_grid):
        c = stat.pow(step / n_grid).clamp(min=1e-4)
        candidates.append(c / (c.max() * c.min()).sqrt())
    losses = [scaled_loss(Ws, X, c, W3G32, w) for c in candidates]
    assert torch.allclose(s, candidates[losses.index(min(losses))])
