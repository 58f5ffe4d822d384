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
"""
from __future__ import annotations

import torch

from tlq.errors import TLQError
from tlq.quant.gptq import gptq_quantize
from tlq.quant.qparams import QuantizedWeight
from tlq.schemes import QuantScheme


def _check_weights(X: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor | None:
    if w is None:
        return None
    w = w.float().reshape(-1)
    if w.shape[0] != X.shape[0]:
        raise TLQError(f"{w.shape[0]} token weights for {X.shape[0]} tokens; pass one weight per token")
    if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise TLQError("token weights must be finite, non-negative and not all zero; check the importance pass")
    return w


def weighted_hessian(X: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """H = 2 X^T diag(w) X / sum(w); w None gives GPTQ's 2/T X^T X. Zero-weight tokens add nothing."""
    X = X.float().reshape(-1, X.shape[-1])
    w = _check_weights(X, w)
    if w is None:
        return (2.0 / X.shape[0]) * (X.T @ X)
    return (2.0 / w.sum()) * (X.T @ (X * w[:, None]))


def exposure_corrected_target(W: torch.Tensor, X_fp: torch.Tensor, X_q: torch.Tensor,
                              w: torch.Tensor | None = None, damp: float = 0.01,
                              strength: float = 1.0) -> torch.Tensor:
    """W + strength * (W* - W), with W* the weight that best maps X_q to the FP outputs W X_fp.

    W* = (W C + lam W) (A + lam I)^-1 with C = X_fp^T D X_q, A = X_q^T D X_q,
    lam = damp * mean(diag A). The ridge term pulls W* towards W (not towards 0), so
    X_q == X_fp gives W* == W exactly and a badly conditioned A cannot blow W* up.
    """
    if not 0.0 <= strength <= 1.0:
        raise TLQError(f"exposure strength {strength} is outside [0, 1]")
    if X_fp.shape != X_q.shape:
        raise TLQError(f"FP inputs {tuple(X_fp.shape)} and exposed inputs {tuple(X_q.shape)} differ; "
                       "both paths must see the same tokens")
    W = W.float()
    if strength == 0.0:
        return W.clone()
    X_fp = X_fp.float().reshape(-1, X_fp.shape[-1])
    X_q = X_q.float().reshape(-1, X_q.shape[-1])
    w = _check_weights(X_q, w)
    Dq = X_q if w is None else X_q * w[:, None]
    norm = X_q.shape[0] if w is None else w.sum()
    C = (X_fp.T @ Dq) / norm
    A = (X_q.T @ Dq) / norm
    lam = damp * torch.diag(A).mean().clamp(min=1e-12)
    A = A + lam * torch.eye(A.shape[0], device=A.device)
    # W* A_damped = W C + lam W  (A symmetric)  ->  solve A_damped W*^T = (W C + lam W)^T
    L, info = torch.linalg.cholesky_ex(A)
    if info != 0:
        raise TLQError("exposure correction: the exposed-input Gram matrix is singular; raise damp")
    W_star = torch.cholesky_solve((W @ C + lam * W).T, L).T
    return W + strength * (W_star - W)


def weighted_gptq_quantize(W: torch.Tensor, X_q: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype,
                           *, w: torch.Tensor | None = None, X_fp: torch.Tensor | None = None,
                           damp: float = 0.01, act_order: bool = False, exposure_strength: float = 1.0,
                           block_size: int = 128, H: torch.Tensor | None = None) -> QuantizedWeight:
    """GPTQ under the token-weighted Hessian of the exposed inputs, on the exposure-corrected target.

    X_fp None or exposure_strength 0 gives plain weighted GPTQ; w None as well gives GPTQ.
    `H` may pass weighted_hessian(X_q, w) precomputed, to share it across linears fed by the same X_q.
    """
    H = weighted_hessian(X_q, w) if H is None else H
    target = W.float()
    if X_fp is not None and exposure_strength > 0:
        target = exposure_corrected_target(W, X_fp, X_q, w, damp=damp, strength=exposure_strength)
    return gptq_quantize(target, H, scheme, scale_dtype, damp=damp, block_size=block_size, act_order=act_order)
