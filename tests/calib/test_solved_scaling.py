"""TLQ's in-loop input scaling (tlq/calib/solved_scaling.py): the error the judge reads is the error on
the tokens, the scaled solve is the scaled problem, the identity never loses, and folding into an
already-quantized linear keeps what the checkpoint stores equal to what the layer computes."""
import copy
import dataclasses

import pytest
import torch
from reference.blocks import decoder_layer

from tlq.adapters import QWEN2_VL, get_submodule
from tlq.calib import solved_scaling
from tlq.calib.config import METHODS, CalibConfig
from tlq.calib.input_scaling import scales_in_loop
from tlq.calib.layer_solve import LayerInputs, calibrate_layer
from tlq.calib.probes import collect_inputs
from tlq.calib.solved_scaling import JudgedRows, OutputError, fold_into_previous, proxy_scale, solve_group
from tlq.errors import TLQError
from tlq.quant.gptq import HessianFactor, gptq_core
from tlq.quant.qparams import quantize_rtn
from tlq.quant.solvers import GroupData, SolverSettings, solve_gptq
from tlq.quant.statistics import InputStatistics
from tlq.quant.weighted_gptq import exposure_target, weighted_gptq_from_statistics
from tlq.schemes import get_scheme

W3 = get_scheme("w3a16").with_overrides(group_size=32)


def _cfg(tmp_path, scheme=W3, method="tlq"):
    return CalibConfig(model=tmp_path, out=tmp_path / "o", method=METHODS[method], scheme=scheme)


def _token_error(W, Q, X, X_fp, w):
    """sum_t w_t (||W x_fp - Q x||^2 - ||W x_fp - W x||^2) / sum w, in float64 from the tokens."""
    W, Q, X, X_fp, w = (t.double() for t in (W, Q, X, X_fp, w))
    Y = X_fp @ W.T
    return float((w * ((Y - X @ Q.T).square().sum(1) - (Y - X @ W.T).square().sum(1))).sum() / w.sum())


@pytest.mark.parametrize("cross", [True, False], ids=["fp-path", "no-fp-path"])
def test_output_error_is_the_error_on_the_tokens(cross):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 24, generator=g)
    X_fp = X + 0.1 * torch.randn(300, 24, generator=g) if cross else X
    w = torch.rand(300, generator=g) + 0.1
    W = torch.randn(8, 24, generator=g)
    Q = W + 0.05 * torch.randn(8, 24, generator=g)
    stats = InputStatistics.from_tensors(X, w, X_fp if cross else None)
    got = OutputError(W, stats, 0.01)(Q)
    assert got == pytest.approx(_token_error(W, Q, X, X_fp, w), rel=1e-4)


def test_scaled_solve_is_the_scaled_problem():
    """After scale_inputs_(s), GPTQ solves X/s, W s with the damping scaled alike: same as building that
    problem's factor from scratch."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(400, 64, generator=g) * torch.linspace(0.2, 3, 64)
    W = torch.randn(16, 64, generator=g)
    s = torch.rand(64, generator=g) + 0.5
    stats = InputStatistics.from_tensors(X)
    stats.scale_inputs_(s, 0.01, False)
    got = weighted_gptq_from_statistics(W, stats, W3, torch.float32, damp=0.01)
    H = 2 * X.T @ X / 400
    lam = 0.01 * torch.diag(H).mean()
    D = torch.diag(1 / s)
    H_scaled = D @ (H + lam * torch.eye(64)) @ D
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H_scaled)), upper=True)
    want, _ = gptq_core(W * s, None, W3, torch.float32,
                        factor=HessianFactor(U, torch.arange(64), torch.zeros(64, dtype=torch.bool)))
    assert (got.codes == want.codes).float().mean() > 0.99
    torch.testing.assert_close(got.dequantize(), want.dequantize(), rtol=0, atol=2 * float(want.scales.max()))


@pytest.mark.parametrize("outliers", [True, False], ids=["outlier-channels", "plain"])
def test_the_judged_scale_never_loses_on_the_tokens(outliers, tmp_path):
    layer, hidden, kw = decoder_layer(seed=0 if outliers else 1, T=96)
    if not outliers:
        layer.input_layernorm.weight.uniform_(0.9, 1.1)
        layer.post_attention_layernorm.weight.uniform_(0.9, 1.1)
    cfg = _cfg(tmp_path)
    settings = SolverSettings(W3, torch.float32, damp=cfg.damp, exposure_strength=cfg.exposure_strength)
    kept = []
    for group in QWEN2_VL.linear_groups:
        X = collect_inputs(layer, group.names[0], [hidden], [kw], "cpu")
        w = torch.rand(X.shape[0], generator=torch.Generator().manual_seed(2)) + 0.2
        solution = solve_group(layer, group, GroupData(X[:0], w, None, InputStatistics.from_tensors(X, w, X, activation_stat=True)),
                               cfg, torch.float32, settings)
        plain = solve_group(layer, group, GroupData(X[:0], w, None, InputStatistics.from_tensors(X, w, X, activation_stat=True)),
                            dataclasses.replace(cfg, n_grid=1), torch.float32, settings)
        assert plain.scale is None  # a one-point grid is the identity alone
        scale = torch.ones(X.shape[1]) if solution.scale is None else solution.scale
        err = sum(_token_error(get_submodule(layer, n).weight, q.dequantize() / scale, X, X, w)
                  for n, q in solution.weights.items())
        err_plain = sum(_token_error(get_submodule(layer, n).weight, q.dequantize(), X, X, w)
                        for n, q in plain.weights.items())
        assert err <= err_plain * (1 + 1e-6), group.names
        if solution.scale is not None:
            kept.append(group.names[0])
            assert solution.error == pytest.approx(err, rel=1e-3)
    if outliers:  # the outlier channels sit in the two norms' outputs
        assert {"self_attn.q_proj", "mlp.gate_proj"} <= set(kept)


def test_folding_into_a_quantized_linear_divides_its_rows(tmp_path):
    layer, hidden, kw = decoder_layer(seed=3)
    up = layer.mlp.up_proj
    qw = quantize_rtn(up.weight.float(), 3, 32, True, torch.bfloat16)
    with torch.no_grad():
        up.weight.copy_(qw.dequantize())
    quantized = {"l.mlp.up_proj": qw}
    before = collect_inputs(layer, "mlp.down_proj", [hidden], [kw], "cpu")
    s = torch.rand(up.weight.shape[0], generator=torch.Generator().manual_seed(4)) * 3 + 0.2
    group = next(g for g in QWEN2_VL.linear_groups if g.names == ("mlp.down_proj",))
    changed = fold_into_previous(layer, "l", group, s, quantized, torch.bfloat16)
    after = collect_inputs(layer, "mlp.down_proj", [hidden], [kw], "cpu")
    assert changed == {}  # the checkpoint's up_proj is the rescaled quantized one; no float tensor changes
    want = before / s  # up to the bf16 rounding of the new scales: per channel, relative 2^-8 at most
    assert float(((after - want).norm(dim=0) / want.norm(dim=0)).max()) < 2**-7
    assert torch.equal(quantized["l.mlp.up_proj"].dequantize(), up.weight)
    assert torch.equal(quantized["l.mlp.up_proj"].codes, qw.codes)


@pytest.mark.parametrize("prev", ["input_layernorm", "post_attention_layernorm"])
def test_folding_into_a_norm_preserves_the_float_function(prev, tmp_path):
    """fp32: s in the norm and W s in the group compute the same layer to a relative error below 1e-5."""
    layer, hidden, kw = decoder_layer(seed=5)
    before = layer(hidden, **kw)
    group = next(g for g in QWEN2_VL.linear_groups if g.prev_op == prev)
    s = torch.rand(64, generator=torch.Generator().manual_seed(6)) * 4 + 0.1
    changed = fold_into_previous(layer, "l", group, s, {}, torch.float32)
    with torch.no_grad():
        for n in group.names:
            get_submodule(layer, n).weight.mul_(s[None, :])
    assert set(changed) == {f"l.{prev}.weight"}
    assert float((layer(hidden, **kw) - before).norm() / before.norm()) < 1e-5


def test_calibrated_layer_is_what_the_checkpoint_stores(tmp_path):
    """Every fold lands in the quantized weights or the float overrides: the layer in memory (what the
    next layer calibrates on) equals the stored tensors, and the layer still approximates the float one."""
    layer, hidden, kw = decoder_layer(seed=0, T=96)
    float_layer = copy.deepcopy(layer)
    cfg = _cfg(tmp_path)
    assert scales_in_loop(cfg)
    weights = [{"attn": torch.ones(96), "mlp": torch.ones(96)}]
    quantized, overrides, _ = calibrate_layer(layer, "l", LayerInputs([hidden], [hidden], [kw], weights), QWEN2_VL,
                                              cfg, torch.float32, 0)
    for name, qw in quantized.items():
        assert torch.equal(qw.dequantize(), get_submodule(layer, name.removeprefix("l.")).weight), name
    for name, value in overrides.items():
        module, attr = name.removeprefix("l.").rsplit(".", 1)
        assert torch.equal(value, getattr(get_submodule(layer, module), attr)), name
    assert any(n.endswith("layernorm.weight") for n in overrides), "the outlier layer keeps some scaling"
    y, y_fp = layer(hidden, **kw), float_layer(hidden, **kw)
    assert float((y - y_fp).norm() / y_fp.norm()) < 0.2


def test_only_tlq_weight_only_scales_in_the_loop(tmp_path):
    assert scales_in_loop(_cfg(tmp_path))
    assert not scales_in_loop(_cfg(tmp_path, scheme=get_scheme("w4a8")))
    for method in ("awq", "mbq", "gptq", "smoothquant"):
        assert not scales_in_loop(_cfg(tmp_path, method=method))


# Row-subsampled judge (module docstring, Rows): a linear with more than 2 * judge_rows rows is judged on
# judge_rows seeded rows, then only the winner is solved in full.

def _outlier_group(first):
    """The outlier layer, its group whose first linear is `first`, and a factory of fresh GroupData (the
    statistics are consumed by a solve) with a float path that differs from the exposed one."""
    layer, hidden, kw = decoder_layer(seed=0, T=96)
    group = next(g for g in QWEN2_VL.linear_groups if g.names[0] == first)
    X = collect_inputs(layer, first, [hidden], [kw], "cpu")
    g = torch.Generator().manual_seed(2)
    w = torch.rand(X.shape[0], generator=g) + 0.2
    X_fp = X + 0.05 * X.std() * torch.randn(X.shape, generator=g)
    return layer, group, lambda: GroupData(X[:0], w, None, InputStatistics.from_tensors(X, w, X_fp, activation_stat=True))


def _settings(cfg, act_order=False):
    return SolverSettings(cfg.scheme, torch.float32, damp=cfg.damp, act_order=act_order,
                          exposure_strength=cfg.exposure_strength)


def _full_judge(layer, group, data, settings, s):
    """Both ways in full, straight from the solver: ({name: plain}, {name: scaled}, E plain, E scaled)."""
    Ws = {n: get_submodule(layer, n).weight.detach().float() for n in group.names}
    plain_data, scaled_data = data(), data()
    errors = {n: OutputError(W, plain_data.stats, settings.damp) for n, W in Ws.items()}
    plain = {n: solve_gptq(W, plain_data, settings) for n, W in Ws.items()}
    scaled_data.stats.gram_factor(settings.damp)
    scaled_data.stats.scale_inputs_(s, settings.damp, settings.act_order)
    scaled = {n: solve_gptq(W, scaled_data, settings) for n, W in Ws.items()}
    return (plain, scaled, sum(errors[n](q.dequantize()) for n, q in plain.items()),
            sum(errors[n](q.dequantize() / s) for n, q in scaled.items()))


def _random_scale(K, seed=7):
    """An input scale with no reason behind it: channels up to e^+-2 apart."""
    return torch.exp(2 * torch.randn(K, generator=torch.Generator().manual_seed(seed)))


def _assert_same(got, want):
    for n in want:
        assert torch.equal(got[n].codes, want[n].codes), n
        assert torch.equal(got[n].scales, want[n].scales), n
        assert (got[n].g_idx is None) == (want[n].g_idx is None), n
        if want[n].g_idx is not None:
            assert torch.equal(got[n].g_idx, want[n].g_idx), n


@pytest.mark.parametrize("case", ["helps", "hurts"])
@pytest.mark.parametrize("first", ["self_attn.q_proj", "mlp.gate_proj"])
def test_groups_of_at_most_2r_rows_are_judged_in_full(first, case, tmp_path, monkeypatch):
    """N <= 2r for every linear (gate/up have 96 rows, r = 48): the checkpoint of the full judge, bit for bit."""
    layer, group, data = _outlier_group(first)
    cfg = dataclasses.replace(_cfg(tmp_path), judge_rows=48)
    settings = _settings(cfg)
    if case == "hurts":
        K = get_submodule(layer, group.names[0]).weight.shape[1]
        monkeypatch.setattr(solved_scaling, "proxy_scale", lambda *args: _random_scale(K))
    got = solve_group(layer, group, data(), cfg, torch.float32, settings, seed=5)
    s = solved_scaling.proxy_scale([get_submodule(layer, n).weight.detach().float() for n in group.names],
                                   data().stats, cfg, torch.float32)
    plain, scaled, e_plain, e_scaled = _full_judge(layer, group, data, settings, s)
    assert (e_scaled < e_plain) == (case == "helps")
    if case == "helps":
        assert torch.equal(got.scale, s)
    else:
        assert got.scale is None
    _assert_same(got.weights, scaled if case == "helps" else plain)
    assert got.error == min(e_scaled, e_plain)


@pytest.mark.parametrize("case", ["helps", "hurts"])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize(("first", "r"), [("self_attn.q_proj", 8), ("self_attn.q_proj", 16), ("mlp.gate_proj", 8)],
                         ids=["qkv-all-on-rows", "qkv-kv-whole", "gate-up"])
def test_row_judge_decides_as_the_full_judge_and_solves_the_winner_in_full(first, r, act_order, case, tmp_path,
                                                                           monkeypatch):
    """Outlier input channels: the proxy's s helps (by 12% or more); a random s hurts (by 50x). On r of
    each linear's rows (q/k/v: 64/32/32 rows, gate/up 96; with r = 16 k and v are judged whole) the judge
    keeps what the full judge keeps, and the winner is then solved on every row: equal to solving the
    group directly with the chosen s (act-order too)."""
    layer, group, data = _outlier_group(first)
    cfg = dataclasses.replace(_cfg(tmp_path), judge_rows=r)
    settings = _settings(cfg, act_order)
    K = get_submodule(layer, group.names[0]).weight.shape[1]
    if case == "hurts":
        monkeypatch.setattr(solved_scaling, "proxy_scale", lambda *args: _random_scale(K))
    full = solve_group(layer, group, data(), dataclasses.replace(cfg, judge_rows=10**6), torch.float32, settings)
    s = solved_scaling.proxy_scale([get_submodule(layer, n).weight.detach().float() for n in group.names],
                                   data().stats, cfg, torch.float32)
    _, _, e_plain, e_scaled = _full_judge(layer, group, data, settings, s)
    assert (e_scaled < 0.9 * e_plain) if case == "helps" else (e_scaled > 1.5 * e_plain)  # clearly
    assert (full.scale is not None) == (case == "helps")
    got = solve_group(layer, group, data(), cfg, torch.float32, settings, seed=3)
    assert (got.scale is not None) == (full.scale is not None)
    for n in group.names:
        assert got.weights[n].shape == tuple(get_submodule(layer, n).weight.shape)
    # the chosen s (the proxy on 2r rows may pick another grid point than on all rows), solved directly
    direct = data()
    direct.stats.gram_factor(settings.damp)
    if got.scale is not None:
        direct.stats.scale_inputs_(got.scale, settings.damp, act_order)
    _assert_same(got.weights, {n: solve_gptq(get_submodule(layer, n).weight.detach().float(), direct, settings)
                               for n in group.names})


@pytest.mark.parametrize("first", ["self_attn.q_proj", "mlp.gate_proj"])
def test_row_judge_error_estimates_the_full_error(first, tmp_path):
    """The judged rows' error times N / r estimates the group's error over all rows: each seed's within
    25%, the mean over seeds within 5% (unbiased; without the N / r weights it would be 4-12x too small)."""
    layer, group, data = _outlier_group(first)
    cfg = dataclasses.replace(_cfg(tmp_path), judge_rows=8)
    settings = _settings(cfg)
    s = proxy_scale([get_submodule(layer, n).weight.detach().float() for n in group.names], data().stats, cfg,
                    torch.float32)
    *_, e_scaled = _full_judge(layer, group, data, settings, s)
    estimates = []
    for seed in range(16):
        got = solve_group(layer, group, data(), cfg, torch.float32, settings, seed=seed)
        assert got.scale is not None
        estimates.append(got.error)
    assert max(abs(e / e_scaled - 1) for e in estimates) < 0.25
    assert sum(estimates) / len(estimates) == pytest.approx(e_scaled, rel=0.05)
    assert len({round(e, 6) for e in estimates}) > 8  # the seeds draw different rows


def test_judged_rows_are_a_seeded_subsample_only_above_2r():
    rows = JudgedRows.draw({"q": 64, "k": 32, "gate": 200}, 16, seed=4)
    assert rows.judge["k"] is None and rows.proxy["k"] is None  # 32 <= 2r: every row
    for n, size in (("q", 64), ("gate", 200)):
        judge, proxy = rows.judge[n], rows.proxy[n]
        assert len(judge) == 16 and len(proxy) == 32 and len(set(proxy.tolist())) == 32
        assert set(judge.tolist()) <= set(proxy.tolist()) and int(proxy.max()) < size
    again = JudgedRows.draw({"q": 64, "k": 32, "gate": 200}, 16, seed=4)
    other = JudgedRows.draw({"q": 64, "k": 32, "gate": 200}, 16, seed=5)
    assert torch.equal(again.judge["gate"], rows.judge["gate"])
    assert not torch.equal(other.judge["gate"], rows.judge["gate"])
    assert JudgedRows.draw({"q": 64, "k": 32}, 32, seed=4).every_row


def test_scaled_inputs_restores_the_unscaled_factor():
    g = torch.Generator().manual_seed(8)
    X = torch.randn(200, 32, generator=g)
    stats = InputStatistics.from_tensors(X)
    U = stats.gptq_factor(0.01, True).U.clone()
    s = torch.rand(32, generator=g) + 0.5
    with stats.scaled_inputs(s, 0.01, True):
        inside = stats.gptq_factor(0.01, True).U.clone()
        assert stats.input_scale is s
    assert torch.equal(stats.gptq_factor(0.01, True).U, U) and stats.input_scale is None
    stats.scale_inputs_(s, 0.01, True)
    assert torch.equal(stats.gptq_factor(0.01, True).U, inside)


def test_judge_rows_is_checked_and_part_of_the_run_key(tmp_path):
    with pytest.raises(TLQError, match="--judge-rows must be at least 1"):
        dataclasses.replace(_cfg(tmp_path), judge_rows=0)
    assert _cfg(tmp_path).run_key() != dataclasses.replace(_cfg(tmp_path), judge_rows=64).run_key()


def test_no_exposure_target_after_the_float_path_moment_is_dropped():
    g = torch.Generator().manual_seed(9)
    X = torch.randn(100, 16, generator=g)
    stats = InputStatistics.from_tensors(X, None, X + 0.1)
    factor = stats.exposure_factor(0.01)
    exposure_target(torch.randn(4, 16, generator=g), factor)
    stats.drop_cross()
    with pytest.raises(TLQError, match="dropped"):
        exposure_target(torch.randn(4, 16, generator=g), factor)
