"""Input scaling of one decoder layer, before its solver: X -> X / s folded into the op before
each linear group, W -> W * s, so the float layer computes the same function.

  awq          AWQ / MBQ grid search of s (tlq/quant/scale_search.py) per group, on the float
               weights of the whole layer (every group's s is searched before any is folded, as
               AutoAWQ does), scored on the block output for groups that read a block's input
  smoothquant  SmoothQuant's s (tlq/quant/smoothquant.py), only for the groups fed by a norm
               (q/k/v and gate/up, as the paper and llm-compressor's default mappings)
  auto         awq where activations are quantized, none for weight-only schemes

With ScaleSearchSpec.judge "solver" (TLQ) and a weight-only scheme, the scales are chosen in the layer
loop instead, group by group from the streamed statistics (tlq/calib/solved_scaling.py). With
activation quantization (w4a8; the statistics do not transform with s) the searched s of a group is
kept here only when the
group's token-weighted output error after the method's solver is lower than with s = 1:
    E(s) = sum_t w_t || Y_t - act(X_t / s) Q(s)^T ||^2,   Q(s) = solver(W s, X / s, X_fp / s)
with Y = X_fp W^T (corrected exposure; else X W^T). The identity is a candidate, so input
scaling never makes a solved group worse on the calibration tokens. The judge reads each
group's inputs from the float layer, before any group of the layer is quantized.
"""
from __future__ import annotations

import torch
from torch import nn

from tlq.adapters import LinearGroup, ModelAdapter, get_submodule
from tlq.calib.config import CalibConfig
from tlq.calib.importance import group_weights
from tlq.calib.probes import BlockProbe, collect_inputs, inspected_block
from tlq.quant.qparams import quantize_activations_int8
from tlq.quant.scale_search import search_input_scales
from tlq.quant.smoothquant import smooth_scales
from tlq.quant.solvers import SOLVERS, GroupData, SolverSettings


def resolve_scaling(scaling: str, weight_only: bool) -> str:
    if scaling == "auto":  # activation quantization is where outlier channels hurt: smooth them then
        return "none" if weight_only else "awq"
    return scaling


def scales_in_loop(cfg: CalibConfig) -> bool:
    """Whether the method's input scales are chosen in the layer loop, group by group from the streamed
    statistics (tlq/calib/solved_scaling.py), rather than here before the layer is solved."""
    return (cfg.scheme.weight_only and cfg.method.scale_search.judge == "solver"
            and resolve_scaling(cfg.method.input_scaling, True) == "awq" and SOLVERS[cfg.method.solver].needs_data)


def divide_output(prev: nn.Module, s: torch.Tensor, rows: bool = True) -> None:
    """prev's output divided by s: a norm's scale vector, or a linear's rows and bias (rows=False: the
    bias only, for a quantized linear whose rows change through its quantization scales)."""
    with torch.no_grad():
        if not isinstance(prev, nn.Linear):  # RMSNorm-style scale vector
            prev.weight.div_(s.to(prev.weight.dtype))
            return
        if rows:
            prev.weight.div_(s.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))


def fold_scale(layer: nn.Module, group: LinearGroup, s: torch.Tensor) -> bool:
    """X -> X / s folded into the group's previous op, W -> W * s; False if it cannot absorb s."""
    if not can_fold(layer, group, s.numel()):
        return False
    divide_output(get_submodule(layer, group.prev_op), s)
    with torch.no_grad():
        for name in group.names:
            lin = get_submodule(layer, name)
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
    return True


def can_fold(layer: nn.Module, group: LinearGroup, channels: int) -> bool:
    if group.prev_op is None:
        return False
    # e.g. o_proj after v_proj under grouped-query attention: v_proj has fewer outputs than o_proj inputs
    return get_submodule(layer, group.prev_op).weight.shape[0] == channels


def solved_error(Ws: list[torch.Tensor], X: torch.Tensor, X_fp: torch.Tensor | None, w: torch.Tensor | None,
                 s: torch.Tensor, cfg: CalibConfig, dtype: torch.dtype) -> float:
    """E(s) of the module docstring: the group's weighted output error after the method's solver."""
    Xs = X / s
    if not cfg.scheme.weight_only:
        Xs = quantize_activations_int8(Xs)
    data = GroupData(Xs, w, None if X_fp is None else X_fp / s)
    settings = SolverSettings(cfg.scheme, dtype, damp=cfg.damp, act_order=cfg.act_order,
                              exposure_strength=cfg.exposure_strength, clip_search=cfg.method.clip_search,
                              n_grid=cfg.n_grid)
    weight = torch.ones(len(X), device=X.device) if w is None else w
    error = 0.0
    for W in Ws:
        Q = SOLVERS[cfg.method.solver].solve(W * s, data, settings).dequantize().to(X.device)
        Y = (X if X_fp is None else X_fp) @ W.T
        error += float((weight * (Y - Xs @ Q.T).square().sum(1)).sum())
    return error


def scale_layer_inputs(layer: nn.Module, layer_prefix: str, hidden: list[torch.Tensor], kwargs: list[dict],
                       weights: list[dict], adapter: ModelAdapter, cfg: CalibConfig, dtype: torch.dtype,
                       fp_hidden: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Search and fold the input scales of `layer` on the samples `hidden`; returns the changed float
    tensors that are not quantized linears (norm weights) by full tensor name. `fp_hidden` (the float
    stream) gives the judge its targets under corrected exposure."""
    scaling = resolve_scaling(cfg.method.input_scaling, cfg.scheme.weight_only)
    if scaling == "none" or scales_in_loop(cfg):
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
        s = search_input_scales(Ws, X, cfg.scheme, dtype, w=w, n_grid=cfg.n_grid,
                                act_quant=not cfg.scheme.weight_only, spec=method.scale_search, block=probe)
        if bool((s == 1).all()):
            continue  # the search chose no scaling (alpha = 0)
        if method.scale_search.judge == "solver":
            X_fp = None
            if method.exposure == "corrected" and fp_hidden is not None:
                X_fp = collect_inputs(layer, group.names[0], fp_hidden, kwargs, device).to(device)
            if solved_error(Ws, X, X_fp, w, s, cfg, dtype) >= solved_error(Ws, X, X_fp, w, torch.ones_like(s), cfg,
                                                                             dtype):
                continue  # the identity wins (ties too)
        scales.append((group, s))
    overrides = {}
    for group, s in scales:
        fold_scale(layer, group, s)
        prev = get_submodule(layer, group.prev_op)
        if not isinstance(prev, nn.Linear):
            overrides[f"{layer_prefix}.{group.prev_op}.weight"] = prev.weight.detach().cpu().clone()
        elif prev.bias is not None:  # the linear's weight is quantized later; its bias is stored as it is
            overrides[f"{layer_prefix}.{group.prev_op}.bias"] = prev.bias.detach().cpu().clone()
    return overrides
