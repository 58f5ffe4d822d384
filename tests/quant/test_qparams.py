"""The symmetric grids (tlq.quant.qparams.SymmetricGrid) against the quantizers of the references,
and each method's grid as its registry entry declares it."""
from dataclasses import replace

import pytest
import torch
from reference import awq as ref_awq  # tests/reference (tests/ is on sys.path through its conftest)
from reference import gptq as ref_gptq

from tlq.calib.config import METHODS, CalibConfig
from tlq.quant.qparams import SymmetricGrid, fake_quantize, find_params, quantize_rtn
from tlq.schemes import get_scheme

BF16 = torch.bfloat16


def weights(n=64, k=256, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("group_size", [-1, 32])
def test_full_grid_uses_every_code_and_keeps_the_half_step_bound(group_size):
    W = weights()
    qw = quantize_rtn(W, 4, group_size, True, BF16, grid=SymmetricGrid.FULL)
    assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) == 15  # signed -8 .. 7
    g = 256 if group_size == -1 else group_size
    absmax = W.abs().reshape(64, -1, g).amax(-1)
    assert torch.all(qw.scales >= absmax / 7.5) and torch.all(qw.scales < absmax / 7.5 * (1 + 2**-7))
    err = (qw.dequantize() - W).abs().reshape(64, -1, g)
    assert torch.all(err <= qw.scales[..., None] / 2 * (1 + 1e-6))
    # a group's largest magnitude lands within half a step of the grid's end: code 15 if it is
    # positive (7.5 steps, clamped), code 1 or 0 if negative
    grouped, codes = W.reshape(-1, g), qw.codes.reshape(-1, g)
    top = grouped.abs().argmax(1)
    at_top = codes[torch.arange(len(top)), top]
    positive = grouped[torch.arange(len(top)), top] > 0
    assert torch.all(at_top[positive] == 15) and torch.all(at_top[~positive] <= 1)


def test_code_minus_8_is_used_where_weights_reach_minus_7_5_steps():
    """RTN reaches code 0 (-8) only on an exact tie at -absmax; a solver's error feedback (GPTQ) moves
    weights past the row's range, and the FULL grid then uses both ends, as the packed format allows."""
    W = torch.tensor([[-7.5, 7.5, 1.0, 0.0]])
    qw = quantize_rtn(W, 4, -1, True, torch.float32, grid=SymmetricGrid.FULL)
    assert qw.codes.tolist() == [[0, 15, 9, 8]] and float(qw.scales) == 1.0
    from tlq.quant.gptq import gptq_quantize  # per-channel, parameters fixed before the error feedback
    g = torch.Generator().manual_seed(6)
    X = torch.randn(512, 8, generator=g) @ torch.randn(8, 128, generator=g) + 0.1 * torch.randn(512, 128, generator=g)
    q = gptq_quantize(weights(32, 128, seed=6), 2 / 512 * X.T @ X, get_scheme("w4a8"), BF16)
    assert int(q.codes.min()) == 0 and int(q.codes.max()) == 15


def test_restricted_grid_never_uses_the_lowest_code_and_has_the_coarser_step():
    W = weights(seed=1)
    full = quantize_rtn(W, 4, -1, True, BF16, grid=SymmetricGrid.FULL)
    restricted = quantize_rtn(W, 4, -1, True, BF16, grid=SymmetricGrid.RESTRICTED)
    assert int(restricted.codes.min()) >= 1 and int(restricted.codes.max()) <= 15
    assert torch.all(restricted.scales >= W.abs().amax(1, keepdim=True) / 7)
    assert torch.all(full.scales < restricted.scales)
    assert (full.dequantize() - W).square().mean() < (restricted.dequantize() - W).square().mean()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [-1, 64])
def test_full_grid_is_the_ist_daslab_quantizer(bits, group_size):
    """IST-DASLab/gptq quant.py, Quantizer.find_params(sym=True) + quantize, in float32."""
    W = weights(seed=2)
    g = 256 if group_size == -1 else group_size
    rows = W.reshape(-1, g)
    scale, zero = ref_gptq.find_params(rows, bits, sym=True)
    expected = ref_gptq.quantize(rows, scale, zero, bits).reshape(W.shape)
    got = quantize_rtn(W, bits, group_size, True, torch.float32, grid=SymmetricGrid.FULL)
    assert torch.equal(got.dequantize(), expected)
    assert torch.equal(fake_quantize(W, bits, group_size, True, torch.float32, grid=SymmetricGrid.FULL), expected)
    assert torch.equal(got.scales.reshape(-1), scale.reshape(-1))


@pytest.mark.parametrize("group_size", [-1, 64])
def test_restricted_grid_is_the_llm_awq_quantizer(group_size):
    """llm-awq / AutoAWQ / MBQ pseudo_quantize_tensor(zero_point=False), in float32."""
    W = weights(seed=3)
    expected = ref_awq.pseudo_quantize_tensor(W, 4, zero_point=False, group_size=group_size)
    got = quantize_rtn(W, 4, group_size, True, torch.float32, grid=SymmetricGrid.RESTRICTED)
    assert torch.equal(got.dequantize(), expected)


def test_asymmetric_schemes_ignore_the_grid():
    W = weights(seed=4)
    for bits, group_size in ((3, 128), (2, 64)):
        a = quantize_rtn(W, bits, group_size, False, BF16, grid=SymmetricGrid.FULL)
        b = quantize_rtn(W, bits, group_size, False, BF16, grid=SymmetricGrid.RESTRICTED)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
        expected = ref_awq.pseudo_quantize_tensor(W, bits, zero_point=True, group_size=group_size)
        torch.testing.assert_close(quantize_rtn(W, bits, group_size, False, torch.float32).dequantize(), expected,
                                   rtol=0, atol=1e-6)
    _, z = find_params(W, 3, False, BF16, grid=SymmetricGrid.RESTRICTED)
    assert z is not None


EXPECTED_GRID = {"rtn": SymmetricGrid.FULL, "gptq": SymmetricGrid.FULL, "tlq": SymmetricGrid.FULL,
                 "smoothquant": SymmetricGrid.FULL, "awq": SymmetricGrid.RESTRICTED,
                 "mbq": SymmetricGrid.RESTRICTED}


@pytest.mark.parametrize("method", sorted(EXPECTED_GRID))
def test_each_method_quantizes_on_its_references_grid(method, tmp_path):
    spec = METHODS[method]
    assert spec.grid is EXPECTED_GRID[method]
    cfg = CalibConfig(model=tmp_path / "m", out=tmp_path / "o", method=spec, scheme=get_scheme("w4a8"))
    assert cfg.scheme.grid is spec.grid, "the run's scheme carries the method's grid to every solver"
    W = weights(seed=5)
    got = quantize_rtn(W, 4, -1, True, torch.float32, grid=cfg.scheme.grid).dequantize()
    if spec.grid is SymmetricGrid.RESTRICTED:
        expected = ref_awq.pseudo_quantize_tensor(W, 4, zero_point=False)
    else:
        expected = ref_gptq.quantize(W, *ref_gptq.find_params(W, 4, sym=True), 4)
    assert torch.equal(got, expected)


def test_the_grid_is_part_of_the_run_key(tmp_path):
    """A resumable work folder written on one grid is never continued on the other."""
    base = CalibConfig(model=tmp_path / "m", out=tmp_path / "o", method=METHODS["gptq"], scheme=get_scheme("w4a8"))
    other = CalibConfig(model=tmp_path / "m", out=tmp_path / "o", scheme=get_scheme("w4a8"),
                        method=replace(METHODS["gptq"], grid=SymmetricGrid.RESTRICTED))
    assert base.run_key() != other.run_key()
    assert base.run_key()["scheme"]["grid"] == "full"
