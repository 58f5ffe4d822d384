"""GPTQ as IST-DASLab/gptq ships it, to compare tlq.quant.gptq against. Following

  IST-DASLab/gptq   quant.py  (Quantizer.find_params with perchannel=True on a weight, quantize)
                    gptq.py   (GPTQ.fasterquant without act-order or static groups: dead inputs,
                               damping, upper Cholesky factor of H^-1, exact updates inside a block
                               and one lazy update per block, group parameters at each group start)

in float32 throughout, written for these tests (H is passed in; the reference accumulates it in
add_batch as 2/T X^T X). Group parameters are taken from `W[:, start:start + groupsize]`, the
weights as the last finished block left them, as the reference does.
"""
import torch


def find_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero), each [N, 1]: the range holds 0; symmetric = +-max(|min|, max)."""
    maxq = 2**bits - 1
    zeros = torch.zeros(x.shape[0])
    lo = torch.minimum(x.min(1).values, zeros)
    hi = torch.maximum(x.max(1).values, zeros)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        neg = lo < 0
        lo[neg] = -hi[neg]  # a row with no negative weight keeps lo = 0, as in the reference
    empty = (lo == 0) & (hi == 0)
    lo[empty], hi[empty] = -1.0, 1.0
    scale = (hi - lo) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
    return scale[:, None], zero[:, None]


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Dequantized round-to-nearest of x on the grid (scale, zero)."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero)


def fasterquant(W: torch.Tensor, H: torch.Tensor, bits: int, sym: bool, groupsize: int = -1,
                blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """The dequantized GPTQ weight Q [N, K] of W [N, K] under the Hessian H [K, K]."""
    W, H = W.float().clone(), H.float().clone()
    K = W.shape[1]
    scale, zero = find_params(W, bits, sym)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    diag = torch.arange(K)
    H[diag, diag] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if groupsize != -1 and (i1 + i) % groupsize == 0:
                scale, zero = find_params(W[:, i1 + i:i1 + i + groupsize], bits, sym)
            w, d = W1[:, i], Hinv1[i, i]
            q = quantize(w[:, None], scale, zero, bits)[:, 0]
            Q[:, i1 + i] = q
            err = (w - q) / d
            W1[:, i:] -= err[:, None].matmul(Hinv1[i, i:][None, :])
            Err1[:, i] = err
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q
