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
    from one pipelined FP forward over the ranks (`fp_prefetch`). Bounded by TLQ_FP_PREFETCH_MB.
  * Writing overlaps: a rank packs and writes its shard as soon as its stage is done, while later
    stages calibrate (run.py).
The FP targets computed ahead are bit-identical to the ones the loop would compute (same layer,
same inputs, same kernels), so the checkpoint equals the single-process one.
"""
from __future__ import annotations

from tlq.adapters import ModelAdapter
from tlq.calib.capture import CapturedSample
from tlq.calib.config import CalibConfig
from tlq.calib.layer_loop import LoopResult, WorkFolder, run_layer, run_layer_loop
from tlq.multirank.context import RankContext


def stream_bytes(stream: list) -> int:
    return sum(t.numel() * t.element_size() for t in stream)


def fp_prefetch(ctx: RankContext, model, adapter: ModelAdapter, stage: range, samples: list[CapturedSample],
                entry: list | None, device: str, budget_mb: float, first: int) -> tuple[list, dict[int, list]]:
    """FP outputs of this stage's layers from `first` on, as far as `budget_mb` allows.

    `entry` None: no gradient pass supplied the stage's FP entry stream, so it arrives from
    rank r-1 (one FP forward of the whole model, pipelined over the ranks) and the exit stream
    goes on to rank r+1. Returns (entry stream, {layer: y_fp}).
    """
    chain = entry is None
    ctx.watchdog.phase = "the FP forward"
    if chain:
        entry = [s.hidden for s in samples] if ctx.is_first else ctx.comm.recv_list(ctx.rank - 1)
    elif ctx.is_first or first >= stage.stop:
        return entry, {}  # rank 0 never waits, so it gains nothing from computing ahead
    layers, kwargs = adapter.layers(model), [s.layer_kwargs for s in samples]
    room = budget_mb * 2**20
    targets, h = {}, entry
    for i in stage:
        keep = i >= first and room >= stream_bytes(h)  # an output is the size of its input
        if not chain and i >= first and not keep:
            break  # nothing more to keep, and nobody needs this stage's exit stream
        layers[i].to(device)
        h = run_layer(layers[i], h, kwargs, device)
        layers[i].to("cpu")
        if keep:
            targets[i] = h
            room -= stream_bytes(h)
    if chain and not ctx.is_last:
        ctx.comm.send_list(h, ctx.rank + 1)
        ctx.comm.flush()
    return entry, targets


def run_stage(ctx: RankContext, model, adapter: ModelAdapter, samples: list[CapturedSample], weights: list[dict],
              cfg: CalibConfig, work: WorkFolder, done: int, stage: range, fp_entry: list,
              targets: dict[int, list], progress: bool, keep=None) -> LoopResult:
    """Wait for the previous stage's quantized stream, calibrate this stage, pass the stream on."""
    if ctx.is_first:
        h_q = [s.hidden for s in samples]
    else:
        ctx.wait_for([f"handoff/{ctx.rank - 1}"], f"waiting for rank {ctx.rank - 1} to calibrate its layers")
        h_q = ctx.comm.recv_list(ctx.rank - 1)  # a resumed stage (done > start) ignores it: its state has h_q
    ctx.watchdog.phase = f"the layer loop (layers {stage.start}-{stage.stop - 1})"
    result = run_layer_loop(model, adapter, samples, weights, cfg, work, done, layer_range=stage,
                            start_streams=(h_q, fp_entry), progress=progress, fp_targets=targets, keep=keep)
    if not ctx.is_last:
        ctx.post(f"handoff/{ctx.rank}")
        ctx.comm.send_list(result.final_streams[0], ctx.rank + 1)
        ctx.comm.flush()
    return result
