import pytest
import torch

from tlq.errors import TLQError
from tlq.quant.gptq import gptq_quantize
from tlq.quant.weighted_gptq import exposure_corrected_target, weighted_gptq_quantize, weighted_hessian
from tlq.schemes import QuantScheme

BF16 = torch.bfloat16
W3G32 = QuantScheme("t", bits=3, group_size=32, symmetric=False)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def low_rank(T, K, rank, seed, noise=0.1):
    g = gen(seed)
    return torch.randn(T, rank, generator=g) @ torch.randn(rank, K, generator=g) + noise * torch.randn(T, K, generator=g)


def weighted_err(X_target, W, X_in, Q, w):
    return float((w[:, None] * (X_target @ W.T - X_in @ Q.T).square()).sum())


def test_uniform_weights_give_gptq_hessian():
    X = torch.randn(300, 48, generator=gen(0))
    ref = (2.0 / 300) * (X.T @ X)
    assert torch.equal(weighted_hessian(X), ref)
    assert torch.equal(weighted_hessian(X, torch.ones(300)), ref)
    # a constant weight is a uniform weight: the normalisation by sum(w) cancels it
    torch.testing.assert_close(weighted_hessian(X, torch.full((300,), 3.0)), ref)


def test_weighted_hessian_formula_and_zero_weight_tokens():
    X = torch.randn(200, 32, generator=gen(1))
    w = torch.rand(200, generator=gen(2)) * 2
    expected = 2 * X.T @ torch.diag(w) @ X / w.sum()
    torch.testing.assert_close(weighted_hessian(X, w), expected, rtol=1e-5, atol=1e-5)
    extra = 50 * torch.randn(40, 32, generator=gen(3))
    H2 = weighted_hessian(torch.cat([X, extra]), torch.cat([w, torch.zeros(40)]))
    torch.testing.assert_close(H2, weighted_hessian(X, w), rtol=1e-5, atol=1e-5)


def test_bad_token_weights_raise():
    X = torch.randn(10, 4)
    for w in (torch.ones(9), -torch.ones(10), torch.zeros(10)):
        with pytest.raises(TLQError):
            weighted_hessian(X, w)


def test_uniform_weighted_gptq_equals_gptq():
    X = low_rank(256, 96, 6, seed=4)
    W = torch.randn(24, 96, generator=gen(5))
    plain = gptq_quantize(W, (2.0 / 256) * (X.T @ X), W3G32, BF16)
    for w in (None, torch.ones(256)):
        got = weighted_gptq_quantize(W, X, W3G32, BF16, w=w)
        assert torch.equal(got.codes, plain.codes) and torch.equal(got.scales, plain.scales)
        assert torch.equal(got.zeros, plain.zeros)
    # exposure strength 0 (or X_fp == X_q) is plain weighted GPTQ as well
    got = weighted_gptq_quantize(W, X, W3G32, BF16, X_fp=X + 1.0, exposure_strength=0.0)
    assert torch.equal(got.codes, plain.codes)


def test_important_tokens_get_lower_weighted_error():
    # two token populations with different correlation structure; only the first matters
    wins = []
    for seed in range(3):
        Xa, Xb = low_rank(96, 96, 4, seed=10 + seed), low_rank(416, 96, 4, seed=20 + seed)
        X = torch.cat([Xa, Xb])
        w = torch.cat([torch.full((96,), 10.0), torch.full((416,), 0.1)])
        W = torch.randn(24, 96, generator=gen(30 + seed))
        q_plain = weighted_gptq_quantize(W, X, W3G32, BF16).dequantize()
        q_weighted = weighted_gptq_quantize(W, X, W3G32, BF16, w=w).dequantize()
        wins.append(weighted_err(X, W, X, q_weighted, w) / weighted_err(X, W, X, q_plain, w))
    assert max(wins) < 0.8


def test_exposure_target_is_the_least_squares_map():
    X_fp = low_rank(400, 32, 32, seed=6, noise=0.0)
    W = torch.randn(8, 32, generator=gen(7))
    # identical paths -> the target is W itself, whatever the damping
    torch.testing.assert_close(exposure_corrected_target(W, X_fp, X_fp, damp=0.1), W, rtol=1e-4, atol=1e-4)
    # X_q an invertible mix of X_fp -> W* maps X_q exactly onto the FP outputs
    M = torch.eye(32) + 0.1 * torch.randn(32, 32, generator=gen(8))
    X_q = X_fp @ M
    W_star = exposure_corrected_target(W, X_fp, X_q, damp=0.0)
    Y = X_fp @ W.T
    assert (X_q @ W_star.T - Y).norm() < 1e-3 * Y.norm()
    assert (X_q @ W.T - Y).norm() > 0.1 * Y.norm()  # the uncorrected weight is far off
    half = exposure_corrected_target(W, X_fp, X_q, damp=0.0, strength=0.5)
    torch.testing.assert_close(half, W + 0.5 * (W_star - W), rtol=1e-4, atol=1e-4)


def test_exposure_correction_lowers_error_against_fp_target():
    ratios = []
    for seed in range(3):
        X_fp = low_rank(512, 96, 8, seed=40 + seed)
        # the exposed inputs: the FP inputs after a coarse (quantization-like) distortion
        X_q = X_fp + 0.05 * low_rank(512, 96, 4, seed=50 + seed, noise=0.5)
        W = torch.randn(24, 96, generator=gen(60 + seed))
        w = 0.5 + torch.rand(512, generator=gen(70 + seed))
        without = weighted_gptq_quantize(W, X_q, W3G32, BF16, w=w).dequantize()
        with_fix = weighted_gptq_quantize(W, X_q, W3G32, BF16, w=w, X_fp=X_fp).dequantize()
        ratios.append(weighted_err(X_fp, W, X_q, with_fix, w) / weighted_err(X_fp, W, X_q, without, w))
    assert sum(ratios) / len(ratios) < 0.85


def test_streamed_statistics_match_the_all_at_once_formulas():
    """Batches folded one by one give the same Hessian, exposure target and codes (float tolerance)."""
    from tlq.quant.statistics import InputStatistics
    from tlq.quant.weighted_gptq import weighted_gptq_from_statistics
    X_q = low_rank(600, 96, 8, seed=11)
    X_fp = X_q + 0.05 * torch.randn(600, 96, generator=gen(12))
    w = torch.rand(600, generator=gen(13)) * 3
    W = torch.randn(24, 96, generator=gen(14))
    whole = InputStatistics.from_tensors(X_q, w, X_fp)
    streamed = InputStatistics(weighted=True, cross=True)
    for rows in torch.arange(600).split(137):
        streamed.add(X_q[rows], w[rows], X_fp[rows])
    assert streamed.tokens == 600
    torch.testing.assert_close(streamed.hessian(), weighted_hessian(X_q, w), rtol=1e-5, atol=1e-4)
    one = InputStatistics.from_tensors(X_q, w, X_fp)  # one batch: exactly the all-at-once Hessian
    assert torch.equal(one.hessian(), weighted_hessian(X_q, w))
    ref = weighted_gptq_quantize(W, X_q, W3G32, BF16, w=w, X_fp=X_fp, damp=0.1, exposure_strength=0.5)
    got = weighted_gptq_from_statistics(W, streamed, W3G32, BF16, damp=0.1, exposure_strength=0.5)
    exact = weighted_gptq_from_statistics(W, whole, W3G32, BF16, damp=0.1, exposure_strength=0.5)
    assert torch.equal(exact.codes, ref.codes) and torch.equal(exact.scales, ref.scales)
    same = (got.codes == ref.codes).float().mean().item()
    assert same > 0.99, same  # a flipped rounding tie here and there, not a different solution
    torch.testing.assert_close(got.dequantize(), ref.dequantize(), rtol=0, atol=float(ref.scales.max()) * 1.01)
