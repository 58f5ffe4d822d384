"""Importance-weighted GPTQ with the quantization-exposure correction (TLQ's solver).

Notation: W [N, K] FP weight; X_fp [T, K] the layer's inputs on the FP path; X_q [T, K]
the inputs it sees once the earlier layers are quantized; w [T] token importance
(non-negative, mean ~1; None = uniform); D = diag(w) / sum(w).

  weighted Hessian      H  = 2 X_q^T D X_q            (VLMQ: H = X G^2 X^T)
  exposure target       W* = argmin_W' ||W X_fp^T - W' X_q^T||_D^2 + lam ||W' - W||^2
                           = (W X_fp^T D X_q + lam W) (X_q^T D X_q + lam I)^-1
  objective             ||W X_fp^T - Q X_q^T||_D^2 = ||(W* - Q) X_q^T||_D^2 + const  (lam = 0)

so GPTQ on W* under H minimises the token-weighted error against the FP outputs while
seeing the exposed inputs (GPTAQ / MBQ-"distort" / VLMQ's asymmetric calibration).

Everything here reads the streaming statistics M = X_q^T W X_q, C = X_fp^T W X_q, S = sum(w)
(tlq/quant/statistics.py): A = M / S, C / S, H = 2 M / S. The tensor functions below build
them from one batch, which gives the all-at-once formulas exactly.
"""
from __future__ import annotations

import torch

from tlq.errors import TLQError
from tlq.quant.gptq import gptq_core
from tlq.quant.qparams import QuantizedWeight
from tlq.quant.statistics import ExposureFactor, InputStatistics
from tlq.schemes import QuantScheme


def weighted_hessian(X: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """H = 2 X^T diag(w) X / sum(w); w None gives GPTQ's 2/T X^T X. Zero-weight tokens add nothing."""
    return InputStatistics.from_tensors(X, w).hessian()


def check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise TLQError(f"exposure strength {strength} is outside [0, 1]")


def exposure_target(W: torch.Tensor, factor: ExposureFactor, strength: float = 1.0) -> torch.Tensor:
    """W + strength * (W* - W) with W* = (W C + lam W) (A + lam I)^-1 (module docstring).

    The ridge term pulls W* towards W (not towards 0), so X_q == X_fp gives W* == W exactly and a
    badly conditioned A cannot blow W* up.
    """
    check_strength(strength)
    W = W.float()
    if strength == 0.0:
        return W.clone()
    if not factor.has_cross:
        raise TLQError("exposure target requested after the group's float-path moment was dropped (drop_cross)")
    # W* (A + lam I) = W C + lam W  (A symmetric)  ->  solve (A + lam I) W*^T = (W C + lam W)^T
    # (C or this linear's projected W C: a device copy while its target is formed, host-parked on GPUs)
    W_star = torch.cholesky_solve((factor.pulled(W) + factor.lam * W).T, factor.L).T
    return W + strength * (W_star - W)


def exposure_corrected_target(W: torch.Tensor, X_fp: torch.Tensor, X_q: torch.Tensor,
                              w: torch.Tensor | None = None, damp: float = 0.01,
                              strength: float = 1.0) -> torch.Tensor:
    """`exposure_target` from one batch of FP-path and exposed inputs (lam = damp * mean diag A)."""
    check_strength(strength)
    if X_fp.shape != X_q.shape:
        raise TLQError(f"FP inputs {tuple(X_fp.shape)} and exposed inputs {tuple(X_q.shape)} differ; "
                       "both paths must see the same tokens")
    if strength == 0.0:
        return W.float().clone()
    return exposure_target(W, InputStatistics.from_tensors(X_q, w, X_fp).exposure_factor(damp), strength)


def weighted_gptq_quantize(W: torch.Tensor, X_q: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype,
                           *, w: torch.Tensor | None = None, X_fp: torch.Tensor | None = None,
                           damp: float = 0.01, act_order: bool = False, exposure_strength: float = 1.0,
                           block_size: int = 128) -> QuantizedWeight:
    """GPTQ under the token-weighted Hessian of the exposed inputs, on the exposure-corrected target.

    X_fp None or exposure_strength 0 gives plain weighted GPTQ; w None as well gives GPTQ.
    """
    check_strength(exposure_strength)
    cross = X_fp if X_fp is not None and exposure_strength > 0 else None
    if cross is not None and cross.shape != X_q.shape:
        raise TLQError(f"FP inputs {tuple(cross.shape)} and exposed inputs {tuple(X_q.shape)} differ; "
                       "both paths must see the same tokens")
    stats = InputStatistics.from_tensors(X_q, w, cross)
    return weighted_gptq_from_statistics(W, stats, scheme, scale_dtype, damp=damp, act_order=act_order,
                                         exposure_strength=exposure_strength, block_size=block_size)


def weighted_gptq_from_statistics(W: torch.Tensor, stats: InputStatistics, scheme: QuantScheme,
                                  scale_dtype: torch.dtype, *, damp: float = 0.01, act_order: bool = False,
                                  exposure_strength: float = 1.0, block_size: int = 128) -> QuantizedWeight:
    """`weighted_gptq_quantize` for one linear from accumulated statistics (they are consumed).

    After `stats.scale_inputs_(s)` the result is the weight of the scaled inputs x / s: codes and
    scales of T diag(s) (InputStatistics.scale_inputs_)."""
    target = W.float()
    if stats.cross and exposure_strength > 0:
        target = exposure_target(W, stats.exposure_factor(damp), exposure_strength)
    if stats.input_scale is not None:
        target = target * stats.input_scale.to(target)[None, :]
    factor = stats.gptq_factor(damp, act_order)
    return gptq_core(target, None, scheme, scale_dtype, damp=damp, block_size=block_size, act_order=act_order,
                     factor=factor)[0]
