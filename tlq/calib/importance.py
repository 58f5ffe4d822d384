r"""Token importance: the one place where gradients become calibration weights.

Gradient pass (`token_gradients`): one FP forward and backward per sample with the SFT
loss L (mean cross-entropy over answer tokens). For decoder layer l and every gradient
source b (the attention and MLP outputs, and each quantized linear's own output) with
output Y^{l,b} in R^{T x C}, two raw statistics of token t are kept:

    abs     a_t = (1/C) * sum_c | dL / dY^{l,b}_{t,c} |          (MBQ)
    square  a_t = (1/C) * sum_c ( dL / dY^{l,b}_{t,c} )^2       (Fisher / Taylor, VLMQ's G^2)

The backward pass never holds more than one layer's graph: the forward stores each
layer's input (on CPU), then layers are recomputed one at a time from the last to the
first, each receiving the gradient of its output and passing on the gradient of its input.

Integration (`integrate`), per layer l and source b, over all calibration tokens, with
M(t) the modality of token t (prompt text, vision, answer) and NZ_M the tokens of M that
received gradient (a_t > 0):

    fence       Q1_M, Q3_M = quartiles of {a_t : t in NZ_M},  I_M = Q3_M - Q1_M   (per modality)
    clip        c_t = clip(a_t, max(0, Q1_M - k I_M), Q3_M + k I_M)  for t in NZ_M;  c_t = 0 else
    prior       p_M = mean_{t in M} c_t                              (modality level, zeros count)
    score       s_t = lambda * p_{M(t)} + (1 - lambda) * c_t        (token level, smoothed)
    normalise   w_t = s_t / mean(s)
    floor       w_t  <- max(w_t, w_min) / mean(max(w, w_min))       (never zero)

The fence is per modality and over nonzero values because one fence over all tokens erases
the signal: answer tokens carry the largest gradients and are a minority, so a shared fence,
set by the vision tokens, cuts them down to the vision level; and where at least 75% of the
tokens get no gradient (the last layer, where only positions that predict answer tokens do)
Q1 = Q3 = 0 clips every token to 0 and the floor leaves all weights at 1. A modality with
fewer than MIN_FENCE_TOKENS nonzero values is not clipped (its quartiles say nothing).

mode "modality_prior" uses lambda = 1 (TLQ's modality-level ablation); "uniform" gives
w_t = 1; mode "modality" is MBQ's published weighting (thu-nics/MBQ, pre_quant.py): answer
tokens 1, vision tokens r_l = g_vis / g_ans of the block output (per-sample means of |g|,
averaged over samples), floored at the median of r over the layers of the same block type,
prompt tokens 0. Pure per-token weights (lambda = 0, no floor) are deliberately not the default:
MBQ and QIG found them worse than modality-level weights because many vision tokens get almost
no gradient; the prior and the floor keep every token in the calibration set.

With source "linear" a linear group's weight is the mean of its linears' weights
(`group_weights`); with "block" it is its block's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tlq.adapters import LinearGroup, ModelAdapter, get_submodule
from tlq.calib.capture import ANSWER, MODALITY_NAMES, VISION, CapturedSample, to_device
from tlq.calib.config import ImportanceConfig

BLOCKS = ("attn", "mlp")
STATISTICS = {"abs": 0, "square": 1}  # row of a raw entry
MIN_FENCE_TOKENS = 4
# per sample: (layer, block or linear name) -> [2, T], rows mean |g| and mean g^2 (STATISTICS)
RawImportance = list[dict[tuple[int, str], torch.Tensor]]


def sft_loss(model, adapter: ModelAdapter, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    norm = get_submodule(model, adapter.final_norm)
    lm_head = get_submodule(model, adapter.lm_head)
    logits = lm_head(norm(hidden)).float()
    return F.cross_entropy(logits[0, :-1], labels[0, 1:].to(logits.device), ignore_index=-100)


def gradient_dtype(model) -> torch.dtype:
    """Where the gradient pass computes: fp16 has too little range for small token gradients (and
    there is no loss scaling), so fp16 models compute it in fp32; bf16 and fp32 ones in their dtype."""
    dtype = next(model.parameters()).dtype
    return torch.float32 if dtype == torch.float16 else dtype


def token_gradients(model, adapter: ModelAdapter, samples: list[CapturedSample], device: str = "cpu",
                    progress: bool = True) -> RawImportance:
    """Raw importance a^{l,b}_t for every sample, layer and block (see module docstring)."""
    layers = adapter.layers(model)
    dtype = gradient_dtype(model)
    head = [on_device(get_submodule(model, adapter.final_norm), device, dtype),
            on_device(get_submodule(model, adapter.lm_head), device, dtype)]
    for m in head:
        m.__enter__()
    raw: RawImportance = []
    every = range(len(layers))
    for sample in tqdm(samples, desc="gradients", disable=not progress, unit="sample"):
        kwargs = to_device(sample.layer_kwargs, device, dtype)
        inputs, h = forward_stage(layers, every, sample.hidden.to(dtype), kwargs, device, dtype)
        h = h.detach().requires_grad_(True)
        if (sample.labels != -100).sum() == 0:
            raise ValueError(f"sample {sample.sample_id} has no answer tokens")
        sft_loss(model, adapter, h, sample.labels).backward()
        per_layer = {}
        backward_stage(adapter, layers, every, inputs, h.grad, kwargs, device, per_layer, dtype)
        raw.append(per_layer)
        del inputs, h  # before the next sample's forward: one sample's stored inputs alive at a time
    for m in head:
        m.__exit__()
    return raw


def forward_stage(layers, indices: range, h: torch.Tensor, kwargs: dict, device: str,
                  dtype: torch.dtype | None = None):
    """FP forward through layers[indices] (no graph); returns each layer's input (on CPU) and the output.

    A pipeline stage of the multi-rank gradient pass (tlq/dist) runs the same two halves.
    """
    inputs = []
    with torch.no_grad():
        for index in indices:
            inputs.append(h.cpu())
            with on_device(layers[index], device, dtype):
                h = layers[index](h.to(device), **kwargs)
    return inputs, h


def backward_stage(adapter: ModelAdapter, layers, indices: range, inputs: list[torch.Tensor], grad: torch.Tensor,
                   kwargs: dict, device: str, per_layer: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Recompute layers[indices] one at a time, last to first, each from its stored input, passing
    `grad` (dL/d output) back; fills per_layer[(index, source)] for every block and quantized
    linear (rows: STATISTICS) and returns dL/d(first input)."""
    sources = {b: getattr(adapter, f"{b}_module") for b in BLOCKS} | {n: n for n in adapter.linear_names()}
    for index in reversed(indices):
        layer = layers[index]
        outputs = {}
        hooks = [get_submodule(layer, path).register_forward_hook(_keep_output(outputs, name))
                 for name, path in sources.items()]
        try:
            with on_device(layer, device, dtype), torch.enable_grad():
                x = inputs[index - indices.start].to(device).requires_grad_(True)
                layer(x, **kwargs).backward(grad)
        finally:
            for hk in hooks:
                hk.remove()
        for name in sources:
            g = outputs[name].grad.float()[0]
            per_layer[(index, name)] = torch.stack([g.abs().mean(-1), g.square().mean(-1)]).cpu()
        grad = x.grad
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


def _clip_per_modality(a: torch.Tensor, modality: torch.Tensor, k: float) -> torch.Tensor:
    """c_t of the module docstring: the IQR fence of each modality over its nonzero values."""
    c = a.clone()
    for m in MODALITY_NAMES:
        nonzero = (modality == m) & (a > 0)
        if int(nonzero.sum()) < MIN_FENCE_TOKENS:
            continue
        q1, q3 = torch.quantile(a[nonzero], torch.tensor([0.25, 0.75], dtype=a.dtype))
        lo, hi = max(float(q1 - k * (q3 - q1)), 0.0), float(q3 + k * (q3 - q1))
        c[nonzero] = a[nonzero].clamp(min=lo, max=hi)
    return c


def _modality_prior(c: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    prior = torch.empty_like(c)
    for m in MODALITY_NAMES:
        mask = modality == m
        if mask.any():
            prior[mask] = c[mask].mean()
    return prior


def _token_weights(a: torch.Tensor, modality: torch.Tensor, cfg: ImportanceConfig) -> torch.Tensor:
    lam = 1.0 if cfg.mode == "modality_prior" else cfg.prior_mix
    c = _clip_per_modality(a, modality, cfg.iqr_clip)
    s = lam * _modality_prior(c, modality) + (1 - lam) * c
    w = s / s.mean().clamp(min=1e-12)
    w = w.clamp(min=cfg.floor)
    return w / w.mean()


def _mbq_ratios(raw: RawImportance, modalities: list[torch.Tensor], gather=None) -> dict:
    """MBQ's r = g_vis / g_ans per (layer, block), floored at the median over the layers of the block.

    As thu-nics/MBQ (pre_quant.py, GradCacheHook): per sample the mean |g| over vision tokens and
    over answer tokens, each averaged over samples (samples without vision tokens count as MBQ's
    empty means would not: they are skipped). `gather` maps this process's ratios to those of every
    layer (a multi-rank run holds a share of the layers); medians are order-free, so the result
    equals the single-process one."""
    ratios = {}
    for key in (k for k in raw[0] if k[1] in BLOCKS):
        vis, ans = [], []
        for r, modality in zip(raw, modalities):
            a = r[key][STATISTICS["abs"]]
            if (modality == VISION).any() and (modality == ANSWER).any():
                vis.append(a[modality == VISION].mean())
                ans.append(a[modality == ANSWER].mean())
        ratios[key] = float(torch.stack(vis).mean() / torch.stack(ans).mean().clamp(min=1e-12)) if vis else 1.0
    every = gather(ratios) if gather is not None else ratios
    medians = {b: float(torch.tensor([v for (_, kb), v in every.items() if kb == b]).median())
               for b in {kb for _, kb in every}}
    return {k: max(r, medians[k[1]]) for k, r in ratios.items()}


def integrate(raw: RawImportance, modalities: list[torch.Tensor], cfg: ImportanceConfig, gather=None
              ) -> list[dict[tuple[int, str], torch.Tensor]]:
    """Final per-token weights per sample, keyed (layer, block), or (layer, linear name) for
    source "linear" in token modes (see the module docstring).

    Every step is per key except MBQ's median over layers: `gather` (see _mbq_ratios)."""
    lengths = [len(m) for m in modalities]
    modality = torch.cat(modalities)
    by_linear = cfg.source == "linear" and cfg.mode in ("token", "modality_prior")
    keys = [k for k in raw[0] if (k[1] not in BLOCKS) == by_linear]
    weights_all = {}
    if cfg.mode == "modality":
        ratios = _mbq_ratios(raw, modalities, gather)
    for key in keys:
        if cfg.mode == "uniform":
            w = torch.ones(len(modality))
        elif cfg.mode == "modality":
            w = torch.zeros(len(modality))
            w[modality == ANSWER] = 1.0
            w[modality == VISION] = ratios[key]
        else:
            a = torch.cat([r[key][STATISTICS[cfg.statistic]] for r in raw])
            w = _token_weights(a.double(), modality, cfg).float()
        weights_all[key] = w
    per_sample = [{} for _ in raw]
    for key, w in weights_all.items():
        for i, part in enumerate(torch.split(w, lengths)):
            per_sample[i][key] = part
    return per_sample


def group_weights(weights: list[dict[str, torch.Tensor]], group: LinearGroup) -> torch.Tensor:
    """[sum T] weights of a linear group's tokens from one layer's per-sample weights: its block's,
    or the mean of its linears' (source "linear")."""
    def one(w):
        if group.block in w:
            return w[group.block]
        return torch.stack([w[n] for n in group.names]).mean(0)
    return torch.cat([one(w) for w in weights])


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
