"""The damping chosen per group on held-out samples (tlq/calib/held_out_damping.py): its errors are the
held-out token errors of fold-wise solves, it picks more damping where tokens are few and less where they
are plenty, it merges the folds back, and the layer loop streams, records and applies it."""
import dataclasses

import pytest
import torch
from reference.blocks import decoder_layer
from torch import nn

from tlq.adapters import QWEN2_VL
from tlq.adapters.base import LinearGroup
from tlq.calib.config import METHODS, CalibConfig
from tlq.calib.group_inputs import stream_group
from tlq.calib.held_out_damping import choose_damping, held_out_samples
from tlq.calib.layer_solve import LayerInputs, calibrate_layer
from tlq.errors import TLQError
from tlq.quant.solvers import GroupData, SolverSettings, solve_gptq
from tlq.quant.statistics import InputStatistics
from tlq.schemes import get_scheme

K, N = 64, 48
W3 = get_scheme("w3a16").with_overrides(group_size=32)


def _problem(T, seed):
    """A linear [N, K] and a token source: correlated inputs with a decaying spectrum, skewed token
    weights, a float path a little off the exposed one."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) * torch.logspace(0, -2, K)[None, :]

    def draw(n):
        X = torch.randn(n, K, generator=g) @ mix.T
        return X, torch.rand(n, generator=g) ** 4 + 0.01, X + 0.05 * torch.randn(n, K, generator=g)

    layer = nn.Module()
    layer.proj = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        layer.proj.weight.copy_(torch.randn(N, K, generator=g))
    return layer, LinearGroup(("proj",), None, "mlp"), draw(T), draw


def _folds(tokens, half):
    X, w, X_fp = tokens
    return (InputStatistics.from_tensors(X[:half], w[:half], X_fp[:half]),
            InputStatistics.from_tensors(X[half:], w[half:], X_fp[half:]))


def _token_error(W, Q, X, X_fp, w):
    """sum_t w_t (||W x_fp - Q x||^2 - ||W x_fp - W x||^2) / sum w, in float64 from the tokens."""
    W, Q, X, X_fp, w = (t.double() for t in (W, Q, X, X_fp, w))
    Y = X_fp @ W.T
    return float((w * ((Y - X @ Q.T).square().sum(1) - (Y - X @ W.T).square().sum(1))).sum() / w.sum())


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.0])
def test_errors_are_held_out_token_errors_of_fold_solves(strength):
    layer, group, tokens, _ = _problem(200, seed=0)
    X, w, X_fp = tokens
    W = layer.proj.weight.detach()
    settings = SolverSettings(W3, torch.float32, damp=0.1, exposure_strength=strength)
    candidates = (0.01, 0.1, 1.0)
    fit, held = _folds(tokens, 120)
    _, errors = choose_damping(layer, group, GroupData(torch.empty(0), stats=fit, held=held), settings, candidates,
                               judge_rows=512, seed=0, solver="gptq")
    A, B = slice(0, 120), slice(120, None)
    for d, error in zip(candidates, errors):
        expected = 0.0
        for train, test in ((A, B), (B, A)):
            stats = InputStatistics.from_tensors(X[train], w[train], X_fp[train])
            Q = solve_gptq(W, GroupData(torch.empty(0), stats=stats), dataclasses.replace(settings, damp=d))
            expected += _token_error(W, Q.dequantize(), X[test], X_fp[test], w[test])
        assert error == pytest.approx(expected, rel=1e-3), d


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_few_tokens_choose_more_damping_plenty_choose_less(seed):
    """16 tokens for 64 inputs: the damped solve generalises better on fresh tokens, and is chosen; 4000
    tokens: the barely damped one does, and is chosen (each checked against 20,000 fresh tokens)."""
    settings = SolverSettings(W3, torch.float32, damp=0.1)
    candidates = (1e-4, 1.0)
    for T, expected in ((16, 1.0), (4000, 1e-4)):
        layer, group, tokens, draw = _problem(T, seed)
        fit, held = _folds(tokens, T // 2)
        chosen, _ = choose_damping(layer, group, GroupData(torch.empty(0), stats=fit, held=held), settings,
                                   candidates, judge_rows=512, seed=0, solver="gptq")
        W = layer.proj.weight.detach()
        fresh = draw(20000)
        truth = [_token_error(W, solve_gptq(W, GroupData(torch.empty(0), stats=InputStatistics.from_tensors(*tokens)),
                                            dataclasses.replace(settings, damp=d)).dequantize(),
                              fresh[0], fresh[2], fresh[1]) for d in candidates]
        assert candidates[truth.index(min(truth))] == expected, (T, truth)  # the construction holds
        assert chosen == expected, (T, truth)


def test_wide_linears_are_scored_on_judged_rows():
    """N > 2 judge_rows: errors estimated on r rows (times N / r) pick as every row does."""
    layer, group, tokens, _ = _problem(4000, seed=0)
    settings = SolverSettings(W3, torch.float32, damp=0.1)
    chosen = []
    for rows in (512, 8):
        fit, held = _folds(tokens, 2000)
        chosen.append(choose_damping(layer, group, GroupData(torch.empty(0), stats=fit, held=held), settings,
                                     (1e-4, 1.0), judge_rows=rows, seed=3, solver="gptq"))
    (d_all, e_all), (d_rows, e_rows) = chosen
    assert d_all == d_rows == 1e-4
    assert e_rows != e_all and e_rows == pytest.approx(e_all, rel=0.5)  # an estimate, not the same sum


def test_folds_are_merged_after_the_choice():
    layer, group, tokens, _ = _problem(200, seed=1)
    fit, held = _folds(tokens, 90)
    data = GroupData(torch.empty(0), stats=fit, held=held)
    choose_damping(layer, group, data, SolverSettings(W3, torch.float32), (0.01, 0.1), 512, 0, "gptq")
    whole = InputStatistics.from_tensors(*tokens)
    assert data.held is None and data.stats.tokens == 200
    torch.testing.assert_close(data.stats.M, whole.M, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(data.stats.C, whole.C, rtol=1e-5, atol=1e-4)
    assert float(data.stats.S) == pytest.approx(float(whole.S), rel=1e-6)


def test_a_fold_without_weight_keeps_the_default():
    layer, group, (X, w, X_fp), _ = _problem(100, seed=0)
    w = torch.cat([w[:50], torch.zeros(50)])
    fit, held = _folds((X, w, X_fp), 50)
    data = GroupData(torch.empty(0), stats=fit, held=held)
    d, errors = choose_damping(layer, group, data, SolverSettings(W3, torch.float32, damp=0.05), (0.01, 0.1),
                               512, 0, "gptq")
    assert (d, errors) == (0.05, []) and data.held is None and data.stats.tokens == 100


def test_held_out_samples_are_a_seeded_half():
    assert held_out_samples(1, 0) is None
    held = held_out_samples(9, 4)
    assert held == sorted(held) and len(held) == 4 and held == held_out_samples(9, 4)
    assert held_out_samples(9, 5) != held or held_out_samples(9, 6) != held


def _two_samples():
    """The outlier decoder layer and two samples of 48 and 30 tokens with their own position embeddings."""
    layer, first, kw_first = decoder_layer(seed=0, T=48)
    _, second, kw_second = decoder_layer(seed=1, T=30)
    return layer, [first, second], [kw_first, kw_second]


def test_streamed_folds_hold_the_held_samples_tokens():
    layer, samples, kwargs = _two_samples()
    common = {"weights": None, "keep": None, "act_quant": False, "batch_tokens": 8192, "search": None}
    plain = stream_group(layer, None, "mlp.gate_proj", samples, None, kwargs, "cpu", **common)
    split = stream_group(layer, None, "mlp.gate_proj", samples, None, kwargs, "cpu", held=[1], **common)
    assert (split.stats.tokens, split.held.tokens) == (48, 30)
    split.stats.absorb(split.held)
    torch.testing.assert_close(split.stats.M, plain.stats.M, rtol=1e-5, atol=1e-5)


def test_the_layer_records_and_applies_a_choice_per_group(tmp_path):
    layer, samples, kwargs = _two_samples()
    cfg = CalibConfig(model=tmp_path, out=tmp_path / "o", method=METHODS["tlq"], scheme=W3,
                      damp_candidates=(0.01, 0.1))
    record = {}
    weights = [{"attn": torch.ones(h.shape[1]), "mlp": torch.ones(h.shape[1])} for h in samples]
    calibrate_layer(layer, "l", LayerInputs(samples, samples, kwargs, weights), QWEN2_VL, cfg, torch.float32, 0,
                    record=record)
    assert set(record["damping"]) == {g.names[0] for g in QWEN2_VL.linear_groups}
    assert set(record["damping"].values()) <= {0.01, 0.1}


@pytest.mark.parametrize("scheme", ["w3a16", "w4a8"])
def test_each_group_is_solved_at_its_chosen_damping(scheme, tmp_path, monkeypatch):
    """Weight-only (scales judged in the loop) and W4A8 (each linear solved alone) both solve every linear of a
    group at the group's choice. (W4A8's input scales are searched before any group streams, at `damp`.)"""
    from tlq.calib import layer_solve
    from tlq.quant import solvers

    layer, samples, kwargs = _two_samples()
    cfg = CalibConfig(model=tmp_path, out=tmp_path / "o", method=METHODS["tlq"], scheme=get_scheme(scheme),
                      damp_candidates=(0.01, 0.1))
    chosen = {g.names[0]: 0.001 * (i + 2) for i, g in enumerate(QWEN2_VL.linear_groups)}

    groups = {}  # the streamed statistics of each group -> its choice

    def fake_choice(layer, group, data, settings, *args):
        groups[data.stats] = chosen[group.names[0]]
        data.stats.absorb(data.held)
        data.held = None
        return chosen[group.names[0]], []

    seen = {}
    real = solvers.SOLVERS["gptq"]

    def spy(W, data, settings):
        if data.stats in groups:
            seen.setdefault(data.stats, []).append(settings.damp)
        return real.solve(W, data, settings)

    monkeypatch.setattr(layer_solve, "choose_damping", fake_choice)
    monkeypatch.setitem(solvers.SOLVERS, "gptq", dataclasses.replace(real, solve=spy))
    weights = [{"attn": torch.ones(h.shape[1]), "mlp": torch.ones(h.shape[1])} for h in samples]
    calibrate_layer(layer, "l", LayerInputs(samples, samples, kwargs, weights), QWEN2_VL, cfg, torch.float32, 0)
    assert len(groups) == len(chosen) and set(seen) == set(groups)
    for stats, damps in seen.items():
        assert set(damps) == {groups[stats]}


def test_damp_candidates_are_checked(tmp_path):
    base = {"model": tmp_path, "out": tmp_path / "o", "scheme": W3}
    with pytest.raises(TLQError, match="positive"):
        CalibConfig(method=METHODS["tlq"], damp_candidates=(0.1, -1), **base)
    with pytest.raises(TLQError, match="GPTQ solver"):
        CalibConfig(method=METHODS["awq"], damp_candidates=(0.01, 0.1), **base)
    assert CalibConfig(method=METHODS["gptq"], **base).damp_candidates == ()
