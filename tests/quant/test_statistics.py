"""The streamed statistics (tlq/quant/statistics.py): the projected float-path moment P_i = W_i C."""
import pytest
import torch

from tlq.calib.solved_scaling import OutputError
from tlq.errors import TLQError
from tlq.quant.statistics import InputStatistics, projects_cross
from tlq.quant.weighted_gptq import exposure_target


def _group(T=600, K=96, seed=0):
    """Exposed and float-path inputs that differ, token weights, and two linears reading them."""
    g = torch.Generator().manual_seed(seed)
    X_fp = torch.randn(T, K, generator=g) * torch.linspace(0.2, 3.0, K)
    X_q = X_fp + 0.2 * torch.randn(T, K, generator=g)
    w = torch.rand(T, generator=g) + 0.05
    return X_q, X_fp, w, [torch.randn(20, K, generator=g), torch.randn(12, K, generator=g)]


def test_the_moment_is_projected_where_that_is_cheaper():
    assert projects_cross(8960, 1536) and projects_cross(18944, 3584)  # down_proj of Qwen2-VL-2B and -7B
    assert not projects_cross(1536, 1536 + 256 + 256)  # q/k/v
    assert not projects_cross(1536, 2 * 8960) and not projects_cross(1536, 1536)  # gate/up, o_proj
    assert projects_cross(512, 256)  # the tiny fixtures' down_proj: half the memory of C at the same cost


def test_projected_moment_gives_the_targets_and_judge_errors_of_C():
    X_q, X_fp, w, Ws = _group()
    full = InputStatistics.from_tensors(X_q, w, X_fp)
    projected = InputStatistics(weighted=True, cross=True, projections=Ws)
    for start in range(0, len(X_q), 128):  # streamed batch by batch
        part = slice(start, start + 128)
        projected.add(X_q[part], w[part], X_fp[part])
    assert projected.C is None and projected.P is not None and full.C is not None
    torch.testing.assert_close(projected.M, full.M, rtol=1e-5, atol=1e-4)
    exact, kept = full.exposure_factor(0.1), projected.exposure_factor(0.1)
    rows = torch.tensor([1, 4, 7])
    for W in Ws:
        torch.testing.assert_close(exposure_target(W, kept, 0.5), exposure_target(W, exact, 0.5), rtol=1e-4,
                                   atol=1e-5)
        Q = W + 0.05 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1))
        for r in (None, rows):
            scored = Q if r is None else Q[r]
            assert OutputError(W, projected, 0.1, r)(scored) == pytest.approx(OutputError(W, full, 0.1, r)(scored),
                                                                             rel=1e-4)
    # the correction is real: the target moved away from W
    assert not torch.allclose(exposure_target(Ws[0], kept, 1.0), Ws[0], atol=1e-3)


def test_a_projected_moment_serves_only_its_own_weights():
    X_q, X_fp, w, Ws = _group()
    stats = InputStatistics.from_tensors(X_q, w, X_fp, projections=Ws)
    factor = stats.exposure_factor(0.1)
    with pytest.raises(TLQError, match="projected"):
        exposure_target(Ws[0] + 1e-3, factor)  # another weight of the same shape: no silent wrong target
    stats.drop_cross()
    with pytest.raises(TLQError, match="dropped"):
        exposure_target(Ws[0], factor)


def test_wide_M_is_accumulated_on_its_upper_blocks_and_read_whole(monkeypatch):
    from tlq.quant import statistics
    monkeypatch.setattr(statistics, "SYMMETRIC_BLOCK", 32)  # K = 96: three blocks
    assert statistics.symmetric_blocks(96) == [(0, 32), (32, 64), (64, 96)]
    assert statistics.symmetric_blocks(64) is None
    X_q, X_fp, w, _ = _group()
    want = X_q.T @ (X_q * w[:, None])
    stats = InputStatistics(weighted=True, cross=True)
    stats.add(X_q[:300], w[:300], X_fp[:300])
    half = X_q[:300].T @ (X_q[:300] * w[:300, None])
    torch.testing.assert_close(stats.M, half, rtol=1e-5, atol=1e-4)  # read between batches: whole
    stats.add(X_q[300:], w[300:], X_fp[300:])  # the lower blocks are stale again until read
    torch.testing.assert_close(stats.M, want, rtol=1e-5, atol=1e-4)
    assert torch.equal(stats.M, stats.M.T)
    torch.testing.assert_close(stats.hessian(), 2 * want / w.sum(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("project", [False, True], ids=["C", "projected"])
def test_two_folds_merged_are_the_whole(project):
    """absorb: the sums of two halves of the tokens are the sums of all of them (M blocked at K >= 3072 too)."""
    for K in (96, 3072):
        X_q, X_fp, w, Ws = _group(T=200, K=K)
        Ws = Ws if project else None
        whole = InputStatistics(weighted=True, cross=True, activation_stat=True, projections=Ws)
        whole.add(X_q, w, X_fp)
        first = InputStatistics(weighted=True, cross=True, activation_stat=True, projections=Ws)
        second = InputStatistics(weighted=True, cross=True, activation_stat=True, projections=Ws)
        first.add(X_q[:70], w[:70], X_fp[:70])
        second.add(X_q[70:], w[70:], X_fp[70:])
        first.absorb(second)
        assert second.M is None and first.tokens == 200
        torch.testing.assert_close(first.M, whole.M, rtol=1e-4, atol=1e-3)
        for mine, theirs in zip(first.P or [first.C], whole.P or [whole.C]):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(first.abs_sum, whole.abs_sum)
        assert float(first.S) == pytest.approx(float(whole.S), rel=1e-6)


def test_a_copy_is_independent_and_refused_after_a_factor():
    X_q, X_fp, w, _ = _group()
    stats = InputStatistics.from_tensors(X_q, w, X_fp)
    M, C = stats.M.clone(), stats.C.clone()
    copy = stats.copy()
    copy.exposure_factor(0.1)
    copy.gptq_factor(0.1, False)  # consumes the copy's M and C
    assert torch.equal(stats.M, M) and torch.equal(stats.C, C)
    with pytest.raises(TLQError, match="copy them first"):
        copy.copy()
    with pytest.raises(TLQError, match="merge them first"):
        stats.absorb(copy)
    with pytest.raises(TLQError, match="different kinds"):
        stats.absorb(InputStatistics.from_tensors(X_q, w))
