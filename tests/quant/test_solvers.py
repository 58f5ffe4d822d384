"""The solver table: one signature per entry, checked names, data needs derived from settings."""
import dataclasses

import pytest
import torch

from tlq.calib.config import METHODS, CalibConfig, MethodSpec
from tlq.errors import TLQError
from tlq.quant.gptq import gptq_quantize
from tlq.quant.qparams import quantize_rtn
from tlq.quant.solvers import SOLVERS, GroupData, Solver, SolverSettings
from tlq.quant.weighted_gptq import weighted_hessian
from tlq.schemes import get_scheme

BF16 = torch.bfloat16


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_rtn_half_step_bound_and_dtype_scales():
    W = torch.randn(16, 96, generator=gen(0))
    s = get_scheme("w3a16").with_overrides(group_size=32)
    qw = SOLVERS["rtn"].solve(W, GroupData(torch.empty(0, 96)), SolverSettings(s, BF16))
    step = qw.scales.repeat_interleave(32, dim=1)
    assert (qw.dequantize() - W).abs().le(step / 2 + 1e-6).all()
    assert torch.equal(qw.scales, qw.scales.to(BF16).float())


def test_every_solver_has_the_same_signature_and_quantizes():
    W, X = torch.randn(24, 64, generator=gen(1)), torch.randn(200, 64, generator=gen(2))
    settings = SolverSettings(get_scheme("w4a16").with_overrides(group_size=32), BF16)
    for name, solver in SOLVERS.items():
        qw = solver.solve(W, GroupData(X, torch.rand(200, generator=gen(3)) + 0.1), settings)
        assert qw.shape == (24, 64) and qw.bits == 4, name


def test_gptq_beats_rtn_on_its_inputs_and_shares_one_factorisation():
    W, X = torch.randn(32, 64, generator=gen(4)), torch.randn(300, 64, generator=gen(5)) * torch.linspace(0.1, 3, 64)
    settings = SolverSettings(get_scheme("w3a16").with_overrides(group_size=32), BF16)
    assert torch.equal(GroupData(X).hessian(), weighted_hessian(X))
    data = GroupData(X)
    err = {n: float((X @ (W - s.solve(W, data, settings).dequantize()).T).square().mean()) for n, s in SOLVERS.items()}
    assert err["gptq"] < err["rtn"]
    factor = data.stats.gptq_factor(settings.damp, settings.act_order)
    SOLVERS["gptq"].solve(W * 2, data, settings)  # a second linear of the group: same factor, no new one
    assert data.stats.gptq_factor(settings.damp, settings.act_order) is factor and len(data.stats._gptq) == 1
    ref = gptq_quantize(W, weighted_hessian(X), settings.scheme, BF16, damp=settings.damp)
    assert torch.equal(SOLVERS["gptq"].solve(W, GroupData(X), settings).codes, ref.codes)


def test_unknown_solver_is_refused_by_the_config(tmp_path):
    spec = dataclasses.replace(METHODS["gptq"], solver="gtpq")
    with pytest.raises(TLQError, match="unknown solver 'gtpq'.*rtn"):
        CalibConfig(model=tmp_path, out=tmp_path / "o", method=spec, scheme=get_scheme("w4a16"))


def test_a_new_solver_is_one_table_row(tmp_path, monkeypatch):
    def solve_plain_rtn(W, data, s):
        return quantize_rtn(W, s.scheme.bits, s.scheme.group_size, s.scheme.symmetric, s.scale_dtype)

    monkeypatch.setitem(SOLVERS, "mine", Solver(solve_plain_rtn, needs_data=True))
    spec = MethodSpec("m", "test", solver="mine")
    CalibConfig(model=tmp_path, out=tmp_path / "o", method=spec, scheme=get_scheme("w4a16"))
    assert spec.needs_data


@pytest.mark.parametrize("name,needs", [("rtn", False), ("gptq", True), ("awq", True), ("smoothquant", True),
                                        ("mbq", True), ("tlq", True)])
def test_needs_data_follows_the_settings_not_the_name(name, needs):
    assert METHODS[name].needs_data is needs
    renamed = dataclasses.replace(METHODS[name], name="renamed")
    assert renamed.needs_data is needs
    # RTN with AWQ clipping reads data even though its solver does not
    assert dataclasses.replace(METHODS["rtn"], clip_search=True).needs_data
