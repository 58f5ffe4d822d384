r"""The gradient pass: raw token importance from one FP forward and backward with the SFT loss.

L is the mean cross-entropy over answer tokens. For decoder layer l and every gradient source b
(the attention and MLP outputs, and each quantized linear's own output) the pass records, per
token t, mean_c |dL/dY^{l,b}_{t,c}| and mean_c (dL/dY^{l,b}_{t,c})^2 (rows of STATISTICS);
tlq/calib/importance.py turns them into calibration weights.

Layer-major (`token_gradients`, one process): each decoder layer goes to the device once per
direction for all samples, not once per sample.

    forward    for l = 0..L-1: layer l on the device, every sample through it without a graph;
               each sample's layer input is kept on the host in the pass's dtype
    loss       per sample, on the last layer's output (final norm + lm_head on the device)
    backward   for l = L-1..0: layer l on the device; per sample, recompute it with a graph
               from its stored input, back-propagate the sample's dL/d(output), record the
               statistics, keep dL/d(input) for layer l-1; then free layer l's stored inputs

Per sample and layer the arithmetic is that of the per-sample stages (`forward_stage`,
`backward_stage`, which the multi-rank pipeline runs, tlq/multirank/gradients.py): the same
calls on the same values, so the raw importance is bit-identical in either order. The stored
inputs (L x tokens x hidden) and the two gradient streams live in RAM while they fit the streams'
share of `--host-memory`, else in memory-mapped files in the work folder (tlq/calib/streams.py).
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tlq.adapters import ModelAdapter, get_submodule
from tlq.calib.capture import CapturedSample, to_device
from tlq.calib.rss import trim_heap_every
from tlq.calib.streams import SampleStore, StreamFolder, should_spill
from tlq.data.processing import IGNORE_INDEX

BLOCKS = ("attn", "mlp")
STATISTICS = {"abs": 0, "square": 1}  # row of a raw entry
# per sample: (layer, block or linear name) -> [2, T], rows mean |g| and mean g^2 (STATISTICS)
RawImportance = list[dict[tuple[int, str], torch.Tensor]]
GRADIENT_STREAMS = 2  # besides the stored inputs: dL/d(output) of the layer in work and dL/d(input) it yields


def sft_loss(model, adapter: ModelAdapter, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens. Logits are computed only at the positions that predict
    one: the final norm acts per token, so the loss and every gradient equal those of full logits,
    while the [T, vocab] fp32 logits (2.4 GB for 4k tokens at Qwen2-VL's 152k vocabulary) shrink to
    [answer tokens, vocab]."""
    norm = get_submodule(model, adapter.final_norm)
    lm_head = get_submodule(model, adapter.lm_head)
    targets = labels[0, 1:].to(hidden.device)  # the hidden state at t predicts token t + 1
    predicting = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    logits = lm_head(norm(hidden[0, :-1].index_select(0, predicting))).float()
    return F.cross_entropy(logits, targets[predicting])


def gradient_dtype(model) -> torch.dtype:
    """Where the gradient pass computes: fp16 has too little range for small token gradients (and
    there is no loss scaling), so fp16 models compute it in fp32; bf16 and fp32 ones in their dtype."""
    dtype = next(model.parameters()).dtype
    return torch.float32 if dtype == torch.float16 else dtype


def pass_bytes(tokens: int, hidden: int, num_layers: int, dtype: torch.dtype) -> int:
    """Host bytes of the layer-major pass's activations: every layer's stored inputs and the two
    gradient streams, tokens x hidden each in the pass's dtype."""
    return (num_layers + GRADIENT_STREAMS) * tokens * hidden * torch.empty((), dtype=dtype).element_size()


def token_gradients(model, adapter: ModelAdapter, samples: list[CapturedSample], device: str = "cpu",
                    progress: bool = True, spill_dir: Path | None = None, host_memory: float = float("inf"),
                    entry: Sequence[torch.Tensor] | None = None) -> RawImportance:
    """Raw importance a^{l,b}_t for every sample, layer and source, layer-major (module docstring).

    `entry`: the samples' entry hidden states when the caller keeps them elsewhere (a spilled
    store, tlq/calib/streams.py); default each sample's `hidden`. The activations spill to files
    under `spill_dir` (a folder of its own, deleted at the end) when `pass_bytes` exceeds the
    streams' share of `host_memory` GiB (tlq/calib/streams.should_spill)."""
    for sample in samples:
        if (sample.labels != IGNORE_INDEX).sum() == 0:
            raise ValueError(f"sample {sample.sample_id} has no answer tokens")
    layers = adapter.layers(model)
    dtype = gradient_dtype(model)
    entry = [s.hidden for s in samples] if entry is None else entry
    tokens = sum(s.num_tokens for s in samples)
    spill = spill_dir is not None and should_spill(pass_bytes(tokens, entry[0].shape[-1], len(layers), dtype),
                                                   host_memory)
    streams = StreamFolder(spill_dir if spill else None)
    bar = tqdm(total=2 * len(layers), desc="gradients", disable=not progress, unit="layer")
    try:
        inputs = [streams.new(f"gradients-input-L{i:04d}") for i in range(len(layers))]
        for h in entry:
            inputs[0].append(h.to(dtype))
        grads = streams.new("gradients-grad-out")
        head = [get_submodule(model, adapter.final_norm), get_submodule(model, adapter.lm_head)]
        for index, layer in enumerate(layers):
            last = index == len(layers) - 1
            with ExitStack() as on:
                for module in [layer] + (head if last else []):
                    on.enter_context(on_device(module, device, dtype))
                for i, sample in enumerate(samples):
                    h = _forward_layer(layer, inputs[index][i], _kwargs(sample, device, dtype), device)
                    if last:
                        grads.append(_loss_gradient(model, adapter, h, sample).cpu())
                    else:
                        inputs[index + 1].append(h.cpu())
                    del h
                    trim_heap_every(sample.num_tokens)
            bar.update()
        raw: RawImportance = [{} for _ in samples]
        sources = _sources(adapter)
        for index in reversed(range(len(layers))):
            into = streams.new(f"gradients-grad-L{index:04d}")
            with on_device(layers[index], device, dtype):
                for i, sample in enumerate(samples):
                    into.append(_backward_layer(layers[index], index, sources, inputs[index][i],
                                                grads[i].to(device), _kwargs(sample, device, dtype), device,
                                                raw[i]).cpu())
                    trim_heap_every(sample.num_tokens)
            _free(inputs[index])
            _free(grads)
            grads = into
            bar.update()
        _free(grads)
    finally:
        bar.close()
        if streams.root is not None:
            shutil.rmtree(streams.root, ignore_errors=True)
    return raw


def _free(stream) -> None:
    """Drop a stream's tensors now: a spilled store's files, or the references a list holds."""
    if isinstance(stream, SampleStore):
        stream.delete()
    else:
        stream.clear()


def _kwargs(sample: CapturedSample, device: str, dtype: torch.dtype) -> dict:
    return to_device(sample.layer_kwargs, device, dtype)


def _sources(adapter: ModelAdapter) -> dict[str, str]:
    """Gradient source name -> module path inside a decoder layer: the blocks and every quantized linear."""
    return {b: getattr(adapter, f"{b}_module") for b in BLOCKS} | {n: n for n in adapter.linear_names()}


def _loss_gradient(model, adapter: ModelAdapter, h: torch.Tensor, sample: CapturedSample) -> torch.Tensor:
    """dL/d(last layer's output) of one sample (the final norm and lm_head are where `h` is)."""
    with torch.enable_grad():
        h = h.detach().requires_grad_(True)
        sft_loss(model, adapter, h, sample.labels).backward()
    return h.grad


def _forward_layer(layer, x: torch.Tensor, kwargs: dict, device: str) -> torch.Tensor:
    with torch.no_grad():
        return layer(x.to(device), **kwargs)


def _backward_layer(layer, index: int, sources: dict[str, str], x: torch.Tensor, grad: torch.Tensor, kwargs: dict,
                    device: str, per_layer: dict) -> torch.Tensor:
    """Recompute `layer` with a graph from its input `x`, back-propagate `grad` (dL/d output), fill
    per_layer[(index, source)] (rows: STATISTICS); returns dL/d x."""
    outputs = {}
    hooks = [get_submodule(layer, path).register_forward_hook(_keep_output(outputs, name))
             for name, path in sources.items()]
    try:
        with torch.enable_grad():
            x = x.to(device).detach().requires_grad_(True)  # detached: the stored tensor gets no .grad
            layer(x, **kwargs).backward(grad)
    finally:
        for hk in hooks:
            hk.remove()
    for name in sources:
        g = outputs[name].grad.float()[0]
        per_layer[(index, name)] = torch.stack([g.abs().mean(-1), g.square().mean(-1)]).cpu()
    return x.grad


def forward_stage(layers, indices: range, h: torch.Tensor, kwargs: dict, device: str,
                  dtype: torch.dtype | None = None):
    """One sample through layers[indices] (no graph); returns each layer's input (on CPU) and the output.

    The per-sample half of a pipeline stage of the multi-rank gradient pass (tlq/multirank/gradients.py)."""
    inputs = []
    for index in indices:
        inputs.append(h.cpu())
        with on_device(layers[index], device, dtype):
            h = _forward_layer(layers[index], h, kwargs, device)
    return inputs, h


def backward_stage(adapter: ModelAdapter, layers, indices: range, inputs: list[torch.Tensor], grad: torch.Tensor,
                   kwargs: dict, device: str, per_layer: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One sample back through layers[indices], last to first, each recomputed from its stored input;
    fills per_layer[(index, source)] for every source and returns dL/d(first input)."""
    sources = _sources(adapter)
    for index in reversed(indices):
        with on_device(layers[index], device, dtype):
            grad = _backward_layer(layers[index], index, sources, inputs[index - indices.start], grad, kwargs,
                                   device, per_layer)
    return grad


def _keep_output(store: dict, name: str):
    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out.retain_grad()
        store[name] = out
    return hook


class on_device:
    """Context manager: a module on `device` (and in `dtype`, when given) for the duration, back to
    the CPU and its own dtype after (exact: fp16 and bf16 values are fp32 values)."""

    def __init__(self, module, device, dtype: torch.dtype | None = None):
        self.module, self.device = module, device
        self.own = next(module.parameters()).dtype
        self.dtype = dtype or self.own

    def __enter__(self):
        if self.device != "cpu" or self.dtype != self.own:
            self.module.to(self.device, self.dtype)

    def __exit__(self, *exc):
        if self.device != "cpu" or self.dtype != self.own:
            self.module.to("cpu", self.own)
