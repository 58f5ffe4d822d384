"""The streamed statistics of TLQ's largest group at real widths: today's arithmetic against C kept whole.

    python -m benchmarks.statistics_speed [--tokens 8192] [--batch 2048] [--repeats 3]

For the down projection of Qwen2-VL-2B (K = 8960 inputs, N = 1536 outputs) and -7B (18944, 3584)
it folds `--tokens` random tokens (bf16-exact inputs, token weights, a float path that differs) into
`tlq.quant.statistics.InputStatistics` in batches of `--batch`, both ways in the same process, and
prints the CPU time (one thread) and the bytes held:

    baseline   M by one product over all of K, and C = X_fp^T D X [K, K] (before commit bbfa3f7)
    tlq        M on and above its block diagonal only (`symmetric_blocks`), and P = W C [N, K]
               instead of C (`projects_cross`)

and checks that both give the same exposure target (to float rounding). Best of `--repeats` runs
per side: other processes on a shared machine only ever slow a run down. 7B needs about 6 GiB.
"""
from __future__ import annotations

import argparse
import time

import torch

from tlq.quant import statistics
from tlq.quant.statistics import InputStatistics
from tlq.quant.weighted_gptq import exposure_target

SHAPES = {"Qwen2-VL-2B down_proj": (8960, 1536), "Qwen2-VL-7B down_proj": (18944, 3584)}


def _inputs(tokens: int, K: int, N: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X_fp = torch.randn(tokens, K, generator=g).bfloat16()
    X_q = (X_fp.float() + 0.05 * torch.randn(tokens, K, generator=g)).bfloat16()
    w = torch.rand(tokens, generator=g) + 0.05
    W = (torch.randn(N, K, generator=g) / K**0.5).bfloat16()
    return X_q, X_fp, w, W


def _fold(X_q, X_fp, w, W, batch: int, new: bool) -> tuple[float, InputStatistics]:
    saved = statistics.SYMMETRIC_BLOCK
    statistics.SYMMETRIC_BLOCK = saved if new else 10**9  # the baseline: one product over all of K
    try:
        start = time.process_time()
        stats = InputStatistics(weighted=True, cross=True, projections=[W] if new else None)
        for a in range(0, len(X_q), batch):
            stats.add(X_q[a:a + batch], w[a:a + batch], X_fp[a:a + batch])
        stats.M  # noqa: B018 - reading M mirrors its blocks: part of the cost
        return time.process_time() - start, stats
    finally:
        statistics.SYMMETRIC_BLOCK = saved


def held_bytes(stats: InputStatistics) -> int:
    tensors = [stats.M] + ([stats.C] if stats.C is not None else []) + list(stats.P or [])
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{args.tokens} tokens in batches of {args.batch}, one thread, CPU time best of {args.repeats}")
    print(f"{'group':<24}{'baseline s':>11}{'tlq s':>8}{'tlq/base':>10}{'baseline GiB':>14}{'tlq GiB':>9}  target")
    for name in args.shapes:
        K, N = SHAPES[name]
        X_q, X_fp, w, W = _inputs(args.tokens, K, N)
        times = {True: float("inf"), False: float("inf")}
        kept = {}
        for _ in range(args.repeats):
            for new in (False, True):
                seconds, stats = _fold(X_q, X_fp, w, W, args.batch, new)
                times[new] = min(times[new], seconds)
                kept[new] = (held_bytes(stats), stats)
        targets = [exposure_target(W.float(), kept[new][1].exposure_factor(0.1), 0.5) for new in (False, True)]
        error = float((targets[1] - targets[0]).norm() / (targets[0] - W.float()).norm())
        print(f"{name:<24}{times[False]:>11.2f}{times[True]:>8.2f}{times[True] / times[False]:>9.2f}x"
              f"{kept[False][0] / 2**30:>14.2f}{kept[True][0] / 2**30:>9.2f}  "
              f"shift W* - W equal to {error:.1e} (relative)")
        del X_q, X_fp, kept, targets


if __name__ == "__main__":
    main()
