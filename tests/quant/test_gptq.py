import pytest
import torch
from reference import gptq as ref_gptq  # tests/reference (tests/ is on sys.path through its conftest)

from tlq.errors import TLQError
from tlq.quant.gptq import gptq_core, gptq_quantize
from tlq.quant.qparams import quantize_rtn
from tlq.schemes import QuantScheme

BF16 = torch.bfloat16


def scheme(bits, group_size, symmetric=False):
    return QuantScheme("t", bits=bits, group_size=group_size, symmetric=symmetric)


def correlated_inputs(T, K, rank=8, seed=0):
    """Tokens on a low-rank subspace plus a little noise, with uneven channel magnitudes."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(T, rank, generator=g)
    A = torch.randn(rank, K, generator=g)
    X = Z @ A + 0.1 * torch.randn(T, K, generator=g)
    return X * torch.linspace(0.5, 2.0, K)


def hessian(X):
    return (2.0 / X.shape[0]) * (X.T @ X)


def out_err(X, W, Q):
    return float((X @ W.T - X @ Q.T).norm())


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size, symmetric):
    X = correlated_inputs(512, 128, seed=bits)
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    s = scheme(bits, group_size, symmetric)
    qg = gptq_quantize(W, hessian(X), s, BF16)
    qr = quantize_rtn(W, s.bits, s.group_size, s.symmetric, BF16)
    assert qg.codes.shape == (32, 128) and qg.scales.shape == qr.scales.shape
    assert int(qg.codes.min()) >= 0 and int(qg.codes.max()) <= 2**bits - 1
    assert out_err(X, W, qg.dequantize()) < 0.6 * out_err(X, W, qr.dequantize())


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,group_size", [(4, -1), (4, 128), (3, 128), (2, 128), (4, 64), (3, 64), (2, 32)])
def test_gptq_is_bit_identical_to_ist_daslab(bits, group_size, symmetric):
    """IST-DASLab/gptq gptq.py (fasterquant) with quant.py's Quantizer (tests/reference/gptq.py), float32.

    Groups of 64 and 32 start inside the 128-column blocks, where the reference takes their
    parameters from weights that lack the current block's updates so far: so does tlq."""
    X = correlated_inputs(512, 256, seed=20 + bits)
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(21))
    H = hessian(X)
    got = gptq_quantize(W, H, scheme(bits, group_size, symmetric), torch.float32).dequantize()
    assert torch.equal(got, ref_gptq.fasterquant(W, H, bits, symmetric, group_size))


def test_identity_hessian_reduces_to_rtn():
    # no input correlation -> no error feedback -> GPTQ is exactly round-to-nearest
    W = torch.randn(8, 96, generator=torch.Generator().manual_seed(2))
    s = scheme(3, 32)
    qg = gptq_quantize(W, torch.eye(96), s, BF16, block_size=40)
    qr = quantize_rtn(W, s.bits, s.group_size, s.symmetric, BF16)
    assert torch.equal(qg.codes, qr.codes) and torch.equal(qg.scales, qr.scales)
    assert torch.equal(qg.zeros, qr.zeros)


def test_lazy_block_updates_are_exact_on_a_ragged_k():
    # K=200 is not a multiple of the group (48) or of any block; block sizes that divide the group
    # start every group at a block start, so they differ only in when the lazy updates are applied
    X = correlated_inputs(400, 200, seed=3)
    W = torch.randn(16, 200, generator=torch.Generator().manual_seed(3))
    s = scheme(4, 48)
    per_group = gptq_quantize(W, hessian(X), s, BF16, block_size=48)
    for block_size in (24, 16):
        lazy = gptq_quantize(W, hessian(X), s, BF16, block_size=block_size)
        assert per_group.scales.shape == lazy.scales.shape == (16, 5)
        assert (per_group.codes == lazy.codes).float().mean() > 0.99
        torch.testing.assert_close(lazy.scales, per_group.scales, rtol=2e-2, atol=0)


def test_dead_inputs_zero_the_weight_column():
    X = correlated_inputs(256, 64, seed=4)
    X[:, [5, 17]] = 0
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    for sym in (False, True):
        Q = gptq_quantize(W, hessian(X), scheme(4, 16, sym), BF16).dequantize()
        assert torch.all(Q[:, [5, 17]] == 0)
        assert torch.isfinite(Q).all()


def outlier_inputs(seed):
    X = correlated_inputs(512, 128, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    cols = torch.randperm(128, generator=g)[:6]
    X[:, cols] *= 15.0
    return X


@pytest.mark.parametrize("group_size", [32, -1])
def test_act_order_g_idx_matches_internal_weights(group_size):
    X = outlier_inputs(0)
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(5))
    qw, Q = gptq_core(W, hessian(X), scheme(3, group_size), BF16, act_order=True)
    torch.testing.assert_close(qw.dequantize(), Q, rtol=0, atol=0)
    if group_size == -1:
        assert qw.g_idx is None
    else:
        assert qw.g_idx.shape == (128,) and qw.g_idx.dtype == torch.int32
        assert torch.equal(torch.bincount(qw.g_idx.long()), torch.full((4,), 32))
        # salient (outlier) columns are quantized first, so they land in group 0
        top = torch.argsort(torch.diag(hessian(X)), descending=True)[:6]
        assert torch.all(qw.g_idx[top] == 0)


def test_act_order_not_worse_than_rtn_and_helps_with_outlier_columns():
    s = scheme(3, 32)
    ratios = []
    for seed in range(4):
        X = outlier_inputs(seed)
        W = torch.randn(16, 128, generator=torch.Generator().manual_seed(10 + seed))
        H = hessian(X)
        e_act = out_err(X, W, gptq_quantize(W, H, s, BF16, act_order=True).dequantize())
        e_plain = out_err(X, W, gptq_quantize(W, H, s, BF16).dequantize())
        e_rtn = out_err(X, W, quantize_rtn(W, s.bits, s.group_size, s.symmetric, BF16).dequantize())
        assert e_act < e_rtn
        ratios.append(e_act / e_plain)
    assert sum(ratios) / len(ratios) < 0.8


def test_cholesky_retries_then_raises_clear_error():
    W = torch.randn(4, 16)
    # rank-deficient Hessian (T < K) with no damping: the retry with more damping succeeds
    X = torch.randn(4, 16, generator=torch.Generator().manual_seed(6))
    q = gptq_quantize(W, hessian(X), scheme(4, -1), BF16, damp=0.0)
    assert torch.isfinite(q.dequantize()).all()
    with pytest.raises(TLQError, match="not positive definite"):
        gptq_quantize(W, -torch.eye(16), scheme(4, -1), BF16)
    with pytest.raises(TLQError, match="Hessian"):
        gptq_quantize(W, torch.eye(8), scheme(4, -1), BF16)
