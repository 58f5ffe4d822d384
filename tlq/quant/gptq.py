"""GPTQ (Frantar et al., 2022; IST-DASLab reference implementation), as a pure tensor function.

Minimises ||W X^T - Q X^T||^2 = tr((W - Q) H (W - Q)^T) with H = 2/T X^T X (or any
weighted Hessian, see weighted_gptq.py) one input column at a time: quantize column j,
then spread its error e_j = (w_j - q_j) / U_jj over the not-yet-quantized columns with
the j-th row of U, the upper Cholesky factor of H^-1 (the OBS update).

Steps, as in the reference:
  1. dead inputs (H_jj == 0): H_jj = 1 and W[:, j] = 0 (the column never sees signal);
  2. optional act-order: permute columns by descending diag(H) (salient columns first);
  3. damping: H += damp * mean(diag(H)) * I (retried with 10x damping if Cholesky fails);
  4. U = upper Cholesky of H^-1;
  5. columns in blocks of `block_size`: exact updates inside the block, one lazy
     matrix update of the remaining columns per block;
  6. group parameters are chosen at each group start (every group_size columns, in the
     processing order) from the group's weights as the reference reads them: W[:, j:j+G] of the
     outer matrix, which holds the earlier blocks' updates but not those of the current block
     (columns inside the block live in its working copy until the block ends). Per-channel
     (group_size -1) chooses them once over the whole row. Reading the fully updated weights
     instead changed the Hessian-weighted error by -1% to +3% (2-4 bits, g64, random correlated
     inputs), no consistent gain, so the reference's choice is kept: bit-identical for every group
     size (tests/quant/test_gptq.py).
Group parameters come from the scheme's grid (tlq.quant.qparams). The gptq and tlq methods use
SymmetricGrid.FULL, the reference's symmetric quantizer (quant.py, Quantizer.find_params with
sym=True: scale = 2 absmax / (2**b - 1), zero = 2**(b-1)); one difference is kept on purpose: for a
group with no negative weight the reference keeps xmin = 0 and so clamps the group's upper half,
while find_params uses the absmax either way.
With act-order and groups, group g holds the permuted columns [g*G, (g+1)*G), so the
result carries g_idx[k] = group of original column k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tlq.errors import TLQError
from tlq.quant.qparams import QuantizedWeight, find_params, max_code, n_groups
from tlq.schemes import QuantScheme

CHOLESKY_RETRIES = 4


def inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1, so H^-1 = U^T U.

    H is used as scratch (its diagonal is damped in place) and left holding H + damping: pass a
    copy you own. Besides H only one K x K buffer is used: the Cholesky factor, then inverted and
    re-factored in place (the same values as the out-of-place calls). A failing factorisation
    (H not positive definite) is retried with 10x the damping.
    """
    mean_diag = torch.diag(H).mean()
    undamped = torch.diag(H).clone()
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for _ in range(CHOLESKY_RETRIES):
        H.diagonal().copy_(undamped + damp * mean_diag)
        L, bad = torch.linalg.cholesky_ex(H)
        if bad == 0:
            torch.cholesky_inverse(L, out=L)
            torch.linalg.cholesky_ex(L, upper=True, out=(L, info))
            if info == 0:
                return L
        damp = damp * 10 if damp > 0 else 0.01
    raise TLQError(f"GPTQ: the Hessian is not positive definite even with damping {damp / 10:g}; "
                   "use more calibration tokens or a larger --damp")


@dataclass
class HessianFactor:
    """What GPTQ needs from a Hessian, computed once and shared by every linear that reads the same
    inputs (q/k/v, gate/up).

    Attributes:
        U: upper Cholesky factor of the damped, permuted H^-1 [K, K].
        perm: processing order of the input columns (act-order, else identity).
        dead: inputs that never see signal (H_jj == 0); their weights are zeroed.
    """

    U: torch.Tensor
    perm: torch.Tensor
    dead: torch.Tensor


def hessian_factor(H: torch.Tensor, damp: float, act_order: bool = False, overwrite: bool = False) -> HessianFactor:
    """Steps 1-4 of the module docstring. `overwrite=True` uses H itself as scratch (no copy)."""
    H = H.float() if overwrite else H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    K = H.shape[0]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K, device=H.device)
    if act_order:
        H = H[perm][:, perm]
    return HessianFactor(inverse_cholesky(H, damp), perm, dead)


def gptq_core(W: torch.Tensor, H: torch.Tensor | None, scheme: QuantScheme, scale_dtype: torch.dtype, *,
              damp: float = 0.01, block_size: int = 128, act_order: bool = False,
              factor: HessianFactor | None = None) -> tuple[QuantizedWeight, torch.Tensor]:
    """GPTQ returning (QuantizedWeight, Q) where Q[N, K] is the dequantized weight as the loop computed it.

    Pass `factor` (hessian_factor of H) instead of H to share one factorisation across linears."""
    if factor is None:
        if W.ndim != 2 or H is None or H.shape != (W.shape[1], W.shape[1]):
            raise TLQError(f"GPTQ: weight {tuple(W.shape)} and Hessian {None if H is None else tuple(H.shape)} "
                           "do not match; the Hessian must be [K, K] for a weight [N, K]")
        factor = hessian_factor(H, damp, act_order)
    W = W.float().clone()
    N, K = W.shape
    bits, sym, gs, grid = scheme.bits, scheme.symmetric, scheme.group_size, scheme.grid
    g = K if gs == -1 else gs
    W[:, factor.dead] = 0
    perm = factor.perm
    if act_order:
        W = W[:, perm]
    Hinv = factor.U

    ng = n_groups(K, gs)
    scales = torch.empty(N, ng, device=W.device)
    zeros = None if sym else torch.empty(N, ng, dtype=torch.int32, device=W.device)
    s = z = None
    if gs == -1:
        s, z = find_params(W, bits, sym, scale_dtype, grid=grid)

    # The column loop is dispatch-bound at K <= ~3k, so it works on the block transposed (a column is
    # then contiguous) and runs quantize_to_codes / dequantize_codes' arithmetic inlined, in place, with
    # the offset cast once per group. Every value goes through the same float operations as in
    # IST-DASLab's loop (codes are integers in fp32, exact both ways; the block update multiplies the
    # same contiguous operands), so the result stays bit-identical to it (tests/quant/test_gptq.py).
    codes = torch.empty(N, K, dtype=torch.int32, device=W.device)
    Q = torch.empty(N, K, device=W.device)
    maxq, diff = max_code(bits), torch.empty(N, device=W.device)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].T.contiguous()  # [columns, N]
        Err1, codes1, Q1 = torch.empty_like(W1), torch.empty_like(W1), torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        outer = torch.empty_like(W1)  # the rank-1 update's product, written in place
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                if gs != -1:
                    s, z = find_params(W[:, col:col + g], bits, sym, scale_dtype, grid=grid)
                scales[:, col // g] = s
                if zeros is not None:
                    zeros[:, col // g] = z
                offset = float(2 ** (bits - 1)) if z is None else z.float()
            torch.div(W1[i], s, out=codes1[i]).round_().add_(offset).clamp_(0, maxq)
            torch.sub(codes1[i], offset, out=Q1[i]).mul_(s)
            torch.sub(W1[i], Q1[i], out=diff)
            torch.div(diff, Hinv1[i, i], out=Err1[i])
            W1[i:].sub_(torch.mul(Hinv1[i, i:][:, None], Err1[i][None, :], out=outer[:i2 - i1 - i]))
        codes[:, i1:i2], Q[:, i1:i2] = codes1.T, Q1.T  # integers in fp32: exact in int32
        W[:, i2:] -= Err1.T.contiguous() @ Hinv[i1:i2, i2:]

    g_idx = None
    if act_order:
        inv = torch.argsort(perm)
        codes, Q = codes[:, inv], Q[:, inv]
        if gs != -1:
            g_idx = (inv // g).to(torch.int32)  # original column k sat at position inv[k]
    return QuantizedWeight(codes, scales, zeros, bits, gs, g_idx), Q


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype, *,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False) -> QuantizedWeight:
    """Quantize W[N, K] with GPTQ under the input Hessian H[K, K] (e.g. 2/T X^T X)."""
    return gptq_core(W, H, scheme, scale_dtype, damp=damp, block_size=block_size, act_order=act_order)[0]
