"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights.

For the linears W_i [N_i, K] sharing an input X [T, K] (mit-han-lab/smoothquant, smooth.py):
    s_k = max_t |X_tk|^alpha / max(max_{i,n} |W_i[n, k]|, 1e-5)^(1 - alpha),   clamped to >= 1e-5
The caller divides X by s (folding 1/s into the previous op, a norm's weight) and multiplies
each W_i's columns by s, so (X/s)(W s)^T == X W^T while the per-token int8 activation range
shrinks on outlier channels. alpha = 0.5 is the paper's default. As in the paper and in
llm-compressor's default mappings only the norm-fed groups (q/k/v, gate/up) are smoothed
(tlq/calib/input_scaling.py), with X from the float model.
"""
from __future__ import annotations

import torch

from tlq.errors import TLQError

MIN_SCALE = 1e-5


def smooth_scales(X: torch.Tensor, Ws: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """Per-input-channel smoothing scales s [K] (see module docstring)."""
    if not 0.0 <= alpha <= 1.0:
        raise TLQError(f"SmoothQuant alpha {alpha} is outside [0, 1]; the paper uses 0.5")
    act_max = X.float().reshape(-1, X.shape[-1]).abs().amax(dim=0)
    w_max = torch.stack([W.float().abs().amax(dim=0).to(act_max.device) for W in Ws]).amax(dim=0)
    s = act_max.pow(alpha) / w_max.clamp(min=MIN_SCALE).pow(1 - alpha)
    return s.clamp(min=MIN_SCALE)
