"""Calibrate one decoder layer: input scaling, then each linear group in forward order.

Inputs of a group are read with a pre-hook on its first linear, so the earlier groups of the
same layer are already quantized when a later group is calibrated (as GPTQ does within a block).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn

from tlq.adapters import ModelAdapter, get_submodule
from tlq.calib.capture import to_device
from tlq.calib.config import CalibConfig
from tlq.calib.group_inputs import search_samples, stream_group
from tlq.calib.held_out_damping import choose_damping, held_out_samples
from tlq.calib.importance import group_weights
from tlq.calib.input_scaling import scale_layer_inputs, scales_in_loop
from tlq.calib.rss import trim_heap, trim_heap_every
from tlq.calib.solved_scaling import GroupSolution, fold_into_previous, solve_group
from tlq.calib.timing import timed
from tlq.quant.qparams import QuantizedWeight, quantize_activations_int8
from tlq.quant.solvers import SOLVERS, SolverSettings
from tlq.quant.statistics import projects_cross


@dataclass
class LayerInputs:
    """What the layer loop hands one layer: per-sample hidden states and token weights.

    Attributes:
        calib: [1, T, H] per sample, the inputs the solver calibrates on (quantized or FP path).
        fp: [1, T, H] per sample, the FP path's inputs (targets come from these).
        kwargs: per-sample decoder-layer keyword arguments (position embeddings, mask).
        weights: per sample, block name -> [T] token weights of this layer.
    """

    calib: list[torch.Tensor]
    fp: list[torch.Tensor]
    kwargs: list[dict]
    weights: list[dict[str, torch.Tensor]]

    def subset(self, samples: list[int]) -> LayerInputs:
        if len(samples) == len(self.calib):
            return self
        return LayerInputs(*([items[i] for i in samples] for items in (self.calib, self.fp, self.kwargs, self.weights)))


def sample_mass(weights: list[dict[str, torch.Tensor]]) -> list[float]:
    """Each sample's total token weight over the layer's blocks (what the search draw is weighted by)."""
    return [float(sum(w.float().sum() for w in per_block.values())) for per_block in weights]


def run_layer(layer: nn.Module, hidden, kwargs: list[dict], device: str, into=None):
    """The layer's outputs for every sample, appended to `into` (a SampleStore) or a new list."""
    out = [] if into is None else into
    with torch.no_grad():
        for h, kw in zip(hidden, kwargs):
            out.append(layer(h.to(device), **to_device(kw, device)).cpu())
            trim_heap_every(h.shape[-2])
    return out


def add_activation_quant(layer: nn.Module, names) -> list:
    """Per-token int8 fake quantization of the inputs of `names` (the a8 of w4a8)."""
    hook = lambda module, args: (quantize_activations_int8(args[0]),) + tuple(args[1:])
    return [get_submodule(layer, n).register_forward_pre_hook(hook) for n in names]


def select_tokens(w: torch.Tensor, drop_below: float, max_tokens: int | None, seed: int) -> torch.Tensor | None:
    """Token-level calibration set: indices kept after dropping negligible and down-sampling."""
    keep = torch.arange(len(w))
    if drop_below > 0:
        keep = keep[w[keep] >= drop_below]
    if max_tokens is not None and len(keep) > max_tokens:
        g = torch.Generator().manual_seed(seed)
        keep = keep[torch.randperm(len(keep), generator=g)[:max_tokens].sort().values]
    return None if len(keep) == len(w) else keep


def cross_projections(layer: nn.Module, names: tuple[str, ...], device: str) -> list[torch.Tensor] | None:
    """The group's weights when its float-path moment is cheaper kept projected through them
    (tlq/quant/statistics.py: the down projection, whose inputs outnumber its outputs), else None."""
    weights = [get_submodule(layer, n).weight for n in names]
    if not projects_cross(weights[0].shape[1], sum(W.shape[0] for W in weights)):
        return None
    return [W.detach().to(device) for W in weights]


def calibrate_layer(layer: nn.Module, layer_prefix: str, inputs: LayerInputs, adapter: ModelAdapter,
                    cfg: CalibConfig, dtype: torch.dtype, layer_seed: int, record: dict | None = None
                    ) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], list]:
    """Quantize `layer` in place (weights become their dequantized values).

    Returns (quantized weights by full module name, changed float tensors by full tensor name,
    activation-quant hooks that the caller removes once the layer's outputs are computed).
    `record`, when given, receives "damping": the damping each group chose (held-out choice only).
    """
    device, scheme, method = cfg.device, cfg.scheme, cfg.method
    layer.to(device)

    lengths = [h.shape[-2] for h in inputs.calib]
    search = search_samples(lengths, sample_mass(inputs.weights), cfg.search_tokens, layer_seed)
    in_loop = scales_in_loop(cfg)  # TLQ, weight-only: each group's scale is judged at its turn
    overrides = {}
    if not in_loop:
        with timed("scale search"):
            sub = inputs.subset(search)
            overrides = scale_layer_inputs(layer, layer_prefix, sub.calib, sub.kwargs, sub.weights, adapter,
                                           cfg, dtype, fp_hidden=sub.fp)
    # the float (scaled) layer: targets of corrected exposure; with fp exposure also where every
    # group reads its inputs, so later groups do not see the earlier groups' rounding (AutoAWQ's input_feat)
    fp_scaled = copy.deepcopy(layer) if method.exposure in ("corrected", "fp") else None
    solve = SOLVERS[method.solver].solve
    settings = SolverSettings(scheme, dtype, damp=cfg.damp, act_order=cfg.act_order,
                              exposure_strength=cfg.exposure_strength, clip_search=method.clip_search,
                              n_grid=cfg.n_grid)
    # the held-out fold of the damping choice: the same samples for every group of the layer
    held = held_out_samples(len(lengths), layer_seed) if len(cfg.damp_candidates) > 1 else None

    quantized, hooks = {}, []
    for index, group in enumerate(adapter.linear_groups):
        w = group_weights(inputs.weights, group) if method.importance != "uniform" else None
        keep = None
        if w is not None or cfg.importance.max_tokens is not None:  # uniform weights: --max-tokens only
            idx = select_tokens(torch.ones(sum(lengths)) if w is None else w, cfg.importance.drop_below,
                                cfg.importance.max_tokens, layer_seed)
            if idx is not None:
                keep = torch.zeros(sum(lengths), dtype=torch.bool)
                keep[idx] = True
        trim_heap()  # the freed heap of the last pass over the samples, not resident under this group's peak
        with timed("statistics"):
            data = stream_group(fp_scaled if method.exposure == "fp" else layer,
                                fp_scaled if method.exposure == "corrected" else None, group.names[0],
                                inputs.calib, inputs.fp, inputs.kwargs, device, weights=w, keep=keep,
                                act_quant=not scheme.weight_only, batch_tokens=cfg.batch_tokens,
                                search=search if method.clip_search else None, activation_stat=in_loop,
                                projections=cross_projections(layer, group.names, device)
                                if method.exposure == "corrected" else None, held=held)
        group_seed = layer_seed * len(adapter.linear_groups) + index  # a draw per group
        group_settings = settings
        if data.held is not None:
            with timed("damping"):
                damp, _ = choose_damping(layer, group, data, settings, cfg.damp_candidates, cfg.judge_rows,
                                         group_seed, method.solver)
            group_settings = replace(settings, damp=damp)
            if record is not None:
                record.setdefault("damping", {})[group.names[0]] = damp
        no_clip = replace(group_settings, clip_search=False)  # AWQ does not clip q/k: their error passes the softmax
        if in_loop:
            solution = solve_group(layer, group, data, cfg, dtype, group_settings, seed=group_seed)
        else:
            solution = GroupSolution({}, None)
            for name in group.names:
                with timed("solve"):
                    weight = get_submodule(layer, name).weight.detach().float()
                    solution.weights[name] = solve(weight, data,
                                                   no_clip if name in adapter.qk_linears else group_settings)
        for name, qw in solution.weights.items():
            with torch.no_grad():
                lin = get_submodule(layer, name)
                lin.weight.copy_(qw.dequantize(lin.weight.dtype))
            quantized[f"{layer_prefix}.{name}"] = qw.to("cpu")
        if solution.scale is not None:
            overrides.update(fold_into_previous(layer, layer_prefix, group, solution.scale, quantized, dtype))
        data.stats.release()
        if not scheme.weight_only:
            hooks += add_activation_quant(layer, group.names)
    return quantized, overrides, hooks
