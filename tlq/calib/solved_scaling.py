"""TLQ's input scaling for weight-only schemes: chosen by the loss after the solver, on every token.

A group's input-channel scale s (X -> X / s folded into the op before it, W -> W s) changes only
where the quantization grid falls; the solver that follows (GPTQ) decides how much that helps.
So TLQ searches s inside the layer loop, at the group's turn, from the group's streamed statistics
M, C, S, a (tlq/quant/statistics.py) of its exposed inputs:

  1. proxy: over AWQ's grid s_alpha = a^alpha (normalised; tlq/quant/scale_search.py), minimise the
     activation-weighted RTN error  sum_k A_kk ||W_:k - RTN(W s)_:k / s_k||^2,  A = M / S.
     This is the expectation of the RTN error tr(E A E^T) when rounding errors of different
     columns are uncorrelated, at O(NK) per candidate instead of O(NK^2).
  2. judge: solve the group both ways, Q_1 = solver(W) and Q_s = solver(W s) / s (in the scaled
     coordinates the damped Hessian is D (H + lam I) D, D = diag(1/s), so one factorisation serves
     both: InputStatistics.scale_inputs_), and keep s only if the group's token-weighted output
     error against the float path is lower:
        E(Q) = sum_t w_t || W x_fp,t - Q x_t ||^2 / S
     computed exactly over every kept token from the statistics, relative to E(W) so that no large
     terms cancel:  E(Q) - E(W) = ||D L||^2 - lam ||D||^2 + 2 <D, W A - W C/S>,  D = Q - W,
     A + lam I = L L^T (the exposure factor). Without the float path C/S = A.
  3. fold: the winner's s goes into the group's previous op: a norm's weight, or the rows of a
     previous linear. That linear (v_proj before o_proj, up_proj before down_proj) is already
     quantized, so its per-row scales are divided by s (its codes stay; the new scales are rounded
     to the checkpoint's scale dtype, a relative change below 2^-8 of the row).

Rows. Given the group's statistics every quantity above is a sum over output rows, each row's term
depending on that row alone: GPTQ's updates and its group scales and zeros are per row (the Hessian
factor and act-order's permutation are shared), so are RTN, the exposure target and D's terms in
E(Q) - E(W). So a linear with N > 2r rows (r = CalibConfig.judge_rows, default 512) is judged on r of
its rows and scored by the proxy on 2r (the judge's r among them), drawn uniformly without
replacement by a generator seeded from the layer's seed and the group: each linear's row sum times
N / r (N / 2r) is an unbiased estimate of its sum over all N rows (the same weight each linear has in
the full sum), and plain and scaled are compared on the same rows, so the row-to-row spread they
share cancels in the difference. Only the winner is then solved in full; a linear with at most 2r
rows is judged on all of them and keeps its judged solution. Each linear's exposure target is formed
once for its solves, and the float-path moment C is then dropped, so the unscaled GPTQ factor can wait
in host memory while the rows are solved scaled without raising the group's peak. A group whose linears all have at most 2r rows is judged as in
step 2, both ways in full (the tiny and the trained quality fixtures: their checkpoints are unchanged).

The identity is always a candidate, so on the calibration tokens (and, for a subsampled group, the
judged rows) scaling never makes a solved group worse. The published AWQ / MBQ searches (scored by
RTN alone, before any group is quantized) and activation-quantized schemes (whose statistics do not
transform with s) use tlq/calib/input_scaling.py.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from tlq.adapters import LinearGroup, get_submodule
from tlq.calib.config import CalibConfig
from tlq.calib.input_scaling import can_fold, divide_output
from tlq.calib.timing import timed
from tlq.quant.qparams import QuantizedWeight, fake_quantize
from tlq.quant.scale_search import scale_candidates, weight_magnitude
from tlq.quant.solvers import SOLVERS, GroupData, SolverSettings
from tlq.quant.statistics import InputStatistics
from tlq.quant.weighted_gptq import exposure_target


@dataclass
class GroupSolution:
    """The solved linears of a group and the input scale they assume (None: unscaled)."""

    weights: dict[str, QuantizedWeight]
    scale: torch.Tensor | None
    error: float | None = None  # E(Q) - E(W) over the group's linears (when judged; estimated on judged rows)


@dataclass
class JudgedRows:
    """The output rows of each linear (by name) that steps 1 and 2 read: index tensors, None for every row."""

    judge: dict[str, torch.Tensor | None]
    proxy: dict[str, torch.Tensor | None]

    @classmethod
    def draw(cls, sizes: dict[str, int], r: int, seed: int) -> JudgedRows:
        """r rows for the judge and 2r for the proxy (the judge's among them) of each linear with more than
        2r rows (`sizes`: rows by name), a seeded uniform draw without replacement; None elsewhere."""
        generator = torch.Generator().manual_seed(seed)
        judge, proxy = {}, {}
        for name, n in sizes.items():
            if n <= 2 * r:
                judge[name] = proxy[name] = None
                continue
            order = torch.randperm(n, generator=generator)
            judge[name], proxy[name] = order[:r].sort().values, order[:2 * r].sort().values
        return cls(judge, proxy)

    @property
    def every_row(self) -> bool:
        return all(rows is None for rows in self.judge.values())


def take_rows(W: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """W's rows `rows` (all when None) and the weight N / r that makes their sum estimate W's."""
    if rows is None:
        return W, 1.0
    return W[rows.to(W.device)], W.shape[0] / len(rows)


def proxy_scale(Ws: list[torch.Tensor], stats: InputStatistics, cfg: CalibConfig, dtype: torch.dtype,
                rows: list[torch.Tensor | None] | None = None) -> torch.Tensor | None:
    """Step 1 of the module docstring: the grid's best s, None when the identity wins. `rows`: the rows
    of each W that score it (JudgedRows.proxy; None: every row)."""
    scheme, spec = cfg.scheme, cfg.method.scale_search
    energy = stats.input_energy()
    stat = stats.activation_statistic()
    w_mean = weight_magnitude(Ws, scheme.group_size).to(energy) if spec.duo_scaling else None
    scored = [take_rows(W, idx) for W, idx in zip(Ws, rows or [None] * len(Ws))]
    best, best_s = float("inf"), None
    for step, s in enumerate(scale_candidates(stat, cfg.n_grid, w_mean)):
        loss = 0.0
        for W, share in scored:
            Q = fake_quantize(W * s, scheme.bits, scheme.group_size, scheme.symmetric, dtype, grid=scheme.grid)
            loss += share * float(((W - Q / s).square() * energy).sum())
        if loss < best:
            best, best_s = loss, (None if step == 0 and w_mean is None else s)
    return best_s


class OutputError:
    """E(Q) - E(W) of the module docstring for one linear (W [N, K] float, unscaled coordinates) on its
    rows `rows` (None: every row; the Q it scores are those rows' solutions). `gram`: the group's
    stats.damped_gram(damp), shared by its linears; `stats` are then left as they are (C read in place)
    instead of giving up C to their cached exposure factor."""

    def __init__(self, W: torch.Tensor, stats: InputStatistics, damp: float, rows: torch.Tensor | None = None,
                 gram: tuple[torch.Tensor, torch.Tensor] | None = None):
        if gram is None:
            factor = stats.gram_factor(damp)  # before the GPTQ factor consumes M
            gram, cross = (factor.L, factor.lam), (factor.pulled if factor.has_cross else None)
        else:
            cross = stats.cross_product if stats.cross else None
        self.L, self.lam = gram
        W = W.to(self.L)
        self.W = take_rows(W, rows)[0]
        # W A - W C/S; zero without the float path (C/S = A). A projected moment is found by the whole W.
        self.pull = None if cross is None else (self.W @ stats.M) / stats.S - cross(W, rows)

    def __call__(self, Q: torch.Tensor) -> float:
        D = Q.to(self.W) - self.W
        error = (D @ self.L).square().sum() - self.lam * D.square().sum()
        if self.pull is not None:
            error = error + 2 * (D * self.pull).sum()
        return float(error)


def solve_group(layer: nn.Module, group: LinearGroup, data: GroupData, cfg: CalibConfig, dtype: torch.dtype,
                settings: SolverSettings, seed: int = 0) -> GroupSolution:
    """Steps 1-2 for one group of `layer` (its weights still float): the solved linears (on the CPU)
    and their scale. `seed` draws the rows of linears with more than 2 * cfg.judge_rows rows."""
    solve = SOLVERS[cfg.method.solver].solve
    Ws = {n: get_submodule(layer, n).weight.detach().float() for n in group.names}
    stats = data.statistics()
    rows = JudgedRows.draw({n: W.shape[0] for n, W in Ws.items()}, cfg.judge_rows, seed)
    with timed("scale search"):
        s = (proxy_scale(list(Ws.values()), stats, cfg, dtype, list(rows.proxy.values()))
             if can_fold(layer, group, stats.M.shape[0]) else None)
    if s is None:
        with timed("solve"):
            return GroupSolution({n: solve(W, data, settings).to("cpu") for n, W in Ws.items()}, None)
    if rows.every_row:
        return judge_in_full(Ws, s, data, settings, solve)
    return judge_on_rows(Ws, rows.judge, s, data, settings, solve)


def judge_in_full(Ws: dict[str, torch.Tensor], s: torch.Tensor, data: GroupData, settings: SolverSettings,
                  solve) -> GroupSolution:
    """Step 2 on every row: the group solved both ways in full, the better kept."""
    stats = data.statistics()
    with timed("scale search"):
        errors = {n: OutputError(W, stats, settings.damp) for n, W in Ws.items()}
    with timed("solve"):
        plain = {n: solve(W, data, settings) for n, W in Ws.items()}
    with timed("scale search"):
        plain_error = sum(errors[n](q.dequantize()) for n, q in plain.items())
        plain = {n: q.to("cpu") for n, q in plain.items()}
        stats.scale_inputs_(s, settings.damp, settings.act_order)
        scaled = {n: solve(W, data, settings) for n, W in Ws.items()}
        scaled_error = sum(errors[n](q.dequantize() / s.to(q.scales)) for n, q in scaled.items())
    if scaled_error < plain_error:
        return GroupSolution({n: q.to("cpu") for n, q in scaled.items()}, s, scaled_error)
    return GroupSolution(plain, None, plain_error)  # the identity wins (ties too)


def judge_on_rows(Ws: dict[str, torch.Tensor], rows: dict[str, torch.Tensor | None], s: torch.Tensor,
                  data: GroupData, settings: SolverSettings, solve) -> GroupSolution:
    """Step 2 on the judged rows (module docstring, Rows): both ways on the rows, each linear's error
    times N / r, then the winner solved in full (a linear judged on every row keeps its solution)."""
    stats = data.statistics()
    with timed("scale search"):
        errors = {n: OutputError(W, stats, settings.damp, rows[n]) for n, W in Ws.items()}
    with timed("solve"):
        targets, settings = exposure_targets(Ws, stats, settings)
    with timed("scale search"):
        judged = {n: take_rows(T, rows[n]) for n, T in targets.items()}
        plain = {n: solve(T, data, settings) for n, (T, _) in judged.items()}
        plain_error = sum(judged[n][1] * errors[n](q.dequantize()) for n, q in plain.items())
        plain = {n: q.to("cpu") for n, q in plain.items()}
        with stats.scaled_inputs(s, settings.damp, settings.act_order):  # the unscaled factor stays
            scaled = {n: solve(T, data, settings) for n, (T, _) in judged.items()}
        scaled_error = sum(judged[n][1] * errors[n](q.dequantize() / s.to(q.scales)) for n, q in scaled.items())
        del errors, judged
    keep = scaled_error < plain_error  # the identity wins ties
    if keep:
        stats.scale_inputs_(s, settings.damp, settings.act_order)  # the same factor the judged rows used
    solved = scaled if keep else plain
    with timed("solve"):
        weights = {n: (solved[n] if rows[n] is None else solve(T, data, settings)).to("cpu")
                   for n, T in targets.items()}
    return GroupSolution(weights, s if keep else None, scaled_error if keep else plain_error)


def exposure_targets(Ws: dict[str, torch.Tensor], stats: InputStatistics, settings: SolverSettings
                     ) -> tuple[dict[str, torch.Tensor], SolverSettings]:
    """Each linear's exposure-corrected target (tlq/quant/weighted_gptq.py), formed once for the three
    solves on it, and the settings that solve a target as it is (strength 0: the same codes as solving W
    with the correction). The float path's C is dropped after: one K x K less while the rows are solved."""
    if not (stats.cross and settings.exposure_strength > 0):
        return Ws, settings
    factor = stats.exposure_factor(settings.damp)
    targets = {n: exposure_target(W, factor, settings.exposure_strength) for n, W in Ws.items()}
    stats.drop_cross()
    return targets, replace(settings, exposure_strength=0.0)


def fold_into_previous(layer: nn.Module, layer_prefix: str, group: LinearGroup, s: torch.Tensor,
                       quantized: dict[str, QuantizedWeight], scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Step 3: X -> X / s in the group's previous op of `layer`; returns the changed float tensors
    (norm weight, linear bias) by full name. A quantized previous linear (in `quantized`, by full
    name) has its row scales divided by s and its layer weight set to the new dequantized values."""
    prev = get_submodule(layer, group.prev_op)
    full = f"{layer_prefix}.{group.prev_op}"
    rows_quantized = isinstance(prev, nn.Linear) and full in quantized
    if rows_quantized:
        qw = quantized[full]
        scales = (qw.scales / s.to(qw.scales)[:, None]).to(scale_dtype).float()
        quantized[full] = QuantizedWeight(qw.codes, scales, qw.zeros, qw.bits, qw.group_size, qw.g_idx)
        with torch.no_grad():
            prev.weight.copy_(quantized[full].dequantize(prev.weight.dtype))
    divide_output(prev, s, rows=not rows_quantized)
    # what the checkpoint then stores as float tensors: a norm's or a float linear's weight, a bias
    changed = {} if rows_quantized else {f"{full}.weight": prev.weight.detach().cpu().clone()}
    if getattr(prev, "bias", None) is not None:
        changed[f"{full}.bias"] = prev.bias.detach().cpu().clone()
    return changed
