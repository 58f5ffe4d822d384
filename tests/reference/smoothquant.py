"""SmoothQuant's smoothing, following mit-han-lab/smoothquant smoothquant/smooth.py
(smooth_ln_fcs_llama_like, smooth_lm): for each decoder layer, the norm before q/k/v and the norm
before gate/up are smoothed with act_scales = max_t |x_t| per channel of the float model; o_proj
and down_proj are left alone."""
import torch
from torch import nn


@torch.no_grad()
def smooth_ln_fcs(ln: nn.Module, fcs: list[nn.Linear], act_scales: torch.Tensor, alpha: float = 0.5) -> None:
    weight_scales = torch.cat([fc.weight.abs().max(dim=0, keepdim=True)[0] for fc in fcs], dim=0)
    weight_scales = weight_scales.max(dim=0)[0].clamp(min=1e-5)
    scales = (act_scales.pow(alpha) / weight_scales.pow(1 - alpha)).clamp(min=1e-5)
    ln.weight.div_(scales)
    for fc in fcs:
        fc.weight.mul_(scales.view(1, -1))
