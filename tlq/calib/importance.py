r"""Token importance: the one place where gradients become calibration weights.

Gradient pass (tlq/calib/gradient_pass.py): one FP forward and backward with the SFT loss L
(mean cross-entropy over answer tokens). For decoder layer l and every gradient source b (the
attention and MLP outputs, and each quantized linear's own output) with output Y^{l,b} in
R^{T x C}, two raw statistics of token t are kept:

    abs     a_t = (1/C) * sum_c | dL / dY^{l,b}_{t,c} |          (MBQ)
    square  a_t = (1/C) * sum_c ( dL / dY^{l,b}_{t,c} )^2       (Fisher / Taylor, VLMQ's G^2)

The backward pass never holds more than one layer's graph: layers are recomputed one at a
time from the last to the first from their stored inputs.

Integration (`integrate`), per layer l and source b, over all calibration tokens, with
M(t) the modality of token t (prompt text, vision, answer) and NZ_M the tokens of M that
received gradient (a_t > 0):

    fence       Q1_M, Q3_M = quartiles of {a_t : t in NZ_M},  I_M = Q3_M - Q1_M   (per modality)
    clip        c_t = clip(a_t, max(0, Q1_M - k I_M), Q3_M + k I_M)  for t in NZ_M;  c_t = 0 else
    prior       p_M = mean_{t in M} c_t                              (modality level, zeros count)
    score       s_t = lambda * p_{M(t)} + (1 - lambda) * c_t        (token level, smoothed)
    normalise   w_t = s_t / mean(s)
    floor       w_t  <- max(w_t, w_min) / mean(max(w, w_min))       (never zero)

The fence is per modality and over nonzero values because one fence over all tokens erases
the signal: answer tokens carry the largest gradients and are a minority, so a shared fence,
set by the vision tokens, cuts them down to the vision level; and where at least 75% of the
tokens get no gradient (the last layer, where only positions that predict answer tokens do)
Q1 = Q3 = 0 clips every token to 0 and the floor leaves all weights at 1. A modality with
fewer than MIN_FENCE_TOKENS nonzero values is not clipped (its quartiles say nothing).

mode "modality_prior" uses lambda = 1 (TLQ's modality-level ablation); "uniform" gives
w_t = 1; mode "modality" is MBQ's published weighting (thu-nics/MBQ, pre_quant.py): answer
tokens 1, vision tokens r_l = g_vis / g_ans of the block output (per-sample means of |g|,
averaged over samples), floored at the median of r over the layers of the same block type,
prompt tokens 0. Pure per-token weights (lambda = 0, no floor) are deliberately not the default:
MBQ and QIG found them worse than modality-level weights because many vision tokens get almost
no gradient; the prior and the floor keep every token in the calibration set.

With source "linear" a linear group's weight is the mean of its linears' weights
(`group_weights`); with "block" it is its block's.
"""
from __future__ import annotations

import torch

from tlq.adapters import LinearGroup
from tlq.calib.capture import ANSWER, MODALITY_NAMES, VISION, CapturedSample
from tlq.calib.config import ImportanceConfig
from tlq.calib.gradient_pass import BLOCKS, STATISTICS, RawImportance

MIN_FENCE_TOKENS = 4


def _clip_per_modality(a: torch.Tensor, modality: torch.Tensor, k: float) -> torch.Tensor:
    """c_t of the module docstring: the IQR fence of each modality over its nonzero values."""
    c = a.clone()
    for m in MODALITY_NAMES:
        nonzero = (modality == m) & (a > 0)
        if int(nonzero.sum()) < MIN_FENCE_TOKENS:
            continue
        q1, q3 = torch.quantile(a[nonzero], torch.tensor([0.25, 0.75], dtype=a.dtype))
        lo, hi = max(float(q1 - k * (q3 - q1)), 0.0), float(q3 + k * (q3 - q1))
        c[nonzero] = a[nonzero].clamp(min=lo, max=hi)
    return c


def _modality_prior(c: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    prior = torch.empty_like(c)
    for m in MODALITY_NAMES:
        mask = modality == m
        if mask.any():
            prior[mask] = c[mask].mean()
    return prior


def _token_weights(a: torch.Tensor, modality: torch.Tensor, cfg: ImportanceConfig) -> torch.Tensor:
    lam = 1.0 if cfg.mode == "modality_prior" else cfg.prior_mix
    c = _clip_per_modality(a, modality, cfg.iqr_clip)
    s = lam * _modality_prior(c, modality) + (1 - lam) * c
    w = s / s.mean().clamp(min=1e-12)
    w = w.clamp(min=cfg.floor)
    return w / w.mean()


def _mbq_ratios(raw: RawImportance, modalities: list[torch.Tensor], gather=None) -> dict:
    """MBQ's r = g_vis / g_ans per (layer, block), floored at the median over the layers of the block.

    As thu-nics/MBQ (pre_quant.py, GradCacheHook): per sample the mean |g| over vision tokens and
    over answer tokens, each averaged over samples (samples without vision tokens count as MBQ's
    empty means would not: they are skipped). `gather` maps this process's ratios to those of every
    layer (a multi-rank run holds a share of the layers); medians are order-free, so the result
    equals the single-process one."""
    ratios = {}
    for key in (k for k in raw[0] if k[1] in BLOCKS):
        vis, ans = [], []
        for r, modality in zip(raw, modalities):
            a = r[key][STATISTICS["abs"]]
            if (modality == VISION).any() and (modality == ANSWER).any():
                vis.append(a[modality == VISION].mean())
                ans.append(a[modality == ANSWER].mean())
        ratios[key] = float(torch.stack(vis).mean() / torch.stack(ans).mean().clamp(min=1e-12)) if vis else 1.0
    every = gather(ratios) if gather is not None else ratios
    medians = {b: float(torch.tensor([v for (_, kb), v in every.items() if kb == b]).median())
               for b in {kb for _, kb in every}}
    return {k: max(r, medians[k[1]]) for k, r in ratios.items()}


def integrate(raw: RawImportance, modalities: list[torch.Tensor], cfg: ImportanceConfig, gather=None
              ) -> list[dict[tuple[int, str], torch.Tensor]]:
    """Final per-token weights per sample, keyed (layer, block), or (layer, linear name) for
    source "linear" in token modes (see the module docstring).

    Every step is per key except MBQ's median over layers: `gather` (see _mbq_ratios)."""
    lengths = [len(m) for m in modalities]
    modality = torch.cat(modalities)
    by_linear = cfg.source == "linear" and cfg.mode in ("token", "modality_prior")
    keys = [k for k in raw[0] if (k[1] not in BLOCKS) == by_linear]
    weights_all = {}
    if cfg.mode == "modality":
        ratios = _mbq_ratios(raw, modalities, gather)
    for key in keys:
        if cfg.mode == "uniform":
            w = torch.ones(len(modality))
        elif cfg.mode == "modality":
            w = torch.zeros(len(modality))
            w[modality == ANSWER] = 1.0
            w[modality == VISION] = ratios[key]
        else:
            a = torch.cat([r[key][STATISTICS[cfg.statistic]] for r in raw])
            w = _token_weights(a.double(), modality, cfg).float()
        weights_all[key] = w
    per_sample = [{} for _ in raw]
    for key, w in weights_all.items():
        for i, part in enumerate(torch.split(w, lengths)):
            per_sample[i][key] = part
    return per_sample


def group_weights(weights: list[dict[str, torch.Tensor]], group: LinearGroup) -> torch.Tensor:
    """[sum T] weights of a linear group's tokens from one layer's per-sample weights: its block's,
    or the mean of its linears' (source "linear")."""
    def one(w):
        if group.block in w:
            return w[group.block]
        return torch.stack([w[n] for n in group.names]).mean(0)
    return torch.cat([one(w) for w in weights])


def uniform_weights(samples: list[CapturedSample], num_layers: int) -> list[dict]:
    return [{(i, b): torch.ones(s.num_tokens) for i in range(num_layers) for b in BLOCKS} for s in samples]


def weight_statistics(weights: list[dict], modalities: list[torch.Tensor]) -> dict:
    """Token counts per modality and weight quantiles per modality (for the manifest)."""
    modality = torch.cat(modalities)
    allw = torch.stack([torch.cat([w[k] for w in weights]) for k in weights[0]]).mean(0)
    stats = {"tokens": len(modality), "tokens_per_modality": {}, "weight_quantiles": {}}
    qs = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    for m, name in MODALITY_NAMES.items():
        mask = modality == m
        stats["tokens_per_modality"][name] = int(mask.sum())
        if mask.any():
            stats["weight_quantiles"][name] = [round(float(v), 4) for v in torch.quantile(allw[mask].double(), qs.double())]
    return stats
