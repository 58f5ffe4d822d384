r"""Token importance: the one place where gradients become calibration weights.

Gradient pass (`token_gradients`): one FP forward and backward per sample with the SFT
loss L (mean cross-entropy over answer tokens). For decoder layer l and sub-module
b in {attn, mlp} with output Y^{l,b} in R^{T x C}, the raw importance of token t is

    a^{l,b}_t = (1/C) * sum_c | dL / dY^{l,b}_{t,c} |.

The backward pass never holds more than one layer's graph: the forward stores each
layer's input (on CPU), then layers are recomputed one at a time from the last to the
first, each receiving the gradient of its output and passing on the gradient of its input.

Integration (`integrate`), per layer l and block b, over all calibration tokens, with M(t)
the modality of token t (prompt text, vision, answer):

    clip        c_t   = clip(a_t, Q1 - k IQR, Q3 + k IQR)                 (outliers)
    prior       p_M   = mean_{t in M} c_t                                (modality level)
    score       s_t   = lambda * p_{M(t)} + (1 - lambda) * c_t           (token level, smoothed)
    normalise   w_t   = s_t / mean(s)
    floor       w_t  <- max(w_t, w_min) / mean(max(w, w_min))            (never zero)

mode "modality_prior" uses lambda = 1 (TLQ's modality-level ablation); "uniform" gives
w_t = 1; mode "modality" is MBQ's published weighting: answer tokens 1, vision tokens
r_l = p_vision / p_answer (floored at the median of r over layers), prompt tokens 0.
Pure per-token weights (lambda = 0, no floor) are deliberately not the default: MBQ and QIG
found them worse than modality-level weights because many vision tokens get almost no
gradient; the prior and the floor keep every token in the calibration set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tlq.adapters import ModelAdapter, get_submodule
from tlq.calib.capture import ANSWER, MODALITY_NAMES, VISION, CapturedSample, to_device
from tlq.calib.config import ImportanceConfig

BLOCKS = ("attn", "mlp")
RawImportance = list[dict[tuple[int, str], torch.Tensor]]  # per sample: (layer, block) -> a [T]


def sft_loss(model, adapter: ModelAdapter, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    norm = get_submodule(model, adapter.final_norm)
    lm_head = get_submodule(model, adapter.lm_head)
    logits = lm_head(norm(hidden)).float()
    return F.cross_entropy(logits[0, :-1], labels[0, 1:].to(logits.device), ignore_index=-100)


def token_gradients(model, adapter: ModelAdapter, samples: list[CapturedSample], device: str = "cpu",
                    progress: bool = True) -> RawImportance:
    """Raw importance a^{l,b}_t for every sample, layer and block (see module docstring)."""
    layers = adapter.layers(model)
    head = [get_submodule(model, adapter.final_norm), get_submodule(model, adapter.lm_head)]
    for m in head:
        m.to(device)
    raw: RawImportance = []
    every = range(len(layers))
    for sample in tqdm(samples, desc="gradients", disable=not progress, unit="sample"):
        kwargs = to_device(sample.layer_kwargs, device)
        inputs, h = forward_stage(layers, every, sample.hidden, kwargs, device)
        h = h.detach().requires_grad_(True)
        if (sample.labels != -100).sum() == 0:
            raise ValueError(f"sample {sample.sample_id} has no answer tokens")
        sft_loss(model, adapter, h, sample.labels).backward()
        per_layer = {}
        backward_stage(adapter, layers, every, inputs, h.grad, kwargs, device, per_layer)
        raw.append(per_layer)
    for m in head:
        m.to("cpu")
    return raw


def forward_stage(layers, indices: range, h: torch.Tensor, kwargs: dict, device: str):
    """FP forward through layers[indices] (no graph); returns each layer's input (on CPU) and the output.

    A pipeline stage of the multi-rank gradient pass (tlq/dist) runs the same two halves.
    """
    inputs = []
    with torch.no_grad():
        for index in indices:
            inputs.append(h.cpu())
            with _on(layers[index], device):
                h = layers[index](h.to(device), **kwargs)
    return inputs, h


def backward_stage(adapter: ModelAdapter, layers, indices: range, inputs: list[torch.Tensor], grad: torch.Tensor,
                   kwargs: dict, device: str, per_layer: dict) -> torch.Tensor:
    """Recompute layers[indices] one at a time, last to first, each from its stored input, passing
    `grad` (dL/d output) back; fills per_layer[(index, block)] and returns dL/d(first input)."""
    for index in reversed(indices):
        layer = layers[index]
        outputs = {}
        hooks = [get_submodule(layer, getattr(adapter, f"{b}_module")).register_forward_hook(
            _keep_output(outputs, b)) for b in BLOCKS]
        try:
            with _on(layer, device), torch.enable_grad():
                x = inputs[index - indices.start].to(device).requires_grad_(True)
                layer(x, **kwargs).backward(grad)
        finally:
            for hk in hooks:
                hk.remove()
        for b in BLOCKS:
            per_layer[(index, b)] = outputs[b].grad.float().abs().mean(-1)[0].cpu()
        grad = x.grad
    return grad


def _keep_output(store: dict, block: str):
    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out.retain_grad()
        store[block] = out
    return hook


class _on:
    """Context manager: a module on `device` for the duration, back to CPU after."""

    def __init__(self, module, device):
        self.module, self.device = module, device

    def __enter__(self):
        if self.device != "cpu":
            self.module.to(self.device)

    def __exit__(self, *exc):
        if self.device != "cpu":
            self.module.to("cpu")


def _modality_prior(a: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    prior = torch.empty_like(a)
    for m in MODALITY_NAMES:
        mask = modality == m
        if mask.any():
            prior[mask] = a[mask].mean()
    return prior


def _token_weights(a: torch.Tensor, modality: torch.Tensor, cfg: ImportanceConfig) -> torch.Tensor:
    lam = 1.0 if cfg.mode == "modality_prior" else cfg.prior_mix
    q1, q3 = torch.quantile(a, torch.tensor([0.25, 0.75], dtype=a.dtype))
    c = a.clamp(min=float(q1 - cfg.iqr_clip * (q3 - q1)), max=float(q3 + cfg.iqr_clip * (q3 - q1)))
    s = lam * _modality_prior(c, modality) + (1 - lam) * c
    w = s / s.mean().clamp(min=1e-12)
    w = w.clamp(min=cfg.floor)
    return w / w.mean()


def _mbq_ratios(raw_all: dict, modality: torch.Tensor, gather=None) -> dict:
    """MBQ's r_l = mean grad over vision / over answer tokens, floored at the median over layers.

    `gather` maps this process's ratios to those of every layer (a multi-rank run holds a share
    of the layers); the median is order-free, so the result equals the single-process one."""
    ratios = {}
    for key, a in raw_all.items():
        vis, ans = a[modality == VISION], a[modality == ANSWER]
        ratios[key] = float(vis.mean() / ans.mean().clamp(min=1e-12)) if len(vis) and len(ans) else 1.0
    every = gather(ratios) if gather is not None else ratios
    median = float(torch.tensor(list(every.values())).median()) if every else 1.0
    return {k: max(r, median) for k, r in ratios.items()}


def integrate(raw: RawImportance, modalities: list[torch.Tensor], cfg: ImportanceConfig, gather=None
              ) -> list[dict[tuple[int, str], torch.Tensor]]:
    """Final per-token weights, same structure as `raw` (see the module docstring).

    Every step is per (layer, block) except MBQ's median over layers: `gather` (see _mbq_ratios)."""
    lengths = [len(m) for m in modalities]
    modality = torch.cat(modalities)
    keys = list(raw[0].keys())
    raw_all = {k: torch.cat([r[k] for r in raw]) for k in keys}
    weights_all = {}
    if cfg.mode == "modality":
        ratios = _mbq_ratios(raw_all, modality, gather)
    for key in keys:
        if cfg.mode == "uniform":
            w = torch.ones(len(modality))
        elif cfg.mode == "modality":
            w = torch.zeros(len(modality))
            w[modality == ANSWER] = 1.0
            w[modality == VISION] = ratios[key]
        else:
            w = _token_weights(raw_all[key].double(), modality, cfg).float()
        weights_all[key] = w
    per_sample = [{} for _ in raw]
    for key, w in weights_all.items():
        for i, part in enumerate(torch.split(w, lengths)):
            per_sample[i][key] = part
    return per_sample


def uniform_weights(samples: list[CapturedSample], num_layers: int) -> list[dict]:
    return [{(i, b): torch.ones(s.num_tokens) for i in range(num_layers) for b in BLOCKS} for s in samples]


def weight_statistics(weights: list[dict], modalities: list[torch.Tensor]) -> dict:
    """Token counts per modality and weight quantiles per modality (for the manifest)."""
    modality = torch.cat(modalities)
    allw = torch.stack([torch.cat([w[k] for w in weights]) for k in weights[0]]).mean(0)
    stats = {"tokens": int(len(modality)), "tokens_per_modality": {}, "weight_quantiles": {}}
    qs = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    for m, name in MODALITY_NAMES.items():
        mask = modality == m
        stats["tokens_per_modality"][name] = int(mask.sum())
        if mask.any():
            stats["weight_quantiles"][name] = [round(float(v), 4) for v in torch.quantile(allw[mask].double(), qs.double())]
    return stats
