import torch

from tlq.quant.qparams import quantize_rtn
from tlq.quant.rtn import rtn_quantize
from tlq.schemes import get_scheme


def test_rtn_wraps_quantize_rtn_under_the_scheme():
    W = torch.randn(16, 96, generator=torch.Generator().manual_seed(0))
    for name in ("w3a16", "w4a8"):
        s = get_scheme(name).with_overrides(group_size=32 if name == "w3a16" else None)
        got = rtn_quantize(W, s, torch.bfloat16)
        ref = quantize_rtn(W, s.bits, s.group_size, s.symmetric, torch.bfloat16)
        assert torch.equal(got.codes, ref.codes) and torch.equal(got.scales, ref.scales)
        assert got.bits == s.bits and got.group_size == s.group_size
        # scales are representable in the checkpoint dtype
        assert torch.equal(got.scales, got.scales.to(torch.bfloat16).float())
