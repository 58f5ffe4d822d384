"""Group-wise integer quantization of a weight matrix W[N, K] (N outputs, K inputs).

Conventions (docs/format.md): codes q are unsigned in [0, 2**b - 1];
  asymmetric: w = (q - z) * s  with a per-group zero point z in [0, 2**b - 1];
  symmetric:  w = (q - 2**(b-1)) * s,  with s chosen from the group's absmax by a SymmetricGrid:
    full:       s = absmax / ((2**b - 1) / 2)   (absmax / 7.5 at 4 bits; codes -8..7 all used)
    restricted: s = absmax / (2**(b-1) - 1)     (absmax / 7; code -8 never used)
The format is the same for both; only how s is chosen differs, and each method's registry entry
(tlq/calib/config.py, MethodSpec.grid) declares the grid its reference code uses.
Scales are rounded (up) to the checkpoint's scale dtype *before* codes are chosen, so
the dequantized weight is exactly what a kernel computes from the stored tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

EPS = 1e-8


class SymmetricGrid(str, Enum):
    """How a symmetric group's absmax becomes its scale (module docstring).

    FULL: IST-DASLab/gptq quant.py (Quantizer.find_params, sym=True: scale = 2 absmax / maxq,
        zero = (maxq + 1) / 2) and compressed-tensors (calculate_qparams: absmax / (bit_range / 2),
        codes clamped to [-2**(b-1), 2**(b-1) - 1]), i.e. llm-compressor. The largest positive
        weight lands half a step past the top code and is clamped (error s/2, as any rounding).
    RESTRICTED: mit-han-lab/llm-awq awq/quantize/quantizer.py, casper-hansen/AutoAWQ
        awq/quantize/quantizer.py and thu-nics/MBQ qmllm/quantization/quant_funcs.py
        (pseudo_quantize_tensor with zero_point=False: absmax / (2**(b-1) - 1)).
    """

    FULL = "full"
    RESTRICTED = "restricted"

    def steps(self, bits: int) -> float:
        """absmax / scale: the number of steps between 0 and the largest magnitude."""
        return (2**bits - 1) / 2 if self is SymmetricGrid.FULL else float(2 ** (bits - 1) - 1)


def max_code(bits: int) -> int:
    return 2**bits - 1


def round_up_to_dtype(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Smallest value representable in `dtype` that is >= scale (as float32).

    Rounding a scale *down* would let the group's extreme weights fall outside the code
    range and break RTN's half-step error bound; rounding up keeps it.
    """
    rounded = scale.to(dtype)
    below = rounded.float() < scale
    if below.any():
        rounded = torch.where(below, torch.nextafter(rounded, torch.full_like(rounded, float("inf"))), rounded)
    return rounded.float()


def find_params(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype,
                clip_ratio: float | torch.Tensor = 1.0, grid: SymmetricGrid = SymmetricGrid.FULL
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (float32, dtype-rounded) and zero point (int32 or None) per row of w[N, G].

    `clip_ratio` (scalar or [N]) shrinks the range before rounding (AWQ-style clipping); `grid`
    picks the symmetric scale (SymmetricGrid) and is ignored by asymmetric schemes.
    """
    w = w.float()
    if symmetric:
        absmax = w.abs().amax(dim=1) * clip_ratio
        scale = (absmax / grid.steps(bits)).clamp(min=EPS)
        return round_up_to_dtype(scale, scale_dtype), None
    # the range always holds 0 (as in GPTQ) so the zero point is a valid code
    wmax = w.amax(dim=1).clamp(min=0) * clip_ratio
    wmin = w.amin(dim=1).clamp(max=0) * clip_ratio
    scale = round_up_to_dtype(((wmax - wmin) / max_code(bits)).clamp(min=EPS), scale_dtype)
    zero = torch.round(-wmin / scale).clamp(0, max_code(bits)).to(torch.int32)
    return scale, zero


def _offset(zero: torch.Tensor | None, bits: int) -> torch.Tensor | float:
    return float(2 ** (bits - 1)) if zero is None else zero.float()


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Codes for w[..., C] with scale/zero broadcastable against it."""
    q = torch.round(w.float() / scale) + _offset(zero, bits)
    return q.clamp(0, max_code(bits)).to(torch.int32)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    return (q.float() - _offset(zero, bits)) * scale


@dataclass
class QuantizedWeight:
    """One quantized linear: everything the packed format stores, unpacked.

    codes [N, K] int32; scales [N, n_groups] float32; zeros [N, n_groups] int32 or None;
    g_idx [K] int32 (group of each input column) or None when groups are contiguous.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None

    def to(self, device) -> QuantizedWeight:
        move = lambda t: None if t is None else t.to(device)
        return QuantizedWeight(move(self.codes), move(self.scales), move(self.zeros), self.bits,
                               self.group_size, move(self.g_idx))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        k = self.codes.shape[1]
        g = k if self.group_size == -1 else self.group_size
        return torch.arange(k, device=self.codes.device) // g

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        gi = self.group_index()
        scale = self.scales[:, gi]
        zero = None if self.zeros is None else self.zeros[:, gi]
        return dequantize_codes(self.codes, scale, zero, self.bits).to(dtype)


def n_groups(k: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-k // group_size)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: torch.dtype, clip_ratio: torch.Tensor | None = None,
                 grid: SymmetricGrid = SymmetricGrid.FULL) -> QuantizedWeight:
    """Round-to-nearest with per-group min/max (or absmax, on `grid`) scales.

    `clip_ratio` [N, n_groups] optionally shrinks each group's range (AWQ clipping).
    """
    n, k = w.shape
    g = k if group_size == -1 else group_size
    ng = n_groups(k, group_size)
    if k % g == 0:  # whole groups: one call over [n * ng, g] rows, the same arithmetic as the loop below
        rows = w.reshape(n * ng, g)
        ratio = 1.0 if clip_ratio is None else clip_ratio.reshape(n * ng)
        s, z = find_params(rows, bits, symmetric, scale_dtype, ratio, grid)
        codes = quantize_to_codes(rows, s[:, None], None if z is None else z[:, None], bits).reshape(n, k)
        return QuantizedWeight(codes, s.reshape(n, ng), None if z is None else z.reshape(n, ng), bits, group_size)
    scales = torch.empty(n, ng, device=w.device)
    zeros = None if symmetric else torch.empty(n, ng, dtype=torch.int32, device=w.device)
    codes = torch.empty(n, k, dtype=torch.int32, device=w.device)
    for j in range(ng):
        cols = slice(j * g, min((j + 1) * g, k))
        ratio = 1.0 if clip_ratio is None else clip_ratio[:, j]
        s, z = find_params(w[:, cols], bits, symmetric, scale_dtype, ratio, grid)
        scales[:, j] = s
        if zeros is not None:
            zeros[:, j] = z
        codes[:, cols] = quantize_to_codes(w[:, cols], s[:, None], None if z is None else z[:, None], bits)
    return QuantizedWeight(codes, scales, zeros, bits, group_size)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype,
                  grid: SymmetricGrid = SymmetricGrid.FULL) -> torch.Tensor:
    """quantize_rtn(...).dequantize() without materialising codes (the searches call it per candidate)."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    if k % g:
        return quantize_rtn(w, bits, group_size, symmetric, scale_dtype, grid=grid).dequantize().to(w.device)
    rows = w.float().reshape(-1, g)
    s, z = find_params(rows, bits, symmetric, scale_dtype, grid=grid)
    offset = _offset(None if z is None else z[:, None], bits)
    q = (torch.round(rows / s[:, None]) + offset).clamp_(0, max_code(bits))
    return ((q - offset) * s[:, None]).reshape(n, k)


def quantize_activations_int8(x: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic symmetric int8 fake quantization (the a8 of w4a8)."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / 127).clamp(min=EPS)
    return (torch.round(x.float() / scale).clamp(-128, 127) * scale).to(x.dtype)
