"""The gradient pass as a pipeline: activations flow forward rank to rank, gradients back.

Samples are the micro-batches of a 1F1B schedule (as in PipeDream-flush): rank r runs
`world - r - 1` forwards ahead, then alternates one forward and one backward, then drains. So
all ranks compute at once on different samples, and a rank never holds the stored layer inputs
of more than `world - r` samples. Per sample and stage the arithmetic is exactly that of
`gradient_pass.token_gradients` (the same `forward_stage` / `backward_stage`), and tensors cross
ranks bit for bit, so every rank's raw importance equals the single-process one for its layers.
"""
from __future__ import annotations

from tqdm.auto import tqdm

from tlq.adapters import ModelAdapter, get_submodule
from tlq.calib.capture import CapturedSample, to_device
from tlq.calib.gradient_pass import (
    RawImportance,
    backward_stage,
    forward_stage,
    gradient_dtype,
    on_device,
    sft_loss,
)
from tlq.calib.rss import trim_heap_every
from tlq.multirank.context import RankContext


def pipeline_gradients(ctx: RankContext, model, adapter: ModelAdapter, stage: range,
                       samples: list[CapturedSample], device: str, progress: bool = True
                       ) -> tuple[RawImportance, list]:
    """Raw importance of this stage's layers per sample, and the FP stream at the stage's entry
    (per sample, on CPU: the FP path of the layer loop starts from it, see stage_loop.py; None when
    the pass computed in another dtype than the layer loop does, fp16 models: see gradient_dtype)."""
    comm, layers, n = ctx.comm, adapter.layers(model), len(samples)
    dtype = gradient_dtype(model)
    same_numerics = dtype == next(model.parameters()).dtype
    if ctx.is_last:
        head = [on_device(get_submodule(model, adapter.final_norm), device, dtype),
                on_device(get_submodule(model, adapter.lm_head), device, dtype)]
        for m in head:
            m.__enter__()
    raw: RawImportance = [{} for _ in range(n)]
    entry: list = [None] * n
    held: dict[int, tuple] = {}
    bar = tqdm(total=n, desc=f"gradients (rank {ctx.rank})", disable=not progress, unit="sample")

    def forward(i: int) -> None:
        sample = samples[i]
        h = sample.hidden.to(dtype) if ctx.is_first else comm.recv(ctx.rank - 1)
        entry[i] = h
        kwargs = to_device(sample.layer_kwargs, device, dtype)
        inputs, out = forward_stage(layers, stage, h, kwargs, device, dtype)
        grad = None
        if ctx.is_last:
            out = out.detach().requires_grad_(True)
            if (sample.labels != -100).sum() == 0:
                raise ValueError(f"sample {sample.sample_id} has no answer tokens")
            sft_loss(model, adapter, out, sample.labels).backward()
            grad = out.grad
        else:
            comm.send(out.cpu(), ctx.rank + 1)
        held[i] = (inputs, grad, kwargs)

    def backward(i: int) -> None:
        inputs, grad, kwargs = held.pop(i)
        if grad is None:
            grad = comm.recv(ctx.rank + 1).to(device)
        grad_in = backward_stage(adapter, layers, stage, inputs, grad, kwargs, device, raw[i], dtype)
        if not ctx.is_first:
            comm.send(grad_in.cpu(), ctx.rank - 1)
        trim_heap_every(samples[i].num_tokens)  # as the single-process pass: heap fragmentation, not live bytes
        bar.update()

    ctx.watchdog.phase = "the gradient pass"
    warmup = min(ctx.world - ctx.rank - 1, n)
    for i in range(warmup):
        forward(i)
    for i in range(warmup, n):
        forward(i)
        backward(i - warmup)
    for i in range(n - warmup, n):
        backward(i)
    comm.flush()
    bar.close()
    if ctx.is_last:
        for m in head:
            m.__exit__()
    return raw, entry if same_numerics else None
