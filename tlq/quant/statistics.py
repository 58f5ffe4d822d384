"""Streaming sufficient statistics of one linear group's inputs: what every data-driven solver reads.

For the kept tokens t of all samples, with token weights w_t (1 for uniform methods), inputs x_t on
the calibration path and x_fp,t on the float path (corrected exposure only):

    M = sum_t w_t x_t x_t^T          C = sum_t w_t x_fp,t x_t^T          S = sum_t w_t
    a = sum_t w_t |x_t|  (the activation statistic of the input-scale search, a K-vector; kept only
                          when asked for, `activation_stat`)

Then H = 2 M / S is the (token-weighted) GPTQ Hessian, and the exposure-corrected target needs only
M / S and, for each linear W_i of the group, W_i C / S (tlq/quant/weighted_gptq.py).

Projected cross moment. C is only ever read as W_i C, so when the group's outputs are few against its
inputs (`projects_cross`: 2 sum_i N_i <= K, the MLP's down projection, whose K is the MLP width) the
statistics keep P_i = W_i C = sum_t w_t (W_i x_fp,t) x_t^T [N_i, K] instead of C [K, K]: 4 N K
instead of 2 K^2 flops per token, and N K instead of K^2 floats (Qwen2-VL-7B's down_proj: 0.25 against
1.34 GiB). The weights are the group's float weights when its inputs are gathered; a solve asks for
W C / S with the same W and gets P_i / S (`ExposureFactor.pulled`, matched by value). Equal to W (C / S)
within float rounding (the products are associated the other way).

Inputs are folded in batch by batch (`add`) and dropped, so memory is two K x K fp32 matrices (or M
and the P_i) whatever the number of calibration tokens. For K below 3 x SYMMETRIC_BLOCK one batch
gives exactly the matrices `X^T (w * X)` of the all-at-once formulas (bit-identical); more batches
sum the same products in another order (equal within float rounding). Wider M (the down
projection's) is symmetric and accumulated block by block on and above the diagonal only
(`symmetric_blocks`), the blocks below copied from above when M is read: equal within float
rounding, and exactly symmetric.

`finish()` turns them into what the group's solvers share: the exposure factor (Cholesky of
M / S + lam I, lam = damp * mean diag) and the GPTQ factor of H, computed in place. Device memory
for corrected exposure: M, C and the exposure factor (3 K x K), then C moves to host memory while
M becomes H and is factored (H + its factor + the exposure factor: 3), then H is freed; without
exposure at most 2. On the CPU C simply stays (4 at the GPTQ factorisation). TLQ's row-subsampled
scale judge drops C once the exposure targets are formed (`drop_cross`), then parks a copy of the
unscaled GPTQ factor in host memory while it solves scaled (`scaled_inputs`; on the CPU: 3). A
projected group holds the P_i (sum_i N_i x K) wherever the above holds C.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise

import torch

from tlq.errors import TLQError
from tlq.quant.gptq import HessianFactor, hessian_factor


@dataclass
class ExposureFactor:
    """What the exposure-corrected target of every linear in a group needs.

    Attributes:
        L: lower Cholesky factor of A + lam I, A = M / S.
        C: C / S [K, K] (float-path x calibration-path moment), or None when it is kept projected.
        lam: the ridge lam = damp * mean(diag A).
    """

    L: torch.Tensor
    C: torch.Tensor | None
    lam: torch.Tensor
    projected: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (W_i, W_i C / S) instead of C

    @property
    def has_cross(self) -> bool:
        return self.C is not None or bool(self.projected)

    def pulled(self, W: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(W C / S)[rows] for one of the group's linears W [N, K] (float); rows None: every row."""
        if self.C is not None:
            return (W if rows is None else W[rows.to(W.device)]) @ self.C.to(W.device)
        P = matching_moment(self.projected or [], W)
        if P is not None:
            return (P if rows is None else P[rows.to(P.device)]).to(W.device)
        raise TLQError("the group's float-path moment was kept projected through its weights, and this weight is "
                       "none of them (or it was dropped: drop_cross)")


def matching_moment(pairs, W: torch.Tensor) -> torch.Tensor | None:
    """The P of the (weight, P) pair whose weight equals W (by value: a projected moment is found by the
    weight it was projected through), or None."""
    for ref, P in pairs:
        if ref.shape == W.shape and torch.equal(ref.float(), W.to(ref.device, torch.float32)):
            return P
    return None


SYMMETRIC_BLOCK = 1024  # columns per block of M's blocked upper triangle


def symmetric_blocks(K: int) -> list[tuple[int, int]] | None:
    """Column ranges of M's blocks when it is accumulated on and above the block diagonal only (M is
    symmetric: b (b + 1) / 2 of b^2 block products, 44% fewer flops at b = 9, down_proj of 2B-7B
    models), for K of at least 3 blocks; None: one product over all of K."""
    n = -(-K // SYMMETRIC_BLOCK)
    if n < 3:
        return None
    edges = [round(i * K / n) for i in range(n + 1)]
    return list(pairwise(edges))


def projects_cross(K: int, rows: int) -> bool:
    """Whether a group with K inputs and `rows` outputs in all keeps its float-path moment projected
    (module docstring): smaller than C, and no dearer to accumulate, when 2 rows <= K."""
    return 2 * rows <= K


def check_token_weights(n_tokens: int, w: torch.Tensor | None) -> torch.Tensor | None:
    if w is None:
        return None
    w = w.float().reshape(-1)
    if w.shape[0] != n_tokens:
        raise TLQError(f"{w.shape[0]} token weights for {n_tokens} tokens; pass one weight per token")
    if (w < 0).any() or not torch.isfinite(w).all():
        raise TLQError("token weights must be finite and non-negative; check the importance pass")
    return w


class InputStatistics:
    """M, C and S of the module docstring, accumulated batch by batch on `device`."""

    def __init__(self, weighted: bool, cross: bool, activation_stat: bool = False,
                 projections: list[torch.Tensor] | None = None):
        """projections: the group's weights W_i [N_i, K] (on the statistics' device; copied) when the
        float-path moment is kept projected, P_i = W_i C (module docstring); None keeps C."""
        self.weighted, self.cross, self.activation_stat = weighted, cross, activation_stat
        self._M: torch.Tensor | None = None
        self._lower_stale = False  # M's blocks below the diagonal lag the upper ones (`M` fills them)
        self.C: torch.Tensor | None = None
        # copies in the weights' own dtype (half of P's bytes in bf16), raised to fp32 batch by batch
        self.projections = [W.detach().clone() for W in projections] if cross and projections else None
        self.P: list[torch.Tensor] | None = None
        self.S: torch.Tensor | float = 0.0
        self.abs_sum: torch.Tensor | None = None
        self.tokens = 0
        self.input_scale: torch.Tensor | None = None  # set by scale_inputs_
        self._exposure: dict[float, ExposureFactor] = {}
        self._gptq: dict[tuple[float, bool], HessianFactor] = {}

    @classmethod
    def from_tensors(cls, X: torch.Tensor, w: torch.Tensor | None = None, X_fp: torch.Tensor | None = None,
                     activation_stat: bool = False, projections: list[torch.Tensor] | None = None) -> InputStatistics:
        stats = cls(weighted=w is not None, cross=X_fp is not None, activation_stat=activation_stat,
                    projections=projections)
        stats.add(X, w, X_fp)
        return stats

    def add(self, X: torch.Tensor, w: torch.Tensor | None = None, X_fp: torch.Tensor | None = None) -> None:
        """Fold in a batch: X [T, K] calibration-path inputs, w [T] weights, X_fp [T, K] float-path inputs."""
        X = X.float().reshape(-1, X.shape[-1])
        w = check_token_weights(X.shape[0], w)
        if (w is not None) != self.weighted or (X_fp is not None) != self.cross:
            raise TLQError("every batch of a group's statistics must carry the same kinds of inputs")
        if X_fp is not None and X_fp.shape[-1] != X.shape[-1]:
            raise TLQError(f"FP inputs {tuple(X_fp.shape)} and exposed inputs {tuple(X.shape)} differ; "
                           "both paths must see the same tokens")
        Dx = X if w is None else X * w[:, None]
        X_fp = None if X_fp is None else X_fp.float().reshape(-1, X.shape[-1])
        first, blocks = self._M is None, symmetric_blocks(X.shape[-1])
        if first and blocks is None:  # one batch: exactly the all-at-once product
            self._M = X.T @ Dx
        elif first:
            self._M = torch.zeros(X.shape[-1], X.shape[-1], dtype=X.dtype, device=X.device)
        if blocks is not None:
            self._add_upper(X, Dx, blocks)
        elif not first:
            self._M.addmm_(X.T, Dx)
        if X_fp is not None and self.projections is None:
            if first:
                self.C = X_fp.T @ Dx
            else:
                self.C.addmm_(X_fp.T, Dx)
        elif X_fp is not None:  # (X_fp W_i^T)^T D X: the float path's outputs of linear i against X
            if first:
                self.P = [(X_fp @ W.float().T).T @ Dx for W in self.projections]
            else:
                for P, W in zip(self.P, self.projections):
                    P.addmm_((X_fp @ W.float().T).T, Dx)
        if self.activation_stat:  # w >= 0, so |w x| = w |x|; the weighted copy is ours, taken in place
            batch_abs = (Dx.abs() if w is None else Dx.abs_()).sum(0)
            self.abs_sum = batch_abs if self.abs_sum is None else self.abs_sum + batch_abs
        self.S = self.S + (X.shape[0] if w is None else w.sum())
        self.tokens += X.shape[0]

    def _add_upper(self, X: torch.Tensor, Dx: torch.Tensor, edges: list[tuple[int, int]]) -> None:
        """M += X^T Dx on the blocks `edges` (`symmetric_blocks`) on and above the diagonal only."""
        for i, (a, b) in enumerate(edges):
            for c, d in edges[i:]:
                self._M[a:b, c:d].addmm_(X[:, a:b].T, Dx[:, c:d])
        self._lower_stale = True

    @property
    def M(self) -> torch.Tensor | None:
        """sum_t w_t x_t x_t^T, whole (blocks below the diagonal are copied from above when stale)."""
        if self._lower_stale:
            edges = symmetric_blocks(self._M.shape[0])
            for i, (a, b) in enumerate(edges):
                for c, d in edges[:i]:
                    self._M[a:b, c:d].copy_(self._M[c:d, a:b].T)
                diagonal = self._M[a:b, a:b]  # its own product is symmetric only up to rounding
                diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
            self._lower_stale = False
        return self._M

    @M.setter
    def M(self, value: torch.Tensor | None) -> None:
        self._M, self._lower_stale = value, False

    def _check(self) -> None:
        if self.M is None or self.tokens == 0:
            raise TLQError("no calibration tokens reached this linear group (all dropped by --drop-below or "
                           "--max-tokens?); keep more tokens")
        if self.weighted and not float(self.S) > 0:
            raise TLQError("token weights must not be all zero; check the importance pass")

    def hessian(self) -> torch.Tensor:
        """H = 2 M / S (a new tensor; M is kept)."""
        self._check()
        return (2.0 / self.S) * self.M

    def activation_statistic(self) -> torch.Tensor:
        """a / S: the (token-weighted) mean |x| per input channel, AWQ's get_act_scale."""
        self._check()
        if self.abs_sum is None:
            raise TLQError("the activation statistic was not collected; build the statistics with activation_stat")
        return self.abs_sum / self.S

    def input_energy(self) -> torch.Tensor:
        """diag(M) / S: the (token-weighted) mean x^2 per input channel (read before the GPTQ factor)."""
        self._check()
        if self.M is None:
            raise TLQError("input energy read after the GPTQ factor consumed M; read it first")
        return torch.diag(self.M) / self.S

    def exposure_factor(self, damp: float) -> ExposureFactor:
        """The exposure target's shared factor (cached); C is normalised in place (not needed otherwise)."""
        if damp not in self._exposure and self.C is None and self.P is None:
            raise TLQError("exposure correction needs the float path's inputs; none were collected")
        return self.gram_factor(damp)

    def gram_factor(self, damp: float) -> ExposureFactor:
        """Cholesky factor L of A + lam I, A = M / S, with C / S when the float path was collected (cached;
        the exposure factor). It must be built before `gptq_factor` consumes M."""
        if damp in self._exposure:
            return self._exposure[damp]
        A, lam = self.damped_gram(damp)
        C = projected = None
        if self.C is not None:
            self.C.div_(self.S)
            # on a GPU, C waits in host memory while GPTQ's factor is built (one K x K less on the device)
            C = self.C.cpu() if self.C.device.type != "cpu" else self.C
            self.C = None
        if self.P is not None:  # host-parked on a GPU as C is, with the weights they are matched by
            projected = [(W.cpu(), P.div_(self.S).cpu()) for W, P in zip(self.projections, self.P)]
            self.P = self.projections = None
        self._exposure[damp] = ExposureFactor(A, C, lam, projected)
        return self._exposure[damp]

    def damped_gram(self, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, lam): the lower Cholesky factor of A + lam I, A = M / S, lam = damp * mean diag A, in a new
        buffer; nothing held here is changed (the exposure factor's L, uncached)."""
        self._check()
        if self.M is None:
            raise TLQError("the Gram factor was requested after the GPTQ factor consumed M; build it first")
        # column-major storage: LAPACK factors it in place (a row-major out= costs a K x K temporary)
        K = self.M.shape[0]
        A = torch.empty_strided((K, K), (1, K), dtype=self.M.dtype, device=self.M.device)
        torch.div(self.M, self.S, out=A)
        lam = damp * torch.diag(A).mean().clamp(min=1e-12)
        A.diagonal().add_(lam)
        _, info = torch.linalg.cholesky_ex(A, out=(A, torch.empty((), dtype=torch.int32, device=A.device)))
        if info != 0:
            raise TLQError("exposure correction: the exposed-input Gram matrix is singular; raise damp")
        return A, lam

    def cross_product(self, W: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(W C / S)[rows] for one of the group's linears W [N, K], read without consuming C or the P_i."""
        Wr = W if rows is None else W[rows.to(W.device)]
        if self.C is not None:
            return (Wr @ self.C.to(W.device)) / self.S
        P = matching_moment(zip(self.projections or [], self.P or []), W)
        if P is not None:
            return (P if rows is None else P[rows.to(P.device)]).to(W.device) / self.S
        raise TLQError("no float-path moment of this weight was collected")

    def gptq_factor(self, damp: float, act_order: bool) -> HessianFactor:
        """GPTQ's factor of H = 2 M / S (cached). The first call turns M into H in place and uses it as
        scratch: build the exposure factor first when the group needs one."""
        key = (damp, act_order)
        if key not in self._gptq:
            self._check()
            if self._gptq:  # M is gone: another damping needs the statistics again
                raise TLQError("GPTQ factor requested twice with different settings for one group")
            self.M.mul_(2.0 / self.S)
            self._gptq[key] = hessian_factor(self.M, damp, act_order, overwrite=True)
            self.M = None
        return self._gptq[key]

    def scale_inputs_(self, s: torch.Tensor, damp: float, act_order: bool) -> None:
        """From now on solve in the coordinates x / s (TLQ's judged input scaling, tlq/calib/solved_scaling.py).

        With D = diag(1/s) the scaled problem has H' = D H D; damping it alike, D (H + lam I) D, gives
        (H'_damped)^-1 = (U D^-1)^T (U D^-1), so GPTQ's factor becomes U diag(s) (columns in processing
        order) without a new factorisation, and the exposure target becomes T diag(s) (the ridge is
        scale-equivariant the same way). The shared GPTQ factor is rescaled in place: solve every
        linear of the group in the unscaled coordinates first.
        """
        factor = self.gptq_factor(damp, act_order)
        factor.U.mul_(s.to(factor.U)[factor.perm][None, :])
        self.input_scale = s

    @contextmanager
    def scaled_inputs(self, s: torch.Tensor, damp: float, act_order: bool) -> Iterator[None]:
        """`scale_inputs_(s)` for the duration of a `with` block; on exit the unscaled GPTQ factor is back,
        bit for bit (a copy waits in host memory: one K x K more on the CPU, none on a GPU)."""
        factor = self.gptq_factor(damp, act_order)
        unscaled = factor.U.to("cpu", copy=True)
        self.scale_inputs_(s, damp, act_order)
        try:
            yield
        finally:
            factor.U.copy_(unscaled)
            self.input_scale = None

    def copy(self) -> InputStatistics:
        """An independent copy of the accumulated sums (before any factor is built: factors consume them)."""
        if self._exposure or self._gptq or self.input_scale is not None:
            raise TLQError("statistics copied after a factor was built from them; copy them first")
        other = InputStatistics(self.weighted, self.cross, self.activation_stat)
        other.M = None if self._M is None else self.M.clone()
        other.C = None if self.C is None else self.C.clone()
        other.projections = None if self.projections is None else list(self.projections)  # read-only weights
        other.P = None if self.P is None else [P.clone() for P in self.P]
        other.S = self.S.clone() if isinstance(self.S, torch.Tensor) else self.S
        other.abs_sum = None if self.abs_sum is None else self.abs_sum.clone()
        other.tokens = self.tokens
        return other

    def absorb(self, other: InputStatistics) -> None:
        """Add another set of the same group's sums into these (tokens of other samples; `other` is emptied)."""
        if (other.weighted, other.cross, other.activation_stat) != (self.weighted, self.cross, self.activation_stat):
            raise TLQError("statistics of different kinds cannot be merged")
        if self._exposure or self._gptq or other._exposure or other._gptq:
            raise TLQError("statistics merged after a factor was built from them; merge them first")
        if other._M is not None:
            if self._M is None:
                self.M = other.M
            else:
                self.M.add_(other.M)
        if other.C is not None:
            self.C = other.C if self.C is None else self.C.add_(other.C)
        if other.P is not None:
            if self.P is None:
                self.P, self.projections = other.P, other.projections
            else:
                for P, Q in zip(self.P, other.P):
                    P.add_(Q)
        if other.abs_sum is not None:
            self.abs_sum = other.abs_sum if self.abs_sum is None else self.abs_sum + other.abs_sum
        self.S = self.S + other.S
        self.tokens += other.tokens
        other.release()

    def drop_cross(self) -> None:
        """Free C / S once every exposure target of the group is formed (one K x K less); later solves must
        not correct exposure again."""
        for factor in self._exposure.values():
            factor.C = factor.projected = None

    def release(self) -> None:
        """Drop every K x K buffer (the group is solved)."""
        self.M = self.C = self.P = self.projections = None
        self._exposure.clear()
        self._gptq.clear()
