"""MBQ's modality-balanced scale search, following thu-nics/MBQ

  qmllm/methods/mbq/quantize/auto_scale.py     (auto_scale_block._search_module_scale, weight-only)
  qmllm/methods/mbq/quantize/auto_scale_wa.py  (_search_module_scale_wa: per-token activation
                                                quantization of X/s inside the block)

loss_mode "mae" (the configs' default) with reweight_ratio r:
  (sum |dY| over answer tokens + r * sum |dY| over vision tokens) / (N_ans + N_vis) elements.
"""
import torch
from torch import nn


@torch.no_grad()
def search_module_scale(block: nn.Module, linears: list[nn.Linear], x: torch.Tensor, quantize, ans_mask, vis_mask,
                        reweight_ratio: float, kwargs=None, loss_mode="mae", act_quantize=None,
                        n_grid=20) -> torch.Tensor:
    """x [1, T, K]; masks [1, T] bool. act_quantize given: the W-A search (weights W*s quantized,
    activations quantized inside each linear, block fed x / s)."""
    kwargs = kwargs or {}

    def run(inp):
        out = block(inp, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    org_out = run(x)
    x_max = x.abs().view(-1, x.shape[-1]).mean(0)  # get_act_scale
    org_sd = {k: v.clone() for k, v in block.state_dict().items()}
    hooks = []
    if act_quantize is not None:
        hooks = [fc.register_forward_pre_hook(lambda m, a: (act_quantize(a[0]),)) for fc in linears]
    best_error, best_scales = float("inf"), None
    try:
        for r in range(n_grid):
            ratio = r / n_grid
            scales = x_max.pow(ratio).clamp(min=1e-4).view(-1)
            scales = scales / (scales.max() * scales.min()).sqrt()
            for fc in linears:
                fc.weight.mul_(scales.view(1, -1))
                fc.weight.data = quantize(fc.weight.data)
                if act_quantize is None:
                    fc.weight.data = fc.weight.data / scales.view(1, -1)
            out = run(x / scales.view(1, 1, -1) if act_quantize is not None else x)
            diff = (org_out - out).float()
            diff = diff.pow(2) if loss_mode == "mse" else diff.abs()
            ans = ans_mask.unsqueeze(-1).expand_as(out)
            vis = vis_mask.unsqueeze(-1).expand_as(out)
            if loss_mode == "mae":
                loss = ((diff * ans).sum() + reweight_ratio * (diff * vis).sum()) / (ans.sum() + vis.sum())
            else:
                loss = (diff * ans).sum() / ans.sum() + reweight_ratio * (diff * vis).sum() / vis.sum()
            loss = float(loss)
            if loss < best_error:
                best_error, best_scales = loss, scales.clone()
            block.load_state_dict(org_sd)
    finally:
        for h in hooks:
            h.remove()
    return best_scales
