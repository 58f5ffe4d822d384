"""Calibrate one decoder layer: input scaling, then each linear group in forward order.

Inputs of a group are read with a pre-hook on its first linear, so the earlier groups of the
same layer are already quantized when a later group is calibrated (as GPTQ does within a block).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from tlq.adapters import LinearGroup, ModelAdapter, get_submodule
from tlq.calib.capture import to_device
from tlq.calib.config import CalibConfig
from tlq.quant.qparams import QuantizedWeight, quantize_activations_int8
from tlq.quant.scale_search import search_input_scales
from tlq.quant.smoothquant import smooth_scales
from tlq.quant.solvers import SOLVERS, GroupData, SolverSettings


class _Stop(Exception):
    pass


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


def run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], device: str) -> list[torch.Tensor]:
    with torch.no_grad():
        return [layer(h.to(device), **to_device(kw, device)).cpu() for h, kw in zip(hidden, kwargs)]


def collect_inputs(layer: nn.Module, module_name: str, hidden: list[torch.Tensor], kwargs: list[dict],
                   device: str) -> torch.Tensor:
    """[sum T, K] inputs of `module_name` over all samples (the forward stops right after)."""
    store = []

    def hook(module, args):
        store.append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())
        raise _Stop

    handle = get_submodule(layer, module_name).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for h, kw in zip(hidden, kwargs):
                try:
                    layer(h.to(device), **to_device(kw, device))
                except _Stop:
                    pass
    finally:
        handle.remove()
    return torch.cat(store)


def add_activation_quant(layer: nn.Module, names) -> list:
    """Per-token int8 fake quantization of the inputs of `names` (the a8 of w4a8)."""
    hook = lambda module, args: (quantize_activations_int8(args[0]),) + tuple(args[1:])  # noqa: E731
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


def _fold_scale(layer: nn.Module, group: LinearGroup, s: torch.Tensor) -> bool:
    """X -> X / s folded into the group's previous op, W -> W * s; False if it cannot absorb s."""
    if group.prev_op is None:
        return False
    prev = get_submodule(layer, group.prev_op)
    if prev.weight.shape[0] != s.numel():
        return False  # e.g. o_proj after v_proj under grouped-query attention
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.div_(s.to(prev.weight.dtype)[:, None])
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        else:  # RMSNorm-style scale vector
            prev.weight.div_(s.to(prev.weight.dtype))
        for name in group.names:
            lin = get_submodule(layer, name)
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
    return True


def _input_scales(cfg: CalibConfig, scaling: str, group: LinearGroup, layer, X: torch.Tensor,
                  w: torch.Tensor | None, dtype):
    Ws = [get_submodule(layer, n).weight.float() for n in group.names]
    if scaling == "smoothquant":
        return smooth_scales(X, Ws, alpha=cfg.smoothquant_alpha)
    return search_input_scales(Ws, X, cfg.scheme, dtype, w=w, n_grid=cfg.n_grid,
                               act_quant=not cfg.scheme.weight_only)


def calibrate_layer(layer: nn.Module, layer_prefix: str, inputs: LayerInputs, adapter: ModelAdapter,
                    cfg: CalibConfig, dtype: torch.dtype, layer_seed: int
                    ) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], list]:
    """Quantize `layer` in place (weights become their dequantized values).

    Returns (quantized weights by full module name, changed float tensors by full tensor name,
    activation-quant hooks that the caller removes once the layer's outputs are computed).
    """
    device, scheme, method = cfg.device, cfg.scheme, cfg.method
    layer.to(device)

    def block_weights(group):
        return torch.cat([w[group.block] for w in inputs.weights])

    overrides: dict[str, torch.Tensor] = {}
    scaling = method.input_scaling
    if scaling == "auto":  # activation quantization is where outlier channels hurt: smooth them then
        scaling = "none" if scheme.weight_only else "awq"
    if scaling != "none":
        for group in adapter.linear_groups:
            X = collect_inputs(layer, group.names[0], inputs.calib, inputs.kwargs, device).to(device)
            s = _input_scales(cfg, scaling, group, layer, X, block_weights(group).to(device), dtype)
            if _fold_scale(layer, group, s) and not isinstance(get_submodule(layer, group.prev_op), nn.Linear):
                overrides[f"{layer_prefix}.{group.prev_op}.weight"] = get_submodule(layer, group.prev_op).weight.detach().cpu().clone()
    fp_scaled = copy.deepcopy(layer) if method.exposure == "corrected" else None
    solve = SOLVERS[method.solver].solve
    settings = SolverSettings(scheme, dtype, damp=cfg.damp, act_order=cfg.act_order,
                              exposure_strength=cfg.exposure_strength, clip_search=method.clip_search,
                              n_grid=cfg.n_grid)

    quantized, hooks = {}, []
    for group in adapter.linear_groups:
        X = collect_inputs(layer, group.names[0], inputs.calib, inputs.kwargs, device)
        if not scheme.weight_only:
            X = quantize_activations_int8(X)
        w = block_weights(group) if method.importance != "uniform" else None
        X_fp = None
        if fp_scaled is not None:
            X_fp = collect_inputs(fp_scaled, group.names[0], inputs.fp, inputs.kwargs, device)
        if w is not None or cfg.importance.max_tokens is not None:  # uniform weights: --max-tokens only
            keep = select_tokens(torch.ones(len(X)) if w is None else w, cfg.importance.drop_below,
                                 cfg.importance.max_tokens, layer_seed)
            if keep is not None:
                X, w = X[keep], None if w is None else w[keep]
                X_fp = None if X_fp is None else X_fp[keep]
        # inputs are gathered on the CPU; the solver runs where the layer is
        data = GroupData(*(None if t is None else t.to(device) for t in (X, w, X_fp)))
        for name in group.names:
            lin = get_submodule(layer, name)
            qw = solve(lin.weight.detach().float(), data, settings)
            with torch.no_grad():
                lin.weight.copy_(qw.dequantize(lin.weight.dtype))
            quantized[f"{layer_prefix}.{name}"] = qw.to("cpu")
        if not scheme.weight_only:
            hooks += add_activation_quant(layer, group.names)
    return quantized, overrides, hooks
