"""What ranks tell each other besides hidden states: sample metadata, agreement flags, results."""
from __future__ import annotations

import json

import torch

from tlq.calib.capture import CapturedSample
from tlq.multirank.context import RankContext


def share_samples(ctx: RankContext, captured: list[CapturedSample] | None) -> list[CapturedSample]:
    """Rank 0 sends each rank the per-sample layer arguments, labels and modality; the entry
    hidden states stay on rank 0 (receivers get a [1, T, 0] placeholder that keeps T)."""
    if ctx.is_first:
        meta = [(s.sample_id, s.num_tokens, s.layer_kwargs, s.labels, s.modality) for s in captured]
        ctx.post("samples")
        for r in range(1, ctx.world):
            ctx.comm.send_object(meta, r)
        ctx.comm.flush()
        return captured
    ctx.wait_for(["samples"], "waiting for rank 0 to capture the calibration inputs")
    meta = ctx.comm.recv_object(0)
    return [CapturedSample(sid, torch.empty(1, t, 0), kwargs, labels, modality)
            for sid, t, kwargs, labels, modality in meta]


def all_agree(ctx: RankContext, name: str, flag: bool) -> bool:
    """True when every rank says yes (through the store: no transfer timeout while others load)."""
    ctx.post(f"{name}/{ctx.rank}", "1" if flag else "0")
    keys = [f"{name}/{r}" for r in range(ctx.world)]
    ctx.wait_for(keys, f"agreeing on {name}")
    return all(ctx.store.get(k) == b"1" for k in keys)


def mbq_gather(ctx: RankContext):
    """`integrate(..., gather=)` for MBQ: every rank's per-layer ratios (the median spans all layers)."""
    def gather(ratios: dict) -> dict:
        ctx.post(f"mbq/{ctx.rank}", json.dumps([[k[0], k[1], v] for k, v in ratios.items()]))
        keys = [f"mbq/{r}" for r in range(ctx.world)]
        ctx.wait_for(keys, "gathering MBQ ratios")
        every = {}
        for k in keys:
            every.update({(i, b): v for i, b, v in json.loads(ctx.store.get(k))})
        return every
    return gather


def merge_weights(per_rank: list[list[dict] | None], world: int) -> list[dict]:
    """Per-sample token weights of every layer, keys in the single-process order (the gradient
    pass fills them last layer first, so the last rank's come first): weight_statistics averages
    over keys in that order, and float sums depend on it."""
    merged = [{} for _ in per_rank[0]]
    for r in reversed(range(world)):
        for i, w in enumerate(per_rank[r]):
            merged[i].update(w)
    return merged


def collect(ctx: RankContext, summary: dict) -> list[dict] | None:
    """Rank 0 gets every rank's summary (after all have written their shards); others get None."""
    ctx.post(f"written/{ctx.rank}")
    if not ctx.is_first:
        ctx.wait_for(["collect"], "waiting for the other ranks to finish")
        ctx.comm.send_object(summary, 0)
        ctx.comm.flush()
        return None
    ctx.wait_for([f"written/{r}" for r in range(ctx.world)], "waiting for the other ranks to finish")
    ctx.post("collect")
    return [summary] + [ctx.comm.recv_object(r) for r in range(1, ctx.world)]
