"""The plugin's pure-torch weight transforms and serve-spec checks (no vLLM needed).

Every transform must be exact: the lifted / repacked / permuted weight dequantizes to exactly the
weights `QuantizedWeight.dequantize()` gives for the packed checkpoint tensors.
"""
from __future__ import annotations

import pytest
import torch

from tlq.errors import CheckpointError
from tlq.format.checkpoint import pack_linear
from tlq.format.packing import pack
from tlq.quant.qparams import QuantizedWeight, quantize_rtn
from vllm_plugin.spec import ServeSpec
from vllm_plugin.weights import (
    LoadedWeight,
    act_order_permutation,
    lift_to_uint4,
    pack_gptq,
    unpack_along_n,
    unpack_codes,
)

BITS = (2, 3, 4, 8)


def rtn(bits, group, sym, n=64, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return quantize_rtn(w, bits, group, sym, torch.bfloat16)


def loaded_from_checkpoint(qw: QuantizedWeight) -> LoadedWeight:
    """What the plugin holds after vLLM loaded this layer unsharded: codes from the packed qweight,
    zero points unpacked along N (as UnpackedZerosParameter does)."""
    t = pack_linear(qw, torch.bfloat16)
    n, k = qw.shape
    zeros = unpack_along_n(t["qzeros"], qw.bits)[:, :n] if "qzeros" in t else None
    g_idx = t["g_idx"].long().unsqueeze(0) if "g_idx" in t else None
    return LoadedWeight(unpack_codes(t["qweight"], qw.bits, k), t["scales"], zeros, qw.bits, qw.group_size,
                        g_idx, (n,))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [32, 128, -1])
def test_loaded_weight_dequantizes_like_the_reference(bits, sym, group):
    qw = rtn(bits, group, sym)
    lw = loaded_from_checkpoint(qw)
    assert torch.equal(lw.dequantize(torch.float32), qw.dequantize(torch.float32))
    assert torch.equal(lw.dequantize(torch.bfloat16), qw.dequantize(torch.bfloat16))


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_lift_to_uint4_is_exact(bits, sym):
    qw = rtn(bits, 64, sym)
    lw = loaded_from_checkpoint(qw)
    codes, zeros = lift_to_uint4(lw.codes, lw.zeros, bits)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    lifted = LoadedWeight(codes, lw.scales, zeros, 4, 64, None, (qw.shape[0],))
    assert torch.equal(lifted.dequantize(), qw.dequantize())
    if sym:  # symmetric lifts to vLLM's uint4b8 (offset 8): no zero points at all
        assert zeros is None


def test_lift_refuses_8_bit():
    with pytest.raises(ValueError):
        lift_to_uint4(torch.zeros(32, 8, dtype=torch.int32), None, 8)


@pytest.mark.parametrize("bits", (4, 8))
def test_pack_gptq_matches_the_format_packing(bits):
    codes = torch.randint(0, 2**bits, (64, 96), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    assert torch.equal(pack_gptq(codes, bits, dim=0), pack(codes, bits, dim=0))
    assert torch.equal(pack_gptq(codes.t(), bits, dim=1), pack(codes.t().contiguous(), bits, dim=1))
    with pytest.raises(ValueError):
        pack_gptq(codes[:, :5], bits, dim=1)


def test_unpack_along_n_handles_padding():
    zeros = torch.randint(0, 8, (4, 40), dtype=torch.int32)  # N = 40: padded to 64 codes on disk
    packed = pack(zeros, 3, dim=1)
    assert packed.shape == (4, 6)
    assert torch.equal(unpack_along_n(packed, 3)[:, :40], zeros)


def act_order_qw(bits=4, group=32, sym=False, n=48, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    perm = torch.randperm(k, generator=g)
    q = quantize_rtn(w[:, perm], bits, group, sym, torch.bfloat16)
    codes = torch.empty_like(q.codes)
    codes[:, perm] = q.codes
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // group).to(torch.int32)
    return QuantizedWeight(codes, q.scales, q.zeros, bits, group, g_idx), perm


def test_act_order_permutation_regroups_exactly():
    qw, _ = act_order_qw()
    lw = loaded_from_checkpoint(qw)
    assert torch.equal(lw.dequantize(), qw.dequantize())
    perm, first = act_order_permutation(lw.g_idx[0], 32)
    assert first == 0
    # gathered input channels form contiguous groups: an ordinary grouped weight, on permuted inputs
    grouped = LoadedWeight(lw.codes[perm], lw.scales, lw.zeros, 4, 32, None, lw.shard_sizes)
    x = torch.randn(3, qw.shape[1])
    ref = x @ qw.dequantize().t()
    assert torch.allclose(x[:, perm] @ grouped.dequantize().t(), ref, atol=1e-4)


def test_act_order_permutation_refuses_split_groups():
    qw, _ = act_order_qw()
    half = qw.g_idx[:64]  # a row-parallel rank's slice: groups of a random permutation are split
    assert act_order_permutation(half, 32) is None
    assert act_order_permutation(torch.arange(64) // 32, 32) is not None
    assert act_order_permutation(torch.arange(64) // 32 + 2, 32)[1] == 2


def test_per_shard_g_idx_dequantizes_each_shard_with_its_own_groups():
    a, _ = act_order_qw(seed=1, n=32)
    b, _ = act_order_qw(seed=2, n=16)
    fused = LoadedWeight(torch.cat([a.codes, b.codes]).t().contiguous(), torch.cat([a.scales, b.scales]).t(),
                         torch.cat([a.zeros, b.zeros]).t(), 4, 32,
                         torch.stack([a.g_idx, b.g_idx]).long(), (32, 16))
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))


# -- serve spec ----------------------------------------------------------------------------
def qcfg(**kw):
    base = {"quant_method": "tlq", "format_version": 1, "scheme": "w4a16", "bits": 4, "group_size": 128,
            "sym": True, "act_bits": 16, "act_order": False, "ignore": ["visual", "lm_head"]}
    return {**base, **kw}


def test_spec_reads_a_valid_config():
    spec = ServeSpec.from_dict(qcfg(bits=3, sym=False, act_order=True))
    assert (spec.bits, spec.sym, spec.act_order, spec.ignore) == (3, False, True, ("visual", "lm_head"))


@pytest.mark.parametrize("bad, words", [
    ({"bits": 5}, "5-bit"), ({"group_size": 48}, "group size 48"), ({"act_bits": 4}, "act_bits"),
    ({"act_bits": 8, "group_size": 128}, "per-channel"), ({"format_version": 9}, "upgrade tlq"),
    ({"quant_method": "gptq"}, "not 'tlq'"),
])
def test_spec_refuses_what_it_cannot_serve(bad, words):
    with pytest.raises(CheckpointError, match=words):
        ServeSpec.from_dict(qcfg(**bad))


def test_spec_refuses_missing_fields():
    cfg = qcfg()
    del cfg["sym"]
    with pytest.raises(CheckpointError, match="lacks sym"):
        ServeSpec.from_dict(cfg)
