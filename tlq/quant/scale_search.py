"""AWQ scale search and weight clipping, with MBQ's token-weighted loss.

Scale search (AWQ, Lin et al. 2024; MBQ, Li et al. 2025). For the linears that share an
input X [T, K] (e.g. q/k/v), an input-channel scale s [K] is folded as X/s and W*s. For
alpha in {0, 1/n, ..., (n-1)/n}:
    s = m^alpha,  m_k = sum_t w_t |X_tk| / sum_t w_t   (AWQ: the plain mean; MBQ: token weights)
    s = clamp(s, 1e-4) / sqrt(max s * min s)
    Yq = act(X/s) Q(W s)^T      (act = per-token int8 fake-quant when act_quant, else identity)
    loss = sum_t w_t * mean_n err(Y_tn - Yq_tn) / sum_t w_t   over the concatenated outputs
err is the square (AWQ's MSE; loss="mse") or the absolute value (MBQ's weighted MAE;
loss="mae"). alpha = 0 gives s = 1, i.e. no scaling, and wins ties, so the result is never
worse than no scaling on the calibration tokens.

Clipping (AWQ auto_clip): per output row and group, shrink the quantization range by
ratios 1, 1 - 1/n, ..., > 1 - max_shrink and keep the ratio with the smallest weighted MSE
of the group's partial products X_g W_g^T. Ratio 1 is a candidate, so no group's error grows.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from tlq.errors import TLQError
from tlq.quant.qparams import n_groups, quantize_activations_int8, quantize_rtn
from tlq.schemes import QuantScheme


def _calibration_tokens(X: torch.Tensor, w: torch.Tensor | None, max_tokens: int,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 tokens [T', K] and weights [T'] normalised to sum 1: zero-weight tokens dropped,
    then a seeded uniform subsample of at most max_tokens."""
    X = X.float().reshape(-1, X.shape[-1])
    w = torch.ones(X.shape[0], device=X.device) if w is None else w.float().reshape(-1).to(X.device)
    if w.shape[0] != X.shape[0] or (w < 0).any() or w.sum() <= 0:
        raise TLQError(f"token weights must be one non-negative weight per token ({X.shape[0]}), not all zero")
    keep = w > 0
    X, w = X[keep], w[keep]
    if X.shape[0] > max_tokens:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(X.shape[0], generator=gen)[:max_tokens].to(X.device)
        X, w = X[idx], w[idx]
    return X, w / w.sum()


def _rtn_dequant(W: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype,
                 clip_ratio: torch.Tensor | None = None) -> torch.Tensor:
    return quantize_rtn(W, scheme.bits, scheme.group_size, scheme.symmetric, scale_dtype,
                        clip_ratio=clip_ratio).dequantize().to(W.device)


def search_input_scales(Ws: list[torch.Tensor], X: torch.Tensor, scheme: QuantScheme,
                        scale_dtype: torch.dtype, *, w: torch.Tensor | None = None, n_grid: int = 20,
                        act_quant: bool = False, loss: str = "mse", max_tokens: int = 4096,
                        seed: int = 0) -> torch.Tensor:
    """Best AWQ/MBQ input-channel scale s [K] for the linears Ws (each [N_i, K]) fed by X [T, K]."""
    if loss not in ("mse", "mae"):
        raise TLQError(f"unknown scale-search loss {loss!r}; use 'mse' (AWQ) or 'mae' (MBQ)")
    X, w = _calibration_tokens(X, w, max_tokens, seed)
    Ws = [W.float().to(X.device) for W in Ws]
    n_out = sum(W.shape[0] for W in Ws)
    stat = (w[:, None] * X.abs()).sum(0)
    # Weight-only MSE is a quadratic form: sum_t w_t |E x_t|^2 = tr(E H E^T) with H = X^T diag(w) X
    # and E = W - Q(W s)/s, so with more tokens than inputs the K x K Hessian is the cheaper product.
    H = (X * w[:, None]).T @ X if (not act_quant and loss == "mse" and X.shape[1] < X.shape[0]) else None
    Y = None if H is not None else [X @ W.T for W in Ws]

    best_loss, best_s = float("inf"), None
    for step in range(n_grid):
        s = stat.pow(step / n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if H is not None:
            errors = [W - _rtn_dequant(W * s, scheme, scale_dtype) / s for W in Ws]
            cur = float(sum(((E @ H) * E).sum() for E in errors) / n_out)
        else:
            Xs = X / s
            if act_quant:
                Xs = quantize_activations_int8(Xs)
            per_token = torch.zeros_like(w)
            for W, Yw in zip(Ws, Y):
                diff = Yw - Xs @ _rtn_dequant(W * s, scheme, scale_dtype).T
                per_token += (diff.square() if loss == "mse" else diff.abs()).sum(1)
            cur = float((w * per_token).sum() / n_out)
        if cur < best_loss:
            best_loss, best_s = cur, s
    return best_s


def search_clip_ratios(W: torch.Tensor, X: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype, *,
                       w: torch.Tensor | None = None, n_grid: int = 20, max_shrink: float = 0.5,
                       max_tokens: int = 512, seed: int = 0) -> torch.Tensor:
    """AWQ clipping ratios [N, n_groups] for W [N, K] (pass W*s and X/s after a scale search)."""
    X, w = _calibration_tokens(X, w, max_tokens, seed)
    W = W.float().to(X.device)
    N, K = W.shape
    g = K if scheme.group_size == -1 else scheme.group_size
    ng = n_groups(K, scheme.group_size)
    ratios = [1.0 - i / n_grid for i in range(max(1, int(max_shrink * n_grid)))]
    best = torch.ones(N, ng, device=X.device)
    per_row = replace(scheme, group_size=-1)  # one group slice at a time
    for j in range(ng):
        cols = slice(j * g, min((j + 1) * g, K))
        Wg, Xg = W[:, cols], X[:, cols]
        Yg = Xg @ Wg.T
        best_err = torch.full((N,), float("inf"), device=X.device)
        for r in ratios:
            Qg = _rtn_dequant(Wg, per_row, scale_dtype, torch.full((N, 1), r, device=X.device))
            err = (w[:, None] * (Yg - Xg @ Qg.T).square()).sum(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[better, j] = r
    return best
