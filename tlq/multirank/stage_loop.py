"""The quantization-exposed layer loop as a pipeline of stages.

What overlaps and what cannot:
  * The quantized path cannot overlap across stages. Calibrating layer i needs the quantized
    outputs of layer i-1 for *every* sample (its Hessian and scale search cover all calibration
    tokens), and those exist only once layer i-1 is calibrated. So stage r starts its first layer
    when stage r-1 has finished its last one; splitting micro-batches does not change that. The
    layer loop's wall time stays about that of one process; the ranks divide memory, not this time.
  * The FP path overlaps. It never depends on quantized layers, so each stage computes its layers'
    FP outputs (the targets y_fp, and for `corrected` exposure the FP inputs) ahead, while earlier
    stages are still calibrating, and its loop then skips those forwards (`fp_targets`). The FP
    entry stream comes from the gradient pass when there is one (its forward is the FP path), else
    from one pipelined FP forward over the ranks (`fp_prefetch`). Bounded by TLQ_FP_PREFETCH_MB
    (in RAM, or on disk when the stage spills its streams: they count in the spill rule).
  * Writing overlaps: a rank packs and writes its shard as soon as its stage is done, while later
    stages calibrate (run.py).
Streams cross ranks one sample at a time (`send_stream` / `recv_stream`): a spilled one is
written to the receiver's work folder as it arrives and read from the sender's one sample at a time.
The FP targets computed ahead are bit-identical to the ones the loop would compute (same layer,
same inputs, same kernels), so the checkpoint equals the single-process one.
"""
from __future__ import annotations

import torch

from tlq.adapters import ModelAdapter
from tlq.calib.capture import CapturedSample
from tlq.calib.config import CalibConfig
from tlq.calib.layer_loop import LoopResult, WorkFolder, run_layer, run_layer_loop
from tlq.calib.streams import StreamFolder, stream_name
from tlq.multirank.comm import Comm
from tlq.multirank.context import RankContext


def send_stream(comm: Comm, stream, dst: int) -> None:
    """A stream to rank `dst`, one sample at a time (what `Comm.send_list` sends, without holding
    every sample of a spilled stream mapped until the receiver has them all)."""
    comm.send(torch.tensor([len(stream)], dtype=torch.int64), dst)
    for t in stream:
        comm.send(t, dst)
        comm.flush()


def recv_stream(comm: Comm, src: int, into):
    """What `send_stream` sends, appended sample by sample to `into` (a list or a spilled store)."""
    for _ in range(int(comm.recv(src)[0])):
        into.append(comm.recv(src))
    return into


def ahead_count(is_first: bool, chain: bool, stage: range, first: int, stream_size: int, budget_bytes: float) -> int:
    """How many FP targets `fp_prefetch` computes ahead: the layers from `first` on that fit the
    budget (an output is the size of its input), none on rank 0 when the gradient pass gave the
    entry stream (rank 0 never waits, so it gains nothing from computing ahead)."""
    if is_first and not chain:
        return 0
    return max(0, min(stage.stop - max(first, stage.start), int(budget_bytes // max(stream_size, 1))))


def fp_prefetch(ctx: RankContext, model, adapter: ModelAdapter, stage: range, samples: list[CapturedSample],
                entry: list | None, device: str, ahead: int, first: int, streams: StreamFolder) -> tuple:
    """FP outputs of `ahead` of this stage's layers from `first` on (`ahead_count`).

    `entry` None: no gradient pass supplied the stage's FP entry stream, so it arrives from
    rank r-1 (one FP forward of the whole model, pipelined over the ranks) and the exit stream
    goes on to rank r+1. Returns (entry stream, {layer: y_fp}), each where `streams` keeps streams.
    """
    chain = entry is None
    ctx.watchdog.phase = "the FP forward"
    if chain:
        entry = ([s.hidden for s in samples] if ctx.is_first
                 else recv_stream(ctx.comm, ctx.rank - 1, streams.new("entry-fp")))
    elif ahead == 0:
        return entry, {}
    entry = streams.take(entry, "entry-fp")
    layers, kwargs = adapter.layers(model), [s.layer_kwargs for s in samples]
    targets, h = {}, entry
    for i in stage:
        keep = i >= first and len(targets) < ahead
        if not chain and i >= first and not keep:
            break  # nothing more to keep, and nobody needs this stage's exit stream
        layers[i].to(device)
        # a target under the name the loop would give it; other outputs in two scratch streams
        h = run_layer(layers[i], h, kwargs, device, into=streams.new(stream_name(i, "fp") if keep else f"chain-{i % 2}"))
        layers[i].to("cpu")
        if keep:
            targets[i] = h
    if chain and not ctx.is_last:
        send_stream(ctx.comm, h, ctx.rank + 1)
    return entry, targets


def run_stage(ctx: RankContext, model, adapter: ModelAdapter, samples: list[CapturedSample], weights: list[dict],
              cfg: CalibConfig, work: WorkFolder, done: int, stage: range, fp_entry,
              targets: dict[int, list], progress: bool, keep=None, streams: StreamFolder | None = None) -> LoopResult:
    """Wait for the previous stage's quantized stream, calibrate this stage, pass the stream on.
    The loop owns the entry streams (tlq/calib/layer_loop.run_layer_loop): none stays in RAM."""
    streams = streams or StreamFolder(None)
    if ctx.is_first:
        h_q = [s.hidden for s in samples]
    else:
        ctx.wait_for([f"handoff/{ctx.rank - 1}"], f"waiting for rank {ctx.rank - 1} to calibrate its layers")
        # a resumed stage (done > start) ignores it: its state has h_q
        h_q = recv_stream(ctx.comm, ctx.rank - 1, streams.new("entry-q"))
    ctx.watchdog.phase = f"the layer loop (layers {stage.start}-{stage.stop - 1})"
    result = run_layer_loop(model, adapter, samples, weights, cfg, work, done, layer_range=stage,
                            start_streams=(h_q, fp_entry), progress=progress, fp_targets=targets, keep=keep,
                            streams=streams)
    if not ctx.is_last:
        ctx.post(f"handoff/{ctx.rank}")
        send_stream(ctx.comm, result.final_streams[0], ctx.rank + 1)
    result.final_streams = None
    return result
