"""The solver table: how one linear's weight becomes codes, given its group's calibration inputs.

Every entry has the same signature, `solve(W, data, settings) -> QuantizedWeight`, so the layer
loop (tlq/calib/layer_solve.py) never branches on a solver's name. A new solver is one module
in tlq/quant plus one row in SOLVERS; `MethodSpec.solver` is checked against this table.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tlq.quant.qparams import QuantizedWeight, quantize_rtn
from tlq.quant.scale_search import clip_weights, search_clip_ratios
from tlq.quant.weighted_gptq import weighted_gptq_quantize, weighted_hessian
from tlq.schemes import QuantScheme


@dataclass
class GroupData:
    """Calibration inputs shared by the linears of one group (they read the same input).

    Attributes:
        X: [T, K] inputs the solver calibrates on (FP or exposed path, per the method).
        w: [T] token weights, or None for uniform ones.
        X_fp: [T, K] the FP path's inputs when the method corrects exposure, else None.
    """

    X: torch.Tensor
    w: torch.Tensor | None = None
    X_fp: torch.Tensor | None = None
    _hessian: torch.Tensor | None = field(default=None, repr=False)

    def hessian(self) -> torch.Tensor:
        """Weighted Hessian of X, computed once and shared by the group's linears."""
        if self._hessian is None:
            self._hessian = weighted_hessian(self.X, self.w)
        return self._hessian


@dataclass(frozen=True)
class SolverSettings:
    """The numerics and method options a solver reads.

    Attributes:
        scheme: bits, group size, symmetry (tlq.schemes).
        scale_dtype: dtype the checkpoint stores scales in (the model's).
        damp: GPTQ damping (fraction of the mean Hessian diagonal), also the exposure ridge.
        act_order: GPTQ act-order.
        exposure_strength: share of the corrected-exposure shift applied (0..1).
        clip_search: AWQ weight clipping before rounding (rtn).
        n_grid: grid points of the clipping search.
    """

    scheme: QuantScheme
    scale_dtype: torch.dtype
    damp: float = 0.01
    act_order: bool = False
    exposure_strength: float = 1.0
    clip_search: bool = False
    n_grid: int = 20


def solve_rtn(W: torch.Tensor, data: GroupData, s: SolverSettings) -> QuantizedWeight:
    """Round-to-nearest, optionally after AWQ's (token-weighted) clipping search and clamp."""
    if s.clip_search:
        ratio = search_clip_ratios(W, data.X, s.scheme, s.scale_dtype, w=data.w, n_grid=s.n_grid)
        W = clip_weights(W, ratio, s.scheme.group_size)
    return quantize_rtn(W, s.scheme.bits, s.scheme.group_size, s.scheme.symmetric, s.scale_dtype)


def solve_gptq(W: torch.Tensor, data: GroupData, s: SolverSettings) -> QuantizedWeight:
    """(Token-weighted) GPTQ, on the exposure-corrected target when FP inputs are given."""
    return weighted_gptq_quantize(W, data.X, s.scheme, s.scale_dtype, w=data.w, X_fp=data.X_fp, damp=s.damp,
                                  H=data.hessian(), act_order=s.act_order, exposure_strength=s.exposure_strength)


@dataclass(frozen=True)
class Solver:
    """One row of the table.

    Attributes:
        solve: (W [N, K] float32, GroupData, SolverSettings) -> QuantizedWeight.
        needs_data: whether it reads calibration inputs at all (without clipping search).
    """

    solve: Callable[[torch.Tensor, GroupData, SolverSettings], QuantizedWeight]
    needs_data: bool


SOLVERS: dict[str, Solver] = {
    "rtn": Solver(solve_rtn, needs_data=False),
    "gptq": Solver(solve_gptq, needs_data=True),
}
