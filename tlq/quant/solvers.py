"""The solver table: how one linear's weight becomes codes, given its group's calibration inputs.

Every entry has the same signature, `solve(W, data, settings) -> QuantizedWeight`, so the layer
loop (tlq/calib/layer_solve.py) never branches on a solver's name. A new solver is one module
in tlq/quant plus one row in SOLVERS; `MethodSpec.solver` is checked against this table.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tlq.quant.qparams import QuantizedWeight, quantize_rtn
from tlq.quant.scale_search import clip_weights, search_clip_ratios
from tlq.quant.statistics import InputStatistics
from tlq.quant.weighted_gptq import weighted_gptq_from_statistics
from tlq.schemes import QuantScheme


@dataclass
class GroupData:
    """Calibration inputs shared by the linears of one group (they read the same input).

    Attributes:
        X: [T, K] inputs for the searches that need tokens (clipping, the scale judge): all of them
            for small runs, else a bounded subsample (tlq/calib/layer_solve.py); may be empty when
            `stats` is given and nothing searches.
        w: [T] token weights of X's rows, or None for uniform ones.
        X_fp: [T, K] the FP path's inputs of X's rows when the method corrects exposure, else None.
        stats: the streamed statistics of every kept token (tlq/quant/statistics.py); None builds
            them from X, w, X_fp. While `held` is set, those of the tokens outside it.
        held: the statistics of a held-out fold of the samples (tlq/calib/held_out_damping.py), until
            they are merged into `stats`; None when nothing is held out.
    """

    X: torch.Tensor
    w: torch.Tensor | None = None
    X_fp: torch.Tensor | None = None
    stats: InputStatistics | None = None
    held: InputStatistics | None = None

    def statistics(self) -> InputStatistics:
        if self.stats is None:
            self.stats = InputStatistics.from_tensors(self.X, self.w, self.X_fp)
        return self.stats

    def hessian(self) -> torch.Tensor:
        """The weighted Hessian 2 X^T D X / sum(w) (a new tensor)."""
        return self.statistics().hessian()


@dataclass(frozen=True)
class SolverSettings:
    """The numerics and method options a solver reads.

    Attributes:
        scheme: bits, group size, symmetry and symmetric grid (tlq.schemes).
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
    return quantize_rtn(W, s.scheme.bits, s.scheme.group_size, s.scheme.symmetric, s.scale_dtype, grid=s.scheme.grid)


def solve_gptq(W: torch.Tensor, data: GroupData, s: SolverSettings) -> QuantizedWeight:
    """(Token-weighted) GPTQ, on the exposure-corrected target when FP inputs are given; the group's
    linears share one exposure factor and one Hessian factorisation."""
    return weighted_gptq_from_statistics(W, data.statistics(), s.scheme, s.scale_dtype, damp=s.damp,
                                         act_order=s.act_order, exposure_strength=s.exposure_strength)


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
