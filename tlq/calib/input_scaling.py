"""Input scaling of one decoder layer, before its solver: X -> X / s folded into the op before
each linear group, W -> W * s, so the float layer computes the same function.

  awq          AWQ / MBQ grid search of s (tlq/quant/scale_search.py) per group, on the float
               weights of the whole layer (every group's s is searched before any is folded, as
               AutoAWQ does), scored on the block output for groups that read a block's input
  smoothquant  SmoothQuant's s (tlq/quant/smoothquant.py), only for the groups fed by a norm
               (q/k/v and gate/up, as the paper and llm-compressor's default mappings)
  auto         awq where activations are quantized, none for weight-only schemes
"""
from __future__ import annotations

import torch
from torch import nn

from tlq.adapters import LinearGroup, ModelAdapter, get_submodule
from tlq.calib.config import CalibConfig
from tlq.calib.importance import group_weights
from tlq.calib.probes import BlockProbe, collect_inputs, inspected_block
from tlq.quant.scale_search import search_input_scales
from tlq.quant.smoothquant import smooth_scales


def resolve_scaling(scaling: str, weight_only: bool) -> str:
    if scaling == "auto":  # activation quantization is where outlier channels hurt: smooth them then
        return "none" if weight_only else "awq"
    return scaling


def fold_scale(layer: nn.Module, group: LinearGroup, s: torch.Tensor) -> bool:
    """X -> X / s folded into the group's previous op, W -> W * s; False if it cannot absorb s."""
    if not can_fold(layer, group, s.numel()):
        return False
    prev = get_submodule(layer, group.prev_op)
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


def can_fold(layer: nn.Module, group: LinearGroup, channels: int) -> bool:
    if group.prev_op is None:
        return False
    # e.g. o_proj after v_proj under grouped-query attention: v_proj has fewer outputs than o_proj inputs
    return get_submodule(layer, group.prev_op).weight.shape[0] == channels


def scale_layer_inputs(layer: nn.Module, layer_prefix: str, hidden: list[torch.Tensor], kwargs: list[dict],
                       weights: list[dict], adapter: ModelAdapter, cfg: CalibConfig, dtype: torch.dtype
                       ) -> dict[str, torch.Tensor]:
    """Search and fold the input scales of `layer` on the samples `hidden`; returns the changed float
    tensors that are not quantized linears (norm weights) by full tensor name."""
    scaling = resolve_scaling(cfg.method.input_scaling, cfg.scheme.weight_only)
    if scaling == "none":
        return {}
    device, method = cfg.device, cfg.method
    scales = []
    for group in adapter.linear_groups:
        Ws = [get_submodule(layer, n).weight.float() for n in group.names]
        if not can_fold(layer, group, Ws[0].shape[1]):
            continue
        prev_is_linear = isinstance(get_submodule(layer, group.prev_op), nn.Linear)
        if scaling == "smoothquant" and prev_is_linear:
            continue
        X = collect_inputs(layer, group.names[0], hidden, kwargs, device).to(device)
        if scaling == "smoothquant":
            scales.append((group, smooth_scales(X, Ws, alpha=cfg.smoothquant_alpha)))
            continue
        w = group_weights(weights, group).to(device) if method.importance != "uniform" else None
        block_path = inspected_block(adapter, group) if method.scale_search.block_loss else None
        probe = BlockProbe(layer, block_path, group.names, hidden, kwargs, device) if block_path else None
        scales.append((group, search_input_scales(Ws, X, cfg.scheme, dtype, w=w, n_grid=cfg.n_grid,
                                                  act_quant=not cfg.scheme.weight_only, spec=method.scale_search,
                                                  block=probe)))
    overrides = {}
    for group, s in scales:
        fold_scale(layer, group, s)
        prev = get_submodule(layer, group.prev_op)
        if not isinstance(prev, nn.Linear):
            overrides[f"{layer_prefix}.{group.prev_op}.weight"] = prev.weight.detach().cpu().clone()
    return overrides
