"""TLQ's damping, chosen per linear group on calibration samples the solver did not see.

GPTQ damps its Hessian, H + lam I with lam = d * mean diag(H): a ridge that trades fit on the
calibration tokens for stability where H is poorly estimated. Token weights concentrate H on the
few tokens with large gradients, so how much damping a group needs depends on the model and on the
calibration draw: on the trained fixtures the best fixed d differs between models and between seeds
of one model by more than the gain it brings (docs/quality.md). So each group picks its d from
`candidates` by two-fold cross-validation over the samples:

  the samples are split into two seeded halves A and B (`held_out_samples`), streamed into two
  sets of statistics (tlq/calib/group_inputs.py), and for each candidate d

      err(d) = E_B(solve_{A,d}) + E_A(solve_{B,d})

  where solve_{F,d} is the group's solver on fold F's statistics at damping d (its exposure target
  formed on F as well), and E_F(Q) = sum_{t in F} w_t || W x_fp,t - Q x_t ||^2 / S_F - (the same for
  Q = W) is the token-weighted output error against the float path over fold F's tokens
  (tlq/calib/solved_scaling.py, OutputError; it does not depend on the damping it is factored at).

The d with the least err is kept (ties: the earlier candidate), the folds are merged, and the group
is solved on every token at d, by the path it takes anyway (TLQ's judged input scaling included).
Wide linears are scored on the judged rows of solved_scaling.JudgedRows (the same seeded draw), each
row sum times N / r: GPTQ's solution and the error are row-separable, so this is an unbiased estimate.

Cost per group: 2 x len(candidates) solves on half the tokens (of r rows for wide linears). Memory: the
two folds' statistics while the group streams (twice one set), then, while it chooses, both folds, the
held-out error's Gram factor and one fold's copy being solved: about two K x K more than a fixed damping
at the widest group (tlq/multirank/estimate.py counts it; everything stays on the calibration device).

On the validation split this did not beat TLQ's fixed damping (docs/quality.md), so it is off by default
(MethodSpec.damp_candidates, --damp-candidates).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from tlq.adapters import LinearGroup, get_submodule
from tlq.calib.solved_scaling import JudgedRows, OutputError, exposure_targets, take_rows
from tlq.quant.solvers import SOLVERS, GroupData, SolverSettings
from tlq.quant.statistics import InputStatistics


def held_out_samples(n_samples: int, seed: int) -> list[int] | None:
    """The held-out fold: a seeded half of the sample indices (sorted); None below two samples."""
    if n_samples < 2:
        return None
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))
    return sorted(order[: n_samples // 2].tolist())


def fold_error(Ws: dict[str, torch.Tensor], rows: dict[str, torch.Tensor | None], fit: InputStatistics,
               test: InputStatistics, settings: SolverSettings, damps: tuple[float, ...], solver: str) -> list[float]:
    """E_test(solve_{fit,d}) for each d of `damps` (module docstring), summed over the group's linears."""
    gram = test.damped_gram(max(damps))  # one factor for the group's linears; `test` is left as it is
    errors = {n: OutputError(W, test, max(damps), rows[n], gram=gram) for n, W in Ws.items()}
    del gram
    solve = SOLVERS[solver].solve
    out = []
    for d in damps:
        work = fit.copy()
        targets, solve_settings = exposure_targets(Ws, work, replace(settings, damp=d))
        data = GroupData(torch.empty(0), stats=work)
        total = 0.0
        for name, T in targets.items():
            T, share = take_rows(T, rows[name])
            total += share * errors[name](solve(T, data, solve_settings).dequantize())
        out.append(total)
        work.release()
    return out


def choose_damping(layer, group: LinearGroup, data: GroupData, settings: SolverSettings,
                   candidates: tuple[float, ...], judge_rows: int, seed: int, solver: str) -> tuple[float, list[float]]:
    """The candidate with the least held-out error (module docstring) and every candidate's error; the
    folds of `data` are merged into data.stats afterwards (data.held becomes None)."""
    held, fit = data.held, data.stats
    try:
        if not (float(fit.S) > 0 and float(held.S) > 0):  # a fold without token weight has nothing to say
            return settings.damp, []
        Ws = {n: get_submodule(layer, n).weight.detach().float() for n in group.names}
        rows = JudgedRows.draw({n: W.shape[0] for n, W in Ws.items()}, judge_rows, seed).judge
        on_b = fold_error(Ws, rows, fit, held, settings, candidates, solver)
        on_a = fold_error(Ws, rows, held, fit, settings, candidates, solver)
        errors = [b + a for b, a in zip(on_b, on_a)]
        best = min(range(len(candidates)), key=lambda i: (errors[i], i))
        return candidates[best], errors
    finally:
        fit.absorb(held)
        data.held = None
