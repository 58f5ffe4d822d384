"""Round-to-nearest (RTN): the baseline every other solver is compared against.

Per group of `scheme.group_size` input columns (or per output row when -1), take the
min/max (asymmetric) or absmax (symmetric) range, round the scale to the checkpoint's
scale dtype, and round each weight to the nearest code. No calibration data.
"""
from __future__ import annotations

import torch

from tlq.quant.qparams import QuantizedWeight, quantize_rtn
from tlq.schemes import QuantScheme


def rtn_quantize(W: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype, *,
                 clip_ratio: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize W[N, K] under `scheme`; `clip_ratio` [N, n_groups] shrinks ranges (AWQ clipping)."""
    return quantize_rtn(W.float(), scheme.bits, scheme.group_size, scheme.symmetric, scale_dtype,
                        clip_ratio=clip_ratio)
