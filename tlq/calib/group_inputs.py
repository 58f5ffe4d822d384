"""A linear group's calibration inputs, streamed into the solvers' statistics batch by batch.

Samples are taken in batches of consecutive samples holding at most `batch_tokens` tokens (at least
one sample each). For every batch the group's inputs are read on the calibration path (and on the
float path for corrected exposure) with a forward pre-hook, fake-quantized to int8 for w4a8,
reduced to the kept tokens of the token-level calibration set, and folded into
`InputStatistics` (tlq/quant/statistics.py). Memory is one batch of [tokens, K] fp32 inputs plus the
K x K statistics, whatever the number of calibration tokens. A run whose tokens fit one batch is
bit-identical to the all-at-once formulas.

The searches that need tokens rather than statistics (AWQ/MBQ clipping, the input-scale search and
its judge) see the samples `search_samples` picks: all of them when they hold at most
`search_tokens` tokens, else a seeded draw weighted by each sample's token-weight mass
(importance-aware) until that budget is filled. The budget is recorded in the manifest.
"""
from __future__ import annotations

import torch
from torch import nn

from tlq.calib.probes import collect_inputs
from tlq.quant.qparams import quantize_activations_int8
from tlq.quant.solvers import GroupData
from tlq.quant.statistics import InputStatistics


def token_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive sample indices, each batch with at most `budget` tokens (or one longer sample)."""
    batches, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(current)
    return batches


def search_samples(lengths: list[int], mass: list[float], budget: int, seed: int) -> list[int]:
    """Indices of the samples the token searches use (module docstring), in sample order."""
    if sum(lengths) <= budget:
        return list(range(len(lengths)))
    p = torch.tensor(mass, dtype=torch.float64).clamp(min=0) + 1e-12
    order = torch.multinomial(p, len(lengths), replacement=False, generator=torch.Generator().manual_seed(seed))
    chosen, used = [], 0
    for i in order.tolist():
        if chosen and used + lengths[i] > budget:
            continue
        chosen.append(i)
        used += lengths[i]
    return sorted(chosen)


def stream_group(calib_layer: nn.Module, fp_layer: nn.Module | None, name: str, calib: list[torch.Tensor],
                 fp: list[torch.Tensor] | None, kwargs: list[dict], device: str, *, weights: torch.Tensor | None,
                 keep: torch.Tensor | None, act_quant: bool, batch_tokens: int, search: list[int] | None,
                 activation_stat: bool = False, projections: list[torch.Tensor] | None = None,
                 held: list[int] | None = None) -> GroupData:
    """Statistics of module `name`'s inputs over every sample, plus the rows of the `search` samples.

    calib_layer / calib: where and on what the calibration-path inputs are read; fp_layer / fp: the
    float path (corrected exposure), else None. weights: [T] token weights over all samples, or None.
    keep: [T] bool mask of the kept tokens, or None for all. search: sample indices whose rows
    GroupData.X keeps (None: none needed). activation_stat: also sum w |x| (TLQ's in-loop scale search).
    projections: the group's float weights when the float-path moment is kept projected through them
    (tlq/quant/statistics.py, `projects_cross`), else None. held: sample indices whose tokens go to a
    second set of statistics, GroupData.held (the held-out fold of tlq/calib/held_out_damping.py), or None.
    """
    lengths = [h.shape[-2] for h in calib]
    starts = torch.tensor([0] + lengths).cumsum(0).tolist()
    stats = InputStatistics(weighted=weights is not None, cross=fp_layer is not None, activation_stat=activation_stat,
                            projections=projections)
    held_stats = None if not held else InputStatistics(
        weighted=weights is not None, cross=fp_layer is not None, activation_stat=activation_stat,
        projections=projections)
    held_index = torch.tensor(sorted(held or []), dtype=torch.long)
    wanted = set(search or [])
    rows, row_weights = [], []
    for batch in token_batches(lengths, batch_tokens):
        span = slice(starts[batch[0]], starts[batch[-1] + 1])
        X = collect_inputs(calib_layer, name, [calib[i] for i in batch], [kwargs[i] for i in batch], device)
        if act_quant:
            X = quantize_activations_int8(X)
        X_fp = None
        if fp_layer is not None:
            X_fp = collect_inputs(fp_layer, name, [fp[i] for i in batch], [kwargs[i] for i in batch], device)
        w = None if weights is None else weights[span]
        mask = None if keep is None else keep[span]
        owner = torch.repeat_interleave(torch.tensor(batch), torch.tensor([lengths[i] for i in batch]))
        if wanted:
            take = torch.isin(owner, torch.tensor(sorted(wanted)))
            take = take if mask is None else take & mask
            rows.append(X[take])
            row_weights.append(None if w is None else w[take])
        if mask is not None:
            X, X_fp = X[mask], None if X_fp is None else X_fp[mask]
            w, owner = None if w is None else w[mask], owner[mask]
        # inputs are gathered on the CPU; the statistics live where the solver runs
        if held_stats is None:
            stats.add(X.to(device), None if w is None else w.to(device), None if X_fp is None else X_fp.to(device))
        else:
            in_held = torch.isin(owner, held_index)
            for fold, take in ((stats, ~in_held), (held_stats, in_held)):
                if take.any():
                    fold.add(X[take].to(device), None if w is None else w[take].to(device),
                             None if X_fp is None else X_fp[take].to(device))
        del X, X_fp, w, mask  # before the next batch is gathered: one batch alive at a time
    if held_stats is not None and (stats.tokens == 0 or held_stats.tokens == 0):
        stats.absorb(held_stats)  # a fold lost every token (--drop-below, --max-tokens): nothing to hold out
        held_stats = None
    K = stats.M.shape[0] if stats.M is not None else 0
    X_search = torch.cat(rows).to(device) if rows else torch.empty(0, K, device=device)
    w_search = None if weights is None or not rows else torch.cat(row_weights).to(device)
    return GroupData(X_search, w_search, None, stats, held_stats)
