"""AWQ's scale and clip searches, following

  mit-han-lab/llm-awq         awq/quantize/auto_scale.py (auto_scale_block._search_module_scale, get_act_scale)
                              awq/quantize/auto_clip.py  (auto_clip_layer)
  casper-hansen/AutoAWQ       awq/quantize/quantizer.py  (AwqQuantizer._search_best_scale / _compute_best_scale,
                                                          duo_scaling)

`quantize` stands in for their pseudo_quantize_tensor (the tests pass tlq's RTN so that only the
search differs); `pseudo_quantize_tensor` below is that quantizer itself, whose arithmetic is the same in

  mit-han-lab/llm-awq         awq/quantize/quantizer.py  (pseudo_quantize_tensor)
  casper-hansen/AutoAWQ       awq/quantize/quantizer.py  (AwqQuantizer.pseudo_quantize_tensor)
  thu-nics/MBQ                qmllm/quantization/quant_funcs.py (pseudo_quantize_tensor)
"""
import torch
from torch import nn


@torch.no_grad()
def search_module_scale(block: nn.Module, linears: list[nn.Linear], x: torch.Tensor, quantize, kwargs=None,
                        duo_scaling=False, group_size=-1, n_grid=20) -> torch.Tensor:
    """Best s for `linears` (inside `block`, which reads x): MSE of block(x) against the float block."""
    kwargs = kwargs or {}

    def run():
        out = block(x, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    org_out = run()
    x_mean = x.abs().view(-1, x.shape[-1]).mean(0)  # get_act_scale
    if duo_scaling:  # AutoAWQ: w_mean of the concatenated weights, each group scaled to [0, 1]
        weight = torch.cat([fc.weight for fc in linears], dim=0)
        g = weight.shape[1] if group_size <= 0 else group_size
        w_scale = weight.abs().view(-1, g)
        w_scale = (w_scale / (w_scale.amax(dim=1, keepdim=True) + 1e-6)).view(weight.shape)
        w_mean = w_scale.mean(0)
    org_sd = {k: v.clone() for k, v in block.state_dict().items()}
    best_error, best_scales = float("inf"), None
    for r in range(n_grid):
        ratio = r / n_grid
        if duo_scaling:
            scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        else:
            scales = x_mean.pow(ratio).clamp(min=1e-4).view(-1)
        scales = scales / (scales.max() * scales.min()).sqrt()
        for fc in linears:
            fc.weight.mul_(scales.view(1, -1))
            fc.weight.data = quantize(fc.weight.data) / scales.view(1, -1)
        loss = (org_out - run()).float().pow(2).mean().item()
        if loss < best_error:
            best_error, best_scales = loss, scales.clone()
        block.load_state_dict(org_sd)
    return best_scales


@torch.no_grad()
def auto_clip_layer(w: torch.Tensor, input_feat: torch.Tensor, quantize, group_size: int, n_grid=20,
                    max_shrink=0.5, n_sample_token=512) -> torch.Tensor:
    """Best clamp value max_val [co, n_group] per row and group (auto_clip_layer)."""
    co, ci = w.shape
    g = group_size if group_size > 0 else ci
    input_feat = input_feat.view(-1, ci).reshape(1, -1, ci // g, g)
    input_feat = input_feat[:, 0::max(1, input_feat.shape[1] // n_sample_token)]
    w = w.reshape(co, 1, -1, g)
    org_max_val = w.abs().amax(dim=-1, keepdim=True)
    best_max_val = org_max_val.clone()
    min_errs = torch.ones_like(org_max_val) * 1e9
    org_out = (input_feat * w).sum(dim=-1)
    for i_s in range(int(max_shrink * n_grid)):
        max_val = org_max_val * (1 - i_s / n_grid)
        cur_w = torch.clamp(w, -max_val, max_val)
        q_w = quantize(cur_w.reshape(co, ci)).reshape(w.shape)
        cur_out = (input_feat * q_w).sum(dim=-1)
        err = (cur_out - org_out).pow(2).mean(dim=1).view(min_errs.shape)
        better = err < min_errs
        min_errs[better] = err[better]
        best_max_val[better] = max_val[better]
    return best_max_val.squeeze(1).squeeze(-1)


def pseudo_quantize_tensor(w: torch.Tensor, n_bit: int, zero_point: bool, group_size: int = -1) -> torch.Tensor:
    """Dequantized round-to-nearest of w [N, K] per row or per group: min-max with a zero point, or
    symmetric with scale absmax / (2**(n_bit-1) - 1) and codes clamped to [-2**(n_bit-1), 2**(n_bit-1) - 1]."""
    shape = w.shape
    w = w.float().reshape(-1, group_size) if group_size > 0 else w.float()
    if zero_point:
        hi, lo = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
        max_int, min_int = 2**n_bit - 1, 0
        scales = (hi - lo).clamp(min=1e-5) / max_int
        zeros = (-torch.round(lo / scales)).clamp_(min_int, max_int)
    else:
        max_int, min_int = 2 ** (n_bit - 1) - 1, -(2 ** (n_bit - 1))
        scales = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / max_int
        zeros = 0
    return ((torch.clamp(torch.round(w / scales) + zeros, min_int, max_int) - zeros) * scales).reshape(shape)
